"""iGPT for the engine: palette-index sequences of images through the shared
GPT objective (or, with ``IGPTConfig.objective="bert"``, the shared BERT
masking and ``mlm_loss``); evaluation is a linear probe per layer and, for
the causal objective, a sample grid.

The palette is fit when the task is built (k-means on the pixels of
``palette_images`` training images, like the BPE of ``gpt-pydoc`` is learned
from its train split); images become ids inside the loss. ``evaluate``
reports ``eval/bits_per_pixel`` (``eval/mlm_loss`` with the BERT objective)
on the test split, the per-layer probe
(``eval/layer{l}_linear_probe_accuracy`` and k-NN; features: the layer's
mean over positions with ``probe.features="pooled"``, its hidden states at
every pixel, flattened, with ``"tokens"``, first averaged over cells of
``probe.token_pool`` squared pixels when > 1), the best layer's accuracy as
``eval/linear_probe_accuracy`` with ``eval/best_layer`` (1-based), and
writes ``igpt_samples_step{N}.png`` (KV-cache samples).
"""

from __future__ import annotations

import dataclasses
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from datong.params import params_collection
from datong.train.task import EvalContext, Task
from datong.train.tasks.images import ImageData
from datong.train.tasks.probes import ProbeConfig, probe_metrics, real_rows
from datong.train.tasks.visual_tokens import training_images
from datong.train.tasks.vision import _spec
from datong.unimodal import igpt
from datong.unimodal.text import causal_lm_loss, mlm_loss, mlm_mask

LN2 = float(np.log(2.0))


@dataclasses.dataclass(frozen=True)
class IGPTTaskConfig:
  """iGPT pretraining on ``data``; ``palette_images`` training images fit the palette.

  ``train_augment=False``: training sees the images as they are; ``data``'s
  augmentation then only makes the probe's extra views (``probe.train_views``).
  """
  model: igpt.IGPTConfig
  data: ImageData = ImageData()
  probe: ProbeConfig = ProbeConfig()
  train_augment: bool = True
  palette_images: int = 1000
  samples: int = 32  # images in the sample PNG (0: none)
  temperature: float = 1.0

  def build(self) -> "IGPTTask":
    return IGPTTask(self)


class IGPTTask(Task):

  def __init__(self, config: IGPTTaskConfig):
    self.config = config
    self.data = config.data
    self.dataset = config.data.dataset
    self.model = config.model.make()
    if config.probe.features not in ("pooled", "tokens"):
      raise ValueError(f"IGPTTaskConfig.probe.features={config.probe.features!r}: iGPT probes "
                       "'pooled' (each layer's mean over positions) or 'tokens' (the layer's "
                       "hidden states at every pixel, flattened).")
    self.probe_features = "mean" if config.probe.features == "pooled" else "tokens"
    pixels = training_images(self, config.palette_images)
    if pixels.shape[1:3] != config.model.image_size or pixels.shape[-1] != config.model.channels:
      raise ValueError(f"IGPTTaskConfig: the data gives images {pixels.shape[1:]}; the model "
                       f"expects {config.model.image_size + (config.model.channels,)}.")
    self.palette = igpt.fit_palette(jax.random.PRNGKey(0), pixels.reshape(-1, pixels.shape[-1]),
                                    config.model.palette_size)

  @property
  def image_size(self):
    return self.config.model.image_size

  @property
  def channels(self):
    return self.config.model.channels

  def preprocess(self, example, rng, train):
    return self.data(example, rng, train)

  def batch_spec(self, batch_size):
    return _spec(batch_size, self)

  def ids(self, images):
    return igpt.image_to_ids(images, self.palette)

  def init(self, rng, batch):
    b = batch["image"].shape[0]
    return self.model.init(rng, jnp.zeros((b, self.config.model.length), jnp.int32))

  def _apply(self, params, images, *, train=False, rng=None, return_layers=False,
             mask_rng=None):
    """``(ids, logits, aux, selected)``: ``selected`` are the pixels the BERT
    objective predicts (with ``mask_rng``; None for the causal objective)."""
    cfg = self.config.model
    ids = self.ids(images)
    selected = None
    if cfg.objective == "causal":
      inputs = igpt.igpt_inputs(ids, cfg)
    elif mask_rng is not None:
      inputs, selected = mlm_mask(mask_rng, ids, vocab_size=cfg.palette_size + 1,
                                  mask_id=cfg.start_id, special_ids=(cfg.start_id,),
                                  rate=cfg.mask_rate)
    else:
      inputs = ids  # features of the whole, unmasked image
    rngs = {"dropout": rng} if rng is not None else {}
    logits, aux = self.model.apply({"params": params_collection(nn.unbox(params))}, inputs,
                                   train=train, rngs=rngs, return_layers=return_layers)
    return ids, logits, aux, selected

  def loss(self, params, batch, rng, *, train=True):
    aug_rng, drop_rng, mask_rng = jax.random.split(rng, 3)
    augment = train and self.config.train_augment
    images = self.data.augment(batch["image"], aug_rng) if augment else batch["image"]
    ids, logits, _, selected = self._apply(params, images, train=train,
                                           rng=drop_rng if train else None, mask_rng=mask_rng)
    if selected is not None:
      loss, metrics = mlm_loss(logits, ids, selected)
      return loss, {"loss": loss, **metrics}
    loss, metrics = causal_lm_loss(logits, ids, jnp.ones(ids.shape, jnp.float32))
    metrics["bits_per_pixel"] = metrics["nll"] / LN2
    return loss, {"loss": loss, **metrics}

  def evaluate(self, params, ctx: EvalContext):
    loss_fn = jax.jit(lambda p, x: self.loss(p, {"image": x}, jax.random.PRNGKey(0),
                                             train=False)[0])
    total, count = 0.0, 0
    for batch in ctx.batches(self.eval_split):
      n = int(real_rows(batch).sum())
      total += float(loss_fn(params, batch["image"])) * n
      count += n

    def features(p, images):
      _, _, aux, _ = self._apply(p, images, return_layers=True)
      per_layer = igpt.layer_features(aux["layers"], self.probe_features,
                                      self.config.model.image_size, self.config.probe.token_pool)
      return {f"layer{l + 1}_": per_layer[l] for l in range(per_layer.shape[0])}

    metrics = probe_metrics(jax.jit(features), params, ctx, self.config.probe,
                            self.train_split, self.eval_split,
                            jax.jit(self.data.augment) if self.data.augments else None)
    depth = self.config.model.backbone.depth
    curve = [metrics[f"eval/layer{l}_linear_probe_accuracy"] for l in range(1, depth + 1)]
    best = int(np.argmax(curve))
    causal = self.config.model.objective == "causal"
    metrics.update({"eval/linear_probe_accuracy": curve[best], "eval/best_layer": best + 1,
                    "eval/bits_per_pixel" if causal else "eval/mlm_loss":
                    total / max(count, 1) / (LN2 if causal else 1.0)})
    if causal and self.config.samples and ctx.workdir and jax.process_index() == 0:
      os.makedirs(ctx.workdir, exist_ok=True)
      images = jax.jit(lambda p, key: igpt.sample_images(
          self.config.model, params_collection(nn.unbox(p)), self.palette, key,
          self.config.samples, temperature=self.config.temperature))(params, jax.random.PRNGKey(0))
      igpt.save_image_grid(os.path.join(ctx.workdir, f"igpt_samples_step{ctx.step}.png"), images)
    return metrics

  def tokens_per_example(self):
    return self.config.model.length

  def flops_per_example(self):
    m = self.config.model
    n = m.length
    return n * m.backbone.flops_per_token(n, causal=True) + 3 * 2 * n * m.backbone.width * (
        m.palette_size + 1)

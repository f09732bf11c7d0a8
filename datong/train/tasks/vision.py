"""Image objectives for the engine: supervised classification (and
fine-tuning), MAE and SimMIM, with their evaluation.

* ``ViTClassifierConfig`` -> ``ViTClassifierTask``: any image encoder
  (``datong.unimodal.encoders``) + a linear head, label smoothing, optional
  mixup; with ``pretrained`` set it is fine-tuning of a pretrained encoder
  with layer-wise learning-rate decay (``learning_rate_scale``). Reports
  ``eval/accuracy``.
* ``MAETaskConfig`` / ``SimMIMTaskConfig``: masked-image pretraining;
  evaluation is a linear probe (logistic regression on frozen pooled
  features, fit on train, scored on test) and k-NN accuracy
  (``datong.train.tasks.probes``); MAE also writes a PNG of
  reconstructions. Both export the encoder's parameters to
  ``<workdir>/encoder_params.msgpack`` for fine-tuning.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from datong.params import params_collection
from datong.ops.losses import soft_cross_entropy
from datong.train import warmstart
from datong.train.task import EvalContext, Task, path_names, with_aux_losses
from datong.train.tasks.images import ImageData, shift_images
from datong.train.tasks.probes import ProbeConfig, probe_metrics, real_rows, select_features
from datong.unimodal import masked_image as mim
from datong.unimodal.encoders import ImageClassifier, check_image_encoder

ENCODER_EXPORT = "encoder_params.msgpack"


def _unbox(params):
  return params_collection(nn.unbox(params))


def export_encoder(params, workdir: str, name: str = ENCODER_EXPORT) -> str:
  """Write the ``encoder`` subtree of ``params`` as msgpack; returns the path."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, name)
  state = jax.tree.map(np.asarray, jax.device_get(_unbox(params)["encoder"]))
  with open(path, "wb") as f:
    f.write(flax.serialization.msgpack_serialize(state))
  return path


# ------------------------------------------------------------------- shared

def _spec(batch_size: int, model, labels: bool = True) -> dict:
  h, w = model.image_size
  spec = {"image": jax.ShapeDtypeStruct((batch_size, h, w, model.channels), jnp.float32)}
  if labels:
    spec["label"] = jax.ShapeDtypeStruct((batch_size,), jnp.int32)
  return spec


def _check_sizes(model, data: ImageData, native=(8, 8)):
  """The model's image_size must be what the preprocessing produces (digits: 8x8)."""
  if data.dataset == "digits" and tuple(model.image_size) != data.output_size(native):
    raise ValueError(f"model image_size {model.image_size} != digits {native} x "
                     f"upsample {data.upsample} = {data.output_size(native)}.")


class _ImageTask(Task):
  """Shared plumbing: data, the encoder's config (``encoder_config``)."""

  def __init__(self, data: ImageData, encoder, where: str):
    check_image_encoder(encoder, where)
    _check_sizes(encoder, data)
    self.data = data
    self.dataset = data.dataset
    self.encoder_config = encoder

  def preprocess(self, example, rng, train):
    return self.data(example, rng, train)

  def tokens_per_example(self) -> int:
    return self.encoder_config.num_tokens


# ------------------------------------------------------------ supervised ViT

@dataclasses.dataclass(frozen=True)
class ViTClassifierConfig:
  """Supervised image classification (or fine-tuning of a pretrained encoder).

  ``model``: any image-encoder config (``ViTConfig``, or another that meets
  ``datong.unimodal.encoders.ImageEncoderConfig``).
  ``pretrained``: an exported encoder (``encoder_params.msgpack`` of an
  MAE / SimMIM run), a ViT / MAE / SimMIM / CLIP run's workdir or a Hugging
  Face directory; read by ``warmstart.merge`` (a position table is
  interpolated when the grid differs: the encoder's ``resize_param``).
  ``layer_decay`` < 1 scales the learning rate of layer ``i`` (of ``depth``;
  the stem is layer 0, the head ``depth + 1``) by
  ``layer_decay ** (depth + 1 - i)``.
  """
  model: Any
  data: ImageData = ImageData()
  num_classes: int = 10
  label_smoothing: float = 0.0
  mixup: float = 0.0  # Beta(mixup, mixup) mixing coefficient; 0 = off
  pretrained: str = ""
  layer_decay: float = 1.0
  # Test-time augmentation: average the softmax over all integer shifts in
  # [-tta_shift, tta_shift]^2 (of the upsampled image, zero fill). 0: off.
  tta_shift: int = 0

  def __post_init__(self):
    if not 0.0 <= self.label_smoothing < 1.0:
      raise ValueError(f"ViTClassifierConfig.label_smoothing={self.label_smoothing}: in [0, 1).")
    if self.mixup < 0:
      raise ValueError(f"ViTClassifierConfig.mixup={self.mixup}: must be >= 0.")
    if not 0.0 < self.layer_decay <= 1.0:
      raise ValueError(f"ViTClassifierConfig.layer_decay={self.layer_decay}: in (0, 1].")

  def build(self) -> "ViTClassifierTask":
    return ViTClassifierTask(self)


def layer_ids(params, depth: int, layer_index=None):
  """Per-leaf layer index for layer-wise lr decay: stem / cls / pos 0,
  backbone ``layer_i`` i + 1, the final norm and head ``depth + 1``.
  ``layer_index(names)``: the encoder's own rule (a Swin's stage-aware
  ids), consulted first; None from it falls back to the rule above."""
  def layer(path, _):
    names = path_names(path)
    if layer_index is not None:
      inner = names[1:] if names and names[0] == "encoder" else None
      found = layer_index(inner) if inner is not None else None
      if found is not None:
        return found
    for n in names:
      if n.startswith("layer_"):
        return int(n.split("_")[1]) + 1
      if n == "layers":  # scanned layers: one id for the stack (the middle)
        return (depth + 1) // 2
    if "encoder" in names and ("stem" in names or "cls" in names):
      return 0
    return depth + 1
  return jax.tree_util.tree_map_with_path(layer, params)


class ViTClassifierTask(_ImageTask):
  """Cross-entropy on (smoothed, optionally mixed-up) labels; eval/accuracy."""

  def __init__(self, config: ViTClassifierConfig):
    super().__init__(config.data, config.model, "ViTClassifierConfig.model")
    self.config = config
    self.model = ImageClassifier(config.model, config.num_classes)
    # Only the pretrained encoder is kept; a tree without one fails here, at build.
    self.pretrained = (warmstart.find_encoder(warmstart.load_pretrained(config.pretrained))
                       if config.pretrained else None)

  def batch_spec(self, batch_size):
    return _spec(batch_size, self.config.model)

  def init(self, rng, batch):
    variables = self.model.init(rng, jnp.zeros(batch["image"].shape, jnp.float32))
    if self.pretrained is not None:
      variables = {**variables, "params": warmstart.merge_encoder(
          variables["params"], self.pretrained, self.config.model, at="encoder")}
    return variables

  def logits(self, params, images, *, train=False, rng=None):
    return self._apply(params, images, train=train, rng=rng)[0]

  def _apply(self, params, images, *, train=False, rng=None):
    rngs = {"dropout": rng} if rng is not None else {}
    return self.model.apply({"params": _unbox(params)}, images, train=train, rngs=rngs)

  def loss(self, params, batch, rng, *, train=True):
    cfg = self.config
    mix_rng, perm_rng, drop_rng, aug_rng = jax.random.split(rng, 4)
    images = self.data.augment(batch["image"], aug_rng) if train else batch["image"]
    targets = jax.nn.one_hot(batch["label"], cfg.num_classes)
    if cfg.label_smoothing:
      targets = optax.smooth_labels(targets, cfg.label_smoothing)
    if train and cfg.mixup > 0:
      lam = jax.random.beta(mix_rng, cfg.mixup, cfg.mixup)
      lam = jnp.maximum(lam, 1.0 - lam)  # the original image dominates
      perm = jax.random.permutation(perm_rng, images.shape[0])
      images = lam * images + (1.0 - lam) * images[perm]
      targets = lam * targets + (1.0 - lam) * targets[perm]
    logits, aux = self._apply(params, images, train=train, rng=drop_rng if train else None)
    loss = jnp.mean(soft_cross_entropy(logits, targets))
    acc = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
    return loss, with_aux_losses({"loss": loss, "accuracy": acc}, aux)

  def predict_proba(self, params, images):
    """Class probabilities ``[b, classes]``, averaged over the TTA shifts."""
    r = self.config.tta_shift
    if not r:
      return jax.nn.softmax(self.logits(params, images))
    shifts = [(dy, dx) for dy in range(-r, r + 1) for dx in range(-r, r + 1)]
    probs = [jax.nn.softmax(self.logits(params, shift_images(images, dy, dx)))
             for dy, dx in shifts]
    return jnp.mean(jnp.stack(probs), axis=0)

  def evaluate(self, params, ctx: EvalContext):
    proba = jax.jit(self.predict_proba)
    correct, count, loss_sum = 0, 0, 0.0
    for batch in ctx.batches(self.eval_split):
      real = real_rows(batch)
      p = np.asarray(proba(params, batch["image"]))
      labels = np.asarray(batch["label"])
      pred = p.argmax(-1)
      losses = -np.log(np.maximum(p[np.arange(len(labels)), labels], 1e-12))
      correct += int(np.sum((pred == np.asarray(batch["label"]))[real]))
      loss_sum += float(np.sum(losses[real]))
      count += int(real.sum())
    return {"eval/accuracy": correct / max(count, 1), "eval/loss": loss_sum / max(count, 1)}

  def learning_rate_scale(self, params):
    decay = self.config.layer_decay
    if decay == 1.0:
      return None
    depth = getattr(self.config.model, "depth", None)
    if depth is None:
      raise ValueError(f"ViTClassifierConfig.layer_decay={decay} needs the encoder's layer count; "
                       f"{type(self.config.model).__name__} has no depth.")
    ids = layer_ids(params, depth, getattr(self.config.model, "layer_index", None))
    return jax.tree.map(lambda i: float(decay ** (depth + 1 - i)), ids)

  def flops_per_example(self):
    m = self.config.model
    return m.flops_per_example() + 3 * 2 * m.width * self.config.num_classes



# ---------------------------------------------------------------------- MAE

@dataclasses.dataclass(frozen=True)
class MAETaskConfig:
  """MAE pretraining; evaluation = linear probe + k-NN + reconstruction PNG."""
  model: mim.MAEConfig
  data: ImageData = ImageData()
  probe: ProbeConfig = ProbeConfig()
  png_examples: int = 8  # test images in the reconstruction PNG (0: none)
  export_encoder: bool = True

  def build(self) -> "MAETask":
    return MAETask(self)


class _MIMTask(_ImageTask):
  """Shared evaluation of the masked-image tasks."""

  def batch_spec(self, batch_size):
    return _spec(batch_size, self.encoder_config)

  def features(self, params, images, which: Optional[str] = None):
    which = self.config.probe.features if which is None else which
    return self.feature_sets(params, images, (which,))[which]

  def feature_sets(self, params, images, which: tuple[str, ...]) -> dict:
    """``{name: [b, d]}`` for every feature set in ``which``, from one encoder pass."""
    _, aux = self.encoder_config.make().apply(
        {"params": _unbox(params)["encoder"]}, images, return_layers="layers" in which)
    return {w: select_features(aux, w, self.config.probe.token_pool if w == "tokens" else 1)
            for w in which}

  def mean_eval_loss(self, params, ctx):
    loss_fn = jax.jit(lambda p, b: self.loss(p, b, jax.random.PRNGKey(0), train=False)[0])
    total, count = 0.0, 0
    for batch in ctx.batches(self.eval_split):
      n = int(real_rows(batch).sum())
      total += float(loss_fn(params, {"image": batch["image"]})) * n
      count += n
    return total / max(count, 1)

  def evaluate(self, params, ctx: EvalContext):
    probe = self.config.probe

    def feature_sets(p, images):
      if probe.features == "pooled":
        return {"": self.features(p, images)}
      # The standard pooled probe too, for comparison (same encoder pass).
      sets = self.feature_sets(p, images, (probe.features, "pooled"))
      return {"": sets[probe.features], "pooled_": sets["pooled"]}

    metrics = probe_metrics(jax.jit(feature_sets), params, ctx, probe,
                            self.train_split, self.eval_split,
                            jax.jit(self.data.augment) if self.data.augments else None)
    metrics["eval/loss"] = self.mean_eval_loss(params, ctx)
    if self.config.export_encoder and ctx.workdir and jax.process_index() == 0:
      export_encoder(params, ctx.workdir)
    return metrics


class MAETask(_MIMTask):

  def __init__(self, config: MAETaskConfig):
    super().__init__(config.data, config.model.encoder, "MAETaskConfig.model.encoder")
    self.config = config
    self.model = mim.MAE(config.model)

  def masking(self, rng, batch_size: int) -> mim.Masking:
    return mim.random_masking(rng, batch_size, self.encoder_config.num_patches,
                              self.config.model.mask_ratio)

  def init(self, rng, batch):
    b = batch["image"].shape[0]
    m = self.masking(jax.random.PRNGKey(0), b)
    return self.model.init(rng, jnp.zeros(batch["image"].shape, jnp.float32),
                           m.keep_indices, m.restore_indices)

  def apply(self, params, images, rng, *, train=False):
    mask_rng, drop_rng = jax.random.split(rng)
    m = self.masking(mask_rng, images.shape[0])
    pred, aux = self.model.apply({"params": _unbox(params)}, images, m.keep_indices,
                                 m.restore_indices, train=train, rngs={"dropout": drop_rng})
    return pred, m, aux

  def loss(self, params, batch, rng, *, train=True):
    aug_rng, rng = jax.random.split(rng)
    images = self.data.augment(batch["image"], aug_rng) if train else batch["image"]
    pred, m, aux = self.apply(params, images, rng, train=train)
    loss, metrics = mim.mae_loss(pred, images, m.mask, self.encoder_config.patch_size,
                                 norm_pix=self.config.model.norm_pix_loss)
    return loss, with_aux_losses(metrics, aux)

  def reconstruction_png(self, params, ctx: EvalContext, path: str) -> str:
    n = self.config.png_examples
    images = jnp.asarray(np.asarray(next(iter(ctx.batches(self.eval_split)))["image"])[:n])
    out = jax.jit(lambda p, x: mim.reconstruct(self.model, _unbox(p), x, jax.random.PRNGKey(1)))(
        params, images)
    return mim.save_reconstruction_grid(path, images, out["masked"], out["reconstruction"])

  def evaluate(self, params, ctx):
    metrics = super().evaluate(params, ctx)
    if self.config.png_examples and ctx.workdir and jax.process_index() == 0:
      os.makedirs(ctx.workdir, exist_ok=True)
      self.reconstruction_png(params, ctx, os.path.join(
          ctx.workdir, f"mae_reconstructions_step{ctx.step}.png"))
    return metrics

  def flops_per_example(self):
    enc, dec = self.encoder_config, self.config.model.decoder
    n = enc.num_patches
    n_keep = n - mim.num_masked(n, self.config.model.mask_ratio)
    prefix = int(enc.has_cls)
    encoder = enc.flops_per_example(n_keep + prefix) - (n - n_keep) * 3 * 2 * enc.patch_dim * enc.backbone.width
    decoder = (n + prefix) * dec.flops_per_token(n + prefix)
    heads = 3 * 2 * ((n_keep + prefix) * enc.backbone.width * dec.width + n * dec.width * enc.patch_dim)
    return float(encoder + decoder + heads)



# ------------------------------------------------------------------- SimMIM

@dataclasses.dataclass(frozen=True)
class SimMIMTaskConfig:
  """SimMIM pretraining; evaluation = linear probe + k-NN."""
  model: mim.SimMIMConfig
  data: ImageData = ImageData()
  probe: ProbeConfig = ProbeConfig()
  export_encoder: bool = True

  def build(self) -> "SimMIMTask":
    return SimMIMTask(self)


class SimMIMTask(_MIMTask):

  def __init__(self, config: SimMIMTaskConfig):
    super().__init__(config.data, config.model.encoder, "SimMIMTaskConfig.model.encoder")
    self.config = config
    self.model = mim.SimMIM(config.model)

  def masking(self, rng, batch_size: int):
    return mim.simmim_masking(rng, batch_size, self.config.model)

  def init(self, rng, batch):
    b = batch["image"].shape[0]
    return self.model.init(rng, jnp.zeros(batch["image"].shape, jnp.float32),
                           jnp.zeros((b, self.encoder_config.num_patches), bool))

  def loss(self, params, batch, rng, *, train=True):
    mask_rng, drop_rng, aug_rng = jax.random.split(rng, 3)
    images = self.data.augment(batch["image"], aug_rng) if train else batch["image"]
    mask = self.masking(mask_rng, images.shape[0])
    pred, aux = self.model.apply({"params": _unbox(params)}, images, mask, train=train,
                                 rngs={"dropout": drop_rng})
    loss, metrics = mim.simmim_loss(pred, images, mim.output_mask(mask, self.config.model),
                                    mim.output_patch(self.encoder_config))
    return loss, with_aux_losses(metrics, aux)

  def flops_per_example(self):
    enc = self.encoder_config
    oh, ow = mim.output_patch(enc)
    h, w = enc.image_size
    return enc.flops_per_example() + 3 * 2 * (h // oh) * (w // ow) * enc.width * oh * ow * enc.channels

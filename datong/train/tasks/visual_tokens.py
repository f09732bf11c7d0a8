"""Discrete visual tokens for the engine: the VQ-VAE tokenizer and BEiT.

* ``VQVAETaskConfig``: trains ``unimodal.visual_tokenizer.VQVAE``; the
  codebook starts from k-means on encoder outputs of training images (at
  init); evaluation reports ``eval/recon_mse``, ``eval/codebook_usage`` and
  ``eval/perplexity`` on the test split and writes a PNG of (input,
  reconstruction from the tokens) rows.
* ``BEiTTaskConfig``: BEiT pretraining (``unimodal.beit``) with blockwise
  masks; the target tokens come from one of three tokenizers:
  ``"vqvae"`` (a ``VQVAEConfig`` + ``tokenizer_path``: a ``vqvae`` run's
  workdir or a ``.msgpack`` of its params), ``"feature"`` (ids precomputed
  by any tokenizer, read from the dataset's ``token_feature``, ``[n]`` ints
  per image) or ``"kmeans"`` (each patch's nearest of ``vocab_size``
  k-means centroids of normalized training patches; fit when the task is
  built, needs no other run). Evaluation is the shared linear probe / k-NN
  (``tasks.probes``) and the encoder is exported for fine-tuning.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from datong.ops import vq
from datong.ops.patches import patchify
from datong.params import params_collection
from datong.train import warmstart
from datong.train.task import EvalContext, with_aux_losses
from datong.train.tasks.images import ImageData
from datong.train.tasks.probes import ProbeConfig, real_rows
from datong.train.tasks.vision import _ImageTask, _MIMTask, _spec
from datong.unimodal.beit import BEiT, BEiTConfig, beit_loss, beit_masking
from datong.unimodal.masked_image import save_reconstruction_grid
from datong.unimodal.visual_tokenizer import (VQVAE, VQVAEConfig, codebook_statistics,
                                              init_codebook_state, kmeans_init, update_codebook,
                                              vqvae_loss)

TOKENIZERS = ("kmeans", "vqvae", "feature")


def _unbox(params):
  return params_collection(nn.unbox(params))


def training_images(task, count: int) -> np.ndarray:
  """The first ``count`` training images, preprocessed without augmentation."""
  source = task.source(task.train_split)
  rng = np.random.default_rng(0)
  n = min(count, len(source))
  return np.stack([task.data(source[i], rng, False)["image"] for i in range(n)])


# -------------------------------------------------------------------- VQ-VAE

@dataclasses.dataclass(frozen=True)
class VQVAETaskConfig:
  """VQ-VAE tokenizer training; ``kmeans_images``: training images whose
  encoder outputs seed the codebook (k-means, at init)."""
  model: VQVAEConfig
  data: ImageData = ImageData()
  kmeans_images: int = 512
  png_examples: int = 8

  def build(self) -> "VQVAETask":
    return VQVAETask(self)


class VQVAETask(_ImageTask):

  def __init__(self, config: VQVAETaskConfig):
    self.config = config
    self.data = config.data
    self.dataset = config.data.dataset
    self.encoder_config = config.model
    self.model = VQVAE(config.model)

  def batch_spec(self, batch_size):
    return _spec(batch_size, self.config.model)  # labels ride along, unused

  def init(self, rng, batch):
    init_rng, km_rng = jax.random.split(rng)
    variables = self.model.init(init_rng, jnp.zeros(batch["image"].shape, jnp.float32))
    images = jnp.asarray(training_images(self, self.config.kmeans_images))
    params = kmeans_init(self.model, nn.unbox(variables["params"]), images, km_rng)
    boxed = jax.tree.map(lambda box, v: box.replace_boxed(v) if isinstance(box, nn.Partitioned)
                         else v, variables["params"], params,
                         is_leaf=lambda x: isinstance(x, nn.Partitioned))
    if self.config.model.tracks_usage:  # moving-average state: small, replicated
      boxed = {**boxed, "codebook_ema": init_codebook_state(params, self.config.model)["codebook_ema"]}
    return {**variables, "params": boxed}

  def trainable(self, params):
    cfg = self.config.model
    if not cfg.tracks_usage:
      return None
    frozen = {"codebook_ema"} | ({"codebook"} if cfg.codebook_update == "ema" else set())
    return {k: jax.tree.map(lambda _, f=(k in frozen): not f, v) for k, v in params.items()}

  def loss(self, params, batch, rng, *, train=True):
    aug_rng, pick_rng = jax.random.split(rng)
    images = self.data.augment(batch["image"], aug_rng) if train else batch["image"]
    model_params = {k: v for k, v in params.items() if k != "codebook_ema"}
    recon, aux = self.model.apply({"params": _unbox(model_params)}, images, train=train)
    loss, metrics = vqvae_loss(recon, images, aux, self.config.model)
    if train and self.config.model.tracks_usage:
      metrics["update_stats"] = codebook_statistics(aux, self.config.model, pick_rng)
    return loss, metrics

  def post_update(self, params, stats, step):
    del step
    if not self.config.model.tracks_usage:
      return params
    return update_codebook(params, stats, self.config.model)

  def evaluate(self, params, ctx: EvalContext):
    fn = jax.jit(lambda p, x: self.model.apply(
        {"params": _unbox({k: v for k, v in p.items() if k != "codebook_ema"})}, x))
    sq, count, ids = 0.0, 0, []
    for batch in ctx.batches(self.eval_split):
      real = real_rows(batch)
      x = np.asarray(batch["image"])
      recon, aux = fn(params, batch["image"])
      sq += float(np.sum(((np.asarray(recon) - x) ** 2)[real]))
      count += int(real.sum()) * int(np.prod(x.shape[1:]))
      ids.append(np.asarray(aux["ids"])[real])
    m = vq.codebook_metrics(jnp.asarray(np.concatenate(ids)), self.config.model.codebook_size)
    if self.config.png_examples and ctx.workdir and jax.process_index() == 0:
      x = np.asarray(next(iter(ctx.batches(self.eval_split)))["image"])[:self.config.png_examples]
      recon, aux = fn(params, jnp.asarray(x))
      cfg = self.config.model
      # columns: input, its token ids as gray levels (one cell per patch), reconstruction
      ids = np.asarray(aux["ids"]).reshape(-1, *cfg.grid) / max(cfg.codebook_size - 1, 1) * 2 - 1
      ids = np.repeat(np.repeat(ids, cfg.patch_size[0], 1), cfg.patch_size[1], 2)[..., None]
      os.makedirs(ctx.workdir, exist_ok=True)
      save_reconstruction_grid(os.path.join(ctx.workdir, f"vqvae_reconstructions_step{ctx.step}.png"),
                               x, np.repeat(ids, x.shape[-1], -1), np.asarray(recon))
    return {"eval/recon_mse": sq / max(count, 1), "eval/codebook_usage": float(m["usage"]),
            "eval/perplexity": float(m["perplexity"])}

  def tokens_per_example(self):
    return self.config.model.num_patches


# ---------------------------------------------------------------------- BEiT

@dataclasses.dataclass(frozen=True)
class BEiTTaskConfig:
  """BEiT pretraining; see the module docstring for ``tokenizer``."""
  model: BEiTConfig
  data: ImageData = ImageData()
  probe: ProbeConfig = ProbeConfig()
  tokenizer: str = "kmeans"
  tokenizer_model: Optional[VQVAEConfig] = None  # for tokenizer="vqvae"
  tokenizer_path: str = ""  # a vqvae run's workdir or params .msgpack
  token_feature: str = ""  # for tokenizer="feature"
  kmeans_images: int = 1000  # training images whose patches fit the k-means tokenizer
  export_encoder: bool = True

  def __post_init__(self):
    if self.tokenizer not in TOKENIZERS:
      raise ValueError(f"BEiTTaskConfig.tokenizer={self.tokenizer!r}: choose one of {TOKENIZERS}.")
    if self.tokenizer_model is not None:
      check_tokenizer(self.tokenizer_model, self.model)
    if self.tokenizer == "feature":
      if not self.token_feature:
        raise ValueError("BEiTTaskConfig.tokenizer='feature' needs token_feature (the dataset "
                         "feature with [num_patches] token ids per image).")
      if self.data.augments or self.data.crop_pad:
        raise ValueError("BEiTTaskConfig: precomputed tokens belong to the unaugmented image; "
                         "set data.shift/rotate/scale/crop_pad to 0 with tokenizer='feature'.")

  def build(self) -> "BEiTTask":
    return BEiTTask(self)


def check_tokenizer(tok: VQVAEConfig, model: BEiTConfig) -> None:
  """One token per patch, one logit per code."""
  enc = model.encoder
  if (tok.patch_size, tok.image_size) != (enc.patch_size, enc.image_size):
    raise ValueError(f"BEiTTaskConfig: the tokenizer's patches {tok.patch_size} / images "
                     f"{tok.image_size} must be the encoder's {enc.patch_size} / "
                     f"{enc.image_size} (one token per patch).")
  if tok.codebook_size != model.vocab_size:
    raise ValueError(f"BEiTTaskConfig: model.vocab_size={model.vocab_size} must be the "
                     f"tokenizer's codebook_size={tok.codebook_size}.")


def tokenizer_of_run(workdir: str) -> VQVAEConfig:
  """The ``VQVAEConfig`` stored with a ``vqvae`` run's latest checkpoint."""
  from datong.train import config as config_lib  # pylint: disable=import-outside-toplevel
  from datong.train.checkpoint import stored_run_config  # pylint: disable=import-outside-toplevel
  if not os.path.isdir(os.path.join(workdir, "checkpoints")):
    raise ValueError(f"tokenizer_path {workdir!r} is no run's workdir (no checkpoints/); give "
                     "tokenizer_model with a params .msgpack instead.")
  stored = stored_run_config(workdir)
  task = getattr(config_lib.from_json(stored), "task", None) if stored else None
  if not isinstance(task, VQVAETaskConfig):
    raise ValueError(f"tokenizer_path {workdir!r}: its stored run is not a vqvae run "
                     f"({type(task).__name__}); train one with `datong train vqvae-digits`.")
  return task.model


class BEiTTask(_MIMTask):

  def __init__(self, config: BEiTTaskConfig):
    super().__init__(config.data, config.model.encoder, "BEiTTaskConfig.model.encoder")
    self.config = config
    self.model = BEiT(config.model)
    self.patch = config.model.encoder.patch_size
    if config.tokenizer == "kmeans":
      patches = patchify(jnp.asarray(training_images(self, config.kmeans_images)), self.patch)
      patches = patches.reshape(-1, patches.shape[-1])
      self.centroids, _ = vq.kmeans(jax.random.PRNGKey(0), patches, config.model.vocab_size)
    elif config.tokenizer == "vqvae":
      if not config.tokenizer_path:  # checked here, not in the config: recipes name it later
        raise ValueError(
            "BEiTTaskConfig.tokenizer='vqvae' needs tokenizer_path: a vqvae run's workdir (its "
            "VQVAEConfig is read from there) or a params .msgpack with tokenizer_model. Train "
            "one first (`datong train vqvae-digits --workdir W`, about a minute), then "
            "`--set task.tokenizer_path=W`; or `--set task.tokenizer=kmeans`, which needs no "
            "other run.")
      tok = config.tokenizer_model or tokenizer_of_run(config.tokenizer_path)
      check_tokenizer(tok, config.model)
      params = warmstart.load_pretrained(config.tokenizer_path)
      params = {k: v for k, v in params.items() if k != "codebook_ema"}  # training state
      self.tokenizer = VQVAE(tok)
      self.tokenizer_params = jax.tree.map(jnp.asarray, params)

  def preprocess(self, example, rng, train):
    out = self.data(example, rng, train)
    if self.config.tokenizer == "feature":
      out["tokens"] = np.asarray(example[self.config.token_feature], np.int32)
    return out

  def batch_spec(self, batch_size):
    spec = _spec(batch_size, self.encoder_config)
    if self.config.tokenizer == "feature":
      n = self.encoder_config.num_patches
      spec["tokens"] = jax.ShapeDtypeStruct((batch_size, n), jnp.int32)
    return spec

  def tokens(self, batch, images):
    """``[b, n]`` target ids of ``images`` (the images the model sees)."""
    if self.config.tokenizer == "feature":
      return batch["tokens"]
    if self.config.tokenizer == "kmeans":
      return vq.nearest_code(patchify(images, self.patch), self.centroids)
    return self.tokenizer.apply({"params": self.tokenizer_params}, images, method=VQVAE.tokens)

  def init(self, rng, batch):
    b = batch["image"].shape[0]
    return self.model.init(rng, jnp.zeros(batch["image"].shape, jnp.float32),
                           jnp.zeros((b, self.encoder_config.num_patches), bool))

  def loss(self, params, batch, rng, *, train=True):
    mask_rng, drop_rng, aug_rng = jax.random.split(rng, 3)
    images = self.data.augment(batch["image"], aug_rng) if train else batch["image"]
    mask = beit_masking(mask_rng, images.shape[0], self.config.model)
    logits, aux = self.model.apply({"params": _unbox(params)}, images, mask, train=train,
                                   rngs={"dropout": drop_rng})
    loss, metrics = beit_loss(logits, jax.lax.stop_gradient(self.tokens(batch, images)), mask)
    return loss, with_aux_losses(metrics, aux)

  def mean_eval_loss(self, params, ctx):
    if self.config.tokenizer != "feature":
      return super().mean_eval_loss(params, ctx)
    loss_fn = jax.jit(lambda p, b: self.loss(p, b, jax.random.PRNGKey(0), train=False)[0])
    total, count = 0.0, 0
    for batch in ctx.batches(self.eval_split):
      n = int(real_rows(batch).sum())
      total += float(loss_fn(params, {"image": batch["image"], "tokens": batch["tokens"]})) * n
      count += n
    return total / max(count, 1)

  def flops_per_example(self):
    enc = self.encoder_config
    return enc.flops_per_example() + 3 * 2 * enc.num_patches * enc.width * self.config.model.vocab_size

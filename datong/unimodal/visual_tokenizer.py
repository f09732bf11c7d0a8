"""A visual tokenizer: a patch VQ-VAE on the shared backbone.

Images are cut into patches (the ``PatchEmbedding`` stem with fixed sin-cos
positions), encoded by a ``Transformer``, projected to ``code_dim`` and
quantized to the nearest of ``codebook_size`` codes (``ops.vq.quantize``:
straight-through gradient, codebook and commitment losses); a second
``Transformer`` decodes the codes back to patches of pixels. One token per
patch, so a BEiT with the same patch size reads the ids as its targets
(``VQVAE.tokens``).

The codebook is initialized from data by k-means on encoder outputs
(``kmeans_init``) and trained either by the codebook loss
(``codebook_update="loss"``) or by exponential moving averages of the
vectors assigned to each code (``"ema"``, VQ-VAE's appendix). With
``dead_code_threshold > 0``, codes whose moving-average share of the
assignments falls below that fraction of the uniform share ``1 / K`` move
to random encoder outputs of the current batch. Both non-gradient updates
are pure functions of the step's ``codebook_statistics``
(``update_codebook``), which a train step applies after the optimizer's
update (``Task.post_update``); their state is the frozen ``codebook_ema``
params (``init_codebook_state``). ``restart_dead`` does one restart from a
set of images, outside training.

    cfg = VQVAEConfig(TransformerConfig.preset("tiny"), TransformerConfig.preset("tiny"),
                      image_size=8, patch_size=2, channels=1, codebook_size=64)
    recon, aux = VQVAE(cfg).apply(params, images)   # aux["ids"] [b, n]
    loss, metrics = vqvae_loss(recon, images, aux, cfg)
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from datong.backbone import Transformer, TransformerConfig
from datong.ops import vq
from datong.ops.patches import grid_shape, pair, unpatchify
from datong.ops.posemb import sincos_2d
from datong.unimodal.vision import PatchEmbedding


@dataclasses.dataclass(frozen=True)
class VQVAEConfig:
  """Patch VQ-VAE: encoder and decoder backbones, image geometry, codebook."""
  encoder: TransformerConfig
  decoder: TransformerConfig
  image_size: tuple[int, int] = (8, 8)
  patch_size: tuple[int, int] = (2, 2)
  channels: int = 1
  codebook_size: int = 256
  code_dim: int = 16
  commitment: float = 0.25  # weight of the commitment loss (VQ-VAE's beta)
  codebook_update: str = "loss"  # "loss" (gradient of the codebook loss) or "ema"
  ema_decay: float = 0.99  # of the assignment shares and sums (also tracked for restarts)
  dead_code_threshold: float = 0.0  # restart codes below this fraction of the uniform share

  def __post_init__(self):
    object.__setattr__(self, "image_size", pair(self.image_size))
    object.__setattr__(self, "patch_size", pair(self.patch_size))
    grid_shape(self.image_size, self.patch_size)  # raises with the sizes named
    for field in ("codebook_size", "code_dim", "channels"):
      if getattr(self, field) < 1:
        raise ValueError(f"VQVAEConfig.{field}={getattr(self, field)}: must be positive.")
    if self.commitment < 0:
      raise ValueError(f"VQVAEConfig.commitment={self.commitment}: must be >= 0.")
    if self.codebook_update not in ("loss", "ema"):
      raise ValueError(f"VQVAEConfig.codebook_update={self.codebook_update!r}: use 'loss' "
                       "(the codebook loss trains the codes) or 'ema' (moving averages).")
    if not 0.0 <= self.ema_decay < 1.0:
      raise ValueError(f"VQVAEConfig.ema_decay={self.ema_decay}: must be in [0, 1).")
    if not 0.0 <= self.dead_code_threshold < 1.0:
      raise ValueError(f"VQVAEConfig.dead_code_threshold={self.dead_code_threshold}: a "
                       "fraction of the uniform share 1/K in [0, 1); 0 turns restarts off.")

  @property
  def tracks_usage(self) -> bool:
    """Whether training keeps the ``codebook_ema`` state (EMA codes or restarts)."""
    return self.codebook_update == "ema" or self.dead_code_threshold > 0

  @property
  def grid(self) -> tuple[int, int]:
    return grid_shape(self.image_size, self.patch_size)

  @property
  def num_patches(self) -> int:
    return self.grid[0] * self.grid[1]

  @property
  def patch_dim(self) -> int:
    return self.patch_size[0] * self.patch_size[1] * self.channels


class VQVAE(nn.Module):
  """``images [b, h, w, c] -> (reconstruction [b, h, w, c], aux)``; ``aux``:
  ``z`` (encoder outputs ``[b, n, code_dim]``), ``ids [b, n]``,
  ``codebook_loss``, ``commitment_loss``. Parameters: ``stem``, ``encoder``,
  ``to_code``, ``codebook [K, code_dim]``, ``from_code``, ``decoder``,
  ``to_pixels``."""
  config: VQVAEConfig

  def setup(self):
    cfg = self.config
    enc, dec = cfg.encoder, cfg.decoder
    dense = lambda n, axes, name: nn.Dense(
        n, dtype=jnp.float32, param_dtype=enc.params_dtype,
        kernel_init=nn.with_logical_partitioning(nn.initializers.xavier_uniform(), axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[-1:]), name=name)
    self.stem = PatchEmbedding(enc.width, cfg.patch_size, cfg.image_size, posemb="sincos",
                               dtype=enc.compute_dtype, param_dtype=enc.params_dtype)
    self.encoder = Transformer(enc)
    self.to_code = dense(cfg.code_dim, ("embed", None), "to_code")
    self.codebook = self.param("codebook", nn.with_logical_partitioning(
        nn.initializers.normal(1.0), ("vocab", None)), (cfg.codebook_size, cfg.code_dim),
        jnp.float32)
    self.from_code = dense(dec.width, (None, "embed"), "from_code")
    self.decoder = Transformer(dec)
    self.to_pixels = dense(cfg.patch_dim, ("embed", "patch"), "to_pixels")

  def encode(self, images, train: bool = False):
    """``[b, h, w, c]`` -> encoder outputs ``[b, n, code_dim]`` (before quantization)."""
    hidden, _ = self.encoder(self.stem(images), train=train)
    return self.to_code(hidden.astype(jnp.float32))

  def tokens(self, images):
    """``[b, h, w, c]`` -> ``[b, n]`` int32 code ids (row-major patches)."""
    return vq.nearest_code(self.encode(images), self.codebook)

  def decode(self, codes, train: bool = False):
    """Code vectors ``[b, n, code_dim]`` -> images ``[b, h, w, c]``."""
    cfg = self.config
    x = self.from_code(codes) + sincos_2d(*cfg.grid, cfg.decoder.width)[None]
    hidden, _ = self.decoder(x.astype(cfg.decoder.compute_dtype), train=train)
    patches = self.to_pixels(hidden.astype(jnp.float32))
    return unpatchify(patches, cfg.patch_size, cfg.image_size, cfg.channels)

  def decode_ids(self, ids):
    """``[b, n]`` ids -> images."""
    return self.decode(self.codebook[ids])

  def __call__(self, images, *, train: bool = False):
    z = self.encode(images, train=train)
    q = vq.quantize(z, self.codebook)
    recon = self.decode(q.quantized, train=train)
    return recon, {"z": z, "ids": q.ids, "codebook_loss": q.codebook_loss,
                   "commitment_loss": q.commitment_loss}


def vqvae_loss(recon, images, aux, config: VQVAEConfig):
  """Pixel MSE + codebook loss + ``commitment`` x commitment loss (the
  codebook loss is left out with ``codebook_update="ema"``: the moving
  averages move the codes); metrics add codebook usage and perplexity of
  the batch's ids."""
  mse = jnp.mean((recon.astype(jnp.float32) - images.astype(jnp.float32)) ** 2)
  loss = mse + config.commitment * aux["commitment_loss"]
  if config.codebook_update == "loss":
    loss = loss + aux["codebook_loss"]
  return loss, {"loss": loss, "recon_mse": mse, "codebook_loss": aux["codebook_loss"],
                **vq.codebook_metrics(aux["ids"], config.codebook_size)}


def kmeans_init(model: VQVAE, params, images, rng, iterations: int = 20):
  """``params`` with the codebook set to k-means centroids of the encoder
  outputs of ``images`` (needs at least ``codebook_size`` patches)."""
  z = model.apply({"params": params}, images, method=VQVAE.encode)
  centroids, _ = vq.kmeans(rng, z.reshape(-1, z.shape[-1]), model.config.codebook_size, iterations)
  return {**params, "codebook": centroids}


def init_codebook_state(params, config: VQVAEConfig):
  """``params`` plus ``codebook_ema``: ``counts [K]`` (moving-average share of
  the assignments, starting uniform at ``1 / K``) and ``sums [K, d]``
  (moving average of the assigned vectors' share-weighted sum, starting at
  ``codebook / K``, so ``sums / counts`` is the codebook)."""
  k = config.codebook_size
  counts = jnp.full((k,), 1.0 / k, jnp.float32)
  return {**params, "codebook_ema": {"counts": counts,
                                     "sums": params["codebook"].astype(jnp.float32) / k}}


def codebook_statistics(aux, config: VQVAEConfig, rng):
  """A train step's statistics for ``update_codebook``: ``counts [K]`` and
  ``sums [K, d]`` (``ops.vq.assignment_stats`` divided by the number of
  vectors: shares, so microbatches average them correctly) and
  ``candidates [K, d]``: encoder outputs drawn at random, where dead codes
  restart (with microbatches, the engine averages these too)."""
  z = jax.lax.stop_gradient(aux["z"])
  z = z.reshape(-1, z.shape[-1]).astype(jnp.float32)
  counts, sums = vq.assignment_stats(z, aux["ids"], config.codebook_size)
  picks = jax.random.randint(rng, (config.codebook_size,), 0, z.shape[0])
  return {"counts": counts / z.shape[0], "sums": sums / z.shape[0], "candidates": z[picks]}


def update_codebook(params, stats, config: VQVAEConfig):
  """``params`` after one step's non-gradient codebook update: the moving
  averages of ``codebook_ema`` (and, with ``codebook_update="ema"``, the
  codebook from them: ``ops.vq.ema_step``); then the restart of codes whose
  share is below ``dead_code_threshold / K`` at a candidate (their share
  reset to ``1 / K``)."""
  ema = params["codebook_ema"]
  state, codebook = vq.ema_step(vq.EMAState(ema["counts"], ema["sums"]), stats["counts"],
                                stats["sums"], config.ema_decay)
  if config.codebook_update == "loss":
    codebook = params["codebook"].astype(jnp.float32)
  counts, sums = state.counts, state.sums
  if config.dead_code_threshold > 0:
    k = config.codebook_size
    dead = counts * k < config.dead_code_threshold
    codebook = jnp.where(dead[:, None], stats["candidates"], codebook)
    counts = jnp.where(dead, 1.0 / k, counts)
    sums = jnp.where(dead[:, None], stats["candidates"] / k, sums)
  return {**params, "codebook": codebook.astype(params["codebook"].dtype),
          "codebook_ema": {"counts": counts, "sums": sums}}


def restart_dead(model: VQVAE, params, images, rng, threshold: float = 1.0):
  """``(params, restarted [K])``: codes that no patch of ``images`` picks (fewer
  than ``threshold`` uses) move to random encoder outputs of ``images``."""
  z = model.apply({"params": params}, images, method=VQVAE.encode)
  ids = vq.nearest_code(z, params["codebook"])
  usage = jnp.bincount(ids.reshape(-1), length=model.config.codebook_size)
  codebook, dead = vq.restart_dead_codes(rng, params["codebook"], usage, z, threshold)
  return {**params, "codebook": codebook}, dead

"""A visual tokenizer: a patch VQ-VAE on the shared backbone.

Images are cut into patches (the ``PatchEmbedding`` stem with fixed sin-cos
positions), encoded by a ``Transformer``, projected to ``code_dim`` and
quantized to the nearest of ``codebook_size`` codes (``ops.vq.quantize``:
straight-through gradient, codebook and commitment losses); a second
``Transformer`` decodes the codes back to patches of pixels. One token per
patch, so a BEiT with the same patch size reads the ids as its targets
(``VQVAE.tokens``).

The codebook is initialized from data by k-means on encoder outputs
(``kmeans_init``) and trained with the codebook loss; ``ops.vq`` also has the
EMA update and dead-code restarts (``restart_dead``, applied here to the
parameters between training runs or by a custom loop: the engine changes
parameters only through gradients).

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
from datong.ops.patches import grid_shape, pair, patchify, unpatchify
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

  def __post_init__(self):
    object.__setattr__(self, "image_size", pair(self.image_size))
    object.__setattr__(self, "patch_size", pair(self.patch_size))
    grid_shape(self.image_size, self.patch_size)  # raises with the sizes named
    for field in ("codebook_size", "code_dim", "channels"):
      if getattr(self, field) < 1:
        raise ValueError(f"VQVAEConfig.{field}={getattr(self, field)}: must be positive.")
    if self.commitment < 0:
      raise ValueError(f"VQVAEConfig.commitment={self.commitment}: must be >= 0.")

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
  """Pixel MSE + codebook loss + ``commitment`` x commitment loss; metrics
  add codebook usage and perplexity of the batch's ids."""
  mse = jnp.mean((recon.astype(jnp.float32) - images.astype(jnp.float32)) ** 2)
  loss = mse + aux["codebook_loss"] + config.commitment * aux["commitment_loss"]
  return loss, {"loss": loss, "recon_mse": mse, "codebook_loss": aux["codebook_loss"],
                **vq.codebook_metrics(aux["ids"], config.codebook_size)}


def kmeans_init(model: VQVAE, params, images, rng, iterations: int = 20):
  """``params`` with the codebook set to k-means centroids of the encoder
  outputs of ``images`` (needs at least ``codebook_size`` patches)."""
  z = model.apply({"params": params}, images, method=VQVAE.encode)
  centroids, _ = vq.kmeans(rng, z.reshape(-1, z.shape[-1]), model.config.codebook_size, iterations)
  return {**params, "codebook": centroids}


def restart_dead(model: VQVAE, params, images, rng, threshold: float = 1.0):
  """``(params, restarted [K])``: codes that no patch of ``images`` picks (fewer
  than ``threshold`` uses) move to random encoder outputs of ``images``."""
  z = model.apply({"params": params}, images, method=VQVAE.encode)
  ids = vq.nearest_code(z, params["codebook"])
  usage = jnp.bincount(ids.reshape(-1), length=model.config.codebook_size)
  codebook, dead = vq.restart_dead_codes(rng, params["codebook"], usage, z, threshold)
  return {**params, "codebook": codebook}, dead

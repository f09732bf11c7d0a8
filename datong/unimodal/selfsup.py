"""An image encoder with a self-supervised head: SimCLR's projection MLP or
DINO's head (MLP -> L2-normalized bottleneck -> linear to ``out_dim``
prototypes, no bias). ``SelfSupModel(config)(images) -> (out [b, out_dim], aux)``
with the encoder's ``aux`` (``pooled``, ``patch_tokens``) passed through.
Parameters: ``encoder/...`` (the encoder's own tree, so runs fine-tune
and probe like any other) and ``head``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from datong.unimodal.encoders import check_image_encoder, head_param_dtype

HEADS = ("simclr", "dino")


@dataclasses.dataclass(frozen=True)
class SelfSupConfig:
  """``encoder``: any image-encoder config. ``head``: ``simclr`` (dense ->
  gelu -> dense to ``out_dim``) or ``dino`` (``layers`` dense+gelu of
  ``hidden`` -> dense to ``bottleneck`` -> L2 norm -> ``out_dim`` cosines with
  weight-normalized prototypes, ``Prototypes``)."""
  encoder: Any
  head: str = "simclr"
  hidden: int = 256
  bottleneck: int = 64
  out_dim: int = 64
  layers: int = 2

  def __post_init__(self):
    check_image_encoder(self.encoder, "SelfSupConfig.encoder")
    if self.head not in HEADS:
      raise ValueError(f"SelfSupConfig.head={self.head!r}: choose one of {HEADS}.")
    for name in ("hidden", "bottleneck", "out_dim", "layers"):
      if getattr(self, name) < 1:
        raise ValueError(f"SelfSupConfig.{name}={getattr(self, name)}: must be >= 1.")


def _dense(features, axes, name, dtype, use_bias=True):
  return nn.Dense(features, dtype=jnp.float32, param_dtype=dtype, use_bias=use_bias,
                  kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes),
                  bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axes[1],)),
                  name=name)


class Prototypes(nn.Module):
  """DINO's last layer, weight-normalized: each output is the cosine between
  the (unit) bottleneck and one prototype column, so its scale is fixed and
  the uniform output cannot be reached by shrinking the weights (the
  collapse DINO's fixed-norm last layer prevents)."""
  features: int
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                               (None, None)),
                        (x.shape[-1], self.features), self.param_dtype)
    kernel = jnp.asarray(kernel, jnp.float32)
    kernel = kernel * jax.lax.rsqrt(jnp.maximum(jnp.sum(kernel * kernel, 0, keepdims=True), 1e-12))
    return x @ kernel


class ProjectionHead(nn.Module):
  config: SelfSupConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    dtype = head_param_dtype(cfg.encoder)
    x = x.astype(jnp.float32)
    depth = 1 if cfg.head == "simclr" else cfg.layers
    for i in range(depth):
      x = nn.gelu(_dense(cfg.hidden, ("embed", "mlp") if i == 0 else (None, "mlp"), f"hidden_{i}",
                         dtype)(x))
    if cfg.head == "simclr":
      return _dense(cfg.out_dim, ("mlp", None), "out", dtype)(x)
    x = _dense(cfg.bottleneck, ("mlp", None), "bottleneck", dtype)(x)
    x = x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, -1, keepdims=True), 1e-12))
    return Prototypes(cfg.out_dim, dtype, name="prototypes")(x)


class SelfSupModel(nn.Module):
  """Encoder + head: ``images [b, h, w, c] -> (out [b, out_dim], aux)``."""
  config: SelfSupConfig

  @nn.compact
  def __call__(self, images, *, train: bool = False):
    pooled, aux = self.config.encoder.make(name="encoder")(images, train=train)
    out = ProjectionHead(self.config, name="head")(pooled)
    return out, aux

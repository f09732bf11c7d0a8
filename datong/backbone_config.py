"""The shared backbone's settings: ``TransformerConfig`` and its option tables.

Kept apart from the modules (``backbone.py``) so that a new option is one
field here, validated once, and the layer code stays readable.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax.numpy as jnp

from datong.backbone_presets import PRESETS
from datong.ops.attention import IMPLEMENTATIONS as ATTENTION_IMPLS

ACTIVATIONS = ("gelu", "gelu_tanh", "quick_gelu", "relu", "swiglu", "geglu")
NORMS = ("layernorm", "rmsnorm")
NORM_POSITIONS = ("pre", "post", "residual_post")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
KERNEL_INITS = ("xavier_uniform", "normal")
DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Settings of the shared backbone. Validated once, at construction.

  ``dtype`` is the compute dtype, ``param_dtype`` the storage dtype of the
  parameters; norms, softmax and residual adds of statistics stay float32.
  """
  width: int
  depth: int
  heads: int
  mlp_dim: int
  kv_heads: Optional[int] = None  # None: = heads (multi-head); 1: multi-query
  head_dim: Optional[int] = None  # None: width // heads
  activation: str = "gelu"
  norm: str = "layernorm"
  norm_position: str = "pre"  # "post": BERT's original; "residual_post": x + norm(f(x)) (Swin V2)
  norm_eps: float = 1e-6
  final_norm: Optional[bool] = None  # None: True for pre-LN and residual post-LN, False for post-LN
  use_bias: bool = True
  key_bias: bool = True  # False: no bias on the key projection (Swin V2); needs use_bias
  dropout: float = 0.0
  attention_dropout: float = 0.0
  stochastic_depth: float = 0.0  # drop-path rate of the last block (linear in depth)
  layer_scale: float = 0.0  # > 0: learned per-channel scale of each branch, init to this (CaiT, BEiT)
  qk_norm: bool = False
  cosine_attention: bool = False  # Swin V2: cos(q, k) * exp(min(t_head, log 100)), t learned
  cross_attention: bool = False  # decoder blocks of an encoder-decoder
  rope: bool = False  # rotary position embedding in self-attention
  rope_theta: float = 10_000.0
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat: str = "none"
  scan_layers: bool = False
  attention_impl: str = "auto"
  kernel_init: str = "xavier_uniform"
  init_std: float = 0.02  # for kernel_init="normal"

  def __post_init__(self):
    def bad(field, why):
      raise ValueError(f"TransformerConfig.{field}={getattr(self, field)!r}: {why}")
    for field in ("width", "depth", "heads", "mlp_dim"):
      if not isinstance(getattr(self, field), int) or getattr(self, field) <= 0:
        bad(field, "must be a positive integer")
    if self.kv_heads is not None and (self.kv_heads <= 0 or self.heads % self.kv_heads):
      bad("kv_heads", f"must be a positive divisor of heads={self.heads}")
    if self.head_dim is None and self.width % self.heads:
      bad("heads", f"must divide width={self.width} (or set head_dim explicitly)")
    if self.head_dim is not None and self.head_dim <= 0:
      bad("head_dim", "must be positive")
    if self.rope and self.resolved_head_dim % 2:
      bad("rope", f"rotary embeddings need an even head_dim; got {self.resolved_head_dim}")
    choices = dict(activation=ACTIVATIONS, norm=NORMS, norm_position=NORM_POSITIONS,
                   remat=REMAT_POLICIES, kernel_init=KERNEL_INITS, dtype=DTYPES,
                   param_dtype=DTYPES,
                   attention_impl=ATTENTION_IMPLS)
    for field, allowed in choices.items():
      if getattr(self, field) not in allowed:
        bad(field, f"choose one of {allowed}")
    for field in ("dropout", "attention_dropout", "stochastic_depth"):
      if not 0.0 <= getattr(self, field) < 1.0:
        bad(field, "must be in [0, 1)")
    if not 0.0 <= self.layer_scale < float("inf"):
      bad("layer_scale", "must be >= 0 (0: off; BEiT uses 0.1 or 1e-5)")
    if self.norm_eps <= 0:
      bad("norm_eps", "must be positive")
    if not self.key_bias and not self.use_bias:
      bad("key_bias", "is only meaningful with use_bias=True; leave it True")
    if self.cosine_attention and self.qk_norm:
      bad("cosine_attention", "already normalizes q and k; set qk_norm=False")

  @property
  def resolved_kv_heads(self) -> int:
    return self.heads if self.kv_heads is None else self.kv_heads

  @property
  def resolved_head_dim(self) -> int:
    return self.width // self.heads if self.head_dim is None else self.head_dim

  @property
  def has_final_norm(self) -> bool:
    return self.norm_position != "post" if self.final_norm is None else self.final_norm

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def params_dtype(self):
    return jnp.dtype(self.param_dtype)

  def replace(self, **changes) -> "TransformerConfig":
    return dataclasses.replace(self, **changes)

  def flops_per_token(self, length: int, *, causal: bool = False) -> float:
    """Training FLOPs (forward + backward = 3x forward) per token of one pass
    over ``length`` positions; for MFU.

    Forward per token: 2 per weight of the matmuls (query and out counted as
    ``width x width``, key and value ``width x kv_heads * head_dim``, the MLP
    three matrices when gated) plus attention scores and values,
    ``2 * 2 * length * width``, halved when causal. Norms, softmax and
    biases are not counted, nor ``Transformer``'s hooks: a ``layer_bias`` is
    free and an ``mlp`` hook is counted as the default MLP.
    """
    kv_width = self.resolved_kv_heads * self.resolved_head_dim
    projections = 2 * self.width * self.width + 2 * self.width * kv_width
    mlp = (3 if self.activation in ("swiglu", "geglu") else 2) * self.width * self.mlp_dim
    attention = 2 * 2 * length * self.width * (0.5 if causal else 1.0)
    return 3.0 * self.depth * (2.0 * (projections + mlp) + attention)

  @classmethod
  def preset(cls, name: str, **overrides) -> "TransformerConfig":
    """A published size by name (see ``PRESETS``), with field overrides."""
    if name not in PRESETS:
      raise ValueError(f"Unknown backbone preset {name!r}; known: {sorted(PRESETS)}.")
    return cls(**{**PRESETS[name], **overrides})

"""The shared backbone's settings: ``TransformerConfig`` and its option tables.

Kept apart from the modules (``backbone.py``) so that a new option is one
field here, validated once, and the layer code stays readable.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Optional

import jax.numpy as jnp

from datong.backbone_presets import PRESETS
from datong.ops.attention import IMPLEMENTATIONS as ATTENTION_IMPLS

ACTIVATIONS = ("gelu", "gelu_tanh", "quick_gelu", "relu", "swiglu", "geglu")
NORMS = ("layernorm", "rmsnorm")
NORM_POSITIONS = ("pre", "post", "residual_post")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
KERNEL_INITS = ("xavier_uniform", "normal")
DTYPES = ("float32", "bfloat16", "float16")


MOE_ROUTERS = ("token_choice", "expert_choice", "modality")
MOE_DISPATCH = ("capacity", "gather", "dropless")
MOE_EXPERT_PARALLEL = ("xla", "shard_map")


@dataclasses.dataclass(frozen=True)
class MoEConfig:
  """Mixture-of-experts MLPs in the shared backbone (``experts=0``: none).

  Layer ``i`` (0-based) has an MoE MLP when ``(i + 1) % every == 0`` (every
  layer for 1; layers 1, 3, ... for 2, as Switch / GShard). Each expert is
  the backbone's MLP (same activation, bias, dropout) of width
  ``expert_dim`` (None: the backbone's ``mlp_dim``). ``router``:
  ``token_choice`` (top-``top_k``; 1 = Switch, 2 = GShard), ``expert_choice`` (each expert takes its best
  tokens; capacity dispatch only; note that it lets a causal model's routing
  see later tokens of the row), ``modality`` (token -> expert of its
  ``modality_ids``; needs ``experts == modalities``). ``dispatch``:
  ``capacity`` (static one-hot einsums; an expert takes at most
  ``ceil(capacity_factor * top_k * tokens / experts)`` assignments per
  sequence, the rest are dropped: see ``datong.ops.moe.capacity_slots`` for
  the order; None: no limit), ``gather`` (the same capacity buffers filled
  by index gathers instead of one-hot einsums) or ``dropless`` (tokens
  sorted by expert, ``jax.lax.ragged_dot``). ``shared_expert``: one more MLP every token
  always passes through. Loss weights scale the auxiliary losses the layer
  adds to ``aux["losses"]`` (a weight of 0 leaves that loss out):
  ``moe_load_balancing`` (Switch; token choice), ``moe_router_z`` (ST-MoE),
  ``moe_local_entropy`` / ``moe_global_entropy`` (LIMoE, per modality; the
  global one is ``max(0, threshold - H)``, threshold None: ``log(experts)/2``).
  ``expert_parallel``: how tokens reach experts sharded over the mesh (the
  logical axis ``expert``): ``xla`` (sharding constraints; the compiler's
  partitioner inserts the all-to-all) or ``shard_map`` (explicit
  ``jax.lax.all_to_all`` each way; capacity and gather dispatch only). Both
  compute the same layer; without an ambient mesh whose ``expert`` axes
  exceed 1 they are the same code.
  """
  experts: int = 0
  top_k: int = 2
  router: str = "token_choice"
  dispatch: str = "capacity"
  capacity_factor: Optional[float] = 1.25
  every: int = 1
  expert_dim: Optional[int] = None
  shared_expert: bool = False
  modalities: int = 1
  load_balancing_weight: float = 1e-2
  router_z_weight: float = 1e-3
  local_entropy_weight: float = 0.0
  global_entropy_weight: float = 0.0
  global_entropy_threshold: Optional[float] = None
  expert_parallel: str = "xla"

  def __post_init__(self):
    def bad(field, why):
      raise ValueError(f"MoEConfig.{field}={getattr(self, field)!r}: {why}")
    for field in ("experts",):
      if not isinstance(self.experts, int) or self.experts < 0:
        bad(field, "must be an integer >= 0 (0: dense MLPs, no experts)")
    for field in ("top_k", "every", "modalities"):
      if not isinstance(getattr(self, field), int) or getattr(self, field) < 1:
        bad(field, "must be a positive integer")
    if self.router not in MOE_ROUTERS:
      bad("router", f"choose one of {MOE_ROUTERS}")
    if self.dispatch not in MOE_DISPATCH:
      bad("dispatch", f"choose one of {MOE_DISPATCH}")
    if self.expert_parallel not in MOE_EXPERT_PARALLEL:
      bad("expert_parallel", f"choose one of {MOE_EXPERT_PARALLEL}")
    if self.capacity_factor is not None and not self.capacity_factor > 0:
      bad("capacity_factor", "must be positive (or None: no capacity limit)")
    if self.expert_dim is not None and (not isinstance(self.expert_dim, int)
                                        or self.expert_dim <= 0):
      bad("expert_dim", "must be a positive integer (or None: the backbone's mlp_dim)")
    for field in ("load_balancing_weight", "router_z_weight", "local_entropy_weight",
                  "global_entropy_weight"):
      if not (math.isfinite(getattr(self, field)) and getattr(self, field) >= 0):
        bad(field, "must be >= 0 (0 leaves the loss out)")
    if not self.experts:
      return
    if self.router == "token_choice" and self.top_k > self.experts:
      bad("top_k", f"cannot exceed experts={self.experts}")
    if self.router == "expert_choice" and self.dispatch != "capacity":
      bad("dispatch", "expert-choice routing is implemented in the one-hot capacity "
          "form only; use dispatch='capacity'")
    if self.expert_parallel == "shard_map" and self.dispatch == "dropless":
      bad("expert_parallel", "the shard_map all-to-all moves fixed-size capacity buffers; "
          "dropless groups are ragged: use dispatch='capacity' or 'gather' with it, or "
          "expert_parallel='xla'")
    if self.router == "modality" and self.experts != self.modalities:
      bad("experts", f"the modality router sends modality m to expert m: set "
          f"experts = modalities = {self.modalities} (or modalities={self.experts})")

  @property
  def choices(self) -> int:
    """Experts per token that the capacity is sized for (1 for modality routes)."""
    return 1 if self.router == "modality" else self.top_k

  @property
  def active_experts(self) -> float:
    """Experts that process a token, on average: ``top_k`` (token choice),
    ``capacity_factor * top_k`` (expert choice: its slots per token; all
    experts without a limit), 1 (modality)."""
    if self.router == "modality":
      return 1.0
    if self.router == "expert_choice":
      return float(self.experts if self.capacity_factor is None
                   else min(self.experts, self.capacity_factor * self.top_k))
    return float(self.top_k)

  @property
  def entropy_threshold(self) -> float:
    if self.global_entropy_threshold is not None:
      return self.global_entropy_threshold
    return 0.5 * math.log(max(self.experts, 1))

  def is_moe_layer(self, index: int) -> bool:
    return self.experts > 0 and (index + 1) % self.every == 0

  def loss_names(self) -> tuple[str, ...]:
    """The auxiliary losses an MoE layer adds (every layer adds these names)."""
    if not self.experts:
      return ()
    names = []
    if self.router == "token_choice" and self.load_balancing_weight:
      names.append("moe_load_balancing")
    if self.router != "modality" and self.router_z_weight:
      names.append("moe_router_z")
    if self.router != "modality" and self.local_entropy_weight:
      names.append("moe_local_entropy")
    if self.router != "modality" and self.global_entropy_weight:
      names.append("moe_global_entropy")
    return tuple(names)


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
  # mixture of experts
  moe: MoEConfig = MoEConfig()  # a MoEConfig or a dict of its fields; experts=0: dense

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
    if isinstance(self.moe, Mapping):  # moe={"experts": 8, ...}
      object.__setattr__(self, "moe", MoEConfig(**self.moe))
    if not isinstance(self.moe, MoEConfig):
      bad("moe", "must be a MoEConfig (or a dict of its fields)")
    if self.moe.experts and self.moe.every > self.depth:
      bad("moe", f"every={self.moe.every} > depth={self.depth}: no layer would get experts")
    if self.moe.experts and self.moe.every > 1 and self.scan_layers:
      bad("moe", "scan_layers needs identical layers; with MoE every "
          f"{self.moe.every} layers set scan_layers=False (or moe every=1)")

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
    free and an ``mlp`` hook is counted as the default MLP. An MoE layer
    counts its active experts only (``moe.active_experts`` per token; the
    capacity path's empty slots and the dispatch einsums are not counted),
    its shared expert and its router (``width x experts``).
    """
    kv_width = self.resolved_kv_heads * self.resolved_head_dim
    projections = 2 * self.width * self.width + 2 * self.width * kv_width
    matrices = 3 if self.activation in ("swiglu", "geglu") else 2
    mlp = matrices * self.width * self.mlp_dim
    attention = 2 * 2 * length * self.width * (0.5 if causal else 1.0)
    moe = self.moe
    moe_layers = sum(moe.is_moe_layer(i) for i in range(self.depth))
    expert = matrices * self.width * (moe.expert_dim or self.mlp_dim)
    moe_mlp = (moe.active_experts + moe.shared_expert) * expert
    if moe.router != "modality":
      moe_mlp += self.width * moe.experts
    weights = (self.depth - moe_layers) * (projections + mlp) + moe_layers * (projections + moe_mlp)
    return 3.0 * (2.0 * weights + self.depth * attention)

  @classmethod
  def preset(cls, name: str, **overrides) -> "TransformerConfig":
    """A published size by name (see ``PRESETS``), with field overrides."""
    if name not in PRESETS:
      raise ValueError(f"Unknown backbone preset {name!r}; known: {sorted(PRESETS)}.")
    return cls(**{**PRESETS[name], **overrides})

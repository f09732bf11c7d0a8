"""The backbone's mixture-of-experts MLP, chosen by ``TransformerConfig.moe``.

``Block`` builds ``MoeMlp`` in place of ``Mlp`` on the layers
``config.moe.is_moe_layer`` selects, so every model on the backbone gets
experts from its config alone. The routing math is ``datong.ops.moe``.

Parameters (logical axes): ``router/kernel [width, experts]`` (``embed``,
unsharded; absent for the modality router), the experts' ``wi`` (or
``wi_gate`` and ``wi_up`` when gated) ``[experts, width, mlp]`` (``expert,
embed, mlp``), ``wo [experts, mlp, width]`` (``expert, mlp, embed``), their
biases ``[experts, mlp]`` / ``[experts, width]`` with ``use_bias``, and
``shared_expert`` (a dense ``Mlp``) when asked for. The ``expert`` axis maps
to the mesh axis ``expert``, so the experts are sharded over it; the
dispatched tokens ``[groups, experts, capacity, width]`` are constrained to
``(expert_group, expert, ., embed)`` and the compiler moves them between the
batch-sharded and the expert-sharded layouts (an all-to-all).

With ``MoEConfig.expert_parallel="shard_map"`` and an ambient mesh (``jax.
set_mesh`` and flax's logical rules, as the engine sets them) whose
``expert`` axes exceed 1, the capacity and gather forms run under
``shard_map`` instead: each device fills its own rows' buffers ``[g, E, C,
D]``, ``jax.lax.all_to_all`` over the expert axes sends expert ``e``'s
buffers to the device holding it (``[g * n, E / n, C, D]``), the local
experts run (their ``mlp`` dim stays split over the ``mlp`` mesh axes, e.g.
``tensor``, with a ``psum`` after ``wo``; ``embed`` is gathered), a second
all-to-all brings the outputs back and each device combines its tokens.
Routing is per sequence either way, so capacity and drops are the same as on
one device. The layer still sees no mesh names: it asks the logical rules
where ``batch``, ``expert`` and ``mlp`` go.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from datong.backbone import Mlp, _activation, _constrain, _kernel_init, _partitioned
from datong.backbone_config import MoEConfig, TransformerConfig
from datong.ops import moe as moe_ops
from datong.ops.pallas.sharding import ambient_mesh, logical_to_mesh_axes, shard_map

__all__ = ["MoeMlp", "STAT_NAMES"]

# Per-layer statistics ``MoeMlp`` returns: ``expert_load [E]`` (share of the
# router's assignments per expert, before drops), ``dropped_fraction`` (share
# of assignments with no slot; expert choice: of tokens no expert took), the
# unweighted losses of ``MoEConfig.loss_names`` and, with ``modalities > 1``,
# ``modality_load [M, E]``.
STAT_NAMES = ("expert_load", "dropped_fraction")


class MoeMlp(nn.Module):
  """``(h [batch, length, width], valid, modality_ids) -> (y, losses, stats)``.

  ``valid`` ``[batch, length]`` bool (None: all): invalid positions (padding)
  are routed nowhere and left out of the losses and statistics; their output
  is the shared expert's (or 0). ``modality_ids`` ``[batch, length]`` ints
  (None: all 0). Each batch row is one routing group: capacity is per row.
  ``losses`` are weighted (``MoEConfig``); ``stats`` are float32.
  """
  config: TransformerConfig
  train: bool = False

  def _expert_params(self, moe: MoEConfig):
    cfg = self.config
    e, d, m = moe.experts, cfg.width, moe.expert_dim or cfg.mlp_dim
    # Xavier per expert (the expert axis is a batch axis, not fan-in).
    init = (nn.initializers.normal(cfg.init_std) if cfg.kernel_init == "normal" else
            nn.initializers.xavier_uniform(in_axis=-2, out_axis=-1, batch_axis=(0,)))

    def kernel(name, shape, names):
      return self.param(name, _partitioned(init, names), shape,
                        cfg.params_dtype).astype(cfg.compute_dtype)

    def bias(name, shape, names):
      if not cfg.use_bias:
        return None
      return self.param(name, _partitioned(nn.initializers.zeros, names), shape,
                        cfg.params_dtype).astype(cfg.compute_dtype)

    params = {}
    gated = cfg.activation in ("swiglu", "geglu")
    for name in (("wi_gate", "wi_up") if gated else ("wi",)):
      params[name] = (kernel(name, (e, d, m), ("expert", "embed", "mlp")),
                      bias(f"{name}_bias", (e, m), ("expert", "mlp")))
    params["wo"] = (kernel("wo", (e, m, d), ("expert", "mlp", "embed")),
                    bias("wo_bias", (e, d), ("expert", "embed")))
    return params

  def _hidden(self, params, project):
    """The experts' activation of ``project(kernel, bias)`` (gated or not)."""
    h = _expert_activation(self.config.activation, params, project)
    return nn.Dropout(self.config.dropout)(h, deterministic=not self.train)

  def _buffer_experts(self, params, xin):
    """The experts on their buffers ``[G, E, C, D]`` -> same shape. Groups
    stay on the batch's data/fsdp shards, experts go to ``expert``."""
    names = ("expert_group", "expert", None, "embed")
    local = ("batch", None, None, "embed")
    # Batch-sharded buffers -> expert-sharded ones: the compiler's all-to-all.
    xin = _constrain(_constrain(xin, local), names)

    def project(kernel, bias):
      y = jnp.einsum("gecd,edm->gecm", xin, kernel)
      return y if bias is None else y + bias[None, :, None]
    h = _constrain(self._hidden(params, project), ("expert_group", "expert", None, "mlp"))
    kernel, bias = params["wo"]
    out = jnp.einsum("gecm,emd->gecd", h, kernel)
    out = _constrain(out if bias is None else out + bias[None, :, None], names)
    return _constrain(out, local)  # and back

  def _on_buffers(self, params, fill, empty, x, route):
    """``empty(experts(fill(x, *route)), *route)``: ``fill`` builds the
    buffers ``[G, E, C, D]`` from a group's tokens, ``empty`` combines their
    outputs back to ``[G, S, D]``; both act row by row. Under ``shard_map``
    when ``_expert_parallel_plan`` gives one, else by the compiler."""
    plan = self._expert_parallel_plan(x.shape[0])
    if plan is None:
      # Routing stays local to each batch shard; the all-to-all is on the buffers.
      route = tuple(_constrain(r, ("batch",) + (None,) * (r.ndim - 1)) for r in route)
      return empty(self._buffer_experts(params, fill(x, *route)), *route)
    return self._shard_map_experts(params, fill, empty, x, route, plan)

  def _expert_parallel_plan(self, groups: int):
    """``(mesh, batch_axes, expert_axes, mlp_axes)`` for the ``shard_map``
    path, or None: not asked for, no ambient mesh or logical rules, the
    experts not split (``expert`` axes of size 1), or ``groups`` not dividing
    over the batch shards (e.g. ``init`` on a small example; the compiler's
    path computes the same values)."""
    moe = self.config.moe
    rules = nn.get_logical_axis_rules()
    mesh = ambient_mesh() if moe.expert_parallel == "shard_map" and rules else None
    if mesh is None:
      return None
    (batch_axes,) = logical_to_mesh_axes(("batch",), rules)
    expert_axes, _, mlp_axes = logical_to_mesh_axes(("expert", "embed", "mlp"), rules)
    size = lambda axes: math.prod(mesh.shape[a] for a in _axes(axes))
    n = size(expert_axes)
    if n == 1 or groups % size(batch_axes):
      return None
    if not set(_axes(expert_axes)) <= set(_axes(batch_axes)):
      raise ValueError(
          f"MoEConfig.expert_parallel='shard_map': the logical rules put experts on mesh "
          f"axes {expert_axes} and the batch on {batch_axes}; the all-to-all exchanges "
          "tokens between batch shards, so the expert axes must also shard the batch.")
    if moe.experts % n:
      raise ValueError(f"MoEConfig.experts={moe.experts} must be divisible by the {n} "
                       f"expert shards (mesh axes {expert_axes}) with "
                       "expert_parallel='shard_map'.")
    width = moe.expert_dim or self.config.mlp_dim
    if (size(mlp_axes) == 1 or set(_axes(mlp_axes)) & set(_axes(batch_axes))
        or width % size(mlp_axes)):
      mlp_axes = None  # the experts' hidden units are not split (and need no psum)
    return mesh, batch_axes, expert_axes, mlp_axes

  def _shard_map_experts(self, params, fill, empty, x, route, plan):
    """The explicit expert-parallel form of ``_on_buffers`` (module docstring)."""
    cfg = self.config
    mesh, batch_axes, expert_axes, mlp_axes = plan
    dropout = cfg.dropout if self.train else 0.0
    key = self.make_rng("dropout") if dropout else jnp.zeros((2,), jnp.uint32)
    names = [n for n in params if n != "wo"]
    weights = [params[n][0] for n in names] + [params["wo"][0]]
    biases = [params[n][1] for n in names] + [params["wo"][1]]
    w_specs = [P(expert_axes, None, mlp_axes)] * len(names) + [P(expert_axes, mlp_axes, None)]
    b_specs = [P(expert_axes, mlp_axes)] * len(names) + [P(expert_axes, None)]
    has_bias = biases[0] is not None
    biases = biases if has_bias else []
    b_specs = b_specs if has_bias else []
    rows = lambda a: P(batch_axes, *(None,) * (a.ndim - 1))
    args = (x, *route, key, *weights, *biases)
    in_specs = (rows(x), *(rows(r) for r in route), P(), *w_specs, *b_specs)

    n_route = len(route)

    def local(x, *rest):
      route, (key, *rest) = rest[:n_route], rest[n_route:]
      ws, bs = rest[:len(weights)], rest[len(weights):]
      bs = bs if has_bias else (None,) * len(ws)
      local_params = {n: (ws[i], bs[i]) for i, n in enumerate(names)}
      xin = fill(x, *route)  # [g, E, C, D]: this device's rows
      xin = jax.lax.all_to_all(xin, expert_axes, 1, 0, tiled=True)  # [g*n, E/n, C, D]

      def project(kernel, bias):
        y = jnp.einsum("gecd,edm->gecm", xin, kernel)
        return y if bias is None else y + bias[None, :, None]
      h = _expert_activation(cfg.activation, local_params, project)
      if dropout:
        for axis in mesh.axis_names:  # a different mask on every device
          key = jax.random.fold_in(key, jax.lax.axis_index(axis))
        keep = jax.random.bernoulli(key, 1.0 - dropout, h.shape)
        h = jnp.where(keep, h / (1.0 - dropout), 0).astype(h.dtype)
      out = jnp.einsum("gecm,emd->gecd", h, ws[-1])
      if mlp_axes is not None:  # each device holds part of the hidden units
        out = jax.lax.psum(out, mlp_axes)
      if bs[-1] is not None:
        out = out + bs[-1][None, :, None]
      out = jax.lax.all_to_all(out, expert_axes, 0, 1, tiled=True)  # [g, E, C, D]
      return empty(out, *route)

    if getattr(mesh, "explicit_axes", ()):
      # Under Explicit axes shard_map checks, rather than imposes, input specs.
      args = tuple(jax.sharding.reshard(a, spec) for a, spec in zip(args, in_specs))
    return shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=rows(x))(*args)

  def _capacity_experts(self, params, x, dispatch, combine):
    """Einsum form: ``x [G, S, D]``, one-hot ``[G, S, E, C]`` -> ``[G, S, D]``."""
    return self._on_buffers(params, _einsum_fill, _einsum_empty, x, (dispatch, combine))

  def _gather_experts(self, params, x, experts, slots, weights, cap):
    """Gather form of the same buffers: slot -> token index, assignment ->
    slot index (``ops.moe.slot_tokens``); empty slots read a zero row."""
    n = self.config.moe.experts
    tokens, pos = moe_ops.slot_tokens(experts, slots, n, cap)
    fill = functools.partial(_gather_fill, experts=n, capacity=cap)
    return self._on_buffers(params, fill, _gather_empty, x,
                            (tokens, pos, weights.astype(x.dtype)))

  def _dropless_experts(self, params, x, experts, weights):
    """Sorted form: every assignment computed, grouped by expert for
    ``ragged_dot``; ``experts``/``weights`` ``[G, S, k]``."""
    g, s, d = x.shape
    k, n_experts = experts.shape[-1], self.config.moe.experts
    order, sizes = moe_ops.sort_by_expert(experts.reshape(g * s, k), n_experts)
    xs = x.reshape(g * s, d)[order // k]
    expert_of = experts.reshape(-1)[order]

    def project(kernel, bias):
      y = jax.lax.ragged_dot(xs, kernel, sizes)
      return y if bias is None else y + bias[expert_of]
    h = self._hidden(params, project)
    kernel, bias = params["wo"]
    out = jax.lax.ragged_dot(h, kernel, sizes)
    out = out if bias is None else out + bias[expert_of]
    out = out[jnp.argsort(order)].reshape(g, s, k, d)  # back to token order
    return jnp.einsum("gskd,gsk->gsd", out, weights.astype(out.dtype))

  @nn.compact
  def __call__(self, x, valid=None, modality_ids=None):
    cfg = self.config
    moe = cfg.moe
    g, s, _ = x.shape
    n = moe.experts
    valid = jnp.ones((g, s), bool) if valid is None else valid.astype(bool)
    if modality_ids is None:
      if moe.router == "modality":
        raise ValueError("MoEConfig.router='modality' routes by modality: pass modality_ids "
                         "[batch, length] to the Transformer (Transformer(...)(x, "
                         "modality_ids=...)).")
      modality_ids = jnp.zeros((g, s), jnp.int32)
    x = x.astype(cfg.compute_dtype)
    params = self._expert_params(moe)
    stats, losses = {}, {}

    if moe.router == "modality":
      experts, weights = moe_ops.modality_choice(modality_ids, n)
      probs = logits = None
    else:
      router = self.param("router", _partitioned(_kernel_init(cfg), ("embed", None)),
                          (cfg.width, n), cfg.params_dtype)
      # float32 routing: top-k ties and the softmax are sensitive to bf16.
      logits = jnp.einsum("gsd,de->gse", x.astype(jnp.float32), router.astype(jnp.float32))
      probs = jax.nn.softmax(logits, axis=-1)
      experts, weights = moe_ops.token_choice(probs, moe.top_k)
    stats["expert_load"] = moe_ops.expert_fractions(experts, valid, n)

    if moe.router == "expert_choice":
      cap = moe_ops.capacity(s, n, moe.capacity_factor, moe.top_k)
      dispatch, combine, chosen = moe_ops.expert_choice(probs, valid, cap, cfg.compute_dtype)
      missed = jnp.sum((chosen == 0) & valid)
      stats["dropped_fraction"] = missed / jnp.maximum(jnp.sum(valid), 1)
      y = self._capacity_experts(params, x, dispatch, combine)
    elif moe.dispatch in ("capacity", "gather"):
      cap = moe_ops.capacity(s, n, moe.capacity_factor, moe.choices)
      slots = moe_ops.capacity_slots(experts, valid, n, cap)
      dropped = jnp.sum((slots < 0) & valid[..., None])
      stats["dropped_fraction"] = dropped / jnp.maximum(jnp.sum(valid) * experts.shape[-1], 1)
      if moe.dispatch == "gather":
        y = self._gather_experts(params, x, experts, slots, weights, cap)
      else:
        dispatch, combine = moe_ops.dispatch_and_combine(experts, slots, weights, n, cap,
                                                         cfg.compute_dtype)
        y = self._capacity_experts(params, x, dispatch, combine)
    else:
      stats["dropped_fraction"] = jnp.zeros((), jnp.float32)
      y = self._dropless_experts(params, x, experts, weights * valid[..., None])

    if probs is not None:
      raw = {"moe_load_balancing": lambda: moe_ops.load_balancing_loss(probs, experts, valid),
             "moe_router_z": lambda: moe_ops.router_z_loss(logits, valid)}
      if moe.local_entropy_weight or moe.global_entropy_weight:
        local, glob = moe_ops.modality_entropy_losses(probs, modality_ids, valid,
                                                      moe.modalities, moe.entropy_threshold)
        raw["moe_local_entropy"] = lambda: jnp.sum(local)
        raw["moe_global_entropy"] = lambda: jnp.sum(glob)
      weight = {"moe_load_balancing": moe.load_balancing_weight,
                "moe_router_z": moe.router_z_weight,
                "moe_local_entropy": moe.local_entropy_weight,
                "moe_global_entropy": moe.global_entropy_weight}
      for name in moe.loss_names():
        value = raw[name]()
        stats[name] = value
        losses[name] = weight[name] * value
    if moe.modalities > 1:
      stats["modality_load"] = moe_ops.modality_fractions(experts, modality_ids, valid, n,
                                                          moe.modalities)
    if moe.shared_expert:
      dense = cfg.replace(mlp_dim=moe.expert_dim or cfg.mlp_dim, moe=MoEConfig())
      y = y + Mlp(dense, self.train, name="shared_expert")(x)
    y = _constrain(y.astype(cfg.compute_dtype), ("batch", "length", "embed"))
    return y, losses, {k: jnp.asarray(v, jnp.float32) for k, v in stats.items()}


def _axes(axes) -> tuple:
  return () if axes is None else tuple(axes) if isinstance(axes, (tuple, list)) else (axes,)


def _expert_activation(activation: str, params, project):
  """``act(project(wi))`` or, gated, ``act(project(wi_gate)) * project(wi_up)``;
  ``project(kernel, bias)`` applies one input projection."""
  if activation in ("swiglu", "geglu"):
    gate, up = project(*params["wi_gate"]), project(*params["wi_up"])
    gate = nn.silu(gate) if activation == "swiglu" else nn.gelu(gate, approximate=False)
    return gate * up
  return _activation(activation, project(*params["wi"]))


# Buffers from a group's tokens and back, row by row (each works on any
# slice of the rows, which the shard_map path relies on).

def _einsum_fill(x, dispatch, combine):
  del combine
  return jnp.einsum("gsec,gsd->gecd", dispatch, x)


def _einsum_empty(out, dispatch, combine):
  del dispatch
  return jnp.einsum("gsec,gecd->gsd", combine, out)


def _gather_fill(x, tokens, pos, weights, *, experts: int, capacity: int):
  del pos, weights
  g, _, d = x.shape
  padded = jnp.concatenate([x, jnp.zeros((g, 1, d), x.dtype)], axis=1)
  return jnp.take_along_axis(padded, tokens[..., None], axis=1).reshape(g, experts, capacity, d)


def _gather_empty(out, tokens, pos, weights):
  del tokens
  g, e, c, d = out.shape
  out = jnp.concatenate([out.reshape(g, e * c, d), jnp.zeros((g, 1, d), out.dtype)], axis=1)
  picked = jnp.take_along_axis(out, pos.reshape(g, -1)[..., None], axis=1)
  picked = picked.reshape(pos.shape + (d,))
  return jnp.einsum("gskd,gsk->gsd", picked, weights.astype(picked.dtype))


def moe_metrics(layer_stats: dict, layers: Optional[list] = None) -> dict:
  """Scalar metrics from per-layer stats (name -> ``[moe_layers, ...]``):
  ``moe/dropped_fraction`` and ``moe/expert_load/<e>`` (means over MoE
  layers), ``moe/expert_load/m<m>/<e>`` per modality, and per layer
  ``moe/layer_<i>/<name>`` for the scalars (losses unweighted)."""
  out = {}
  layers = list(range(layer_stats["dropped_fraction"].shape[0])) if layers is None else layers
  for name, value in layer_stats.items():
    if value.ndim == 1:  # a scalar per layer
      if name == "dropped_fraction":
        out["moe/dropped_fraction"] = jnp.mean(value)
      for row, i in enumerate(layers):
        out[f"moe/layer_{i}/{name}"] = value[row]
  load = jnp.mean(layer_stats["expert_load"], axis=0)
  out.update({f"moe/expert_load/{e}": load[e] for e in range(load.shape[0])})
  if "modality_load" in layer_stats:
    per_m = jnp.mean(layer_stats["modality_load"], axis=0)
    for m in range(per_m.shape[0]):
      out.update({f"moe/expert_load/m{m}/{e}": per_m[m, e] for e in range(per_m.shape[1])})
  return out

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
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from datong.backbone import Mlp, _activation, _constrain, _kernel_init, _partitioned
from datong.backbone_config import MoEConfig, TransformerConfig
from datong.ops import moe as moe_ops

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
    cfg = self.config
    if cfg.activation in ("swiglu", "geglu"):
      gate, up = project(*params["wi_gate"]), project(*params["wi_up"])
      gate = nn.silu(gate) if cfg.activation == "swiglu" else nn.gelu(gate, approximate=False)
      h = gate * up
    else:
      h = _activation(cfg.activation, project(*params["wi"]))
    return nn.Dropout(cfg.dropout)(h, deterministic=not self.train)

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

  def _capacity_experts(self, params, x, dispatch, combine):
    """Einsum form: ``x [G, S, D]``, one-hot ``[G, S, E, C]`` -> ``[G, S, D]``."""
    # Routing stays local to each batch shard; the all-to-all is on the buffers.
    dispatch = _constrain(dispatch, ("batch", "length", None, None))
    combine = _constrain(combine, ("batch", "length", None, None))
    out = self._buffer_experts(params, jnp.einsum("gsec,gsd->gecd", dispatch, x))
    return jnp.einsum("gsec,gecd->gsd", combine, out)

  def _gather_experts(self, params, x, experts, slots, weights, cap):
    """Gather form of the same buffers: slot -> token index, assignment ->
    slot index (``ops.moe.slot_tokens``); empty slots read a zero row."""
    g, s, d = x.shape
    n = self.config.moe.experts
    tokens, pos = moe_ops.slot_tokens(experts, slots, n, cap)
    padded = jnp.concatenate([x, jnp.zeros((g, 1, d), x.dtype)], axis=1)
    xin = jnp.take_along_axis(padded, tokens[..., None], axis=1).reshape(g, n, cap, d)
    out = self._buffer_experts(params, xin).reshape(g, n * cap, d)
    out = jnp.concatenate([out, jnp.zeros((g, 1, d), out.dtype)], axis=1)
    picked = jnp.take_along_axis(out, pos.reshape(g, -1)[..., None], axis=1)
    picked = picked.reshape(g, s, -1, d)
    return jnp.einsum("gskd,gsk->gsd", picked, weights.astype(picked.dtype))

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

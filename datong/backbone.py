"""The one shared Transformer: embeddings in, hidden states out.

Every model in Datong is a stem (embedding of tokens, patches, ...) + this
backbone + a head. It knows nothing of tokens, pixels or the mesh:
parameters carry logical axis names (``embed, heads, kv_heads, kv, mlp,
layers``) and the train loop maps them to mesh axes.

    config = TransformerConfig.preset("vit-B")
    hidden, aux = Transformer(config).apply(params, x)   # x [batch, length, width]
"""

from __future__ import annotations

import functools
from typing import Callable, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from datong.ops.attention import attention as attention_op
from datong.ops.attention import attention_weights, l2_normalize
from datong.ops import linear as ops_linear
from datong.ops import masks as mask_ops
from datong.ops import posemb
# The settings live in backbone_config.py; re-exported here, where users look.
from datong.backbone_config import PRESETS, TransformerConfig

__all__ = ["PRESETS", "TransformerConfig", "Transformer", "Block", "Attention", "Mlp", "Norm",
           "block_inputs", "init_cache", "WEIGHTS_COLLECTION"]


def _kernel_init(config: TransformerConfig, in_axis=-2, out_axis=-1):
  if config.kernel_init == "normal":
    return nn.initializers.normal(config.init_std)
  return nn.initializers.xavier_uniform(in_axis=in_axis, out_axis=out_axis)


def _partitioned(init, names):
  return nn.with_logical_partitioning(init, names)


def _constrain(x, names):
  return nn.with_logical_constraint(x, names)


class Norm(nn.Module):
  """LayerNorm or RMSNorm over the last axis, statistics in float32."""
  config: TransformerConfig
  axis_name: str = "embed"

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    kw = dict(epsilon=cfg.norm_eps, dtype=cfg.compute_dtype,
              param_dtype=cfg.params_dtype,
              scale_init=_partitioned(nn.initializers.ones, (self.axis_name,)))
    if cfg.norm == "rmsnorm":
      return nn.RMSNorm(name="norm", **kw)(x)
    return nn.LayerNorm(
        bias_init=_partitioned(nn.initializers.zeros, (self.axis_name,)),
        use_bias=True, name="norm", **kw)(x)


class Projection(nn.Module):
  """``x[..., *in] @ kernel[*in, *features] (+ bias[*features])``.

  Like ``nn.DenseGeneral``, but the logical axis names (``names``: input
  axes then output axes) annotate the kernel's real shape, and Xavier
  initialization counts all input / output axes as fan-in / fan-out.
  """
  config: TransformerConfig
  features: tuple[int, ...]
  names: tuple[str, ...]
  in_dims: int = 1
  use_bias: Optional[bool] = None  # None: config.use_bias

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    n_in = self.in_dims
    shape = tuple(x.shape[x.ndim - n_in:]) + tuple(self.features)
    init = _kernel_init(cfg, in_axis=tuple(range(n_in)), out_axis=tuple(range(n_in, len(shape))))
    kernel = self.param("kernel", _partitioned(init, self.names), shape, cfg.params_dtype)
    x = x.astype(cfg.compute_dtype)
    # The 2-D matmul backward (CPU) hides the dots from the dot-saving remat
    # policies, so it is used only where no policy looks for them.
    y = ops_linear.dense(x, kernel.astype(cfg.compute_dtype), n_in,
                         matmul_grad=None if cfg.remat in ("none", "full") else False)
    if cfg.use_bias if self.use_bias is None else self.use_bias:
      bias = self.param("bias", _partitioned(nn.initializers.zeros, self.names[n_in:]),
                        tuple(self.features), cfg.params_dtype)
      y = y + bias.astype(cfg.compute_dtype)
    return y


# Mutable collection in which ``Attention`` sows its probabilities
# ``[batch, heads, q_length, kv_length]`` (before dropout) when asked to.
WEIGHTS_COLLECTION = "attention_weights"


class Attention(nn.Module):
  """Multi-head (grouped-query) attention with optional rotary, qk-norm, cache.

  With ``apply(..., mutable=[WEIGHTS_COLLECTION])`` it also sows its attention
  probabilities (``attention_weights/weights``), computed by the reference
  softmax from the same q, k and masks.
  """
  config: TransformerConfig
  train: bool = False

  @nn.compact
  def __call__(self, x, context=None, *, causal=False, mask=None, bias=None,
               q_segment_ids=None, kv_segment_ids=None, positions=None,
               cache=None, cache_index=None):
    cfg = self.config
    heads, kv_heads, head_dim = cfg.heads, cfg.resolved_kv_heads, cfg.resolved_head_dim
    is_cross = context is not None
    source = context if is_cross else x

    def project(name, n_heads, head_axis, inputs, use_bias=None):
      return Projection(cfg, (n_heads, head_dim), ("embed", head_axis, "kv"), use_bias=use_bias,
                        name=name)(inputs)

    q = project("query", heads, "heads", x)
    k = project("key", kv_heads, "kv_heads", source, use_bias=None if cfg.key_bias else False)
    v = project("value", kv_heads, "kv_heads", source)
    q = _constrain(q, ("batch", "length", "heads", "kv"))
    k = _constrain(k, ("batch", "length", "kv_heads", "kv"))
    v = _constrain(v, ("batch", "length", "kv_heads", "kv"))
    if cfg.qk_norm:
      q = Norm(cfg, axis_name="kv", name="query_norm")(q)
      k = Norm(cfg, axis_name="kv", name="key_norm")(k)
    scale = None
    if cfg.cosine_attention:
      # cos(q, k) * exp(min(t, log 100)): the temperature goes into q, so
      # every kernel computes it with the logits scale set to 1.
      t = self.param("logit_scale", _partitioned(
          nn.initializers.constant(jnp.log(10.0)), ("heads",)), (heads,), cfg.params_dtype)
      t = jnp.exp(jnp.minimum(t.astype(jnp.float32), jnp.log(100.0)))
      q = (l2_normalize(q) * t[:, None]).astype(q.dtype)
      k = l2_normalize(k).astype(k.dtype)
      scale = 1.0
    if cfg.rope and not is_cross:
      q = posemb.apply_rotary(q, positions, theta=cfg.rope_theta)
      k = posemb.apply_rotary(k, positions, theta=cfg.rope_theta)

    new_cache = None
    if cache is not None:
      k = jax.lax.dynamic_update_slice_in_dim(cache["k"], k.astype(cache["k"].dtype), cache_index, axis=1)
      v = jax.lax.dynamic_update_slice_in_dim(cache["v"], v.astype(cache["v"].dtype), cache_index, axis=1)
      new_cache = {"k": k, "v": v}
      k, v = k.astype(q.dtype), v.astype(q.dtype)

    if self.is_mutable_collection(WEIGHTS_COLLECTION) and not self.is_initializing():
      # Opt-in (apply(..., mutable=[WEIGHTS_COLLECTION])): the probabilities
      # of the reference path for these q, k and masks, whatever kernel runs.
      self.sow(WEIGHTS_COLLECTION, "weights", attention_weights(
          q, k, causal=causal, mask=mask, bias=bias, q_segment_ids=q_segment_ids,
          kv_segment_ids=kv_segment_ids, scale=scale))
    dropout_rate = cfg.attention_dropout if self.train else 0.0
    out = attention_op(
        q, k, v, causal=causal, mask=mask, bias=bias,
        q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
        dropout_rate=dropout_rate, scale=scale,
        dropout_rng=self.make_rng("dropout") if dropout_rate > 0 else None,
        impl=cfg.attention_impl, logical_rules=nn.get_logical_axis_rules())
    out = _constrain(out, ("batch", "length", "heads", "kv"))
    out = Projection(cfg, (cfg.width,), ("heads", "kv", "embed"), in_dims=2, name="out")(out)
    return out, new_cache


def _activation(name: str, x):
  if name == "gelu":
    return nn.gelu(x, approximate=False)
  if name == "gelu_tanh":
    return nn.gelu(x, approximate=True)
  if name == "quick_gelu":
    return x * jax.nn.sigmoid(1.702 * x)
  if name == "relu":
    return nn.relu(x)
  raise ValueError(f"unknown activation {name!r}")


class Mlp(nn.Module):
  """Position-wise feed-forward block; gated variants for swiglu / geglu."""
  config: TransformerConfig
  train: bool = False

  @nn.compact
  def __call__(self, x):
    cfg = self.config

    def dense(name, features, axes, inputs):
      # Parameters as nn.Dense's (kernel [in, out], bias [out], same init).
      return Projection(cfg, (features,), axes, name=name)(inputs)

    if cfg.activation in ("swiglu", "geglu"):
      gate = dense("wi_gate", cfg.mlp_dim, ("embed", "mlp"), x)
      up = dense("wi_up", cfg.mlp_dim, ("embed", "mlp"), x)
      gate = nn.silu(gate) if cfg.activation == "swiglu" else nn.gelu(gate, approximate=False)
      h = gate * up
    else:
      h = _activation(cfg.activation, dense("wi", cfg.mlp_dim, ("embed", "mlp"), x))
    h = _constrain(h, ("batch", "length", "mlp"))
    h = nn.Dropout(cfg.dropout)(h, deterministic=not self.train)
    return dense("wo", cfg.width, ("mlp", "embed"), h)


# Keys a ``layer_bias`` hook may return.
LAYER_BIAS_KEYS = ("bias", "mask", "losses")


def _add_losses(into: dict, losses, source: str):
  """Adds ``losses`` (name -> scalar) into ``into``; equal names are summed."""
  if not isinstance(losses, Mapping):
    raise TypeError(f"{source} must give its auxiliary losses as a dict name -> scalar; "
                    f"got {type(losses).__name__}.")
  for name, value in losses.items():
    value = jnp.asarray(value, jnp.float32)
    if value.ndim:
      raise ValueError(f"{source} auxiliary loss {name!r} has shape {value.shape}; "
                       "reduce it to a scalar (mean over batch and positions).")
    into[name] = into[name] + value if name in into else value


class Block(nn.Module):
  """One Transformer layer (self-attention, optional cross-attention, MLP).

  ``layer_bias`` and ``mlp`` are the hooks documented on ``Transformer``.
  ``moe_layer``: whether this layer's MLP is ``config.moe``'s mixture of
  experts (None: yes when the config has experts in every layer).
  """
  config: TransformerConfig
  train: bool = False
  causal: bool = False
  return_layers: bool = False
  layer_bias: Optional[Callable[..., nn.Module]] = None
  mlp: Optional[Callable[..., nn.Module]] = None
  moe_layer: Optional[bool] = None

  def _drop_path(self, residual, rate):
    """Stochastic depth: drop the whole branch per example."""
    if not self.train or self.config.stochastic_depth == 0.0:
      return residual
    keep = jax.random.bernoulli(self.make_rng("dropout"), 1.0 - rate,
                                (residual.shape[0],) + (1,) * (residual.ndim - 1))
    return jnp.where(keep, residual / (1.0 - rate), 0.0).astype(residual.dtype)

  @nn.compact
  def __call__(self, x, layer_index, drop_rate, cache, shared):
    """``layer_index``: int32 scalar (traced under scan); ``shared``: dict of
    per-call inputs broadcast to every layer (``block_inputs`` builds one).

    Returns ``x, (x or None, new_cache, losses, stats)``; ``losses`` is a dict
    name -> float32 scalar of this layer's auxiliary losses (``{}`` without
    any); ``stats`` the MoE layer's statistics (``backbone_moe.STAT_NAMES``;
    ``{}`` on other layers).
    """
    cfg = self.config
    moe = cfg.moe
    if moe.experts and self.mlp is not None:
      raise ValueError("Transformer.mlp replaces the MLP, and config.moe.experts="
                       f"{moe.experts} asks for experts there: use one of them.")
    if moe.experts and moe.every > 1 and self.moe_layer is None:
      raise ValueError(f"config.moe.every={moe.every}: a Block run outside Transformer must "
                       "be told whether it has experts (Block(..., moe_layer=...)).")
    use_moe = bool(moe.experts) and self.moe_layer is not False
    stats: dict[str, jax.Array] = {}
    post = cfg.norm_position == "post"
    res_post = cfg.norm_position == "residual_post"
    dropout = nn.Dropout(cfg.dropout)
    losses: dict[str, jax.Array] = {}
    keep_input = shared.get("attention_input_mask")

    def residual(x, name, branch):
      h = x if post or res_post else Norm(cfg, name=f"{name}_norm")(x)
      if name == "attention" and keep_input is not None:
        h = jnp.where(keep_input[..., None], h, jnp.zeros((), h.dtype))
      h = branch(h)
      if res_post:
        h = Norm(cfg, name=f"{name}_norm")(h)
      if cfg.layer_scale > 0:  # a per-channel gain on the branch, before drop path (BEiT's lambda)
        gain = self.param(f"{name}_layer_scale", _partitioned(
            nn.initializers.constant(cfg.layer_scale), ("embed",)), (cfg.width,), cfg.params_dtype)
        h = h * gain.astype(h.dtype)
      h = self._drop_path(dropout(h, deterministic=not self.train), drop_rate)
      x = x + h
      return Norm(cfg, name=f"{name}_norm")(x) if post else x

    mask, bias = shared["mask"], shared["bias"]
    if self.layer_bias is not None:
      terms = self.layer_bias(cfg, name="attention_bias")(layer_index, x)
      if not isinstance(terms, Mapping) or set(terms) - set(LAYER_BIAS_KEYS):
        got = sorted(terms) if isinstance(terms, Mapping) else type(terms).__name__
        raise ValueError(f"Transformer.layer_bias must return a dict with keys among "
                         f"{LAYER_BIAS_KEYS}; got {got}.")
      if terms.get("mask") is not None:
        mask = terms["mask"] if mask is None else jnp.logical_and(mask, terms["mask"])
      if terms.get("bias") is not None:
        bias = terms["bias"] if bias is None else bias + terms["bias"]
      _add_losses(losses, terms.get("losses", {}), "Transformer.layer_bias")

    new_cache = None

    def self_attention(h):
      nonlocal new_cache
      # The sown attention weights see the same combined mask and bias.
      out, new_cache = Attention(cfg, self.train, name="attention")(
          h, causal=self.causal, mask=mask, bias=bias,
          q_segment_ids=shared["segment_ids"], kv_segment_ids=shared["kv_segment_ids"],
          positions=shared["positions"], cache=cache, cache_index=shared["cache_index"])
      return out

    def mlp(h):
      nonlocal stats
      if use_moe:
        # Imported here: backbone_moe builds on this module's parts.
        from datong.backbone_moe import MoeMlp  # pylint: disable=import-outside-toplevel
        segments = shared["segment_ids"]
        out, extra, stats = MoeMlp(cfg, self.train, name="mlp")(
            h, None if segments is None else segments > 0, shared.get("modality_ids"))
        _add_losses(losses, extra, "MoeMlp")
        return out
      if moe.experts:  # a dense layer between MoE layers adds the same (zero) losses
        _add_losses(losses, {n: 0.0 for n in moe.loss_names()}, "Block")
      if self.mlp is None:
        return Mlp(cfg, self.train, name="mlp")(h)
      out = self.mlp(cfg, train=self.train, name="mlp")(h)
      if isinstance(out, tuple):
        out, extra = out
        _add_losses(losses, extra, "Transformer.mlp")
      return out

    x = residual(x, "attention", self_attention)
    if cfg.cross_attention:
      x = residual(x, "cross_attention", lambda h: Attention(cfg, self.train, name="cross_attention")(
          h, shared["context"], mask=shared["context_mask"])[0])
    x = residual(x, "mlp", mlp)
    x = _constrain(x, ("batch", "length", "embed"))
    return x, (x if self.return_layers else None, new_cache, losses, stats)


# A Block's ``shared`` inputs: ``Transformer``'s call arguments, and
# ``attention_input_mask`` ``[batch, length]`` bool: False zeroes that position's
# self-attention input after the pre-norm (Swin's zero padding to whole windows).
BLOCK_INPUTS = ("mask", "bias", "segment_ids", "kv_segment_ids", "positions", "cache_index",
                "context", "context_mask", "attention_input_mask", "modality_ids")


def block_inputs(**inputs) -> dict:
  """A ``Block``'s ``shared`` dict (missing keys None), for models that run
  blocks themselves (Swin regroups tokens into windows between layers)."""
  if set(inputs) - set(BLOCK_INPUTS):
    raise ValueError(f"block_inputs: unknown {sorted(set(inputs) - set(BLOCK_INPUTS))}; "
                     f"known: {BLOCK_INPUTS}.")
  return {k: inputs.get(k) for k in BLOCK_INPUTS}


_REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole block
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Transformer(nn.Module):
  """The shared backbone: ``[batch, length, width]`` -> same shape.

  Call: ``hidden, aux = Transformer(config)(x, causal=..., segment_ids=...)``.
  ``aux`` holds ``pre_norm`` (the last block's output before the final norm),
  ``layers`` (``[depth, batch, length, width]``, when ``return_layers``),
  ``cache`` (when decoding with ``cache``) and, only when a layer adds
  auxiliary losses, ``losses`` (name -> float32 scalar, summed over layers)
  and ``layer_losses`` (name -> ``[depth]``). With ``config.moe`` experts it
  also holds ``moe`` (per MoE layer statistics, name -> ``[moe_layers,
  ...]``) and ``metrics`` (scalars: expert load, dropped fraction, per-layer
  losses; ``backbone_moe.moe_metrics``), which tasks log as metrics.

  Hooks, for architectures that change a layer's parts (module classes or
  ``functools.partial``s of one; each layer builds its own instance, so its
  parameters are per layer and stack on ``layers`` under ``scan_layers``):

  ``layer_bias``: built as ``layer_bias(config, name="attention_bias")`` and
  called ``(layer_index, x) -> dict`` with ``layer_index`` an int32 scalar
  (traced under ``scan_layers``: branch with ``jnp.where``, not ``if``) and
  ``x`` the block's input ``[batch, length, width]``. The dict may hold
  ``"bias"`` (additive float, broadcastable to ``[batch, heads, length,
  kv_length]``; added to the call's ``bias``), ``"mask"`` (boolean, same
  broadcast; and-ed with the call's ``mask``) and ``"losses"``. It acts on
  self-attention only, and the sown attention weights include it. E.g. a
  BEiT / Swin relative-position table ``[(2M-1)^2, heads]`` per layer, with
  Swin's shifted windows on odd layers. With a KV cache ``kv_length`` is
  the cache length.

  ``mlp``: replaces ``Mlp`` (the parameters keep the name ``mlp``): built as
  ``mlp(config, train=train, name="mlp")`` and called ``(h) -> y`` or
  ``(h) -> (y, losses)``, ``h`` and ``y`` ``[batch, length, width]``; e.g. a
  mixture of experts returning its load-balancing loss.

  ``losses`` of a hook: a dict name -> scalar, reduced over batch and
  positions. Equal names add up; every layer must give the same names. A
  task passes ``aux["losses"]`` to the engine as its metric
  ``"aux_losses"`` (see ``Task.loss``) to have them minimized.
  """
  config: TransformerConfig
  layer_bias: Optional[Callable[..., nn.Module]] = None
  mlp: Optional[Callable[..., nn.Module]] = None

  @nn.compact
  def __call__(self, x, *, causal: bool = False, segment_ids=None, mask=None,
               bias=None, positions=None, context=None, context_mask=None,
               cache=None, cache_index=None, train: bool = False,
               return_layers: bool = False, modality_ids=None):
    """Args:
      x: ``[batch, length, width]`` embeddings.
      causal: each position sees only itself and earlier ones.
      segment_ids: ``[batch, length]`` ints; positions attend only within
        their segment (packing, padding).
      mask / bias: boolean mask / additive bias broadcastable to
        ``[batch, heads, length, kv_length]``.
      positions: ``[batch, length]`` positions for rotary embeddings
        (default ``arange``, offset by ``cache_index`` when decoding).
      context, context_mask: encoder output ``[batch, ctx_len, width]`` and a
        boolean mask ``[batch|1, 1, length, ctx_len]`` for cross-attention.
      cache: ``{"k", "v"}`` arrays ``[depth, batch, max_len, kv_heads, head_dim]``
        (see ``init_cache``); the new keys/values are written at
        ``cache_index`` and attention runs over the cache.
      train: enables dropout and stochastic depth (needs a "dropout" rng).
      return_layers: also return every block's output.
      modality_ids: ``[batch, length]`` ints, the modality of each position
        (image 0, text 1, ...): the MoE modality router and the per-modality
        entropy losses read it.
    """
    cfg = self.config
    if x.ndim != 3 or x.shape[-1] != cfg.width:
      raise ValueError(f"Transformer expects [batch, length, {cfg.width}] embeddings; "
                       f"got {x.shape}.")
    if cfg.cross_attention != (context is not None):
      raise ValueError("context must be given iff config.cross_attention is True.")
    batch, length = x.shape[:2]
    if modality_ids is not None and modality_ids.shape != (batch, length):
      raise ValueError(f"modality_ids must be [batch, length] = {(batch, length)}; "
                       f"got {modality_ids.shape}.")
    if positions is None and cfg.rope:
      start = 0 if cache is None else cache_index
      positions = jnp.broadcast_to(jnp.arange(length) + start, (batch, length))
    kv_segment_ids = segment_ids
    if cache is not None:
      if cache_index is None:
        raise ValueError("decoding with a cache needs cache_index.")
      if segment_ids is not None:
        raise ValueError("segment_ids are not supported with a cache; pass a mask.")
      # Keys past the written part of the cache are invisible; causal means
      # "up to my own absolute position".
      max_len = cache["k"].shape[2]
      visible = mask_ops.causal_mask(length, max_len, offset=cache_index) if causal \
          else (jnp.arange(max_len) < cache_index + length)[None, None, None, :]
      mask = visible if mask is None else jnp.logical_and(mask, visible)
      causal = False
    x = _constrain(x.astype(cfg.compute_dtype), ("batch", "length", "embed"))
    shared = dict(mask=mask, bias=bias, segment_ids=segment_ids,
                  kv_segment_ids=kv_segment_ids, positions=positions,
                  cache_index=cache_index, context=context, context_mask=context_mask,
                  modality_ids=modality_ids)
    drop_rates = cfg.stochastic_depth * jnp.arange(cfg.depth, dtype=jnp.float32) / max(cfg.depth - 1, 1)
    layer_indices = jnp.arange(cfg.depth, dtype=jnp.int32)

    hooks = dict(layer_bias=self.layer_bias, mlp=self.mlp)
    block_cls = Block
    if cfg.remat != "none":
      block_cls = nn.remat(Block, policy=_REMAT_POLICIES[cfg.remat],
                           prevent_cse=not cfg.scan_layers)
    block = functools.partial(block_cls, cfg, train=train, causal=causal,
                              return_layers=return_layers, **hooks)
    if cfg.scan_layers:
      stack = nn.scan(block_cls, variable_axes={"params": 0, WEIGHTS_COLLECTION: 0},
                      split_rngs={"params": True, "dropout": True},
                      in_axes=(0, 0, 0, nn.broadcast), length=cfg.depth,
                      metadata_params={nn.PARTITION_NAME: "layers"})
      x, (layer_outs, new_cache, layer_losses, moe_stats) = stack(
          cfg, train=train, causal=causal, return_layers=return_layers, **hooks,
          name="layers")(x, layer_indices, drop_rates, cache, shared)
    else:
      outs, caches, losses, stats = [], [], [], []
      for i in range(cfg.depth):
        layer_cache = None if cache is None else jax.tree.map(lambda c: c[i], cache)
        x, (out, c, loss, stat) = block(name=f"layer_{i}", moe_layer=cfg.moe.is_moe_layer(i))(
            x, layer_indices[i], drop_rates[i], layer_cache, shared)
        outs.append(out)
        caches.append(c)
        losses.append(loss)
        stats.append(stat)
      layer_outs = jnp.stack(outs) if return_layers else None
      new_cache = None if cache is None else jax.tree.map(lambda *c: jnp.stack(c), *caches)
      for i, loss in enumerate(losses):
        if sorted(loss) != sorted(losses[0]):  # scan needs it too: one pytree per layer
          raise ValueError(f"every layer must add the same auxiliary losses; layer 0 adds "
                           f"{sorted(losses[0])}, layer {i} adds {sorted(loss)}.")
      layer_losses = {k: jnp.stack([loss[k] for loss in losses]) for k in losses[0]}
      stats = [st for st in stats if st]  # MoE layers only
      moe_stats = {k: jnp.stack([st[k] for st in stats]) for k in stats[0]} if stats else {}

    aux = {"pre_norm": x}
    if return_layers:
      aux["layers"] = layer_outs
    if cache is not None:
      aux["cache"] = new_cache
    if layer_losses:  # no key without losses: aux stays as it was
      aux["losses"] = {k: jnp.sum(v) for k, v in layer_losses.items()}
      aux["layer_losses"] = layer_losses
    if moe_stats:
      from datong.backbone_moe import moe_metrics  # pylint: disable=import-outside-toplevel
      aux["moe"] = moe_stats
      aux["metrics"] = moe_metrics(moe_stats, [i for i in range(cfg.depth)
                                               if cfg.moe.is_moe_layer(i)])
    if cfg.has_final_norm:
      x = Norm(cfg, name="final_norm")(x)
    return x, aux


def init_cache(config: TransformerConfig, batch: int, max_length: int, dtype=None):
  """Zeroed KV cache ``{"k", "v"}``: ``[depth, batch, max_length, kv_heads, head_dim]``."""
  shape = (config.depth, batch, max_length, config.resolved_kv_heads, config.resolved_head_dim)
  dtype = config.compute_dtype if dtype is None else dtype
  return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}

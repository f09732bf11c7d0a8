"""Multi-head attention: one op, several kernels.

Shapes: q ``[batch, q_length, heads, head_dim]``, k and v
``[batch, kv_length, kv_heads, head_dim]`` with ``heads % kv_heads == 0``
(grouped-query attention; query head ``h`` reads kv head
``h // (heads // kv_heads)``). The output has q's shape and dtype.

Masking semantics, shared by every implementation:

* ``causal``: query ``i`` sees key ``j`` iff ``j <= i`` (top-left aligned, as
  ``jax.nn.dot_product_attention``). For decoding with a cache pass an
  explicit ``mask`` instead.
* ``q_segment_ids`` / ``kv_segment_ids`` (``[batch, length]`` ints): a query
  sees a key iff their ids are equal. Packing gives each document its own id;
  padding gets an id no real token uses.
* ``mask``: boolean, broadcastable to ``[batch, heads, q_length, kv_length]``;
  True means "may attend".
* ``bias``: additive float, broadcastable to the same shape.

A query row that may attend to no key outputs zeros (and passes no gradient),
instead of the NaN a naive softmax gives or the uniform average a finite
``-inf`` substitute gives. Flash kernels behave the same way.

``impl``: ``reference`` is plain einsum + float32 softmax, the truth every
other implementation is tested against. ``xla`` and ``cudnn`` go through
``jax.nn.dot_product_attention``. ``pallas_gpu`` / ``pallas_tpu`` are our own
flash kernels (``datong.ops.pallas``). ``auto`` picks the fastest
implementation that can serve the call on the current platform. An explicit
implementation that cannot serve a call falls back to ``reference`` with a
warning, or raises ``AttentionUnsupportedError`` with ``strict=True``.
"""

from __future__ import annotations

import functools
import warnings
from typing import Callable, Optional

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("auto", "reference", "xla", "cudnn", "pallas_gpu", "pallas_tpu")


class AttentionUnsupportedError(ValueError):
  """An attention implementation cannot serve the requested call."""


def _check_shapes(q, k, v):
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(
        "attention expects q [batch, q_length, heads, head_dim] and k, v "
        f"[batch, kv_length, kv_heads, head_dim]; got q{q.shape} k{k.shape} "
        f"v{v.shape}.")
  if k.shape != v.shape:
    raise ValueError(f"k and v must have the same shape; got k{k.shape} v{v.shape}.")
  if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
    raise ValueError(
        "q and k must agree on batch and head_dim; got "
        f"q{q.shape} k{k.shape}.")
  if 0 in q.shape or 0 in k.shape:
    raise ValueError(f"attention got an empty axis: q{q.shape} k{k.shape} (batch, length, "
                     "heads, kv_heads and head_dim must all be >= 1).")
  if q.shape[2] % k.shape[2]:
    raise ValueError(
        f"heads ({q.shape[2]}) must be a multiple of kv_heads ({k.shape[2]}) "
        "for grouped-query attention.")
  for name, x in (("q", q), ("k", k), ("v", v)):
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"attention needs floating-point inputs; {name} is {x.dtype}. Cast "
                       "q, k, v to float32 or bfloat16 (integer scores would round to zero).")


def _check_bias_and_mask(q, k, bias, mask):
  """``bias``/``mask`` must be 4-D and broadcastable to ``[batch, heads, q, kv]``."""
  want = (q.shape[0], q.shape[2], q.shape[1], k.shape[1])
  for name, x in (("bias", bias), ("mask", mask)):
    if x is None:
      continue
    ok = x.ndim == 4 and all(d in (1, w) for d, w in zip(x.shape, want))
    if not ok:
      raise ValueError(
          f"attention {name} has shape {tuple(x.shape)}; it must be 4-D and broadcastable to "
          f"[batch, heads, q_length, kv_length] = {list(want)} (use 1 for a broadcast axis, "
          f"e.g. {name}[:, None] for a [batch, q_length, kv_length] {name}).")


def l2_normalize(x, eps: float = 1e-12):
  """``x / max(|x|, eps)`` over the last axis, in float32 (torch's ``F.normalize``)."""
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True)), eps)


def combine_masks(q, k, *, causal=False, mask=None, q_segment_ids=None,
                  kv_segment_ids=None) -> Optional[jax.Array]:
  """All boolean masking as one ``[batch|1, heads|1, q_length, kv_length]`` mask.

  Returns None when nothing is masked.
  """
  q_len, kv_len = q.shape[1], k.shape[1]
  out = None

  def _and(a, b):
    return b if a is None else jnp.logical_and(a, b)

  if causal:
    out = _and(out, jnp.tril(jnp.ones((q_len, kv_len), bool))[None, None])
  if (q_segment_ids is None) != (kv_segment_ids is None):
    raise ValueError("Pass both q_segment_ids and kv_segment_ids, or neither.")
  if q_segment_ids is not None:
    if q_segment_ids.shape != (q.shape[0], q_len) or kv_segment_ids.shape != (k.shape[0], kv_len):
      raise ValueError(
          f"segment ids must be [batch, length]: q_segment_ids{q_segment_ids.shape} "
          f"for q{q.shape}, kv_segment_ids{kv_segment_ids.shape} for k{k.shape}.")
    out = _and(out, q_segment_ids[:, None, :, None] == kv_segment_ids[:, None, None, :])
  if mask is not None:
    if mask.dtype != jnp.bool_:
      raise ValueError(f"mask must be boolean (True = attend); got {mask.dtype}. "
                       "Pass additive float masks as bias=.")
    out = _and(out, mask)
  return out


def attention_weights(q, k, *, causal=False, bias=None, mask=None,
                      q_segment_ids=None, kv_segment_ids=None, scale=None):
  """The reference's attention probabilities, ``[batch, heads, q_length, kv_length]``.

  Float32; each row sums to 1 over the keys it may attend to (rows with no
  such key are all zeros). Used by ``reference_attention`` and to look at
  attention maps (``datong.notebook.attention_weights``).
  """
  batch, q_len, heads, head_dim = q.shape
  kv_heads = k.shape[2]
  groups = heads // kv_heads
  scale = head_dim ** -0.5 if scale is None else scale
  # Grouped heads: [batch, q_len, kv_heads, groups, head_dim].
  qg = q.reshape(batch, q_len, kv_heads, groups, head_dim)
  logits = jnp.einsum("bqkgd,bskd->bkgqs", qg, k,
                      preferred_element_type=jnp.float32) * scale
  logits = logits.reshape(batch, heads, q_len, k.shape[1])
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)
  full_mask = combine_masks(q, k, causal=causal, mask=mask,
                            q_segment_ids=q_segment_ids,
                            kv_segment_ids=kv_segment_ids)
  if full_mask is not None:
    logits = jnp.where(full_mask, logits, -jnp.inf)
  row_max = jnp.max(logits, axis=-1, keepdims=True)
  row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
  weights = jnp.exp(logits - jax.lax.stop_gradient(row_max))
  denom = jnp.sum(weights, axis=-1, keepdims=True)
  # Rows with nothing to attend to output zeros rather than NaN.
  return weights / jnp.where(denom == 0, 1.0, denom)


def reference_attention(q, k, v, *, causal=False, bias=None, mask=None,
                        q_segment_ids=None, kv_segment_ids=None, scale=None,
                        dropout_rate=0.0, dropout_rng=None):
  """Plain einsum attention with a float32 softmax: the ground truth."""
  _check_shapes(q, k, v)
  batch, q_len, heads, head_dim = q.shape
  kv_heads = k.shape[2]
  probs = attention_weights(q, k, causal=causal, bias=bias, mask=mask,
                            q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
                            scale=scale)
  if dropout_rate > 0.0:
    if dropout_rng is None:
      raise ValueError("dropout_rate > 0 needs dropout_rng.")
    keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, probs.shape)
    probs = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0)
  probs = probs.reshape(batch, kv_heads, heads // kv_heads, q_len, k.shape[1]).astype(v.dtype)
  out = jnp.einsum("bkgqs,bskd->bqkgd", probs, v, preferred_element_type=jnp.float32)
  return out.reshape(batch, q_len, heads, head_dim).astype(q.dtype)


def _jax_attention(q, k, v, *, implementation, causal, bias, mask,
                   q_segment_ids, kv_segment_ids, scale):
  full_mask = combine_masks(q, k, causal=False, mask=mask,
                            q_segment_ids=q_segment_ids,
                            kv_segment_ids=kv_segment_ids)
  if bias is not None:
    # jax wants bias and mask broadcastable to [B, N, T, S] with full rank.
    bias = jnp.broadcast_to(bias, (bias.shape[0], bias.shape[1]) + (q.shape[1], k.shape[1])) \
        if bias.ndim == 4 else bias
  out = jax.nn.dot_product_attention(
      q, k, v, bias=bias, mask=full_mask, scale=scale, is_causal=causal,
      implementation=implementation)
  # jax averages uniformly over a fully masked row; our contract is zeros.
  valid = combine_masks(q, k, causal=causal, mask=mask,
                        q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids)
  if valid is not None:
    any_valid = jnp.any(valid, axis=-1)  # [b|1, h|1, q]
    any_valid = jnp.broadcast_to(any_valid, (any_valid.shape[0], any_valid.shape[1], q.shape[1]))
    out = out * jnp.transpose(any_valid, (0, 2, 1))[..., None].astype(out.dtype)
  return out


def _cudnn_unsupported(q, k, v, *, bias, mask, dropout_rate, **_):
  if jax.default_backend() != "gpu":
    return f"cudnn needs a GPU; the default backend is {jax.default_backend()}"
  if q.dtype not in (jnp.bfloat16, jnp.float16):
    return f"cudnn needs bfloat16 or float16 inputs; got {q.dtype}"
  if q.shape[-1] % 8 or q.shape[-1] > 256:
    return f"cudnn needs head_dim a multiple of 8 and <= 256; got {q.shape[-1]}"
  if dropout_rate > 0:
    return "attention dropout is only implemented by the reference"
  return None


def _xla_unsupported(q, k, v, *, dropout_rate, **_):
  if dropout_rate > 0:
    return "attention dropout is only implemented by the reference"
  return None


def _pallas_module():
  try:
    from datong.ops import pallas  # pylint: disable=import-outside-toplevel
  except ImportError:
    return None
  return pallas


def _pallas_unsupported(platform):
  def check(q, k, v, **kwargs):
    pallas = _pallas_module()
    if pallas is None:
      return "datong.ops.pallas is not available in this installation"
    return pallas.unsupported_reason(platform, q, k, v, **kwargs)
  return check


def _pallas_call(platform):
  def call(q, k, v, *, causal, bias, mask, q_segment_ids, kv_segment_ids,
           scale, dropout_rate, dropout_rng, logical_rules=None):
    del bias, mask, dropout_rate, dropout_rng  # rejected by unsupported_reason
    return _pallas_module().attention(
        platform, q, k, v, causal=causal, q_segment_ids=q_segment_ids,
        kv_segment_ids=kv_segment_ids, scale=scale, logical_rules=logical_rules)
  return call


def _reference_call(q, k, v, *, causal, bias, mask, q_segment_ids,
                    kv_segment_ids, scale, dropout_rate, dropout_rng,
                    logical_rules=None):
  del logical_rules
  return reference_attention(
      q, k, v, causal=causal, bias=bias, mask=mask, q_segment_ids=q_segment_ids,
      kv_segment_ids=kv_segment_ids, scale=scale, dropout_rate=dropout_rate,
      dropout_rng=dropout_rng)


def _jax_call(implementation):
  def call(q, k, v, *, causal, bias, mask, q_segment_ids, kv_segment_ids,
           scale, dropout_rate, dropout_rng, logical_rules=None):
    del dropout_rate, dropout_rng, logical_rules
    return _jax_attention(
        q, k, v, implementation=implementation, causal=causal, bias=bias,
        mask=mask, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
        scale=scale)
  return call


# name -> (why it cannot serve a call or None, the call)
_IMPLS: dict[str, tuple[Callable[..., Optional[str]], Callable[..., jax.Array]]] = {
    "reference": (lambda *a, **kw: None, _reference_call),
    "xla": (_xla_unsupported, _jax_call("xla")),
    "cudnn": (_cudnn_unsupported, _jax_call("cudnn")),
    "pallas_gpu": (_pallas_unsupported("gpu"), _pallas_call("gpu")),
    "pallas_tpu": (_pallas_unsupported("tpu"), _pallas_call("tpu")),
}

# What ``auto`` tries, in order, per platform; reference always serves.
_AUTO_ORDER = {
    "gpu": ("cudnn", "pallas_gpu", "xla"),
    "tpu": ("pallas_tpu", "xla"),
    "cpu": ("xla",),
}


@functools.lru_cache(maxsize=None)
def _warn_once(message: str):
  warnings.warn(message, stacklevel=3)


def unsupported_reason(impl: str, q, k, v, *, bias=None, mask=None,
                       causal=False, q_segment_ids=None, kv_segment_ids=None,
                       dropout_rate=0.0) -> Optional[str]:
  """Why ``impl`` cannot serve this call, or None if it can."""
  if impl not in _IMPLS:
    raise ValueError(f"Unknown attention impl {impl!r}; choose one of {IMPLEMENTATIONS}.")
  check, _ = _IMPLS[impl]
  return check(q, k, v, bias=bias, mask=mask, causal=causal,
               q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
               dropout_rate=dropout_rate)


def select_impl(q, k, v, *, impl="auto", strict=False, **call) -> str:
  """The implementation that will serve the call (see ``attention``)."""
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"Unknown attention impl {impl!r}; choose one of {IMPLEMENTATIONS}.")
  if impl == "auto":
    for candidate in _AUTO_ORDER.get(jax.default_backend(), ()):
      if unsupported_reason(candidate, q, k, v, **call) is None:
        return candidate
    return "reference"
  reason = unsupported_reason(impl, q, k, v, **call)
  if reason is None:
    return impl
  if strict:
    raise AttentionUnsupportedError(f"attention impl {impl!r} cannot serve this call: {reason}.")
  _warn_once(f"attention impl {impl!r} cannot serve this call ({reason}); "
             "falling back to 'reference'. Pass strict=True to make this an error.")
  return "reference"


def attention(q, k, v, *, causal: bool = False, bias=None, mask=None,
              q_segment_ids=None, kv_segment_ids=None, scale: Optional[float] = None,
              dropout_rate: float = 0.0, dropout_rng=None, impl: str = "auto",
              strict: bool = False, logical_rules=None) -> jax.Array:
  """Scaled dot-product attention; see the module docstring for semantics.

  Args:
    q: ``[batch, q_length, heads, head_dim]``.
    k, v: ``[batch, kv_length, kv_heads, head_dim]``.
    causal: mask keys after the query (top-left aligned).
    bias: additive logits bias broadcastable to ``[batch, heads, q, kv]``.
    mask: boolean, True = attend, broadcastable like ``bias``.
    q_segment_ids, kv_segment_ids: ``[batch, length]`` ints; equal ids attend.
    scale: logits scale; default ``head_dim ** -0.5``.
    dropout_rate, dropout_rng: attention-probability dropout (reference only).
    impl: one of ``IMPLEMENTATIONS``.
    strict: raise instead of falling back when ``impl`` cannot serve the call.
    logical_rules: flax-style logical axis rules; lets the Pallas kernels run
      under ``shard_map`` when an ambient mesh is set.
  Returns:
    ``[batch, q_length, heads, head_dim]`` in q's dtype.
  """
  _check_shapes(q, k, v)
  _check_bias_and_mask(q, k, bias, mask)
  call = dict(causal=causal, bias=bias, mask=mask, q_segment_ids=q_segment_ids,
              kv_segment_ids=kv_segment_ids, dropout_rate=dropout_rate)
  chosen = select_impl(q, k, v, impl=impl, strict=strict, **call)
  _, fn = _IMPLS[chosen]
  return fn(q, k, v, scale=scale, dropout_rng=dropout_rng,
            logical_rules=logical_rules, **call)

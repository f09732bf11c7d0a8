"""Flash attention for GPUs in Pallas (Triton lowering).

Layout stays ``[batch, length, heads, head_dim]`` (no transposes): the head
axis is squeezed out by the BlockSpecs. Three kernels:

* forward, grid ``(q_blocks, batch, heads)``: one q block per program, an
  online-softmax loop over kv blocks; writes the output and the base-2
  log-sum-exp of each row (the residual for the backward pass);
* dk/dv, grid ``(kv_blocks, batch, heads)``: one kv block per program, loops
  over q blocks. With grouped-query heads it writes dk, dv per *query* head in
  float32 and the wrapper sums each group (as FlashAttention-2 does), so no
  program races on a shared kv head;
* dq, grid ``(q_blocks, batch, heads)``: one q block per program, loops over
  kv blocks.

``delta = rowsum(o * do)`` is computed by XLA between them. Causal kernels
bound their loops so kv blocks entirely above the diagonal are never loaded,
and only blocks that cut the diagonal (or hold padding, or whenever segment
ids are given) pay for the mask.

Logits are kept in base 2 (``exp2`` with ``scale * log2(e)`` folded in), the
usual trick for Triton.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from datong.ops.pallas._common import (MASK_VALUE, BlockSizes, cdiv, check_inputs, flash_with_vjp,
                                       next_power_of_two, pad_axis, padded_length)

try:  # Triton compiler params; the module is importable without a GPU.
  from jax.experimental.pallas import triton as _plgpu
except ImportError:  # pragma: no cover - very old or stripped jax.
  _plgpu = None

MIN_BLOCK = 16  # Triton's tl.dot wants every dim >= 16.
_LOG2E = math.log2(math.e)
_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_TN = (((0,), (0,)), ((), ()))  # a.T @ b

DEFAULT_BLOCK_SIZES = BlockSizes(block_q=128, block_kv=64, block_q_dkv=64,
                                 block_kv_dkv=64, block_q_dq=64, block_kv_dq=64)


def padded_head_dim(head_dim: int) -> int:
  """Triton blocks are powers of two: 16, 32, 64, 128, 256."""
  return max(MIN_BLOCK, next_power_of_two(head_dim))


@dataclasses.dataclass(frozen=True)
class _Config:
  scale: float  # includes log2(e)
  causal: bool
  q_len: int  # unpadded lengths
  kv_len: int
  groups: int
  block_q: int
  block_kv: int
  block_q_dkv: int
  block_kv_dkv: int
  block_q_dq: int
  block_kv_dq: int
  num_warps: Optional[int]
  num_stages: int
  interpret: bool


def _idiv(a, b: int):
  return lax.div(a, jnp.int32(b)) if not isinstance(a, int) else a // b


def _icdiv(a, b: int):
  return _idiv(a + (b - 1), b)


def _imin(a, b):
  if isinstance(a, int) and isinstance(b, int):
    return min(a, b)
  return lax.min(jnp.int32(a) if isinstance(a, int) else a, jnp.int32(b) if isinstance(b, int) else b)


def _imax(a, b):
  if isinstance(a, int) and isinstance(b, int):
    return max(a, b)
  return lax.max(jnp.int32(a) if isinstance(a, int) else a, jnp.int32(b) if isinstance(b, int) else b)


def _kv_block_range(cfg: _Config, q_block, block_q: int, block_kv: int, has_segments: bool):
  """kv blocks that q block ``q_block`` needs: ``[0, n_unmasked)`` without a
  mask, ``[n_unmasked, hi)`` with one; blocks past ``hi`` are skipped."""
  n_kv = cdiv(cfg.kv_len, block_kv)  # blocks holding at least one real key
  if cfg.causal:
    # Last key any row of this block sees: (q_block + 1) * block_q - 1.
    hi = _imin(_icdiv((q_block + 1) * block_q, block_kv), n_kv)
  else:
    hi = n_kv
  if has_segments:
    return 0, hi
  full = cfg.kv_len // block_kv  # blocks without padded keys
  if cfg.causal:
    # Block j is below the diagonal for every row iff (j + 1) * block_kv - 1 <= q_block * block_q.
    full = _imin(full, _idiv(q_block * block_q + 1, block_kv))
  return _imin(full, hi), hi


def _mask(cfg: _Config, q_pos, k_pos, q_ids, kv_ids):
  mask = None

  def _and(a, b):
    return b if a is None else jnp.logical_and(a, b)

  if cfg.causal:
    mask = _and(mask, q_pos[:, None] >= k_pos[None, :])
  if cfg.kv_len % cfg.block_kv or cfg.kv_len % cfg.block_kv_dq or cfg.kv_len % cfg.block_kv_dkv:
    mask = _and(mask, (k_pos < cfg.kv_len)[None, :])
  if q_ids is not None:
    mask = _and(mask, q_ids[:, None] == kv_ids[None, :])
  if mask is None:  # callers only ask for a mask when one applies; stay safe
    mask = jnp.ones((q_pos.shape[0], k_pos.shape[0]), jnp.bool_)
  return mask


# ---------------------------------------------------------------- forward


def _fwd_kernel(*refs, cfg: _Config, has_segments: bool):
  if has_segments:
    q_ref, k_ref, v_ref, qs_ref, ks_ref, o_ref, lse_ref = refs
  else:
    q_ref, k_ref, v_ref, o_ref, lse_ref = refs
    qs_ref = ks_ref = None
  bq, bk = cfg.block_q, cfg.block_kv
  head_dim = q_ref.shape[-1]
  i = pl.program_id(0)
  q = q_ref[...]
  q_pos = i * bq + jnp.arange(bq)
  q_ids = qs_ref[...] if has_segments else None

  def body(j, carry, masked):
    acc, m, l = carry
    k = k_ref[pl.ds(j * bk, bk), :]
    s = lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32) * cfg.scale
    if masked:
      kv_ids = ks_ref[pl.ds(j * bk, bk)] if has_segments else None
      mask = _mask(cfg, q_pos, j * bk + jnp.arange(bk), q_ids, kv_ids)
      s = jnp.where(mask, s, MASK_VALUE)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    alpha = jnp.exp2(m - m_new)
    p = jnp.exp2(s - m_new[:, None])
    if masked:  # a row with nothing visible yet must keep l == 0
      p = jnp.where(mask, p, 0.0)
    l = alpha * l + jnp.sum(p, axis=1)
    v = v_ref[pl.ds(j * bk, bk), :]
    acc = acc * alpha[:, None] + jnp.dot(p.astype(v.dtype), v,
                                         preferred_element_type=jnp.float32)
    return acc, m_new, l

  carry = (jnp.zeros((bq, head_dim), jnp.float32),
           jnp.full((bq,), MASK_VALUE, jnp.float32),
           jnp.zeros((bq,), jnp.float32))
  mid, hi = _kv_block_range(cfg, i, bq, bk, has_segments)
  carry = lax.fori_loop(0, mid, functools.partial(body, masked=False), carry)
  carry = lax.fori_loop(mid, hi, functools.partial(body, masked=True), carry)
  acc, m, l = carry
  # Rows that saw no key: acc == 0 and l == 0, so the output is exactly 0.
  l_safe = jnp.where(l == 0.0, 1.0, l)
  o_ref[...] = (acc / l_safe[:, None]).astype(o_ref.dtype)
  lse_ref[...] = m + jnp.log2(l_safe)


def _compiler_params(cfg: _Config, head_dim: int):
  if _plgpu is None:
    return None
  num_warps = cfg.num_warps or (4 if head_dim <= 64 else 8)
  return _plgpu.CompilerParams(num_warps=num_warps, num_stages=cfg.num_stages)


def _forward(cfg: _Config, q, k, v, q_ids, kv_ids):
  batch, tq, heads, d = q.shape
  tk = k.shape[1]
  bq, g = cfg.block_q, cfg.groups
  has_segments = q_ids is not None
  grid = (tq // bq, batch, heads)
  in_specs = [
      pl.BlockSpec((None, bq, None, d), lambda i, b, h: (b, i, h, 0)),
      pl.BlockSpec((None, tk, None, d), lambda i, b, h: (b, 0, h // g, 0)),
      pl.BlockSpec((None, tk, None, d), lambda i, b, h: (b, 0, h // g, 0)),
  ]
  args = [q, k, v]
  if has_segments:
    in_specs += [pl.BlockSpec((None, bq), lambda i, b, h: (b, i)),
                 pl.BlockSpec((None, tk), lambda i, b, h: (b, 0))]
    args += [q_ids, kv_ids]
  out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype),
               jax.ShapeDtypeStruct((batch, heads, tq), jnp.float32)]
  out_specs = [pl.BlockSpec((None, bq, None, d), lambda i, b, h: (b, i, h, 0)),
               pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i))]
  o, lse = pl.pallas_call(
      functools.partial(_fwd_kernel, cfg=cfg, has_segments=has_segments),
      grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      compiler_params=_compiler_params(cfg, d), interpret=cfg.interpret,
      name="datong_flash_fwd",
  )(*args)
  return o, lse


# ---------------------------------------------------------------- backward


def _dkv_kernel(*refs, cfg: _Config, has_segments: bool):
  if has_segments:
    (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qs_ref, ks_ref,
     dk_ref, dv_ref) = refs
  else:
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref = refs
    qs_ref = ks_ref = None
  bq, bk = cfg.block_q_dkv, cfg.block_kv_dkv
  head_dim = k_ref.shape[-1]
  j = pl.program_id(0)
  k = k_ref[...]
  v = v_ref[...]
  k_pos = j * bk + jnp.arange(bk)
  kv_ids = ks_ref[...] if has_segments else None

  def body(i, carry, masked):
    dk, dv = carry
    rows = pl.ds(i * bq, bq)
    q = q_ref[rows, :]
    do = do_ref[rows, :]
    s = lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32) * cfg.scale
    if masked:
      q_ids = qs_ref[rows] if has_segments else None
      mask = _mask(cfg, i * bq + jnp.arange(bq), k_pos, q_ids, kv_ids)
      s = jnp.where(mask, s, MASK_VALUE)
    p = jnp.exp2(s - lse_ref[rows][:, None])
    if masked:
      p = jnp.where(mask, p, 0.0)
    dv = dv + lax.dot_general(p.astype(do.dtype), do, _TN,
                              preferred_element_type=jnp.float32)
    dp = lax.dot_general(do, v, _NT, preferred_element_type=jnp.float32)
    ds = p * (dp - delta_ref[rows][:, None])
    dk = dk + lax.dot_general(ds.astype(q.dtype), q, _TN,
                              preferred_element_type=jnp.float32)
    return dk, dv

  n_q = cdiv(cfg.q_len, bq)  # q blocks past the real rows only hold padding
  if cfg.causal:
    lo = _imin(_idiv(j * bk, bq), n_q)  # first q block with a row >= j * bk
    # From here on every row sees every key of this block.
    mid = _imax(lo, _imin(_icdiv((j + 1) * bk - 1, bq), n_q))
  else:
    lo = mid = 0
  pad_in_block = (j + 1) * bk > cfg.kv_len
  if has_segments:
    mid = n_q
  elif cfg.kv_len % bk:
    # Not jnp.where: Triton's select lowering mistypes scalar int operands
    # (i1 vs i32 at lowering time). mid <= n_q, so a max does the same.
    mid = _imax(mid, pad_in_block.astype(jnp.int32) * n_q)
  zeros = jnp.zeros((bk, head_dim), jnp.float32)
  carry = lax.fori_loop(lo, mid, functools.partial(body, masked=True), (zeros, zeros))
  dk, dv = lax.fori_loop(mid, n_q, functools.partial(body, masked=False), carry)
  # Scores were scaled by scale * log2(e); the chain rule wants the natural scale.
  dk_ref[...] = (dk * (cfg.scale / _LOG2E)).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(*refs, cfg: _Config, has_segments: bool):
  if has_segments:
    (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qs_ref, ks_ref,
     dq_ref) = refs
  else:
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref = refs
    qs_ref = ks_ref = None
  bq, bk = cfg.block_q_dq, cfg.block_kv_dq
  head_dim = q_ref.shape[-1]
  i = pl.program_id(0)
  q = q_ref[...]
  do = do_ref[...]
  lse = lse_ref[...]
  delta = delta_ref[...]
  q_pos = i * bq + jnp.arange(bq)
  q_ids = qs_ref[...] if has_segments else None

  def body(j, dq, masked):
    cols = pl.ds(j * bk, bk)
    k = k_ref[cols, :]
    v = v_ref[cols, :]
    s = lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32) * cfg.scale
    if masked:
      kv_ids = ks_ref[cols] if has_segments else None
      mask = _mask(cfg, q_pos, j * bk + jnp.arange(bk), q_ids, kv_ids)
      s = jnp.where(mask, s, MASK_VALUE)
    p = jnp.exp2(s - lse[:, None])
    if masked:
      p = jnp.where(mask, p, 0.0)
    dp = lax.dot_general(do, v, _NT, preferred_element_type=jnp.float32)
    ds = p * (dp - delta[:, None])
    return dq + jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

  mid, hi = _kv_block_range(cfg, i, bq, bk, has_segments)
  dq = jnp.zeros((bq, head_dim), jnp.float32)
  dq = lax.fori_loop(0, mid, functools.partial(body, masked=False), dq)
  dq = lax.fori_loop(mid, hi, functools.partial(body, masked=True), dq)
  dq_ref[...] = (dq * (cfg.scale / _LOG2E)).astype(dq_ref.dtype)


def _backward(cfg: _Config, q, k, v, q_ids, kv_ids, o, lse, do):
  batch, tq, heads, d = q.shape
  tk, kv_heads = k.shape[1], k.shape[2]
  g = cfg.groups
  has_segments = q_ids is not None
  # [batch, heads, tq]; rows that saw no key have o == 0, hence delta == 0.
  delta = jnp.einsum("bthd,bthd->bht", o.astype(jnp.float32), do.astype(jnp.float32))
  params = _compiler_params(cfg, d)

  # dk, dv: one kv block per program.
  bq, bk = cfg.block_q_dkv, cfg.block_kv_dkv
  full_q = lambda j, b, h: (b, 0, h, 0)
  in_specs = [
      pl.BlockSpec((None, tq, None, d), full_q),
      pl.BlockSpec((None, bk, None, d), lambda j, b, h: (b, j, h // g, 0)),
      pl.BlockSpec((None, bk, None, d), lambda j, b, h: (b, j, h // g, 0)),
      pl.BlockSpec((None, tq, None, d), full_q),
      pl.BlockSpec((None, None, tq), lambda j, b, h: (b, h, 0)),
      pl.BlockSpec((None, None, tq), lambda j, b, h: (b, h, 0)),
  ]
  args = [q, k, v, do, lse, delta]
  if has_segments:
    in_specs += [pl.BlockSpec((None, tq), lambda j, b, h: (b, 0)),
                 pl.BlockSpec((None, bk), lambda j, b, h: (b, j))]
    args += [q_ids, kv_ids]
  # Per query head; float32 when a group is summed afterwards.
  dkv_dtype = jnp.float32 if g > 1 else k.dtype
  dkv_shape = jax.ShapeDtypeStruct((batch, tk, heads, d), dkv_dtype)
  dkv_spec = pl.BlockSpec((None, bk, None, d), lambda j, b, h: (b, j, h, 0))
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, cfg=cfg, has_segments=has_segments),
      grid=(tk // bk, batch, heads), in_specs=in_specs,
      out_specs=[dkv_spec, dkv_spec], out_shape=[dkv_shape, dkv_shape],
      compiler_params=params, interpret=cfg.interpret, name="datong_flash_dkv",
  )(*args)
  if g > 1:
    dk = dk.reshape(batch, tk, kv_heads, g, d).sum(axis=3).astype(k.dtype)
    dv = dv.reshape(batch, tk, kv_heads, g, d).sum(axis=3).astype(v.dtype)

  # dq: one q block per program.
  bq, bk = cfg.block_q_dq, cfg.block_kv_dq
  q_block = lambda i, b, h: (b, i, h, 0)
  in_specs = [
      pl.BlockSpec((None, bq, None, d), q_block),
      pl.BlockSpec((None, tk, None, d), lambda i, b, h: (b, 0, h // g, 0)),
      pl.BlockSpec((None, tk, None, d), lambda i, b, h: (b, 0, h // g, 0)),
      pl.BlockSpec((None, bq, None, d), q_block),
      pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i)),
      pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i)),
  ]
  args = [q, k, v, do, lse, delta]
  if has_segments:
    in_specs += [pl.BlockSpec((None, bq), lambda i, b, h: (b, i)),
                 pl.BlockSpec((None, tk), lambda i, b, h: (b, 0))]
    args += [q_ids, kv_ids]
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, cfg=cfg, has_segments=has_segments),
      grid=(tq // bq, batch, heads), in_specs=in_specs,
      out_specs=pl.BlockSpec((None, bq, None, d), q_block),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=params, interpret=cfg.interpret, name="datong_flash_dq",
  )(*args)
  return dq, dk, dv


# Forward keeps the log-sum-exp residual; the backward recomputes probabilities from it.
_flash = flash_with_vjp(_forward, _backward)


def _shrink(block: int, length: int) -> int:
  return min(block, max(MIN_BLOCK, next_power_of_two(length)))


def flash_attention(q, k, v, *, causal: bool = False, q_segment_ids=None,
                    kv_segment_ids=None, scale: Optional[float] = None,
                    block_sizes: Optional[BlockSizes] = None,
                    num_warps: Optional[int] = None, num_stages: int = 2,
                    interpret: bool = False) -> jax.Array:
  """Flash attention on GPU (Pallas Triton); semantics of ``datong.ops.attention``.

  Args:
    q: ``[batch, q_length, heads, head_dim]``, float32 or bfloat16.
    k, v: ``[batch, kv_length, kv_heads, head_dim]``; ``heads % kv_heads == 0``.
    causal: query ``i`` sees key ``j`` iff ``j <= i``.
    q_segment_ids, kv_segment_ids: ``[batch, length]`` ints; equal ids attend.
    scale: logits scale, default ``head_dim ** -0.5``.
    block_sizes: powers of two; shrunk for short sequences (min 16).
    num_warps, num_stages: Triton launch parameters (default by head_dim).
    interpret: run in Pallas interpret mode (any backend).
  Returns:
    ``[batch, q_length, heads, head_dim]`` in q's dtype. Rows that see no key
    are zeros with zero gradient.
  """
  check_inputs(q, k, v, q_segment_ids, kv_segment_ids)
  block_sizes = block_sizes or DEFAULT_BLOCK_SIZES
  block_sizes.validate(power_of_two=True)
  batch, q_len, heads, head_dim = q.shape
  kv_len, kv_heads = k.shape[1], k.shape[2]
  if head_dim > 256:
    raise ValueError(f"flash_attention supports head_dim <= 256; got {head_dim}.")
  scale = head_dim ** -0.5 if scale is None else float(scale)

  bq, bq_dkv, bq_dq = (_shrink(b, q_len) for b in
                       (block_sizes.block_q, block_sizes.block_q_dkv, block_sizes.block_q_dq))
  bk, bk_dkv, bk_dq = (_shrink(b, kv_len) for b in
                       (block_sizes.block_kv, block_sizes.block_kv_dkv, block_sizes.block_kv_dq))
  tq = padded_length(q_len, (bq, bq_dkv, bq_dq))
  tk = padded_length(kv_len, (bk, bk_dkv, bk_dq))
  d = padded_head_dim(head_dim)
  cfg = _Config(scale=scale * _LOG2E, causal=bool(causal), q_len=q_len, kv_len=kv_len,
                groups=heads // kv_heads, block_q=bq, block_kv=bk,
                block_q_dkv=bq_dkv, block_kv_dkv=bk_dkv, block_q_dq=bq_dq,
                block_kv_dq=bk_dq, num_warps=num_warps, num_stages=num_stages,
                interpret=bool(interpret))

  qp = pad_axis(pad_axis(q, 1, tq), 3, d)
  kp = pad_axis(pad_axis(k, 1, tk), 3, d)
  vp = pad_axis(pad_axis(v, 1, tk), 3, d)
  q_ids = kv_ids = None
  if q_segment_ids is not None:
    q_ids = pad_axis(q_segment_ids.astype(jnp.int32), 1, tq)
    kv_ids = pad_axis(kv_segment_ids.astype(jnp.int32), 1, tk)
  out = _flash(cfg, qp, kp, vp, q_ids, kv_ids)
  return out[:, :q_len, :, :head_dim]

"""Flash attention for TPUs in Pallas (Mosaic TPU lowering).

Inputs are transposed to ``[batch, heads, length, head_dim]`` so every block's
last two dims are (sequence, head_dim) tiles. Three kernels, each with the
reduction axis last in the grid (``"arbitrary"``) and float32 accumulators in
VMEM scratch:

* forward, grid ``(batch, heads, q_blocks, kv_blocks)``: online softmax with
  running max ``m``, sum ``l`` and output ``acc``; writes the output and the
  natural log-sum-exp per row;
* dk/dv, grid ``(batch, heads, kv_blocks, q_blocks)``: per *query* head in
  float32, summed over each group of grouped-query heads by the wrapper;
* dq, grid ``(batch, heads, q_blocks, kv_blocks)``.

Causal blocks entirely above the diagonal are skipped with ``pl.when`` and
their index maps repeat the previous block index, so Pallas issues no DMA for
them. Only blocks that cut the diagonal, hold padded keys, or whenever segment
ids are given, pay for the mask.

Per-row statistics (``m``, ``l``, log-sum-exp, ``delta``) are broadcast across
128 lanes, as in jax's own TPU kernels, to keep Mosaic layouts native.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from datong.ops.pallas._common import (MASK_VALUE, BlockSizes, cdiv, check_inputs, flash_with_vjp,
                                       pad_axis, padded_length, round_up)

LANES = 128
SUBLANES = 8
_NT = (((1,), (1,)), ((), ()))  # a @ b.T

DEFAULT_BLOCK_SIZES = BlockSizes(block_q=512, block_kv=512, block_q_dkv=512,
                                 block_kv_dkv=512, block_q_dq=512, block_kv_dq=512)


def padded_head_dim(head_dim: int) -> int:
  """A multiple of the 128-lane width (HBM tiles pad to it anyway)."""
  return round_up(head_dim, LANES)


def default_interpret():
  """The most faithful CPU stand-in for a TPU available in this jax."""
  params = getattr(pltpu, "InterpretParams", None)
  return params() if params is not None else True


@dataclasses.dataclass(frozen=True)
class _Config:
  scale: float
  causal: bool
  q_len: int
  kv_len: int
  groups: int
  block_q: int
  block_kv: int
  block_q_dkv: int
  block_kv_dkv: int
  block_q_dq: int
  block_kv_dq: int
  interpret: object  # False, True or pltpu.InterpretParams (hashable)


def _head_group(h, groups: int):
  """The kv head query head ``h`` reads. ``lax.div`` (truncating, equal to
  floor for h >= 0) rather than ``//``: jnp's floor division emits a ``sign``
  whose Mosaic lowering asks for the TPU generation, which fails when lowering
  ahead of time on a machine without a TPU."""
  return h if groups == 1 else lax.div(h, jnp.int32(groups))


def _ceil_div(a, b: int):
  return lax.div(a + (b - 1), jnp.int32(b))


def _kv_blocks(cfg: _Config, qi, bq: int, bk: int, has_segments: bool):
  """For q block ``qi``: (blocks to run ``[0, hi)``, first block needing a mask)."""
  n_kv = cdiv(cfg.kv_len, bk)
  hi = jnp.minimum(_ceil_div((qi + 1) * bq, bk), n_kv) if cfg.causal else jnp.int32(n_kv)
  if has_segments:
    return hi, jnp.int32(0)
  full = jnp.int32(cfg.kv_len // bk)
  if cfg.causal:
    full = jnp.minimum(full, lax.div(qi * bq + 1, jnp.int32(bk)))
  return hi, full


def _q_blocks(cfg: _Config, kj, bq: int, bk: int):
  """For kv block ``kj``: (first q block, first unmasked q block, end)."""
  n_q = jnp.int32(cdiv(cfg.q_len, bq))
  if cfg.causal:
    lo = jnp.minimum(lax.div(kj * bk, jnp.int32(bq)), n_q)
    mid = jnp.maximum(lo, jnp.minimum(_ceil_div((kj + 1) * bk - 1, bq), n_q))
  else:
    lo = mid = jnp.int32(0)
  if cfg.kv_len % bk:
    mid = jnp.where((kj + 1) * bk > cfg.kv_len, n_q, mid)
  return lo, mid, n_q


def _mask(cfg: _Config, shape, q_start, k_start, qs_ref, ks_ref):
  mask = None

  def _and(a, b):
    return b if a is None else jnp.logical_and(a, b)

  k_pos = k_start + lax.broadcasted_iota(jnp.int32, shape, 1)
  if cfg.causal:
    q_pos = q_start + lax.broadcasted_iota(jnp.int32, shape, 0)
    mask = _and(mask, k_pos <= q_pos)
  if cfg.kv_len % cfg.block_kv or cfg.kv_len % cfg.block_kv_dkv or cfg.kv_len % cfg.block_kv_dq:
    mask = _and(mask, k_pos < cfg.kv_len)
  if qs_ref is not None:
    # q ids come lane-broadcast [bq, 128], kv ids sublane-broadcast [8, bk].
    mask = _and(mask, qs_ref[:, :1] == ks_ref[:1, :])
  if mask is None:
    mask = jnp.ones(shape, jnp.bool_)
  return mask


def _split(refs, n_inputs: int, has_segments: bool):
  if has_segments:
    inputs = refs[:n_inputs + 2]
    return inputs[:n_inputs], inputs[n_inputs], inputs[n_inputs + 1], refs[n_inputs + 2:]
  return refs[:n_inputs], None, None, refs[n_inputs:]


# ---------------------------------------------------------------- forward


def _fwd_kernel(*refs, cfg: _Config, has_segments: bool):
  (q_ref, k_ref, v_ref), qs_ref, ks_ref, rest = _split(refs, 3, has_segments)
  o_ref, lse_ref, m_ref, l_ref, acc_ref = rest
  bq, bk = cfg.block_q, cfg.block_kv
  qi, kj = pl.program_id(2), pl.program_id(3)

  @pl.when(kj == 0)
  def _init():
    m_ref[...] = jnp.full(m_ref.shape, MASK_VALUE, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  def step(masked: bool):
    q = q_ref[...]
    k = k_ref[...]
    s = lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32) * cfg.scale
    if masked:
      mask = _mask(cfg, (bq, bk), qi * bq, kj * bk, qs_ref, ks_ref)
      s = jnp.where(mask, s, MASK_VALUE)
    m_prev = m_ref[...]  # [bq, 128], all lanes equal
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    alpha = jnp.exp(m_prev - m_next)
    p = jnp.exp(s - m_next[:, :1])
    if masked:  # a row with nothing visible yet must keep l == 0
      p = jnp.where(mask, p, 0.0)
    l_ref[...] = alpha * l_ref[...] + jnp.sum(p, axis=1, keepdims=True)
    m_ref[...] = m_next
    v = v_ref[...]
    acc_ref[...] = acc_ref[...] * alpha[:, :1] + jnp.dot(
        p.astype(v.dtype), v, preferred_element_type=jnp.float32)

  hi, full = _kv_blocks(cfg, qi, bq, bk, has_segments)
  pl.when(kj < jnp.minimum(full, hi))(lambda: step(False))
  pl.when(jnp.logical_and(kj >= full, kj < hi))(lambda: step(True))

  @pl.when(kj == pl.num_programs(3) - 1)
  def _store():
    l = l_ref[...]
    l_safe = jnp.where(l == 0.0, 1.0, l)  # rows that saw no key output 0
    o_ref[...] = (acc_ref[...] / l_safe[:, :1]).astype(o_ref.dtype)
    lse_ref[...] = m_ref[...] + jnp.log(l_safe)


def _segment_specs(q_ids, kv_ids, bq, bk, q_index, kv_index):
  """Lane/sublane-broadcast segment ids and their BlockSpecs."""
  batch, tq = q_ids.shape
  tk = kv_ids.shape[1]
  q_b = jnp.broadcast_to(q_ids[:, :, None], (batch, tq, LANES))
  kv_b = jnp.broadcast_to(kv_ids[:, None, :], (batch, SUBLANES, tk))
  specs = [pl.BlockSpec((None, bq, LANES), q_index),
           pl.BlockSpec((None, SUBLANES, bk), kv_index)]
  return [q_b, kv_b], specs


def _forward(cfg: _Config, q, k, v, q_ids, kv_ids):
  batch, heads, tq, d = q.shape
  tk = k.shape[2]
  bq, bk, g = cfg.block_q, cfg.block_kv, cfg.groups
  has_segments = q_ids is not None

  def kv_block(qi, kj):
    # Skipped blocks repeat the last block used, so no DMA is issued for them.
    hi, _ = _kv_blocks(cfg, qi, bq, bk, has_segments)
    return jnp.minimum(kj, jnp.maximum(hi - 1, 0))

  in_specs = [
      pl.BlockSpec((None, None, bq, d), lambda b, h, i, j: (b, h, i, 0)),
      pl.BlockSpec((None, None, bk, d), lambda b, h, i, j: (b, _head_group(h, g), kv_block(i, j), 0)),
      pl.BlockSpec((None, None, bk, d), lambda b, h, i, j: (b, _head_group(h, g), kv_block(i, j), 0)),
  ]
  args = [q, k, v]
  if has_segments:
    seg_args, seg_specs = _segment_specs(
        q_ids, kv_ids, bq, bk, lambda b, h, i, j: (b, i, 0),
        lambda b, h, i, j: (b, 0, kv_block(i, j)))
    args += seg_args
    in_specs += seg_specs
  out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype),
               jax.ShapeDtypeStruct((batch, heads, tq, LANES), jnp.float32)]
  out_specs = [pl.BlockSpec((None, None, bq, d), lambda b, h, i, j: (b, h, i, 0)),
               pl.BlockSpec((None, None, bq, LANES), lambda b, h, i, j: (b, h, i, 0))]
  o, lse = pl.pallas_call(
      functools.partial(_fwd_kernel, cfg=cfg, has_segments=has_segments),
      grid=(batch, heads, tq // bq, tk // bk),
      in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      scratch_shapes=[pltpu.VMEM((bq, LANES), jnp.float32),
                      pltpu.VMEM((bq, LANES), jnp.float32),
                      pltpu.VMEM((bq, d), jnp.float32)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      interpret=cfg.interpret, name="datong_flash_fwd_tpu",
  )(*args)
  return o, lse


# ---------------------------------------------------------------- backward


def _dkv_kernel(*refs, cfg: _Config, has_segments: bool):
  (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref), qs_ref, ks_ref, rest = _split(
      refs, 6, has_segments)
  dk_ref, dv_ref, dk_acc, dv_acc = rest
  bq, bk = cfg.block_q_dkv, cfg.block_kv_dkv
  kj, qi = pl.program_id(2), pl.program_id(3)

  @pl.when(qi == 0)
  def _init():
    dk_acc[...] = jnp.zeros(dk_acc.shape, jnp.float32)
    dv_acc[...] = jnp.zeros(dv_acc.shape, jnp.float32)

  def step(masked: bool):
    q = q_ref[...]
    do = do_ref[...]
    s = lax.dot_general(q, k_ref[...], _NT, preferred_element_type=jnp.float32) * cfg.scale
    if masked:
      mask = _mask(cfg, (bq, bk), qi * bq, kj * bk, qs_ref, ks_ref)
      s = jnp.where(mask, s, MASK_VALUE)
    p = jnp.exp(s - lse_ref[:, :1])
    if masked:
      p = jnp.where(mask, p, 0.0)
    # Transpose, then a plain matmul: the form Mosaic is known to lower.
    dv_acc[...] += lax.dot(p.T.astype(do.dtype), do, preferred_element_type=jnp.float32)
    dp = lax.dot_general(do, v_ref[...], _NT, preferred_element_type=jnp.float32)
    ds = p * (dp - delta_ref[:, :1])
    dk_acc[...] += lax.dot(ds.T.astype(q.dtype), q, preferred_element_type=jnp.float32)

  lo, mid, hi = _q_blocks(cfg, kj, bq, bk)
  if has_segments:
    mid = hi
  pl.when(jnp.logical_and(qi >= lo, qi < mid))(lambda: step(True))
  pl.when(jnp.logical_and(qi >= mid, qi < hi))(lambda: step(False))

  @pl.when(qi == pl.num_programs(3) - 1)
  def _store():
    dk_ref[...] = (dk_acc[...] * cfg.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


def _dq_kernel(*refs, cfg: _Config, has_segments: bool):
  (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref), qs_ref, ks_ref, rest = _split(
      refs, 6, has_segments)
  dq_ref, dq_acc = rest
  bq, bk = cfg.block_q_dq, cfg.block_kv_dq
  qi, kj = pl.program_id(2), pl.program_id(3)

  @pl.when(kj == 0)
  def _init():
    dq_acc[...] = jnp.zeros(dq_acc.shape, jnp.float32)

  def step(masked: bool):
    k = k_ref[...]
    s = lax.dot_general(q_ref[...], k, _NT, preferred_element_type=jnp.float32) * cfg.scale
    if masked:
      mask = _mask(cfg, (bq, bk), qi * bq, kj * bk, qs_ref, ks_ref)
      s = jnp.where(mask, s, MASK_VALUE)
    p = jnp.exp(s - lse_ref[:, :1])
    if masked:
      p = jnp.where(mask, p, 0.0)
    dp = lax.dot_general(do_ref[...], v_ref[...], _NT, preferred_element_type=jnp.float32)
    ds = p * (dp - delta_ref[:, :1])
    dq_acc[...] += jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

  hi, full = _kv_blocks(cfg, qi, bq, bk, has_segments)
  pl.when(kj < jnp.minimum(full, hi))(lambda: step(False))
  pl.when(jnp.logical_and(kj >= full, kj < hi))(lambda: step(True))

  @pl.when(kj == pl.num_programs(3) - 1)
  def _store():
    dq_ref[...] = (dq_acc[...] * cfg.scale).astype(dq_ref.dtype)


def _backward(cfg: _Config, q, k, v, q_ids, kv_ids, o, lse, do):
  batch, heads, tq, d = q.shape
  kv_heads, tk = k.shape[1], k.shape[2]
  g = cfg.groups
  has_segments = q_ids is not None
  delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)
  delta = jnp.broadcast_to(delta[..., None], (batch, heads, tq, LANES))
  semantics = pltpu.CompilerParams(
      dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"))

  # dk, dv: grid (batch, heads, kv_blocks, q_blocks).
  bq, bk = cfg.block_q_dkv, cfg.block_kv_dkv

  def q_block(kj, qi):
    lo, _, hi = _q_blocks(cfg, kj, bq, bk)
    return jnp.clip(qi, lo, jnp.maximum(hi - 1, lo))

  row_spec = lambda width: pl.BlockSpec(
      (None, None, bq, width), lambda b, h, j, i: (b, h, q_block(j, i), 0))
  kv_spec = pl.BlockSpec((None, None, bk, d), lambda b, h, j, i: (b, _head_group(h, g), j, 0))
  in_specs = [row_spec(d), kv_spec, kv_spec, row_spec(d), row_spec(LANES), row_spec(LANES)]
  args = [q, k, v, do, lse, delta]
  if has_segments:
    seg_args, seg_specs = _segment_specs(
        q_ids, kv_ids, bq, bk, lambda b, h, j, i: (b, q_block(j, i), 0),
        lambda b, h, j, i: (b, 0, j))
    args += seg_args
    in_specs += seg_specs
  dkv_dtype = jnp.float32 if g > 1 else k.dtype
  dkv_shape = jax.ShapeDtypeStruct((batch, heads, tk, d), dkv_dtype)
  dkv_spec = pl.BlockSpec((None, None, bk, d), lambda b, h, j, i: (b, h, j, 0))
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, cfg=cfg, has_segments=has_segments),
      grid=(batch, heads, tk // bk, tq // bq),
      in_specs=in_specs, out_specs=[dkv_spec, dkv_spec], out_shape=[dkv_shape, dkv_shape],
      scratch_shapes=[pltpu.VMEM((bk, d), jnp.float32), pltpu.VMEM((bk, d), jnp.float32)],
      compiler_params=semantics, interpret=cfg.interpret, name="datong_flash_dkv_tpu",
  )(*args)
  if g > 1:
    dk = dk.reshape(batch, kv_heads, g, tk, d).sum(axis=2).astype(k.dtype)
    dv = dv.reshape(batch, kv_heads, g, tk, d).sum(axis=2).astype(v.dtype)

  # dq: grid (batch, heads, q_blocks, kv_blocks).
  bq, bk = cfg.block_q_dq, cfg.block_kv_dq

  def kv_block(qi, kj):
    hi, _ = _kv_blocks(cfg, qi, bq, bk, has_segments)
    return jnp.minimum(kj, jnp.maximum(hi - 1, 0))

  row_spec = lambda width: pl.BlockSpec(
      (None, None, bq, width), lambda b, h, i, j: (b, h, i, 0))
  kv_spec = pl.BlockSpec((None, None, bk, d), lambda b, h, i, j: (b, _head_group(h, g), kv_block(i, j), 0))
  in_specs = [row_spec(d), kv_spec, kv_spec, row_spec(d), row_spec(LANES), row_spec(LANES)]
  args = [q, k, v, do, lse, delta]
  if has_segments:
    seg_args, seg_specs = _segment_specs(
        q_ids, kv_ids, bq, bk, lambda b, h, i, j: (b, i, 0),
        lambda b, h, i, j: (b, 0, kv_block(i, j)))
    args += seg_args
    in_specs += seg_specs
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, cfg=cfg, has_segments=has_segments),
      grid=(batch, heads, tq // bq, tk // bk),
      in_specs=in_specs, out_specs=row_spec(d),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      scratch_shapes=[pltpu.VMEM((bq, d), jnp.float32)],
      compiler_params=semantics, interpret=cfg.interpret, name="datong_flash_dq_tpu",
  )(*args)
  return dq, dk, dv


# Forward keeps the log-sum-exp residual; the backward recomputes probabilities from it.
_flash = flash_with_vjp(_forward, _backward)


def _axis_blocks(blocks: tuple[int, ...], length: int) -> tuple[int, tuple[int, ...]]:
  """(padded length, effective blocks) for one sequence axis.

  Blocks shorter than the (8-row padded) sequence are kept and the length is
  padded to a multiple of all of them; longer ones become one block spanning
  the whole padded axis, which Mosaic accepts whatever its size.
  """
  rows = round_up(max(length, 1), SUBLANES)
  kept = tuple(b for b in blocks if b < rows)
  padded = padded_length(rows, kept) if kept else rows
  return padded, tuple(b if b < rows else padded for b in blocks)


def flash_attention(q, k, v, *, causal: bool = False, q_segment_ids=None,
                    kv_segment_ids=None, scale: Optional[float] = None,
                    block_sizes: Optional[BlockSizes] = None,
                    interpret=False) -> jax.Array:
  """Flash attention on TPU (Pallas Mosaic); semantics of ``datong.ops.attention``.

  Args:
    q: ``[batch, q_length, heads, head_dim]``, float32 or bfloat16.
    k, v: ``[batch, kv_length, kv_heads, head_dim]``; ``heads % kv_heads == 0``.
    causal: query ``i`` sees key ``j`` iff ``j <= i``.
    q_segment_ids, kv_segment_ids: ``[batch, length]`` ints; equal ids attend.
    scale: logits scale, default ``head_dim ** -0.5``.
    block_sizes: multiples of 128 (of 8 when interpreting); a sequence
      shorter than a block becomes a single block.
    interpret: False on TPU; True or ``pltpu.InterpretParams()`` elsewhere.
  Returns:
    ``[batch, q_length, heads, head_dim]`` in q's dtype.
  """
  check_inputs(q, k, v, q_segment_ids, kv_segment_ids)
  block_sizes = block_sizes or DEFAULT_BLOCK_SIZES
  # Mosaic wants 128-multiples; the interpreter takes any 8-row tile, which
  # lets CPU tests cover several blocks on tiny shapes.
  block_sizes.validate(power_of_two=False, multiple_of=SUBLANES if interpret else LANES)
  batch, q_len, heads, head_dim = q.shape
  kv_len, kv_heads = k.shape[1], k.shape[2]
  if head_dim > 256:
    raise ValueError(f"flash_attention supports head_dim <= 256; got {head_dim}.")
  scale = head_dim ** -0.5 if scale is None else float(scale)

  tq, (bq, bq_dkv, bq_dq) = _axis_blocks(
      (block_sizes.block_q, block_sizes.block_q_dkv, block_sizes.block_q_dq), q_len)
  tk, (bk, bk_dkv, bk_dq) = _axis_blocks(
      (block_sizes.block_kv, block_sizes.block_kv_dkv, block_sizes.block_kv_dq), kv_len)
  d = padded_head_dim(head_dim)
  cfg = _Config(scale=scale, causal=bool(causal), q_len=q_len, kv_len=kv_len,
                groups=heads // kv_heads, block_q=bq, block_kv=bk,
                block_q_dkv=bq_dkv, block_kv_dkv=bk_dkv, block_q_dq=bq_dq,
                block_kv_dq=bk_dq, interpret=interpret)

  def prep(x, length):  # [b, t, h, d] -> padded [b, h, t', d']
    return jnp.swapaxes(pad_axis(pad_axis(x, 1, length), 3, d), 1, 2)

  q_ids = kv_ids = None
  if q_segment_ids is not None:
    q_ids = pad_axis(q_segment_ids.astype(jnp.int32), 1, tq)
    kv_ids = pad_axis(kv_segment_ids.astype(jnp.int32), 1, tk)
  out = _flash(cfg, prep(q, tq), prep(k, tk), prep(v, tk), q_ids, kv_ids)
  return jnp.swapaxes(out, 1, 2)[:, :q_len, :, :head_dim]

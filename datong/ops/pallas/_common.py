"""Pieces shared by the GPU and TPU flash-attention kernels.

Both kernels work on inputs padded in plain JAX before the ``pallas_call``:
lengths up to a multiple of every block size used along that axis, head_dim up
to a size the hardware likes. Padding is zeros; padded keys are masked inside
the kernels (static ``kv_len``), padded queries are computed and sliced off.
Autodiff of the pad and slice gives the right gradients for free.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import threading
from typing import Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np

# A finite "minus infinity": exp(MASK - MASK) stays finite, which keeps the
# online-softmax correction factor free of NaN for rows fully masked so far.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)

SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
MAX_HEAD_DIM = 256

_state = threading.local()


def interpret_enabled() -> bool:
  """True inside ``interpret_mode(True)`` or with ``DATONG_PALLAS_INTERPRET=1``."""
  value = getattr(_state, "interpret", None)
  if value is not None:
    return value
  return os.environ.get("DATONG_PALLAS_INTERPRET", "0").lower() in ("1", "true", "yes")


@contextlib.contextmanager
def interpret_mode(enabled: bool = True) -> Iterator[None]:
  """Run the Pallas kernels in interpret mode (any backend, e.g. CPU tests).

  Read when a call is traced: a function jitted inside the context keeps the
  mode it was traced with.
  """
  previous = getattr(_state, "interpret", None)
  _state.interpret = bool(enabled)
  try:
    yield
  finally:
    _state.interpret = previous


def lowering_target() -> Optional[str]:
  """The platform set by ``lowering_for``, or None."""
  return getattr(_state, "target", None)


@contextlib.contextmanager
def lowering_for(platform: Optional[str]) -> Iterator[None]:
  """Trace the kernels for ``platform`` ("gpu" or "tpu") whatever the backend.

  For ahead-of-time lowering on another machine, e.g. on a CPU:

      with lowering_for("tpu"):
        exported = jax.export.export(jax.jit(step), platforms=("tpu",))(*args)

  Inside, ``pallas_<platform>`` serves calls it supports with the real
  (compiled, not interpreted) kernel although the default backend differs;
  the other platform's kernel still falls back. Like ``interpret_mode`` it
  is read at trace time. ``None`` turns it off.
  """
  if platform not in (None, "gpu", "tpu"):
    raise ValueError(f"lowering_for({platform!r}): expected 'gpu', 'tpu' or None.")
  previous = getattr(_state, "target", None)
  _state.target = platform
  try:
    yield
  finally:
    _state.target = previous


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes along the sequence axes (rows of q, rows of k/v).

  ``block_q``/``block_kv``: forward kernel. ``*_dkv``: the kernel computing
  dk, dv (one kv block per program, loops over q). ``*_dq``: the kernel
  computing dq (one q block per program, loops over kv). Blocks larger than a
  (short) sequence are shrunk to fit it.
  """
  block_q: int = 128
  block_kv: int = 64
  block_q_dkv: int = 64
  block_kv_dkv: int = 64
  block_q_dq: int = 64
  block_kv_dq: int = 64

  def validate(self, *, power_of_two: bool, multiple_of: int = 1):
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      if not isinstance(value, int) or value <= 0:
        raise ValueError(f"BlockSizes.{field.name} must be a positive int; got {value!r}.")
      if power_of_two and value & (value - 1):
        raise ValueError(f"BlockSizes.{field.name} must be a power of two; got {value}.")
      if value % multiple_of:
        raise ValueError(
            f"BlockSizes.{field.name} must be a multiple of {multiple_of}; got {value}.")


def cdiv(a: int, b: int) -> int:
  return -(-a // b)


def round_up(a: int, b: int) -> int:
  return cdiv(a, b) * b


def next_power_of_two(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


def pad_axis(x: Optional[jax.Array], axis: int, size: int) -> Optional[jax.Array]:
  """Zero-pads ``x`` along ``axis`` up to ``size`` (no-op when already there)."""
  if x is None or x.shape[axis] == size:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, widths)


def padded_length(length: int, blocks: tuple[int, ...]) -> int:
  """``length`` rounded up to a multiple of every block size in ``blocks``."""
  return round_up(max(length, 1), math.lcm(*blocks))


def check_inputs(q, k, v, q_segment_ids, kv_segment_ids):
  """ValueError with a clear message for malformed inputs."""
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(
        "flash attention expects q [batch, q_length, heads, head_dim] and k, v "
        f"[batch, kv_length, kv_heads, head_dim]; got q{q.shape} k{k.shape} v{v.shape}.")
  if k.shape != v.shape:
    raise ValueError(f"k and v must have the same shape; got k{k.shape} v{v.shape}.")
  if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
    raise ValueError(f"q and k must agree on batch and head_dim; got q{q.shape} k{k.shape}.")
  if k.shape[2] == 0 or q.shape[2] % k.shape[2]:
    raise ValueError(
        f"heads ({q.shape[2]}) must be a multiple of kv_heads ({k.shape[2]}).")
  if not (q.dtype == k.dtype == v.dtype):
    raise ValueError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}.")
  if (q_segment_ids is None) != (kv_segment_ids is None):
    raise ValueError("Pass both q_segment_ids and kv_segment_ids, or neither.")
  if q_segment_ids is not None:
    if (q_segment_ids.shape != (q.shape[0], q.shape[1])
        or kv_segment_ids.shape != (k.shape[0], k.shape[1])):
      raise ValueError(
          f"segment ids must be [batch, length]: q_segment_ids{q_segment_ids.shape} "
          f"for q{q.shape}, kv_segment_ids{kv_segment_ids.shape} for k{k.shape}.")
    for name, ids in (("q_segment_ids", q_segment_ids), ("kv_segment_ids", kv_segment_ids)):
      if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(f"{name} must be integers; got {ids.dtype}.")


def capability_reason(q, k, v) -> Optional[str]:
  """Why neither kernel can serve these arrays, or None."""
  if q.dtype not in SUPPORTED_DTYPES:
    return f"the Pallas kernels support float32 and bfloat16 inputs; got {q.dtype}"
  if not (q.dtype == k.dtype == v.dtype):
    return f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}"
  head_dim = q.shape[-1]
  if head_dim > MAX_HEAD_DIM:
    return f"the Pallas kernels support head_dim <= {MAX_HEAD_DIM}; got {head_dim}"
  return None


def flash_with_vjp(forward, backward):
  """A ``custom_vjp`` flash attention ``f(cfg, q, k, v, q_ids, kv_ids)``.

  ``forward(cfg, q, k, v, q_ids, kv_ids) -> (out, lse)`` and
  ``backward(cfg, q, k, v, q_ids, kv_ids, out, lse, d_out) -> (dq, dk, dv)``;
  segment ids get no gradient.
  """
  @functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
  def flash(cfg, q, k, v, q_ids, kv_ids):
    return forward(cfg, q, k, v, q_ids, kv_ids)[0]

  def flash_fwd(cfg, q, k, v, q_ids, kv_ids):
    out, lse = forward(cfg, q, k, v, q_ids, kv_ids)
    return out, (q, k, v, q_ids, kv_ids, out, lse)

  def flash_bwd(cfg, residuals, d_out):
    q, k, v, q_ids, kv_ids, out, lse = residuals
    dq, dk, dv = backward(cfg, q, k, v, q_ids, kv_ids, out, lse, d_out)
    return dq, dk, dv, None, None

  flash.defvjp(flash_fwd, flash_bwd)
  return flash

"""Datong's Pallas flash-attention kernels behind one entry point.

``datong.ops.attention`` calls ``unsupported_reason`` to learn whether a
kernel can serve a call and ``attention`` to run it; semantics are those of
its module docstring. ``platform`` is ``"gpu"`` (Triton lowering, ``gpu.py``)
or ``"tpu"`` (Mosaic lowering, ``tpu.py``).

Off the matching backend the kernels refuse to run unless interpret mode is
on (``with interpret_mode(True):`` or ``DATONG_PALLAS_INTERPRET=1``): then
they run with Pallas' interpreter on any backend, which is how the CPU tests
exercise them. The TPU kernel interprets with ``pltpu.InterpretParams()``
(simulated TPU memory; slow, keep shapes tiny) where jax has it.

Inside ``lowering_for("gpu" | "tpu")`` that platform's kernel serves calls on
any backend, uninterpreted, so that a whole train step can be lowered ahead
of time for the accelerator (``jax.export`` with ``platforms=``) on a CPU
machine; ``tests/test_lowering.py`` does so.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax

from datong.ops.pallas import gpu, tpu
from datong.ops.pallas._common import (BlockSizes, capability_reason, check_inputs,
                                       interpret_enabled, interpret_mode, lowering_for,
                                       lowering_target)
from datong.ops.pallas.sharding import ambient_mesh, logical_to_mesh_axes, sharded_attention

__all__ = ["BlockSizes", "PLATFORMS", "attention", "interpret_enabled", "interpret_mode",
           "logical_to_mesh_axes", "lowering_for", "lowering_target", "unsupported_reason"]

PLATFORMS = ("gpu", "tpu")


def _backend_reason(platform: str) -> Optional[str]:
  target = lowering_target()
  if target is not None:
    if target != platform:
      return (f"lowering for {target} (datong.ops.pallas.lowering_for); the pallas_{platform} "
              "kernel is not lowered for it")
    if platform == "gpu" and gpu._plgpu is None:  # pylint: disable=protected-access
      return "this jax has no Pallas Triton backend (jax.experimental.pallas.triton)"
    return None
  if interpret_enabled():
    return None
  backend = jax.default_backend()
  if backend != platform:
    return (f"the pallas_{platform} kernel needs a {platform.upper()} backend; the default "
            f"backend is {backend} (use datong.ops.pallas.interpret_mode(True) or "
            "DATONG_PALLAS_INTERPRET=1 to interpret it)")
  if platform == "gpu" and gpu._plgpu is None:  # pylint: disable=protected-access
    return "this jax has no Pallas Triton backend (jax.experimental.pallas.triton)"
  return None


def unsupported_reason(platform, q, k, v, *, bias=None, mask=None, causal=False,
                       q_segment_ids=None, kv_segment_ids=None,
                       dropout_rate=0.0) -> Optional[str]:
  """Why the ``platform`` kernel cannot serve this call, or None if it can.

  Malformed inputs (mismatched segment ids, shapes) are not "unsupported":
  ``attention`` raises ValueError for them.
  """
  del causal, q_segment_ids, kv_segment_ids  # always supported
  if platform not in PLATFORMS:
    return f"unknown Pallas platform {platform!r}; expected one of {PLATFORMS}"
  if bias is not None:
    return "the Pallas flash kernels take no additive bias"
  if mask is not None:
    return ("the Pallas flash kernels take no dense mask; express masking with causal= "
            "and segment ids")
  if dropout_rate > 0:
    return "attention dropout is only implemented by the reference"
  reason = capability_reason(q, k, v)
  if reason is not None:
    return reason
  return _backend_reason(platform)


def attention(platform, q, k, v, *, causal=False, q_segment_ids=None, kv_segment_ids=None,
              scale=None, logical_rules=None, block_sizes: Optional[BlockSizes] = None):
  """Flash attention with the ``platform`` kernel.

  Args:
    platform: ``"gpu"`` or ``"tpu"``.
    q: ``[batch, q_length, heads, head_dim]``.
    k, v: ``[batch, kv_length, kv_heads, head_dim]``.
    causal, q_segment_ids, kv_segment_ids, scale: as ``datong.ops.attention``.
    logical_rules: flax-style ``((logical_name, mesh_axes), ...)``; with an
      ambient mesh the kernel runs under ``shard_map`` over batch and heads.
    block_sizes: kernel tile sizes (per-platform defaults).
  Returns:
    ``[batch, q_length, heads, head_dim]`` in q's dtype.
  """
  if platform not in PLATFORMS:
    raise ValueError(f"unknown Pallas platform {platform!r}; expected one of {PLATFORMS}.")
  check_inputs(q, k, v, q_segment_ids, kv_segment_ids)
  reason = capability_reason(q, k, v)
  if reason is not None:
    raise ValueError(f"pallas_{platform} cannot run this call: {reason}.")
  # Lowering for a target platform means the real kernels, never the interpreter.
  interpret = interpret_enabled() and lowering_target() is None
  if platform == "gpu":
    kernel_fn = functools.partial(gpu.flash_attention, interpret=interpret)
  else:
    kernel_fn = functools.partial(tpu.flash_attention,
                                  interpret=tpu.default_interpret() if interpret else False)
  scale = q.shape[-1] ** -0.5 if scale is None else scale

  def kernel(q, k, v, q_ids, kv_ids):
    return kernel_fn(q, k, v, causal=causal, q_segment_ids=q_ids, kv_segment_ids=kv_ids,
                     scale=scale, block_sizes=block_sizes)

  mesh = ambient_mesh() if logical_rules is not None else None
  if mesh is None:
    return kernel(q, k, v, q_segment_ids, kv_segment_ids)
  return sharded_attention(kernel, q, k, v, q_segment_ids, kv_segment_ids,
                           mesh=mesh, logical_rules=logical_rules)

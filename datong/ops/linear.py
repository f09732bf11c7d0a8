"""Activations times weight matrices, with a backward that XLA:CPU runs well.

``dense(x, kernel, in_dims)`` is ``jnp.tensordot`` of the last ``in_dims``
axes of ``x`` with the first ``in_dims`` axes of ``kernel``. Its gradient is
the same math as autodiff's, but autodiff's weight gradient contracts the
token axis of the output cotangent ``dy`` in a form that XLA:CPU lowers by
materializing ``dy`` transposed, fused with whatever produced it: in a GPT
block's MLP the GELU gradient was computed a second time, in transposed
order, at ~11 ns per element. Written as two plain matmuls over 2-D views,
``dx = dy[T, out] @ kernel[in, out]^T`` and ``dkernel = x[T, in]^T @ dy[T, out]``,
the backward needs no copy of ``dy`` (the only transposes left are of the
small kernel and of ``x`` folded into the matmul). On the CPU it gives
bitwise the same gradients (float32) and a GPT MLP's forward + backward
about 2x faster (BENCHMARKS.md, "Dense backward on CPU").

GPU and TPU compilers handle the transposed contraction natively, so the
custom backward is used on the CPU backend only (``matmul_grad=None``;
not inside ``pallas.lowering_for``, which lowers for an accelerator).
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp

from datong.ops.pallas._common import lowering_target


def _contract(x, kernel, in_dims: int):
  return jnp.tensordot(x, kernel, axes=(tuple(range(x.ndim - in_dims, x.ndim)),
                                        tuple(range(in_dims))))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _dense_matmul_grad(x, kernel, in_dims):
  return _contract(x, kernel, in_dims)


def _fwd(x, kernel, in_dims):
  return _contract(x, kernel, in_dims), (x, kernel)


def _bwd(in_dims, residuals, dy):
  x, kernel = residuals
  k_in = math.prod(kernel.shape[:in_dims])
  k_out = math.prod(kernel.shape[in_dims:])
  x2 = x.reshape(-1, k_in)  # [tokens, in]
  dy2 = dy.reshape(-1, k_out)  # [tokens, out]
  w2 = kernel.reshape(k_in, k_out)
  dx = jnp.dot(dy2, w2.T).reshape(x.shape)
  dkernel = jnp.dot(x2.T, dy2).reshape(kernel.shape)
  return dx.astype(x.dtype), dkernel.astype(kernel.dtype)


_dense_matmul_grad.defvjp(_fwd, _bwd)


def dense(x: jax.Array, kernel: jax.Array, in_dims: int = 1, *,
          matmul_grad: Optional[bool] = None) -> jax.Array:
  """``x[..., *in] @ kernel[*in, *out]`` -> ``[..., *out]``.

  Args:
    x: ``[..., *in]`` activations.
    kernel: ``[*in, *out]`` weights (same dtype as ``x`` for the custom backward).
    in_dims: how many trailing axes of ``x`` are contracted.
    matmul_grad: compute the backward as two 2-D matmuls (see the module
      docstring); None: on the CPU backend only. Forward-mode autodiff
      (``jax.jvp``) needs ``False``.
  """
  if matmul_grad is None:
    # Lowering ahead of time for an accelerator (pallas.lowering_for) counts
    # as that platform.
    matmul_grad = jax.default_backend() == "cpu" and lowering_target() is None
  if not matmul_grad or x.dtype != kernel.dtype:
    return _contract(x, kernel, in_dims)
  return _dense_matmul_grad(x, kernel, in_dims)

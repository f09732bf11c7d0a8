"""The optimizer from config: AdamW or Muon, warmup + decay, clipping, masks.

Every transform added here has either no state or params-shaped state, so
``sharding.plan_like_params`` can shard the optimizer state like the params.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from datong.train.config import OptimizerConfig


def schedule(config: OptimizerConfig, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0, then cosine / linear decay to ``end`` or constant."""
  peak = config.learning_rate
  end = peak * config.end_learning_rate_factor
  warmup = min(config.warmup_steps, total_steps)
  decay_steps = max(total_steps - warmup, 1)
  if config.schedule == "cosine":
    decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=config.end_learning_rate_factor)
  elif config.schedule == "linear":
    decay = optax.linear_schedule(peak, end, decay_steps)
  else:
    decay = optax.constant_schedule(peak)
  if warmup == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def _scale_leaves(scales) -> optax.GradientTransformation:
  """Multiply each leaf's update by a fixed per-leaf factor (layer-wise lr)."""
  def update(updates, state, params=None):
    del params
    return jax.tree.map(lambda u, s: u * jnp.asarray(s, u.dtype), updates, scales), state
  return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def only_trainable(tree, trainable):
  """``tree`` with the leaves that ``trainable`` marks False replaced by
  ``None`` (an empty subtree): the view of the params the optimizer sees."""
  if trainable is None or tree is None:
    return tree
  return jax.tree.map(lambda t, x: x if t else None, trainable, tree)


def _trainable_only(tx: optax.GradientTransformation, trainable) -> optax.GradientTransformation:
  """``tx`` on the trainable leaves alone: frozen leaves (a LiT tower, a
  teacher, an EMA copy) have no moments in the optimizer state, count in no
  gradient norm, and get a zero update, so ``p + 0`` leaves them bitwise
  unchanged."""
  def init(params):
    return tx.init(only_trainable(params, trainable))

  def update(updates, state, params=None):
    kept, state = tx.update(only_trainable(updates, trainable), state,
                            None if params is None else only_trainable(params, trainable))
    return jax.tree.map(lambda t, g, u: u if t else jnp.zeros_like(g),
                        trainable, updates, kept), state
  return optax.GradientTransformation(init, update)


# Quintic Newton-Schulz coefficients from Muon (Jordan et al., 2024): five
# steps take singular values spread over 0.1-10 into 0.68-1.13 (measured on
# the matrices of tests/test_optim.py).
_NS_COEFFS = (3.4445, -4.7750, 2.0315)
_NS_STEPS = 5


def as_matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
  """The 2-D view of a kernel: the split of its axes that is closest to square.

  A dense kernel is ``(in, out)``; attention's ``(width, heads, head_dim)``
  and ``(heads, head_dim, width)`` both become ``(width, width)``.
  """
  splits = [(math.prod(shape[:i]), math.prod(shape[i:])) for i in range(1, len(shape))]
  return min(splits, key=lambda rc: max(rc) / min(rc))


def orthogonalize(matrix: jax.Array) -> jax.Array:
  """The nearest semi-orthogonal matrix ``U V^T`` of ``matrix``, approximately.

  Newton-Schulz on the Frobenius-normalized matrix, in float32, iterating on
  the short side (``X X^T`` is the small Gram matrix). Leading axes are a
  batch of matrices, each normalized on its own.
  """
  a, b, c = _NS_COEFFS
  x = matrix.astype(jnp.float32)
  wide = x.shape[-2] <= x.shape[-1]
  x = x if wide else jnp.swapaxes(x, -1, -2)
  x = x / (jnp.linalg.norm(x, axis=(-2, -1), keepdims=True) + 1e-7)
  for _ in range(_NS_STEPS):
    gram = x @ jnp.swapaxes(x, -1, -2)
    x = a * x + (b * gram + c * gram @ gram) @ x
  return x if wide else jnp.swapaxes(x, -1, -2)


def _orthogonalize_all(matrices: list[jax.Array]) -> list[jax.Array]:
  """``orthogonalize`` each matrix, stacking those of one shape into one batch.

  A model's many small kernels share a few shapes, so this runs a few
  batched iterations instead of one per kernel: fewer, larger matmuls.
  """
  groups: dict[tuple[int, ...], list[int]] = {}
  for i, m in enumerate(matrices):
    groups.setdefault(m.shape, []).append(i)
  out: list[Any] = [None] * len(matrices)
  for indices in groups.values():
    for i, o in zip(indices, orthogonalize(jnp.stack([matrices[i] for i in indices]))):
      out[i] = o
  return out


class MuonAdamState(NamedTuple):
  count: jax.Array
  mu: Any  # momentum: Muon's for matrices, Adam's first moment for the rest
  nu: Any  # Adam's second moment (stays zero on matrices; params-shaped for sharding)


def scale_by_muon(matrix_mask, *, momentum: float, b1: float, b2: float,
                  eps: float) -> optax.GradientTransformation:
  """Muon on the ``matrix_mask`` leaves of >= 2 axes (None: all of them), Adam on the others.

  Matrix leaves: Nesterov momentum, orthogonalized in their 2-D view
  (``as_matrix_shape``) and scaled by ``0.2 * sqrt(max(rows, cols))`` so the
  update's RMS matches AdamW's (Moonlight, Liu et al., 2025). One learning
  rate and one weight decay then serve both kinds of leaf.
  """
  def init(params):
    zeros = lambda p: jnp.zeros_like(p)
    return MuonAdamState(jnp.zeros([], jnp.int32), jax.tree.map(zeros, params),
                         jax.tree.map(zeros, params))

  def update(updates, state, params=None):
    del params
    count = optax.safe_increment(state.count)
    treedef = jax.tree.structure(updates)
    grads, mus, nus = (treedef.flatten_up_to(t) for t in (updates, state.mu, state.nu))
    marked = ([True] * len(grads) if matrix_mask is None
              else treedef.flatten_up_to(matrix_mask))
    is_matrix = [m and g.ndim >= 2 for m, g in zip(marked, grads)]  # vectors stay on Adam
    new_updates = list(grads)
    matrix_ids = [i for i, m in enumerate(is_matrix) if m]
    views = []
    for i in matrix_ids:
      mus[i] = momentum * mus[i] + (1 - momentum) * grads[i]
      nesterov = momentum * mus[i] + (1 - momentum) * grads[i]
      views.append(nesterov.reshape(as_matrix_shape(grads[i].shape)))
    for i, direction in zip(matrix_ids, _orthogonalize_all(views)):
      scale = 0.2 * math.sqrt(max(direction.shape))
      new_updates[i] = (scale * direction).reshape(grads[i].shape).astype(grads[i].dtype)
    for i in (i for i, m in enumerate(is_matrix) if not m):
      mus[i] = b1 * mus[i] + (1 - b1) * grads[i]
      nus[i] = b2 * nus[i] + (1 - b2) * jnp.square(grads[i])
      mu_hat = mus[i] / (1 - b1 ** count.astype(mus[i].dtype))
      nu_hat = nus[i] / (1 - b2 ** count.astype(nus[i].dtype))
      new_updates[i] = mu_hat / (jnp.sqrt(nu_hat) + eps)
    return (treedef.unflatten(new_updates),
            MuonAdamState(count, treedef.unflatten(mus), treedef.unflatten(nus)))

  return optax.GradientTransformation(init, update)


def make_optimizer(config: OptimizerConfig, total_steps: int, *,
                   weight_decay_mask: Any = None, trainable: Any = None,
                   lr_scale: Optional[Any] = None) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW or Muon (decoupled weight decay) with clipping; returns (tx, schedule).

  ``weight_decay_mask``, ``trainable`` and ``lr_scale`` are pytrees shaped
  like the params (bools, bools, floats) or None; leaves that
  ``trainable`` marks False are frozen and have no optimizer state
  (``only_trainable`` is the params view the optimizer state is built on).
  Muon treats the leaves
  that ``weight_decay_mask`` decays as its matrices (every leaf of two or
  more axes when the mask is None): the hidden kernels, not embeddings.
  """
  lr = schedule(config, total_steps)
  weight_decay_mask = only_trainable(weight_decay_mask, trainable)
  lr_scale = only_trainable(lr_scale, trainable)
  parts = []
  if config.grad_clip_norm is not None:
    parts.append(optax.clip_by_global_norm(config.grad_clip_norm))
  if config.algorithm == "muon":
    parts.append(scale_by_muon(weight_decay_mask, momentum=config.muon_momentum,
                               b1=config.b1, b2=config.b2, eps=config.eps))
  else:
    parts.append(optax.scale_by_adam(b1=config.b1, b2=config.b2, eps=config.eps))
  if config.weight_decay > 0:
    parts.append(optax.add_decayed_weights(config.weight_decay, mask=weight_decay_mask))
  parts.append(optax.scale_by_learning_rate(lr))
  if lr_scale is not None:
    parts.append(_scale_leaves(lr_scale))
  tx = optax.chain(*parts)
  if trainable is not None and not all(jax.tree.leaves(trainable)):
    tx = _trainable_only(tx, trainable)
  return tx, lr

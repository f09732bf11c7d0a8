"""The optimizer from config: AdamW, warmup + decay, clipping, masks.

Every transform added here has either no state or params-shaped state, so
``sharding.plan_like_params`` can shard the optimizer state like the params.
"""

from __future__ import annotations

from typing import Any, Optional

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


def _freeze(trainable) -> optax.GradientTransformation:
  """Zero the updates of frozen leaves, so ``p + 0`` leaves them bitwise unchanged."""
  def update(updates, state, params=None):
    del params
    return jax.tree.map(lambda u, t: u if t else jnp.zeros_like(u), updates, trainable), state
  return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def make_optimizer(config: OptimizerConfig, total_steps: int, *,
                   weight_decay_mask: Any = None, trainable: Any = None,
                   lr_scale: Optional[Any] = None) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW (decoupled weight decay) with clipping; returns (tx, schedule).

  ``weight_decay_mask``, ``trainable`` and ``lr_scale`` are pytrees shaped
  like the params (bools, bools, floats) or None.
  """
  lr = schedule(config, total_steps)
  parts = []
  if trainable is not None:
    parts.append(_freeze(trainable))  # frozen grads count in no norm or moment
  if config.grad_clip_norm is not None:
    parts.append(optax.clip_by_global_norm(config.grad_clip_norm))
  parts.append(optax.scale_by_adam(b1=config.b1, b2=config.b2, eps=config.eps))
  if config.weight_decay > 0:
    parts.append(optax.add_decayed_weights(config.weight_decay, mask=weight_decay_mask))
  parts.append(optax.scale_by_learning_rate(lr))
  if lr_scale is not None:
    parts.append(_scale_leaves(lr_scale))
  if trainable is not None:
    parts.append(_freeze(trainable))
  return optax.chain(*parts), lr

"""Distillation and self-distillation losses as pure functions, float32.

* ``kd_loss``: Hinton et al.'s knowledge distillation,
  ``alpha * T^2 * KL(softmax(t / T) || softmax(s / T)) + (1 - alpha) * CE(s, y)``
  averaged over rows (the ``T^2`` keeps the soft term's gradient scale
  independent of ``T``).
* ``whiten`` + ``feature_loss``: feature distillation's target is the
  teacher's token features normalized without parameters (a LayerNorm with no
  scale or bias, per token), regressed with smooth-L1 or a cosine distance.
* ``dino_teacher_probs`` / ``dino_loss`` / ``ema_update``: DINO's centering
  (subtract an EMA of the teacher's mean output) and sharpening (a low
  teacher temperature), the cross-entropy of every student view against
  every other teacher view.

Rows may be masked (``mask [...]`` bool, False rows count for nothing).
Every loss returns ``(loss, metrics)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["cosine_momentum", "dino_loss", "dino_teacher_probs", "ema_update", "feature_loss", "kd_loss",
           "kl_divergence", "masked_mean", "whiten"]


def masked_mean(x, mask=None):
  """Mean of ``x`` over all its entries, or over those ``mask`` keeps."""
  x = jnp.asarray(x, jnp.float32)
  if mask is None:
    return jnp.mean(x)
  mask = jnp.broadcast_to(jnp.asarray(mask, jnp.float32), x.shape)
  return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def kl_divergence(target_logits, logits, temperature: float = 1.0):
  """Per-row ``KL(softmax(target / T) || softmax(logits / T))`` ``[...]``."""
  t = jnp.asarray(target_logits, jnp.float32) / temperature
  s = jnp.asarray(logits, jnp.float32) / temperature
  log_p = jax.nn.log_softmax(t, axis=-1)
  return jnp.sum(jnp.exp(log_p) * (log_p - jax.nn.log_softmax(s, axis=-1)), axis=-1)


def kd_loss(student_logits, teacher_logits, labels=None, *, temperature: float = 1.0,
            alpha: float = 1.0, mask=None):
  """Knowledge distillation mixed with the hard-label loss.

  Args:
    student_logits, teacher_logits: ``[..., classes]``.
    labels: ``[...]`` int targets for the hard term; needed when ``alpha < 1``.
    temperature: ``T`` > 0 of both softmaxes in the soft term.
    alpha: weight of the soft term in [0, 1].
    mask: optional ``[...]`` bool of the rows that count.
  Returns:
    ``(loss, {"kd", "hard", "agreement"})``: the soft and hard terms and the
    fraction of rows where student and teacher agree on the argmax.
  """
  if temperature <= 0:
    raise ValueError(f"kd_loss: temperature={temperature} must be > 0.")
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f"kd_loss: alpha={alpha} must be in [0, 1].")
  soft = masked_mean(kl_divergence(teacher_logits, student_logits, temperature), mask)
  soft = soft * temperature ** 2
  metrics = {"kd": soft, "agreement": masked_mean(
      jnp.argmax(student_logits, -1) == jnp.argmax(teacher_logits, -1), mask)}
  if labels is None:
    if alpha < 1.0:
      raise ValueError(f"kd_loss: alpha={alpha} < 1 mixes in the hard-label loss; pass labels.")
    return soft, metrics
  logp = jax.nn.log_softmax(jnp.asarray(student_logits, jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
  hard = masked_mean(nll, mask)
  metrics["hard"] = hard
  return alpha * soft + (1.0 - alpha) * hard, metrics


def whiten(features, eps: float = 1e-6):
  """Parameter-free per-token normalization ``(x - mean) / sqrt(var + eps)``
  over the last axis (``[..., width]``), float32."""
  x = jnp.asarray(features, jnp.float32)
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps)


def smooth_l1(pred, target, beta: float = 1.0):
  """Elementwise Huber-style smooth L1: ``0.5 d^2 / beta`` for ``|d| < beta``, else ``|d| - beta / 2``."""
  d = jnp.abs(jnp.asarray(pred, jnp.float32) - jnp.asarray(target, jnp.float32))
  return jnp.where(d < beta, 0.5 * d * d / beta, d - 0.5 * beta)


def feature_loss(pred, target, *, kind: str = "smooth_l1", beta: float = 1.0,
                 whiten_target: bool = True, mask=None):
  """Regression of ``pred [..., width]`` onto the teacher's ``target`` (whitened first).

  ``kind``: ``smooth_l1`` (mean over tokens and channels) or ``cosine``
  (``1 - cos`` per token, mean over tokens). ``mask [...]``: tokens that count.
  Returns ``(loss, {"cosine"})``: the mean cosine similarity, for either kind.
  """
  target = whiten(target) if whiten_target else jnp.asarray(target, jnp.float32)
  pred = jnp.asarray(pred, jnp.float32)
  cos = jnp.sum(pred * target, -1) * jax.lax.rsqrt(
      jnp.maximum(jnp.sum(pred * pred, -1) * jnp.sum(target * target, -1), 1e-12))
  if kind == "smooth_l1":
    loss = masked_mean(jnp.mean(smooth_l1(pred, target, beta), -1), mask)
  elif kind == "cosine":
    loss = masked_mean(1.0 - cos, mask)
  else:
    raise ValueError(f"feature_loss: kind={kind!r}; choose 'smooth_l1' or 'cosine'.")
  return loss, {"cosine": masked_mean(cos, mask)}


def ema_update(old, new, momentum):
  """``momentum * old + (1 - momentum) * new`` leafwise (an EMA teacher, DINO's center)."""
  return jax.tree.map(lambda o, n: (momentum * o + (1.0 - momentum) * n).astype(o.dtype), old, new)


def dino_teacher_probs(teacher_logits, center, temperature: float):
  """Centered and sharpened teacher targets: ``softmax((t - center) / temperature)``."""
  t = jnp.asarray(teacher_logits, jnp.float32) - jnp.asarray(center, jnp.float32)
  return jax.nn.softmax(t / temperature, axis=-1)


def dino_loss(student_logits, teacher_logits, center, *, student_temperature: float = 0.1,
              teacher_temperature: float = 0.04, mask=None):
  """DINO's self-distillation cross-entropy over views.

  Args:
    student_logits: ``[student_views, batch, dim]``; its first
      ``teacher_views`` views are the global views the teacher sees too.
    teacher_logits: ``[teacher_views, batch, dim]``.
    center: ``[dim]``, the EMA of the teacher's mean output.
    mask: optional ``[batch]`` bool.
  Returns:
    ``(loss, {"teacher_entropy", "teacher_mean"})``: the mean over every
    (teacher view i, student view j != i) pair of ``-sum p_t log p_s``, the
    sharpened targets' mean entropy, and the teacher's mean output ``[dim]``
    over views and batch (what the center follows).
  """
  vt, vs = teacher_logits.shape[0], student_logits.shape[0]
  if vs < vt:
    raise ValueError(f"dino_loss: {vs} student views < {vt} teacher views; the student "
                     "sees every view the teacher sees (the global ones first).")
  targets = jax.lax.stop_gradient(dino_teacher_probs(teacher_logits, center, teacher_temperature))
  logp = jax.nn.log_softmax(jnp.asarray(student_logits, jnp.float32) / student_temperature, -1)
  ce = -jnp.einsum("ibk,jbk->ijb", targets, logp)  # [teacher view, student view, batch]
  pairs = (jnp.arange(vt)[:, None] != jnp.arange(vs)[None, :]).astype(jnp.float32)
  per_row = jnp.sum(ce * pairs[..., None], axis=(0, 1)) / jnp.sum(pairs)
  entropy = -jnp.sum(targets * jnp.log(jnp.maximum(targets, 1e-20)), -1)  # [vt, b]
  teacher = jnp.asarray(teacher_logits, jnp.float32)
  if mask is None:
    mean = jnp.mean(teacher, axis=(0, 1))
  else:
    w = jnp.asarray(mask, jnp.float32)[None, :, None]
    mean = jnp.sum(teacher * w, axis=(0, 1)) / jnp.maximum(jnp.sum(w) * vt, 1.0)
  metrics = {"teacher_entropy": masked_mean(entropy, None if mask is None else mask[None]),
             "teacher_mean": jax.lax.stop_gradient(mean)}
  return masked_mean(per_row, mask), metrics


def cosine_momentum(step, total_steps: int, base: float):
  """DINO/BYOL teacher momentum: ``1 - (1 - base) * (cos(pi * step / total) + 1) / 2``,
  from ``base`` at step 0 to 1 at ``total_steps`` (and 1 after)."""
  frac = jnp.clip(jnp.asarray(step, jnp.float32) / max(total_steps, 1), 0.0, 1.0)
  return 1.0 - (1.0 - base) * (jnp.cos(jnp.pi * frac) + 1.0) / 2.0


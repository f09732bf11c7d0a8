"""Cross-entropy losses shared by every objective: pure, float32, tested alone.

Token-level objectives (GPT, BERT, sequence classification) use integer
targets (``cross_entropy``); image classification with label smoothing or
mixup uses target distributions (``soft_cross_entropy``).
"""

import jax
import jax.numpy as jnp


def cross_entropy(logits, targets):
  """Per-position ``(nll, logsumexp)``, float32; ``logits [..., vocab]``, ``targets [...]`` ints."""
  logits = logits.astype(jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  return lse - picked, lse


def soft_cross_entropy(logits, target_probs):
  """Per-row ``-sum(p * log_softmax(logits))``; ``target_probs [..., classes]``
  (one-hot, smoothed or mixed labels)."""
  return -jnp.sum(target_probs * jax.nn.log_softmax(logits, axis=-1), axis=-1)


def classification_loss(logits, labels):
  """Mean softmax cross-entropy and accuracy; ``labels [batch]`` ints."""
  nll, _ = cross_entropy(logits, labels)
  acc = jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32))
  return jnp.mean(nll), {"accuracy": acc}

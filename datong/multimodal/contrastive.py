"""Contrastive image-text math as pure functions: losses, zero-shot, retrieval.

Embeddings are ``[batch, dim]`` and L2-normalized; pair ``i`` is image ``i``
with text ``i``. ``scale`` is the positive logit scale (the inverse
temperature, already exponentiated and clipped by the model) and ``bias`` the
SigLIP logit bias; both are scalars. All math runs in float32.

* ``softmax_contrastive_loss``: CLIP's symmetric InfoNCE,
  ``(CE(image -> texts) + CE(text -> images)) / 2``, mean over pairs.
* ``nt_xent_loss``: SimCLR's NT-Xent over two views of one batch (every
  other view a negative, the view itself excluded).
* ``sigmoid_contrastive_loss``: SigLIP's pairwise loss,
  ``-sum_ij log sigmoid(z_ij * (scale * <x_i, y_j> + bias)) / batch`` with
  ``z_ij = +1`` on the diagonal and ``-1`` off it (big_vision's form).

Global batch. Under ``jax.jit`` with batch-sharded inputs the plain losses
are already global: jit has global semantics, so XLA inserts the all-gathers
the ``[batch, batch]`` logits need. ``*_sharded`` variants make the
communication explicit with ``shard_map`` (an all-gather of one modality for
softmax; a ring of ``ppermute`` steps for sigmoid, as in the SigLIP paper),
keeping per-device memory at ``[local, global]`` resp. ``[local, local]``.
``chunked_*`` variants scan over text chunks with a rematerialized body, so a
single device never holds more than ``[batch, chunk]`` logits, forward or
backward.

Every loss returns ``(loss, metrics)``.
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

_NEG = -1e9  # logit of a masked-out (padding) candidate


def logit_scale(log_scale, max_scale: Optional[float] = None):
  """``exp(log_scale)``, clipped at ``max_scale`` (CLIP clips at 100)."""
  scale = jnp.exp(jnp.asarray(log_scale, jnp.float32))
  return scale if max_scale is None else jnp.minimum(scale, max_scale)


def l2_normalize(x, axis: int = -1, eps: float = 1e-6):
  x = jnp.asarray(x, jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=axis, keepdims=True), eps * eps))


def _f32(*xs):
  return [jnp.asarray(x, jnp.float32) for x in xs]


def _valid(mask, batch):
  return jnp.ones((batch,), bool) if mask is None else jnp.asarray(mask, bool)


# ------------------------------------------------------------------- softmax

def softmax_contrastive_loss(image_emb, text_emb, scale, *, mask=None):
  """CLIP's symmetric cross-entropy over the ``[batch, batch]`` logits.

  Args:
    image_emb, text_emb: ``[batch, dim]`` normalized embeddings.
    scale: positive scalar, the logit scale.
    mask: optional ``[batch]`` bool; False rows (padding) are neither queries
      nor candidates.
  Returns:
    ``(loss, {"i2t_accuracy", "t2i_accuracy"})``: in-batch top-1 accuracies.
  """
  image_emb, text_emb, scale = _f32(image_emb, text_emb, scale)
  batch = image_emb.shape[0]
  valid = _valid(mask, batch)
  logits = scale * image_emb @ text_emb.T  # [image, text]
  pair = valid[:, None] & valid[None, :]
  logits = jnp.where(pair, logits, _NEG)
  diag = jnp.diagonal(logits)
  i2t = jax.nn.logsumexp(logits, axis=1) - diag
  t2i = jax.nn.logsumexp(logits, axis=0) - diag
  n = jnp.maximum(jnp.sum(valid), 1)
  loss = 0.5 * jnp.sum(jnp.where(valid, i2t + t2i, 0.0)) / n
  idx = jnp.arange(batch)
  metrics = {
      "i2t_accuracy": jnp.sum(valid & (jnp.argmax(logits, 1) == idx)) / n,
      "t2i_accuracy": jnp.sum(valid & (jnp.argmax(logits, 0) == idx)) / n,
  }
  return loss, metrics


def nt_xent_loss(z1, z2, temperature: float, *, mask=None):
  """SimCLR's NT-Xent over the ``2 * batch`` views of a global batch.

  ``z1, z2``: ``[batch, dim]`` embeddings of two views (normalized here);
  row ``i`` of ``z1`` and of ``z2`` are the positive pair. Each of the
  ``2 * batch`` views is a query whose candidates are the other ``2 * batch
  - 1`` views (itself excluded), its positive among them: the same
  cross-entropy as ``softmax_contrastive_loss`` on the stacked views with
  the self-similarity masked out. Mean over valid queries, float32.
  Returns ``(loss, {"accuracy"})``: the fraction of queries whose nearest
  candidate is their positive.
  """
  if temperature <= 0:
    raise ValueError(f"nt_xent_loss: temperature={temperature} must be > 0.")
  batch = z1.shape[0]
  z = l2_normalize(jnp.concatenate([z1, z2], axis=0))  # [2b, dim]
  valid = jnp.tile(_valid(mask, batch), 2)
  logits = z @ z.T / temperature
  n2 = 2 * batch
  idx = jnp.arange(n2)
  keep = valid[:, None] & valid[None, :] & (idx[:, None] != idx[None, :])
  logits = jnp.where(keep, logits, _NEG)
  positive = (idx + batch) % n2
  nll = jax.nn.logsumexp(logits, axis=1) - logits[idx, positive]
  n = jnp.maximum(jnp.sum(valid), 1)
  loss = jnp.sum(jnp.where(valid, nll, 0.0)) / n
  accuracy = jnp.sum(valid & (jnp.argmax(logits, 1) == positive)) / n
  return loss, {"accuracy": accuracy}


def chunked_softmax_contrastive_loss(image_emb, text_emb, scale, *, chunk_size: int,
                                     mask=None):
  """``softmax_contrastive_loss`` with ``[batch, chunk_size]`` logits at a time.

  Scans over text chunks: each chunk's column log-sum-exp (text -> images) is
  complete within the chunk; the row log-sum-exp (image -> texts) is carried
  online. The body is rematerialized so the backward pass does not store
  every chunk's logits. Metrics are empty (no argmax over full rows).
  """
  image_emb, text_emb, scale = _f32(image_emb, text_emb, scale)
  batch, dim = image_emb.shape
  chunks = _num_chunks(batch, chunk_size)
  valid = _valid(mask, batch)
  diag = scale * jnp.sum(image_emb * text_emb, axis=-1)

  @jax.checkpoint
  def body(carry, xs):
    row_lse, col_sum = carry
    t, v = xs  # [chunk, dim], [chunk]
    logits = scale * image_emb @ t.T  # [batch, chunk]
    logits = jnp.where(valid[:, None] & v[None, :], logits, _NEG)
    row_lse = jnp.logaddexp(row_lse, jax.nn.logsumexp(logits, axis=1))
    col_sum = col_sum + jnp.sum(jnp.where(v, jax.nn.logsumexp(logits, axis=0), 0.0))
    return (row_lse, col_sum), None

  init = (jnp.full((batch,), -jnp.inf, jnp.float32), jnp.zeros((), jnp.float32))
  (row_lse, col_sum), _ = jax.lax.scan(
      body, init, (text_emb.reshape(chunks, chunk_size, dim), valid.reshape(chunks, chunk_size)))
  diag_sum = jnp.sum(jnp.where(valid, diag, 0.0))
  row_sum = jnp.sum(jnp.where(valid, row_lse, 0.0))
  n = jnp.maximum(jnp.sum(valid), 1)
  return 0.5 * (row_sum + col_sum - 2.0 * diag_sum) / n, {}


def softmax_contrastive_loss_sharded(image_emb, text_emb, scale, *, mesh,
                                     axes: Sequence[str] = ("data",)):
  """``softmax_contrastive_loss`` with explicit ``shard_map`` communication.

  The batch is split over mesh ``axes``; each device all-gathers the other
  modality and computes its ``[local, global]`` rows in both directions.
  """
  axes = tuple(axes)

  def local(img, txt, s):
    b = img.shape[0]
    offset = jax.lax.axis_index(axes) * b
    all_txt = jax.lax.all_gather(txt, axes, tiled=True)
    all_img = jax.lax.all_gather(img, axes, tiled=True)
    labels = offset + jnp.arange(b)

    def ce(q, keys):
      logits = s * q @ keys.T  # [local, global]
      return jnp.sum(jax.nn.logsumexp(logits, 1) - jnp.take_along_axis(
          logits, labels[:, None], 1)[:, 0])

    total = jax.lax.psum(ce(img, all_txt) + ce(txt, all_img), axes)
    return total / (2.0 * b * jax.lax.axis_size(axes))

  image_emb, text_emb, scale = _f32(image_emb, text_emb, scale)
  fn = jax.shard_map(local, mesh=mesh, in_specs=(P(axes), P(axes), P()), out_specs=P())
  return fn(image_emb, text_emb, scale), {}


# ------------------------------------------------------------------- sigmoid

def _sigmoid_block(img, txt, scale, bias, row_ids, col_ids, row_valid, col_valid):
  """Sum of ``log sigmoid(z * logit)`` over one ``[rows, cols]`` block."""
  logits = scale * img @ txt.T + bias
  sign = jnp.where(row_ids[:, None] == col_ids[None, :], 1.0, -1.0)
  ll = jax.nn.log_sigmoid(sign * logits)
  return jnp.sum(jnp.where(row_valid[:, None] & col_valid[None, :], ll, 0.0))


def sigmoid_contrastive_loss(image_emb, text_emb, scale, bias, *, mask=None):
  """SigLIP's pairwise sigmoid loss over the ``[batch, batch]`` logits.

  Args:
    image_emb, text_emb: ``[batch, dim]`` normalized embeddings.
    scale, bias: scalars; logits are ``scale * <x, y> + bias``.
    mask: optional ``[batch]`` bool; only pairs of valid rows count, and the
      sum is divided by the number of valid rows.
  Returns:
    ``(loss, {"pos_logit", "neg_logit"})``: mean logits of matching and
    non-matching valid pairs.
  """
  image_emb, text_emb, scale, bias = _f32(image_emb, text_emb, scale, bias)
  batch = image_emb.shape[0]
  valid = _valid(mask, batch)
  idx = jnp.arange(batch)
  total = _sigmoid_block(image_emb, text_emb, scale, bias, idx, idx, valid, valid)
  n = jnp.maximum(jnp.sum(valid), 1)
  logits = scale * image_emb @ text_emb.T + bias
  pair = valid[:, None] & valid[None, :]
  eye = jnp.eye(batch, dtype=bool)
  metrics = {
      "pos_logit": jnp.sum(jnp.where(pair & eye, logits, 0.0)) / n,
      "neg_logit": jnp.sum(jnp.where(pair & ~eye, logits, 0.0)) / jnp.maximum(n * (n - 1), 1),
  }
  return -total / n, metrics


def _num_chunks(batch: int, chunk_size: int) -> int:
  if chunk_size <= 0 or batch % chunk_size:
    raise ValueError(f"chunk_size={chunk_size} must be a positive divisor of the batch "
                     f"size {batch}.")
  return batch // chunk_size


def chunked_sigmoid_contrastive_loss(image_emb, text_emb, scale, bias, *,
                                     chunk_size: int, mask=None):
  """``sigmoid_contrastive_loss`` with ``[batch, chunk_size]`` logits at a time.

  ``lax.scan`` over text chunks with a rematerialized (``jax.checkpoint``)
  body: the forward and the backward pass each hold one chunk's logits, so
  memory is ``O(batch * chunk_size)``, not ``O(batch^2)``. Metrics are empty.
  """
  image_emb, text_emb, scale, bias = _f32(image_emb, text_emb, scale, bias)
  batch, dim = image_emb.shape
  chunks = _num_chunks(batch, chunk_size)
  valid = _valid(mask, batch)
  rows = jnp.arange(batch)

  @jax.checkpoint
  def body(total, xs):
    t, cols, v = xs
    return total + _sigmoid_block(image_emb, t, scale, bias, rows, cols, valid, v), None

  xs = (text_emb.reshape(chunks, chunk_size, dim), rows.reshape(chunks, chunk_size),
        valid.reshape(chunks, chunk_size))
  total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), xs)
  return -total / jnp.maximum(jnp.sum(valid), 1), {}


def sigmoid_contrastive_loss_sharded(image_emb, text_emb, scale, bias, *, mesh,
                                     axes: Sequence[str] = ("data",)):
  """``sigmoid_contrastive_loss`` as the SigLIP paper's ring over devices.

  Each device keeps its images and passes its texts around the ring of
  ``axes`` with ``ppermute``, one ``[local, local]`` block per hop, so no
  device ever holds more than a ``[local, local]`` logits block.
  """
  axes = tuple(axes)

  def local(img, txt, s, b_):
    b = img.shape[0]
    n = jax.lax.axis_size(axes)
    me = jax.lax.axis_index(axes)
    ones = jnp.ones((b,), bool)
    rows = me * b + jnp.arange(b)
    perm = [(i, (i + 1) % n) for i in range(n)]

    def hop(k, carry):
      total, t = carry
      owner = (me - k) % n  # whose texts we hold after k hops
      cols = owner * b + jnp.arange(b)
      total = total + _sigmoid_block(img, t, s, b_, rows, cols, ones, ones)
      return total, (jax.lax.ppermute(t, axes, perm) if k < n - 1 else t)

    # A Python loop: n is static and small, and it keeps ppermute differentiable.
    carry = (jnp.zeros((), jnp.float32), txt)
    for k in range(n):
      carry = hop(k, carry)
    return -jax.lax.psum(carry[0], axes) / (b * n)

  image_emb, text_emb, scale, bias = _f32(image_emb, text_emb, scale, bias)
  fn = jax.shard_map(local, mesh=mesh, in_specs=(P(axes), P(axes), P(), P()),
                     out_specs=P())
  return fn(image_emb, text_emb, scale, bias), {}


# ------------------------------------------------------ zero-shot, retrieval

def zero_shot_classifier(prompt_embeddings):
  """Class weights from prompt embeddings ``[classes, templates, dim]``.

  CLIP's prompt ensembling: normalize each prompt's embedding, average over
  templates, renormalize. Returns ``[classes, dim]``.
  """
  return l2_normalize(jnp.mean(l2_normalize(prompt_embeddings), axis=1))


def zero_shot_logits(image_emb, classifier):
  """``[batch, classes]`` cosine similarities; argmax is the prediction."""
  return jnp.asarray(image_emb, jnp.float32) @ jnp.asarray(classifier, jnp.float32).T


def retrieval_recall(image_emb, text_emb, ks: Sequence[int] = (1, 5), *,
                     image_keys=None, text_keys=None, valid=None) -> dict[str, float]:
  """Image->text and text->image recall@k of paired embeddings (numpy, host).

  Pair ``i`` is image ``i`` with text ``i``. A retrieved text ``j`` is a hit
  for image ``i`` when ``text_keys[j] == text_keys[i]``; a retrieved image
  ``i'`` is a hit for text ``j`` when ``image_keys[i'] == image_keys[j]``.
  The default keys are ``arange`` (only the exact partner counts); pass
  e.g. caption ids to count identical captions as one, or class labels for
  class-level retrieval. ``valid``: optional bool rows to keep.
  Returns ``{"i2t_recall@k": ..., "t2i_recall@k": ...}`` in [0, 1].
  """
  img = np.asarray(image_emb, np.float32)
  txt = np.asarray(text_emb, np.float32)
  if valid is not None:
    keep = np.asarray(valid, bool)
    img, txt = img[keep], txt[keep]
    image_keys = None if image_keys is None else np.asarray(image_keys)[keep]
    text_keys = None if text_keys is None else np.asarray(text_keys)[keep]
  n = img.shape[0]
  image_keys = np.arange(n) if image_keys is None else np.asarray(image_keys)
  text_keys = np.arange(n) if text_keys is None else np.asarray(text_keys)
  sim = img @ txt.T
  out = {}
  kmax = min(max(ks), n)
  # Stable sort: among equal scores the lower index ranks first.
  i2t = np.argsort(-sim, axis=1, kind="stable")[:, :kmax]
  t2i = np.argsort(-sim.T, axis=1, kind="stable")[:, :kmax]
  i2t_hit = text_keys[i2t] == text_keys[:, None]
  t2i_hit = image_keys[t2i] == image_keys[:, None]
  for k in ks:
    out[f"i2t_recall@{k}"] = float(np.mean(np.any(i2t_hit[:, :k], axis=1)))
    out[f"t2i_recall@{k}"] = float(np.mean(np.any(t2i_hit[:, :k], axis=1)))
  return out

"""CLIP / SigLIP: losses vs brute force, sharded and chunked forms, zero-shot,
retrieval, two towers, LiT freezing, one engine step per recipe."""

import numpy as np
import pytest
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from datong.multimodal import contrastive as C


# ------------------------------------------------------------ brute force ---

def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def _ref_softmax(x, y, t):
  """CLIP loss and its gradients (x, y, log-scale t), with explicit loops."""
  x, y = np.float64(x), np.float64(y)
  s = np.exp(t)
  n = x.shape[0]
  S = np.zeros((n, n))
  for i in range(n):
    for j in range(n):
      S[i, j] = s * np.dot(x[i], y[j])
  loss, G = 0.0, np.zeros((n, n))
  for i in range(n):  # image i -> texts
    row = np.exp(S[i] - S[i].max())
    row /= row.sum()
    loss -= np.log(row[i])
    for j in range(n):
      G[i, j] += row[j] - (i == j)
  for j in range(n):  # text j -> images
    col = np.exp(S[:, j] - S[:, j].max())
    col /= col.sum()
    loss -= np.log(col[j])
    for i in range(n):
      G[i, j] += col[i] - (i == j)
  loss /= 2 * n
  G /= 2 * n
  return loss, _chain(G, x, y, s)


def _ref_sigmoid(x, y, t, b):
  x, y = np.float64(x), np.float64(y)
  s = np.exp(t)
  n = x.shape[0]
  loss, G = 0.0, np.zeros((n, n))
  for i in range(n):
    for j in range(n):
      z = 1.0 if i == j else -1.0
      logit = s * np.dot(x[i], y[j]) + b
      loss -= np.log(_sigmoid(z * logit)) / n
      G[i, j] = -z * (1.0 - _sigmoid(z * logit)) / n
  gx, gy, gt = _chain(G, x, y, s)
  return loss, (gx, gy, gt, G.sum())


def _chain(G, x, y, s):
  """dL/dlogits G -> (dL/dx, dL/dy, dL/dlog_scale) for logits s<x_i, y_j>."""
  n = x.shape[0]
  gx, gy, gs = np.zeros_like(x), np.zeros_like(y), 0.0
  for i in range(n):
    for j in range(n):
      gx[i] += G[i, j] * s * y[j]
      gy[j] += G[i, j] * s * x[i]
      gs += G[i, j] * np.dot(x[i], y[j])
  return gx, gy, gs * s


def _emb(n=6, d=5, seed=0):
  r = np.random.default_rng(seed)
  x = r.normal(size=(n, d)).astype(np.float32)
  y = (x + r.normal(size=(n, d))).astype(np.float32)
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  y /= np.linalg.norm(y, axis=1, keepdims=True)
  return x, y


def _softmax_fn(loss=C.softmax_contrastive_loss, **kw):
  return lambda x, y, t: loss(x, y, C.logit_scale(t), **kw)[0]


def _sigmoid_fn(loss=C.sigmoid_contrastive_loss, **kw):
  return lambda x, y, t, b: loss(x, y, C.logit_scale(t), b, **kw)[0]


def _close(a, b, tol=2e-5):
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(u, np.float64), np.asarray(v, np.float64),
                               rtol=tol, atol=tol)


# ----------------------------------------------------------------- losses ---

def test_softmax_loss_matches_brute_force_value_and_grads():
  x, y = _emb()
  t = np.float32(np.log(1 / 0.07) - 1.0)  # a scale of ~5 keeps gradients informative
  value, grads = jax.value_and_grad(_softmax_fn(), argnums=(0, 1, 2))(x, y, t)
  ref_value, ref_grads = _ref_softmax(x, y, t)
  _close(value, ref_value)
  _close(grads, ref_grads)


def test_sigmoid_loss_matches_brute_force_value_and_grads():
  x, y = _emb(seed=1)
  t, b = np.float32(np.log(10.0)), np.float32(-3.0)
  value, grads = jax.value_and_grad(_sigmoid_fn(), argnums=(0, 1, 2, 3))(x, y, t, b)
  ref_value, ref_grads = _ref_sigmoid(x, y, t, b)
  _close(value, ref_value)
  _close(grads, ref_grads)


def test_logit_scale_is_clipped_at_100():
  assert float(C.logit_scale(np.log(1000.0), 100.0)) == pytest.approx(100.0)
  assert float(C.logit_scale(np.log(1 / 0.07), 100.0)) == pytest.approx(1 / 0.07, rel=1e-6)
  assert float(jax.grad(lambda t: C.logit_scale(t, 100.0))(np.log(1000.0))) == 0.0


def test_mask_equals_dropping_padded_rows():
  x, y = _emb(8, seed=2)
  mask = np.array([1, 1, 1, 0, 1, 1, 0, 1], bool)
  for full, part in [
      (C.softmax_contrastive_loss(x, y, 7.0, mask=mask)[0],
       C.softmax_contrastive_loss(x[mask], y[mask], 7.0)[0]),
      (C.sigmoid_contrastive_loss(x, y, 7.0, -2.0, mask=mask)[0],
       C.sigmoid_contrastive_loss(x[mask], y[mask], 7.0, -2.0)[0])]:
    _close(full, part, 1e-6)


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_chunked_loss_equals_unchunked_value_and_grads(kind):
  x, y = _emb(8, seed=3)
  mask = np.array([1, 1, 1, 1, 1, 0, 1, 0], bool)
  args = (x, y, np.float32(2.0)) + ((np.float32(-4.0),) if kind == "sigmoid" else ())
  if kind == "softmax":
    full, chunked = _softmax_fn(), _softmax_fn(C.chunked_softmax_contrastive_loss, chunk_size=2)
    full_m = _softmax_fn(mask=mask)
    chunked_m = _softmax_fn(C.chunked_softmax_contrastive_loss, chunk_size=4, mask=mask)
  else:
    full, chunked = _sigmoid_fn(), _sigmoid_fn(C.chunked_sigmoid_contrastive_loss, chunk_size=2)
    full_m = _sigmoid_fn(mask=mask)
    chunked_m = _sigmoid_fn(C.chunked_sigmoid_contrastive_loss, chunk_size=4, mask=mask)
  argnums = tuple(range(len(args)))
  for f, g in [(full, chunked), (full_m, chunked_m)]:
    _close(jax.value_and_grad(jax.jit(g), argnums)(*args),
           jax.value_and_grad(f, argnums)(*args), 1e-5)
  with pytest.raises(ValueError, match="chunk_size"):
    C.chunked_sigmoid_contrastive_loss(x, y, 1.0, 0.0, chunk_size=3)


def test_chunked_sigmoid_memory_does_not_grow_with_batch_squared():
  d = 16

  def temp_bytes(loss, batch, **kw):
    x = jax.ShapeDtypeStruct((batch, d), jnp.float32)
    f = jax.jit(jax.grad(lambda x, y: loss(x, y, 10.0, -10.0, **kw)[0], argnums=(0, 1)))
    return f.lower(x, x).compile().memory_analysis().temp_size_in_bytes

  batch = 2048
  full = temp_bytes(C.sigmoid_contrastive_loss, batch)
  chunked = temp_bytes(C.chunked_sigmoid_contrastive_loss, batch, chunk_size=64)
  assert full >= batch * batch * 4  # at least one [B, B] float32 buffer
  assert chunked < batch * batch * 4 / 8, (full, chunked)


def _mesh():
  return Mesh(np.array(jax.devices()[:8]), ("data",))


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_loss_on_sharded_batch_equals_unsharded(kind):
  mesh = _mesh()
  x, y = _emb(16, 8, seed=4)
  t, b = np.float32(2.5), np.float32(-5.0)
  if kind == "softmax":
    plain = lambda x, y, t, b: C.softmax_contrastive_loss(x, y, C.logit_scale(t))[0]
    ring = lambda x, y, t, b: C.softmax_contrastive_loss_sharded(
        x, y, C.logit_scale(t), mesh=mesh)[0]
  else:
    plain = lambda x, y, t, b: C.sigmoid_contrastive_loss(x, y, C.logit_scale(t), b)[0]
    ring = lambda x, y, t, b: C.sigmoid_contrastive_loss_sharded(
        x, y, C.logit_scale(t), b, mesh=mesh)[0]
  argnums = (0, 1, 2, 3)
  want = jax.value_and_grad(plain, argnums)(x, y, t, b)
  row = NamedSharding(mesh, P("data"))
  xs, ys = jax.device_put(x, row), jax.device_put(y, row)
  assert len(xs.sharding.device_set) == 8
  for f in (plain, ring):
    got = jax.jit(jax.value_and_grad(f, argnums))(xs, ys, t, b)
    _close(got, want, 1e-5)


# ------------------------------------------------------ zero-shot, retrieval

def test_zero_shot_classifies_separable_embeddings_perfectly():
  r = np.random.default_rng(5)
  classes, templates, d = 10, 4, 32
  centers = np.linalg.qr(r.normal(size=(d, classes)))[0].T  # orthonormal rows
  prompts = centers[:, None, :] + 0.05 * r.normal(size=(classes, templates, d))
  classifier = C.zero_shot_classifier(prompts)
  np.testing.assert_allclose(np.linalg.norm(classifier, axis=1), 1.0, rtol=1e-5)
  labels = r.integers(0, classes, 200)
  images = C.l2_normalize(centers[labels] + 0.05 * r.normal(size=(200, d)))
  pred = np.argmax(C.zero_shot_logits(images, classifier), axis=1)
  assert (pred == labels).all()


def test_retrieval_recall_counts_partner_or_key_match():
  eye = np.eye(4, dtype=np.float32)
  txt = eye[[0, 1, 3, 2]]  # texts 2 and 3 swapped
  r = C.retrieval_recall(eye, txt, ks=(1, 2))
  assert r["i2t_recall@1"] == 0.5 and r["t2i_recall@1"] == 0.5
  # top-2: image 2's scores are [0, 0, 0, 1] -> texts 3 then 0; misses text 2
  assert r["i2t_recall@2"] == 0.5
  keys = np.array([0, 1, 2, 2])  # 2 and 3 are the same class
  r = C.retrieval_recall(eye, txt, ks=(1,), image_keys=keys, text_keys=keys)
  assert r["i2t_recall@1"] == 1.0 and r["t2i_recall@1"] == 1.0
  r = C.retrieval_recall(eye, txt, ks=(1,), valid=np.array([1, 1, 0, 0], bool))
  assert r["i2t_recall@1"] == 1.0

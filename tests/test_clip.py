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


# ----------------------------------------------------------------- towers ---

import dataclasses  # noqa: E402

import flax.linen as nn  # noqa: E402

from datong.backbone import TransformerConfig  # noqa: E402
from datong.multimodal import clip  # noqa: E402
from datong.train.tasks import clip as clip_tasks  # noqa: E402
from datong.unimodal.text import TextConfig  # noqa: E402
from datong.unimodal.tokenizers import ByteTokenizer  # noqa: E402
from datong.unimodal.vision import ViTConfig  # noqa: E402

_BB = TransformerConfig(width=16, depth=1, heads=2, mlp_dim=32)


def _model(loss="softmax", share=False, pool="eos", causal=True, length=16):
  return clip.ClipConfig(
      image=ViTConfig(_BB, image_size=(8, 8), patch_size=(4, 4), channels=1, pool="gap"),
      text=TextConfig(backbone=_BB, positions="learned", max_length=length),
      embed_dim=8, text_pool=pool, text_causal=causal, share_backbone=share, loss=loss)


@pytest.mark.parametrize("share", [False, True])
def test_towers_share_one_backbone_class_and_optionally_its_weights(share):
  cfg = _model(share=share, loss="sigmoid")
  ids = clip.tokenize(["a seven", b"the number 7"], ByteTokenizer(), 16)
  model = clip.CLIP(cfg)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((2, 8, 8, 1)), ids)["params"]
  img, txt, aux = model.apply({"params": params}, jnp.ones((2, 8, 8, 1)), ids)
  np.testing.assert_allclose(np.linalg.norm(img, axis=1), 1, rtol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(txt, axis=1), 1, rtol=1e-5)
  assert float(aux["scale"]) == pytest.approx(10.0) and float(aux["bias"]) == -10.0
  if share:
    assert "backbone" in params and "backbone" not in params["text"]
    assert set(params["image"]) == {"encoder", "head"}
    assert set(params["image"]["encoder"]) == {"stem"}  # the shared backbone runs inside
    # A checkpoint of the layout before the encoder protocol (image/stem) still loads.
    from datong.train import warmstart  # pylint: disable=import-outside-toplevel
    old = {**params, "image": {"stem": params["image"]["encoder"]["stem"],
                               "head": params["image"]["head"]}}
    old = jax.tree.map(lambda a: a + 1.0, old)
    merged = warmstart.merge(params, old)
    np.testing.assert_array_equal(merged["image"]["encoder"]["stem"]["projection"]["kernel"],
                                  old["image"]["stem"]["projection"]["kernel"])
  else:
    assert "backbone" not in params and "backbone" in params["image"]["encoder"]
    assert "backbone" in params["text"]


@pytest.mark.parametrize("pool,causal", [("eos", True), ("mean", False), ("cls", False)])
def test_text_embedding_ignores_padding(pool, causal):
  cfg = _model(pool=pool, causal=causal, length=24)
  tok = ByteTokenizer()
  short, long = clip.tokenize(["four"], tok, 12, pool=pool), clip.tokenize(["four"], tok, 24, pool=pool)
  assert (short[0, :6] == long[0, :6]).all() and (long[0, 12:] == tok.pad_id).all()
  model = clip.CLIP(cfg, pad_id=tok.pad_id, eos_id=tok.eos_id)
  params = model.init(jax.random.PRNGKey(1), jnp.zeros((1, 8, 8, 1)), long)["params"]
  enc = lambda ids: model.apply({"params": params}, ids, method="encode_text")
  _close(enc(short), enc(long), 1e-5)


def test_caption_augmentation_deletes_and_inserts_words():
  rng = np.random.default_rng(0)
  caption = b"the scan of one handwritten seven"
  assert clip_tasks.augment_caption(caption, rng) == caption.decode()
  words = caption.decode().split()
  for _ in range(20):
    out = clip_tasks.augment_caption(caption, rng, word_dropout=0.3, noise_words=1.0).split()
    kept = [w for w in out if w in words]
    assert kept == [w for w in words if w in kept]  # order kept, only deletions
    assert all(w.isalpha() and w.islower() for w in out)


# ------------------------------------------------------- engine, recipes, LiT

def _tiny_run(name, tmp_path, **task_changes):
  from datong.train import recipes  # pylint: disable=import-outside-toplevel
  from datong.train.config import TrainConfig  # pylint: disable=import-outside-toplevel
  cfg = recipes.get(name)
  task = dataclasses.replace(cfg.task, model=dataclasses.replace(
      _model(loss=cfg.task.model.loss, length=48), text_causal=cfg.task.model.text_causal,
      text_pool=cfg.task.model.text_pool), eval_batch_size=184, **task_changes)
  if task.chunk_size:
    task = dataclasses.replace(task, chunk_size=4)
  return dataclasses.replace(cfg, task=task, train=TrainConfig(
      steps=2, batch_size=8, log_every=1, checkpoint_every=0))


def _check_metrics(result, name):
  m = result.metrics
  assert result.step == 2 and np.isfinite(m["train/loss"]) and np.isfinite(m["eval/loss"])
  for k in ("eval/zero_shot_accuracy", "eval/i2t_recall@1", "eval/t2i_recall@5"):
    assert 0.0 <= m[k] <= 1.0, k
  assert ("train/bias" in m) == (name == "siglip-digits")


def test_clip_recipe_trains_real_steps_through_the_engine(tmp_path):
  from datong.train import loop, recipes  # pylint: disable=import-outside-toplevel
  for name in ("clip-digits", "siglip-digits"):
    full = recipes.get(name).task.build()
    assert full.flops_per_example() > 1e6 and full.tokens_per_example() > 48
  result = loop.train(_tiny_run("clip-digits", tmp_path), str(tmp_path / "clip"), progress=False)
  _check_metrics(result, "clip-digits")


def test_siglip_recipe_with_lit_locks_every_image_parameter_bitwise(tmp_path):
  """The siglip-digits recipe's engine step, as LiT: the image tower is loaded
  from an exported encoder and locked; every image leaf stays bitwise equal."""
  from datong.train import loop  # pylint: disable=import-outside-toplevel
  from datong.train.checkpoint import load_params  # pylint: disable=import-outside-toplevel
  from datong.train.tasks.vision import export_encoder  # pylint: disable=import-outside-toplevel
  # A "pretrained" encoder: the same ViT initialized from another seed.
  model = clip.CLIP(_model(length=48))
  other = nn.unbox(model.init(jax.random.PRNGKey(42), jnp.zeros((1, 8, 8, 1)),
                              jnp.zeros((1, 48), jnp.int32))["params"])
  path = export_encoder({"encoder": other["image"]["encoder"]}, str(tmp_path))
  cfg = _tiny_run("siglip-digits", tmp_path, lock_image="tower", image_init=path)
  cfg = dataclasses.replace(cfg, optimizer=dataclasses.replace(cfg.optimizer, weight_decay=0.1))
  # The engine's own initial state (its init is compiled with other XLA
  # options than a plain model.init, so floats may differ in the last bit).
  init = jax.tree.map(np.asarray, nn.unbox(
      loop.Trainer(cfg, str(tmp_path / "init")).init_state().params))
  _check_metrics(loop.train(cfg, str(tmp_path / "run"), progress=False), "siglip-digits")
  trained = load_params(str(tmp_path / "run"))
  locked = jax.tree_util.tree_leaves_with_path(trained["image"])
  assert len(locked) > 5
  for (path_, new), old in zip(locked, jax.tree.leaves(init["image"])):
    np.testing.assert_array_equal(new, old, err_msg=jax.tree_util.keystr(path_))
  for new, old in zip(jax.tree.leaves(trained["image"]["encoder"]),
                      jax.tree.leaves(other["image"]["encoder"])):
    np.testing.assert_array_equal(new, old)  # loaded from the export, then locked
  moved = [not np.array_equal(a, b) for a, b in
           zip(jax.tree.leaves(trained["text"]), jax.tree.leaves(init["text"]))]
  assert all(moved) and trained["log_scale"] != init["log_scale"]

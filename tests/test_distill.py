"""Teachers and students: the distillation losses against their definitions,
frozen and EMA teachers in the engine, and the distillation tasks."""

import dataclasses

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from datong.multimodal.contrastive import nt_xent_loss
from datong.ops import distill


def _softmax(x, axis=-1):
  e = np.exp(x - x.max(axis, keepdims=True))
  return e / e.sum(axis, keepdims=True)


# ----------------------------------------------------------------- the losses

def test_kd_loss_equals_its_definition_and_is_zero_when_the_student_matches():
  rng = np.random.default_rng(0)
  s, t = rng.normal(size=(5, 7)) * 2, rng.normal(size=(5, 7)) * 2
  labels = rng.integers(0, 7, size=5)
  temp, alpha = 3.0, 0.7
  p, q = _softmax(t / temp), _softmax(s / temp)
  kl = np.mean(np.sum(p * (np.log(p) - np.log(q)), -1))
  hard = np.mean(-np.log(_softmax(s)[np.arange(5), labels]))
  loss, metrics = distill.kd_loss(jnp.asarray(s), jnp.asarray(t), jnp.asarray(labels),
                                  temperature=temp, alpha=alpha)
  np.testing.assert_allclose(loss, alpha * temp ** 2 * kl + (1 - alpha) * hard, rtol=1e-5)
  np.testing.assert_allclose(metrics["hard"], hard, rtol=1e-5)
  same, _ = distill.kd_loss(jnp.asarray(t), jnp.asarray(t), temperature=temp)
  np.testing.assert_allclose(same, 0.0, atol=1e-6)
  # The gradient of the soft term vanishes at the teacher's logits too.
  grad = jax.grad(lambda x: distill.kd_loss(x, jnp.asarray(t), temperature=temp)[0])(
      jnp.asarray(t))
  np.testing.assert_allclose(grad, 0.0, atol=1e-6)
  # A masked row does not count.
  mask = np.array([1, 1, 1, 1, 0], bool)
  masked, _ = distill.kd_loss(jnp.asarray(s), jnp.asarray(t), temperature=temp, mask=mask)
  np.testing.assert_allclose(
      masked, temp ** 2 * np.mean(np.sum(p * (np.log(p) - np.log(q)), -1)[:4]), rtol=1e-5)
  with pytest.raises(ValueError, match="pass labels"):
    distill.kd_loss(jnp.asarray(s), jnp.asarray(t), alpha=0.5)
  with pytest.raises(ValueError, match="temperature"):
    distill.kd_loss(jnp.asarray(s), jnp.asarray(t), temperature=0.0)


def test_whitening_and_feature_losses_equal_their_definitions():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(2, 3, 6)) * 4 + 2
  w = np.asarray(distill.whiten(jnp.asarray(x), eps=1e-6))
  mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
  np.testing.assert_allclose(w, (x - mu) / np.sqrt(var + 1e-6), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(w.mean(-1), 0.0, atol=1e-5)
  np.testing.assert_allclose(w.std(-1), 1.0, rtol=1e-4)
  pred = rng.normal(size=(2, 3, 6))
  d = np.abs(pred - w)
  want = np.mean(np.where(d < 1.0, 0.5 * d * d, d - 0.5))
  loss, _ = distill.feature_loss(jnp.asarray(pred), jnp.asarray(x), kind="smooth_l1")
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  cos = np.sum(pred * w, -1) / np.linalg.norm(pred, axis=-1) / np.linalg.norm(w, axis=-1)
  loss, metrics = distill.feature_loss(jnp.asarray(pred), jnp.asarray(x), kind="cosine")
  np.testing.assert_allclose(loss, np.mean(1 - cos), rtol=1e-5)
  np.testing.assert_allclose(metrics["cosine"], np.mean(cos), rtol=1e-5)
  with pytest.raises(ValueError, match="kind"):
    distill.feature_loss(jnp.asarray(pred), jnp.asarray(x), kind="l2")


def test_nt_xent_equals_a_hand_computation_and_ignores_the_batch_order():
  rng = np.random.default_rng(2)
  b, temp = 4, 0.5
  z1, z2 = rng.normal(size=(b, 3)), rng.normal(size=(b, 3))
  z = np.concatenate([z1, z2])
  z = z / np.linalg.norm(z, axis=1, keepdims=True)
  total = 0.0
  for i in range(2 * b):
    pos = (i + b) % (2 * b)
    sims = [np.exp(z[i] @ z[k] / temp) for k in range(2 * b) if k != i]
    total += -np.log(np.exp(z[i] @ z[pos] / temp) / np.sum(sims))
  loss, _ = nt_xent_loss(jnp.asarray(z1), jnp.asarray(z2), temp)
  np.testing.assert_allclose(loss, total / (2 * b), rtol=1e-5)
  perm = rng.permutation(b)
  shuffled, _ = nt_xent_loss(jnp.asarray(z1[perm]), jnp.asarray(z2[perm]), temp)
  np.testing.assert_allclose(shuffled, loss, rtol=1e-6)
  swapped, _ = nt_xent_loss(jnp.asarray(z2), jnp.asarray(z1), temp)
  np.testing.assert_allclose(swapped, loss, rtol=1e-6)
  # Padding rows are neither queries nor candidates.
  pad = np.concatenate([z1, rng.normal(size=(2, 3))]), np.concatenate([z2, rng.normal(size=(2, 3))])
  masked, _ = nt_xent_loss(jnp.asarray(pad[0]), jnp.asarray(pad[1]), temp,
                           mask=np.arange(b + 2) < b)
  np.testing.assert_allclose(masked, loss, rtol=1e-5)


def test_dino_centering_and_sharpening_against_hand_computations():
  rng = np.random.default_rng(3)
  vt, vs, b, k = 2, 4, 3, 5
  t, s = rng.normal(size=(vt, b, k)), rng.normal(size=(vs, b, k))
  center = rng.normal(size=(k,))
  tt, st = 0.04, 0.1
  targets = _softmax((t - center) / tt)
  np.testing.assert_allclose(distill.dino_teacher_probs(jnp.asarray(t), jnp.asarray(center), tt),
                             targets, rtol=1e-5, atol=1e-7)
  logq = np.log(_softmax(s / st))
  terms = [-np.sum(targets[i] * logq[j], -1) for i in range(vt) for j in range(vs) if i != j]
  loss, metrics = distill.dino_loss(jnp.asarray(s), jnp.asarray(t), jnp.asarray(center),
                                    student_temperature=st, teacher_temperature=tt)
  np.testing.assert_allclose(loss, np.mean(terms), rtol=1e-5)
  np.testing.assert_allclose(metrics["teacher_mean"], t.mean((0, 1)), rtol=1e-5)
  # Sharpening: a lower teacher temperature gives lower-entropy targets.
  _, sharper = distill.dino_loss(jnp.asarray(s), jnp.asarray(t), jnp.asarray(center),
                                 teacher_temperature=0.02)
  assert float(sharper["teacher_entropy"]) < float(metrics["teacher_entropy"])
  # The center's EMA: c' = m c + (1 - m) mean.
  new = distill.ema_update(jnp.asarray(center), metrics["teacher_mean"], 0.9)
  np.testing.assert_allclose(new, 0.9 * center + 0.1 * t.mean((0, 1)), rtol=1e-5)
  # No gradient flows into the teacher's side.
  g = jax.grad(lambda x: distill.dino_loss(jnp.asarray(s), x, jnp.asarray(center))[0])(
      jnp.asarray(t))
  np.testing.assert_array_equal(g, 0.0)


def test_cosine_momentum_goes_from_base_to_one():
  m = [float(distill.cosine_momentum(s, 10, 0.9)) for s in (0, 5, 10, 20)]
  np.testing.assert_allclose(m, [0.9, 0.95, 1.0, 1.0], rtol=1e-6)


# --------------------------------------------------------- frozen teachers

from datong.backbone import TransformerConfig  # pylint: disable=wrong-import-position
from datong.train import loop, writers  # pylint: disable=wrong-import-position
from datong.train import checkpoint as ckpt_lib  # pylint: disable=wrong-import-position
from datong.train import data as data_lib  # pylint: disable=wrong-import-position
from datong.train.config import (MeshConfig, OptimizerConfig, RunConfig,  # pylint: disable=wrong-import-position
                                 TrainConfig)
from datong.train.tasks.distill import LogitDistillConfig  # pylint: disable=wrong-import-position
from datong.train.tasks.images import ImageData  # pylint: disable=wrong-import-position
from datong.train.tasks.vision import ViTClassifierConfig  # pylint: disable=wrong-import-position
from datong.unimodal.vision import ViTConfig  # pylint: disable=wrong-import-position


def _classifier(width, depth=1):
  model = ViTConfig(TransformerConfig(width=width, depth=depth, heads=2, mlp_dim=2 * width),
                    image_size=(8, 8), patch_size=(4, 4), channels=1, pool="gap")
  return ViTClassifierConfig(model=model, data=ImageData(shift=1.0))


def _run(task, steps=2, mesh=(1, 1, 1)):
  return RunConfig(task=task, train=TrainConfig(steps=steps, batch_size=16, log_every=1,
                                                checkpoint_every=0, seed=0),
                   optimizer=OptimizerConfig(learning_rate=3e-3, warmup_steps=0),
                   mesh=MeshConfig(*mesh))


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
  """A tiny ViT classifier run (the teacher) trained for 3 steps."""
  workdir = str(tmp_path_factory.mktemp("teacher"))
  loop.train(_run(_classifier(16), steps=3), workdir, progress=False, evaluate=False,
             devices=jax.devices()[:1])
  return workdir


def _sizes(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def test_a_frozen_teacher_gets_no_gradient_no_optimizer_state_and_never_moves(
    teacher_run, tmp_path):
  cfg = _run(LogitDistillConfig(student=_classifier(8), teacher=teacher_run, temperature=2.0,
                                alpha=0.5))
  trainer = loop.Trainer(cfg, str(tmp_path), devices=jax.devices()[:1])
  params = trainer.abstract_state.params
  student = _sizes(params) - _sizes(params["teacher"])
  assert 2 * student <= _sizes(trainer.abstract_state.opt_state) < 2 * student + 8
  state = trainer.init_state()
  stored = ckpt_lib.load_params(teacher_run)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params["teacher"]), stored)
  it = trainer.train_iterator()
  batch = data_lib.to_global(next(it), trainer.batch_sharding)
  it.close()
  grads = jax.grad(lambda p: trainer.task.loss(p, batch, jax.random.PRNGKey(0))[0])(
      jax.device_get(state.params))
  assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(grads["teacher"]))
  assert np.any(np.asarray(grads["head"]["kernel"]) != 0)  # the encoder: zero head at init
  before = jax.device_get(state.params)
  for _ in range(2):
    state, metrics = trainer.step(state, batch)
  after = jax.device_get(state.params)
  jax.tree.map(np.testing.assert_array_equal, after["teacher"], before["teacher"])
  assert not np.array_equal(after["head"]["kernel"], before["head"]["kernel"])
  assert np.isfinite(float(metrics["train/loss"]))


def test_a_sharded_teacher_and_student_step_gives_the_unsharded_losses(teacher_run, tmp_path):
  task = LogitDistillConfig(student=_classifier(8), teacher=teacher_run, alpha=0.7)
  losses = {}
  for mesh in [(1, 1, 1), (2, 2, 2)]:
    workdir = str(tmp_path / "x".join(map(str, mesh)))
    loop.train(_run(task, steps=3, mesh=mesh), workdir, progress=False, evaluate=False,
               devices=jax.devices()[:int(np.prod(mesh))])
    losses[mesh] = [r["train/loss"] for r in writers.read_metrics(workdir) if "train/loss" in r]
  assert len(losses[(1, 1, 1)]) == 3
  np.testing.assert_allclose(losses[(2, 2, 2)], losses[(1, 1, 1)], rtol=2e-5)


def test_bad_teachers_are_refused_with_the_fix_named(teacher_run, tmp_path):
  with pytest.raises(ValueError, match="task.teacher="):
    LogitDistillConfig(student=_classifier(8)).build()
  path = str(tmp_path / "t.msgpack")
  import flax  # pylint: disable=import-outside-toplevel
  with open(path, "wb") as f:
    f.write(flax.serialization.msgpack_serialize(ckpt_lib.load_params(teacher_run)))
  with pytest.raises(ValueError, match="teacher_model"):
    LogitDistillConfig(student=_classifier(8), teacher=path).build()
  task = LogitDistillConfig(student=_classifier(8), teacher=path,
                            teacher_model=_classifier(16)).build()
  assert "teacher" in task.init(jax.random.PRNGKey(0), task.batch_spec(2))["params"]
  with pytest.raises(ValueError, match="alpha"):
    LogitDistillConfig(student=_classifier(8), alpha=1.5)


# --------------------------------------------------- features and sequences

from datong.ops.distill import whiten  # pylint: disable=wrong-import-position
from datong.train.tasks.distill import FeatureDistillConfig  # pylint: disable=wrong-import-position


def test_feature_distillation_targets_the_named_teacher_layer_across_widths_and_grids(
    teacher_run, tmp_path):
  student = ViTConfig(TransformerConfig(width=8, depth=1, heads=2, mlp_dim=16),
                      image_size=(8, 8), patch_size=(2, 2), channels=1, pool="gap")
  cfg = FeatureDistillConfig(student=student, teacher=teacher_run, layer="layer_0",
                             loss="smooth_l1", beta=2.0)
  task = cfg.build()
  params = jax.device_get(nn_unbox(task.init(jax.random.PRNGKey(0), task.batch_spec(4))["params"]))
  assert params["head"]["kernel"].shape == (8, 16)  # student width -> teacher width
  stored = ckpt_lib.load_params(teacher_run)
  jax.tree.map(np.testing.assert_array_equal, params["teacher"], stored["encoder"])
  images = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (4, 8, 8, 1)), jnp.float32)
  _, aux = _classifier(16).model.make().apply({"params": stored["encoder"]}, images,
                                              return_layers=True)
  block0 = aux["layers"][0][:, -4:].reshape(4, 2, 2, 16)  # the teacher's 2x2 grid
  want = jax.image.resize(block0, (4, 4, 4, 16), "linear").reshape(4, 16, 16)
  got = task.teacher_tokens(params, images, student.grid)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  loss, _ = task.loss(params, {"image": images, "label": jnp.zeros(4, jnp.int32)},
                      jax.random.PRNGKey(1), train=False)
  pred, _ = task.model.apply({"params": {k: params[k] for k in ("encoder", "head")}}, images)
  d = np.abs(np.asarray(pred) - np.asarray(whiten(want)))
  np.testing.assert_allclose(loss, np.mean(np.where(d < 2.0, 0.25 * d * d, d - 1.0)), rtol=1e-5)
  result = loop.train(_run(cfg, steps=2), str(tmp_path), progress=False,
                      devices=jax.devices()[:1])
  assert np.isfinite(result.metrics["train/loss"]) and 0 < result.metrics["eval/knn_accuracy"]
  with pytest.raises(ValueError, match="has 1 blocks"):
    FeatureDistillConfig(student=student, teacher=teacher_run, layer="layer_3").build()
  with pytest.raises(ValueError, match="layer_K"):
    FeatureDistillConfig(student=student, teacher=teacher_run, layer="block3")


def nn_unbox(tree):
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  return nn.unbox(tree)


def _gpt(width, **kw):
  from datong.train.tasks.text import GPTTaskConfig  # pylint: disable=import-outside-toplevel
  from datong.unimodal.text import TextConfig  # pylint: disable=import-outside-toplevel
  return GPTTaskConfig(model=TextConfig(TransformerConfig(width=width, depth=1, heads=2,
                                                          mlp_dim=2 * width)),
                       seq_length=16, tokenizer="byte", **kw)


def _gpt_teacher(tmp_path, **kw):
  """``(teacher config, its .msgpack path, its module, its params)``: fresh, width 16."""
  import flax  # pylint: disable=import-outside-toplevel
  teacher = _gpt(16, **kw)
  fresh = teacher.build()
  tparams = nn_unbox(fresh.init(jax.random.PRNGKey(3), fresh.batch_spec(2))["params"])
  path = str(tmp_path / "gpt.msgpack")
  with open(path, "wb") as f:
    f.write(flax.serialization.msgpack_serialize(jax.device_get(tparams)))
  return teacher, path, fresh, tparams


def _gpt_batch():
  rng = np.random.default_rng(0)
  batch = {"inputs": rng.integers(3, 200, (2, 16)), "targets": rng.integers(3, 200, (2, 16)),
           "loss_weights": np.array([[1.0] * 16, [1.0] * 10 + [0.0] * 6], np.float32),
           "segment_ids": np.ones((2, 16), np.int32),
           "positions": np.tile(np.arange(16), (2, 1))}
  return {k: jnp.asarray(v) for k, v in batch.items()}


def test_gpt_logit_distillation_over_every_real_position_and_a_shared_tokenizer(tmp_path):
  teacher, path, fresh, tparams = _gpt_teacher(tmp_path)
  task = LogitDistillConfig(student=_gpt(8), teacher=path, teacher_model=teacher,
                            temperature=1.5, alpha=0.6).build()
  params = nn_unbox(task.init(jax.random.PRNGKey(0), task.batch_spec(2))["params"])
  batch = _gpt_batch()
  loss, _ = task.loss(params, batch, jax.random.PRNGKey(0), train=False)
  apply = lambda m, p: m.apply({"params": p}, batch["inputs"], segment_ids=batch["segment_ids"],
                               positions=batch["positions"])[0]
  s = np.asarray(apply(task.inner.model, {k: v for k, v in params.items() if k != "teacher"}))
  t = np.asarray(apply(fresh.model, tparams))
  v = task.inner.tokenizer.vocab_size
  s, t = s[..., :v].astype(np.float64), t[..., :v].astype(np.float64)
  p, q = _softmax(t / 1.5), _softmax(s / 1.5)
  kl = np.sum(p * (np.log(p) - np.log(q)), -1)
  nll = -np.log(np.take_along_axis(_softmax(s), np.asarray(batch["targets"])[..., None], -1))[..., 0]
  real = np.asarray(batch["loss_weights"]) > 0
  want = 0.6 * 1.5 ** 2 * kl[real].mean() + 0.4 * nll[real].mean()
  np.testing.assert_allclose(loss, want, rtol=1e-4)
  other = dataclasses.replace(teacher, tokenizer="bpe:512")
  with pytest.raises(ValueError, match="teacher's tokenizer 'bpe:512' is not the student's 'byte'"):
    LogitDistillConfig(student=_gpt(8), teacher=path, teacher_model=other).build()


def test_precomputed_teacher_logits_give_the_in_step_loss_and_gradients_without_a_teacher(
    tmp_path):
  from jax.extend.core import Var  # pylint: disable=import-outside-toplevel
  from datong.train.tasks.teacher_outputs import precompute_logits  # pylint: disable=import-outside-toplevel
  teacher, path, _, _ = _gpt_teacher(tmp_path)
  make = lambda **kw: LogitDistillConfig(student=_gpt(8), teacher=path, teacher_model=teacher,
                                         temperature=1.5, alpha=0.6, **kw).build()
  in_step = make()
  params = nn_unbox(in_step.init(jax.random.PRNGKey(0), in_step.batch_spec(2))["params"])
  batch = _gpt_batch()
  grad = lambda task, b: jax.jit(jax.value_and_grad(lambda p: task.loss(
      p, b, jax.random.PRNGKey(0), train=False)[0]))(params)
  want = grad(in_step, batch)
  def reads_teacher(task, b):
    jaxpr = jax.make_jaxpr(lambda t: task.loss({**params, "teacher": t}, b,
                                               jax.random.PRNGKey(0)))(params["teacher"]).jaxpr
    used = {v for e in jaxpr.eqns for v in e.invars if isinstance(v, Var)}
    return bool(set(jaxpr.invars) & used)
  for dtype, tol in (("float32", 1e-5), ("float16", 2e-3), ("bfloat16", 2e-2)):
    task = make(teacher_outputs="precomputed", teacher_dtype=dtype)
    assert task.batch_spec(2)["teacher_logits"].shape == (2, 16, task.vocab)
    logits = precompute_logits(task.teacher_forward, params["teacher"], batch, vocab=task.vocab,
                               dtype=dtype, batch_size=4)
    assert logits.dtype == jnp.dtype(dtype)
    got = grad(task, {**batch, "teacher_logits": logits})
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(g, w, rtol=tol, atol=tol * 1e-2)
    # The teacher's forward is not in the precomputed step: its params are never read.
    assert reads_teacher(in_step, batch) and not reads_teacher(task, {**batch,
                                                                      "teacher_logits": logits})
    assert task.flops_per_example() < in_step.flops_per_example()


def test_a_precomputed_teacher_run_resumes_bitwise_and_images_refuse_it(tmp_path):
  captions = {"dataset": "digit_captions", "text_feature": "caption", "eval_split": "test"}
  teacher, path, _, _ = _gpt_teacher(tmp_path, **captions)
  cfg = _run(LogitDistillConfig(student=_gpt(8, **captions), teacher=path, teacher_model=teacher,
                                teacher_outputs="precomputed"), steps=4)
  task = cfg.task.build()
  src, rows = task.source("train"), task.inner.source("train")
  assert len(src) == len(rows) and src[5]["teacher_logits"].shape == (16, task.vocab)
  np.testing.assert_array_equal(src.arrays["inputs"], rows.arrays["inputs"])
  full, half, one = str(tmp_path / "full"), str(tmp_path / "half"), jax.devices()[:1]
  loop.train(cfg, full, progress=False, evaluate=False, devices=one)
  loop.train(cfg, half, progress=False, evaluate=False, stop_at=2, devices=one)
  loop.train(cfg, half, progress=False, evaluate=False, devices=one)
  jax.tree.map(np.testing.assert_array_equal, ckpt_lib.load_params(half),
               ckpt_lib.load_params(full))
  for make, student in ((LogitDistillConfig, _classifier(8)),
                        (FeatureDistillConfig, _classifier(8).model)):
    with pytest.raises(ValueError, match="augmented anew at every step.*=in_step"):
      make(student=student, teacher_outputs="precomputed")
  with pytest.raises(ValueError, match="teacher_dtype='int8': one of"):
    LogitDistillConfig(student=_gpt(8), teacher_outputs="precomputed", teacher_dtype="int8")


# ------------------------------------------------------------------ recipes

NEW_RECIPES = ["distill-vit-digits", "distill-gpt-pydoc", "fd-clip-digits", "simclr-digits",
               "dino-digits"]


def test_the_new_recipes_are_registered_and_documented():
  from datong.train import recipes  # pylint: disable=import-outside-toplevel
  described = recipes.describe()
  for name in NEW_RECIPES:
    assert described[name]
    assert "BENCHMARKS.md" in recipes.module(name).__doc__  # where its measured run is


@pytest.mark.parametrize("name", NEW_RECIPES)
def test_a_new_recipe_compiles_on_a_2x2x2_mesh(name, tmp_path):
  """Teachers: a ``.msgpack`` of fresh params of the recipe's ``teacher_model``."""
  import flax  # pylint: disable=import-outside-toplevel
  from datong.train import config as config_lib  # pylint: disable=import-outside-toplevel
  from datong.train import recipes  # pylint: disable=import-outside-toplevel
  cfg = config_lib.override(recipes.get(name), {"mesh.data": "2", "mesh.fsdp": "2",
                                                "mesh.tensor": "2"})
  settings = getattr(cfg.task, "teacher_model", None)
  if settings is not None:
    if hasattr(settings, "build"):
      task = settings.build()
      params = task.init(jax.random.PRNGKey(0), task.batch_spec(1))["params"]
    else:
      shape = (1,) + tuple(settings.image_size) + (settings.channels,)
      params = settings.make().init(jax.random.PRNGKey(0), jnp.zeros(shape))["params"]
    path = str(tmp_path / "teacher.msgpack")
    with open(path, "wb") as f:
      f.write(flax.serialization.msgpack_serialize(jax.device_get(nn_unbox(params))))
    cfg = config_lib.override(cfg, {"task.teacher": path})
  compiled = loop.Trainer(cfg, str(tmp_path / "run")).compile()
  assert compiled.memory_analysis() is not None


def test_a_hugging_face_directory_is_a_teacher_for_logits_and_for_features(tmp_path):
  from datong import hf  # pylint: disable=import-outside-toplevel
  from datong.unimodal.encoders import ImageClassifier  # pylint: disable=import-outside-toplevel
  cfg = ViTConfig(TransformerConfig(width=16, depth=1, heads=2, mlp_dim=32), image_size=(8, 8),
                  patch_size=(4, 4), channels=1, pool="cls")
  model = ImageClassifier(cfg, 10)
  images = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (3, 8, 8, 1)), jnp.float32)
  params = nn_unbox(model.init(jax.random.PRNGKey(0), images)["params"])
  params["head"]["kernel"] = jax.random.normal(jax.random.PRNGKey(1), (16, 10))
  path = hf.save(model, params, str(tmp_path / "hf"))
  task = LogitDistillConfig(student=_classifier(8), teacher=path).build()
  got = nn_unbox(task.init(jax.random.PRNGKey(2), task.batch_spec(3))["params"])
  np.testing.assert_allclose(task.teacher_logits(got, images), model.apply(
      {"params": params}, images)[0], rtol=1e-5, atol=1e-5)
  student = ViTConfig(TransformerConfig(width=8, depth=1, heads=2, mlp_dim=16),
                      image_size=(8, 8), patch_size=(4, 4), channels=1, pool="gap")
  fd = FeatureDistillConfig(student=student, teacher=path).build()
  fparams = nn_unbox(fd.init(jax.random.PRNGKey(2), fd.batch_spec(3))["params"])
  _, aux = cfg.make().apply({"params": params["encoder"]}, images)
  np.testing.assert_allclose(fd.teacher_tokens(fparams, images, student.grid),
                             aux["patch_tokens"], rtol=1e-5, atol=1e-5)


def test_deit_distillation_token_head_learns_from_the_teacher_and_the_class_head_from_labels(
    teacher_run):
  task = LogitDistillConfig(student=_classifier(8), teacher=teacher_run, temperature=2.0,
                            alpha=0.3, distill_token=True).build()
  params = nn_unbox(task.init(jax.random.PRNGKey(0), task.batch_spec(4))["params"])
  assert params["encoder"]["distill_token"].shape == (8,) and "distill_head" in params
  assert task.inner.config.model.num_tokens == 4 + 1  # 2x2 patches + the distillation token
  rng = np.random.default_rng(0)
  # Non-zero heads, so both terms and both heads matter.
  for name in ("head", "distill_head"):
    params[name]["kernel"] = jnp.asarray(rng.normal(size=(8, 10)), jnp.float32)
  images = jnp.asarray(rng.uniform(-1, 1, (4, 8, 8, 1)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 10, 4), jnp.int32)
  loss, _ = task.loss(params, {"image": images, "label": labels}, jax.random.PRNGKey(0),
                      train=False)
  student = {k: v for k, v in params.items() if k != "teacher"}
  logits, aux = task.inner.model.apply({"params": student}, images)
  t = np.asarray(task.teacher_logits(params, images), np.float64)
  c, d = np.asarray(aux["class_logits"], np.float64), np.asarray(aux["distill_logits"], np.float64)
  assert not np.allclose(c, d)
  p, q = _softmax(t / 2.0), _softmax(d / 2.0)
  kl = np.mean(np.sum(p * (np.log(p) - np.log(q)), -1))
  ce = np.mean(-np.log(_softmax(c)[np.arange(4), np.asarray(labels)]))
  np.testing.assert_allclose(loss, 0.3 * 4.0 * kl + 0.7 * ce, rtol=1e-5)
  # The prediction averages the two heads' softmax.
  np.testing.assert_allclose(_softmax(np.asarray(logits, np.float64)),
                             0.5 * (_softmax(c) + _softmax(d)), rtol=1e-5, atol=1e-7)
  with pytest.raises(ValueError, match="distill_token"):
    from datong.train.tasks.text import GPTTaskConfig  # pylint: disable=import-outside-toplevel
    LogitDistillConfig(student=GPTTaskConfig(), distill_token=True)


def test_a_vit_with_a_distillation_token_is_not_exported_to_hugging_face(tmp_path):
  from datong import hf  # pylint: disable=import-outside-toplevel
  from datong.unimodal.encoders import DistilledClassifier  # pylint: disable=import-outside-toplevel
  cfg = ViTConfig(TransformerConfig(width=16, depth=1, heads=2, mlp_dim=32), image_size=(8, 8),
                  patch_size=(4, 4), channels=1, pool="cls", distill_token=True)
  from datong.unimodal.encoders import ImageClassifier  # pylint: disable=import-outside-toplevel
  model = ImageClassifier(cfg, 10)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)))["params"]
  with pytest.raises(hf.UnsupportedError, match="distill_token"):
    hf.save(model, params, str(tmp_path / "hf"))
  with pytest.raises(ValueError, match="distill_token=True"):
    DistilledClassifier(cfg.replace(distill_token=False), 10).init(
        jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)))

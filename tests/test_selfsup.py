"""Self-supervised image learning through the engine: the two-view / multi-crop
augmentation, SimCLR, and DINO's EMA teacher, center, schedules and resume.
(The losses themselves are checked against hand computations in
``tests/test_distill.py``.)"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from datong.backbone import TransformerConfig
from datong.train import checkpoint as ckpt_lib
from datong.train import data as data_lib
from datong.train import loop
from datong.train.config import MeshConfig, OptimizerConfig, RunConfig, TrainConfig
from datong.train.tasks.images import ImageData
from datong.train.tasks.selfsup import DINOConfig, SimCLRConfig
from datong.train.tasks.views import ViewData
from datong.unimodal.selfsup import SelfSupConfig
from datong.unimodal.vision import ViTConfig


def _run(task, steps=2):
  return RunConfig(task=task, train=TrainConfig(steps=steps, batch_size=16, log_every=1,
                                                checkpoint_every=0, seed=0),
                   optimizer=OptimizerConfig(learning_rate=3e-3, warmup_steps=0),
                   mesh=MeshConfig(1, 1, 1))


def _sizes(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def test_views_are_deterministic_per_example_and_seed_and_eval_is_the_plain_image():
  example = {"image": np.random.default_rng(0).integers(0, 256, (8, 8, 1)).astype(np.uint8),
             "label": 3}
  data = ViewData(global_size=(16, 16), local_size=(8, 8), global_views=2, local_views=3)
  a = data(example, np.random.default_rng(7), True)
  b = data(example, np.random.default_rng(7), True)
  c = data(example, np.random.default_rng(8), True)
  assert a["global"].shape == (2, 16, 16, 1) and a["local"].shape == (3, 8, 8, 1)
  np.testing.assert_array_equal(a["global"], b["global"])
  np.testing.assert_array_equal(a["local"], b["local"])
  assert not np.allclose(a["global"], c["global"])
  assert not np.allclose(a["global"][0], a["global"][1])  # two different views
  assert a["global"].min() >= -1 and a["global"].max() <= 1 and int(a["label"]) == 3
  # Evaluation: the whole image, resized exactly like the vision tasks' upsampling.
  plain = data(example, np.random.default_rng(0), False)
  np.testing.assert_allclose(plain["image"], ImageData(upsample=2)(example, None, False)["image"],
                             atol=1e-5)
  # A full crop with no jitter, blur or flip is that same image; flips only when asked.
  still = ViewData(global_size=(16, 16), global_scale=(1.0, 1.0), ratio=(1.0, 1.0), jitter=0.0,
                   blur=0.0)
  np.testing.assert_allclose(still(example, np.random.default_rng(1), True)["global"][0],
                             plain["image"], atol=1e-5)
  flips = dataclasses.replace(still, flip=True)
  views = [flips(example, np.random.default_rng(s), True)["global"][0] for s in range(8)]
  assert any(np.allclose(v, plain["image"][:, ::-1], atol=1e-5) for v in views)
  with pytest.raises(ValueError, match="global_scale"):
    ViewData(global_scale=(0.5, 1.5))


def _encoder(width=8):
  return ViTConfig(TransformerConfig(width=width, depth=1, heads=2, mlp_dim=2 * width),
                   image_size=(16, 16), patch_size=(4, 4), channels=1, pool="gap")


def _dino(momentum_steps=4):
  return DINOConfig(model=SelfSupConfig(_encoder(), head="dino", hidden=16, bottleneck=8,
                                        out_dim=12),
                    data=ViewData(global_size=(16, 16), local_size=(8, 8), local_views=2),
                    momentum_steps=momentum_steps, teacher_momentum=0.9, center_momentum=0.8)


def test_dino_prototypes_are_cosines_whatever_the_weights_scale():
  from datong.unimodal.selfsup import Prototypes  # pylint: disable=import-outside-toplevel
  rs = np.random.RandomState(0)
  x = rs.randn(5, 8).astype(np.float32)
  x /= np.linalg.norm(x, axis=-1, keepdims=True)
  layer = Prototypes(6)
  params = layer.init(jax.random.PRNGKey(0), x)
  w = np.asarray(params["params"]["kernel"].unbox())
  out = np.asarray(layer.apply(params, x))
  np.testing.assert_allclose(out, x @ (w / np.linalg.norm(w, axis=0, keepdims=True)), atol=1e-6)
  assert np.all(np.abs(out) <= 1 + 1e-6)
  shrunk = jax.tree.map(lambda p: p * 1e-3, params)  # shrinking the weights changes nothing
  np.testing.assert_allclose(np.asarray(layer.apply(shrunk, x)), out, atol=1e-5)


def test_the_dino_ema_teacher_and_center_follow_their_formulas(tmp_path):
  cfg = _run(_dino(), steps=4)
  trainer = loop.Trainer(cfg, str(tmp_path / "one"), devices=jax.devices()[:1])
  params = trainer.abstract_state.params
  frozen = _sizes(params["teacher"]) + _sizes(params["center"])
  student = _sizes(params) - frozen
  assert 2 * student <= _sizes(trainer.abstract_state.opt_state) < 2 * student + 8
  state = trainer.init_state()
  p0 = jax.device_get(state.params)
  jax.tree.map(np.testing.assert_array_equal, p0["teacher"],
               {"encoder": p0["encoder"], "head": p0["head"]})
  it = trainer.train_iterator()
  batch = data_lib.to_global(next(it), trainer.batch_sharding)
  it.close()
  _, metrics = trainer.task.loss(state.params, batch, jax.random.PRNGKey(0))
  state, _ = trainer.step(state, batch)
  p1 = jax.device_get(state.params)
  m = 0.9  # the cosine schedule's momentum at step 0
  for t1, t0, s1 in zip(jax.tree.leaves(p1["teacher"]), jax.tree.leaves(
      {"encoder": p0["encoder"], "head": p0["head"]}), jax.tree.leaves(
          {"encoder": p1["encoder"], "head": p1["head"]})):
    np.testing.assert_allclose(t1, m * t0 + (1 - m) * s1, rtol=1e-5, atol=1e-7)
  assert not np.array_equal(p1["teacher"]["head"]["prototypes"]["kernel"],
                            p0["teacher"]["head"]["prototypes"]["kernel"])
  assert float(p1["center"]["step"]) == 1.0  # the step count the schedules read
  np.testing.assert_allclose(p1["center"]["mean"],
                             0.2 * np.asarray(metrics["update_stats"]["teacher_mean"]),
                             rtol=1e-5, atol=1e-7)


def test_the_dino_teacher_temperature_schedule_equals_its_formula():
  warm = dataclasses.replace(_dino(), warmup_teacher_temperature=0.02, teacher_temperature=0.06,
                             teacher_temperature_steps=10)
  for step in (0, 1, 5, 9, 10, 11, 100):
    np.testing.assert_allclose(warm.teacher_temperature_at(step),
                               0.02 + min(step / 10, 1.0) * (0.06 - 0.02), rtol=1e-6)
  for step in (0, 7):  # no warmup: constant
    np.testing.assert_allclose(_dino().teacher_temperature_at(step), 0.04, rtol=1e-6)
  with pytest.raises(ValueError, match="warmup_teacher_temperature"):
    dataclasses.replace(_dino(), warmup_teacher_temperature=0.0)
  with pytest.raises(ValueError, match="freeze_prototypes_steps"):
    dataclasses.replace(_dino(), freeze_prototypes_steps=-1)


def test_dino_reads_its_step_frozen_prototypes_get_no_gradient_then_do():
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  cfg = dataclasses.replace(_dino(), warmup_teacher_temperature=0.02, teacher_temperature=0.06,
                            teacher_temperature_steps=10, freeze_prototypes_steps=3)
  task = cfg.build()
  rng = np.random.default_rng(0)
  batch = {k: jnp.asarray(rng.uniform(-1, 1, s.shape) if s.dtype == jnp.float32
                          else rng.integers(0, 10, s.shape), s.dtype)
           for k, s in task.batch_spec(4).items()}
  params = nn.unbox(task.init(jax.random.PRNGKey(0), batch)["params"])
  assert float(params["center"]["step"]) == 0.0

  def grads_at(step):
    p = {**params, "center": {**params["center"], "step": jnp.float32(step)}}
    (_, metrics), g = jax.value_and_grad(lambda q: task.loss(q, batch, jax.random.PRNGKey(1)),
                                        has_aux=True)(p)
    np.testing.assert_allclose(metrics["teacher_temperature"], cfg.teacher_temperature_at(step),
                               rtol=1e-6)
    return g

  for step, frozen in ((0, True), (2, True), (3, False), (8, False)):
    g = grads_at(step)
    proto = np.abs(np.asarray(g["head"]["prototypes"]["kernel"])).max()
    assert (proto == 0.0) == frozen, (step, proto)
    assert np.abs(np.asarray(g["head"]["bottleneck"]["kernel"])).max() > 0  # the rest trains
  # Without freezing, the prototypes train from step 0.
  plain = dataclasses.replace(cfg, freeze_prototypes_steps=0).build()
  g = jax.grad(lambda q: plain.loss(q, batch, jax.random.PRNGKey(1))[0])(params)
  assert np.abs(np.asarray(g["head"]["prototypes"]["kernel"])).max() > 0


def test_a_dino_run_with_its_ema_teacher_and_center_resumes_bitwise(tmp_path):
  dino = _dino()
  cfg = _run(dataclasses.replace(dino, data=dataclasses.replace(dino.data, local_views=0)),
             steps=4)
  full, half, one = str(tmp_path / "full"), str(tmp_path / "half"), jax.devices()[:1]
  loop.train(cfg, full, progress=False, evaluate=False, devices=one)
  loop.train(cfg, half, progress=False, evaluate=False, stop_at=2, devices=one)
  loop.train(cfg, half, progress=False, evaluate=False, devices=one)
  a, b = ckpt_lib.load_params(half), ckpt_lib.load_params(full)
  assert set(a) == {"encoder", "head", "teacher", "center"}
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_simclr_trains_and_is_probed_through_the_engine(tmp_path):
  cfg = _run(SimCLRConfig(model=SelfSupConfig(_encoder(), head="simclr", hidden=16, out_dim=8),
                          data=ViewData(global_size=(16, 16))), steps=2)
  result = loop.train(cfg, str(tmp_path), progress=False, devices=jax.devices()[:1])
  assert np.isfinite(result.metrics["train/loss"])
  assert 0.1 < result.metrics["eval/knn_accuracy"] <= 1.0
  assert (tmp_path / "encoder_params.msgpack").exists()
  # The attention PNG: the 8 test images over one row of maps per head.
  from PIL import Image  # pylint: disable=import-outside-toplevel
  png = np.asarray(Image.open(tmp_path / "attention_step2.png"), np.float32) / 255
  heads, n, size, scale = 2, 8, 16, 4
  assert png.shape == ((1 + heads) * (size + 1) * scale + scale, n * (size + 1) * scale + scale)
  task = cfg.task.build()
  images = np.asarray(next(iter(data_lib.iterate_once(
      task.source(task.eval_split), batch_size=n,
      transform=lambda ex, rng: task.preprocess(ex, rng, False))))["image"])
  first = png[scale:scale + size * scale:scale, scale:scale + size * scale:scale]
  np.testing.assert_allclose(first, (np.clip(images[0, ..., 0], -1, 1) + 1) / 2, atol=1 / 255)
  with pytest.raises(ValueError, match="two global views"):
    SimCLRConfig(model=SelfSupConfig(_encoder()), data=ViewData(local_views=2))
  with pytest.raises(ValueError, match="image_size"):
    SimCLRConfig(model=SelfSupConfig(_encoder()), data=ViewData(global_size=(32, 32))).build()

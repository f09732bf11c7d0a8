"""Joint multi-objective training (``MixtureTask``) on the fake 8-device CPU mesh."""

import dataclasses
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from datong.backbone import TransformerConfig
from datong.train import checkpoint as ckpt_lib
from datong.train import data as data_lib
from datong.train import loop, recipes, writers
from datong.train.config import MeshConfig, OptimizerConfig, RunConfig, TrainConfig
from datong.train.recipes import unified_digits
from datong.train.tasks.mixture import MemberConfig, MixtureTaskConfig
from datong.unimodal.tokenizers import ByteTokenizer

sys.path.insert(0, os.path.dirname(__file__))
from engine_task import DigitsTaskConfig  # pylint: disable=wrong-import-position

BACKBONE = TransformerConfig(width=32, depth=1, heads=2, mlp_dim=64)


@pytest.fixture(scope="module", autouse=True)
def data_dir(tmp_path_factory):
  path = os.environ.get("DATONG_DATA_DIR") or str(tmp_path_factory.mktemp("data"))
  os.environ["DATONG_DATA_DIR"] = path
  return path


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
  """A persistent compilation cache for this module: the runs of one test
  compile the same step (a fresh ``Trainer`` jits anew), once."""
  from jax.experimental.compilation_cache import compilation_cache as cc  # pylint: disable=import-outside-toplevel
  names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
           "jax_persistent_cache_min_entry_size_bytes")
  old = {n: getattr(jax.config, n) for n in names}
  jax.config.update(names[0], str(tmp_path_factory.mktemp("jax_cache")))
  jax.config.update(names[1], 0.0)
  jax.config.update(names[2], 0)
  cc.reset_cache()
  yield
  for n, v in old.items():
    jax.config.update(n, v)
  cc.reset_cache()


def _members(backbone=BACKBONE, per_row=(1, 2, 2)):
  gpt, mae, clip = unified_digits.members(
      backbone, seq_length=32, tokenizer="byte", vocab_size=ByteTokenizer.vocab_size, upsample=1,
      decoder=TransformerConfig(width=16, depth=1, heads=2, mlp_dim=32), embed_dim=16,
      per_row=per_row, png_examples=0)
  gpt = dataclasses.replace(gpt, task=dataclasses.replace(gpt.task, eval_stride=0,
                                                          eval_batch_size=256))
  return gpt, mae, clip


def _run(task, steps=4, mesh=(1, 1, 1), batch=8, **train):
  return RunConfig(task=task,
                   train=TrainConfig(steps=steps, batch_size=batch, log_every=1,
                                     checkpoint_every=0, **train),
                   optimizer=OptimizerConfig(learning_rate=3e-3, warmup_steps=1),
                   mesh=MeshConfig(*mesh))


def _size(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _host_batch(task, items, train):
  """Mixture rows ``items`` preprocessed on the host and stacked: a global batch."""
  src = task.source("train")
  rows = [task.preprocess(src[i], np.random.default_rng(i), train) for i in items]
  return {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in rows[0]}


def _init(task, batch):
  spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
  init = jax.jit(lambda r: nn.unbox(task.init(r, spec)["params"]),
                 compiler_options={"xla_backend_optimization_level": 0})
  return jax.device_get(init(jax.random.PRNGKey(0)))


def test_mixture_loss_and_gradients_are_the_weighted_sum_of_its_members():
  gpt, mae, _ = _members()
  weights = {"gpt": 0.5, "mae": 2.0}
  task = MixtureTaskConfig(members=(dataclasses.replace(gpt, weight=0.5),
                                    dataclasses.replace(mae, weight=2.0, per_row=3))).build()
  batch = _host_batch(task, [5, 17, 300, 1200], train=False)
  params = _init(task, batch)
  src = task.source("train")

  # Each member's batch is its own preprocessing of its own records, 3 MAE images per row.
  assert batch["mae/image"].shape == (4, 3, 8, 8, 1)
  for name, member in task.members.items():
    k = task.per_row[name]
    records = [src.record(name, i * k + r) for i in [5, 17, 300, 1200] for r in range(k)]
    own = [member.preprocess(src.sources[name][j], None, False) for j in records]
    mine = task.member_batch(batch, name)
    for key in own[0]:
      np.testing.assert_array_equal(mine[key], np.stack([o[key] for o in own]))

  rng = jax.random.PRNGKey(3)

  @jax.jit
  def everything(params):
    mixture = jax.value_and_grad(lambda p: task.loss(p, batch, rng), has_aux=True)(params)
    members = {}
    for i, (name, member) in enumerate(task.members.items()):
      mb = task.member_batch(batch, name)
      members[name] = jax.value_and_grad(
          lambda v, mb=mb, member=member, i=i: member.loss(v, mb, jax.random.fold_in(rng, i))[0]
      )(task.view(params, name))
    return mixture, members

  ((loss, metrics), grads), members = jax.device_get(everything(params))
  total = 0.0
  expect_shared = 0.0
  for name, (m_loss, m_grads) in members.items():
    assert float(m_loss) > 0.1
    np.testing.assert_allclose(metrics[f"{name}/loss"], m_loss, rtol=1e-6)
    total += weights[name] * float(m_loss)
    # The member's own parameters get exactly its weighted gradient.
    (path,) = task.placement[name]
    own = task.combine({name: m_grads})[name]
    for a, b in zip(jax.tree.leaves(grads[name]), jax.tree.leaves(own)):
      np.testing.assert_allclose(a, weights[name] * b, rtol=1e-5, atol=1e-8)
    expect_shared = expect_shared + weights[name] * np.concatenate(
        [g.ravel() for g in jax.tree.leaves(_at(m_grads, path))])
  np.testing.assert_allclose(loss, total, rtol=1e-6)
  # The shared backbone's gradient is the weighted sum of both members' gradients.
  got = np.concatenate([g.ravel() for g in jax.tree.leaves(grads["shared"]["backbone"])])
  np.testing.assert_allclose(got, expect_shared, rtol=1e-4, atol=1e-7)
  assert np.max(np.abs(got)) > 1e-4


def test_shared_parameters_are_stored_once():
  members = _members()
  task = MixtureTaskConfig(members=members).build()
  spec = task.batch_spec(4)
  abstract = jax.eval_shape(lambda r: task.init(r, spec)["params"], jax.random.PRNGKey(0))
  shared = _size(abstract["shared"])
  own = 0
  full_sum = 0
  for name, member in task.members.items():
    full = jax.eval_shape(lambda r, m=member, n=name: m.init(r, task.member_batch(spec, n))["params"],
                          jax.random.PRNGKey(0))
    full_sum += _size(full)
    backbones = task.placement[name]
    assert backbones and all(path[-1] == "backbone" for path in backbones)
    own += _size(full) - sum(_size(_at(full, p)) for p in backbones)
    assert _size(abstract[name]) == _size(full) - sum(_size(_at(full, p)) for p in backbones)
  assert _size(abstract) == shared + own
  # GPT, MAE and CLIP's two towers: four backbones in the members, one in the mixture.
  assert shared == _size(_at(jax.eval_shape(
      lambda r: task.members["gpt"].init(r, task.member_batch(spec, "gpt"))["params"],
      jax.random.PRNGKey(0)), ("encoder", "backbone")))
  assert _size(abstract) == full_sum - 3 * shared
  assert sorted(abstract) == ["clip", "gpt", "mae", "shared"]
  assert not any("backbone" in jax.tree_util.keystr(p)
                 for p, _ in jax.tree_util.tree_leaves_with_path(
                     {k: v for k, v in abstract.items() if k != "shared"}))


def _at(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def _metrics(workdir):
  return [r for r in writers.read_metrics(workdir) if "train/loss" in r]


def test_resume_is_bitwise_exact_with_every_members_data_order(tmp_path):
  cfg = _run(MixtureTaskConfig(members=_members()[:2]), steps=4, mesh=(2, 2, 2))
  # Data order: a restored iterator continues every member exactly.
  trainer = loop.Trainer(cfg, str(tmp_path / "t"))
  it = trainer.train_iterator()
  batches = [next(it) for _ in range(4)]
  state = it.get_state()
  it.close()
  it = trainer.train_iterator()
  next(it), next(it)
  resumed = trainer.train_iterator(it.get_state())
  it.close()
  for want in batches[2:]:
    got = next(resumed)
    assert {k.split("/")[0] for k in got} == {"gpt", "mae"}
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])
  resumed.close()
  assert state["step"] == 4

  full, half = str(tmp_path / "full"), str(tmp_path / "half")
  loop.train(cfg, full, progress=False, evaluate=False)
  assert loop.train(cfg, half, progress=False, stop_at=2).step == 2
  loop.train(cfg, half, progress=False, evaluate=False)
  a, b = _metrics(full), _metrics(half)
  assert len(a) == len(b) == 4
  for key in ("train/loss", "train/gpt/loss", "train/mae/loss"):
    assert [r[key] for r in a] == [r[key] for r in b], key
  for x, y in zip(jax.tree.leaves(ckpt_lib.load_params(half)),
                  jax.tree.leaves(ckpt_lib.load_params(full))):
    np.testing.assert_array_equal(x, y)


def test_same_losses_on_8_devices_as_on_1(tmp_path):
  runs = {}
  for mesh in [(1, 1, 1), (2, 2, 2)]:
    devices = jax.devices()[:int(np.prod(mesh))]
    gpt, _, clip = _members()  # CLIP: both towers on the shared backbone
    trainer = loop.Trainer(_run(MixtureTaskConfig(members=(gpt, clip)), mesh=mesh),
                           str(tmp_path), devices=devices)
    state = trainer.init_state()
    it = trainer.train_iterator()
    runs[mesh] = []
    for _ in range(3):
      state, metrics = trainer.step(state, data_lib.to_global(next(it), trainer.batch_sharding))
      runs[mesh].append(jax.device_get(metrics))
    it.close()
  one, eight = runs[(1, 1, 1)], runs[(2, 2, 2)]
  for key in ("train/loss", "train/gpt/loss", "train/clip/loss"):
    np.testing.assert_allclose([r[key] for r in eight], [r[key] for r in one], rtol=2e-5,
                               err_msg=key)
  assert one[-1]["train/loss"] < one[0]["train/loss"]
  np.testing.assert_allclose(one[0]["train/loss"], sum(one[0][f"train/{m}/loss"]
                                                       for m in ("gpt", "clip")), rtol=1e-6)


def test_members_that_disagree_or_missing_paths_give_clear_errors():
  gpt, mae, clip = _members()
  wider = dataclasses.replace(BACKBONE, mlp_dim=128)
  _, _, wide_clip = _members(wider)
  task = MixtureTaskConfig(members=(gpt, wide_clip)).build()
  spec = task.batch_spec(4)
  with pytest.raises(ValueError, match=r"member 'clip' at 'image/encoder/backbone' does not match "
                                       r"member 'gpt' at 'encoder/backbone'.*mlp.*Fix"):
    jax.eval_shape(lambda r: task.init(r, spec), jax.random.PRNGKey(0))
  task = MixtureTaskConfig(members=(gpt, mae), shared=("gpt:encoder/backbone",
                                                       "mae:encoder/trunk")).build()
  spec = task.batch_spec(4)
  with pytest.raises(ValueError, match=r"member 'mae' has no parameter subtree 'encoder/trunk'"
                                       r".*\['backbone', 'stem'\].*Fix: .*'mae:encoder/backbone'"):
    jax.eval_shape(lambda r: task.init(r, spec), jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="names member 'bert'"):
    MixtureTaskConfig(members=(gpt, mae), shared=("bert:encoder/backbone",))
  with pytest.raises(ValueError, match="no member has a parameter subtree named 'trunk'"):
    task = MixtureTaskConfig(members=(gpt, mae), shared=("trunk",)).build()
    jax.eval_shape(lambda r: task.init(r, task.batch_spec(4)), jax.random.PRNGKey(0))
  # Shared by explicit paths: only GPT and MAE's encoders; CLIP keeps its own towers.
  task = MixtureTaskConfig(members=(gpt, mae, wide_clip),
                           shared=("gpt:encoder/backbone", "mae:encoder/backbone")).build()
  abstract = jax.eval_shape(lambda r: task.init(r, task.batch_spec(4))["params"],
                            jax.random.PRNGKey(0))
  assert "backbone" in abstract["clip"]["text"] and task.placement["clip"] == {}


@pytest.mark.parametrize("impl", ["switch", "weights"])
def test_sampled_members_run_one_member_per_step(impl):
  gpt, mae, _ = _members()
  members = (dataclasses.replace(gpt, weight=1.0), dataclasses.replace(mae, weight=3.0))
  task = MixtureTaskConfig(members=members, mode="sample", sample_impl=impl).build()
  every = MixtureTaskConfig(members=members).build()
  batch = _host_batch(task, [1, 2, 3, 4], train=False)
  params = _init(task, batch)
  keys = jax.vmap(jax.random.PRNGKey)(jnp.arange(400))
  draws = np.argmax(jax.jit(jax.vmap(task._selection))(keys), -1)  # pylint: disable=protected-access
  assert 0.68 < np.mean(draws == 1) < 0.82  # weight 3 of 4
  grad = jax.jit(jax.value_and_grad(lambda p, r: task.loss(p, batch, r), has_aux=True))
  grad_all = jax.jit(jax.grad(lambda p, r, w: jnp.dot(w, jnp.stack(
      [every.loss(p, batch, r)[1][f"{n}/loss"] for n in ("gpt", "mae")]))))
  seen = set()
  for s in (int(np.argmax(draws == 0)), int(np.argmax(draws == 1))):
    rng = jax.random.PRNGKey(s)
    chosen = draws[s]
    seen.add(int(chosen))
    (loss, metrics), grads = grad(params, rng)
    name = ("gpt", "mae")[chosen]
    other = ("gpt", "mae")[1 - chosen]
    assert metrics[f"{name}/sampled"] == 1 and metrics[f"{other}/sampled"] == 0
    assert metrics[f"{other}/loss"] == 0 and float(loss) > 0.1
    np.testing.assert_allclose(loss, metrics[f"{name}/loss"], rtol=1e-6)
    # The gradient is the drawn member's alone (its loss, unweighted).
    want = grad_all(params, rng, jax.nn.one_hot(chosen, 2))
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(want)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
    assert not any(np.any(g) for g in jax.tree.leaves(grads[other]))
  assert seen == {0, 1}


def test_post_update_trainable_and_evaluation_are_per_member(tmp_path):
  """A member with an EMA (``post_update``, frozen leaves) next to GPT: the
  EMA follows its formula on the member's own view, its frozen leaves get no
  optimizer state, and evaluation reports ``eval/<member>/...``."""
  decay = 0.9
  digits_backbone = DigitsTaskConfig().backbone
  gpt, _, _ = _members(digits_backbone)
  members = (gpt, MemberConfig("digits", DigitsTaskConfig(ema_decay=decay), per_row=2))
  cfg = _run(MixtureTaskConfig(members=members), steps=1, mesh=(2, 2, 2))
  cfg = dataclasses.replace(cfg, optimizer=OptimizerConfig(learning_rate=3e-3, warmup_steps=0))
  trainer = loop.Trainer(cfg, str(tmp_path))
  task = trainer.task
  abstract = trainer.abstract_state
  trainable = _size(abstract.params) - _size(abstract.params["digits"]["ema"])
  assert trainable * 2 <= _size(abstract.opt_state) < trainable * 2 + 8
  state = trainer.init_state()
  init = jax.device_get(state.params)
  it = trainer.train_iterator()
  batch = next(it)
  it.close()
  state, metrics = trainer.step(state, data_lib.to_global(batch, trainer.batch_sharding))
  out = jax.device_get(state.params)
  np.testing.assert_allclose(out["digits"]["ema"]["label_sum"],
                             np.mean(batch["digits/label"].astype(np.float32)), rtol=1e-6)
  for e1, e0, h1 in zip(jax.tree.leaves(out["digits"]["ema"]["head"]),
                        jax.tree.leaves(init["digits"]["head"]),
                        jax.tree.leaves(out["digits"]["head"])):
    np.testing.assert_allclose(e1, decay * e0 + (1 - decay) * h1, rtol=1e-6, atol=1e-7)
    assert not np.array_equal(h1, e0)
  metrics = jax.device_get(metrics)
  assert {"train/gpt/loss", "train/digits/loss", "train/digits/accuracy"} <= set(metrics)
  assert not any("update_stats" in k for k in metrics)

  result = trainer.evaluate(state.params, 1)
  assert {"eval/gpt/bits_per_byte", "eval/digits/accuracy", "eval/digits/count"} <= set(result)
  assert result["eval/digits/count"] == 360
  assert 0 < result["eval/gpt/bits_per_byte"] < 20


def test_unified_digits_recipe_is_registered_and_compiles_on_a_2x2x2_mesh(tmp_path):
  assert "unified-digits" in recipes.describe()
  cfg = recipes.get("unified-digits")
  assert [m.name for m in cfg.task.members] == ["gpt", "mae", "clip", "caption"]
  cfg = dataclasses.replace(cfg, mesh=MeshConfig(2, 2, 2))
  trainer = loop.Trainer(cfg, str(tmp_path))
  assert list(trainer.abstract_state.params["shared"]) == ["backbone"]
  assert trainer.compile().memory_analysis() is not None


def test_member_settings_are_overridable_by_name_and_round_trip_through_json():
  from datong.train import config as config_lib  # pylint: disable=import-outside-toplevel
  cfg = recipes.get("unified-digits")
  cfg = config_lib.override(cfg, {"seq_length": "64", "task.members.mae.per_row": "4",
                                  "task.members.clip.weight": "0.5", "width": "64"})
  gpt, mae, clip, _ = cfg.task.members
  assert gpt.task.seq_length == 64 and mae.per_row == 4 and clip.weight == 0.5
  assert gpt.per_row == 1 and clip.per_row == 16  # untouched
  # A backbone field sets every member's backbone: the shared shapes stay equal.
  widths = {config_lib.get_field(cfg, n) for n in config_lib.field_names(cfg)
            if n.endswith("backbone.width")}
  assert widths == {64}
  back = config_lib.from_json(config_lib.to_json(cfg))
  assert isinstance(back.task.members, tuple) and back.task.members[:2] == cfg.task.members[:2]
  assert config_lib.to_json(back) == config_lib.to_json(cfg)
  with pytest.raises(ValueError, match="ambiguous.*task.members.gpt.per_row"):
    config_lib.override(cfg, {"per_row": "2"})


def test_only_trains_the_named_members_exactly_as_in_the_mixture():
  """``task.only`` (the single-member baselines): the kept member's params,
  batch and loss are the ones it has inside the full mixture."""
  from datong.train import config as config_lib  # pylint: disable=import-outside-toplevel
  full = MixtureTaskConfig(members=_members())
  alone = config_lib.override(full, {"only": "mae"})
  assert alone.only == ("mae",)
  assert config_lib.from_json(config_lib.to_json(_run(alone))).task.only == ("mae",)
  full_task, task = full.build(), alone.build()
  assert list(task.members) == ["mae"] and task.per_row == {"mae": 2}
  batch = _host_batch(task, [3, 40], train=False)
  params = _init(task, batch)
  assert sorted(params) == ["mae", "shared"]
  full_params = _init(full_task, _host_batch(full_task, [3, 40], train=False))
  assert jax.tree.structure(params["mae"]) == jax.tree.structure(full_params["mae"])
  rng = jax.random.PRNGKey(1)
  loss, metrics = task.loss(params, batch, rng)
  own, _ = task.members["mae"].loss(task.view(params, "mae"), task.member_batch(batch, "mae"),
                                    jax.random.fold_in(rng, 0))
  np.testing.assert_allclose(loss, own, rtol=1e-6)
  assert float(metrics["mae/loss"]) == float(loss)
  with pytest.raises(ValueError, match=r"only=\['gtp'\].*members are \['gpt', 'mae', 'clip'\]"):
    config_lib.override(full, {"only": "gtp"})


def test_every_member_is_evaluated_on_its_own_held_out_data(tmp_path):
  trainer = loop.Trainer(_run(MixtureTaskConfig(members=_members())), str(tmp_path),
                         devices=jax.devices()[:1])
  result = trainer.evaluate(trainer.init_state().params, 0)
  assert result["eval/gpt/bytes"] == 32208  # every held-out pydoc byte, once
  assert 0 < result["eval/gpt/bits_per_byte"] < 20
  assert 0.5 < result["eval/mae/linear_probe_accuracy"] <= 1  # a probe on random features
  assert {"eval/mae/knn_accuracy", "eval/mae/loss", "eval/clip/zero_shot_accuracy",
          "eval/clip/i2t_recall@1", "eval/clip/loss"} <= set(result)
  assert not any(k.startswith("eval/eval") or k.count("/") < 2 for k in result)


def test_sampled_post_update_runs_only_for_drawn_microbatches():
  """``mode="sample"`` with 2 microbatches: each microbatch draws its own
  member; a member's ``post_update`` gets the mean of its statistics over
  the microbatches that drew it, and does not run when none did."""
  gpt, _, _ = _members(DigitsTaskConfig().backbone)
  members = (gpt, MemberConfig("digits", DigitsTaskConfig(ema_decay=0.9), per_row=2))
  cfg = _run(MixtureTaskConfig(members=members, mode="sample"), mesh=(1, 1, 1), microbatches=2)
  trainer = loop.Trainer(cfg, "", devices=jax.devices()[:1])
  task = trainer.task
  state = trainer.init_state()
  it = trainer.train_iterator()
  expected, cases = 0.0, set()
  for step in range(16):
    batch = next(it)
    rng = jax.random.fold_in(state.rng, step)  # the engine's step rng
    labels = batch["digits/label"].astype(np.float32)
    means = [float(np.mean(labels[i::2])) for i in range(2)
             if np.argmax(task._selection(jax.random.fold_in(rng, i))) == 1]  # pylint: disable=protected-access
    cases.add(len(means))
    expected += float(np.mean(means)) if means else 0.0
    before = jax.device_get(state.params["digits"]["ema"])
    state, _ = trainer.step(state, data_lib.to_global(batch, trainer.batch_sharding))
    after = jax.device_get(state.params["digits"]["ema"])
    np.testing.assert_allclose(after["label_sum"], expected, rtol=1e-5)
    if not means:  # not drawn: the EMA head did not move either
      for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(before)):
        np.testing.assert_array_equal(a, b)
  it.close()
  assert cases == {0, 1, 2}  # not drawn, drawn by one microbatch (stats rescaled), by both

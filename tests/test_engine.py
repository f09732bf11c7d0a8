"""The training engine on the fake 8-device CPU mesh."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import jax

from datong import cli
from datong.train import checkpoint as ckpt_lib
from datong.train import config as config_lib
from datong.train import loop, writers
from datong.train.config import MeshConfig, OptimizerConfig, RunConfig, TrainConfig

sys.path.insert(0, os.path.dirname(__file__))
from engine_task import DigitsTaskConfig  # pylint: disable=wrong-import-position

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module", autouse=True)
def data_dir(tmp_path_factory):
  path = os.environ.get("DATONG_DATA_DIR") or str(tmp_path_factory.mktemp("data"))
  os.environ["DATONG_DATA_DIR"] = path
  return path


def _config(steps=8, mesh=(2, 2, 2), batch=32, **train):
  return RunConfig(
      task=DigitsTaskConfig(),
      train=TrainConfig(steps=steps, batch_size=batch, log_every=1, checkpoint_every=0, **train),
      optimizer=OptimizerConfig(learning_rate=3e-3, warmup_steps=2),
      mesh=MeshConfig(*mesh))


def _losses(workdir):
  return [r["train/loss"] for r in writers.read_metrics(workdir) if "train/loss" in r]


def _params(workdir):
  return ckpt_lib.load_params(workdir)


def test_same_losses_on_every_mesh_shape(tmp_path):
  runs = {}
  for mesh in [(1, 1, 1), (2, 2, 2), (8, 1, 1)]:
    devices = jax.devices()[:int(np.prod(mesh))]
    workdir = str(tmp_path / "x".join(map(str, mesh)))
    loop.train(_config(steps=6, mesh=mesh), workdir, progress=False, devices=devices,
               evaluate=False)
    runs[mesh] = _losses(workdir)
  base = runs[(1, 1, 1)]
  assert len(base) == 6 and base[-1] < base[0]
  for mesh, losses in runs.items():
    np.testing.assert_allclose(losses, base, rtol=2e-5, err_msg=str(mesh))


def test_resume_is_bitwise_identical_and_keeps_data_order(tmp_path):
  full, half = str(tmp_path / "full"), str(tmp_path / "half")
  loop.train(_config(steps=8), full, progress=False, evaluate=False)
  first = loop.train(_config(steps=8), half, progress=False, stop_at=4)
  assert first.step == 4 and ckpt_lib.Checkpointer(half).latest_step() == 4
  loop.train(_config(steps=8), half, progress=False, evaluate=False)
  assert _losses(half) == _losses(full)  # same batches in the same order, same math
  for a, b in zip(jax.tree.leaves(_params(half)), jax.tree.leaves(_params(full))):
    np.testing.assert_array_equal(a, b)


def test_restore_onto_another_mesh_shape_continues(tmp_path):
  full, moved = str(tmp_path / "full"), str(tmp_path / "moved")
  loop.train(_config(steps=8), full, progress=False, evaluate=False)
  loop.train(_config(steps=8, mesh=(2, 2, 2)), moved, progress=False, stop_at=4)
  loop.train(_config(steps=8, mesh=(1, 4, 2)), moved, progress=False, evaluate=False)
  np.testing.assert_allclose(_losses(moved), _losses(full), rtol=2e-5)


def test_gradient_accumulation_matches_the_full_batch(tmp_path):
  full = loop.Trainer(_config(), str(tmp_path))
  accum = loop.Trainer(_config(microbatches=4), str(tmp_path))
  state = full.init_state()
  it = full.train_iterator()
  from datong.train import data as data_lib  # pylint: disable=import-outside-toplevel
  batch = data_lib.to_global(next(it), full.batch_sharding)
  rng = jax.random.PRNGKey(0)
  with full._context():  # pylint: disable=protected-access
    loss1, _, g1 = jax.jit(full._grads)(state.params, batch, rng)  # pylint: disable=protected-access
    loss4, _, g4 = jax.jit(accum._grads)(state.params, batch, rng)  # pylint: disable=protected-access
  np.testing.assert_allclose(loss4, loss1, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g4), jax.tree.leaves(g1)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


def _with_task(cfg, **task):
  return cfg.__class__(**{**cfg.__dict__, "task": DigitsTaskConfig(**task)})


@pytest.mark.parametrize("microbatches", [1, 2])
def test_aux_losses_from_inside_the_backbone_are_minimized_and_logged(tmp_path, microbatches):
  trainer = loop.Trainer(_with_task(_config(microbatches=microbatches), aux_l2=0.5), str(tmp_path))
  task = trainer.task
  state = trainer.init_state()
  from datong.train import data as data_lib  # pylint: disable=import-outside-toplevel
  it = trainer.train_iterator()
  batch = data_lib.to_global(next(it), trainer.batch_sharding)
  it.close()
  rng = jax.random.PRNGKey(0)

  def parts(p):  # by hand: the task's loss and its l2, each differentiated alone
    loss, metrics = task.loss(p, batch, rng)
    return loss, metrics["aux_losses"]["l2"]

  with trainer._context():  # pylint: disable=protected-access
    loss, metrics, grads = jax.jit(trainer._grads)(state.params, batch, rng)  # pylint: disable=protected-access
    task_loss, l2 = jax.jit(parts)(state.params)
    g_task = jax.jit(jax.grad(lambda p: parts(p)[0]))(state.params)
    g_l2 = jax.jit(jax.grad(lambda p: parts(p)[1]))(state.params)
  assert float(l2) > 0.01
  np.testing.assert_allclose(metrics["aux_loss/l2"], l2, rtol=1e-5)
  np.testing.assert_allclose(metrics["task_loss"], task_loss, rtol=1e-5)
  np.testing.assert_allclose(loss, task_loss + l2, rtol=1e-5)
  # The engine's gradient is the task's plus exactly the aux term's.
  g_l2_leaves = jax.tree.leaves(g_l2)
  assert max(float(np.max(np.abs(g))) for g in g_l2_leaves) > 1e-3
  for g, a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(g_task), g_l2_leaves):
    np.testing.assert_allclose(g, a + b, rtol=1e-4, atol=1e-6)

  # A task without aux losses sees its metrics untouched.
  plain = loop.Trainer(_config(microbatches=microbatches), str(tmp_path))
  with plain._context():  # pylint: disable=protected-access
    _, plain_metrics, _ = jax.eval_shape(plain._grads, state.params, batch, rng)  # pylint: disable=protected-access
  assert set(plain_metrics) == {"accuracy"}

  _, step_metrics = trainer.step(state, batch)
  step_metrics = jax.device_get(step_metrics)
  assert {"train/aux_loss/l2", "train/task_loss", "train/accuracy"} <= set(step_metrics)
  assert not any("aux_losses" in k for k in step_metrics)
  np.testing.assert_allclose(step_metrics["train/loss"],
                             step_metrics["train/task_loss"] + step_metrics["train/aux_loss/l2"],
                             rtol=1e-6)


@pytest.mark.parametrize("microbatches", [1, 2])
def test_post_update_keeps_a_frozen_ema_with_no_optimizer_state_and_resumes_exactly(
    tmp_path, microbatches):
  """``Task.post_update``: a frozen EMA of the head (the formula, after the
  optimizer's update), statistics from ``loss`` (averaged over microbatches),
  no optimizer moments for frozen leaves, bitwise resume, skipped on NaN."""
  from datong.train import data as data_lib  # pylint: disable=import-outside-toplevel
  decay = 0.9
  cfg = _with_task(_config(steps=4, microbatches=microbatches), ema_decay=decay)
  trainer = loop.Trainer(cfg, str(tmp_path / "t"))
  sizes = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
  params = trainer.abstract_state.params
  trainable = sizes(params) - sizes(params["ema"])
  opt_size = sizes(trainer.abstract_state.opt_state)
  assert trainable * 2 <= opt_size < trainable * 2 + 8  # Adam's mu and nu, a count: no "ema"

  state = trainer.init_state()
  init = jax.device_get(state.params)
  it = trainer.train_iterator()
  batches = [next(it) for _ in range(3)]
  it.close()
  for batch in batches:
    state, _ = trainer.step(state, data_lib.to_global(batch, trainer.batch_sharding))
  out = jax.device_get(state.params)
  expected = sum(float(np.mean(b["label"].astype(np.float32))) for b in batches)
  np.testing.assert_allclose(out["ema"]["label_sum"], expected, rtol=1e-6)
  # One step (no warmup, so the head moves) by hand: ema_1 = d * ema_0 + (1 - d) * head_1.
  one = loop.Trainer(cfg.__class__(**{**cfg.__dict__, "optimizer": OptimizerConfig(
      learning_rate=3e-3, warmup_steps=0)}), str(tmp_path / "one"))
  s1, _ = one.step(one.init_state(), data_lib.to_global(batches[0], one.batch_sharding))
  s1 = jax.device_get(s1.params)
  for e1, e0, h1 in zip(jax.tree.leaves(s1["ema"]["head"]), jax.tree.leaves(init["head"]),
                        jax.tree.leaves(s1["head"])):
    np.testing.assert_allclose(e1, decay * e0 + (1 - decay) * h1, rtol=1e-6, atol=1e-7)
    assert not np.array_equal(e1, e0) and not np.array_equal(h1, e0)

  full, half = str(tmp_path / "full"), str(tmp_path / "half")
  loop.train(cfg, full, progress=False, evaluate=False)
  loop.train(cfg, half, progress=False, stop_at=2)
  loop.train(cfg, half, progress=False, evaluate=False)
  for a, b in zip(jax.tree.leaves(_params(half)), jax.tree.leaves(_params(full))):
    np.testing.assert_array_equal(a, b)

  nan = _with_task(_config(steps=2, on_nonfinite="skip"), ema_decay=decay, nan_loss=True)
  loop.train(nan, str(tmp_path / "nan"), progress=False, evaluate=False)
  for a, b in zip(jax.tree.leaves(_params(str(tmp_path / "nan"))["ema"]),
                  jax.tree.leaves(init["ema"])):
    np.testing.assert_array_equal(a, b)


def test_outputs_metrics_tensorboard_and_plots(tmp_path):
  workdir = str(tmp_path / "run")
  result = loop.train(_config(steps=4), workdir, progress=False)
  rows = writers.read_metrics(workdir)
  keys = set().union(*rows)
  assert {"step", "train/loss", "train/grad_norm", "train/learning_rate",
          "train/examples_per_sec", "train/tokens_per_sec", "eval/accuracy"} <= keys
  assert result.metrics["eval/count"] == 360  # every test digit, once
  assert os.listdir(os.path.join(workdir, "tensorboard"))
  assert os.path.exists(os.path.join(workdir, "plot_loss.png"))
  # Warmup then cosine: lr rises over the first two steps.
  lrs = [r["train/learning_rate"] for r in rows if "train/learning_rate" in r]
  assert lrs[0] == 0.0 and lrs[2] == pytest.approx(3e-3)
  assert not os.path.exists(os.path.join(workdir, "plot_experts.png"))  # no experts here


def test_expert_load_is_plotted_per_modality(tmp_path):
  rows = [{"step": s, "train/loss": 1.0,
           **{f"train/{m}/moe/expert_load/{e}": 0.25 for m in ("image", "text") for e in range(4)},
           **{f"train/moe/expert_load/m1/{e}": 0.5 for e in range(2)},
           "train/image/moe/layer_1/dropped_fraction": 0.1} for s in (10, 20)]
  groups = writers.expert_load_groups(rows)
  assert groups == {
      "train/image/moe": [f"train/image/moe/expert_load/{e}" for e in range(4)],
      "train/text/moe": [f"train/text/moe/expert_load/{e}" for e in range(4)],
      "train/moe/expert_load/m1": [f"train/moe/expert_load/m1/{e}" for e in range(2)]}
  path = writers.plot_expert_load(str(tmp_path), rows)
  assert path == str(tmp_path / "plot_experts.png") and os.path.getsize(path) > 1000


def test_nonfinite_loss_stops_without_touching_the_last_good_checkpoint(tmp_path, monkeypatch):
  workdir = str(tmp_path / "run")
  loop.train(_config(steps=8), workdir, progress=False, stop_at=4)
  good = _params(workdir)
  monkeypatch.setenv("DIGITS_NAN_LOSS", "1")
  with pytest.raises(loop.NonFiniteLossError, match="NaN/inf at step 5.*step 4"):
    loop.train(_config(steps=8), workdir, progress=False)
  assert ckpt_lib.Checkpointer(workdir).latest_step() == 4
  for a, b in zip(jax.tree.leaves(_params(workdir)), jax.tree.leaves(good)):
    np.testing.assert_array_equal(a, b)


def test_nonfinite_steps_are_skipped_when_asked(tmp_path):
  workdir = str(tmp_path / "run")
  cfg = _config(steps=3, on_nonfinite="skip")
  cfg = cfg.__class__(**{**cfg.__dict__, "task": DigitsTaskConfig(nan_loss=True)})
  trainer = loop.Trainer(cfg, workdir)
  before = trainer.init_state()
  before_params = jax.device_get(before.params)
  result = loop.train(cfg, workdir, progress=False)
  assert result.metrics["train/skipped_steps"] == 3
  for a, b in zip(jax.tree.leaves(_params(workdir)), jax.tree.leaves(before_params)):
    np.testing.assert_array_equal(a, b)


def test_corrupt_and_incompatible_checkpoints_give_clear_errors(tmp_path):
  workdir = str(tmp_path / "run")
  loop.train(_config(steps=2), workdir, progress=False)
  wider = _config(steps=4)
  wider = wider.__class__(**{**wider.__dict__, "task": DigitsTaskConfig(
      backbone=DigitsTaskConfig().backbone.replace(width=64))})
  with pytest.raises(ckpt_lib.CheckpointError, match="other settings.*width: 32 -> 64"):
    loop.train(wider, workdir, progress=False)
  # Corrupt every array file of the state.
  state_dir = os.path.join(workdir, "checkpoints", "2", "state")
  for root, _, files in os.walk(state_dir):
    for name in files:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"garbage")
  with pytest.raises(ckpt_lib.CheckpointError, match="(unreadable|Cannot restore).*fresh --workdir"):
    loop.train(_config(steps=4), workdir, progress=False)


def test_fsdp_divides_parameter_and_optimizer_bytes_per_device(tmp_path):
  backbone = DigitsTaskConfig().backbone.replace(width=256, mlp_dim=1024, depth=2, heads=8)
  per_device = {}
  for fsdp in (1, 8):
    cfg = RunConfig(task=DigitsTaskConfig(backbone=backbone),
                    train=TrainConfig(steps=2, batch_size=16),
                    mesh=MeshConfig(data=8 // fsdp, fsdp=fsdp))
    trainer = loop.Trainer(cfg, str(tmp_path))
    params_bytes = trainer.params_plan.bytes()
    compiled = trainer.compile()
    per_device[fsdp] = (compiled.memory_analysis().argument_size_in_bytes, params_bytes)
  (args1, p1), (args8, p8) = per_device[1], per_device[8]
  assert p8["total"] == p1["total"]
  # Parameters: every kernel is sharded 8 ways; norms and biases stay whole.
  assert p8["per_device"] < p1["per_device"] / 6
  # Whole step arguments (params + Adam moments + batch) from XLA itself.
  assert args8 < args1 / 5, (args1, args8)


def test_bad_configs_give_clear_errors(tmp_path):
  with pytest.raises(ValueError, match="3 x fsdp=1 x tensor=1 = 3 devices, but 8"):
    loop.Trainer(_config(mesh=(3, 1, 1)), str(tmp_path))
  with pytest.raises(ValueError, match="do not divide the 8 available devices"):
    loop.Trainer(_config(mesh=(-1, 3, 1)), str(tmp_path))
  with pytest.raises(ValueError, match="not divisible by the 4 batch shards"):
    loop.Trainer(_config(mesh=(2, 2, 2), batch=30), str(tmp_path))
  with pytest.raises(ValueError, match="Unknown config key 'train.step'.*train.steps"):
    config_lib.override(_config(), {"train.step": "3"})
  with pytest.raises(ValueError, match="microbatches"):
    TrainConfig(batch_size=10, microbatches=3)
  with pytest.raises(ValueError, match="Unknown recipe 'nope'"):
    from datong.train import recipes  # pylint: disable=import-outside-toplevel
    recipes.get("nope")


def test_overrides_parse_types_and_round_trip_through_json():
  cfg = config_lib.override(_config(), {
      "train.steps": "12", "optimizer.learning_rate": "1e-4", "optimizer.grad_clip_norm": "none",
      "task.backbone.dtype": "bfloat16", "task.backbone.scan_layers": "true", "mesh.data": "-1"})
  assert cfg.train.steps == 12 and cfg.optimizer.learning_rate == 1e-4
  assert cfg.optimizer.grad_clip_norm is None and cfg.task.backbone.scan_layers is True
  assert cfg.task.backbone.dtype == "bfloat16" and cfg.mesh.data == -1
  assert config_lib.from_json(json.loads(json.dumps(config_lib.to_json(cfg)))) == cfg
  with pytest.raises(ValueError, match="TransformerConfig.dtype"):
    config_lib.override(cfg, {"task.backbone.dtype": "float64"})


def _cli(*args, env=None):
  return [sys.executable, "-m", "datong.cli", *args]


def test_sigterm_saves_a_checkpoint_and_the_run_resumes(tmp_path):
  workdir = str(tmp_path / "run")
  env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
  recipe = os.path.join(REPO, "tests", "engine_task.py:run_config")
  proc = subprocess.Popen(_cli("train", recipe, "--workdir", workdir, "--no-progress"),
                          env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  metrics = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    if os.path.exists(metrics) and len(writers.read_metrics(workdir)) >= 2:
      break
    time.sleep(0.5)
  assert proc.poll() is None, proc.stdout.read().decode()
  proc.send_signal(signal.SIGTERM)
  out = proc.communicate(timeout=120)[0].decode()
  assert proc.returncode == cli.EXIT_STOPPED, out  # stopped, resumable: not 0
  assert "checkpoint saved" in out
  stopped = ckpt_lib.Checkpointer(workdir).latest_step()
  assert stopped is not None and 0 < stopped < 400
  # Resume for a few more steps through the same command.
  done = subprocess.run(_cli("train", recipe, "--workdir", workdir, "--no-progress",
                             "--set", f"train.steps={stopped + 5}"),
                        env=env, cwd=REPO, capture_output=True, text=True, timeout=240)
  assert done.returncode == cli.EXIT_DONE, done.stdout + done.stderr
  assert f"resumed at step {stopped}" in done.stdout
  assert f"train.steps: 400 -> {stopped + 5}" in done.stdout
  assert "learning-rate schedule is rebuilt" in done.stdout
  assert ckpt_lib.Checkpointer(workdir).latest_step() == stopped + 5


def test_cli_lists_recipes_and_explains_bad_keys():
  help_out = subprocess.run(_cli("--help"), capture_output=True, text=True, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": REPO})
  assert help_out.returncode == 0 and "train" in help_out.stdout
  bad = subprocess.run(_cli("config", os.path.join(REPO, "tests", "engine_task.py:run_config"),
                            "--set", "train.stepz=3"),
                       capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": REPO})
  assert bad.returncode == 2 and "Unknown config key 'train.stepz'" in bad.stderr
  assert "train.steps" in bad.stderr

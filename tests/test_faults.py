"""What Datong promises under faults and bad input: one test per promise.

Checkpoints cannot lie (damage is detected and named, never restored
silently), weights load on any device count, one run per workdir, a resume
never silently changes the model, exit codes tell finished from stopped from
diverged, and bad input gets an error that names the problem and the fix.
The README's "Reliability" section lists the same promises.
"""

import errno
import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from datong import cli, ops
from datong.train import checkpoint as ckpt_lib
from datong.train import config as config_lib
from datong.train import loop, workdir as workdir_lib, writers
from datong.train.config import MeshConfig, OptimizerConfig, RunConfig, TrainConfig

sys.path.insert(0, os.path.dirname(__file__))
from engine_task import DigitsTaskConfig  # pylint: disable=wrong-import-position

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ONE = jax.devices()[:1]


@pytest.fixture(scope="module", autouse=True)
def data_dir(tmp_path_factory):
  path = os.environ.get("DATONG_DATA_DIR") or str(tmp_path_factory.mktemp("data"))
  os.environ["DATONG_DATA_DIR"] = path
  return path


def _config(steps=4, task=None, optimizer=None, **train):
  train = {"log_every": 1, "checkpoint_every": 0, **train}
  return RunConfig(task=task or DigitsTaskConfig(),
                   train=TrainConfig(steps=steps, batch_size=16, **train),
                   optimizer=optimizer or OptimizerConfig(learning_rate=3e-3),
                   mesh=MeshConfig(data=1))


def _train(config, workdir, **kw):
  return loop.train(config, str(workdir), progress=False, devices=ONE, **kw)


def _cli(*args, env=None):
  env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
         "XLA_FLAGS": "--xla_force_host_platform_device_count=1", **(env or {})}
  return subprocess.run([sys.executable, "-m", "datong.cli", *args], capture_output=True,
                        text=True, cwd=REPO, env=env, timeout=300)


RECIPE = os.path.join(REPO, "tests", "engine_task.py:run_config")
TINY = ["--set", "train.batch_size=16", "--set", "mesh.data=1", "--no-progress"]


# ------------------------------------------------------------ checkpoints

def test_keep_checkpoints_zero_is_refused_and_none_keeps_every_one(tmp_path):
  with pytest.raises(ValueError, match="keep_checkpoints=0: must be >= 1"):
    TrainConfig(keep_checkpoints=0)
  out = _cli("train", RECIPE, "--workdir", str(tmp_path / "zero"), "--set",
             "train.keep_checkpoints=0", *TINY)
  assert out.returncode == cli.EXIT_ERROR and "keep_checkpoints=0" in out.stderr
  _train(_config(steps=6, checkpoint_every=2, keep_checkpoints=None), tmp_path / "all",
         evaluate=False)
  assert ckpt_lib.Checkpointer(str(tmp_path / "all")).manager.all_steps() == [2, 4, 6]


def _largest_state_file(workdir, step):
  files = []
  for root, _, names in os.walk(os.path.join(workdir, "checkpoints", str(step), "state")):
    files += [os.path.join(root, n) for n in names]
  return max(files, key=os.path.getsize)


@pytest.mark.parametrize("damage", ["one_byte", "block"])
def test_checkpoint_damage_is_detected_and_named_never_restored(tmp_path, damage):
  workdir = str(tmp_path / "run")
  _train(_config(steps=4), workdir, evaluate=False)
  path = _largest_state_file(workdir, 4)
  data = bytearray(open(path, "rb").read())
  middle = len(data) // 2
  if damage == "one_byte":
    data[middle] ^= 0x01
  else:
    block = np.random.default_rng(0).integers(0, 256, 1000, dtype=np.uint8).tobytes()
    data[middle - 500:middle + 500] = block
  open(path, "wb").write(bytes(data))
  before = open(path, "rb").read()
  with pytest.raises(ckpt_lib.CheckpointError,
                     match=r"checkpoints/4 is (damaged|unreadable).*(Delete|fresh --workdir)"):
    _train(_config(steps=8), workdir, evaluate=False)
  # Nothing was written over the damaged step: the user decides what to do.
  assert open(path, "rb").read() == before
  assert ckpt_lib.Checkpointer(workdir).latest_step() == 4


def test_fingerprints_are_the_same_on_every_sharding_and_see_every_byte():
  x = jax.random.normal(jax.random.PRNGKey(0), (8, 16))
  mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(4, 2), ("a", "b"))
  sharded = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("a", "b")))
  tree = {"w": x, "bf": x.astype(jax.numpy.bfloat16), "i": jax.numpy.arange(5)}
  assert ckpt_lib.fingerprints({"w": sharded})["w"] == ckpt_lib.fingerprints(tree)["w"]
  raw = np.asarray(x).view(np.uint8).ravel().copy()
  base = ckpt_lib.fingerprints({"w": x})["w"]
  for offset in range(0, raw.size, 37):  # any single changed byte changes the fingerprint
    flipped = raw.copy()
    flipped[offset] ^= 0x80
    assert ckpt_lib.fingerprints({"w": flipped.view(np.float32).reshape(8, 16)})["w"] != base


def test_weights_written_on_four_devices_load_on_one(tmp_path):
  workdir = str(tmp_path / "run4")
  cfg = _config(steps=2)
  cfg = cfg.__class__(**{**cfg.__dict__, "mesh": MeshConfig(data=2, fsdp=2)})
  loop.train(cfg, workdir, progress=False, devices=jax.devices()[:4], evaluate=False)
  expected = ckpt_lib.load_params(workdir)
  np.savez(tmp_path / "expected.npz",
           **{"/".join(map(str, k)): v for k, v in _flat(expected).items()})
  script = textwrap.dedent(f"""
      import numpy as np, jax
      assert jax.device_count() == 1
      from datong.train.checkpoint import load_params
      from datong.train.warmstart import load_pretrained, merge
      expected = dict(np.load({str(tmp_path / "expected.npz")!r}))
      for params in (load_params({workdir!r}), load_pretrained({workdir!r}),
                     merge(jax.tree.map(np.zeros_like, load_params({workdir!r})), {workdir!r})):
        flat = {{}}
        def walk(t, p=()):
          for k, v in t.items():
            walk(v, p + (k,)) if isinstance(v, dict) else flat.__setitem__("/".join(p + (k,)), v)
        walk(params)
        assert sorted(flat) == sorted(expected)
        for k in flat:
          np.testing.assert_array_equal(flat[k], expected[k])
      print("ok")
  """)
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
         "PYTHONPATH": REPO}
  out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                       timeout=300)
  assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]


def _flat(tree, prefix=()):
  out = {}
  for k, v in tree.items():
    out.update(_flat(v, prefix + (k,)) if isinstance(v, dict) else {prefix + (k,): v})
  return out


def test_a_full_disk_stops_with_the_cause_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
  workdir = str(tmp_path / "run")
  real_save = ckpt_lib.ocp.CheckpointManager.save

  def save(self, step, *args, **kwargs):
    if step >= 4:
      raise OSError(errno.ENOSPC, "No space left on device")
    return real_save(self, step, *args, **kwargs)

  monkeypatch.setattr(ckpt_lib.ocp.CheckpointManager, "save", save)
  with pytest.raises(ckpt_lib.CheckpointError,
                     match=r"step 4 .*disk is full.*\(step 2\) is intact"):
    _train(_config(steps=6, checkpoint_every=2), workdir, evaluate=False)
  monkeypatch.undo()
  result = _train(_config(steps=6, checkpoint_every=2), workdir, evaluate=False)
  assert result.step == 6 and not result.preempted
  assert [r["step"] for r in writers.read_metrics(workdir)] == list(range(1, 7))


# ------------------------------------------------------------ the workdir

def test_a_second_run_on_a_busy_workdir_is_refused_and_a_dead_runs_lock_is_not(tmp_path):
  workdir = str(tmp_path / "run")
  os.makedirs(workdir)
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys, time; from datong.train.workdir import Lock\n"
       f"with Lock({workdir!r}):\n  print('locked', flush=True); time.sleep(120)"],
      stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": REPO})
  try:
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(workdir_lib.WorkdirError, match=f"in use by another Datong run .pid "
                       f"{holder.pid}"):
      _train(_config(steps=2), workdir)
    assert not os.path.exists(os.path.join(workdir, "checkpoints"))
  finally:
    holder.kill()  # like kill -9: no cleanup runs
    holder.wait()
  assert _train(_config(steps=2), workdir, evaluate=False).step == 2


def test_unusable_workdirs_get_clear_errors(tmp_path, monkeypatch):
  a_file = tmp_path / "file"
  a_file.write_text("x")
  with pytest.raises(workdir_lib.WorkdirError, match="is a file, not a directory"):
    _train(_config(), str(a_file))
  with pytest.raises(workdir_lib.WorkdirError, match="Cannot create --workdir"):
    _train(_config(), str(a_file / "below"))
  monkeypatch.setattr(workdir_lib.os, "access", lambda *_: False)  # root writes anywhere
  with pytest.raises(workdir_lib.WorkdirError, match="not writable"):
    _train(_config(), str(tmp_path / "ro"))


def test_resume_refuses_model_and_data_changes_and_explains_the_rest(tmp_path, capsys):
  workdir = str(tmp_path / "run")
  _train(_config(steps=4, checkpoint_every=2), workdir, evaluate=False, stop_at=2)
  relu = DigitsTaskConfig(backbone=DigitsTaskConfig().backbone.replace(activation="relu"))
  with pytest.raises(ckpt_lib.CheckpointError, match="activation: 'gelu' -> 'relu'"):
    _train(_config(steps=4, task=relu), workdir)
  with pytest.raises(ckpt_lib.CheckpointError, match=r"train.seed: 0 -> 1 \(changes the data"):
    _train(_config(steps=4, seed=1), workdir)
  with pytest.raises(ckpt_lib.CheckpointError, match="step 2, past train.steps=1"):
    _train(_config(steps=1), workdir)
  capsys.readouterr()
  _train(_config(steps=8, optimizer=OptimizerConfig(learning_rate=1e-3)), workdir,
         evaluate=False)
  log = capsys.readouterr().out
  assert "train.steps: 4 -> 8" in log and "optimizer.learning_rate: 0.003 -> 0.001" in log
  from datong.train import optim  # pylint: disable=import-outside-toplevel
  before = float(optim.schedule(OptimizerConfig(learning_rate=3e-3), 4)(2))
  after = float(optim.schedule(OptimizerConfig(learning_rate=1e-3), 8)(2))
  assert f"at step 2 the learning rate goes from {before:.4g} to {after:.4g}" in log


def test_finished_runs_are_not_rerun_and_metrics_have_no_duplicate_rows(tmp_path, capsys):
  workdir = str(tmp_path / "run")
  first = _train(_config(steps=3), workdir)
  rows = writers.read_metrics(workdir)
  again = _train(_config(steps=3), workdir)
  assert "already finished at step 3; nothing to do" in capsys.readouterr().out
  assert writers.read_metrics(workdir) == rows
  assert again.metrics["eval/accuracy"] == first.metrics["eval/accuracy"]
  assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3]


def test_ctrl_c_during_the_final_evaluation_stops_resumably(tmp_path, monkeypatch, capsys):
  workdir = str(tmp_path / "run")
  monkeypatch.setenv("DIGITS_SIGINT_IN_EVAL", "1")
  result = _train(_config(steps=2), workdir)
  assert result.preempted and "interrupted during the final evaluation" in capsys.readouterr().out
  assert workdir_lib.read_done(workdir) is None
  monkeypatch.delenv("DIGITS_SIGINT_IN_EVAL")
  done = _train(_config(steps=2), workdir)  # evaluates only
  assert not done.preempted and "eval/accuracy" in done.metrics
  assert [r["step"] for r in writers.read_metrics(workdir) if "train/loss" in r] == [1, 2]


# ------------------------------------------------------------ exit codes and NaN

def test_exit_codes_tell_finished_from_nan_stopped(tmp_path):
  done = _cli("train", RECIPE, "--workdir", str(tmp_path / "ok"), "--set", "train.steps=2",
              *TINY)
  assert done.returncode == cli.EXIT_DONE, done.stderr
  again = _cli("train", RECIPE, "--workdir", str(tmp_path / "ok"), "--set", "train.steps=2",
               *TINY)
  assert again.returncode == cli.EXIT_DONE and "already finished" in again.stdout
  nan = _cli("train", RECIPE, "--workdir", str(tmp_path / "nan"), "--set", "train.steps=2",
             *TINY, env={"DIGITS_NAN_LOSS": "1"})
  assert nan.returncode == cli.EXIT_NONFINITE, nan.stderr
  assert "no checkpoint was written yet" in nan.stderr and "step None" not in nan.stderr
  helptext = _cli("train", "--help").stdout
  assert f"{cli.EXIT_STOPPED}  stopped early" in helptext
  # The preempted code (EXIT_STOPPED) is asserted by test_engine's SIGTERM test.


def test_skipping_nonfinite_steps_has_a_cap_and_metrics_stay_strict_json(tmp_path):
  workdir = str(tmp_path / "run")
  nan = DigitsTaskConfig(nan_loss=True)
  with pytest.raises(loop.NonFiniteLossError, match="3 of the 3 steps.*max_consecutive_skips=3"):
    _train(_config(steps=6, task=nan, on_nonfinite="skip", max_consecutive_skips=3), workdir)

  def no_constants(name):
    raise ValueError(f"bare {name} in metrics.jsonl")

  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    rows = [json.loads(line, parse_constant=no_constants) for line in f]
  assert rows[0]["train/loss"] == "nan"


def test_eval_plots_leave_out_counts():
  rows = [{"step": 1, "eval/accuracy": 0.5, "eval/count": 360, "eval/bytes": 32208,
           "train/loss": 2.0, "train/learning_rate": 1e-3}]
  panels = writers.plot_panels(rows)
  assert panels["eval"] == ["eval/accuracy"] and panels["loss"] == ["train/loss"]


# ------------------------------------------------------------ bad input

@pytest.mark.parametrize("make, message", [
    (lambda: OptimizerConfig(learning_rate=float("nan")), "learning_rate=nan: must be a positive"),
    (lambda: OptimizerConfig(learning_rate=float("inf")), "learning_rate=inf"),
    (lambda: OptimizerConfig(grad_clip_norm=0.0), "grad_clip_norm=0.0: must be positive"),
    (lambda: OptimizerConfig(b1=1.5), r"b1=1.5: must be in \[0, 1\)"),
    (lambda: config_lib.override(_config(), {"train.steps": "ten"}), "Cannot set train.steps"),
    (lambda: __import__("datong.train.recipes", fromlist=["get"]).get("no_such_module:config"),
     "cannot import 'no_such_module'"),
    (lambda: ops.attention(np.ones((1, 4, 2, 8), np.float32), np.ones((1, 4, 2, 8), np.float32),
                           np.ones((1, 4, 2, 8), np.float32), bias=np.zeros((1, 4, 4))),
     "bias has shape .1, 4, 4.; it must be 4-D"),
    (lambda: ops.attention(np.ones((1, 4, 2, 8), np.float32), np.ones((1, 4, 0, 8), np.float32),
                           np.ones((1, 4, 0, 8), np.float32)), "empty axis"),
    (lambda: ops.attention(*[np.ones((1, 4, 2, 8), np.int32)] * 3), "floating-point inputs"),
])
def test_bad_values_get_errors_that_name_them(make, message):
  with pytest.raises(ValueError, match=message):
    make()


def test_scalar_image_size_means_a_square_and_bad_ones_name_the_key():
  from datong.train import recipes  # pylint: disable=import-outside-toplevel
  cfg = config_lib.override(recipes.get("vit-digits"), {"image_size": "32"})
  assert cfg.task.model.image_size == (32, 32)
  with pytest.raises(ValueError, match="Cannot apply task.model.image_size"):
    config_lib.override(recipes.get("vit-digits"), {"image_size": "[32, 32, 3]"})


def test_recipe_specs_that_return_no_config_are_refused(tmp_path):
  from datong.train import recipes  # pylint: disable=import-outside-toplevel
  spec = tmp_path / "mine.py"
  spec.write_text("def config():\n  return None\n")
  with pytest.raises(ValueError, match="returned NoneType, not a datong.train.config.RunConfig"):
    recipes.get(f"{spec}:config")


def test_text_tokenizer_and_dataset_errors():
  from datong.train.tasks import text  # pylint: disable=import-outside-toplevel
  from datong.unimodal.tokenizers import ByteTokenizer  # pylint: disable=import-outside-toplevel
  with pytest.raises(ValueError, match=r"text_feature='txt'.*\['text'"):
    text.load_documents("pydoc_text", "validation", "txt")
  with pytest.raises(ValueError, match=r"ids \[300\] are outside its vocabulary \[0, 262\)"):
    ByteTokenizer().decode([104, 300])
  assert ByteTokenizer().decode([104, 105, 256]) == "hi"  # specials are dropped, not errors


def test_bpe_files_without_merges_are_refused(tmp_path):
  from datong.unimodal.tokenizers import BPETokenizer  # pylint: disable=import-outside-toplevel
  path = tmp_path / "bpe.json"
  path.write_text(json.dumps({"format": BPETokenizer.FORMAT}))
  with pytest.raises(ValueError, match="no valid 'merges' list"):
    BPETokenizer.load(str(path))


def _safetensors(path, header: dict, data: bytes = b"", size=None):
  blob = json.dumps(header).encode()
  with open(path, "wb") as f:
    f.write((len(blob) if size is None else size).to_bytes(8, "little"))
    f.write(blob)
    f.write(data)


def test_damaged_safetensors_and_configs_name_the_file_and_tensor(tmp_path):
  from datong.hf.safetensors import read_checkpoint, read_safetensors  # pylint: disable=import-outside-toplevel
  path = str(tmp_path / "model.safetensors")
  _safetensors(path, {}, size=2**40)
  with pytest.raises(ValueError, match="header claims 1099511627776 bytes"):
    read_safetensors(path)
  entry = lambda start: {"dtype": "F32", "shape": [2], "data_offsets": [start, start + 8]}
  _safetensors(path, {"a": entry(0), "b": entry(4)}, bytes(16))
  with pytest.raises(ValueError, match="tensors 'a' and 'b' overlap"):
    read_safetensors(path)
  _safetensors(path, {"a": entry(0), "b": entry(8)}, bytes(12))
  with pytest.raises(ValueError, match="tensor 'b' ends at byte 16 .* truncated"):
    read_safetensors(path)
  (tmp_path / "config.json").write_text("{not json")
  with pytest.raises(ValueError, match="config.json: not valid JSON"):
    read_checkpoint(str(tmp_path))

"""Two processes on localhost (jax.distributed, CPU) equal one process."""

import os
import socket
import subprocess
import sys

import numpy as np

from datong.train import loop, writers

sys.path.insert(0, os.path.dirname(__file__))


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WORKER = """
import sys
sys.path.insert(0, {tests!r})
from datong.train import loop
from engine_task import run_config
from datong.train.config import override
assert loop.maybe_initialize_distributed()
import jax
assert jax.process_count() == 2 and jax.device_count() == 8, (jax.process_count(), jax.device_count())
cfg = override(run_config(), {{"train.steps": "4", "train.log_every": "1", "mesh.data": "8"}})
loop.train(cfg, {workdir!r}, progress=False)
"""


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_give_the_single_process_losses(tmp_path):
  from engine_task import run_config  # pylint: disable=import-outside-toplevel
  from datong.train.config import override  # pylint: disable=import-outside-toplevel
  single = str(tmp_path / "single")
  cfg = override(run_config(), {"train.steps": "4", "train.log_every": "1", "mesh.data": "8"})
  loop.train(cfg, single, progress=False)

  multi = str(tmp_path / "multi")
  port = _free_port()
  script = WORKER.format(tests=os.path.join(REPO, "tests"), workdir=multi)
  procs = []
  for pid in range(2):
    env = {**os.environ, "PYTHONPATH": REPO, "DATONG_COORDINATOR": f"127.0.0.1:{port}",
           "DATONG_NUM_PROCESSES": "2", "DATONG_PROCESS_ID": str(pid),
           "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    procs.append(subprocess.Popen([sys.executable, "-c", script], env=env, cwd=REPO,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
  outs = [p.communicate(timeout=300)[0].decode() for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  single_losses = [r["train/loss"] for r in writers.read_metrics(single) if "train/loss" in r]
  multi_rows = writers.read_metrics(multi)
  multi_losses = [r["train/loss"] for r in multi_rows if "train/loss" in r]
  assert len(multi_losses) == 4
  np.testing.assert_allclose(multi_losses, single_losses, rtol=2e-5)
  single_eval = [r for r in writers.read_metrics(single) if "eval/accuracy" in r][-1]
  multi_eval = [r for r in multi_rows if "eval/accuracy" in r][-1]
  assert multi_eval["eval/count"] == 360
  assert abs(multi_eval["eval/accuracy"] - single_eval["eval/accuracy"]) < 1e-9

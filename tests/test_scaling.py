"""Scaling-law sweeps: the pysource corpus, `datong sweep`, `datong fit`."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from datong import cli
from datong.train import datasets, scaling, sweep

TRUE = {"E": 1.2, "A": 40.0, "alpha": 0.35, "B": 60.0, "beta": 0.3}


def _law(n, d, c=TRUE):
  return c["E"] + c["A"] * n ** -c["alpha"] + c["B"] * d ** -c["beta"]


def _synthetic(seed, noise=0.005):
  rng = np.random.default_rng(seed)
  n = np.repeat(np.geomspace(1e5, 1e8, 6), 4)
  d = np.tile(np.geomspace(1e5, 1e8, 4), 6)
  return n, d, _law(n, d) * np.exp(rng.normal(0.0, noise, n.size))


@pytest.mark.parametrize("seed", [0, 1])
def test_joint_fit_recovers_the_constants_within_its_intervals(seed):
  n, d, loss = _synthetic(seed)
  fit = scaling.fit_law("ND", n, d, loss, bootstrap=60, seed=seed)
  got, intervals = fit.constants(), fit.intervals()
  for name, true in TRUE.items():
    low, high = intervals[name]
    assert low <= true <= high, (name, true, intervals[name], got[name])
  # Informative, not merely wide: the exponents are pinned to a few hundredths.
  assert intervals["alpha"][1] - intervals["alpha"][0] < 0.1
  assert intervals["beta"][1] - intervals["beta"][0] < 0.05
  value, low, high = fit.predict_interval(3e6, 3e6)
  assert low <= _law(3e6, 3e6) <= high and abs(value / _law(3e6, 3e6) - 1) < 0.01


def test_single_variable_laws_and_the_noiseless_limit():
  n = np.geomspace(1e4, 1e7, 7)
  loss = 2.0 + 30.0 * n ** -0.4
  fit = scaling.fit_law("N", n, np.ones_like(n), loss, bootstrap=10)
  c = fit.constants()
  np.testing.assert_allclose([c["E"], c["A"], c["alpha"]], [2.0, 30.0, 0.4], rtol=1e-3)
  d = np.geomspace(1e4, 1e7, 6)
  fit = scaling.fit_law("D", np.ones_like(d), d, 1.5 + 9.0 * d ** -0.25, bootstrap=10)
  np.testing.assert_allclose(list(fit.constants().values()), [1.5, 9.0, 0.25], rtol=1e-3)


def test_compute_optimal_is_the_minimum_of_the_isoflop_curve():
  n, d, loss = _synthetic(0, noise=0.0)
  fit = scaling.fit_law("ND", n, d, loss, bootstrap=10)
  budget = 1e15
  best = fit.compute_optimal(budget)
  grid = np.geomspace(1e4, 1e10, 20001)
  curve = fit.predict(grid, budget / (6 * grid))
  assert abs(np.log(grid[np.argmin(curve)] / best["N"])) < 1e-3
  assert best["N"] * best["D"] * 6 == pytest.approx(budget)
  assert best["loss"] == pytest.approx(curve.min(), rel=1e-6)


def test_fit_rejects_bad_input():
  with pytest.raises(ValueError, match="positive"):
    scaling.fit_law("N", [1e5, 1e6, 1e7], [1, 1, 1], [1.0, -1.0, 0.5])
  with pytest.raises(ValueError, match="at least"):
    scaling.fit_law("ND", [1e5, 1e6], [1e5, 1e6], [2.0, 1.0])
  with pytest.raises(ValueError, match="give both N and D"):
    scaling.parse_predict("N=3e6")
  with pytest.raises(ValueError, match="N=<params>"):
    scaling.parse_predict("N=abc,D=1")


def test_fit_command_on_a_summary(tmp_path, capsys):
  n, d, loss = _synthetic(3)
  with open(tmp_path / sweep.SUMMARY, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["point", "status", "non_embedding_params", "params", "tokens", "eval/loss"])
    for i, (a, b, c) in enumerate(zip(n, d, loss)):
      w.writerow([f"p{i}", "done", a, a * 1.1, b, c])
  assert cli.main(["fit", str(tmp_path), "--metric", "eval/loss", "--predict", "N=3e6,D=3e6",
                   "--bootstrap", "20"]) == 0
  out = capsys.readouterr().out
  assert "L(N, D)" in out and "predicted eval/loss" in out and "does not resolve" not in out
  rec = json.loads((tmp_path / "fit" / "fit.json").read_text())
  low, high = rec["prediction"]["interval_95"]
  assert low <= _law(3e6, 3e6) <= high
  for name in ("loss_vs_N.png", "loss_vs_D.png", "isoflop.png"):
    assert (tmp_path / "fit" / name).stat().st_size > 1000
  # A metric the sweep does not have is named, with the ones it has.
  assert cli.main(["fit", str(tmp_path), "--metric", "eval/bits"]) == cli.EXIT_ERROR
  assert "eval/loss" in capsys.readouterr().err


def test_a_sweep_that_does_not_resolve_n_is_told_so():
  n = np.repeat(np.geomspace(1e5, 5e6, 5), 3)
  d = np.tile([1e5, 2e5, 4e5], 5)
  rng = np.random.default_rng(0)
  loss = 12.0 * d ** -0.12 * np.exp(rng.normal(0.0, 0.01, n.size))  # no N dependence
  rows = [{"point": str(i), "status": "done", "non_embedding_params": a, "tokens": b,
           "eval/loss": c} for i, (a, b, c) in enumerate(zip(n, d, loss))]
  notes = " ".join(scaling.fit_sweep(rows, "eval/loss", bootstrap=10)["notes"])
  assert "does not resolve how the loss scales with N" in notes


def test_grid_parsing():
  axes = [sweep.parse_axis("width/depth=64/2,128/4"), sweep.parse_axis("train.steps=10,20")]
  points = sweep.grid_points(axes)
  assert points[1] == {"width": "64", "depth": "2", "train.steps": "20"}
  assert len(points) == 4
  assert sweep.point_name(points[1]) == "width-64_depth-2_steps-20"
  for bad in ("width", "width=", "width/depth=64", "steps=1,1"):
    with pytest.raises(ValueError, match="--grid"):
      sweep.parse_axis(bad)
  with pytest.raises(ValueError, match="two axes"):
    sweep.grid_points([sweep.parse_axis("steps=1,2"), sweep.parse_axis("steps=3")])


def test_pysource_splits_are_disjoint_by_package_and_deterministic():
  split = datasets.pysource_split_modules()
  top = {s: {m.split(".")[0] for m in split[s]} for s in split}
  assert not top["train"] & top["validation"]
  assert set(split["train"]) | set(split["validation"]) == set(datasets.pysource_modules())
  names = sorted(top["train"] | top["validation"])
  assert top["validation"] == {t for i, t in enumerate(names) if i % 20 == 2}
  assert not any(part in ("test", "tests", "idle_test")
                 for m in datasets.pysource_modules() for part in m.split("."))
  datasets.pysource_modules.cache_clear()
  assert datasets.pysource_split_modules() == split
  sizes = datasets.pysource_split_bytes()
  assert sizes["train"] > 5_000_000 and 0.01 < sizes["validation"] / sizes["train"] < 0.1


def test_pysource_builder_holds_the_split_modules():
  from datong.train import data
  src = data.load_source("pysource_text", "validation")
  titles = [src[i]["title"].decode() for i in range(len(src))]
  assert titles == datasets.pysource_split_modules()["validation"]
  assert sum(len(src[i]["text"]) for i in range(len(src))) == \
      datasets.pysource_split_bytes()["validation"]


# -------------------------------------------------------- a sweep, for real --

TINY = ["--set", "depth=1", "--set", "heads=2", "--set", "tokenizer=byte", "--set",
        "vocab_size=264", "--set", "seq_length=32", "--set", "batch_size=4", "--set",
        "eval_every=0", "--set", "log_every=50", "--set", "eval_stride=0"]


def _sweep_cmd(workdir):
  return [sys.executable, "-m", "datong.cli", "sweep", "gpt-pydoc", "--workdir", str(workdir),
          "--grid", "width/mlp_dim=16/32,24/48", "--grid", "train.steps=4,3000", *TINY]


# One CPU device for the runs (conftest's 8 fake ones make tiny steps slow).
ONE_DEVICE = {**os.environ, "XLA_FLAGS": ""}


def test_sweep_runs_every_point_and_resumes_after_an_interruption(tmp_path):
  workdir = tmp_path / "sweep"
  first = workdir / "width-16_mlp_dim-32_steps-4"
  long = workdir / "width-16_mlp_dim-32_steps-3000"
  proc = subprocess.Popen(_sweep_cmd(workdir), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, env=ONE_DEVICE)
  # Interrupt while the second point is training (it has logged a row).
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if (first / "done.json").exists() and (long / "metrics.jsonl").exists() and \
        (long / "metrics.jsonl").read_text().strip():
      break
    time.sleep(0.05)
  assert proc.poll() is None, proc.communicate()[0]
  proc.send_signal(signal.SIGINT)
  out = proc.communicate(timeout=300)[0]
  assert proc.returncode == sweep.EXIT_STOPPED, out
  assert "run the same command again" in out
  done_before = (first / "done.json").stat().st_mtime_ns
  assert not (long / "done.json").exists() and os.listdir(long / "checkpoints")

  again = subprocess.run(_sweep_cmd(workdir), capture_output=True, text=True, timeout=600,
                         env=ONE_DEVICE)
  assert again.returncode == 0, again.stdout + again.stderr
  assert (first / "done.json").stat().st_mtime_ns == done_before  # finished: not rerun
  assert "resumed at step" in (workdir / "width-16_mlp_dim-32_steps-3000.log").read_text()
  rows = sweep.read_summary(str(workdir))
  assert [r["status"] for r in rows] == ["done"] * 4
  assert all(np.isfinite(r["eval/bits_per_byte"]) for r in rows)
  assert rows[1]["tokens"] == 3000 * 4 * 32 and rows[0]["params"] < rows[2]["params"]
  assert rows[0]["non_embedding_params"] < rows[0]["params"]
  assert json.loads((workdir / sweep.SWEEP_INFO).read_text())["metric"] == "eval/bits_per_byte"
  # Another recipe in the same directory is refused, naming the one there.
  other = subprocess.run([sys.executable, "-m", "datong.cli", "sweep", "bert-pydoc",
                          "--workdir", str(workdir), "--grid", "train.steps=2"],
                         capture_output=True, text=True, timeout=300, env=ONE_DEVICE)
  assert other.returncode == cli.EXIT_ERROR and "gpt-pydoc" in other.stderr

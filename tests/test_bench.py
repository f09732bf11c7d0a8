"""The benchmarks' smoke modes run (CI hook): tiny shapes, real code paths."""

import math
import os
import sys

import jax

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "bench"))

import throughput  # noqa: E402  pylint: disable=wrong-import-position


def test_throughput_smoke_times_the_trainer_step_and_reports_mfu(capsys):
  rows = throughput.main(["--smoke", "--impls", "xla", "--peak-tflops", "1"])
  out = capsys.readouterr().out
  assert [(r[0], r[1]) for r in rows] == [("gpt2", "xla"), ("vit", "xla")]
  for model, _, per_device, runner, secs in rows:
    assert runner.batch_size == per_device * jax.device_count()
    assert runner.fallback is None
    assert math.isfinite(runner.loss) and secs > 0
    assert runner.flops_per_example > 0
  # One table: a header and a row per (model, impl), MFU computed from the peak.
  lines = out.splitlines()
  header = next(i for i, line in enumerate(lines) if line.startswith("model"))
  assert "tokens/s" in lines[header + 2] and "images/s" in lines[header + 3]
  assert lines[header + 2].split()[6].endswith("%")


def test_throughput_marks_an_impl_that_falls_back(capsys):
  if jax.default_backend() == "tpu":
    return
  rows = throughput.main(["--smoke", "--models", "gpt2", "--impls", "pallas_tpu"])
  assert rows[0][3].fallback
  assert "fell back to reference" in capsys.readouterr().out

"""How much the train loop costs over calling the jitted step alone.

    python bench/loop_overhead.py [--steps 60] [--width 256] [--repeats 3]

Same process, same compiled step, same model: (a) the bare step called in a
Python loop on one pre-placed batch; (b) ``datong.train.loop.train`` (data
reading + preprocessing in a host thread, global batch placement, metric
fetches, logging). Reports per-step times and the overhead ratio. Runs on
whatever devices JAX has (CPU here; a GPU when present).
"""

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

import jax

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from datong.train import loop  # pylint: disable=wrong-import-position
from datong.train.config import (MeshConfig, OptimizerConfig, RunConfig,  # pylint: disable=wrong-import-position
                                 TrainConfig)
from engine_task import DigitsTaskConfig  # pylint: disable=wrong-import-position
from step_time import step_runner  # pylint: disable=wrong-import-position


def config(args, steps):
  backbone = DigitsTaskConfig().backbone.replace(width=args.width, mlp_dim=4 * args.width,
                                                 depth=args.depth, heads=max(args.width // 64, 1))
  return RunConfig(task=DigitsTaskConfig(backbone=backbone),
                   train=TrainConfig(steps=steps, batch_size=args.batch, log_every=args.log_every,
                                     checkpoint_every=0),
                   optimizer=OptimizerConfig(learning_rate=1e-4), mesh=MeshConfig())


def bare_step_time(args) -> float:
  return step_runner(config(args, args.steps))(args.steps)


def loop_step_time(args) -> float:
  """Time between the first and the last log of ``loop.train`` (compile excluded)."""
  workdir = tempfile.mkdtemp()
  marks = {}
  warm = args.log_every

  def on_step(step, _):
    marks[step] = time.perf_counter()

  loop.train(config(args, warm + args.steps), workdir, progress=False, on_step=on_step)
  shutil.rmtree(workdir)
  return (marks[warm + args.steps] - marks[warm]) / args.steps


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--steps", type=int, default=60)
  parser.add_argument("--log-every", type=int, default=20)
  parser.add_argument("--width", type=int, default=256)
  parser.add_argument("--depth", type=int, default=4)
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  if args.steps % args.log_every:
    parser.error("--steps must be a multiple of --log-every")
  bare, looped = [], []
  for _ in range(args.repeats):
    bare.append(bare_step_time(args))
    looped.append(loop_step_time(args))
  b, l = statistics.median(bare), statistics.median(looped)
  print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}, jax {jax.__version__}")
  print(f"model: width {args.width}, depth {args.depth}, batch {args.batch}, {args.steps} steps, "
        f"{args.repeats} repeats (median)")
  print(f"bare jitted step : {b * 1e3:8.2f} ms/step   (all: {', '.join(f'{x*1e3:.2f}' for x in bare)})")
  print(f"datong train loop: {l * 1e3:8.2f} ms/step   (all: {', '.join(f'{x*1e3:.2f}' for x in looped)})")
  print(f"loop overhead    : {100 * (l / b - 1):+.2f}%")


if __name__ == "__main__":
  main()

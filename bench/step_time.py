"""A recipe's compiled train step, timed under several sets of overrides.

    python bench/step_time.py gpt-pydoc "" "optimizer.algorithm=muon" [--steps 15] [--repeats 3]

Each variant is a comma-separated list of ``key=value`` overrides (``""`` is
the recipe as is). The step runs on one pre-placed batch after 3 warm-up
steps, so data loading is not timed (``loop_overhead.py`` measures that).
Variants run interleaved, ``--repeats`` rounds, and the median per variant
is reported with the ratio to the first variant.
"""

import argparse
import contextlib
import statistics
import tempfile
import time

import jax

from datong.train import data as data_lib
from datong.train import loop, recipes
from datong.train.config import RunConfig, override


def step_runner(cfg: RunConfig, context=contextlib.nullcontext):
  """A callable ``run(n)``: ``n`` more steps on one batch, in seconds per step;
  ``run.num_params`` is the model's parameter count.

  The step is compiled and warmed up here (inside ``context()``, where the
  step is traced), so ``run`` times only steps. ``bench/peers.py`` and
  ``bench/dense_grad.py`` time the Trainer through this.
  """
  trainer = loop.Trainer(cfg, tempfile.mkdtemp())
  with context():
    state = trainer.init_state()
    batch = data_lib.to_global(next(trainer.train_iterator()), trainer.batch_sharding)
    for _ in range(3):  # compile + warm up
      state, metrics = trainer.step(state, batch)
  jax.block_until_ready(metrics)

  def run(n: int) -> float:
    nonlocal state
    start = time.perf_counter()
    for _ in range(n):
      state, out = trainer.step(state, batch)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / n
  run.num_params = sum(x.size for x in jax.tree.leaves(state.params))
  return run


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("recipe")
  parser.add_argument("variants", nargs="+", help='"k=v,k=v" overrides; "" = the recipe')
  parser.add_argument("--steps", type=int, default=15)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  runners = {v: step_runner(override(recipes.get(args.recipe),
                                    dict(kv.split("=", 1) for kv in v.split(",") if kv)))
             for v in args.variants}
  times = {v: [] for v in args.variants}
  for _ in range(args.repeats):
    for v, run in runners.items():
      times[v].append(run(args.steps))
  base = statistics.median(times[args.variants[0]])
  print(f"{args.recipe} on {jax.devices()[0].platform}, jax {jax.__version__}, "
        f"{args.steps} steps x {args.repeats} rounds (median):")
  for v in args.variants:
    t = statistics.median(times[v])
    print(f"  {v or '(recipe)':60s} {t * 1e3:8.1f} ms/step  x{t / base:.3f}")


if __name__ == "__main__":
  main()

"""Mixture step time: every member per step vs one sampled member per step.

    python bench/mixture.py                  # unified-digits, 1 CPU device
    python bench/mixture.py --steps 5 --rounds 3

Three versions of the unified-digits step (GPT + MAE + CLIP on one
backbone), each the engine's own jitted step (``loop.Trainer``) on one CPU
device: ``all`` (every member's loss, summed), ``sample/switch`` (one member
drawn from the step's rng, ``lax.switch`` runs only its branch) and
``sample/weights`` (every member computed, multiplied by a one-hot of the
drawn member). The versions' steps run interleaved, on the same batches;
the median seconds per step of each is reported, with the members each
version drew. Weights are equal, so ``sample`` draws each member a third of
the time.

Measured (2 shared CPU cores, load 5-7, ``--steps 6 --rounds 3``):

    version            s/step  vs all  members run per step
    all                 2.482    1.00  {'gpt,mae,clip': 18}
    sample/switch       1.103    0.44  {'clip': 3, 'gpt': 11, 'mae': 4}
    sample/weights      2.476    1.00  {'clip': 3, 'gpt': 11, 'mae': 4}

``switch`` runs only the drawn branch (an XLA conditional); ``weights``
computes all three members every step, like ``all``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time

if __package__ in (None, ""):
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")

import jax

from datong.train import data as data_lib
from datong.train import loop, recipes
from datong.train.config import MeshConfig

VERSIONS = {"all": ("all", "switch"), "sample/switch": ("sample", "switch"),
            "sample/weights": ("sample", "weights")}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=6, help="steps per round and version")
  parser.add_argument("--rounds", type=int, default=3)
  args = parser.parse_args()
  base = dataclasses.replace(recipes.get("unified-digits"), mesh=MeshConfig(1, 1, 1))
  trainers, states = {}, {}
  workdir = tempfile.mkdtemp()
  for name, (mode, impl) in VERSIONS.items():
    task = dataclasses.replace(base.task, mode=mode, sample_impl=impl)
    trainer = loop.Trainer(dataclasses.replace(base, task=task), workdir,
                           devices=jax.devices()[:1])
    start = time.perf_counter()
    trainer.compile()
    states[name] = trainer.init_state()
    trainers[name] = trainer
    print(f"{name}: compiled in {time.perf_counter() - start:.1f} s", flush=True)
  first = next(iter(trainers.values()))
  it = first.train_iterator()
  batches = [data_lib.to_global(next(it), first.batch_sharding) for _ in range(args.steps)]
  it.close()
  times = {name: [] for name in trainers}
  drawn = {name: [] for name in trainers}
  for name, trainer in trainers.items():  # warm-up: the first call of each step
    states[name], m = trainer.step(states[name], batches[0])
    jax.block_until_ready(m)
  for _ in range(args.rounds):
    for name, trainer in trainers.items():
      for batch in batches:
        start = time.perf_counter()
        states[name], metrics = trainer.step(states[name], batch)
        metrics = jax.device_get(metrics)
        times[name].append(time.perf_counter() - start)
        drawn[name].append(",".join(m for m in ("gpt", "mae", "clip")
                                    if metrics.get(f"train/{m}/sampled", 1.0) > 0))
  base_time = statistics.median(times["all"])
  print(f"{'version':16s} {'s/step':>8s} {'vs all':>7s}  members run per step")
  for name in trainers:
    t = statistics.median(times[name])
    counts = {d: drawn[name].count(d) for d in sorted(set(drawn[name]))}
    print(f"{name:16s} {t:8.3f} {t / base_time:7.2f}  {counts}")


if __name__ == "__main__":
  main()

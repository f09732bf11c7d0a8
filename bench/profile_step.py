"""Where a recipe's Trainer step spends its time, by the source of each XLA op.

    python bench/profile_step.py gpt-pydoc [--steps 3] [--top 15]

Traces ``--steps`` steps with ``jax.profiler`` (after 3 warm-up steps, one
pre-placed batch), sums each compiled op's time and groups the ops by the
model code that produced them (the ``op_name`` metadata of the optimized
HLO): attention core (scores, masks, softmax, values), attention
projections, MLP, norms, embedding / head / loss, optimizer, other. Op times
of concurrently running thunks add up, so shares, not the sum, are the point.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile

if __package__ in (None, ""):
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")

import jax

from datong.train import data as data_lib
from datong.train import loop, recipes


def category(op_name: str) -> str:
  if "/attention/" in op_name and any(
      s in op_name for s in ("vmap", "dot_product", "softmax", "_where", "/div", "exp")):
    return "attention core (scores/mask/softmax/values)"
  if "/mlp/" in op_name:
    return "mlp"
  if "/attention/" in op_name:
    return "attention projections / rotary"
  if any(s in op_name for s in ("cond", "adam", "update", "opt")):
    return "optimizer"
  if "norm" in op_name:
    return "norms"
  if any(s in op_name for s in ("attend", "cross_entropy", "logsumexp", "embed", "loss")):
    return "embedding / head / loss"
  return "other"


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("recipe")
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--top", type=int, default=15)
  args = parser.parse_args(argv)
  trainer = loop.Trainer(recipes.get(args.recipe), tempfile.mkdtemp())
  state = trainer.init_state()
  batch = data_lib.to_global(next(trainer.train_iterator()), trainer.batch_sharding)
  for _ in range(3):
    state, metrics = trainer.step(state, batch)
  jax.block_until_ready(metrics)
  trace_dir = tempfile.mkdtemp()
  jax.profiler.start_trace(trace_dir)
  for _ in range(args.steps):
    state, metrics = trainer.step(state, batch)
  jax.block_until_ready(metrics)
  jax.profiler.stop_trace()
  path = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)[0]
  events = json.load(gzip.open(path))["traceEvents"]
  op_names = {}
  for line in trainer.compile().as_text().splitlines():
    m = re.match(r'\s*(?:ROOT )?%([\w.\-]+) = .*op_name="([^"]+)"', line)
    if m:
      op_names[m.group(1)] = m.group(2)
  per_op = collections.Counter()
  for e in events:
    if e.get("ph") == "X" and e.get("name") in op_names:
      per_op[e["name"]] += e.get("dur", 0) / args.steps / 1e3  # ms per step
  groups = collections.Counter()
  for name, ms in per_op.items():
    groups[category(op_names[name])] += ms
  total = sum(groups.values())
  print(f"{args.recipe}: jax {jax.__version__}, {args.steps} steps, load {os.getloadavg()[0]:.2f}")
  print("| part of the step | op ms / step | share |")
  print("| --- | --- | --- |")
  for name, ms in groups.most_common():
    print(f"| {name} | {ms:.1f} | {ms / total:.1%} |")
  print("\nlargest ops (ms / step):")
  for name, ms in per_op.most_common(args.top):
    print(f"  {ms:7.1f}  {name:28s} {op_names[name][:90]}")


if __name__ == "__main__":
  main()

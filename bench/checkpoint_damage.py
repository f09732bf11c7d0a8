"""How checkpoint damage is caught: flip one byte at N evenly spaced offsets of
the largest state file of a small run's checkpoint, restore each time, count
the outcomes (damaged = fingerprint mismatch, unreadable = cannot decode,
silent = restored arrays equal to the undamaged ones).

    python bench/checkpoint_damage.py --workdir /tmp/damage --offsets 41
"""

import argparse
import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from engine_task import DigitsTaskConfig  # pylint: disable=wrong-import-position

from datong.train import checkpoint as ckpt_lib, loop  # pylint: disable=wrong-import-position
from datong.train.config import MeshConfig, RunConfig, TrainConfig  # pylint: disable=wrong-import-position


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--offsets", type=int, default=41)
  args = parser.parse_args()
  config = RunConfig(task=DigitsTaskConfig(), mesh=MeshConfig(data=1),
                     train=TrainConfig(steps=6, batch_size=8, log_every=2, checkpoint_every=0))
  devices = jax.devices()[:1]
  if not os.path.isdir(os.path.join(args.workdir, "checkpoints")):
    loop.train(config, args.workdir, devices=devices, evaluate=False, progress=False)
  trainer = loop.Trainer(config, args.workdir, devices=devices)
  step = ckpt_lib.Checkpointer(args.workdir).latest_step()
  clean, _ = ckpt_lib.Checkpointer(args.workdir).restore(step, trainer.abstract_state)
  clean = jax.device_get(clean)
  state_dir = os.path.join(args.workdir, "checkpoints", str(step), "state")
  files = [os.path.join(r, n) for r, _, names in os.walk(state_dir) for n in names]
  path = max(files, key=os.path.getsize)
  original = open(path, "rb").read()
  outcomes = {}
  try:
    for offset in range(0, len(original), max(len(original) // args.offsets, 1)):
      damaged = bytearray(original)
      damaged[offset] ^= 0x10
      with open(path, "wb") as f:
        f.write(damaged)
      try:
        state, _ = ckpt_lib.Checkpointer(args.workdir).restore(step, trainer.abstract_state)
        same = all(np.array_equal(a, b) for a, b in
                   zip(jax.tree.leaves(jax.device_get(state)), jax.tree.leaves(clean)))
        outcome = "silent, arrays equal" if same else "SILENT, ARRAYS DIFFER"
      except ckpt_lib.CheckpointError as e:
        outcome = "damaged" if "is damaged" in str(e) else "unreadable"
      outcomes.setdefault(outcome, []).append(offset)
  finally:
    with open(path, "wb") as f:
      f.write(original)
  print(f"{path} ({len(original)} bytes), one byte flipped at each offset:")
  for outcome, offsets in sorted(outcomes.items()):
    print(f"  {outcome:22s} {len(offsets):3d}  e.g. offsets {offsets[:4]}")


if __name__ == "__main__":
  main()

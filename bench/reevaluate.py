"""Evaluate a finished run again with other evaluation settings (no training).

    python bench/reevaluate.py beit-digits /tmp/beit-digits task.probe.train_views=4 task.probe.c=0.0

Builds the recipe with the overrides (they must not change the model's
parameters: probe, sample or evaluation settings), loads the run's latest
parameters and prints the task's ``evaluate`` metrics. Evaluation files
(PNGs, captions) go to ``--out`` (default: a temporary directory).
"""

from __future__ import annotations

import argparse
import json
import tempfile

import jax
import jax.numpy as jnp

from datong.train import checkpoint as ckpt_lib
from datong.train import config as config_lib
from datong.train import loop, recipes


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("recipe")
  p.add_argument("workdir")
  p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
  p.add_argument("--out", default="")
  args = p.parse_args(argv)
  overrides = dict(item.split("=", 1) for item in args.overrides)
  config = config_lib.override(recipes.get(args.recipe), overrides)
  trainer = loop.Trainer(config, args.out or tempfile.mkdtemp(prefix="datong-reeval-"))
  params = jax.tree.map(jnp.asarray, ckpt_lib.load_params(args.workdir))
  print(json.dumps({"overrides": overrides, **trainer.evaluate(params, 0)}, indent=1), flush=True)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())

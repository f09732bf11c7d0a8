"""GPT on the Python standard library's sources: held-out bits per byte vs xz -9.

The corpus for scaling laws (``pysource_text``: ~11.5 MB of training code,
so every run here is single-epoch; 553 KB of held-out packages). The anchor
is ``pysource_xz_baseline()``: xz -9 on the held-out split given all of the
training split, 1.408 bits/byte on Python 3.11.7.

Model as ``gpt-pydoc``: 4 layers, width 192, 4 heads, rotary positions,
sequence 256, packed modules (no attention across them), a byte-level BPE
of 1024 ids learned from the training split at task build. Held-out
evaluation scores every token once with >= 128 tokens of context.

    datong train gpt-pysource --workdir /tmp/gpt-pysource

Measured (``python bench/recipes.py gpt-pysource``, 2-core CPU, load 1.9,
jax 0.10.2): 700 steps in 5m09s wall, held-out ``eval/bits_per_byte``
**1.812** against xz -9's 1.408 (BENCHMARKS.md).

Scaling-law sweeps run on it (``datong sweep gpt-pysource ...``; README).
"""

import dataclasses

from datong.train.config import RunConfig
from datong.train.recipes import gpt_pydoc

NAME = "gpt-pysource"
METRIC = "eval/bits_per_byte"
TARGET = None  # reported next to the xz -9 anchor (1.408 on 3.11.7), not a bound


def config() -> RunConfig:
  """``gpt-pydoc``'s model and optimizer on the code corpus: one pass over
  1.4M of its 4.4M training tokens, so a higher rate than on 434 KB of docs."""
  base = gpt_pydoc.config()
  return dataclasses.replace(
      base,
      task=dataclasses.replace(base.task, dataset="pysource_text"),
      train=dataclasses.replace(base.train, steps=700, eval_every=350),
      optimizer=dataclasses.replace(base.optimizer, learning_rate=2e-3))

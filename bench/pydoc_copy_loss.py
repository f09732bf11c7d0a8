"""Where a gpt-pydoc model's held-out bits go: copyable text vs new text.

    python bench/pydoc_copy_loss.py /tmp/gpt-pydoc      # a gpt-pydoc run's workdir

xz -9 reaches 1.79 bits/byte on the held-out topics only given the
training text, by copying long verbatim stretches of it. This splits the
held-out bytes by the longest verbatim match with the training text that
covers them (a run of consecutive 16-byte substrings that all occur in the
training text) and reports the model's bits per byte in each class, scored
exactly as ``eval/bits_per_byte`` is (the recipe's sliding windows; each
token's loss spread evenly over its bytes). It answers: how far would the
model get if it copied every long match for free?
"""

from __future__ import annotations

import argparse
import math
import os
import sys

if __package__ in (None, ""):  # `python bench/pydoc_copy_loss.py` from a checkout
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import numpy as np

from datong.train import recipes
from datong.train.checkpoint import load_params
from datong.ops.losses import cross_entropy
from datong.train.tasks.text import load_documents

GRAM = 16
CLASSES = ((0, 16), (16, 32), (32, 128), (128, None))


def match_lengths(doc: bytes, grams: set) -> np.ndarray:
  """Per byte of ``doc``: the length of the longest run of training
  ``GRAM``-grams covering it (0 when no ``GRAM``-gram covering it occurs)."""
  hits = [doc[i:i + GRAM] in grams for i in range(len(doc) - GRAM + 1)]
  out = np.zeros(len(doc), int)
  i = 0
  while i < len(hits):
    if not hits[i]:
      i += 1
      continue
    j = i
    while j < len(hits) and hits[j]:
      j += 1
    span = slice(i, j + GRAM - 1)
    out[span] = np.maximum(out[span], j - i + GRAM - 1)
    i = j
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("workdir", help="a gpt-pydoc run's workdir (its latest checkpoint)")
  parser.add_argument("--batch", type=int, default=16)
  args = parser.parse_args()
  task = recipes.get("gpt-pydoc").task.build()
  params = load_params(args.workdir)
  cfg = task.config
  train = b"".join(load_documents(cfg.dataset, cfg.train_split, cfg.text_feature))
  held = load_documents(cfg.dataset, cfg.eval_split, cfg.text_feature)
  grams = {train[i:i + GRAM] for i in range(len(train) - GRAM + 1)}

  rows = task.pack_windows(held, cfg.eval_stride)
  nll_fn = jax.jit(lambda p, b: cross_entropy(
      task._logits(p, b, jax.random.PRNGKey(0), False), b["targets"])[0])  # pylint: disable=protected-access
  nll = np.concatenate([np.asarray(nll_fn(params, {k: v[i:i + args.batch]
                                                   for k, v in rows.items()}))
                        for i in range(0, len(rows["inputs"]), args.batch)])
  scored = (rows["loss_weights"] > 0) & (rows["byte_counts"] > 0)  # in document order
  tok_bits, tok_bytes = nll[scored] / math.log(2), rows["byte_counts"][scored].astype(int)
  per_byte = np.repeat(tok_bits / tok_bytes, tok_bytes)
  cover = np.concatenate([match_lengths(doc, grams) for doc in held])
  if len(cover) != len(per_byte):
    raise SystemExit(f"byte counts disagree: {len(cover)} document bytes vs "
                     f"{len(per_byte)} scored bytes")
  total = per_byte.sum()
  print(f"held-out bytes {len(per_byte)}, bits/byte {per_byte.mean():.3f}")
  print("| longest verbatim match with the training text | share of bytes "
        "| model bits/byte | share of the model's bits |")
  print("| --- | --- | --- | --- |")
  for lo, hi in CLASSES:
    m = (cover >= lo) & (cover < (hi or np.inf))
    label = f"< {hi} bytes" if not lo else (f"{lo}-{hi - 1} bytes" if hi else f">= {lo} bytes")
    print(f"| {label} | {m.mean():.1%} | {per_byte[m].mean():.3f} | "
          f"{per_byte[m].sum() / total:.1%} |")
  free = cover >= 32
  print(f"bits/byte if every byte in a >= 32-byte match cost nothing: "
        f"{per_byte[~free].sum() / len(per_byte):.3f}")


if __name__ == "__main__":
  main()

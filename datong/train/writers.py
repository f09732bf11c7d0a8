"""Where metrics go: metrics.jsonl, TensorBoard, a progress bar, PNG plots.

Only process 0 writes. ``metrics.jsonl`` has one JSON object per logged step
with ``step`` and names such as ``train/loss`` and ``eval/accuracy``.
"""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Optional

import jax


class MetricWriter:
  """Append-only metrics log for one workdir, shared by resumed runs."""

  def __init__(self, workdir: str, *, total_steps: int, start_step: int = 0,
               progress: Optional[bool] = None):
    self.workdir = workdir
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    self._bar = None
    if not self.enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._file = open(self.path, "a", encoding="utf-8")  # pylint: disable=consider-using-with
    try:
      from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
    except ImportError:
      self._tb = None
    progress = sys.stderr.isatty() if progress is None else progress
    if progress:
      from tqdm import tqdm  # pylint: disable=import-outside-toplevel
      self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

  def write(self, step: int, metrics: dict):
    if not self.enabled:
      return
    clean = {k: _to_python(v) for k, v in metrics.items()}
    self._file.write(json.dumps({"step": int(step), **clean}) + "\n")
    self._file.flush()
    if self._tb is not None:
      for key, value in clean.items():
        if isinstance(value, (int, float)) and math.isfinite(value):
          self._tb.add_scalar(key, value, step)
      self._tb.flush()

  def progress(self, step: int, metrics: Optional[dict] = None):
    if self._bar is None:
      return
    self._bar.n = step
    if metrics:
      shown = {k.split("/")[-1]: f"{v:.4g}" for k, v in metrics.items()
               if k in ("train/loss", "train/learning_rate") or k.startswith("eval/")}
      self._bar.set_postfix(shown, refresh=False)
    self._bar.refresh()

  def log(self, message: str):
    if not self.enabled:
      return
    if self._bar is not None:
      self._bar.write(message)
    else:
      print(message, flush=True)

  def close(self):
    if not self.enabled:
      return
    if self._bar is not None:
      self._bar.close()
    if self._tb is not None:
      self._tb.close()
    self._file.close()


def _to_python(value):
  try:
    return float(value) if not isinstance(value, (int, str)) else value
  except TypeError:
    return str(value)


def read_metrics(workdir: str) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def plot_metrics(workdir: str) -> list[str]:
  """PNG plots of the train loss and every eval metric; returns their paths."""
  rows = read_metrics(workdir)
  if not rows or jax.process_index() != 0:
    return []
  # The object API, not pyplot: no backend switch under a notebook's feet.
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
  groups = {"loss": [k for k in _keys(rows) if k.endswith("loss")],
            "eval": [k for k in _keys(rows) if k.startswith("eval/") and not k.endswith("loss")],
            "learning_rate": ["train/learning_rate"]}
  paths = []
  for name, keys in groups.items():
    keys = [k for k in keys if any(k in r for r in rows)]
    if not keys:
      continue
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for key in keys:
      pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
      if pts:
        ax.plot(*zip(*pts), marker="o" if len(pts) < 20 else None, label=key)
    ax.set_xlabel("step")
    ax.set_title(f"{os.path.basename(os.path.abspath(workdir))}: {name}")
    ax.grid(alpha=0.3)
    ax.legend()
    path = os.path.join(workdir, f"plot_{name}.png")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    paths.append(path)
  return paths


def _keys(rows):
  seen = {}
  for r in rows:
    for k in r:
      seen.setdefault(k, None)
  return list(seen)

"""Where metrics go: metrics.jsonl, TensorBoard, a progress bar, PNG plots.

Only process 0 writes. ``metrics.jsonl`` has one JSON object per logged step
with ``step`` and names such as ``train/loss`` and ``eval/accuracy``; it is
strict JSON (a NaN/inf value is written as the string ``"nan"``/``"inf"``).
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
    self._file.write(json.dumps({"step": int(step), **clean}, allow_nan=False) + "\n")
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
  """A JSON value: numbers as float (non-finite ones as strings), else str."""
  if isinstance(value, (int, str)):
    return value
  try:
    value = float(value)
  except TypeError:
    return str(value)
  return value if math.isfinite(value) else str(value)  # "nan", "inf", "-inf"


def json_safe(metrics: dict) -> dict:
  return {k: _to_python(v) for k, v in metrics.items()}


def truncate_metrics(workdir: str, after_step: int) -> int:
  """Drop the rows of steps after ``after_step`` (a resume logs them again);
  returns how many were dropped."""
  path = os.path.join(workdir, "metrics.jsonl")
  if jax.process_index() != 0 or not os.path.exists(path):
    return 0
  with open(path, encoding="utf-8") as f:
    lines = [line for line in f if line.strip()]
  keep = [line for line in lines if _row_step(line) <= after_step]
  if len(keep) < len(lines):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      f.writelines(keep)
    os.replace(tmp, path)
  return len(lines) - len(keep)


def _row_step(line: str) -> int:
  try:
    return int(json.loads(line).get("step", 0))
  except (ValueError, AttributeError):
    return 0  # a damaged row is kept, not guessed at


def read_metrics(workdir: str) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


# Eval metrics that are counts or sizes, not quality: not plotted.
_COUNTS = ("count", "bytes", "tokens", "examples", "images", "pairs")


def plot_panels(rows: list[dict]) -> dict[str, list[str]]:
  """``{figure: [metric, ...]}``: the panels ``plot_metrics`` draws."""
  keys = [k for k in _keys(rows) if k != "step"]
  return {"loss": [k for k in keys if k.endswith("loss") and not k.startswith("eval/")],
          "eval": [k for k in keys if k.startswith("eval/")
                   and k.rsplit("/", 1)[-1] not in _COUNTS],
          "learning_rate": [k for k in keys if k == "train/learning_rate"]}


def plot_metrics(workdir: str) -> list[str]:
  """PNG plots, one panel per metric (each on its own axis and scale): the
  losses (``plot_loss.png``), every eval metric except counts
  (``plot_eval.png``) and the learning rate; returns their paths."""
  rows = read_metrics(workdir)
  if not rows or jax.process_index() != 0:
    return []
  # The object API, not pyplot: no backend switch under a notebook's feet.
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
  paths = []
  for name, group in plot_panels(rows).items():
    series = {}
    for key in group:
      pts = [(r["step"], r[key]) for r in rows
             if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
      if pts:
        series[key] = pts
    if not series:
      continue
    cols = min(len(series), 3)
    nrows = -(-len(series) // cols)
    fig = Figure(figsize=(4.5 * cols, 3.2 * nrows))
    axes = fig.subplots(nrows, cols, squeeze=False).ravel()
    for ax, (key, pts) in zip(axes, series.items()):
      ax.plot(*zip(*pts), marker="o" if len(pts) < 20 else None)
      ax.set_title(key, fontsize=10)
      ax.set_xlabel("step")
      ax.grid(alpha=0.3)
    for ax in axes[len(series):]:
      ax.set_visible(False)
    fig.suptitle(f"{os.path.basename(os.path.abspath(workdir))}: {name}")
    path = os.path.join(workdir, f"plot_{name}.png")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    paths.append(path)
  experts = plot_expert_load(workdir, rows)
  return paths + ([experts] if experts else [])


def expert_load_groups(rows: list[dict]) -> dict[str, list[str]]:
  """``{prefix: [metric per expert]}`` of a mixture of experts' load metrics
  (``<prefix>/expert_load/<e>``: ``train/image/moe``, ``train/text/moe``,
  ``train/moe/expert_load/m<m>``, ...), experts in order."""
  groups: dict[str, list[str]] = {}
  for key in _keys(rows):
    head, _, last = key.rpartition("/")
    if last.isdigit() and "/expert_load" in f"/{head}/":
      groups.setdefault(head.replace("/expert_load", "", 1) if head.endswith("/expert_load")
                        else head, []).append(key)
  return {g: sorted(keys, key=lambda k: int(k.rpartition("/")[2])) for g, keys in groups.items()}


def plot_expert_load(workdir: str, rows: list[dict]) -> Optional[str]:
  """``plot_experts.png``: per group (a modality's tower, a modality id) the
  share of routed tokens each expert received over the steps, stacked; None
  when the run logged no expert load."""
  groups = expert_load_groups(rows)
  if not groups:
    return None
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
  fig = Figure(figsize=(4.5 * len(groups), 3.4))
  axes = fig.subplots(1, len(groups), squeeze=False).ravel()
  for ax, (group, keys) in zip(axes, groups.items()):
    steps = [r["step"] for r in rows if all(isinstance(r.get(k), (int, float)) for k in keys)]
    loads = [[r[k] for r in rows if all(isinstance(r.get(j), (int, float)) for j in keys)]
             for k in keys]
    ax.stackplot(steps, *loads, labels=[f"expert {k.rpartition('/')[2]}" for k in keys])
    ax.set_title(group, fontsize=10)
    ax.set_xlabel("step")
    ax.set_ylabel("share of routed tokens")
    ax.set_ylim(0, 1)
  axes[-1].legend(fontsize=8, loc="upper right")
  fig.suptitle(f"{os.path.basename(os.path.abspath(workdir))}: expert load")
  path = os.path.join(workdir, "plot_experts.png")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  return path


def _keys(rows):
  seen = {}
  for r in rows:
    for k in r:
      seen.setdefault(k, None)
  return list(seen)

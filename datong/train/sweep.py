"""`datong sweep`: every point of a grid of settings, each a normal run.

    datong sweep gpt-pysource --workdir runs/sweep \\
        --grid width/depth/heads/mlp_dim=64/2/2/256,128/4/4/512 \\
        --grid train.steps=200,400 [--parallel 2] [--set KEY=VALUE ...]

A ``--grid`` axis is ``KEY=V1,V2,...``; ``K1/K2=a/b,c/d`` sets several keys
together (a model size is width, depth, heads and MLP width at once). Keys
are ``--set`` names (a dotted path or its unique end). The points are the
product of the axes; each runs as ``datong train RECIPE`` in
``WORKDIR/<point>/`` (a subprocess, ``--parallel`` at a time), so a point is
an ordinary run: resumable, inspectable, loadable.

Resumable: a finished point (its ``done.json``) is skipped, an interrupted
one resumes from its checkpoint. Ctrl-C / SIGTERM stops the running points
with a checkpoint each (exit 75); the same command continues the sweep.

After every point ``WORKDIR/summary.csv`` is rewritten: per point its
settings, parameters (total and non-embedding), training tokens, FLOPs and
epochs over the training split, the final eval metrics and wall time.
``datong fit WORKDIR`` fits scaling laws to them (``datong.train.scaling``).
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from typing import Any, Optional

SUMMARY = "summary.csv"
SWEEP_INFO = "sweep.json"  # in the sweep's directory: recipe, metric, grid
POINT_INFO = "sweep.json"  # in each point's workdir: its settings and sizes
EXIT_STOPPED = 75  # as `datong train`


@dataclasses.dataclass(frozen=True)
class Axis:
  keys: tuple[str, ...]
  values: tuple[tuple[str, ...], ...]


def parse_axis(spec: str) -> Axis:
  """``"width/depth=64/2,128/4"`` -> Axis(('width', 'depth'), (('64', '2'), ('128', '4')))."""
  keys_text, sep, values_text = spec.partition("=")
  keys = tuple(k.strip() for k in keys_text.split("/"))
  if not sep or not all(keys) or not values_text.strip():
    raise ValueError(f"--grid {spec!r}: expected KEY=V1,V2,... or K1/K2=a1/b1,a2/b2 (e.g. "
                     "train.steps=200,400 or width/depth=64/2,128/4).")
  values = []
  for item in values_text.split(","):
    parts = tuple(v.strip() for v in item.split("/"))
    if len(parts) != len(keys) or not all(parts):
      raise ValueError(f"--grid {spec!r}: value {item!r} has {len(parts)} part(s) for "
                       f"{len(keys)} key(s) {'/'.join(keys)}; give one value per key, "
                       "separated by '/'.")
    values.append(parts)
  if len(set(values)) != len(values):
    raise ValueError(f"--grid {spec!r}: a value is listed twice.")
  return Axis(keys, tuple(values))


def grid_points(axes: list[Axis]) -> list[dict[str, str]]:
  """The product of the axes (first axis slowest), each as {key: value}."""
  seen = [k for a in axes for k in a.keys]
  if len(set(seen)) != len(seen):
    raise ValueError(f"--grid: a key appears in two axes ({', '.join(seen)}).")
  points = []
  for combo in itertools.product(*(a.values for a in axes)):
    point = {}
    for axis, values in zip(axes, combo):
      point.update(zip(axis.keys, values))
    points.append(point)
  return points


def point_name(settings: dict[str, str]) -> str:
  """``{'task.model.backbone.width': '64', 'train.steps': '200'}`` -> ``width-64_steps-200``
  (a directory name: the key's last part, and characters outside
  ``[A-Za-z0-9.+-]`` replaced by ``_``)."""
  parts = []
  for key, value in settings.items():
    parts.append(f"{key.rsplit('.', 1)[-1]}-{value}")
  return re.sub(r"[^A-Za-z0-9.+_-]", "_", "_".join(parts))


@dataclasses.dataclass
class Point:
  name: str
  settings: dict[str, str]
  overrides: dict[str, str]  # --set and the point's settings, as given
  config: Any  # RunConfig
  workdir: str


def plan(recipe: str, axes: list[Axis], sets: dict[str, str], workdir: str) -> list[Point]:
  """Every point's resolved settings, checked before anything runs."""
  from datong.train import config as config_lib  # pylint: disable=import-outside-toplevel
  from datong.train import recipes  # pylint: disable=import-outside-toplevel
  base = recipes.get(recipe)
  points = []
  for settings in grid_points(axes):
    overrides = {**sets, **settings}
    try:
      config = config_lib.override(base, overrides)
    except ValueError as e:
      raise ValueError(f"grid point {settings}: {e}") from None
    name = point_name(settings)
    points.append(Point(name, settings, overrides, config, os.path.join(workdir, name)))
  names = [p.name for p in points]
  if len(set(names)) != len(names):
    raise ValueError("two grid points get the same directory name; use keys whose last parts "
                     f"differ: {names}")
  return points


def read_sweep_info(workdir: str) -> dict:
  return _read_json(os.path.join(workdir, SWEEP_INFO)) or {}


def _claim(workdir: str, recipe: str, axes: list[Axis], sets: dict, metric: Optional[str]) -> str:
  """Record the sweep's recipe in its directory; refuse another recipe there
  (its points would mix with this one's). Returns the metric to report."""
  from datong.train import recipes  # pylint: disable=import-outside-toplevel
  info = read_sweep_info(workdir)
  if info and info.get("recipe") != recipe:
    raise ValueError(f"{workdir} holds a sweep of recipe {info.get('recipe')!r}, not {recipe!r}; "
                     "use another --workdir (or the same recipe to continue it).")
  default = getattr(recipes.module(recipe), "METRIC", None) if ":" not in recipe else None
  metric = metric or info.get("metric") or default
  record = {"recipe": recipe, "metric": metric, "sets": sets,
            "grid": [{"keys": list(a.keys), "values": [list(v) for v in a.values]} for a in axes]}
  with open(os.path.join(workdir, SWEEP_INFO + ".tmp"), "w") as f:
    json.dump(record, f, indent=1)
  os.replace(os.path.join(workdir, SWEEP_INFO + ".tmp"), os.path.join(workdir, SWEEP_INFO))
  return metric


def _is_embedding(path) -> bool:
  from datong.train.task import path_names  # pylint: disable=import-outside-toplevel
  return any("embed" in n.lower() for n in path_names(path))


def point_sizes(config) -> dict[str, float]:
  """Parameters (total; non-embedding: without token and position tables),
  and the run's training examples, tokens, FLOPs (the task's analytic count)
  and epochs over its training split."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  task = config.task.build()
  variables = jax.eval_shape(task.init, jax.random.PRNGKey(0), task.batch_spec(1))
  total = embedding = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(variables["params"])[0]:
    n = int(np.prod(leaf.shape))
    total += n
    embedding += n if _is_embedding(path) else 0
  examples = config.train.steps * config.train.batch_size
  return {"params": total, "non_embedding_params": total - embedding,
          "examples": examples, "tokens": examples * task.tokens_per_example(),
          "flops": examples * task.flops_per_example(),
          "epochs": examples / max(_train_examples(task, config), 1)}


_TRAIN_EXAMPLES: dict[str, int] = {}


def _train_examples(task, config) -> int:
  """Examples in the task's training split; points that differ only in the
  backbone share their data, so it is counted once per data setting."""
  from datong.train import config as config_lib  # pylint: disable=import-outside-toplevel
  key = json.dumps(_without_backbones(config_lib.to_json(config.task)), sort_keys=True)
  if key not in _TRAIN_EXAMPLES:
    _TRAIN_EXAMPLES[key] = len(task.source(task.train_split))
  return _TRAIN_EXAMPLES[key]


def _without_backbones(tree):
  if isinstance(tree, dict):
    return {k: _without_backbones(v) for k, v in tree.items()
            if not (isinstance(v, dict) and
                    str(v.get("__type__", "")).endswith(".TransformerConfig"))}
  return tree


def _read_json(path: str) -> Optional[dict]:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def point_status(point: Point) -> str:
  """'done' (finished at its train.steps), 'started' (checkpoints) or 'new'."""
  done = _read_json(os.path.join(point.workdir, "done.json"))
  if done is not None and done.get("step") == point.config.train.steps:
    return "done"
  ckpt = os.path.join(point.workdir, "checkpoints")
  return "started" if os.path.isdir(ckpt) and os.listdir(ckpt) else "new"


def _write_info(point: Point, info: dict) -> None:
  os.makedirs(point.workdir, exist_ok=True)
  tmp = os.path.join(point.workdir, POINT_INFO + ".tmp")
  with open(tmp, "w") as f:
    json.dump(info, f, indent=1)
  os.replace(tmp, os.path.join(point.workdir, POINT_INFO))


def point_info(point: Point) -> dict:
  """The point's ``sweep.json`` (sizes computed once, wall time so far)."""
  info = _read_json(os.path.join(point.workdir, POINT_INFO))
  if info is None or info.get("overrides") != point.overrides:
    info = {"name": point.name, "settings": point.settings, "overrides": point.overrides,
            "seconds": 0.0, **point_sizes(point.config)}
    _write_info(point, info)
  return info


def summary_rows(points: list[Point]) -> list[dict[str, Any]]:
  rows = []
  for p in points:
    info = point_info(p)
    done = _read_json(os.path.join(p.workdir, "done.json")) or {}
    metrics = {k: v for k, v in done.get("metrics", {}).items() if k.startswith("eval/")}
    rows.append({"point": p.name, **p.settings, "status": point_status(p),
                 **{k: info[k] for k in ("params", "non_embedding_params", "tokens", "flops",
                                          "epochs", "seconds")}, **metrics})
  return rows


def write_summary(workdir: str, rows: list[dict[str, Any]]) -> str:
  columns: list[str] = []
  for row in rows:
    columns += [k for k in row if k not in columns]
  path = os.path.join(workdir, SUMMARY)
  with open(path + ".tmp", "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
  os.replace(path + ".tmp", path)
  return path


def read_summary(workdir: str) -> list[dict[str, Any]]:
  """``summary.csv`` rows, numbers as floats."""
  path = os.path.join(workdir, SUMMARY)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} does not exist: run `datong sweep RECIPE --workdir "
                            f"{workdir} --grid ...` first (it writes the summary).")
  rows = []
  with open(path, newline="") as f:
    for row in csv.DictReader(f):
      parsed = {}
      for k, v in row.items():
        try:
          parsed[k] = float(v)
        except (TypeError, ValueError):
          parsed[k] = v
      rows.append(parsed)
  return rows


def format_table(rows: list[dict[str, Any]], metric: Optional[str]) -> str:
  def fmt(v):
    if isinstance(v, float):
      return f"{v:.4g}" if not math.isnan(v) else "-"
    return str(v)
  keys = ["point", "status", "non_embedding_params", "params", "tokens", "flops", "epochs",
          "seconds"] + ([metric] if metric else [])
  table = [keys] + [[fmt(r.get(k, "-")) for k in keys] for r in rows]
  widths = [max(len(line[i]) for line in table) for i in range(len(keys))]
  return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in table)


def _command(recipe: str, point: Point) -> list[str]:
  cmd = [sys.executable, "-m", "datong.cli", "train", recipe, "--workdir", point.workdir,
         "--no-progress"]
  for key, value in point.overrides.items():
    cmd += ["--set", f"{key}={value}"]
  return cmd


def run(recipe: str, axes: list[Axis], workdir: str, *, sets: Optional[dict[str, str]] = None,
        parallel: int = 1, metric: Optional[str] = None, echo=print) -> int:
  """Run every point not yet done; returns 0, or 75 when stopped early, or 2
  when a point failed (its log is named)."""
  if parallel < 1:
    raise ValueError(f"--parallel {parallel}: must be >= 1.")
  os.makedirs(workdir, exist_ok=True)
  points = plan(recipe, axes, dict(sets or {}), workdir)
  metric = _claim(workdir, recipe, axes, dict(sets or {}), metric)
  rows = summary_rows(points)
  write_summary(workdir, rows)
  todo = [p for p in points if point_status(p) != "done"]
  echo(f"sweep {recipe}: {len(points)} points, {len(points) - len(todo)} done, "
       f"{len(todo)} to run ({parallel} at a time) in {workdir}")
  echo(format_table(rows, metric))
  over = [r["point"] for r in rows if r["epochs"] > 1.0]
  if over:
    echo(f"note: {len(over)} point(s) train for more than one epoch ({', '.join(over)}); "
         "a data-scaling fit on them mixes in repeated data.")

  stop = {"requested": False}
  running: dict[str, tuple[subprocess.Popen, Point, float, Any]] = {}

  def on_signal(signum, frame):
    del frame
    stop["requested"] = True
    for proc, _, _, _ in running.values():
      if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # the run saves a checkpoint and exits 75

  old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
  failed = []
  try:
    queue = list(todo)
    while queue or running:
      while queue and len(running) < parallel and not stop["requested"]:
        point = queue.pop(0)
        point_info(point)  # sizes before the run (it also checks the config builds)
        log = open(os.path.join(workdir, f"{point.name}.log"), "a")
        echo(f"[{point.name}] {point_status(point)}: running (log: {log.name})")
        # Its own session: a Ctrl-C reaches the sweep only, which stops the
        # runs with SIGTERM (each saves a checkpoint).
        proc = subprocess.Popen(_command(recipe, point), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        running[point.name] = (proc, point, time.perf_counter(), log)
      if stop["requested"] and not running:
        break
      time.sleep(0.2)
      for name, (proc, point, started, log) in list(running.items()):
        code = proc.poll()
        if code is None:
          continue
        del running[name]
        log.close()
        info = point_info(point)
        info["seconds"] = info["seconds"] + time.perf_counter() - started
        _write_info(point, info)
        status = point_status(point)
        if code == 0 and status == "done":
          echo(f"[{name}] done in {info['seconds']:.0f} s")
        elif code == EXIT_STOPPED or (stop["requested"] and code == -signal.SIGTERM):
          # -SIGTERM: stopped while starting up, before it had anything to save.
          echo(f"[{name}] stopped with a checkpoint; it resumes on the next `datong sweep`")
        else:
          failed.append(name)
          echo(f"[{name}] FAILED (exit {code}); see {log.name}")
        write_summary(workdir, summary_rows(points))
  finally:
    for s, handler in old.items():
      signal.signal(s, handler)
  rows = summary_rows(points)
  path = write_summary(workdir, rows)
  echo(format_table(rows, metric))
  echo(f"summary: {path}")
  if failed:
    echo(f"{len(failed)} point(s) failed: {', '.join(failed)}; fix the cause and run the same "
         "command again (finished points are skipped).")
    return 2
  if stop["requested"] or any(point_status(p) != "done" for p in points):
    echo("stopped early: run the same command again to continue the sweep.")
    return EXIT_STOPPED
  return 0

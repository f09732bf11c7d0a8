"""Run recipes end to end and tie each result to the code that produced it.

    python bench/recipes.py                          # every recipe, one at a time
    python bench/recipes.py clip-digits vit-digits   # a subset
    python bench/recipes.py --write BENCHMARKS.md    # ... and rewrite its recipe table
    python bench/recipes.py --losses 50 --out before.json        # first 50 train losses
    python bench/recipes.py --compare before.json after.json     # equal within float noise?

Each recipe runs as ``python -m datong.cli train NAME --workdir W --no-progress``
in a fresh process with this checkout first on ``PYTHONPATH``. Recorded per
recipe: its headline metric (``METRIC`` in the recipe module) against its
``TARGET``, wall time, the CPU time the run got (user + sys of the child), the
1-minute load average at start and end, and the commit (``+dirty`` when
``datong/`` has uncommitted changes). ``--write`` replaces the rows of those
recipes in the table between ``<!-- recipes:begin -->`` and
``<!-- recipes:end -->`` and keeps the others.

A recipe with ``REQUIRES`` (``{setting: recipe}``, e.g. BEiT's tokenizer)
first gets the recipe it needs run into the same workroot (once, with its
own row; a finished run already there is read, not run again), and ``--set
setting=<that workdir>``; its own wall time excludes that run.

``--losses N`` runs each recipe for its first N steps only (its own schedule,
``train.log_every=1``, no evaluation) and saves the per-step train losses and
the workdirs (their step-N checkpoints let a later commit prove it resumes
them: ``--resume-from before.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEGIN, END = "<!-- recipes:begin -->", "<!-- recipes:end -->"
HEADER = ("| recipe | result | target | wall | CPU (user+sys) | load start → end | commit | command |\n"
          "| --- | --- | --- | --- | --- | --- | --- | --- |")


def _env() -> dict:
  env = dict(os.environ)
  env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
  return env


def commit() -> str:
  head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                        text=True, check=True).stdout.strip()
  dirty = subprocess.run(["git", "status", "--porcelain", "--", "datong"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout.strip()
  return head + ("+dirty" if dirty else "")


def recipe_info() -> dict:
  """Recipe name -> (metric, target) read from the recipe modules."""
  code = ("import json; from datong.train import recipes\n"
          "print(json.dumps({n: [getattr(m, 'METRIC', ''), getattr(m, 'TARGET', None), "
          "getattr(m, 'REQUIRES', {})] for n, m in recipes._modules().items()}))")
  out = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True,
                       check=True, cwd=REPO).stdout
  return {k: tuple(v) for k, v in json.loads(out).items()}


def _metrics(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def _met(value: float, target) -> str:
  if not target:
    return "reported"
  op, bound = target
  ok = value >= bound if op == ">=" else value < bound
  return f"{op} {bound}: **{'met' if ok else 'not met'}**"


def _clock(seconds: float) -> str:
  return f"{int(seconds // 60)}m{int(round(seconds % 60)):02d}s"


def _run(cmd: list[str], log_path: str) -> tuple[int, float, float]:
  """Runs ``cmd``; returns (exit code, wall seconds, child CPU seconds)."""
  before = resource.getrusage(resource.RUSAGE_CHILDREN)
  start = time.perf_counter()
  with open(log_path, "w", encoding="utf-8") as log:
    rc = subprocess.run(cmd, env=_env(), cwd=REPO, stdout=log, stderr=subprocess.STDOUT).returncode
  wall = time.perf_counter() - start
  after = resource.getrusage(resource.RUSAGE_CHILDREN)
  cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
  return rc, wall, cpu


def run_recipe(name: str, workroot: str, info: tuple, overrides: list[str]) -> dict:
  workdir = os.path.join(workroot, name)
  cmd = [sys.executable, "-m", "datong.cli", "train", name, "--workdir", workdir, "--no-progress"]
  for item in overrides:
    cmd += ["--set", item]
  load_start = os.getloadavg()[0]
  rc, wall, cpu = _run(cmd, os.path.join(workroot, f"{name}.log"))
  load_end = os.getloadavg()[0]
  if rc != 0:
    raise RuntimeError(f"{name} exited {rc}; see {os.path.join(workroot, name + '.log')}")
  metric, target = info[:2]
  evals = [r for r in _metrics(workdir) if metric in r]
  value = evals[-1][metric]
  shown = " ".join(["datong train", name, "--workdir", workdir, "--no-progress"]
                   + [f"--set {o}" for o in overrides])
  return dict(recipe=name, metric=metric, value=value, target=target, wall=wall, cpu=cpu,
              load=(load_start, load_end), commit=commit(), command=shown)


def finished(workdir: str, metric: str) -> bool:
  """Whether ``workdir`` holds a finished run (its metric evaluated): a
  required run already in the workroot is read, not run again."""
  try:
    return any(metric in r for r in _metrics(workdir))
  except FileNotFoundError:
    return False


def row(r: dict) -> str:
  return (f"| `{r['recipe']}` | `{r['metric']}` **{r['value']:.4f}** | {_met(r['value'], r['target'])} "
          f"| {_clock(r['wall'])} | {_clock(r['cpu'])} | {r['load'][0]:.1f} → {r['load'][1]:.1f} "
          f"| {r['commit']} | `{r['command']}` |")


def write_table(path: str, results: list[dict]) -> None:
  with open(path, encoding="utf-8") as f:
    text = f.read()
  if BEGIN not in text or END not in text:
    raise SystemExit(f"{path} has no {BEGIN} ... {END} block to rewrite.")
  head, rest = text.split(BEGIN, 1)
  body, tail = rest.split(END, 1)
  rows = {}
  for line in body.splitlines():
    m = re.match(r"\| `([^`]+)` \|", line)
    if m:
      rows[m.group(1)] = line
  rows.update({r["recipe"]: row(r) for r in results})
  table = "\n".join([HEADER] + [rows[k] for k in sorted(rows)])
  with open(path, "w", encoding="utf-8") as f:
    f.write(f"{head}{BEGIN}\n{table}\n{END}{tail}")


_LOSSES_CODE = """
import json, sys
from datong.train import config as config_lib, loop, recipes
name, workdir, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
settings = dict(item.split("=", 1) for item in sys.argv[4:])
cfg = config_lib.override(recipes.get(name), {"train.log_every": "1", **settings})
loop.train(cfg, workdir, progress=False, stop_at=steps, evaluate=False)
"""


def first_losses(name: str, workroot: str, steps: int, resume_from: str = "",
                 overrides: tuple = ()) -> dict:
  """Runs (or resumes) ``name`` up to ``steps``; its per-step ``train/loss``."""
  workdir = resume_from or os.path.join(workroot, name)
  rc, wall, _ = _run([sys.executable, "-c", _LOSSES_CODE, name, workdir, str(steps),
                      *overrides], os.path.join(workroot, f"{name}.losses.log"))
  if rc != 0:
    raise RuntimeError(f"{name} exited {rc}; see {workroot}/{name}.losses.log")
  losses = {int(r["step"]): r["train/loss"] for r in _metrics(workdir) if "train/loss" in r}
  return dict(workdir=workdir, losses=losses, wall=wall, commit=commit())


def compare(path_a: str, path_b: str, rtol: float) -> int:
  with open(path_a, encoding="utf-8") as f:
    a = json.load(f)
  with open(path_b, encoding="utf-8") as f:
    b = json.load(f)
  bad = 0
  for name in sorted(set(a) & set(b)):
    la, lb = a[name]["losses"], b[name]["losses"]
    steps = sorted(set(la) & set(lb), key=int)
    worst = max(abs(la[s] - lb[s]) / max(abs(la[s]), 1e-12) for s in steps)
    same = worst <= rtol
    bad += not same
    print(f"{name:16s} {len(steps):4d} steps  {a[name]['commit']} vs {b[name]['commit']}  "
          f"max rel. diff {worst:.2e}  {'equal' if same else 'DIFFERENT'}")
  return 1 if bad else 0


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("recipes", nargs="*", help="recipe names (default: all)")
  p.add_argument("--workroot", help="where workdirs and logs go (default: a new temp dir)")
  p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
  p.add_argument("--write", metavar="BENCHMARKS.md", help="rewrite this file's recipe table")
  p.add_argument("--losses", type=int, metavar="N", help="only the first N train losses")
  p.add_argument("--resume-from", metavar="JSON",
                 help="with --losses: resume the step-N checkpoints of an earlier --losses run "
                      "(their workdirs) up to N")
  p.add_argument("--out", metavar="JSON", help="also save the results as JSON")
  p.add_argument("--compare", nargs=2, metavar=("A", "B"), help="compare two --losses files")
  p.add_argument("--rtol", type=float, default=1e-5, help="with --compare")
  args = p.parse_args(argv)
  if args.compare:
    return compare(*args.compare, args.rtol)
  info = recipe_info()
  names = args.recipes or sorted(info)
  unknown = [n for n in names if n not in info]
  if unknown:
    raise SystemExit(f"unknown recipes {unknown}; known: {sorted(info)}")
  workroot = args.workroot or tempfile.mkdtemp(prefix="datong-recipes-")
  os.makedirs(workroot, exist_ok=True)
  print(f"workdirs under {workroot}", flush=True)
  earlier = {}
  if args.resume_from:
    with open(args.resume_from, encoding="utf-8") as f:
      earlier = json.load(f)
  results = {}
  for name in names:
    if args.losses:
      results[name] = first_losses(name, workroot, args.losses,
                                   earlier.get(name, {}).get("workdir", ""), args.overrides)
      print(f"{name}: {len(results[name]['losses'])} losses in {_clock(results[name]['wall'])}",
            flush=True)
    else:
      needs = []
      for setting, needed in info[name][2].items():
        if needed not in results and not finished(os.path.join(workroot, needed),
                                                  info[needed][0]):
          results[needed] = run_recipe(needed, workroot, info[needed], args.overrides)
          print(row(results[needed]), flush=True)
        needs.append(f"{setting}={os.path.join(workroot, needed)}")
      results[name] = run_recipe(name, workroot, info[name], args.overrides + needs)
      print(row(results[name]), flush=True)
    if args.out:  # after every recipe, so a long run leaves what it finished
      with open(args.out, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)
  if args.write and not args.losses:
    write_table(args.write, list(results.values()))
  return 0


if __name__ == "__main__":
  sys.exit(main())

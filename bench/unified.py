"""unified-digits against its members trained alone: the same member, steps and examples.

    python bench/unified.py --workroot /tmp/unified --out /tmp/unified/table.json
    python bench/unified.py --workroot W --runs gpt,mae --set train.steps=300

Runs ``datong train unified-digits`` (every member every step over one
shared backbone) and, for each member, the same recipe with
``--set task.only=<member>``: that member alone, with its own batch per
step, data, loss and evaluation exactly as in the mixture, for the same
number of steps (so the same examples). A finished run in the workroot is
read, not run again. Prints a markdown table of each member's headline
metric, joint vs alone, with each run's wall and CPU time and the load.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import recipes as recipes_bench  # pylint: disable=wrong-import-position

# The recipe bench's run, metrics and clock helpers, shared rather than copied.
# pylint: disable-next=protected-access
_run, _metrics, _clock = recipes_bench._run, recipes_bench._metrics, recipes_bench._clock

RECIPE = "unified-digits"
# member -> (eval metric, what is better)
HEADLINES = {
    "gpt": ("bits_per_byte", "lower"),
    "mae": ("linear_probe_accuracy", "higher"),
    "clip": ("zero_shot_accuracy", "higher"),
    "caption": ("caption_accuracy", "higher"),
}


def run(name: str, workroot: str, overrides: list[str]) -> dict:
  """The joint run (``name == "unified"``) or one member alone; its final eval metrics."""
  workdir = os.path.join(workroot, name)
  sets = list(overrides) + ([] if name == "unified" else [f"task.only={name}"])
  shown = " ".join(["datong train", RECIPE, "--workdir", workdir]
                   + [f"--set {s}" for s in sets])
  cached = os.path.join(workdir, "bench.json")
  if os.path.exists(cached):
    with open(cached, encoding="utf-8") as f:
      return json.load(f)
  cmd = [sys.executable, "-m", "datong.cli", "train", RECIPE, "--workdir", workdir,
         "--no-progress"]
  for s in sets:
    cmd += ["--set", s]
  os.makedirs(workroot, exist_ok=True)
  load_start = os.getloadavg()[0]
  rc, wall, cpu = _run(cmd, os.path.join(workroot, f"{name}.log"))
  load_end = os.getloadavg()[0]
  if rc != 0:
    raise RuntimeError(f"{shown} exited {rc}; see {os.path.join(workroot, name + '.log')}")
  evals = {}
  for record in _metrics(workdir):
    evals.update({k: v for k, v in record.items() if k.startswith("eval/")})
  out = dict(run=name, evals=evals, wall=wall, cpu=cpu, load=(load_start, load_end),
             commit=recipes_bench.commit(), command=shown)
  with open(cached, "w", encoding="utf-8") as f:
    json.dump(out, f, indent=1)
  return out


def table(results: dict) -> str:
  joint = results.get("unified")
  lines = ["| member | metric | unified | alone | difference | alone: wall / CPU / load |",
           "| --- | --- | ---: | ---: | ---: | --- |"]
  for member, (metric, better) in HEADLINES.items():
    key = f"eval/{member}/{metric}"
    alone = results.get(member)
    a = alone["evals"].get(key) if alone else None
    j = joint["evals"].get(key) if joint else None
    diff = "" if a is None or j is None else f"{j - a:+.4f} ({better} is better)"
    clock = (f"{_clock(alone['wall'])} / {_clock(alone['cpu'])} / "
             f"{alone['load'][0]:.1f} → {alone['load'][1]:.1f}") if alone else ""
    lines.append(f"| {member} | `{metric}` | {'' if j is None else f'{j:.4f}'} | "
                 f"{'' if a is None else f'{a:.4f}'} | {diff} | {clock} |")
  if joint:
    lines.append(f"\nunified: {_clock(joint['wall'])} wall, "
                 f"{_clock(joint['cpu'])} CPU, load {joint['load'][0]:.1f} → "
                 f"{joint['load'][1]:.1f}, at {joint['commit']}: `{joint['command']}`")
  return "\n".join(lines)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
  p.add_argument("--workroot", required=True)
  p.add_argument("--runs", default="unified," + ",".join(HEADLINES),
                 help="comma-separated: unified and/or member names")
  p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
  p.add_argument("--out", metavar="JSON")
  args = p.parse_args(argv)
  names = [n for n in args.runs.split(",") if n]
  unknown = [n for n in names if n != "unified" and n not in HEADLINES]
  if unknown:
    raise SystemExit(f"--runs: unknown {unknown}; choose from unified, {', '.join(HEADLINES)}.")
  results = {}
  for name in names:
    results[name] = run(name, args.workroot, args.overrides)
    print(f"{name}: {_clock(results[name]['wall'])}", flush=True)
    if args.out:
      with open(args.out, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)
  print(table(results))
  return 0


if __name__ == "__main__":
  sys.exit(main())

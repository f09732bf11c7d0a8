"""Mixture of experts: step time against the dense model at equal active
FLOPs, and parameter / step memory per device with the experts sharded 1, 2,
4 and 8 ways.

    python bench/moe.py [--steps 10] [--repeats 3] [--smoke] [--memory-dispatch gather]
    python bench/moe.py --a2a [--steps 3] [--repeats 3] [--smoke]   # --smoke: short rows

Timing (one device, one process, variants interleaved, median of
``--repeats`` rounds; ``bench/step_time.step_runner``): ``gpt-pydoc`` dense
against ``gpt-pydoc-moe`` (8 experts of half the MLP width, top-2: the same
active MLP FLOPs per token) with each dispatch: capacity (one-hot einsums),
gather (the same buffers by index) and dropless (``ragged_dot``).
``(MoE - dense) / MoE`` is the share of the MoE step that routing, dispatch
and the router losses cost (the matmul FLOPs being equal).

Memory (a child process on 8 fake CPU devices, ``--xla_force_host_platform
_device_count=8``): the ``gpt-pydoc-moe`` train step AOT-compiled on meshes
``data=8/n x expert=n``; per device, the parameter bytes of the sharding
plan and XLA's ``memory_analysis`` (arguments: params + Adam moments +
batch; temporaries), and the collectives XLA put in the step.

All-to-all (``--a2a``; a child process on the same 8 fake CPU devices): the
``gpt-pydoc-moe`` step with ``expert_parallel`` ``xla`` (sharding
constraints, the partitioner's all-to-all) against ``shard_map`` (explicit
``jax.lax.all_to_all``) on meshes expert 8, expert 4 x data 2 and expert 2
x fsdp 2 x tensor 2: step time (interleaved rounds, median) and the
collectives in the compiled step, counted and sized from the HLO text (bytes
of each op's result per device, summed).
"""

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

VARIANTS = {
    "dense (gpt-pydoc)": ("gpt-pydoc", {}),
    "MoE 8x top-2, capacity 1.25": ("gpt-pydoc-moe", {"dispatch": "capacity"}),
    "MoE 8x top-2, gather 1.25": ("gpt-pydoc-moe", {"dispatch": "gather"}),
    "MoE 8x top-2, dropless": ("gpt-pydoc-moe", {"dispatch": "dropless"}),
}
SMOKE = {"task.seq_length": "64", "train.batch_size": "8"}


def _config(recipe, overrides, smoke):
  from datong.train import recipes  # pylint: disable=import-outside-toplevel
  from datong.train.config import override  # pylint: disable=import-outside-toplevel
  return override(recipes.get(recipe), {**overrides, **(SMOKE if smoke else {})})


def time_steps(args):
  import jax  # pylint: disable=import-outside-toplevel
  from step_time import step_runner  # pylint: disable=import-outside-toplevel
  runners = {}
  for name, (recipe, overrides) in VARIANTS.items():
    cfg = _config(recipe, overrides, args.smoke)
    runners[name] = (step_runner(cfg), cfg)
  times = {name: [] for name in VARIANTS}
  for _ in range(args.repeats):
    for name, (run, _) in runners.items():
      times[name].append(run(args.steps))
  dense = statistics.median(times["dense (gpt-pydoc)"])
  print(f"step time on {jax.devices()[0].platform} (1 device), jax {jax.__version__}, "
        f"{args.steps} steps x {args.repeats} rounds, median:")
  for name, (run, cfg) in runners.items():
    t = statistics.median(times[name])
    model = cfg.task.model
    flops = model.backbone.flops_per_token(cfg.task.seq_length, causal=True)
    share = f"  routing+dispatch {(t - dense) / t:6.1%} of the step" if t != dense else ""
    print(f"  {name:30s} {t * 1e3:8.1f} ms/step  x{t / dense:.3f}  params {run.num_params:>9,}"
          f"  backbone {flops / 1e6:.2f} MFLOP/token{share}")


def memory_child(args):
  """Runs on 8 fake devices: one JSON line per expert-sharding width."""
  import tempfile  # pylint: disable=import-outside-toplevel
  from datong.train import loop  # pylint: disable=import-outside-toplevel
  for n in (1, 2, 4, 8):
    cfg = _config("gpt-pydoc-moe", {"mesh.data": str(8 // n), "mesh.expert": str(n),
                                    "dispatch": args.memory_dispatch}, args.smoke)
    trainer = loop.Trainer(cfg, tempfile.mkdtemp())
    compiled = trainer.compile()
    memory, hlo = compiled.memory_analysis(), compiled.as_text()
    # Which collectives XLA's partitioner chose (the all-to-all of expert parallelism).
    ops = {op: hlo.count(f" {op}(") for op in ("all-to-all", "all-gather", "all-reduce")}
    print(json.dumps({"expert": n, "params": trainer.params_plan.bytes(),
                      "arguments": memory.argument_size_in_bytes,
                      "temp": memory.temp_size_in_bytes, "ops": ops}), flush=True)


A2A_MESHES = {"expert 8": {"mesh.data": "1", "mesh.expert": "8"},
              "expert 4 x data 2": {"mesh.data": "2", "mesh.expert": "4"},
              "expert 2 x fsdp 2 x tensor 2": {"mesh.data": "1", "mesh.fsdp": "2",
                                               "mesh.expert": "2", "mesh.tensor": "2"}}
COLLECTIVES = ("all-to-all", "all-gather", "all-reduce", "reduce-scatter", "collective-permute")
_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "s8": 1, "u8": 1, "pred": 1,
          "f64": 8, "s64": 8, "u64": 8}


def collectives(hlo: str) -> dict:
  """``{op: [count, bytes]}`` of the collectives in compiled HLO text; bytes
  are the op's result shapes per device (async ``-start`` forms counted too).
  Ops whose replica groups are single devices (``{{0},{1},...}``: a psum
  over mesh axes of size 1, which shard_map's transpose leaves) move nothing:
  counted apart, as ``trivial``."""
  out = {op: [0, 0] for op in COLLECTIVES + ("trivial",)}
  for line in hlo.splitlines():
    for op in COLLECTIVES:
      m = re.search(rf"= (.*?) {op}(-start)?\(", line)
      if m and re.search(r"replica_groups=\{\{\d+\}(,\{\d+\})*\}", line):
        out["trivial"][0] += 1
      elif m:
        out[op][0] += 1
        for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", m.group(1)):
          out[op][1] += _BYTES.get(dtype, 4) * math.prod(int(d) for d in dims.split(",") if d)
  return out


def a2a_child(args):
  """Runs on 8 fake devices: one JSON line per (mesh, expert_parallel)."""
  import tempfile  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  from step_time import step_runner  # pylint: disable=import-outside-toplevel
  from datong.train import loop  # pylint: disable=import-outside-toplevel
  for mesh_name, mesh in A2A_MESHES.items():
    runners = {}
    for mode in ("xla", "shard_map"):
      cfg = _config("gpt-pydoc-moe", {**mesh, "expert_parallel": mode}, args.smoke)
      trainer = loop.Trainer(cfg, tempfile.mkdtemp())
      batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=trainer.batch_sharding)
               for k, v in trainer.batch_spec.items()}
      with trainer._context():  # pylint: disable=protected-access  # as Trainer.compile
        lowered = trainer.step_fn.lower(trainer.abstract_state, batch)
      text = lowered.as_text()
      # Which path was traced: shard_map lowers to a manual computation.
      manual = "manual_computation" in text or "SPMDFullToShardShape" in text
      runners[mode] = (step_runner(cfg), collectives(lowered.compile().as_text()), manual)
    times = {mode: [] for mode in runners}
    for _ in range(args.repeats):
      for mode, (run, _, _) in runners.items():
        times[mode].append(run(args.steps))
    for mode, (_, ops, manual) in runners.items():
      print(json.dumps({"mesh": mesh_name, "mode": mode, "manual": manual, "ops": ops,
                        "times": times[mode]}), flush=True)


def a2a(args):
  env = {**os.environ, "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") +
                                     " --xla_force_host_platform_device_count=8").strip(),
         "JAX_PLATFORMS": "cpu"}
  cmd = [sys.executable, os.path.abspath(__file__), "--a2a-child", "--steps", str(args.steps),
         "--repeats", str(args.repeats)] + (["--smoke"] if args.smoke else [])
  out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
  rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
  print(f"gpt-pydoc-moe train step{' (smoke rows)' if args.smoke else ''}, 8 CPU devices, "
        f"expert_parallel xla vs shard_map, {args.steps} steps x {args.repeats} rounds, median; "
        "collectives in the compiled step: count / KiB per device")
  print(f"  {'mesh':30s} {'path':9s} {'ms/step':>8s} {'vs xla':>7s}  " +
        "  ".join(f"{op:>18s}" for op in COLLECTIVES) + "  trivial")
  base = {}
  for r in rows:
    t = statistics.median(r["times"])
    base.setdefault(r["mesh"], t)
    ops = "  ".join(f"{r['ops'][op][0]:>6d} / {r['ops'][op][1] / 1024:>9.1f}" for op in COLLECTIVES)
    flag = "" if r["manual"] == (r["mode"] == "shard_map") else "  (path not as asked!)"
    print(f"  {r['mesh']:30s} {r['mode']:9s} {t * 1e3:8.1f} {t / base[r['mesh']]:7.3f}  {ops}"
          f"  {r['ops']['trivial'][0]:>7d}{flag}")


def memory(args):
  env = {**os.environ, "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") +
                                     " --xla_force_host_platform_device_count=8").strip(),
         "JAX_PLATFORMS": "cpu"}
  cmd = [sys.executable, os.path.abspath(__file__), "--memory-child",
         "--memory-dispatch", args.memory_dispatch] + (["--smoke"] if args.smoke else [])
  out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
  mib = 1 << 20
  print(f"gpt-pydoc-moe train step (dispatch {args.memory_dispatch}), 8 CPU devices, "
        "data x expert = 8, per device (MiB):")
  print(f"  {'expert':>6s} {'params':>8s} {'replicated':>10s} {'XLA args':>9s} {'XLA temp':>9s}"
        "  collectives in the step")
  for line in out.splitlines():
    if line.startswith("{"):
      r = json.loads(line)
      print(f"  {r['expert']:>6d} {r['params']['per_device'] / mib:8.2f} "
            f"{r['params']['replicated'] / mib:10.2f} {r['arguments'] / mib:9.2f} "
            f"{r['temp'] / mib:9.2f}  {r['ops']}")


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--smoke", action="store_true", help="2 steps, 1 round, short rows")
  parser.add_argument("--skip-memory", action="store_true")
  parser.add_argument("--skip-timing", action="store_true")
  parser.add_argument("--memory-dispatch", default="gather",
                      choices=("capacity", "gather", "dropless"))
  parser.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--a2a", action="store_true",
                      help="only the expert_parallel xla vs shard_map comparison")
  parser.add_argument("--a2a-child", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.memory_child:
    return memory_child(args)
  if args.a2a_child:
    return a2a_child(args)
  if args.a2a:  # --smoke: short rows only
    return a2a(args)
  if args.smoke:
    args.steps, args.repeats = 2, 1
  if not args.skip_timing:
    time_steps(args)
  if not args.skip_memory:
    memory(args)
  return None


if __name__ == "__main__":
  main()

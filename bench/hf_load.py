"""Peak host memory and time of ``hf.load`` onto the fake 8-device CPU mesh.

    python bench/hf_load.py                  # GPT-2 medium size (355M params, 1.42 GB)
    python bench/hf_load.py --smoke          # a tiny GPT-2 (CI)

Writes a random GPT-2-shaped checkpoint (``GPT2LMHeadModel``, tied head;
float32 or ``--dtype bfloat16``) to ``--dir`` (default
/tmp/datong-hf-load-<size>-<dtype>; never committed),
streamed tensor by tensor, then loads it in a fresh subprocess per case,
with 8 fake CPU devices:

* ``whole``: ``hf.load(path)``: every parameter on one device;
* ``whole+put``: the same, then ``jax.device_put`` onto the FSDP shardings
  (what reaching the mesh took before ``mesh=``);
* ``fsdp``: ``hf.load(path, mesh=mesh, rules=RULES)`` on a (1, 8, 1)
  data/fsdp/tensor mesh: each parameter built shard by shard.

Each child reports ``ru_maxrss`` (peak resident set) after its imports and
after the load, the seconds the load took, and the parameter bytes. On CPU
the fake devices' buffers live in host memory too, so a load's floor is one
copy of the parameters.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import struct
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SIZES = {  # GPT-2 medium, and a tiny one for CI
    "medium": dict(n_embd=1024, n_layer=24, n_head=16, n_positions=1024, vocab_size=50257),
    "smoke": dict(n_embd=64, n_layer=2, n_head=4, n_positions=32, vocab_size=101),
}
CASES = ("whole", "whole+put", "fsdp")


def gpt2_shapes(c: dict) -> dict[str, tuple[int, ...]]:
  d, v = c["n_embd"], c["vocab_size"]
  shapes = {"transformer.wte.weight": (v, d), "transformer.wpe.weight": (c["n_positions"], d),
            "transformer.ln_f.weight": (d,), "transformer.ln_f.bias": (d,)}
  for i in range(c["n_layer"]):
    p = f"transformer.h.{i}."
    shapes.update({
        p + "ln_1.weight": (d,), p + "ln_1.bias": (d,), p + "ln_2.weight": (d,),
        p + "ln_2.bias": (d,), p + "attn.c_attn.weight": (d, 3 * d),
        p + "attn.c_attn.bias": (3 * d,), p + "attn.c_proj.weight": (d, d),
        p + "attn.c_proj.bias": (d,), p + "mlp.c_fc.weight": (d, 4 * d),
        p + "mlp.c_fc.bias": (4 * d,), p + "mlp.c_proj.weight": (4 * d, d),
        p + "mlp.c_proj.bias": (d,)})
  return shapes


def write_checkpoint(path: str, c: dict, dtype: str = "float32") -> int:
  """A random GPT-2 checkpoint, one tensor in memory at a time; its bytes."""
  import ml_dtypes
  import numpy as np
  np_dtype, code = {"float32": (np.float32, "F32"),
                    "bfloat16": (ml_dtypes.bfloat16, "BF16")}[dtype]
  itemsize = np.dtype(np_dtype).itemsize
  os.makedirs(path, exist_ok=True)
  config = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
            "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
            "tie_word_embeddings": True, **c}
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config, f)
  shapes = gpt2_shapes(c)
  header, offset = {"__metadata__": {"format": "pt"}}, 0
  for name in sorted(shapes):
    size = itemsize * int(np.prod(shapes[name]))
    header[name] = {"dtype": code, "shape": list(shapes[name]),
                    "data_offsets": [offset, offset + size]}
    offset += size
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)
  with open(os.path.join(path, "model.safetensors"), "wb") as f:
    f.write(struct.pack("<Q", len(blob)) + blob)
    for i, name in enumerate(sorted(shapes)):
      rng = np.random.default_rng(i)
      scale = 1.0 if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")) else 0.02
      f.write((rng.standard_normal(shapes[name], dtype=np.float32) * scale)
              .astype(np_dtype).tobytes())
  return offset


def child(case: str, path: str) -> dict:
  """One load in this (fresh) process."""
  import jax
  import numpy as np
  from jax.sharding import Mesh, NamedSharding

  from datong import hf
  from datong.hf import placement
  from datong.train.sharding import RULES

  base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  mesh = Mesh(np.asarray(jax.devices()).reshape(1, 8, 1), ("data", "fsdp", "tensor"))
  start = time.perf_counter()
  if case == "fsdp":
    model, params = hf.load(path, mesh=mesh, rules=RULES)
  else:
    model, params = hf.load(path)
    if case == "whole+put":
      import jax.numpy as jnp
      shardings = placement.target_shardings(model, (jnp.zeros((1, 2), jnp.int32),), mesh, RULES)
      params = jax.device_put(params, shardings)
  jax.block_until_ready(params)
  seconds = time.perf_counter() - start
  leaves = jax.tree.leaves(params)
  sharded = sum(1 for x in leaves if isinstance(x.sharding, NamedSharding)
                and any(a is not None for a in x.sharding.spec))
  return {"case": case, "seconds": seconds, "base_rss_mb": base / 1024,
          "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
          "param_mb": sum(x.nbytes for x in leaves) / 2**20, "sharded_leaves": sharded,
          "leaves": len(leaves)}


def run_case(case: str, path: str) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") +
                        " --xla_force_host_platform_device_count=8").strip())
  out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", case,
                        "--dir", path], env=env, check=True, capture_output=True, text=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> list[dict]:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--smoke", action="store_true", help="a tiny GPT-2 (CI)")
  ap.add_argument("--dir", default=None, help="checkpoint directory (written if missing)")
  ap.add_argument("--cases", default=",".join(CASES))
  ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                  help="the checkpoint's dtype (parameters load as float32)")
  ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  size = "smoke" if args.smoke else "medium"
  path = args.dir or f"/tmp/datong-hf-load-{size}-{args.dtype}"
  if args.child:
    print(json.dumps(child(args.child, path)))
    return []
  if not os.path.isfile(os.path.join(path, "model.safetensors")):
    t = time.perf_counter()
    nbytes = write_checkpoint(path, SIZES[size], args.dtype)
    print(f"wrote {path} ({nbytes / 2**20:.0f} MiB) in {time.perf_counter() - t:.1f}s")
  rows = [run_case(case, path) for case in args.cases.split(",")]
  print(f"{'case':<10} {'load s':>7} {'peak RSS MiB':>13} {'after imports':>14} "
        f"{'params MiB':>11} {'sharded':>8}")
  for r in rows:
    print(f"{r['case']:<10} {r['seconds']:7.2f} {r['peak_rss_mb']:13.0f} {r['base_rss_mb']:14.0f} "
          f"{r['param_mb']:11.0f} {r['sharded_leaves']:>4}/{r['leaves']}")
  return rows


if __name__ == "__main__":
  main()

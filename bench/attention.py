"""Attention throughput: pallas_gpu vs cuDNN vs XLA on one device.

    python bench/attention.py                 # on a GPU: seq 512..16k, d 64/128
    python bench/attention.py --smoke         # tiny sizes, CPU, Pallas interpret mode

Every implementation goes through ``datong.ops.attention.attention(impl=...,
strict=True)``, so what is timed is what the model runs. TFLOP/s come from
the analytic count: forward ``4 * batch * heads * q_len * kv_len * head_dim``
(two matmuls), halved when causal; backward 2.5x forward (five matmuls, the
forward recompute of the scores included); forward+backward 3.5x. Each
timing is the median of ``--repeats`` calls after ``--warmup`` calls, each
ending in ``block_until_ready``. The batch keeps ``--tokens`` tokens per step
and heads fill ``--width`` (as the FlashAttention benchmarks do).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time

if __package__ in (None, ""):  # `python bench/attention.py` from a checkout
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp

from datong.ops import pallas as dpallas
from datong.ops.attention import AttentionUnsupportedError, attention, unsupported_reason

IMPLS = ("pallas_gpu", "cudnn", "xla")
MODES = ("fwd", "bwd", "fwd+bwd")
FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}


def attention_flops(batch, heads, q_len, kv_len, head_dim, causal, mode) -> float:
  """Analytic FLOPs of one call (see the module docstring)."""
  fwd = 4.0 * batch * heads * q_len * kv_len * head_dim
  if causal:
    fwd /= 2
  return fwd * FLOP_FACTOR[mode]


def _median_seconds(fn, args, warmup, repeats) -> float:
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def time_impl(impl, batch, seq, heads, head_dim, causal, dtype, warmup, repeats):
  """Median seconds per mode, or a string saying why it could not run."""
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  shape = (batch, seq, heads, head_dim)
  q, k, v, do = (jax.random.normal(key, shape, dtype) for key in keys)
  reason = unsupported_reason(impl, q, k, v, causal=causal)
  if reason is not None:
    return {mode: f"n/a ({reason})" for mode in MODES}

  def fwd(q, k, v):
    return attention(q, k, v, causal=causal, impl=impl, strict=True)

  def loss(q, k, v, do):
    return jnp.sum(fwd(q, k, v).astype(jnp.float32) * do.astype(jnp.float32))

  fwd_jit = jax.jit(fwd)
  # Backward alone: the vjp closure (residuals included) is a pytree argument.
  _, vjp_fn = jax.vjp(fwd_jit, q, k, v)
  bwd_jit = jax.jit(lambda vjp_fn, do: vjp_fn(do))
  step_jit = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
  calls = {"fwd": (fwd_jit, (q, k, v)), "bwd": (bwd_jit, (vjp_fn, do)),
           "fwd+bwd": (step_jit, (q, k, v, do))}
  out = {}
  for mode, (fn, args) in calls.items():
    try:
      out[mode] = _median_seconds(fn, args, warmup, repeats)
    except (AttentionUnsupportedError, RuntimeError, ValueError) as e:  # e.g. OOM
      out[mode] = f"error ({type(e).__name__}: {str(e).splitlines()[0][:80]})"
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--smoke", action="store_true",
                      help="tiny sizes on any backend with Pallas in interpret mode")
  parser.add_argument("--seqs", type=int, nargs="+",
                      default=[512, 1024, 2048, 4096, 8192, 16384])
  parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
  parser.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
  parser.add_argument("--causal", choices=("both", "yes", "no"), default="both")
  parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
  parser.add_argument("--tokens", type=int, default=16384, help="batch * seq per call")
  parser.add_argument("--width", type=int, default=2048, help="heads * head_dim")
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--repeats", type=int, default=10)
  args = parser.parse_args(argv)
  if args.smoke:
    args.seqs, args.head_dims = [32, 64], [64]
    args.tokens, args.width, args.warmup, args.repeats = 64, 128, 1, 3

  dtype = jnp.dtype(args.dtype)
  causals = {"both": (False, True), "yes": (True,), "no": (False,)}[args.causal]
  device = jax.devices()[0]
  print(f"device: {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}, "
        f"dtype {dtype.name}, tokens/call {args.tokens}, width {args.width}"
        + (", SMOKE: interpret mode, timings meaningless" if args.smoke else ""))
  interp = dpallas.interpret_mode(True) if args.smoke else contextlib.nullcontext()

  header = (f"{'impl':<11}{'causal':>7}{'d':>5}{'seq':>7}{'batch':>6}{'heads':>6}"
            + "".join(f"{m + ' TF/s':>14}{'/cudnn':>8}" for m in MODES))
  print(header)
  print("-" * len(header))
  notes = {}
  with interp:
    for head_dim in args.head_dims:
      heads = max(1, args.width // head_dim)
      for causal in causals:
        for seq in args.seqs:
          batch = max(1, args.tokens // seq)
          results = {impl: time_impl(impl, batch, seq, heads, head_dim, causal, dtype,
                                     args.warmup, args.repeats) for impl in args.impls}
          for impl in args.impls:
            row = f"{impl:<11}{str(causal):>7}{head_dim:>5}{seq:>7}{batch:>6}{heads:>6}"
            for mode in MODES:
              secs = results[impl][mode]
              if isinstance(secs, str):
                notes.setdefault(secs, len(notes) + 1)
                row += f"{'[' + str(notes[secs]) + ']':>14}{'':>8}"
                continue
              tflops = attention_flops(batch, heads, seq, seq, head_dim, causal, mode) / secs / 1e12
              base = results.get("cudnn", {}).get(mode)
              ratio = f"{base / secs:.2f}x" if isinstance(base, float) else "-"
              row += f"{tflops:>14.3f}{ratio:>8}"
            print(row, flush=True)
  for text, number in notes.items():
    print(f"[{number}] {text}")
  print("/cudnn: speed relative to cudnn on the same row (cudnn time / impl time).")


if __name__ == "__main__":
  main()

"""The CPU dense backward (``ops.linear.dense``) against autodiff's tensordot.

    python bench/dense_grad.py                # MLP block + gpt-pydoc step, 3 rounds
    python bench/dense_grad.py --models mlp --rounds 5

``mlp``: a GPT MLP block's forward + backward, ``[8, 256, 192] -> 768 -> 192``
with tanh GELU, both ways, with the largest gradient difference. ``gpt``:
the ``gpt-pydoc`` Trainer step traced with every ``dense`` forced to
autodiff (``matmul_grad=False``) vs as shipped. Interleaved rounds, median.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time

if __package__ in (None, ""):
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")

import jax
import jax.numpy as jnp

from datong.ops import linear
from datong.train import recipes
from step_time import step_runner  # bench/ is this script's directory

_dense = linear.dense


@contextlib.contextmanager
def autodiff_dense():
  """Every ``linear.dense`` traced in here uses autodiff's backward."""
  linear.dense = lambda x, k, n=1, matmul_grad=None: _dense(x, k, n, matmul_grad=False)
  try:
    yield
  finally:
    linear.dense = _dense


def mlp_runners():
  r = jax.random.split(jax.random.PRNGKey(0), 4)
  x = jax.random.normal(r[0], (8, 256, 192))
  wi = jax.random.normal(r[1], (192, 768)) * 0.05
  wo = jax.random.normal(r[2], (768, 192)) * 0.05
  g = jax.random.normal(r[3], (8, 256, 192))

  def grad_fn(matmul_grad):
    def loss(x, wi, wo):
      h = jax.nn.gelu(linear.dense(x, wi, matmul_grad=matmul_grad), approximate=True)
      return jnp.sum(linear.dense(h, wo, matmul_grad=matmul_grad) * g)
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))

  fns = {"autodiff tensordot": grad_fn(False), "matmul backward": grad_fn(True)}
  outs = {k: f(x, wi, wo) for k, f in fns.items()}
  diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(*outs.values()))

  def runner(f):
    def run(n):
      start = time.perf_counter()
      for _ in range(n):
        out = f(x, wi, wo)
      jax.block_until_ready(out)
      return (time.perf_counter() - start) / n
    return run
  return {k: runner(f) for k, f in fns.items()}, f"max |grad difference| {diff:g}"


def gpt_runners():
  cfg = recipes.get("gpt-pydoc")

  def runner(ctx):
    return step_runner(cfg, context=ctx)  # the step is traced at its first call
  return {"autodiff tensordot": runner(autodiff_dense),
          "matmul backward": runner(contextlib.nullcontext)}, ""


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", nargs="+", default=["mlp", "gpt"], choices=("mlp", "gpt"))
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--rounds", type=int, default=3)
  args = parser.parse_args(argv)
  print(f"jax {jax.__version__} ({jax.default_backend()}); load {os.getloadavg()[0]:.2f}")
  print("| what | backward | ms (median) | rounds (ms) | vs autodiff |")
  print("| --- | --- | --- | --- | --- |")
  for model in args.models:
    runners, note = mlp_runners() if model == "mlp" else gpt_runners()
    times = {k: [] for k in runners}
    for _ in range(args.rounds):
      for k, run in runners.items():
        times[k].append(run(args.steps))
    base = statistics.median(times["autodiff tensordot"])
    for k in runners:
      t = statistics.median(times[k])
      print(f"| {model} | {k} | {t * 1e3:.1f} | {', '.join(f'{x * 1e3:.0f}' for x in times[k])} "
            f"| {t / base:.3f} |", flush=True)
    if note:
      print(f"{model}: {note}")
  print(f"load {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
  main()

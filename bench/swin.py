"""Swin-T vs ViT-S/16 train steps on this machine: images/s and compiled memory
at 224 and 448 pixels, in one process, with ratios.

    python bench/swin.py                    # batch 2, 3 timed steps per case
    python bench/swin.py --batch 4 --steps 5

Each case is ``ImageClassifier`` (1000 classes) + AdamW, one jitted step
(forward, backward, update) with donated state, float32. Memory is XLA's
``memory_analysis()`` of the compiled step: ``temp`` (activations and other
scratch) and ``args`` (parameters, optimizer state, batch). Swin's windowed
attention is linear in the number of tokens, ViT's global attention
quadratic: from 224 to 448 pixels (4x the tokens) Swin's cost should grow
about 4x, ViT's more.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import flax.linen as nn  # noqa: E402
import optax  # noqa: E402

from datong.backbone import TransformerConfig  # noqa: E402
from datong.unimodal.encoders import ImageClassifier  # noqa: E402
from datong.unimodal.swin import SwinConfig  # noqa: E402
from datong.unimodal.vision import ViTConfig  # noqa: E402


def encoder(name: str, size: int):
  if name == "Swin-T":
    return SwinConfig.preset("swin-T", image_size=size, stochastic_depth=0.0)
  return ViTConfig(TransformerConfig.preset("vit-S"), image_size=(size, size),
                   patch_size=(16, 16), pool="cls")


def measure(name: str, size: int, batch: int, steps: int) -> dict:
  cfg = encoder(name, size)
  model = ImageClassifier(cfg, 1000)
  images = jax.random.normal(jax.random.PRNGKey(0), (batch, size, size, 3))
  labels = jnp.arange(batch, dtype=jnp.int32) % 1000
  params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), images[:1])["params"])
  opt = optax.adamw(1e-4)
  opt_state = jax.jit(opt.init)(params)

  def step(params, opt_state, images, labels):
    def loss_fn(p):
      logits, _ = model.apply({"params": p}, images, train=True)
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  t0 = time.perf_counter()
  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, opt_state, images, labels).compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  params, opt_state, loss = compiled(params, opt_state, images, labels)  # warm-up
  loss.block_until_ready()
  t0 = time.perf_counter()
  for _ in range(steps):
    params, opt_state, loss = compiled(params, opt_state, images, labels)
  loss.block_until_ready()
  seconds = (time.perf_counter() - t0) / steps
  return {"model": name, "size": size, "tokens": cfg.num_tokens,
          "images_per_s": batch / seconds, "step_s": seconds, "compile_s": compile_s,
          "temp_mib": mem.temp_size_in_bytes / 2**20, "args_mib": mem.argument_size_in_bytes / 2**20,
          "gflops_per_image": cfg.flops_per_example() / 1e9}


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--sizes", type=int, nargs="+", default=[224, 448])
  args = p.parse_args()
  rows = [measure(m, s, args.batch, args.steps) for s in args.sizes for m in ("Swin-T", "ViT-S/16")]
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}, batch {args.batch}, "
        f"{args.steps} timed steps, load average {os.getloadavg()[0]:.2f} at the end")
  print("| model | pixels | tokens | images/s | step (s) | train GFLOPs/image | temp MiB | "
        "args MiB | compile (s) |")
  print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
  for r in rows:
    print(f"| {r['model']} | {r['size']} | {r['tokens']} | {r['images_per_s']:.2f} | "
          f"{r['step_s']:.2f} | {r['gflops_per_image']:.1f} | {r['temp_mib']:.0f} | "
          f"{r['args_mib']:.0f} | {r['compile_s']:.0f} |")
  by = {(r["model"], r["size"]): r for r in rows}
  print()
  print("| ratio | " + " | ".join(str(s) for s in args.sizes) + " |")
  print("| --- | " + " | ".join("---" for _ in args.sizes) + " |")
  print("| Swin-T / ViT-S/16 images/s | " + " | ".join(
      f"{by['Swin-T', s]['images_per_s'] / by['ViT-S/16', s]['images_per_s']:.2f}"
      for s in args.sizes) + " |")
  print("| Swin-T / ViT-S/16 temp memory | " + " | ".join(
      f"{by['Swin-T', s]['temp_mib'] / by['ViT-S/16', s]['temp_mib']:.2f}"
      for s in args.sizes) + " |")
  if len(args.sizes) >= 2:
    lo, hi = args.sizes[0], args.sizes[-1]
    print()
    print(f"| growth {lo} -> {hi} px | step time | temp memory | train FLOPs |")
    print("| --- | --- | --- | --- |")
    for m in ("Swin-T", "ViT-S/16"):
      a, b = by[m, lo], by[m, hi]
      print(f"| {m} | {b['step_s'] / a['step_s']:.2f}x | {b['temp_mib'] / a['temp_mib']:.2f}x | "
            f"{b['gflops_per_image'] / a['gflops_per_image']:.2f}x |")


if __name__ == "__main__":
  main()

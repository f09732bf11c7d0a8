"""End-to-end training throughput: the full Trainer step, per attention impl.

    python bench/throughput.py                    # GPT-2 124M (seq 1024), ViT-B/16 (224)
    python bench/throughput.py --models gpt2 --batch-gpt2 32 --impls cudnn pallas_gpu
    python bench/throughput.py --smoke            # tiny shapes, any backend, seconds

What is timed is ``loop.Trainer.step``: the jitted, sharded, donated step
with bf16 compute, float32 master weights and AdamW (weight decay 0.1,
clipping at 1.0) and the NaN guard, on one pre-placed synthetic batch (data
loading is not timed; ``bench/loop_overhead.py`` measures it). The global
batch is ``--batch-*`` per device times the device count, on a data-parallel
mesh. Each impl's step is compiled and warmed up first, then impls run
interleaved, ``--repeats`` rounds of ``--steps`` steps; the median round is
reported. MFU is ``examples/s * task.flops_per_example() / (peak * devices)``
with the analytic FLOP count (``TransformerConfig.flops_per_token``, the
encoder's ``flops_per_example``, plus the heads), and the peak from
``datong.train.trainer.PEAK_FLOPS`` (dense bf16) or ``--peak-tflops``.

An impl that cannot serve the model's attention falls back to the reference
inside the model; such rows are marked ``fell back`` rather than timed as if
they were the impl.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings

if __package__ in (None, ""):  # `python bench/throughput.py` from a checkout
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np

from datong.backbone import TransformerConfig
from datong.train import loop
from datong.train.config import MeshConfig, OptimizerConfig, RunConfig, TrainConfig

# Attention impls worth timing per platform (reference materializes the
# scores: a baseline, not a contender; pass --impls reference to add it).
PLATFORM_IMPLS = {"gpu": ("cudnn", "pallas_gpu", "xla"), "tpu": ("pallas_tpu", "xla"),
                  "cpu": ("xla", "reference")}
MODELS = ("gpt2", "vit")


def gpt2_task(impl: str, smoke: bool, remat: str):
  """GPT-2 small (124M, tied embeddings, learned positions), sequence 1024."""
  from datong.train.tasks.text import GPTTaskConfig  # pylint: disable=import-outside-toplevel
  from datong.unimodal.text import TextConfig  # pylint: disable=import-outside-toplevel
  if smoke:
    backbone = TransformerConfig(width=64, depth=2, heads=4, mlp_dim=256,
                                 activation="gelu_tanh", norm_eps=1e-5, kernel_init="normal")
    vocab, seq = 512, 64
  else:
    backbone = TransformerConfig.preset("gpt2-small")
    vocab, seq = 50257, 1024
  backbone = backbone.replace(attention_impl=impl, dtype="bfloat16", param_dtype="float32",
                              remat=remat)
  model = TextConfig(backbone=backbone, vocab_size=vocab, positions="learned", max_length=seq)
  # Byte tokenizer: building the task reads no data (the batch is synthetic).
  return GPTTaskConfig(model=model, seq_length=seq, tokenizer="byte")


def vit_task(impl: str, smoke: bool, remat: str):
  """ViT-B/16 at 224 (197 tokens), 1000 classes."""
  from datong.train.tasks.images import ImageData  # pylint: disable=import-outside-toplevel
  from datong.train.tasks.vision import ViTClassifierConfig  # pylint: disable=import-outside-toplevel
  from datong.unimodal.vision import ViTConfig  # pylint: disable=import-outside-toplevel
  if smoke:
    backbone = TransformerConfig(width=64, depth=2, heads=4, mlp_dim=256)
    size, patch, classes = 32, 8, 10
  else:
    backbone = TransformerConfig.preset("vit-B")
    size, patch, classes = 224, 16, 1000
  backbone = backbone.replace(attention_impl=impl, dtype="bfloat16", param_dtype="float32",
                              remat=remat)
  model = ViTConfig(backbone, image_size=(size, size), patch_size=(patch, patch), channels=3,
                    pool="cls")
  return ViTClassifierConfig(model=model, data=ImageData(dataset="imagenet2012"),
                             num_classes=classes)


def synthetic_batch(spec: dict, rng: np.random.Generator, vocab: int) -> dict:
  """Arrays matching the task's batch spec: random tokens / pixels / labels,
  one document per row (segment id 1, positions 0..L-1), every target counted."""
  out = {}
  for name, s in spec.items():
    if name in ("inputs", "targets"):
      out[name] = rng.integers(0, vocab, s.shape).astype(np.int32)
    elif name == "segment_ids":
      out[name] = np.ones(s.shape, np.int32)
    elif name == "positions":
      out[name] = np.broadcast_to(np.arange(s.shape[-1], dtype=np.int32), s.shape).copy()
    elif name == "label":
      out[name] = rng.integers(0, 10, s.shape).astype(np.int32)
    elif jnp.issubdtype(s.dtype, jnp.floating):
      out[name] = (rng.standard_normal(s.shape) if name == "image"
                   else np.ones(s.shape)).astype(s.dtype)
    else:
      raise ValueError(f"synthetic_batch: no rule for batch entry {name!r} {s}")
  return out


class Runner:
  """One model + impl: a Trainer, its state and a placed batch; ``run(n)``
  returns seconds per step over ``n`` steps."""

  def __init__(self, model: str, impl: str, per_device_batch: int, smoke: bool, remat: str):
    make = gpt2_task if model == "gpt2" else vit_task
    task = make(impl, smoke, remat)
    batch_size = per_device_batch * jax.device_count()
    cfg = RunConfig(
        task=task,
        train=TrainConfig(steps=1000, batch_size=batch_size, log_every=1000, eval_every=0,
                          checkpoint_every=0, seed=0),
        optimizer=OptimizerConfig(learning_rate=3e-4, schedule="cosine", warmup_steps=10,
                                  b2=0.95, weight_decay=0.1, grad_clip_norm=1.0),
        mesh=MeshConfig(data=-1))
    self.fallback = None
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      self.trainer = loop.Trainer(cfg, tempfile.mkdtemp(prefix="datong-throughput-"))
      self.state = self.trainer.init_state()
      vocab = task.model.vocab_size if model == "gpt2" else 10
      host = synthetic_batch(self.trainer.batch_spec, np.random.default_rng(0), vocab)
      self.batch = jax.device_put(host, self.trainer.batch_sharding)
      start = time.perf_counter()
      for _ in range(2):  # compile + warm up
        self.state, metrics = self.trainer.step(self.state, self.batch)
      jax.block_until_ready(metrics)
      self.compile_seconds = time.perf_counter() - start
    for w in caught:
      if "falling back to 'reference'" in str(w.message):
        self.fallback = str(w.message)
    self.batch_size = batch_size
    task_obj = self.trainer.task
    self.flops_per_example = task_obj.flops_per_example()
    self.tokens_per_example = task_obj.tokens_per_example()
    self.loss = float(metrics["train/loss"])

  def run(self, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
      self.state, metrics = self.trainer.step(self.state, self.batch)
    jax.block_until_ready(metrics)
    return (time.perf_counter() - start) / n


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--smoke", action="store_true", help="tiny models, 1 round of 2 steps")
  parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
  parser.add_argument("--impls", nargs="+", default=None,
                      help="attention impls (default: the platform's, see PLATFORM_IMPLS)")
  parser.add_argument("--batch-gpt2", type=int, default=16, help="sequences per device")
  parser.add_argument("--batch-vit", type=int, default=128, help="images per device")
  parser.add_argument("--remat", default="none", help="TransformerConfig.remat")
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--peak-tflops", type=float, default=None,
                      help="per-device peak for MFU (default: datong.train.trainer.PEAK_FLOPS by device kind)")
  args = parser.parse_args(argv)
  if args.smoke:
    args.batch_gpt2, args.batch_vit, args.steps, args.repeats = 2, 2, 2, 1

  platform = jax.default_backend()
  impls = args.impls or list(PLATFORM_IMPLS.get(platform, ("xla",)))
  device = jax.devices()[0]
  peak = args.peak_tflops * 1e12 if args.peak_tflops else loop.peak_flops(device)
  n_dev = jax.device_count()
  print(f"device: {n_dev} x {device.device_kind} ({platform}), jax {jax.__version__}, "
        f"bf16 compute / fp32 master / AdamW, remat={args.remat}, "
        f"peak {'%.0f TFLOP/s' % (peak / 1e12) if peak else 'unknown (no MFU)'}"
        + (", SMOKE: tiny models, timings meaningless" if args.smoke else ""), flush=True)

  rows = []
  for model in args.models:
    per_device = args.batch_gpt2 if model == "gpt2" else args.batch_vit
    runners = {}
    for impl in impls:
      try:
        runners[impl] = Runner(model, impl, per_device, args.smoke, args.remat)
      except Exception as e:  # pylint: disable=broad-except  # e.g. OOM: report, go on
        rows.append((model, impl, per_device, f"error: {type(e).__name__}: "
                     f"{str(e).splitlines()[0][:100]}"))
    times = {impl: [] for impl in runners}
    for _ in range(args.repeats):
      for impl, runner in runners.items():
        times[impl].append(runner.run(args.steps))
    for impl, runner in runners.items():
      rows.append((model, impl, per_device, runner, statistics.median(times[impl])))

  unit = {"gpt2": "tokens/s", "vit": "images/s"}
  header = (f"{'model':<6}{'impl':<12}{'batch/dev':>10}{'ms/step':>10}{'per device':>14}"
            f"{'unit':>10}{'MFU':>8}{'compile s':>11}{'loss':>9}")
  print(header)
  print("-" * len(header))
  for row in rows:
    model, impl, per_device = row[:3]
    if isinstance(row[3], str):
      print(f"{model:<6}{impl:<12}{per_device:>10}  {row[3]}")
      continue
    runner, secs = row[3], row[4]
    examples = runner.batch_size / secs
    rate = examples * (runner.tokens_per_example if model == "gpt2" else 1) / n_dev
    mfu = f"{examples * runner.flops_per_example / (peak * n_dev):.1%}" if peak else "-"
    note = "  fell back to reference" if runner.fallback else ""
    print(f"{model:<6}{impl:<12}{per_device:>10}{secs * 1e3:>10.1f}{rate:>14,.0f}"
          f"{unit[model]:>10}{mfu:>8}{runner.compile_seconds:>11.1f}{runner.loss:>9.3f}{note}",
          flush=True)
  return rows


if __name__ == "__main__":
  main()

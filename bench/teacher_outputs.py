"""A frozen teacher in every step vs its logits precomputed once: distill-gpt-pydoc.

    python bench/teacher_outputs.py --teacher /tmp/gpt-pydoc [--student /tmp/distill-gpt] \
        [--steps 10] [--repeats 3]

Prints a table: per-step time of the compiled step on one pre-placed batch
(``in_step`` / ``precomputed``, interleaved rounds in one process, medians
and the ratio to ``in_step``), the host data pipeline's time per batch
(iterator + placement; in a run it overlaps the step in a prefetch thread),
the one-off precompute and its host memory per storage dtype, and the
projected total of the recipe's steps. Then the accuracy of each storage
against the fp32 in-step loss and gradients on the student of
``--student`` (a finished distill-gpt-pydoc run; a fresh student without
it), and why the image recipes keep the teacher in the step.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

if __package__ in (None, ""):
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from datong.train import checkpoint as ckpt_lib  # pylint: disable=wrong-import-position
from datong.train import data as data_lib  # pylint: disable=wrong-import-position
from datong.train import loop, recipes  # pylint: disable=wrong-import-position
from datong.train.config import override  # pylint: disable=wrong-import-position
from datong.train.tasks.distill import student_params  # pylint: disable=wrong-import-position
from datong.train.tasks.teacher_outputs import FIELD, STORAGE, precompute_logits  # pylint: disable=wrong-import-position

RECIPE = "distill-gpt-pydoc"


class Runner:
  """One variant's trainer: the precompute (timed), a pre-placed batch, and
  ``step(n)`` / ``data(n)`` in seconds per step / per batch."""

  def __init__(self, cfg):
    self.trainer = trainer = loop.Trainer(cfg, tempfile.mkdtemp())
    start = time.perf_counter()
    trainer.task.source(trainer.task.train_split)  # the precompute, if any
    self.source_s = time.perf_counter() - start
    self.state = trainer.init_state()
    self.iterator = trainer.train_iterator()
    self.batch = data_lib.to_global(next(self.iterator), trainer.batch_sharding)
    for _ in range(3):  # compile + warm up
      self.state, metrics = trainer.step(self.state, self.batch)
    jax.block_until_ready(metrics)

  def step(self, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
      self.state, out = self.trainer.step(self.state, self.batch)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / n

  def data(self, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
      batch = data_lib.to_global(next(self.iterator), self.trainer.batch_sharding)
    jax.block_until_ready(batch)
    return (time.perf_counter() - start) / n


def accuracy(runner: Runner, student: str | None, batches: int = 4):
  """{storage: (rel. error of the KL term, of the loss, of the gradient)}
  against the in-step fp32 teacher, over ``batches`` training batches."""
  task = runner.trainer.task
  params = jax.device_get(runner.state.params)
  if student:
    params = {**params, **student_params(ckpt_lib.load_params(student))}
  arrays = task.source(task.train_split).arrays
  rows = np.random.default_rng(0).choice(len(arrays["inputs"]), 8 * batches, replace=False)
  batch_all = {k: v[rows] for k, v in arrays.items() if k != FIELD}
  raw = precompute_logits(task.teacher_forward, params["teacher"], batch_all, vocab=task.vocab)
  logp = np.asarray(jax.nn.log_softmax(jnp.asarray(raw), -1))
  variants = {"float32 (raw logits)": raw}
  for name in ("float16", "bfloat16"):
    variants[f"{name} (log-softmax)"] = logp.astype(STORAGE[name])
    variants[f"{name} (raw logits)"] = raw.astype(STORAGE[name])

  task.precomputed = False
  ref_fn = jax.jit(jax.value_and_grad(lambda p, b: task.loss(p, b, jax.random.PRNGKey(0),
                                                             train=False), has_aux=True))
  refs = [ref_fn(params, {k: v[i * 8:(i + 1) * 8] for k, v in batch_all.items()})
          for i in range(batches)]
  task.precomputed = True
  fn = jax.jit(jax.value_and_grad(lambda p, b: task.loss(p, b, jax.random.PRNGKey(0),
                                                         train=False), has_aux=True))
  out = {}
  for name, table in variants.items():
    kd, loss, grad = [], [], []
    for i, ((l0, m0), g0) in enumerate(refs):
      b = {k: v[i * 8:(i + 1) * 8] for k, v in batch_all.items()}
      (l1, m1), g1 = fn(params, {**b, FIELD: table[i * 8:(i + 1) * 8]})
      g0, g1 = student_params(g0), student_params(g1)
      kd.append(abs(float(m1["kd"]) - float(m0["kd"])) / abs(float(m0["kd"])))
      loss.append(abs(float(l1) - float(l0)) / abs(float(l0)))
      diff = sum(float(jnp.sum((a - c) ** 2)) for a, c in zip(jax.tree.leaves(g1),
                                                              jax.tree.leaves(g0)))
      norm = sum(float(jnp.sum(a ** 2)) for a in jax.tree.leaves(g0))
      grad.append((diff / norm) ** 0.5)
    out[name] = (max(kd), max(loss), max(grad), float(m0["kd"]))
  return out


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--teacher", required=True, help="a gpt-pydoc run's workdir")
  parser.add_argument("--student", default=None, help="a finished distill-gpt-pydoc workdir")
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  base = override(recipes.get(RECIPE), {"task.teacher": args.teacher})
  total_steps = base.train.steps
  runners = {v: Runner(override(base, {"task.teacher_outputs": v}))
             for v in ("in_step", "precomputed")}
  steps = {v: [] for v in runners}
  datas = {v: [] for v in runners}
  for _ in range(args.repeats):
    for v, r in runners.items():
      steps[v].append(r.step(args.steps))
      datas[v].append(r.data(args.steps))
  ratios = [p / i for p, i in zip(steps["precomputed"], steps["in_step"])]
  pre = runners["precomputed"]
  task = pre.trainer.task
  table = task.source(task.train_split).arrays[FIELD]
  rows, length, vocab = table.shape
  print(f"{RECIPE} on {jax.devices()[0].platform}, jax {jax.__version__}, "
        f"load {os.getloadavg()[0]:.2f}; {rows} train rows x {length} tokens, vocab {vocab}; "
        f"{args.steps} steps x {args.repeats} interleaved rounds (medians)")
  print(f"| teacher outputs | step ms | ratio | data ms/batch | precompute s | host memory | "
        f"projected {total_steps} steps |")
  print("|---|---|---|---|---|---|---|")
  for v in runners:
    s, d = statistics.median(steps[v]), statistics.median(datas[v])
    once = runners[v].source_s if v == "precomputed" else 0.0
    mem = (f"{table.nbytes / 2**20:.0f} MiB ({task.config.teacher_dtype}); fp32 "
           f"{rows * length * vocab * 4 / 2**20:.0f} MiB" if v == "precomputed" else "0")
    ratio = statistics.median(ratios) if v == "precomputed" else 1.0
    proj = total_steps * s + once
    print(f"| {v} | {s * 1e3:.1f} | x{ratio:.3f} | {d * 1e3:.1f} | {once:.1f} | {mem} | "
          f"{proj / 60:.2f} min (+data {total_steps * d / 60:.2f}) |")
  print(f"per-round ratios precomputed/in_step: {', '.join(f'{r:.3f}' for r in ratios)}")
  print("\nstorage accuracy vs the fp32 in-step teacher (max over 4 batches of 8 rows; "
        f"student {'of ' + args.student if args.student else 'fresh'}):")
  print("| storage | rel. err KL term | rel. err loss | rel. err gradient | KL |")
  print("|---|---|---|---|---|")
  for name, (kd, loss, grad, kl) in accuracy(pre, args.student).items():
    print(f"| {name} | {kd:.2e} | {loss:.2e} | {grad:.2e} | {kl:.4f} |")
  vit = recipes.get("distill-vit-digits").task.student.data
  fd = recipes.get("fd-clip-digits").task.data
  print(f"\ndistill-vit-digits: ImageData crop_pad={vit.crop_pad} (host, per example per visit), "
        f"shift={vit.shift} rotate={vit.rotate} scale={vit.scale} (in the step, per step rng): "
        f"the teacher must see each step's views, only in_step is exact.")
  print(f"fd-clip-digits: shift={fd.shift} rotate={fd.rotate} scale={fd.scale} in the step: "
        f"likewise in_step only.")


if __name__ == "__main__":
  main()

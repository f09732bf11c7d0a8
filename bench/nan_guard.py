"""What the Trainer step's NaN guard costs: compiled copies, memory, time.

    python bench/nan_guard.py                 # compile only (seconds)
    python bench/nan_guard.py --time 10 3     # + step time, 3 rounds of 10 steps

Three versions of the same step, each compiled for one CPU device (unless
XLA_FLAGS says otherwise): ``select``, the guard as it was
(``jnp.where(finite, new, old)`` over params and optimizer state); ``cond``,
``loop.Trainer`` today (``lax.cond(finite, update, keep)``); ``none``, no
guard at all (the floor). From the optimized HLO: the ``copy`` instructions
(lone copies and copy-rooted fusions) and the bytes they write per step, and
how many copy a donated params / optimizer-state input; from
``memory_analysis()``: argument, output, alias (donated inputs reused for
outputs) and temp bytes. With ``--time``, the versions' steps run
interleaved on one batch and the median seconds per step is reported.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
import time

if __package__ in (None, ""):
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")

import jax
import jax.numpy as jnp
import numpy as np
import optax

from datong.train import data as data_lib
from datong.train import loop, recipes
from datong.train import trainer as trainer_lib
from datong.train.config import override

_BYTES = {"f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "pred": 1, "s8": 1, "u8": 1,
          "f64": 8, "s64": 8, "u64": 8}


def copies(hlo_text: str) -> tuple[int, int, int]:
  """(copies, bytes they write, copies of a donated params/opt_state input)."""
  count = total = of_state = 0
  for line in hlo_text.splitlines():
    m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (\w+)\[([\d,]*)\]\{[^}]*\} (copy|fusion)\((%[\w.]+)?",
                 line)
    if not m:
      continue
    name, dtype, dims, op, operand = m.groups()
    if op == "fusion" and not name.startswith("copy"):
      continue
    count += 1
    total += _BYTES.get(dtype, 4) * int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
    if op == "copy" and operand and re.match(r"%state_(params|opt_state)", operand):
      of_state += 1
  return count, total, of_state


class SelectGuardTrainer(loop.Trainer):
  """The step as it was: select new vs old state after the update."""

  def _train_step(self, state, batch):
    rng = jax.random.fold_in(state.rng, state.step)
    loss, task_metrics, grads = self._grads(state.params, batch, rng)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = trainer_lib.TrainState(step=state.step + 1, params=keep(params, state.params),
                                opt_state=keep(opt_state, state.opt_state), rng=state.rng)
    metrics = {"train/loss": loss, "train/grad_norm": grad_norm,
               "train/learning_rate": self.schedule(state.step),
               "train/nonfinite": 1 - finite.astype(jnp.int32)}
    metrics.update({f"train/{k}": v for k, v in task_metrics.items()})
    return new_state, metrics


class NoGuardTrainer(loop.Trainer):
  """No guard: the floor a guard is measured against."""

  def _train_step(self, state, batch):
    rng = jax.random.fold_in(state.rng, state.step)
    loss, task_metrics, grads = self._grads(state.params, batch, rng)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new_state = trainer_lib.TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                                rng=state.rng)
    metrics = {"train/loss": loss, "train/grad_norm": grad_norm,
               "train/learning_rate": self.schedule(state.step),
               "train/nonfinite": 1 - finite.astype(jnp.int32)}
    metrics.update({f"train/{k}": v for k, v in task_metrics.items()})
    return new_state, metrics


VERSIONS = {"select (before)": SelectGuardTrainer, "cond (Trainer)": loop.Trainer,
            "none (floor)": NoGuardTrainer}


def configs():
  """The issue's ViT (width 384, depth 6, 64x64 images, patch 8, batch 32) and gpt-pydoc."""
  vit = override(recipes.get("vit-digits"), {
      "task.model.backbone.width": "384", "task.model.backbone.depth": "6",
      "task.model.backbone.heads": "6", "task.model.backbone.mlp_dim": "1536",
      "task.model.image_size": "[64, 64]", "task.model.patch_size": "[8, 8]",
      "task.data.upsample": "8", "train.batch_size": "32"})
  return {"vit 384x6 64px/8 b32": vit, "gpt-pydoc b8x256": recipes.get("gpt-pydoc")}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--time", type=int, nargs=2, metavar=("STEPS", "ROUNDS"), default=None)
  parser.add_argument("--models", nargs="+", default=["vit", "gpt"], choices=("vit", "gpt"))
  args = parser.parse_args(argv)
  print(f"jax {jax.__version__}, {jax.device_count()} x {jax.devices()[0].device_kind}; "
        f"load {os.getloadavg()[0]:.2f}")
  print("| model | guard | copies | copied MB | copies of a state input | state MB | "
        "alias MB | temp MB |" + (" ms/step (median) | vs select |" if args.time else ""))
  print("| --- | --- | --- | --- | --- | --- | --- | --- |" + (" --- | --- |" if args.time else ""))
  for model, cfg in configs().items():
    if model.split()[0].split("-")[0] not in args.models:
      continue
    rows, runners = {}, {}
    for version, cls in VERSIONS.items():
      trainer = cls(cfg, tempfile.mkdtemp())
      compiled = trainer.compile()
      n, nbytes, of_state = copies(compiled.as_text())
      mem = compiled.memory_analysis()
      state = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(trainer.abstract_state))
      rows[version] = (f"| {model} | {version} | {n} | {nbytes / 1e6:.1f} | {of_state} | "
                       f"{state / 1e6:.1f} | {mem.alias_size_in_bytes / 1e6:.1f} | "
                       f"{mem.temp_size_in_bytes / 1e6:.1f} |")
      if args.time:
        state_ = trainer.init_state()
        batch = data_lib.to_global(next(trainer.train_iterator()), trainer.batch_sharding)
        for _ in range(3):
          state_, out = trainer.step(state_, batch)
        jax.block_until_ready(out)
        runners[version] = [trainer, state_, batch, []]
    if args.time:
      steps, rounds = args.time
      for _ in range(rounds):
        for r in runners.values():
          trainer, state_, batch, times = r
          start = time.perf_counter()
          for _ in range(steps):
            state_, out = trainer.step(state_, batch)
          jax.block_until_ready(out)
          times.append((time.perf_counter() - start) / steps)
          r[1] = state_
      base = statistics.median(runners["select (before)"][3])
      for version, r in runners.items():
        t = statistics.median(r[3])
        rows[version] += f" {t * 1e3:.1f} | {t / base:.3f} |"
    for row in rows.values():
      print(row, flush=True)
  print(f"load {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
  main()

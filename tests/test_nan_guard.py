"""The Trainer's NaN guard: a non-finite step changes nothing, and the guard
costs no copy of the donated state."""

import re

import jax
import numpy as np

from datong.train import data as data_lib
from datong.train import loop
from datong.train.config import MeshConfig, OptimizerConfig, RunConfig, TrainConfig
from engine_task import DigitsTaskConfig


def _trainer(tmp_path, mesh=(2, 2, 2), nan_loss=False, devices=None):
  cfg = RunConfig(task=DigitsTaskConfig(nan_loss=nan_loss),
                  train=TrainConfig(steps=8, batch_size=32, log_every=1, checkpoint_every=0),
                  optimizer=OptimizerConfig(learning_rate=3e-3, warmup_steps=0),
                  mesh=MeshConfig(*mesh))
  return loop.Trainer(cfg, str(tmp_path), devices=devices)


def test_a_nonfinite_step_leaves_params_and_optimizer_state_bitwise_unchanged(tmp_path):
  trainer = _trainer(tmp_path)
  batch = data_lib.to_global(next(trainer.train_iterator()), trainer.batch_sharding)
  state, metrics = trainer.step(trainer.init_state(), batch)  # Adam moments now non-zero
  assert int(metrics["train/nonfinite"]) == 0
  before = jax.device_get((state.params, state.opt_state))
  step_before = int(state.step)

  # The same model and shardings, with a NaN loss.
  state, metrics = _trainer(tmp_path, nan_loss=True).step(state, batch)
  assert int(metrics["train/nonfinite"]) == 1
  assert int(state.step) == step_before + 1  # the batch is consumed
  after = jax.device_get((state.params, state.opt_state))
  assert jax.tree.structure(after) == jax.tree.structure(before)
  for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(before)):
    np.testing.assert_array_equal(a, b)

  # And the next finite step updates again.
  state, metrics = trainer.step(state, batch)
  assert int(metrics["train/nonfinite"]) == 0
  moved = [not np.array_equal(a, b) for a, b in
           zip(jax.tree.leaves(jax.device_get(state.params)), jax.tree.leaves(before[0]))]
  assert any(moved)


def test_the_guard_copies_no_donated_state_buffer(tmp_path):
  """Selecting new-vs-old state copied every optimizer-state leaf (XLA kept
  the old value alive beside the in-place update); the conditional update
  needs no copy of any state input."""
  # One device: its HLO names each state leaf's input (state_opt_state_...).
  text = _trainer(tmp_path, mesh=(1, 1, 1), devices=jax.devices()[:1]).compile().as_text()
  state_inputs = set(re.findall(r"%(state_[\w.]+) = \S+ parameter\(", text))
  assert any("opt_state" in name for name in state_inputs)  # the names are as expected
  copied = [name for name in re.findall(r"= \S+ copy\(%(state_[\w.]+)\)", text)
            if name in state_inputs and ("params" in name or "opt_state" in name)]
  assert not copied, copied[:5]

"""The train step: one jitted, sharded, donated ``step(state, batch) -> (state, metrics)``.

``Trainer`` builds it from a run config: mesh, the task, the sharding plan of
params and optimizer state, the optimizer, and the compiled init and step.
The loop that drives it (data, checkpoints, evaluation, logs) is
``datong.train.loop``. A NaN/inf loss or gradient never reaches the state:
the update is skipped on device and ``train/nonfinite`` reports it.
"""

from __future__ import annotations

from typing import Any, Iterator, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from datong.train import data as data_lib
from datong.train import sharding as sharding_lib
from datong.train.config import RunConfig
from datong.train.optim import make_optimizer, only_trainable
from datong.train.task import EvalContext, Task


# XLA options for code that runs once (parameter initialization).
INIT_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}


class NonFiniteLossError(RuntimeError):
  """Raised when a NaN/inf loss or gradient appears and ``on_nonfinite='stop'``."""


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: number of batches consumed
  params: Any
  opt_state: Any
  rng: jax.Array  # uint32[2] raw key, folded with the step


# Dense bf16 peak FLOP/s per chip, for MFU. Unknown devices (CPU) get no MFU.
PEAK_FLOPS = {
    "H100": 989e12, "H200": 989e12, "H800": 989e12, "GH200": 989e12, "B200": 2250e12,
    "A100": 312e12, "A800": 312e12, "L40S": 362e12, "V100": 125e12,
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
    "TPU v5": 459e12, "TPU v6 lite": 918e12, "TPU v6e": 918e12,
}


def peak_flops(device) -> Optional[float]:
  kind = getattr(device, "device_kind", "")
  for name in sorted(PEAK_FLOPS, key=len, reverse=True):
    if name in kind:
      return PEAK_FLOPS[name]
  return None


class Trainer:
  """Holds the compiled step and the shardings of one run."""

  def __init__(self, config: RunConfig, workdir: str, *, devices=None):
    self.config = config
    self.workdir = workdir
    self.task: Task = config.task.build()
    self.mesh = sharding_lib.make_mesh(config.mesh, devices)
    tc = config.train
    sharding_lib.check_batch_size(tc.batch_size, self.mesh, tc.microbatches)
    self.replicated = NamedSharding(self.mesh, P())
    self.batch_sharding = sharding_lib.batch_sharding(self.mesh)

    self.batch_spec = self.task.batch_spec(tc.batch_size)
    rng_spec = jax.ShapeDtypeStruct((2,), jnp.uint32)
    with self._context():
      self.params_plan = sharding_lib.plan_params(
          lambda rng: self.task.init(rng, self.batch_spec)["params"],
          rng_spec, mesh=self.mesh)
    abstract_params = self.params_plan.abstract
    trainable = self.task.trainable(abstract_params)
    self.tx, self.schedule = make_optimizer(
        config.optimizer, tc.steps,
        weight_decay_mask=self.task.weight_decay_mask(abstract_params),
        trainable=trainable, lr_scale=self.task.learning_rate_scale(abstract_params))
    opt_abstract = jax.eval_shape(self.tx.init, abstract_params)
    self.opt_plan = sharding_lib.plan_like_params(
        opt_abstract, self.params_plan, self.mesh,
        view=lambda tree: only_trainable(tree, trainable))
    self.state_shardings = TrainState(
        step=self.replicated, params=self.params_plan.shardings,
        opt_state=self.opt_plan.shardings, rng=self.replicated)
    self.abstract_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=abstract_params,
                   opt_state=opt_abstract, rng=rng_spec),
        self.state_shardings)
    batch_shardings = {k: self.batch_sharding for k in self.batch_spec}
    # Initialization runs once: compile it without LLVM optimizations (on a
    # CPU the vit-digits / gpt-pydoc inits compiled in 2.4 / 1.9 s instead of
    # 4.5 / 4.4 s).
    self.init_fn = jax.jit(self._init_state, out_shardings=self.state_shardings,
                           compiler_options=INIT_COMPILER_OPTIONS)
    self.step_fn = jax.jit(self._train_step,
                           in_shardings=(self.state_shardings, batch_shardings),
                           out_shardings=(self.state_shardings, self.replicated),
                           donate_argnums=(0,))

  # ------------------------------------------------------------ pure parts

  def _context(self):
    """Mesh + logical rules in scope while tracing model code."""
    return _Context(self.mesh)

  def _init_state(self, rng_data) -> TrainState:
    params = nn.unbox(self.task.init(rng_data, self.batch_spec)["params"])
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=self.tx.init(params),
                      rng=jax.random.fold_in(rng_data, 1))

  def _objective(self, params, batch, rng):
    """The task's loss plus its auxiliary losses, and flat metrics.

    A task's metric ``"aux_losses"`` (name -> scalar) is added to the loss
    here, once, and reported as ``aux_loss/<name>`` next to ``task_loss``;
    the returned loss is the total being minimized. Without it, the task's
    loss and metrics pass through untouched.
    """
    loss, metrics = self.task.loss(params, batch, rng, train=True)
    if "aux_losses" not in metrics:
      return loss, metrics
    metrics = dict(metrics)
    aux = metrics.pop("aux_losses")
    metrics["task_loss"] = loss
    for name in sorted(aux):
      value = jnp.asarray(aux[name], jnp.float32)
      if value.ndim:
        raise ValueError(f"aux_losses[{name!r}] from {type(self.task).__name__}.loss has shape "
                         f"{value.shape}; auxiliary losses must be scalars.")
      metrics[f"aux_loss/{name}"] = value
      loss = loss + value
    return loss, metrics

  def _grads(self, params, batch, rng):
    """Loss, metrics and float32 gradients, accumulated over microbatches."""
    grad_fn = jax.value_and_grad(self._objective, has_aux=True)
    m = self.config.train.microbatches
    if m == 1:
      (loss, metrics), grads = grad_fn(params, batch, rng)
      return loss, metrics, grads

    # Microbatch i takes rows i, i+m, ...: every microbatch spans all devices.
    def split(x):
      x = x.reshape((x.shape[0] // m, m) + x.shape[1:])
      return jnp.moveaxis(x, 1, 0)

    micro = jax.tree.map(split, batch)

    def body(carry, xs):
      i, mb = xs
      (loss, metrics), grads = grad_fn(params, mb, jax.random.fold_in(rng, i))
      acc = jax.tree.map(lambda a, g: a + g.astype(jnp.float32) / m, carry, grads)
      return acc, (loss, metrics)

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    grads, (losses, metrics) = jax.lax.scan(body, zeros, (jnp.arange(m), micro))
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
    # Mean over microbatches (axis 0): scalars, and the arrays of update_stats.
    return jnp.mean(losses), jax.tree.map(lambda x: jnp.mean(x, 0), metrics), grads

  def _train_step(self, state: TrainState, batch) -> tuple[TrainState, dict]:
    rng = jax.random.fold_in(state.rng, state.step)
    loss, task_metrics, grads = self._grads(state.params, batch, rng)
    task_metrics = dict(task_metrics)
    stats = task_metrics.pop("update_stats", None)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def apply(params, opt_state):
      updates, opt_state = self.tx.update(grads, opt_state, params)
      params = optax.apply_updates(params, updates)
      # The task's non-gradient update (EMA codebook or teacher), after the
      # optimizer's; skipped with it on a non-finite step.
      return self.task.post_update(params, stats, state.step), opt_state

    # A non-finite step leaves params and optimizer state untouched. A cond,
    # not a select of new vs old state: the select keeps the old donated state
    # alive next to the new, so XLA copies it instead of updating in place
    # (bench/nan_guard.py; BENCHMARKS.md "NaN guard").
    params, opt_state = jax.lax.cond(finite, apply, lambda p, o: (p, o),
                                     state.params, state.opt_state)
    new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                           rng=state.rng)
    metrics = {"train/loss": loss, "train/grad_norm": grad_norm,
               "train/learning_rate": self.schedule(state.step),
               "train/nonfinite": 1 - finite.astype(jnp.int32)}
    metrics.update({f"train/{k}": v for k, v in task_metrics.items()})
    return new_state, metrics

  # ------------------------------------------------------------ host parts

  def init_state(self) -> TrainState:
    rng = jax.random.key_data(jax.random.PRNGKey(self.config.train.seed)).astype(jnp.uint32)
    with self._context():
      return self.init_fn(rng)

  def step(self, state, batch):
    with self._context():
      return self.step_fn(state, batch)

  def compile(self):
    """AOT-compile the step for the configured mesh (no data, no devices used)."""
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=self.batch_sharding)
             for k, v in self.batch_spec.items()}
    with self._context():
      return self.step_fn.lower(self.abstract_state, batch).compile()

  def train_iterator(self, data_state: Optional[dict] = None):
    tc = self.config.train
    task = self.task
    it = data_lib.make_iterator(
        task.source(task.train_split), batch_size=tc.batch_size, seed=tc.seed,
        transform=lambda ex, rng: task.preprocess(ex, rng, True),
        process_index=jax.process_index(), process_count=jax.process_count(),
        worker_count=tc.data_workers)
    if data_state is not None:
      it.set_state(data_state)
    return it

  def eval_batches(self, split: str, batch_size: Optional[int] = None) -> Iterator[dict]:
    """Every example of ``split`` once, as global batches with a ``mask``."""
    batch_size = batch_size or self.config.train.batch_size
    shards = sharding_lib.batch_shards(self.mesh)
    batch_size = -(-batch_size // shards) * shards
    task = self.task
    for batch in data_lib.iterate_once(
        task.source(split), batch_size=batch_size,
        transform=lambda ex, rng: task.preprocess(ex, rng, False),
        process_index=jax.process_index(), process_count=jax.process_count()):
      yield data_lib.to_global(batch, self.batch_sharding)

  def evaluate(self, params, step: int) -> dict:
    ctx = EvalContext(batches=self.eval_batches, workdir=self.workdir, step=step, mesh=self.mesh)
    with self._context():
      metrics = self.task.evaluate(params, ctx)
    return {k: float(v) for k, v in metrics.items()}


class _Context:
  """``with``: the mesh (jax.set_mesh where it exists) + flax logical rules."""

  def __init__(self, mesh):
    self.mesh = mesh
    self._stack = []

  def __enter__(self):
    if hasattr(jax, "set_mesh"):
      cm = jax.set_mesh(self.mesh)
    else:  # older jax
      cm = self.mesh
    rules = nn.logical_axis_rules(sharding_lib.RULES)
    for c in (cm, rules):
      c.__enter__()
      self._stack.append(c)
    return self

  def __exit__(self, *exc):
    while self._stack:
      self._stack.pop().__exit__(*exc)
    return False

"""The train loop: one jitted, sharded, donated step; checkpoints; eval; logs.

    from datong.train import recipes, loop
    metrics = loop.train(recipes.get("gpt-pydoc"), workdir="runs/gpt")

Order of a run (resume order follows big_vision): mesh -> task -> sharding
plan -> restore-or-init state -> data iterator (restored position) -> steps.
The step is ``step(state, batch) -> (state, metrics)``, jitted once with
explicit in/out shardings and the state donated. Metrics of step ``t`` are
read on the host while step ``t + 1`` runs, so there is no host sync in the
step; a NaN/inf loss or gradient never reaches the state (the update is
skipped on device), so no checkpoint can hold it. The loss minimized is the
task's loss plus the ``aux_losses`` it reports (see ``Task.loss``).
"""

from __future__ import annotations

import dataclasses
import os
import queue
import signal
import threading
import time
from typing import Any, Callable, Iterator, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from datong.train import checkpoint as ckpt_lib
from datong.train import config as config_lib
from datong.train import data as data_lib
from datong.train import sharding as sharding_lib
from datong.train import writers
from datong.train.config import RunConfig
from datong.train.optim import make_optimizer
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


def maybe_initialize_distributed(coordinator: Optional[str] = None,
                                 num_processes: Optional[int] = None,
                                 process_id: Optional[int] = None) -> bool:
  """``jax.distributed.initialize`` when flags or the environment ask for it.

  Environment: ``DATONG_COORDINATOR`` (host:port), ``DATONG_NUM_PROCESSES``,
  ``DATONG_PROCESS_ID``; or ``DATONG_DISTRIBUTED=1`` to let JAX auto-detect
  (TPU pods, SLURM, Open MPI).
  """
  env = os.environ
  coordinator = coordinator or env.get("DATONG_COORDINATOR")
  if num_processes is None and env.get("DATONG_NUM_PROCESSES"):
    num_processes = int(env["DATONG_NUM_PROCESSES"])
  if process_id is None and env.get("DATONG_PROCESS_ID"):
    process_id = int(env["DATONG_PROCESS_ID"])
  if coordinator is None and env.get("DATONG_DISTRIBUTED") != "1":
    return False
  try:  # CPU collectives across processes need gloo; harmless elsewhere.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  except Exception:  # pylint: disable=broad-except
    pass
  jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                             process_id=process_id)
  return True


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
    self.tx, self.schedule = make_optimizer(
        config.optimizer, tc.steps,
        weight_decay_mask=self.task.weight_decay_mask(abstract_params),
        trainable=self.task.trainable(abstract_params),
        lr_scale=self.task.learning_rate_scale(abstract_params))
    opt_abstract = jax.eval_shape(self.tx.init, abstract_params)
    self.opt_plan = sharding_lib.plan_like_params(opt_abstract, self.params_plan, self.mesh)
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
    return jnp.mean(losses), jax.tree.map(jnp.mean, metrics), grads

  def _train_step(self, state: TrainState, batch) -> tuple[TrainState, dict]:
    rng = jax.random.fold_in(state.rng, state.step)
    loss, task_metrics, grads = self._grads(state.params, batch, rng)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def apply(params, opt_state):
      updates, opt_state = self.tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state

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
    shards = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
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


class _Prefetcher:
  """A host thread that reads, preprocesses and places batches ahead of the step."""

  def __init__(self, iterator, sharding, depth: int):
    self._iterator = iterator
    self._sharding = sharding
    self._queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)
    self._thread.start()

  def _run(self):
    try:
      while not self._stop.is_set():
        batch = next(self._iterator)
        state = self._iterator.get_state()  # position after this batch
        item = (data_lib.to_global(batch, self._sharding), state)
        while not self._stop.is_set():
          try:
            self._queue.put(item, timeout=0.1)
            break
          except queue.Full:
            continue
    except BaseException as e:  # pylint: disable=broad-except
      self._queue.put(e)

  def next(self):
    item = self._queue.get()
    if isinstance(item, BaseException):
      raise item
    return item

  def close(self):
    self._stop.set()
    self._thread.join(timeout=5)
    self._iterator.close()


class _Preemption:
  """SIGTERM / SIGINT set a flag; the loop saves a checkpoint and exits."""

  def __init__(self):
    self.requested = False
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    if self.requested and signum == signal.SIGINT:
      raise KeyboardInterrupt  # a second Ctrl-C really stops
    self.requested = True

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    return False


@dataclasses.dataclass
class RunResult:
  step: int
  metrics: dict  # the last logged train metrics and the last eval metrics
  preempted: bool = False


def train(config: RunConfig, workdir: str, *, progress: Optional[bool] = None,
          devices=None, stop_at: Optional[int] = None,
          on_step: Optional[Callable[[int, dict], None]] = None,
          evaluate: bool = True) -> RunResult:
  """Train (or resume) ``config`` in ``workdir``; returns the final metrics.

  ``stop_at`` stops after that many total steps (saving a checkpoint), as a
  preemption would; the run resumes from there when called again.
  ``on_step(step, metrics)`` is called at every logged step.
  ``evaluate=False`` skips the task's evaluation (periodic and final), e.g.
  for a quick look from a notebook.
  """
  tc = config.train
  trainer = Trainer(config, workdir, devices=devices)
  os.makedirs(workdir, exist_ok=True)
  config_json = config_lib.to_json(config)
  checkpointer = ckpt_lib.Checkpointer(workdir, keep=tc.keep_checkpoints)
  start = checkpointer.latest_step()
  if start is not None:
    state, data_state = checkpointer.restore(start, trainer.abstract_state)
  else:
    state, data_state, start = trainer.init_state(), None, 0
  writer = writers.MetricWriter(workdir, total_steps=tc.steps, start_step=start, progress=progress)
  writer.log(f"datong: {config.recipe or type(config.task).__name__} | mesh "
             f"{dict(trainer.mesh.shape)} | params {trainer.params_plan.report()} | "
             f"optimizer {trainer.opt_plan.report()} | "
             + (f"resumed at step {start}" if start else "fresh start"))
  iterator = trainer.train_iterator(data_state)
  prefetch = _Prefetcher(iterator, trainer.batch_sharding, tc.prefetch)
  end = tc.steps if stop_at is None else min(stop_at, tc.steps)
  last_train: dict = {}
  last_eval: dict = {}
  pending = None  # (step, metrics on device) of the previous step
  window_start, window_steps = time.perf_counter(), 0
  flops = trainer.task.flops_per_example()
  tokens = trainer.task.tokens_per_example()
  peak = peak_flops(jax.devices()[0])
  data_state = None
  preempted = False

  def save(step, wait=False):
    checkpointer.save(step, state, data_state, config_json, wait=wait)

  def drain(pending, now_logging: bool):
    """Read the previous step's metrics; act on non-finite values."""
    nonlocal last_train
    step, metrics = pending
    nonfinite = int(metrics["train/nonfinite"])
    if nonfinite and tc.on_nonfinite == "stop":
      good = checkpointer.latest_step()
      raise NonFiniteLossError(
          f"loss or gradient became NaN/inf at step {step} (loss={float(metrics['train/loss'])}); "
          f"the update was not applied and the last good checkpoint (step {good}) is intact. "
          "Lower optimizer.learning_rate, enable gradient clipping, or set "
          "train.on_nonfinite=skip to skip such steps.")
    if now_logging:
      last_train = {k: float(v) for k, v in metrics.items()}
    return nonfinite

  skipped = 0
  try:
    with _Preemption() as preemption:
      step = start
      while step < end:
        batch, data_state_next = prefetch.next()
        state, metrics = trainer.step(state, batch)
        data_state = data_state_next
        if pending is not None:
          skipped += drain(pending, now_logging=False)
        pending = (step + 1, metrics)
        step += 1
        window_steps += 1
        is_last = step == end
        if step % tc.log_every == 0 or is_last:
          metrics = jax.device_get(metrics)
          skipped += drain((step, metrics), now_logging=True)
          pending = None
          elapsed = time.perf_counter() - window_start
          rate = window_steps * tc.batch_size / max(elapsed, 1e-9)
          last_train["train/examples_per_sec"] = rate
          if tokens:
            last_train["train/tokens_per_sec"] = rate * tokens
          if flops and peak:
            last_train["train/mfu"] = rate * flops / (peak * jax.device_count())
          if skipped:
            last_train["train/skipped_steps"] = skipped
          last_train.pop("train/nonfinite", None)
          writer.write(step, last_train)
          writer.progress(step, last_train)
          window_start, window_steps = time.perf_counter(), 0
          if on_step is not None:
            on_step(step, last_train)
        if tc.checkpoint_every and step % tc.checkpoint_every == 0 and not is_last:
          save(step)
        if evaluate and tc.eval_every and step % tc.eval_every == 0 and not is_last:
          last_eval = trainer.evaluate(state.params, step)
          writer.write(step, last_eval)
          writer.log(f"step {step}: " + ", ".join(f"{k}={v:.4f}" for k, v in last_eval.items()))
          window_start, window_steps = time.perf_counter(), 0
        if preemption.requested:
          preempted = True
          break
      if pending is not None:
        drain((pending[0], jax.device_get(pending[1])), now_logging=False)
      save(step, wait=True)
      if preempted or step < tc.steps:
        writer.log(f"stopped at step {step}: checkpoint saved in {checkpointer.directory}; "
                   "run the same command again to resume.")
      else:
        if evaluate:
          last_eval = trainer.evaluate(state.params, step)
          writer.write(step, last_eval)
        writer.log(f"done at step {step}: " + ", ".join(f"{k}={v:.4f}" for k, v in
                                                          {**last_train, **last_eval}.items()
                                                          if k.startswith(("eval/", "train/loss"))))
        writers.plot_metrics(workdir)
  finally:
    prefetch.close()
    checkpointer.close()
    writer.close()
  return RunResult(step=step, metrics={**last_train, **last_eval}, preempted=preempted)

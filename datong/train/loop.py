"""The train loop: drives the step (``trainer.Trainer``); checkpoints; eval; logs.

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

import contextlib
import dataclasses
import os
import queue
import signal
import threading
import time
from typing import Callable, Optional

import jax

from datong.train import checkpoint as ckpt_lib
from datong.train import config as config_lib
from datong.train import data as data_lib
from datong.train import workdir as workdir_lib
from datong.train import writers
from datong.train.config import RunConfig
from datong.train import optim
from datong.train.trainer import NonFiniteLossError, Trainer, peak_flops


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


class _Interrupted(Exception):
  """SIGINT / SIGTERM while the final evaluation runs."""


class _Preemption:
  """SIGTERM / SIGINT set a flag; the loop saves a checkpoint and exits.

  ``at_once``: they raise ``_Interrupted`` instead (the final evaluation has
  no step boundary to stop at; its checkpoint is already saved).
  """

  def __init__(self, at_once: bool = False):
    self.requested = False
    self.at_once = at_once
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    if self.at_once:
      raise _Interrupted()
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
  preempted: bool = False  # stopped before train.steps (signal, stop_at): resumable


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

  The workdir is locked for the run (``workdir.Lock``). A resume compares
  its settings with the checkpoint's (``workdir.compare_settings``): changes
  to the model or data are refused, others are logged with what they mean.
  A finished run (``done.json``) is not run again.
  """
  workdir_lib.prepare(workdir)
  with workdir_lib.Lock(workdir, jax.process_index()):
    return _train(config, workdir, progress=progress, devices=devices, stop_at=stop_at,
                  on_step=on_step, evaluate=evaluate)


def _resume_notes(checkpointer, start: int, config: RunConfig, workdir: str) -> list[str]:
  """Check a resume's settings against the checkpoint's; the log lines to print."""
  tc = config.train
  if start > tc.steps:
    raise ckpt_lib.CheckpointError(
        f"The checkpoint in {checkpointer.directory} is at step {start}, past "
        f"train.steps={tc.steps}: there is nothing to train. Set train.steps above {start} to "
        f"train longer, or start a fresh --workdir (task.pretrained={workdir} starts from "
        "these weights).")
  stored = checkpointer.run_config(start)
  if stored is None:
    return []
  diff = workdir_lib.compare_settings(stored, config)
  if diff.refused:
    raise ckpt_lib.CheckpointError(
        f"The run in {workdir} (checkpoint step {start}) was started with other settings that "
        f"change the model or its data: {'; '.join(diff.refused)}. Resume with the original "
        "settings (they are stored with the checkpoint), or use a fresh --workdir (with "
        f"task.pretrained={workdir} to start from these weights where the task has it).")
  notes = [f"resuming with changed settings: {c}" for c in diff.allowed]
  if diff.schedule_changed:
    try:  # the stored optimizer and step count alone: the task's class may not import
      before = float(optim.schedule(config_lib.from_json(stored["optimizer"]),
                                    int(stored["train"]["steps"]))(start))
    except Exception:  # pylint: disable=broad-except
      before = None
    after = float(optim.schedule(config.optimizer, tc.steps)(start))
    jump = f"from {before:.4g} to {after:.4g}" if before is not None else f"to {after:.4g}"
    notes.append(f"the learning-rate schedule is rebuilt for {tc.steps} steps from the new "
                 f"settings: at step {start} the learning rate goes {jump}.")
  return notes


def _train(config: RunConfig, workdir: str, *, progress, devices, stop_at, on_step,
           evaluate) -> RunResult:
  tc = config.train
  trainer = Trainer(config, workdir, devices=devices)
  config_json = config_lib.to_json(config)
  checkpointer = ckpt_lib.Checkpointer(workdir, keep=tc.keep_checkpoints)
  start = checkpointer.latest_step()
  notes = []
  if start is not None:
    notes = _resume_notes(checkpointer, start, config, workdir)
    done = workdir_lib.read_done(workdir)
    if done is not None and done.get("step") == start == tc.steps:
      checkpointer.close()
      if jax.process_index() == 0:
        print(f"{workdir}: this run already finished at step {start}; nothing to do. Set "
              f"train.steps above {start} to train longer.", flush=True)
      return RunResult(step=start, metrics=done.get("metrics", {}))
    state, data_state = checkpointer.restore(start, trainer.abstract_state)
    dropped = writers.truncate_metrics(workdir, after_step=start)
    if dropped:
      notes.append(f"{dropped} metrics rows of steps after {start} (lost with the process that "
                   "wrote them) were removed from metrics.jsonl; they are logged again.")
  else:
    state, data_state, start = trainer.init_state(), None, 0
  workdir_lib.clear_done(workdir)
  writer = writers.MetricWriter(workdir, total_steps=tc.steps, start_step=start, progress=progress)
  writer.log(f"datong: {config.recipe or type(config.task).__name__} | mesh "
             f"{dict(trainer.mesh.shape)} | params {trainer.params_plan.report()} | "
             f"optimizer {trainer.opt_plan.report()} | "
             + (f"resumed at step {start}" if start else "fresh start"))
  for note in notes:
    writer.log(note)
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
  skips = {"total": 0, "in_a_row": 0}

  def save(step, wait=False):
    checkpointer.save(step, state, data_state, config_json, wait=wait)

  def drain(pending, now_logging: bool):
    """Read the previous step's metrics; act on non-finite values."""
    nonlocal last_train
    step, metrics = pending
    nonfinite = int(metrics["train/nonfinite"])
    if nonfinite:
      skips["total"] += 1
      skips["in_a_row"] += 1
      good = checkpointer.latest_step()
      kept = (f"the last good checkpoint (step {good}) is intact" if good is not None else
              "no checkpoint was written yet, so a rerun starts over")
      loss = float(metrics["train/loss"])
      if tc.on_nonfinite == "stop":
        raise NonFiniteLossError(
            f"loss or gradient became NaN/inf at step {step} (loss={loss}); the update was not "
            f"applied and {kept}. Lower optimizer.learning_rate, enable gradient clipping "
            "(optimizer.grad_clip_norm), or set train.on_nonfinite=skip to skip such steps.")
      ran = step - start
      if (skips["in_a_row"] >= tc.max_consecutive_skips or
          (skips["total"] >= tc.max_consecutive_skips and
           skips["total"] > tc.max_skip_fraction * ran)):
        raise NonFiniteLossError(
            f"{skips['total']} of the {ran} steps run since step {start} had a NaN/inf loss or "
            f"gradient ({skips['in_a_row']} in a row, up to step {step}) and were skipped: past "
            f"train.max_consecutive_skips={tc.max_consecutive_skips} / train.max_skip_fraction="
            f"{tc.max_skip_fraction}, so the run stops; {kept}. Lower "
            "optimizer.learning_rate or look for bad examples in the data.")
    else:
      skips["in_a_row"] = 0
    if now_logging:
      last_train = {k: float(v) for k, v in metrics.items()}
    return nonfinite

  quiet = contextlib.ExitStack()
  quiet.enter_context(checkpointer.noise)
  try:
    with _Preemption() as preemption:
      step = start
      while step < end:
        batch, data_state_next = prefetch.next()
        state, metrics = trainer.step(state, batch)
        data_state = data_state_next
        if pending is not None:
          drain(pending, now_logging=False)
        pending = (step + 1, metrics)
        step += 1
        window_steps += 1
        is_last = step == end
        if step % tc.log_every == 0 or is_last:
          metrics = jax.device_get(metrics)
          drain((step, metrics), now_logging=True)
          pending = None
          elapsed = time.perf_counter() - window_start
          rate = window_steps * tc.batch_size / max(elapsed, 1e-9)
          last_train["train/examples_per_sec"] = rate
          if tokens:
            last_train["train/tokens_per_sec"] = rate * tokens
          if flops and peak:
            last_train["train/mfu"] = rate * flops / (peak * jax.device_count())
          if skips["total"]:
            last_train["train/skipped_steps"] = skips["total"]
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
      preempted = True
      writer.log(f"stopped at step {step}: checkpoint saved in {checkpointer.directory}; "
                 "run the same command again to resume.")
    else:
      try:
        with _Preemption(at_once=True):
          if evaluate:
            last_eval = trainer.evaluate(state.params, step)
            writer.write(step, last_eval)
          writer.log(f"done at step {step}: " + ", ".join(
              f"{k}={v:.4f}" for k, v in {**last_train, **last_eval}.items()
              if k.startswith(("eval/", "train/loss"))))
          writers.plot_metrics(workdir)
          if jax.process_index() == 0:
            workdir_lib.write_done(workdir, step, {**last_train, **last_eval})
      except _Interrupted:
        preempted = True
        writer.log(f"interrupted during the final evaluation at step {step}: the checkpoint is "
                   f"saved in {checkpointer.directory}; run the same command again to evaluate.")
  finally:
    prefetch.close()
    try:
      checkpointer.close()
    finally:
      writer.close()
      quiet.close()
  return RunResult(step=step, metrics={**last_train, **last_eval}, preempted=preempted)

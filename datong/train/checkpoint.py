"""Checkpoints: orbax ``CheckpointManager`` saving state + data + config together.

Layout: ``WORKDIR/checkpoints/<step>/{state,data,config}``. Saves are async;
restore always goes into the target shardings (so a run may resume on a
different mesh, and ``load_params`` reads a run written on any device count).
Every array's fingerprint (``fingerprints``: two 32-bit sums over its bits,
computed on device where the array lives) is stored in ``config`` with the
checkpoint and checked after every restore, so a damaged file never comes
back as a silently wrong weight. A checkpoint that cannot be read, fails that
check, or was written by an incompatible run raises ``CheckpointError``
naming the step and the fix: never a silent restart from scratch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import threading
import traceback
from typing import Any, Optional

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
  """A checkpoint exists but cannot be used."""


def layout(abstract_state) -> dict[str, str]:
  """``{path: "float32[64, 128]"}`` of a state: what must match to restore it."""
  flat = jax.tree_util.tree_flatten_with_path(abstract_state)[0]
  return {jax.tree_util.keystr(path): f"{leaf.dtype}{list(leaf.shape)}" for path, leaf in flat}


def path_name(path) -> str:
  """``"params/backbone/layer_0/mlp/wi/kernel"``: a tree path by its names,
  the same for a ``TrainState`` and the plain dict orbax restores it as."""
  parts = []
  for key in path:
    for attr in ("name", "key", "idx"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
  return "/".join(parts)


def _as_uint32(x: jax.Array) -> jax.Array:
  """The bits of ``x`` as uint32 (sub-word types widened, 64-bit split)."""
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  size = jnp.dtype(x.dtype).itemsize
  if size == 4:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)
  if size in (1, 2):
    return jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16}[size]).astype(jnp.uint32)
  return jax.lax.bitcast_convert_type(x, jnp.uint32)  # 8 bytes -> [..., 2]


def _mix(h: jax.Array) -> jax.Array:
  """A 32-bit avalanche (murmur3's finalizer): every input bit moves every output bit."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def _fingerprint(x: jax.Array) -> jax.Array:
  """uint32[2] of one array. Sums of uint32 wrap exactly, so the result is the
  same on every mesh and sharding. The first sum, ``sum(bits * (2i + 1))``,
  changes for every change of one byte (an odd multiplier times a nonzero
  byte difference is nonzero mod 2^32); the second, over mixed bits and
  positions, makes a block of damage cancelling in both unlikely (~2^-64)."""
  bits = _as_uint32(x)
  index = jnp.zeros(bits.shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(bits.ndim)):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, bits.shape, axis) * jnp.uint32(stride)
    stride = (stride * bits.shape[axis]) % 2**32
  linear = jnp.sum(bits * (index * jnp.uint32(2) + jnp.uint32(1)), dtype=jnp.uint32)
  mixed = jnp.sum(_mix(bits ^ _mix(index + jnp.uint32(0x9E3779B9))), dtype=jnp.uint32)
  return jnp.stack([linear, mixed])


@jax.jit
def _fingerprints(tree):
  return jax.tree.map(_fingerprint, tree)


def fingerprints(tree) -> dict[str, str]:
  """``{path_name: "0123abcd:89ef0123"}`` of every array in ``tree``, computed
  where the arrays live (no gather to the host)."""
  flat = jax.tree_util.tree_flatten_with_path(jax.device_get(_fingerprints(tree)))[0]
  return {path_name(path): f"{int(v[0]):08x}:{int(v[1]):08x}" for path, v in flat}


def check_fingerprints(tree, stored: Optional[dict], where: str, *, older: str = "") -> None:
  """Raise ``CheckpointError`` when an array of ``tree`` differs from the
  fingerprint stored with it (checkpoints written before fingerprints
  existed, ``stored=None``, are not checked)."""
  if not stored:
    return
  now = fingerprints(tree)
  damaged = sorted(k for k, v in now.items() if k in stored and stored[k] != v)
  if damaged:
    raise CheckpointError(
        f"The checkpoint at {where} is damaged: {len(damaged)} array(s) read back differ from "
        f"what was written ({', '.join(damaged[:5])}{', ...' if len(damaged) > 5 else ''}). "
        f"The files were changed after saving (disk or copy error). Delete {where} to resume "
        f"from {older or 'an older checkpoint'}, or use a fresh --workdir.")


def _unreadable(where: str, error: BaseException, older: str) -> CheckpointError:
  """A checkpoint whose files cannot be decoded: the cause in one line."""
  cause = str(error).strip().splitlines()[0] if str(error).strip() else ""
  cause = f"{type(error).__name__}: {cause[:300]}{'...' if len(cause) > 300 else ''}"
  return CheckpointError(
      f"The checkpoint at {where} is unreadable ({cause}): damaged or partially written. "
      f"Delete {where} to resume from {older or 'an older checkpoint'}, or use a fresh "
      "--workdir; Datong will not start from scratch over it.")


def _digest(value) -> str:
  """sha256 of a JSON value's canonical text."""
  return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def _check_metadata(config: dict, data_state: dict, where: str) -> None:
  """The config item's own digest and the data state's, when stored."""
  body = {k: v for k, v in config.items() if k != "sha256"}
  damaged = []
  if "sha256" in config and config["sha256"] != _digest(body):
    damaged.append("config")
  if "data_sha256" in config and config["data_sha256"] != _digest(data_state):
    damaged.append("data")
  if damaged:
    raise CheckpointError(
        f"The checkpoint at {where} is damaged: its {' and '.join(damaged)} file(s) differ from "
        f"what was written. Delete {where} to resume from an older checkpoint, or use a "
        "fresh --workdir.")


class _WriterNoise:
  """While a run holds its checkpointer: the error reports of orbax's writer
  threads (one per array, tensorstore and asyncio tracebacks: hundreds of
  lines when a disk fills up) go to ``checkpoints/errors.log``, and the
  console gets one line pointing there. The failure itself is raised by
  ``Checkpointer.save``/``close`` with its cause and what to do."""

  _MARKS = ("orbax", "asyncio", "tensorstore")

  def __init__(self, path: str):
    self.path = path
    self._told = False
    self._lock = threading.Lock()

  def _write(self, text: str):
    with self._lock:
      try:
        with open(self.path, "a", encoding="utf-8") as f:
          f.write(text.rstrip() + "\n")
        where = f"details in {self.path}"
      except OSError as e:  # the disk that failed the checkpoint may be this one
        where = f"details not kept ({e.strerror})"
      if not self._told:
        self._told = True
        first = text.strip().splitlines()[-1][:300] if text.strip() else ""
        print(f"datong: the checkpoint writer reported an error ({where}): {first}",
              file=sys.stderr, flush=True)

  def filter(self, record: logging.LogRecord) -> bool:  # logging.Filter protocol
    if record.levelno < logging.ERROR:
      return True
    if record.name == "asyncio" or any(m in record.pathname for m in self._MARKS):
      text = record.getMessage()
      if record.exc_info:
        text += "\n" + "".join(traceback.format_exception(*record.exc_info))
      self._write(text)
      return False
    return True

  def _ours(self, exc_type, exc, tb) -> bool:
    text = "".join(traceback.format_exception(exc_type, exc, tb))
    if any(m in text for m in self._MARKS):
      self._write(text)
      return True
    return False

  def __enter__(self):
    for name in ("absl", "asyncio"):
      logging.getLogger(name).addFilter(self)
    self._hooks = (sys.excepthook, sys.unraisablehook, threading.excepthook)
    previous_except, previous_unraisable, previous_thread = self._hooks
    sys.excepthook = lambda t, e, tb: self._ours(t, e, tb) or previous_except(t, e, tb)
    sys.unraisablehook = lambda u: (self._ours(u.exc_type, u.exc_value, u.exc_traceback)
                                    or previous_unraisable(u))
    threading.excepthook = lambda a: (self._ours(a.exc_type, a.exc_value, a.exc_traceback)
                                      or previous_thread(a))
    return self

  def __exit__(self, *exc):
    for name in ("absl", "asyncio"):
      logging.getLogger(name).removeFilter(self)
    sys.excepthook, sys.unraisablehook, threading.excepthook = self._hooks
    return False


class Checkpointer:
  """Thin wrapper over ``ocp.CheckpointManager`` with clear errors."""

  def __init__(self, workdir: str, *, keep: Optional[int] = 2):
    if keep is not None and keep < 1:
      raise ValueError(f"keep={keep}: at least the latest checkpoint must be kept "
                       "(None keeps every one).")
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
        item_names=("state", "data", "config"))
    self._in_flight: Optional[int] = None  # the step of an async save not yet confirmed
    self.noise = _WriterNoise(os.path.join(self.directory, "errors.log"))

  def _finish(self, now: int):
    """Wait for the save in flight; a failure raises ``CheckpointError`` with
    its cause, the step that failed and the checkpoint that survives."""
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      failed, self._in_flight = (self._in_flight if self._in_flight is not None else now), None
      raise self._write_error(failed, e) from e
    self._in_flight = None

  def _write_error(self, step: int, error: BaseException) -> "CheckpointError":
    text = f"{type(error).__name__}: {error}"
    full = "No space left on device" in text or "os_error_code='28'" in text or (
        isinstance(error, OSError) and error.errno == 28)
    what = "the disk is full (No space left on device)" if full else text[:500]
    good = [s for s in self.manager.all_steps() if s != step]
    kept = (f"The previous checkpoint (step {max(good)}) is intact: free space, then run the "
            "same command again to resume from it." if good else
            "No earlier checkpoint exists; fix the cause and run again (it starts over).")
    details = (f" (Writer details: {self.noise.path}.)" if os.path.exists(self.noise.path)
               else "")
    return CheckpointError(f"Writing the checkpoint of step {step} to {self.directory} failed: "
                           f"{what}. {kept}{details}")

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, step: int, state, data_state: dict, config_json: dict, *, wait: bool = False):
    """Async save; ``wait`` blocks until it is on disk.

    ``config_json`` is stored with the state's layout (shapes and dtypes),
    which ``restore`` checks before reading any array, and every array's
    fingerprint, which it checks after.
    """
    self._finish(step)
    if step in self.manager.all_steps():
      return
    config_json = {"run": config_json, "layout": layout(state),
                   "fingerprints": fingerprints(state), "data_sha256": _digest(data_state)}
    config_json["sha256"] = _digest(config_json)
    try:
      saved = self.manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state),
          data=ocp.args.JsonSave(data_state),
          config=ocp.args.JsonSave(config_json)), force=True)
    except Exception as e:  # pylint: disable=broad-except
      raise self._write_error(step, e) from e
    if not saved:
      raise CheckpointError(f"orbax refused to save step {step} in {self.directory}.")
    self._in_flight = step
    if wait:
      self._finish(step)

  def restore(self, step: int, abstract_state) -> tuple[Any, dict]:
    """Restore ``step`` into ``abstract_state`` (ShapeDtypeStructs with shardings).

    Returns the state and the saved data-iterator state.
    """
    where = os.path.join(self.directory, str(step))
    try:
      meta = self.manager.restore(step, args=ocp.args.Composite(
          config=ocp.args.JsonRestore(), data=ocp.args.JsonRestore()))
    except Exception as e:  # pylint: disable=broad-except
      raise _unreadable(where, e, self._older(step)) from e
    _check_metadata(meta["config"], meta["data"], where)
    saved = meta["config"].get("layout", {})
    wanted = layout(abstract_state)
    if saved != wanted:
      diffs = [f"{k}: checkpoint {saved.get(k, 'absent')}, this run {wanted.get(k, 'absent')}"
               for k in sorted(set(saved) | set(wanted)) if saved.get(k) != wanted.get(k)]
      raise CheckpointError(
          f"The checkpoint at {where} was written by an incompatible run ({len(diffs)} "
          f"arrays differ, e.g. {'; '.join(diffs[:4])}). Resume with the original model "
          "settings, or use a fresh --workdir.")
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state)))
    except Exception as e:  # pylint: disable=broad-except
      raise _unreadable(where, e, self._older(step)) from e
    check_fingerprints(restored["state"], meta["config"].get("fingerprints"), where,
                       older=self._older(step))
    return restored["state"], meta["data"]

  def _older(self, step: int) -> str:
    older = [s for s in self.manager.all_steps() if s < step]
    return f"step {max(older)}" if older else ""

  def run_config(self, step: int) -> Optional[dict]:
    """The run config (JSON) stored with ``step``, or None if unreadable."""
    try:
      meta = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    except Exception:  # pylint: disable=broad-except
      return None
    return meta["config"].get("run")

  def wait(self):
    self._finish(-1)

  def close(self):
    try:
      self._finish(-1)
    finally:
      self.manager.close()


def stored_run_config(workdir: str) -> Optional[dict]:
  """The run config (JSON) stored with a run's latest checkpoint; None when
  the workdir has no readable checkpoint with settings in it."""
  ck = Checkpointer(workdir, keep=None)
  try:
    step = ck.manager.latest_step()
    return ck.run_config(step) if step is not None else None
  finally:
    ck.manager.close()


def load_params(workdir: str, step: Optional[int] = None):
  """The ``params`` of a run's checkpoint as host numpy arrays (for fine-tuning).

  Reads only the parameters (not the optimizer state), onto this process's
  first device whatever mesh wrote them, and checks their fingerprints.
  """
  directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
  if not os.path.isdir(directory):
    raise CheckpointError(f"No checkpoint found in {directory}.")
  manager = ocp.CheckpointManager(directory, item_names=("state", "data", "config"),
                                  options=ocp.CheckpointManagerOptions(read_only=True))
  try:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"No checkpoint found in {directory}.")
    where = os.path.join(directory, str(step))
    try:
      saved = ocp.StandardCheckpointer().metadata(os.path.join(where, "state"))
      tree = getattr(saved, "item_metadata", saved)
      device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
      target = {"params": jax.tree.map(
          lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
          dict(tree["params"]))}
      restore_args = jax.tree.map(lambda t: ocp.ArrayRestoreArgs(
          sharding=t.sharding, global_shape=t.shape, dtype=t.dtype), target)
      restored = manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.PyTreeRestore(item=target, restore_args=restore_args,
                                       partial_restore=True),
          config=ocp.args.JsonRestore()))
    except Exception as e:  # pylint: disable=broad-except
      raise _unreadable(where, e, "") from e
    stored = restored["config"].get("fingerprints")
    stored = {k: v for k, v in (stored or {}).items() if k.startswith("params/")}
    check_fingerprints(restored["state"], stored, where)
  finally:
    manager.close()
  return jax.device_get(restored["state"]["params"])

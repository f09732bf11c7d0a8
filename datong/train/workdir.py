"""A run's workdir: one run at a time, settings kept across resumes, done once.

``lock(workdir)`` takes an exclusive ``flock`` on ``WORKDIR/.lock`` for the
whole run (the kernel drops it when the process dies, so a lock left by a
killed run is never stale); a second run on the same workdir is refused
with the first one's pid, host and command. ``compare_settings`` splits the
differences between the settings stored with a checkpoint and a resuming
run's into refused ones (anything that changes the model or its data) and
allowed ones, each with what it means. ``done.json`` marks a finished run
(final evaluation written), so running it again does nothing.
"""

from __future__ import annotations

import dataclasses
import datetime
import errno
import fcntl
import json
import os
import socket
import sys
from typing import Any, Optional

from datong.train import config as config_lib
from datong.train import writers


class WorkdirError(ValueError):
  """The workdir cannot be used (a file, not writable, or busy)."""


def prepare(workdir: str) -> str:
  """Create ``workdir`` if needed and check that it is a writable directory."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise WorkdirError(f"--workdir {workdir} is a file, not a directory. Give a directory path "
                       "(it is created if missing).")
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise WorkdirError(f"Cannot create --workdir {workdir}: {e.strerror}. Choose a path you "
                       "can write to.") from None
  if not os.access(workdir, os.W_OK | os.X_OK):
    raise WorkdirError(f"--workdir {workdir} is not writable by this user. Fix its permissions "
                       "or choose another directory.")
  return workdir


class Lock:
  """``with Lock(workdir):`` one run per workdir (per process index)."""

  def __init__(self, workdir: str, process_index: int = 0):
    name = ".lock" if process_index == 0 else f".lock.{process_index}"
    self.path = os.path.join(workdir, name)
    self._fd: Optional[int] = None

  def __enter__(self):
    try:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
      raise WorkdirError(f"Cannot create the lock file {self.path}: {e.strerror}. Choose a "
                         "workdir you can write to.") from None
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
        os.close(fd)  # no flock on this filesystem: fall back to the pid in the file
        self._check_pid()
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      else:
        holder = _read_holder(self.path)
        os.close(fd)
        raise WorkdirError(
            f"{os.path.dirname(self.path)} is in use by another Datong run ({_describe(holder)})"
            ". Two runs in one workdir would overwrite each other's checkpoints: wait for it to "
            "finish or stop it (it saves a checkpoint on SIGTERM), or use another --workdir.")
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({
        "pid": os.getpid(), "host": socket.gethostname(),
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join(sys.argv)}).encode())
    os.fsync(fd)
    self._fd = fd
    return self

  def _check_pid(self):
    holder = _read_holder(self.path)
    pid = holder.get("pid")
    if pid and pid != os.getpid() and holder.get("host") == socket.gethostname():
      try:
        os.kill(pid, 0)
      except ProcessLookupError:
        return  # a stale lock of a dead process: take it over
      except PermissionError:
        pass
      raise WorkdirError(f"{os.path.dirname(self.path)} is in use by another Datong run "
                         f"({_describe(holder)}); wait for it, or use another --workdir.")

  def __exit__(self, *exc):
    if self._fd is not None:
      # The file stays: unlinking it would let a waiting opener lock a dead inode.
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None
    return False


def _read_holder(path: str) -> dict:
  try:
    with open(path, encoding="utf-8") as f:
      return json.loads(f.read() or "{}")
  except (OSError, ValueError):
    return {}


def _describe(holder: dict) -> str:
  if not holder:
    return "holder unknown"
  return (f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}: "
          f"{holder.get('command', '?')}")


# ------------------------------------------------------------ settings

# Task fields that only change evaluation or outputs: a resume may change them.
EVAL_ONLY = ("eval_split", "eval_batch_size", "eval_stride", "eval_seed", "retrieval_ks",
             "png_examples", "export_encoder", "tta_shift", "class_names", "templates")
# Where a fresh run takes its initial weights from: a resume restores its own.
INIT_ONLY = ("pretrained", "image_init", "init")
# Run settings a resume may change: how long, how often, where, how.
TRAIN_FREE = ("steps", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints",
              "on_nonfinite", "max_consecutive_skips", "max_skip_fraction", "data_workers",
              "prefetch", "microbatches")


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(_flat(v, f"{prefix}{k}."))
    return out
  return {prefix[:-1]: tree}


def _canonical(config_json: dict) -> dict:
  """Stored JSON through the current classes (defaults filled, moved classes
  renamed), so a checkpoint of an older commit compares field by field."""
  return config_lib.to_json(config_lib.from_json(config_json))


def _unwrapped(run_json: dict) -> dict:
  """A ``WarmStartConfig`` task compared as the task it wraps (+ ``task.init``):
  adding or dropping ``init=`` on a resume changes nothing a resume uses."""
  task = run_json.get("task")
  if isinstance(task, dict) and str(task.get("__type__", "")).endswith(".WarmStartConfig"):
    inner = dict(task.get("task") or {})
    inner["init"] = task.get("init", "")
    return {**run_json, "task": inner}
  return run_json


@dataclasses.dataclass
class SettingsDiff:
  refused: list[str]  # "name: old -> new"
  allowed: list[str]  # "name: old -> new (what it means)"
  schedule_changed: bool


def compare_settings(stored_json: dict, config) -> SettingsDiff:
  """How ``config`` differs from the run config stored with a checkpoint."""
  try:
    old = _canonical(stored_json)
  except Exception:  # pylint: disable=broad-except  (class gone: compare as stored)
    old = stored_json
  old, new = _flat(_unwrapped(old)), _flat(_unwrapped(config_lib.to_json(config)))
  refused, allowed, schedule = [], [], False
  for name in sorted(set(old) | set(new)):
    if old.get(name) == new.get(name):
      continue
    change = f"{name}: {old.get(name, '(absent)')!r} -> {new.get(name, '(absent)')!r}"
    leaf = name.rsplit(".", 1)[-1]
    if name == "recipe" or name.startswith("mesh."):
      allowed.append(change)
    elif name.startswith("optimizer."):
      allowed.append(change)
      schedule = True
    elif name.startswith("train."):
      if leaf not in TRAIN_FREE:
        refused.append(change + " (changes the data order)")
      else:
        allowed.append(change)
        schedule = schedule or leaf == "steps"
    elif name.startswith("task.") and leaf in INIT_ONLY:
      allowed.append(change + " (ignored: a resumed run restores its own checkpoint)")
    elif name.startswith("task.") and (leaf in EVAL_ONLY or ".probe." in name):
      allowed.append(change + " (evaluation only)")
    else:
      refused.append(change)
  return SettingsDiff(refused, allowed, schedule)


# ------------------------------------------------------------ done marker

def done_path(workdir: str) -> str:
  return os.path.join(workdir, "done.json")


def read_done(workdir: str) -> Optional[dict]:
  try:
    with open(done_path(workdir), encoding="utf-8") as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def write_done(workdir: str, step: int, metrics: dict) -> None:
  tmp = done_path(workdir) + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump({"step": step, "metrics": writers.json_safe(metrics)}, f, allow_nan=False)
  os.replace(tmp, done_path(workdir))


def clear_done(workdir: str) -> None:
  if os.path.exists(done_path(workdir)):
    os.remove(done_path(workdir))

"""Checkpoints: orbax ``CheckpointManager`` saving state + data + config together.

Layout: ``WORKDIR/checkpoints/<step>/{state,data,config}``. Saves are async;
restore always goes into the target shardings (so a run may resume on a
different mesh). A checkpoint that cannot be read, or that was written by an
incompatible run, raises ``CheckpointError`` naming the directory and the
fix: never a silent restart from scratch.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
  """A checkpoint exists but cannot be used."""


def layout(abstract_state) -> dict[str, str]:
  """``{path: "float32[64, 128]"}`` of a state: what must match to restore it."""
  flat = jax.tree_util.tree_flatten_with_path(abstract_state)[0]
  return {jax.tree_util.keystr(path): f"{leaf.dtype}{list(leaf.shape)}" for path, leaf in flat}


class Checkpointer:
  """Thin wrapper over ``ocp.CheckpointManager`` with clear errors."""

  def __init__(self, workdir: str, *, keep: int = 2):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
        item_names=("state", "data", "config"))

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, step: int, state, data_state: dict, config_json: dict, *, wait: bool = False):
    """Async save; ``wait`` blocks until it is on disk.

    ``config_json`` is stored with the state's layout (shapes and dtypes),
    which ``restore`` checks before reading any array.
    """
    config_json = {"run": config_json, "layout": layout(state)}
    if step in self.manager.all_steps():
      self.manager.wait_until_finished()
      return
    saved = self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(data_state),
        config=ocp.args.JsonSave(config_json)), force=True)
    if not saved:
      raise CheckpointError(f"orbax refused to save step {step} in {self.directory}.")
    if wait:
      self.manager.wait_until_finished()

  def restore(self, step: int, abstract_state) -> tuple[Any, dict]:
    """Restore ``step`` into ``abstract_state`` (ShapeDtypeStructs with shardings).

    Returns the state and the saved data-iterator state.
    """
    where = os.path.join(self.directory, str(step))
    try:
      meta = self.manager.restore(step, args=ocp.args.Composite(
          config=ocp.args.JsonRestore(), data=ocp.args.JsonRestore()))
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(
          f"The checkpoint at {where} is unreadable ({type(e).__name__}: {e}). It may be "
          "corrupt or partially written. Delete that step directory to resume from an older "
          "one, or use a fresh --workdir; refusing to start from scratch over it.") from e
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
      raise CheckpointError(
          f"Cannot restore the train state from {where} ({type(e).__name__}: {e}). It may "
          "be corrupt or written by a different model; delete that step directory or use "
          "a fresh --workdir.") from e
    return restored["state"], meta["data"]

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def load_params(workdir: str, step: Optional[int] = None):
  """The ``params`` of a run's checkpoint as host numpy arrays (for fine-tuning).

  Restores without target shardings, so it works on any machine.
  """
  directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
  manager = ocp.CheckpointManager(directory, item_names=("state", "data", "config"),
                                  options=ocp.CheckpointManagerOptions(read_only=True))
  step = manager.latest_step() if step is None else step
  if step is None:
    raise CheckpointError(f"No checkpoint found in {directory}.")
  try:
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(f"Cannot read the checkpoint at {directory}/{step} "
                          f"({type(e).__name__}: {e}).") from e
  manager.close()
  return jax.device_get(restored["state"]["params"])

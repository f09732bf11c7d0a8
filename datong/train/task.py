"""What an objective gives the engine: the ``Task`` contract.

The engine (``datong.train.loop``) knows nothing of text, pixels or captions.
An objective subclasses ``Task`` in its family's module under
``datong.train.tasks`` (``text``, ``vision``, ``clip``) and the engine:

1. builds data sources with ``source(split)`` and maps ``preprocess`` over
   every example (numpy, on the host, deterministic per example);
2. initializes ``{"params": ...}`` with ``init`` under ``jax.eval_shape`` to
   read the logical axis names, then under ``jax.jit(out_shardings=...)``;
3. jits ``loss`` (pure: params, global batch, rng -> loss, metrics) into the
   sharded train step;
4. calls ``evaluate`` at eval steps and at the end, which returns ``eval/...``
   metrics computed on held-out data through ``EvalContext``.

A task's settings live in a frozen dataclass with a ``build()`` method that
returns the task, so a whole run is a tree of dataclasses that the CLI can
override by dotted name and the checkpoint can store as JSON.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, Callable, Iterator, Mapping, Optional

import jax
import numpy as np

Batch = Mapping[str, Any]
Metrics = dict[str, Any]


@dataclasses.dataclass
class EvalContext:
  """What ``Task.evaluate`` may use; provided by the engine.

  ``batches(split, batch_size=None)`` yields global batches of the split,
  every example exactly once, preprocessed with ``train=False``; the last
  batch is padded and every batch has a boolean ``mask`` ([batch]) marking
  real examples. ``workdir`` is where a task may write artifacts (PNG
  grids). ``step`` is the train step being evaluated.
  """
  batches: Callable[..., Iterator[dict[str, jax.Array]]]
  workdir: str
  step: int
  mesh: Any = None

  @staticmethod
  def to_host(x) -> np.ndarray:
    """A global (possibly multi-host) array as a full numpy array on every host."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def path_names(path) -> list[str]:
  """The names along a ``jax.tree_util`` key path (dict keys, attribute
  names, sequence indices) as strings: ``['encoder', 'layer_0', 'kernel']``."""
  return [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]


def with_aux_losses(metrics: Metrics, aux: Mapping) -> Metrics:
  """``metrics`` plus ``"aux_losses"``: every ``losses`` dict in a model's
  (nested) ``aux`` summed by name (an image and a text tower, an encoder
  and a decoder); ``metrics`` unchanged when the model added none.

  A model's scalar ``metrics`` dicts (the backbone's MoE expert load and
  dropped fraction) are added too, named by where they sit in ``aux``
  (``moe/...`` at the top, ``image/moe/...`` in a tower ``image``)."""
  found: dict[str, Any] = {}
  extra: dict[str, Any] = {}

  def walk(node, prefix):
    for key, value in node.items():
      if key == "losses" and isinstance(value, Mapping):
        for name, loss in value.items():
          found[name] = found[name] + loss if name in found else loss
      elif key == "metrics" and isinstance(value, Mapping):
        extra.update({f"{prefix}{name}": v for name, v in value.items()})
      elif isinstance(value, Mapping) and key not in ("layer_losses", "moe"):
        walk(value, f"{prefix}{key}/")

  walk(aux, "")
  out = {**metrics, **extra}
  return {**out, "aux_losses": found} if found else out


class Task(abc.ABC):
  """An objective the engine can train. Subclass and fill in the abstract parts."""

  # Name of the dataset (embedded builder or prepared tfds catalog name).
  dataset: str = ""
  train_split: str = "train"
  eval_split: str = "test"

  # --- model ---
  @abc.abstractmethod
  def init(self, rng: jax.Array, batch: Batch) -> dict:
    """``{"params": ...}`` with ``nn.Partitioned`` leaves (logical axis names).

    ``batch`` may hold ``jax.ShapeDtypeStruct``s; only shapes are used.
    """

  @abc.abstractmethod
  def loss(self, params, batch: Batch, rng: jax.Array, *, train: bool = True
           ) -> tuple[jax.Array, Metrics]:
    """Scalar float32 loss and a dict of scalar metrics. Pure and jittable.

    ``params`` is the unboxed ``params`` collection (no ``{"params": }``).

    Auxiliary losses (a mixture of experts' load balancing, a router
    z-loss): put a dict name -> float32 scalar under the metric key
    ``"aux_losses"`` (e.g. the backbone's ``aux["losses"]``) and leave them
    out of the returned loss. The engine adds them to it once, minimizes the
    sum (logged as ``train/loss``, guarded against NaN) and logs
    ``train/task_loss`` and ``train/aux_loss/<name>``; with microbatches,
    each is averaged over them like the loss. ``evaluate`` reads only the
    returned loss.

    Statistics for ``post_update`` (code assignment counts, a teacher's
    mean output): a pytree of float arrays under the metric key
    ``"update_stats"``; averaged over microbatches, never logged.
    """

  @abc.abstractmethod
  def batch_spec(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes and dtypes of a preprocessed training batch of ``batch_size``."""

  # --- data ---
  def source(self, split: str):
    """A random-access source (``len``, ``__getitem__`` -> dict) for ``split``."""
    from datong.train import data  # pylint: disable=import-outside-toplevel
    return data.load_source(self.dataset, split)

  def preprocess(self, example: dict, rng: np.random.Generator, train: bool) -> dict:
    """Per-example numpy transform (tokenize, augment, ...). Default: identity."""
    del rng, train
    return example

  # --- evaluation ---
  def evaluate(self, params, ctx: EvalContext) -> Metrics:
    """``eval/...`` metrics on held-out data. Default: the mean loss on ``eval_split``."""
    loss_fn = jax.jit(lambda p, b: self.loss(p, b, jax.random.PRNGKey(0), train=False)[0])
    total, count = 0.0, 0
    for batch in ctx.batches(self.eval_split):
      n = int(np.sum(ctx.to_host(batch["mask"])))
      if n == 0:
        continue
      # Padded rows repeat a real example; weight the batch by its real count.
      total += float(loss_fn(params, batch)) * n
      count += n
    return {"eval/loss": total / max(count, 1)}

  # --- accounting ---
  def flops_per_example(self) -> float:
    """Analytic training FLOPs (forward + backward) per example; 0 if unknown."""
    return 0.0

  def tokens_per_example(self) -> int:
    """Sequence positions processed per example (tokens, patches); for tokens/s."""
    return 0

  # --- non-gradient updates ---
  def post_update(self, params, stats, step: jax.Array):
    """``params`` after a non-gradient update; runs in the jitted step after
    the optimizer's update (and is skipped with it on a NaN/inf step).

    For state that gradients do not train: an EMA codebook, an EMA teacher,
    DINO's output center. Keep such leaves in ``params`` (so they are
    sharded by their logical names, checkpointed and restored with the
    rest) and mark them False in ``trainable`` (so they have no optimizer
    state). ``stats`` is what ``loss`` reported under ``"update_stats"``
    (None if nothing); ``step`` is the int32 step count before this update.
    Pure and jittable. Default: ``params`` unchanged.
    """
    del stats, step
    return params

  # --- optimizer hooks ---
  def trainable(self, params) -> Optional[Any]:
    """A bool pytree like ``params``: False leaves are frozen (LiT). None: all."""
    del params
    return None

  def weight_decay_mask(self, params) -> Any:
    """Which leaves get weight decay: kernels, not norms, biases or embeddings."""
    def decays(path, leaf):
      names = [n.lower() for n in path_names(path)]
      if leaf.ndim < 2:
        return False  # biases, norm scales, scalars (temperature)
      return not any("embed" in n or n in ("pos_embedding", "cls", "mask_token") for n in names)
    return jax.tree_util.tree_map_with_path(decays, params)

  def learning_rate_scale(self, params) -> Optional[Any]:
    """Per-leaf learning-rate multipliers (layer-wise decay); None: all 1."""
    del params
    return None

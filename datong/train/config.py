"""Run settings as frozen dataclasses, overridable by dotted name.

A run is ``RunConfig(task=<a task's config dataclass>, train=..., optimizer=...,
mesh=...)``. The task config is any frozen dataclass with a ``build()``
method returning a ``datong.train.task.Task``.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import typing
from typing import Any, Optional


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Device mesh ``(data, fsdp, tensor)``; one size may be -1 = the rest."""
  data: int = -1
  fsdp: int = 1
  tensor: int = 1


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """AdamW or Muon with decoupled weight decay, warmup + decay schedule, clipping.

  ``algorithm="muon"`` orthogonalizes the momentum of the hidden matrices
  (the leaves the task decays) and runs Adam on everything else, with one
  learning rate: Muon's updates are scaled to AdamW's RMS (see optim.py).
  """
  algorithm: str = "adamw"  # adamw | muon
  learning_rate: float = 1e-3
  schedule: str = "cosine"  # cosine | linear | constant
  warmup_steps: int = 0
  end_learning_rate_factor: float = 0.0  # final lr = factor * learning_rate
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  weight_decay: float = 0.0
  grad_clip_norm: Optional[float] = 1.0  # None: no clipping
  muon_momentum: float = 0.95  # Muon's Nesterov momentum (algorithm="muon" only)

  def __post_init__(self):
    if self.algorithm not in ("adamw", "muon"):
      raise ValueError(f"OptimizerConfig.algorithm={self.algorithm!r}: choose adamw or muon.")
    if not 0.0 <= self.muon_momentum < 1.0:
      raise ValueError(f"OptimizerConfig.muon_momentum={self.muon_momentum}: must be in [0, 1).")
    if self.schedule not in ("cosine", "linear", "constant"):
      raise ValueError(f"OptimizerConfig.schedule={self.schedule!r}: choose cosine, linear or constant.")
    if self.learning_rate <= 0:
      raise ValueError(f"OptimizerConfig.learning_rate={self.learning_rate}: must be positive.")
    if self.warmup_steps < 0:
      raise ValueError(f"OptimizerConfig.warmup_steps={self.warmup_steps}: must be >= 0.")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """The loop: how long, how big, how often to log / evaluate / save."""
  steps: int = 1000
  batch_size: int = 64  # global, over all devices and processes
  microbatches: int = 1  # gradient accumulation: batch_size / microbatches per pass
  seed: int = 0
  log_every: int = 50
  eval_every: int = 0  # 0: evaluate once, at the end
  checkpoint_every: int = 500  # 0: only at the end (and on preemption)
  keep_checkpoints: int = 2
  on_nonfinite: str = "stop"  # stop | skip: what a NaN/inf loss or gradient does
  data_workers: int = 0  # grain worker processes for preprocessing
  prefetch: int = 2  # global batches prepared ahead by a host thread

  def __post_init__(self):
    for field in ("steps", "batch_size", "microbatches", "log_every"):
      if getattr(self, field) <= 0:
        raise ValueError(f"TrainConfig.{field}={getattr(self, field)}: must be positive.")
    if self.batch_size % self.microbatches:
      raise ValueError(f"TrainConfig.batch_size={self.batch_size} is not divisible by "
                       f"microbatches={self.microbatches}.")
    if self.on_nonfinite not in ("stop", "skip"):
      raise ValueError(f"TrainConfig.on_nonfinite={self.on_nonfinite!r}: choose 'stop' or 'skip'.")


@dataclasses.dataclass(frozen=True)
class RunConfig:
  task: Any
  train: TrainConfig = TrainConfig()
  optimizer: OptimizerConfig = OptimizerConfig()
  mesh: MeshConfig = MeshConfig()
  recipe: str = ""


# ---------------------------------------------------------------- overrides

def field_names(config, prefix: str = "", *, nodes: bool = False) -> list[str]:
  """Every dotted field name of a dataclass tree (``nodes``: also the
  names of nested dataclasses, e.g. ``task.model``)."""
  names = []
  for f in dataclasses.fields(config):
    value = getattr(config, f.name)
    name = f"{prefix}{f.name}"
    if dataclasses.is_dataclass(value):
      if nodes:
        names.append(name)
      names.extend(field_names(value, name + ".", nodes=nodes))
    else:
      names.append(name)
  return names


def _parse(text: str, current: Any, annotation: Any) -> Any:
  """Parse an override string into the type of the field it replaces."""
  if text.lower() in ("none", "null") and (current is None or _optional(annotation)):
    return None
  target = type(current) if current is not None else _optional_inner(annotation)
  if target is bool:
    if text.lower() in ("true", "1", "yes"):
      return True
    if text.lower() in ("false", "0", "no"):
      return False
    raise ValueError(f"expected true/false, got {text!r}")
  if target in (int, float, str):
    if target is int and "." in text and float(text).is_integer():
      return int(float(text))
    return target(text)
  if target in (tuple, list):
    value = json.loads(text)
    return target(value) if isinstance(value, list) else target((value,))
  return json.loads(text)


def _optional(annotation) -> bool:
  return "Optional" in str(annotation) or "None" in str(annotation)


def _optional_inner(annotation):
  text = str(annotation)
  for name, typ in (("float", float), ("int", int), ("str", str), ("bool", bool)):
    if name in text:
      return typ
  return str


def _check_keys(config, keys, nodes: bool = False):
  valid = field_names(config, nodes=nodes)
  for key in keys:
    if key not in valid:
      close = [v for v in valid if v.split(".")[-1] == key.split(".")[-1]]
      hint = f" Did you mean {close}?" if close else ""
      raise ValueError(f"Unknown config key {key!r}.{hint} Valid keys: {', '.join(valid)}")


def _rebuild(config, names, new_value):
  """``config`` with each dotted field in ``names`` set to ``new_value(name,
  node, field)``; each dataclass on the way is rebuilt once with all its
  changes, so its validation sees the final combination."""
  def apply(node, prefix):
    changes = {}
    for f in dataclasses.fields(node):
      name = f"{prefix}{f.name}"
      value = getattr(node, f.name)
      if name in names:
        changes[f.name] = new_value(name, node, f)
      elif dataclasses.is_dataclass(value) and any(k.startswith(name + ".") for k in names):
        changes[f.name] = apply(value, name + ".")
    return dataclasses.replace(node, **changes) if changes else node

  return apply(config, "")


def replace_fields(config, values: dict[str, Any]):
  """Return ``config`` with ``{"train.steps": 100, ...}`` set (Python values).

  Like ``override`` without the parsing. Unknown names raise a ValueError
  listing the valid ones. A name may also be a nested dataclass
  (``"task.model.decoder"``), replaced whole.
  """
  _check_keys(config, values, nodes=True)
  return _rebuild(config, values, lambda name, node, f: values[name])


def override(config, assignments: dict[str, str]):
  """Return ``config`` with ``{"train.steps": "100", ...}`` applied.

  Unknown names raise a ValueError listing the valid ones.
  """
  _check_keys(config, assignments)

  def parse(name, node, f):
    hints = typing.get_type_hints(type(node))
    try:
      return _parse(assignments[name], getattr(node, f.name), hints.get(f.name, f.type))
    except (ValueError, json.JSONDecodeError) as e:
      raise ValueError(f"Cannot set {name}={assignments[name]!r}: {e}") from None

  return _rebuild(config, assignments, parse)


# ------------------------------------------------------------ serialization

def to_json(config) -> dict:
  """A JSON-able dict of a dataclass tree, with each dataclass's type."""
  if dataclasses.is_dataclass(config):
    out = {"__type__": f"{type(config).__module__}.{type(config).__qualname__}"}
    for f in dataclasses.fields(config):
      out[f.name] = to_json(getattr(config, f.name))
    return out
  if isinstance(config, (list, tuple)):
    return [to_json(v) for v in config]
  return config


def from_json(data):
  """Inverse of ``to_json``."""
  if isinstance(data, dict) and "__type__" in data:
    module, _, name = data["__type__"].rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    kwargs = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
      if f.name in data:
        value = from_json(data[f.name])
        if isinstance(value, list) and "tuple" in str(hints.get(f.name, "")).lower():
          value = tuple(value)
        kwargs[f.name] = value
    return cls(**kwargs)
  if isinstance(data, list):
    return [from_json(v) for v in data]
  return data

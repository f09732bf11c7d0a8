"""Run settings as frozen dataclasses, overridable by dotted name.

A run is ``RunConfig(task=<a task's config dataclass>, train=..., optimizer=...,
mesh=...)``. The task config is any frozen dataclass with a ``build()``
method returning a ``datong.train.task.Task``.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import json
import math
import typing
from typing import Any, Optional


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Device mesh ``(data, fsdp, tensor, expert)``; one size may be -1 = the
  rest. ``expert`` shards MoE experts (and, outside them, the batch)."""
  data: int = -1
  fsdp: int = 1
  tensor: int = 1
  expert: int = 1


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
    if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
      raise ValueError(f"OptimizerConfig.learning_rate={self.learning_rate}: must be a "
                       "positive finite number, e.g. 1e-3.")
    if self.warmup_steps < 0:
      raise ValueError(f"OptimizerConfig.warmup_steps={self.warmup_steps}: must be >= 0.")
    for name in ("b1", "b2"):
      if not 0.0 <= getattr(self, name) < 1.0:
        raise ValueError(f"OptimizerConfig.{name}={getattr(self, name)}: must be in [0, 1) "
                         "(Adam's moment decay; typical 0.9 and 0.999).")
    if not (math.isfinite(self.eps) and self.eps > 0):
      raise ValueError(f"OptimizerConfig.eps={self.eps}: must be a positive finite number.")
    if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
      raise ValueError(f"OptimizerConfig.weight_decay={self.weight_decay}: must be >= 0.")
    if not 0.0 <= self.end_learning_rate_factor <= 1.0:
      raise ValueError(f"OptimizerConfig.end_learning_rate_factor={self.end_learning_rate_factor}"
                       ": must be in [0, 1] (final lr = factor * learning_rate).")
    if self.grad_clip_norm is not None and not (math.isfinite(self.grad_clip_norm)
                                                and self.grad_clip_norm > 0):
      raise ValueError(f"OptimizerConfig.grad_clip_norm={self.grad_clip_norm}: must be positive "
                       "(clip the global gradient norm to it), or None for no clipping.")


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
  keep_checkpoints: Optional[int] = 2  # the newest N; None keeps every one
  on_nonfinite: str = "stop"  # stop | skip: what a NaN/inf loss or gradient does
  # on_nonfinite="skip" stops anyway after this many skipped steps in a row, or
  # when more than this fraction of the steps run so far were skipped.
  max_consecutive_skips: int = 10
  max_skip_fraction: float = 0.05
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
    for field in ("eval_every", "checkpoint_every", "data_workers", "prefetch"):
      if getattr(self, field) < 0:
        raise ValueError(f"TrainConfig.{field}={getattr(self, field)}: must be >= 0.")
    if self.keep_checkpoints is not None and self.keep_checkpoints < 1:
      raise ValueError(f"TrainConfig.keep_checkpoints={self.keep_checkpoints}: must be >= 1 "
                       "(the newest N checkpoints are kept; 0 would delete the one a resume "
                       "needs). Use None to keep every checkpoint.")
    if self.max_consecutive_skips < 1:
      raise ValueError(f"TrainConfig.max_consecutive_skips={self.max_consecutive_skips}: "
                       "must be >= 1.")
    if not 0.0 < self.max_skip_fraction <= 1.0:
      raise ValueError(f"TrainConfig.max_skip_fraction={self.max_skip_fraction}: must be in "
                       "(0, 1].")


@dataclasses.dataclass(frozen=True)
class RunConfig:
  task: Any
  train: TrainConfig = TrainConfig()
  optimizer: OptimizerConfig = OptimizerConfig()
  mesh: MeshConfig = MeshConfig()
  recipe: str = ""


# ---------------------------------------------------------------- overrides

def _named_items(value) -> Optional[dict]:
  """A tuple of dataclasses that each have a unique ``name`` (a mixture's
  members) as ``{name: item}``; None for anything else."""
  if not isinstance(value, tuple) or not value:
    return None
  if not all(dataclasses.is_dataclass(v) and isinstance(getattr(v, "name", None), str)
             for v in value):
    return None
  items = {v.name: v for v in value}
  return items if len(items) == len(value) else None


def field_names(config, prefix: str = "", *, nodes: bool = False) -> list[str]:
  """Every dotted field name of a dataclass tree (``nodes``: also the
  names of nested dataclasses, e.g. ``task.model``). A tuple of named
  dataclasses is entered by name: ``task.members.gpt.task.seq_length``."""
  names = []
  for f in dataclasses.fields(config):
    value = getattr(config, f.name)
    name = f"{prefix}{f.name}"
    items = _named_items(value)
    if dataclasses.is_dataclass(value):
      if nodes:
        names.append(name)
      names.extend(field_names(value, name + ".", nodes=nodes))
    elif items is not None:
      for key, item in items.items():
        if nodes:
          names.append(f"{name}.{key}")
        names.extend(field_names(item, f"{name}.{key}.", nodes=nodes))
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
    if typing.get_args(annotation)[:1] == (str,) and not text.lstrip().startswith(("[", '"')):
      return target(word.strip() for word in text.split(",") if word.strip())  # a,b: names
    value = json.loads(text)
    if isinstance(value, list):
      return target(value)
    if (isinstance(value, int) and len(current) == 2
        and all(isinstance(v, int) for v in current)):
      return target((value, value))  # a size or patch pair: image_size=32 means (32, 32)
    return target((value,))
  return json.loads(text)


def _optional(annotation) -> bool:
  return "Optional" in str(annotation) or "None" in str(annotation)


def _optional_inner(annotation):
  text = str(annotation)
  for name, typ in (("float", float), ("int", int), ("str", str), ("bool", bool)):
    if name in text:
      return typ
  return str


def resolve_names(config, settings: dict[str, Any], *, nodes: bool = False) -> dict[str, Any]:
  """``{name: value}`` -> ``{dotted path: value}`` on the dataclass tree ``config``:
  the one name resolver of the CLI (``--set``) and the notebook (``build``, ``fit``).

  A name is a dotted path (``__`` works as a dot) or its end (``depth``,
  ``decoder.depth``, ``probe.features``) when that matches one field; a
  backbone field's name may match every backbone (``TransformerConfig``) in
  the tree at once (``depth=2`` sets both CLIP towers; so does an MoE field,
  ``experts=8``). ``nodes``: names of
  nested dataclasses (``task.model.decoder``) are settable too. Unknown and
  ambiguous names raise a ValueError that lists the valid ones.
  """
  from datong.backbone import TransformerConfig  # pylint: disable=import-outside-toplevel
  from datong.backbone_config import MoEConfig  # pylint: disable=import-outside-toplevel
  names = field_names(config, nodes=nodes)
  out = {}
  for key, value in settings.items():
    path = key.replace("__", ".")
    if path in names:
      out[path] = value
      continue
    matches = [n for n in names if n.endswith("." + path)]
    if not matches:
      short = sorted({n.rsplit(".", 1)[-1] for n in names})
      close = difflib.get_close_matches(path.rsplit(".", 1)[-1], short, n=3)
      hint = "; ".join(f"{c} ({', '.join(n for n in names if n.rsplit('.', 1)[-1] == c)})"
                       for c in close)
      hint = f" Did you mean {hint}?" if hint else ""
      raise ValueError(f"Unknown config key {key!r} for {type(config).__name__}.{hint} Valid "
                       f"names: {', '.join(short)} (or a dotted path ending in one, e.g. "
                       f"{max(names, key=lambda n: n.count('.'))!r}).")
    backbone = [m for m in matches
                if isinstance(_node(config, m), (TransformerConfig, MoEConfig))]
    if len(matches) > 1 and len(backbone) != len(matches):
      raise ValueError(f"Setting {key!r} is ambiguous in {type(config).__name__}: "
                       f"{', '.join(matches)}. Pass a longer dotted path, e.g. "
                       f"{matches[0]!r}.")
    out.update({m: value for m in matches})
  return out


def get_field(config, dotted: str):
  """The value of field ``dotted`` (a name from ``field_names``)."""
  for part in dotted.split("."):
    items = _named_items(config)
    config = items[part] if items is not None else getattr(config, part)
  return config


def _node(config, dotted: str):
  """The dataclass holding field ``dotted``."""
  return get_field(config, dotted.rpartition(".")[0]) if "." in dotted else config


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
      elif _named_items(value) is not None and any(k.startswith(name + ".") for k in names):
        changes[f.name] = tuple(
            new_value(f"{name}.{v.name}", node, f) if f"{name}.{v.name}" in names else
            apply(v, f"{name}.{v.name}.") if any(k.startswith(f"{name}.{v.name}.") for k in names)
            else v for v in value)
    return dataclasses.replace(node, **changes) if changes else node

  return apply(config, "")


def replace_fields(config, values: dict[str, Any]):
  """Return ``config`` with ``{"train.steps": 100, "depth": 2, ...}`` set
  (Python values; names as ``resolve_names`` reads them).

  Like ``override`` without the parsing. A name may also be a nested
  dataclass (``"task.model.decoder"``), replaced whole.
  """
  values = resolve_names(config, values, nodes=True)
  return _checked_rebuild(config, values, lambda name, node, f: values[name])


def override(config, assignments: dict[str, str]):
  """Return ``config`` with ``{"train.steps": "100", "depth": "2", ...}``
  applied: strings parsed into each field's type (the CLI's ``--set``),
  names as ``resolve_names`` reads them.
  """
  assignments = resolve_names(config, assignments)

  def parse(name, node, f):
    hints = typing.get_type_hints(type(node))
    try:
      return _parse(assignments[name], getattr(node, f.name), hints.get(f.name, f.type))
    except (ValueError, json.JSONDecodeError) as e:
      raise ValueError(f"Cannot set {name}={assignments[name]!r}: {e}") from None

  return _checked_rebuild(config, assignments, parse)


def _checked_rebuild(config, values: dict, new_value):
  """``_rebuild`` whose validation errors name the settings that caused them."""
  try:
    return _rebuild(config, values, new_value)
  except (ValueError, TypeError) as e:
    if any(name.rsplit(".", 1)[-1] in str(e) for name in values):
      raise
    given = ", ".join(f"{name}={value!r}" for name, value in values.items())
    raise ValueError(f"Cannot apply {given}: {e}") from None


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


# Config classes that moved, by the path a checkpoint written before the move
# stores: runs of every earlier commit keep loading.
MOVED = {
    "datong.unimodal.text.GPTTaskConfig": "datong.train.tasks.text.GPTTaskConfig",
    "datong.unimodal.text.BERTTaskConfig": "datong.train.tasks.text.BERTTaskConfig",
    "datong.unimodal.vision_tasks.ImageData": "datong.train.tasks.images.ImageData",
    "datong.unimodal.vision_tasks.ProbeConfig": "datong.train.tasks.probes.ProbeConfig",
    "datong.unimodal.vision_tasks.ViTClassifierConfig":
        "datong.train.tasks.vision.ViTClassifierConfig",
    "datong.unimodal.vision_tasks.MAETaskConfig": "datong.train.tasks.vision.MAETaskConfig",
    "datong.unimodal.vision_tasks.SimMIMTaskConfig": "datong.train.tasks.vision.SimMIMTaskConfig",
    "datong.multimodal.clip.ClipTaskConfig": "datong.train.tasks.clip.ClipTaskConfig",
}


def from_json(data):
  """Inverse of ``to_json`` (old class paths are read through ``MOVED``)."""
  if isinstance(data, dict) and "__type__" in data:
    module, _, name = MOVED.get(data["__type__"], data["__type__"]).rpartition(".")
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

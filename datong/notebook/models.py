"""Models from a notebook: build one by kind and preset, init, apply, count,
and swap the attention kernel of every backbone."""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np

from datong import registry
from datong.backbone import PRESETS, TransformerConfig
from datong.params import count_params, params_collection
from datong.notebook._common import _choices, _rng
from datong.ops.attention import IMPLEMENTATIONS

# Model kinds ``build`` knows: the registry's table (``datong.registry``).
KINDS = {name: kind.description for name, kind in registry.KINDS.items()}


def quick_compile() -> bool:
  """Compile small models quickly on a CPU: XLA's LLVM optimizations off.

  For notebooks and short runs of small models, where compiling costs more
  than running (the vit-digits init compiled in 2.4 s instead of 4.5 s). Sets ``XLA_FLAGS``,
  so it must run before JAX's first computation; returns False, changing
  nothing, when JAX is already running. Not for long runs: steps run slower.
  """
  try:
    from jax._src import xla_bridge  # pylint: disable=import-outside-toplevel
    if xla_bridge.backends_are_initialized():
      return False
  except (ImportError, AttributeError):  # another jax: set the flag and hope
    pass
  flag = "--xla_backend_optimization_level=0"
  flags = os.environ.get("XLA_FLAGS", "")
  if flag not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} {flag}".strip()
  return True


# ------------------------------------------------------------- overrides --

def resolve_overrides(config, overrides: Mapping[str, Any]) -> dict[str, Any]:
  """``{name: value}`` -> ``{dotted path: value}``: the CLI's resolver
  (``datong.train.config.resolve_names``), nested dataclasses included."""
  from datong.train.config import resolve_names  # pylint: disable=import-outside-toplevel
  return resolve_names(config, dict(overrides), nodes=True)


def _override(config, overrides: Mapping[str, Any]):
  from datong.train.config import replace_fields  # pylint: disable=import-outside-toplevel
  return replace_fields(config, dict(overrides)) if overrides else config


# ----------------------------------------------------------------- build --

def _recipe_model(kind: registry.ModelKind, name: str):
  """``(model config, module kwargs)`` of recipe ``name``'s task."""
  from datong.train import recipes  # pylint: disable=import-outside-toplevel
  task = recipes.get(name).task
  task = getattr(task, "task", task)  # a WarmStartConfig's inner task
  config = getattr(task, "model", None)
  if not isinstance(config, kind.config):
    raise ValueError(f"recipe {name!r} trains a {type(config).__name__}, not a {kind.name} "
                     f"({kind.config.__name__}); pick another kind or preset.")
  return config, kind.module_kwargs(task)


def _module_fields(cls) -> list[str]:
  return [f.name for f in dataclasses.fields(cls) if f.name not in ("config", "parent", "name")]


def build(kind: str, preset: str = "tiny", **overrides) -> nn.Module:
  """A Datong model (a flax module) of ``kind`` from a preset and overrides.

  Args:
    kind: one of ``KINDS`` (gpt, bert, vit, vit_encoder, mae, simmim, clip,
      text_encoder, swin, swinv2).
    preset: a backbone size from ``datong.PRESETS`` ("tiny", "vit-B",
      "gpt2-small", ...) used for every backbone of the model, a size of the
      kind's own ("swin-T", "swinv2-B", ...), or a recipe name ("mae-digits",
      "swin-digits", ...) whose model config is taken.
    overrides: config fields (see the module docstring) and the module's own
      fields (``num_classes`` of ``vit``; ``pad_id``/``eos_id`` of ``clip``).
  Returns:
    the module; ``model.config`` is its config dataclass.
  """
  if kind not in registry.KINDS:
    raise _choices("model kind", kind, list(registry.KINDS))
  entry = registry.KINDS[kind]
  cls = entry.module
  if preset in entry.presets:  # the kind's own sizes ("swin-T", ...)
    config = entry.presets[preset]()
    kwargs = dict(entry.module_defaults)
  elif preset in PRESETS:
    config = entry.default_config(TransformerConfig.preset(preset))
    kwargs = dict(entry.module_defaults)
  else:
    from datong.train import recipes  # pylint: disable=import-outside-toplevel
    if preset not in recipes.names():
      raise _choices("preset", preset, sorted(entry.presets) + sorted(PRESETS) + recipes.names())
    config, kwargs = _recipe_model(entry, preset)
  module_fields = _module_fields(cls)
  kwargs.update({k: v for k, v in overrides.items() if k in module_fields})
  config_overrides = {k: v for k, v in overrides.items() if k not in module_fields}
  try:
    config = _override(config, config_overrides)
  except ValueError as e:
    if module_fields and str(e).startswith("Unknown config key"):
      raise ValueError(f"{e} Module fields of {cls.__name__}: {', '.join(module_fields)}.") from None
    raise
  return cls(config, **kwargs)


# ----------------------------------------------------- init, apply, count --

def example_inputs(model: nn.Module, batch: int = 2, seed: int = 0) -> tuple:
  """Positional inputs a ``model`` from ``build`` accepts (random, fixed seed):
  the registry's ``example_inputs`` of its kind (``datong.registry``).

  Text: ids ``[batch, 16]``; images: ``[batch, h, w, c]`` normal noise;
  MAE adds ``keep_indices, restore_indices`` (75% masked), SimMIM a mask;
  CLIP images and ids; ``Transformer``: ``[batch, 16, width]`` embeddings.
  """
  return registry.example_inputs(model, batch, seed)


def init(model: nn.Module, *inputs, rng=0, **kwargs):
  """The ``params`` collection of ``model`` (on ``example_inputs`` by default).

  Leaves stay ``nn.Partitioned`` boxes carrying logical axis names, so
  ``describe`` and the sharding plan see them; ``model.apply`` takes them as
  they are, ``flax.linen.unbox(params)`` gives plain arrays.
  """
  from datong.train.trainer import INIT_COMPILER_OPTIONS  # pylint: disable=import-outside-toplevel
  inputs = inputs or example_inputs(model)
  # One program compiled for running once: far quicker than op by op on a CPU.
  return jax.jit(lambda key, *xs: model.init(key, *xs, **kwargs)["params"],
                 compiler_options=INIT_COMPILER_OPTIONS)(_rng(rng), *inputs)


@functools.lru_cache(maxsize=64)
def _compiled_apply(model: nn.Module, static: tuple):
  def run(params, inputs, arrays):
    return model.apply({"params": params}, *inputs, **arrays, **dict(static))
  return jax.jit(run)


def _apply(model: nn.Module, params, inputs: Sequence, kwargs: Mapping[str, Any]):
  """``model.apply`` jitted once per (model, non-array keyword arguments)."""
  arrays = {k: v for k, v in kwargs.items() if isinstance(v, (jax.Array, np.ndarray))}
  static = tuple(sorted((k, v) for k, v in kwargs.items() if k not in arrays))
  try:
    hash(static)
  except TypeError:
    raise TypeError("apply: keyword arguments must be arrays or hashable values (a tuple, "
                    f"not a list); got {dict(static)}.") from None
  return _compiled_apply(model, static)(params_collection(params), tuple(inputs), arrays)


def abstract_params(model: nn.Module, *inputs, **kwargs):
  """``init``'s result as shapes and dtypes (``jax.ShapeDtypeStruct`` leaves,
  logical-axis boxes kept), without computing anything."""
  inputs = inputs or example_inputs(model)
  return jax.eval_shape(lambda key, *xs: model.init(key, *xs, **kwargs)["params"],
                        jax.random.PRNGKey(0), *inputs)


def apply(model: nn.Module, params, *inputs, **kwargs):
  """``model.apply({"params": params}, *inputs, **kwargs)``, jitted and cached
  per model (non-array ``kwargs`` such as ``train=``, ``method=`` are
  static); inputs default to ``example_inputs(model)``."""
  return _apply(model, params, inputs or example_inputs(model), kwargs)


def count(params) -> int:
  """Number of scalars in a parameter tree (boxed or plain)."""
  return count_params(params_collection(params))


def with_attention(model_or_config, impl: str):
  """The same model / config with every backbone's ``attention_impl = impl``.

  Works on a module (cloned), a ``TransformerConfig`` or any config tree
  holding them (``TextConfig``, ``ClipConfig``, a ``RunConfig``...). Parameters
  do not change: apply the new model to the old params.
  """
  if impl not in IMPLEMENTATIONS:
    raise _choices("attention implementation", impl, IMPLEMENTATIONS)
  found = []

  def swap(cfg):
    found.append(cfg)
    return cfg.replace(attention_impl=impl)

  out = map_backbones(model_or_config, swap)
  if not found:
    raise ValueError(f"with_attention: no TransformerConfig inside {type(model_or_config).__name__}.")
  return out


def map_backbones(obj, fn):
  """``obj`` with ``fn`` applied to every ``TransformerConfig`` inside it
  (modules are cloned, frozen dataclasses replaced)."""
  if isinstance(obj, TransformerConfig):
    return fn(obj)
  is_module = isinstance(obj, nn.Module)
  if is_module or (dataclasses.is_dataclass(obj) and not isinstance(obj, type)):
    changes = {}
    for f in dataclasses.fields(obj):
      if is_module and f.name in ("parent", "name"):
        continue
      value = getattr(obj, f.name)
      new = map_backbones(value, fn)
      if new is not value:
        changes[f.name] = new
    if not changes:
      return obj
    return obj.clone(**changes) if is_module else dataclasses.replace(obj, **changes)
  if isinstance(obj, (tuple, list)):
    new = [map_backbones(v, fn) for v in obj]
    return obj if all(a is b for a, b in zip(new, obj)) else type(obj)(new)
  return obj

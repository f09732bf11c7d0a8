"""Recipes: short Python files registered by name.

Each module in this package defines ``NAME`` (e.g. ``"gpt-pydoc"``) and
``config() -> datong.train.config.RunConfig``, and ``METRIC`` (its headline
``eval/...`` metric) with ``TARGET`` (``(">=" | "<", bound)``, or None when the
number is only reported), which ``bench/recipes.py`` checks and records. Its
docstring states what it trains. A recipe that reads another run (a BEiT's
tokenizer, a student's teacher) names it in ``REQUIRES`` (setting -> recipe
name, e.g. ``{"task.tokenizer_path": "vqvae-digits"}``): run that recipe
first and pass its workdir as the setting (``bench/recipes.py`` does).
Adding a recipe is adding a file here.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import pkgutil
from types import ModuleType


def _modules() -> dict[str, ModuleType]:
  found = {}
  for info in pkgutil.iter_modules(__path__):
    module = importlib.import_module(f"{__name__}.{info.name}")
    name = getattr(module, "NAME", None)
    if name:
      if name in found:
        raise RuntimeError(f"recipe name {name!r} is defined twice "
                           f"({found[name].__name__}, {module.__name__}).")
      found[name] = module
  return found


def names() -> list[str]:
  return sorted(_modules())


def requires(name: str) -> dict[str, str]:
  """``{setting: recipe}``: the runs recipe ``name`` reads, by the setting
  that takes the run's workdir (empty when it needs none)."""
  modules = _modules()
  if name not in modules:
    raise ValueError(f"unknown recipe {name!r}; known: {sorted(modules)}")
  return dict(getattr(modules[name], "REQUIRES", {}))


def describe() -> dict[str, str]:
  """Recipe name -> the first line of its docstring."""
  return {name: (m.__doc__ or "").strip().splitlines()[0] if m.__doc__ else ""
          for name, m in sorted(_modules().items())}


def _from_spec(spec: str):
  """``"package.module:function"`` or ``"path/to/file.py:function"`` -> RunConfig."""
  import importlib.util  # pylint: disable=import-outside-toplevel
  from datong.train.config import RunConfig  # pylint: disable=import-outside-toplevel
  target, _, fn_name = spec.rpartition(":")
  if target.endswith(".py"):
    if not os.path.isfile(target):
      raise ValueError(f"Recipe spec {spec!r}: no file {target!r}.")
    # A name stable across processes: the run's stored settings name its classes.
    digest = hashlib.sha1(os.path.abspath(target).encode()).hexdigest()[:12]
    module_spec = importlib.util.spec_from_file_location(f"_datong_recipe_{digest}", target)
    if module_spec is None:
      raise ValueError(f"Cannot load recipe file {target!r}.")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
  else:
    try:
      module = importlib.import_module(target)
    except ModuleNotFoundError as e:
      raise ValueError(f"Recipe spec {spec!r}: cannot import {target!r} ({e}). Give an "
                       "importable module (on PYTHONPATH) or a path to a .py file, followed "
                       "by :function.") from None
  fn = getattr(module, fn_name, None)
  if fn is None or not callable(fn):
    raise ValueError(f"Recipe spec {spec!r}: {target} has no function {fn_name!r}.")
  config = fn()
  if not isinstance(config, RunConfig):
    raise ValueError(f"Recipe spec {spec!r}: {fn_name}() returned {type(config).__name__}, "
                     "not a datong.train.config.RunConfig; a recipe function must return one.")
  return config


def module(name: str) -> ModuleType:
  """The module of registered recipe ``name`` (its ``METRIC``, ``TARGET``, docs)."""
  modules = _modules()
  if name not in modules:
    raise ValueError(f"Unknown recipe {name!r}. Known recipes: {', '.join(sorted(modules)) or 'none'}.")
  return modules[name]


def get(name: str):
  """The ``RunConfig`` of recipe ``name``; unknown names list the known ones.

  ``name`` may also be ``module:function`` or ``file.py:function`` for a
  recipe of your own that returns a ``RunConfig``.
  """
  import dataclasses  # pylint: disable=import-outside-toplevel
  if ":" in name:
    return dataclasses.replace(_from_spec(name), recipe=name)
  modules = _modules()
  if name not in modules:
    raise ValueError(f"Unknown recipe {name!r}. Known recipes: {', '.join(sorted(modules)) or 'none'}.")
  return dataclasses.replace(modules[name].config(), recipe=name)

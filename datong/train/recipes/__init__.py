"""Recipes: short Python files registered by name.

Each module in this package defines ``NAME`` (e.g. ``"gpt-pydoc"``) and
``config() -> datong.train.config.RunConfig``; its docstring states the
expected result and time. Adding a recipe is adding a file here.
"""

from __future__ import annotations

import importlib
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


def describe() -> dict[str, str]:
  """Recipe name -> the first line of its docstring."""
  return {name: (m.__doc__ or "").strip().splitlines()[0] if m.__doc__ else ""
          for name, m in sorted(_modules().items())}


def get(name: str):
  """The ``RunConfig`` of recipe ``name``; unknown names list the known ones."""
  modules = _modules()
  if name not in modules:
    raise ValueError(f"Unknown recipe {name!r}. Known recipes: {', '.join(sorted(modules)) or 'none'}.")
  config = modules[name].config()
  import dataclasses  # pylint: disable=import-outside-toplevel
  return dataclasses.replace(config, recipe=name)

"""Small helpers the notebook modules share: error messages, rng keys,
parameter paths, pyplot figures."""

from __future__ import annotations

import jax


def _choices(what: str, name, valid) -> ValueError:
  return ValueError(f"Unknown {what} {name!r}; choose one of: {', '.join(map(str, valid))}.")


def _rng(rng) -> jax.Array:
  return jax.random.PRNGKey(rng) if isinstance(rng, int) else rng


def _path_str(path) -> str:
  from datong.train.task import path_names  # pylint: disable=import-outside-toplevel
  return "/".join(path_names(path))


def _pyplot():
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  return plt


def _finish(fig):
  """Close the pyplot figure so a notebook shows it once: as the cell's value."""
  _pyplot().close(fig)
  return fig

"""Parameter trees: the ``params`` collection, merging pretrained leaves into
fresh ones, counting. Pure functions on pytrees; no model knowledge."""

from __future__ import annotations

from typing import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = ["count_params", "merge_params", "params_collection"]


def params_collection(variables):
  """The ``params`` collection, whether or not wrapped in ``{"params": ...}``
  (what ``Module.init`` returns); boxes are kept."""
  if isinstance(variables, Mapping) and set(variables) == {"params"}:
    return variables["params"]
  return variables


def merge_params(fresh, pretrained, *, extra: str = "error", resize=None, where: str = ""):
  """``fresh`` with every leaf that ``pretrained`` also has replaced by the
  pretrained value: how a model starts from another's weights.

  ``fresh`` is a params collection (boxed or plain; boxes and their logical
  axes are kept, values take the fresh dtype); ``pretrained`` a plain one (a
  ``{"params": ...}`` wrapper is accepted). Leaves only in ``fresh`` (a new
  head) keep their fresh values. A pretrained leaf the model lacks is an
  error (``extra="error"``) or dropped (``extra="drop"``: e.g. SimMIM's mask
  token when fine-tuning a classifier); sharing no leaf at all is always an
  error. Shapes must match, except where ``resize(path, value, shape)``
  makes them (position tables at a new resolution). ``where`` prefixes the
  paths in error messages.
  """
  if extra not in ("error", "drop"):
    raise ValueError(f"merge_params extra={extra!r}: choose 'error' or 'drop'.")
  from flax.traverse_util import flatten_dict, unflatten_dict  # pylint: disable=import-outside-toplevel
  source = flatten_dict(params_collection(nn.unbox(pretrained)))
  target = flatten_dict(params_collection(fresh))
  name = lambda key: where + "/".join(map(str, key))
  unknown = sorted(set(source) - set(target))
  if unknown and extra == "error":
    raise ValueError(f"pretrained {name(unknown[0])} does not exist in the model "
                     f"({len(unknown)} such leaves); the model's top level has {sorted(fresh)}.")
  if len(unknown) == len(source):
    raise ValueError(f"pretrained params share no leaf with the model at {where or '/'}: "
                     f"pretrained top level {sorted({k[0] for k in source})}, model "
                     f"{sorted({k[0] for k in target})}.")
  out = {}
  for key, leaf in target.items():
    if key not in source:
      out[key] = leaf
      continue
    boxed = isinstance(leaf, nn.Partitioned)
    value = leaf.unbox() if boxed else leaf
    new = source[key]
    if tuple(jnp.shape(new)) != tuple(value.shape) and resize is not None:
      new = resize(key, new, tuple(value.shape))
    if tuple(jnp.shape(new)) != tuple(value.shape):
      raise ValueError(f"pretrained {name(key)} has shape {tuple(jnp.shape(new))}, the model "
                       f"wants {tuple(value.shape)}; match the model config to the weights.")
    new = jnp.asarray(new, value.dtype)
    out[key] = leaf.replace_boxed(new) if boxed else new
  return unflatten_dict(out)


def count_params(params) -> int:
  """Number of scalars in a parameter pytree (boxed or plain)."""
  return sum(int(x.size) for x in jax.tree.leaves(nn.unbox(params)))

"""Converted checkpoint tensors placed straight onto a mesh, one at a time.

``hf.load(path, mesh=mesh, rules=rules)`` memory-maps the safetensors files
(``safetensors.map_safetensors``), converts each tensor as a view of the map
where the layout change allows (transposes, head splits, GPT-2's fused q/k/v
slices), and builds each parameter with ``jax.make_array_from_callback``:
every device's callback reads only its own shard of the converted view.
Scanned layers (``scan_layers=True``) are stacked per shard (``LazyStack``).
After each parameter the pages read are released, so host memory holds the
placed shards plus about one tensor, not the whole file.

Why a memory map and not ``safetensors.safe_open(...).get_slice``: a shard
of a converted parameter (``[embed, heads, head_dim]`` from HF's ``[out,
in]``, a third of GPT-2's ``c_attn``) is not one slice of the stored tensor,
and a view of a map serves any such index without reading the rest.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import contextvars

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


# Set while ``hf.load`` converts for a mesh: scanned layers are then stacked
# lazily (``LazyStack``) instead of copied into one host array per leaf.
LAZY_STACKS = contextvars.ContextVar("datong_hf_lazy_stacks", default=False)


class LazyStack:
  """``np.stack(parts)`` that is never built whole: indexing stacks only the
  requested block of each requested part (one device's shard)."""

  def __init__(self, parts: Sequence[np.ndarray]):
    self.parts = tuple(parts)
    self.shape = (len(self.parts),) + tuple(np.shape(self.parts[0]))
    self.dtype = np.asarray(self.parts[0]).dtype

  def __getitem__(self, index):
    index = index if isinstance(index, tuple) else (index,)
    first, rest = (index[0], index[1:]) if index else (slice(None), ())
    if isinstance(first, (int, np.integer)):
      return np.asarray(self.parts[first])[rest]
    return np.stack([np.asarray(p)[rest] for p in self.parts[first]])


def _fit(spec: P, shape: Sequence[int], mesh: Mesh) -> P:
  """``spec`` with every dimension its mesh axes do not divide left whole
  (replicated), as the train engine's rules do for such parameters."""
  out = []
  for i, axes in enumerate(tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    size = int(np.prod([mesh.shape[a] for a in names], dtype=np.int64)) if names else 1
    out.append(axes if names and shape[i] % size == 0 else None)
  return P(*out)


def target_shardings(model: nn.Module, example_args: tuple, mesh: Mesh, rules) -> Any:
  """``NamedSharding`` per parameter from the model's logical axis names and ``rules``."""
  boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *example_args)["params"])
  specs = nn.get_partition_spec(boxed)
  shapes = nn.unbox(boxed)
  mesh_specs = nn.logical_to_mesh(specs, rules)
  return jax.tree.map(lambda spec, s: NamedSharding(mesh, _fit(spec, s.shape, mesh)),
                      mesh_specs, shapes, is_leaf=lambda x: isinstance(x, P))


def place(params: Any, shardings: Any, dtype, release: Callable[[], None]) -> Any:
  """Each numpy leaf of ``params`` as a ``jax.Array`` with its sharding, built
  shard by shard; ``release()`` after each leaf lets go of the pages read."""
  dtype = np.dtype(dtype)

  def one(leaf, sharding):
    leaf = leaf if isinstance(leaf, LazyStack) else np.asarray(leaf)
    arr = jax.make_array_from_callback(
        leaf.shape, sharding, lambda index: np.array(leaf[index], dtype=dtype))
    release()
    return arr

  return jax.tree.map(one, params, shardings)

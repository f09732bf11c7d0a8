"""Running a per-device attention kernel under ``shard_map``.

Pallas kernels see one device's arrays, so under an ambient mesh the kernel
runs inside ``shard_map`` over batch and heads (attention is independent per
batch row and per head). Sequence axes are never split here: a kernel would
need the whole key sequence (ring attention is a different kernel), so
``length``/``kv`` are replicated whatever the rules say.

Imports only jax: flax's logical-axis resolution is re-implemented in a few
lines (first rule whose mesh axes are still free wins).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

LogicalRules = Sequence[tuple[str, Any]]


def ambient_mesh():
  """The mesh set by ``jax.set_mesh`` (or ``with mesh:``), or None."""
  get = getattr(jax.sharding, "get_abstract_mesh", None)
  mesh = get() if get is not None else None
  if mesh is None or not getattr(mesh, "axis_names", ()):
    return None
  return mesh


def shard_map(f: Callable, *, mesh, in_specs, out_specs) -> Callable:
  """``jax.shard_map`` across jax versions, without replication checks.

  jax 0.10.2 - 0.12 export ``jax.shard_map`` (``check_vma``); older releases
  only have ``jax.experimental.shard_map.shard_map`` (``check_rep``).
  """
  if hasattr(jax, "shard_map"):
    return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                         check_vma=False)
  from jax.experimental.shard_map import shard_map as _legacy  # pylint: disable=import-outside-toplevel
  return _legacy(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False)


def _as_tuple(axes) -> tuple[str, ...]:
  if axes is None:
    return ()
  return tuple(axes) if isinstance(axes, (tuple, list)) else (axes,)


def logical_to_mesh_axes(names: Sequence[Optional[str]], rules: LogicalRules) -> tuple:
  """Mesh axes per logical name, flax-style: for each name the first rule whose
  mesh axes are not already used in this spec; None when no rule applies."""
  used: set[str] = set()
  out = []
  for name in names:
    chosen = None
    for rule_name, axes in rules:
      if rule_name != name:
        continue
      axes_t = _as_tuple(axes)
      if used.intersection(axes_t):
        continue
      chosen = axes
      used.update(axes_t)
      break
    out.append(chosen)
  return tuple(out)


def _axis_size(mesh, axes) -> int:
  shape = dict(mesh.shape)
  for axis in _as_tuple(axes):
    if axis not in shape:
      raise ValueError(
          f"logical_rules map to mesh axis {axis!r}, which the ambient mesh "
          f"{tuple(mesh.axis_names)} does not have.")
  return math.prod(shape[a] for a in _as_tuple(axes))


def sharded_attention(kernel: Callable, q, k, v, q_segment_ids, kv_segment_ids, *,
                      mesh, logical_rules: LogicalRules):
  """``kernel(q, k, v, q_segment_ids, kv_segment_ids)`` inside ``shard_map``.

  q is sharded ``("batch", "length", "heads", "kv")``, k/v
  ``("batch", "length", "kv_heads", "kv")`` and segment ids
  ``("batch", "length")``, with length/kv replicated. k/v use the *heads*
  mesh axes so that local query head ``h`` still reads local kv head
  ``h // groups``; when kv_heads does not divide over those axes (e.g. one kv
  head on a 4-way tensor axis) each kv head is repeated just enough that it
  does.
  """
  batch_axes, _, head_axes, _ = logical_to_mesh_axes(
      ("batch", "length", "heads", "kv"), logical_rules)
  batch, heads, kv_heads = q.shape[0], q.shape[2], k.shape[2]
  n_batch = _axis_size(mesh, batch_axes)
  n_heads = _axis_size(mesh, head_axes)
  if batch % n_batch:
    raise ValueError(
        f"batch ({batch}) must divide evenly over mesh axes {batch_axes} ({n_batch} shards).")
  if heads % n_heads:
    raise ValueError(
        f"heads ({heads}) must divide evenly over mesh axes {head_axes} ({n_heads} shards).")
  if kv_heads % n_heads:
    repeat = n_heads // math.gcd(kv_heads, n_heads)
    k = jnp.repeat(k, repeat, axis=2)
    v = jnp.repeat(v, repeat, axis=2)

  qkv_spec = P(batch_axes, None, head_axes, None)
  seg_spec = P(batch_axes, None)
  has_segments = q_segment_ids is not None

  def local(q, k, v, *segments):
    q_ids, kv_ids = segments if has_segments else (None, None)
    return kernel(q, k, v, q_ids, kv_ids)

  args = (q, k, v) + ((q_segment_ids, kv_segment_ids) if has_segments else ())
  in_specs = (qkv_spec,) * 3 + ((seg_spec,) * 2 if has_segments else ())
  if getattr(mesh, "explicit_axes", ()):
    # Under Explicit axes shard_map checks, rather than imposes, input specs.
    args = tuple(jax.sharding.reshard(x, spec) for x, spec in zip(args, in_specs))
  return shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=qkv_spec)(*args)

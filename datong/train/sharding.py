"""Mesh, logical-axis rules, and the one function that decides shardings.

Model code names axes logically (``batch, length, embed, heads, kv_heads,
kv, mlp, vocab, layers, patch, expert, expert_group``); ``RULES`` maps them
to the mesh axes ``data, fsdp, expert, tensor``. A mesh axis is used at most
once per array: flax takes the first matching rule whose mesh axes are
still free, so ``batch`` (listed first) wins ``fsdp`` for activations and
``embed`` gets it for parameters.

Expert parallelism: MoE expert weights ``[expert, ...]`` are sharded over
the mesh axis ``expert``, which also shards the batch everywhere else (it is
one of ``BATCH_AXES``). Inside an MoE layer the dispatched tokens
``[expert_group, expert, capacity, embed]`` keep their groups over ``data``
and ``fsdp`` and put experts over ``expert``: the compiler's partitioner
inserts the all-to-all between the two layouts, or, with
``MoEConfig.expert_parallel="shard_map"``, the layer calls
``jax.lax.all_to_all`` itself under ``shard_map`` (it reads these rules and
the ambient mesh, never mesh names).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from datong.train.config import MeshConfig

MESH_AXES = ("data", "fsdp", "expert", "tensor")
BATCH_AXES = ("data", "fsdp", "expert")

RULES = (
    ("batch", BATCH_AXES),
    # Before embed: the dispatched MoE buffers keep their groups on data/fsdp.
    ("expert_group", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("length", None),
    ("kv", None),
    ("layers", None),
    ("patch", None),
    ("expert", "expert"),
)

# Parameters nobody annotated, smaller than this, stay replicated.
FSDP_MIN_BYTES = 1 << 16


def mesh_shape(config: MeshConfig, num_devices: int) -> tuple[int, ...]:
  """Resolve -1 and check that the product equals the device count; the
  sizes in ``MESH_AXES`` order."""
  sizes = [getattr(config, name) for name in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh {tuple(sizes)}: at most one axis may be -1.")
  for name, size in zip(MESH_AXES, sizes):
    if size == 0 or size < -1:
      raise ValueError(f"mesh.{name}={size}: sizes must be positive or -1.")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(
          f"mesh {tuple(sizes)}: the fixed axes ({known} devices) do not divide the "
          f"{num_devices} available devices; pick sizes whose product divides {num_devices}.")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    named = dict(zip(MESH_AXES, sizes))
    shown = " x ".join(f"{n}={named[n]}" for n in ("data", "fsdp", "tensor", "expert")
                       if n != "expert" or named[n] != 1)
    raise ValueError(
        f"mesh {shown} = {math.prod(sizes)} "
        f"devices, but {num_devices} are available; make the product {num_devices} "
        "(or set one axis to -1).")
  return tuple(sizes)


def make_mesh(config: MeshConfig, devices=None) -> Mesh:
  """A ``(data, fsdp, expert, tensor)`` mesh over all (or the given) devices."""
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(config, len(devices))
  try:
    from jax.experimental import mesh_utils  # pylint: disable=import-outside-toplevel
    grid = mesh_utils.create_device_mesh(shape, devices=devices)
  except Exception:  # pylint: disable=broad-except  # odd topologies: plain order
    grid = np.asarray(devices).reshape(shape)
  # Auto axis types: flax's logical constraints need them (see NOTES).
  kwargs = {}
  if hasattr(jax.sharding, "AxisType"):
    kwargs["axis_types"] = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  return Mesh(grid, MESH_AXES, **kwargs)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis over ``data``, ``fsdp`` and ``expert``; the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def batch_shards(mesh: Mesh) -> int:
  """How many pieces the batch is cut into (mesh data x fsdp x expert)."""
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def check_batch_size(batch_size: int, mesh: Mesh, microbatches: int = 1):
  shards = batch_shards(mesh)
  per_micro = batch_size // microbatches
  if per_micro % shards:
    raise ValueError(
        f"train.batch_size={batch_size} / microbatches={microbatches} = {per_micro} examples "
        f"per pass is not divisible by the {shards} batch shards (mesh data x fsdp x expert); "
        f"use a multiple of {shards * microbatches}.")
  if batch_size % jax.process_count():
    raise ValueError(f"train.batch_size={batch_size} is not divisible by the "
                     f"{jax.process_count()} processes.")


def _fallback_spec(shape, dtype, mesh: Mesh) -> P:
  """FSDP for an unannotated parameter: its largest divisible dim over fsdp."""
  fsdp = mesh.shape["fsdp"]
  nbytes = math.prod(shape) * np.dtype(dtype).itemsize
  if fsdp == 1 or nbytes < FSDP_MIN_BYTES:
    return P()
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % fsdp == 0:
      spec = [None] * len(shape)
      spec[dim] = "fsdp"
      return P(*spec)
  return P()


def _divisible(spec: P, shape, mesh: Mesh) -> P:
  """Drop the mesh axes of dims they do not divide (e.g. 10 classes over 4)."""
  out = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    size = math.prod(mesh.shape[n] for n in names)
    out.append(axes if names and dim % size == 0 else None)
  return P(*out)


@dataclasses.dataclass
class ShardingPlan:
  """The result of ``plan_shardings``: abstract arrays and their shardings."""
  abstract: Any  # unboxed ShapeDtypeStruct tree
  shardings: Any  # NamedSharding tree, same structure

  def bytes(self) -> dict[str, int]:
    """Total bytes of one copy, bytes per device, and replicated bytes per device."""
    replicated = total = per_device = 0
    for leaf, sharding in zip(jax.tree.leaves(self.abstract), jax.tree.leaves(self.shardings)):
      itemsize = np.dtype(leaf.dtype).itemsize
      nbytes = math.prod(leaf.shape) * itemsize
      shard_bytes = math.prod(sharding.shard_shape(leaf.shape)) * itemsize
      total += nbytes
      per_device += shard_bytes
      if shard_bytes == nbytes and nbytes:
        replicated += nbytes
    return {"total": total, "per_device": per_device, "replicated": replicated}

  def report(self) -> str:
    b, mib = self.bytes(), 1 << 20
    return (f"{b['total'] / mib:.2f} MiB total, {b['per_device'] / mib:.2f} MiB per device, "
            f"{b['replicated'] / mib:.2f} MiB of it replicated on every device")


def _is_box(x):
  return isinstance(x, nn.Partitioned)


def plan_params(init_fn: Callable[..., Any], *args, mesh: Mesh, rules=RULES) -> ShardingPlan:
  """eval_shape -> logical specs -> mesh shardings, with an FSDP fallback.

  ``init_fn(*args)`` returns parameters whose leaves are ``nn.Partitioned``
  boxes (logical names) or plain arrays (sharded by ``_fallback_spec``).
  """
  boxed = jax.eval_shape(init_fn, *args)

  def leaf_sharding(leaf):
    if _is_box(leaf):
      spec = _divisible(nn.logical_to_mesh_axes(P(*leaf.names), rules), leaf.value.shape, mesh)
    else:
      spec = _fallback_spec(leaf.shape, leaf.dtype, mesh)
    return NamedSharding(mesh, spec)

  plain = jax.tree.map(lambda x: x.value if _is_box(x) else x, boxed, is_leaf=_is_box)
  return ShardingPlan(plain, jax.tree.map(leaf_sharding, boxed, is_leaf=_is_box))


def plan_like_params(tree_abstract, params: ShardingPlan, mesh: Mesh,
                     view: Optional[Callable[[Any], Any]] = None) -> ShardingPlan:
  """Shardings for optimizer state: params-shaped subtrees follow the params.

  Optax keeps moments as trees with the params' structure (``mu``, ``nu``);
  every such subtree gets the params' shardings, any other leaf (step
  counts) is replicated. ``view`` maps a params-shaped tree to the one the
  optimizer state is built on (``optim.only_trainable``: frozen leaves
  dropped); subtrees shaped like the view follow the view of the shardings.
  """
  view = view or (lambda tree: tree)
  params_def = jax.tree.structure(view(params.abstract))
  shardings = view(params.shardings)
  replicated = NamedSharding(mesh, P())

  def is_params_like(x):
    return jax.tree.structure(x) == params_def and params_def.num_leaves > 0

  def assign(x):
    if is_params_like(x):
      return shardings
    return jax.tree.map(lambda _: replicated, x)

  shardings = jax.tree.map(assign, tree_abstract, is_leaf=is_params_like)
  return ShardingPlan(tree_abstract, shardings)

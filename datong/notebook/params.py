"""Looking inside parameters: ``describe`` gives path, shape, dtype, logical
axes and the sharding on a mesh of every parameter, as a ``ParamTable``."""

from __future__ import annotations

import dataclasses
from typing import Mapping, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np

from datong.params import params_collection
from datong.notebook._common import _choices, _path_str
from datong.notebook.models import abstract_params


# -------------------------------------------------------------- describe --

@dataclasses.dataclass(frozen=True)
class ParamInfo:
  """One parameter: where it lives, its shape and type, how it is laid out."""
  path: str
  shape: tuple
  dtype: str
  axes: Optional[tuple]  # logical axis names (None entries: unnamed); None: unknown
  sharding: str  # the mesh PartitionSpec, "" when no mesh

  @property
  def size(self) -> int:
    return int(np.prod(self.shape, dtype=np.int64))


def _fmt_axes(axes) -> str:
  if axes is None:
    return "?"
  return "(" + ", ".join("-" if a is None else str(a) for a in axes) + ")"


class ParamTable:
  """What ``describe`` returns: rows of ``ParamInfo``; prints as a table,
  renders with treescope in a notebook when it is installed."""

  def __init__(self, rows: Sequence[ParamInfo], mesh=None):
    self.rows = list(rows)
    self.mesh = mesh

  @property
  def total(self) -> int:
    return sum(r.size for r in self.rows)

  @property
  def nbytes(self) -> int:
    return sum(r.size * np.dtype(r.dtype).itemsize for r in self.rows)

  def __len__(self):
    return len(self.rows)

  def __iter__(self):
    return iter(self.rows)

  def __getitem__(self, path: str) -> ParamInfo:
    for r in self.rows:
      if r.path == path:
        return r
    raise KeyError(f"no parameter {path!r}; e.g. {[r.path for r in self.rows[:3]]}")

  def summary(self) -> str:
    mesh = f" on mesh {dict(self.mesh.shape)}" if self.mesh is not None else ""
    return (f"{len(self.rows)} arrays, {self.total:,} parameters, "
            f"{self.nbytes / 2**20:.2f} MiB{mesh}")

  def __str__(self):
    head = ("path", "shape", "dtype", "logical axes", "sharding")
    body = [(r.path, str(r.shape), r.dtype, _fmt_axes(r.axes), r.sharding) for r in self.rows]
    widths = [max(len(row[i]) for row in [head] + body) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in [head] + body]
    return "\n".join(lines + [self.summary()])

  __repr__ = __str__

  def tree(self) -> dict:
    """The rows as a nested dict (path components -> ``ParamInfo``)."""
    out: dict = {}
    for r in self.rows:
      node = out
      *parents, leaf = r.path.split("/")
      for p in parents:
        node = node.setdefault(p, {})
      node[leaf] = r
    return out

  def _repr_html_(self):
    try:
      import treescope  # pylint: disable=import-outside-toplevel
    except ImportError:
      import html  # pylint: disable=import-outside-toplevel
      cells = "".join(
          "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in
                           (r.path, str(r.shape), r.dtype, _fmt_axes(r.axes), r.sharding)) + "</tr>"
          for r in self.rows)
      return (f"<table><tr><th>path</th><th>shape</th><th>dtype</th><th>logical axes</th>"
              f"<th>sharding</th></tr>{cells}</table><p>{html.escape(self.summary())}</p>")
    return (treescope.render_to_html(self.tree(), roundtrip_mode=False)
            + f"<p>{self.summary()}</p>")


def _is_box(x) -> bool:
  return isinstance(x, nn.Partitioned)


def _make_mesh(mesh):
  from datong.train import sharding as sharding_lib  # pylint: disable=import-outside-toplevel
  from datong.train.config import MeshConfig  # pylint: disable=import-outside-toplevel
  if mesh is None or isinstance(mesh, jax.sharding.Mesh):
    return mesh
  if isinstance(mesh, MeshConfig):
    return sharding_lib.make_mesh(mesh)
  if isinstance(mesh, Mapping):
    bad = sorted(set(mesh) - set(sharding_lib.MESH_AXES))
    if bad:
      raise _choices("mesh axis", bad[0], sharding_lib.MESH_AXES)
    return sharding_lib.make_mesh(MeshConfig(**{"data": -1, **mesh}))
  raise TypeError(f"mesh: a jax Mesh, a MeshConfig or a dict like {{'fsdp': 2}}; "
                  f"got {type(mesh).__name__}.")


def describe(params, model: Optional[nn.Module] = None, mesh=None) -> ParamTable:
  """A table of every parameter: path, shape, dtype, logical axes, sharding.

  Args:
    params: a ``params`` collection, boxed (from ``init``: logical names
      known) or plain (from ``datong.hf.load``, a checkpoint).
    model: for plain params, the module whose ``init`` names the axes.
    mesh: a ``jax.sharding.Mesh``, a ``MeshConfig`` or ``{"fsdp": 2, ...}``
      (``data`` fills the rest): show the ``PartitionSpec`` the training
      engine would give each parameter (``datong.train.sharding.plan_params``).
      Without one, arrays placed with a ``NamedSharding`` show theirs.
  """
  from jax.sharding import NamedSharding  # pylint: disable=import-outside-toplevel
  params = params_collection(params)
  flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_box)[0]
  if not flat:
    raise ValueError("describe: the parameter tree is empty.")
  axes_by_path = {}
  if not any(_is_box(v) for _, v in flat) and model is not None:
    boxed = abstract_params(model)
    axes_by_path = {_path_str(p): tuple(v.names) for p, v in
                    jax.tree_util.tree_flatten_with_path(boxed, is_leaf=_is_box)[0] if _is_box(v)}
  mesh = _make_mesh(mesh)
  specs = {}
  if mesh is not None:
    from datong.train import sharding as sharding_lib  # pylint: disable=import-outside-toplevel
    boxed = params
    if axes_by_path:  # plain params: give them the model's names
      boxed = jax.tree_util.tree_map_with_path(
          lambda p, v: nn.Partitioned(v, axes_by_path[_path_str(p)])
          if _path_str(p) in axes_by_path else v, params)
    plan = sharding_lib.plan_params(lambda: boxed, mesh=mesh)
    specs = {_path_str(p): str(s.spec) for p, s in
             jax.tree_util.tree_flatten_with_path(plan.shardings)[0]}
  rows = []
  for path, leaf in flat:
    key = _path_str(path)
    value = leaf.value if _is_box(leaf) else leaf
    axes = tuple(leaf.names) if _is_box(leaf) else axes_by_path.get(key)
    sharding = specs.get(key, "")
    if not sharding and isinstance(getattr(value, "sharding", None), NamedSharding):
      sharding = str(value.sharding.spec)
    rows.append(ParamInfo(key, tuple(np.shape(value)), str(np.dtype(value.dtype)), axes, sharding))
  return ParamTable(rows, mesh)

"""Datong from a notebook: build, look inside, swap kernels, train, show.

The shared parts, composed in a few cells::

    import datong
    model = datong.build("vit", "tiny", image_size=8, patch_size=2, channels=1, num_classes=10)
    params = datong.init(model)                  # on example inputs; logical axes kept
    datong.describe(params)                      # path, shape, dtype, logical axes, sharding
    logits, aux = datong.apply(model, params)    # example inputs, or pass your own
    fast = datong.with_attention(model, "xla")   # same parameters, another kernel
    run = datong.fit("mae-digits", steps=50, batch_size=64)   # the engine of `datong train`
    run.plot()                                   # the loss curve from metrics.jsonl
    out = datong.reconstruct(run.model, run.params, datong.examples(run)["image"])
    datong.show_images([out["masked"], out["reconstruction"]])   # inline in a notebook

Everything here is a thin layer over the library: models are the modules of
``datong.unimodal`` / ``datong.multimodal``, ``fit`` calls
``datong.train.loop.train``, attention maps come from the backbone's own
``Attention`` (the reference softmax of the same q and k), reconstructions
from ``datong.unimodal.masked_image``. Unknown names raise a ``ValueError``
that lists the valid ones.

Overrides (``build``, ``fit``) name config fields: a dotted path
(``**{"decoder.depth": 1}``, or ``decoder__depth=1``) or just the last name
when that is unambiguous (``image_size=8``, ``learning_rate=1e-3``). A
backbone field without a path (``depth``, ``attention_impl``, ...) sets it in
every backbone of the model (both CLIP towers, MAE's encoder and decoder).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import tempfile
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from datong import registry
from datong.backbone import (PRESETS, WEIGHTS_COLLECTION, TransformerConfig, count_params,
                             params_collection)
from datong.ops.attention import IMPLEMENTATIONS

__all__ = [
    "KINDS", "FitResult", "ParamTable", "abstract_params", "apply", "attention_maps",
    "attention_weights", "build", "confusion_matrix", "count", "describe", "example_inputs",
    "examples", "fit", "generate_text", "init", "plot_confusion_matrix", "quick_compile",
    "reconstruct", "run_config", "show_attention", "show_images", "tokenizer_of",
    "with_attention", "zero_shot_predict",
]

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


def _choices(what: str, name, valid) -> ValueError:
  return ValueError(f"Unknown {what} {name!r}; choose one of: {', '.join(map(str, valid))}.")


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
    kind: one of ``KINDS`` (gpt, bert, vit, vit_encoder, mae, simmim, clip).
    preset: a backbone size from ``datong.PRESETS`` ("tiny", "vit-B",
      "gpt2-small", ...) used for every backbone of the model, or a recipe
      name ("mae-digits", "clip-digits", ...) whose model config is taken.
    overrides: config fields (see the module docstring) and the module's own
      fields (``num_classes`` of ``vit``; ``pad_id``/``eos_id`` of ``clip``).
  Returns:
    the module; ``model.config`` is its config dataclass.
  """
  if kind not in registry.KINDS:
    raise _choices("model kind", kind, list(registry.KINDS))
  entry = registry.KINDS[kind]
  cls = entry.module
  if preset in PRESETS:
    config = entry.default_config(TransformerConfig.preset(preset))
    kwargs = dict(entry.module_defaults)
  else:
    from datong.train import recipes  # pylint: disable=import-outside-toplevel
    if preset not in recipes.names():
      raise _choices("preset", preset, sorted(PRESETS) + recipes.names())
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


def _rng(rng) -> jax.Array:
  return jax.random.PRNGKey(rng) if isinstance(rng, int) else rng


def init(model: nn.Module, *inputs, rng=0, **kwargs):
  """The ``params`` collection of ``model`` (on ``example_inputs`` by default).

  Leaves stay ``nn.Partitioned`` boxes carrying logical axis names, so
  ``describe`` and the sharding plan see them; ``model.apply`` takes them as
  they are, ``flax.linen.unbox(params)`` gives plain arrays.
  """
  from datong.train.loop import INIT_COMPILER_OPTIONS  # pylint: disable=import-outside-toplevel
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


def _path_str(path) -> str:
  from datong.train.task import path_names  # pylint: disable=import-outside-toplevel
  return "/".join(path_names(path))


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


# ------------------------------------------------------------------- fit --

@dataclasses.dataclass
class FitResult:
  """A finished ``fit``: the run's config, workdir, engine result and logs."""
  config: Any  # the RunConfig that was trained
  workdir: str
  result: Any  # datong.train.loop.RunResult
  _params: Any = None
  _task: Any = None

  @property
  def metrics(self) -> dict:
    """The last train metrics and the final evaluation (``eval/...``)."""
    return self.result.metrics

  @property
  def history(self) -> list[dict]:
    """Every row of the run's ``metrics.jsonl`` (``step`` + metrics)."""
    from datong.train.writers import read_metrics  # pylint: disable=import-outside-toplevel
    return read_metrics(self.workdir)

  def curve(self, key: str = "train/loss") -> tuple[np.ndarray, np.ndarray]:
    """``(steps, values)`` of one logged metric."""
    rows = [r for r in self.history if key in r]
    if not rows:
      keys = sorted({k for r in self.history for k in r if k != "step"})
      raise _choices("metric", key, keys)
    return np.array([r["step"] for r in rows]), np.array([r[key] for r in rows], np.float64)

  @property
  def losses(self) -> np.ndarray:
    """The logged ``train/loss`` values, in step order."""
    return self.curve("train/loss")[1]

  @property
  def params(self):
    """The trained ``params`` (host arrays), read from the final checkpoint."""
    if self._params is None:
      from datong.train.checkpoint import load_params  # pylint: disable=import-outside-toplevel
      self._params = load_params(self.workdir)
    return self._params

  @property
  def task(self):
    """The run's ``Task`` (``task.model`` is the trained module)."""
    if self._task is None:
      self._task = self.config.task.build()
    return self._task

  @property
  def model(self) -> nn.Module:
    return self.task.model

  def plot(self, keys: Sequence[str] = ("train/loss",), ax=None):
    """A matplotlib figure of the logged metrics ``keys`` against the step."""
    plt = _pyplot()
    fig = None
    if ax is None:
      fig, ax = plt.subplots(figsize=(5, 3))
    for key in keys:
      steps, values = self.curve(key)
      ax.plot(steps, values, marker="o" if len(steps) < 30 else None, label=key)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend()
    return _finish(fig or ax.figure)


def run_config(run, **overrides):
  """The ``RunConfig`` of ``run`` (a recipe name, a ``RunConfig`` or a task
  config) with ``overrides`` applied as in ``fit`` (``model=...``,
  ``steps=...``, ``learning_rate=...``); ``.task.build()`` gives its task."""
  from datong.train import recipes  # pylint: disable=import-outside-toplevel
  from datong.train.config import RunConfig  # pylint: disable=import-outside-toplevel
  if isinstance(run, str):
    if run not in recipes.names() and ":" not in run:
      raise _choices("recipe", run, recipes.names())
    config = recipes.get(run)
  elif isinstance(run, RunConfig):
    config = run
  elif hasattr(run, "build"):
    config = RunConfig(task=run)
  else:
    raise TypeError(f"a recipe name, a RunConfig or a task config; got {type(run).__name__}.")
  return _override(config, overrides)


def fit(run, steps: Optional[int] = None, *, workdir: Optional[str] = None,
        batch_size: Optional[int] = None, init: Optional[str] = None,
        evaluate: bool = True, progress: bool = False, devices=None,
        **overrides) -> FitResult:
  """Train with the engine of ``datong train`` (``datong.train.loop.train``).

  Args:
    run: a recipe name (``datong.train.recipes.names()``), a ``RunConfig``,
      or a task config (``GPTTaskConfig(...)``, ...; default train settings).
    steps, batch_size: ``train.steps`` / ``train.batch_size``.
    workdir: where checkpoints and ``metrics.jsonl`` go (default: a new
      temporary directory). A workdir that holds a checkpoint resumes it.
    init: pretrained weights to start from (a Hugging Face model directory,
      a run's workdir, a ``.msgpack``): ``datong.train.warmstart``.
    evaluate: run the task's evaluation at the end (``eval/...`` metrics);
      False skips it (quicker).
    progress: show the engine's progress bar.
    devices: the devices of the mesh (default: all).
    overrides: any config field, as for ``build`` (``learning_rate=3e-3``,
      ``seq_length=64``, ``**{"train.log_every": 5}``). ``train.log_every``
      defaults to every step up to 100 steps (a smooth curve to plot).
  Returns:
    a ``FitResult``: ``metrics``, ``history``, ``curve()``, ``plot()``,
    ``params`` (the final checkpoint's), ``task`` / ``model``.
  """
  from datong.train import loop  # pylint: disable=import-outside-toplevel
  settings = dict(overrides)
  if steps is not None:
    settings["train.steps"] = steps
  if batch_size is not None:
    settings["train.batch_size"] = batch_size
  config = run_config(run, **settings)
  if not any(k.replace("__", ".") in ("log_every", "train.log_every") for k in overrides):
    config = _override(config, {"train.log_every": max(1, config.train.steps // 100)})
  if init is not None:
    from datong.train.warmstart import WarmStartConfig  # pylint: disable=import-outside-toplevel
    config = dataclasses.replace(config, task=WarmStartConfig(config.task, init))
  workdir = workdir or tempfile.mkdtemp(prefix="datong-fit-")
  result = loop.train(config, workdir, progress=progress, evaluate=evaluate, devices=devices)
  return FitResult(config=config, workdir=os.path.abspath(workdir), result=result)


# ------------------------------------------------------------------ data --

def _task(task):
  if isinstance(task, FitResult):
    return task.task
  if isinstance(task, str):
    from datong.train import recipes  # pylint: disable=import-outside-toplevel
    task = recipes.get(task)
  if hasattr(task, "task") and hasattr(task, "train"):  # a RunConfig
    task = task.task
  if hasattr(task, "build") and not hasattr(task, "loss"):
    task = task.build()
  return task


def examples(task, split: str = "test", n: int = 16, *, train: bool = False) -> dict:
  """The first ``n`` examples of ``split``, preprocessed as the engine does,
  stacked into numpy arrays (``{"image": [n, h, w, c], "label": [n]}`` ...).

  ``task``: a ``Task``, a task config, a ``RunConfig``, a recipe name or a
  ``FitResult``.
  """
  task = _task(task)
  source = task.source(split)
  rng = np.random.default_rng(0)
  rows = [task.preprocess(source[i], rng, train) for i in range(min(n, len(source)))]
  return {k: np.stack([np.asarray(r[k]) for r in rows]) for k in rows[0]}


# ------------------------------------------------------------- looking at --

def _pyplot():
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  return plt


def _finish(fig):
  """Close the pyplot figure so a notebook shows it once: as the cell's value."""
  _pyplot().close(fig)
  return fig


def show_images(images, *, titles: Optional[Sequence[str]] = None,
                row_titles: Optional[Sequence[str]] = None,
                value_range: Optional[tuple[float, float]] = (-1.0, 1.0),
                size: float = 1.0, cmap: str = "gray"):
  """A grid of images as a matplotlib figure (shown inline in a notebook).

  ``images``: one batch ``[n, h, w(, c)]`` (one row) or a list of equally
  long batches (one row each, e.g. ``[inputs, masked, reconstructions]``).
  NaN pixels (masked) are drawn gray. ``value_range`` maps to black..white
  (None: each image's own min..max). ``titles`` label the columns.
  """
  rows = [np.asarray(images)] if not isinstance(images, (list, tuple)) else \
      [np.asarray(b) for b in images]
  if any(b.ndim not in (3, 4) for b in rows):
    raise ValueError(f"show_images: batches of [n, h, w] or [n, h, w, c]; got shapes "
                     f"{[b.shape for b in rows]}.")
  n = max(len(b) for b in rows)
  plt = _pyplot()
  fig, axes = plt.subplots(len(rows), n, figsize=(size * n, size * len(rows) + 0.3),
                           squeeze=False)
  for i, batch in enumerate(rows):
    for j in range(n):
      ax = axes[i, j]
      ax.set_xticks([])
      ax.set_yticks([])
      if j >= len(batch):
        ax.axis("off")
        continue
      img = batch[j].astype(np.float32)
      if img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0]
      lo, hi = value_range if value_range is not None else (np.nanmin(img), np.nanmax(img))
      img = (img - lo) / max(hi - lo, 1e-12)
      img = np.where(np.isnan(img), 0.5, np.clip(img, 0.0, 1.0))
      ax.imshow(img, cmap=cmap if img.ndim == 2 else None, vmin=0.0, vmax=1.0,
                interpolation="nearest")
      if titles is not None and i == 0 and j < len(titles):
        ax.set_title(str(titles[j]), fontsize=8)
    if row_titles is not None and i < len(row_titles):
      axes[i, 0].set_ylabel(str(row_titles[i]), fontsize=8)
  fig.tight_layout()
  return _finish(fig)


def confusion_matrix(labels, predictions, num_classes: Optional[int] = None) -> np.ndarray:
  """``[classes, classes]`` counts: row = true class, column = predicted."""
  labels = np.asarray(labels, np.int64).reshape(-1)
  predictions = np.asarray(predictions, np.int64).reshape(-1)
  if labels.shape != predictions.shape:
    raise ValueError(f"confusion_matrix: {labels.shape[0]} labels but "
                     f"{predictions.shape[0]} predictions.")
  if num_classes is None:
    num_classes = int(max(labels.max(initial=-1), predictions.max(initial=-1))) + 1
  out = np.zeros((num_classes, num_classes), np.int64)
  np.add.at(out, (labels, predictions), 1)
  return out


def plot_confusion_matrix(matrix, class_names: Optional[Sequence[str]] = None,
                          title: Optional[str] = None):
  """A confusion matrix (from ``confusion_matrix``) as an annotated heat map."""
  matrix = np.asarray(matrix)
  k = matrix.shape[0]
  names = [str(c) for c in (class_names if class_names is not None else range(k))]
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(0.45 * k + 1.5, 0.45 * k + 1.2))
  ax.imshow(matrix, cmap="Blues")
  ax.set_xticks(range(k), names, rotation=90, fontsize=8)
  ax.set_yticks(range(k), names, fontsize=8)
  ax.set_xlabel("predicted")
  ax.set_ylabel("true")
  for i in range(k):
    for j in range(k):
      if matrix[i, j]:
        ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=7,
                color="white" if matrix[i, j] > matrix.max() / 2 else "black")
  accuracy = np.trace(matrix) / max(matrix.sum(), 1)
  ax.set_title(title or f"accuracy {accuracy:.1%}", fontsize=9)
  fig.tight_layout()
  return _finish(fig)


def zero_shot_predict(task, params, images) -> np.ndarray:
  """Zero-shot class ids ``[n]`` of a CLIP task's prompts for ``images``
  ``[n, h, w, c]`` (in the task's input range, e.g. from ``examples``)."""
  from datong.multimodal import contrastive  # pylint: disable=import-outside-toplevel
  task = _task(task)
  if not hasattr(task, "zero_shot_classifier"):
    raise TypeError(f"zero_shot_predict needs a CLIP task; got {type(task).__name__}.")
  params = nn.unbox(params_collection(params))
  classifier = task.zero_shot_classifier(params)
  emb = _apply(task.model, params, (jnp.asarray(images),), {"method": "encode_image"})
  return np.asarray(jnp.argmax(contrastive.zero_shot_logits(emb, classifier), axis=-1))


def reconstruct(model: nn.Module, params, images, rng=0) -> dict:
  """Mask ``images`` and reconstruct them with an ``MAE`` or ``SimMIM``.

  Returns numpy arrays ``images``, ``masked`` (masked pixels NaN),
  ``reconstruction`` (predictions on masked patches, the input elsewhere),
  ``mask`` ``[n, patches]`` and the float ``loss`` (the model's training
  loss on these images and this mask).
  """
  if not hasattr(model, "masked_prediction"):
    raise TypeError(f"reconstruct needs a masked-image model (MAE, SimMIM); "
                    f"got {type(model).__name__}.")
  images = jnp.asarray(images, jnp.float32)
  out = _reconstruction(model)(params_collection(params), images, _rng(rng))
  return {"images": np.asarray(images), "masked": np.asarray(out["masked"]),
          "reconstruction": np.asarray(out["reconstruction"]), "mask": np.asarray(out["mask"]),
          "loss": float(out["loss"])}


@functools.lru_cache(maxsize=16)
def _reconstruction(model: nn.Module):
  """``masked_image.reconstruct`` for ``model``, jitted once."""
  from datong.unimodal import masked_image as mim  # pylint: disable=import-outside-toplevel
  return jax.jit(functools.partial(mim.reconstruct, model))


def tokenizer_of(source="byte"):
  """A tokenizer: ``source`` is one already, a spec (``"byte"``,
  ``"bpe:PATH"``, ...), or a recipe name / ``RunConfig`` / task /
  ``FitResult`` whose task's tokenizer it returns (a ``bpe:VOCAB`` task
  learns its merges from its train split)."""
  from datong.train import recipes  # pylint: disable=import-outside-toplevel
  from datong.train.tasks.text import make_tokenizer  # pylint: disable=import-outside-toplevel
  if hasattr(source, "encode") and hasattr(source, "decode"):
    return source
  if isinstance(source, str) and source not in recipes.names():
    return make_tokenizer(source)
  task = _task(source)
  if not hasattr(task, "tokenizer"):
    raise TypeError(f"{type(task).__name__} has no tokenizer; pass a text task or a spec.")
  return task.tokenizer


def generate_text(model: nn.Module, params, prompts, *, max_new_tokens: int = 64,
                  temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                  tokenizer="byte", rng=0) -> list[str]:
  """Continue ``prompts`` (a str or a list) with a ``GPT``; returns the new text.

  ``tokenizer``: anything ``tokenizer_of`` takes; pass the run
  (``tokenizer=run``) or its recipe name for a model trained with a
  learned vocabulary. Each prompt is ``<bos> + tokens`` as in training;
  decoding uses the KV cache (``datong.unimodal.generation.generate``) and stops
  at ``<eos>``; ``max_new_tokens`` counts tokens, not bytes.
  """
  from datong.unimodal.generation import generate  # pylint: disable=import-outside-toplevel
  tok = tokenizer_of(tokenizer)
  vocab = model.config.vocab_size
  if tok.vocab_size > vocab or (tok.vocab_size == 262 and vocab != 262):
    raise ValueError(f"generate_text: the tokenizer has {tok.vocab_size} ids but this model's "
                     f"vocabulary is {vocab}; pass the tokenizer it was trained with "
                     f"(tokenizer=run, or the recipe name).")
  single = isinstance(prompts, str)
  texts = [prompts] if single else list(prompts)
  rows = [[tok.bos_id] + list(tok.encode(t)) for t in texts]
  length = max(len(r) for r in rows)
  ids = np.full((len(rows), length), tok.pad_id, np.int32)
  mask = np.zeros((len(rows), length), bool)
  for i, r in enumerate(rows):  # left padding
    ids[i, length - len(r):] = r
    mask[i, length - len(r):] = True
  out = generate(model, nn.unbox(params_collection(params)), jnp.asarray(ids), jnp.asarray(mask),
                 _rng(rng), max_new_tokens=max_new_tokens, padding="left",
                 temperature=temperature, top_k=top_k, top_p=top_p, eos_id=tok.eos_id,
                 pad_id=tok.pad_id)
  tokens, lengths = np.asarray(out["tokens"]), np.asarray(out["lengths"])
  decoded = [tok.decode(tokens[i, :lengths[i]]) for i in range(len(rows))]
  return decoded[0] if single else decoded


# -------------------------------------------------------------- attention --

def attention_weights(model: nn.Module, params, *inputs, **kwargs) -> dict[str, np.ndarray]:
  """Every attention layer's probabilities ``[batch, heads, q_length, kv_length]``.

  Runs ``model`` once (on ``example_inputs`` unless given) with the
  backbone's weights collection mutable: each ``Attention`` sows the
  reference softmax of its own q and k (rotary, qk-norm and masks
  included), whatever kernel computes its output. Keys are module paths
  (``encoder/backbone/layer_0/attention``), in layer order; scanned layers
  are split into ``layer_<i>`` entries.
  """
  inputs = inputs or example_inputs(model)
  _, state = _apply(model, params, inputs, {**kwargs, "mutable": (WEIGHTS_COLLECTION,)})
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(
      state.get(WEIGHTS_COLLECTION, {}), is_leaf=lambda x: isinstance(x, tuple))[0]:
    names = _path_str(path).split("/")[:-1]  # drop the "weights" leaf name
    value = np.asarray(leaf[0])
    if "layers" in names:  # scanned: [depth, batch, heads, q, kv]
      i = names.index("layers")
      for layer in range(value.shape[0]):
        out["/".join(names[:i] + [f"layer_{layer}"] + names[i + 1:])] = value[layer]
    else:
      out["/".join(names)] = value
  if not out:
    raise ValueError(f"attention_weights: {type(model).__name__} ran no datong attention layer.")
  return dict(sorted(out.items(), key=lambda kv: _natural(kv[0])))


def _natural(path: str) -> list:
  """Sort key: ``layer_10`` after ``layer_9``."""
  return [(0, int(p[6:]), "") if p.startswith("layer_") and p[6:].isdigit() else (1, 0, p)
          for p in path.split("/")]


def _image_encoder(model: nn.Module, params):
  """``(encoder module, its params)`` inside any model with an image encoder."""
  config, enc_params = registry.encoder_of(model, params_collection(params))
  return config.make(), enc_params


def attention_maps(model: nn.Module, params, images, layer: int = -1) -> np.ndarray:
  """Where a ViT layer looks: ``[batch, heads, grid_h, grid_w]``, each map sums to 1.

  With a [CLS] token: the [CLS] query's attention over the patches
  (renormalized without the [CLS] key); without one: the attention each
  patch receives, averaged over the queries. ``layer`` indexes the
  backbone's layers (-1: the last).
  """
  encoder, enc_params = _image_encoder(model, params)
  weights = list(attention_weights(encoder, enc_params, jnp.asarray(images, jnp.float32)).values())
  depth = len(weights)
  if not -depth <= layer < depth:
    raise ValueError(f"attention_maps: layer={layer} but the encoder has {depth} layers "
                     f"(valid: {-depth}..{depth - 1}).")
  w = weights[layer]  # [batch, heads, q, kv]
  cfg = encoder.config
  if cfg.has_cls:
    maps = w[:, :, 0, 1:]
  else:
    maps = w.mean(axis=2)
  maps = maps / np.maximum(maps.sum(-1, keepdims=True), 1e-12)
  gh, gw = cfg.grid if tuple(np.shape(images)[1:3]) == tuple(cfg.image_size) else \
      (np.shape(images)[1] // cfg.patch_size[0], np.shape(images)[2] // cfg.patch_size[1])
  return maps.reshape(maps.shape[0], maps.shape[1], gh, gw)


def show_attention(images, maps, *, size: float = 1.0):
  """Each image (a column) above its per-head attention maps (``attention_maps``);
  every tile is scaled to its own min..max."""
  images, maps = np.asarray(images), np.asarray(maps)
  if maps.ndim != 4 or len(maps) != len(images):
    raise ValueError(f"show_attention: maps [batch, heads, h, w] for {len(images)} images; "
                     f"got {maps.shape}.")
  rows = [images] + [maps[:, h] for h in range(maps.shape[1])]
  return show_images(rows, value_range=None, size=size,
                     row_titles=["image"] + [f"head {h}" for h in range(maps.shape[1])])

"""Joint multi-objective training: several member tasks, one parameter tree.

A ``MixtureTask`` trains member tasks (any ``Task``: GPT, BERT, MAE, SimMIM,
ViT, CLIP, SigLIP, ...) at once. Parameters that members share (by default
every subtree named ``backbone``) are stored once under ``params["shared"]``;
each member keeps its own embedders and heads under ``params[<member>]``::

    {"shared": {"backbone": ...},
     "gpt": {"encoder": {"embed": ...}},                  # no encoder/backbone
     "mae": {"encoder": {"stem": ...}, "decoder": ...},
     "clip": {"image": {...}, "text": {"stem": ..., "head": ...}, ...}}

Before a member's ``loss`` (``evaluate``, ``post_update``, ...) the shared
subtrees are put back at that member's paths (its "view"), so a member runs
unchanged; CLIP's two towers may both map to the one shared backbone.

Data: the engine keeps one iterator. The mixture's source item ``i`` holds
``per_row`` examples of every member: member ``m``'s ``r``-th example of
item ``i`` is its position ``g = i * per_row + r``, which reads record
``perm_{m,e}(g % n_m)`` of the member's own source (``e = g // n_m``, a
permutation per member epoch seeded by the member's name). So every
member's data order is deterministic and the engine's one checkpointed
position resumes all of them exactly. One engine epoch is one pass of the
largest member; smaller members cycle through their own reshuffled epochs.
Batch keys are ``<member>/<key>`` of shape ``[batch, per_row, ...]``.

Modes (``MixtureTaskConfig.mode``):

* ``"all"``: every step, the loss is ``sum_m weight_m * loss_m`` over every
  member's batch (gradients add up, weighted).
* ``"sample"``: every step one member, drawn with probability
  ``weight_m / sum(weight)`` from the step's rng, and its loss alone.
  ``sample_impl="switch"`` runs only the drawn member (``lax.switch``);
  ``"weights"`` computes every member and multiplies by a one-hot. Both are
  one jitted function. ``switch`` is faster: XLA runs a ``switch`` as a
  conditional, so a step costs only the drawn member's forward and backward,
  while ``weights`` pays for every member and throws all but one away. On
  the unified-digits recipe (1 CPU device, 2 shared cores under load 5-7,
  ``python bench/mixture.py --steps 6 --rounds 3``): ``all`` 2.48 s/step,
  ``sample/switch`` 1.10 s (0.44x), ``sample/weights`` 2.48 s (1.00x).
  The host still prepares every member's batch in ``sample`` mode. With
  ``train.microbatches`` each microbatch draws its own member (the engine
  folds the microbatch into the rng); a member's ``post_update`` then gets
  the mean of its statistics over the microbatches that drew it and is
  skipped when none did.

Metrics are per member: ``train/<member>/...`` and ``eval/<member>/...``
(``train/<member>/sampled`` says whether the member ran in ``sample`` mode;
its metrics are 0 where it did not). A member's auxiliary losses reach the
engine weighted, as ``aux_loss/<member>/<name>``.
"""

from __future__ import annotations

import dataclasses
import os
import zlib
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from datong.train import data as data_lib
from datong.train import sharding as sharding_lib
from datong.train.task import EvalContext, Task, path_names

__all__ = ["MemberConfig", "MixtureTaskConfig", "MixtureTask", "MixtureSource"]

SHARED = "shared"
MODES = ("all", "sample")
SAMPLE_IMPLS = ("switch", "weights")


@dataclasses.dataclass(frozen=True)
class MemberConfig:
  """One member of a mixture: a name (metric prefix, params key), a task
  config (anything with ``build()``), how many examples per global batch row
  (``per_row``: its batch is ``per_row x train.batch_size``) and its loss
  weight (in ``sample`` mode: its relative sampling probability)."""
  name: str
  task: Any
  per_row: int = 1
  weight: float = 1.0

  def __post_init__(self):
    if not self.name or "/" in self.name or self.name == SHARED:
      raise ValueError(f"MemberConfig.name={self.name!r}: a non-empty name without '/', "
                       f"not {SHARED!r}.")
    if self.per_row < 1:
      raise ValueError(f"MemberConfig.per_row={self.per_row} (member {self.name!r}): must be >= 1.")
    if not self.weight > 0:
      raise ValueError(f"MemberConfig.weight={self.weight} (member {self.name!r}): must be > 0.")


@dataclasses.dataclass(frozen=True)
class MixtureTaskConfig:
  """Members trained over one parameter tree.

  ``shared``: what is stored once. Each entry is ``[group=]member:path``
  (``"gpt:encoder/backbone"``) or ``[group=]key`` (every subtree named
  ``key`` in every member, e.g. ``"backbone"``); ``group`` defaults to the
  path's last name and all entries of one group must have the same shapes.
  The first member (in order) that holds a group initializes it.

  ``only``: train just these members (names), each exactly as configured
  here (data, batch, loss, evaluation), with the others left out: a
  mixture's single-member baselines, ``--set task.only=gpt``.
  """
  members: tuple = ()
  shared: tuple = ("backbone",)
  mode: str = "all"  # all | sample
  sample_impl: str = "switch"  # switch | weights (mode="sample" only)
  only: tuple[str, ...] = ()

  def __post_init__(self):
    if not self.members:
      raise ValueError("MixtureTaskConfig.members is empty: give at least one MemberConfig.")
    names = [m.name for m in self.members]
    if len(set(names)) != len(names):
      raise ValueError(f"MixtureTaskConfig.members: names must be unique, got {names}.")
    if self.mode not in MODES:
      raise ValueError(f"MixtureTaskConfig.mode={self.mode!r}: choose one of {MODES}.")
    if self.sample_impl not in SAMPLE_IMPLS:
      raise ValueError(f"MixtureTaskConfig.sample_impl={self.sample_impl!r}: choose one of "
                       f"{SAMPLE_IMPLS}.")
    for entry in self.shared:
      target = entry.split("=", 1)[-1]
      if ":" in target and target.split(":", 1)[0] not in names:
        raise ValueError(f"MixtureTaskConfig.shared entry {entry!r} names member "
                         f"{target.split(':', 1)[0]!r}, not one of {names}.")
    unknown = [n for n in self.only if n not in names]
    if unknown:
      raise ValueError(f"MixtureTaskConfig.only={list(self.only)}: no member named {unknown}; "
                       f"the members are {names}.")

  def build(self) -> "MixtureTask":
    if not self.only:
      return MixtureTask(self)
    kept = tuple(m for m in self.members if m.name in self.only)
    shared = tuple(e for e in self.shared
                   if ":" not in e.split("=", 1)[-1] or e.split("=", 1)[-1].split(":")[0] in
                   self.only)
    return MixtureTask(dataclasses.replace(self, members=kept, shared=shared, only=()))


# ------------------------------------------------------------------ trees ---

def _get(tree, path: tuple):
  for key in path:
    tree = tree[key]
  return tree


def _has(tree, path: tuple) -> bool:
  for key in path:
    if not isinstance(tree, dict) or key not in tree:
      return False
    tree = tree[key]
  return True


def _without(tree, paths) -> dict:
  """``tree`` with the subtrees at ``paths`` removed (dicts copied on the way)."""
  tree = dict(tree)
  for path in paths:
    node = tree
    for key in path[:-1]:
      node[key] = dict(node[key])
      node = node[key]
    del node[path[-1]]
  return tree


def _with(tree, placed) -> dict:
  """``tree`` with ``{path: subtree}`` inserted (dicts copied on the way)."""
  tree = dict(tree)
  for path, sub in placed.items():
    node = tree
    for key in path[:-1]:
      node[key] = dict(node.get(key, {}))
      node = node[key]
    node[path[-1]] = sub
  return tree


def _find_key(tree, key: str, prefix=()) -> list[tuple]:
  """Paths of every subtree named ``key`` (not looking inside a match)."""
  found = []
  if isinstance(tree, dict):
    for k, v in tree.items():
      if k == key:
        found.append(prefix + (k,))
      else:
        found.extend(_find_key(v, key, prefix + (k,)))
  return found


def _shapes(tree) -> dict[str, tuple]:
  leaves = jax.tree_util.tree_leaves_with_path(tree)
  return {"/".join(path_names(p)): (tuple(x.shape), str(x.dtype)) for p, x in leaves}


# ----------------------------------------------------------------- source ---

class MixtureSource:
  """Item ``i``: ``{member: [per_row raw examples]}``; see the module docstring."""

  def __init__(self, sources: dict, per_row: dict, seed: int = 0):
    self.sources = sources
    self.per_row = per_row
    self.seed = seed
    for name, src in sources.items():
      if len(src) == 0:
        raise ValueError(f"mixture member {name!r}: its source is empty.")
    self._len = max(-(-len(src) // per_row[name]) for name, src in sources.items())
    self._perms: dict = {}

  def __len__(self) -> int:
    return self._len

  def _perm(self, name: str, epoch: int) -> np.ndarray:
    key = (name, epoch)
    if key not in self._perms:
      if len(self._perms) > 64:
        self._perms.clear()
      seq = np.random.SeedSequence([self.seed, zlib.crc32(name.encode()), epoch])
      self._perms[key] = np.random.default_rng(seq).permutation(len(self.sources[name]))
    return self._perms[key]

  def record(self, name: str, position: int) -> int:
    """The record of member ``name`` read at its position ``position``."""
    n = len(self.sources[name])
    return int(self._perm(name, position // n)[position % n])

  def __getitem__(self, index: int) -> dict:
    index = int(index)
    out = {}
    for name, src in self.sources.items():
      k = self.per_row[name]
      out[name] = [src[self.record(name, index * k + r)] for r in range(k)]
    return out


# ------------------------------------------------------------------- task ---

class MixtureTask(Task):
  """Member tasks over one parameter tree; see the module docstring."""

  def __init__(self, config: MixtureTaskConfig):
    self.config = config
    self.members: dict[str, Task] = {m.name: m.task.build() for m in config.members}
    self.per_row = {m.name: m.per_row for m in config.members}
    self.weights = {m.name: float(m.weight) for m in config.members}
    self._eval_batch_size = 0
    self._placement: Optional[dict] = None  # member -> {path: group}
    self._sources: dict = {}

  # --- the shared layout ---
  def _find_placement(self, member_params: dict) -> dict:
    """``{member: {path: group}}`` from ``config.shared``, checked against the
    members' (abstract) params: paths exist, each group's shapes agree."""
    placement: dict = {name: {} for name in self.members}
    for entry in self.config.shared:
      group, _, target = entry.rpartition("=")
      if ":" in target:
        name, _, path_text = target.partition(":")
        path = tuple(p for p in path_text.split("/") if p)
        if not path or not _has(member_params[name], path):
          parent = path[:-1]
          known = (sorted(_get(member_params[name], parent)) if _has(member_params[name], parent)
                   and isinstance(_get(member_params[name], parent), dict) else
                   sorted(member_params[name]))
          raise ValueError(
              f"MixtureTaskConfig.shared entry {entry!r}: member {name!r} has no parameter "
              f"subtree {'/'.join(path)!r} (under {'/'.join(parent) or 'the top'!r} it has "
              f"{known}). Fix: name an existing path, e.g. '{name}:{'/'.join(parent + (known[0],)) if known else ''}', "
              "or drop the entry.")
        placement[name][path] = group or path[-1]
      else:
        hits = {name: _find_key(p, target) for name, p in member_params.items()}
        if not any(hits.values()):
          raise ValueError(
              f"MixtureTaskConfig.shared entry {entry!r}: no member has a parameter subtree "
              f"named {target!r} (members: {sorted(self.members)}). Fix: name one by "
              "'member:path', e.g. 'gpt:encoder/backbone', or drop the entry.")
        for name, paths in hits.items():
          for path in paths:
            placement[name][path] = group or target
    owners: dict = {}
    for name, paths in placement.items():
      for path, group in paths.items():
        shapes = _shapes(_get(member_params[name], path))
        if group not in owners:
          owners[group] = (name, path, shapes)
          continue
        first, first_path, want = owners[group]
        if shapes != want:
          diff = sorted(set(shapes.items()) ^ set(want.items()))
          leaf = diff[0][0] if diff else "?"
          raise ValueError(
              f"MixtureTaskConfig.shared group {group!r}: member {name!r} at "
              f"{'/'.join(path)!r} does not match member {first!r} at {'/'.join(first_path)!r}: "
              f"leaf {leaf!r} is {shapes.get(leaf, 'absent')} vs {want.get(leaf, 'absent')} "
              "(shape, dtype). Fix: give both the same backbone settings (width, depth, heads, "
              f"mlp_dim, ...), or leave '{name}:{'/'.join(path)}' out of MixtureTaskConfig.shared "
              "(list the paths to share explicitly).")
    return placement

  def _layout(self, member_params: dict) -> dict:
    if self._placement is None:
      self._placement = self._find_placement(member_params)
    return self._placement

  @property
  def placement(self) -> dict:
    """``{member: {path: group}}``: where each shared group sits in each member."""
    if self._placement is None:
      spec = self.batch_spec(1)
      jax.eval_shape(lambda r: self.init(r, spec), jax.ShapeDtypeStruct((2,), jnp.uint32))
    return self._placement

  def combine(self, member_trees: dict, *, check_equal: str = "") -> dict:
    """Member-layout trees -> the mixture's layout. A shared group's value
    comes from its first holder; with ``check_equal`` (the hook's name),
    holders that disagree (Python scalars) raise."""
    placement = self._layout(member_trees) if self._placement is None else self._placement
    out: dict = {SHARED: {}}
    holder: dict = {}
    for name, tree in member_trees.items():
      paths = placement[name]
      out[name] = _without(tree, paths)
      for path, group in paths.items():
        sub = _get(tree, path)
        if group not in out[SHARED]:
          out[SHARED][group], holder[group] = sub, (name, path)
        elif check_equal:
          a = jax.tree_util.tree_leaves_with_path(out[SHARED][group])
          b = jax.tree_util.tree_leaves(sub)
          for (p, x), y in zip(a, b):
            if isinstance(x, (bool, int, float)) and x != y:
              raise ValueError(
                  f"{check_equal}: members {holder[group][0]!r} and {name!r} disagree on the "
                  f"shared {group!r} leaf {'/'.join(path_names(p))!r} ({x} vs {y}). Fix: "
                  "configure the members alike (e.g. lock both or neither) or do not share "
                  f"'{name}:{'/'.join(path)}'.")
    return out

  def view(self, params: dict, name: str) -> dict:
    """Member ``name``'s parameters in its own layout (shared subtrees put back)."""
    shared = params[SHARED]
    return _with(params[name], {path: shared[group]
                                for path, group in self.placement[name].items()})

  def split(self, view: dict, name: str, params: dict) -> dict:
    """``params`` with member ``name``'s ``view`` written back (its own part
    and the shared groups it holds)."""
    paths = self.placement[name]
    shared = dict(params[SHARED])
    for path, group in paths.items():
      shared[group] = _get(view, path)
    return {**params, SHARED: shared, name: _without(view, paths)}

  # --- model ---
  def init(self, rng, batch):
    trees = {}
    for i, (name, task) in enumerate(self.members.items()):
      trees[name] = task.init(jax.random.fold_in(rng, i), self.member_batch(batch, name))["params"]
    self._layout(trees)
    return {"params": self.combine(trees)}

  def member_batch(self, batch, name: str) -> dict:
    """Member ``name``'s batch: its ``name/...`` keys, ``[batch * per_row, ...]``."""
    prefix = name + "/"
    out = {}
    for key, x in batch.items():
      if key.startswith(prefix):
        shape = (x.shape[0] * x.shape[1],) + tuple(x.shape[2:])
        out[key[len(prefix):]] = (jax.ShapeDtypeStruct(shape, x.dtype)
                                  if isinstance(x, jax.ShapeDtypeStruct) else x.reshape(shape))
    return out

  def batch_spec(self, batch_size: int):
    self._eval_batch_size = self._eval_batch_size or batch_size
    spec = {}
    for name, task in self.members.items():
      k = self.per_row[name]
      for key, s in task.batch_spec(batch_size * k).items():
        spec[f"{name}/{key}"] = jax.ShapeDtypeStruct((batch_size, k) + tuple(s.shape[1:]), s.dtype)
    return spec

  def _member_loss(self, params, batch, rng, name, train):
    i = list(self.members).index(name)
    loss, metrics = self.members[name].loss(self.view(params, name), self.member_batch(batch, name),
                                            jax.random.fold_in(rng, i), train=train)
    return jnp.asarray(loss, jnp.float32), dict(metrics)

  def _selection(self, rng) -> jax.Array:
    """One-hot ``[members]`` float32 of the member drawn this step (``sample``)."""
    logits = jnp.log(jnp.asarray(list(self.weights.values()), jnp.float32))
    index = jax.random.categorical(jax.random.fold_in(rng, len(self.members)), logits)
    return jax.nn.one_hot(index, len(self.members), dtype=jnp.float32)

  def loss(self, params, batch, rng, *, train=True):
    names = list(self.members)
    if self.config.mode == "sample" and self.config.sample_impl == "switch":
      select = self._selection(rng)
      shapes = {n: jax.eval_shape(lambda p, b, n=n: self._member_loss(p, b, rng, n, train),
                                  params, batch) for n in names}

      def branch(n):
        def run(p, b):
          out = {m: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes[m]) for m in names}
          out[n] = self._member_loss(p, b, rng, n, train)
          return out
        return run

      results = jax.lax.switch(jnp.argmax(select), [branch(n) for n in names], params, batch)
    else:
      results = {n: self._member_loss(params, batch, rng, n, train) for n in names}
      select = (self._selection(rng) if self.config.mode == "sample"
                else jnp.ones((len(names),), jnp.float32))
    total = jnp.zeros((), jnp.float32)
    metrics: dict = {}
    aux: dict = {}
    stats: dict = {}
    for i, n in enumerate(names):
      loss, member_metrics = results[n]
      # "sample": the drawn member's loss alone (its weight is its probability).
      w = select[i] * (self.weights[n] if self.config.mode == "all" else 1.0)
      total = total + w * loss
      for key, value in member_metrics.pop("aux_losses", {}).items():
        aux[f"{n}/{key}"] = w * jnp.asarray(value, jnp.float32)
      if "update_stats" in member_metrics:
        # Zero where the member did not run ("sample"), so post_update can tell.
        stats[n] = jax.tree.map(lambda x, s=select[i]: x * s.astype(x.dtype),
                                member_metrics.pop("update_stats"))
      member_metrics = {"loss": loss, **member_metrics}
      if self.config.mode == "sample":
        ran = select[i] > 0
        member_metrics = jax.tree.map(lambda v, r=ran: jnp.where(r, v, jnp.zeros_like(v)),
                                      member_metrics)
        member_metrics["sampled"] = select[i]
      metrics.update({f"{n}/{k}": v for k, v in member_metrics.items()})
    if stats:
      metrics["update_stats"] = {"members": stats, "selected": select}
    if aux:
      metrics["aux_losses"] = aux
    return total, metrics

  def post_update(self, params, stats, step):
    selected = None if stats is None else stats["selected"]
    member_stats = {} if stats is None else stats["members"]
    for i, (name, task) in enumerate(self.members.items()):
      s = member_stats.get(name)
      if s is None or self.config.mode == "all":
        params = self.split(task.post_update(self.view(params, name), s, step), name, params)
        continue
      # "sample": the engine averaged the stats over microbatches, zeros where
      # the member was not drawn; rescale to the mean over those it ran in,
      # and update only if it ran at all.
      frac = selected[i]
      s = jax.tree.map(lambda x, f=frac: x / jnp.maximum(f, 1e-12), s)
      params = jax.lax.cond(
          frac > 0,
          lambda p, s=s, name=name, task=task: self.split(
              task.post_update(self.view(p, name), s, step), name, p),
          lambda p: p, params)
    return params

  # --- data ---
  def source(self, split: str):
    if split != self.train_split:
      raise ValueError(f"MixtureTask.source({split!r}): a mixture reads only {self.train_split!r}"
                       "; evaluation reads each member's own splits (MixtureTask.evaluate).")
    if split not in self._sources:
      self._sources[split] = MixtureSource(
          {n: t.source(t.train_split) for n, t in self.members.items()}, self.per_row)
    return self._sources[split]

  def preprocess(self, example, rng, train):
    out = {}
    for name, task in self.members.items():
      rows = []
      for ex in example[name]:
        # One generator per member example, drawn from the item's generator in a fixed order.
        sub = np.random.default_rng(rng.integers(0, 2**63 - 1))
        rows.append(task.preprocess(ex, sub, train))
      for key in rows[0]:
        out[f"{name}/{key}"] = np.stack([np.asarray(r[key]) for r in rows])
    return out

  # --- evaluation ---
  def member_batches(self, name: str, mesh):
    """``EvalContext.batches`` for member ``name``: its source and preprocessing."""
    task = self.members[name]

    def batches(split, batch_size=None):
      size = batch_size or self._eval_batch_size or 64
      shards = sharding_lib.batch_shards(mesh) if mesh is not None else 1
      size = -(-size // shards) * shards
      sharding = (sharding_lib.batch_sharding(mesh) if mesh is not None else
                  jax.sharding.SingleDeviceSharding(jax.devices()[0]))
      for batch in data_lib.iterate_once(
          task.source(split), batch_size=size,
          transform=lambda ex, rng: task.preprocess(ex, rng, False),
          process_index=jax.process_index(), process_count=jax.process_count()):
        yield data_lib.to_global(batch, sharding)

    return batches

  def evaluate(self, params, ctx: EvalContext):
    metrics = {}
    for name, task in self.members.items():
      workdir = os.path.join(ctx.workdir, name) if ctx.workdir else ctx.workdir
      member_ctx = EvalContext(batches=self.member_batches(name, ctx.mesh), workdir=workdir,
                               step=ctx.step, mesh=ctx.mesh)
      for key, value in task.evaluate(self.view(params, name), member_ctx).items():
        metrics[f"eval/{name}/{key.removeprefix('eval/')}"] = value
    return metrics

  # --- accounting ---
  def _expected(self, per_member: dict) -> float:
    if self.config.mode == "all":
      return float(sum(self.per_row[n] * v for n, v in per_member.items()))
    total = sum(self.weights.values())
    return float(sum(self.weights[n] / total * self.per_row[n] * v
                     for n, v in per_member.items()))

  def flops_per_example(self):
    """Per mixture row: each member's FLOPs x its per_row (``sample``: expected)."""
    return self._expected({n: t.flops_per_example() for n, t in self.members.items()})

  def tokens_per_example(self):
    return int(round(self._expected({n: t.tokens_per_example() for n, t in self.members.items()})))

  # --- optimizer hooks ---
  def _member_hook(self, params, hook: str, default):
    trees, any_set = {}, False
    for name, task in self.members.items():
      view = self.view(params, name)
      tree = getattr(task, hook)(view)
      any_set = any_set or tree is not None
      trees[name] = jax.tree.map(lambda _: default, view) if tree is None else tree
    return self.combine(trees, check_equal=f"MixtureTask.{hook}") if any_set else None

  def trainable(self, params):
    return self._member_hook(params, "trainable", True)

  def weight_decay_mask(self, params):
    return self._member_hook(params, "weight_decay_mask", False)

  def learning_rate_scale(self, params):
    return self._member_hook(params, "learning_rate_scale", 1.0)

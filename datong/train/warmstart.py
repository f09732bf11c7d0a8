"""The one warm-start path: parameters started from pretrained weights.

    params = merge(params, "runs/gpt", at="encoder")          # a subtree from a run
    params = merge(params, "path/to/gpt2")                    # everything from HF
    config = RunConfig(task=WarmStartConfig(GPTTaskConfig(model=...), init="path/to/gpt2"))

A source is a local Hugging Face model directory (``config.json`` +
``model.safetensors``, read by ``datong.hf``), a Datong run's workdir (its
latest checkpoint, written on any mesh), a ``.msgpack`` of parameters, or a
params tree already in memory (``load_pretrained`` reads the first three).
``merge`` fills the subtree ``at`` of the fresh params; every pretrained
leaf must exist there with the same shape (unless ``resize`` makes it fit);
the model's other leaves (a new head) keep their fresh values. Image
encoders: ``find_encoder`` finds one inside any registered model's tree
(``datong.registry``), ``merge_encoder`` merges it with the encoder config's
``resize_param`` (position tables at a new resolution), which is how
fine-tuning (``ViTClassifierConfig.pretrained``) and CLIP
(``ClipTaskConfig.image_init``) start. ``WarmStartConfig`` wraps any task so
its whole tree starts from ``init``; only the path is stored in the run's
config, so a resumed run restores its own checkpoint as usual.

Checkpoints written before a parameter path moved still load:
``PATH_RENAMES`` maps old paths to new ones when a source is read.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import flax
import flax.linen as nn
import jax
import numpy as np

from flax.traverse_util import flatten_dict, unflatten_dict

from datong import hf, registry
from datong.params import merge_params, params_collection
from datong.train.checkpoint import load_params

# Old parameter paths -> new ones (prefixes, "/"-joined), applied to every
# source read here: a shared-backbone CLIP kept its image stem beside the
# encoder before the image-encoder protocol put it under ``image/encoder``.
PATH_RENAMES = {
    "image/stem": "image/encoder/stem",
    "image/cls": "image/encoder/cls",
    "image/pre_norm": "image/encoder/pre_norm",
}


def _renamed(params: dict) -> dict:
  """``params`` with the old paths of ``PATH_RENAMES`` moved to their new place."""
  flat = flatten_dict(params, sep="/")
  out = {}
  for path, leaf in flat.items():
    for old, new in PATH_RENAMES.items():
      if path == old or path.startswith(old + "/"):
        path = new + path[len(old):]
        break
    out[path] = leaf
  return unflatten_dict(out, sep="/")


def load_pretrained(path: str) -> dict:
  """The plain ``params`` collection (host arrays) stored at ``path``: a
  ``.msgpack`` file, a Hugging Face model directory or a Datong run's workdir."""
  if path.endswith(".msgpack"):
    if not os.path.isfile(path):
      raise ValueError(f"pretrained weights {path!r}: no such file.")
    with open(path, "rb") as f:
      params = flax.serialization.msgpack_restore(f.read())
    return _renamed(params_collection(params))
  if os.path.exists(os.path.join(path, "config.json")):
    _, params = hf.load(path)
    return jax.tree.map(np.asarray, params)
  if os.path.isdir(os.path.join(path, "checkpoints")):
    return _renamed(load_params(path))
  raise ValueError(f"pretrained weights {path!r}: not a Hugging Face model directory "
                   "(config.json), a Datong run's workdir (checkpoints/) or a .msgpack file.")


def _source(source) -> dict:
  """A plain params collection from a path or a tree."""
  if isinstance(source, (str, os.PathLike)):
    return load_pretrained(os.fspath(source))
  return _renamed(dict(params_collection(nn.unbox(source))))


def _split(at: str) -> tuple[str, ...]:
  return tuple(k for k in at.split("/") if k)


def _subtree(tree, keys: tuple[str, ...], what: str):
  for i, key in enumerate(keys):
    if not isinstance(tree, dict) or key not in tree:
      have = sorted(tree) if isinstance(tree, dict) else type(tree).__name__
      raise ValueError(f"{what} has no {'/'.join(keys[:i + 1])!r} (keys there: {have}).")
    tree = tree[key]
  return tree


def _replace(tree, keys: tuple[str, ...], value):
  if not keys:
    return value
  return {**tree, keys[0]: _replace(tree[keys[0]], keys[1:], value)}


def merge(params, source, at: str = "", *, extra: str = "error", resize=None):
  """``params`` with its subtree ``at`` filled from ``source``.

  ``params``: the fresh params collection (boxed or plain; a ``{"params":
  ...}`` wrapper is kept). ``source``: a path (see ``load_pretrained``) or
  a params tree. ``at``: a "/"-separated path (``""``: the whole tree); the
  source's subtree of the same path is used when it has one, else the whole
  source (a tree of just that part, e.g. an exported encoder). ``extra`` and
  ``resize``: as in ``datong.params.merge_params`` (``resize(path, value, shape)``).
  """
  wrapped = isinstance(params, dict) and set(params) == {"params"}
  fresh = params_collection(params)
  src = _source(source)
  keys = _split(at)
  target = _subtree(fresh, keys, "the model's params")
  try:
    src = _subtree(src, keys, "source")
  except ValueError:
    pass  # the source is that part alone
  where = "/".join(keys) + "/" if keys else ""
  merged = _replace(fresh, keys, merge_params(target, src, extra=extra, resize=resize,
                                              where=where))
  return {"params": merged} if wrapped else merged


def find_encoder(params) -> Any:
  """The image-encoder subtree of any registered model's params (a classifier,
  MAE, SimMIM, CLIP: ``registry.ModelKind.encoder_path``), or ``params``
  itself when none of those paths is there (a bare encoder, as
  ``export_encoder`` writes it)."""
  params = params_collection(params)
  paths = sorted({k.encoder_path for k in registry.KINDS.values() if k.encoder_path},
                 key=len, reverse=True)
  for path in paths:
    try:
      return _subtree(params, path, "params")
    except ValueError:
      continue
  return params


def merge_encoder(params, source, encoder_config, at: str):
  """``params`` with the image encoder at ``at`` started from the encoder in
  ``source`` (``find_encoder``): leaves only the model has (a [CLS] token an
  MAE encoder lacks) stay fresh, leaves only the source has (SimMIM's mask
  token) are dropped, and a leaf of another shape is adapted by the encoder
  config's ``resize_param`` when it has one (a position table at a new
  resolution)."""
  return merge(params, find_encoder(_source(source)), at, extra="drop",
               resize=getattr(encoder_config, "resize_param", None))


@dataclasses.dataclass(frozen=True)
class WarmStartConfig:
  """``task`` (any task config) with its parameters initialized from ``init``."""
  task: Any
  init: str

  def __post_init__(self):
    if not hasattr(self.task, "build"):
      raise ValueError(f"WarmStartConfig.task must be a task config with build(); "
                       f"got {type(self.task).__name__}.")
    if not self.init:
      raise ValueError("WarmStartConfig.init: give the path of the pretrained weights.")

  def build(self) -> "WarmStartTask":
    return WarmStartTask(self)


class WarmStartTask:
  """The wrapped task in every respect except ``init``."""

  def __init__(self, config: WarmStartConfig):
    self.config = config
    self.inner = config.task.build()
    self.pretrained = load_pretrained(config.init)

  def init(self, rng, batch):
    variables = self.inner.init(rng, batch)
    return {**variables, "params": merge(variables["params"], self.pretrained)}

  def __getattr__(self, name: str) -> Any:
    if name == "inner":  # not yet set (unpickling): no recursion
      raise AttributeError(name)
    return getattr(self.inner, name)

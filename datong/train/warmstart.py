"""Any task, initialized from pretrained weights: continued pretraining.

    config = RunConfig(task=WarmStartConfig(GPTTaskConfig(model=...), init="path/to/gpt2"))
    loop.train(config, workdir)

``init`` is a local Hugging Face model directory (``config.json`` +
``model.safetensors``, read by ``datong.hf``), a Datong run's workdir (its
latest checkpoint) or a ``.msgpack`` of parameters. Every pretrained leaf
must exist in the task's model with the same shape; the model's other leaves
(a new head) keep their fresh initialization. Only the path is stored in the
run's config, so a resumed run restores its own checkpoint as usual.

``load_pretrained`` reads all three forms; the vision and CLIP tasks read
their pretrained encoders with it too (``ViTClassifierConfig.pretrained``,
``ClipTaskConfig.image_init``). Merging is ``backbone.merge_params``.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import flax
import jax
import numpy as np

from datong.backbone import merge_params, params_collection


def load_pretrained(path: str) -> dict:
  """The plain ``params`` collection (host arrays) stored at ``path``: a
  ``.msgpack`` file, a Hugging Face model directory or a Datong run's workdir."""
  if path.endswith(".msgpack"):
    if not os.path.isfile(path):
      raise ValueError(f"pretrained weights {path!r}: no such file.")
    with open(path, "rb") as f:
      params = flax.serialization.msgpack_restore(f.read())
    return params_collection(params)
  if os.path.exists(os.path.join(path, "config.json")):
    from datong import hf  # pylint: disable=import-outside-toplevel
    _, params = hf.load(path)
    return jax.tree.map(np.asarray, params)
  if os.path.isdir(os.path.join(path, "checkpoints")):
    from datong.train.checkpoint import load_params  # pylint: disable=import-outside-toplevel
    return load_params(path)
  raise ValueError(f"pretrained weights {path!r}: not a Hugging Face model directory "
                   "(config.json), a Datong run's workdir (checkpoints/) or a .msgpack file.")


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
    return {**variables, "params": merge_params(variables["params"], self.pretrained)}

  def __getattr__(self, name: str) -> Any:
    if name == "inner":  # not yet set (unpickling): no recursion
      raise AttributeError(name)
    return getattr(self.inner, name)

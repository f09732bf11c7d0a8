"""Runs from a notebook: ``fit`` with the engine of ``datong train``, its
``FitResult``, a run's examples and tokenizer, and what trained models
predict (generated text, zero-shot classes)."""

from __future__ import annotations

import dataclasses
import os
import tempfile
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from datong.params import params_collection
from datong.notebook._common import _choices, _finish, _pyplot, _rng
from datong.notebook.models import _apply, _override


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

  def member(self, name: str) -> "MemberRun":
    """Member ``name`` of a mixture run (``unified-digits``'s ``gpt``,
    ``mae``, ``clip``, ``caption``): its task, model and params with the
    shared parts put back, for ``generate_text``, ``caption``,
    ``zero_shot_predict``, ``reconstruct``, ``examples``, ..."""
    members = getattr(self.task, "members", None)
    if members is None:
      raise TypeError(f"member({name!r}): this run's task is a {type(self.task).__name__}, not a "
                      "mixture (MixtureTaskConfig); use run.task / run.params directly.")
    if name not in members:
      raise _choices("member", name, list(members))
    return MemberRun(name, members[name], self.task.view(params_collection(self.params), name))

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


@dataclasses.dataclass
class MemberRun:
  """One member of a trained mixture (``FitResult.member``)."""
  name: str
  task: Any  # the member's Task
  params: Any  # its parameters in its own layout (shared subtrees included)

  @property
  def model(self) -> nn.Module:
    return self.task.model


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


# ------------------------------------------------- data and predictions --

def _task(task):
  if isinstance(task, (FitResult, MemberRun)):
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


def caption(model: nn.Module, params, images, *, prompt: str = "", max_new_tokens: int = 0,
            temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, tokenizer="byte",
            rng=0) -> list[str]:
  """Captions of ``images [n, h, w, c]`` (the task's input range, e.g. from
  ``examples``) by a captioner, a single-stream ``FusionModel`` or a
  ``CoCa``: ``<bos> + prompt`` then KV-cache decoding
  (``datong.multimodal.fusion.caption`` / ``coca.caption``; the image is
  encoded once) until ``<eos>``; greedy unless ``temperature > 0``.
  ``tokenizer``: as in ``generate_text`` (``tokenizer=run`` for a learned
  vocabulary). ``max_new_tokens``: 0 fills the text positions left."""
  from datong.multimodal import coca, fusion  # pylint: disable=import-outside-toplevel
  decoders = {fusion.FusionModel: fusion.caption, coca.CoCa: coca.caption}
  decode = decoders.get(type(model))
  if decode is None:
    raise TypeError(f"caption: needs a FusionModel or a CoCa (datong.build('fusion' | 'coca', "
                    f"...) or a fusion-digits / coca-digits run's model); got "
                    f"{type(model).__name__}.")
  tok = tokenizer_of(tokenizer)
  if tok.vocab_size > model.config.vocab_size:
    raise ValueError(f"caption: the tokenizer has {tok.vocab_size} ids but the model's "
                     f"vocabulary is {model.config.vocab_size}; pass the tokenizer it was "
                     "trained with (tokenizer=run, or the recipe name).")
  start = [tok.bos_id] + list(tok.encode(prompt))
  room = model.config.max_text_length - len(start)
  if room < 1:
    raise ValueError(f"caption: the prompt takes {len(start)} of the model's "
                     f"{model.config.max_text_length} text positions; shorten it.")
  images = jnp.asarray(images, jnp.float32)
  prompts = jnp.asarray(np.tile(np.asarray(start, np.int32), (images.shape[0], 1)))
  out = decode(model, nn.unbox(params_collection(params)), images, prompts, _rng(rng),
               max_new_tokens=min(max_new_tokens or room, room), eos_id=tok.eos_id,
               pad_id=tok.pad_id, temperature=temperature, top_k=top_k, top_p=top_p,
               vocab_size=tok.vocab_size)
  tokens, lengths = np.asarray(out["tokens"]), np.asarray(out["lengths"])
  return [prompt + tok.decode(tokens[i, :lengths[i]]) for i in range(images.shape[0])]


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

"""Teachers and students: a frozen or EMA teacher inside the params, and
logit distillation for ViT and GPT students.

A teacher lives in ``params["teacher"]``, a frozen subtree (``trainable``
marks it False, so it has no optimizer state and the optimizer never moves
it): it is sharded by its own logical axis names like the student,
checkpointed and restored with it, and its forward runs inside the jitted
step under ``stop_gradient``.

* A frozen teacher (``load_teacher``) comes from a Datong run's workdir
  (module rebuilt from the run's stored settings), a Hugging Face directory
  (anything ``datong.hf.load`` reads) or an exported ``.msgpack`` (then the
  teacher's settings must be given).
* An EMA teacher (``ema_teacher_update``) is a copy of the student updated
  after every optimizer step by ``Task.post_update`` with a momentum rising
  from ``m0`` to 1 on a cosine (DINO, BYOL); see ``datong.train.tasks.selfsup``.

Tasks: ``LogitDistillConfig`` wraps a ``ViTClassifierConfig`` (class logits)
or a ``GPTTaskConfig`` (every position's next-token logits; teacher and
student must share the tokenizer) student with
``alpha * T^2 KL(teacher || student) + (1 - alpha) * CE(labels)``
(``datong.ops.distill.kd_loss``). Data, preprocessing and evaluation are the
student task's own, run on the student's params. A GPT student's teacher
logits can instead be computed once over the training rows and served with
each batch (``teacher_outputs="precomputed"``,
``datong.train.tasks.teacher_outputs``); augmented image students refuse it.
"""

from __future__ import annotations

import abc
import dataclasses
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from datong import hf
from datong.ops.distill import cosine_momentum, ema_update, feature_loss, kd_loss
from datong.ops.losses import classification_loss
from datong.params import params_collection
from datong.train import warmstart
from datong.train.task import EvalContext, Task, with_aux_losses
from datong.train.tasks.images import ImageData
from datong.train.tasks.probes import ProbeConfig, probe_metrics, select_features
from datong.train.tasks.teacher_outputs import (FIELD, check_choice, precompute_logits,
                                                refuse_precomputed)
from datong.train.tasks.text import GPTTaskConfig, PackedSource
from datong.train.tasks.vision import ViTClassifierConfig, export_encoder
from datong.unimodal.encoders import DistilledClassifier, ImageClassifier, is_image_encoder
from datong.unimodal.text import GPT

FROZEN = ("teacher", "center")  # params subtrees no gradient trains


def student_params(params):
  """``params`` without the frozen subtrees (the student's own tree)."""
  return {k: v for k, v in params_collection(nn.unbox(params)).items() if k not in FROZEN}


def frozen_mask(params):
  """``Task.trainable``: False on every leaf of the ``FROZEN`` subtrees."""
  return {k: jax.tree.map(lambda _, t=(k not in FROZEN): t, v) for k, v in params.items()}


# ------------------------------------------------------- where teachers live

def stored_task(workdir: str):
  """The task config stored with a run's latest checkpoint (a warm-started
  task unwrapped)."""
  from datong.train import config as config_lib  # pylint: disable=import-outside-toplevel
  from datong.train.checkpoint import stored_run_config  # pylint: disable=import-outside-toplevel
  stored = stored_run_config(workdir)
  if not stored:
    raise ValueError(f"teacher {workdir!r}: no readable checkpoint with settings in it.")
  task = getattr(config_lib.from_json(stored), "task", None)
  return task.task if isinstance(task, warmstart.WarmStartConfig) else task


def find_encoder_config(config) -> Any:
  """The first image-encoder config inside a (task) config tree, breadth first."""
  queue = [config]
  while queue:
    node = queue.pop(0)
    if is_image_encoder(node):
      return node
    if dataclasses.is_dataclass(node):
      queue.extend(getattr(node, f.name) for f in dataclasses.fields(node))
  return None


def _kind(path: str) -> str:
  if path.endswith(".msgpack"):
    return "msgpack"
  if os.path.exists(os.path.join(path, "config.json")):
    return "hf"
  if os.path.isdir(os.path.join(path, "checkpoints")):
    return "run"
  raise ValueError(f"teacher {path!r}: not a Datong run's workdir (checkpoints/), a Hugging "
                   "Face model directory (config.json) or a .msgpack file.")


@dataclasses.dataclass
class Teacher:
  """A teacher's flax module, its pretrained ``params`` (host, plain) and
  ``settings``: the teacher's task or encoder config (None for HF)."""
  module: nn.Module
  params: Any
  settings: Any = None

  def init(self, rng, *args, **kwargs):
    """The teacher's params boxed with its logical axis names, values pretrained."""
    boxed = self.module.init(rng, *args, **kwargs)["params"]
    return warmstart.merge(boxed, self.params)

  def __call__(self, params, *args, **kwargs):
    """The teacher's output on frozen params (no gradient reaches them)."""
    params = jax.lax.stop_gradient(params_collection(nn.unbox(params)))
    return self.module.apply({"params": params}, *args, **kwargs)


def load_teacher(path: str, settings=None, *, want: str, where: str) -> Teacher:
  """The teacher at ``path`` for a student that needs ``want``:
  ``classifier`` (a ``ViTClassifierConfig`` run), ``gpt`` (a ``GPTTaskConfig``
  run) or ``encoder`` (an image encoder found in any run: ViT, MAE, CLIP).
  ``settings``: the teacher's config of that kind, needed for a ``.msgpack``
  (a run's workdir and an HF directory carry their own, which are used).
  ``where`` names the field."""
  if not path:
    raise ValueError(f"{where}: give the teacher (a run's workdir, a Hugging Face directory "
                     "or a .msgpack), e.g. --set task.teacher=/tmp/vit-digits.")
  kind = _kind(path)
  if kind == "hf":
    module, params = hf.load(path)
    if want == "encoder":
      settings = getattr(module, "config", None)
      if not is_image_encoder(settings):
        raise ValueError(f"{where}={path!r}: {type(module).__name__} is no image encoder.")
      return Teacher(settings.make(), warmstart.find_encoder(params), settings)
    return Teacher(module, jax.tree.map(jax.device_get, params), "hf:" + path)
  if kind == "run":
    stored = stored_task(path)
    settings = _settings_of(stored, want, f"{where}={path!r}")
    params = warmstart.load_pretrained(path)
  else:
    if settings is None:
      raise ValueError(f"{where}={path!r}: a .msgpack holds no settings; give the teacher's "
                       f"{_WANT[want]} as {where}_model.")
    params = warmstart.load_pretrained(path)
  if want == "encoder":
    return Teacher(settings.make(), warmstart.find_encoder(params), settings)
  if want == "classifier":
    return Teacher(ImageClassifier(settings.model, settings.num_classes), params, settings)
  return Teacher(GPT(settings.model), params, settings)


_WANT = {"classifier": "ViTClassifierConfig", "gpt": "GPTTaskConfig",
         "encoder": "image-encoder config (ViTConfig, ...)"}


def _settings_of(stored, want: str, where: str):
  if want == "encoder":
    found = find_encoder_config(stored)
    if found is None:
      raise ValueError(f"{where}: its run ({type(stored).__name__}) has no image encoder.")
    return found
  cls = ViTClassifierConfig if want == "classifier" else GPTTaskConfig
  if not isinstance(stored, cls):
    raise ValueError(f"{where}: its run trained {type(stored).__name__}; the student needs a "
                     f"{cls.__name__} teacher.")
  return stored


def ema_teacher_update(teacher, student, step, *, total_steps: int, base_momentum: float):
  """The EMA teacher after step ``step``: ``m t + (1 - m) s`` with
  ``m = cosine_momentum(step, total_steps, base_momentum)``."""
  return ema_update(teacher, student, cosine_momentum(step, total_steps, base_momentum))


# ---------------------------------------------------- a student with a teacher

class StudentWithTeacher(Task):
  """The student task ``inner`` (data, preprocessing, evaluation) with a
  frozen ``teacher`` in ``params["teacher"]``; subclasses write ``loss``."""

  def __init__(self, inner: Task, teacher: Teacher):
    self.inner, self.teacher = inner, teacher
    self.dataset = inner.dataset
    self.train_split, self.eval_split = inner.train_split, inner.eval_split

  def source(self, split):
    return self.inner.source(split)

  def preprocess(self, example, rng, train):
    return self.inner.preprocess(example, rng, train)

  def batch_spec(self, batch_size):
    return self.inner.batch_spec(batch_size)

  def tokens_per_example(self):
    return self.inner.tokens_per_example()

  @abc.abstractmethod
  def teacher_args(self, batch) -> tuple:
    """Example inputs (zeros of the batch's shapes) to build the teacher's params."""

  def init(self, rng, batch):
    student_rng, teacher_rng = jax.random.split(rng)
    variables = self.inner.init(student_rng, batch)
    teacher = self.teacher.init(teacher_rng, *self.teacher_args(batch))
    return {**variables, "params": {**variables["params"], "teacher": teacher}}

  def trainable(self, params):
    return frozen_mask(params)

  def learning_rate_scale(self, params):
    return self.inner.learning_rate_scale(params)

  def evaluate(self, params, ctx: EvalContext):
    return self.inner.evaluate(student_params(params), ctx)


@dataclasses.dataclass(frozen=True)
class LogitDistillConfig:
  """Logit distillation: ``alpha * T^2 KL + (1 - alpha) * CE`` on the labels.

  ``student``: a ``ViTClassifierConfig`` (image classes) or a
  ``GPTTaskConfig`` (next-token logits at every position; the teacher's
  tokenizer must be the student's). ``teacher``: a run's workdir of the
  same kind, a Hugging Face directory or a ``.msgpack`` with
  ``teacher_model`` (the teacher's task config) set. The student config's
  data, augmentation and evaluation are used; its label smoothing and
  mixup are not.

  ``distill_token`` (DeiT): the student ViT gets a distillation token whose
  head learns from the teacher (``T^2 KL``, weight ``alpha``) while the
  class head learns from the labels (weight ``1 - alpha``); predictions
  average the two heads' softmax.

  ``teacher_outputs``: ``in_step`` (the teacher's forward runs inside every
  jitted step) or ``precomputed`` (GPT students only: the teacher runs once
  over every training row before the first step, its logits stay on the
  host in ``teacher_dtype`` and come with each batch; the step reads them).
  ``teacher_dtype``: ``float32`` (raw logits: the in-step loss to fp32 rounding),
  ``float16`` or ``bfloat16`` (log-softmax, half the memory). ViT students
  see new augmented views every step and refuse ``precomputed``.
  """
  student: Any
  teacher: str = ""
  teacher_model: Any = None
  temperature: float = 2.0
  alpha: float = 0.5
  distill_token: bool = False  # ViT students: DeiT's distillation token and head
  teacher_outputs: str = "in_step"  # in_step | precomputed (GPT students)
  teacher_dtype: str = "float16"  # precomputed logits' host storage: float32 | float16 | bfloat16

  def __post_init__(self):
    check_choice("LogitDistillConfig", self.teacher_outputs, self.teacher_dtype)
    if self.teacher_outputs == "precomputed" and isinstance(self.student, ViTClassifierConfig):
      refuse_precomputed("LogitDistillConfig", "a ViT student")
    if self.distill_token and not (isinstance(self.student, ViTClassifierConfig)
                                   and hasattr(self.student.model, "distill_token")):
      raise ValueError("LogitDistillConfig.distill_token=True needs a ViTClassifierConfig "
                       "student on a ViTConfig encoder.")
    if not isinstance(self.student, (ViTClassifierConfig, GPTTaskConfig)):
      raise ValueError(f"LogitDistillConfig.student: a ViTClassifierConfig or GPTTaskConfig; "
                       f"got {type(self.student).__name__}.")
    if self.temperature <= 0:
      raise ValueError(f"LogitDistillConfig.temperature={self.temperature}: must be > 0.")
    if not 0.0 <= self.alpha <= 1.0:
      raise ValueError(f"LogitDistillConfig.alpha={self.alpha}: in [0, 1].")

  def build(self) -> StudentWithTeacher:
    if isinstance(self.student, ViTClassifierConfig):
      return ViTDistillTask(self)
    return GPTDistillTask(self)


class ViTDistillTask(StudentWithTeacher):
  """A ViT (any image encoder) classifier learning from a classifier teacher;
  both see the same (augmented) images."""

  def __init__(self, config: LogitDistillConfig):
    self.config = config
    student = config.student
    if config.distill_token:
      student = dataclasses.replace(student, model=student.model.replace(distill_token=True))
    inner = student.build()
    if config.distill_token:  # the student task with DeiT's two-headed classifier
      inner.model = DistilledClassifier(student.model, student.num_classes)
    teacher = load_teacher(config.teacher, config.teacher_model, want="classifier",
                           where="LogitDistillConfig.teacher")
    super().__init__(inner, teacher)

  def teacher_args(self, batch):
    return (jnp.zeros(batch["image"].shape, jnp.float32),)

  def teacher_logits(self, params, images):
    out = self.teacher(params["teacher"], images)
    return out[0] if isinstance(out, tuple) else out

  def loss(self, params, batch, rng, *, train=True):
    cfg, inner = self.config, self.inner
    drop_rng, aug_rng = jax.random.split(rng)
    images = inner.data.augment(batch["image"], aug_rng) if train else batch["image"]
    logits, aux = inner._apply(student_params(params), images, train=train,  # pylint: disable=protected-access
                               rng=drop_rng if train else None)
    teacher = self.teacher_logits(params, images)
    if cfg.distill_token:
      soft, metrics = kd_loss(aux["distill_logits"], teacher, temperature=cfg.temperature)
      hard, _ = classification_loss(aux["class_logits"], batch["label"])
      loss = cfg.alpha * soft + (1.0 - cfg.alpha) * hard
      metrics["hard"] = hard
    else:
      loss, metrics = kd_loss(logits, teacher, batch["label"], temperature=cfg.temperature,
                              alpha=cfg.alpha)
    metrics["accuracy"] = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
    metrics["teacher_accuracy"] = jnp.mean(jnp.argmax(teacher, -1) == batch["label"])
    return loss, with_aux_losses(metrics, aux)

  def flops_per_example(self):
    settings = self.teacher.settings
    teacher = (settings.model.flops_per_example() / 3
               if isinstance(settings, ViTClassifierConfig) else 0.0)
    return self.inner.flops_per_example() + teacher


class GPTDistillTask(StudentWithTeacher):
  """A GPT student learning every position's next-token distribution from a
  GPT teacher with the same tokenizer; padding positions count for nothing."""

  def __init__(self, config: LogitDistillConfig):
    self.config = config
    inner = config.student.build()
    teacher = load_teacher(config.teacher, config.teacher_model, want="gpt",
                           where="LogitDistillConfig.teacher")
    theirs = teacher.settings.tokenizer if isinstance(teacher.settings, GPTTaskConfig) \
        else teacher.settings
    if theirs != config.student.tokenizer:
      raise ValueError(f"LogitDistillConfig: the teacher's tokenizer {theirs!r} is not the "
                       f"student's {config.student.tokenizer!r}; logits over different "
                       f"vocabularies cannot be compared. Set "
                       f"task.student.tokenizer={theirs!r} (and its vocab_size).")
    self.vocab = inner.tokenizer.vocab_size  # ids past it (padding rows) are never targets
    self.precomputed = config.teacher_outputs == "precomputed"
    self._with_logits = None
    super().__init__(inner, teacher)

  def teacher_args(self, batch):
    zeros = jnp.zeros(batch["inputs"].shape, jnp.int32)
    return (zeros,)

  def source(self, split):
    """The student's rows; with ``precomputed``, the train split's rows also
    hold ``teacher_logits [n, vocab]`` (same rows, order and count: the data
    iterator's position and resume are unchanged)."""
    src = self.inner.source(split)
    if not self.precomputed or split != self.train_split:
      return src
    if self._with_logits is None:
      shape = (1,) + src.arrays["inputs"].shape[1:]
      params = nn.unbox(self.teacher.init(jax.random.PRNGKey(0), *self.teacher_args(
          {"inputs": jax.ShapeDtypeStruct(shape, jnp.int32)})))  # as in the train state
      logits = precompute_logits(self.teacher_forward, params, src.arrays, vocab=self.vocab,
                                 dtype=self.config.teacher_dtype)
      self._with_logits = PackedSource({**src.arrays, FIELD: logits})
    return self._with_logits

  def batch_spec(self, batch_size):
    spec = self.inner.batch_spec(batch_size)
    if self.precomputed:
      shape = spec["inputs"].shape + (self.vocab,)
      spec[FIELD] = jax.ShapeDtypeStruct(shape, jnp.dtype(self.config.teacher_dtype))
    return spec

  def teacher_forward(self, teacher_params, inputs, segment_ids, positions):
    """The teacher's logits ``[b, n, V]`` (``V`` its model's vocabulary)."""
    out = self.teacher(teacher_params, inputs, segment_ids=segment_ids, positions=positions)
    return out[0] if isinstance(out, tuple) else out

  def loss(self, params, batch, rng, *, train=True):
    cfg = self.config
    logits, aux = self.inner._apply(student_params(params), batch, rng, train)  # pylint: disable=protected-access
    if self.precomputed:
      if FIELD not in batch:
        raise KeyError(f"LogitDistillConfig.teacher_outputs='precomputed': the batch has no "
                       f"{FIELD!r}; batches come from task.source(train_split).")
      teacher = batch[FIELD]
    else:
      teacher = self.teacher_forward(params["teacher"], batch["inputs"], batch["segment_ids"],
                                     batch["positions"])
    weights = batch["loss_weights"] > 0
    loss, metrics = kd_loss(logits[..., :self.vocab], teacher[..., :self.vocab],
                            batch["targets"], temperature=cfg.temperature, alpha=cfg.alpha,
                            mask=weights)
    return loss, with_aux_losses(metrics, aux)

  def flops_per_example(self):
    settings = self.teacher.settings
    if self.precomputed or not isinstance(settings, GPTTaskConfig):  # no teacher in the step
      return self.inner.flops_per_example()
    m, n = settings.model, self.config.student.seq_length
    teacher = n * (m.backbone.flops_per_token(n, causal=True) + 3 * 2 * m.backbone.width
                   * m.vocab_size) / 3
    return self.inner.flops_per_example() + teacher


# ------------------------------------------------------ feature distillation

LAYERS_HELP = "'last' (the final token map) or 'layer_K' (block K's output, 0-based)"


def _layer_index(layer: str) -> int:
  """-1 for ``last``, ``K`` for ``layer_K``; a clear error otherwise."""
  if layer == "last":
    return -1
  if layer.startswith("layer_") and layer[6:].isdigit():
    return int(layer[6:])
  raise ValueError(f"FeatureDistillConfig.layer={layer!r}: give {LAYERS_HELP}.")


class TokenPredictor(nn.Module):
  """The student encoder + a linear head from its tokens to the teacher's
  width: ``images -> (pred [b, n, teacher_width], aux)``."""
  encoder: Any
  width: int

  @nn.compact
  def __call__(self, images, *, train: bool = False):
    _, aux = self.encoder.make(name="encoder")(images, train=train)
    pred = nn.Dense(self.width, dtype=jnp.float32, kernel_init=nn.with_logical_partitioning(
        nn.initializers.lecun_normal(), ("embed", None)), bias_init=nn.with_logical_partitioning(
            nn.initializers.zeros, (None,)), name="head")(aux["patch_tokens"].astype(jnp.float32))
    return pred, aux


@dataclasses.dataclass(frozen=True)
class FeatureDistillConfig:
  """Feature distillation: the student encoder's tokens predict the
  teacher's whitened token features (``layer``) through a linear head.

  ``student``: an image-encoder config; ``teacher``: a run's workdir whose
  settings hold an image encoder (ViT, MAE, SimMIM, CLIP, DINO ...), a
  Hugging Face ViT directory or an encoder ``.msgpack`` with
  ``teacher_model`` (its encoder config). Widths may differ (the head maps
  them); the teacher sees the images at its own ``image_size`` and its
  token map is resized (bilinear) to the student's grid when they differ.
  ``loss``: ``smooth_l1`` (with ``beta``) or ``cosine``. The teacher runs in
  the step (``teacher_outputs="in_step"``; ``precomputed`` is refused: the
  student's views are augmented anew every step).
  """
  student: Any
  teacher: str = ""
  teacher_model: Any = None
  layer: str = "last"
  loss: str = "smooth_l1"
  beta: float = 2.0
  data: ImageData = ImageData()
  probe: ProbeConfig = ProbeConfig()
  export_encoder: bool = True
  teacher_outputs: str = "in_step"  # the only exact choice: the views are augmented per step

  def __post_init__(self):
    check_choice("FeatureDistillConfig", self.teacher_outputs)
    if self.teacher_outputs == "precomputed":
      refuse_precomputed("FeatureDistillConfig", "the student encoder")
    _layer_index(self.layer)
    if self.loss not in ("smooth_l1", "cosine"):
      raise ValueError(f"FeatureDistillConfig.loss={self.loss!r}: 'smooth_l1' or 'cosine'.")
    if self.beta <= 0:
      raise ValueError(f"FeatureDistillConfig.beta={self.beta}: must be > 0.")

  def build(self) -> "FeatureDistillTask":
    return FeatureDistillTask(self)


class FeatureDistillTask(Task):

  def __init__(self, config: FeatureDistillConfig):
    if not is_image_encoder(config.student):
      raise ValueError(f"FeatureDistillConfig.student: an image-encoder config (ViTConfig, ...); "
                       f"got {type(config.student).__name__}.")
    self.config = config
    self.data, self.probe = config.data, config.probe
    self.dataset = self.data.dataset
    self.teacher = load_teacher(config.teacher, config.teacher_model, want="encoder",
                                where="FeatureDistillConfig.teacher")
    settings = self.teacher.settings
    layer = _layer_index(config.layer)
    depth = getattr(settings, "depth", None)
    if layer >= 0 and (depth is None or layer >= depth):
      raise ValueError(f"FeatureDistillConfig.layer={config.layer!r}: the teacher has "
                       f"{depth} blocks; give {LAYERS_HELP}.")
    self.layer = layer
    self.model = TokenPredictor(config.student, settings.width)

  def preprocess(self, example, rng, train):
    return self.data(example, rng, train)

  def batch_spec(self, batch_size):
    h, w = self.config.student.image_size
    return {"image": jax.ShapeDtypeStruct((batch_size, h, w, self.config.student.channels),
                                          jnp.float32),
            "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32)}

  def _teacher_images(self, images):
    size = tuple(self.teacher.settings.image_size)
    if tuple(images.shape[1:3]) == size:
      return images
    return jax.image.resize(images, images.shape[:1] + size + images.shape[3:], "linear")

  def init(self, rng, batch):
    student_rng, teacher_rng = jax.random.split(rng)
    images = jnp.zeros(batch["image"].shape, jnp.float32)
    variables = self.model.init(student_rng, images)
    teacher = self.teacher.init(teacher_rng, self._teacher_images(images))
    return {**variables, "params": {**variables["params"], "teacher": teacher}}

  def trainable(self, params):
    return frozen_mask(params)

  def teacher_tokens(self, params, images, grid):
    """The teacher's token features ``[b, grid_h * grid_w, teacher_width]``."""
    _, aux = self.teacher(params["teacher"], self._teacher_images(images),
                          return_layers=self.layer >= 0)
    tokens = aux["patch_tokens"]
    if self.layer >= 0:
      tokens = aux["layers"][self.layer][:, -tokens.shape[1]:]
    b, n, w = tokens.shape
    tg = self.teacher.settings.grid
    if tuple(tg) != tuple(grid):
      tokens = jax.image.resize(tokens.reshape(b, *tg, w), (b, *grid, w), "linear")
    return tokens.reshape(b, -1, w).astype(jnp.float32)

  def loss(self, params, batch, rng, *, train=True):
    cfg = self.config
    drop_rng, aug_rng = jax.random.split(rng)
    images = self.data.augment(batch["image"], aug_rng) if train else batch["image"]
    pred, aux = self.model.apply({"params": student_params(params)}, images, train=train,
                                 rngs={"dropout": drop_rng})
    target = self.teacher_tokens(params, images, cfg.student.grid)
    loss, metrics = feature_loss(pred, target, kind=cfg.loss, beta=cfg.beta)
    return loss, with_aux_losses({"loss": loss, **metrics}, aux)

  def evaluate(self, params, ctx: EvalContext):
    params = student_params(params)
    which = self.probe.features

    def features(p, images):
      _, aux = self.config.student.make().apply({"params": p["encoder"]}, images)
      return {"": select_features(aux, which, self.probe.token_pool)}

    metrics = probe_metrics(jax.jit(features), params, ctx, self.probe, self.train_split,
                            self.eval_split,
                            jax.jit(self.data.augment) if self.data.augments else None)
    if self.config.export_encoder and ctx.workdir and jax.process_index() == 0:
      export_encoder(params, ctx.workdir)
    return metrics

  def tokens_per_example(self):
    return self.config.student.num_tokens

  def flops_per_example(self):
    student, teacher = self.config.student, self.teacher.settings
    head = 3 * 2 * student.num_tokens * student.width * teacher.width
    return float(student.flops_per_example() + head + teacher.flops_per_example() / 3)

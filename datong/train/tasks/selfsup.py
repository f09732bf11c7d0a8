"""Self-supervised image objectives on augmented views: SimCLR and DINO.

* ``SimCLRConfig``: two views per image (``ViewData``), encoder + projection
  MLP, NT-Xent over the global batch
  (``datong.multimodal.contrastive.nt_xent_loss``: under jit with a
  batch-sharded input the ``[2b, 2b]`` similarities span every device).
* ``DINOConfig``: a student (encoder + DINO head) sees every view, global
  and local (multi-crop, the local ones at a lower resolution: the ViT
  interpolates its position table); an EMA teacher of the same shape, kept
  frozen in ``params["teacher"]``, sees the global ones, centered by
  ``params["center"]`` and sharpened by a low temperature
  (``datong.ops.distill.dino_loss``). ``post_update`` moves the teacher
  towards the student with a momentum rising from ``teacher_momentum`` to 1
  on a cosine over ``momentum_steps``, and the center towards the teacher's
  batch mean output (``center_momentum``).

Both evaluate like MAE: a linear probe and k-NN on the frozen encoder's
features (``datong.train.tasks.probes``), and export the encoder to
``<workdir>/encoder_params.msgpack``.
"""

from __future__ import annotations

import dataclasses
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from datong.multimodal.contrastive import nt_xent_loss
from datong.ops.distill import dino_loss, ema_update
from datong.train.task import EvalContext, Task, with_aux_losses
from datong.train.tasks.distill import ema_teacher_update, frozen_mask, student_params
from datong.train.tasks.probes import ProbeConfig, probe_metrics, select_features
from datong.train.tasks.views import ViewData
from datong.train.tasks.vision import export_encoder
from datong.unimodal.encoders import encoder_attention_maps
from datong.unimodal.igpt import save_image_grid
from datong.unimodal.selfsup import SelfSupConfig, SelfSupModel


def _views(x):
  """``[b, v, h, w, c]`` -> ``[v * b, h, w, c]`` (view-major)."""
  return jnp.swapaxes(x, 0, 1).reshape((-1,) + x.shape[2:])


class _ViewTask(Task):
  """Shared data, probes and accounting of the view-based objectives."""

  def __init__(self, config, where: str):
    self.config = config
    model, data = config.model, config.data
    if tuple(model.encoder.image_size) != tuple(data.global_size):
      raise ValueError(f"{where}: model.encoder.image_size {tuple(model.encoder.image_size)} != "
                       f"data.global_size {tuple(data.global_size)}; make them equal.")
    self.dataset = data.dataset
    self.model = SelfSupModel(model)

  def preprocess(self, example, rng, train):
    return self.config.data(example, rng, train)

  def batch_spec(self, batch_size):
    d, c = self.config.data, self.config.model.encoder.channels
    spec = {"global": jax.ShapeDtypeStruct((batch_size, d.global_views) + d.global_size + (c,),
                                           jnp.float32),
            "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32)}
    if d.local_views:
      spec["local"] = jax.ShapeDtypeStruct((batch_size, d.local_views) + d.local_size + (c,),
                                           jnp.float32)
    return spec

  def apply(self, params, images, train, rng=None):
    rngs = {"dropout": rng} if rng is not None else {}
    return self.model.apply({"params": params}, images, train=train, rngs=rngs)

  def evaluate(self, params, ctx: EvalContext):
    which = self.config.probe.features
    params = student_params(params)

    def features(p, images):
      _, aux = self.config.model.encoder.make().apply({"params": p["encoder"]}, images)
      return {"": select_features(aux, which, self.config.probe.token_pool)}

    metrics = probe_metrics(jax.jit(features), params, ctx, self.config.probe,
                            self.train_split, self.eval_split)
    if ctx.workdir and jax.process_index() == 0:
      if self.config.export_encoder:
        export_encoder(params, ctx.workdir)
      if self.config.attention_png:
        images = np.asarray(next(iter(ctx.batches(self.eval_split)))["image"])
        self.attention_png(params["encoder"], images[:self.config.attention_png],
                           os.path.join(ctx.workdir, f"attention_step{ctx.step}.png"))
    return metrics

  def attention_png(self, encoder_params, images, path: str) -> str:
    """A PNG of ``images`` (top row) over the last layer's attention map of
    each head (a row per head; each tile scaled to its own min..max): DINO's
    "where the model looks" figure, for any view-based encoder."""
    maps = encoder_attention_maps(self.config.model.encoder, encoder_params, images)
    n, heads, gh, gw = maps.shape
    h, w = images.shape[1:3]
    tiles = np.repeat(np.repeat(maps, h // gh, axis=2), w // gw, axis=3)  # [n, heads, h, w]
    lo = tiles.min(axis=(2, 3), keepdims=True)
    hi = tiles.max(axis=(2, 3), keepdims=True)
    tiles = 2 * (tiles - lo) / np.maximum(hi - lo, 1e-12) - 1
    tiles = np.repeat(np.swapaxes(tiles, 0, 1)[..., None], images.shape[-1], axis=-1)
    rows = np.concatenate([np.clip(images, -1, 1)[None], tiles]).reshape((-1, h, w, images.shape[-1]))
    return save_image_grid(path, rows, cols=n)

  def tokens_per_example(self):
    d = self.config.data
    return self.config.model.encoder.num_tokens * (d.global_views + d.local_views)

  def _view_flops(self, views: int, size) -> float:
    """Training FLOPs of ``views`` views at ``size``: the encoder's, scaled by
    the pixel count (linear in tokens: attention's share is small here)."""
    gh, gw = self.config.data.global_size
    return views * self.config.model.encoder.flops_per_example() * size[0] * size[1] / (gh * gw)


# ------------------------------------------------------------------- SimCLR

@dataclasses.dataclass(frozen=True)
class SimCLRConfig:
  """SimCLR: NT-Xent at ``temperature`` between two views of each image."""
  model: SelfSupConfig
  data: ViewData = ViewData()
  temperature: float = 0.2
  probe: ProbeConfig = ProbeConfig()
  export_encoder: bool = True
  attention_png: int = 8  # test images in the attention-map PNG (0: none)

  def __post_init__(self):
    if self.model.head != "simclr":
      raise ValueError(f"SimCLRConfig.model.head={self.model.head!r}: use 'simclr'.")
    if self.data.global_views != 2 or self.data.local_views:
      raise ValueError(f"SimCLRConfig.data: two global views and no local ones "
                       f"(got {self.data.global_views} and {self.data.local_views}).")
    if self.temperature <= 0:
      raise ValueError(f"SimCLRConfig.temperature={self.temperature}: must be > 0.")

  def build(self) -> "SimCLRTask":
    return SimCLRTask(self)


class SimCLRTask(_ViewTask):

  def __init__(self, config: SimCLRConfig):
    super().__init__(config, "SimCLRConfig")

  def init(self, rng, batch):
    return self.model.init(rng, jnp.zeros(batch["global"].shape[:1] + batch["global"].shape[2:]))

  def loss(self, params, batch, rng, *, train=True):
    b = batch["global"].shape[0]
    z, aux = self.apply(params, _views(batch["global"]), train, rng if train else None)
    loss, metrics = nt_xent_loss(z[:b], z[b:], self.config.temperature)
    return loss, with_aux_losses({"loss": loss, **metrics}, aux)

  def flops_per_example(self):
    m = self.config.model
    head = 3 * 2 * (m.encoder.width * m.hidden + m.hidden * m.out_dim)
    return float(self._view_flops(2, self.config.data.global_size) + 2 * head)


# --------------------------------------------------------------------- DINO

@dataclasses.dataclass(frozen=True)
class DINOConfig:
  """DINO: a student and its EMA teacher, centering and sharpening, multi-crop.

  ``momentum_steps``: the steps over which the teacher's momentum rises
  from ``teacher_momentum`` to 1 (the run's ``train.steps``).
  ``warmup_teacher_temperature`` (None: none): the teacher's temperature at
  step 0, moving linearly to ``teacher_temperature`` at
  ``teacher_temperature_steps`` (DINO: 0.04 -> 0.07 over 30 epochs).
  ``freeze_prototypes_steps``: steps during which the student's prototypes
  (the head's last layer) get no gradient (decoupled weight decay still
  scales them, which their weight normalization ignores).
  """
  model: SelfSupConfig
  data: ViewData = ViewData(local_views=4)
  momentum_steps: int = 1000
  teacher_momentum: float = 0.996
  center_momentum: float = 0.9
  student_temperature: float = 0.1
  teacher_temperature: float = 0.04
  warmup_teacher_temperature: float | None = None
  teacher_temperature_steps: int = 0
  freeze_prototypes_steps: int = 0
  probe: ProbeConfig = ProbeConfig()
  export_encoder: bool = True
  attention_png: int = 8  # test images in the attention-map PNG (0: none)

  def __post_init__(self):
    if self.model.head != "dino":
      raise ValueError(f"DINOConfig.model.head={self.model.head!r}: use 'dino'.")
    if self.momentum_steps < 1:
      raise ValueError(f"DINOConfig.momentum_steps={self.momentum_steps}: set it to train.steps.")
    for name in ("teacher_momentum", "center_momentum"):
      if not 0.0 <= getattr(self, name) < 1.0:
        raise ValueError(f"DINOConfig.{name}={getattr(self, name)}: in [0, 1).")
    for name in ("student_temperature", "teacher_temperature", "warmup_teacher_temperature"):
      if getattr(self, name) is not None and getattr(self, name) <= 0:
        raise ValueError(f"DINOConfig.{name}={getattr(self, name)}: must be > 0.")
    for name in ("teacher_temperature_steps", "freeze_prototypes_steps"):
      if getattr(self, name) < 0:
        raise ValueError(f"DINOConfig.{name}={getattr(self, name)}: must be >= 0.")

  def teacher_temperature_at(self, step):
    """The teacher's temperature at ``step``: ``warmup_teacher_temperature``
    at 0, linear to ``teacher_temperature`` at ``teacher_temperature_steps``,
    constant after (and throughout without a warmup)."""
    if self.warmup_teacher_temperature is None or self.teacher_temperature_steps == 0:
      return jnp.asarray(self.teacher_temperature, jnp.float32)
    frac = jnp.clip(jnp.asarray(step, jnp.float32) / self.teacher_temperature_steps, 0.0, 1.0)
    return self.warmup_teacher_temperature + frac * (self.teacher_temperature -
                                                     self.warmup_teacher_temperature)

  def build(self) -> "DINOTask":
    return DINOTask(self)


class DINOTask(_ViewTask):

  def __init__(self, config: DINOConfig):
    super().__init__(config, "DINOConfig")

  def init(self, rng, batch):
    g = batch["global"].shape
    variables = self.model.init(rng, jnp.zeros(g[:1] + g[2:]))
    student = variables["params"]
    # The teacher starts as an exact copy of the student; the center at 0.
    center = {"mean": nn.Partitioned(jnp.zeros((self.config.model.out_dim,), jnp.float32),
                                     names=(None,)),
              "step": nn.Partitioned(jnp.zeros((), jnp.float32), names=())}
    return {**variables, "params": {**student, "teacher": jax.tree.map(jnp.copy, student),
                                    "center": center}}

  def trainable(self, params):
    return frozen_mask(params)

  def loss(self, params, batch, rng, *, train=True):
    cfg = self.config
    global_rng, local_rng = jax.random.split(rng)
    student = student_params(params)
    step = params["center"]["step"]
    if cfg.freeze_prototypes_steps:
      head = student["head"]
      kernel = head["prototypes"]["kernel"]
      kernel = jnp.where(step < cfg.freeze_prototypes_steps, jax.lax.stop_gradient(kernel), kernel)
      prototypes = {**head["prototypes"], "kernel": kernel}
      student = {**student, "head": {**head, "prototypes": prototypes}}
    teacher = jax.lax.stop_gradient(params["teacher"])
    b, v = batch["global"].shape[:2]
    global_views = _views(batch["global"])
    out, aux = self.apply(student, global_views, train, global_rng if train else None)
    outs = [out.reshape(v, b, -1)]
    if "local" in batch:
      local, _ = self.apply(student, _views(batch["local"]), train, local_rng if train else None)
      outs.append(local.reshape(batch["local"].shape[1], b, -1))
    t, _ = self.apply(teacher, global_views, False)
    temperature = cfg.teacher_temperature_at(step)
    loss, metrics = dino_loss(jnp.concatenate(outs), t.reshape(v, b, -1), params["center"]["mean"],
                              student_temperature=cfg.student_temperature,
                              teacher_temperature=temperature)
    out = {"loss": loss, "teacher_entropy": metrics["teacher_entropy"],
           "teacher_temperature": temperature,
           "update_stats": {"teacher_mean": metrics["teacher_mean"]}}
    return loss, with_aux_losses(out, aux)

  def post_update(self, params, stats, step):
    cfg = self.config
    teacher = ema_teacher_update(params["teacher"], student_params(params), step,
                                 total_steps=cfg.momentum_steps,
                                 base_momentum=cfg.teacher_momentum)
    center = {"mean": ema_update(params["center"]["mean"], stats["teacher_mean"],
                                 cfg.center_momentum),
              "step": jnp.asarray(step + 1, jnp.float32)}
    return {**params, "teacher": teacher, "center": center}

  def flops_per_example(self):
    d = self.config.data
    student = self._view_flops(d.global_views, d.global_size) + \
        self._view_flops(d.local_views, d.local_size)
    return float(student + self._view_flops(d.global_views, d.global_size) / 3)

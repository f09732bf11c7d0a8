"""Image objectives as engine ``Task``s, and their evaluation.

* ``ImageData``: decode / upsample / augment (random shifts, small rotations
  and scalings) / normalize, per example on the host.
* ``ViTClassifierConfig`` -> ``ViTClassifierTask``: supervised ViT with label
  smoothing and optional mixup; with ``pretrained`` set it is fine-tuning
  of an MAE/SimMIM encoder with layer-wise learning-rate decay
  (``learning_rate_scale``). Reports ``eval/accuracy``.
* ``MAETaskConfig`` / ``SimMIMTaskConfig``: masked-image pretraining;
  evaluation is a linear probe (logistic regression on frozen pooled
  features, fit on train, scored on test) and k-NN accuracy; MAE also writes
  a PNG of reconstructions. Both export the encoder's parameters to
  ``<workdir>/encoder_params.msgpack`` for fine-tuning.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import warnings
from typing import Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from datong.backbone import params_collection
from datong.train.task import EvalContext, Task, path_names, transformer_flops_per_token
from datong.unimodal import masked_image as mim
from datong.unimodal.vision import (ViTClassifier, ViTConfig, ViTEncoder, find_encoder,
                                   merge_encoder)

ENCODER_EXPORT = "encoder_params.msgpack"


# --------------------------------------------------------------------- data

@dataclasses.dataclass(frozen=True)
class ImageData:
  """Image preprocessing (host, per example) and augmentation (device, per batch).

  Host: uint8 ``[h, w, c]`` -> (train only) random integer shift by up to
  ``crop_pad`` pixels (zero padding + random crop: no resampling blur, the
  augmentation that helps most on digits) -> bilinear upsampling by
  ``upsample`` -> ``(x / 255 - 0.5) / 0.5`` in ``[-1, 1]``. Device, training only
  (``augment``, called inside the jitted loss because per-example scipy on
  the host costs more than the step of a small model): a random affine map
  per image: translation up to ``shift`` pixels (of the upsampled image),
  rotation up to ``rotate`` degrees, scaling by ``1 +- scale``; bilinear,
  filled with the background value -1 (black).
  """
  dataset: str = "digits"
  image_key: str = "image"
  label_key: str = "label"
  upsample: int = 1
  crop_pad: int = 0
  shift: float = 0.0
  rotate: float = 0.0
  scale: float = 0.0

  def __post_init__(self):
    if self.upsample < 1:
      raise ValueError(f"ImageData.upsample={self.upsample}: must be >= 1.")
    for f in ("crop_pad", "shift", "rotate", "scale"):
      if getattr(self, f) < 0:
        raise ValueError(f"ImageData.{f}={getattr(self, f)}: must be >= 0.")

  def output_size(self, size: tuple[int, int]) -> tuple[int, int]:
    return size[0] * self.upsample, size[1] * self.upsample

  def __call__(self, example: dict, rng: np.random.Generator, train: bool) -> dict:
    image = np.asarray(example[self.image_key], np.float32)
    if image.ndim == 2:
      image = image[..., None]
    if train and self.crop_pad:
      image = random_crop(image, rng, self.crop_pad)
    if self.upsample > 1:
      image = upsample_bilinear(image, self.upsample)
    out = {"image": ((image / 255.0 - 0.5) / 0.5).astype(np.float32)}
    if self.label_key in example:
      out["label"] = np.int32(example[self.label_key])
    return out

  @property
  def augments(self) -> bool:
    return bool(self.shift or self.rotate or self.scale)

  def augment(self, images, rng):
    """``[b, h, w, c]`` -> randomly transformed images (identity if no augmentation)."""
    if not self.augments:
      return images
    return random_affine(images, rng, shift=self.shift, rotate=self.rotate, scale=self.scale)


def random_crop(image: np.ndarray, rng: np.random.Generator, pad: int) -> np.ndarray:
  """Shift ``[h, w, c]`` by a random integer offset in ``[-pad, pad]``^2, zero fill."""
  h, w, _ = image.shape
  padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)))
  y, x = rng.integers(0, 2 * pad + 1, size=2)
  return padded[y:y + h, x:x + w]


@functools.lru_cache(maxsize=16)
def _interp_matrix(n: int, factor: int) -> np.ndarray:
  """``[n * factor, n]`` bilinear upsampling weights, pixel centers aligned, edges clamped."""
  pos = np.clip((np.arange(n * factor) + 0.5) / factor - 0.5, 0, n - 1)
  lo = np.floor(pos).astype(int)
  hi = np.minimum(lo + 1, n - 1)
  frac = pos - lo
  m = np.zeros((n * factor, n), np.float32)
  m[np.arange(n * factor), lo] += 1 - frac
  m[np.arange(n * factor), hi] += frac
  return m


def upsample_bilinear(image: np.ndarray, factor: int) -> np.ndarray:
  """``[h, w, c]`` -> ``[h*factor, w*factor, c]`` (numpy, bilinear)."""
  h, w, _ = image.shape
  rows, cols = _interp_matrix(h, factor), _interp_matrix(w, factor)
  return np.stack([rows @ image[..., k] @ cols.T for k in range(image.shape[-1])],
                  axis=-1).astype(np.float32)


def random_affine(images, rng, *, shift: float = 0.0, rotate: float = 0.0,
                  scale: float = 0.0, fill: float = -1.0):
  """Per-image random translation / rotation / scaling about the center (jax).

  ``images [b, h, w, c]``; bilinear sampling, ``fill`` outside the image.
  """
  b, h, w, c = images.shape
  k_angle, k_scale, k_shift = jax.random.split(rng, 3)
  angle = jnp.deg2rad(jax.random.uniform(k_angle, (b,), minval=-rotate, maxval=rotate))
  s = jax.random.uniform(k_scale, (b,), minval=1.0 - scale, maxval=1.0 + scale)
  t = jax.random.uniform(k_shift, (b, 2), minval=-shift, maxval=shift)
  cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
  yy, xx = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32),
                        indexing="ij")
  # Output pixel o samples the input at R(-angle) / s @ (o - center - t) + center.
  cos = (jnp.cos(angle) / s)[:, None, None]
  sin = (jnp.sin(angle) / s)[:, None, None]
  dy = yy[None] - cy - t[:, 0, None, None]
  dx = xx[None] - cx - t[:, 1, None, None]
  src_y = cos * dy - sin * dx + cy
  src_x = sin * dy + cos * dx + cx

  def sample(img, sy, sx):  # img [h, w, c]; sy, sx [h, w]
    y0, x0 = jnp.floor(sy), jnp.floor(sx)
    out = 0.0
    for oy in (0, 1):
      for ox in (0, 1):
        yi, xi = y0 + oy, x0 + ox
        wgt = (1 - jnp.abs(sy - yi)) * (1 - jnp.abs(sx - xi))
        inside = (yi >= 0) & (yi <= h - 1) & (xi >= 0) & (xi <= w - 1)
        val = img[jnp.clip(yi, 0, h - 1).astype(jnp.int32), jnp.clip(xi, 0, w - 1).astype(jnp.int32)]
        out = out + (wgt * inside)[..., None] * val + (wgt * ~inside)[..., None] * fill
    return out

  return jax.vmap(sample)(images.astype(jnp.float32), src_y, src_x).astype(images.dtype)


def shift_images(images, dy: int, dx: int, fill: float = -1.0):
  """Shift ``[b, h, w, c]`` by whole pixels (positive: down / right), ``fill`` in."""
  b, h, w, c = images.shape
  pad = max(abs(dy), abs(dx))
  if pad == 0:
    return images
  padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), constant_values=fill)
  return jax.lax.dynamic_slice(padded, (0, pad - dy, pad - dx, 0), (b, h, w, c))


def _unbox(params):
  return params_collection(nn.unbox(params))


def _real_rows(batch) -> np.ndarray:
  return np.asarray(batch["mask"], bool) if "mask" in batch else \
      np.ones(len(np.asarray(batch["image"])), bool)


# --------------------------------------------------------------- evaluation

FEATURES = ("pooled", "cls", "gap", "cls+gap", "layers", "tokens")


@dataclasses.dataclass(frozen=True)
class ProbeConfig:
  """Frozen-feature evaluation: logistic regression and k-NN.

  ``features``: ``pooled`` (the encoder's pooling), ``cls``, ``gap``,
  ``cls+gap`` (concatenated), ``layers`` (the mean patch token of every
  block, concatenated with cls+gap), or ``tokens`` (every patch token of the
  last block, flattened in image order: a probe that keeps the spatial map). Features are standardized with train
  statistics; ``c`` is the inverse L2 strength of the logistic regression
  (0: chosen by 3-fold cross-validation on the train features).
  ``train_views``: the probe is fit on the train images plus
  ``train_views - 1`` randomly augmented copies (the task's ``ImageData``
  augmentation, fixed keys), as MAE's linear probe trains with augmentation;
  the encoder stays frozen and test images are never augmented.
  """
  features: str = "pooled"
  c: float = 1.0
  train_views: int = 1
  max_iter: int = 2000
  knn_k: int = 5
  batch_size: int = 256  # feature extraction batch (rounded up by the engine)

  def __post_init__(self):
    if self.features not in FEATURES:
      raise ValueError(f"ProbeConfig.features={self.features!r}: choose one of {FEATURES}.")
    if self.c < 0:
      raise ValueError(f"ProbeConfig.c={self.c}: must be >= 0 (0: cross-validated).")
    if self.train_views < 1:
      raise ValueError(f"ProbeConfig.train_views={self.train_views}: must be >= 1 "
                       f"(1: the train images only).")


def select_features(aux: dict, which: str, has_cls: bool):
  """Pick probe features from a ``ViTEncoder`` aux dict."""
  gap = jnp.mean(aux["patch_tokens"], axis=1)
  cls = aux["encoded"][:, 0] if has_cls else gap
  if which == "pooled":
    return aux["pooled"]
  if which == "cls":
    return cls
  if which == "gap":
    return gap
  if which == "tokens":
    tokens = aux["patch_tokens"]
    return tokens.reshape(tokens.shape[0], -1)
  if which == "layers":
    prefix = int(has_cls)
    per_layer = [jnp.mean(layer[:, prefix:], axis=1) for layer in aux["layers"]]
    return jnp.concatenate(per_layer + [cls, gap], axis=-1)
  return jnp.concatenate([cls, gap], axis=-1)


def extract_features(feature_fn, params, batches, augment=None, rng=None):
  """Run ``feature_fn(params, images) -> {name: [b, d]}`` over padded batches.

  With ``augment(images, rng)``, batch ``i``'s images are first augmented
  with ``fold_in(rng, i)``. Returns ``({name: features [n, d] float32},
  labels [n])`` of the real rows.
  """
  feats, labels = {}, []
  for i, batch in enumerate(batches):
    real = _real_rows(batch)
    images = batch["image"]
    if augment is not None:
      images = augment(images, jax.random.fold_in(rng, i))
    out = jax.device_get(feature_fn(params, images))
    for name, f in out.items():
      feats.setdefault(name, []).append(np.asarray(f, np.float32)[real])
    labels.append(np.asarray(batch["label"])[real])
  return {k: np.concatenate(v) for k, v in feats.items()}, np.concatenate(labels)


def linear_probe(train_x, train_y, test_x, test_y, *, c: float = 1.0,
                 max_iter: int = 2000, groups=None) -> float:
  """Accuracy of a logistic regression fit on standardized train features.

  ``c=0`` picks the L2 strength by 3-fold cross-validation; ``groups`` (one
  id per train row, e.g. the source image of each augmented view) keeps a
  group inside one fold, so views of one image never score each other.
  """
  from sklearn import linear_model, model_selection  # pylint: disable=import-outside-toplevel
  mean, std = train_x.mean(0), train_x.std(0) + 1e-6
  if c > 0:
    clf = linear_model.LogisticRegression(C=c, max_iter=max_iter)
  else:
    folds = 3 if groups is None else list(model_selection.GroupKFold(3).split(
        train_x, train_y, groups))
    # Folds score accuracy (sklearn 1.11 changes the default to log loss).
    clf = linear_model.LogisticRegressionCV(Cs=[0.01, 0.03, 0.1, 0.3, 1.0], cv=folds,
                                            max_iter=max_iter, scoring="accuracy")
  with warnings.catch_warnings():  # sklearn >= 1.8: attributes we never read, and
    # l1_ratios' default becoming (0.0,), the pure L2 penalty it already is.
    warnings.filterwarnings("ignore", "The fitted attributes of LogisticRegressionCV",
                            FutureWarning)
    warnings.filterwarnings("ignore", "The default value for l1_ratios", FutureWarning)
    clf.fit((train_x - mean) / std, train_y)
  return float(np.mean(clf.predict((test_x - mean) / std) == test_y))


def knn_accuracy(train_x, train_y, test_x, test_y, *, k: int = 5,
                 num_classes: Optional[int] = None) -> float:
  """Cosine-similarity k-NN accuracy (majority vote, ties by similarity sum)."""
  a = train_x / (np.linalg.norm(train_x, axis=1, keepdims=True) + 1e-8)
  b = test_x / (np.linalg.norm(test_x, axis=1, keepdims=True) + 1e-8)
  sim = b @ a.T
  k = min(k, len(train_x))
  nn_idx = np.argsort(-sim, axis=1)[:, :k]
  num_classes = int(max(train_y.max(), test_y.max())) + 1 if num_classes is None else num_classes
  votes = np.zeros((len(test_x), num_classes))
  for j in range(k):
    # One vote per neighbour, plus a tiny similarity term to break ties.
    np.add.at(votes, (np.arange(len(test_x)), train_y[nn_idx[:, j]]),
              1.0 + 1e-3 * sim[np.arange(len(test_x)), nn_idx[:, j]])
  return float(np.mean(votes.argmax(1) == test_y))


def probe_metrics(feature_fn, params, ctx: EvalContext, probe: ProbeConfig,
                  train_split: str, eval_split: str, augment=None) -> dict:
  """``eval/{name}linear_probe_accuracy`` and ``eval/{name}knn_accuracy`` for
  every feature set ``name`` of ``feature_fn(params, images) -> {name: [b, d]}``.

  ``augment(images, rng)`` makes the ``probe.train_views - 1`` extra views.
  """
  views = [extract_features(feature_fn, params, ctx.batches(train_split, probe.batch_size))]
  if probe.train_views > 1 and augment is None:
    raise ValueError(f"ProbeConfig.train_views={probe.train_views} needs an augmentation; "
                     f"this task has none.")
  for v in range(1, probe.train_views):
    views.append(extract_features(feature_fn, params, ctx.batches(train_split, probe.batch_size),
                                  augment, jax.random.PRNGKey(v)))
  tx = {k: np.concatenate([f[k] for f, _ in views]) for k in views[0][0]}
  ty = np.concatenate([y for _, y in views])
  image_ids = np.tile(np.arange(len(views[0][1])), len(views))
  vx, vy = extract_features(feature_fn, params, ctx.batches(eval_split, probe.batch_size))
  metrics = {}
  for name in tx:
    metrics[f"eval/{name}linear_probe_accuracy"] = linear_probe(
        tx[name], ty, vx[name], vy, c=probe.c, max_iter=probe.max_iter,
        groups=image_ids if probe.train_views > 1 else None)
    metrics[f"eval/{name}knn_accuracy"] = knn_accuracy(tx[name], ty, vx[name], vy, k=probe.knn_k)
  return metrics


def export_encoder(params, workdir: str, name: str = ENCODER_EXPORT) -> str:
  """Write the ``encoder`` subtree of ``params`` as msgpack; returns the path."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, name)
  state = jax.tree.map(np.asarray, jax.device_get(_unbox(params)["encoder"]))
  with open(path, "wb") as f:
    f.write(flax.serialization.msgpack_serialize(state))
  return path


# ------------------------------------------------------------------- shared

def _spec(batch_size: int, model: ViTConfig, labels: bool = True) -> dict:
  h, w = model.image_size
  spec = {"image": jax.ShapeDtypeStruct((batch_size, h, w, model.channels), jnp.float32)}
  if labels:
    spec["label"] = jax.ShapeDtypeStruct((batch_size,), jnp.int32)
  return spec


def _check_sizes(model: ViTConfig, data: ImageData, native=(8, 8)):
  """The model's image_size must be what the preprocessing produces (digits: 8x8)."""
  if data.dataset == "digits" and tuple(model.image_size) != data.output_size(native):
    raise ValueError(f"model image_size {model.image_size} != digits {native} x "
                     f"upsample {data.upsample} = {data.output_size(native)}.")


def vit_flops_per_example(model: ViTConfig, length: Optional[int] = None) -> float:
  """Training FLOPs (fwd + bwd) of one encoder pass over ``length`` tokens."""
  bb = model.backbone
  n = model.num_patches + int(model.has_cls) if length is None else length
  per_token = transformer_flops_per_token(
      bb.width, bb.depth, bb.mlp_dim, n, gated=bb.activation in ("swiglu", "geglu"),
      kv_width=bb.resolved_kv_heads * bb.resolved_head_dim)
  return float(n * per_token + model.num_patches * 3 * 2 * model.patch_dim * bb.width)


class _ImageTask(Task):
  """Shared plumbing: data, dropout rngs."""

  def __init__(self, data: ImageData, model: ViTConfig):
    _check_sizes(model, data)
    self.data = data
    self.dataset = data.dataset

  def preprocess(self, example, rng, train):
    return self.data(example, rng, train)

  def tokens_per_example(self) -> int:
    return self.encoder_config.num_patches


# ------------------------------------------------------------ supervised ViT

@dataclasses.dataclass(frozen=True)
class ViTClassifierConfig:
  """Supervised ViT (or fine-tuning of a pretrained encoder).

  ``pretrained``: an exported encoder (``encoder_params.msgpack`` of an
  MAE / SimMIM run) or a ViT / MAE / SimMIM / CLIP run's workdir; its
  position table is interpolated if the grid differs (``merge_encoder``).
  ``layer_decay`` < 1 scales the learning rate of layer ``i`` (of ``depth``;
  the stem is layer 0, the head ``depth + 1``) by
  ``layer_decay ** (depth + 1 - i)``.
  """
  model: ViTConfig
  data: ImageData = ImageData()
  num_classes: int = 10
  label_smoothing: float = 0.0
  mixup: float = 0.0  # Beta(mixup, mixup) mixing coefficient; 0 = off
  pretrained: str = ""
  layer_decay: float = 1.0
  # Test-time augmentation: average the softmax over all integer shifts in
  # [-tta_shift, tta_shift]^2 (of the upsampled image, zero fill). 0: off.
  tta_shift: int = 0

  def __post_init__(self):
    if not 0.0 <= self.label_smoothing < 1.0:
      raise ValueError(f"ViTClassifierConfig.label_smoothing={self.label_smoothing}: in [0, 1).")
    if self.mixup < 0:
      raise ValueError(f"ViTClassifierConfig.mixup={self.mixup}: must be >= 0.")
    if not 0.0 < self.layer_decay <= 1.0:
      raise ValueError(f"ViTClassifierConfig.layer_decay={self.layer_decay}: in (0, 1].")

  def build(self) -> "ViTClassifierTask":
    return ViTClassifierTask(self)


def layer_ids(params, depth: int):
  """Per-leaf layer index for layer-wise lr decay: stem / cls / pos 0,
  backbone ``layer_i`` i + 1, the final norm and head ``depth + 1``."""
  def layer(path, _):
    names = path_names(path)
    for n in names:
      if n.startswith("layer_"):
        return int(n.split("_")[1]) + 1
      if n == "layers":  # scanned layers: one id for the stack (the middle)
        return (depth + 1) // 2
    if "encoder" in names and ("stem" in names or "cls" in names):
      return 0
    return depth + 1
  return jax.tree_util.tree_map_with_path(layer, params)


class ViTClassifierTask(_ImageTask):
  """Cross-entropy on (smoothed, optionally mixed-up) labels; eval/accuracy."""

  def __init__(self, config: ViTClassifierConfig):
    super().__init__(config.data, config.model)
    self.config = config
    self.encoder_config = config.model
    self.model = ViTClassifier(config.model, config.num_classes)
    self.pretrained = None
    if config.pretrained:
      from datong.train.warmstart import load_pretrained  # pylint: disable=import-outside-toplevel
      self.pretrained = find_encoder(load_pretrained(config.pretrained))  # fails at build

  def batch_spec(self, batch_size):
    return _spec(batch_size, self.config.model)

  def init(self, rng, batch):
    variables = self.model.init(rng, jnp.zeros(batch["image"].shape, jnp.float32))
    if self.pretrained is not None:
      params = variables["params"]
      encoder = merge_encoder(params["encoder"], self.pretrained, self.config.model)
      variables = {**variables, "params": {**params, "encoder": encoder}}
    return variables

  def logits(self, params, images, *, train=False, rng=None):
    rngs = {"dropout": rng} if rng is not None else {}
    return self.model.apply({"params": _unbox(params)}, images, train=train, rngs=rngs)[0]

  def loss(self, params, batch, rng, *, train=True):
    cfg = self.config
    mix_rng, perm_rng, drop_rng, aug_rng = jax.random.split(rng, 4)
    images = self.data.augment(batch["image"], aug_rng) if train else batch["image"]
    targets = jax.nn.one_hot(batch["label"], cfg.num_classes)
    if cfg.label_smoothing:
      targets = optax.smooth_labels(targets, cfg.label_smoothing)
    if train and cfg.mixup > 0:
      lam = jax.random.beta(mix_rng, cfg.mixup, cfg.mixup)
      lam = jnp.maximum(lam, 1.0 - lam)  # the original image dominates
      perm = jax.random.permutation(perm_rng, images.shape[0])
      images = lam * images + (1.0 - lam) * images[perm]
      targets = lam * targets + (1.0 - lam) * targets[perm]
    logits = self.logits(params, images, train=train, rng=drop_rng if train else None)
    loss = jnp.mean(optax.softmax_cross_entropy(logits, targets))
    acc = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
    return loss, {"loss": loss, "accuracy": acc}

  def predict_proba(self, params, images):
    """Class probabilities ``[b, classes]``, averaged over the TTA shifts."""
    r = self.config.tta_shift
    if not r:
      return jax.nn.softmax(self.logits(params, images))
    shifts = [(dy, dx) for dy in range(-r, r + 1) for dx in range(-r, r + 1)]
    probs = [jax.nn.softmax(self.logits(params, shift_images(images, dy, dx)))
             for dy, dx in shifts]
    return jnp.mean(jnp.stack(probs), axis=0)

  def evaluate(self, params, ctx: EvalContext):
    proba = jax.jit(self.predict_proba)
    correct, count, loss_sum = 0, 0, 0.0
    for batch in ctx.batches(self.eval_split):
      real = _real_rows(batch)
      p = np.asarray(proba(params, batch["image"]))
      labels = np.asarray(batch["label"])
      pred = p.argmax(-1)
      losses = -np.log(np.maximum(p[np.arange(len(labels)), labels], 1e-12))
      correct += int(np.sum((pred == np.asarray(batch["label"]))[real]))
      loss_sum += float(np.sum(losses[real]))
      count += int(real.sum())
    return {"eval/accuracy": correct / max(count, 1), "eval/loss": loss_sum / max(count, 1)}

  def learning_rate_scale(self, params):
    decay = self.config.layer_decay
    if decay == 1.0:
      return None
    depth = self.config.model.backbone.depth
    ids = layer_ids(params, depth)
    return jax.tree.map(lambda i: float(decay ** (depth + 1 - i)), ids)

  def flops_per_example(self):
    m = self.config.model
    return vit_flops_per_example(m) + 3 * 2 * m.backbone.width * self.config.num_classes


# ---------------------------------------------------------------------- MAE

@dataclasses.dataclass(frozen=True)
class MAETaskConfig:
  """MAE pretraining; evaluation = linear probe + k-NN + reconstruction PNG."""
  model: mim.MAEConfig
  data: ImageData = ImageData()
  probe: ProbeConfig = ProbeConfig()
  png_examples: int = 8  # test images in the reconstruction PNG (0: none)
  export_encoder: bool = True

  def build(self) -> "MAETask":
    return MAETask(self)


class _MIMTask(_ImageTask):
  """Shared evaluation of the masked-image tasks."""

  def features(self, params, images, which: Optional[str] = None):
    which = self.config.probe.features if which is None else which
    return self.feature_sets(params, images, (which,))[which]

  def feature_sets(self, params, images, which: tuple[str, ...]) -> dict:
    """``{name: [b, d]}`` for every feature set in ``which``, from one encoder pass."""
    _, aux = ViTEncoder(self.encoder_config).apply(
        {"params": _unbox(params)["encoder"]}, images, return_layers="layers" in which)
    return {w: select_features(aux, w, self.encoder_config.has_cls) for w in which}

  def mean_eval_loss(self, params, ctx):
    loss_fn = jax.jit(lambda p, b: self.loss(p, b, jax.random.PRNGKey(0), train=False)[0])
    total, count = 0.0, 0
    for batch in ctx.batches(self.eval_split):
      n = int(_real_rows(batch).sum())
      total += float(loss_fn(params, {"image": batch["image"]})) * n
      count += n
    return total / max(count, 1)

  def evaluate(self, params, ctx: EvalContext):
    probe = self.config.probe

    def feature_sets(p, images):
      if probe.features == "pooled":
        return {"": self.features(p, images)}
      # The standard pooled probe too, for comparison (same encoder pass).
      sets = self.feature_sets(p, images, (probe.features, "pooled"))
      return {"": sets[probe.features], "pooled_": sets["pooled"]}

    metrics = probe_metrics(jax.jit(feature_sets), params, ctx, probe,
                            self.train_split, self.eval_split,
                            jax.jit(self.data.augment) if self.data.augments else None)
    metrics["eval/loss"] = self.mean_eval_loss(params, ctx)
    if self.config.export_encoder and ctx.workdir and jax.process_index() == 0:
      export_encoder(params, ctx.workdir)
    return metrics


class MAETask(_MIMTask):

  def __init__(self, config: MAETaskConfig):
    super().__init__(config.data, config.model.encoder)
    self.config = config
    self.encoder_config = config.model.encoder
    self.model = mim.MAE(config.model)

  def batch_spec(self, batch_size):
    return _spec(batch_size, self.encoder_config)

  def masking(self, rng, batch_size: int) -> mim.Masking:
    return mim.random_masking(rng, batch_size, self.encoder_config.num_patches,
                              self.config.model.mask_ratio)

  def init(self, rng, batch):
    b = batch["image"].shape[0]
    m = self.masking(jax.random.PRNGKey(0), b)
    return self.model.init(rng, jnp.zeros(batch["image"].shape, jnp.float32),
                           m.keep_indices, m.restore_indices)

  def apply(self, params, images, rng, *, train=False):
    mask_rng, drop_rng = jax.random.split(rng)
    m = self.masking(mask_rng, images.shape[0])
    pred, aux = self.model.apply({"params": _unbox(params)}, images, m.keep_indices,
                                 m.restore_indices, train=train, rngs={"dropout": drop_rng})
    return pred, m, aux

  def loss(self, params, batch, rng, *, train=True):
    aug_rng, rng = jax.random.split(rng)
    images = self.data.augment(batch["image"], aug_rng) if train else batch["image"]
    pred, m, _ = self.apply(params, images, rng, train=train)
    return mim.mae_loss(pred, images, m.mask, self.encoder_config.patch_size,
                        norm_pix=self.config.model.norm_pix_loss)

  def reconstruction_png(self, params, ctx: EvalContext, path: str) -> str:
    n = self.config.png_examples
    images = jnp.asarray(np.asarray(next(iter(ctx.batches(self.eval_split)))["image"])[:n])
    out = jax.jit(lambda p, x: mim.reconstruct(self.model, _unbox(p), x, jax.random.PRNGKey(1)))(
        params, images)
    return mim.save_reconstruction_grid(path, images, out["masked"], out["reconstruction"])

  def evaluate(self, params, ctx):
    metrics = super().evaluate(params, ctx)
    if self.config.png_examples and ctx.workdir and jax.process_index() == 0:
      os.makedirs(ctx.workdir, exist_ok=True)
      self.reconstruction_png(params, ctx, os.path.join(
          ctx.workdir, f"mae_reconstructions_step{ctx.step}.png"))
    return metrics

  def flops_per_example(self):
    enc, dec = self.encoder_config, self.config.model.decoder
    n = enc.num_patches
    n_keep = n - mim.num_masked(n, self.config.model.mask_ratio)
    prefix = int(enc.has_cls)
    encoder = vit_flops_per_example(enc, n_keep + prefix) - (n - n_keep) * 3 * 2 * enc.patch_dim * enc.backbone.width
    decoder = (n + prefix) * transformer_flops_per_token(dec.width, dec.depth, dec.mlp_dim, n + prefix)
    heads = 3 * 2 * ((n_keep + prefix) * enc.backbone.width * dec.width + n * dec.width * enc.patch_dim)
    return float(encoder + decoder + heads)


# ------------------------------------------------------------------- SimMIM

@dataclasses.dataclass(frozen=True)
class SimMIMTaskConfig:
  """SimMIM pretraining; evaluation = linear probe + k-NN."""
  model: mim.SimMIMConfig
  data: ImageData = ImageData()
  probe: ProbeConfig = ProbeConfig()
  export_encoder: bool = True

  def build(self) -> "SimMIMTask":
    return SimMIMTask(self)


class SimMIMTask(_MIMTask):

  def __init__(self, config: SimMIMTaskConfig):
    super().__init__(config.data, config.model.encoder)
    self.config = config
    self.encoder_config = config.model.encoder
    self.model = mim.SimMIM(config.model)

  def batch_spec(self, batch_size):
    return _spec(batch_size, self.encoder_config)

  def masking(self, rng, batch_size: int):
    return mim.simmim_masking(rng, batch_size, self.config.model)

  def init(self, rng, batch):
    b = batch["image"].shape[0]
    return self.model.init(rng, jnp.zeros(batch["image"].shape, jnp.float32),
                           jnp.zeros((b, self.encoder_config.num_patches), bool))

  def loss(self, params, batch, rng, *, train=True):
    mask_rng, drop_rng, aug_rng = jax.random.split(rng, 3)
    images = self.data.augment(batch["image"], aug_rng) if train else batch["image"]
    mask = self.masking(mask_rng, images.shape[0])
    pred, _ = self.model.apply({"params": _unbox(params)}, images, mask, train=train,
                               rngs={"dropout": drop_rng})
    return mim.simmim_loss(pred, images, mask, self.encoder_config.patch_size)

  def flops_per_example(self):
    enc = self.encoder_config
    return vit_flops_per_example(enc) + 3 * 2 * enc.num_patches * enc.backbone.width * enc.patch_dim

"""Frozen-feature evaluation of any image encoder: linear probe and k-NN.

Features come from the encoder's ``aux`` (the image-encoder protocol of
``datong.unimodal.encoders``: ``pooled``, ``patch_tokens``, ``encoded`` and,
when asked for, ``layers``), so a ViT, a Swin or a BEiT is probed alike.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from datong.ops.patches import pool_tokens
from datong.train.task import EvalContext

__all__ = ["FEATURES", "ProbeConfig", "extract_features", "knn_accuracy", "linear_probe",
           "probe_metrics", "select_features"]


def real_rows(batch) -> np.ndarray:
  """Which rows of an evaluation batch are real examples (not padding)."""
  return np.asarray(batch["mask"], bool) if "mask" in batch else \
      np.ones(len(np.asarray(batch["image"])), bool)


FEATURES = ("pooled", "cls", "gap", "cls+gap", "layers", "tokens")


@dataclasses.dataclass(frozen=True)
class ProbeConfig:
  """Frozen-feature evaluation: logistic regression and k-NN.

  ``features``: ``pooled`` (the encoder's pooling), ``cls``, ``gap``,
  ``cls+gap`` (concatenated), ``layers`` (the mean patch token of every
  block, concatenated with cls+gap), or ``tokens`` (every patch token of the
  last block, flattened in image order: a probe that keeps the spatial map).
  ``token_pool`` (with ``tokens`` only): the tokens are first averaged over
  non-overlapping ``token_pool x token_pool`` cells of the (square) token
  grid, a coarser map with ``token_pool**2`` times fewer features and some
  shift invariance (``pool_tokens``; 1: every token). Features are
  standardized with train statistics; ``c`` is the inverse L2 strength of the logistic regression
  (0: chosen by 3-fold cross-validation on the train features).
  ``train_views``: the probe is fit on the train images plus
  ``train_views - 1`` randomly augmented copies (the task's ``ImageData``
  augmentation, fixed keys), as MAE's linear probe trains with augmentation;
  the encoder stays frozen and test images are never augmented.
  """
  features: str = "pooled"
  c: float = 1.0
  train_views: int = 1
  token_pool: int = 1
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
    if self.token_pool < 1 or (self.token_pool > 1 and self.features != "tokens"):
      raise ValueError(f"ProbeConfig.token_pool={self.token_pool}: must be >= 1, and 1 unless "
                       f"features='tokens' (features={self.features!r}).")


def select_features(aux: dict, which: str, token_pool: int = 1):
  """Pick probe features from an image encoder's aux dict.

  Tokens before the patch tokens in ``encoded`` (a [CLS]) are the prefix:
  ``cls`` is the first of them, or the mean patch token when there is none.
  ``token_pool`` > 1 pools ``tokens`` on their (square) grid first.
  """
  gap = jnp.mean(aux["patch_tokens"], axis=1)
  prefix = aux["encoded"].shape[1] - aux["patch_tokens"].shape[1]
  cls = aux["encoded"][:, 0] if prefix else gap
  if which == "pooled":
    return aux["pooled"]
  if which == "cls":
    return cls
  if which == "gap":
    return gap
  if which == "tokens":
    tokens = aux["patch_tokens"]
    if token_pool > 1:
      side = int(round(tokens.shape[1] ** 0.5))
      tokens = pool_tokens(tokens, (side, side), token_pool)
    return tokens.reshape(tokens.shape[0], -1)
  if which == "layers":
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
    real = real_rows(batch)
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

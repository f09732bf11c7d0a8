"""Showing models and data: image grids, confusion matrices, masked-image
reconstructions and attention maps, as matplotlib figures or numpy arrays."""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from datong import registry
from datong.unimodal import encoders
from datong.backbone import WEIGHTS_COLLECTION
from datong.params import params_collection
from datong.notebook._common import _finish, _pyplot, _rng
from datong.notebook.models import _apply, example_inputs


# ---------------------------------------------------------------- images --

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
  out = encoders.sown_attention_weights(state)
  if not out:
    raise ValueError(f"attention_weights: {type(model).__name__} ran no datong attention layer.")
  return out


def attention_maps(model: nn.Module, params, images, layer: int = -1) -> np.ndarray:
  """Where a ViT layer looks: ``[batch, heads, grid_h, grid_w]``, each map sums to 1.
  (A Swin maps its windows back to the stage's token grid: ``SwinConfig.attention_map``.)

  With a [CLS] token: the [CLS] query's attention over the patches
  (renormalized without the [CLS] key); without one: the attention each
  patch receives, averaged over the queries. ``layer`` indexes the
  backbone's layers (-1: the last).
  """
  config, enc_params = registry.encoder_of(model, params_collection(params))
  return encoders.encoder_attention_maps(config, enc_params, images, layer)


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

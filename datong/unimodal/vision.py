"""Images on the shared backbone: patch stem, ViT encoder, ViT classifier.

An image is cut into patches (``ops.patchify``), each patch is linearly
embedded (= a strided convolution), position embeddings are added, an
optional [CLS] token is prepended, and the shared ``Transformer`` does the
rest. ``ViTEncoder`` returns ``(pooled, aux)`` with every intermediate named
in ``aux`` so heads (classification, MAE/SimMIM pixel decoders, linear
probes, the CLIP image tower) read features without touching the model.

    cfg = ViTConfig(TransformerConfig.preset("vit-B"), image_size=(224, 224),
                    patch_size=(16, 16))
    pooled, aux = ViTEncoder(cfg).apply(params, images)   # images [b, h, w, c]

Masked-image modeling (MAE, SimMIM) lives in ``datong.unimodal.masked_image``;
the supervised task, augmentations and evaluation (linear probe, k-NN,
fine-tuning with layer-wise lr decay) in ``datong.unimodal.vision_tasks``.
``merge_encoder`` starts an encoder from another model's (ViT, MAE, SimMIM,
CLIP), interpolating its position table to a new resolution.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp

from datong.backbone import Norm, Transformer, TransformerConfig, merge_params, params_collection
from datong.ops.patches import grid_shape, patchify, unpatchify
from datong.ops.posemb import interpolate_2d, sincos_2d

POOLS = ("cls", "gap")
POSEMBS = ("learned", "sincos", "none")


def _pair(x) -> tuple[int, int]:
  if isinstance(x, int):
    return (x, x)
  x = tuple(int(v) for v in x)
  if len(x) != 2:
    raise ValueError(f"expected an int or a pair, got {x!r}")
  return x


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  """A ViT encoder: patch stem + shared backbone + pooling.

  ``image_size`` is the resolution the (learned) position table is made
  for; other resolutions divisible by the patch size are accepted and the
  table is interpolated (bicubic) to the new grid.
  """
  backbone: TransformerConfig
  image_size: tuple[int, int] = (224, 224)
  patch_size: tuple[int, int] = (16, 16)
  channels: int = 3
  pool: str = "cls"  # cls: the [CLS] token's output; gap: mean of patch outputs
  cls_token: Optional[bool] = None  # None: True iff pool == "cls"
  posemb: str = "learned"  # learned | sincos (fixed 2-D) | none
  mask_token: bool = False  # a learned token replacing masked patches (SimMIM)
  pre_norm: bool = False  # a norm on the embeddings before the first block (CLIP's ViT)

  def __post_init__(self):
    object.__setattr__(self, "image_size", _pair(self.image_size))
    object.__setattr__(self, "patch_size", _pair(self.patch_size))
    if self.pool not in POOLS:
      raise ValueError(f"ViTConfig.pool={self.pool!r}: choose one of {POOLS}.")
    if self.posemb not in POSEMBS:
      raise ValueError(f"ViTConfig.posemb={self.posemb!r}: choose one of {POSEMBS}.")
    if self.pool == "cls" and self.cls_token is False:
      raise ValueError("ViTConfig.cls_token=False contradicts pool='cls'.")
    if self.channels <= 0:
      raise ValueError(f"ViTConfig.channels={self.channels}: must be positive.")
    grid_shape(self.image_size, self.patch_size)  # raises with the sizes named

  @property
  def has_cls(self) -> bool:
    return self.pool == "cls" if self.cls_token is None else self.cls_token

  @property
  def grid(self) -> tuple[int, int]:
    return grid_shape(self.image_size, self.patch_size)

  @property
  def num_patches(self) -> int:
    gh, gw = self.grid
    return gh * gw

  @property
  def patch_dim(self) -> int:
    return self.patch_size[0] * self.patch_size[1] * self.channels

  def replace(self, **changes) -> "ViTConfig":
    return dataclasses.replace(self, **changes)


class PatchEmbedding(nn.Module):
  """Images ``[batch, h, w, c]`` -> patch tokens ``[batch, (h/ph)*(w/pw), width]``.

  Linear on flattened patches (equivalently a stride-``patch`` convolution),
  then position embeddings. ``mask`` (``[batch, n]`` bool, True = masked)
  replaces those patches' embeddings by a learned ``mask_token`` before the
  position embedding is added (SimMIM). No [CLS] token here: that is the
  encoder's business.

  Parameters: ``projection/kernel [patch, embed]``, ``pos_embedding
  [n, embed]`` (learned), ``mask_token [embed]`` (with ``mask_token=True``).
  """
  width: int
  patch_size: tuple[int, int]
  image_size: tuple[int, int]
  posemb: str = "learned"
  mask_token: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def position_embedding(self, grid: tuple[int, int]):
    """``[gh * gw, width]`` for the patch grid ``grid`` (interpolated if needed)."""
    base = grid_shape(_pair(self.image_size), _pair(self.patch_size))
    if self.posemb == "sincos":
      return sincos_2d(grid[0], grid[1], self.width)
    if self.posemb == "none":
      return jnp.zeros((grid[0] * grid[1], self.width), jnp.float32)
    table = self.param(
        "pos_embedding",
        nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, "embed")),
        (base[0] * base[1], self.width), self.param_dtype)
    return interpolate_2d(table, base, grid)

  @nn.compact
  def __call__(self, images, mask=None):
    patch = _pair(self.patch_size)
    grid = grid_shape(images.shape[1:3], patch)
    patches = patchify(images.astype(self.dtype), patch)
    x = nn.Dense(
        self.width, dtype=self.dtype, param_dtype=self.param_dtype,
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                 ("patch", "embed")),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
        name="projection")(patches)
    if self.mask_token:
      token = self.param(
          "mask_token",
          nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed",)),
          (self.width,), self.param_dtype)
      if mask is not None:
        x = jnp.where(mask[..., None], token.astype(x.dtype), x)
    elif mask is not None:
      raise ValueError("PatchEmbedding got a mask but has no mask_token; "
                       "set mask_token=True (ViTConfig.mask_token).")
    x = x + self.position_embedding(grid).astype(x.dtype)[None]
    return nn.with_logical_constraint(x, ("batch", "length", "embed"))


class ViTEncoder(nn.Module):
  """Patch stem + shared backbone + pooling: ``images -> (pooled, aux)``.

  Args of ``__call__``:
    images: ``[batch, h, w, channels]`` floats, h and w divisible by the patch.
    mask: ``[batch, n]`` bool, True = replace that patch by the mask token
      (SimMIM; needs ``config.mask_token``).
    keep_indices: ``[batch, n_keep]`` ints, run the backbone on these patches
      only (MAE's encoder); the sequence length becomes ``n_keep`` (+1 CLS).
    train: dropout / stochastic depth (needs a "dropout" rng when enabled).

  Returns ``pooled [batch, width]`` and ``aux`` with ``embedded`` (backbone
  input, CLS first if any), ``encoded`` (backbone output, all positions),
  ``patch_tokens`` (backbone output without CLS), ``pooled``, ``pre_norm``
  and, with ``return_layers``, ``layers`` ``[depth, batch, length, width]``.
  """
  config: ViTConfig

  @nn.compact
  def __call__(self, images, *, mask=None, keep_indices=None, train: bool = False,
               return_layers: bool = False):
    cfg = self.config
    bb = cfg.backbone
    if images.ndim != 4 or images.shape[-1] != cfg.channels:
      raise ValueError(f"ViTEncoder expects [batch, h, w, {cfg.channels}] images; "
                       f"got {images.shape}.")
    x = PatchEmbedding(bb.width, cfg.patch_size, cfg.image_size, posemb=cfg.posemb,
                       mask_token=cfg.mask_token, dtype=bb.compute_dtype,
                       param_dtype=bb.params_dtype, name="stem")(images, mask=mask)
    if keep_indices is not None:
      x = jnp.take_along_axis(x, keep_indices[..., None].astype(jnp.int32), axis=1)
    prefix = 0
    if cfg.has_cls:
      cls = self.param("cls", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
                       (bb.width,), bb.params_dtype)
      cls = jnp.broadcast_to(cls.astype(x.dtype), (x.shape[0], 1, bb.width))
      x = jnp.concatenate([cls, x], axis=1)
      prefix = 1
    if cfg.pre_norm:
      x = Norm(bb, name="pre_norm")(x)
    hidden, baux = Transformer(bb, name="backbone")(x, train=train, return_layers=return_layers)
    patch_tokens = hidden[:, prefix:]
    pooled = hidden[:, 0] if cfg.pool == "cls" else jnp.mean(patch_tokens, axis=1)
    aux = {"embedded": x, "encoded": hidden, "patch_tokens": patch_tokens,
           "pooled": pooled, **baux}
    return pooled, aux


class ViTClassifier(nn.Module):
  """``ViTEncoder`` + (zero-initialized) linear class head: ``-> (logits, aux)``."""
  config: ViTConfig
  num_classes: int

  @nn.compact
  def __call__(self, images, *, train: bool = False, return_layers: bool = False):
    pooled, aux = ViTEncoder(self.config, name="encoder")(
        images, train=train, return_layers=return_layers)
    logits = nn.Dense(
        self.num_classes, dtype=jnp.float32, param_dtype=self.config.backbone.params_dtype,
        kernel_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed", None)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (None,)),
        name="head")(pooled.astype(jnp.float32))
    aux["logits"] = logits
    return logits, aux


def image_to_patches(images, config: ViTConfig):
  """``[batch, h, w, c]`` -> ``[batch, n, patch_dim]`` in the stem's patch order."""
  return patchify(images, config.patch_size)


def patches_to_image(patches, config: ViTConfig, image_size=None):
  """Inverse of ``image_to_patches``."""
  size = config.image_size if image_size is None else _pair(image_size)
  return unpatchify(patches, config.patch_size, size, config.channels)


# ------------------------------------------------------- pretrained encoder

def find_encoder(params) -> Any:
  """The ViT encoder subtree of ViTClassifier / MAE / SimMIM / CLIP params
  (or of a bare ``ViTEncoder``'s, as ``export_encoder`` writes them)."""
  params = params_collection(params)
  if "image" in params and "encoder" in params["image"]:
    return params["image"]["encoder"]
  if "encoder" in params:
    return params["encoder"]
  if "stem" in params and "backbone" in params:
    return params
  raise ValueError(f"no ViT encoder found in a param tree with keys {sorted(params)}; "
                   "expected 'encoder' (ViT, MAE, SimMIM), 'image/encoder' (CLIP) or a bare "
                   "encoder ('stem', 'backbone').")


def merge_encoder(fresh, pretrained, config: ViTConfig):
  """``fresh`` ``ViTEncoder`` params (boxed or plain) with the leaves of the
  encoder in ``pretrained`` (see ``find_encoder``).

  A learned position table of another resolution (a square pretraining
  grid) is interpolated to ``config.grid``. Leaves only the model has (a
  [CLS] token an MAE encoder lacks) stay fresh; leaves only the pretrained
  encoder has (SimMIM's mask token) are dropped. Shapes must otherwise match.
  """
  def resize(key, table, shape):
    if key[-1] != "pos_embedding" or len(shape) != 2 or table.shape[1:] != shape[1:]:
      return table
    side = math.isqrt(table.shape[0])
    if side * side != table.shape[0]:
      raise ValueError(f"pretrained position table {tuple(table.shape)} is not a square grid, "
                       "so its resolution is unknown; fine-tune at the pretraining resolution.")
    return interpolate_2d(jnp.asarray(table), (side, side), config.grid)

  return merge_params(fresh, find_encoder(pretrained), extra="drop", resize=resize,
                      where="encoder/")

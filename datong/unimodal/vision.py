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

``ViTConfig`` meets the image-encoder protocol (``datong.unimodal.encoders``):
``config.make()`` builds the encoder, ``config.width`` / ``num_tokens`` /
``flops_per_example()`` describe it, ``config.resize_param`` adapts a
pretrained position table to another resolution. So the classifier, the
probes, fine-tuning and CLIP's image tower take it, or any other encoder
that meets the protocol, alike.

Masked-image modeling (MAE, SimMIM) lives in ``datong.unimodal.masked_image``;
the training objectives and their evaluation in ``datong.train.tasks.vision``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from datong.backbone import Norm, Transformer, TransformerConfig
from datong.ops.patches import grid_shape, pair, patchify, unpatchify
from datong.ops.posemb import interpolate_2d, sincos_2d
from datong.ops.windows import grid_relative_position_index
from datong.unimodal.encoders import ImageClassifier

POOLS = ("cls", "gap")
POSEMBS = ("learned", "sincos", "none")
RELATIVE_POSITION_BIASES = ("none", "layer", "shared")


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
  pooler: bool = False  # dense + tanh on the pooled token (HF ViTModel's / BERT's pooler)
  # BEiT: a learned relative-position bias (with [CLS] entries) in every
  # layer ("layer": one table per layer; "shared": one table for all layers).
  relative_position_bias: str = "none"
  pool_norm: bool = False  # a LayerNorm on the pooled features (BEiT's mean-pooling head)
  # DeiT: a learned token after [CLS] whose output (aux["distill_token"]) a
  # distillation head reads (``encoders.DistilledClassifier``).
  distill_token: bool = False

  def __post_init__(self):
    object.__setattr__(self, "image_size", pair(self.image_size))
    object.__setattr__(self, "patch_size", pair(self.patch_size))
    if self.pool not in POOLS:
      raise ValueError(f"ViTConfig.pool={self.pool!r}: choose one of {POOLS}.")
    if self.posemb not in POSEMBS:
      raise ValueError(f"ViTConfig.posemb={self.posemb!r}: choose one of {POSEMBS}.")
    if self.relative_position_bias not in RELATIVE_POSITION_BIASES:
      raise ValueError(f"ViTConfig.relative_position_bias={self.relative_position_bias!r}: "
                       f"choose one of {RELATIVE_POSITION_BIASES}.")
    if self.pool == "cls" and self.cls_token is False:
      raise ValueError("ViTConfig.cls_token=False contradicts pool='cls'.")
    if self.channels <= 0:
      raise ValueError(f"ViTConfig.channels={self.channels}: must be positive.")
    if self.distill_token and self.relative_position_bias != "none":
      raise ValueError("ViTConfig.distill_token=True with a relative-position bias: the bias "
                       "table has no entries for a second prefix token; use one or the other.")
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

  # --- the image-encoder protocol (datong.unimodal.encoders) ---
  @property
  def width(self) -> int:
    """Width of the pooled features and of each token."""
    return self.backbone.width

  @property
  def depth(self) -> int:
    """Backbone layers (for layer-wise learning-rate decay)."""
    return self.backbone.depth

  @property
  def num_tokens(self) -> int:
    """Sequence positions of one image in the backbone ([CLS] included)."""
    return self.num_patches + int(self.has_cls) + int(self.distill_token)

  def make(self, *, shared_backbone: Optional[nn.Module] = None, name: Optional[str] = None):
    """The encoder module; ``shared_backbone``: a ``Transformer`` to run instead of its own."""
    return ViTEncoder(self, shared_backbone=shared_backbone, name=name)

  def flops_per_example(self, length: Optional[int] = None) -> float:
    """Training FLOPs (forward + backward) of one image's pass over ``length``
    tokens (default ``num_tokens``; MAE's encoder sees only the kept ones)."""
    n = self.num_tokens if length is None else length
    return float(n * self.backbone.flops_per_token(n)
                 + self.num_patches * 3 * 2 * self.patch_dim * self.backbone.width)

  def resize_param(self, path: tuple, value, shape: tuple):
    """A pretrained ``value`` at ``path`` made to fit ``shape``, or unchanged:
    a learned position table of a square pretraining grid is interpolated to
    this config's grid (a new resolution)."""
    if path[-1] != "pos_embedding" or len(shape) != 2 or value.shape[1:] != shape[1:]:
      return value
    side = math.isqrt(value.shape[0])
    if side * side != value.shape[0]:
      raise ValueError(f"pretrained position table {tuple(value.shape)} is not a square grid, "
                       "so its resolution is unknown; fine-tune at the pretraining resolution.")
    return interpolate_2d(jnp.asarray(value), (side, side), self.grid)


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
    base = grid_shape(pair(self.image_size), pair(self.patch_size))
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
    patch = pair(self.patch_size)
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


class RelativePositionBias(nn.Module):
  """BEiT's bias: a learned table ``[(2gh-1)(2gw-1) (+3 with [CLS]), heads]``
  (zeros at init) looked up by the offset between query and key patches
  (``ops.windows.grid_relative_position_index``); a ``Transformer.layer_bias``
  hook (per layer) or called once and passed as ``bias`` (shared).
  Returns ``{"bias": [1, heads, n, n]}``."""
  config: TransformerConfig
  grid: tuple[int, int]
  cls: bool = True

  @nn.compact
  def __call__(self, layer_index=None, x=None):
    del layer_index, x
    index = grid_relative_position_index(self.grid, self.cls)
    rows = (2 * self.grid[0] - 1) * (2 * self.grid[1] - 1) + 3 * int(self.cls)
    table = self.param("table", nn.with_logical_partitioning(
        nn.initializers.zeros, (None, "heads")), (rows, self.config.heads),
        self.config.params_dtype)
    n = index.shape[0]
    bias = table.astype(jnp.float32)[np.asarray(index).reshape(-1)]
    return {"bias": bias.reshape(n, n, -1).transpose(2, 0, 1)[None]}


class ViTEncoder(nn.Module):
  """Patch stem + shared backbone + pooling: ``images -> (pooled, aux)``.

  Args of ``__call__``:
    images: ``[batch, h, w, channels]`` floats, h and w divisible by the patch.
    mask: ``[batch, n]`` bool, True = replace that patch by the mask token
      (SimMIM; needs ``config.mask_token``).
    keep_indices: ``[batch, n_keep]`` ints, run the backbone on these patches
      only (MAE's encoder); the sequence length becomes ``n_keep`` (+1 CLS).
    train: dropout / stochastic depth (needs a "dropout" rng when enabled).

  Returns ``pooled [batch, width]`` (through ``pooler``'s dense + tanh when
  ``config.pooler``) and ``aux`` with ``embedded`` (backbone
  input, CLS first if any), ``encoded`` (backbone output, all positions),
  ``patch_tokens`` (backbone output without CLS), ``pooled``, ``pre_norm``,
  ``distill_token`` (its output, with ``config.distill_token``)
  and, with ``return_layers``, ``layers`` ``[depth, batch, length, width]``.

  ``shared_backbone``: a ``Transformer`` owned elsewhere (CLIP's shared
  backbone) run in place of this encoder's own ``backbone``.
  """
  config: ViTConfig
  shared_backbone: Optional[nn.Module] = None

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
    if cfg.distill_token:
      dist = self.param("distill_token", nn.with_logical_partitioning(
          nn.initializers.normal(0.02), ("embed",)), (bb.width,), bb.params_dtype)
      dist = jnp.broadcast_to(dist.astype(x.dtype), (x.shape[0], 1, bb.width))
      x = jnp.concatenate([x[:, :prefix], dist, x[:, prefix:]], axis=1)
      prefix += 1
    if cfg.pre_norm:
      x = Norm(bb, name="pre_norm")(x)
    layer_bias, bias = None, None
    if cfg.relative_position_bias != "none":
      grid = grid_shape(images.shape[1:3], cfg.patch_size)
      if grid != cfg.grid or keep_indices is not None:
        raise ValueError(f"ViTEncoder: the relative-position table is made for the full grid "
                         f"{cfg.grid}; got grid {grid}"
                         f"{' with keep_indices' if keep_indices is not None else ''}. Run "
                         "it on images of the configured size and on all patches.")
      make_bias = functools.partial(RelativePositionBias, grid=grid, cls=cfg.has_cls)
      if cfg.relative_position_bias == "layer":
        if self.shared_backbone is not None:
          raise ValueError("ViTEncoder: a per-layer relative-position bias lives in the encoder's "
                           "own backbone; with a shared backbone use relative_position_bias="
                           "'shared'.")
        layer_bias = make_bias
      else:
        bias = make_bias(bb, name="relative_position_bias")()["bias"]
    backbone = (self.shared_backbone if self.shared_backbone is not None
                else Transformer(bb, layer_bias=layer_bias, name="backbone"))
    hidden, baux = backbone(x, bias=bias, train=train, return_layers=return_layers)
    patch_tokens = hidden[:, prefix:]
    pooled = hidden[:, 0] if cfg.pool == "cls" else jnp.mean(patch_tokens, axis=1)
    if cfg.pooler:
      pooled = jnp.tanh(nn.Dense(
          bb.width, dtype=bb.compute_dtype, param_dtype=bb.params_dtype,
          kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                   ("embed", "mlp")),
          bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)),
          name="pooler")(pooled))
    if cfg.pool_norm:
      pooled = Norm(bb, name="pool_norm")(pooled)
    aux = {"embedded": x, "encoded": hidden, "patch_tokens": patch_tokens,
           "pooled": pooled, **baux}
    if cfg.distill_token:
      aux["distill_token"] = hidden[:, prefix - 1]
    return pooled, aux


# The classifier takes any image encoder; the name stays for checkpoints and HF.
ViTClassifier = ImageClassifier


def image_to_patches(images, config: ViTConfig):
  """``[batch, h, w, c]`` -> ``[batch, n, patch_dim]`` in the stem's patch order."""
  return patchify(images, config.patch_size)


def patches_to_image(patches, config: ViTConfig, image_size=None):
  """Inverse of ``image_to_patches``."""
  size = config.image_size if image_size is None else pair(image_size)
  return unpatchify(patches, config.patch_size, size, config.channels)

"""Masked-image modeling on the shared backbone: MAE and SimMIM.

* ``random_masking``: per-example random subset of patches by sorting
  uniform noise (MAE); returns the kept and restore indices and the mask.
* ``MAE`` (He et al. 2021): the ``ViTEncoder`` runs on the visible patches
  only; a narrower, shallower decoder (the same ``Transformer`` class) gets
  the encoder outputs plus one shared learned mask token per masked patch,
  unshuffled back to image order, with its own position embeddings; a linear
  head predicts each patch's pixels. ``mae_loss``: MSE on masked patches,
  per-patch normalized targets by default.
* ``SimMIM`` (Xie et al. 2021): masked patches are replaced by a learned
  mask token inside the encoder (a ViT or a Swin); the mask is drawn on a
  coarser grid of mask patches (``block_masking``); a linear head predicts
  the raw pixels of each output token (a ViT's patch; a Swin's
  ``stride x stride`` cell, the 32-px cells of the paper's Swin);
  ``simmim_loss``: L1 on masked pixels. ``avg_dist``: SimMIM's AvgDist.
* ``save_reconstruction_grid``: (input, masked, reconstruction) rows as PNG.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from datong.backbone import Transformer, TransformerConfig
from datong.ops.patches import grid_shape, pair, patchify, unpatchify
from datong.ops.posemb import interpolate_1d, interpolate_2d, sincos_2d
from datong.unimodal.vision import ViTConfig, ViTEncoder


# ------------------------------------------------------------------ masking

class Masking(NamedTuple):
  """Per-example patch masking.

  ``keep_indices [batch, n_keep]``: the visible patches, in shuffled order.
  ``restore_indices [batch, n]``: ``take(shuffled, restore) == image order``.
  ``mask [batch, n]`` bool in image order, True = masked (hidden).
  """
  keep_indices: jax.Array
  restore_indices: jax.Array
  mask: jax.Array


def num_masked(num_patches: int, ratio: float) -> int:
  """``round(ratio * num_patches)`` (Python rounding), at least one visible."""
  if not 0.0 <= ratio < 1.0:
    raise ValueError(f"mask ratio must be in [0, 1); got {ratio}.")
  return min(int(round(ratio * num_patches)), num_patches - 1)


def random_masking(rng, batch: int, num_patches: int, ratio: float) -> Masking:
  """MAE's masking: per example, keep the patches with the smallest noise."""
  n_keep = num_patches - num_masked(num_patches, ratio)
  noise = jax.random.uniform(rng, (batch, num_patches))
  shuffle = jnp.argsort(noise, axis=1)
  restore = jnp.argsort(shuffle, axis=1)
  keep = shuffle[:, :n_keep]
  mask = jnp.take_along_axis(jnp.arange(num_patches)[None, :] >= n_keep, restore, axis=1)
  return Masking(keep.astype(jnp.int32), restore.astype(jnp.int32), mask)


def block_masking(rng, batch: int, image_size, patch_size, mask_patch_size,
                  ratio: float):
  """SimMIM's mask: ``[batch, n]`` bool over model patches, True = masked.

  The mask is drawn on the coarser grid of ``mask_patch_size`` cells
  (exactly ``round(ratio * cells)`` per example) and upsampled to the model
  patch grid; ``mask_patch_size`` must be a multiple of the patch size.
  """
  ph, pw = pair(patch_size)
  mh, mw = pair(mask_patch_size)
  if mh % ph or mw % pw:
    raise ValueError(f"mask_patch_size {mh}x{mw} must be a multiple of the patch size {ph}x{pw}.")
  gh, gw = grid_shape(pair(image_size), (mh, mw))
  cells = random_masking(rng, batch, gh * gw, ratio).mask.reshape(batch, gh, gw)
  cells = jnp.repeat(jnp.repeat(cells, mh // ph, axis=1), mw // pw, axis=2)
  return cells.reshape(batch, -1)


def patch_mask_to_pixels(mask, image_size, patch_size):
  """``[batch, n]`` patch mask -> ``[batch, h, w]`` pixel mask."""
  ph, pw = pair(patch_size)
  gh, gw = grid_shape(pair(image_size), (ph, pw))
  m = jnp.asarray(mask).reshape(-1, gh, gw)
  return jnp.repeat(jnp.repeat(m, ph, axis=1), pw, axis=2)


def avg_dist(pixel_mask) -> float:
  """SimMIM's AvgDist: mean Euclidean distance (pixels) from each masked pixel
  to the nearest visible pixel. ``pixel_mask``: ``[h, w]`` or ``[b, h, w]``
  bool, True = masked; averaged over all masked pixels. NaN if nothing is
  masked, inf if nothing is visible (in some image).
  """
  from scipy import ndimage  # pylint: disable=import-outside-toplevel
  m = np.asarray(pixel_mask, bool)
  if m.ndim == 2:
    m = m[None]
  if not m.any():
    return float("nan")
  dists = []
  for one in m:
    if one.all():
      return float("inf")
    # Distance of each nonzero (masked) cell to the nearest zero (visible) cell.
    dists.append(ndimage.distance_transform_edt(one)[one])
  return float(np.concatenate(dists).mean())


# ---------------------------------------------------------------------- MAE

@dataclasses.dataclass(frozen=True)
class MAEConfig:
  """MAE: a ViT encoder on visible patches + a small Transformer decoder."""
  encoder: ViTConfig
  decoder: TransformerConfig
  mask_ratio: float = 0.75
  norm_pix_loss: bool = True  # per-patch normalized pixel targets
  decoder_posemb: str = "sincos"  # sincos | learned
  # How a learned decoder table meets a new grid: "grid" (2-D bicubic, as the
  # encoder's) or "sequence" (HF ViT-MAE: 1-D bicubic over the flattened table).
  decoder_pos_resize: str = "grid"

  def __post_init__(self):
    num_masked(self.encoder.num_patches, self.mask_ratio)  # validates the ratio
    if self.decoder_posemb not in ("sincos", "learned"):
      raise ValueError(f"MAEConfig.decoder_posemb={self.decoder_posemb!r}: choose sincos or learned.")
    if self.decoder_pos_resize not in ("grid", "sequence"):
      raise ValueError(f"MAEConfig.decoder_pos_resize={self.decoder_pos_resize!r}: choose grid "
                       "or sequence.")
    if self.encoder.mask_token:
      raise ValueError("MAEConfig.encoder.mask_token must be False: MAE's encoder never sees masks.")


class MAE(nn.Module):
  """``(images, keep_indices, restore_indices) -> (pred [b, n, patch_dim], aux)``.

  Masking is an input (see ``random_masking``) so the module stays pure.
  ``aux`` holds the encoder's aux (``encoded`` has ``n_keep`` (+1) tokens)
  and ``decoded`` (the decoder output, image order, CLS dropped). With
  ``return_layers``: the encoder's ``layers`` and the decoder's input
  ``decoder_embedded`` and block outputs ``decoder_layers`` ``[depth, batch,
  (1 +) n, width]`` (image order, CLS kept; before the decoder's final norm:
  HF's decoder ``hidden_states``).
  """
  config: MAEConfig

  @nn.compact
  def __call__(self, images, keep_indices, restore_indices, *, train: bool = False,
               return_layers: bool = False):
    cfg = self.config
    enc, dec = cfg.encoder, cfg.decoder
    _, aux = ViTEncoder(enc, name="encoder")(images, keep_indices=keep_indices, train=train,
                                             return_layers=return_layers)
    dense = lambda features, axes, name: nn.Dense(
        features, dtype=dec.compute_dtype, param_dtype=dec.params_dtype,
        kernel_init=nn.with_logical_partitioning(nn.initializers.xavier_uniform(), axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[-1:]),
        name=name)
    y = dense(dec.width, ("embed", None), "decoder_projection")(aux["encoded"])
    prefix = int(enc.has_cls)
    batch, n = restore_indices.shape
    token = self.param("mask_token", nn.with_logical_partitioning(
        nn.initializers.normal(0.02), ("embed",)), (dec.width,), dec.params_dtype)
    n_keep = keep_indices.shape[1]
    fill = jnp.broadcast_to(token.astype(y.dtype), (batch, n - n_keep, dec.width))
    shuffled = jnp.concatenate([y[:, prefix:], fill], axis=1)
    tokens = jnp.take_along_axis(shuffled, restore_indices[..., None].astype(jnp.int32), axis=1)
    grid = grid_shape(images.shape[1:3], enc.patch_size)
    if cfg.decoder_posemb == "sincos":
      pos = sincos_2d(grid[0], grid[1], dec.width)
    else:
      pos = self.param("decoder_pos_embedding", nn.with_logical_partitioning(
          nn.initializers.normal(0.02), (None, "embed")), (enc.num_patches, dec.width),
          dec.params_dtype)
      pos = (interpolate_1d(pos, grid[0] * grid[1]) if cfg.decoder_pos_resize == "sequence"
             else interpolate_2d(pos, enc.grid, grid))
    tokens = tokens + pos.astype(tokens.dtype)[None]
    if prefix:
      tokens = jnp.concatenate([y[:, :prefix], tokens], axis=1)
    hidden, dec_aux = Transformer(dec, name="decoder")(tokens, train=train,
                                                       return_layers=return_layers)
    if return_layers:
      aux["decoder_embedded"], aux["decoder_layers"] = tokens, dec_aux["layers"]
    hidden = hidden[:, prefix:]
    pred = nn.Dense(
        enc.patch_dim, dtype=jnp.float32, param_dtype=dec.params_dtype,
        kernel_init=nn.with_logical_partitioning(nn.initializers.xavier_uniform(), ("embed", "patch")),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("patch",)),
        name="pixel_head")(hidden.astype(jnp.float32))
    aux["decoded"] = hidden
    if "losses" in dec_aux:  # the decoder's auxiliary losses reach the task too
      aux["decoder"] = {"losses": dec_aux["losses"]}
    return pred, aux

  def masked_prediction(self, params, images, key):
    """``(pred, mask, loss, norm_pix)`` on ``images`` masked at random with
    ``key``: what ``reconstruct`` draws. Call on the unbound module."""
    cfg = self.config
    m = random_masking(key, images.shape[0], cfg.encoder.num_patches, cfg.mask_ratio)
    pred, _ = self.apply({"params": params}, images, m.keep_indices, m.restore_indices)
    loss, _ = mae_loss(pred, images, m.mask, cfg.encoder.patch_size, norm_pix=cfg.norm_pix_loss)
    return pred, m.mask, loss, cfg.norm_pix_loss


def normalize_patches(patches, eps: float = 1e-6, ddof: int = 0):
  """Per-patch zero mean, unit variance (MAE's ``norm_pix_loss`` target).

  ``ddof=1`` is the unbiased variance of the official MAE code (torch.var).
  """
  mean = patches.mean(axis=-1, keepdims=True)
  var = patches.var(axis=-1, keepdims=True, ddof=ddof)
  return (patches - mean) / jnp.sqrt(var + eps)


def mae_loss(pred, images, mask, patch_size, *, norm_pix: bool = True, ddof: int = 0):
  """MSE over the masked patches only. Returns ``(loss, metrics)``.

  ``pred [b, n, patch_dim]``, ``images [b, h, w, c]`` (the target),
  ``mask [b, n]`` True = masked.
  """
  target = patchify(images.astype(jnp.float32), patch_size)
  if norm_pix:
    target = normalize_patches(target, ddof=ddof)
  per_patch = jnp.mean((pred.astype(jnp.float32) - target) ** 2, axis=-1)
  m = mask.astype(jnp.float32)
  loss = jnp.sum(per_patch * m) / jnp.maximum(jnp.sum(m), 1.0)
  visible = jnp.sum(per_patch * (1 - m)) / jnp.maximum(jnp.sum(1 - m), 1.0)
  return loss, {"loss": loss, "visible_mse": visible, "mask_fraction": jnp.mean(m)}


def mae_reconstruct(pred, images, mask, patch_size, *, norm_pix: bool = True):
  """Pixels of the reconstruction: predictions on masked patches, input elsewhere.

  With ``norm_pix`` the predicted patches are de-normalized with the true
  patches' mean and std (as in MAE's visualizations).
  """
  target = patchify(images.astype(jnp.float32), patch_size)
  pred = pred.astype(jnp.float32)
  if norm_pix:
    mean = target.mean(-1, keepdims=True)
    std = jnp.sqrt(target.var(-1, keepdims=True) + 1e-6)
    pred = pred * std + mean
  out = jnp.where(mask[..., None], pred, target)
  return unpatchify(out, patch_size, images.shape[1:3], images.shape[-1])


# ------------------------------------------------------------------- SimMIM

def output_patch(encoder) -> tuple[int, int]:
  """Pixels ``(h, w)`` behind one output token of an image encoder: a ViT's
  patch, a Swin's ``stride`` (patch x 2 per merging)."""
  stride = getattr(encoder, "stride", None)
  return (stride, stride) if stride is not None else pair(encoder.patch_size)


@dataclasses.dataclass(frozen=True)
class SimMIMConfig:
  """SimMIM: an image encoder with a mask token (``ViTConfig``, ``SwinConfig``)
  + a linear pixel head."""
  encoder: Any
  # Mask cell size in pixels; None: a Swin's output stride; for a ViT 2x2
  # patches when they tile the image (SimMIM's 32x32 cells over 16x16
  # patches), else one patch.
  mask_patch_size: Optional[int] = None
  mask_ratio: float = 0.6

  def __post_init__(self):
    if not hasattr(self.encoder, "mask_token"):
      raise TypeError(f"SimMIMConfig.encoder: {type(self.encoder).__name__} has no mask token; "
                      "use a ViTConfig or SwinConfig.")
    if not self.encoder.mask_token:
      object.__setattr__(self, "encoder", self.encoder.replace(mask_token=True))
    mp, (ph, pw) = self.mask_cell, output_patch(self.encoder)
    if mp[0] % ph or mp[1] % pw:
      what = "output stride" if hasattr(self.encoder, "stride") else "patch size"
      raise ValueError(f"SimMIMConfig.mask_patch_size={self.mask_patch_size} must be a "
                       f"multiple of the {what} {(ph, pw)}.")
    grid_shape(self.encoder.image_size, mp)
    num_masked(1, self.mask_ratio)

  @property
  def mask_cell(self) -> tuple[int, int]:
    """The mask's cell size in pixels: ``mask_patch_size``, resolved."""
    if self.mask_patch_size is not None:
      return pair(self.mask_patch_size)
    if getattr(self.encoder, "stride", None) is not None:
      return output_patch(self.encoder)
    (ph, pw), (h, w) = self.encoder.patch_size, self.encoder.image_size
    if h % (2 * ph) == 0 and w % (2 * pw) == 0:
      return (2 * ph, 2 * pw)
    return (ph, pw)


def simmim_masking(rng, batch: int, config: SimMIMConfig):
  """``[batch, patches]`` bool (True = masked) over the encoder's input
  patches: ``block_masking`` with the config's mask cells and ratio."""
  enc = config.encoder
  return block_masking(rng, batch, enc.image_size, enc.patch_size, config.mask_cell,
                       config.mask_ratio)


def output_mask(mask, config: SimMIMConfig, image_size=None):
  """The input-patch ``mask [b, n]`` on the output tokens ``[b, n_out]`` (the
  same for a ViT; a Swin's ``stride`` cells, each all masked or all not)."""
  enc = config.encoder
  (ph, pw), (oh, ow) = pair(enc.patch_size), output_patch(enc)
  if (ph, pw) == (oh, ow):
    return mask
  gh, gw = grid_shape(pair(image_size or enc.image_size), (ph, pw))
  return mask.reshape(-1, gh, gw)[:, ::oh // ph, ::ow // pw].reshape(mask.shape[0], -1)


class SimMIM(nn.Module):
  """``(images, mask [b, n]) -> (pred [b, n_out, out_patch_dim] raw pixels, aux)``:
  ``mask`` over the input patches, ``pred`` per output token (see ``output_mask``)."""
  config: SimMIMConfig

  @nn.compact
  def __call__(self, images, mask, *, train: bool = False):
    enc = self.config.encoder
    _, aux = enc.make(name="encoder")(images, mask=mask, train=train)
    oh, ow = output_patch(enc)
    pred = nn.Dense(
        oh * ow * enc.channels, dtype=jnp.float32, param_dtype=enc.backbone.params_dtype,
        kernel_init=nn.with_logical_partitioning(nn.initializers.xavier_uniform(), ("embed", "patch")),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("patch",)),
        name="pixel_head")(aux["patch_tokens"].astype(jnp.float32))
    return pred, aux

  def masked_prediction(self, params, images, key):
    """``(pred, mask, loss, norm_pix)``: as ``MAE.masked_prediction``."""
    mask = simmim_masking(key, images.shape[0], self.config)
    pred, _ = self.apply({"params": params}, images, mask)
    mask = output_mask(mask, self.config, images.shape[1:3])
    loss, _ = simmim_loss(pred, images, mask, output_patch(self.config.encoder))
    return pred, mask, loss, False


def simmim_loss(pred, images, mask, patch_size):
  """L1 over masked pixels (all channels) only. Returns ``(loss, metrics)``."""
  target = patchify(images.astype(jnp.float32), patch_size)
  per_patch = jnp.mean(jnp.abs(pred.astype(jnp.float32) - target), axis=-1)
  m = mask.astype(jnp.float32)
  loss = jnp.sum(per_patch * m) / jnp.maximum(jnp.sum(m), 1.0)
  return loss, {"loss": loss, "mask_fraction": jnp.mean(m)}


# ------------------------------------------------------------------ picture

def reconstruct(model, params, images, key) -> dict:
  """Mask ``images`` at random and reconstruct them with a masked-image model
  (``MAE``, ``SimMIM``: any module with ``masked_prediction``).

  Jittable (``model`` static). Returns ``mask`` ``[b, output tokens]``, ``loss``
  (the model's training loss on this mask), ``reconstruction`` (predictions
  on masked patches, the input elsewhere) and ``masked`` (the input with
  masked pixels NaN, for display).
  """
  if not hasattr(model, "masked_prediction"):
    raise TypeError(f"reconstruct needs a masked-image model (MAE, SimMIM); "
                    f"got {type(model).__name__}.")
  pred, mask, loss, norm_pix = model.masked_prediction(params, images, key)
  patch = output_patch(model.config.encoder)
  pixels = patch_mask_to_pixels(mask, images.shape[1:3], patch)[..., None]
  return {"mask": mask, "loss": loss,
          "reconstruction": mae_reconstruct(pred, images, mask, patch, norm_pix=norm_pix),
          "masked": jnp.where(pixels, jnp.nan, images)}


def save_reconstruction_grid(path: str, images, masked, reconstructions, *,
                             value_range=(-1.0, 1.0), scale: int = 4) -> str:
  """Write a PNG: one row per example, columns (input, masked, reconstruction).

  Arrays are ``[b, h, w, c]`` with ``c`` 1 or 3 in ``value_range``; masked
  pixels may be NaN (drawn mid-gray). ``scale`` enlarges by pixel repetition.
  """
  from PIL import Image  # pylint: disable=import-outside-toplevel
  lo, hi = value_range
  cols = [np.asarray(a, np.float32) for a in (images, masked, reconstructions)]
  b, h, w, c = cols[0].shape
  pad = 2
  canvas = np.full((b * (h + pad) + pad, 3 * (w + pad) + pad, c), 1.0, np.float32)
  for i in range(b):
    for j, col in enumerate(cols):
      tile = (col[i] - lo) / (hi - lo)
      tile = np.where(np.isnan(tile), 0.5, np.clip(tile, 0.0, 1.0))
      y, x = pad + i * (h + pad), pad + j * (w + pad)
      canvas[y:y + h, x:x + w] = tile
  canvas = np.repeat(np.repeat(canvas, scale, axis=0), scale, axis=1)
  pixels = (canvas * 255).round().astype(np.uint8)
  Image.fromarray(pixels[..., 0] if c == 1 else pixels).save(path)
  return path

"""Image data for the vision and image-text objectives: decode, upsample,
augment, normalize.

``ImageData`` is per-example host preprocessing (uint8 ``[h, w, c]`` ->
float ``[-1, 1]``) plus on-device batch augmentation (random affine maps),
shared by every image task so encoders move between ViT / MAE / SimMIM /
CLIP runs with one input convention.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["ImageData", "random_affine", "random_crop", "shift_images", "upsample_bilinear"]

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

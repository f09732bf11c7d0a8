"""Several augmented views of one image, for SimCLR and DINO (host, numpy).

``ViewData`` turns a uint8 ``[h, w, c]`` example into ``global_views``
views at ``global_size`` and ``local_views`` at ``local_size`` (DINO's
multi-crop), each: a random resized crop (area fraction in ``*_scale``,
aspect ratio in ``ratio``, bilinear resampling of the crop box), an
intensity jitter (contrast and brightness by up to ``jitter``), a Gaussian
blur with probability ``blur`` (sigma uniform in ``[0.1, blur_sigma]``
output pixels) and, only when ``flip`` is set, a horizontal flip (off for
digits: a mirrored 2 is no 2). Pixels then map to ``[-1, 1]`` like
``ImageData``. Everything is drawn from the per-example generator, so views
are deterministic per example and seed and restart with the data iterator.

Training examples: ``{"global": [global_views, h, w, c], "local":
[local_views, hl, wl, c]`` (when any) ``, "label"}``; evaluation examples:
``{"image": [h, w, c], "label"}``, the whole image resized to ``global_size``
(what the linear probe and k-NN read).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from datong.ops.patches import pair


def resample_matrix(n_in: int, start: float, length: float, n_out: int) -> np.ndarray:
  """``[n_out, n_in]`` bilinear weights sampling ``[start, start + length)`` of
  an axis of ``n_in`` pixels at ``n_out`` evenly spaced pixel centers (edges clamped)."""
  pos = start + (np.arange(n_out) + 0.5) * length / n_out - 0.5
  pos = np.clip(pos, 0, n_in - 1)
  lo = np.floor(pos).astype(int)
  hi = np.minimum(lo + 1, n_in - 1)
  frac = pos - lo
  m = np.zeros((n_out, n_in), np.float32)
  m[np.arange(n_out), lo] += 1 - frac
  m[np.arange(n_out), hi] += frac
  return m


def gaussian_matrix(n: int, sigma: float) -> np.ndarray:
  """``[n, n]`` row-normalized Gaussian blur of one axis (no leakage past the edges)."""
  d = np.arange(n)[:, None] - np.arange(n)[None, :]
  k = np.exp(-0.5 * (d / sigma) ** 2)
  return (k / k.sum(1, keepdims=True)).astype(np.float32)


def _apply(image: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
  """``rows @ image[..., k] @ cols.T`` for every channel ``k``."""
  return np.einsum("ih,hwc,jw->ijc", rows, image, cols).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class ViewData:
  """Multi-view augmentation (see the module docstring)."""
  dataset: str = "digits"
  image_key: str = "image"
  label_key: str = "label"
  global_size: tuple[int, int] = (32, 32)
  local_size: tuple[int, int] = (16, 16)
  global_views: int = 2
  local_views: int = 0
  global_scale: tuple[float, float] = (0.4, 1.0)
  local_scale: tuple[float, float] = (0.1, 0.4)
  ratio: tuple[float, float] = (3 / 4, 4 / 3)
  jitter: float = 0.4
  blur: float = 0.5
  blur_sigma: float = 1.5
  flip: bool = False

  def __post_init__(self):
    object.__setattr__(self, "global_size", pair(self.global_size))
    object.__setattr__(self, "local_size", pair(self.local_size))
    if self.global_views < 1 or self.local_views < 0:
      raise ValueError(f"ViewData: global_views={self.global_views} must be >= 1 and "
                       f"local_views={self.local_views} >= 0.")
    for name in ("global_scale", "local_scale", "ratio"):
      lo, hi = getattr(self, name)
      if not 0 < lo <= hi or (name != "ratio" and hi > 1):
        raise ValueError(f"ViewData.{name}=({lo}, {hi}): need 0 < low <= high"
                         f"{' <= 1' if name != 'ratio' else ''}.")
    if not 0 <= self.jitter < 1 or not 0 <= self.blur <= 1 or self.blur_sigma < 0.1:
      raise ValueError(f"ViewData: jitter={self.jitter} in [0, 1), blur={self.blur} in [0, 1], "
                       f"blur_sigma={self.blur_sigma} >= 0.1.")

  def view(self, image: np.ndarray, rng: np.random.Generator, size, scale) -> np.ndarray:
    """One augmented view ``[size..., c]`` of ``image [h, w, c]`` in pixel units (0-255)."""
    h, w, _ = image.shape
    area = rng.uniform(*scale) * h * w
    aspect = np.exp(rng.uniform(np.log(self.ratio[0]), np.log(self.ratio[1])))
    ch = min(np.sqrt(area / aspect), h)
    cw = min(np.sqrt(area * aspect), w)
    y0, x0 = rng.uniform(0, h - ch), rng.uniform(0, w - cw)
    rows = resample_matrix(h, y0, ch, size[0])
    cols = resample_matrix(w, x0, cw, size[1])
    if self.flip and rng.random() < 0.5:
      cols = cols[::-1]
    if rng.random() < self.blur:
      sigma = rng.uniform(0.1, self.blur_sigma)
      rows, cols = gaussian_matrix(size[0], sigma) @ rows, gaussian_matrix(size[1], sigma) @ cols
    out = _apply(image, rows, cols)
    if self.jitter:
      contrast = rng.uniform(1 - self.jitter, 1 + self.jitter)
      brightness = rng.uniform(-self.jitter, self.jitter) * 127.5
      out = (out - out.mean()) * contrast + out.mean() + brightness
    return np.clip(out, 0.0, 255.0)

  def __call__(self, example: dict, rng: np.random.Generator, train: bool) -> dict:
    image = np.asarray(example[self.image_key], np.float32)
    if image.ndim == 2:
      image = image[..., None]
    norm = lambda x: ((x / 255.0 - 0.5) / 0.5).astype(np.float32)
    out = {}
    if train:
      out["global"] = norm(np.stack([self.view(image, rng, self.global_size, self.global_scale)
                                     for _ in range(self.global_views)]))
      if self.local_views:
        out["local"] = norm(np.stack([self.view(image, rng, self.local_size, self.local_scale)
                                      for _ in range(self.local_views)]))
    else:
      h, w, _ = image.shape
      out["image"] = norm(_apply(image, resample_matrix(h, 0, h, self.global_size[0]),
                                 resample_matrix(w, 0, w, self.global_size[1])))
    if self.label_key in example:
      out["label"] = np.int32(example[self.label_key])
    return out

"""Swin's windows as pure functions: partition / merge, cyclic shift masks,
relative-position indices and V2's log-spaced coordinates.

A feature map ``[batch, h, w, c]`` is padded (zeros, bottom and right) to a
multiple of the window ``m``, optionally rolled by ``-shift`` on both axes,
and cut into ``m x m`` windows ``[batch * windows, m * m, c]`` (batch-major,
windows row-major, tokens row-major inside a window); attention runs inside
each window. After a roll, a window may hold tokens from up to four regions
that are not neighbours in the image: ``shifted_window_mask`` keeps
attention within a region, as the reference implementation does.
"""

from __future__ import annotations

import math

import einops
import jax.numpy as jnp
import numpy as np


def stage_window(grid: tuple[int, int], window: int, shift: int) -> tuple[int, int]:
  """``(window, shift)`` at a stage of resolution ``grid``: when the grid is
  not larger than the window (its smaller side), the window shrinks to that
  side and the shift is switched off (one window sees everything)."""
  if min(grid) <= window:
    return min(grid), 0
  return window, shift


def padded_size(size: int, window: int) -> int:
  """``size`` rounded up to a multiple of ``window``."""
  return -(-size // window) * window


def pad_to_windows(x, window: int):
  """``[b, h, w, c]`` -> ``[b, hp, wp, c]``, zero-padded bottom / right to whole windows."""
  h, w = x.shape[1:3]
  return jnp.pad(x, ((0, 0), (0, padded_size(h, window) - h), (0, padded_size(w, window) - w),
                     (0, 0)))


def window_partition(x, window: int):
  """``[b, h, w, c]`` (h, w multiples of ``window``) -> ``[b * nh * nw, window**2, c]``
  (numpy or jax arrays)."""
  return einops.rearrange(x, "b (nh m1) (nw m2) c -> (b nh nw) (m1 m2) c", m1=window, m2=window)


def window_merge(windows, window: int, grid: tuple[int, int]):
  """Inverse of ``window_partition``: ``[b * nh * nw, window**2, c]`` -> ``[b, h, w, c]``."""
  h, w = grid
  return einops.rearrange(windows, "(b nh nw) (m1 m2) c -> b (nh m1) (nw m2) c",
                          nh=h // window, nw=w // window, m1=window, m2=window)


def shift_regions(grid: tuple[int, int], window: int, shift: int) -> np.ndarray:
  """``[h, w]`` int region ids of a (padded) grid rolled by ``-shift``: per axis
  ``[0, n - window)``, ``[n - window, n - shift)``, ``[n - shift, n)``."""
  def axis(n):
    i = np.arange(n)
    return (i >= n - window).astype(np.int32) + (i >= n - shift).astype(np.int32)
  h, w = grid
  return axis(h)[:, None] * 3 + axis(w)[None, :]


def shifted_window_mask(grid: tuple[int, int], window: int, shift: int) -> np.ndarray:
  """``[windows, window**2, window**2]`` bool, True = may attend: the tokens of a
  window of the rolled (padded) ``grid`` attend within their region only.
  All True when ``shift`` is 0."""
  ids = shift_regions(grid, window, shift)[None, :, :, None]
  ids = window_partition(ids, window)[..., 0]  # numpy in, numpy out: [windows, m*m]
  return ids[:, :, None] == ids[:, None, :]


def relative_position_index(window: int) -> np.ndarray:
  """``[m*m, m*m]`` ints into a ``[(2m-1)**2, heads]`` table: the index of the
  offset ``(dy, dx)`` from key ``j`` to query ``i`` is ``(dy + m - 1) * (2m - 1) + dx + m - 1``."""
  return grid_relative_position_index((window, window))


def grid_relative_position_index(grid: tuple[int, int], cls: bool = False) -> np.ndarray:
  """``[n, n]`` ints (``n = gh * gw``, + 1 with ``cls``) into a table of
  ``(2gh-1) * (2gw-1)`` offsets (+ 3 with ``cls``): offset ``(dy, dx)`` is
  ``(dy + gh - 1) * (2gw - 1) + dx + gw - 1``. With ``cls`` (BEiT) position 0
  is the [CLS] token and the last three rows are [CLS] -> patch, patch ->
  [CLS] and [CLS] -> [CLS]."""
  gh, gw = grid
  coords = np.stack(np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")).reshape(2, -1)
  rel = coords[:, :, None] - coords[:, None, :]  # [2, n, n]
  index = (rel[0] + gh - 1) * (2 * gw - 1) + rel[1] + gw - 1
  if not cls:
    return index
  offsets = (2 * gh - 1) * (2 * gw - 1)
  out = np.zeros((gh * gw + 1,) * 2, index.dtype)
  out[1:, 1:] = index
  out[0, :] = offsets  # [CLS] query -> every key
  out[:, 0] = offsets + 1  # every query -> [CLS] key
  out[0, 0] = offsets + 2
  return out


def log_spaced_coords(window: int, pretrained_window: int = 0) -> np.ndarray:
  """Swin V2's ``[(2m-1)**2, 2]`` relative coordinates for the position-bias MLP:
  offsets normalized by ``pretrained_window - 1`` (or ``window - 1``) to
  ``[-8, 8]``, then ``sign(x) * log2(1 + |x|) / 3``; row ``k`` is the offset
  that ``relative_position_index`` calls ``k``."""
  r = np.arange(-(window - 1), window, dtype=np.float32)
  table = np.stack(np.meshgrid(r, r, indexing="ij"), axis=-1)  # [2m-1, 2m-1, 2]
  if pretrained_window > 0:
    table = table / np.float32(pretrained_window - 1)
  elif window > 1:
    table = table / np.float32(window - 1)
  table = table * np.float32(8)
  table = np.sign(table) * np.log2(np.abs(table) + np.float32(1.0)) / np.float32(math.log2(8))
  return table.reshape(-1, 2).astype(np.float32)

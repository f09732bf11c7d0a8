"""BEiT's blockwise masking as a pure, jittable function.

Bao et al. 2021 (BEiT), Algorithm 1: rectangles of patches are added to the
mask until it covers ``round(ratio * n)`` patches. Each rectangle has an
area drawn uniformly in ``[min_block, remaining]`` (at most ``max_block``)
and an aspect ratio drawn log-uniformly in ``[aspect, 1 / aspect]`` (0.3 to
3.3 in the paper); its height and width are the rounded square roots, it
must be strictly smaller than the grid on each side, and it is accepted only
if it masks between 1 and ``remaining`` new patches (10 tries per step, the
first accepted one wins). When no try is accepted the mask stays short of
the target, so the ratio is at most ``ratio`` and close to it on average.

The paper's ``min_block`` is 16 patches on its 14 x 14 grid;
``default_min_block`` scales it to other grids by area. Everything runs under
``jit`` and ``vmap``: the loop has a fixed trip count (one accepted
rectangle adds at least one patch, so ``target`` steps always suffice) and
the tries of a step are drawn at once.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

TRIES = 10  # rectangles drawn per step (BEiT's reference code)
PAPER_GRID = 14 * 14  # the paper's 224 px / 16 px grid
PAPER_MIN_BLOCK = 16


class BlockMask(NamedTuple):
  """``mask [batch, gh * gw]`` bool (row-major patch order, True = masked);
  ``blocks [batch, steps, 4]`` int32 ``(top, left, height, width)`` of the
  rectangle each step added and ``added [batch, steps]`` bool (False: the
  step added nothing, its block row is zeros)."""
  mask: jax.Array
  blocks: jax.Array
  added: jax.Array


def default_min_block(grid: tuple[int, int]) -> int:
  """BEiT's 16-patch minimum scaled by area from its 14 x 14 grid (at least 1)."""
  return max(1, int(round(PAPER_MIN_BLOCK * grid[0] * grid[1] / PAPER_GRID)))


def num_block_masked(grid: tuple[int, int], ratio: float) -> int:
  """The patch count the mask aims at: ``round(ratio * n)``."""
  if not 0.0 < ratio < 1.0:
    raise ValueError(f"blockwise mask ratio must be in (0, 1); got {ratio}.")
  return max(1, int(round(ratio * grid[0] * grid[1])))


def _one_mask(key, grid, target, min_block, max_block, log_aspect):
  gh, gw = grid
  rows = jnp.arange(gh)[:, None]
  cols = jnp.arange(gw)[None, :]

  def step(i, state):
    mask, count, done, blocks, added = state
    k_area, k_aspect, k_top, k_left = jax.random.split(jax.random.fold_in(key, i), 4)
    remaining = jnp.minimum(target - count, max_block).astype(jnp.float32)
    area = jax.random.uniform(k_area, (TRIES,), minval=min_block, maxval=remaining)
    aspect = jnp.exp(jax.random.uniform(k_aspect, (TRIES,), minval=log_aspect[0],
                                        maxval=log_aspect[1]))
    h = jnp.round(jnp.sqrt(area * aspect)).astype(jnp.int32)
    w = jnp.round(jnp.sqrt(area / aspect)).astype(jnp.int32)
    # randint(0, gh - h) inclusive, as BEiT's random.randint
    top = jnp.floor(jax.random.uniform(k_top, (TRIES,)) * (gh - h + 1)).astype(jnp.int32)
    left = jnp.floor(jax.random.uniform(k_left, (TRIES,)) * (gw - w + 1)).astype(jnp.int32)
    rect = ((rows[None] >= top[:, None, None]) & (rows[None] < (top + h)[:, None, None])
            & (cols[None] >= left[:, None, None]) & (cols[None] < (left + w)[:, None, None]))
    new = jnp.sum(rect & ~mask[None], axis=(1, 2))
    ok = (h < gh) & (w < gw) & (h > 0) & (w > 0) & (new > 0) & (new <= remaining)
    first = jnp.argmax(ok)
    take = ok[first] & ~done
    mask = jnp.where(take, mask | rect[first], mask)
    count = count + jnp.where(take, new[first], 0)
    block = jnp.stack([top[first], left[first], h[first], w[first]])
    blocks = blocks.at[i].set(jnp.where(take, block, 0))
    added = added.at[i].set(take)
    done = done | ~take | (count >= target)
    return mask, count, done, blocks, added

  init = (jnp.zeros(grid, bool), jnp.int32(0), jnp.bool_(False),
          jnp.zeros((target, 4), jnp.int32), jnp.zeros((target,), bool))
  mask, _, _, blocks, added = jax.lax.fori_loop(0, target, step, init)
  return mask.reshape(-1), blocks, added


def blockwise_mask(rng, batch: int, grid: tuple[int, int], ratio: float = 0.4, *,
                   min_block: Optional[int] = None, max_block: Optional[int] = None,
                   aspect: float = 0.3) -> BlockMask:
  """BEiT's blockwise mask for ``batch`` images of a ``grid = (gh, gw)`` patch grid.

  ``ratio``: the masked fraction aimed at (BEiT: 0.4); ``min_block``: the
  smallest rectangle area in patches (default ``default_min_block(grid)``);
  ``max_block``: the largest (default: no limit but the target);
  ``aspect``: rectangles' height / width lies in ``[aspect, 1 / aspect]``.
  Deterministic for a given ``rng``; jittable (the arguments other than
  ``rng`` are static).
  """
  gh, gw = int(grid[0]), int(grid[1])
  if gh < 2 or gw < 2:
    raise ValueError(f"blockwise masking needs a grid of at least 2 x 2 patches (a block is "
                     f"strictly smaller than the grid); got {gh} x {gw}.")
  if not 0.0 < aspect <= 1.0:
    raise ValueError(f"blockwise mask aspect={aspect}: must be in (0, 1] (the range is "
                     "[aspect, 1 / aspect]).")
  target = num_block_masked((gh, gw), ratio)
  min_block = default_min_block((gh, gw)) if min_block is None else int(min_block)
  max_block = target if max_block is None else int(max_block)
  if min_block < 1 or max_block < min_block:
    raise ValueError(f"blockwise mask: need 1 <= min_block={min_block} <= max_block={max_block}.")
  log_aspect = (math.log(aspect), -math.log(aspect))
  keys = jax.random.split(rng, batch)
  mask, blocks, added = jax.vmap(
      lambda k: _one_mask(k, (gh, gw), target, float(min_block), max_block, log_aspect))(keys)
  return BlockMask(mask, blocks, added)

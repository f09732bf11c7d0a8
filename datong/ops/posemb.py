"""Position embeddings as pure functions (learned tables live in the stems).

* ``sincos_1d`` / ``sincos_2d``: fixed sinusoidal tables (Transformer; MAE's
  2-D variant: half the channels encode the row, half the column).
* ``apply_rotary``: rotary position embedding (RoPE) on q or k.
* ``interpolate_2d``: resize a learned ``[h*w, width]`` grid table to a new
  grid (fine-tuning at another resolution). Default: torch's bicubic
  (``bicubic_matrix``), what HF's ``interpolate_pos_encoding``, DeiT and
  DINO use; other methods go to ``jax.image.resize``.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

# torch's cubic convolution coefficient (``upsample_bicubic2d``); Keys' and
# ``jax.image.resize``'s is -0.5.
TORCH_CUBIC_A = -0.75


def sincos_1d(length: int, width: int, *, max_period: float = 10_000.0,
              positions=None, dtype=jnp.float32):
  """``[length, width]`` table; channels ``[sin(p*w_i) ..., cos(p*w_i) ...]``."""
  if width % 2:
    raise ValueError(f"sincos_1d needs an even width; got {width}.")
  pos = jnp.arange(length, dtype=jnp.float32) if positions is None \
      else jnp.asarray(positions, jnp.float32)
  omega = 1.0 / max_period ** (jnp.arange(width // 2, dtype=jnp.float32) / (width // 2))
  angles = pos[..., None] * omega
  return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1).astype(dtype)


def sincos_2d(height: int, width_cells: int, width: int, *,
              max_period: float = 10_000.0, dtype=jnp.float32):
  """``[height * width_cells, width]`` table in row-major patch order.

  The first half of the channels encodes the row (y), the second the column.
  """
  if width % 4:
    raise ValueError(f"sincos_2d needs width divisible by 4; got {width}.")
  y, x = jnp.meshgrid(jnp.arange(height), jnp.arange(width_cells), indexing="ij")
  emb_y = sincos_1d(0, width // 2, max_period=max_period, positions=y.reshape(-1))
  emb_x = sincos_1d(0, width // 2, max_period=max_period, positions=x.reshape(-1))
  return jnp.concatenate([emb_y, emb_x], axis=-1).astype(dtype)


def rotary_angles(positions, head_dim: int, *, theta: float = 10_000.0):
  """``[..., length, head_dim // 2]`` float32 angles for ``apply_rotary``."""
  if head_dim % 2:
    raise ValueError(f"rotary embeddings need an even head_dim; got {head_dim}.")
  inv_freq = 1.0 / theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
  return jnp.asarray(positions, jnp.float32)[..., None] * inv_freq


def apply_rotary(x, positions, *, theta: float = 10_000.0):
  """Rotate ``x`` ``[batch, length, heads, head_dim]`` by its positions.

  ``positions``: ``[batch, length]`` (or ``[length]``) ints. Uses the
  half-split layout (GPT-NeoX / LLaMA-HF): channel ``i`` pairs with
  ``i + head_dim/2``. Computed in float32, returned in x's dtype.
  """
  angles = rotary_angles(positions, x.shape[-1], theta=theta)
  if angles.ndim == 2:
    angles = angles[None]
  sin = jnp.sin(angles)[:, :, None, :]
  cos = jnp.cos(angles)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


@functools.lru_cache(maxsize=64)
def bicubic_matrix(n_in: int, n_out: int, a: float = TORCH_CUBIC_A) -> np.ndarray:
  """``[n_out, n_in]`` float64 weights of torch's 1-D bicubic resize.

  ``torch.nn.functional.interpolate(mode="bicubic", align_corners=False,
  antialias=False)`` with an output ``size``: output ``i`` samples the input
  at ``(i + 0.5) * n_in / n_out - 0.5`` (not clamped), with the cubic
  convolution kernel of coefficient ``a`` on the 4 nearest inputs, whose
  indices are clamped to the edge (repeating the border values).
  """
  if n_in <= 0 or n_out <= 0:
    raise ValueError(f"bicubic_matrix needs positive sizes; got {n_in} -> {n_out}.")
  scale = n_in / n_out
  src = (np.arange(n_out, dtype=np.float64) + 0.5) * scale - 0.5
  base = np.floor(src)
  t = src - base

  def near(x):  # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + 1

  def far(x):  # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

  weights = np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=1)
  index = np.clip(base[:, None].astype(np.int64) + np.arange(-1, 3)[None], 0, n_in - 1)
  out = np.zeros((n_out, n_in), np.float64)
  np.add.at(out, (np.repeat(np.arange(n_out), 4), index.reshape(-1)), weights.reshape(-1))
  return out


def interpolate_1d(table, new_length: int):
  """``[length, width]`` -> ``[new_length, width]`` with torch's bicubic along
  the rows (HF ViT-MAE's decoder resizes its flattened table this way)."""
  if table.shape[0] == new_length:
    return table
  w = jnp.asarray(bicubic_matrix(table.shape[0], new_length), jnp.float32)
  out = jnp.einsum("nm,mc->nc", w, table.astype(jnp.float32),
                   precision=jax.lax.Precision.HIGHEST)
  return out.astype(table.dtype)


def interpolate_2d(table, old_grid: tuple[int, int], new_grid: tuple[int, int],
                   method: str = "torch_bicubic"):
  """Resize a ``[old_h * old_w, width]`` position table to ``new_grid``.

  ``torch_bicubic``: torch's separable bicubic (``bicubic_matrix``; equals
  HF's ``interpolate_pos_encoding`` for ViT, CLIP and ViT-MAE). Any other
  ``method`` (``"bicubic"``: Keys' a = -0.5, ``"linear"``, ...) is
  ``jax.image.resize``'s. Identity when the grids are equal (no resampling
  is done at all).
  """
  old_h, old_w = old_grid
  new_h, new_w = new_grid
  if table.shape[0] != old_h * old_w:
    raise ValueError(f"position table has {table.shape[0]} rows, but grid "
                     f"{old_grid} has {old_h * old_w} cells.")
  if tuple(old_grid) == tuple(new_grid):
    return table
  grid = table.reshape(old_h, old_w, table.shape[-1])
  if method == "torch_bicubic":
    wh = jnp.asarray(bicubic_matrix(old_h, new_h), jnp.float32)
    ww = jnp.asarray(bicubic_matrix(old_w, new_w), jnp.float32)
    out = jnp.einsum("yh,hwc,xw->yxc", wh, grid.astype(jnp.float32), ww,
                     precision=jax.lax.Precision.HIGHEST)
    return out.reshape(new_h * new_w, table.shape[-1]).astype(table.dtype)
  out = jax.image.resize(grid.astype(jnp.float32), (new_h, new_w, table.shape[-1]), method)
  return out.reshape(new_h * new_w, table.shape[-1]).astype(table.dtype)

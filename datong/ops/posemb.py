"""Position embeddings as pure functions (learned tables live in the stems).

* ``sincos_1d`` / ``sincos_2d``: fixed sinusoidal tables (Transformer; MAE's
  2-D variant: half the channels encode the row, half the column).
* ``apply_rotary``: rotary position embedding (RoPE) on q or k.
* ``interpolate_2d``: resize a learned ``[h*w, width]`` grid table to a new
  grid (fine-tuning at another resolution), bicubic like ViT/DeiT.
"""

import jax
import jax.numpy as jnp


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


def interpolate_2d(table, old_grid: tuple[int, int], new_grid: tuple[int, int],
                   method: str = "bicubic"):
  """Resize a ``[old_h * old_w, width]`` position table to ``new_grid``.

  Identity when the grids are equal (no resampling is done at all).
  """
  old_h, old_w = old_grid
  new_h, new_w = new_grid
  if table.shape[0] != old_h * old_w:
    raise ValueError(f"position table has {table.shape[0]} rows, but grid "
                     f"{old_grid} has {old_h * old_w} cells.")
  if tuple(old_grid) == tuple(new_grid):
    return table
  grid = table.reshape(old_h, old_w, table.shape[-1])
  out = jax.image.resize(grid.astype(jnp.float32), (new_h, new_w, table.shape[-1]), method)
  return out.reshape(new_h * new_w, table.shape[-1]).astype(table.dtype)

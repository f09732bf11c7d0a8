"""Images <-> sequences of flattened patches.

Patch order is row-major over the patch grid; inside a patch the vector is
``(patch_row, patch_col, channel)``-major, i.e. ``p*p*c`` values. This equals
a stride-``p`` convolution whose kernel is reshaped to ``[p*p*c, width]``.
"""

import einops


def _check(h: int, w: int, patch: tuple[int, int]):
  ph, pw = patch
  if h % ph or w % pw:
    raise ValueError(
        f"image size {h}x{w} is not divisible by the patch size {ph}x{pw}; "
        "resize or crop the images, or pick a patch size that divides both.")


def pair(x) -> tuple[int, int]:
  """An int or a pair of ints (a size, a patch, a window) as ``(h, w)``."""
  if isinstance(x, int):
    return (x, x)
  x = tuple(int(v) for v in x)
  if len(x) != 2:
    raise ValueError(f"expected an int or a pair, got {x!r}")
  return x


def patchify(images, patch):
  """``[batch, h, w, c]`` -> ``[batch, (h/ph)*(w/pw), ph*pw*c]``."""
  ph, pw = pair(patch)
  b, h, w, c = images.shape
  _check(h, w, (ph, pw))
  x = images.reshape(b, h // ph, ph, w // pw, pw, c)
  x = x.transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // ph) * (w // pw), ph * pw * c)


def unpatchify(patches, patch, image_size: tuple[int, int], channels: int):
  """Inverse of ``patchify``: ``[batch, n, ph*pw*c]`` -> ``[batch, h, w, c]``."""
  ph, pw = pair(patch)
  h, w = image_size
  _check(h, w, (ph, pw))
  b, n, d = patches.shape
  gh, gw = h // ph, w // pw
  if n != gh * gw or d != ph * pw * channels:
    raise ValueError(
        f"patches {patches.shape} do not form a {h}x{w}x{channels} image with "
        f"{ph}x{pw} patches (expected [{b}, {gh * gw}, {ph * pw * channels}]).")
  x = patches.reshape(b, gh, gw, ph, pw, channels).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h, w, channels)


def grid_shape(image_size: tuple[int, int], patch) -> tuple[int, int]:
  """Number of patches along height and width."""
  ph, pw = pair(patch)
  _check(image_size[0], image_size[1], (ph, pw))
  return image_size[0] // ph, image_size[1] // pw


def pool_tokens(tokens, grid: tuple[int, int], window: int):
  """``[b, h*w, d]`` tokens in raster order over an ``(h, w)`` grid -> their
  means over non-overlapping ``window x window`` cells, ``[b, (h/window) *
  (w/window), d]`` in raster order of the cells."""
  h, w = grid
  if tokens.shape[1] != h * w or h % window or w % window:
    raise ValueError(f"pool_tokens: {tokens.shape[1]} tokens on a {h}x{w} grid can not be "
                     f"pooled in {window}x{window} cells.")
  return einops.reduce(tokens, "b (h i w j) d -> b (h w) d", "mean", h=h // window, i=window,
                       j=window)


"""iGPT (Chen et al. 2020): images as sequences of palette indices, modeled
by the shared GPT.

Colors are quantized to a palette learned by k-means on training pixels
(``fit_palette``: intensity clusters for grayscale, RGB clusters for color;
the size is configurable), each image becomes its palette indices in raster
order (``image_to_ids``), and a ``GPT`` (``datong.unimodal.text``, the same
class as the text model) predicts them left to right after a start token
(id ``palette_size``) with the shared ``causal_lm_loss``. Features for a
linear probe are each layer's outputs averaged over positions
(``layer_features``: iGPT finds the best in the middle layers); samples come
from the KV-cache decoder (``sample_images``).

    palette = fit_palette(key, train_pixels, 16)
    cfg = IGPTConfig(TransformerConfig.preset("tiny"), image_size=(8, 8), palette_size=16)
    logits, aux = cfg.make().apply(params, igpt_inputs(image_to_ids(images, palette), cfg))
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from datong.backbone import TransformerConfig
from datong.ops import vq
from datong.ops.patches import pair, pool_tokens
from datong.unimodal.generation import generate
from datong.unimodal.text import BERT, GPT, TextConfig

OBJECTIVES = ("causal", "bert")


def fit_palette(rng, pixels, size: int, iterations: int = 30):
  """``[size, channels]`` k-means palette of ``pixels [n, channels]``, sorted
  by intensity (sum over channels) so ids are ordered dark to light."""
  pixels = jnp.asarray(pixels, jnp.float32).reshape(-1, jnp.shape(pixels)[-1])
  palette, _ = vq.kmeans(rng, pixels, size, iterations)
  return palette[jnp.argsort(jnp.sum(palette, -1))]


def image_to_ids(images, palette):
  """``[b, h, w, c]`` -> ``[b, h * w]`` int32 nearest palette ids, raster order."""
  b = images.shape[0]
  return vq.nearest_code(images.reshape(b, -1, images.shape[-1]), palette)


def ids_to_image(ids, palette, image_size):
  """``[b, h * w]`` palette ids -> ``[b, h, w, c]`` colors."""
  h, w = pair(image_size)
  return jnp.asarray(palette)[ids].reshape(ids.shape[0], h, w, -1)


@dataclasses.dataclass(frozen=True)
class IGPTConfig:
  """A GPT over ``palette_size`` colors (+ a start token) of ``image_size``
  images; ``objective="bert"``: iGPT's BERT variant, a ``BERT`` that predicts
  ``mask_rate`` of the pixels (id ``palette_size`` is then the mask token)."""
  backbone: TransformerConfig
  image_size: tuple[int, int] = (8, 8)
  channels: int = 1
  palette_size: int = 16
  objective: str = "causal"
  mask_rate: float = 0.15

  def __post_init__(self):
    object.__setattr__(self, "image_size", pair(self.image_size))
    if self.palette_size < 2:
      raise ValueError(f"IGPTConfig.palette_size={self.palette_size}: need at least 2 colors.")
    if self.channels < 1:
      raise ValueError(f"IGPTConfig.channels={self.channels}: must be positive.")
    if self.objective not in OBJECTIVES:
      raise ValueError(f"IGPTConfig.objective={self.objective!r}: choose one of {OBJECTIVES}.")
    if not 0.0 < self.mask_rate < 1.0:
      raise ValueError(f"IGPTConfig.mask_rate={self.mask_rate}: must be in (0, 1).")

  @property
  def length(self) -> int:
    """Pixels per image (the sequence length, the start token excluded)."""
    return self.image_size[0] * self.image_size[1]

  @property
  def start_id(self) -> int:
    """The start token (causal) or the mask token (bert)."""
    return self.palette_size

  @property
  def text(self) -> TextConfig:
    """The text model's config: learned positions over the pixels (+ start), tied head."""
    return TextConfig(backbone=self.backbone, vocab_size=self.palette_size + 1,
                      positions="learned", max_length=self.length + 1)

  def make(self):
    return GPT(self.text) if self.objective == "causal" else BERT(self.text)


def igpt_inputs(ids, config: IGPTConfig):
  """``[b, n]`` pixel ids -> GPT inputs ``[b, n]``: start token, then pixels
  ``0 .. n-2``; position ``t`` predicts pixel ``t``."""
  start = jnp.full((ids.shape[0], 1), config.start_id, jnp.int32)
  return jnp.concatenate([start, ids[:, :-1].astype(jnp.int32)], axis=1)


def layer_features(layers, how: str = "mean", grid=None, pool: int = 1):
  """``[depth, b, n, width]`` block outputs -> per-layer probe features:
  ``"mean"``, each layer's mean over positions ``[depth, b, width]``
  (iGPT's); ``"tokens"``, the layer's hidden states at the pixel positions
  (the start token dropped), flattened in raster order ``[depth, b, (n - 1)
  * width]``: a probe that keeps the spatial map. With ``pool`` > 1, the
  ``n = h * w`` states tile the ``grid`` ``(h, w)``, position ``i`` standing
  for pixel ``i``, the one it predicts (position 0: the start token), and
  are averaged over ``pool x pool`` cells first: ``[depth, b, n / pool**2 *
  width]``."""
  layers = layers.astype(jnp.float32)
  if how == "mean":
    return jnp.mean(layers, axis=2)
  if how == "tokens":
    if pool == 1:
      return layers[:, :, 1:].reshape(layers.shape[0], layers.shape[1], -1)
    depth, b, n, width = layers.shape
    cells = pool_tokens(layers.reshape(depth * b, n, width), grid, pool)
    return cells.reshape(depth, b, -1)
  raise ValueError(f"layer_features: how={how!r}; use 'mean' or 'tokens'.")


def sample_images(config: IGPTConfig, params, palette, rng, count: int, *,
                  temperature: float = 1.0, top_k: int = 0):
  """``[count, h, w, c]`` unconditional samples, decoded with the KV cache.

  The start token is the prompt. It is never a training target, so a trained
  model gives it almost no probability; should it be sampled anyway it is
  drawn as the lightest color (id ``palette_size - 1``).
  """
  if config.objective != "causal":
    raise ValueError("sample_images needs the causal objective; a BERT-objective iGPT does "
                     "not generate left to right.")
  prompts = jnp.full((count, 1), config.start_id, jnp.int32)
  out = generate(config.make(), params, prompts, rng=rng, max_new_tokens=config.length,
                 temperature=temperature, top_k=top_k)
  ids = jnp.minimum(out["tokens"], config.palette_size - 1)
  return ids_to_image(ids, palette, config.image_size)


def save_image_grid(path: str, images, *, cols: int = 8, value_range=(-1.0, 1.0),
                    scale: int = 4) -> str:
  """Write ``[b, h, w, c]`` images (c 1 or 3) as a PNG grid of ``cols`` columns."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  x = (np.asarray(images, np.float32) - value_range[0]) / (value_range[1] - value_range[0])
  x = np.clip(x, 0.0, 1.0)
  b, h, w, c = x.shape
  rows, pad = -(-b // cols), 1
  canvas = np.ones((rows * (h + pad) + pad, cols * (w + pad) + pad, c), np.float32)
  for i in range(b):
    y0, x0 = pad + (i // cols) * (h + pad), pad + (i % cols) * (w + pad)
    canvas[y0:y0 + h, x0:x0 + w] = x[i]
  canvas = np.repeat(np.repeat(canvas, scale, 0), scale, 1)
  pixels = (canvas * 255).round().astype(np.uint8)
  Image.fromarray(pixels[..., 0] if c == 1 else pixels).save(path)
  return path

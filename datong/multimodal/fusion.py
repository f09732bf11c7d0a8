"""Single-stream fusion: image patches and text tokens in ONE sequence through the one backbone.

Each (image, text) pair becomes ``[patch_1 .. patch_n, tok_1 .. tok_T]``:
patch embeddings (the ViT stem, learned positions) and token embeddings
(learned positions from 0 per pair), each plus a learned modality embedding
(image 0, text 1; the same ids reach the backbone as ``modality_ids``, so an
MoE ``modality`` router gives VLMo / BEiT-3 style per-modality experts).

Attention (``ops.masks.fusion_mask``): a prefix-LM, bidirectional over the
image and causal over the text (captioning: a later token never changes an
image position or an earlier token), or bidirectional over both
(``text_causal=False``: masked multimodal modeling, matching). Packing:
``images [b, P, h, w, c]`` with ``ids [b, P, T]`` puts P pairs in a row;
each pair attends only within itself, so a packed row equals its pairs run
alone. Padded text (``text_valid`` False) is never attended to.

Heads on the one hidden sequence: ``text_logits [..., T, vocab]`` (tied to
the token table; position t predicts token t + 1), ``pixels [..., n,
patch_dim]`` (masked-patch regression) and ``match [..., 2]`` (image-text
matching, read at each pair's last real token, which sees the whole pair).

    model = FusionModel(FusionConfig(backbone, vocab_size=262, max_text_length=32))
    out, aux = model.apply(params, images, ids, text_valid)
    captions = caption(model, params, images, bos_id=..., eos_id=..., max_new_tokens=24)
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from datong.backbone import Transformer, TransformerConfig, init_cache
from datong.ops import masks as mask_ops
from datong.ops.patches import grid_shape, pair, patchify
from datong.unimodal.generation import sample_tokens
from datong.unimodal.text import TokenEmbedding
from datong.unimodal.vision import PatchEmbedding

IMAGE, TEXT = 0, 1  # modality ids


@dataclasses.dataclass(frozen=True)
class FusionConfig:
  """One backbone over [image patches, text tokens]; the image geometry and
  text vocabulary. ``mask_token``: a learned embedding replaces masked
  patches (masked multimodal modeling)."""
  backbone: TransformerConfig
  vocab_size: int
  max_text_length: int
  image_size: tuple[int, int] = (8, 8)
  patch_size: tuple[int, int] = (2, 2)
  channels: int = 1
  mask_token: bool = True

  def __post_init__(self):
    object.__setattr__(self, "image_size", pair(self.image_size))
    object.__setattr__(self, "patch_size", pair(self.patch_size))
    grid_shape(self.image_size, self.patch_size)  # raises with the sizes named
    if self.vocab_size < 1 or self.max_text_length < 2:
      raise ValueError(f"FusionConfig: vocab_size={self.vocab_size} must be >= 1 and "
                       f"max_text_length={self.max_text_length} >= 2 (a BOS and a token).")

  @property
  def num_patches(self) -> int:
    g = grid_shape(self.image_size, self.patch_size)
    return g[0] * g[1]

  @property
  def patch_dim(self) -> int:
    return self.patch_size[0] * self.patch_size[1] * self.channels

  @property
  def length(self) -> int:
    """Sequence positions of one pair."""
    return self.num_patches + self.max_text_length

  def flops_per_example(self, pairs: int = 1) -> float:
    """Training FLOPs (forward + backward) of ``pairs`` pairs in one row:
    the backbone over the row plus the stem and the three heads."""
    n, t, w = self.num_patches, self.max_text_length, self.backbone.width
    length = pairs * self.length
    heads = 6.0 * pairs * (t * w * self.vocab_size + n * w * self.patch_dim + n * self.patch_dim * w)
    return length * self.backbone.flops_per_token(length) + heads


class FusionModel(nn.Module):
  """``(images, ids, text_valid) -> (outputs, aux)``.

  ``images [b, h, w, c]`` with ``ids [b, T]`` (one pair per row) or
  ``images [b, P, h, w, c]`` with ``ids [b, P, T]`` (P packed pairs);
  ``text_valid`` like ``ids`` (default: all real); ``image_mask [b(, P), n]``
  True where a patch is replaced by the mask token. ``outputs``:
  ``text_logits [b(, P), T, vocab]`` float32, ``pixels [b(, P), n,
  patch_dim]``, ``match [b(, P), 2]``, ``hidden [b(, P), n + T, width]``.
  ``aux``: the backbone's (``losses``, ``metrics``, ...).
  """
  config: FusionConfig

  def setup(self):
    cfg = self.config
    bb = cfg.backbone
    self.stem = PatchEmbedding(bb.width, cfg.patch_size, cfg.image_size, mask_token=cfg.mask_token,
                               dtype=bb.dtype, param_dtype=bb.param_dtype)
    self.embed = TokenEmbedding(cfg.vocab_size, bb.width, max_length=cfg.max_text_length,
                                dtype=bb.dtype, param_dtype=bb.param_dtype)
    self.modality = self.param("modality_embedding", nn.with_logical_partitioning(
        nn.initializers.normal(0.02), (None, "embed")), (2, bb.width), bb.param_dtype)
    self.backbone = Transformer(bb)
    dense = lambda n, axes, name: nn.Dense(
        n, dtype=bb.dtype, param_dtype=bb.param_dtype, name=name,
        kernel_init=nn.with_logical_partitioning(nn.initializers.xavier_uniform(), axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[-1:]))
    self.pixel_head = dense(cfg.patch_dim, ("embed", "patch"), "pixel_head")
    self.match_head = dense(2, ("embed", None), "match_head")

  def embed_image(self, images, image_mask=None):
    """``[b, h, w, c]`` -> ``[b, n, width]`` patch embeddings + the image modality."""
    x = self.stem(images, mask=image_mask)
    return x + self.modality[IMAGE].astype(x.dtype)

  def embed_text(self, ids, positions=None):
    """``[b, T]`` ids -> ``[b, T, width]`` (positions default ``arange(T)``) + text modality."""
    x = self.embed(ids, positions)
    return x + self.modality[TEXT].astype(x.dtype)

  def text_logits(self, hidden):
    return self.embed.attend(hidden).astype(jnp.float32)

  def __call__(self, images, ids, text_valid=None, *, image_mask=None, text_causal: bool = True,
               train: bool = False):
    cfg = self.config
    packed = ids.ndim == 3
    if not packed:
      images, ids = images[:, None], ids[:, None]
      text_valid = None if text_valid is None else text_valid[:, None]
      image_mask = None if image_mask is None else image_mask[:, None]
    b, p, t = ids.shape
    if images.shape[:2] != (b, p) or t > cfg.max_text_length:
      raise ValueError(f"FusionModel: images {images.shape} and ids {ids.shape} must agree on "
                       f"[batch(, pairs)], and T <= max_text_length={cfg.max_text_length}.")
    n = cfg.num_patches
    valid = jnp.ones((b, p, t), bool) if text_valid is None else text_valid.astype(bool)
    flat = lambda x: x.reshape((b * p,) + x.shape[2:])
    img = self.embed_image(flat(images), None if image_mask is None else flat(image_mask))
    txt = self.embed_text(flat(ids))
    x = jnp.concatenate([img, txt.astype(img.dtype)], axis=1).reshape(b, p * (n + t), -1)
    # Per pair: segment p + 1, image positions the prefix, every patch a real key.
    seg = jnp.repeat(jnp.arange(1, p + 1, dtype=jnp.int32), n + t)[None].repeat(b, 0)
    is_image = jnp.tile(jnp.arange(n + t) < n, p)[None].repeat(b, 0)
    keys = jnp.concatenate([jnp.ones((b, p, n), bool), valid], axis=2).reshape(b, -1)
    mask = mask_ops.fusion_mask(seg, is_image, keys, causal=text_causal)
    hidden, aux = self.backbone(x, mask=mask, modality_ids=jnp.where(is_image, IMAGE, TEXT),
                                train=train)
    hidden = hidden.reshape(b, p, n + t, -1)
    text_h, image_h = hidden[:, :, n:], hidden[:, :, :n]
    last = jnp.maximum(jnp.sum(valid, -1) - 1, 0)  # each pair's last real token
    pooled = jnp.take_along_axis(text_h, last[..., None, None], axis=2)[:, :, 0]
    out = {"text_logits": self.text_logits(text_h),
           "pixels": self.pixel_head(image_h).astype(jnp.float32),
           "match": self.match_head(pooled).astype(jnp.float32), "hidden": hidden}
    if not packed:
      out = {k: v[:, 0] for k, v in out.items()}
    return out, aux

  def prefill(self, images, ids, cache):
    """Decoding's first pass: ``images [b, h, w, c]`` and the prompt ``ids [b,
    T0]`` (a BOS, or a caption's start; every token real) written into
    ``cache`` at 0 under the prefix-LM mask. Returns ``(logits of the last
    prompt token [b, vocab], cache)``."""
    n = self.config.num_patches
    x = jnp.concatenate([self.embed_image(images), self.embed_text(ids).astype(self.stem.dtype)],
                        axis=1)
    b, length = x.shape[:2]
    max_len = cache["k"].shape[2]
    is_image = jnp.arange(max_len) < n
    valid = jnp.arange(max_len) < length
    seg = jnp.ones((b, max_len), jnp.int32)
    mask = mask_ops.fusion_mask(seg, jnp.broadcast_to(is_image, (b, max_len)),
                                jnp.broadcast_to(valid, (b, max_len)), causal=True)[:, :, :length]
    modality = jnp.where(jnp.arange(length) < n, IMAGE, TEXT)[None].repeat(b, 0)
    hidden, aux = self.backbone(x, mask=mask, modality_ids=modality, cache=cache, cache_index=0)
    return self.text_logits(hidden[:, -1]), aux["cache"]

  def decode_step(self, tokens, position, cache, cache_index):
    """One new token ``[b]`` at text position ``position`` (a scalar),
    written at ``cache_index``: ``(logits [b, vocab], cache)``."""
    x = self.embed_text(tokens[:, None], jnp.full((1,), position, jnp.int32))
    modality = jnp.full(tokens.shape + (1,), TEXT, jnp.int32)
    hidden, aux = self.backbone(x, causal=True, modality_ids=modality, cache=cache,
                                cache_index=cache_index)
    return self.text_logits(hidden[:, -1]), aux["cache"]


def next_token_loss(logits, ids, text_valid):
  """Captioning: mean cross-entropy of token t + 1 from position t over real
  targets. ``logits [..., T, V]``, ``ids`` / ``text_valid [..., T]``.
  Returns ``(loss, token accuracy)``."""
  logp = jax.nn.log_softmax(logits[..., :-1, :].astype(jnp.float32), -1)
  target = ids[..., 1:]
  w = text_valid[..., 1:].astype(jnp.float32)
  nll = -jnp.take_along_axis(logp, target[..., None], -1)[..., 0]
  correct = (jnp.argmax(logp, -1) == target).astype(jnp.float32)
  total = jnp.maximum(jnp.sum(w), 1.0)
  return jnp.sum(nll * w) / total, jnp.sum(correct * w) / total


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "temperature", "top_k",
                                              "top_p", "eos_id", "pad_id", "vocab_size"))
def caption(model: FusionModel, params, images, prompt, rng=None, *, max_new_tokens: int,
            eos_id: int, pad_id: int = 0, temperature: float = 0.0, top_k: int = 0,
            top_p: float = 1.0, vocab_size: int = 0):
  """Captions for ``images [b, h, w, c]`` with the KV cache, jitted.

  ``prompt [b, T0]``: the caption's start (a BOS id per row, or more). The
  image and prompt are encoded once (``prefill``); then one token per step
  (greedy with temperature 0, else ``sample_logits``' temperature / top-k /
  top-p) until ``max_new_tokens`` or every row emitted ``eos_id``;
  ``vocab_size > 0`` samples only ids below it (the tokenizer's, when the
  model's table is larger). Returns
  ``{"tokens": [b, max_new_tokens] (pad_id after EOS), "lengths": [b]}``
  (tokens before the EOS), like ``unimodal.generation.generate``.
  """
  cfg = model.config
  b, t0 = prompt.shape
  if t0 + max_new_tokens > cfg.max_text_length:
    raise ValueError(f"caption: prompt length {t0} + max_new_tokens {max_new_tokens} exceeds "
                     f"max_text_length={cfg.max_text_length} (the text position table).")
  n = cfg.num_patches
  cache = init_cache(cfg.backbone, b, n + t0 + max_new_tokens)
  apply = functools.partial(model.apply, {"params": params})
  logits, cache = apply(images, prompt.astype(jnp.int32), cache, method=FusionModel.prefill)
  step = lambda tok, t, cache: apply(tok, t0 + t, cache, n + t0 + t,
                                     method=FusionModel.decode_step)
  return sample_tokens(step, logits, cache, rng, max_new_tokens=max_new_tokens, eos_id=eos_id,
                       pad_id=pad_id, temperature=temperature, top_k=top_k, top_p=top_p,
                       vocab_size=vocab_size)


def image_patches(images, config: FusionConfig):
  """Pixel targets ``[b, n, patch_dim]`` of ``images [b, h, w, c]``, row-major patches."""
  return patchify(images.astype(jnp.float32), config.patch_size)


def masked_patch_loss(pixels, images, image_mask, config: FusionConfig,
                      norm_pix: bool = True) -> jax.Array:
  """Mean squared error over the masked patches (``norm_pix``: each target
  patch normalized to zero mean, unit variance, as MAE)."""
  target = image_patches(images, config)
  if norm_pix:
    mean = target.mean(-1, keepdims=True)
    var = target.var(-1, keepdims=True)
    target = (target - mean) / jnp.sqrt(var + 1e-6)
  err = jnp.mean((pixels - target) ** 2, -1)
  w = image_mask.astype(jnp.float32)
  return jnp.sum(err * w) / jnp.maximum(jnp.sum(w), 1.0)


def masked_token_loss(logits, targets, selected) -> tuple[jax.Array, jax.Array]:
  """Cross-entropy of the original ids at the masked text positions (no
  shift: bidirectional). Returns ``(loss, accuracy)``."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
  nll = -jnp.take_along_axis(logp, targets[..., None], -1)[..., 0]
  w = selected.astype(jnp.float32)
  total = jnp.maximum(jnp.sum(w), 1.0)
  acc = jnp.sum((jnp.argmax(logp, -1) == targets).astype(jnp.float32) * w) / total
  return jnp.sum(nll * w) / total, acc


def match_loss(match_logits, is_match, weights=None) -> tuple[jax.Array, jax.Array]:
  """Image-text matching: 2-way cross-entropy, optionally weighted per pair;
  ``(loss, accuracy)``."""
  logp = jax.nn.log_softmax(match_logits.astype(jnp.float32), -1)
  y = is_match.astype(jnp.int32)
  nll = -jnp.take_along_axis(logp, y[..., None], -1)[..., 0]
  acc = (jnp.argmax(logp, -1) == y).astype(jnp.float32)
  w = jnp.ones_like(nll) if weights is None else weights.astype(jnp.float32)
  total = jnp.maximum(jnp.sum(w), 1.0)
  return jnp.sum(nll * w) / total, jnp.sum(acc * w) / total


def caption_log_likelihood(outputs, ids, text_valid) -> jax.Array:
  """Per pair: the summed log-probability of ``ids[1:]`` given the image and
  the tokens before (zero-shot classification by the likeliest prompt)."""
  logp = jax.nn.log_softmax(outputs["text_logits"][..., :-1, :], -1)
  tok = jnp.take_along_axis(logp, ids[..., 1:, None], -1)[..., 0]
  return jnp.sum(tok * text_valid[..., 1:].astype(jnp.float32), -1)


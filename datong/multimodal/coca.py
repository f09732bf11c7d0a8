"""CoCa: a contrastive captioner, two towers and one text decoder on the shared backbone.

* Image tower: any image encoder (``datong.unimodal.encoders``; a ViT) ->
  its token map ``[b, n, w_image]``. The contrastive image embedding is one
  learned query attending to the tokens (attentional pooling,
  ``image_pool="attention"``) or the encoder's own pooled output
  (``"encoder"``) -> ``image_head`` -> L2 normalization. The captioning
  context is every token projected to the decoder width
  (``caption_queries=0``) or ``caption_queries`` learned queries attending
  to them (CoCa's captioning pooler).
* Text decoder: ``text.backbone`` split in two ``Transformer`` stacks. The
  lower ``depth - multimodal_depth`` layers (``unimodal``) are causal and
  see no image; a learned [CLS] appended after the caption (no position of
  its own, so padding never moves it) sees every real token, and its output
  (``text_pool="cls"``, CoCa's) or the last real token's (``"eos"``) ->
  ``text_head`` -> L2 normalization is the contrastive text embedding. The
  upper ``multimodal_depth`` layers (``multimodal``) run causal
  self-attention plus cross-attention to the context; the tied token table
  is the captioning head (position t predicts token t + 1).

Loss (``coca_loss``): ``contrastive_weight`` x CLIP's contrastive loss
(``clip.contrastive_loss``: the very function CLIP trains with, softmax or
sigmoid) + ``caption_weight`` x ``fusion.next_token_loss`` on real text
positions. Padding (``text_valid`` False) is never attended to.

    model = CoCa(CocaConfig(image=ViTConfig(...), text=TextConfig(..., max_length=24)))
    out, aux = model.apply({"params": params}, images, ids, text_valid)
    # out: image_emb, text_emb [b, embed_dim]; text_logits [b, T, vocab]; scale, bias
    captions = caption(model, params, images, prompt, eos_id=..., max_new_tokens=16)

Parameter tree: ``encoder`` (the image encoder), ``image_pool``,
``caption_pool`` / ``context_proj``, ``image_head``, ``embed`` (tokens,
positions), ``cls``, ``unimodal``, ``multimodal``, ``text_head``,
``log_scale`` (and ``bias`` for sigmoid). The training objective
(data, zero-shot, retrieval and caption evaluation) is
``datong.train.tasks.coca``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from datong.backbone import Attention, Norm, Transformer, TransformerConfig, init_cache
from datong.multimodal import contrastive
from datong.multimodal.clip import LOSSES, contrastive_loss, resolved_scale_init
from datong.multimodal.fusion import next_token_loss
from datong.unimodal.encoders import check_image_encoder
from datong.unimodal.generation import sample_tokens
from datong.unimodal.text import TextConfig, token_embedding

__all__ = ["AttentionPool", "CoCa", "CocaConfig", "caption", "coca_loss"]

TEXT_POOLS = ("cls", "eos")
IMAGE_POOLS = ("attention", "encoder")


@dataclasses.dataclass(frozen=True)
class CocaConfig:
  """An image encoder, a text decoder and their shared embedding space.

  ``text``: vocabulary, positions (``learned``, ``rope`` or ``none``),
  ``max_length`` (the tokenized ``[BOS] caption [EOS]``) and the decoder
  backbone, whose ``depth`` is the unimodal plus the multimodal layers.
  ``multimodal_depth``: the upper layers with cross-attention (None: half,
  rounded down, at least 1). ``loss``, ``scale_init``, ``max_scale``,
  ``bias_init``: the contrastive loss and its logit scale / bias, as in
  ``ClipConfig``.
  """
  image: Any  # an image-encoder config (datong.unimodal.encoders)
  text: TextConfig
  multimodal_depth: Optional[int] = None
  embed_dim: int = 64
  text_pool: str = "cls"
  image_pool: str = "attention"
  caption_queries: int = 0  # 0: the context is every image token
  loss: str = "softmax"
  scale_init: Optional[float] = None  # None: 1/0.07 (softmax), 10 (sigmoid)
  max_scale: Optional[float] = 100.0
  bias_init: float = -10.0

  def __post_init__(self):
    def bad(field, why):
      raise ValueError(f"CocaConfig.{field}={getattr(self, field)!r}: {why}")
    check_image_encoder(self.image, "CocaConfig.image")
    if self.text_pool not in TEXT_POOLS:
      bad("text_pool", f"choose one of {TEXT_POOLS}")
    if self.image_pool not in IMAGE_POOLS:
      bad("image_pool", f"choose one of {IMAGE_POOLS}")
    if self.loss not in LOSSES:
      bad("loss", f"choose one of {LOSSES}")
    if self.embed_dim <= 0:
      bad("embed_dim", "must be positive")
    if self.caption_queries < 0:
      bad("caption_queries", "must be >= 0 (0: attend to every image token)")
    if self.text.max_length < 2:
      raise ValueError(f"CocaConfig.text.max_length={self.text.max_length}: needs >= 2 "
                       "positions (a BOS and a token).")
    depth = self.text.backbone.depth
    if depth < 2 or not 1 <= self.resolved_multimodal_depth < depth:
      raise ValueError(f"CocaConfig.multimodal_depth={self.multimodal_depth!r} with "
                       f"text.backbone.depth={depth}: the decoder needs >= 1 unimodal and >= 1 "
                       "multimodal layer (depth >= 2, 1 <= multimodal_depth < depth).")
    if self.text.backbone.cross_attention:
      raise ValueError("CocaConfig.text.backbone.cross_attention: leave it False; the "
                       "multimodal layers add cross-attention themselves.")
    if self.scale_init is not None and self.scale_init <= 0:
      bad("scale_init", "must be positive")

  @property
  def resolved_multimodal_depth(self) -> int:
    if self.multimodal_depth is not None:
      return self.multimodal_depth
    return max(1, self.text.backbone.depth // 2)

  @property
  def unimodal_backbone(self) -> TransformerConfig:
    bb = self.text.resolved_backbone
    return bb.replace(depth=bb.depth - self.resolved_multimodal_depth)

  @property
  def multimodal_backbone(self) -> TransformerConfig:
    return self.text.resolved_backbone.replace(depth=self.resolved_multimodal_depth,
                                               cross_attention=True)

  @property
  def resolved_scale_init(self) -> float:
    return resolved_scale_init(self.scale_init, self.loss)

  # The captioners' common face (``datong.caption``, the fusion evaluators).
  @property
  def vocab_size(self) -> int:
    return self.text.vocab_size

  @property
  def max_text_length(self) -> int:
    return self.text.max_length

  @property
  def image_size(self) -> tuple:
    return tuple(self.image.image_size)

  @property
  def channels(self) -> int:
    return self.image.channels

  @property
  def context_length(self) -> int:
    return self.caption_queries or self.image.num_tokens

  def flops_per_example(self) -> float:
    """Training FLOPs (forward + backward): the encoder, the decoder's two
    stacks (the unimodal one over T + 1 positions with the [CLS]), the
    cross-attention, the poolers and the heads."""
    t, w = self.text.max_length, self.text.backbone.width
    uni, multi = self.unimodal_backbone, self.multimodal_backbone
    m, n, wi = self.context_length, self.image.num_tokens, self.image.width
    cross = 6.0 * multi.depth * (2 * t * w * w + 2 * m * w * w + 2 * t * m * w)
    attend = lambda queries: 6.0 * (2 * n * wi * w + 2 * queries * n * w + queries * w * w)
    pools = ((attend(1) if self.image_pool == "attention" else 0.0)
             + (attend(self.caption_queries) if self.caption_queries else 6.0 * n * wi * w))
    heads = 6.0 * (t * w * self.text.vocab_size + (w + wi) * self.embed_dim)
    return float(self.image.flops_per_example() + (t + 1) * uni.flops_per_token(t + 1)
                 + t * multi.flops_per_token(t) + cross + pools + heads)

  def replace(self, **changes) -> "CocaConfig":
    return dataclasses.replace(self, **changes)


class AttentionPool(nn.Module):
  """``num_queries`` learned queries attend to ``tokens [b, n, w_in]`` ->
  ``[b, num_queries, config.width]`` (one attention layer + a norm; CoCa's
  attentional pooler)."""
  config: TransformerConfig
  num_queries: int

  @nn.compact
  def __call__(self, tokens):
    cfg = self.config
    q = self.param("queries", nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                           (None, "embed")),
                   (self.num_queries, cfg.width), cfg.params_dtype)
    q = jnp.broadcast_to(q.astype(cfg.compute_dtype), (tokens.shape[0],) + q.shape)
    out, _ = Attention(cfg, name="attention")(q, tokens.astype(cfg.compute_dtype))
    return Norm(cfg, name="norm")(out)


def _head(embed_dim: int, param_dtype, name: str):
  return nn.Dense(
      embed_dim, use_bias=False, dtype=jnp.float32, param_dtype=param_dtype,
      kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", None)),
      name=name)


class CoCa(nn.Module):
  """``(images, ids, text_valid=None) -> (outputs, aux)``; see the module doc.

  ``images [b, h, w, c]``, ``ids [b, T]`` (``T <= text.max_length``),
  ``text_valid [b, T]`` bool (default all real; real tokens first).
  ``outputs``: ``image_emb``, ``text_emb`` ``[b, embed_dim]`` (normalized),
  ``text_logits [b, T, vocab]`` float32, ``scale``, ``bias`` (0 for
  softmax). ``aux``: the encoder's and the two stacks' aux (``image``,
  ``unimodal``, ``multimodal``).
  """
  config: CocaConfig

  def setup(self):
    cfg = self.config
    uni, multi = cfg.unimodal_backbone, cfg.multimodal_backbone
    self.encoder = cfg.image.make(name="encoder")
    pool_cfg = multi.replace(cross_attention=False, depth=1)
    if cfg.image_pool == "attention":
      self.image_pool = AttentionPool(pool_cfg, 1)
    if cfg.caption_queries:
      self.caption_pool = AttentionPool(pool_cfg, cfg.caption_queries)
    else:
      self.context_proj = nn.Dense(
          multi.width, dtype=multi.compute_dtype, param_dtype=multi.params_dtype,
          kernel_init=nn.with_logical_partitioning(nn.initializers.xavier_uniform(),
                                                   (None, "embed")),
          bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))
    self.image_head = _head(cfg.embed_dim, multi.params_dtype, "image_head")
    self.embed = token_embedding(cfg.text, uni, name="embed")
    if cfg.text_pool == "cls":
      self.cls = self.param("cls", nn.with_logical_partitioning(
          nn.initializers.normal(0.02), ("embed",)), (uni.width,), uni.params_dtype)
    self.unimodal = Transformer(uni)
    self.multimodal = Transformer(multi)
    self.text_head = _head(cfg.embed_dim, uni.params_dtype, "text_head")
    scalar = lambda value: nn.with_logical_partitioning(
        lambda *_: jnp.asarray(value, jnp.float32), ())
    self.log_scale = self.param("log_scale", scalar(math.log(cfg.resolved_scale_init)))
    if cfg.loss == "sigmoid":
      self.bias = self.param("bias", scalar(cfg.bias_init))

  # --- towers ---
  def encode_image(self, images, train: bool = False):
    """``images [b, h, w, c]`` -> ``(image_emb [b, embed_dim], context [b, m,
    width], aux)``: the contrastive embedding and the captioning context,
    computed once per image (decoding reuses the context)."""
    pooled, aux = self.encoder(images, train=train)
    tokens = aux["patch_tokens"]
    if self.config.image_pool == "attention":
      pooled = self.image_pool(tokens)[:, 0]
    context = (self.caption_pool(tokens) if self.config.caption_queries
               else self.context_proj(tokens))
    z = self.image_head(pooled.astype(jnp.float32))
    return contrastive.l2_normalize(z), context, aux

  def _check_text(self, ids, text_valid):
    t_max = self.config.text.max_length
    if ids.ndim != 2 or ids.shape[1] > t_max:
      raise ValueError(f"CoCa: ids must be [batch, T] with T <= text.max_length={t_max}; got "
                       f"{ids.shape}. Tokenize to at most {t_max} ids, or build the model "
                       "with a larger CocaConfig.text.max_length.")
    if text_valid is None:
      return jnp.ones(ids.shape, bool)
    if text_valid.shape != ids.shape:
      raise ValueError(f"CoCa: text_valid {text_valid.shape} must match ids {ids.shape}.")
    return text_valid.astype(bool)

  def unimodal_text(self, ids, text_valid=None, train: bool = False):
    """The lower, text-only stack: ``(text_emb [b, embed_dim], hidden [b, T,
    width], aux)``. A token sees itself and the real tokens before it; the
    [CLS] (appended, ``text_pool="cls"``) sees every real token."""
    cfg = self.config
    valid = self._check_text(ids, text_valid)
    b, t = ids.shape
    x = self.embed(ids)
    keys, positions = valid, None
    if cfg.text_pool == "cls":
      x = jnp.concatenate([x, jnp.broadcast_to(self.cls.astype(x.dtype), (b, 1, x.shape[-1]))], 1)
      keys = jnp.concatenate([valid, jnp.ones((b, 1), bool)], 1)
      # Rotary: the [CLS] sits right after the last real token, wherever the padding ends.
      positions = jnp.concatenate([jnp.broadcast_to(jnp.arange(t), (b, t)),
                                   jnp.sum(valid, 1, keepdims=True)], 1)
    hidden, aux = self.unimodal(x, causal=True, mask=keys[:, None, None, :],
                                positions=positions, train=train)
    if cfg.text_pool == "cls":
      pooled, hidden = hidden[:, -1], hidden[:, :t]
    else:
      last = jnp.maximum(jnp.sum(valid, 1) - 1, 0)
      pooled = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
    z = self.text_head(pooled.astype(jnp.float32))
    return contrastive.l2_normalize(z), hidden, aux

  def encode_text(self, ids, text_valid=None, train: bool = False):
    """The contrastive text embedding ``[b, embed_dim]`` alone."""
    return self.unimodal_text(ids, text_valid, train=train)[0]

  def text_logits(self, hidden, context, text_valid, train: bool = False):
    """The upper stack over the unimodal ``hidden [b, T, width]`` with
    cross-attention to ``context``: ``(logits [b, T, vocab], aux)``."""
    hidden, aux = self.multimodal(hidden, causal=True, mask=text_valid[:, None, None, :],
                                  context=context.astype(hidden.dtype), train=train)
    return self.embed.attend(hidden).astype(jnp.float32), aux

  def logit_params(self):
    scale = contrastive.logit_scale(self.log_scale, self.config.max_scale)
    bias = self.bias if self.config.loss == "sigmoid" else jnp.zeros((), jnp.float32)
    return scale, bias

  def __call__(self, images, ids, text_valid=None, train: bool = False):
    valid = self._check_text(ids, text_valid)
    image_emb, context, image_aux = self.encode_image(images, train=train)
    text_emb, hidden, uni_aux = self.unimodal_text(ids, valid, train=train)
    logits, multi_aux = self.text_logits(hidden, context, valid, train=train)
    scale, bias = self.logit_params()
    out = {"image_emb": image_emb, "text_emb": text_emb, "text_logits": logits,
           "scale": scale, "bias": bias}
    return out, {"image": image_aux, "unimodal": uni_aux, "multimodal": multi_aux}

  # --- cached decoding ---
  def _decode(self, ids, positions, context, caches, cache_index):
    x = self.embed(ids, positions)
    h, uni = self.unimodal(x, causal=True, cache=caches["unimodal"], cache_index=cache_index)
    h, multi = self.multimodal(h, causal=True, context=context.astype(h.dtype),
                               cache=caches["multimodal"], cache_index=cache_index)
    logits = self.embed.attend(h[:, -1]).astype(jnp.float32)
    return logits, {"unimodal": uni["cache"], "multimodal": multi["cache"]}

  def prefill(self, context, ids, caches):
    """The prompt ``ids [b, T0]`` (every token real) written at 0:
    ``(logits of its last token [b, vocab], caches)``."""
    return self._decode(ids, None, context, caches, 0)

  def decode_step(self, tokens, position, context, caches, cache_index):
    """One new token ``[b]`` at text position ``position`` (= ``cache_index``)."""
    return self._decode(tokens[:, None], jnp.full((1,), position, jnp.int32), context, caches,
                        cache_index)


def init_caches(config: CocaConfig, batch: int, length: int) -> dict:
  """Zeroed KV caches of the two stacks for ``length`` text positions."""
  return {"unimodal": init_cache(config.unimodal_backbone, batch, length),
          "multimodal": init_cache(config.multimodal_backbone, batch, length)}


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "temperature", "top_k",
                                              "top_p", "eos_id", "pad_id", "vocab_size"))
def caption(model: CoCa, params, images, prompt, rng=None, *, max_new_tokens: int,
            eos_id: int, pad_id: int = 0, temperature: float = 0.0, top_k: int = 0,
            top_p: float = 1.0, vocab_size: int = 0):
  """Captions for ``images [b, h, w, c]`` with the KV caches, jitted; the
  arguments and the result are ``fusion.caption``'s. The image context is
  computed once (``encode_image``), the prompt ``[b, T0]`` prefilled, then
  one token per step through both stacks (``sample_tokens``)."""
  cfg = model.config
  b, t0 = prompt.shape
  if t0 + max_new_tokens > cfg.max_text_length:
    raise ValueError(f"caption: prompt length {t0} + max_new_tokens {max_new_tokens} exceeds "
                     f"max_text_length={cfg.max_text_length} (the text position table).")
  apply = functools.partial(model.apply, {"params": params})
  context = apply(images, method=CoCa.encode_image)[1]
  caches = init_caches(cfg, b, t0 + max_new_tokens)
  logits, caches = apply(context, prompt.astype(jnp.int32), caches, method=CoCa.prefill)
  step = lambda tok, t, caches: apply(tok, t0 + t, context, caches, t0 + t,
                                      method=CoCa.decode_step)
  return sample_tokens(step, logits, caches, rng, max_new_tokens=max_new_tokens, eos_id=eos_id,
                       pad_id=pad_id, temperature=temperature, top_k=top_k, top_p=top_p,
                       vocab_size=vocab_size)


def coca_loss(config: CocaConfig, outputs, ids, text_valid, *, contrastive_weight: float = 1.0,
              caption_weight: float = 2.0, mask=None, chunk_size: int = 0):
  """``contrastive_weight * contrastive + caption_weight * captioning`` over
  a batch of ``CoCa`` outputs; ``mask [b]``: rows that count in the
  contrastive loss (padding rows of an evaluation batch are False). Returns
  ``(loss, metrics)``."""
  con, metrics = contrastive_loss(config, outputs["image_emb"], outputs["text_emb"],
                                  outputs["scale"], outputs["bias"], chunk_size=chunk_size,
                                  mask=mask)
  valid = text_valid if mask is None else text_valid & jnp.asarray(mask, bool)[:, None]
  cap, cap_acc = next_token_loss(outputs["text_logits"], ids, valid)
  metrics = {**metrics, "contrastive_loss": con, "caption_loss": cap,
             "caption_token_accuracy": cap_acc, "scale": outputs["scale"]}
  return contrastive_weight * con + caption_weight * cap, metrics

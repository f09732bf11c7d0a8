"""Image-text pretraining: CLIP and SigLIP two towers on the shared backbone.

Both towers are the one ``datong.backbone.Transformer`` with a modality stem
in front and a projection head behind:

* image tower: any image encoder (``datong.unimodal.encoders``; a ViT:
  patch stem + backbone + [CLS] or mean pooling) -> ``head`` -> L2
  normalization;
* text tower: ``TokenEmbedding`` stem + backbone (causal or bidirectional)
  pooled at the EOS token, the [CLS] token or the mean of real tokens ->
  ``head`` -> L2 normalization.

With ``share_backbone=True`` the two towers run one backbone's weights
(modality-specific stems and heads only), which is the unification this
library is about. The contrastive math (CLIP's softmax, SigLIP's sigmoid,
their chunked and ``shard_map`` forms, zero-shot, retrieval) lives in
``datong.multimodal.contrastive``.

    cfg = ClipConfig(image=ViTConfig(...), text=TextConfig(...), embed_dim=512)
    model = CLIP(cfg)
    params = model.init(rng, images, ids)["params"]
    img, txt, aux = model.apply({"params": params}, images, ids)   # [b, embed_dim] each

Parameter tree (checkpoint paths are public API)::

    image/encoder/{stem, cls, backbone}   (the encoder; no backbone with sharing)
    image/head, text/{stem, backbone, head}, backbone (shared), log_scale, bias

(Before the image-encoder protocol a shared-backbone CLIP kept its image
stem at ``image/{stem, cls}``; ``datong.train.warmstart`` maps those paths.)

The training objective (``ClipTaskConfig``: data, caption augmentation,
zero-shot and retrieval evaluation, LiT locking) is in
``datong.train.tasks.clip``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from datong.backbone import Transformer, TransformerConfig
from datong.multimodal import contrastive
from datong.unimodal.encoders import check_image_encoder, head_param_dtype
from datong.ops.masks import key_mask
from datong.unimodal.text import TextConfig, token_embedding

TEXT_POOLS = ("eos", "cls", "mean")
LOSSES = ("softmax", "sigmoid")

__all__ = ["CLIP", "ClipConfig", "ImageTower", "TextTower", "contrastive_loss", "text_pool",
           "tokenize"]


# ------------------------------------------------------------------ config --

def resolved_scale_init(scale_init, loss: str) -> float:
  """The contrastive logit scale to start from: ``scale_init`` when given,
  else CLIP's 1 / 0.07 (softmax) or SigLIP's 10 (sigmoid)."""
  if scale_init is not None:
    return scale_init
  return 1.0 / 0.07 if loss == "softmax" else 10.0


@dataclasses.dataclass(frozen=True)
class ClipConfig:
  """Two towers and their shared embedding space.

  ``image``: an image-encoder config (``ViTConfig``: its ``pool`` decides
  [CLS] vs mean pooling; or any other that meets the protocol); None
  describes a text tower alone (``TextTower``; e.g. HF's ``CLIPTextModel``).
  ``text``: vocabulary, positions (``learned``, ``rope`` or ``none``),
  ``max_length`` (the tokenized length) and the text backbone.
  ``text_pool``: ``eos`` (CLIP: the EOS token's output; use with
  ``text_causal``), ``cls`` (a [CLS] id first) or ``mean`` (of real tokens).
  ``share_backbone``: both towers run ``image.backbone``'s weights; the text
  tower's own backbone settings are then ignored (and must not ask for rope).
  ``loss``: ``softmax`` (CLIP) or ``sigmoid`` (SigLIP); sets the defaults of
  the logit scale (1/0.07 resp. 10, clipped at ``max_scale``) and bias (-10).
  """
  image: Any  # an image-encoder config (datong.unimodal.encoders); None: text tower alone
  text: TextConfig
  embed_dim: int = 64
  text_pool: str = "eos"
  text_causal: bool = True
  share_backbone: bool = False
  loss: str = "softmax"
  scale_init: Optional[float] = None  # None: 1/0.07 (softmax), 10 (sigmoid)
  max_scale: Optional[float] = 100.0  # CLIP's clip of the logit scale; None: no clip
  bias_init: float = -10.0  # sigmoid only
  head_bias: bool = False

  def __post_init__(self):
    def bad(field, why):
      raise ValueError(f"ClipConfig.{field}={getattr(self, field)!r}: {why}")
    if self.image is not None:
      check_image_encoder(self.image, "ClipConfig.image")
    if self.text_pool not in TEXT_POOLS:
      bad("text_pool", f"choose one of {TEXT_POOLS}")
    if self.loss not in LOSSES:
      bad("loss", f"choose one of {LOSSES}")
    if self.embed_dim <= 0:
      bad("embed_dim", "must be positive")
    if self.text.max_length <= 0:
      raise ValueError(f"ClipConfig.text.max_length={self.text.max_length}: the captions' "
                       "tokenized length must be positive.")
    if self.share_backbone and (self.image is None or not hasattr(self.image, "backbone")):
      bad("share_backbone", f"the image encoder {type(self.image).__name__} has no single "
          "backbone to share")
    if self.share_backbone and self.text.positions == "rope":
      bad("share_backbone", "a shared backbone uses image.backbone, which has no rotary "
          "embedding; set text.positions='learned'")
    if self.scale_init is not None and self.scale_init <= 0:
      bad("scale_init", "must be positive")

  @property
  def resolved_scale_init(self) -> float:
    return resolved_scale_init(self.scale_init, self.loss)

  @property
  def text_backbone(self) -> TransformerConfig:
    return self.image.backbone if self.share_backbone else self.text.resolved_backbone

  def replace(self, **changes) -> "ClipConfig":
    return dataclasses.replace(self, **changes)


# ------------------------------------------------------------------ towers --

def _head(embed_dim: int, use_bias: bool, param_dtype, name: str):
  return nn.Dense(
      embed_dim, use_bias=use_bias, dtype=jnp.float32, param_dtype=param_dtype,
      kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", None)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (None,)), name=name)


class ImageTower(nn.Module):
  """Images ``[batch, h, w, c]`` -> ``(embeddings [batch, embed_dim], aux)``.

  The configured image encoder (params under ``encoder``, the layout of
  ``ImageClassifier`` / ``MAE`` / ``SimMIM`` encoders, so their checkpoints
  load) + ``head``. With ``backbone`` given, the encoder runs that shared
  module instead of its own backbone.
  """
  config: ClipConfig
  backbone: Optional[nn.Module] = None

  @nn.compact
  def __call__(self, images, *, train: bool = False):
    cfg = self.config
    encoder = cfg.image.make(shared_backbone=self.backbone, name="encoder")
    pooled, aux = encoder(images, train=train)
    z = _head(cfg.embed_dim, cfg.head_bias, head_param_dtype(cfg.image), "head")(
        pooled.astype(jnp.float32))
    return contrastive.l2_normalize(z), {**aux, "projected": z}


def text_pool(hidden, ids, *, pool: str, eos_id: int, pad_id: int, valid=None):
  """``[batch, length, width]`` -> ``[batch, width]`` at EOS, [CLS] (index 0) or mean.

  EOS: the first ``eos_id`` of each row (the last position if a row has none;
  HF's rule too, so padding with the EOS id pools at the real EOS).
  Mean: over ``valid`` positions (``[batch, length]``; default: ids that are
  not ``pad_id``).
  """
  if pool == "cls":
    return hidden[:, 0]
  if pool == "mean":
    valid = (ids != pad_id) if valid is None else valid.astype(bool)
    valid = valid[..., None].astype(jnp.float32)
    return jnp.sum(hidden.astype(jnp.float32) * valid, 1) / jnp.maximum(jnp.sum(valid, 1), 1.0)
  is_eos = ids == eos_id
  index = jnp.where(jnp.any(is_eos, 1), jnp.argmax(is_eos, 1), ids.shape[1] - 1)
  return jnp.take_along_axis(hidden, index[:, None, None], axis=1)[:, 0]


class TextTower(nn.Module):
  """Token ids ``[batch, length]`` -> ``(embeddings [batch, embed_dim], aux)``.

  Padding (``pad_id``) gets its own segment, so real tokens never attend to
  it; with ``text_causal`` each token sees only earlier ones. An HF-style
  ``attention_mask`` ``[batch, length]`` (1 = real token) replaces ``pad_id``:
  only the mask says what is padding (real CLIP tokenizers pad with the EOS
  id), padded queries attend to real keys as in HF, and every position
  equals HF's ``CLIPTextModel``. ``aux``:
  ``embedded`` (backbone input), ``encoded`` (its output), ``pooled``,
  ``projected`` (the head's output before normalization) and, with
  ``return_layers``, ``layers`` (every block's output). ``project=False``:
  no head; the tower returns ``pooled`` ``[batch, width]`` (HF's
  ``CLIPTextModel``).
  """
  config: ClipConfig
  pad_id: int
  eos_id: int
  backbone: Optional[nn.Module] = None
  project: bool = True

  @nn.compact
  def __call__(self, ids, *, attention_mask=None, train: bool = False,
               return_layers: bool = False):
    cfg = self.config
    tc = cfg.text
    bb = cfg.text_backbone
    x = token_embedding(tc, bb, name="stem")(ids)
    if attention_mask is None:
      segment_ids, mask = (ids != self.pad_id).astype(jnp.int32), None
    else:
      segment_ids, mask = None, key_mask(attention_mask, ids.shape[1], "TextTower")
    backbone = self.backbone if self.backbone is not None else Transformer(bb, name="backbone")
    hidden, aux = backbone(x, causal=cfg.text_causal, segment_ids=segment_ids, mask=mask,
                           train=train, return_layers=return_layers)
    pooled = text_pool(hidden, ids, pool=cfg.text_pool, eos_id=self.eos_id, pad_id=self.pad_id,
                       valid=attention_mask)
    aux = {**aux, "embedded": x, "encoded": hidden, "pooled": pooled}
    if not self.project:
      return pooled, aux
    z = _head(cfg.embed_dim, cfg.head_bias, bb.params_dtype, "head")(pooled.astype(jnp.float32))
    return contrastive.l2_normalize(z), {**aux, "projected": z}


class CLIP(nn.Module):
  """The two towers + the learnable logit scale (and SigLIP bias).

  ``__call__(images, ids) -> (image_emb, text_emb, aux)`` with ``aux["scale"]``
  (``exp(log_scale)``, clipped) and ``aux["bias"]`` (0 for softmax).
  ``attention_mask``: HF's key mask for the text tower (see ``TextTower``).
  ``encode_image`` / ``encode_text`` run one tower (``model.apply(...,
  method="encode_text")``).
  """
  config: ClipConfig
  pad_id: int = 256
  eos_id: int = 258

  def setup(self):
    cfg = self.config
    if cfg.image is None:
      raise ValueError("ClipConfig.image=None describes a text tower alone: build "
                       "TextTower(config, pad_id=..., eos_id=...), not CLIP.")
    shared = None
    if cfg.share_backbone:
      self.backbone = Transformer(cfg.image.backbone)
      shared = self.backbone
    self.image = ImageTower(cfg, backbone=shared)
    self.text = TextTower(cfg, pad_id=self.pad_id, eos_id=self.eos_id, backbone=shared)
    scalar = lambda value: nn.with_logical_partitioning(
        lambda *_: jnp.asarray(value, jnp.float32), ())
    self.log_scale = self.param("log_scale", scalar(math.log(cfg.resolved_scale_init)))
    if cfg.loss == "sigmoid":
      self.bias = self.param("bias", scalar(cfg.bias_init))

  def encode_image(self, images, train: bool = False):
    return self.image(images, train=train)[0]

  def encode_text(self, ids, train: bool = False, attention_mask=None):
    return self.text(ids, attention_mask=attention_mask, train=train)[0]

  def logit_params(self):
    scale = contrastive.logit_scale(self.log_scale, self.config.max_scale)
    bias = self.bias if self.config.loss == "sigmoid" else jnp.zeros((), jnp.float32)
    return scale, bias

  def __call__(self, images, ids, train: bool = False, attention_mask=None):
    img, img_aux = self.image(images, train=train)
    txt, txt_aux = self.text(ids, attention_mask=attention_mask, train=train)
    scale, bias = self.logit_params()
    return img, txt, {"image": img_aux, "text": txt_aux, "scale": scale, "bias": bias}


def contrastive_loss(config: ClipConfig, image_emb, text_emb, scale, bias, *,
                     chunk_size: int = 0, mask=None):
  """The configured loss over the global batch; ``chunk_size > 0``: chunked."""
  if config.loss == "softmax":
    if chunk_size:
      return contrastive.chunked_softmax_contrastive_loss(
          image_emb, text_emb, scale, chunk_size=chunk_size, mask=mask)
    return contrastive.softmax_contrastive_loss(image_emb, text_emb, scale, mask=mask)
  if chunk_size:
    return contrastive.chunked_sigmoid_contrastive_loss(
        image_emb, text_emb, scale, bias, chunk_size=chunk_size, mask=mask)
  return contrastive.sigmoid_contrastive_loss(image_emb, text_emb, scale, bias, mask=mask)


# -------------------------------------------------------------- tokenizing --

def tokenize(texts: Sequence[Any], tokenizer, length: int, *, pool: str = "eos") -> np.ndarray:
  """Texts (str or UTF-8 bytes) -> ``[n, length]`` int32 ids, padded with pad_id.

  Each row is ``[cls]`` (``pool="cls"`` only) + the text's ids + ``eos``,
  truncated so that the EOS is always kept.
  """
  out = np.full((len(texts), length), tokenizer.pad_id, np.int32)
  head = [tokenizer.cls_id] if pool == "cls" else []
  for i, text in enumerate(texts):
    if isinstance(text, (bytes, np.bytes_)):
      ids = (tokenizer.encode_bytes(bytes(text)) if hasattr(tokenizer, "encode_bytes")
             else tokenizer.encode(bytes(text).decode("utf-8")))
    else:
      ids = tokenizer.encode(str(text))
    row = (head + list(ids))[:length - 1] + [tokenizer.eos_id]
    out[i, :len(row)] = row
  return out

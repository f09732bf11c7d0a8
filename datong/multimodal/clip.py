"""Image-text pretraining: CLIP and SigLIP two towers on the shared backbone.

Both towers are the one ``datong.backbone.Transformer`` with a modality stem
in front and a projection head behind:

* image tower: ``ViTEncoder`` (``PatchEmbedding`` stem + backbone + [CLS] or
  mean pooling) -> ``head`` -> L2 normalization;
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

    image/encoder/{stem, cls, backbone}   (ViTEncoder; absent with sharing)
    image/{stem, cls}                     (with share_backbone)
    image/head, text/{stem, backbone, head}, backbone (shared), log_scale, bias

LiT (locked-image tuning) is ``ClipTaskConfig(lock_image="encoder")``, usually
with ``image_init=WORKDIR`` of a ViT / MAE / CLIP run: the engine's optimizer
applies ``Task.trainable`` so locked leaves get exactly zero updates.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from datong.backbone import Norm, Transformer, TransformerConfig
from datong.multimodal import contrastive
from datong.unimodal.text import TextConfig, TokenEmbedding, make_tokenizer
from datong.unimodal.vision import (PatchEmbedding, ViTConfig, ViTEncoder, find_encoder,
                                   merge_encoder)
from datong.unimodal.vision_tasks import ImageData

TEXT_POOLS = ("eos", "cls", "mean")
LOSSES = ("softmax", "sigmoid")
LOCKS = ("", "encoder", "tower")

__all__ = [
    "CLIP", "ClipConfig", "ClipTask", "ClipTaskConfig", "ImageTower", "TextTower",
    "augment_caption", "contrastive_loss", "load_image_encoder", "text_pool", "tokenize",
]


# ------------------------------------------------------------------ config --

@dataclasses.dataclass(frozen=True)
class ClipConfig:
  """Two towers and their shared embedding space.

  ``image``: a ViT encoder (its ``pool`` decides [CLS] vs mean pooling).
  ``text``: vocabulary, positions (``learned``, ``rope`` or ``none``),
  ``max_length`` (the tokenized length) and the text backbone.
  ``text_pool``: ``eos`` (CLIP: the EOS token's output; use with
  ``text_causal``), ``cls`` (a [CLS] id first) or ``mean`` (of real tokens).
  ``share_backbone``: both towers run ``image.backbone``'s weights; the text
  tower's own backbone settings are then ignored (and must not ask for rope).
  ``loss``: ``softmax`` (CLIP) or ``sigmoid`` (SigLIP); sets the defaults of
  the logit scale (1/0.07 resp. 10, clipped at ``max_scale``) and bias (-10).
  """
  image: ViTConfig
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
    if self.text_pool not in TEXT_POOLS:
      bad("text_pool", f"choose one of {TEXT_POOLS}")
    if self.loss not in LOSSES:
      bad("loss", f"choose one of {LOSSES}")
    if self.embed_dim <= 0:
      bad("embed_dim", "must be positive")
    if self.text.max_length <= 0:
      raise ValueError(f"ClipConfig.text.max_length={self.text.max_length}: the captions' "
                       "tokenized length must be positive.")
    if self.share_backbone and self.text.positions == "rope":
      bad("share_backbone", "a shared backbone uses image.backbone, which has no rotary "
          "embedding; set text.positions='learned'")
    if self.scale_init is not None and self.scale_init <= 0:
      bad("scale_init", "must be positive")

  @property
  def resolved_scale_init(self) -> float:
    if self.scale_init is not None:
      return self.scale_init
    return 1.0 / 0.07 if self.loss == "softmax" else 10.0

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

  Without a shared backbone this is ``ViTEncoder`` (params under
  ``encoder``, the same layout as ``ViTClassifier`` / ``MAE`` encoders, so
  their checkpoints load) + ``head``. With ``backbone`` given, the same
  wiring (``PatchEmbedding`` stem, optional [CLS], pooling) runs the shared
  module.
  """
  config: ClipConfig
  backbone: Optional[nn.Module] = None

  @nn.compact
  def __call__(self, images, *, train: bool = False):
    cfg = self.config
    vit = cfg.image
    bb = vit.backbone
    if self.backbone is None:
      pooled, aux = ViTEncoder(vit, name="encoder")(images, train=train)
    else:
      x = PatchEmbedding(bb.width, vit.patch_size, vit.image_size, posemb=vit.posemb,
                         dtype=bb.compute_dtype, param_dtype=bb.params_dtype,
                         name="stem")(images)
      if vit.has_cls:
        cls = self.param("cls", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
                         (bb.width,), bb.params_dtype)
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (x.shape[0], 1, bb.width)),
                             x], axis=1)
      if vit.pre_norm:  # as ViTEncoder does
        x = Norm(bb, name="pre_norm")(x)
      hidden, aux = self.backbone(x, train=train)
      patches = hidden[:, 1:] if vit.has_cls else hidden
      pooled = hidden[:, 0] if vit.pool == "cls" else jnp.mean(patches, axis=1)
      aux = {**aux, "encoded": hidden, "pooled": pooled}
    z = _head(cfg.embed_dim, cfg.head_bias, bb.params_dtype, "head")(pooled.astype(jnp.float32))
    return contrastive.l2_normalize(z), aux


def text_pool(hidden, ids, *, pool: str, eos_id: int, pad_id: int):
  """``[batch, length, width]`` -> ``[batch, width]`` at EOS, [CLS] (index 0) or mean.

  EOS: the first ``eos_id`` of each row (the last position if a row has none).
  Mean: over positions whose id is not ``pad_id``.
  """
  if pool == "cls":
    return hidden[:, 0]
  if pool == "mean":
    valid = (ids != pad_id)[..., None].astype(jnp.float32)
    return jnp.sum(hidden.astype(jnp.float32) * valid, 1) / jnp.maximum(jnp.sum(valid, 1), 1.0)
  is_eos = ids == eos_id
  index = jnp.where(jnp.any(is_eos, 1), jnp.argmax(is_eos, 1), ids.shape[1] - 1)
  return jnp.take_along_axis(hidden, index[:, None, None], axis=1)[:, 0]


class TextTower(nn.Module):
  """Token ids ``[batch, length]`` -> ``(embeddings [batch, embed_dim], aux)``.

  Padding (``pad_id``) gets its own segment, so real tokens never attend to
  it; with ``text_causal`` each token sees only earlier ones.
  """
  config: ClipConfig
  pad_id: int
  eos_id: int
  backbone: Optional[nn.Module] = None

  @nn.compact
  def __call__(self, ids, *, train: bool = False):
    cfg = self.config
    tc = cfg.text
    bb = cfg.text_backbone
    x = TokenEmbedding(tc.vocab_size, bb.width,
                       max_length=tc.max_length if tc.positions == "learned" else 0,
                       dtype=bb.dtype, param_dtype=bb.param_dtype,
                       init_std=tc.embed_init_std, name="stem")(ids)
    segment_ids = (ids != self.pad_id).astype(jnp.int32)
    backbone = self.backbone if self.backbone is not None else Transformer(bb, name="backbone")
    hidden, aux = backbone(x, causal=cfg.text_causal, segment_ids=segment_ids, train=train)
    pooled = text_pool(hidden, ids, pool=cfg.text_pool, eos_id=self.eos_id, pad_id=self.pad_id)
    z = _head(cfg.embed_dim, cfg.head_bias, bb.params_dtype, "head")(pooled.astype(jnp.float32))
    return contrastive.l2_normalize(z), {**aux, "encoded": hidden, "pooled": pooled}


class CLIP(nn.Module):
  """The two towers + the learnable logit scale (and SigLIP bias).

  ``__call__(images, ids) -> (image_emb, text_emb, aux)`` with ``aux["scale"]``
  (``exp(log_scale)``, clipped) and ``aux["bias"]`` (0 for softmax).
  ``encode_image`` / ``encode_text`` run one tower (``model.apply(...,
  method="encode_text")``).
  """
  config: ClipConfig
  pad_id: int = 256
  eos_id: int = 258

  def setup(self):
    cfg = self.config
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

  def encode_text(self, ids, train: bool = False):
    return self.text(ids, train=train)[0]

  def logit_params(self):
    scale = contrastive.logit_scale(self.log_scale, self.config.max_scale)
    bias = self.bias if self.config.loss == "sigmoid" else jnp.zeros((), jnp.float32)
    return scale, bias

  def __call__(self, images, ids, train: bool = False):
    img, img_aux = self.image(images, train=train)
    txt, txt_aux = self.text(ids, train=train)
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


# ------------------------------------------------------- pretrained image ---

def load_image_encoder(params, pretrained, config: ClipConfig):
  """``params`` with ``image/encoder`` started from the ViT encoder in
  ``pretrained`` (ViT / MAE / SimMIM / CLIP params; see ``vision.merge_encoder``)."""
  if "encoder" not in params.get("image", {}):
    raise ValueError("load_image_encoder needs share_backbone=False (params image/encoder).")
  encoder = merge_encoder(params["image"]["encoder"], pretrained, config.image)
  return {**params, "image": {**params["image"], "encoder": encoder}}


# -------------------------------------------------------------------- task --

from datong.train.task import EvalContext, Task, path_names, transformer_flops_per_token  # pylint: disable=g-import-not-at-top,wrong-import-position
from datong.train.warmstart import load_pretrained  # pylint: disable=g-import-not-at-top,wrong-import-position


@dataclasses.dataclass(frozen=True)
class ClipTaskConfig:
  """Image-text contrastive pretraining on an (image, caption[, label]) dataset.

  ``class_names``: per class, one or more names; the zero-shot classifier
  averages the text embeddings of every template filled with every name.
  Empty: no zero-shot metric. ``chunk_size > 0`` uses the chunked loss.
  ``image``: the vision tasks' preprocessing (pixels to [-1, 1], host) and
  augmentation (random affine, on device, training only), so encoders move
  between ViT / MAE / CLIP runs with the same input convention; its
  ``dataset`` names the image-text dataset. ``lock_image``: ``encoder``
  (LiT: freeze the ViT encoder, train its head) or ``tower`` (freeze the
  head too). ``image_init``: a ViT / MAE / CLIP run's workdir, or an
  exported ``encoder_params.msgpack``, whose encoder initializes the image
  tower.

  Caption augmentation (training only, EDA-style, ``augment_caption``):
  ``word_dropout`` deletes each word with that probability; ``noise_words``
  is the mean number (Poisson) of random lowercase strings inserted at
  random places. Both teach the text tower to ignore words that carry no
  image information, which is most of what an unseen zero-shot prompt is.
  """
  model: ClipConfig
  image: ImageData = ImageData(dataset="digit_captions")
  caption_key: str = "caption"
  tokenizer: str = "byte"
  train_split: str = "train"
  eval_split: str = "test"
  class_names: tuple = ()
  templates: tuple = ("{}",)
  chunk_size: int = 0
  word_dropout: float = 0.0
  noise_words: float = 0.0
  lock_image: str = ""
  image_init: str = ""
  logit_lr_scale: float = 1.0  # learning-rate multiplier of log_scale and bias
  retrieval_ks: tuple = (1, 5)
  eval_batch_size: int = 0  # 0: the train batch size

  def __post_init__(self):
    if self.lock_image not in LOCKS:
      raise ValueError(f"ClipTaskConfig.lock_image={self.lock_image!r}: choose one of {LOCKS}.")
    if self.lock_image and self.model.share_backbone:
      raise ValueError("ClipTaskConfig.lock_image with model.share_backbone=True would freeze "
                       "the text tower's backbone too; unshare or do not lock.")
    if not 0.0 <= self.word_dropout < 1.0 or self.noise_words < 0:
      raise ValueError("ClipTaskConfig.word_dropout must be in [0, 1) and noise_words >= 0.")
    if self.chunk_size < 0:
      raise ValueError(f"ClipTaskConfig.chunk_size={self.chunk_size}: must be >= 0.")

  def build(self) -> "ClipTask":
    return ClipTask(self)


class ClipTask(Task):
  """CLIP / SigLIP for the engine: batches ``{image, text, label}``."""

  def __init__(self, config: ClipTaskConfig):
    self.config = config
    self.dataset = config.image.dataset
    self.train_split = config.train_split
    self.eval_split = config.eval_split
    self.tokenizer = make_tokenizer(config.tokenizer,
                                    (self.dataset, self.train_split, config.caption_key))
    mc = config.model
    if mc.text.vocab_size < self.tokenizer.vocab_size:
      raise ValueError(f"ClipConfig.text.vocab_size={mc.text.vocab_size} is smaller than the "
                       f"tokenizer's {self.tokenizer.vocab_size}.")
    self.model = CLIP(mc, pad_id=self.tokenizer.pad_id, eos_id=self.tokenizer.eos_id)
    # Only the ViT encoder is kept; a tree without one fails here, at build.
    self._pretrained = (find_encoder(load_pretrained(config.image_init))
                        if config.image_init else None)

  # --- model ---
  def _dummy(self, batch):
    return (jnp.zeros(batch["image"].shape, jnp.float32), jnp.zeros(batch["text"].shape, jnp.int32))

  def init(self, rng, batch):
    images, ids = self._dummy(batch)
    variables = self.model.init(rng, images[:1], ids[:1])
    if self._pretrained is not None:
      variables = {**variables, "params": load_image_encoder(
          variables["params"], self._pretrained, self.config.model)}
    return variables

  def batch_spec(self, batch_size):
    mc = self.config.model
    h, w = mc.image.image_size
    return {"image": jax.ShapeDtypeStruct((batch_size, h, w, mc.image.channels), jnp.float32),
            "text": jax.ShapeDtypeStruct((batch_size, mc.text.max_length), jnp.int32),
            "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32)}

  def loss(self, params, batch, rng, *, train=True):
    images = batch["image"]
    rngs = {}
    if train:
      rng_aug, rng_drop = jax.random.split(rng)
      images = self.config.image.augment(images, rng_aug)
      rngs = {"dropout": rng_drop}
    img, txt, aux = self.model.apply({"params": params}, images, batch["text"],
                                     train=train, rngs=rngs)
    loss, metrics = contrastive_loss(self.config.model, img, txt, aux["scale"], aux["bias"],
                                     chunk_size=self.config.chunk_size, mask=batch.get("mask"))
    metrics = {**metrics, "scale": aux["scale"]}
    if self.config.model.loss == "sigmoid":
      metrics["bias"] = aux["bias"]
    return loss, metrics

  # --- data ---
  def preprocess(self, example, rng, train):
    c = self.config
    out = c.image(example, rng, train)  # image in [-1, 1]; label when present
    out.setdefault("label", np.int32(-1))
    caption = example[c.caption_key]
    if train and (c.word_dropout or c.noise_words):
      caption = augment_caption(caption, rng, word_dropout=c.word_dropout,
                                noise_words=c.noise_words)
    out["text"] = tokenize([caption], self.tokenizer, c.model.text.max_length,
                           pool=c.model.text_pool)[0]
    return out

  # --- evaluation ---
  def zero_shot_classifier(self, params):
    """``[classes, embed_dim]`` from ``class_names`` x ``templates`` (prompt ensemble)."""
    c = self.config
    names = [(n,) if isinstance(n, str) else tuple(n) for n in c.class_names]
    per_class = max(len(n) for n in names) * len(c.templates)
    prompts = []
    for synonyms in names:
      row = [t.format(n) for n in synonyms for t in c.templates]
      prompts.append(row + row[:1] * (per_class - len(row)))  # pad by repeating
    ids = tokenize([p for row in prompts for p in row], self.tokenizer,
                   c.model.text.max_length, pool=c.model.text_pool)
    emb = jax.jit(lambda p, x: self.model.apply({"params": p}, x, method="encode_text"))(params, ids)
    counts = np.array([len(s) * len(c.templates) for s in names])
    emb = np.asarray(emb).reshape(len(names), per_class, -1)
    # Average only over each class's real prompts (padding repeats are dropped).
    keep = np.arange(per_class)[None, :] < counts[:, None]
    summed = np.einsum("cpd,cp->cd", contrastive.l2_normalize(emb), keep) / counts[:, None]
    return np.asarray(contrastive.l2_normalize(summed))

  def embed_split(self, params, ctx: EvalContext, split: str):
    """Host arrays ``image_emb, text_emb, label`` of every example of ``split``."""
    encode = jax.jit(lambda p, b: self.model.apply({"params": p}, b["image"], b["text"])[:2])
    imgs, txts, labels = [], [], []
    for batch in ctx.batches(split, self.config.eval_batch_size or None):
      img, txt = encode(params, batch)
      keep = ctx.to_host(batch["mask"]).astype(bool)
      imgs.append(ctx.to_host(img)[keep])
      txts.append(ctx.to_host(txt)[keep])
      labels.append(ctx.to_host(batch["label"])[keep])
    return np.concatenate(imgs), np.concatenate(txts), np.concatenate(labels)

  def evaluate(self, params, ctx):
    c = self.config
    img, txt, labels = self.embed_split(params, ctx, self.eval_split)
    scale, bias = jax.jit(lambda p: self.model.apply({"params": p}, method="logit_params"))(params)
    loss, _ = contrastive_loss(c.model, img, txt, scale, bias)
    metrics = {"eval/loss": float(loss)}
    # Captions carry the digit but nothing else of the image, so the pair is
    # only determined up to its label: a retrieved item counts when it shows /
    # names the query's class. Without labels, only the exact partner counts.
    keys = labels if np.all(labels >= 0) else None
    recall = contrastive.retrieval_recall(img, txt, c.retrieval_ks, image_keys=keys,
                                          text_keys=keys)
    metrics.update({f"eval/{k}": v for k, v in recall.items()})
    if c.class_names:
      logits = contrastive.zero_shot_logits(img, self.zero_shot_classifier(params))
      metrics["eval/zero_shot_accuracy"] = float(np.mean(np.argmax(logits, 1) == labels))
    return metrics

  # --- accounting ---
  def tokens_per_example(self):
    mc = self.config.model
    return mc.image.num_patches + int(mc.image.has_cls) + mc.text.max_length

  def flops_per_example(self):
    mc = self.config.model
    vit, ib, tb = mc.image, mc.image.backbone, mc.text_backbone
    n_img = vit.num_patches + int(vit.has_cls)
    img = n_img * transformer_flops_per_token(
        ib.width, ib.depth, ib.mlp_dim, n_img, gated=ib.activation in ("swiglu", "geglu"),
        kv_width=ib.resolved_kv_heads * ib.resolved_head_dim)
    img += 6.0 * vit.num_patches * vit.patch_dim * ib.width + 6.0 * ib.width * mc.embed_dim
    n_txt = mc.text.max_length
    txt = n_txt * transformer_flops_per_token(
        tb.width, tb.depth, tb.mlp_dim, n_txt, causal=mc.text_causal,
        gated=tb.activation in ("swiglu", "geglu"),
        kv_width=tb.resolved_kv_heads * tb.resolved_head_dim)
    txt += 6.0 * tb.width * mc.embed_dim
    return float(img + txt)

  # --- optimizer hooks ---
  def learning_rate_scale(self, params):
    """``logit_lr_scale`` on the temperature and bias (small batches move the
    SigLIP bias far from its -10 start), 1 elsewhere; None when 1."""
    scale = self.config.logit_lr_scale
    if scale == 1.0:
      return None
    return {k: (jax.tree.map(lambda _: scale, v) if k in ("log_scale", "bias")
                else jax.tree.map(lambda _: 1.0, v)) for k, v in params.items()}

  def trainable(self, params):
    lock = self.config.lock_image
    if not lock:
      return None

    def keep(path, _):
      names = path_names(path)
      if names[:1] != ["image"]:
        return True
      return lock == "encoder" and names[1:2] == ["head"]

    return jax.tree_util.tree_map_with_path(keep, params)


def augment_caption(caption, rng: np.random.Generator, *, word_dropout: float = 0.0,
                    noise_words: float = 0.0) -> str:
  """Randomly delete words and insert random lowercase strings (numpy rng)."""
  text = caption.decode("utf-8") if isinstance(caption, (bytes, np.bytes_)) else str(caption)
  words = text.split()
  kept = [w for w in words if rng.random() >= word_dropout] or words
  letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
  for _ in range(rng.poisson(noise_words) if noise_words else 0):
    noise = "".join(rng.choice(letters, size=int(rng.integers(2, 9))))
    kept.insert(int(rng.integers(0, len(kept) + 1)), noise)
  return " ".join(kept)

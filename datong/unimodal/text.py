"""Text on the shared backbone: token stem, GPT, BERT, classification.

Every model here is ``TokenEmbedding`` + ``datong.backbone.Transformer`` + a
head; none copies a backbone layer. Models take integer ids ``[batch,
length]`` and never see a tokenizer (``datong.unimodal.tokenizers``).

    cfg = TextConfig(backbone=TransformerConfig.preset("tiny"))
    model = GPT(cfg)
    params = model.init(rng, ids)["params"]
    logits, aux = model.apply({"params": params}, ids, segment_ids=seg)

Pieces, each usable alone:

* ``TokenEmbedding`` / ``token_embedding(cfg)``: ids (+ positions) ->
  ``[batch, length, width]``, with ``attend`` for a tied output head (the
  CLIP text tower uses it too).
* ``GPT`` + ``causal_lm_loss``: next-token cross-entropy, optional z-loss,
  perplexity, bits per token / byte. Decoding: ``datong.unimodal.generation``.
* ``BERT`` + ``mlm_mask`` + ``mlm_loss``: BERT's 15% / 80-10-10 masking as a
  pure function of ``(ids, rng)``; optional next-sentence head.
* ``SequenceClassifier``: fine-tuning on a pooled representation of a
  GPT/BERT embedding + backbone (``datong.train.warmstart`` loads them).

The training objectives (``GPTTask``, ``BERTTask``: data, packing,
evaluation) live in ``datong.train.tasks.text``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from datong.backbone import Norm, Transformer, TransformerConfig
from datong.ops import linear
from datong.ops import masks as mask_ops
from datong.ops.losses import classification_loss, cross_entropy
from datong.unimodal.tokenizers import ByteTokenizer

__all__ = [
    "BERT", "GPT", "SequenceClassifier", "TextConfig", "TextEncoder", "TokenEmbedding", "causal_lm_loss",
    "classification_loss", "cross_entropy", "mlm_loss", "mlm_mask", "token_embedding",
]


POSITIONS = ("rope", "learned", "none")
LN2 = math.log(2.0)


# ------------------------------------------------------------------ config --

@dataclasses.dataclass(frozen=True)
class TextConfig:
  """A text model: vocabulary, positions, head tying and the backbone.

  ``positions``: ``rope`` (rotary in the backbone's attention; sets
  ``backbone.rope``), ``learned`` (a ``[max_length, width]`` table in the
  stem) or ``none``. ``type_vocab_size`` > 0 adds BERT's token-type
  (sentence A/B) embedding; ``nsp`` adds BERT's next-sentence head.
  """
  backbone: TransformerConfig = TransformerConfig.preset("tiny")
  vocab_size: int = ByteTokenizer.vocab_size
  positions: str = "rope"
  max_length: int = 512
  tie_embeddings: bool = True
  embed_init_std: float = 0.02
  type_vocab_size: int = 0
  nsp: bool = False

  def __post_init__(self):
    if self.positions not in POSITIONS:
      raise ValueError(f"TextConfig.positions={self.positions!r}: choose one of {POSITIONS}.")
    if self.vocab_size <= 0:
      raise ValueError(f"TextConfig.vocab_size={self.vocab_size}: must be positive.")
    if self.positions == "learned" and self.max_length <= 0:
      raise ValueError(f"TextConfig.max_length={self.max_length}: learned positions need > 0.")
    if self.nsp and self.type_vocab_size < 2:
      raise ValueError("TextConfig.nsp=True needs type_vocab_size >= 2 (sentence A/B).")

  @property
  def resolved_backbone(self) -> TransformerConfig:
    """The backbone with ``rope`` following ``positions``."""
    rope = self.positions == "rope"
    return self.backbone if self.backbone.rope == rope else self.backbone.replace(rope=rope)

  def replace(self, **changes) -> "TextConfig":
    return dataclasses.replace(self, **changes)


# -------------------------------------------------------------------- stem --

class TokenEmbedding(nn.Module):
  """Token ids (+ positions) -> embeddings; ``attend`` is the tied output head.

  ``__call__(ids [batch, length], positions=None) -> [batch, length, width]``.
  With ``max_length > 0`` a learned position table ``[max_length, width]``
  is added (positions default to ``arange(length)``). ``attend(x [..., width])
  -> [..., vocab_size]`` multiplies by the transposed token table.
  Parameters: ``embedding`` (``vocab, embed``), ``pos_embedding``.
  """
  vocab_size: int
  width: int
  max_length: int = 0
  dtype: Any = "float32"
  param_dtype: Any = "float32"
  init_std: float = 0.02

  def setup(self):
    init = nn.initializers.normal(self.init_std)
    self.embedding = self.param(
        "embedding", nn.with_logical_partitioning(init, ("vocab", "embed")),
        (self.vocab_size, self.width), jnp.dtype(self.param_dtype))
    if self.max_length > 0:
      self.pos_embedding = self.param(
          "pos_embedding", nn.with_logical_partitioning(init, (None, "embed")),
          (self.max_length, self.width), jnp.dtype(self.param_dtype))

  def __call__(self, ids, positions=None):
    x = jnp.take(self.embedding, ids, axis=0).astype(self.dtype)
    if self.max_length > 0:
      if positions is None:
        positions = jnp.arange(ids.shape[-1])
      x = x + jnp.take(self.pos_embedding, positions, axis=0).astype(self.dtype)
    return nn.with_logical_constraint(x, ("batch", "length", "embed"))

  def attend(self, x):
    """Logits ``x @ embedding.T`` (``ops.linear.dense``: a copy-free backward on CPU)."""
    return linear.dense(x.astype(self.dtype), self.embedding.astype(self.dtype).T)


def token_embedding(cfg: TextConfig, backbone: Optional[TransformerConfig] = None,
                    name: str = "embed") -> TokenEmbedding:
  """The token stem of ``cfg``, as wide as (and in the dtypes of) ``backbone``
  (default ``cfg.backbone``; CLIP's shared backbone is the image tower's)."""
  bb = cfg.backbone if backbone is None else backbone
  return TokenEmbedding(cfg.vocab_size, bb.width,
                        max_length=cfg.max_length if cfg.positions == "learned" else 0,
                        dtype=bb.dtype, param_dtype=bb.param_dtype,
                        init_std=cfg.embed_init_std, name=name)


def _default_positions(ids, segment_ids, cache_index):
  if segment_ids is not None:
    return mask_ops.segment_positions(segment_ids)
  start = 0 if cache_index is None else cache_index
  return jnp.broadcast_to(jnp.arange(ids.shape[-1]) + start, ids.shape)


class _Encoder(nn.Module):
  """Shared wiring: stem (+ token types, + norm for post-LN) -> backbone.

  Submodule names (``embed``, ``type_embed``, ``embed_norm``, ``backbone``)
  are the checkpoint layout every text model shares, so a classifier can
  load a GPT's or BERT's embedding and backbone by name.
  """
  config: TextConfig

  def setup(self):
    cfg = self.config
    self.embed = token_embedding(cfg)
    if cfg.type_vocab_size > 0:
      self.type_embed = nn.Embed(
          cfg.type_vocab_size, cfg.backbone.width, dtype=cfg.backbone.dtype,
          param_dtype=cfg.backbone.param_dtype,
          embedding_init=nn.with_logical_partitioning(
              nn.initializers.normal(cfg.embed_init_std), (None, "embed")))
    if cfg.backbone.norm_position == "post":
      self.embed_norm = Norm(cfg.backbone)
    self.backbone = Transformer(cfg.resolved_backbone)

  def __call__(self, ids, *, causal, segment_ids=None, positions=None, token_types=None,
               mask=None, attention_mask=None, cache=None, cache_index=None, train=False,
               return_layers=False):
    cfg = self.config
    if attention_mask is not None:
      # With a cache the keys are the cache's slots ([depth, batch, max_len, ...]).
      kv_length = ids.shape[1] if cache is None else cache["k"].shape[2]
      keys = mask_ops.key_mask(attention_mask, kv_length, "text model")
      mask = keys if mask is None else jnp.logical_and(mask, keys)
    if positions is None:
      positions = _default_positions(ids, segment_ids, cache_index)
    x = self.embed(ids, positions if cfg.positions == "learned" else None)
    if cfg.type_vocab_size > 0:
      types = jnp.zeros_like(ids) if token_types is None else token_types
      x = x + self.type_embed(types)
    if cfg.backbone.norm_position == "post":
      x = self.embed_norm(x)
    hidden, aux = self.backbone(x, causal=causal, segment_ids=segment_ids, mask=mask,
                                positions=positions if cfg.positions == "rope" else None,
                                cache=cache, cache_index=cache_index, train=train,
                                return_layers=return_layers)
    return hidden, {**aux, "embedded": x}


class TextEncoder(nn.Module):
  """A text model without its head: ``(ids) -> (hidden [batch, length, width], aux)``.

  The stem + backbone every text model shares (params under ``encoder``, so
  GPT / BERT checkpoints load by name). ``pooler=True`` adds BERT's pooler:
  ``aux["pooled"] = tanh(dense(hidden[:, 0]))`` ``[batch, width]`` (params
  ``pooler``, as in ``BERT``). ``attention_mask``: HF's key mask, as in
  ``BERT``. ``aux["embedded"]`` is the backbone's input;
  with ``return_layers`` ``aux["layers"]`` holds every block's output
  ``[depth, batch, length, width]``.
  """
  config: TextConfig
  causal: bool = False
  pooler: bool = False

  @nn.compact
  def __call__(self, ids, *, segment_ids=None, positions=None, token_types=None,
               attention_mask=None, train: bool = False, return_layers: bool = False):
    cfg = self.config
    bb = cfg.backbone
    hidden, aux = _Encoder(cfg, name="encoder")(
        ids, causal=self.causal, segment_ids=segment_ids, positions=positions,
        token_types=token_types, attention_mask=attention_mask, train=train,
        return_layers=return_layers)
    aux["hidden"] = hidden
    if self.pooler:
      dense = nn.Dense(bb.width, dtype=bb.dtype, param_dtype=bb.param_dtype,
                       kernel_init=nn.with_logical_partitioning(
                           nn.initializers.normal(cfg.embed_init_std), ("embed", "mlp")),
                       bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)),
                       name="pooler")
      aux["pooled"] = jnp.tanh(dense(hidden[:, 0]))
    return hidden, aux


# --------------------------------------------------------------------- GPT --

class GPT(nn.Module):
  """Causal LM: ``(ids [batch, length]) -> (logits [batch, length, vocab], aux)``.

  ``segment_ids`` isolate packed documents (positions then restart per
  segment). ``attention_mask`` ``[batch, length]`` (1 = real token) is
  Hugging Face's key mask (``ops.masks.key_mask``): every position, padded
  ones included, equals HF's GPT-2, left or right padded. For decoding pass
  ``cache`` / ``cache_index`` (see ``init_cache``) and optionally a boolean
  key ``mask`` ``[batch, 1, 1, cache_length]`` (or ``attention_mask``
  ``[batch, cache_length]``); ``aux["cache"]`` is the updated cache.
  ``aux["hidden"]`` is the final hidden state, ``aux["embedded"]`` the
  backbone's input and, with ``return_layers``, ``aux["layers"]`` every
  block's output. Logits are float32.
  """
  config: TextConfig

  def setup(self):
    self.encoder = _Encoder(self.config, name="encoder")
    if not self.config.tie_embeddings:
      self.head = nn.Dense(
          self.config.vocab_size, use_bias=False, dtype=self.config.backbone.dtype,
          param_dtype=self.config.backbone.param_dtype,
          kernel_init=nn.with_logical_partitioning(
              nn.initializers.normal(self.config.embed_init_std), ("embed", "vocab")))

  def __call__(self, ids, *, segment_ids=None, positions=None, mask=None, attention_mask=None,
               cache=None, cache_index=None, train: bool = False, return_layers: bool = False):
    hidden, aux = self.encoder(ids, causal=True, segment_ids=segment_ids, positions=positions,
                               mask=mask, attention_mask=attention_mask, cache=cache,
                               cache_index=cache_index, train=train,
                               return_layers=return_layers)
    if self.config.tie_embeddings:
      logits = self.encoder.embed.attend(hidden)
    else:
      logits = self.head(hidden)
    aux["hidden"] = hidden
    return logits.astype(jnp.float32), aux


def causal_lm_loss(logits, targets, weights, *, z_loss: float = 0.0, byte_counts=None):
  """Mean next-token cross-entropy over ``weights`` (+ ``z_loss * lse**2``).

  Args:
    logits: ``[batch, length, vocab]``; position ``t`` predicts ``targets[t]``
      (the inputs are already shifted by the caller / packer).
    targets: ``[batch, length]`` ids.
    weights: ``[batch, length]``, 0 on padding.
    z_loss: PaLM's auxiliary ``log(Z)**2`` penalty (keeps logits from drifting).
    byte_counts: optional ``[batch, length]`` UTF-8 bytes each target stands
      for; adds ``bits_per_byte`` = NLL in bits / bytes.
  Returns:
    ``(loss, metrics)``: ``nll`` (nats/token), ``perplexity``,
    ``bits_per_token``, ``z_loss``, ``tokens``.
  """
  nll, lse = cross_entropy(logits, targets)
  w = weights.astype(jnp.float32)
  count = jnp.sum(w)
  denom = jnp.maximum(count, 1.0)
  mean_nll = jnp.sum(nll * w) / denom
  zl = z_loss * jnp.sum(jnp.square(lse) * w) / denom
  metrics = {"nll": mean_nll, "perplexity": jnp.exp(mean_nll),
             "bits_per_token": mean_nll / LN2, "z_loss": zl, "tokens": count}
  if byte_counts is not None:
    b = byte_counts.astype(jnp.float32)
    metrics["bits_per_byte"] = jnp.sum(nll * b * w / jnp.maximum(b, 1.0)) / LN2 / \
        jnp.maximum(jnp.sum(b * w), 1.0)
  return mean_nll + zl, metrics


# -------------------------------------------------------------------- BERT --

class BERT(nn.Module):
  """Masked LM: ``(ids) -> (logits [batch, length, vocab], aux)``, bidirectional.

  MLM head: dense + gelu + norm, then the tied token table and a bias (as
  BERT). ``aux["nsp_logits"]`` ``[batch, 2]`` (is-next = 1) when
  ``config.nsp``; ``aux["hidden"]`` the final hidden state, ``aux["embedded"]``
  the backbone's input and, with ``return_layers``, ``aux["layers"]`` every
  block's output ``[depth, batch, length, width]``.
  """
  config: TextConfig

  def setup(self):
    cfg = self.config
    bb = cfg.backbone
    kernel = nn.with_logical_partitioning(nn.initializers.normal(cfg.embed_init_std),
                                          ("embed", "mlp"))
    self.encoder = _Encoder(cfg, name="encoder")
    self.mlm_dense = nn.Dense(bb.width, dtype=bb.dtype, param_dtype=bb.param_dtype,
                              kernel_init=nn.with_logical_partitioning(
                                  nn.initializers.normal(cfg.embed_init_std), ("embed", "mlp")),
                              bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)))
    self.mlm_norm = Norm(bb)
    if not cfg.tie_embeddings:
      self.head = nn.Dense(cfg.vocab_size, use_bias=False, dtype=bb.dtype,
                           param_dtype=bb.param_dtype,
                           kernel_init=nn.with_logical_partitioning(
                               nn.initializers.normal(cfg.embed_init_std), ("embed", "vocab")))
    self.mlm_bias = self.param("mlm_bias", nn.with_logical_partitioning(
        nn.initializers.zeros, ("vocab",)), (cfg.vocab_size,), jnp.dtype(bb.param_dtype))
    if cfg.nsp:
      self.pooler = nn.Dense(bb.width, dtype=bb.dtype, param_dtype=bb.param_dtype,
                             kernel_init=kernel,
                             bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)))
      self.nsp_head = nn.Dense(2, dtype=bb.dtype, param_dtype=bb.param_dtype,
                               kernel_init=nn.with_logical_partitioning(
                                   nn.initializers.normal(cfg.embed_init_std), ("mlp", None)))

  def __call__(self, ids, *, segment_ids=None, positions=None, token_types=None,
               attention_mask=None, train: bool = False, return_layers: bool = False):
    cfg = self.config
    hidden, aux = self.encoder(ids, causal=False, segment_ids=segment_ids, positions=positions,
                               token_types=token_types, attention_mask=attention_mask,
                               train=train, return_layers=return_layers)
    h = self.mlm_norm(nn.gelu(self.mlm_dense(hidden), approximate=False))
    logits = self.encoder.embed.attend(h) if cfg.tie_embeddings else self.head(h)
    logits = logits.astype(jnp.float32) + self.mlm_bias.astype(jnp.float32)
    aux["hidden"] = hidden
    if cfg.nsp:
      pooled = jnp.tanh(self.pooler(hidden[:, 0]))
      aux["nsp_logits"] = self.nsp_head(pooled).astype(jnp.float32)
    return logits, aux


def mlm_mask(rng, ids, *, vocab_size: int, mask_id: int, special_ids: Sequence[int],
             valid=None, rate: float = 0.15, mask_frac: float = 0.8, random_frac: float = 0.1):
  """BERT's masking as a pure function of ``(rng, ids)``.

  Each non-special (and ``valid``) token is selected with probability
  ``rate``; a selected token becomes ``mask_id`` with probability
  ``mask_frac``, a uniformly random non-special id with ``random_frac``, and
  stays itself otherwise. Returns ``(inputs, selected)``: the corrupted ids
  and the boolean ``[batch, length]`` positions the loss is taken on.
  """
  ids = jnp.asarray(ids)
  specials = sorted({int(s) for s in special_ids})
  k_sel, k_kind, k_tok = jax.random.split(rng, 3)
  maskable = jnp.ones(ids.shape, bool)
  for s in specials:
    maskable &= ids != s
  if valid is not None:
    maskable &= valid.astype(bool)
  selected = jax.random.bernoulli(k_sel, rate, ids.shape) & maskable
  u = jax.random.uniform(k_kind, ids.shape)
  to_mask = selected & (u < mask_frac)
  to_random = selected & (u >= mask_frac) & (u < mask_frac + random_frac)
  # r-th non-special id: draw r in [0, vocab - #specials) and step over each
  # special at or below it, in increasing order.
  r = jax.random.randint(k_tok, ids.shape, 0, vocab_size - len(specials))
  for s in specials:
    r = r + (r >= s).astype(r.dtype)
  inputs = jnp.where(to_mask, mask_id, jnp.where(to_random, r.astype(ids.dtype), ids))
  return inputs.astype(ids.dtype), selected


def mlm_loss(logits, targets, selected):
  """Mean cross-entropy over ``selected`` positions and masked-token accuracy."""
  nll, _ = cross_entropy(logits, targets)
  w = selected.astype(jnp.float32)
  count = jnp.sum(w)
  denom = jnp.maximum(count, 1.0)
  loss = jnp.sum(nll * w) / denom
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  return loss, {"mlm_loss": loss, "mlm_accuracy": jnp.sum(correct * w) / denom,
                "mlm_tokens": count}


# ---------------------------------------------------------- classification --

class SequenceClassifier(nn.Module):
  """Text classification: ``(ids, valid) -> (logits [batch, num_classes], aux)``.

  Same stem + backbone (and names) as ``GPT`` / ``BERT``, so
  ``datong.train.warmstart.merge(params, run, at="encoder")`` loads them.
  ``pooling``: ``cls`` (first token, BERT), ``mean`` (over valid tokens) or
  ``last`` (last valid token, for a causal GPT backbone). ``valid`` ``[batch, length]`` marks real tokens.
  """
  config: TextConfig
  num_classes: int
  pooling: str = "cls"
  causal: bool = False
  dropout: float = 0.0

  @nn.compact
  def __call__(self, ids, valid=None, *, token_types=None, train: bool = False):
    if self.pooling not in ("cls", "mean", "last"):
      raise ValueError(f"pooling={self.pooling!r}: choose cls, mean or last.")
    valid = jnp.ones(ids.shape, bool) if valid is None else valid.astype(bool)
    # Padding is segment 0, real tokens segment 1: pads never reach real tokens.
    seg = valid.astype(jnp.int32)
    positions = jnp.maximum(jnp.cumsum(seg, axis=-1) - 1, 0)
    hidden, aux = _Encoder(self.config, name="encoder")(
        ids, causal=self.causal, segment_ids=seg, positions=positions,
        token_types=token_types, train=train)
    if self.pooling == "cls":
      pooled = hidden[:, 0]
    elif self.pooling == "mean":
      w = valid.astype(hidden.dtype)[..., None]
      pooled = jnp.sum(hidden * w, axis=1) / jnp.maximum(jnp.sum(w, axis=1), 1.0)
    else:
      last = jnp.maximum(jnp.sum(valid, axis=-1) - 1, 0)
      pooled = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
    pooled = nn.Dropout(self.dropout)(pooled, deterministic=not train)
    bb = self.config.backbone
    logits = nn.Dense(self.num_classes, dtype=bb.dtype, param_dtype=bb.param_dtype,
                      kernel_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed", None)),
                      name="classifier")(pooled)
    aux["pooled"] = pooled
    return logits.astype(jnp.float32), aux

"""Text on the shared backbone: token stem, GPT, BERT, generation, classification.

Every model here is ``TokenEmbedding`` + ``datong.backbone.Transformer`` + a
head; none copies a backbone layer. Models take integer ids ``[batch,
length]`` and never see a tokenizer (``datong.unimodal.tokenizers``).

    cfg = TextConfig(backbone=TransformerConfig.preset("tiny"))
    model = GPT(cfg)
    params = model.init(rng, ids)["params"]
    logits, aux = model.apply({"params": params}, ids, segment_ids=seg)

Pieces, each usable alone:

* ``TokenEmbedding``: ids (+ positions) -> ``[batch, length, width]``, with
  ``attend`` for a tied output head (the CLIP text tower imports it).
* ``pack_documents``: documents -> fixed-length rows with segment ids and
  per-segment positions; attention never crosses documents.
* ``GPT`` + ``causal_lm_loss``: next-token cross-entropy, optional z-loss,
  perplexity, bits per token / byte.
* ``generate``: KV-cache decoding (greedy, temperature, top-k, top-p),
  batched with left or right padding, jitted, stopping at EOS.
* ``BERT`` + ``mlm_mask`` + ``mlm_loss``: BERT's 15% / 80-10-10 masking as a
  pure function of ``(ids, rng)``; optional next-sentence head.
* ``SequenceClassifier`` + ``init_from_pretrained``: fine-tuning on a pooled
  representation from a GPT/BERT run's embedding + backbone.

The engine-facing ``GPTTask`` / ``BERTTask`` (``datong.train.task.Task``) are
at the bottom, configured by ``GPTTaskConfig`` / ``BERTTaskConfig``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from datong.backbone import (Norm, Transformer, TransformerConfig, init_cache, merge_params,
                             params_collection)
from datong.ops import masks as mask_ops
from datong.unimodal.tokenizers import (BPETokenizer, ByteTokenizer, HFTokenizer,
                                        SentencePieceTokenizer, Tokenizer,
                                        special_ids)

__all__ = [
    "BERT", "BERTTask", "BERTTaskConfig", "ByteTokenizer", "GPT", "GPTTask",
    "GPTTaskConfig", "PackedSource", "SequenceClassifier", "TextConfig", "TokenEmbedding",
    "Tokenizer", "causal_lm_loss", "classification_loss", "cross_entropy",
    "generate", "init_from_checkpoint", "init_from_pretrained", "make_tokenizer", "mlm_loss",
    "mlm_mask", "pack_documents", "sample_logits",
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
    return jnp.einsum("...d,vd->...v", x.astype(self.dtype), self.embedding.astype(self.dtype))


def _token_embedding(cfg: TextConfig, name="embed") -> TokenEmbedding:
  bb = cfg.backbone
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
    self.embed = _token_embedding(cfg)
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
               mask=None, cache=None, cache_index=None, train=False):
    cfg = self.config
    if positions is None:
      positions = _default_positions(ids, segment_ids, cache_index)
    x = self.embed(ids, positions if cfg.positions == "learned" else None)
    if cfg.type_vocab_size > 0:
      types = jnp.zeros_like(ids) if token_types is None else token_types
      x = x + self.type_embed(types)
    if cfg.backbone.norm_position == "post":
      x = self.embed_norm(x)
    return self.backbone(x, causal=causal, segment_ids=segment_ids, mask=mask,
                         positions=positions if cfg.positions == "rope" else None,
                         cache=cache, cache_index=cache_index, train=train)


# --------------------------------------------------------------------- GPT --

class GPT(nn.Module):
  """Causal LM: ``(ids [batch, length]) -> (logits [batch, length, vocab], aux)``.

  ``segment_ids`` isolate packed documents (positions then restart per
  segment). For decoding pass ``cache`` / ``cache_index`` (see
  ``init_cache``) and optionally a boolean key ``mask`` ``[batch, 1, 1,
  cache_length]``; ``aux["cache"]`` is the updated cache. ``aux["hidden"]``
  is the final hidden state. Logits are float32.
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

  def __call__(self, ids, *, segment_ids=None, positions=None, mask=None, cache=None,
               cache_index=None, train: bool = False):
    hidden, aux = self.encoder(ids, causal=True, segment_ids=segment_ids, positions=positions,
                               mask=mask, cache=cache, cache_index=cache_index, train=train)
    if self.config.tie_embeddings:
      logits = self.encoder.embed.attend(hidden)
    else:
      logits = self.head(hidden)
    aux["hidden"] = hidden
    return logits.astype(jnp.float32), aux


def cross_entropy(logits, targets):
  """Per-position ``(nll, logsumexp)``, float32; ``logits [..., vocab]``, ``targets [...]``."""
  logits = logits.astype(jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  return lse - picked, lse


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


# -------------------------------------------------------------- generation --

def sample_logits(rng, logits, *, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0):
  """One token per row from ``logits [batch, vocab]``; temperature 0 is greedy.

  ``top_k`` keeps the k largest logits, ``top_p`` the smallest set whose
  probability reaches p (nucleus); both apply after the temperature.
  """
  logits = logits.astype(jnp.float32)
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  if top_k > 0:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each token
    cutoff = jnp.min(jnp.where(before < top_p, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "padding",
                                              "temperature", "top_k", "top_p",
                                              "eos_id", "pad_id"))
def generate(model: GPT, params, prompts, prompt_mask=None, rng=None, *,
             max_new_tokens: int, padding: str = "left", temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, eos_id: Optional[int] = None,
             pad_id: int = 0):
  """KV-cache decoding of a batch of prompts, jitted; stops at ``eos_id``.

  Args:
    model: a ``GPT``; ``params`` its ``params`` collection.
    prompts: ``[batch, prompt_length]`` ids, padded on the ``padding`` side
      ("left" or "right"); ``prompt_mask`` ``[batch, prompt_length]`` bool,
      True on real tokens (default all real). Every prompt needs >= 1 token.
    rng: PRNG key for sampling (unused when greedy).
    max_new_tokens, temperature, top_k, top_p: see ``sample_logits``.
  Returns:
    ``{"tokens": [batch, max_new_tokens], "lengths": [batch]}``: new tokens
    (the EOS included when emitted, ``pad_id`` after it) and how many tokens
    each row generated before its EOS.
  """
  if padding not in ("left", "right"):
    raise ValueError(f"padding={padding!r}: choose 'left' or 'right'.")
  batch, plen = prompts.shape
  prompts = prompts.astype(jnp.int32)
  prompt_mask = jnp.ones_like(prompts, bool) if prompt_mask is None else prompt_mask.astype(bool)
  lengths = jnp.sum(prompt_mask, axis=-1).astype(jnp.int32)
  if padding == "right":
    # Right-align every prompt: one code path, and the next token of every row
    # is predicted at the same (last) prompt position.
    shift = plen - lengths
    idx = (jnp.arange(plen)[None, :] - shift[:, None]) % plen
    prompts = jnp.take_along_axis(prompts, idx, axis=1)
    prompt_mask = jnp.arange(plen)[None, :] >= shift[:, None]
  rng = jax.random.PRNGKey(0) if rng is None else rng
  total = plen + max_new_tokens
  cache = init_cache(model.config.resolved_backbone, batch, total)
  valid = jnp.zeros((batch, total), bool).at[:, :plen].set(prompt_mask)
  positions = jnp.maximum(jnp.cumsum(prompt_mask, axis=-1) - 1, 0)
  apply = functools.partial(model.apply, {"params": params})
  logits, aux = apply(prompts, positions=positions, mask=valid[:, None, None, :],
                      cache=cache, cache_index=0)
  out = jnp.full((batch, max_new_tokens), pad_id, jnp.int32)
  done = jnp.zeros((batch,), bool)
  gen_len = jnp.zeros((batch,), jnp.int32)

  def cond(state):
    t, *_, done, _ = state
    return jnp.logical_and(t < max_new_tokens, ~jnp.all(done))

  def body(state):
    t, cache, logits, out, valid, gen_len, done, rng = state
    rng, key = jax.random.split(rng)
    tok = sample_logits(key, logits, temperature=temperature, top_k=top_k, top_p=top_p)
    tok = jnp.where(done, pad_id, tok)
    out = jax.lax.dynamic_update_slice_in_dim(out, tok[:, None], t, axis=1)
    is_eos = jnp.zeros_like(done) if eos_id is None else tok == eos_id
    gen_len = gen_len + jnp.logical_not(done | is_eos).astype(jnp.int32)
    done = done | is_eos
    valid = jax.lax.dynamic_update_slice_in_dim(valid, jnp.ones((batch, 1), bool), plen + t, axis=1)
    new_logits, aux = apply(tok[:, None], positions=(lengths + t)[:, None],
                            mask=valid[:, None, None, :], cache=cache, cache_index=plen + t)
    return t + 1, aux["cache"], new_logits[:, -1], out, valid, gen_len, done, rng

  state = (jnp.int32(0), aux["cache"], logits[:, -1], out, valid, gen_len, done, rng)
  state = jax.lax.while_loop(cond, body, state)
  return {"tokens": state[3], "lengths": state[5]}


# -------------------------------------------------------------------- BERT --

class BERT(nn.Module):
  """Masked LM: ``(ids) -> (logits [batch, length, vocab], aux)``, bidirectional.

  MLM head: dense + gelu + norm, then the tied token table and a bias (as
  BERT). ``aux["nsp_logits"]`` ``[batch, 2]`` (is-next = 1) when
  ``config.nsp``; ``aux["hidden"]`` the final hidden state.
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
               train: bool = False):
    cfg = self.config
    hidden, aux = self.encoder(ids, causal=False, segment_ids=segment_ids, positions=positions,
                               token_types=token_types, train=train)
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
  ``init_from_pretrained`` can load them. ``pooling``: ``cls`` (first token,
  BERT), ``mean`` (over valid tokens) or ``last`` (last valid token, for a
  causal GPT backbone). ``valid`` ``[batch, length]`` marks real tokens.
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


def classification_loss(logits, labels):
  """Mean softmax cross-entropy and accuracy; ``labels [batch]`` ints."""
  nll, _ = cross_entropy(logits, labels)
  acc = jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32))
  return jnp.mean(nll), {"accuracy": acc}


def init_from_pretrained(params, pretrained, *, keys: Sequence[str] = ("encoder",)):
  """``params`` (unboxed) with the ``keys`` subtrees (default: the
  ``encoder``, embedding + backbone) of ``pretrained``.

  Both are ``params`` collections (plain or boxed; a ``{"params": ...}``
  wrapper is accepted). Every leaf of ``pretrained[key]`` must exist in
  ``params[key]`` with the same shape; leaves only in ``params`` keep their
  fresh values (e.g. a token-type table BERT did not have).
  """
  out = dict(params_collection(nn.unbox(params)))
  src = params_collection(nn.unbox(pretrained))
  for key in keys:
    if key not in src:
      raise KeyError(f"pretrained params have no {key!r} subtree; top-level keys: {sorted(src)}")
    out[key] = merge_params(out[key], src[key], where=f"{key}/")
  return out


def init_from_checkpoint(params, workdir: str, step: Optional[int] = None, **kw):
  """``init_from_pretrained`` from a GPT/BERT run's orbax checkpoint in ``workdir``."""
  from datong.train.checkpoint import load_params  # pylint: disable=import-outside-toplevel
  return init_from_pretrained(params, load_params(workdir, step), **kw)


# ----------------------------------------------------------------- packing --

def pack_documents(docs: Sequence[Any], length: int, *, pad_values: Any = 0) -> dict[str, np.ndarray]:
  """Concatenate documents and cut the stream into rows of ``length``.

  Args:
    docs: each a 1-D id sequence, or a dict of equally long 1-D arrays (e.g.
      ``{"inputs": t[:-1], "targets": t[1:]}``). A document longer than the
      room left in a row continues in the next row (as a new segment).
    length: row length.
    pad_values: fill of the last row's tail, one value or a dict per key.
  Returns:
    dict of ``[rows, length]`` arrays: the documents' keys (``ids`` for plain
    sequences), ``segment_ids`` (int32, 1, 2, ... per row; 0 = padding) and
    ``positions`` (int32, position within the segment in its row).
  """
  if length <= 0:
    raise ValueError(f"length={length}: must be positive.")
  docs = [d if isinstance(d, Mapping) else {"ids": d} for d in docs]
  if not docs:
    raise ValueError("pack_documents needs at least one document.")
  keys = list(docs[0])
  arrays = {k: [np.asarray(d[k]) for d in docs] for k in keys}
  sizes = np.array([len(a) for a in arrays[keys[0]]])
  for k in keys:
    if [len(a) for a in arrays[k]] != list(sizes):
      raise ValueError(f"pack_documents: feature {k!r} has other lengths than {keys[0]!r}.")
  total = int(sizes.sum())
  rows = max(1, -(-total // length))
  padded = rows * length
  out = {}
  for k in keys:
    stream = np.concatenate(arrays[k]) if total else np.zeros((0,), np.int32)
    fill = pad_values.get(k, 0) if isinstance(pad_values, Mapping) else pad_values
    buf = np.full((padded,), fill, dtype=stream.dtype)
    buf[:total] = stream
    out[k] = buf.reshape(rows, length)
  doc = np.full((padded,), -1, np.int64)
  doc[:total] = np.repeat(np.arange(len(docs)), sizes)
  doc = doc.reshape(rows, length)
  starts = np.ones_like(doc, bool)
  starts[:, 1:] = doc[:, 1:] != doc[:, :-1]
  seg = np.cumsum(starts, axis=1)
  seg = np.where(doc >= 0, seg, 0).astype(np.int32)
  idx = np.broadcast_to(np.arange(length), doc.shape)
  start_idx = np.maximum.accumulate(np.where(starts, idx, 0), axis=1)
  out["segment_ids"] = seg
  out["positions"] = np.where(doc >= 0, idx - start_idx, 0).astype(np.int32)
  return out


TOKENIZER_SPECS = "'byte', 'bpe:VOCAB_SIZE', 'bpe:PATH.json', 'spm:PATH' or 'hf:PATH'"


def make_tokenizer(spec: str, corpus: Optional[tuple[str, str, str]] = None) -> Tokenizer:
  """A tokenizer from its spec string.

  ``"byte"``; ``"bpe:1024"`` (a byte-level BPE of that vocabulary size,
  learned from ``corpus = (dataset, split, feature)``: deterministic, about
  a second for 0.5 MB); ``"bpe:PATH"`` (a ``BPETokenizer.save`` file);
  ``"spm:PATH"`` (sentencepiece); ``"hf:PATH"`` (a ``tokenizer.json``).
  """
  if spec == "byte":
    return ByteTokenizer()
  if spec.startswith("bpe:"):
    arg = spec[4:]
    if not arg.isdigit():
      return BPETokenizer.load(arg)
    if corpus is None:
      raise ValueError(f"tokenizer={spec!r} learns its merges from a training split; here "
                       f"there is none to learn from. Pass a saved file: 'bpe:PATH.json'.")
    return _learned_bpe(*corpus, int(arg))
  if spec.startswith("spm:"):
    return SentencePieceTokenizer(spec[4:])
  if spec.startswith("hf:"):
    return HFTokenizer(spec[3:])
  raise ValueError(f"tokenizer={spec!r}: use {TOKENIZER_SPECS}.")


@functools.lru_cache(maxsize=8)
def _learned_bpe(dataset: str, split: str, feature: str, vocab_size: int) -> BPETokenizer:
  return BPETokenizer.learn(load_documents(dataset, split, feature), vocab_size)


def token_byte_lengths(tokenizer: Tokenizer) -> np.ndarray:
  """``[vocab]`` UTF-8 bytes per id (0 for specials); exact for ``ByteTokenizer``.

  For subword tokenizers it is the length of the id decoded alone (an
  approximation: sentencepiece drops a piece's leading space when alone).
  """
  table = np.zeros((tokenizer.vocab_size,), np.int32)
  if isinstance(tokenizer, ByteTokenizer):
    table[:256] = 1
    return table
  if isinstance(tokenizer, BPETokenizer):
    return np.array([len(b) for b in tokenizer.token_bytes], np.int32)
  specials = set(special_ids(tokenizer))
  for i in range(tokenizer.vocab_size):
    if i not in specials:
      table[i] = len(tokenizer.decode([i]).encode("utf-8"))
  return table


# ------------------------------------------------------------------- tasks --
# The engine-facing objectives (``datong.train.task.Task``). Data: a text
# dataset (``pydoc_text`` by default) is tokenized and packed in memory,
# deterministically, the first time a split is asked for.

from datong.train.task import EvalContext, Task, transformer_flops_per_token  # pylint: disable=g-import-not-at-top,wrong-import-position


class PackedSource:
  """Random-access rows of packed arrays: ``len``, ``src[i] -> {key: [length]}``."""

  def __init__(self, arrays: Mapping[str, np.ndarray]):
    self.arrays = dict(arrays)
    self._n = len(next(iter(self.arrays.values())))

  def __len__(self):
    return self._n

  def __getitem__(self, i):
    return {k: v[int(i)] for k, v in self.arrays.items()}


def load_documents(dataset: str, split: str, feature: str = "text") -> list[bytes]:
  """Every example's ``feature`` (UTF-8 bytes) of a tfds split, in source order."""
  from datong.train import data  # pylint: disable=import-outside-toplevel
  src = data.load_source(dataset, split)
  docs = []
  for i in range(len(src)):
    value = src[i][feature]
    docs.append(value if isinstance(value, bytes) else str(value).encode("utf-8"))
  return docs


def _encode(tokenizer: Tokenizer, doc: bytes) -> np.ndarray:
  if isinstance(tokenizer, ByteTokenizer):
    return np.frombuffer(doc, np.uint8).astype(np.int32)
  if isinstance(tokenizer, BPETokenizer):
    return np.asarray(tokenizer.encode_bytes(doc), np.int32)
  return np.asarray(tokenizer.encode(doc.decode("utf-8", errors="replace")), np.int32)


def _backbone_flops(cfg: TextConfig, length: int, causal: bool) -> float:
  bb = cfg.backbone
  return transformer_flops_per_token(
      bb.width, bb.depth, bb.mlp_dim, length, causal=causal,
      gated=bb.activation in ("swiglu", "geglu"),
      kv_width=bb.resolved_kv_heads * bb.resolved_head_dim)


def _zeros(spec):
  return jnp.zeros(spec.shape, spec.dtype)


def _eval_totals(task, params, ctx: EvalContext) -> dict[str, float]:
  """Sum ``task.eval_sums`` (jitted, per batch) over the whole eval split."""
  fn = jax.jit(task.eval_sums)
  sums: dict[str, float] = {}
  for batch in ctx.batches(task.eval_split, task.config.eval_batch_size or None):
    for k, v in fn(params, batch).items():
      sums[k] = sums.get(k, 0.0) + float(v)
  return sums


def _task_tokenizer(config) -> Tokenizer:
  """A text task's tokenizer (``bpe:VOCAB`` learns from its train split),
  checked against its model's vocabulary."""
  tok = make_tokenizer(config.tokenizer, (config.dataset, config.train_split, config.text_feature))
  if tok.vocab_size > config.model.vocab_size:
    raise ValueError(f"tokenizer {config.tokenizer!r} has {tok.vocab_size} ids > "
                     f"model.vocab_size {config.model.vocab_size}: set "
                     f"task.model.vocab_size={tok.vocab_size}.")
  return tok


@dataclasses.dataclass(frozen=True)
class GPTTaskConfig:
  """Causal LM pretraining on packed documents (``<bos> text <eos>``)."""
  model: TextConfig = TextConfig()
  seq_length: int = 256
  # Evaluation windows overlap: every held-out target gets at least
  # seq_length - eval_stride tokens of context. 0 or >= seq_length: evaluate
  # on packed rows like training (a row's first targets then see little).
  eval_stride: int = 128
  eval_batch_size: int = 0  # 0: the train batch size
  z_loss: float = 1e-4
  tokenizer: str = "byte"  # byte | bpe:VOCAB_SIZE | bpe:PATH | spm:PATH | hf:PATH
  dataset: str = "pydoc_text"
  train_split: str = "train"
  eval_split: str = "validation"
  text_feature: str = "text"

  def __post_init__(self):
    if self.seq_length <= 1:
      raise ValueError(f"GPTTaskConfig.seq_length={self.seq_length}: must be > 1.")
    if self.model.positions == "learned" and self.model.max_length < self.seq_length:
      raise ValueError(f"GPTTaskConfig: model.max_length={self.model.max_length} < "
                       f"seq_length={self.seq_length} with learned positions.")

  def build(self) -> "GPTTask":
    return GPTTask(self)


class GPTTask(Task):
  """Next-token prediction; ``evaluate`` reports ``eval/bits_per_byte``.

  A row holds ``inputs``, ``targets`` (inputs shifted by one within each
  document, so every target is predicted exactly once across the split),
  ``loss_weights`` (0 on padding), ``byte_counts`` (UTF-8 bytes per target,
  0 for ``<eos>``), ``segment_ids`` and ``positions``.
  """

  def __init__(self, config: GPTTaskConfig):
    self.config = config
    self.dataset = config.dataset
    self.train_split, self.eval_split = config.train_split, config.eval_split
    self.tokenizer = _task_tokenizer(config)
    self.model = GPT(config.model)
    self._sources = {}

  def pack(self, docs: Sequence[bytes]) -> dict[str, np.ndarray]:
    tok = self.tokenizer
    nbytes = token_byte_lengths(tok)
    rows = []
    for doc in docs:
      t = np.concatenate([[tok.bos_id], _encode(tok, doc), [tok.eos_id]]).astype(np.int32)
      rows.append({"inputs": t[:-1], "targets": t[1:],
                   "loss_weights": np.ones(len(t) - 1, np.float32),
                   "byte_counts": nbytes[t[1:]].astype(np.float32)})
    return pack_documents(rows, self.config.seq_length,
                          pad_values={"inputs": tok.pad_id, "targets": tok.pad_id})

  def pack_windows(self, docs: Sequence[bytes], stride: int) -> dict[str, np.ndarray]:
    """Sliding-window rows for evaluation: one document per row, windows of
    ``seq_length`` every ``stride`` targets; each target is scored once, in
    the first window that gives it at least ``seq_length - stride`` tokens of
    context (or its whole document prefix)."""
    tok, length = self.tokenizer, self.config.seq_length
    nbytes = token_byte_lengths(tok)
    rows = {k: [] for k in ("inputs", "targets", "loss_weights", "byte_counts",
                            "segment_ids", "positions")}
    for doc in docs:
      t = np.concatenate([[tok.bos_id], _encode(tok, doc), [tok.eos_id]]).astype(np.int32)
      n = len(t) - 1
      starts = list(range(0, max(n - length, 0) + 1, stride))
      if starts[-1] + length < n:
        starts.append(n - length)
      scored = 0
      for s in starts:
        e = min(s + length, n)
        pad = length - (e - s)
        w = (np.arange(s, e) >= scored).astype(np.float32)
        scored = e
        rows["inputs"].append(np.pad(t[s:e], (0, pad), constant_values=tok.pad_id))
        rows["targets"].append(np.pad(t[s + 1:e + 1], (0, pad), constant_values=tok.pad_id))
        rows["loss_weights"].append(np.pad(w, (0, pad)))
        rows["byte_counts"].append(np.pad(nbytes[t[s + 1:e + 1]].astype(np.float32), (0, pad)))
        rows["segment_ids"].append(np.pad(np.ones(e - s, np.int32), (0, pad)))
        rows["positions"].append(np.pad(np.arange(e - s, dtype=np.int32), (0, pad)))
    return {k: np.stack(v) for k, v in rows.items()}

  def source(self, split: str):
    if split not in self._sources:
      docs = load_documents(self.dataset, split, self.config.text_feature)
      stride = self.config.eval_stride
      if split == self.eval_split and 0 < stride < self.config.seq_length:
        self._sources[split] = PackedSource(self.pack_windows(docs, stride))
      else:
        self._sources[split] = PackedSource(self.pack(docs))
    return self._sources[split]

  def batch_spec(self, batch_size: int):
    shape = (batch_size, self.config.seq_length)
    i32, f32 = jnp.int32, jnp.float32
    return {"inputs": jax.ShapeDtypeStruct(shape, i32), "targets": jax.ShapeDtypeStruct(shape, i32),
            "loss_weights": jax.ShapeDtypeStruct(shape, f32),
            "byte_counts": jax.ShapeDtypeStruct(shape, f32),
            "segment_ids": jax.ShapeDtypeStruct(shape, i32),
            "positions": jax.ShapeDtypeStruct(shape, i32)}

  def init(self, rng, batch):
    return self.model.init({"params": rng}, _zeros(batch["inputs"]),
                           segment_ids=_zeros(batch["segment_ids"]) + 1,
                           positions=_zeros(batch["positions"]))

  def _logits(self, params, batch, rng, train):
    logits, _ = self.model.apply({"params": params}, batch["inputs"],
                                 segment_ids=batch["segment_ids"], positions=batch["positions"],
                                 train=train, rngs={"dropout": rng})
    return logits

  def loss(self, params, batch, rng, *, train=True):
    logits = self._logits(params, batch, rng, train)
    return causal_lm_loss(logits, batch["targets"], batch["loss_weights"],
                          z_loss=self.config.z_loss, byte_counts=batch["byte_counts"])

  def eval_sums(self, params, batch):
    """Summed NLL (nats) over all targets and over byte targets, and counts."""
    logits = self._logits(params, batch, jax.random.PRNGKey(0), False)
    nll, _ = cross_entropy(logits, batch["targets"])
    w = batch["loss_weights"] * batch["mask"].astype(jnp.float32)[:, None]
    b = batch["byte_counts"] * w
    return {"nll": jnp.sum(nll * w), "tokens": jnp.sum(w),
            "byte_nll": jnp.sum(nll * (b > 0)), "bytes": jnp.sum(b)}

  def evaluate(self, params, ctx: EvalContext):
    sums = _eval_totals(self, params, ctx)
    tokens, nbytes = max(sums.get("tokens", 0.0), 1.0), max(sums.get("bytes", 0.0), 1.0)
    return {"eval/loss": sums["nll"] / tokens, "eval/perplexity": math.exp(sums["nll"] / tokens),
            "eval/bits_per_token": sums["nll"] / tokens / LN2,
            "eval/bits_per_byte": sums["byte_nll"] / LN2 / nbytes,
            "eval/bytes": sums["bytes"]}

  def tokens_per_example(self):
    return self.config.seq_length

  def flops_per_example(self):
    cfg, length = self.config.model, self.config.seq_length
    head = 3 * 2 * cfg.backbone.width * cfg.vocab_size
    return float(length * (_backbone_flops(cfg, length, causal=True) + head))


@dataclasses.dataclass(frozen=True)
class BERTTaskConfig:
  """Masked-LM pretraining on packed documents (``[CLS] text [SEP]``).

  With ``model.nsp`` rows are sentence pairs ``[CLS] A [SEP] B [SEP]``
  (B follows A in its document half the time) and the NSP loss is added.
  """
  model: TextConfig = TextConfig()
  seq_length: int = 256
  mask_rate: float = 0.15
  mask_frac: float = 0.8
  random_frac: float = 0.1
  nsp_weight: float = 1.0
  tokenizer: str = "byte"
  dataset: str = "pydoc_text"
  train_split: str = "train"
  eval_split: str = "validation"
  text_feature: str = "text"
  eval_seed: int = 1234
  eval_batch_size: int = 0  # 0: the train batch size

  def __post_init__(self):
    if not 0.0 < self.mask_rate < 1.0:
      raise ValueError(f"BERTTaskConfig.mask_rate={self.mask_rate}: must be in (0, 1).")
    if self.mask_frac < 0 or self.random_frac < 0 or self.mask_frac + self.random_frac > 1:
      raise ValueError("BERTTaskConfig: mask_frac, random_frac >= 0 with sum <= 1.")

  def build(self) -> "BERTTask":
    return BERTTask(self)


class BERTTask(Task):
  """Masked-token prediction; ``evaluate`` reports ``eval/mlm_accuracy``.

  Masking is ``mlm_mask`` inside the loss, keyed per row by
  ``fold_in(rng, row_id)``: training draws new masks every step, evaluation
  uses ``eval_seed`` and is the same for any batch size.
  """

  def __init__(self, config: BERTTaskConfig):
    self.config = config
    self.dataset = config.dataset
    self.train_split, self.eval_split = config.train_split, config.eval_split
    self.tokenizer = _task_tokenizer(config)
    self.specials = special_ids(self.tokenizer)
    self.model = BERT(config.model)
    self._sources = {}

  def pack(self, docs: Sequence[bytes], seed: int = 0) -> dict[str, np.ndarray]:
    tok = self.tokenizer
    encoded = [_encode(tok, d) for d in docs]
    if self.config.model.nsp:
      rows = nsp_pairs(encoded, self.config.seq_length, tok, np.random.default_rng(seed))
    else:
      rows = pack_documents([np.concatenate([[tok.cls_id], e, [tok.sep_id]]).astype(np.int32)
                             for e in encoded], self.config.seq_length,
                            pad_values=tok.pad_id)
    rows["row_id"] = np.arange(len(rows["ids"]), dtype=np.int32)
    return rows

  def source(self, split: str):
    if split not in self._sources:
      docs = load_documents(self.dataset, split, self.config.text_feature)
      self._sources[split] = PackedSource(self.pack(docs, seed=0 if split == self.train_split else 1))
    return self._sources[split]

  def batch_spec(self, batch_size: int):
    shape = (batch_size, self.config.seq_length)
    spec = {k: jax.ShapeDtypeStruct(shape, jnp.int32) for k in ("ids", "segment_ids", "positions")}
    spec["row_id"] = jax.ShapeDtypeStruct((batch_size,), jnp.int32)
    if self.config.model.nsp:
      spec["token_types"] = jax.ShapeDtypeStruct(shape, jnp.int32)
      spec["nsp_labels"] = jax.ShapeDtypeStruct((batch_size,), jnp.int32)
    return spec

  def init(self, rng, batch):
    ids = _zeros(batch["ids"])
    return self.model.init({"params": rng}, ids, segment_ids=ids + 1, positions=ids)

  def mask(self, rng, batch):
    """``(inputs, selected)`` for a batch, one ``mlm_mask`` per row."""
    cfg = self.config
    fn = functools.partial(mlm_mask, vocab_size=cfg.model.vocab_size,
                           mask_id=self.tokenizer.mask_id, special_ids=self.specials,
                           rate=cfg.mask_rate, mask_frac=cfg.mask_frac,
                           random_frac=cfg.random_frac)
    keys = jax.vmap(jax.random.fold_in, (None, 0))(rng, batch["row_id"])
    valid = batch["segment_ids"] > 0
    return jax.vmap(lambda k, i, v: fn(k, i[None], valid=v[None]))(keys, batch["ids"], valid)

  def loss(self, params, batch, rng, *, train=True):
    mask_rng, drop_rng = jax.random.split(rng)
    inputs, selected = self.mask(mask_rng, batch)
    inputs, selected = inputs[:, 0], selected[:, 0]
    logits, aux = self.model.apply(
        {"params": params}, inputs, segment_ids=batch["segment_ids"],
        positions=batch["positions"], token_types=batch.get("token_types"),
        train=train, rngs={"dropout": drop_rng})
    loss, metrics = mlm_loss(logits, batch["ids"], selected)
    if self.config.model.nsp:
      nsp, nsp_metrics = classification_loss(aux["nsp_logits"], batch["nsp_labels"])
      loss = loss + self.config.nsp_weight * nsp
      metrics.update(nsp_loss=nsp, nsp_accuracy=nsp_metrics["accuracy"])
    return loss, metrics

  def eval_sums(self, params, batch):
    inputs, selected = self.mask(jax.random.PRNGKey(self.config.eval_seed), batch)
    inputs, selected = inputs[:, 0], selected[:, 0] & batch["mask"][:, None]
    logits, aux = self.model.apply({"params": params}, inputs, segment_ids=batch["segment_ids"],
                                   positions=batch["positions"],
                                   token_types=batch.get("token_types"))
    nll, _ = cross_entropy(logits, batch["ids"])
    w = selected.astype(jnp.float32)
    correct = (jnp.argmax(logits, -1) == batch["ids"]).astype(jnp.float32)
    out = {"nll": jnp.sum(nll * w), "correct": jnp.sum(correct * w), "count": jnp.sum(w)}
    if self.config.model.nsp:
      m = batch["mask"].astype(jnp.float32)
      out["nsp_correct"] = jnp.sum((jnp.argmax(aux["nsp_logits"], -1) == batch["nsp_labels"]) * m)
      out["pairs"] = jnp.sum(m)
    return out

  def evaluate(self, params, ctx: EvalContext):
    sums = _eval_totals(self, params, ctx)
    count = max(sums.get("count", 0.0), 1.0)
    out = {"eval/mlm_loss": sums["nll"] / count, "eval/mlm_accuracy": sums["correct"] / count,
           "eval/mlm_tokens": sums["count"]}
    out["eval/loss"] = out["eval/mlm_loss"]
    if self.config.model.nsp:
      out["eval/nsp_accuracy"] = sums["nsp_correct"] / max(sums["pairs"], 1.0)
    return out

  def tokens_per_example(self):
    return self.config.seq_length

  def flops_per_example(self):
    cfg, length = self.config.model, self.config.seq_length
    w = cfg.backbone.width
    head = 3 * 2 * (w * cfg.vocab_size + w * w)
    return float(length * (_backbone_flops(cfg, length, causal=False) + head))


def nsp_pairs(docs: Sequence[np.ndarray], length: int, tokenizer: Tokenizer,
              rng: np.random.Generator) -> dict[str, np.ndarray]:
  """Next-sentence rows ``[CLS] A [SEP] B [SEP]`` from consecutive chunks.

  Each document is cut into chunks of ``(length - 3) // 2`` tokens; for each
  pair of consecutive chunks, B is the true next chunk (``nsp_labels`` 1)
  or, with probability 1/2, a chunk of another document (label 0).
  Returns ``ids, token_types, segment_ids, positions`` ``[rows, length]`` and
  ``nsp_labels [rows]``.
  """
  half = (length - 3) // 2
  if half < 1:
    raise ValueError(f"length={length} too short for sentence pairs")
  chunks = [[d[i:i + half] for i in range(0, len(d), half)] for d in docs]
  all_chunks = [(di, c) for di, cs in enumerate(chunks) for c in cs]
  ids, types, labels = [], [], []
  for di, cs in enumerate(chunks):
    for a, b in zip(cs[:-1], cs[1:]):
      label = 1
      if rng.random() < 0.5 and len(docs) > 1:
        while True:
          dj, other = all_chunks[rng.integers(len(all_chunks))]
          if dj != di:
            break
        b, label = other, 0
      row = np.concatenate([[tokenizer.cls_id], a, [tokenizer.sep_id], b, [tokenizer.sep_id]])
      tt = np.concatenate([np.zeros(len(a) + 2), np.ones(len(b) + 1)])
      pad = length - len(row)
      ids.append(np.pad(row, (0, pad), constant_values=tokenizer.pad_id))
      types.append(np.pad(tt, (0, pad)))
      labels.append(label)
  ids = np.asarray(ids, np.int32).reshape(-1, length)
  valid = ids != tokenizer.pad_id
  return {"ids": ids, "token_types": np.asarray(types, np.int32).reshape(-1, length),
          "segment_ids": valid.astype(np.int32),
          "positions": np.where(valid, np.arange(length), 0).astype(np.int32),
          "nsp_labels": np.asarray(labels, np.int32)}

"""Text objectives for the engine: GPT (causal LM) and BERT (masked LM).

Data: a text dataset (``pydoc_text`` by default) is tokenized and packed in
memory, deterministically, the first time a split is asked for
(``pack_documents``: fixed-length rows with segment ids and per-segment
positions, so attention never crosses documents). The models and their pure
losses are in ``datong.unimodal.text``.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import os
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from datong.ops.losses import classification_loss, cross_entropy
from datong.train import data
from datong.train.task import EvalContext, Task, with_aux_losses
from datong.unimodal.text import BERT, GPT, LN2, TextConfig, causal_lm_loss, mlm_loss, mlm_mask
from datong.unimodal.tokenizers import (BPETokenizer, ByteTokenizer, HFTokenizer,
                                        SentencePieceTokenizer, Tokenizer, special_ids,
                                        token_byte_lengths)

__all__ = [
    "BERTTask", "BERTTaskConfig", "GPTTask", "GPTTaskConfig", "PackedSource", "load_documents",
    "make_tokenizer", "nsp_pairs", "pack_documents",
]

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
  docs = load_documents(dataset, split, feature)
  # Learning is deterministic but takes ~5 s per 10 MB: the result is kept
  # next to the data, keyed by the exact text and the tokenizer format, for
  # every later process (each point of a sweep is one).
  digest = hashlib.sha256(BPETokenizer.FORMAT.encode())
  for doc in docs:
    digest.update(len(doc).to_bytes(8, "little") + doc)
  try:
    path = data.cache_path("bpe", f"{digest.hexdigest()[:32]}-{vocab_size}.json")
  except OSError:
    return BPETokenizer.learn(docs, vocab_size)  # no writable data dir: learn each time
  if os.path.exists(path):
    try:
      return BPETokenizer.load(path)
    except ValueError:
      pass  # a damaged cache file is learned again and replaced
  tokenizer = BPETokenizer.learn(docs, vocab_size)
  try:
    tokenizer.save(path + f".{os.getpid()}.tmp")
    os.replace(path + f".{os.getpid()}.tmp", path)
  except OSError:
    pass  # a read-only data dir only costs the relearning
  return tokenizer


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
  src = data.load_source(dataset, split)
  if len(src) and feature not in src[0]:
    raise ValueError(f"text_feature={feature!r}: the {dataset} {split} examples have no such "
                     f"feature; they have {sorted(src[0])}. Set text_feature to one of them.")
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
    return self._apply(params, batch, rng, train)[0]

  def _apply(self, params, batch, rng, train):
    return self.model.apply({"params": params}, batch["inputs"],
                            segment_ids=batch["segment_ids"], positions=batch["positions"],
                            train=train, rngs={"dropout": rng})

  def loss(self, params, batch, rng, *, train=True):
    logits, aux = self._apply(params, batch, rng, train)
    loss, metrics = causal_lm_loss(logits, batch["targets"], batch["loss_weights"],
                                   z_loss=self.config.z_loss, byte_counts=batch["byte_counts"])
    return loss, with_aux_losses(metrics, aux)

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
    return float(length * (cfg.backbone.flops_per_token(length, causal=True) + head))


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
    return loss, with_aux_losses(metrics, aux)

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
    return float(length * (cfg.backbone.flops_per_token(length) + head))


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

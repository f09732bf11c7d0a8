"""Tokenizers: text <-> integer ids. Models never see these classes.

Every tokenizer follows the ``Tokenizer`` protocol: ``encode(text) ->
list[int]``, ``decode(ids) -> str``, ``vocab_size`` and the special ids
``pad_id, bos_id, eos_id, mask_id, cls_id, sep_id``. Models take integer ids
and a ``vocab_size``; swap the tokenizer without touching a model.

* ``ByteTokenizer``: the default. UTF-8 bytes are ids 0..255, the six
  specials follow (256..261), so ``vocab_size == 262``. Needs no file and
  round-trips any text.
* ``BPETokenizer``: byte-level BPE learned by ``BPETokenizer.learn(texts,
  vocab_size)`` (no dependency), saved and loaded as JSON. Ids 0..261 are
  ``ByteTokenizer``'s; merges follow, so any text still round-trips and every
  id has an exact byte length (bits per byte stay exact).
* ``SentencePieceTokenizer(model_file)``: a ``.model`` file (needs the
  ``sentencepiece`` package).
* ``HFTokenizer(tokenizer_json)``: a Hugging Face ``tokenizer.json`` file
  (needs the ``tokenizers`` package).

Both adapters import their package lazily and raise an ``ImportError`` that
names the package to install.
"""

from __future__ import annotations

import collections
import heapq
import importlib
import json
import re
from typing import Iterable, Optional, Protocol, Sequence, Union, runtime_checkable

import numpy as np

SPECIALS = ("pad", "bos", "eos", "mask", "cls", "sep")


@runtime_checkable
class Tokenizer(Protocol):
  """What Datong needs from a tokenizer."""
  vocab_size: int
  pad_id: int
  bos_id: int
  eos_id: int
  mask_id: int
  cls_id: int
  sep_id: int

  def encode(self, text: str) -> list[int]:
    ...

  def decode(self, ids: Iterable[int]) -> str:
    ...


def check_ids(ids: Iterable[int], vocab_size: int, tokenizer) -> list[int]:
  """``ids`` as ints, each in ``[0, vocab_size)``; else a ValueError naming them
  (a model with a larger vocabulary than its tokenizer, or a wrong id)."""
  ids = [int(i) for i in ids]
  bad = [i for i in ids if not 0 <= i < vocab_size]
  if bad:
    raise ValueError(f"{tokenizer!r}.decode: ids {sorted(set(bad))[:8]} are outside its "
                     f"vocabulary [0, {vocab_size}); the ids come from a model or table with "
                     "another vocabulary (slice logits to tokenizer.vocab_size before sampling).")
  return ids


def special_ids(tokenizer) -> tuple[int, ...]:
  """The distinct special ids of ``tokenizer``, sorted (never masked or sampled)."""
  return tuple(sorted({int(getattr(tokenizer, f"{s}_id")) for s in SPECIALS}))


class ByteTokenizer:
  """UTF-8 bytes as ids 0..255; specials pad, bos, eos, mask, cls, sep at 256..261.

  ``decode`` drops special ids and decodes with ``errors="replace"`` (a model
  may emit bytes that are not valid UTF-8); an id outside the vocabulary is an
  error (``check_ids``).
  """
  num_bytes = 256
  pad_id, bos_id, eos_id, mask_id, cls_id, sep_id = range(256, 262)
  vocab_size = 262

  def encode(self, text: str) -> list[int]:
    return list(text.encode("utf-8"))

  def encode_bytes(self, data: bytes) -> list[int]:
    """Already-encoded text (e.g. a tfds ``Text`` feature) to ids."""
    return list(data)

  def decode(self, ids: Iterable[int]) -> str:
    ids = check_ids(ids, self.vocab_size, self)
    return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

  def __repr__(self):
    return "ByteTokenizer()"


# Pre-tokenization: merges never cross these pieces (a word with its leading
# space, a number, a run of punctuation or of whitespace), as in GPT-2.
_PIECES = re.compile(rb" ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+")


class BPETokenizer:
  """Byte-level byte-pair encoding; ids 0..261 as ``ByteTokenizer``, merges after.

  ``merges[k] = (a, b)`` makes id ``262 + k`` from the adjacent ids ``a, b``;
  encoding applies merges in the order they were learned, within each
  pre-token piece. ``learn`` is deterministic (ties go to the smaller pair).
  """
  pad_id, bos_id, eos_id, mask_id, cls_id, sep_id = range(256, 262)
  FORMAT = "datong-bpe-v1"

  def __init__(self, merges: Sequence[tuple[int, int]]):
    base = ByteTokenizer.vocab_size
    self.merges = [(int(a), int(b)) for a, b in merges]
    self.vocab_size = base + len(self.merges)
    self.token_bytes = [bytes([i]) for i in range(256)] + [b""] * (base - 256)
    for k, (a, b) in enumerate(self.merges):
      if not (0 <= a < base + k and 0 <= b < base + k) or 256 <= a < base or 256 <= b < base:
        raise ValueError(f"BPETokenizer: merge {k} = ({a}, {b}) refers to an id that is a "
                         f"special or not yet defined; the merges list is corrupt.")
      self.token_bytes.append(self.token_bytes[a] + self.token_bytes[b])
    self._rank = {pair: k for k, pair in enumerate(self.merges)}
    self._cache: dict[bytes, list[int]] = {}

  @classmethod
  def learn(cls, texts: Iterable[Union[str, bytes]], vocab_size: int) -> "BPETokenizer":
    """Learn ``vocab_size - 262`` merges from ``texts`` (fewer if pairs run out)."""
    num_merges = vocab_size - ByteTokenizer.vocab_size
    if num_merges < 0:
      raise ValueError(f"BPETokenizer.learn: vocab_size={vocab_size} < "
                       f"{ByteTokenizer.vocab_size} (bytes + specials).")
    counts = collections.Counter()
    for text in texts:
      counts.update(_PIECES.findall(text.encode("utf-8") if isinstance(text, str) else text))
    words = [list(w) for w in counts]
    freqs = list(counts.values())
    pair_count = collections.Counter()
    where = collections.defaultdict(set)  # pair -> indices of words holding it
    for i, w in enumerate(words):
      for pair in zip(w, w[1:]):
        pair_count[pair] += freqs[i]
        where[pair].add(i)
    heap = [(-c, pair) for pair, c in pair_count.items()]
    heapq.heapify(heap)
    merges = []
    while len(merges) < num_merges and heap:
      neg, pair = heapq.heappop(heap)
      if pair_count.get(pair, 0) != -neg:
        continue  # stale entry: the count changed after it was pushed
      if -neg < 2:
        break  # a pair seen once compresses nothing
      new_id = ByteTokenizer.vocab_size + len(merges)
      merges.append(pair)
      changed = set()
      for i in where.pop(pair):
        w, f = words[i], freqs[i]
        for p in zip(w, w[1:]):
          pair_count[p] -= f
          changed.add(p)
        w = _merge_pair(w, pair, new_id)
        words[i] = w
        for p in zip(w, w[1:]):
          pair_count[p] += f
          where[p].add(i)
          changed.add(p)
      del pair_count[pair]
      for p in changed:
        if p != pair and pair_count[p] > 0:
          heapq.heappush(heap, (-pair_count[p], p))
    return cls(merges)

  def _encode_piece(self, piece: bytes) -> list[int]:
    ids = self._cache.get(piece)
    if ids is None:
      ids = list(piece)
      while len(ids) > 1:
        ranks = [self._rank.get(p, len(self.merges)) for p in zip(ids, ids[1:])]
        best = min(ranks)
        if best == len(self.merges):
          break
        ids = _merge_pair(ids, self.merges[best], ByteTokenizer.vocab_size + best)
      self._cache[piece] = ids
    return ids

  def encode_bytes(self, data: bytes) -> list[int]:
    return [i for piece in _PIECES.findall(data) for i in self._encode_piece(piece)]

  def encode(self, text: str) -> list[int]:
    return self.encode_bytes(text.encode("utf-8"))

  def decode(self, ids: Iterable[int]) -> str:
    ids = check_ids(ids, self.vocab_size, self)
    return b"".join(self.token_bytes[i] for i in ids).decode("utf-8", errors="replace")

  def save(self, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
      json.dump({"format": self.FORMAT, "merges": self.merges}, f)

  @classmethod
  def load(cls, path: str) -> "BPETokenizer":
    try:
      with open(path, encoding="utf-8") as f:
        state = json.load(f)
    except (OSError, ValueError) as e:
      raise ValueError(f"BPETokenizer.load({path!r}): not a readable JSON file ({e}); "
                       f"write one with BPETokenizer.save.") from e
    if not isinstance(state, dict) or state.get("format") != cls.FORMAT:
      raise ValueError(f"BPETokenizer.load({path!r}): not a {cls.FORMAT} file; "
                       f"write one with BPETokenizer.save.")
    merges = state.get("merges")
    if not isinstance(merges, list) or not all(
        isinstance(m, (list, tuple)) and len(m) == 2 for m in merges):
      raise ValueError(f"BPETokenizer.load({path!r}): the file has no valid 'merges' list "
                       "(pairs of ids); it is truncated or not written by BPETokenizer.save.")
    return cls([tuple(m) for m in merges])

  def __repr__(self):
    return f"BPETokenizer(vocab_size={self.vocab_size})"


def _merge_pair(ids: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
  """Replace every non-overlapping occurrence of ``pair`` in ``ids``, left to right."""
  out, i, n = [], 0, len(ids)
  while i < n:
    if i + 1 < n and ids[i] == pair[0] and ids[i + 1] == pair[1]:
      out.append(new_id)
      i += 2
    else:
      out.append(ids[i])
      i += 1
  return out


def _require(package: str, pip_name: str, what: str):
  try:
    return importlib.import_module(package)
  except ImportError as e:
    raise ImportError(f"{what} needs the `{pip_name}` package: `pip install {pip_name}`.") from e


class SentencePieceTokenizer:
  """Adapter for a sentencepiece ``.model`` file.

  Missing specials (sentencepiece models often lack mask/cls/sep) fall back:
  ``cls -> bos``, ``sep -> eos``, ``mask`` -> the piece given by
  ``mask_piece`` if present, else the unknown id; ``pad`` -> the model's pad
  id, else the unknown id.
  """

  def __init__(self, model_file: str, *, mask_piece: str = "[MASK]"):
    spm = _require("sentencepiece", "sentencepiece", "SentencePieceTokenizer")
    self._sp = spm.SentencePieceProcessor(model_file=str(model_file))
    self.vocab_size = int(self._sp.get_piece_size())
    unk = int(self._sp.unk_id())

    def valid(i):
      return i is not None and 0 <= int(i) < self.vocab_size

    self.bos_id = int(self._sp.bos_id()) if valid(self._sp.bos_id()) else unk
    self.eos_id = int(self._sp.eos_id()) if valid(self._sp.eos_id()) else unk
    self.pad_id = int(self._sp.pad_id()) if valid(self._sp.pad_id()) else unk
    mask = self._sp.piece_to_id(mask_piece)
    self.mask_id = int(mask) if mask != unk else unk
    self.cls_id, self.sep_id = self.bos_id, self.eos_id

  def encode(self, text: str) -> list[int]:
    return list(self._sp.encode(text))

  def decode(self, ids: Iterable[int]) -> str:
    return self._sp.decode([int(i) for i in ids])


class HFTokenizer:
  """Adapter for a Hugging Face ``tokenizers`` JSON file (``tokenizer.json``).

  Special ids are looked up by the first token string of each list found in
  the vocabulary (``[PAD]``/``<pad>``, ``[CLS]``/``<s>``, ...); pass
  ``specials={"pad": "<mypad>", ...}`` to override. A missing one is an error.
  ``encode`` adds no special tokens (packing adds them).
  """
  _CANDIDATES = {
      "pad": ("[PAD]", "<pad>", "<|pad|>", "<|endoftext|>"),
      "bos": ("<s>", "[BOS]", "<|startoftext|>", "[CLS]", "<|endoftext|>"),
      "eos": ("</s>", "[EOS]", "<|endoftext|>", "[SEP]"),
      "mask": ("[MASK]", "<mask>", "<|mask|>"),
      "cls": ("[CLS]", "<s>", "<cls>", "<|endoftext|>"),
      "sep": ("[SEP]", "</s>", "<sep>", "<|endoftext|>"),
  }

  def __init__(self, tokenizer_json: str, *, specials: Optional[dict[str, str]] = None):
    tk = _require("tokenizers", "tokenizers", "HFTokenizer")
    self._tok = tk.Tokenizer.from_file(str(tokenizer_json))
    self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
    specials = dict(specials or {})
    for name in SPECIALS:
      candidates: Sequence[str] = (specials[name],) if name in specials else self._CANDIDATES[name]
      found = [self._tok.token_to_id(c) for c in candidates]
      found = [i for i in found if i is not None]
      if not found:
        raise ValueError(f"HFTokenizer: no {name} token in {tokenizer_json} (tried {list(candidates)}); "
                         f"pass specials={{'{name}': '<token>'}}.")
      setattr(self, f"{name}_id", int(found[0]))

  def encode(self, text: str) -> list[int]:
    return list(self._tok.encode(text, add_special_tokens=False).ids)

  def decode(self, ids: Iterable[int]) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)


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

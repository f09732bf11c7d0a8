"""Tokenizers: text <-> integer ids. Models never see these classes.

Every tokenizer follows the ``Tokenizer`` protocol: ``encode(text) ->
list[int]``, ``decode(ids) -> str``, ``vocab_size`` and the special ids
``pad_id, bos_id, eos_id, mask_id, cls_id, sep_id``. Models take integer ids
and a ``vocab_size``; swap the tokenizer without touching a model.

* ``ByteTokenizer``: the default. UTF-8 bytes are ids 0..255, the six
  specials follow (256..261), so ``vocab_size == 262``. Needs no file and
  round-trips any text.
* ``SentencePieceTokenizer(model_file)``: a ``.model`` file (needs the
  ``sentencepiece`` package).
* ``HFTokenizer(tokenizer_json)``: a Hugging Face ``tokenizer.json`` file
  (needs the ``tokenizers`` package).

Both adapters import their package lazily and raise an ``ImportError`` that
names the package to install.
"""

from __future__ import annotations

import importlib
from typing import Iterable, Optional, Protocol, Sequence, runtime_checkable

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


def special_ids(tokenizer) -> tuple[int, ...]:
  """The distinct special ids of ``tokenizer``, sorted (never masked or sampled)."""
  return tuple(sorted({int(getattr(tokenizer, f"{s}_id")) for s in SPECIALS}))


class ByteTokenizer:
  """UTF-8 bytes as ids 0..255; specials pad, bos, eos, mask, cls, sep at 256..261.

  ``decode`` drops special ids and decodes with ``errors="replace"`` (a model
  may emit bytes that are not valid UTF-8).
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
    return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

  def __repr__(self):
    return "ByteTokenizer()"


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

"""Hub ids -> local directories, and the tokenizer stored next to the weights.

``resolve("org/name", revision="main")`` finds the model in
``huggingface_hub``'s local cache first (``HF_HUB_CACHE``: ``models--org--name
/refs/<revision>`` names a commit, ``snapshots/<commit>/`` holds the files)
and downloads only when the cache lacks it and the hub may be reached
(``HF_HUB_OFFLINE`` unset and ``local_files_only`` False). A local directory
is returned as it is.
"""

from __future__ import annotations

import json
import os
from typing import Optional

from datong.hf.common import UnsupportedError
from datong.unimodal.tokenizers import SPECIALS, HFTokenizer, SentencePieceTokenizer

# What a Datong load needs from a repository (not pickles, not other formats).
WEIGHT_FILES = ["config.json", "*.safetensors", "model.safetensors.index.json"]
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "*.model"]
_SENTENCEPIECE = ("tokenizer.model", "spiece.model", "sentencepiece.bpe.model")


def _offline() -> bool:
  """``HF_HUB_OFFLINE`` read now (huggingface_hub reads it once, at import)."""
  value = os.environ.get("HF_HUB_OFFLINE")
  if value is not None:
    return value.strip().upper() in ("1", "ON", "YES", "TRUE")
  from huggingface_hub import constants
  return bool(constants.HF_HUB_OFFLINE)


def _has(folder: str, need) -> bool:
  """Every entry of ``need`` matches a file (an entry may be a tuple of alternatives)."""
  import fnmatch
  names = os.listdir(folder)
  return all(any(fnmatch.fnmatch(n, p) for n in names for p in
                 ((alt,) if isinstance(alt, str) else alt)) for alt in need)


def resolve(path_or_id: str, *, revision: Optional[str] = None, cache_dir: Optional[str] = None,
            local_files_only: bool = False, files=WEIGHT_FILES, need=("config.json",)) -> str:
  """A local directory holding ``path_or_id``'s files (``files``: patterns to fetch).

  A directory is returned unchanged. Otherwise ``path_or_id`` is a hub id,
  looked up in the cache (``cache_dir``, default ``HF_HUB_CACHE``) at
  ``revision`` (a branch, tag or commit; default ``main``); a cached snapshot
  that holds every ``need`` pattern is used without any network access.
  """
  if os.path.isdir(path_or_id):
    return path_or_id
  if os.path.sep in path_or_id.strip("/").replace("/", "", 1) or path_or_id.startswith((".", "/")):
    raise FileNotFoundError(f"{path_or_id}: no such directory (and not a hub id 'org/name').")
  try:
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError
  except ImportError as e:
    raise ImportError(f"{path_or_id!r} is not a local directory; loading a hub id needs the "
                      "`huggingface_hub` package: `pip install huggingface_hub`.") from e
  cache_dir = cache_dir or os.environ.get("HF_HUB_CACHE")
  kw = dict(revision=revision, cache_dir=cache_dir, allow_patterns=list(files))
  try:
    folder = huggingface_hub.snapshot_download(path_or_id, local_files_only=True, **kw)
    if _has(folder, need):
      return folder
  except LocalEntryNotFoundError:
    folder = None
  if local_files_only or _offline():
    where = cache_dir or "the default HF_HUB_CACHE"
    what = (f"its cached snapshot {folder} lacks {list(need)}" if folder
            else f"revision {revision or 'main'} is not in {where}")
    raise FileNotFoundError(
        f"{path_or_id}: {what}, and downloads are off (HF_HUB_OFFLINE=1 or "
        "local_files_only=True). Download it once while online (`huggingface-cli download "
        f"{path_or_id}`) or pass a local directory.")
  return huggingface_hub.snapshot_download(path_or_id, **kw)


def _special_tokens(folder: str) -> dict[str, str]:
  """Datong special name -> token string, from ``tokenizer_config.json`` and
  ``special_tokens_map.json`` (the later file wins, as in transformers)."""
  found: dict[str, str] = {}
  for name in ("tokenizer_config.json", "special_tokens_map.json"):
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
      continue
    with open(path, encoding="utf-8") as f:
      config = json.load(f)
    for special in SPECIALS:
      value = config.get(f"{special}_token")
      if isinstance(value, dict):  # AddedToken serialized: {"content": ...}
        value = value.get("content")
      if isinstance(value, str):
        found[special] = value
  return found


def load_tokenizer(path_or_id: str, *, revision: Optional[str] = None,
                   cache_dir: Optional[str] = None, local_files_only: bool = False):
  """The Datong tokenizer stored with a model (a directory or a hub id).

  ``tokenizer.json`` -> ``HFTokenizer`` with the special tokens the
  directory's ``tokenizer_config.json`` / ``special_tokens_map.json`` name
  (names they leave out: ``HFTokenizer``'s usual candidates, then the
  first named special, so a GPT-2 tokenizer's ``mask_id`` is its
  ``<|endoftext|>``). Without it, a sentencepiece model file
  (``tokenizer.model``, ``spiece.model``) -> ``SentencePieceTokenizer``.
  ``encode`` adds no special tokens (HF's ``add_special_tokens=False``).
  """
  folder = resolve(path_or_id, revision=revision, cache_dir=cache_dir,
                   local_files_only=local_files_only, files=TOKENIZER_FILES,
                   need=(("tokenizer.json",) + _SENTENCEPIECE,))
  names = set(os.listdir(folder))
  if "tokenizer.json" in names:
    named = _special_tokens(folder)
    path = os.path.join(folder, "tokenizer.json")
    return _hf_tokenizer(path, named)
  for name in _SENTENCEPIECE:
    if name in names:
      return SentencePieceTokenizer(os.path.join(folder, name))
  raise UnsupportedError(f"{folder}: no tokenizer.json or sentencepiece model "
                         f"({', '.join(_SENTENCEPIECE)}); Datong reads those two formats.")


def _hf_tokenizer(path: str, named: dict[str, str]) -> HFTokenizer:
  """``HFTokenizer`` with ``named`` specials; a special neither named nor among
  ``HFTokenizer``'s candidates falls back to the first named one."""
  from tokenizers import Tokenizer
  vocab = Tokenizer.from_file(path)
  specials = dict(named)
  fallback = next((named[s] for s in SPECIALS if s in named), None)
  for special in SPECIALS:
    if special in specials:
      continue
    if any(vocab.token_to_id(c) is not None for c in HFTokenizer._CANDIDATES[special]):
      continue
    if fallback is not None:
      specials[special] = fallback
  return HFTokenizer(path, specials=specials)

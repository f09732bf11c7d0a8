"""Hub ids through huggingface_hub's local cache, and tokenizers next to weights.

The tests build an ``HF_HUB_CACHE`` directory by hand (``models--org--name/
refs/<revision>`` holding a commit hash, ``snapshots/<commit>/`` the files),
set ``HF_HUB_OFFLINE=1`` and make every socket connection fail, so nothing
can reach the network.
"""

import json
import socket

import jax
import numpy as np
import pytest

from datong import hf
from test_hf import _tiny_gpt

COMMITS = {"main": "a" * 40, "v1": "b" * 40}


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
  pytest.importorskip("huggingface_hub")
  cache = tmp_path / "hub"

  def no_network(*args, **kwargs):
    raise AssertionError("a test tried to reach the network")

  monkeypatch.setattr(socket.socket, "connect", no_network)
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.setenv("HF_HUB_CACHE", str(cache))
  return cache


def _snapshot(cache, repo, revision):
  """The snapshot folder of ``repo`` at ``revision`` (its ref written)."""
  root = cache / f"models--{repo.replace('/', '--')}"
  (root / "refs").mkdir(parents=True, exist_ok=True)
  (root / "refs" / revision).write_text(COMMITS[revision])
  folder = root / "snapshots" / COMMITS[revision]
  folder.mkdir(parents=True, exist_ok=True)
  return folder


def test_hub_id_loads_from_the_local_cache_at_each_revision(offline_cache):
  model, params = _tiny_gpt()
  hf.save(model, params, str(_snapshot(offline_cache, "org/tiny-gpt2", "main")))
  bumped = jax.tree.map(lambda x: x + 1.0, params)
  hf.save(model, bumped, str(_snapshot(offline_cache, "org/tiny-gpt2", "v1")))
  _, main = hf.load("org/tiny-gpt2")
  _, v1 = hf.load("org/tiny-gpt2", revision="v1")
  _, by_commit = hf.load("org/tiny-gpt2", revision=COMMITS["v1"])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), main, params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), v1, bumped)
  jax.tree.map(np.testing.assert_array_equal, by_commit, v1)


def test_uncached_hub_id_offline_is_a_clear_error(offline_cache):
  with pytest.raises(FileNotFoundError, match=r"org/missing.*not in .*HF_HUB_OFFLINE=1"):
    hf.load("org/missing")
  _snapshot(offline_cache, "org/tiny-gpt2", "main")  # a snapshot without the weights' config
  with pytest.raises(FileNotFoundError, match=r"lacks \['config.json'\]"):
    hf.load("org/tiny-gpt2")
  with pytest.raises(FileNotFoundError, match="no such directory"):
    hf.load("./not/a/dir")


def _tiny_tokenizer(folder, kind):
  """A WordPiece (BERT-like) or byte-level BPE (GPT-2-like) tokenizer built
  locally, saved with transformers' ``save_pretrained`` (tokenizer.json and
  its config files)."""
  tokenizers = pytest.importorskip("tokenizers")
  transformers = pytest.importorskip("transformers")
  text = ["the quick brown fox jumps over the lazy dog", "a tokenizer built here, offline",
          "padding and masks, left and right"] * 20
  if kind == "wordpiece":
    tok = tokenizers.Tokenizer(tokenizers.models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = tokenizers.normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = tokenizers.pre_tokenizers.BertPreTokenizer()
    tok.decoder = tokenizers.decoders.WordPiece()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator(text, tokenizers.trainers.WordPieceTrainer(
        vocab_size=120, special_tokens=specials))
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]")
  else:
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    tok.train_from_iterator(text, tokenizers.trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()))
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
        unk_token="<|endoftext|>")
  fast.save_pretrained(str(folder))
  return transformers.AutoTokenizer.from_pretrained(str(folder))


@pytest.mark.parametrize("kind", ["wordpiece", "bpe"])
def test_load_tokenizer_matches_transformers(offline_cache, kind):
  folder = _snapshot(offline_cache, f"org/tiny-{kind}", "main")
  ref = _tiny_tokenizer(folder, kind)
  assert (folder / "tokenizer.json").is_file()
  ours = hf.load_tokenizer(f"org/tiny-{kind}")
  assert hf.load_tokenizer(str(folder)).vocab_size == ours.vocab_size == len(ref)
  for text in ["The quick brown fox, offline.", "masks left and right", "zebra unseen words!"]:
    ids = ours.encode(text)
    assert ids == ref(text, add_special_tokens=False)["input_ids"]
    assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True)
  for name in ("pad", "bos", "eos", "mask", "cls", "sep"):
    want = getattr(ref, f"{name}_token_id")
    if want is not None:
      assert getattr(ours, f"{name}_id") == want, name
  if kind == "bpe":  # GPT-2 style: one special stands for all (no [MASK] in the vocab)
    assert ours.mask_id == ours.pad_id == ref.eos_token_id


def test_load_tokenizer_without_tokenizer_files_is_named(offline_cache, tmp_path):
  (tmp_path / "empty").mkdir()
  (tmp_path / "empty" / "config.json").write_text(json.dumps({}))
  with pytest.raises(hf.UnsupportedError, match="no tokenizer.json or sentencepiece"):
    hf.load_tokenizer(str(tmp_path / "empty"))


def test_load_tokenizer_reads_a_sentencepiece_model(offline_cache):
  spm = pytest.importorskip("sentencepiece", reason="pip install sentencepiece")
  folder = _snapshot(offline_cache, "org/tiny-spm", "main")
  corpus = folder.parent.parent / "corpus.txt"
  corpus.write_text("\n".join(["the quick brown fox jumps over the lazy dog",
                               "pack my box with five dozen liquor jugs"] * 40))
  spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(folder / "spiece"),
                                 vocab_size=32)
  (folder / "spiece.vocab").unlink()
  ours = hf.load_tokenizer("org/tiny-spm")  # no tokenizer.json: the sentencepiece model
  ref = spm.SentencePieceProcessor(model_file=str(folder / "spiece.model"))
  assert ours.vocab_size == ref.get_piece_size() == 32
  for text in ["the lazy fox", "five dozen jugs, quick!"]:
    assert ours.encode(text) == ref.encode(text)
    assert ours.decode(ours.encode(text)) == ref.decode(ref.encode(text))

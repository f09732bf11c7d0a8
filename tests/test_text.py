"""Text: tokenizers, packing, GPT, generation, BERT masking, fine-tuning, tasks."""

import dataclasses
import importlib.util
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from pydoc_data.topics import topics

from datong.backbone import TransformerConfig
from datong.train.datasets import pydoc_split_titles
from datong.train import warmstart
from datong.train.tasks import text as text_tasks
from datong.unimodal import generation, text
from datong.unimodal.text import BERT, GPT, SequenceClassifier, TextConfig, TokenEmbedding
from datong.unimodal.tokenizers import (BPETokenizer, ByteTokenizer, HFTokenizer,
                                        SentencePieceTokenizer, special_ids, token_byte_lengths)

TOK = ByteTokenizer()


def _cfg(**kw):
  backbone = TransformerConfig.preset("tiny", width=32, depth=2, heads=4, mlp_dim=64)
  return TextConfig(backbone=backbone, **kw)


def _ids(shape, seed=0, high=256):
  return jnp.asarray(np.random.default_rng(seed).integers(0, high, shape), jnp.int32)


def _init(model, ids, **kw):
  # Jitted: eager (op-by-op) flax is slow on a shared CPU.
  init = jax.jit(lambda rng, ids, kw: model.init(rng, ids, **kw))
  return nn.unbox(init(jax.random.PRNGKey(0), ids, kw))["params"]


# ---------------------------------------------------------------- tokenizers

def test_byte_tokenizer_round_trips_any_utf8_text():
  rng = np.random.default_rng(0)
  pieces = ["", "a", "héllo wörld", "日本語のテキスト", "emoji 🐍🎉", "\x00\n\t", "Ω≈ç√∫"]
  for _ in range(200):
    # Random code points from every plane, skipping surrogates (not UTF-8).
    cps = rng.integers(0, 0x10FFFF, rng.integers(0, 40))
    pieces.append("".join(chr(c) for c in cps if not 0xD800 <= c < 0xE000))
  for s in pieces:
    ids = TOK.encode(s)
    assert all(0 <= i < 256 for i in ids)
    assert TOK.decode(ids) == s
    assert TOK.decode([TOK.bos_id] + ids + [TOK.eos_id, TOK.pad_id]) == s  # specials dropped
  assert TOK.vocab_size == 262 and len(set(special_ids(TOK))) == 6
  assert min(special_ids(TOK)) == 256


def _bpe_corpus():
  return [topics[t] for t in pydoc_split_titles()["train"][:20]]


def test_bpe_learns_deterministic_merges_that_round_trip_any_bytes(tmp_path):
  tok = BPETokenizer.learn(_bpe_corpus(), 600)
  assert tok.vocab_size == 600 and tok.merges == BPETokenizer.learn(_bpe_corpus(), 600).merges
  # Every merged id is the concatenation of its parts; specials stay specials.
  for k, (a, b) in enumerate(tok.merges):
    assert tok.token_bytes[262 + k] == tok.token_bytes[a] + tok.token_bytes[b]
  assert special_ids(tok) == special_ids(ByteTokenizer())
  held = "".join(topics[t] for t in pydoc_split_titles()["validation"])
  ids = tok.encode(held)
  assert tok.decode(ids) == held and len(ids) < len(held.encode()) / 2  # it compresses
  assert max(ids) >= 262 and not set(ids) & set(special_ids(tok))
  rng = np.random.default_rng(0)
  for _ in range(100):  # arbitrary bytes (invalid UTF-8 included) survive exactly
    data = rng.integers(0, 256, rng.integers(0, 60)).astype(np.uint8).tobytes() + b" the return"
    assert b"".join(tok.token_bytes[i] for i in tok.encode_bytes(data)) == data
  # Exact bytes per id: bits per byte divide by the true UTF-8 length.
  assert token_byte_lengths(tok)[ids].sum() == len(held.encode())
  tok.save(str(tmp_path / "bpe.json"))
  assert BPETokenizer.load(str(tmp_path / "bpe.json")).encode(held) == ids
  (tmp_path / "bad.json").write_text('{"format": "datong-bpe-v1", "merges": [[300, 1]]}')
  with pytest.raises(ValueError, match="corrupt"):
    BPETokenizer.load(str(tmp_path / "bad.json"))
  (tmp_path / "junk.json").write_text("not json")
  with pytest.raises(ValueError, match="BPETokenizer.save"):
    BPETokenizer.load(str(tmp_path / "junk.json"))


def test_bpe_spec_learns_from_the_train_split_and_checks_the_model_vocab():
  tok = text_tasks.make_tokenizer("bpe:400", ("pydoc_text", "train", "text"))
  assert isinstance(tok, BPETokenizer) and tok.vocab_size == 400
  with pytest.raises(ValueError, match="no.*to learn from"):
    text_tasks.make_tokenizer("bpe:400")
  cfg = text_tasks.GPTTaskConfig(model=_cfg(vocab_size=300), tokenizer="bpe:400", seq_length=64,
                           eval_stride=32)
  with pytest.raises(ValueError, match="task.model.vocab_size=400"):
    cfg.build()
  # Sliding-window evaluation scores every held-out byte exactly once.
  rows = dataclasses.replace(cfg, model=_cfg(vocab_size=400)).build().source("validation").arrays
  held = "".join(topics[t] for t in pydoc_split_titles()["validation"]).encode("utf-8")
  assert np.sum(rows["byte_counts"] * rows["loss_weights"]) == len(held)
  with pytest.raises(ValueError, match="bpe:VOCAB_SIZE"):
    text_tasks.make_tokenizer("wordpiece")


def test_learned_bpe_is_cached_on_disk_for_later_processes(tmp_path, monkeypatch):
  monkeypatch.setenv("DATONG_DATA_DIR", str(tmp_path))
  text_tasks._learned_bpe.cache_clear()
  first = text_tasks.make_tokenizer("bpe:300", ("pydoc_text", "train", "text"))
  (cached,) = (tmp_path / "cache" / "bpe").glob("*-300.json")
  text_tasks._learned_bpe.cache_clear()  # as a new process

  def must_not_learn(*args):
    raise AssertionError("learned again despite the cache")
  monkeypatch.setattr(BPETokenizer, "learn", must_not_learn)
  assert text_tasks.make_tokenizer("bpe:300", ("pydoc_text", "train", "text")).merges == \
      first.merges
  cached.write_text("damaged")  # relearned, not an error
  monkeypatch.undo()
  monkeypatch.setenv("DATONG_DATA_DIR", str(tmp_path))
  text_tasks._learned_bpe.cache_clear()
  assert text_tasks.make_tokenizer("bpe:300", ("pydoc_text", "train", "text")).merges == \
      first.merges
  text_tasks._learned_bpe.cache_clear()


@pytest.mark.skipif(importlib.util.find_spec("sentencepiece") is None,
                    reason="sentencepiece not installed (pip install sentencepiece)")
def test_sentencepiece_adapter(tmp_path):
  import sentencepiece as spm  # pylint: disable=import-outside-toplevel
  corpus = tmp_path / "c.txt"
  corpus.write_text("\n".join(["the quick brown fox jumps over the lazy dog"] * 50))
  # 32 ids: sentencepiece 0.2 refuses more pieces than this corpus has.
  spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "m"),
                                 vocab_size=32, user_defined_symbols=["[MASK]"])
  tok = SentencePieceTokenizer(str(tmp_path / "m.model"))
  assert tok.decode(tok.encode("the lazy fox")) == "the lazy fox"
  assert tok.vocab_size == 32 and tok.mask_id != tok.pad_id


@pytest.mark.skipif(importlib.util.find_spec("tokenizers") is None,
                    reason="tokenizers not installed (pip install tokenizers)")
def test_hf_tokenizers_adapter(tmp_path):
  from tokenizers import Tokenizer, models, pre_tokenizers, trainers  # pylint: disable=import-outside-toplevel
  tk = Tokenizer(models.WordLevel(unk_token="[UNK]"))
  tk.pre_tokenizer = pre_tokenizers.Whitespace()
  specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "<s>", "</s>"]
  tk.train_from_iterator(["the quick brown fox"] * 5, trainers.WordLevelTrainer(special_tokens=specials))
  tk.save(str(tmp_path / "tokenizer.json"))
  tok = HFTokenizer(str(tmp_path / "tokenizer.json"))
  ids = tok.encode("the quick fox")
  assert len(ids) == 3 and tok.decode(ids) == "the quick fox"
  assert (tok.pad_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 2, 3, 4)


def test_adapters_name_the_missing_package(monkeypatch):
  for mod in ("sentencepiece", "tokenizers"):
    monkeypatch.setitem(sys.modules, mod, None)  # makes `import mod` fail
  with pytest.raises(ImportError, match="pip install sentencepiece"):
    SentencePieceTokenizer("x.model")
  with pytest.raises(ImportError, match="pip install tokenizers"):
    HFTokenizer("tokenizer.json")


# ------------------------------------------------------------------- packing

def test_pack_documents_rows_segments_and_positions():
  out = text_tasks.pack_documents([[1, 2, 3], [4, 5, 6, 7, 8], [9]], 4, pad_values=0)
  np.testing.assert_array_equal(out["ids"], [[1, 2, 3, 4], [5, 6, 7, 8], [9, 0, 0, 0]])
  np.testing.assert_array_equal(out["segment_ids"], [[1, 1, 1, 2], [1, 1, 1, 1], [1, 0, 0, 0]])
  np.testing.assert_array_equal(out["positions"], [[0, 1, 2, 0], [0, 1, 2, 3], [0, 0, 0, 0]])


@pytest.mark.parametrize("kind", ["gpt", "bert"])
def test_packed_segments_are_isolated(kind):
  """Changing one document never changes another document's logits."""
  cfg = _cfg(positions="learned", max_length=32) if kind == "bert" else _cfg()
  model = GPT(cfg) if kind == "gpt" else BERT(cfg)
  docs = [list(range(10, 17)), list(range(40, 45)), list(range(70, 79))]
  a = text_tasks.pack_documents(docs, 24)
  docs[1] = [200, 201, 202, 203, 204]
  b = text_tasks.pack_documents(docs, 24)
  params = _init(model, jnp.asarray(a["ids"]), segment_ids=jnp.asarray(a["segment_ids"]))

  forward = jax.jit(lambda ids, seg, pos: model.apply(
      {"params": params}, ids, segment_ids=seg, positions=pos)[0])

  def logits(p):
    return np.asarray(forward(p["ids"], p["segment_ids"], p["positions"]))

  la, lb = logits(a), logits(b)
  seg = a["segment_ids"]
  other = (seg != 2) & (seg > 0)
  np.testing.assert_allclose(la[other], lb[other], rtol=1e-5, atol=1e-5)
  assert not np.allclose(la[seg == 2], lb[seg == 2])
  # A document packed after others gives the same logits as alone.
  alone = text_tasks.pack_documents([docs[2]], 24)
  np.testing.assert_allclose(logits(alone)[alone["segment_ids"] > 0], lb[seg == 3],
                             rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------- GPT

def test_causal_loss_equals_hand_computation():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 3, 5)).astype(np.float32)
  targets = rng.integers(0, 5, (2, 3))
  weights = np.array([[1, 1, 0], [1, 0, 0]], np.float32)
  nbytes = np.array([[1, 0, 1], [1, 1, 1]], np.float32)
  loss, m = text.causal_lm_loss(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights),
                                z_loss=0.1, byte_counts=jnp.asarray(nbytes))
  nll, lse = [], []
  for b, t in [(0, 0), (0, 1), (1, 0)]:
    z = np.log(np.sum(np.exp(logits[b, t].astype(np.float64))))
    nll.append(z - logits[b, t, targets[b, t]])
    lse.append(z)
  expect_nll = np.mean(nll)
  np.testing.assert_allclose(m["nll"], expect_nll, rtol=1e-5)
  np.testing.assert_allclose(loss, expect_nll + 0.1 * np.mean(np.square(lse)), rtol=1e-5)
  np.testing.assert_allclose(m["perplexity"], np.exp(expect_nll), rtol=1e-5)
  # bits per byte: only targets (0,0) and (1,0) carry a byte.
  np.testing.assert_allclose(m["bits_per_byte"], (nll[0] + nll[2]) / 2 / np.log(2), rtol=1e-5)


def test_gpt_model_loss_matches_manual_shift():
  cfg = _cfg()
  model = GPT(cfg)
  ids = _ids((2, 9))
  params = _init(model, ids[:, :-1])
  logits, _ = jax.jit(model.apply)({"params": params}, ids[:, :-1])
  loss, _ = text.causal_lm_loss(logits, ids[:, 1:], jnp.ones((2, 8)))
  lp = np.asarray(jax.nn.log_softmax(logits))
  ids = np.asarray(ids)
  manual = -np.mean([lp[b, t, ids[b, t + 1]] for b in range(2) for t in range(8)])
  np.testing.assert_allclose(loss, manual, rtol=1e-5)


def test_tied_embedding_gradient_is_the_sum_of_both_uses():
  cfg = _cfg()
  tied, untied = GPT(cfg), GPT(cfg.replace(tie_embeddings=False))
  ids = _ids((2, 8))
  p_tied = _init(tied, ids)
  emb = p_tied["encoder"]["embed"]["embedding"]
  p_untied = {**p_tied, "head": {"kernel": emb.T}}
  assert set(jax.eval_shape(untied.init, jax.random.PRNGKey(0), ids)["params"]) == {"encoder", "head"}

  def loss(model, p):
    logits, _ = model.apply({"params": p}, ids[:, :-1])
    return text.causal_lm_loss(logits, ids[:, 1:], jnp.ones((2, 7)))[0]

  l_tied, g_tied = jax.jit(jax.value_and_grad(lambda p: loss(tied, p)))(p_tied)
  l_untied, g_untied = jax.jit(jax.value_and_grad(lambda p: loss(untied, p)))(p_untied)
  np.testing.assert_allclose(l_tied, l_untied, rtol=1e-6)
  g_in = g_untied["encoder"]["embed"]["embedding"]
  g_out = g_untied["head"]["kernel"].T
  assert np.abs(g_in).max() > 0 and np.abs(g_out).max() > 0
  np.testing.assert_allclose(g_tied["encoder"]["embed"]["embedding"], g_in + g_out,
                             rtol=1e-4, atol=1e-7)


def test_token_embedding_is_a_reusable_stem():
  emb = TokenEmbedding(vocab_size=20, width=8, max_length=6)
  ids = _ids((2, 5), high=20)
  p = emb.init(jax.random.PRNGKey(0), ids)
  x = emb.apply(p, ids)
  assert x.shape == (2, 5, 8)
  logits = emb.apply(p, x, method=TokenEmbedding.attend)
  assert logits.shape == (2, 5, 20)
  table = nn.unbox(p)["params"]["embedding"]
  np.testing.assert_allclose(logits, jnp.einsum("bld,vd->blv", x, table), rtol=1e-5)


# ---------------------------------------------------------------- generation

def _greedy_reference(model, params, prompt, steps, eos, length=16):
  """Greedy decoding by recomputing the whole (unpadded) sequence every step.

  The sequence sits in a fixed buffer so one compiled forward serves every
  step; with a causal model the tokens after ``len(seq)`` cannot matter.
  """
  forward = _full_forward(model)
  seq = list(prompt)
  out = []
  for _ in range(steps):
    buf = np.zeros((1, length), np.int32)
    buf[0, :len(seq)] = seq
    tok = int(jnp.argmax(forward(params, jnp.asarray(buf))[0, len(seq) - 1]))
    out.append(tok)
    if tok == eos:
      break
    seq.append(tok)
  return out


_FORWARDS = {}


def _full_forward(model):
  if model not in _FORWARDS:
    _FORWARDS[model] = jax.jit(lambda p, ids: model.apply({"params": p}, ids)[0])
  return _FORWARDS[model]


@pytest.mark.parametrize("positions", ["rope", "learned"])
def test_kv_cache_greedy_equals_full_recompute_with_padding(positions):
  cfg = _cfg(positions=positions, max_length=32, vocab_size=40)
  model = GPT(cfg)
  params = _init(model, _ids((1, 4), high=40))
  prompts = [[5, 9, 3, 7, 1], [11, 2], [30, 31, 32]]
  plen, steps = 5, 6
  eos = int(_greedy_reference(model, params, prompts[1], 3, None)[2])  # row 1 stops early
  refs = [_greedy_reference(model, params, p, steps, eos) for p in prompts]
  assert len(refs[1]) < steps
  for padding in ("left", "right"):
    ids = np.zeros((3, plen), np.int32)
    mask = np.zeros((3, plen), bool)
    for i, p in enumerate(prompts):
      sl = slice(plen - len(p), plen) if padding == "left" else slice(0, len(p))
      ids[i, sl], mask[i, sl] = p, True
    out = generation.generate(model, params, jnp.asarray(ids), jnp.asarray(mask),
                        max_new_tokens=steps, padding=padding, eos_id=eos, pad_id=0)
    for i, ref in enumerate(refs):
      got = np.asarray(out["tokens"][i])
      np.testing.assert_array_equal(got[:len(ref)], ref, err_msg=f"{padding} row {i}")
      assert (got[len(ref):] == 0).all()
      assert int(out["lengths"][i]) == len(ref) - (ref[-1] == eos)


def test_sampling_respects_top_k_and_top_p():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 2000))
  keys = jax.random.PRNGKey(0)
  k2 = generation.sample_logits(keys, logits, temperature=1.0, top_k=2)
  assert set(np.unique(k2)) == {0, 1}
  p = generation.sample_logits(keys, logits, temperature=1.0, top_p=0.7)  # {0.5, 0.3} reach 0.7
  assert set(np.unique(p)) == {0, 1}
  assert abs(np.mean(np.asarray(p) == 0) - 0.5 / 0.8) < 0.05
  full = generation.sample_logits(keys, logits, temperature=1.0)
  assert set(np.unique(full)) == {0, 1, 2, 3}
  np.testing.assert_array_equal(generation.sample_logits(keys, logits), 0)


def test_sampled_generation_is_jitted_and_deterministic():
  cfg = _cfg()
  model = GPT(cfg)
  params = _init(model, _ids((1, 4)))
  prompts = _ids((2, 4))
  kw = dict(max_new_tokens=5, temperature=0.8, top_k=20, top_p=0.9, pad_id=TOK.pad_id)
  a = generation.generate(model, params, prompts, rng=jax.random.PRNGKey(1), **kw)
  b = generation.generate(model, params, prompts, rng=jax.random.PRNGKey(1), **kw)
  np.testing.assert_array_equal(a["tokens"], b["tokens"])
  assert a["tokens"].shape == (2, 5)


# ---------------------------------------------------------------------- BERT

def test_mlm_masking_statistics_and_specials():
  ids = np.array(_ids((64, 512), seed=3))
  # Sprinkle specials (cls/sep/pad) that must never be selected.
  ids[:, 0], ids[:, 100], ids[:, -20:] = TOK.cls_id, TOK.sep_id, TOK.pad_id
  ids = jnp.asarray(ids)
  valid = ids != TOK.pad_id
  kw = dict(vocab_size=TOK.vocab_size, mask_id=TOK.mask_id, special_ids=special_ids(TOK))
  inputs, selected = text.mlm_mask(jax.random.PRNGKey(0), ids, valid=valid, **kw)
  inputs, selected, ids = map(np.asarray, (inputs, selected, ids))
  regular = ids < 256
  assert not selected[~regular].any()
  np.testing.assert_array_equal(inputs[~selected], ids[~selected])
  n = regular.sum()
  assert abs(selected.sum() / n - 0.15) < 0.005
  sel_in, sel_orig = inputs[selected], ids[selected]
  masked = sel_in == TOK.mask_id
  same = sel_in == sel_orig
  random = ~masked & ~same
  assert abs(masked.mean() - 0.8) < 0.015
  # "unchanged" also catches the 1/256 random draws that hit the original.
  assert abs(same.mean() - 0.1) < 0.01 and abs(random.mean() - 0.1) < 0.01
  assert (sel_in[random] < 256).all()  # random replacements are never specials
  # Deterministic given the rng; another rng gives another mask.
  again, sel2 = text.mlm_mask(jax.random.PRNGKey(0), jnp.asarray(ids), valid=valid, **kw)
  np.testing.assert_array_equal(again, inputs)
  _, sel3 = text.mlm_mask(jax.random.PRNGKey(1), jnp.asarray(ids), valid=valid, **kw)
  assert (np.asarray(sel3) != selected).any()


def test_random_replacements_skip_specials_anywhere_in_the_vocab():
  ids = jnp.full((8, 4000), 5, jnp.int32)
  out, sel = text.mlm_mask(jax.random.PRNGKey(0), ids, vocab_size=10, mask_id=0,
                           special_ids=(0, 1, 7), rate=0.9, mask_frac=0.0, random_frac=1.0)
  vals = set(np.unique(np.asarray(out)[np.asarray(sel)]))
  assert vals == {2, 3, 4, 5, 6, 8, 9}


def test_mlm_loss_only_on_selected_positions():
  logits = jax.random.normal(jax.random.PRNGKey(0), (2, 6, 10))
  targets = jnp.argmax(logits, -1).at[0, 0].set(0)
  selected = jnp.zeros((2, 6), bool).at[0, 1].set(True).at[1, 3].set(True)
  loss, m = text.mlm_loss(logits, targets, selected)
  changed = logits.at[0, 2].set(100.0)  # an unselected position
  np.testing.assert_allclose(text.mlm_loss(changed, targets, selected)[0], loss)
  assert float(m["mlm_accuracy"]) == 1.0 and float(m["mlm_tokens"]) == 2


def test_bert_nsp_head_and_pairs():
  cfg = _cfg(type_vocab_size=2, nsp=True)
  docs = [np.arange(40) % 250, np.arange(30) % 250 + 3, np.arange(50) % 250 + 7]
  rows = text_tasks.nsp_pairs(docs, 24, TOK, np.random.default_rng(0))
  assert rows["ids"].shape[1] == 24 and set(np.unique(rows["nsp_labels"])) <= {0, 1}
  assert (rows["ids"][:, 0] == TOK.cls_id).all()
  model = BERT(cfg)
  ids = jnp.asarray(rows["ids"])
  params = _init(model, ids)
  logits, aux = jax.jit(model.apply)({"params": params}, ids,
                                     segment_ids=jnp.asarray(rows["segment_ids"]),
                                     token_types=jnp.asarray(rows["token_types"]))
  assert logits.shape == ids.shape + (TOK.vocab_size,) and aux["nsp_logits"].shape == (len(ids), 2)


# ---------------------------------------------------------------- fine-tuning

def test_classifier_loads_pretrained_encoder_and_trains():
  cfg = _cfg()
  ids = _ids((8, 12))
  gpt_params = _init(GPT(cfg), ids)
  clf = SequenceClassifier(cfg, num_classes=2, pooling="last", causal=True)
  fresh = _init(clf, ids)
  params = nn.unbox(warmstart.merge(fresh, gpt_params, at="encoder"))
  np.testing.assert_array_equal(params["encoder"]["embed"]["embedding"],
                                gpt_params["encoder"]["embed"]["embedding"])
  # The classifier's encoder computes exactly the GPT's hidden states.
  _, gaux = jax.jit(GPT(cfg).apply)({"params": gpt_params}, ids)
  _, caux = jax.jit(clf.apply)({"params": params}, ids)
  np.testing.assert_allclose(caux["pooled"], gaux["hidden"][:, -1], rtol=1e-5, atol=1e-6)
  wrong = jax.tree.map(lambda x: x, gpt_params)
  wrong["encoder"]["embed"]["embedding"] = jnp.zeros((300, 32))
  with pytest.raises(ValueError, match="shape"):
    warmstart.merge(fresh, wrong, at="encoder")
  # A few SGD steps on a toy label (does the sequence contain an even first id).
  labels = (ids[:, 0] % 2 == 0).astype(jnp.int32)
  valid = jnp.ones_like(ids, bool).at[:4, 9:].set(False)

  def loss(p):
    logits, _ = clf.apply({"params": p}, ids, valid)
    return text.classification_loss(logits, labels)[0]

  first = jax.jit(loss)(params)
  step = jax.jit(lambda p: jax.tree.map(lambda a, g: a - 0.5 * g, p, jax.grad(loss)(p)))
  for _ in range(5):
    params = step(params)
  assert jax.jit(loss)(params) < first


# ---------------------------------------------------------------- the engine

def _run(task, tmp_path, steps=2):
  from datong.train import loop  # pylint: disable=import-outside-toplevel
  from datong.train.config import RunConfig, TrainConfig  # pylint: disable=import-outside-toplevel
  cfg = RunConfig(task=task, train=TrainConfig(steps=steps, batch_size=8, log_every=1,
                                               checkpoint_every=0))
  return loop.train(cfg, str(tmp_path), progress=False)


def test_gpt_trains_through_the_engine_on_pydoc(tmp_path):
  task = text_tasks.GPTTaskConfig(model=_cfg(), seq_length=64, eval_stride=0,
                            eval_batch_size=256)
  result = _run(task, tmp_path / "gpt")
  m = result.metrics
  assert result.step == 2 and np.isfinite(m["train/loss"])
  assert 5.0 < m["eval/bits_per_byte"] < 9.0  # untrained: ~log2(262) = 8.03
  held = pydoc_split_titles()["validation"]
  assert m["eval/bytes"] == len("".join(topics[t] for t in held).encode("utf-8"))
  # The checkpoint's encoder loads into a classifier.
  clf = SequenceClassifier(_cfg(), num_classes=3)
  params = warmstart.merge(_init(clf, _ids((1, 8))), str(tmp_path / "gpt"), at="encoder")
  assert params["classifier"]["kernel"].shape == (32, 3)


def test_bert_trains_through_the_engine_on_pydoc(tmp_path):
  task = text_tasks.BERTTaskConfig(model=_cfg(), seq_length=64, eval_batch_size=256)
  m = _run(task, tmp_path / "bert").metrics
  assert np.isfinite(m["train/loss"]) and 0.0 <= m["eval/mlm_accuracy"] <= 1.0
  assert 0.14 < m["eval/mlm_tokens"] / 32208 < 0.16  # 15% of held-out bytes


def test_recipes_build():
  from datong.train import recipes  # pylint: disable=import-outside-toplevel
  for name in ("gpt-pydoc", "bert-pydoc"):
    cfg = recipes.get(name)
    task = cfg.task.build()
    assert task.flops_per_example() > 0 and task.tokens_per_example() == cfg.task.seq_length

"""Single-stream fusion: the prefix-LM mask, packing, padding, cached captioning."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from datong.backbone import TransformerConfig
from datong.multimodal.fusion import FusionConfig, FusionModel, caption, next_token_loss
from datong.ops import masks

CFG = FusionConfig(TransformerConfig(width=32, depth=2, heads=4, mlp_dim=64), vocab_size=20,
                   max_text_length=8)
N = CFG.num_patches  # 16


def _setup(batch=3, seed=0):
  model = FusionModel(CFG)
  rs = np.random.RandomState(seed)
  images = jnp.asarray(rs.randn(batch, 8, 8, 1), jnp.float32)
  ids = jnp.asarray(rs.randint(0, 20, (batch, 8)), jnp.int32)
  params = nn.unbox(model.init(jax.random.PRNGKey(seed), images, ids)["params"])
  return model, params, images, ids


def test_fusion_mask_by_hand():
  seg = jnp.array([[1, 1, 1, 2, 2]])
  prefix = jnp.array([[True, False, False, True, False]])
  valid = jnp.array([[True, True, False, True, True]])
  got = np.asarray(masks.fusion_mask(seg, prefix, valid))[0, 0]
  want = np.array([[1, 0, 0, 0, 0],   # the prefix sees itself, not the later text
                   [1, 1, 0, 0, 0],
                   [1, 1, 0, 0, 0],   # a padded key is never seen
                   [0, 0, 0, 1, 0],
                   [0, 0, 0, 1, 1]], bool)
  np.testing.assert_array_equal(got, want)
  both = np.asarray(masks.fusion_mask(seg, prefix, valid, causal=False))[0, 0]
  np.testing.assert_array_equal(both, [[1, 1, 0, 0, 0]] * 3 + [[0, 0, 0, 1, 1]] * 2)


def test_a_later_text_token_never_changes_the_image_or_earlier_text():
  model, params, images, ids = _setup()
  out, _ = model.apply({"params": params}, images, ids)
  changed = ids.at[:, 5].set((ids[:, 5] + 1) % 20)
  out2, _ = model.apply({"params": params}, images, changed)
  np.testing.assert_allclose(out2["hidden"][:, :N + 5], out["hidden"][:, :N + 5], atol=1e-6)
  np.testing.assert_allclose(out2["text_logits"][:, :5], out["text_logits"][:, :5], atol=1e-5)
  assert not np.allclose(out2["text_logits"][:, 5:], out["text_logits"][:, 5:])
  # Bidirectional (masked modeling): the same change reaches the image positions.
  a, _ = model.apply({"params": params}, images, ids, text_causal=False)
  b, _ = model.apply({"params": params}, images, changed, text_causal=False)
  assert not np.allclose(a["hidden"][:, :N], b["hidden"][:, :N])


def test_padded_text_never_changes_the_rest_and_match_reads_the_last_real_token():
  model, params, images, ids = _setup()
  valid = jnp.arange(8)[None] < jnp.array([[8], [5], [3]])
  garbage = jnp.where(valid, ids, (ids * 7 + 3) % 20)
  for causal in (True, False):
    a, _ = model.apply({"params": params}, images, ids, valid, text_causal=causal)
    b, _ = model.apply({"params": params}, images, garbage, valid, text_causal=causal)
    real = jnp.concatenate([jnp.ones((3, N), bool), valid], 1)
    np.testing.assert_allclose(np.asarray(a["hidden"])[np.asarray(real)],
                               np.asarray(b["hidden"])[np.asarray(real)], atol=1e-5)
    np.testing.assert_allclose(a["match"], b["match"], atol=1e-5)


def test_packed_pairs_equal_each_pair_alone():
  model, params, images, ids = _setup(batch=4)
  valid = jnp.arange(8)[None] < jnp.array([[8], [6], [4], [7]])
  alone, _ = model.apply({"params": params}, images, ids, valid)
  packed, _ = model.apply({"params": params}, images.reshape(2, 2, 8, 8, 1), ids.reshape(2, 2, 8),
                          valid.reshape(2, 2, 8))
  for key in ("text_logits", "pixels", "match", "hidden"):
    np.testing.assert_allclose(packed[key].reshape(alone[key].shape), alone[key], atol=2e-5,
                               err_msg=key)


def test_cached_captioning_equals_recomputing_the_sequence_each_step():
  model, params, images, _ = _setup()
  prompt = jnp.full((3, 1), 19, jnp.int32)  # a BOS
  got = caption(model, params, images, prompt, max_new_tokens=6, eos_id=18)
  seq = prompt
  for _ in range(6):  # greedy, the whole (image, text) sequence each time
    t = seq.shape[1]
    padded = jnp.pad(seq, ((0, 0), (0, 8 - t)))
    out, _ = model.apply({"params": params}, images, padded,
                         jnp.broadcast_to(jnp.arange(8)[None] < t, (3, 8)))
    seq = jnp.concatenate([seq, jnp.argmax(out["text_logits"][:, t - 1], -1)[:, None]], 1)
  want = np.asarray(seq[:, 1:])
  tokens = np.asarray(got["tokens"])
  for row in range(3):
    stop = int(got["lengths"][row])
    np.testing.assert_array_equal(tokens[row, :stop], want[row, :stop])
    if stop < 6:  # the EOS, then padding
      assert tokens[row, stop] == 18 and want[row, stop] == 18 and (tokens[row, stop + 1:] == 0).all()
  with pytest.raises(ValueError, match="max_text_length"):
    caption(model, params, images, prompt, max_new_tokens=8, eos_id=18)


def test_next_token_loss_by_hand():
  logits = jnp.asarray(np.random.RandomState(0).randn(2, 4, 5), jnp.float32)
  ids = jnp.array([[1, 2, 3, 4], [0, 1, 2, 0]])
  valid = jnp.array([[1, 1, 1, 1], [1, 1, 1, 0]], bool)
  loss, _ = next_token_loss(logits, ids, valid)
  logp = jax.nn.log_softmax(logits, -1)
  terms = [-logp[0, 0, 2], -logp[0, 1, 3], -logp[0, 2, 4], -logp[1, 0, 1], -logp[1, 1, 2]]
  np.testing.assert_allclose(loss, np.mean(terms), rtol=1e-6)


def _task(**kw):
  from datong.train import recipes  # pylint: disable=import-outside-toplevel
  import dataclasses  # pylint: disable=import-outside-toplevel
  base = recipes.get("fusion-digits").task
  small = FusionConfig(TransformerConfig(width=32, depth=1, heads=2, mlp_dim=64),
                       vocab_size=512, max_text_length=24)
  return dataclasses.replace(base, model=small, **kw).build()


def test_hard_negatives_are_the_likeliest_captions_of_another_digit():
  task = _task(match_candidates=3)
  rs = np.random.RandomState(0)
  b = 6
  images = jnp.asarray(rs.randn(b, 8, 8, 1), jnp.float32)
  ids, valid = task.encode_texts([f"the number {i % 3}" for i in range(b)])
  labels = jnp.asarray([i % 3 for i in range(b)], jnp.int32)
  params = nn.unbox(task.init(jax.random.PRNGKey(0), None)["params"])
  neg, usable = task._negatives(params, images, jnp.asarray(ids), jnp.asarray(valid), labels,  # pylint: disable=protected-access
                                jax.random.PRNGKey(1))
  # The candidates the same rng draws; every pair's match log-odds by a direct call.
  cand = (np.arange(b)[:, None] + np.asarray(jax.random.randint(jax.random.PRNGKey(1), (b, 3),
                                                                1, b))) % b
  odds = np.zeros((b, b))
  for j in range(b):
    out, _ = task.model.apply({"params": params}, images, jnp.asarray(ids)[np.array([j] * b)],
                              jnp.asarray(valid)[np.array([j] * b)])
    odds[:, j] = np.asarray(out["match"][:, 1] - out["match"][:, 0])
  for i in range(b):
    others = [j for j in cand[i] if j % 3 != i % 3]
    assert bool(usable[i]) == bool(others)
    if others:
      assert int(neg[i]) in others and int(neg[i]) != i
      assert odds[i, int(neg[i])] == pytest.approx(max(odds[i, j] for j in others), abs=1e-5)


def test_names_digit():
  from datong.train.tasks.fusion import names_digit  # pylint: disable=import-outside-toplevel
  names = tuple((n, str(i)) for i, n in enumerate(("zero", "one", "two")))
  assert names_digit("a handwritten digit two", 2, names)
  assert names_digit("the number 1, written by hand", 1, names)
  assert not names_digit("a handwritten digit two", 1, names)
  assert not names_digit("one or two", 1, names)  # names another digit too
  assert not names_digit("someone wrote it", 1, names)  # "one" only inside a word


def test_fusion_recipe_trains_and_evaluates_end_to_end(tmp_path):
  from datong.train import config as config_lib, loop, recipes  # pylint: disable=import-outside-toplevel
  cfg = config_lib.override(recipes.get("fusion-digits"), {
      "train.steps": "3", "train.batch_size": "16", "train.log_every": "1",
      "task.model.backbone.depth": "1", "task.model.backbone.width": "32",
      "task.model.backbone.mlp_dim": "64", "mesh.data": "2", "mesh.fsdp": "2",
      "mesh.tensor": "2", "task.match_weight": "1", "task.masked_weight": "1"})
  result = loop.train(cfg, str(tmp_path), progress=False)
  m = result.metrics
  for key in ("eval/zero_shot_accuracy", "eval/match_zero_shot_accuracy", "eval/caption_accuracy"):
    assert 0.0 <= m[key] <= 1.0
  assert m["eval/caption_loss"] > 0 and np.isfinite(m["train/loss"])
  assert {"train/caption_loss", "train/match_loss", "train/masked_patch_loss",
          "train/masked_token_loss"} <= set(m)
  lines = open(tmp_path / "captions_step3.txt").read().splitlines()
  assert lines[0].startswith("label") and len(lines) == 17


def test_notebook_caption_decodes_the_cached_generation_and_refuses_other_models():
  import datong  # pylint: disable=import-outside-toplevel
  from datong.unimodal.tokenizers import ByteTokenizer  # pylint: disable=import-outside-toplevel
  model = datong.build("fusion", "tiny", image_size=8, patch_size=2, channels=1,
                       max_text_length=12)
  params = datong.init(model)
  images = np.random.RandomState(0).uniform(-1, 1, (2, 8, 8, 1)).astype(np.float32)
  texts = datong.caption(model, params, images, prompt="ab")
  tok = ByteTokenizer()
  prompt = jnp.asarray([[tok.bos_id, 97, 98]] * 2, jnp.int32)
  from datong.params import params_collection  # pylint: disable=import-outside-toplevel
  out = caption(model, nn.unbox(params_collection(params)), jnp.asarray(images), prompt,
                max_new_tokens=9, eos_id=tok.eos_id, pad_id=tok.pad_id, vocab_size=262)
  for i in range(2):
    n = int(out["lengths"][i])
    assert texts[i] == "ab" + tok.decode(np.asarray(out["tokens"][i, :n]))
  with pytest.raises(TypeError, match="FusionModel"):
    datong.caption(datong.build("gpt", "tiny"), params, images)
  with pytest.raises(ValueError, match="text positions"):
    datong.caption(model, params, images, prompt="x" * 11)

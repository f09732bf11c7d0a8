"""CoCa: CLIP's contrastive loss, causality, padding, cached captioning, the engine."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from datong.backbone import TransformerConfig
from datong.multimodal import coca as coca_lib
from datong.multimodal import contrastive
from datong.multimodal.clip import contrastive_loss
from datong.multimodal.coca import CoCa, CocaConfig, caption, coca_loss
from datong.multimodal.fusion import next_token_loss
from datong.unimodal.text import TextConfig
from datong.unimodal.vision import ViTConfig

T = 8


def _config(**kw):
  image = ViTConfig(TransformerConfig(width=32, depth=1, heads=2, mlp_dim=64), image_size=(8, 8),
                    patch_size=(4, 4), channels=1, pool="gap")
  text = TextConfig(backbone=TransformerConfig(width=24, depth=3, heads=2, mlp_dim=48),
                    vocab_size=20, positions=kw.pop("positions", "learned"), max_length=T)
  return CocaConfig(image=image, text=text, embed_dim=16, **kw)


def _setup(batch=3, seed=0, **kw):
  model = CoCa(_config(**kw))
  rs = np.random.RandomState(seed)
  images = jnp.asarray(rs.randn(batch, 8, 8, 1), jnp.float32)
  ids = jnp.asarray(rs.randint(0, 18, (batch, T)), jnp.int32)
  params = nn.unbox(model.init(jax.random.PRNGKey(seed), images, ids)["params"])
  return model, params, images, ids


@pytest.mark.parametrize("loss", ["softmax", "sigmoid"])
def test_contrastive_path_is_clips_loss_on_the_same_embeddings(loss):
  model, params, images, ids = _setup(batch=4, loss=loss)
  valid = jnp.arange(T)[None] < jnp.array([[8], [5], [3], [6]])
  out, _ = model.apply({"params": params}, images, ids, valid)
  total, metrics = coca_loss(model.config, out, ids, valid, contrastive_weight=0.5,
                             caption_weight=2.0)
  clip_cfg = dataclasses.replace(_clip_config(), loss=loss)
  want, _ = contrastive_loss(clip_cfg, out["image_emb"], out["text_emb"], out["scale"],
                             out["bias"])
  np.testing.assert_allclose(metrics["contrastive_loss"], want, rtol=1e-6)
  if loss == "softmax":  # and CLIP's loss is the plain symmetric InfoNCE
    plain, _ = contrastive.softmax_contrastive_loss(out["image_emb"], out["text_emb"],
                                                    out["scale"])
    np.testing.assert_allclose(want, plain, rtol=1e-6)
  cap, _ = next_token_loss(out["text_logits"], ids, valid)
  np.testing.assert_allclose(total, 0.5 * want + 2.0 * cap, rtol=1e-6)


def _clip_config():
  from datong.train.recipes.clip_digits import model as clip_model  # pylint: disable=import-outside-toplevel
  return clip_model()


@pytest.mark.parametrize("pool", ["cls", "eos"])
def test_a_later_token_never_changes_earlier_logits_or_the_unimodal_states(pool):
  model, params, images, ids = _setup(text_pool=pool)
  run = lambda i: model.apply({"params": params}, images, i)[0]
  uni = lambda i: model.apply({"params": params}, i, method="unimodal_text")
  changed = ids.at[:, 5].set((ids[:, 5] + 1) % 18)
  a, b = run(ids), run(changed)
  np.testing.assert_allclose(b["text_logits"][:, :5], a["text_logits"][:, :5], atol=1e-5)
  assert not np.allclose(b["text_logits"][:, 5:], a["text_logits"][:, 5:])
  (ea, ha, _), (eb, hb, _) = uni(ids), uni(changed)
  np.testing.assert_allclose(hb[:, :5], ha[:, :5], atol=1e-5)
  # The contrastive token ([CLS] after the caption, or the last real token)
  # sees the whole caption, so it does change; a text ending at 5 does not.
  assert not np.allclose(ea, eb)
  short = jnp.broadcast_to(jnp.arange(T) < 5, ids.shape)
  np.testing.assert_allclose(model.apply({"params": params}, ids, short, method="encode_text"),
                             model.apply({"params": params}, changed, short,
                                         method="encode_text"), atol=1e-5)


@pytest.mark.parametrize("pool,positions", [("cls", "learned"), ("eos", "learned"),
                                            ("cls", "rope")])
def test_padding_never_changes_real_positions_or_the_embeddings(pool, positions):
  model, params, images, ids = _setup(text_pool=pool, positions=positions)
  valid = jnp.arange(T)[None] < jnp.array([[6], [5], [3]])
  garbage = jnp.where(valid, ids, (ids * 7 + 3) % 20)
  a, _ = model.apply({"params": params}, images, ids, valid)
  b, _ = model.apply({"params": params}, images, garbage, valid)
  real = np.asarray(valid)
  np.testing.assert_allclose(np.asarray(a["text_logits"])[real], np.asarray(b["text_logits"])[real],
                             atol=1e-5)
  np.testing.assert_allclose(a["text_emb"], b["text_emb"], atol=1e-5)
  # Less padding (a shorter array) changes nothing real either.
  c, _ = model.apply({"params": params}, images, ids[:, :6], valid[:, :6])
  np.testing.assert_allclose(c["text_emb"], a["text_emb"], atol=1e-5)
  np.testing.assert_allclose(np.asarray(c["text_logits"])[real[:, :6]],
                             np.asarray(a["text_logits"])[real], atol=1e-5)


def test_image_context_computed_once_equals_recomputing_it():
  model, params, images, ids = _setup(caption_queries=3)
  full, _ = model.apply({"params": params}, images, ids)
  emb, context, _ = model.apply({"params": params}, images, method="encode_image")
  assert context.shape == (3, 3, 24)
  _, hidden, _ = model.apply({"params": params}, ids, method="unimodal_text")
  logits, _ = model.apply({"params": params}, hidden, context, jnp.ones(ids.shape, bool),
                          method="text_logits")
  np.testing.assert_allclose(logits, full["text_logits"], atol=1e-5)
  np.testing.assert_allclose(emb, full["image_emb"], atol=1e-6)


def test_cached_captioning_equals_recomputing_and_encodes_the_image_once(monkeypatch):
  model, params, images, _ = _setup(caption_queries=2)
  calls = []
  original = CoCa.encode_image
  monkeypatch.setattr(CoCa, "encode_image", lambda self, *a, **k: calls.append(1) or original(
      self, *a, **k))
  prompt = jnp.full((3, 1), 19, jnp.int32)  # a BOS
  got = caption(model, params, images, prompt, max_new_tokens=6, eos_id=18)
  assert len(calls) == 1  # traced once: the decoding loop never re-encodes the image
  seq = prompt
  for _ in range(6):  # greedy, the whole sequence through the full model each time
    t = seq.shape[1]
    out, _ = model.apply({"params": params}, images, jnp.pad(seq, ((0, 0), (0, T - t))),
                         jnp.broadcast_to(jnp.arange(T)[None] < t, (3, T)))
    seq = jnp.concatenate([seq, jnp.argmax(out["text_logits"][:, t - 1], -1)[:, None]], 1)
  want, tokens = np.asarray(seq[:, 1:]), np.asarray(got["tokens"])
  for row in range(3):
    stop = int(got["lengths"][row])
    np.testing.assert_array_equal(tokens[row, :stop], want[row, :stop])
    if stop < 6:
      assert tokens[row, stop] == 18 and want[row, stop] == 18
  # Sampling: batched, top-k 1 is greedy whatever the temperature.
  top1 = caption(model, params, images, prompt, jax.random.PRNGKey(3), max_new_tokens=6,
                 eos_id=18, temperature=1.5, top_k=1)
  np.testing.assert_array_equal(top1["tokens"], got["tokens"])
  sampled = caption(model, params, images, prompt, jax.random.PRNGKey(3), max_new_tokens=6,
                    eos_id=18, temperature=1.0, top_p=0.9)
  assert sampled["tokens"].shape == (3, 6)


def test_bad_inputs_raise_errors_that_name_the_fix():
  model, params, images, ids = _setup()
  with pytest.raises(ValueError, match="text.max_length=8"):
    model.apply({"params": params}, images, jnp.zeros((3, T + 1), jnp.int32))
  with pytest.raises(ValueError, match="max_text_length"):
    caption(model, params, images, jnp.zeros((3, 2), jnp.int32), max_new_tokens=7, eos_id=18)
  with pytest.raises(ValueError, match="multimodal_depth"):
    _config(multimodal_depth=3)
  with pytest.raises(ValueError, match="text_pool"):
    _config(text_pool="mean")


def test_coca_recipe_trains_and_evaluates_end_to_end(tmp_path):
  from datong.train import config as config_lib, loop, recipes  # pylint: disable=import-outside-toplevel
  cfg = config_lib.override(recipes.get("coca-digits"), {
      "train.steps": "2", "train.batch_size": "16", "train.log_every": "1",
      "task.model.text.backbone.width": "32", "task.model.text.backbone.mlp_dim": "64",
      "task.model.image.backbone.width": "32", "task.model.image.backbone.depth": "1",
      "task.model.image.backbone.mlp_dim": "64", "task.max_new_tokens": "4",
      "mesh.data": "2", "mesh.fsdp": "2", "mesh.tensor": "2"})
  result = loop.train(cfg, str(tmp_path), progress=False)
  m = result.metrics
  for key in ("eval/zero_shot_accuracy", "eval/caption_accuracy", "eval/i2t_recall@1",
              "eval/t2i_recall@1"):
    assert 0.0 <= m[key] <= 1.0, key
  assert m["eval/caption_loss"] > 0 and np.isfinite(m["train/loss"])
  assert {"train/contrastive_loss", "train/caption_loss"} <= set(m)
  text = open(tmp_path / "captions_step2.txt").read()  # an untrained caption may hold a newline
  assert text.startswith("label") and text.count("\tok\t") + text.count("\tWRONG\t") == 16


def test_notebook_caption_decodes_a_coca_with_the_cached_generation():
  import datong  # pylint: disable=import-outside-toplevel
  from datong.params import params_collection  # pylint: disable=import-outside-toplevel
  from datong.unimodal.tokenizers import ByteTokenizer  # pylint: disable=import-outside-toplevel
  model = datong.build("coca", "tiny", image_size=8, patch_size=4, channels=1, max_length=12)
  assert isinstance(model, CoCa)
  params = datong.init(model)
  images = np.random.RandomState(0).uniform(-1, 1, (2, 8, 8, 1)).astype(np.float32)
  texts = datong.caption(model, params, images, prompt="ab")
  tok = ByteTokenizer()
  out = coca_lib.caption(model, nn.unbox(params_collection(params)), jnp.asarray(images),
                         jnp.asarray([[tok.bos_id, 97, 98]] * 2, jnp.int32), max_new_tokens=9,
                         eos_id=tok.eos_id, pad_id=tok.pad_id, vocab_size=262)
  for i in range(2):
    n = int(out["lengths"][i])
    assert texts[i] == "ab" + tok.decode(np.asarray(out["tokens"][i, :n]))

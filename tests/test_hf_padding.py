"""Hugging Face attention masks: every position equals HF's, padding included.

Text models and towers take HF's ``attention_mask`` (a key mask ``[batch,
length]``, 1 = real token). Rows are left padded, right padded and full, and
the padding id differs from the config's ``pad_token_id`` (CLIP pads with
its end-of-text id, as its real tokenizers do), so padding can only come
from the mask. Checkpoints come in every spelling (hub, 5.x
``save_pretrained``, 5.x ``state_dict()``; ``test_hf._spellings``). HF runs
its default attention (``sdpa``: a query that sees no real key outputs
zeros, as Datong's kernels do; HF's ``eager`` path instead averages every
value there, so the two HF paths differ on such rows).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from test_hf import (_check_hidden_states, _load_every_spelling, _np, _randomize, _save,  # noqa: F401
                     _spellings, check, run, torch_hf)

from datong import hf

# Row 0 left padded (3), row 1 right padded (4), row 2 full; length 10.
MASK = np.ones((3, 10), np.int64)
MASK[0, :3] = 0
MASK[1, 6:] = 0


def _ids(rs, low, high, pad_id, mask=MASK):
  ids = rs.randint(low, high, mask.shape)
  return np.where(mask == 1, ids, pad_id)


def test_gpt2_padded_positions_match_hf(torch_hf, tmp_path):
  torch, T = torch_hf
  cfg = T.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=61, n_positions=16,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                     eos_token_id=0, pad_token_id=5)
  ref = _randomize(torch, T.GPT2LMHeadModel(cfg))
  ids = _ids(np.random.RandomState(0), 8, 61, pad_id=7)  # config pad_token_id is 5
  with torch.no_grad():
    kw = dict(attention_mask=torch.tensor(MASK), output_hidden_states=True)
    out = ref(torch.tensor(ids), **kw)
  model, params = _load_every_spelling(_spellings(
      torch, ref, tmp_path, "gpt2",
      lambda m: m(torch.tensor(ids), attention_mask=torch.tensor(MASK)).logits))
  logits, aux = run(model, params, jnp.asarray(ids, jnp.int32),
                    attention_mask=jnp.asarray(MASK, jnp.int32), return_layers=True)
  errs = {}
  check("logits", logits, _np(out.logits), errs)
  # GPT-2's last hidden state is after ln_f; the others are block outputs.
  _check_hidden_states("gpt2", {"embedded": aux["embedded"],
                                "layers": list(aux["layers"][:-1]) + [aux["hidden"]]},
                       out.hidden_states, errs)
  # The left-padded row's first positions see no real key: not a trivial case.
  assert not np.allclose(_np(out.logits)[0, :3], _np(out.logits)[2, :3])
  print("gpt2 padded", {k: f"{v:.2e}" for k, v in errs.items()})


@pytest.mark.parametrize("arch", ["BertForMaskedLM", "BertModel"])
def test_bert_padded_positions_match_hf(torch_hf, tmp_path, arch):
  torch, T = torch_hf
  cfg = T.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, vocab_size=61, max_position_embeddings=16,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                     pad_token_id=0)
  ref = _randomize(torch, getattr(T, arch)(cfg))
  rs = np.random.RandomState(1)
  ids = _ids(rs, 4, 61, pad_id=3)  # not the config's pad_token_id 0
  types = (np.arange(10)[None] >= 5).astype(np.int64).repeat(3, 0)
  kw = dict(input_ids=torch.tensor(ids), token_type_ids=torch.tensor(types),
            attention_mask=torch.tensor(MASK), output_hidden_states=True)
  with torch.no_grad():
    out = ref(**kw)
    base = ref.bert(**kw) if arch == "BertForMaskedLM" else out
  model, params = _load_every_spelling(_spellings(
      torch, ref, tmp_path, "bert",
      lambda m: (m.bert if arch == "BertForMaskedLM" else m)(
          input_ids=kw["input_ids"], attention_mask=kw["attention_mask"]).last_hidden_state))
  ours, aux = run(model, params, jnp.asarray(ids, jnp.int32),
                  token_types=jnp.asarray(types, jnp.int32),
                  attention_mask=jnp.asarray(MASK, jnp.int32), return_layers=True)
  errs = {}
  if arch == "BertForMaskedLM":
    check("logits", ours, _np(out.logits), errs)
  else:
    check("pooler_output", aux["pooled"], _np(out.pooler_output), errs)
  check("last_hidden_state", aux["hidden"], _np(base.last_hidden_state), errs)
  _check_hidden_states("bert", aux, base.hidden_states, errs)
  # Segment ids (Datong's packing) cut padded rows off the real keys instead
  # (same positions given: segments would restart them).
  _, seg_aux = run(model, params, jnp.asarray(ids, jnp.int32),
                   token_types=jnp.asarray(types, jnp.int32),
                   segment_ids=jnp.asarray(MASK, jnp.int32),
                   positions=jnp.broadcast_to(jnp.arange(10), (3, 10)))
  real = MASK.astype(bool)
  np.testing.assert_allclose(np.asarray(seg_aux["hidden"])[real],
                             np.asarray(aux["hidden"])[real], rtol=1e-4, atol=1e-5)
  assert not np.allclose(np.asarray(seg_aux["hidden"])[~real], np.asarray(aux["hidden"])[~real],
                         atol=1e-3)
  print(arch, "padded", {k: f"{v:.2e}" for k, v in errs.items()})


def test_clip_text_padded_positions_match_hf(torch_hf, tmp_path):
  torch, T = torch_hf
  text = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
              vocab_size=61, max_position_embeddings=16, bos_token_id=59, eos_token_id=60,
              pad_token_id=1, projection_dim=16)
  ref = _randomize(torch, T.CLIPTextModelWithProjection(T.CLIPTextConfig(**text)))
  rs = np.random.RandomState(2)
  ids = rs.randint(2, 59, MASK.shape)
  ids[:, :] = np.where(MASK == 1, ids, 60)  # pad with the EOS id, as CLIP's tokenizers do
  for row in range(3):
    real = np.flatnonzero(MASK[row])
    ids[row, real[0]] = 59
    ids[row, real[-1]] = 60
  ids[0, :3] = 0  # the left padding uses yet another id (config pad_token_id is 1)
  with torch.no_grad():
    out = ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(MASK),
              output_hidden_states=True)
  model, params = _load_every_spelling(_spellings(
      torch, ref, tmp_path, "clip_text", lambda m: m(
          input_ids=torch.tensor(ids), attention_mask=torch.tensor(MASK)).text_embeds))
  emb, aux = run(model, params, jnp.asarray(ids, jnp.int32),
                 attention_mask=jnp.asarray(MASK, jnp.int32), return_layers=True)
  errs = {}
  check("last_hidden_state", aux["encoded"], _np(out.last_hidden_state), errs)
  _check_hidden_states("clip text", aux, out.hidden_states, errs)
  check("text_embeds (before normalisation)", aux["projected"], _np(out.text_embeds), errs)
  np.testing.assert_allclose(np.linalg.norm(np.asarray(emb), axis=-1), 1.0, rtol=1e-6)
  print("clip text padded", {k: f"{v:.2e}" for k, v in errs.items()})


def test_attention_mask_of_the_wrong_shape_is_named():
  from datong.backbone import TransformerConfig
  from datong.unimodal.text import BERT, TextConfig
  model = BERT(TextConfig(backbone=TransformerConfig(width=16, depth=1, heads=2, mlp_dim=32),
                          vocab_size=11, positions="learned", max_length=8))
  ids = jnp.zeros((2, 6), jnp.int32)
  with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 5\).*\[batch, 6\]"):
    model.init(jax.random.PRNGKey(0), ids, attention_mask=jnp.ones((2, 5)))


def _sown_attentions(model, params, *args, **kw):
  """Every layer's attention probabilities ``[batch, heads, q, kv]``, in layer order."""
  from datong.backbone import WEIGHTS_COLLECTION
  fn = jax.jit(lambda p, *a: model.apply({"params": p}, *a, mutable=[WEIGHTS_COLLECTION], **kw))
  _, state = fn(params, *args)
  found = {jax.tree_util.keystr(path): leaf for path, leaf in
           jax.tree_util.tree_flatten_with_path(state[WEIGHTS_COLLECTION])[0]}
  layer = lambda key: int(key.split("layer_")[1].split("'")[0])
  return [found[k] for k in sorted(found, key=layer)]


@pytest.mark.parametrize("family", ["bert", "clip_text"])
def test_padded_attention_probabilities_match_hf(torch_hf, tmp_path, family):
  """HF's ``attentions`` (its eager path, the one that returns them): every row
  here sees at least one real key, where HF's eager and sdpa paths agree."""
  torch, T = torch_hf
  rs = np.random.RandomState(3)
  mask = MASK.copy()
  mask[0, :3] = 1  # right padding only: a causal left-padded row would see no real key
  mask[0, 8:] = 0
  if family == "bert":
    cfg = T.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=64, vocab_size=61, max_position_embeddings=16,
                       hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    ids = _ids(rs, 4, 61, pad_id=3, mask=mask)
  else:
    cfg = T.CLIPTextConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, vocab_size=61, max_position_embeddings=16,
                           bos_token_id=59, eos_token_id=60, pad_token_id=1)
    ids = np.where(mask == 1, rs.randint(2, 59, mask.shape), 60)
  cfg._attn_implementation = "eager"
  ref = _randomize(torch, (T.BertModel if family == "bert" else T.CLIPTextModel)(cfg))
  with torch.no_grad():
    out = ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
              output_attentions=True)
  model, params = hf.load(_save(ref, tmp_path / family))
  ours = _sown_attentions(model, params, jnp.asarray(ids, jnp.int32),
                          attention_mask=jnp.asarray(mask, jnp.int32))
  assert len(ours) == len(out.attentions) == 2
  for i, (a, b) in enumerate(zip(ours, out.attentions)):
    check(f"{family} attentions[{i}]", a, _np(b))


def test_gpt_attention_mask_with_a_kv_cache_equals_the_full_forward():
  """Decoding token by token with HF's mask over the cache slots gives the
  logits of one masked forward over the whole (left-padded) sequence."""
  from datong.backbone import init_cache
  from test_hf import _tiny_gpt
  model, params = _tiny_gpt()
  ids = jnp.asarray(_ids(np.random.RandomState(4), 8, 61, pad_id=7), jnp.int32)
  mask = jnp.asarray(MASK, jnp.int32)
  full, _ = run(model, params, ids, attention_mask=mask)
  step = jax.jit(lambda p, tok, cache, i: model.apply(
      {"params": p}, tok, attention_mask=mask, cache=cache, cache_index=i))
  cache = init_cache(model.config.resolved_backbone, 3, 10)
  for t in range(10):
    logits, aux = step(params, ids[:, t:t + 1], cache, t)
    cache = aux["cache"]
    np.testing.assert_allclose(logits[:, 0], full[:, t], rtol=1e-5, atol=1e-5, err_msg=str(t))
  with pytest.raises(ValueError, match=r"attention_mask has shape \(3, 9\).*\[batch, 10\]"):
    model.apply({"params": params}, ids[:, :1], attention_mask=mask[:, :9], cache=cache,
                cache_index=0)


def test_clip_model_with_attention_mask_matches_hf(torch_hf, tmp_path):
  """``CLIP(images, ids, attention_mask=...)``: the text embeddings and
  ``logits_per_image`` of HF's ``CLIPModel`` on EOS-padded captions."""
  torch, T = torch_hf
  text = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
              vocab_size=61, max_position_embeddings=16, bos_token_id=59, eos_token_id=60,
              pad_token_id=1)
  vision = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=64, image_size=16, patch_size=4)
  ref = _randomize(torch, T.CLIPModel(T.CLIPConfig(text_config=text, vision_config=vision,
                                                   projection_dim=16)))
  rs = np.random.RandomState(6)
  mask = MASK.copy()
  mask[0] = np.roll(mask[0], -3)  # CLIP pools at the first EOS: pad on the right here
  ids = np.where(mask == 1, rs.randint(2, 59, mask.shape), 60)
  for row in range(3):
    ids[row, 0], ids[row, mask[row].sum() - 1] = 59, 60
  pixels = rs.randn(3, 3, 16, 16).astype(np.float32)
  with torch.no_grad():
    out = ref(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels),
              attention_mask=torch.tensor(mask))
  model, params = hf.load(_save(ref, tmp_path / "clip"))
  img, txt, aux = run(model, params, jnp.asarray(pixels.transpose(0, 2, 3, 1)),
                      jnp.asarray(ids, jnp.int32), attention_mask=jnp.asarray(mask, jnp.int32))
  check("text_embeds", txt, _np(out.text_embeds))
  check("image_embeds", img, _np(out.image_embeds))
  check("logits_per_image", aux["scale"] * img @ txt.T, _np(out.logits_per_image))
  # Causal attention pooled at the first EOS never sees right padding, so the
  # embedding is the same without the mask (its padded positions are not).
  _, txt_nomask, _ = run(model, params, jnp.asarray(pixels.transpose(0, 2, 3, 1)),
                         jnp.asarray(ids, jnp.int32))
  check("text_embeds, EOS pooled before any padding", txt_nomask, _np(out.text_embeds))

"""Hugging Face checkpoints: load with logit parity, export back.

Parity tests build tiny randomly initialized transformers models on CPU (from
configs, no download), perturb every parameter (so biases and norms are not
trivially 0 / 1), ``save_pretrained`` them as safetensors, load them with
``datong.hf`` and compare outputs on the same inputs in float32:
relative error ``|a - b| / |b| <= 1e-5``. They need torch and transformers
(test-only dependencies) and are skipped without them; the format and
round-trip tests at the top need neither.
"""

import inspect
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from datong import hf
from datong.backbone import TransformerConfig
from datong.unimodal.masked_image import mae_loss
from datong.unimodal.text import GPT, TextConfig, causal_lm_loss, cross_entropy, mlm_loss
from datong.unimodal.vision import ViTClassifier, ViTConfig

TOL = 1e-5
REASON = ("HF parity tests build reference models with PyTorch + transformers "
          "(test-only deps: pip install torch transformers)")


def rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  assert a.shape == b.shape, (a.shape, b.shape)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def check(name, a, b, errors=None):
  err = rel(a, b)
  if errors is not None:
    errors[name] = err
  assert err <= TOL, f"{name}: relative error {err:.3g} > {TOL}"
  return err


@pytest.fixture(scope="module")
def torch_hf():
  torch = pytest.importorskip("torch", reason=REASON)
  transformers = pytest.importorskip("transformers", reason=REASON)
  torch.set_num_threads(1)
  return torch, transformers


def _randomize(torch, model, seed=0, scale=0.1):
  """Perturb every parameter (tied ones once) so nothing is trivially 0 / 1."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for _, p in model.named_parameters():
      p.add_(torch.randn(p.shape, generator=gen) * scale)
  return model.eval()


def _save(model, path):
  model.save_pretrained(str(path), safe_serialization=True)
  return str(path)


def run(model, params, *args, method=None, **kw):
  """``model.apply`` jitted (eager flax dispatch is many times slower on CPU)."""
  fn = jax.jit(lambda p, *a: model.apply({"params": p}, *a, method=method, **kw))
  return fn(params, *args)


def _random_params(model, *args, seed=0, scale=0.1):
  """Random params in ``model``'s layout, drawn with numpy (no jax init to compile).

  Norm scales are ``1 + noise``; everything else ``noise``.
  """
  shapes = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.PRNGKey(0), *args)["params"]))
  rs = np.random.RandomState(seed)
  return jax.tree_util.tree_map_with_path(
      lambda path, s: (float(path[-1].key == "scale") + scale * rs.standard_normal(s.shape))
      .astype(np.float32), shapes)


def _np(t):
  return t.detach().cpu().numpy()


def _tiny_gpt(tie=True):
  bb = TransformerConfig(width=32, depth=2, heads=4, mlp_dim=64, activation="gelu_tanh",
                         norm_eps=1e-5)
  cfg = TextConfig(backbone=bb, vocab_size=61, positions="learned", max_length=16,
                   tie_embeddings=tie)
  model = GPT(cfg)
  return model, _random_params(model, jnp.zeros((1, 4), jnp.int32))


def _tiny_vit():
  bb = TransformerConfig(width=32, depth=2, heads=4, mlp_dim=64, norm_eps=1e-6)
  model = ViTClassifier(ViTConfig(bb, image_size=(16, 16), patch_size=(4, 4)), num_classes=5)
  return model, _random_params(model, jnp.zeros((1, 16, 16, 3)))


# ------------------------------------------------- no torch needed below --

def test_safetensors_roundtrip(tmp_path):
  import ml_dtypes
  tensors = {"a": np.arange(6, dtype=np.float32).reshape(2, 3),
             "b": np.array([1.5, -2.0], ml_dtypes.bfloat16),
             "c": np.array([[1, 2]], np.int64), "scalar": np.array(3.0, np.float32)}
  path = str(tmp_path / "x.safetensors")
  hf.write_safetensors(path, tensors)
  back = hf.read_safetensors(path)
  assert set(back) == set(tensors)
  for k, v in tensors.items():
    assert back[k].dtype == v.dtype and back[k].shape == v.shape
    np.testing.assert_array_equal(back[k], v)
  with open(path, "rb") as f:
    assert int.from_bytes(f.read(8), "little") % 8 == 0  # buffers 8-byte aligned
  st = pytest.importorskip("safetensors.numpy", reason="cross-check with the reference reader")
  ref = st.load_file(path)
  for k in ("a", "c", "scalar"):
    np.testing.assert_array_equal(ref[k], tensors[k])


@pytest.mark.parametrize("tie", [True, False])
def test_gpt_save_load_roundtrip_exact(tmp_path, tie):
  model, params = _tiny_gpt(tie)
  hf.save(model, params, str(tmp_path))
  model2, params2 = hf.load(str(tmp_path))
  assert model2.config.backbone.width == 32 and model2.config.tie_embeddings == tie
  jax.tree.map(np.testing.assert_array_equal, params2, params)
  # scanned layers load into the stacked layout and give the same logits
  ids = jnp.arange(12, dtype=jnp.int32).reshape(2, 6)
  model3, params3 = hf.load(str(tmp_path), scan_layers=True)
  assert "layers" in params3["encoder"]["backbone"]
  a, _ = run(model, params, ids)
  b, _ = run(model3, params3, ids)
  assert rel(b, a) <= TOL


def test_vit_save_load_roundtrip_exact(tmp_path):
  model, params = _tiny_vit()
  hf.save(model, params, str(tmp_path))
  model2, params2 = hf.load(str(tmp_path))
  assert model2.num_classes == 5 and model2.config.patch_size == (4, 4)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6), params2, params)


def test_unsupported_errors_name_the_problem(tmp_path):
  model, params = _tiny_gpt()
  hf.save(model, params, str(tmp_path))
  cfg_file = tmp_path / "config.json"
  base = json.loads(cfg_file.read_text())

  def load_with(**changes):
    cfg_file.write_text(json.dumps({**base, **changes}))
    return hf.load(str(tmp_path))

  with pytest.raises(hf.UnsupportedError, match="LlamaForCausalLM"):
    load_with(architectures=["LlamaForCausalLM"], model_type="llama")
  with pytest.raises(hf.UnsupportedError, match="scale_attn_by_inverse_layer_idx"):
    load_with(scale_attn_by_inverse_layer_idx=True)
  with pytest.raises(hf.UnsupportedError, match="activation_function"):
    load_with(activation_function="silu")
  cfg_file.write_text(json.dumps(base))
  tensors = hf.read_safetensors(str(tmp_path / "model.safetensors"))
  tensors["transformer.h.0.attn.extra.weight"] = np.zeros((2,), np.float32)
  hf.write_safetensors(str(tmp_path / "model.safetensors"), tensors)
  with pytest.raises(hf.UnsupportedError, match="attn.extra.weight"):
    hf.load(str(tmp_path))
  with pytest.raises(hf.UnsupportedError, match="SequenceClassifier|no Hugging Face export"):
    from datong.unimodal.text import SequenceClassifier
    hf.save(SequenceClassifier(model.config, 2), params, str(tmp_path / "x"))


def test_sharded_checkpoint(tmp_path):
  model, params = _tiny_gpt()
  src = tmp_path / "one"
  hf.save(model, params, str(src))
  tensors = hf.read_safetensors(str(src / "model.safetensors"))
  out = tmp_path / "sharded"
  out.mkdir()
  (out / "config.json").write_text((src / "config.json").read_text())
  names = sorted(tensors)
  shards = {"model-00001-of-00002.safetensors": names[::2],
            "model-00002-of-00002.safetensors": names[1::2]}
  weight_map = {}
  for file, keys in shards.items():
    hf.write_safetensors(str(out / file), {k: tensors[k] for k in keys})
    weight_map.update({k: file for k in keys})
  (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
  _, params2 = hf.load(str(out))
  jax.tree.map(np.testing.assert_array_equal, params2, params)


# ------------------------------------------------------- parity with HF ---

@pytest.mark.parametrize("tie", [True, False])
def test_gpt2_parity(torch_hf, tmp_path, tie):
  torch, T = torch_hf
  cfg = T.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=61, n_positions=16,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                     tie_word_embeddings=tie, bos_token_id=0, eos_token_id=0)
  ref = _randomize(torch, T.GPT2LMHeadModel(cfg))
  path = _save(ref, tmp_path)
  ids = np.random.RandomState(0).randint(0, 61, (2, 12))
  with torch.no_grad():
    t_ids = torch.tensor(ids)
    out = ref(t_ids, labels=t_ids)
    hidden = ref.transformer(t_ids).last_hidden_state
  model, params = hf.load(path)
  logits, aux = run(model, params, jnp.asarray(ids, jnp.int32))
  loss, _ = causal_lm_loss(logits[:, :-1], jnp.asarray(ids[:, 1:]), jnp.ones((2, 11)))
  errs = {}
  check("logits", logits, _np(out.logits), errs)
  check("last_hidden_state", aux["hidden"], _np(hidden), errs)
  check("loss", loss, _np(out.loss), errs)
  print("gpt2 tie=%s" % tie, {k: f"{v:.2e}" for k, v in errs.items()})


def test_gpt2_export_parity(torch_hf, tmp_path):
  torch, T = torch_hf
  model, params = _tiny_gpt()
  hf.save(model, params, str(tmp_path))
  ref = T.GPT2LMHeadModel.from_pretrained(str(tmp_path)).eval()
  ids = np.random.RandomState(1).randint(0, 61, (2, 10))
  with torch.no_grad():
    out = ref(torch.tensor(ids))
  logits, _ = run(model, params, jnp.asarray(ids, jnp.int32))
  err = check("exported gpt2 logits", logits, _np(out.logits))
  print(f"gpt2 export {err:.2e}")


@pytest.mark.parametrize("arch", ["BertForMaskedLM", "BertForPreTraining"])
def test_bert_parity(torch_hf, tmp_path, arch):
  torch, T = torch_hf
  cfg = T.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, vocab_size=61, max_position_embeddings=16,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
  ref = _randomize(torch, getattr(T, arch)(cfg))
  path = _save(ref, tmp_path)
  rs = np.random.RandomState(2)
  ids = rs.randint(0, 61, (2, 10))
  types = (np.arange(10)[None] >= 5).astype(np.int64).repeat(2, 0)
  valid = np.ones((2, 10), np.int64)
  valid[1, 7:] = 0  # right padding in the second row
  labels = np.where(rs.rand(2, 10) < 0.4, ids, -100)
  labels[0, 1] = ids[0, 1]
  labels = np.where(valid == 1, labels, -100)
  with torch.no_grad():
    kw = dict(input_ids=torch.tensor(ids), token_type_ids=torch.tensor(types),
              attention_mask=torch.tensor(valid))
    base = ref.bert(**kw).last_hidden_state
    if arch == "BertForMaskedLM":
      out = ref(**kw, labels=torch.tensor(labels))
      ref_logits = out.logits
    else:
      nsp = torch.tensor([0, 1])
      out = ref(**kw, labels=torch.tensor(labels), next_sentence_label=nsp)
      ref_logits = out.prediction_logits
  model, params = hf.load(path)
  assert model.config.nsp == (arch == "BertForPreTraining")
  logits, aux = run(model, params, jnp.asarray(ids, jnp.int32),
                            segment_ids=jnp.asarray(valid, jnp.int32),
                            token_types=jnp.asarray(types, jnp.int32))
  real = valid.astype(bool)  # padded positions differ by design (they see only padding)
  errs = {}
  check("logits", np.asarray(logits)[real], _np(ref_logits)[real], errs)
  check("last_hidden_state", np.asarray(aux["hidden"])[real], _np(base)[real], errs)
  loss, _ = mlm_loss(logits, jnp.asarray(np.maximum(labels, 0)), jnp.asarray(labels >= 0))
  if arch == "BertForMaskedLM":
    check("loss", loss, _np(out.loss), errs)
  else:
    check("nsp_logits", aux["nsp_logits"], _np(out.seq_relationship_logits), errs)
    nsp_loss = jnp.mean(cross_entropy(aux["nsp_logits"], jnp.array([0, 1]))[0])
    check("loss", loss + nsp_loss, _np(out.loss), errs)
  print(arch, {k: f"{v:.2e}" for k, v in errs.items()})


@pytest.mark.parametrize("qkv_bias", [True, False])
def test_vit_parity(torch_hf, tmp_path, qkv_bias):
  torch, T = torch_hf
  cfg = T.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=64, image_size=16, patch_size=4, num_labels=5,
                    qkv_bias=qkv_bias, hidden_dropout_prob=0.0,
                    attention_probs_dropout_prob=0.0)
  ref = _randomize(torch, T.ViTForImageClassification(cfg))
  path = _save(ref, tmp_path)
  pixels = np.random.RandomState(3).randn(2, 3, 16, 16).astype(np.float32)
  labels = np.array([1, 4])
  with torch.no_grad():
    out = ref(torch.tensor(pixels), labels=torch.tensor(labels))
    hidden = ref.vit(torch.tensor(pixels)).last_hidden_state
  model, params = hf.load(path)
  images = jnp.asarray(pixels.transpose(0, 2, 3, 1))  # NCHW -> NHWC
  logits, aux = run(model, params, images)
  loss = jnp.mean(cross_entropy(logits, jnp.asarray(labels))[0])
  errs = {}
  check("logits", logits, _np(out.logits), errs)
  check("last_hidden_state", aux["encoded"], _np(hidden), errs)
  check("loss", loss, _np(out.loss), errs)
  print(f"vit qkv_bias={qkv_bias}", {k: f"{v:.2e}" for k, v in errs.items()})


def test_vit_export_parity(torch_hf, tmp_path):
  torch, T = torch_hf
  model, params = _tiny_vit()
  hf.save(model, params, str(tmp_path))
  ref = T.ViTForImageClassification.from_pretrained(str(tmp_path)).eval()
  pixels = np.random.RandomState(4).randn(2, 3, 16, 16).astype(np.float32)
  with torch.no_grad():
    out = ref(torch.tensor(pixels), output_hidden_states=True)
  logits, aux = run(model, params, jnp.asarray(pixels.transpose(0, 2, 3, 1)))
  err = check("exported vit logits", logits, _np(out.logits))
  print(f"vit export {err:.2e}")


def _mae_case(torch, T, tmp_path, norm_pix_loss):
  cfg = T.ViTMAEConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=64, image_size=16, patch_size=4,
                       decoder_hidden_size=16, decoder_num_hidden_layers=1,
                       decoder_num_attention_heads=2, decoder_intermediate_size=32,
                       mask_ratio=0.75, norm_pix_loss=norm_pix_loss)
  ref = _randomize(torch, T.ViTMAEForPreTraining(cfg))
  with torch.no_grad():  # HF's decoder [CLS] position is a zero row (fixed sin-cos)
    ref.decoder.decoder_pos_embed[:, 0] = 0
  path = _save(ref, tmp_path)
  rs = np.random.RandomState(5)
  pixels = rs.randn(2, 3, 16, 16).astype(np.float32)
  noise = rs.rand(2, 16).astype(np.float32)
  with torch.no_grad():
    out = ref(torch.tensor(pixels), noise=torch.tensor(noise))
    latent = ref.vit(torch.tensor(pixels), noise=torch.tensor(noise)).last_hidden_state
  model, params = hf.load(path)
  masking = hf.mae_masking(noise, model.config.mask_ratio)
  images = jnp.asarray(pixels.transpose(0, 2, 3, 1))
  pred, aux = run(model, params, images, masking.keep_indices,
                          masking.restore_indices)
  return model, out, latent, masking, images, pred, aux


def test_vit_mae_parity(torch_hf, tmp_path):
  torch, T = torch_hf
  model, out, latent, masking, images, pred, aux = _mae_case(torch, T, tmp_path, False)
  np.testing.assert_array_equal(np.asarray(masking.mask), _np(out.mask).astype(bool))
  np.testing.assert_array_equal(np.asarray(masking.restore_indices), _np(out.ids_restore))
  loss, _ = mae_loss(pred, images, masking.mask, model.config.encoder.patch_size,
                     norm_pix=False)
  errs = {}
  check("logits", pred, _np(out.logits), errs)
  check("last_hidden_state", aux["encoded"], _np(latent), errs)
  check("loss", loss, _np(out.loss), errs)
  print("vit-mae", {k: f"{v:.2e}" for k, v in errs.items()})


def test_vit_mae_norm_pix_loss_parity(torch_hf, tmp_path):
  torch, T = torch_hf
  model, out, _, masking, images, pred, _ = _mae_case(torch, T, tmp_path, True)
  kw = {"ddof": 1} if "ddof" in inspect.signature(mae_loss).parameters else {}
  loss, _ = mae_loss(pred, images, masking.mask, model.config.encoder.patch_size,
                     norm_pix=True, **kw)
  check("norm_pix loss", loss, _np(out.loss))


def _clip_case(torch, T, tmp_path):
  text = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=64, vocab_size=61, max_position_embeddings=16,
              bos_token_id=59, eos_token_id=60, pad_token_id=1)
  vision = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=64, image_size=16, patch_size=4)
  ref = _randomize(torch, T.CLIPModel(T.CLIPConfig(text_config=text, vision_config=vision,
                                                   projection_dim=16)))
  path = _save(ref, tmp_path)
  rs = np.random.RandomState(6)
  lengths = [9, 5, 12]
  ids = np.ones((3, 14), np.int64)  # padded with pad id 1 after the EOS
  for i, n in enumerate(lengths):
    ids[i, 0] = 59
    ids[i, 1:n - 1] = rs.randint(2, 59, n - 2)
    ids[i, n - 1] = 60
  pixels = rs.randn(3, 3, 16, 16).astype(np.float32)
  with torch.no_grad():
    out = ref(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels), return_loss=True)
    # The towers alone: transformers 5 overwrites CLIPModel's tower pooler_output
    # with the projected embedding.
    out.text_raw = ref.text_model(input_ids=torch.tensor(ids))
    out.vision_raw = ref.vision_model(pixel_values=torch.tensor(pixels))
  real = np.arange(14)[None] < np.array(lengths)[:, None]
  return path, ids, pixels, out, real


def test_clip_text_parity(torch_hf, tmp_path):
  torch, T = torch_hf
  path, ids, _, out, real = _clip_case(torch, T, tmp_path)
  tower, params = hf.load_clip_text(path)
  emb, aux = run(tower, params, jnp.asarray(ids, jnp.int32))
  t = out.text_raw
  errs = {}
  check("text_embeds", emb, _np(out.text_embeds), errs)
  check("pooler_output", aux["pooled"], _np(t.pooler_output), errs)
  check("last_hidden_state", np.asarray(aux["encoded"])[real], _np(t.last_hidden_state)[real],
        errs)
  print("clip text", {k: f"{v:.2e}" for k, v in errs.items()})


def test_clip_parity(torch_hf, tmp_path):
  from datong.multimodal.contrastive import softmax_contrastive_loss
  torch, T = torch_hf
  path, ids, pixels, out, real = _clip_case(torch, T, tmp_path)
  model, params = hf.load(path)
  img, txt, aux = run(model, params, jnp.asarray(pixels.transpose(0, 2, 3, 1)),
                              jnp.asarray(ids, jnp.int32))
  errs = {}
  check("image_embeds", img, _np(out.image_embeds), errs)
  check("text_embeds", txt, _np(out.text_embeds), errs)
  check("vision pooler_output", aux["image"]["pooled"],
        _np(out.vision_raw.pooler_output), errs)
  check("vision last_hidden_state", aux["image"]["pre_norm"],
        _np(out.vision_raw.last_hidden_state), errs)
  check("logits_per_image", aux["scale"] * img @ txt.T, _np(out.logits_per_image), errs)
  loss, _ = softmax_contrastive_loss(img, txt, aux["scale"])
  check("loss", loss, _np(out.loss), errs)
  print("clip", {k: f"{v:.2e}" for k, v in errs.items()})


# ------------------------------------------------------- Swin, Swin V2 ---

def _swin_hf_config(T, version, **kw):
  """Non-square images (24 x 32, patch 2 -> 12 x 16 grid), window 3: stages 0
  and 1 pad their grid to whole windows, stage 2 (3 x 4) has its shift off."""
  common = dict(image_size=(24, 32), patch_size=2, embed_dim=8, depths=[2, 2, 2],
                num_heads=[2, 2, 4], window_size=3, num_labels=5, drop_path_rate=0.0,
                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **kw)
  if version == 2:
    return T.Swinv2Config(pretrained_window_sizes=[2, 4, 0], **common)
  return T.SwinConfig(**common)


@pytest.mark.parametrize("version,arch", [(1, "ForImageClassification"), (1, "Model"),
                                          (2, "ForImageClassification"), (2, "Model")])
def test_swin_parity(torch_hf, tmp_path, version, arch):
  torch, T = torch_hf
  name = ("Swinv2" if version == 2 else "Swin") + arch
  extra = {"use_absolute_embeddings": True} if (version, arch) == (1, "Model") else {}
  ref = _randomize(torch, getattr(T, name)(_swin_hf_config(T, version, **extra)))
  path = _save(ref, tmp_path)
  pixels = np.random.RandomState(5).randn(2, 3, 24, 32).astype(np.float32)
  with torch.no_grad():
    out = ref(torch.tensor(pixels), output_hidden_states=True)
  model, params = hf.load(path)
  assert model.config.version == version
  images = jnp.asarray(pixels.transpose(0, 2, 3, 1))
  result, aux = run(model, params, images)
  errs = {}
  if arch == "Model":
    check("pooler_output", result, _np(out.pooler_output), errs)
    check("last_hidden_state", aux["encoded"], _np(out.last_hidden_state), errs)
  else:
    check("logits", result, _np(out.logits), errs)
  assert len(aux["hidden_states"]) == len(out.hidden_states) == 4
  for k, (ours, theirs, shaped) in enumerate(zip(aux["hidden_states"], out.hidden_states,
                                                 out.reshaped_hidden_states)):
    check(f"hidden_states[{k}]", ours, _np(theirs), errs)
    b, c, h, w = shaped.shape
    check(f"reshaped_hidden_states[{k}]", np.asarray(ours).reshape(b, h, w, c).transpose(0, 3, 1, 2),
          _np(shaped), errs)
  print(name, {k: f"{v:.2e}" for k, v in errs.items()})


def test_swin_loads_both_weight_spellings(torch_hf, tmp_path):
  """transformers >= 5 names V1's weights in memory (q_proj, mlp.fc1, ...) unlike its
  save_pretrained files (attention.self.query, intermediate.dense, ...): both load."""
  torch, T = torch_hf
  ref = _randomize(torch, T.SwinForImageClassification(_swin_hf_config(T, 1)))
  path = _save(ref, tmp_path / "saved")
  config = json.loads((tmp_path / "saved" / "config.json").read_text())
  (tmp_path / "live").mkdir()
  (tmp_path / "live" / "config.json").write_text(json.dumps(config))
  hf.write_safetensors(str(tmp_path / "live" / "model.safetensors"),
                       {k: _np(v) for k, v in ref.state_dict().items()})
  _, a = hf.load(path)
  _, b = hf.load(str(tmp_path / "live"))
  jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.mark.parametrize("version", [1, 2])
def test_swin_export_parity(torch_hf, tmp_path, version):
  torch, T = torch_hf
  from datong.unimodal.encoders import ImageClassifier
  from datong.unimodal.swin import SwinConfig, swin_backbone
  bb = swin_backbone(8, (2, 2, 2), (2, 2, 4), version=version)
  cfg = SwinConfig(bb, depths=(2, 2, 2), heads=(2, 2, 4), window_size=3, image_size=(24, 32),
                   patch_size=2, version=version,
                   pretrained_window_sizes=(2, 4, 0) if version == 2 else ())
  model = ImageClassifier(cfg, 5)
  params = _random_params(model, jnp.zeros((1, 24, 32, 3)))
  hf.save(model, params, str(tmp_path))
  ref = getattr(T, "Swinv2ForImageClassification" if version == 2
                else "SwinForImageClassification").from_pretrained(str(tmp_path)).eval()
  pixels = np.random.RandomState(6).randn(2, 3, 24, 32).astype(np.float32)
  with torch.no_grad():
    out = ref(torch.tensor(pixels))
  logits, _ = run(model, params, jnp.asarray(pixels.transpose(0, 2, 3, 1)))
  err = check(f"exported swin v{version} logits", logits, _np(out.logits))
  _, back = hf.load(str(tmp_path))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6), back, params)
  print(f"swin v{version} export {err:.2e}")


def test_swin_unsupported_configs_are_named(torch_hf, tmp_path):
  torch, T = torch_hf
  cfg = _swin_hf_config(T, 2)
  cfg.image_size = (32, 24)  # HF V2 decides windows by the height alone: differs from Datong
  path = _save(T.Swinv2ForImageClassification(cfg), tmp_path)
  with pytest.raises(hf.UnsupportedError, match="window, shift"):
    hf.load(path)

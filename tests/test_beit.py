"""BEiT: blockwise masking statistics, layer scale, the relative-position
bias with [CLS] entries, the MIM loss, and parity with transformers' BEiT
(three classes, per-layer / shared bias, mean pooling on / off, every
checkpoint spelling, export back)."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from datong import hf
from datong.backbone import Attention, Block, Mlp, Norm, TransformerConfig, block_inputs
from datong.ops.masking import blockwise_mask, default_min_block, num_block_masked
from datong.ops.windows import grid_relative_position_index, relative_position_index
from datong.unimodal.beit import BEiT, BEiTConfig, beit_encoder, beit_loss
from datong.unimodal.encoders import ImageClassifier

TOL = 1e-5


# ----------------------------------------------------------------- masking

@pytest.mark.parametrize("grid", [(14, 14), (8, 8), (6, 10)])
def test_blockwise_mask_statistics(grid):
  """Over 400 draws: the count never passes round(0.4 n) and averages within
  5% of it; the mask is exactly the union of the recorded rectangles (so its
  blocks are contiguous), each inside the grid, strictly smaller than it,
  and with height / width in [0.3, 3.3] up to the rounding of each side."""
  f = jax.jit(blockwise_mask, static_argnums=(1, 2, 3))
  m = f(jax.random.PRNGKey(0), 400, grid, 0.4)
  gh, gw = grid
  target = num_block_masked(grid, 0.4)
  counts = np.asarray(m.mask).sum(1)
  assert counts.max() <= target
  assert abs(counts.mean() / target - 1.0) < 0.05, counts.mean()
  masks, blocks, added = np.asarray(m.mask), np.asarray(m.blocks), np.asarray(m.added)
  for mask, bl, ok in zip(masks, blocks, added):
    union = np.zeros(grid, bool)
    for top, left, h, w in bl[ok]:
      assert 0 <= top and top + h <= gh and 0 <= left and left + w <= gw
      assert 0 < h < gh and 0 < w < gw
      # h = round(sqrt(area * a)), w = round(sqrt(area / a)) with a in [0.3, 1/0.3]
      assert (h + 0.5) / (w - 0.5) >= 0.3 - 1e-6 and (h - 0.5) / (w + 0.5) <= 1 / 0.3 + 1e-6
      union[top:top + h, left:left + w] = True
    np.testing.assert_array_equal(mask.reshape(grid), union)
    assert not ok[np.argmin(ok):].any() or ok.all()  # steps stop after the first failure


def test_blockwise_mask_is_deterministic_per_key_and_scales_the_min_block():
  a = blockwise_mask(jax.random.PRNGKey(3), 8, (8, 8), 0.4).mask
  b = jax.jit(blockwise_mask, static_argnums=(1, 2, 3))(jax.random.PRNGKey(3), 8, (8, 8), 0.4).mask
  c = blockwise_mask(jax.random.PRNGKey(4), 8, (8, 8), 0.4).mask
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  assert default_min_block((14, 14)) == 16 and default_min_block((8, 8)) == 5
  # a large minimum block: every added rectangle was drawn with area >= 12
  m = blockwise_mask(jax.random.PRNGKey(0), 200, (14, 14), 0.4, min_block=30)
  bl = np.asarray(m.blocks)[np.asarray(m.added)]
  assert ((bl[:, 2] + 0.5) * (bl[:, 3] + 0.5) >= 30).all()
  with pytest.raises(ValueError, match="ratio"):
    blockwise_mask(jax.random.PRNGKey(0), 1, (8, 8), 1.0)
  with pytest.raises(ValueError, match="min_block"):
    blockwise_mask(jax.random.PRNGKey(0), 1, (8, 8), 0.4, min_block=40)


# ------------------------------------------------------- model pieces

def test_relative_position_index_with_cls_by_hand():
  gh, gw = 2, 3
  idx = grid_relative_position_index((gh, gw), cls=True)
  offsets = (2 * gh - 1) * (2 * gw - 1)
  for i in range(gh * gw):
    for j in range(gh * gw):
      dy, dx = i // gw - j // gw, i % gw - j % gw
      assert idx[i + 1, j + 1] == (dy + gh - 1) * (2 * gw - 1) + dx + gw - 1
  assert (idx[0, 1:] == offsets).all() and (idx[1:, 0] == offsets + 1).all()
  assert idx[0, 0] == offsets + 2
  np.testing.assert_array_equal(grid_relative_position_index((3, 3)), relative_position_index(3))


def test_layer_scale_multiplies_each_branch_before_the_residual():
  cfg = TransformerConfig(width=8, depth=1, heads=2, mlp_dim=16, layer_scale=0.1)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 8))
  args = (x, jnp.int32(0), jnp.float32(0.0), None, block_inputs())
  params = nn.unbox(Block(cfg).init(jax.random.PRNGKey(1), *args)["params"])
  np.testing.assert_array_equal(params["attention_layer_scale"], np.full(8, 0.1, np.float32))
  g1, g2 = np.linspace(0.5, 2, 8), np.linspace(-1, 1, 8)
  params = {**params, "attention_layer_scale": g1, "mlp_layer_scale": g2}
  out, _ = Block(cfg).apply({"params": params}, *args)
  plain = cfg.replace(layer_scale=0.0)
  sub = {k: v for k, v in params.items() if "layer_scale" not in k}
  # the branches by hand, from the parts of a block without layer scale
  n1 = Norm(plain).apply({"params": sub["attention_norm"]}, x)
  a, _ = Attention(plain).apply({"params": sub["attention"]}, n1)
  y = x + g1 * a
  n2 = Norm(plain).apply({"params": sub["mlp_norm"]}, y)
  want = y + g2 * Mlp(plain).apply({"params": sub["mlp"]}, n2)
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="layer_scale"):
    TransformerConfig(width=8, depth=1, heads=2, mlp_dim=16, layer_scale=-1.0)


def _tiny_beit(**kw):
  bb = TransformerConfig(width=16, depth=2, heads=2, mlp_dim=32)
  return beit_encoder(bb, image_size=8, patch_size=2, channels=1, **kw)


def test_beit_loss_is_cross_entropy_of_masked_tokens_and_gradients_skip_visible():
  cfg = BEiTConfig(_tiny_beit(), vocab_size=7)
  model = BEiT(cfg)
  images = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 1))
  mask = blockwise_mask(jax.random.PRNGKey(1), 2, (4, 4), 0.4).mask
  tokens = jax.random.randint(jax.random.PRNGKey(2), (2, 16), 0, 7)
  params = nn.unbox(model.init(jax.random.PRNGKey(3), images, mask)["params"])
  logits, _ = model.apply({"params": params}, images, mask)
  loss, metrics = beit_loss(logits, tokens, mask)
  lp = jax.nn.log_softmax(np.asarray(logits, np.float64))
  m = np.asarray(mask)
  want = -np.mean(np.take_along_axis(lp, np.asarray(tokens)[..., None], -1)[..., 0][m])
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  # changing a visible patch's target token leaves the loss unchanged
  other = jnp.where(mask, tokens, (tokens + 1) % 7)
  np.testing.assert_array_equal(beit_loss(logits, other, mask)[0], loss)
  assert 0.0 <= float(metrics["accuracy"]) <= 1.0


# ------------------------------------------------------------ HF parity

@pytest.fixture(scope="module")
def torch_hf():
  torch = pytest.importorskip("torch", reason="HF parity needs torch + transformers")
  transformers = pytest.importorskip("transformers", reason="HF parity needs torch + transformers")
  torch.set_num_threads(1)
  return torch, transformers


def rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  assert a.shape == b.shape, (a.shape, b.shape)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def check(name, a, b, errs):
  errs[name] = rel(a, b)
  assert errs[name] <= TOL, f"{name}: relative error {errs[name]:.3g} > {TOL}"


def _hf_config(T, bias, mean, absolute=False, **kw):
  return T.BeitConfig(
      image_size=8, patch_size=2, num_channels=3, hidden_size=16, num_hidden_layers=2,
      num_attention_heads=2, intermediate_size=32, vocab_size=11, num_labels=5,
      use_mask_token=True, use_relative_position_bias=bias == "layer",
      use_shared_relative_position_bias=bias == "shared", use_mean_pooling=mean,
      use_absolute_position_embeddings=absolute, layer_scale_init_value=0.1,
      drop_path_rate=0.0, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **kw)


def _randomize(torch, model):
  gen = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for _, p in model.named_parameters():
      p.add_(torch.randn(p.shape, generator=gen) * 0.1)
  return model.eval()


def _spellings(torch, ref, tmp_path):
  """save_pretrained (5.x), hub (4.x: the same names + relative_position_index
  buffers) and 5.x state_dict() with safetensors.torch."""
  from safetensors.numpy import load_file, save_file
  from safetensors.torch import save_file as save_torch
  import shutil
  paths = {"save_pretrained": tmp_path / "save_pretrained"}
  ref.save_pretrained(str(paths["save_pretrained"]), safe_serialization=True)
  tensors = load_file(str(paths["save_pretrained"] / "model.safetensors"))
  hub = dict(tensors)
  for k in tensors:
    if k.endswith("relative_position_bias_table"):
      hub[k[:-len("bias_table")] + "index"] = np.zeros((17, 17), np.int64)
  for name in ("hub", "state_dict"):
    paths[name] = tmp_path / name
    paths[name].mkdir()
    shutil.copy(paths["save_pretrained"] / "config.json", paths[name] / "config.json")
  save_file(hub, str(paths["hub"] / "model.safetensors"), metadata={"format": "pt"})
  save_torch({k: v.detach().clone().contiguous() for k, v in ref.state_dict().items()},
             str(paths["state_dict"] / "model.safetensors"), metadata={"format": "pt"})
  model, params = hf.load(str(paths["hub"]))
  for name in ("save_pretrained", "state_dict"):
    _, other = hf.load(str(paths[name]))
    jax.tree.map(np.testing.assert_array_equal, other, params)
  return model, params


def _run(model, params, *args, **kw):
  return jax.jit(lambda p, *a: model.apply({"params": p}, *a, **kw))(params, *args)


def _hidden_states(aux, out, errs):
  ours = [aux["embedded"]] + list(aux["layers"])
  assert len(ours) == len(out.hidden_states)
  for k, (a, b) in enumerate(zip(ours, out.hidden_states)):
    check(f"hidden_states[{k}]", a, b.detach().numpy(), errs)


CASES = [("layer", True), ("shared", False), ("layer", False), ("none", True)]


@pytest.mark.parametrize("arch", ["BeitForImageClassification", "BeitForMaskedImageModeling",
                                  "BeitModel"])
@pytest.mark.parametrize("bias,mean", CASES)
def test_beit_parity(torch_hf, tmp_path, arch, bias, mean):
  torch, T = torch_hf
  ref = _randomize(torch, getattr(T, arch)(_hf_config(T, bias, mean, absolute=bias == "none")))
  model, params = _spellings(torch, ref, tmp_path)
  rs = np.random.RandomState(1)
  pixels = rs.randn(2, 3, 8, 8).astype(np.float32)
  images = jnp.asarray(pixels.transpose(0, 2, 3, 1))
  mask = np.asarray(blockwise_mask(jax.random.PRNGKey(2), 2, (4, 4), 0.4).mask)
  errs = {}
  if arch == "BeitForMaskedImageModeling":
    tokens = rs.randint(0, 11, (2, 16))
    with torch.no_grad():
      out = ref(torch.tensor(pixels), bool_masked_pos=torch.tensor(mask),
                labels=torch.tensor(tokens[mask]), output_hidden_states=True)
    logits, aux = _run(model, params, images, jnp.asarray(mask), return_layers=True)
    check("logits", logits, out.logits.numpy(), errs)
    check("loss", beit_loss(logits, jnp.asarray(tokens), jnp.asarray(mask))[0], out.loss.numpy(), errs)
  elif arch == "BeitModel":
    with torch.no_grad():
      out = ref(torch.tensor(pixels), bool_masked_pos=torch.tensor(mask), output_hidden_states=True)
    pooled, aux = _run(model, params, images, mask=jnp.asarray(mask), return_layers=True)
    check("last_hidden_state", aux["encoded"], out.last_hidden_state.numpy(), errs)
    check("pooler_output", pooled, out.pooler_output.numpy(), errs)
  else:
    with torch.no_grad():
      out = ref(torch.tensor(pixels), output_hidden_states=True)
    logits, aux = _run(model, params, images, return_layers=True)
    check("logits", logits, out.logits.numpy(), errs)
  _hidden_states(aux, out, errs)
  print(arch, bias, mean, {k: f"{v:.1e}" for k, v in errs.items()})


@pytest.mark.parametrize("kind,bias,mean", [("classifier", "layer", True),
                                            ("classifier", "shared", False),
                                            ("mim", "layer", True)])
def test_beit_export_parity(torch_hf, tmp_path, kind, bias, mean):
  torch, T = torch_hf
  enc = _tiny_beit(relative_position_bias=bias, mean_pool=mean).replace(channels=3)
  images = jnp.zeros((1, 8, 8, 3))
  if kind == "mim":
    enc = enc.replace(pool_norm=False)
    model = BEiT(BEiTConfig(enc, vocab_size=11))
  else:
    model = ImageClassifier(enc, 5)
  shapes = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.PRNGKey(0), images)["params"]))
  rs = np.random.RandomState(0)
  params = jax.tree_util.tree_map_with_path(
      lambda p, s: (float(p[-1].key == "scale") + 0.1 * rs.standard_normal(s.shape)).astype(np.float32),
      shapes)
  hf.save(model, params, str(tmp_path))
  config = json.loads((tmp_path / "config.json").read_text())
  arch = config["architectures"][0]
  assert arch == ("BeitForMaskedImageModeling" if kind == "mim" else "BeitForImageClassification")
  ref = getattr(T, arch).from_pretrained(str(tmp_path)).eval()
  pixels = rs.randn(2, 3, 8, 8).astype(np.float32)
  mask = np.asarray(blockwise_mask(jax.random.PRNGKey(2), 2, (4, 4), 0.4).mask)
  with torch.no_grad():
    out = (ref(torch.tensor(pixels), bool_masked_pos=torch.tensor(mask)) if kind == "mim"
           else ref(torch.tensor(pixels)))
  x = jnp.asarray(pixels.transpose(0, 2, 3, 1))
  logits, _ = _run(model, params, x, jnp.asarray(mask)) if kind == "mim" else _run(model, params, x)
  errs = {}
  check("exported logits", logits, out.logits.numpy(), errs)
  _, back = hf.load(str(tmp_path))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6), back, params)
  print(kind, bias, mean, errs)


def test_beit_unsupported_is_named(torch_hf, tmp_path):
  torch, T = torch_hf
  cfg = _hf_config(T, "layer", True)
  cfg.use_shared_relative_position_bias = True
  T.BeitModel(cfg).save_pretrained(str(tmp_path / "both"))
  with pytest.raises(hf.UnsupportedError, match="both True"):
    hf.load(str(tmp_path / "both"))
  model = ImageClassifier(_tiny_beit().replace(backbone=_tiny_beit().backbone.replace(
      key_bias=True)), 3)
  params = nn.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)))["params"])
  with pytest.raises(hf.UnsupportedError, match="key_bias"):
    hf.save(model, params, str(tmp_path / "out"))


def test_scanned_layers_equal_unrolled_and_fine_tuning_starts_from_the_beit_encoder():
  from datong.train import warmstart  # pylint: disable=import-outside-toplevel
  from datong.train.tasks.vision import layer_ids  # pylint: disable=import-outside-toplevel
  enc = _tiny_beit(relative_position_bias="layer").replace(
      backbone=_tiny_beit().backbone.replace(depth=3))
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 1))
  model = BEiT(BEiTConfig(enc, vocab_size=7))
  params = nn.unbox(model.init(jax.random.PRNGKey(1), x)["params"])
  rs = np.random.RandomState(0)
  params = jax.tree.map(lambda a: a + 0.1 * rs.randn(*a.shape).astype(np.float32), params)
  out, _ = model.apply({"params": params}, x)
  scanned = BEiT(BEiTConfig(enc.replace(backbone=enc.backbone.replace(scan_layers=True)), 7))
  bb = params["encoder"]["backbone"]
  stacked = {"layers": jax.tree.map(lambda *a: jnp.stack(a), *[bb[f"layer_{i}"] for i in range(3)]),
             **{k: v for k, v in bb.items() if not k.startswith("layer_")}}
  out_scan, _ = scanned.apply({"params": {**params, "encoder": {**params["encoder"],
                                                                "backbone": stacked}}}, x)
  np.testing.assert_allclose(out_scan, out, rtol=1e-5, atol=1e-5)
  # a classifier on the same encoder config starts from the BEiT's encoder, exactly
  clf = ImageClassifier(enc, 10)
  fresh = nn.unbox(clf.init(jax.random.PRNGKey(2), x)["params"])
  merged = warmstart.merge_encoder(fresh, params, enc, at="encoder")
  jax.tree.map(np.testing.assert_array_equal, merged["encoder"], params["encoder"])
  ids = layer_ids(merged, 3)  # per-layer tables decay with their layer
  assert ids["encoder"]["backbone"]["layer_2"]["attention_bias"]["table"] == 3

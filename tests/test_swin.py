"""Swin: window ops, shifted-window attention against a direct [L, L]
computation, cosine attention, presets with the published sizes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import flax.linen as nn

from datong.backbone import Block, TransformerConfig, block_inputs
from datong.ops import windows as W
from datong.unimodal.encoders import ImageClassifier
from datong.unimodal.swin import SwinConfig, SwinStage, swin_backbone


def _params(module, *args, seed=0):
  return nn.unbox(module.init(jax.random.PRNGKey(seed), *args)["params"])


def test_partition_merge_round_trip_and_order():
  x = np.arange(2 * 6 * 9 * 3).reshape(2, 6, 9, 3)
  win = W.window_partition(x, 3)
  assert win.shape == (2 * 2 * 3, 9, 3)
  # window 1 of image 0 is rows 0-2, columns 3-5, row-major inside
  np.testing.assert_array_equal(win[1], x[0, 0:3, 3:6].reshape(9, 3))
  np.testing.assert_array_equal(win[6 + 2], x[1, 0:3, 6:9].reshape(9, 3))
  np.testing.assert_array_equal(W.window_merge(win, 3, (6, 9)), x)
  padded = W.pad_to_windows(jnp.asarray(x, jnp.float32), 4)
  assert padded.shape == (2, 8, 12, 3)
  np.testing.assert_array_equal(padded[:, :6, :9], x)
  assert float(jnp.abs(padded[:, 6:]).sum() + jnp.abs(padded[:, :, 9:]).sum()) == 0.0


def test_relative_position_index_equals_hand_built():
  m = 3
  want = np.zeros((m * m, m * m), int)
  for i in range(m * m):
    for j in range(m * m):
      dy, dx = i // m - j // m, i % m - j % m
      want[i, j] = (dy + m - 1) * (2 * m - 1) + (dx + m - 1)
  np.testing.assert_array_equal(W.relative_position_index(m), want)
  # the V2 coordinates row k is the offset index k names
  coords = W.log_spaced_coords(m)
  k = want[0, m * m - 1]  # offset (-2, -2): normalized to -8 -> -log2(9) / 3
  np.testing.assert_allclose(coords[k], [-np.log2(9) / 3] * 2, rtol=1e-6)


def test_stage_window_switches_the_shift_off_on_small_grids():
  assert W.stage_window((8, 12), 4, 2) == (4, 2)
  assert W.stage_window((4, 12), 4, 2) == (4, 0)
  assert W.stage_window((3, 5), 7, 3) == (3, 0)


def _direct_masks(hp, wp, h, w, m, shift):
  """[L, L] attend-mask over the padded grid in image order, by definition: same
  window of the rolled grid, and on each axis both tokens wrapped around by the
  roll or neither; plus the in-window (row, col) of each token."""
  ys, xs = np.meshgrid(np.arange(hp), np.arange(wp), indexing="ij")
  ys, xs = ys.reshape(-1), xs.reshape(-1)
  ry, rx = (ys - shift) % hp, (xs - shift) % wp
  win = (ry // m) * (wp // m) + rx // m
  wy, wx = ys < shift, xs < shift
  mask = ((win[:, None] == win[None]) & (wy[:, None] == wy[None]) & (wx[:, None] == wx[None]))
  valid = (ys < h) & (xs < w)
  return mask, (ry % m, rx % m), valid


@pytest.mark.parametrize("version", [1, 2])
def test_shifted_window_attention_equals_direct_masked_attention(version):
  """A stage of two layers (plain, then shifted windows) on a 5 x 7 grid with
  window 3 (padded to 6 x 9) equals the same blocks run on the whole padded
  grid with an explicit [L, L] mask and bias."""
  bb = swin_backbone(8, (2,), (2,), version=version)
  cfg = SwinConfig(bb, depths=(2,), heads=(2,), window_size=3, image_size=(10, 14),
                   patch_size=2, version=version,
                   pretrained_window_sizes=(5,) if version == 2 else ())
  stage = SwinStage(cfg, 0, merge=False)
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 5, 7, 8))
  params = _params(stage, x, 0)
  out, _, _, _ = stage.apply({"params": params}, x, 0)

  h, w, m = 5, 7, 3
  hp, wp = 6, 9
  y = jnp.pad(x, ((0, 0), (0, hp - h), (0, wp - w), (0, 0))).reshape(2, hp * wp, 8)
  for i, shift in enumerate((0, 1)):
    p = dict(params[f"layer_{i}"])
    hook = p.pop("attention_bias")
    mask, (py, px), valid = _direct_masks(hp, wp, h, w, m, shift)
    index = ((py[:, None] - py[None] + m - 1) * (2 * m - 1) + px[:, None] - px[None] + m - 1)
    if version == 1:
      table = np.asarray(hook["table"])
    else:
      hid = np.maximum(W.log_spaced_coords(m, 5) @ np.asarray(hook["hidden"]["kernel"])
                       + np.asarray(hook["hidden"]["bias"]), 0.0)
      table = 16 / (1 + np.exp(-(hid @ np.asarray(hook["out"]["kernel"]))))
    bias = jnp.asarray(table[index].transpose(2, 0, 1)[None], jnp.float32)
    block = Block(cfg.stage_backbone(0))
    keep = jnp.asarray(np.broadcast_to(valid, (2, hp * wp)))
    y, _ = block.apply({"params": p}, y, jnp.int32(i), jnp.float32(0.0), None,
                       block_inputs(mask=jnp.asarray(mask)[None, None], bias=bias,
                                    attention_input_mask=keep))
    # padded positions restart from zero in every layer
    y = jnp.where(keep[..., None], y, 0.0)
  direct = y.reshape(2, hp, wp, 8)[:, :h, :w]
  np.testing.assert_allclose(out, direct, rtol=1e-5, atol=1e-5)


def test_shifted_window_mask_matches_direct_definition():
  hp, wp, m, s = 6, 9, 3, 1
  mask = W.shifted_window_mask((hp, wp), m, s)
  direct, _, _ = _direct_masks(hp, wp, hp, wp, m, s)
  # image order -> rolled-window order
  ys, xs = np.meshgrid(np.arange(hp), np.arange(wp), indexing="ij")
  rolled = np.roll(np.stack([ys, xs], -1), (-s, -s), axis=(0, 1))[None]
  pos = W.window_partition(rolled, m)  # [windows, m*m, 2]: image coordinates
  flat = pos[..., 0] * wp + pos[..., 1]
  for k in range(mask.shape[0]):
    np.testing.assert_array_equal(mask[k], direct[np.ix_(flat[k], flat[k])])


def test_cosine_attention_equals_its_definition():
  cfg = TransformerConfig(width=8, depth=1, heads=2, mlp_dim=16, cosine_attention=True,
                          key_bias=False, norm_position="residual_post")
  from datong.backbone import Attention
  att = Attention(cfg)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 8))
  params = _params(att, x)
  assert "bias" not in params["key"] and params["logit_scale"].shape == (2,)
  np.testing.assert_allclose(params["logit_scale"], np.log(10.0), rtol=1e-6)
  params["logit_scale"] = jnp.array([1.0, 6.0])  # the second is clamped at log(100)
  out, _ = att.apply({"params": params}, x)
  q = jnp.einsum("bld,dhk->blhk", x, params["query"]["kernel"]) + params["query"]["bias"]
  k = jnp.einsum("bld,dhk->blhk", x, params["key"]["kernel"])
  v = jnp.einsum("bld,dhk->blhk", x, params["value"]["kernel"]) + params["value"]["bias"]
  cos = jnp.einsum("bqhk,bshk->bhqs", q / jnp.linalg.norm(q, axis=-1, keepdims=True),
                   k / jnp.linalg.norm(k, axis=-1, keepdims=True))
  logits = cos * jnp.array([np.e, 100.0])[None, :, None, None]
  ctx = jnp.einsum("bhqs,bshk->bqhk", jax.nn.softmax(logits, -1), v)
  want = jnp.einsum("bqhk,hkd->bqd", ctx, params["out"]["kernel"]) + params["out"]["bias"]
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,millions", [("swin-T", 28.3), ("swin-S", 49.6), ("swin-B", 87.8),
                                           ("swinv2-T", 28.3), ("swinv2-S", 49.7),
                                           ("swinv2-B", 87.9)])
def test_presets_have_the_published_parameter_counts(name, millions):
  cfg = SwinConfig.preset(name)
  model = ImageClassifier(cfg, 1000)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                             jnp.zeros((1,) + cfg.image_size + (3,))))
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.unbox(shapes)))
  assert round(n / 1e6, 1) == millions


def test_swin_t_flops_are_the_published_4_5_gflops():
  assert round(SwinConfig.preset("swin-T").flops_per_example() / 6e9, 1) == 4.5


def test_bad_configs_name_the_field():
  bb = swin_backbone(8, (2, 2), (2, 4))
  with pytest.raises(ValueError, match="SwinConfig.heads"):
    SwinConfig(bb, depths=(2, 2), heads=(2,))
  with pytest.raises(ValueError, match="swin_backbone"):
    SwinConfig(bb, depths=(2, 2), heads=(2, 4), version=2)
  with pytest.raises(ValueError, match="pretrained_window_sizes"):
    SwinConfig(bb, depths=(2, 2), heads=(2, 4), pretrained_window_sizes=(4, 4))
  with pytest.raises(ValueError, match="SwinConfig.backbone"):
    SwinConfig(bb, depths=(2, 3), heads=(2, 4))
  with pytest.raises(ValueError, match="key_bias"):
    TransformerConfig(width=8, depth=1, heads=2, mlp_dim=8, use_bias=False, key_bias=False)


def test_remat_gives_the_same_outputs_and_gradients():
  from datong.unimodal.swin import SwinEncoder
  bb = swin_backbone(8, (2, 1), (2, 2))
  cfg = SwinConfig(bb, depths=(2, 1), heads=(2, 2), window_size=2, image_size=(8, 8),
                   patch_size=2, channels=1)
  images = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 1))
  params = jax.jit(SwinEncoder(cfg).init)(jax.random.PRNGKey(1), images)["params"]

  def grads(c):
    f = lambda p: jnp.sum(SwinEncoder(c).apply({"params": p}, images)[0] ** 2)
    return jax.jit(jax.value_and_grad(f))(params)
  (a, ga), (b, gb) = grads(cfg), grads(cfg.replace(backbone=bb.replace(remat="full")))
  np.testing.assert_allclose(a, b, rtol=1e-6)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), ga, gb)
  with pytest.raises(ValueError, match="scan_layers"):
    cfg.replace(backbone=bb.replace(scan_layers=True))


def test_moe_swin_passes_every_layers_auxiliary_losses_up():
  from datong.backbone_config import MoEConfig
  from datong.train.task import with_aux_losses
  from datong.unimodal.swin import SwinEncoder
  # Experts in layers 1 and 2 (every=2 over 4 layers: 0-1 in stage 0, 2-3 in stage 1 -> 1, 3).
  bb = swin_backbone(8, (2, 2), (2, 2), moe=MoEConfig(experts=2, top_k=1, every=2))
  cfg = SwinConfig(bb, depths=(2, 2), heads=(2, 2), window_size=2, image_size=(8, 8),
                   patch_size=2, channels=1)
  images = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 1))
  params = nn.unbox(jax.jit(SwinEncoder(cfg).init)(jax.random.PRNGKey(1), images)["params"])
  assert "router" in params["stage_0"]["layer_1"]["mlp"]
  assert "router" in params["stage_1"]["layer_1"]["mlp"]
  _, aux = SwinEncoder(cfg).apply({"params": params}, images)
  per_layer = aux["layer_losses"]["moe_load_balancing"]
  assert per_layer.shape == (4,) and float(per_layer[0]) == float(per_layer[2]) == 0.0
  assert float(per_layer[1]) > 0 and float(per_layer[3]) > 0  # >= 0.01: the weight x >= 1
  np.testing.assert_allclose(aux["losses"]["moe_load_balancing"], per_layer.sum(), rtol=1e-6)
  assert aux["moe"]["expert_load"].shape == (2, 2)
  assert {"moe/layer_1/moe_load_balancing", "moe/layer_3/dropped_fraction"} <= set(aux["metrics"])
  # The task sees them, and their gradient reaches the routers of both stages.
  assert set(with_aux_losses({}, aux)["aux_losses"]) == {"moe_load_balancing", "moe_router_z"}
  g = jax.grad(lambda p: sum(SwinEncoder(cfg).apply({"params": p}, images)[1]["losses"].values()))(
      params)
  for stage in ("stage_0", "stage_1"):
    assert float(jnp.linalg.norm(g[stage]["layer_1"]["mlp"]["router"])) > 0
  # A dense Swin adds no losses key.
  dense = SwinEncoder(cfg.replace(backbone=bb.replace(moe=MoEConfig())))
  _, dense_aux = dense.apply(dense.init(jax.random.PRNGKey(1), images), images)
  assert "losses" not in dense_aux and "moe" not in dense_aux

"""Swin wherever an image encoder is taken: classifier (mixup, label
smoothing, stage-aware layer-wise lr decay), probes, SimMIM, CLIP's image
tower, the registry and the notebook."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from datong import registry
from datong.backbone import TransformerConfig
from datong.unimodal import masked_image as mim
from datong.unimodal.encoders import ImageClassifier
from datong.unimodal.swin import SwinConfig, swin_backbone


def _tiny_swin(**kw):
  """8x8 digits, 2x2 patches: a 4x4 grid in 2x2 windows (shifted in layer 1),
  merged to 2x2 (one window, no shift)."""
  depths, heads = (2, 1), (2, 4)
  return SwinConfig(swin_backbone(16, depths, heads, mlp_ratio=2), depths=depths, heads=heads,
                    window_size=2, image_size=(8, 8), patch_size=(2, 2), channels=1, **kw)


def test_classifier_trains_with_mixup_smoothing_and_stage_aware_layer_decay():
  from datong.train.tasks.vision import ViTClassifierConfig, layer_ids
  task = ViTClassifierConfig(model=_tiny_swin(), label_smoothing=0.1, mixup=0.2,
                             layer_decay=0.5)
  built = task.build()
  spec = built.batch_spec(2)
  params = nn.unbox(jax.jit(lambda r: built.init(r, spec))(jax.random.PRNGKey(0))["params"])
  ids = layer_ids(params, 3, task.model.layer_index)
  enc = ids["encoder"]
  assert enc["patch_embedding"]["kernel"] == enc["stem_norm"]["norm"]["scale"] == 0
  assert enc["stage_0"]["layer_0"]["attention"]["query"]["kernel"] == 1
  assert enc["stage_0"]["layer_1"]["attention_bias"]["table"] == 2
  assert enc["stage_0"]["reduction"]["kernel"] == 2  # the merging goes with its stage
  assert enc["stage_1"]["layer_0"]["mlp"]["wi"]["kernel"] == 3
  assert enc["final_norm"]["norm"]["scale"] == ids["head"]["kernel"] == 4
  scale = built.learning_rate_scale(params)
  assert scale["encoder"]["stage_1"]["layer_0"]["mlp"]["wi"]["kernel"] == 0.5
  assert scale["encoder"]["patch_embedding"]["kernel"] == 0.5 ** 4
  rs = np.random.RandomState(0)
  batch = {"image": jnp.asarray(rs.randn(8, 8, 8, 1), jnp.float32),
           "label": jnp.asarray(rs.randint(0, 10, 8), jnp.int32)}
  step = jax.jit(jax.value_and_grad(lambda p: built.loss(p, batch, jax.random.PRNGKey(1))[0]))
  loss, grads = step(params)
  # smoothed, mixed targets over 10 classes from a zero head: exactly log(10)
  np.testing.assert_allclose(loss, np.log(10.0), rtol=1e-5)
  assert float(jnp.abs(grads["head"]["kernel"]).sum()) > 0


def test_probe_features_from_every_layer():
  from datong.train.tasks.probes import select_features
  cfg = _tiny_swin()
  enc = cfg.make()
  images = jnp.ones((3, 8, 8, 1))
  params = jax.jit(enc.init)(jax.random.PRNGKey(0), images)["params"]
  _, aux = jax.jit(lambda p, x: enc.apply({"params": p}, x, return_layers=True))(params, images)
  assert [a.shape for a in aux["layers"]] == [(3, 16, 16), (3, 16, 16), (3, 4, 32)]
  assert select_features(aux, "layers").shape == (3, 16 + 16 + 32 + 2 * 32)
  assert select_features(aux, "pooled").shape == (3, cfg.width) == (3, 32)


def test_simmim_on_swin_masks_stride_cells_and_predicts_their_pixels():
  cfg = mim.SimMIMConfig(_tiny_swin(), mask_ratio=0.5)
  assert cfg.encoder.mask_token and cfg.mask_cell == (4, 4) == (cfg.encoder.stride,) * 2
  mask = mim.simmim_masking(jax.random.PRNGKey(0), 2, cfg)  # over the 4x4 input patches
  out = mim.output_mask(mask, cfg)  # over the 2x2 output tokens
  cells = np.asarray(mask).reshape(2, 2, 2, 2, 2)  # [b, out row, in row, out col, in col]
  assert (cells == cells[:, :, :1, :, :1]).all()  # each stride cell is all masked or not
  np.testing.assert_array_equal(cells[:, :, 0, :, 0].reshape(2, 4), np.asarray(out))
  assert int(out.sum()) == 4  # half of each image's 4 cells
  model = mim.SimMIM(cfg)
  images = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 8, 1))
  params = jax.jit(model.init)(jax.random.PRNGKey(0), images, mask)["params"]
  pred, aux = model.apply({"params": params}, images, mask)
  assert pred.shape == (2, 4, 16)  # 4 output tokens, 4x4 pixels each
  loss, metrics = mim.simmim_loss(pred, images, out, mim.output_patch(cfg.encoder))
  assert float(metrics["mask_fraction"]) == 0.5 and np.isfinite(float(loss))
  # masked patches see the mask token, not the image: changing them changes nothing there
  pixels = mim.patch_mask_to_pixels(out, (8, 8), (4, 4))[..., None]
  other = jnp.where(pixels, 0.0, images)
  _, aux2 = model.apply({"params": params}, other, mask)
  np.testing.assert_allclose(aux["embedded"], aux2["embedded"], rtol=1e-6, atol=1e-6)
  rec = mim.reconstruct(model, params, images, jax.random.PRNGKey(2))
  assert rec["reconstruction"].shape == images.shape


def test_swin_is_clips_image_tower():
  from datong.multimodal.clip import CLIP, ClipConfig
  from datong.unimodal.text import TextConfig
  text = TextConfig(backbone=TransformerConfig(width=16, depth=1, heads=2, mlp_dim=32),
                    positions="learned", max_length=8)
  model = CLIP(ClipConfig(image=_tiny_swin(), text=text, embed_dim=8))
  images, ids = registry.example_inputs(model, 2, 0)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), images, ids)["params"]
  img, txt, _ = jax.jit(lambda p: model.apply({"params": p}, images, ids))(params)
  assert img.shape == txt.shape == (2, 8)
  assert "stage_1" in params["image"]["encoder"]
  with pytest.raises(ValueError, match="shared backbone"):
    shared = CLIP(ClipConfig(image=_tiny_swin(), text=dataclasses.replace(
        text, backbone=_tiny_swin().backbone), embed_dim=8, share_backbone=True))
    shared.init(jax.random.PRNGKey(0), images, ids)


def test_notebook_builds_swin_and_maps_attention_per_window():
  from datong import notebook
  big = notebook.build("swin", "swin-T")
  assert registry.kind_of(big).name == "swin" and big.config.window_size == 7
  assert notebook.build("swinv2", "swinv2-T").config.version == 2
  model = notebook.build("swin", "tiny", num_classes=3, image_size=(16, 16), window_size=2)
  assert registry.kind_of(model).name == "swin"
  (images,) = notebook.example_inputs(model, 2)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), images)["params"]
  h, w = model.config.grid
  for layer in (0, 1, -1):  # plain windows, shifted windows, the merged stage
    maps = notebook.attention_maps(model, params, images, layer=layer)
    gh, gw = model.config.stage_grids()[0 if layer in (0, 1) else 1]
    assert maps.shape == (2, model.config.heads[0 if layer in (0, 1) else 1], gh, gw)
    np.testing.assert_allclose(maps.sum(axis=(2, 3)), 1.0, rtol=1e-5)
  assert (h, w) == (8, 8)


def test_swin_classifier_param_count_through_registry():
  model = ImageClassifier(SwinConfig.preset("swin-T"), 1000)
  assert registry.kind_of(model).name == "swin"
  assert registry.kind_of(ImageClassifier(registry.get("vit").default_config(
      TransformerConfig.preset("tiny")), 10)).name == "vit"

"""Vision: patch stem, ViT, MAE, SimMIM, probes, and the digits recipes' tasks."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from datong.backbone import TransformerConfig
from datong.ops.patches import patchify
from datong.ops.posemb import interpolate_2d
from datong.unimodal import masked_image as mim
from datong.train.tasks import images as timg
from datong.train.tasks import probes
from datong.train.tasks import vision as vt
from datong.unimodal.vision import PatchEmbedding, ViTConfig, ViTEncoder, \
    image_to_patches, patches_to_image

TINY = TransformerConfig(width=32, depth=2, heads=2, mlp_dim=64)
DEC = TransformerConfig(width=16, depth=1, heads=2, mlp_dim=32)


def _vit(**kw):
  kw = {"image_size": (8, 8), "patch_size": (2, 2), "channels": 1, **kw}
  return ViTConfig(TINY, **kw)


def _images(shape, seed=0):
  return jax.random.uniform(jax.random.PRNGKey(seed), shape, minval=-1, maxval=1)


# ------------------------------------------------------------------- stem

def test_patchify_unpatchify_exact_inverse_non_square_through_stem():
  cfg = _vit(image_size=(6, 12), patch_size=(2, 3), channels=3)
  x = _images((2, 6, 12, 3))
  patches = image_to_patches(x, cfg)
  assert patches.shape == (2, 3 * 4, 2 * 3 * 3)
  np.testing.assert_array_equal(patches_to_image(patches, cfg), x)
  # The stem's projection is a Dense on exactly these patches (= a strided conv).
  stem = PatchEmbedding(8, cfg.patch_size, cfg.image_size, posemb="none")
  params = stem.init(jax.random.PRNGKey(0), x)
  kernel = nn.unbox(params)["params"]["projection"]["kernel"]
  np.testing.assert_allclose(stem.apply(params, x), patches @ kernel, atol=1e-5)
  conv = jax.lax.conv_general_dilated(
      x, kernel.reshape(2, 3, 3, 8), window_strides=(2, 3), padding="VALID",
      dimension_numbers=("NHWC", "HWIO", "NHWC"))
  np.testing.assert_allclose(stem.apply(params, x), conv.reshape(2, 12, 8), atol=1e-5)


def test_stem_params_carry_logical_axis_names():
  variables = ViTEncoder(_vit()).init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)))
  stem = variables["params"]["stem"]
  assert stem["projection"]["kernel"].names == ("patch", "embed")
  assert stem["pos_embedding"].names == (None, "embed")
  assert variables["params"]["cls"].names == ("embed",)


def test_position_embedding_interpolation_identity_and_resize():
  stem = PatchEmbedding(8, (2, 2), (8, 8))
  x = _images((1, 8, 8, 1))
  params = stem.init(jax.random.PRNGKey(0), x)
  p = nn.unbox(params)["params"]
  table = p["pos_embedding"]
  np.testing.assert_array_equal(interpolate_2d(table, (4, 4), (4, 4)), table)
  # At the pretraining resolution the stem adds the table itself.
  direct = patchify(x, 2) @ p["projection"]["kernel"] + p["projection"]["bias"] + table
  np.testing.assert_allclose(stem.apply(params, x), direct, atol=1e-6)
  # A new resolution (fine-tuning) resamples it; a constant table stays constant.
  bigger = stem.apply(params, _images((1, 12, 16, 1)))
  assert bigger.shape == (1, 6 * 8, 8)
  const = interpolate_2d(jnp.ones((16, 8)), (4, 4), (6, 8))
  np.testing.assert_allclose(const, 1.0, atol=1e-5)


def test_encoder_pooling_and_aux():
  x = _images((2, 8, 8, 1))
  for pool, length in (("cls", 17), ("gap", 16)):
    cfg = _vit(pool=pool)
    params = ViTEncoder(cfg).init(jax.random.PRNGKey(0), x)
    pooled, aux = ViTEncoder(cfg).apply(params, x)
    assert pooled.shape == (2, 32) and aux["encoded"].shape == (2, length, 32)
    assert aux["patch_tokens"].shape == (2, 16, 32)


# ---------------------------------------------------------------- masking

@pytest.mark.parametrize("n,ratio", [(16, 0.75), (49, 0.75), (10, 0.33), (64, 0.6)])
def test_random_masking_counts_and_restore(n, ratio):
  m = mim.random_masking(jax.random.PRNGKey(n), 5, n, ratio)
  n_mask = round(ratio * n)
  np.testing.assert_array_equal(np.sum(m.mask, axis=1), n_mask)
  assert m.keep_indices.shape == (5, n - n_mask)
  for b in range(5):
    assert set(np.asarray(m.keep_indices[b]).tolist()) == set(np.flatnonzero(~np.asarray(m.mask[b])))
  # Rebuild the shuffle from keep + masked and check restore inverts it.
  shuffle = np.argsort(np.asarray(m.restore_indices), axis=1)
  np.testing.assert_array_equal(shuffle[:, :n - n_mask], m.keep_indices)
  np.testing.assert_array_equal(
      np.take_along_axis(shuffle, np.asarray(m.restore_indices), axis=1),
      np.broadcast_to(np.arange(n), (5, n)))
  # Different examples get different masks.
  assert len({tuple(np.asarray(r)) for r in m.mask}) > 1


def test_block_masking_granularity():
  mask = mim.block_masking(jax.random.PRNGKey(0), 4, (16, 16), 2, 4, 0.5)
  cells = np.asarray(mask).reshape(4, 4, 2, 4, 2)  # [b, cell_y, y, cell_x, x]
  assert (cells == cells[:, :, :1, :, :1]).all()  # constant inside each 4x4 cell
  np.testing.assert_array_equal(cells[:, :, 0, :, 0].sum((1, 2)), 8)


def test_avg_dist_equals_brute_force():
  rng = np.random.default_rng(0)
  for _ in range(3):
    mask = rng.random((7, 9)) < 0.7
    masked, visible = np.argwhere(mask), np.argwhere(~mask)
    d = np.sqrt(((masked[:, None] - visible[None]) ** 2).sum(-1)).min(1)
    assert mim.avg_dist(mask) == pytest.approx(d.mean(), rel=1e-6)
  block = np.asarray(mim.patch_mask_to_pixels(
      mim.block_masking(jax.random.PRNGKey(1), 2, (16, 16), 2, 8, 0.5), (16, 16), 2))
  brute = []
  for m in block:
    masked, visible = np.argwhere(m), np.argwhere(~m)
    brute.append(np.sqrt(((masked[:, None] - visible[None]) ** 2).sum(-1)).min(1))
  assert mim.avg_dist(block) == pytest.approx(np.concatenate(brute).mean(), rel=1e-6)


# -------------------------------------------------------------------- MAE

def _mae_cfg(**kw):
  return mim.MAEConfig(_vit(posemb="sincos"), DEC, **kw)


def test_mae_encoder_sees_only_visible_tokens():
  cfg = _mae_cfg()
  x = _images((3, 8, 8, 1))
  m = mim.random_masking(jax.random.PRNGKey(0), 3, 16, 0.75)
  model = mim.MAE(cfg)
  params = model.init(jax.random.PRNGKey(1), x, m.keep_indices, m.restore_indices)
  pred, aux = model.apply(params, x, m.keep_indices, m.restore_indices)
  assert aux["embedded"].shape == (3, 4 + 1, 32)  # 4 kept patches + CLS
  assert aux["encoded"].shape == (3, 5, 32)
  assert pred.shape == (3, 16, 4) and aux["decoded"].shape == (3, 16, 16)
  # Masked patches' pixels cannot reach the encoder: changing them changes nothing there.
  pix = np.asarray(mim.patch_mask_to_pixels(m.mask, (8, 8), 2))[..., None]
  x2 = jnp.where(pix, 5.0, x)
  _, aux2 = model.apply(params, x2, m.keep_indices, m.restore_indices)
  np.testing.assert_allclose(aux2["encoded"], aux["encoded"], atol=1e-6)


@pytest.mark.parametrize("norm_pix", [True, False])
def test_mae_loss_only_counts_masked_patches(norm_pix):
  m = mim.random_masking(jax.random.PRNGKey(0), 2, 16, 0.75)
  pred = _images((2, 16, 4), seed=1)
  target = _images((2, 8, 8, 1), seed=2)
  pix = np.asarray(mim.patch_mask_to_pixels(m.mask, (8, 8), 2))[..., None]
  loss = lambda t: float(mim.mae_loss(pred, t, m.mask, 2, norm_pix=norm_pix)[0])
  noise = _images((2, 8, 8, 1), seed=3)
  assert loss(jnp.where(pix, target, noise)) == pytest.approx(loss(target), abs=1e-6)
  assert abs(loss(jnp.where(pix, noise, target)) - loss(target)) > 1e-3


def test_simmim_loss_only_counts_masked_pixels():
  mask = mim.block_masking(jax.random.PRNGKey(0), 2, (8, 8), 2, 4, 0.5)
  pred = _images((2, 16, 4), seed=1)
  target = _images((2, 8, 8, 1), seed=2)
  pix = np.asarray(mim.patch_mask_to_pixels(mask, (8, 8), 2))[..., None]
  loss = lambda t: float(mim.simmim_loss(pred, t, mask, 2)[0])
  noise = _images((2, 8, 8, 1), seed=3)
  assert loss(jnp.where(pix, target, noise)) == pytest.approx(loss(target), abs=1e-6)
  assert abs(loss(jnp.where(pix, noise, target)) - loss(target)) > 1e-3


def test_simmim_replaces_masked_patches_with_mask_token():
  cfg = mim.SimMIMConfig(_vit(), mask_patch_size=4, mask_ratio=0.5)
  assert cfg.encoder.mask_token
  x = _images((2, 8, 8, 1))
  mask = mim.simmim_masking(jax.random.PRNGKey(0), 2, cfg)
  np.testing.assert_array_equal(mask, mim.block_masking(jax.random.PRNGKey(0), 2, (8, 8), 2, 4, 0.5))
  model = mim.SimMIM(cfg)
  params = model.init(jax.random.PRNGKey(1), x, mask)
  pred, aux = model.apply(params, x, mask)
  assert pred.shape == (2, 16, 4)
  # Pixels under the mask do not influence the output at all.
  pix = np.asarray(mim.patch_mask_to_pixels(mask, (8, 8), 2))[..., None]
  pred2, _ = model.apply(params, jnp.where(pix, 3.0, x), mask)
  np.testing.assert_allclose(pred2, pred, atol=1e-5)


def test_simmim_mask_cell_default_is_two_patches_when_they_tile():
  paper = mim.SimMIMConfig(ViTConfig(TINY, image_size=224, patch_size=16))
  assert paper.mask_patch_size is None and paper.mask_cell == (32, 32)
  assert mim.SimMIMConfig(_vit(image_size=(6, 8))).mask_cell == (2, 2)
  assert mim.SimMIMConfig(_vit(), mask_patch_size=8).mask_cell == (8, 8)
  with pytest.raises(ValueError, match="multiple of the patch size"):
    mim.SimMIMConfig(_vit(), mask_patch_size=3)


def test_reconstruction_png(tmp_path):
  x = np.asarray(_images((3, 8, 8, 1)))
  path = mim.save_reconstruction_grid(str(tmp_path / "r.png"), x, np.where(x > 0, np.nan, x), x)
  from PIL import Image
  assert Image.open(path).size == (4 * (3 * 10 + 2), 4 * (3 * 10 + 2))


# ------------------------------------------------------ data and evaluation

def test_augmentation_identity_and_shift():
  data = timg.ImageData(upsample=2)
  ex = data({"image": np.arange(64, dtype=np.uint8).reshape(8, 8, 1) * 4, "label": 3},
            np.random.default_rng(0), True)
  assert ex["image"].shape == (16, 16, 1) and ex["label"] == 3
  x = _images((2, 8, 8, 1))
  np.testing.assert_allclose(timg.random_affine(x, jax.random.PRNGKey(0)), x, atol=1e-6)
  y = timg.random_affine(x, jax.random.PRNGKey(0), shift=2.0)
  assert y.shape == x.shape and not np.allclose(y, x)


def test_probe_and_knn_on_separable_features():
  rng = np.random.default_rng(0)
  centers = rng.normal(size=(3, 5)) * 5
  y = rng.integers(0, 3, 90)
  x = centers[y] + rng.normal(size=(90, 5))
  assert probes.linear_probe(x[:60], y[:60], x[60:], y[60:]) == 1.0
  assert probes.knn_accuracy(x[:60], y[:60], x[60:], y[60:], k=3) == 1.0


def test_token_pool_averages_non_overlapping_cells_of_the_token_grid():
  from datong.ops.patches import pool_tokens  # pylint: disable=import-outside-toplevel
  tokens = np.arange(2 * 16 * 3, dtype=np.float32).reshape(2, 16, 3)  # a 4x4 grid, width 3
  grid = tokens.reshape(2, 4, 4, 3)
  want = np.stack([grid[:, r:r + 2, c:c + 2].mean((1, 2)) for r in (0, 2) for c in (0, 2)], 1)
  np.testing.assert_allclose(pool_tokens(jnp.asarray(tokens), (4, 4), 2), want)  # raster cells
  np.testing.assert_array_equal(pool_tokens(jnp.asarray(tokens), (4, 4), 1), tokens)
  aux = {"patch_tokens": jnp.asarray(tokens), "encoded": jnp.asarray(tokens), "pooled": None}
  np.testing.assert_allclose(probes.select_features(aux, "tokens", 2), want.reshape(2, 12))
  with pytest.raises(ValueError, match="4x4 grid"):
    pool_tokens(jnp.asarray(tokens), (4, 4), 3)
  with pytest.raises(ValueError, match="token_pool"):
    probes.ProbeConfig(features="pooled", token_pool=2)
  with pytest.raises(ValueError, match="token_pool"):
    probes.ProbeConfig(features="tokens", token_pool=0)


def test_probe_train_views_add_augmented_copies_of_the_train_split():
  rng = np.random.default_rng(0)
  images = {"train": rng.normal(size=(40, 4, 4, 1)).astype(np.float32),
            "test": rng.normal(size=(12, 4, 4, 1)).astype(np.float32)}
  labels = {k: (v.mean((1, 2, 3)) > 0).astype(np.int32) for k, v in images.items()}

  class Ctx:
    def batches(self, split, batch_size):
      for i in range(0, len(images[split]), 16):
        yield {"image": images[split][i:i + 16], "label": labels[split][i:i + 16]}

  seen = []

  def features(params, x):
    seen.append(np.asarray(x))
    return {"": np.asarray(x).reshape(len(x), -1)}

  def augment(x, key):  # a shift by a per-batch random constant
    return x + jax.random.uniform(key, ())

  probe = probes.ProbeConfig(train_views=3, c=1.0)
  m = probes.probe_metrics(features, None, Ctx(), probe, "train", "test", augment)
  assert 0.0 <= m["eval/linear_probe_accuracy"] <= 1.0
  train_seen = np.concatenate(seen[:9])  # 3 views x 3 batches of train, then test
  assert len(train_seen) == 120 and len(np.concatenate(seen[9:])) == 12
  np.testing.assert_array_equal(train_seen[:40], images["train"])  # view 0: as is
  shift1, shift2 = (train_seen[40 * v:40 * (v + 1)] - images["train"] for v in (1, 2))
  assert np.all(shift1 != 0) and np.all(shift2 != 0) and not np.allclose(shift1, shift2)
  np.testing.assert_array_equal(np.concatenate(seen[9:]), images["test"])  # test: never
  with pytest.raises(ValueError, match="needs an augmentation"):
    probes.probe_metrics(features, None, Ctx(), probe, "train", "test", None)
  with pytest.raises(ValueError, match="train_views"):
    probes.ProbeConfig(train_views=0)


def test_layer_wise_lr_decay_scales(tmp_path):
  cfg = vt.ViTClassifierConfig(_vit(), layer_decay=0.5)
  task = cfg.build()
  params = nn.unbox(task.init(jax.random.PRNGKey(0), task.batch_spec(2)))["params"]
  scale = task.learning_rate_scale(params)
  assert scale["head"]["kernel"] == 1.0
  assert scale["encoder"]["backbone"]["final_norm"]["norm"]["scale"] == 1.0
  assert scale["encoder"]["backbone"]["layer_1"]["mlp"]["wi"]["kernel"] == 0.5
  assert scale["encoder"]["backbone"]["layer_0"]["mlp"]["wi"]["kernel"] == 0.25
  assert scale["encoder"]["stem"]["projection"]["kernel"] == 0.125
  assert scale["encoder"]["cls"] == 0.125
  # Fine-tuning starts from an exported encoder (here: this one, perturbed).
  path = vt.export_encoder(jax.tree.map(lambda a: a + 1.0, params), str(tmp_path))
  tuned = vt.ViTClassifierConfig(_vit(), pretrained=path).build()
  loaded = nn.unbox(tuned.init(jax.random.PRNGKey(1), tuned.batch_spec(2)))["params"]
  np.testing.assert_allclose(loaded["encoder"]["cls"], params["encoder"]["cls"] + 1.0)


def test_fine_tuning_at_a_new_resolution_interpolates_the_pretrained_position_table(tmp_path):
  """A SimMIM encoder pretrained on 8x8 images (4x4 patches) starts a 16x16
  classifier: positions interpolated, mask token dropped, [CLS] and head fresh."""
  simmim = mim.SimMIM(mim.SimMIMConfig(_vit(pool="gap", posemb="learned")))
  x = _images((1, 8, 8, 1))
  params = nn.unbox(simmim.init(jax.random.PRNGKey(3), x, jnp.zeros((1, 16), bool)))["params"]
  path = vt.export_encoder(params, str(tmp_path))
  big = _vit(image_size=(16, 16))  # pool="cls": a [CLS] token SimMIM did not have
  up = timg.ImageData(upsample=2)
  task = vt.ViTClassifierConfig(big, data=up, pretrained=path).build()
  fresh = nn.unbox(vt.ViTClassifierConfig(big, data=up).build().init(
      jax.random.PRNGKey(1), task.batch_spec(2)))["params"]
  loaded = nn.unbox(task.init(jax.random.PRNGKey(1), task.batch_spec(2)))["params"]
  old_pos = params["encoder"]["stem"]["pos_embedding"]
  np.testing.assert_allclose(loaded["encoder"]["stem"]["pos_embedding"],
                             interpolate_2d(old_pos, (4, 4), (8, 8)), rtol=1e-6)
  assert loaded["encoder"]["stem"]["pos_embedding"].shape == (64, TINY.width)
  assert "mask_token" not in loaded["encoder"]["stem"]
  jax.tree.map(np.testing.assert_array_equal, loaded["encoder"]["backbone"],
               params["encoder"]["backbone"])
  np.testing.assert_array_equal(loaded["encoder"]["cls"], fresh["encoder"]["cls"])
  np.testing.assert_array_equal(loaded["head"]["kernel"], fresh["head"]["kernel"])
  with pytest.raises(ValueError, match="has shape .* the model wants"):
    vt.ViTClassifierConfig(_vit(image_size=(16, 16), patch_size=(4, 4)), data=up,
                           pretrained=path).build().init(jax.random.PRNGKey(1),
                                                          task.batch_spec(2))
  with pytest.raises(ValueError, match="no such file"):
    vt.ViTClassifierConfig(big, data=up, pretrained=str(tmp_path / "nope.msgpack")).build()


# ------------------------------------------------------------ the engine

@pytest.mark.parametrize("recipe", ["vit-digits", "mae-digits", "simmim-digits"])
def test_recipe_task_trains_through_the_engine(recipe, tmp_path):
  from datong.train import config as config_lib
  from datong.train import loop, recipes
  run = recipes.get(recipe)
  prefix = "task.model" if recipe == "vit-digits" else "task.model.encoder"
  tiny = {"train.steps": "2", "train.batch_size": "16", "train.log_every": "1",
          "train.checkpoint_every": "0", "optimizer.warmup_steps": "0",
          f"{prefix}.backbone.width": "16", f"{prefix}.backbone.depth": "1",
          f"{prefix}.backbone.heads": "2", f"{prefix}.backbone.mlp_dim": "32"}
  if recipe == "mae-digits":
    tiny.update({"task.model.decoder.width": "16", "task.model.decoder.depth": "1",
                 "task.model.decoder.heads": "2", "task.model.decoder.mlp_dim": "32"})
  run = config_lib.override(run, tiny)
  result = loop.train(run, str(tmp_path), progress=False)
  assert result.step == 2
  assert np.isfinite(result.metrics["train/loss"])
  if recipe == "vit-digits":
    assert 0.0 <= result.metrics["eval/accuracy"] <= 1.0
  else:
    assert 0.0 <= result.metrics["eval/linear_probe_accuracy"] <= 1.0
    assert 0.0 <= result.metrics["eval/knn_accuracy"] <= 1.0
    assert os.path.exists(tmp_path / vt.ENCODER_EXPORT)
  if recipe == "mae-digits":
    assert os.path.exists(tmp_path / "mae_reconstructions_step2.png")
  task = run.task.build()
  assert task.flops_per_example() > 0 and task.tokens_per_example() > 0

"""iGPT: palette quantization round trip, causal invariance, KV-cache sampling."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from datong.backbone import TransformerConfig
from datong.unimodal import igpt


def test_palette_round_trip_and_intensity_clusters():
  rs = np.random.RandomState(0)
  levels = np.array([-1.0, -0.3, 0.4, 1.0], np.float32)
  pixels = (levels[rs.randint(0, 4, 2000)] + 0.02 * rs.randn(2000)).astype(np.float32)[:, None]
  palette = igpt.fit_palette(jax.random.PRNGKey(0), pixels, 4)
  np.testing.assert_allclose(np.asarray(palette)[:, 0], levels, atol=0.01)  # sorted dark -> light
  ids = jnp.asarray(rs.randint(0, 4, (3, 64)))
  images = igpt.ids_to_image(ids, palette, (8, 8))
  assert images.shape == (3, 8, 8, 1)
  np.testing.assert_array_equal(igpt.image_to_ids(images, palette), ids)  # ids -> colors -> ids
  again = igpt.ids_to_image(igpt.image_to_ids(images, palette), palette, (8, 8))
  np.testing.assert_array_equal(again, images)  # palette colors are fixed points
  # raster order: pixel (r, c) is id r * w + c
  np.testing.assert_array_equal(np.asarray(images)[1, 2, 5, 0], np.asarray(palette)[ids[1, 21], 0])
  # RGB palette: clusters in RGB space
  colors = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]], np.float32)
  rgb = colors[rs.randint(0, 3, 600)] + 0.01 * rs.randn(600, 3).astype(np.float32)
  pal = np.asarray(igpt.fit_palette(jax.random.PRNGKey(1), rgb, 3))
  for c in colors:
    assert np.min(np.abs(pal - c).max(-1)) < 0.02


def _tiny():
  cfg = igpt.IGPTConfig(TransformerConfig(width=16, depth=2, heads=2, mlp_dim=32),
                        image_size=(4, 4), palette_size=5)
  model = cfg.make()
  params = nn.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16), jnp.int32))["params"])
  return cfg, model, params


def test_changing_a_later_pixel_never_changes_earlier_logits():
  cfg, model, params = _tiny()
  ids = jax.random.randint(jax.random.PRNGKey(1), (2, 16), 0, 5)
  logits, _ = model.apply({"params": params}, igpt.igpt_inputs(ids, cfg))
  for j in (3, 9, 14):
    other = ids.at[:, j].set((ids[:, j] + 1) % 5)
    changed, _ = model.apply({"params": params}, igpt.igpt_inputs(other, cfg))
    # input position j + 1 holds pixel j: logits 0..j (predicting pixels 0..j) are unchanged
    np.testing.assert_array_equal(changed[:, :j + 1], logits[:, :j + 1])
    assert not np.allclose(changed[:, j + 1], logits[:, j + 1])


def test_kv_cache_sampling_matches_greedy_full_pass():
  cfg, model, params = _tiny()
  palette = jnp.linspace(-1, 1, 5)[:, None]
  images = igpt.sample_images(cfg, params, palette, jax.random.PRNGKey(0), 2, temperature=0.0)
  ids = igpt.image_to_ids(images, palette)
  # greedy: every pixel is the argmax of a full (no-cache) pass over the pixels before it
  logits, _ = model.apply({"params": params}, igpt.igpt_inputs(ids, cfg))
  want = jnp.minimum(jnp.argmax(logits, -1), cfg.palette_size - 1)
  np.testing.assert_array_equal(ids, want)


def test_bert_objective_predicts_masked_pixels_of_real_digits():
  import pytest  # pylint: disable=import-outside-toplevel
  from datong.train.tasks.igpt import IGPTTaskConfig  # pylint: disable=import-outside-toplevel
  from datong.unimodal.text import BERT  # pylint: disable=import-outside-toplevel
  cfg = igpt.IGPTConfig(TransformerConfig(width=16, depth=2, heads=2, mlp_dim=32),
                        palette_size=8, objective="bert")
  assert isinstance(cfg.make(), BERT)
  task = IGPTTaskConfig(cfg, palette_images=200, samples=0).build()
  source = task.source("train")
  rng = np.random.default_rng(0)
  batch = {"image": jnp.asarray(np.stack([task.preprocess(source[i], rng, True)["image"]
                                          for i in range(32)]))}
  params = nn.unbox(task.init(jax.random.PRNGKey(0), batch)["params"])
  (loss, metrics), grads = jax.value_and_grad(
      lambda p: task.loss(p, batch, jax.random.PRNGKey(1)), has_aux=True)(params)
  assert np.isfinite(float(loss)) and float(metrics["mlm_tokens"]) > 0
  assert abs(float(metrics["mlm_tokens"]) / (32 * 64) - 0.15) < 0.03  # 15% of the pixels
  assert float(jax.tree.reduce(lambda a, g: a + jnp.abs(g).sum(), grads, 0.0)) > 0
  with pytest.raises(ValueError, match="causal"):
    igpt.sample_images(cfg, params, task.palette, jax.random.PRNGKey(0), 1)


def test_layer_features_mean_or_every_pixel_in_raster_order():
  layers = jnp.arange(2 * 3 * 5 * 4, dtype=jnp.float32).reshape(2, 3, 5, 4)  # [depth, b, n, w]
  np.testing.assert_allclose(igpt.layer_features(layers), np.asarray(layers).mean(2))
  tokens = np.asarray(igpt.layer_features(layers, "tokens"))
  assert tokens.shape == (2, 3, 16)  # the start token dropped: 4 pixels x width 4
  np.testing.assert_array_equal(tokens[1, 2], np.asarray(layers)[1, 2, 1:].reshape(-1))
  import pytest  # pylint: disable=import-outside-toplevel
  with pytest.raises(ValueError, match="tokens"):
    igpt.layer_features(layers, "cls")
  # pool > 1: position i stands for pixel i (the one it predicts; 0: the start token)
  big = jnp.arange(2 * 1 * 16 * 3, dtype=jnp.float32).reshape(2, 1, 16, 3)  # a 4x4 grid
  pixels = np.asarray(big)[:, 0].reshape(2, 4, 4, 3)
  pooled = np.asarray(igpt.layer_features(big, "tokens", (4, 4), 2))
  assert pooled.shape == (2, 1, 12)  # 2x2 cells x width 3, in raster order of the cells
  np.testing.assert_allclose(pooled[1, 0, 3:6], pixels[1, :2, 2:].mean((0, 1)))
  np.testing.assert_allclose(pooled[0, 0, 6:9], pixels[0, 2:, :2].mean((0, 1)))


def test_train_augment_false_trains_on_the_images_as_they_are():
  from datong.train.tasks.igpt import IGPTTaskConfig  # pylint: disable=import-outside-toplevel
  from datong.train.tasks.images import ImageData  # pylint: disable=import-outside-toplevel
  cfg = igpt.IGPTConfig(TransformerConfig(width=16, depth=2, heads=2, mlp_dim=32), palette_size=8)
  augmenting = ImageData(shift=1.0, rotate=10.0, scale=0.1)
  tasks = [IGPTTaskConfig(cfg, data=d, train_augment=a, palette_images=200, samples=0).build()
           for d, a in ((ImageData(), True), (augmenting, False), (augmenting, True))]
  source = tasks[0].source("train")
  batch = {"image": jnp.asarray(np.stack([tasks[0].preprocess(source[i], None, False)["image"]
                                          for i in range(16)]))}
  params = nn.unbox(tasks[0].init(jax.random.PRNGKey(0), batch)["params"])
  plain, kept, augmented = (float(t.loss(params, batch, jax.random.PRNGKey(1))[0]) for t in tasks)
  assert plain == kept != augmented  # the augmentation is left to the probe's views


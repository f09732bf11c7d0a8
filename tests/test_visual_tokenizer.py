"""Vector quantization against hand computations, and the patch VQ-VAE."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from datong.backbone import TransformerConfig
from datong.ops import vq
from datong.unimodal.visual_tokenizer import (VQVAE, VQVAEConfig, codebook_statistics,
                                              init_codebook_state, kmeans_init, restart_dead,
                                              update_codebook, vqvae_loss)

CODEBOOK = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]], np.float32)
Z = np.array([[0.1, 0.2], [0.9, -0.1], [0.2, 1.5], [0.6, 0.1]], np.float32)
IDS = np.array([0, 1, 2, 1])  # by hand: nearest codes of Z


def test_nearest_code_and_straight_through_gradient_by_hand():
  np.testing.assert_array_equal(vq.nearest_code(Z, CODEBOOK), IDS)
  q = vq.quantize(jnp.asarray(Z), jnp.asarray(CODEBOOK))
  np.testing.assert_array_equal(q.quantized, CODEBOOK[IDS])  # forward: the codes
  w = np.arange(8, dtype=np.float32).reshape(4, 2)
  # straight-through: d sum(w * quantized) / dz = w exactly; the codebook gets none from it
  gz, gc = jax.grad(lambda z, c: jnp.sum(w * vq.quantize(z, c).quantized), (0, 1))(
      jnp.asarray(Z), jnp.asarray(CODEBOOK))
  np.testing.assert_array_equal(gz, w)
  np.testing.assert_array_equal(gc, np.zeros_like(CODEBOOK))
  # codebook loss mean_i |z_i - e_{id_i}|^2: d/de_k = 2/N * sum_{i: id_i = k} (e_k - z_i)
  gc = jax.grad(lambda c: vq.quantize(jnp.asarray(Z), c).codebook_loss)(jnp.asarray(CODEBOOK))
  want = np.zeros_like(CODEBOOK)
  for i, k in enumerate(IDS):
    want[k] += 2.0 / len(Z) * (CODEBOOK[k] - Z[i])
  np.testing.assert_allclose(gc, want, rtol=1e-6)
  # commitment loss moves z toward its code: d/dz_i = 2/N (z_i - e_{id_i})
  gz = jax.grad(lambda z: vq.quantize(z, jnp.asarray(CODEBOOK)).commitment_loss)(jnp.asarray(Z))
  np.testing.assert_allclose(gz, 2.0 / len(Z) * (Z - CODEBOOK[IDS]), rtol=1e-6)


def test_ema_update_by_hand():
  state = vq.ema_init(jnp.asarray(CODEBOOK))
  decay, eps = 0.9, 1e-5
  new, codebook = vq.ema_update(state, jnp.asarray(Z), jnp.asarray(IDS), decay, eps)
  n_k = np.array([1.0, 2.0, 1.0])
  counts = decay * 1.0 + (1 - decay) * n_k
  sums = decay * CODEBOOK + (1 - decay) * np.stack(
      [Z[IDS == k].sum(0) for k in range(3)])
  n = counts.sum()
  smoothed = (counts + eps) / (n + 3 * eps) * n
  np.testing.assert_allclose(new.counts, counts, rtol=1e-6)
  np.testing.assert_allclose(new.sums, sums, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(codebook, sums / smoothed[:, None], rtol=1e-6, atol=1e-7)


def test_kmeans_finds_separated_clusters_and_dead_codes_restart():
  rs = np.random.RandomState(0)
  centers = np.array([[-5.0, 0.0], [5.0, 0.0], [0.0, 5.0]], np.float32)
  x = np.concatenate([c + 0.1 * rs.randn(50, 2) for c in centers]).astype(np.float32)
  found, ids = vq.kmeans(jax.random.PRNGKey(0), x, 3, 10)
  order = np.argsort(np.asarray(found)[:, 0] * 10 + np.asarray(found)[:, 1])
  np.testing.assert_allclose(np.asarray(found)[order], centers[[0, 2, 1]], atol=0.05)
  assert len(set(np.asarray(ids)[:50])) == 1
  usage = jnp.array([3.0, 0.0, 5.0])
  codebook, dead = vq.restart_dead_codes(jax.random.PRNGKey(1), jnp.asarray(CODEBOOK), usage,
                                         jnp.asarray(Z))
  np.testing.assert_array_equal(dead, [False, True, False])
  np.testing.assert_array_equal(np.asarray(codebook)[[0, 2]], CODEBOOK[[0, 2]])
  assert any(np.array_equal(codebook[1], z) for z in Z)


def test_codebook_metrics():
  m = vq.codebook_metrics(jnp.array([0, 1, 2, 3, 0, 1, 2, 3]), 8)
  np.testing.assert_allclose(m["usage"], 0.5)
  np.testing.assert_allclose(m["perplexity"], 4.0, rtol=1e-6)
  np.testing.assert_allclose(vq.codebook_metrics(jnp.zeros(5, jnp.int32), 8)["perplexity"], 1.0)


def test_vqvae_shapes_kmeans_init_and_gradients_reach_encoder_and_codebook():
  bb = TransformerConfig(width=16, depth=1, heads=2, mlp_dim=32)
  cfg = VQVAEConfig(bb, bb, image_size=8, patch_size=2, channels=1, codebook_size=8, code_dim=4)
  model = VQVAE(cfg)
  images = jax.random.normal(jax.random.PRNGKey(0), (4, 8, 8, 1))
  params = nn.unbox(model.init(jax.random.PRNGKey(1), images)["params"])
  params = kmeans_init(model, params, images, jax.random.PRNGKey(2))
  recon, aux = model.apply({"params": params}, images)
  assert recon.shape == images.shape and aux["ids"].shape == (4, 16)
  np.testing.assert_array_equal(model.apply({"params": params}, images, method=VQVAE.tokens),
                                aux["ids"])
  # k-means init: every code is a centroid of the data, so every code is used
  loss, metrics = vqvae_loss(recon, images, aux, cfg)
  assert float(metrics["usage"]) == 1.0
  grads = jax.grad(lambda p: vqvae_loss(*model.apply({"params": p}, images)[:1], images,
                                        model.apply({"params": p}, images)[1], cfg)[0])(params)
  assert float(jnp.abs(grads["codebook"]).sum()) > 0
  assert float(jnp.abs(grads["to_code"]["kernel"]).sum()) > 0  # through the straight-through path
  params2, dead = restart_dead(model, {**params, "codebook": params["codebook"].at[0].set(1e3)},
                               images, jax.random.PRNGKey(3))
  assert bool(dead[0]) and float(jnp.abs(params2["codebook"][0]).max()) < 1e3
  del loss


def _tiny_cfg(**kw):
  bb = TransformerConfig(width=16, depth=1, heads=2, mlp_dim=32)
  return VQVAEConfig(bb, bb, image_size=8, patch_size=2, channels=1, codebook_size=3,
                     code_dim=2, **kw)


def test_training_codebook_update_ema_and_dead_code_restart_by_hand():
  """``codebook_statistics`` are the batch's assignment shares; ``update_codebook``
  is the EMA formula on them, and restarts a code whose share fell below
  threshold / K at its candidate."""
  decay, eps = 0.9, 1e-5
  cfg = _tiny_cfg(codebook_update="ema", ema_decay=decay, dead_code_threshold=0.5)
  params = init_codebook_state({"codebook": jnp.asarray(CODEBOOK)}, cfg)
  np.testing.assert_allclose(params["codebook_ema"]["sums"] / params["codebook_ema"]["counts"][:, None],
                             CODEBOOK, rtol=1e-6)
  aux = {"z": jnp.asarray(Z)[None], "ids": jnp.asarray(IDS)[None]}
  stats = codebook_statistics(aux, cfg, jax.random.PRNGKey(0))
  np.testing.assert_allclose(stats["counts"], [0.25, 0.5, 0.25])
  np.testing.assert_allclose(stats["sums"], np.stack([Z[IDS == k].sum(0) for k in range(3)]) / 4,
                             rtol=1e-6)
  assert all(any(np.array_equal(c, z) for z in Z) for c in np.asarray(stats["candidates"]))
  out = update_codebook(params, stats, cfg)
  counts = decay / 3 + (1 - decay) * np.array([0.25, 0.5, 0.25])
  sums = decay * CODEBOOK / 3 + (1 - decay) * np.asarray(stats["sums"])
  smoothed = (counts + eps) / (counts.sum() + 3 * eps) * counts.sum()
  np.testing.assert_allclose(out["codebook_ema"]["counts"], counts, rtol=1e-6)
  np.testing.assert_allclose(out["codebook"], sums / smoothed[:, None], rtol=1e-5, atol=1e-7)
  # Code 1 unused for a while: its share decays below 0.5 / 3 and it restarts.
  unused = {**stats, "counts": jnp.array([0.5, 0.0, 0.5]),
            "candidates": jnp.asarray([[7.0, 7.0], [8.0, 8.0], [9.0, 9.0]])}
  p = params
  for step in range(20):
    p = update_codebook(p, unused, cfg)
    share = np.asarray(p["codebook_ema"]["counts"])[1]
    if np.array_equal(np.asarray(p["codebook"])[1], [8.0, 8.0]):
      break
  assert step > 0 and share == np.float32(1 / 3)  # restarted once below the threshold, share reset
  np.testing.assert_allclose(p["codebook_ema"]["sums"][1], np.array([8.0, 8.0]) / 3)
  # "loss" mode: the codebook stays the optimizer's except for restarts.
  loss_cfg = _tiny_cfg(dead_code_threshold=0.5)
  p = init_codebook_state({"codebook": jnp.asarray(CODEBOOK)}, loss_cfg)
  np.testing.assert_array_equal(update_codebook(p, stats, loss_cfg)["codebook"], CODEBOOK)


def test_vqvae_task_trains_ema_codebook_in_the_engine_and_beit_reads_the_run(tmp_path):
  """A tiny ``vqvae-digits`` run with the EMA codebook and restarts: the
  codebook leaves have no optimizer state, the codebook is the EMA state's
  ratio after training, and a BEiT task reads the run as its tokenizer."""
  import dataclasses  # pylint: disable=import-outside-toplevel
  from datong.train import checkpoint as ckpt_lib  # pylint: disable=import-outside-toplevel
  from datong.train import config as config_lib, loop, recipes  # pylint: disable=import-outside-toplevel
  cfg = config_lib.override(recipes.get("vqvae-digits"), {
      "train.steps": "3", "train.batch_size": "16", "train.log_every": "1",
      "task.kmeans_images": "64", "task.png_examples": "0", "task.model.codebook_update": "ema",
      "task.model.dead_code_threshold": "0.05"})
  trainer = loop.Trainer(cfg, str(tmp_path / "t"))
  size = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
  params = trainer.abstract_state.params
  frozen = size(params["codebook"]) + size(params["codebook_ema"])
  # Adam's two moments (and a count) of the trainable leaves only: codebook, EMA state frozen
  assert size(trainer.abstract_state.opt_state) - 2 * (size(params) - frozen) < 8
  workdir = str(tmp_path / "vq")
  result = loop.train(cfg, workdir, progress=False)
  assert 0 < result.metrics["eval/codebook_usage"] <= 1
  params = ckpt_lib.load_params(workdir)
  init = jax.device_get(trainer.init_state().params)
  assert not np.allclose(params["codebook"], init["codebook"])
  ema = params["codebook_ema"]
  n = ema["counts"].sum()
  smoothed = (ema["counts"] + 1e-5) / (n + 64 * 1e-5) * n
  np.testing.assert_allclose(params["codebook"], ema["sums"] / smoothed[:, None], rtol=1e-4,
                             atol=1e-6)
  beit = recipes.get("beit-digits").task
  beit = dataclasses.replace(beit, tokenizer="vqvae", tokenizer_path=workdir, kmeans_images=64)
  task = beit.build()
  assert "codebook_ema" not in task.tokenizer_params

"""Mixture of experts in the shared backbone: routers, both dispatch paths,
router losses, and expert parallelism on the fake 8-device mesh."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from datong.backbone import Transformer, TransformerConfig
from datong.backbone_config import MoEConfig
from datong.backbone_moe import MoeMlp
from datong.ops import moe as moe_ops

WIDTH, MLP = 8, 16


def _cfg(**moe):
  return TransformerConfig(width=WIDTH, depth=2, heads=2, mlp_dim=MLP, moe=moe)


def _x(shape=(2, 6, WIDTH), seed=0):
  return jax.random.normal(jax.random.PRNGKey(seed), shape)


def _layer(cfg, x, seed=1, **kw):
  layer = MoeMlp(cfg)
  params = nn.unbox(layer.init(jax.random.PRNGKey(seed), x, **kw)["params"])
  return layer, params


def _expert(p, e, x):
  """Expert ``e`` by hand: ``gelu(x wi + b) wo + b``."""
  h = jax.nn.gelu(x @ p["wi"][e] + p["wi_bias"][e], approximate=False)
  return h @ p["wo"][e] + p["wo_bias"][e]


# ----------------------------------------------------------- exact cases --

@pytest.mark.parametrize("dispatch", ["capacity", "gather", "dropless"])
def test_one_expert_equals_the_dense_mlp_exactly(dispatch):
  dense_cfg = TransformerConfig(width=WIDTH, depth=2, heads=2, mlp_dim=MLP)
  moe_cfg = dense_cfg.replace(moe=MoEConfig(experts=1, top_k=1, dispatch=dispatch,
                                            capacity_factor=None))
  x = _x()
  dense = nn.unbox(Transformer(dense_cfg).init(jax.random.PRNGKey(1), x)["params"])
  moe = nn.unbox(Transformer(moe_cfg).init(jax.random.PRNGKey(2), x)["params"])
  for i in range(2):  # the dense weights, as the one expert's
    d, m = dense[f"layer_{i}"]["mlp"], dict(moe[f"layer_{i}"]["mlp"])
    m.update(wi=d["wi"]["kernel"][None], wi_bias=d["wi"]["bias"][None],
             wo=d["wo"]["kernel"][None], wo_bias=d["wo"]["bias"][None])
    moe[f"layer_{i}"] = {**dense[f"layer_{i}"], "mlp": m}
  want, _ = Transformer(dense_cfg).apply({"params": dense}, x)
  got, aux = Transformer(moe_cfg).apply({"params": moe}, x)
  np.testing.assert_array_equal(got, want)
  assert float(aux["metrics"]["moe/dropped_fraction"]) == 0.0
  assert float(aux["metrics"]["moe/expert_load/0"]) == 1.0


@pytest.mark.parametrize("dispatch,router", [("capacity", "token_choice"),
                                             ("gather", "token_choice"),
                                             ("dropless", "token_choice"),
                                             ("capacity", "expert_choice")])
def test_top_k_of_all_experts_without_capacity_is_the_router_weighted_sum(dispatch, router):
  # Expert choice without a limit: every expert takes every token, weighted by its probability.
  cfg = _cfg(experts=4, top_k=4, dispatch=dispatch, router=router, capacity_factor=None)
  x = _x()
  layer, p = _layer(cfg, x)
  y, losses, stats = layer.apply({"params": p}, x)
  probs = jax.nn.softmax(x @ p["router"], axis=-1)
  want = sum(probs[..., e:e + 1] * _expert(p, e, x) for e in range(4))
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
  assert float(stats["dropped_fraction"]) == 0.0
  np.testing.assert_allclose(stats["expert_load"], np.full(4, 0.25))
  if router == "token_choice":
    # Every expert is chosen by every token: the balance loss is E * sum(1/4 * P_e) = 1.
    np.testing.assert_allclose(losses["moe_load_balancing"], 1e-2, rtol=1e-6)


def test_capacity_gather_and_dropless_agree_when_nothing_is_dropped():
  x = _x((3, 8, WIDTH))
  big = _cfg(experts=4, top_k=2, dispatch="capacity", capacity_factor=2.0)  # 2*2*8/4 = 8 = S
  layer, p = _layer(big, x)
  drop, gather = (MoeMlp(big.replace(moe=big.moe.__class__(**{**big.moe.__dict__, "dispatch": d})))
                  for d in ("dropless", "gather"))

  def loss(layer_, params):
    y, aux, _ = layer_.apply({"params": params}, x)
    return jnp.sum(y * jnp.cos(x)) + sum(aux.values())

  (a, ga), *others = (jax.jit(jax.value_and_grad(lambda q, m=m: loss(m, q)))(p)
                       for m in (layer, drop, gather))
  for b, gb in others:
    np.testing.assert_allclose(a, b, rtol=1e-5)
    for k in p:
      np.testing.assert_allclose(ga[k], gb[k], rtol=1e-4, atol=1e-6, err_msg=k)
  assert float(layer.apply({"params": p}, x)[2]["dropped_fraction"]) == 0.0


def test_capacity_slots_follow_the_documented_drop_order():
  # 5 tokens, top-2 of 2 experts, capacity 3. First choices fill first, in
  # token order: expert 0 <- t0, t1, t3 (t4 dropped); expert 1 <- t2. Then
  # second choices: expert 1 <- t0, t1 (slots 1, 2), t3 and t4 over capacity;
  # t2's second choice (expert 0) finds it full.
  experts = jnp.array([[[0, 1], [0, 1], [1, 0], [0, 1], [0, 1]]])
  valid = jnp.ones((1, 5), bool)
  slots = moe_ops.capacity_slots(experts, valid, 2, 3)
  np.testing.assert_array_equal(slots[0], [[0, 1], [1, 2], [0, -1], [2, -1], [-1, -1]])
  # Padding takes no slot: with t1 invalid, t3 moves up and t4 gets expert 0.
  slots = moe_ops.capacity_slots(experts, valid.at[0, 1].set(False), 2, 3)
  np.testing.assert_array_equal(slots[0], [[0, 1], [-1, -1], [0, -1], [1, 2], [2, -1]])


@pytest.mark.parametrize("dispatch", ["capacity", "gather"])
def test_capacity_layer_drops_exactly_the_over_capacity_assignments(dispatch):
  cfg = _cfg(experts=4, top_k=2, dispatch=dispatch, capacity_factor=0.5)  # 2 slots of 8
  x = _x((2, 8, WIDTH), seed=3)
  layer, p = _layer(cfg, x)
  y, _, stats = layer.apply({"params": p}, x)
  probs = jax.nn.softmax(x @ p["router"], axis=-1)
  experts, weights = moe_ops.token_choice(probs, 2)
  slots = moe_ops.capacity_slots(experts, jnp.ones((2, 8), bool), 4, 2)
  kept = slots >= 0
  assert 0 < int(kept.sum()) < kept.size  # some dropped, some kept
  outs = jnp.stack([_expert(p, e, x) for e in range(4)], axis=2)  # [b, s, E, d]
  picked = jnp.take_along_axis(outs, experts[..., None], axis=2)  # [b, s, k, d]
  want = jnp.sum(picked * (weights * kept)[..., None], axis=2)
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(stats["dropped_fraction"], 1 - kept.mean(), rtol=1e-6)
  for e in range(4):  # an expert keeps at most its capacity per sequence
    assert int(((experts == e) & kept).sum(axis=(1, 2)).max()) <= 2


def test_expert_choice_gives_each_expert_its_top_capacity_tokens():
  probs = jnp.array([[[0.7, 0.3], [0.6, 0.4], [0.1, 0.9], [0.2, 0.8]]])  # [1, 4, 2]
  valid = jnp.array([[True, True, True, False]])
  dispatch, combine, chosen = moe_ops.expert_choice(probs, valid, 2, jnp.float32)
  # Expert 0 takes t0, t1 (slot order = its ranking); expert 1 takes t2 then
  # t1 (t3 is padding).
  np.testing.assert_array_equal(jnp.argmax(dispatch[0], axis=0), [[0, 1], [2, 1]])  # [E, C]
  np.testing.assert_allclose(combine[0].sum(axis=(1, 2)), [0.7, 0.6 + 0.4, 0.9, 0.0])
  np.testing.assert_array_equal(chosen[0], [1, 2, 1, 0])


@pytest.mark.parametrize("dispatch", ["capacity", "dropless"])
def test_gradients_reach_the_router_through_the_combine_weights(dispatch):
  # No auxiliary loss: the router learns from the task alone.
  cfg = _cfg(experts=4, top_k=2, dispatch=dispatch, load_balancing_weight=0.0,
             router_z_weight=0.0)
  x = _x()
  layer, p = _layer(cfg, x)
  target = _x(seed=5)

  def loss(router):
    y, losses, _ = layer.apply({"params": {**p, "router": router}}, x)
    assert not losses
    return jnp.mean((y - target) ** 2)

  g = jax.grad(loss)(p["router"])
  assert float(jnp.linalg.norm(g)) > 1e-4
  # A small step along -g lowers the loss (the top-k choices stay put).
  assert float(loss(p["router"] - 1e-3 * g)) < float(loss(p["router"]))


def test_load_balancing_loss_is_one_under_uniform_routing_and_rises_under_collapse():
  valid = jnp.ones((2, 16), bool)
  uniform = jnp.full((2, 16, 4), 0.25)
  experts, _ = moe_ops.token_choice(uniform, 1)
  assert float(moe_ops.load_balancing_loss(uniform, experts, valid)) == pytest.approx(1.0)
  balanced_experts = (jnp.arange(32).reshape(2, 16, 1) % 4)
  onehot = jax.nn.one_hot(balanced_experts[..., 0], 4)
  assert float(moe_ops.load_balancing_loss(onehot, balanced_experts, valid)) == pytest.approx(1.0)
  losses = []
  for share in (0.25, 0.5, 0.9, 1.0):  # more and more of the mass on expert 0
    probs = jnp.broadcast_to(jnp.array([share] + [(1 - share) / 3] * 3), (2, 16, 4))
    experts, _ = moe_ops.token_choice(probs, 1)
    losses.append(float(moe_ops.load_balancing_loss(probs, experts, valid)))
  assert losses == sorted(losses) and losses[0] == pytest.approx(1.0)
  assert losses[-1] == pytest.approx(4.0)  # all tokens, all probability on one of 4


def test_modality_router_sends_each_token_to_its_modality_expert():
  cfg = _cfg(experts=2, router="modality", modalities=2, dispatch="capacity",
             capacity_factor=None)
  x = _x()
  modality = jax.random.bernoulli(jax.random.PRNGKey(7), 0.5, x.shape[:2]).astype(jnp.int32)
  layer, p = _layer(cfg, x, modality_ids=modality)
  assert "router" not in p
  y, losses, stats = layer.apply({"params": p}, x, modality_ids=modality)
  want = jnp.where(modality[..., None] == 0, _expert(p, 0, x), _expert(p, 1, x))
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
  assert losses == {}
  np.testing.assert_allclose(stats["modality_load"], np.eye(2))
  with pytest.raises(ValueError, match="pass modality_ids"):
    layer.apply({"params": p}, x)


def test_limoe_entropy_losses_per_modality():
  probs = jnp.array([[[0.5, 0.5], [0.5, 0.5], [1.0, 0.0], [1.0, 0.0]]])
  modality = jnp.array([[0, 0, 1, 1]])
  local, glob = moe_ops.modality_entropy_losses(probs, modality, jnp.ones((1, 4), bool), 3,
                                                threshold=0.5)
  np.testing.assert_allclose(local, [np.log(2), 0.0, 0.0], atol=1e-6)
  # Modality 0 spreads (H = log 2 > 0.5): no penalty; modality 1 collapsed
  # (H = 0): 0.5; modality 2 has no token: 0.
  np.testing.assert_allclose(glob, [0.0, 0.5, 0.0], atol=1e-6)


# ----------------------------------------------- the model, the mesh --

def test_moe_every_second_layer_and_its_metrics_and_flops():
  cfg = TransformerConfig(width=WIDTH, depth=4, heads=2, mlp_dim=MLP,
                          moe=dict(experts=4, top_k=1, every=2, expert_dim=MLP // 2))
  x = _x()
  params = Transformer(cfg).init(jax.random.PRNGKey(0), x)["params"]
  assert "router" in params["layer_1"]["mlp"] and "router" in params["layer_3"]["mlp"]
  assert "wi" in params["layer_0"]["mlp"] and "kernel" in params["layer_0"]["mlp"]["wi"]
  assert params["layer_1"]["mlp"]["wi"].names == ("expert", "embed", "mlp")
  _, aux = Transformer(cfg).apply({"params": params}, x)
  np.testing.assert_array_equal(aux["layer_losses"]["moe_load_balancing"][::2], 0.0)
  assert aux["moe"]["expert_load"].shape == (2, 4)  # the two MoE layers
  assert {"moe/layer_1/moe_load_balancing", "moe/layer_3/dropped_fraction",
          "moe/expert_load/3"} <= set(aux["metrics"])
  # Active FLOPs: top-1 of experts half as wide as the dense MLP, plus the router.
  dense = cfg.replace(moe=MoEConfig())
  mlp_flops = 3 * 2 * 2 * WIDTH * MLP  # one dense MLP per token, training
  moe_layer = 3 * 2 * (2 * WIDTH * MLP // 2 + WIDTH * 4)
  assert cfg.flops_per_token(6) == pytest.approx(dense.flops_per_token(6) - 2 * mlp_flops
                                                 + 2 * moe_layer)
  assert cfg.replace(moe=cfg.moe.__class__(**{**cfg.moe.__dict__, "experts": 64})
                     ).flops_per_token(6) - cfg.flops_per_token(6) == 2 * 3 * 2 * WIDTH * 60


def test_moe_settings_are_checked_with_a_fix():
  with pytest.raises(ValueError, match="top_k=3.*cannot exceed experts=2"):
    MoEConfig(experts=2, top_k=3)
  with pytest.raises(ValueError, match="use dispatch='capacity'"):
    MoEConfig(experts=4, router="expert_choice", dispatch="dropless")
  with pytest.raises(ValueError, match="experts = modalities"):
    MoEConfig(experts=4, router="modality", modalities=2)
  with pytest.raises(ValueError, match="scan_layers"):
    TransformerConfig(width=8, depth=4, heads=2, mlp_dim=8, scan_layers=True,
                      moe=dict(experts=2, every=2))
  with pytest.raises(ValueError, match="router"):
    MoEConfig(experts=2, router="hash")


def _digits_losses(mesh, steps=3, **moe):
  """Train losses of a 1-layer MoE digits classifier on ``mesh``, and its
  parameter shardings (one batch from the real data per step)."""
  import os, sys  # pylint: disable=import-outside-toplevel,multiple-imports
  sys.path.insert(0, os.path.dirname(__file__))
  from engine_task import DigitsTaskConfig  # pylint: disable=import-outside-toplevel
  from datong.train import data as data_lib, loop  # pylint: disable=import-outside-toplevel
  from datong.train.config import MeshConfig, OptimizerConfig, RunConfig, TrainConfig
  backbone = TransformerConfig(width=16, depth=1, heads=2, mlp_dim=32,
                               moe=MoEConfig(experts=4, top_k=2, **moe))
  cfg = RunConfig(task=DigitsTaskConfig(backbone=backbone),
                  train=TrainConfig(steps=steps, batch_size=16, checkpoint_every=0),
                  optimizer=OptimizerConfig(learning_rate=3e-3, warmup_steps=1),
                  mesh=MeshConfig(**mesh))
  n = int(np.prod(list(mesh.values())))
  trainer = loop.Trainer(cfg, "", devices=jax.devices()[:n])
  state, it, losses = trainer.init_state(), trainer.train_iterator(), []
  for _ in range(steps):
    state, metrics = trainer.step(state, data_lib.to_global(next(it), trainer.batch_sharding))
    losses.append(metrics)
  it.close()
  trainer.final_params = jax.device_get(nn.unbox(state.params))
  return [jax.device_get(m) for m in losses], trainer


MESHES = {"expert4_data2": dict(data=2, expert=4), "expert4_fsdp2": dict(data=1, fsdp=2, expert=4),
          "expert2_fsdp2_tensor2": dict(data=1, fsdp=2, expert=2, tensor=2)}


def test_expert_parallel_meshes_give_the_unsharded_losses():
  # The capacity forms drop tokens here (capacity factor 1): the same ones on every mesh.
  runs = (("capacity", "expert4_data2"), ("capacity", "expert4_fsdp2"),
          ("gather", "expert4_data2"))
  single, _ = _digits_losses(dict(data=1), dispatch="capacity", capacity_factor=1.0)
  want = [float(m["train/loss"]) for m in single]
  assert single[0]["train/aux_loss/moe_load_balancing"] > 0
  for dispatch, name in runs:
    got, trainer = _digits_losses(MESHES[name], dispatch=dispatch, capacity_factor=1.0)
    np.testing.assert_allclose([float(m["train/loss"]) for m in got], want, rtol=2e-5,
                               err_msg=f"{dispatch} {name}")
    if name == "expert4_data2" and dispatch == "capacity":
      # Tokens move between batch shards and expert shards by all-to-all.
      assert " all-to-all(" in trainer.compile().as_text()
    spec = tuple(trainer.params_plan.shardings["backbone"]["layer_0"]["mlp"]["wi"].spec)
    assert spec[0] == "expert", spec  # the experts are split over the mesh axis 'expert'
    if "fsdp" in name:
      assert spec[1] == "fsdp", spec


def test_notebook_builds_an_moe_gpt_and_describe_shows_expert_shardings():
  import datong  # pylint: disable=import-outside-toplevel
  model = datong.build("gpt", "tiny", vocab_size=64, depth=1,
                       moe=MoEConfig(experts=4, top_k=2, dispatch="dropless"))
  assert model.config.backbone.moe.experts == 4
  # The CLI's names work too: a bare MoE field sets it in every backbone.
  assert datong.build("clip", "tiny", experts=2).config.text.backbone.moe.experts == 2
  params = datong.init(model)
  logits, aux = datong.apply(model, params)
  assert logits.shape[-1] == 64 and "moe_load_balancing" in aux["losses"]
  table = datong.describe(params, mesh={"expert": 4})
  rows = {r.path: r for r in table.rows}
  wi = rows["encoder/backbone/layer_0/mlp/wi"]
  assert wi.axes == ("expert", "embed", "mlp") and wi.sharding.startswith("P('expert'")
  assert "expert" not in rows["encoder/backbone/layer_0/mlp/router"].sharding


def test_moe_metrics_reach_a_tasks_metrics_named_by_tower():
  from datong.train.task import with_aux_losses  # pylint: disable=import-outside-toplevel
  aux = {"metrics": {"moe/dropped_fraction": 0.1}, "losses": {"moe_router_z": 1.0},
         "image": {"metrics": {"moe/expert_load/0": 0.5}, "moe": {"expert_load": [[0.5]]}}}
  out = with_aux_losses({"loss": 2.0}, aux)
  assert out == {"loss": 2.0, "moe/dropped_fraction": 0.1, "image/moe/expert_load/0": 0.5,
                 "aux_losses": {"moe_router_z": 1.0}}


def test_moe_recipes_are_registered_and_one_compiles_on_an_expert_mesh(tmp_path):
  from datong.train import config as config_lib, loop, recipes  # pylint: disable=import-outside-toplevel
  limoe = recipes.get("limoe-digits").task.model
  assert limoe.share_backbone and limoe.image.backbone.moe.local_entropy_weight > 0
  assert recipes.get("gpt-pydoc-moe").task.model.backbone.moe.experts == 8
  cfg = config_lib.override(recipes.get("gpt-pydoc-moe"), {
      "mesh.data": "2", "mesh.expert": "4", "train.batch_size": "8", "task.seq_length": "32"})
  trainer = loop.Trainer(cfg, str(tmp_path))
  backbones = [leaf for path, leaf in jax.tree_util.tree_flatten_with_path(
      trainer.params_plan.shardings)[0] if jax.tree_util.keystr(path).endswith("['wi']")]
  assert backbones and all(tuple(s.spec)[0] == "expert" for s in backbones)
  assert trainer.compile().memory_analysis() is not None


# ------------------------------------ explicit all-to-all (shard_map) --

def _mesh_context(mesh):
  from datong.train import sharding  # pylint: disable=import-outside-toplevel
  from datong.train.config import MeshConfig  # pylint: disable=import-outside-toplevel
  n = int(np.prod(list(mesh.values())))
  m = sharding.make_mesh(MeshConfig(**mesh), jax.devices()[:n])
  import contextlib  # pylint: disable=import-outside-toplevel
  stack = contextlib.ExitStack()
  stack.enter_context(jax.set_mesh(m))
  stack.enter_context(nn.logical_axis_rules(sharding.RULES))
  return stack


@pytest.mark.parametrize("mesh,dispatch,router,activation", [
    ("expert4_data2", "capacity", "token_choice", "gelu"),
    ("expert4_data2", "gather", "token_choice", "gelu"),
    ("expert4_data2", "capacity", "expert_choice", "gelu"),
    ("expert2_fsdp2_tensor2", "gather", "token_choice", "swiglu"),
])
def test_shard_map_layer_equals_one_device_values_gradients_and_drops(mesh, dispatch, router,
                                                                      activation):
  # Capacity is per sequence (routing group) and every device holds whole
  # sequences, so the local buffers drop exactly the one-device assignments.
  cfg = TransformerConfig(width=16, depth=1, heads=2, mlp_dim=32, activation=activation,
                          moe=MoEConfig(experts=4, top_k=2, dispatch=dispatch, router=router,
                                        capacity_factor=1.0, expert_parallel="shard_map"))
  x = _x((16, 8, 16), seed=2)
  layer, p = _layer(cfg, x)

  def loss(params, x):
    y, losses, stats = layer.apply({"params": params}, x)
    return jnp.sum(y * jnp.cos(x)) + sum(losses.values()), stats["dropped_fraction"]

  grad = jax.value_and_grad(loss, has_aux=True)
  (want, want_drop), want_g = jax.jit(grad)(p, x)
  with _mesh_context(MESHES[mesh]):
    jaxpr = str(jax.make_jaxpr(grad)(p, x))
    (got, got_drop), got_g = jax.jit(grad)(p, x)
  assert "shard_map" in jaxpr and "all_to_all" in jaxpr  # the explicit path ran
  np.testing.assert_allclose(got, want, rtol=1e-5)
  for k in p:
    for a, b in zip(jax.tree.leaves(got_g[k]), jax.tree.leaves(want_g[k])):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=k)
  assert float(got_drop) == float(want_drop)
  if router == "token_choice":  # the drops, counted by hand over the whole batch
    probs = jax.nn.softmax(x @ p["router"], axis=-1)
    experts, _ = moe_ops.token_choice(probs, 2)
    slots = moe_ops.capacity_slots(experts, jnp.ones((16, 8), bool), 4, 4)
    assert 0 < float(got_drop) == pytest.approx(float(jnp.mean(slots < 0)))


def test_shard_map_path_is_the_xla_path_without_an_expert_mesh():
  cfg = _cfg(experts=4, top_k=2, dispatch="gather", expert_parallel="shard_map")
  x = _x((8, 6, WIDTH))
  layer, p = _layer(cfg, x)
  xla = MoeMlp(cfg.replace(moe=MoEConfig(experts=4, top_k=2, dispatch="gather")))
  for mesh in (None, dict(data=8), dict(data=2, fsdp=2, tensor=2)):  # expert axis 1
    with (_mesh_context(mesh) if mesh else nn.logical_axis_rules(())):
      jaxpr = str(jax.make_jaxpr(lambda q: layer.apply({"params": q}, x))(p))
      got = jax.jit(lambda q: layer.apply({"params": q}, x)[0])(p)
      want = jax.jit(lambda q: xla.apply({"params": q}, x)[0])(p)
    assert "shard_map" not in jaxpr
    np.testing.assert_array_equal(got, want)


def test_shard_map_dropout_draws_a_mask_per_device():
  cfg = TransformerConfig(width=16, depth=1, heads=2, mlp_dim=32, dropout=0.5,
                          moe=MoEConfig(experts=4, top_k=1, dispatch="gather",
                                        capacity_factor=None, expert_parallel="shard_map"))
  x = _x((8, 6, 16))
  _, p = _layer(cfg, x)
  layer = MoeMlp(cfg, train=True)
  run = jax.jit(lambda key: layer.apply({"params": p}, x, rngs={"dropout": key})[0])
  with _mesh_context(MESHES["expert4_data2"]):
    a, b, c = run(jax.random.PRNGKey(0)), run(jax.random.PRNGKey(0)), run(jax.random.PRNGKey(1))
  clean = MoeMlp(cfg).apply({"params": p}, x)[0]
  np.testing.assert_array_equal(a, b)  # a function of the key
  assert np.all(np.isfinite(a)) and not np.allclose(a, c) and not np.allclose(a, clean)
  # Equal rows 0 and 4 sit in the same buffer positions of devices (data 0,
  # expert j) and (data 1, expert j); the key folded with the device index
  # gives them different masks.
  same = jnp.broadcast_to(x[:1], x.shape)
  with _mesh_context(MESHES["expert4_data2"]):
    rows = jax.jit(lambda key: layer.apply({"params": p}, same, rngs={"dropout": key})[0])(
        jax.random.PRNGKey(0))
  assert not np.allclose(rows[0], rows[4])


def test_expert_parallel_setting_is_checked_with_a_fix():
  with pytest.raises(ValueError, match="expert_parallel='xla'"):
    MoEConfig(experts=4, dispatch="dropless", expert_parallel="shard_map")
  with pytest.raises(ValueError, match="expert_parallel.*choose one of"):
    MoEConfig(experts=4, expert_parallel="pmap")


@pytest.mark.parametrize("name", ["expert4_data2", "expert2_fsdp2_tensor2"])
def test_shard_map_expert_parallel_trains_as_on_one_device(name):
  # Several steps: equal losses and gradient norms each step, equal weights after.
  single, ref = _digits_losses(dict(data=1), dispatch="gather", capacity_factor=1.0)
  got, trainer = _digits_losses(MESHES[name], dispatch="gather", capacity_factor=1.0,
                                expert_parallel="shard_map")
  for key in ("train/loss", "train/grad_norm", "train/aux_loss/moe_load_balancing"):
    np.testing.assert_allclose([float(m[key]) for m in got], [float(m[key]) for m in single],
                               rtol=2e-5, err_msg=key)
  flat = jax.tree_util.tree_flatten_with_path(trainer.final_params)[0]
  for (path, a), b in zip(flat, jax.tree.leaves(ref.final_params)):
    if "'key']['bias']" in jax.tree_util.keystr(path):
      continue  # softmax ignores a key bias: its gradient is rounding noise, which Adam scales up
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=trainer.batch_sharding)
           for k, v in trainer.batch_spec.items()}
  from datong.train.sharding import RULES  # pylint: disable=import-outside-toplevel
  with jax.set_mesh(trainer.mesh), nn.logical_axis_rules(RULES):  # as the engine traces
    lowered = trainer.step_fn.lower(trainer.abstract_state, batch)
  assert "manual_computation" in lowered.as_text()  # the step ran the shard_map path
  assert " all-to-all(" in lowered.compile().as_text()


def test_dropless_under_expert_sharding_gives_the_unsharded_losses():
  single, _ = _digits_losses(dict(data=1), dispatch="dropless")
  want = [float(m["train/loss"]) for m in single]
  for name in ("expert4_data2", "expert4_fsdp2"):
    got, _ = _digits_losses(MESHES[name], dispatch="dropless")
    np.testing.assert_allclose([float(m["train/loss"]) for m in got], want, rtol=2e-5,
                               err_msg=name)

"""The shared Transformer: configs, presets, scan/remat equivalence, masking, cache, hooks."""

import functools
import os
import sys

import numpy as np
import pytest
import jax
import jax.numpy as jnp
import flax.linen as nn

from datong.backbone import (PRESETS, WEIGHTS_COLLECTION, Norm, Transformer, TransformerConfig,
                             init_cache)
from datong.params import count_params, merge_params

sys.path.insert(0, os.path.dirname(__file__))
from engine_task import L2Mlp  # pylint: disable=wrong-import-position


def _init(cfg, x, **kw):
  return Transformer(cfg).init(jax.random.PRNGKey(0), x, **kw)


def _x(batch=2, length=6, width=64, seed=1):
  return jax.random.normal(jax.random.PRNGKey(seed), (batch, length, width))


def _loop_to_scan(params, depth):
  """Stack per-layer params {layer_i: ...} into the scanned {layers: ...} layout."""
  p = dict(nn.unbox(params)["params"])
  layers = [p.pop(f"layer_{i}") for i in range(depth)]
  p["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
  return {"params": p}


# Published totals = our backbone + stems/heads counted analytically.
def test_preset_parameter_counts_match_published_figures():
  def backbone(name):
    cfg = TransformerConfig.preset(name)
    return count_params(jax.eval_shape(lambda: _init(cfg, jnp.zeros((1, 4, cfg.width)))))
  # ViT-B/16, 224px, 1000 classes: 86,567,656 (timm / the ViT paper's 86M).
  patch, cls, pos, head = 16 * 16 * 3 * 768 + 768, 768, 197 * 768, 768 * 1000 + 1000
  assert backbone("vit-B") + patch + cls + pos + head == 86_567_656
  # ViT-L/16: 304,326,632.
  assert backbone("vit-L") + (16 * 16 * 3 * 1024 + 1024) + 1024 + 197 * 1024 + 1024 * 1000 + 1000 \
      == 304_326_632
  # BERT-base (HF BertModel with pooler): 109,482,240. Post-LN: no final norm.
  emb = 30522 * 768 + 512 * 768 + 2 * 768 + 2 * 768
  assert backbone("bert-base") + emb + (768 * 768 + 768) == 109_482_240
  # GPT-2 small (124M): 124,439,808 = wte + wpe + blocks + ln_f.
  assert backbone("gpt2-small") + 50257 * 768 + 1024 * 768 == 124_439_808
  # GPT-2 medium: 354,823,168.
  assert backbone("gpt2-medium") + 50257 * 1024 + 1024 * 1024 == 354_823_168


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_runs_under_jit_in_float32_and_bfloat16(dtype):
  cfg = TransformerConfig.preset("tiny", dtype=dtype)
  x = _x()
  params = _init(cfg, x)
  # Parameters stay float32; compute happens in the requested dtype.
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nn.unbox(params)))
  out, aux = jax.jit(lambda p, x: Transformer(cfg).apply(p, x, causal=True))(params, x)
  assert out.shape == x.shape and out.dtype == jnp.dtype(dtype)
  assert aux["pre_norm"].shape == x.shape
  assert np.isfinite(np.asarray(out, np.float32)).all()


@pytest.mark.parametrize("overrides", [
    dict(), dict(activation="swiglu", norm="rmsnorm", kv_heads=2, rope=True, qk_norm=True),
    dict(norm_position="post"),
])
def test_scan_over_layers_equals_the_loop(overrides):
  cfg = TransformerConfig.preset("tiny", depth=3, **overrides)
  x = _x()
  params = _init(cfg, x)
  scanned = _loop_to_scan(params, cfg.depth)
  kw = dict(causal=True, return_layers=True)
  loop_out, loop_aux = Transformer(cfg).apply(params, x, **kw)
  scan_out, scan_aux = Transformer(cfg.replace(scan_layers=True)).apply(scanned, x, **kw)
  np.testing.assert_allclose(scan_out, loop_out, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(scan_aux["layers"], loop_aux["layers"], rtol=1e-5, atol=1e-5)
  # And the scanned init has the same tree.
  scan_init = _init(cfg.replace(scan_layers=True), x)
  assert jax.tree.map(jnp.shape, nn.unbox(scan_init)) == jax.tree.map(jnp.shape, scanned)


@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_equals_no_remat_values_and_gradients(scan, policy):
  cfg = TransformerConfig.preset("tiny", scan_layers=scan)
  x = _x()
  params = _init(cfg, x)

  def loss(cfg):
    def f(p, x):
      out, _ = Transformer(cfg).apply(p, x, causal=True)
      return jnp.mean(jnp.square(out))
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1)))

  v0, g0 = loss(cfg)(params, x)
  v1, g1 = loss(cfg.replace(remat=policy))(params, x)
  np.testing.assert_allclose(v1, v0, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_causal_backbone_never_lets_the_future_change_the_past():
  cfg = TransformerConfig.preset("tiny", rope=True)
  x = _x(length=8)
  params = _init(cfg, x)
  base, _ = Transformer(cfg).apply(params, x, causal=True)
  changed, _ = Transformer(cfg).apply(params, x.at[:, 5:].add(3.0), causal=True)
  np.testing.assert_allclose(changed[:, :5], base[:, :5], atol=1e-6)
  assert not np.allclose(changed[:, 5:], base[:, 5:])


def test_packed_segments_are_isolated_in_the_backbone():
  cfg = TransformerConfig.preset("tiny")
  x = _x(length=8)
  seg = jnp.array([[1, 1, 1, 2, 2, 2, 2, 2]] * 2)
  params = _init(cfg, x)
  base, _ = Transformer(cfg).apply(params, x, segment_ids=seg)
  changed, _ = Transformer(cfg).apply(params, x.at[:, :3].multiply(-2.0), segment_ids=seg)
  np.testing.assert_allclose(changed[:, 3:], base[:, 3:], atol=1e-5)


def test_padding_never_changes_the_real_tokens():
  cfg = TransformerConfig.preset("tiny")
  x = _x(length=8)
  valid = jnp.array([[True] * 5 + [False] * 3] * 2)
  params = _init(cfg, x)
  mask = valid[:, None, None, :]
  base, _ = Transformer(cfg).apply(params, x, mask=mask)
  noisy = x.at[:, 5:].set(jax.random.normal(jax.random.PRNGKey(7), (2, 3, 64)) * 50)
  changed, _ = Transformer(cfg).apply(params, noisy, mask=mask)
  np.testing.assert_allclose(changed[:, :5], base[:, :5], atol=1e-5)
  # Same as just dropping the padding.
  short, _ = Transformer(cfg).apply(params, x[:, :5])
  np.testing.assert_allclose(base[:, :5], short, atol=1e-5)


@pytest.mark.parametrize("scan", [False, True])
def test_kv_cache_decoding_equals_full_recompute(scan):
  cfg = TransformerConfig.preset("tiny", scan_layers=scan, kv_heads=2, rope=True)
  x = _x(length=7)
  params = _init(cfg, x)
  full, _ = Transformer(cfg).apply(params, x, causal=True)
  model = Transformer(cfg)
  step = jax.jit(lambda p, x, cache, i: model.apply(p, x, causal=True, cache=cache, cache_index=i))
  cache = init_cache(cfg, batch=2, max_length=10)
  # Prefill 4 tokens, then decode one at a time.
  out, aux = step(params, x[:, :4], cache, 0)
  steps = [out]
  for t in range(4, 7):
    out, aux = step(params, x[:, t:t + 1], aux["cache"], t)
    steps.append(out)
  np.testing.assert_allclose(jnp.concatenate(steps, 1), full, rtol=1e-5, atol=1e-5)


def test_cross_attention_builds_an_encoder_decoder():
  enc_cfg = TransformerConfig.preset("tiny")
  dec_cfg = TransformerConfig.preset("tiny", cross_attention=True)
  src, tgt = _x(length=5, seed=2), _x(length=4, seed=3)
  enc_params = _init(enc_cfg, src)
  memory, _ = Transformer(enc_cfg).apply(enc_params, src)
  dec_params = _init(dec_cfg, tgt, context=memory, causal=True)
  assert "cross_attention" in nn.unbox(dec_params)["params"]["layer_0"]
  out, _ = Transformer(dec_cfg).apply(dec_params, tgt, context=memory, causal=True)
  other, _ = Transformer(dec_cfg).apply(dec_params, tgt, context=memory * 2.0, causal=True)
  assert out.shape == tgt.shape and not np.allclose(out, other)
  # Masking out the context's last position makes it irrelevant.
  cmask = jnp.array([True] * 4 + [False])[None, None, None, :]
  a, _ = Transformer(dec_cfg).apply(dec_params, tgt, context=memory, context_mask=cmask, causal=True)
  b, _ = Transformer(dec_cfg).apply(dec_params, tgt, context=memory.at[:, 4].add(9.0),
                                    context_mask=cmask, causal=True)
  np.testing.assert_allclose(a, b, atol=1e-5)
  with pytest.raises(ValueError, match="context must be given"):
    Transformer(dec_cfg).apply(dec_params, tgt)


def test_dropout_and_stochastic_depth_only_in_train_mode():
  cfg = TransformerConfig.preset("tiny", dropout=0.2, attention_dropout=0.2, stochastic_depth=0.3)
  x = _x()
  params = _init(cfg, x)
  eval1, _ = Transformer(cfg).apply(params, x)
  eval2, _ = Transformer(cfg.replace(dropout=0.0, attention_dropout=0.0, stochastic_depth=0.0)).apply(params, x)
  np.testing.assert_array_equal(eval1, eval2)
  rngs = lambda s: {"dropout": jax.random.PRNGKey(s)}
  t1, _ = Transformer(cfg).apply(params, x, train=True, rngs=rngs(0))
  t2, _ = Transformer(cfg).apply(params, x, train=True, rngs=rngs(0))
  t3, _ = Transformer(cfg).apply(params, x, train=True, rngs=rngs(1))
  np.testing.assert_array_equal(t1, t2)
  assert not np.allclose(t1, t3) and not np.allclose(t1, eval1)


def test_every_parameter_has_logical_axis_names():
  cfg = TransformerConfig.preset("tiny", scan_layers=True, qk_norm=True, activation="swiglu")
  params = _init(cfg, _x())
  boxed = jax.tree.leaves(params, is_leaf=lambda v: isinstance(v, nn.Partitioned))
  assert boxed and all(isinstance(b, nn.Partitioned) for b in boxed)
  names = {n for b in boxed for n in b.names}
  assert {"layers", "embed", "heads", "kv_heads", "kv", "mlp"} <= names
  q = nn.unbox(params)["params"]["layers"]["attention"]["query"]["kernel"]
  spec = params["params"]["layers"]["attention"]["query"]["kernel"].names
  assert spec == ("layers", "embed", "heads", "kv") and q.shape == (2, 64, 4, 16)


@pytest.mark.parametrize("kwargs,field", [
    (dict(width=64, depth=2, heads=5, mlp_dim=8), "heads"),
    (dict(width=64, depth=2, heads=4, mlp_dim=8, kv_heads=3), "kv_heads"),
    (dict(width=64, depth=0, heads=4, mlp_dim=8), "depth"),
    (dict(width=64, depth=2, heads=4, mlp_dim=8, activation="tanh"), "activation"),
    (dict(width=64, depth=2, heads=4, mlp_dim=8, norm_position="sandwich"), "norm_position"),
    (dict(width=64, depth=2, heads=4, mlp_dim=8, dropout=1.5), "dropout"),
    (dict(width=64, depth=2, heads=4, mlp_dim=8, remat="some"), "remat"),
    (dict(width=64, depth=2, heads=4, mlp_dim=8, attention_impl="flash"), "attention_impl"),
    (dict(width=60, depth=2, heads=4, mlp_dim=8, head_dim=15, rope=True), "rope"),
])
def test_invalid_configs_raise_errors_naming_the_field(kwargs, field):
  with pytest.raises(ValueError, match=rf"TransformerConfig\.{field}="):
    TransformerConfig(**kwargs)


def test_unknown_preset_and_wrong_width():
  with pytest.raises(ValueError, match="Unknown backbone preset"):
    TransformerConfig.preset("vit-XXL")
  cfg = TransformerConfig.preset("tiny")
  with pytest.raises(ValueError, match=r"\[batch, length, 64\]"):
    Transformer(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 3, 32)))
  assert set(PRESETS) >= {"vit-S", "vit-B", "vit-L", "vit-H", "bert-base", "gpt2-small"}


def test_merge_params_swaps_shared_leaves_and_keeps_boxes_and_fresh_leaves():
  cfg = TransformerConfig(width=32, depth=1, heads=2, mlp_dim=64, dtype="bfloat16",
                          param_dtype="bfloat16")
  fresh = _init(cfg, jnp.zeros((1, 3, 32)))["params"]
  theirs = jax.tree.map(lambda a: np.asarray(a, np.float32) + 1.0, nn.unbox(fresh))
  del theirs["final_norm"]  # a leaf only the model has stays fresh
  merged = merge_params(fresh, {"params": theirs})
  is_box = lambda x: isinstance(x, nn.Partitioned)
  assert [b.names for b in jax.tree.leaves(merged, is_leaf=is_box)] == \
      [b.names for b in jax.tree.leaves(fresh, is_leaf=is_box)]
  plain, before = nn.unbox(merged), nn.unbox(fresh)
  kernel = plain["layer_0"]["mlp"]["wi"]["kernel"]
  assert kernel.dtype == jnp.bfloat16
  np.testing.assert_array_equal(kernel, jnp.asarray(theirs["layer_0"]["mlp"]["wi"]["kernel"],
                                                    jnp.bfloat16))
  jax.tree.map(np.testing.assert_array_equal, plain["final_norm"], before["final_norm"])
  # Extra leaves: an error by default, dropped on request; no shared leaf: an error.
  extra = {**theirs, "head": {"kernel": np.zeros((32, 3))}}
  with pytest.raises(ValueError, match="pretrained x/head/kernel does not exist in the model"):
    merge_params(fresh, extra, where="x/")
  dropped = nn.unbox(merge_params(fresh, extra, extra="drop"))
  assert "head" not in dropped
  with pytest.raises(ValueError, match="share no leaf"):
    merge_params(fresh, {"other": {"kernel": np.zeros(2)}}, extra="drop")
  # Shapes must match unless the resize hook makes them.
  wide = jax.tree.map(lambda a: np.zeros(a.shape[:-1] + (a.shape[-1] + 1,)), theirs)
  with pytest.raises(ValueError, match=r"has shape .* the model wants"):
    merge_params(fresh, wide)
  cut = merge_params(fresh, wide, resize=lambda key, a, shape: a[..., :shape[-1]] + 2.0)
  assert float(jnp.min(nn.unbox(cut)["layer_0"]["mlp"]["wi"]["kernel"])) == 2.0


# ---------------------------------------------------------------- hooks

class RelPosWindowBias(nn.Module):
  """A layer's learned relative-position bias and Swin-like windows.

  Table ``[2 * max_len - 1, heads]`` (a 1-D BEiT table); windows of
  ``window`` positions, shifted by half a window on odd layers.
  """
  config: TransformerConfig
  max_len: int = 8
  window: int = 4

  @nn.compact
  def __call__(self, layer_index, x):
    table = self.param("table", nn.with_logical_partitioning(
        nn.initializers.normal(1.0), (None, "heads")), (2 * self.max_len - 1, self.config.heads))
    pos = jnp.arange(x.shape[1])
    rel = pos[:, None] - pos[None, :] + self.max_len - 1  # [q, kv]
    shift = jnp.where(layer_index % 2 == 1, self.window // 2, 0)  # traced under scan
    win = (pos + shift) // self.window
    return {"bias": jnp.transpose(table[rel], (2, 0, 1))[None],
            "mask": (win[:, None] == win[None, :])[None, None]}


class ZeroBias(nn.Module):
  config: TransformerConfig

  @nn.compact
  def __call__(self, layer_index, x):
    del layer_index
    return {"bias": jnp.zeros((1, self.config.heads, x.shape[1], x.shape[1]))}


def _hand_bias_and_mask(table, layer, length, max_len=8, window=4):
  """The same bias [1, heads, q, kv] and mask [1, 1, q, kv], written out by hand."""
  heads = table.shape[1]
  bias = jnp.stack([jnp.stack([jnp.stack([table[i - j + max_len - 1, h] for j in range(length)])
                               for i in range(length)]) for h in range(heads)])[None]
  shift = window // 2 if layer % 2 else 0
  mask = np.array([[(i + shift) // window == (j + shift) // window for j in range(length)]
                   for i in range(length)])[None, None]
  return bias, jnp.asarray(mask)


def _hook_reference(cfg, params, x, mask, bias):
  """Layer by layer through one-layer backbones given each layer's bias and mask."""
  one = Transformer(cfg.replace(depth=1, final_norm=False))
  p = nn.unbox(params)["params"]
  weights = []
  for i in range(cfg.depth):
    layer = dict(p[f"layer_{i}"])
    hook_bias, hook_mask = _hand_bias_and_mask(layer.pop("attention_bias")["table"], i, x.shape[1])
    (x, _), state = one.apply({"params": {"layer_0": layer}}, x, mask=jnp.logical_and(mask, hook_mask),
                              bias=bias + hook_bias, mutable=[WEIGHTS_COLLECTION])
    weights.append(state[WEIGHTS_COLLECTION]["layer_0"]["attention"]["weights"][0])
  return Norm(cfg).apply({"params": p["final_norm"]}, x), weights


def test_per_layer_bias_hook_equals_hand_reference_scanned_rematted_and_unrolled():
  cfg = TransformerConfig.preset("tiny", depth=3)
  x = _x(length=8)
  valid = jnp.array([[True] * 8, [True] * 6 + [False] * 2])[:, None, None, :]
  call_bias = jax.random.normal(jax.random.PRNGKey(5), (1, cfg.heads, 8, 8))
  kw = dict(mask=valid, bias=call_bias)
  model = lambda c: Transformer(c, layer_bias=RelPosWindowBias)
  params = model(cfg).init(jax.random.PRNGKey(0), x, **kw)
  tables = [nn.unbox(params)["params"][f"layer_{i}"]["attention_bias"]["table"] for i in range(3)]
  assert tables[0].shape == (15, cfg.heads) and not np.allclose(tables[0], tables[1])

  out, state = model(cfg).apply(params, x, **kw, mutable=[WEIGHTS_COLLECTION])
  want, want_weights = _hook_reference(cfg, params, x, valid, call_bias)
  np.testing.assert_allclose(out[0], want, rtol=1e-5, atol=1e-5)
  # Sown weights carry the hook's bias and mask: layer 1's shifted windows
  # {0, 1}, {2..5}, {6, 7} get nothing from outside.
  for i in range(3):
    np.testing.assert_allclose(state[WEIGHTS_COLLECTION][f"layer_{i}"]["attention"]["weights"][0],
                               want_weights[i], atol=1e-6)
  w1 = state[WEIGHTS_COLLECTION]["layer_1"]["attention"]["weights"][0]
  assert float(jnp.max(jnp.abs(w1[:, :, 2:6, :2]))) == 0.0 and float(jnp.min(w1[0, :, 2:6, 2:6])) > 0

  scanned = _loop_to_scan(params, cfg.depth)
  for variant in (dict(scan_layers=True), dict(scan_layers=True, remat="full"), dict(remat="dots")):
    c = cfg.replace(**variant)
    got, _ = model(c).apply(scanned if c.scan_layers else params, x, **kw)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=str(variant))
  scan_init = model(cfg.replace(scan_layers=True)).init(jax.random.PRNGKey(0), x, **kw)
  assert jax.tree.map(jnp.shape, nn.unbox(scan_init)) == jax.tree.map(jnp.shape, scanned)
  assert scan_init["params"]["layers"]["attention_bias"]["table"].names == ("layers", None, "heads")

  # Gradients reach every layer's table, as through the hand-built bias.
  # (Not mean(out**2): after the final LayerNorm that is ~1 whatever the bias.)
  probe = jax.random.normal(jax.random.PRNGKey(9), x.shape)

  def loss(apply):
    return lambda p: jnp.mean(apply(p) * probe)
  g_loop = jax.grad(loss(lambda p: model(cfg).apply(p, x, **kw)[0]))(params)
  g_ref = jax.grad(loss(lambda p: _hook_reference(cfg, p, x, valid, call_bias)[0]))(params)
  g_scan = jax.grad(loss(lambda p: model(cfg.replace(scan_layers=True, remat="full")).apply(
      p, x, **kw)[0]))(scanned)
  for i in range(3):
    g = nn.unbox(g_loop)["params"][f"layer_{i}"]["attention_bias"]["table"]
    assert float(jnp.max(jnp.abs(g))) > 1e-4
    np.testing.assert_allclose(g, nn.unbox(g_ref)["params"][f"layer_{i}"]["attention_bias"]["table"],
                               rtol=1e-4, atol=1e-7)
  for a, b in zip(jax.tree.leaves(g_scan), jax.tree.leaves(_loop_to_scan(g_loop, cfg.depth))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("scan", [False, True])
def test_a_zero_bias_hook_changes_nothing(scan):
  cfg = TransformerConfig.preset("tiny", scan_layers=scan)
  x = _x()
  params = _init(cfg, x)
  hooked = Transformer(cfg, layer_bias=ZeroBias)
  assert jax.tree.map(jnp.shape, nn.unbox(hooked.init(jax.random.PRNGKey(0), x))) == \
      jax.tree.map(jnp.shape, nn.unbox(params))
  want, want_aux = Transformer(cfg).apply(params, x, causal=True)
  got, aux = hooked.apply(params, x, causal=True)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  assert sorted(aux) == sorted(want_aux) == ["pre_norm"]  # no "losses" without losses


def test_aux_losses_of_an_mlp_hook_are_summed_over_layers_scanned_and_unrolled():
  cfg = TransformerConfig.preset("tiny", depth=3)
  x = _x()
  model = lambda c: Transformer(c, mlp=L2Mlp)
  params = model(cfg).init(jax.random.PRNGKey(0), x)
  assert set(nn.unbox(params)["params"]["layer_0"]["mlp"]) == {"wi", "wo"}
  (_, aux), state = model(cfg).apply(params, x, capture_intermediates=lambda m, _: isinstance(m, L2Mlp),
                                     mutable=["intermediates"])
  # What each layer's hook returned, read back from flax's intermediates.
  per_layer = jnp.stack([state["intermediates"][f"layer_{i}"]["mlp"]["__call__"][0][1]["l2"]
                         for i in range(3)])
  assert len(set(np.asarray(per_layer).tolist())) == 3 and float(jnp.min(per_layer)) > 0
  np.testing.assert_array_equal(aux["layer_losses"]["l2"], per_layer)
  np.testing.assert_allclose(aux["losses"]["l2"], jnp.sum(per_layer), rtol=1e-6)
  assert aux["losses"]["l2"].shape == () and aux["losses"]["l2"].dtype == jnp.float32

  scanned = _loop_to_scan(params, cfg.depth)
  loss = lambda c: jax.value_and_grad(lambda p: model(c).apply(p, x)[1]["losses"]["l2"])
  value, grads = loss(cfg)(params)
  for c in (cfg.replace(scan_layers=True), cfg.replace(scan_layers=True, remat="dots")):
    _, scan_aux = model(c).apply(scanned, x)
    np.testing.assert_allclose(scan_aux["layer_losses"]["l2"], per_layer, rtol=1e-5)
    scan_value, scan_grads = loss(c)(scanned)
    np.testing.assert_allclose(scan_value, value, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(scan_grads), jax.tree.leaves(_loop_to_scan(grads, cfg.depth))):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
  # The aux loss's gradient reaches every layer's MLP.
  for i in range(3):
    assert float(jnp.max(jnp.abs(nn.unbox(grads)["params"][f"layer_{i}"]["mlp"]["wi"]["kernel"]))) > 0


def test_bad_hook_outputs_give_clear_errors():
  cfg = TransformerConfig.preset("tiny")
  x = _x()

  class Wrong(nn.Module):
    config: TransformerConfig
    losses: bool = False

    def __call__(self, layer_index, x):
      if self.losses:
        return {"losses": {"z": jnp.ones(3)}}
      return {"biass": 0.0}

  with pytest.raises(ValueError, match=r"layer_bias must return a dict with keys among .*biass"):
    Transformer(cfg, layer_bias=Wrong).init(jax.random.PRNGKey(0), x)
  with pytest.raises(ValueError, match=r"loss 'z' has shape \(3,\); reduce it to a scalar"):
    Transformer(cfg, layer_bias=functools.partial(Wrong, losses=True)).init(jax.random.PRNGKey(0), x)


@pytest.mark.parametrize("overrides,length,causal", [
    (dict(), 197, False),
    (dict(kv_heads=2, activation="swiglu"), 128, True),
    (dict(head_dim=32, kv_heads=1, activation="geglu"), 50, True),
])
def test_config_flops_per_token_counts_matmuls_and_attention_by_hand(overrides, length, causal):
  """6 x (weights of q, k, v, out and the MLP + attention scores and values) per token."""
  cfg = TransformerConfig.preset("vit-S", **overrides)
  w, kv = cfg.width, cfg.resolved_kv_heads * cfg.resolved_head_dim
  mlp_mats = 3 if cfg.activation in ("swiglu", "geglu") else 2
  attention = 4 * length * w * (0.5 if causal else 1.0)
  want = 3 * cfg.depth * (2 * (2 * w * w + 2 * w * kv + mlp_mats * w * cfg.mlp_dim) + attention)
  assert cfg.flops_per_token(length, causal=causal) == want
  if not overrides:  # dense ViT-S, 197 tokens
    assert want == 3 * 12 * (2 * (4 * 384 * 384 + 2 * 384 * 1536) + 4 * 197 * 384)
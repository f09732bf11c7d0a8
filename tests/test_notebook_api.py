"""The notebook API (datong.notebook): tiny models, real properties."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import datong
from datong import notebook as dn
from datong.ops.attention import IMPLEMENTATIONS


def _key(seed=0):
  # rbg keys: initialization compiles ~3x faster on a CPU than with threefry.
  return jax.random.key(seed, impl="rbg")


def _vit(**kw):
  return dn.build("vit_encoder", "tiny", image_size=8, patch_size=2, channels=1, width=32,
                  depth=2, heads=4, mlp_dim=64, **kw)


@pytest.fixture(scope="module")
def vit():
  """A tiny ViT encoder (attention by xla) and its boxed params."""
  model = _vit(attention_impl="xla")
  return model, dn.init(model, rng=_key())


def test_exported_lazily_from_the_package():
  assert sorted(datong._NOTEBOOK) == sorted(n for n in dn.__all__ if n not in (
      "FitResult", "ParamTable"))
  for name in datong._NOTEBOOK:
    assert getattr(datong, name) is getattr(dn, name)
  with pytest.raises(AttributeError):
    datong.no_such_thing  # pylint: disable=pointless-statement


def test_build_routes_overrides_and_lists_choices():
  clip = dn.build("clip", "tiny", depth=1, image_size=8, patch_size=4, channels=1,
                  max_length=16, **{"text.backbone.heads": 2}, pad_id=256)
  cfg = clip.config
  assert cfg.image.backbone.depth == cfg.text.backbone.depth == 1  # every backbone
  assert (cfg.image.backbone.heads, cfg.text.backbone.heads) == (4, 2)  # one by path
  assert cfg.image.image_size == (8, 8) and cfg.text.max_length == 16
  mae = dn.build("mae", "tiny", image_size=8, patch_size=2, channels=1, decoder__depth=1)
  assert (mae.config.encoder.backbone.depth, mae.config.decoder.depth) == (2, 1)
  simmim = dn.build("simmim", "tiny", image_size=8, patch_size=2, channels=1)
  assert simmim.config.mask_cell == (4, 4)  # 2x2 patches (SimMIM's 32 over 16)
  one = dn.build("simmim", "tiny", image_size=6, patch_size=2, channels=1)
  assert one.config.mask_cell == (2, 2)  # 2x2 patches do not tile 6x6: 1 patch
  assert dn.build("vit", "vit-digits").config.image_size == (32, 32)  # a recipe's model
  assert dn.build("vit", "tiny", num_classes=10).num_classes == 10
  with pytest.raises(ValueError, match="gpt, bert, vit"):
    dn.build("transformer")
  with pytest.raises(ValueError, match="gpt2-small.*mae-digits"):
    dn.build("gpt", "huge")
  with pytest.raises(ValueError, match="Did you mean depth.*Valid names: .*max_length"):
    dn.build("gpt", "tiny", detph=3)
  with pytest.raises(ValueError, match="ambiguous.*task.probe.batch_size, train.batch_size"):
    dn.resolve_overrides(_mae_run(), {"batch_size": 8})
  with pytest.raises(ValueError, match="trains a MAEConfig, not a clip"):
    dn.build("clip", "mae-digits")


def _mae_run():
  from datong.train import recipes
  return recipes.get("mae-digits")


def test_describe_lists_every_leaf_with_axes_and_shardings(vit):
  model, params = vit
  table = dn.describe(params, mesh={"fsdp": 2, "tensor": 2})  # 8 fake devices: data=2
  leaves = jax.tree_util.tree_flatten_with_path(nn.unbox(params))[0]
  assert len(table) == len(leaves)
  for (path, leaf), row in zip(leaves, table):
    assert row.path == "/".join(p.key for p in path)
    assert row.shape == leaf.shape and row.dtype == "float32"
  q = table["backbone/layer_0/attention/query/kernel"]
  assert q.shape == (32, 4, 8) and q.axes == ("embed", "heads", "kv")
  assert q.sharding == str(P("fsdp", "tensor", None))
  assert table.total == datong.count_params(params) == dn.count(params)
  text = str(table)
  assert all(r.path in text for r in table) and f"{table.total:,} parameters" in text
  assert f"{table.total:,} parameters" in table._repr_html_()
  # Plain parameters (a checkpoint, datong.hf): the model names the axes.
  plain = dn.describe(nn.unbox(params), model=model)
  assert [r.axes for r in plain] == [r.axes for r in table]
  assert all(r.sharding == "" for r in plain)
  with pytest.raises(ValueError, match="data, fsdp, expert, tensor"):
    dn.describe(params, mesh={"model": 2})


def test_with_attention_same_params_same_outputs():
  model = dn.build("gpt", "tiny", width=32, heads=4, mlp_dim=64, depth=1)
  params = dn.init(model, rng=_key())
  ids = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 12)), jnp.int32)
  ref = jax.jit(lambda p, x: dn.with_attention(model, "reference").apply({"params": p}, x)[0])
  xla = jax.jit(lambda p, x: dn.with_attention(model, "xla").apply({"params": p}, x)[0])
  np.testing.assert_allclose(ref(params, ids), xla(params, ids), atol=2e-5, rtol=1e-5)
  clip = dn.with_attention(dn.build("clip", "tiny", image_size=8, patch_size=4, channels=1), "xla")
  assert clip.config.image.backbone.attention_impl == clip.config.text.backbone.attention_impl == "xla"
  from datong.train import recipes
  run = dn.with_attention(recipes.get("gpt-pydoc"), "reference")
  assert run.task.model.backbone.attention_impl == "reference"
  with pytest.raises(ValueError, match=", ".join(IMPLEMENTATIONS)):
    dn.with_attention(model, "flash")


def test_attention_weights_rows_sum_to_one_and_match_a_hand_computation(vit):
  model, params = vit  # attention by xla: the weights come from the reference softmax anyway
  params = nn.unbox(params)
  images = jnp.asarray(np.random.default_rng(1).standard_normal((2, 8, 8, 1)), jnp.float32)
  weights = dn.attention_weights(model, params, images)
  assert list(weights) == ["backbone/layer_0/attention", "backbone/layer_1/attention"]
  w = weights["backbone/layer_0/attention"]
  assert w.shape == (2, 4, 17, 17)  # [batch, heads, 1 + 16 patches, same]
  np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-5)
  # By hand: LayerNorm of the embeddings, q and k, softmax(q k / sqrt(d)).
  _, aux = dn.apply(model, params, images)
  layer = params["backbone"]["layer_0"]
  norm = layer["attention_norm"]["norm"]
  x = np.asarray(aux["embedded"], np.float64)
  x = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6)
  x = x * np.asarray(norm["scale"]) + np.asarray(norm["bias"])
  att = layer["attention"]
  q = np.einsum("bld,dhk->blhk", x, att["query"]["kernel"]) + np.asarray(att["query"]["bias"])
  k = np.einsum("bld,dhk->blhk", x, att["key"]["kernel"]) + np.asarray(att["key"]["bias"])
  logits = np.einsum("bqhk,bshk->bhqs", q, k) / np.sqrt(8)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  np.testing.assert_allclose(w, probs, atol=1e-5)
  maps = dn.attention_maps(model, params, images, layer=0)
  assert maps.shape == (2, 4, 4, 4)
  np.testing.assert_allclose(maps.sum((-1, -2)), 1.0, atol=1e-5)
  cls_row = probs[:, :, 0, 1:] / probs[:, :, 0, 1:].sum(-1, keepdims=True)
  np.testing.assert_allclose(maps.reshape(2, 4, 16), cls_row, atol=1e-5)
  with pytest.raises(ValueError, match="valid: -2..1"):
    dn.attention_maps(model, params, images, layer=2)
  fig = dn.show_attention(images, maps)
  assert len(fig.axes) == 2 * 5  # 2 images x (image + 4 heads)


def test_scanned_layers_give_the_same_maps(vit):
  images = jnp.asarray(np.random.default_rng(2).standard_normal((1, 8, 8, 1)), jnp.float32)
  loop_model, scan_model = vit[0], _vit(scan_layers=True, attention_impl="xla")
  params = nn.unbox(vit[1])
  stacked = {**params, "backbone": {
      "layers": jax.tree.map(lambda *x: jnp.stack(x), params["backbone"]["layer_0"],
                             params["backbone"]["layer_1"]),
      "final_norm": params["backbone"]["final_norm"]}}
  a = dn.attention_weights(loop_model, params, images)
  b = dn.attention_weights(scan_model, stacked, images)
  assert list(a) == list(b)
  for key in a:
    np.testing.assert_allclose(a[key], b[key], atol=1e-5)


def test_reconstruct_keeps_visible_pixels_and_masks_the_rest():
  model = dn.build("mae", "tiny", image_size=8, patch_size=2, channels=1, width=32,
                   mlp_dim=64, depth=1)
  params = dn.init(model, rng=_key())
  images = jnp.asarray(np.random.default_rng(3).uniform(-1, 1, (3, 8, 8, 1)), jnp.float32)
  out = dn.reconstruct(model, params, images)
  assert out["mask"].shape == (3, 16) and out["mask"].sum(1).tolist() == [12, 12, 12]
  hidden = np.isnan(out["masked"])
  assert hidden.mean() == pytest.approx(0.75)
  np.testing.assert_allclose(out["reconstruction"][~hidden], np.asarray(images)[~hidden], atol=1e-6)
  assert out["loss"] > 0
  fig = dn.show_images([out["images"], out["masked"], out["reconstruction"]],
                       row_titles=["input", "masked", "output"])
  assert len(fig.axes) == 9
  with pytest.raises(TypeError, match="masked-image model \\(MAE, SimMIM\\)"):
    dn.reconstruct(_vit(), params, images)


def test_confusion_matrix():
  m = dn.confusion_matrix([0, 1, 2, 2, 1], [0, 2, 2, 2, 1], num_classes=4)
  assert m.tolist() == [[1, 0, 0, 0], [0, 1, 1, 0], [0, 0, 2, 0], [0, 0, 0, 0]]
  fig = dn.plot_confusion_matrix(m, class_names="abcd")
  assert "80.0%" in fig.axes[0].get_title()
  with pytest.raises(ValueError, match="2 labels but 3 predictions"):
    dn.confusion_matrix([0, 1], [0, 1, 1])


def test_warm_start_loads_a_hugging_face_directory(tmp_path):
  from datong import hf
  from datong.train.warmstart import WarmStartConfig
  from datong.train.tasks.text import GPTTaskConfig
  gpt = dn.build("gpt", "tiny", positions="learned", max_length=32, width=32, heads=4,
                 mlp_dim=64, depth=1, activation="gelu_tanh", norm_eps=1e-5)
  trained = jax.tree.map(lambda x: x + 0.5, nn.unbox(dn.init(gpt, rng=_key(7))))
  hf.save(gpt, trained, str(tmp_path / "gpt2"))
  task = WarmStartConfig(GPTTaskConfig(model=gpt.config, seq_length=32), str(tmp_path / "gpt2")).build()
  spec = task.batch_spec(2)
  variables = jax.jit(task.init, static_argnums=1)(_key(), _Spec(spec))
  assert isinstance(jax.tree.leaves(variables["params"], is_leaf=lambda x: isinstance(
      x, nn.Partitioned))[0], nn.Partitioned)  # logical axes kept for the sharding plan
  jax.tree.map(np.testing.assert_array_equal, nn.unbox(variables["params"]), trained)
  assert task.train_split == "train" and task.batch_spec(2)["inputs"].shape == (2, 32)
  with pytest.raises(ValueError, match="not a Hugging Face model directory"):
    WarmStartConfig(GPTTaskConfig(), str(tmp_path)).build()


class _Spec(dict):
  """A hashable batch spec (a static jit argument, as under the engine's eval_shape)."""

  def __hash__(self):
    return id(self)


def test_fit_runs_the_engine_and_the_loss_decreases(tmp_path):
  from datong.train.tasks.text import GPTTaskConfig
  from datong.unimodal.text import TextConfig
  model = TextConfig(backbone=datong.TransformerConfig(width=32, depth=1, heads=4, mlp_dim=64))
  run = dn.fit(GPTTaskConfig(model=model, seq_length=32), steps=30, batch_size=8,
               learning_rate=3e-3, warmup_steps=3, workdir=str(tmp_path / "run"), evaluate=False,
               devices=jax.devices()[:1])
  steps, losses = run.curve("train/loss")
  assert steps.tolist() == list(range(1, 31))  # log_every=1 for a short run
  assert losses[-5:].mean() < losses[:5].mean() - 0.5
  assert run.metrics["train/loss"] == pytest.approx(losses[-1], rel=1e-6)
  assert not any(k.startswith("eval/") for k in run.metrics)
  assert dn.count(run.params) == datong.count_params(dn.abstract_params(run.model))
  assert run.plot().axes[0].get_lines()
  with pytest.raises(ValueError, match="gpt-pydoc"):
    dn.fit("gpt-pydocs")
  with pytest.raises(ValueError, match="Valid names"):
    dn.fit("gpt-pydoc", steps=1, learning_rat=1.0)


def test_generate_text_uses_the_runs_tokenizer_and_rejects_a_mismatch():
  from datong.unimodal.tokenizers import BPETokenizer, ByteTokenizer
  tok = dn.tokenizer_of("gpt-pydoc")  # the recipe learns a BPE from its train split
  assert isinstance(tok, BPETokenizer) and tok is dn.tokenizer_of(dn.run_config("gpt-pydoc"))
  assert isinstance(dn.tokenizer_of("byte"), ByteTokenizer) and dn.tokenizer_of(tok) is tok
  model = dn.build("gpt", "gpt-pydoc", width=32, depth=1, heads=2, mlp_dim=64)
  params = dn.init(model, rng=_key())
  out = dn.generate_text(model, params, ["The json", "x"], max_new_tokens=5, tokenizer="gpt-pydoc")
  assert len(out) == 2 and all(len(tok.encode(o)) <= 5 * 8 for o in out)
  with pytest.raises(ValueError, match="tokenizer=run, or the recipe name"):
    dn.generate_text(model, params, "The json", max_new_tokens=5)  # the byte default
  with pytest.raises(TypeError, match="no tokenizer"):
    dn.tokenizer_of("vit-digits")


def test_member_of_a_mixture_run_puts_the_shared_backbone_back(tmp_path):
  """``FitResult.member``: a member's params are its own layout, the shared
  backbone included; a wrong name or a non-mixture run is a clear error."""
  from datong.backbone import TransformerConfig  # pylint: disable=import-outside-toplevel
  from datong.notebook.runs import FitResult  # pylint: disable=import-outside-toplevel
  from datong.train.config import RunConfig  # pylint: disable=import-outside-toplevel
  from datong.train.recipes import unified_digits  # pylint: disable=import-outside-toplevel
  from datong.train.tasks.mixture import MixtureTaskConfig  # pylint: disable=import-outside-toplevel
  members = unified_digits.members(TransformerConfig(width=32, depth=1, heads=2, mlp_dim=64),
                                   tokenizer="byte", vocab_size=262, upsample=1, png_examples=0,
                                   decoder=TransformerConfig(width=16, depth=1, heads=2,
                                                             mlp_dim=32), embed_dim=16)
  run = FitResult(config=RunConfig(task=MixtureTaskConfig(members=members[:2])),
                  workdir=str(tmp_path), result=None)
  spec = run.task.batch_spec(2)
  params = jax.eval_shape(lambda r: nn.unbox(run.task.init(r, spec)["params"]),
                          jax.random.PRNGKey(0))
  run._params = params  # pylint: disable=protected-access
  gpt = run.member("gpt")
  assert gpt.model is run.task.members["gpt"].model
  assert gpt.params["encoder"]["backbone"] is params["shared"]["backbone"]
  assert jax.tree.structure(gpt.params) == jax.tree.structure(jax.eval_shape(
      lambda r: nn.unbox(gpt.task.init(r, run.task.member_batch(spec, "gpt"))["params"]),
      jax.random.PRNGKey(0)))
  with pytest.raises(ValueError, match="Unknown member .clip.; choose one of: gpt, mae"):
    run.member("clip")
  single = FitResult(config=RunConfig(task=members[0].task), workdir=str(tmp_path), result=None)
  with pytest.raises(TypeError, match="not a mixture"):
    single.member("gpt")

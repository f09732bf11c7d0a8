"""The architecture holds: arrows point down only, and a new image encoder
plugs into every image consumer from its own file (this one)."""

import ast
import dataclasses
import pathlib
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from datong.backbone import Transformer, TransformerConfig
from datong.train.task import with_aux_losses

ROOT = pathlib.Path(__file__).resolve().parents[1] / "datong"


def _imports(path: pathlib.Path) -> set[str]:
  """Every ``datong...`` module a file imports, at any depth (function bodies too)."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      found.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      found.add(node.module)
      found.update(f"{node.module}.{a.name}" for a in node.names)
  return {m for m in found if m == "datong" or m.startswith("datong.")}


def _files(*parts) -> list[pathlib.Path]:
  base = ROOT.joinpath(*parts)
  return sorted(base.rglob("*.py")) if base.is_dir() else [base]


# Which layer may import which (DESIGN.md): each key may import only modules
# whose name starts with one of its allowed prefixes.
LAYERS = {
    ("ops",): ("datong.ops",),
    ("backbone.py",): ("datong.ops", "datong.backbone"),
    ("params.py",): ("datong.params",),
    ("unimodal",): ("datong.ops", "datong.backbone", "datong.params", "datong.unimodal"),
    ("multimodal",): ("datong.ops", "datong.backbone", "datong.params", "datong.unimodal",
                     "datong.multimodal"),
    ("registry.py",): ("datong.ops", "datong.backbone", "datong.unimodal", "datong.multimodal",
                       "datong.registry"),
    ("hf",): ("datong.ops", "datong.backbone", "datong.unimodal", "datong.multimodal",
              "datong.registry", "datong.hf"),
    # The engine knows the Task contract, not the objectives or the models.
    ("train", "loop.py"): ("datong.train.checkpoint", "datong.train.config", "datong.train.data",
                           "datong.train.sharding", "datong.train.writers", "datong.train.optim",
                           "datong.train.task", "datong.train.recipes", "datong.train.trainer",
                           "datong.train.workdir"),
    ("train", "trainer.py"): ("datong.train.config", "datong.train.data",
                              "datong.train.sharding", "datong.train.optim", "datong.train.task"),
    ("train", "workdir.py"): ("datong.train.config", "datong.train.writers"),
    ("train", "checkpoint.py"): (),
}


def test_arrows_point_down_only():
  bad = []
  for parts, allowed in LAYERS.items():
    for path in _files(*parts):
      for module in _imports(path):
        # ``from datong.train import x`` also names the package; x is checked.
        parent = any(a.startswith(module + ".") for a in allowed)
        if module != "datong" and not parent and not module.startswith(allowed):
          bad.append(f"{path.relative_to(ROOT.parent)} imports {module}")
  assert not bad, "layering broken:\n" + "\n".join(bad)


def test_the_layering_test_sees_imports_inside_functions(tmp_path):
  path = tmp_path / "m.py"
  path.write_text("def f():\n  from datong.train import loop\n  import datong.hf\n")
  assert _imports(path) == {"datong.train", "datong.train.loop", "datong.hf"}


def test_no_datong_file_passes_600_lines():
  long = [f"{p.relative_to(ROOT.parent)}: {n}" for p in ROOT.rglob("*.py")
          if (n := len(p.read_text().splitlines())) > 600]
  assert not long, f"split these by job: {long}"


# ------------------------------------------------------ a toy image encoder --
# Not a ViT: no [CLS], no position table, no "stem" / "backbone" names; a
# 2x2 pixel-pooling stem, a per-token MLP and a Transformer of its own.

@dataclasses.dataclass(frozen=True)
class ToyEncoderConfig:
  image_size: tuple = (8, 8)
  channels: int = 1
  hidden: int = 24
  layers: int = 1

  @property
  def width(self) -> int:
    return self.hidden

  @property
  def num_tokens(self) -> int:
    return (self.image_size[0] // 2) * (self.image_size[1] // 2)

  def flops_per_example(self) -> float:
    return 6.0 * self.num_tokens * 4 * self.channels * self.hidden

  def make(self, *, shared_backbone: Optional[nn.Module] = None, name: Optional[str] = None):
    if shared_backbone is not None:
      raise ValueError("ToyEncoder runs its own mixer only")
    return ToyEncoder(self, name=name)


class ToyEncoder(nn.Module):
  config: ToyEncoderConfig

  @nn.compact
  def __call__(self, images, *, mask=None, train=False, return_layers=False):
    b, h, w, c = images.shape
    cells = images.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 2, 4, 5)
    x = nn.Dense(self.config.hidden, name="cells")(cells.reshape(b, -1, 4 * c))
    x = x + self.param("where", nn.initializers.normal(0.02), x.shape[1:])
    mixer = TransformerConfig(width=self.config.hidden, depth=self.config.layers, heads=2,
                              mlp_dim=32)
    tokens, aux = Transformer(mixer, name="mixer")(x, train=train, return_layers=return_layers)
    pooled = jnp.max(tokens, axis=1)
    return pooled, {**aux, "pooled": pooled, "patch_tokens": tokens, "encoded": tokens}


def _digits_classifier(tmp_path, steps=30):
  from datong.train.config import OptimizerConfig, RunConfig, TrainConfig
  from datong.train.tasks.vision import ViTClassifierConfig
  return RunConfig(task=ViTClassifierConfig(model=ToyEncoderConfig()),
                   train=TrainConfig(steps=steps, batch_size=64, log_every=10,
                                     checkpoint_every=0),
                   optimizer=OptimizerConfig(learning_rate=1e-2, warmup_steps=0))


def test_a_toy_encoder_trains_as_a_classifier_and_is_probed(tmp_path):
  from datong.train import loop
  from datong.train.checkpoint import load_params
  from datong.train.task import EvalContext
  from datong.train.tasks import probes
  cfg = _digits_classifier(tmp_path, steps=100)
  result = loop.train(cfg, str(tmp_path / "clf"), progress=False)
  assert result.metrics["eval/accuracy"] > 0.5  # 100 steps on real digits; chance is 0.1
  trainer = loop.Trainer(cfg, str(tmp_path / "probe"))
  params = load_params(str(tmp_path / "clf"))  # the trained encoder, frozen
  encoder = ToyEncoderConfig().make()

  def feature_sets(p, images):
    _, aux = encoder.apply({"params": p["encoder"]}, images, return_layers=True)
    return {"": probes.select_features(aux, "pooled"),
            "layers_": probes.select_features(aux, "layers")}

  ctx = EvalContext(batches=trainer.eval_batches, workdir="", step=0)
  metrics = probes.probe_metrics(jax.jit(feature_sets), params, ctx, probes.ProbeConfig(),
                                 "train", "test")
  assert metrics["eval/linear_probe_accuracy"] > 0.6
  assert 0.0 <= metrics["eval/layers_knn_accuracy"] <= 1.0


def test_a_toy_encoder_is_clips_image_tower_and_starts_from_a_classifier_run(tmp_path):
  from datong.multimodal.clip import CLIP, ClipConfig
  from datong.train import loop, recipes, warmstart
  from datong.train.config import TrainConfig
  from datong.unimodal.text import TextConfig
  clf_dir = str(tmp_path / "clf")
  loop.train(_digits_classifier(tmp_path, steps=2), clf_dir, progress=False)
  text = TextConfig(backbone=TransformerConfig(width=16, depth=1, heads=2, mlp_dim=32),
                    positions="learned", max_length=48)
  model_cfg = ClipConfig(image=ToyEncoderConfig(), text=text, embed_dim=8, text_pool="mean",
                         text_causal=False, loss="sigmoid")
  base = recipes.get("siglip-digits")
  task = dataclasses.replace(base.task, model=model_cfg, image_init=clf_dir, chunk_size=4,
                             eval_batch_size=184)
  run = dataclasses.replace(base, task=task, train=TrainConfig(steps=2, batch_size=8,
                                                               log_every=1, checkpoint_every=0))
  built = task.build()
  fresh = built.init(jax.random.PRNGKey(0), built.batch_spec(8))["params"]
  pretrained = warmstart.load_pretrained(clf_dir)["encoder"]
  np.testing.assert_array_equal(nn.unbox(fresh)["image"]["encoder"]["cells"]["kernel"],
                                pretrained["cells"]["kernel"])
  result = loop.train(run, str(tmp_path / "clip"), progress=False)
  assert 0.0 <= result.metrics["eval/zero_shot_accuracy"] <= 1.0
  assert np.isfinite(result.metrics["train/loss"])
  assert isinstance(built.model, CLIP)
  assert built.flops_per_example() > model_cfg.image.flops_per_example() > 0


def test_with_aux_losses_sums_every_tower_and_layer_by_name():
  aux = {"image": {"losses": {"balance": 1.0}, "layer_losses": {"balance": [0.5, 0.5]}},
         "text": {"losses": {"balance": 2.0, "z": 0.25}}, "scale": 3.0}
  out = with_aux_losses({"loss": 9.0}, aux)
  assert out == {"loss": 9.0, "aux_losses": {"balance": 3.0, "z": 0.25}}
  assert with_aux_losses({"loss": 9.0}, {"image": {"pooled": 1.0}}) == {"loss": 9.0}


def test_the_cli_and_the_notebook_resolve_settings_the_same_way():
  import pytest
  from datong import notebook
  from datong.train import config as config_lib, recipes
  cli = config_lib.override(recipes.get("clip-digits"), {"depth": "3", "learning_rate": "1e-3"})
  nb = notebook.run_config("clip-digits", depth=3, learning_rate=1e-3)
  assert cli == nb
  assert cli.task.model.image.backbone.depth == cli.task.model.text.backbone.depth == 3
  for settings in ({"detph": "3"}, {"batch_size": "8"}):  # a typo; an ambiguous name
    with pytest.raises(ValueError) as from_cli:
      config_lib.override(recipes.get("mae-digits"), settings)
    with pytest.raises(ValueError) as from_notebook:
      notebook.run_config("mae-digits", **settings)
    # Same words; the notebook's list of valid names also has whole sub-configs.
    first = lambda e: str(e.value).split(" Valid names")[0]
    assert first(from_cli) == first(from_notebook)

"""Every shipped recipe builds and AOT-compiles on the fake 8-device mesh,
and full-size steps (ViT-B/16, GPT-2 small) compile without hardware."""

import dataclasses

import pytest

from datong.backbone import TransformerConfig
from datong.train import config as config_lib
from datong.train import loop, recipes

EXPECTED = {"gpt-pydoc", "bert-pydoc", "vit-digits", "mae-digits", "simmim-digits",
            "clip-digits", "siglip-digits", "swin-digits", "simmim-swin-digits", "gpt-pysource"}


def test_all_issue_recipes_are_registered_with_documented_expectations():
  described = recipes.describe()
  assert EXPECTED <= set(described)
  for name in EXPECTED:
    assert described[name], f"{name} has no docstring"


def test_required_runs_name_known_recipes_and_real_settings():
  """``REQUIRES`` (what bench/recipes.py runs first) points at recipes that
  exist, through settings the recipe's config has."""
  described = recipes.describe()
  needing = {n: recipes.requires(n) for n in described if recipes.requires(n)}
  assert {"beit-digits", "distill-vit-digits", "distill-gpt-pydoc", "fd-clip-digits"} <= set(needing)
  for name, needs in needing.items():
    for setting, needed in needs.items():
      assert needed in described, (name, needed)
      cfg = config_lib.override(recipes.get(name), {setting: "/tmp/some-run"})
      assert config_lib.get_field(cfg, setting) == "/tmp/some-run", (name, setting)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_recipe_compiles_on_a_2x2x2_mesh(name, tmp_path):
  cfg = config_lib.override(recipes.get(name), {"mesh.data": "2", "mesh.fsdp": "2",
                                                "mesh.tensor": "2"})
  batch = cfg.train.batch_size
  if batch % 4:
    cfg = config_lib.override(cfg, {"train.batch_size": str(batch * 4)})
  compiled = loop.Trainer(cfg, str(tmp_path)).compile()
  assert compiled.memory_analysis() is not None


def _compile_bytes(cfg, tmp_path):
  trainer = loop.Trainer(cfg, str(tmp_path))
  return trainer.params_plan.bytes(), trainer.compile().memory_analysis()


def test_vit_b16_step_compiles_on_the_fake_mesh(tmp_path):
  from datong.unimodal.vision import ViTConfig  # pylint: disable=import-outside-toplevel
  cfg = recipes.get("vit-digits")
  backbone = TransformerConfig.preset("vit-B", scan_layers=True, remat="dots_no_batch")
  model = ViTConfig(backbone, image_size=(224, 224), patch_size=(16, 16), channels=3, pool="cls")
  # ImageNet-sized: 224px RGB, 1000 classes (compiling reads no data).
  data = dataclasses.replace(cfg.task.data, dataset="imagenet2012")
  task = dataclasses.replace(cfg.task, model=model, data=data, num_classes=1000)
  cfg = dataclasses.replace(cfg, task=task, train=dataclasses.replace(cfg.train, batch_size=16),
                            mesh=config_lib.MeshConfig(data=2, fsdp=4, tensor=1))
  params, memory = _compile_bytes(cfg, tmp_path)
  # ViT-B/16, 1000 classes: 86,567,656 parameters published (timm); our stem,
  # like big_vision's, gives [CLS] no position row (one 768-vector fewer).
  assert params["total"] == (86_567_656 - 768) * 4
  assert params["per_device"] < params["total"] / 3  # FSDP over 4
  assert memory.argument_size_in_bytes < 3 * params["total"]


def test_gpt2_small_step_compiles_on_the_fake_mesh(tmp_path):
  from datong.unimodal.text import TextConfig  # pylint: disable=import-outside-toplevel
  cfg = recipes.get("gpt-pydoc")
  backbone = TransformerConfig.preset("gpt2-small", scan_layers=True, remat="full")
  model = TextConfig(backbone=backbone, vocab_size=50257, positions="learned", max_length=1024)
  task = dataclasses.replace(cfg.task, model=model, seq_length=1024)
  cfg = dataclasses.replace(cfg, task=task, train=dataclasses.replace(cfg.train, batch_size=8),
                            mesh=config_lib.MeshConfig(data=2, fsdp=2, tensor=2))
  params, memory = _compile_bytes(cfg, tmp_path)
  # GPT-2 small: 124.4M parameters (tied embeddings), float32.
  assert 124e6 * 4 < params["total"] < 125e6 * 4
  assert memory.argument_size_in_bytes < 3 * params["total"]

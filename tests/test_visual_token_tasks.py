"""The VQ-VAE, BEiT and iGPT tasks: recipes compile on the fake 8-device mesh;
BEiT reads precomputed token ids from a dataset feature."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from datong.backbone import TransformerConfig
from datong.train import config as config_lib
from datong.train import loop, recipes
from datong.train.tasks.images import ImageData
from datong.train.tasks.visual_tokens import BEiTTaskConfig
from datong.unimodal.beit import BEiTConfig, beit_encoder

NEW = ("beit-digits", "vqvae-digits", "igpt-digits")


@pytest.mark.parametrize("name", NEW)
def test_recipe_compiles_on_a_2x2x2_mesh(name, tmp_path):
  assert recipes.describe()[name]
  cfg = config_lib.override(recipes.get(name), {"mesh.data": "2", "mesh.fsdp": "2",
                                                "mesh.tensor": "2"})
  if name == "beit-digits":  # its tokenizer is a vqvae-digits run (recipes.requires)
    assert recipes.requires(name) == {"task.tokenizer_path": "vqvae-digits"}
    cfg = config_lib.override(cfg, {"task.tokenizer": "kmeans"})
  compiled = loop.Trainer(cfg, str(tmp_path)).compile()
  assert compiled.memory_analysis() is not None


def test_beit_reads_precomputed_tokens_from_a_feature():
  enc = beit_encoder(TransformerConfig(width=16, depth=1, heads=2, mlp_dim=32), image_size=8,
                     patch_size=2, channels=1)
  cfg = BEiTTaskConfig(BEiTConfig(enc, vocab_size=5), data=ImageData(), tokenizer="feature",
                       token_feature="ids")
  task = cfg.build()
  rs = np.random.default_rng(0)
  examples = [{"image": rs.integers(0, 256, (8, 8), dtype=np.uint8), "label": 3,
               "ids": rs.integers(0, 5, 16)} for _ in range(4)]
  rows = [task.preprocess(e, rs, True) for e in examples]
  batch = {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in rows[0]}
  np.testing.assert_array_equal(batch["tokens"], np.stack([e["ids"] for e in examples]))
  spec = task.batch_spec(4)
  assert {k: v.shape for k, v in spec.items()} == {k: v.shape for k, v in batch.items()}
  params = task.init(jax.random.PRNGKey(0), batch)["params"]
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  params = nn.unbox(params)
  loss, _ = task.loss(params, batch, jax.random.PRNGKey(1))
  # the targets are the feature's ids: other ids give another loss
  other = {**batch, "tokens": (batch["tokens"] + 1) % 5}
  assert float(loss) != float(task.loss(params, other, jax.random.PRNGKey(1))[0])
  with pytest.raises(ValueError, match="augment"):
    dataclasses.replace(cfg, data=ImageData(shift=1.0))
  with pytest.raises(ValueError, match="tokenizer_path.*vqvae-digits"):
    dataclasses.replace(cfg, tokenizer="vqvae").build()

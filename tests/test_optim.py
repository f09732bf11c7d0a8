"""The optimizers from config: Muon against its definition and against Adam."""

import os
import sys

import numpy as np
import optax
import pytest
import jax
import jax.numpy as jnp

from datong.train import loop, optim, writers
from datong.train.config import MeshConfig, OptimizerConfig, RunConfig, TrainConfig

sys.path.insert(0, os.path.dirname(__file__))
from engine_task import DigitsTaskConfig  # pylint: disable=wrong-import-position


@pytest.fixture(scope="module", autouse=True)
def data_dir(tmp_path_factory):
  path = os.environ.get("DATONG_DATA_DIR") or str(tmp_path_factory.mktemp("data"))
  os.environ["DATONG_DATA_DIR"] = path
  return path


def test_matrix_view_of_kernels_is_the_squarest_split():
  assert optim.as_matrix_shape((192, 768)) == (192, 768)
  assert optim.as_matrix_shape((192, 4, 48)) == (192, 192)  # query: width -> heads x head_dim
  assert optim.as_matrix_shape((4, 48, 192)) == (192, 192)  # out: heads x head_dim -> width
  assert optim.as_matrix_shape((4, 4, 3, 128)) == (48, 128)  # a conv stem


@pytest.mark.parametrize("shape", [(24, 24), (16, 40), (40, 16)])
def test_orthogonalize_keeps_singular_vectors_and_flattens_singular_values(shape):
  rng = np.random.default_rng(0)
  u, _ = np.linalg.qr(rng.normal(size=(shape[0], shape[0])))
  v, _ = np.linalg.qr(rng.normal(size=(shape[1], shape[1])))
  k = min(shape)
  spread = np.geomspace(0.1, 10.0, k)  # two decades of singular values
  matrix = (u[:, :k] * spread) @ v[:, :k].T
  out = np.asarray(optim.orthogonalize(jnp.asarray(matrix, jnp.float32)))
  assert out.shape == shape
  # In the input's singular bases the output is diagonal: same vectors ...
  inner = u[:, :k].T @ out @ v[:, :k]
  off = inner - np.diag(np.diag(inner))
  assert np.abs(off).max() < 1e-4, np.abs(off).max()
  # ... and every singular value, 0.1 to 10 before, is now near 1.
  sv = np.diag(inner)
  assert sv.min() > 0.65 and sv.max() < 1.15, (sv.min(), sv.max())
  assert np.abs(out - u[:, :k] @ inner @ v[:, :k].T).max() < 1e-4  # nothing outside the span


def test_muon_is_adam_off_the_matrices_and_orthogonal_momentum_on_them():
  params = {"kernel": jnp.ones((8, 2, 6)), "bias": jnp.ones((6,)), "embedding": jnp.ones((5, 6))}
  mask = {"kernel": True, "bias": True, "embedding": False}  # a vector is never a matrix
  muon = optim.scale_by_muon(mask, momentum=0.9, b1=0.8, b2=0.95, eps=1e-8)
  adam = optax.scale_by_adam(b1=0.8, b2=0.95, eps=1e-8)
  m_state, a_state = muon.init(params), adam.init(params)
  momentum = jnp.zeros((8, 12))
  for i in range(3):
    grads = jax.tree.map(lambda p, i=i: jax.random.normal(jax.random.PRNGKey(i), p.shape), params)
    m_up, m_state = muon.update(grads, m_state)
    a_up, a_state = adam.update(grads, a_state)
    for name in ("bias", "embedding"):
      np.testing.assert_allclose(m_up[name], a_up[name], rtol=1e-6, atol=1e-7)
    g = grads["kernel"].reshape(8, 12)
    momentum = 0.9 * momentum + 0.1 * g
    want = optim.orthogonalize(0.9 * momentum + 0.1 * g) * 0.2 * np.sqrt(12)
    np.testing.assert_allclose(m_up["kernel"], want.reshape(8, 2, 6), rtol=1e-5, atol=1e-6)
  # The update's RMS is AdamW's scale (0.2 per unit singular value, Moonlight).
  rms = float(jnp.sqrt(jnp.mean(jnp.square(m_up["kernel"]))))
  assert 0.1 < rms < 0.3, rms


def test_muon_trains_and_gives_the_same_losses_when_fsdp_shards_its_matrices(tmp_path):
  runs = {}
  for mesh in [(1, 1, 1), (2, 4, 1)]:
    cfg = RunConfig(task=DigitsTaskConfig(),
                    train=TrainConfig(steps=6, batch_size=32, log_every=1, checkpoint_every=0),
                    optimizer=OptimizerConfig(algorithm="muon", learning_rate=3e-3,
                                              warmup_steps=2, weight_decay=0.1),
                    mesh=MeshConfig(*mesh))
    workdir = str(tmp_path / "x".join(map(str, mesh)))
    loop.train(cfg, workdir, progress=False, devices=jax.devices()[:int(np.prod(mesh))],
               evaluate=False)
    runs[mesh] = [r["train/loss"] for r in writers.read_metrics(workdir) if "train/loss" in r]
  base = runs[(1, 1, 1)]
  assert len(base) == 6 and base[-1] < base[0] - 0.1, base
  np.testing.assert_allclose(runs[(2, 4, 1)], base, rtol=2e-5)


def test_unknown_algorithm_names_the_choices():
  with pytest.raises(ValueError, match="choose adamw or muon"):
    OptimizerConfig(algorithm="sgd")
  with pytest.raises(ValueError, match="muon_momentum=1.0: must be in"):
    OptimizerConfig(algorithm="muon", muon_momentum=1.0)

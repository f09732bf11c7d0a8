"""ops.linear.dense: tensordot's values and gradients, with a copy-free CPU backward."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from datong.ops import linear, pallas


@pytest.mark.parametrize("x_shape,k_shape,in_dims", [
    ((4, 16, 24), (24, 40), 1),           # an MLP / projection
    ((2, 3, 8, 6, 5), (6, 5, 24), 2),     # attention's output: (heads, head_dim) -> width
    ((8, 24), (24, 3, 7), 1),             # width -> (heads, head_dim), one batch axis
    ((24,), (24, 10), 1),                 # no batch axis at all
])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dense_matches_tensordot_and_its_gradients(x_shape, k_shape, in_dims, dtype):
  r = jax.random.split(jax.random.PRNGKey(0), 3)
  x = jax.random.normal(r[0], x_shape, jnp.float32).astype(dtype)
  k = jax.random.normal(r[1], k_shape, jnp.float32).astype(dtype)
  out_shape = x_shape[:len(x_shape) - in_dims] + k_shape[in_dims:]
  dy = jax.random.normal(r[2], out_shape, jnp.float32).astype(dtype)

  def value_and_grads(matmul_grad):
    f = lambda x, k: linear.dense(x, k, in_dims, matmul_grad=matmul_grad)
    y, vjp = jax.vjp(f, x, k)
    return (y,) + vjp(dy)

  ours = jax.jit(lambda: value_and_grads(True))()
  autodiff = jax.jit(lambda: value_and_grads(False))()
  for a, b in zip(ours, autodiff):
    assert a.dtype == b.dtype and a.shape == b.shape
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                               rtol=tol, atol=tol)


def test_dense_picks_the_matmul_backward_on_cpu_only():
  x = jnp.ones((4, 8))
  k = jnp.ones((8, 3))
  jaxpr = str(jax.make_jaxpr(lambda x, k: linear.dense(x, k))(x, k))
  assert ("custom_vjp" in jaxpr) == (jax.default_backend() == "cpu")
  with pallas.lowering_for("gpu"):  # lowering for an accelerator: its autodiff
    assert "custom_vjp" not in str(jax.make_jaxpr(lambda x, k: linear.dense(x, k))(x, k))
  # Mixed dtypes take the plain tensordot (its promotion rules).
  assert "custom_vjp" not in str(jax.make_jaxpr(
      lambda x, k: linear.dense(x, k, matmul_grad=True))(x, k.astype(jnp.bfloat16)))


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="about XLA:CPU's lowering")
def test_mlp_backward_compiles_without_copies_on_cpu():
  """A GPT MLP block (tokens 512, width 64, hidden 256, tanh-GELU): the
  matmul backward compiles to no copy at all."""
  r = jax.random.split(jax.random.PRNGKey(0), 3)
  x = jax.random.normal(r[0], (2, 256, 64))
  wi = jax.random.normal(r[1], (64, 256))
  wo = jax.random.normal(r[2], (256, 64))

  def loss(x, wi, wo):
    h = jax.nn.gelu(linear.dense(x, wi, matmul_grad=True), approximate=True)
    return jnp.sum(linear.dense(h, wo, matmul_grad=True) ** 2)

  text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(x, wi, wo).compile().as_text()
  assert not re.findall(r"= \S+ (?:copy|transpose)\(", text)
  assert not re.findall(r"%copy\S* = \S+ fusion\(", text)

"""Masks, position embeddings and patches."""

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from datong import ops


def test_causal_mask_with_offset_matches_definition():
  m = np.asarray(ops.causal_mask(3, 6, offset=2))[0, 0]
  expected = np.array([[j <= i + 2 for j in range(6)] for i in range(3)])
  np.testing.assert_array_equal(m, expected)


def test_padding_segment_and_prefix_masks():
  valid = jnp.array([[True, True, False]])
  np.testing.assert_array_equal(ops.padding_mask(valid)[0, 0], [[1, 1, 0]] * 3)
  seg = jnp.array([[1, 1, 2]])
  np.testing.assert_array_equal(ops.segment_mask(seg)[0, 0], [[1, 1, 0], [1, 1, 0], [0, 0, 1]])
  prefix = np.asarray(ops.prefix_lm_mask(jnp.array([2, 0]), 4))[:, 0]
  np.testing.assert_array_equal(prefix[0], [[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]])
  np.testing.assert_array_equal(prefix[1], np.tril(np.ones((4, 4))))


def test_segment_positions_restart_per_segment():
  seg = jnp.array([[1, 1, 1, 2, 2, 3, 0, 0]])
  np.testing.assert_array_equal(ops.segment_positions(seg), [[0, 1, 2, 0, 1, 0, 0, 1]])


def test_sincos_1d_matches_formula():
  table = np.asarray(ops.sincos_1d(5, 8))
  omega = 1.0 / 10_000 ** (np.arange(4) / 4)
  angles = np.arange(5)[:, None] * omega
  np.testing.assert_allclose(table, np.concatenate([np.sin(angles), np.cos(angles)], 1), atol=1e-6)


def test_sincos_2d_rows_and_columns():
  table = np.asarray(ops.sincos_2d(2, 3, 8))
  assert table.shape == (6, 8)
  # Same row -> same first half; same column -> same second half.
  np.testing.assert_array_equal(table[0, :4], table[2, :4])
  np.testing.assert_array_equal(table[1, 4:], table[4, 4:])
  assert not np.allclose(table[0, :4], table[3, :4])
  with pytest.raises(ValueError, match="divisible by 4"):
    ops.sincos_2d(2, 2, 6)


def test_rotary_is_a_rotation_and_relative():
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 6, 2, 8))
  pos = jnp.arange(6)[None]
  rx = ops.apply_rotary(x, pos)
  np.testing.assert_allclose(jnp.linalg.norm(rx, axis=-1), jnp.linalg.norm(x, axis=-1), rtol=1e-5)
  np.testing.assert_allclose(ops.apply_rotary(x, jnp.zeros_like(pos)), x, atol=1e-6)
  # <R(m) q, R(n) k> depends only on m - n.
  q = jnp.broadcast_to(x[:, :1], x.shape)
  k = jnp.broadcast_to(x[:, 1:2], x.shape)
  dots = jnp.einsum("bthd,bthd->bth", ops.apply_rotary(q, pos), ops.apply_rotary(k, pos + 3))
  np.testing.assert_allclose(dots, jnp.broadcast_to(dots[:, :1], dots.shape), rtol=1e-4, atol=1e-5)


def test_interpolation_is_identity_at_same_resolution_and_resizes():
  table = jax.random.normal(jax.random.PRNGKey(1), (12, 4))
  assert ops.interpolate_2d(table, (3, 4), (3, 4)) is table
  out = ops.interpolate_2d(table, (3, 4), (6, 8))
  assert out.shape == (48, 4)
  const = jnp.ones((12, 4))
  np.testing.assert_allclose(ops.interpolate_2d(const, (3, 4), (5, 7)), 1.0, atol=1e-5)


@pytest.mark.parametrize("shape,patch", [((2, 12, 20, 3), 4), ((1, 6, 10, 1), (3, 5))])
def test_patchify_unpatchify_are_exact_inverses_on_non_square_images(shape, patch):
  images = jax.random.normal(jax.random.PRNGKey(2), shape)
  patches = ops.patchify(images, patch)
  ph, pw = (patch, patch) if isinstance(patch, int) else patch
  assert patches.shape == (shape[0], (shape[1] // ph) * (shape[2] // pw), ph * pw * shape[3])
  np.testing.assert_array_equal(ops.unpatchify(patches, patch, shape[1:3], shape[3]), images)
  # Patch 1 is the second patch of the first row.
  np.testing.assert_array_equal(patches[0, 1], images[0, :ph, pw:2 * pw].reshape(-1))


def test_patchify_equals_strided_convolution():
  images = jax.random.normal(jax.random.PRNGKey(3), (2, 8, 12, 3))
  kernel = jax.random.normal(jax.random.PRNGKey(4), (4, 4, 3, 5))
  conv = jax.lax.conv_general_dilated(images, kernel, (4, 4), "VALID",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))
  linear = ops.patchify(images, 4) @ kernel.reshape(-1, 5)
  np.testing.assert_allclose(linear, conv.reshape(2, -1, 5), rtol=1e-5, atol=1e-5)


def test_patchify_rejects_indivisible_sizes():
  with pytest.raises(ValueError, match="not divisible by the patch size"):
    ops.patchify(jnp.zeros((1, 10, 8, 3)), 4)

"""ops.attention: reference vs numpy, xla vs reference, masking invariances."""

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from datong.ops.attention import (AttentionUnsupportedError, attention,
                                  reference_attention, select_impl)


def _qkv(seed, batch=2, q_len=7, kv_len=9, heads=4, kv_heads=2, head_dim=16, dtype=jnp.float32):
  r = jax.random.split(jax.random.PRNGKey(seed), 3)
  q = jax.random.normal(r[0], (batch, q_len, heads, head_dim), dtype)
  k = jax.random.normal(r[1], (batch, kv_len, kv_heads, head_dim), dtype)
  v = jax.random.normal(r[2], (batch, kv_len, kv_heads, head_dim), dtype)
  return q, k, v


def _numpy_attention(q, k, v, allowed, bias=None):
  """Independent float64 softmax attention with explicit loops over heads."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  b, tq, h, d = q.shape
  groups = h // k.shape[2]
  out = np.zeros_like(q)
  for bi in range(b):
    for hi in range(h):
      kh = hi // groups
      logits = q[bi, :, hi] @ k[bi, :, kh].T / np.sqrt(d)
      if bias is not None:
        logits = logits + bias[bi, hi]
      ok = allowed[bi, hi]
      logits = np.where(ok, logits, -np.inf)
      for i in range(tq):
        if not ok[i].any():
          continue
        w = np.exp(logits[i] - logits[i][ok[i]].max())
        out[bi, i, hi] = (w / w.sum()) @ v[bi, :, kh]
  return out


@pytest.mark.parametrize("causal", [False, True])
def test_reference_equals_numpy_with_segments_bias_and_gqa(causal):
  q, k, v = _qkv(0)
  q_seg = jnp.array([[1, 1, 1, 2, 2, 0, 5], [1, 2, 2, 2, 2, 2, 2]])  # 5: no key
  kv_seg = jnp.array([[1, 1, 2, 2, 2, 2, 0, 0, 3], [1, 1, 1, 2, 2, 2, 2, 2, 2]])
  bias = jax.random.normal(jax.random.PRNGKey(9), (2, 4, 7, 9))
  out = reference_attention(q, k, v, causal=causal, bias=bias, q_segment_ids=q_seg,
                            kv_segment_ids=kv_seg)
  allowed = np.asarray(q_seg)[:, None, :, None] == np.asarray(kv_seg)[:, None, None, :]
  if causal:
    allowed = allowed & np.tril(np.ones((7, 9), bool))
  allowed = np.broadcast_to(allowed, (2, 4, 7, 9))
  expected = _numpy_attention(q, k, v, allowed, np.asarray(bias))
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
  # Some rows are fully masked in this setup; they must be exactly zero.
  assert (~allowed.any(-1)).any()


@pytest.mark.parametrize("causal", [False, True])
def test_xla_equals_reference_forward_and_gradients(causal):
  q, k, v = _qkv(1)
  q_seg = jnp.array([[1, 1, 1, 2, 2, 2, 0], [1, 1, 1, 1, 1, 1, 1]])
  kv_seg = jnp.array([[1, 1, 2, 2, 2, 2, 2, 0, 0], [1] * 9])
  kw = dict(causal=causal, q_segment_ids=q_seg, kv_segment_ids=kv_seg)

  def loss(impl):
    def f(q, k, v):
      return jnp.sum(jnp.sin(attention(q, k, v, impl=impl, strict=True, **kw)))
    return f

  ref_val, ref_grads = jax.value_and_grad(loss("reference"), argnums=(0, 1, 2))(q, k, v)
  xla_val, xla_grads = jax.value_and_grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)
  np.testing.assert_allclose(xla_val, ref_val, rtol=1e-5)
  for a, b in zip(xla_grads, ref_grads):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_causal_future_tokens_never_change_the_past():
  q, k, v = _qkv(2, q_len=8, kv_len=8)
  base = attention(q, k, v, causal=True)
  noise = jax.random.normal(jax.random.PRNGKey(5), k[:, 5:].shape)
  changed = attention(q.at[:, 5:].add(1.0), k.at[:, 5:].add(noise), v.at[:, 5:].add(noise), causal=True)
  np.testing.assert_array_equal(changed[:, :5], base[:, :5])
  assert not np.allclose(changed[:, 5:], base[:, 5:])


def test_padded_keys_never_change_other_outputs():
  q, k, v = _qkv(3, q_len=6, kv_len=6)
  valid = jnp.array([[True] * 4 + [False] * 2] * 2)
  mask = valid[:, None, None, :]
  base = attention(q, k, v, mask=mask)
  noise = 100.0 * jax.random.normal(jax.random.PRNGKey(6), k[:, 4:].shape)
  changed = attention(q, k.at[:, 4:].set(noise), v.at[:, 4:].set(noise), mask=mask)
  np.testing.assert_allclose(changed, base, rtol=0, atol=1e-6)


def test_segments_are_isolated():
  q, k, v = _qkv(4, q_len=8, kv_len=8)
  seg = jnp.array([[1, 1, 1, 2, 2, 2, 2, 2]] * 2)
  base = attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg)
  changed = attention(q, k.at[:, :3].multiply(-3.0), v.at[:, :3].add(7.0),
                      q_segment_ids=seg, kv_segment_ids=seg)
  np.testing.assert_allclose(changed[:, 3:], base[:, 3:], atol=1e-6)
  assert not np.allclose(changed[:, :3], base[:, :3])


def test_gqa_equals_repeating_kv_heads():
  q, k, v = _qkv(5, heads=6, kv_heads=2)
  grouped = attention(q, k, v, causal=True, impl="reference")
  repeated = attention(q, jnp.repeat(k, 3, axis=2), jnp.repeat(v, 3, axis=2), causal=True,
                       impl="reference")
  np.testing.assert_allclose(grouped, repeated, rtol=1e-6, atol=1e-6)
  mqa = attention(q, k[:, :, :1], v[:, :, :1], impl="xla")
  np.testing.assert_allclose(
      mqa, attention(q, jnp.repeat(k[:, :, :1], 6, 2), jnp.repeat(v[:, :, :1], 6, 2)), atol=1e-6)


def test_bfloat16_close_to_float32():
  q, k, v = _qkv(6)
  out32 = attention(q, k, v, causal=True, impl="reference")
  out16 = attention(*(a.astype(jnp.bfloat16) for a in (q, k, v)), causal=True, impl="xla")
  assert out16.dtype == jnp.bfloat16
  np.testing.assert_allclose(out16.astype(jnp.float32), out32, atol=5e-2, rtol=5e-2)


def test_dropout_is_rescaled_and_needs_rng():
  q, k, v = _qkv(7)
  with pytest.raises(ValueError, match="dropout_rng"):
    attention(q, k, v, dropout_rate=0.5)
  out = attention(q, k, v, dropout_rate=0.5, dropout_rng=jax.random.PRNGKey(0))
  assert out.shape == q.shape and not np.allclose(out, attention(q, k, v))
  # auto picks the reference (the only one with dropout) without warning.
  assert select_impl(q, k, v, impl="auto", dropout_rate=0.5) == "reference"


def test_unservable_impl_falls_back_with_warning_or_raises_when_strict():
  q, k, v = _qkv(8)
  with pytest.warns(UserWarning, match="falling back"):
    out = attention(q, k, v, impl="cudnn")  # no GPU here, and float32
  np.testing.assert_allclose(out, reference_attention(q, k, v), atol=1e-6)
  with pytest.raises(AttentionUnsupportedError, match="cudnn"):
    attention(q, k, v, impl="cudnn", strict=True)
  assert select_impl(q, k, v) == "xla"  # auto on CPU


def test_bad_inputs_raise_clear_errors():
  q, k, v = _qkv(9, heads=3, kv_heads=2)
  with pytest.raises(ValueError, match="multiple of kv_heads"):
    attention(q, k, v)
  q, k, v = _qkv(9)
  with pytest.raises(ValueError, match="Unknown attention impl"):
    attention(q, k, v, impl="flash")
  with pytest.raises(ValueError, match="boolean"):
    attention(q, k, v, mask=jnp.zeros((1, 1, 7, 9)))
  with pytest.raises(ValueError, match="both q_segment_ids and kv_segment_ids"):
    attention(q, k, v, q_segment_ids=jnp.zeros((2, 7), int))
  with pytest.raises(ValueError, match=r"\[batch, q_length"):
    attention(q[0], k, v)

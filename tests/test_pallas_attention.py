"""Pallas flash attention (interpret mode on CPU) against the reference.

Every case compares the forward output and the q/k/v gradients (VJP with a
random cotangent) with ``reference_attention``. Interpret-mode compiles cost
a few seconds per case, so the grid is a hand-picked list rather than a full
product.
"""

import importlib

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from datong.ops import pallas as dpallas
from datong.ops.pallas import BlockSizes, gpu, tpu
from datong.ops.pallas.sharding import logical_to_mesh_axes

# `datong.ops.attention` the module (the package re-exports a function of that name).
attn_mod = importlib.import_module("datong.ops.attention")

SMALL_GPU = BlockSizes(block_q=32, block_kv=16, block_q_dkv=16, block_kv_dkv=32,
                       block_q_dq=32, block_kv_dq=16)
SMALL_TPU = BlockSizes(block_q=16, block_kv=8, block_q_dkv=8, block_kv_dkv=16,
                       block_q_dq=16, block_kv_dq=8)


def _inputs(seed, batch, q_len, kv_len, heads, kv_heads, head_dim, dtype, segments):
  r = jax.random.split(jax.random.PRNGKey(seed), 6)
  q = jax.random.normal(r[0], (batch, q_len, heads, head_dim), jnp.float32).astype(dtype)
  k = jax.random.normal(r[1], (batch, kv_len, kv_heads, head_dim), jnp.float32).astype(dtype)
  v = jax.random.normal(r[2], (batch, kv_len, kv_heads, head_dim), jnp.float32).astype(dtype)
  do = jax.random.normal(r[3], q.shape, jnp.float32).astype(dtype)
  q_ids = kv_ids = None
  if segments:
    # Packed documents (sorted ids) with padding at the end: q padding (id 99)
    # and document 7 (q only) match no key, so those rows see nothing.
    q_ids = jnp.sort(jax.random.randint(r[4], (batch, q_len), 0, 3), axis=1)
    kv_ids = jnp.sort(jax.random.randint(r[5], (batch, kv_len), 0, 3), axis=1)
    q_ids = q_ids.at[:, -max(1, q_len // 5):].set(99)
    if q_len > 3:
      q_ids = q_ids.at[:, 0].set(7)
    kv_ids = kv_ids.at[:, -max(1, kv_len // 7):].set(-5)
  return q, k, v, do, q_ids, kv_ids


def _value_and_grads(fn, q, k, v, do):
  def loss(q, k, v):
    out = fn(q, k, v)
    return jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32)), out
  (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
  return (out,) + tuple(grads)


def _check(got, want, dtype):
  names = ("out", "dq", "dk", "dv")
  for name, a, b in zip(names, got, want):
    assert a.dtype == b.dtype, (name, a.dtype, b.dtype)
    a = np.asarray(a, np.float32)
    b = np.asarray(b, np.float32)
    assert np.all(np.isfinite(a)), name
    if dtype == jnp.float32:
      np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5, err_msg=name)
    else:
      rel = np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-6)
      assert rel < 1e-2, (name, rel)


def _compare(kernel, seed, batch, q_len, kv_len, heads, kv_heads, head_dim, causal,
             segments, dtype=jnp.float32):
  q, k, v, do, q_ids, kv_ids = _inputs(seed, batch, q_len, kv_len, heads, kv_heads,
                                       head_dim, dtype, segments)
  got = _value_and_grads(
      lambda q, k, v: kernel(q, k, v, causal=causal, q_segment_ids=q_ids,
                             kv_segment_ids=kv_ids), q, k, v, do)
  if dtype == jnp.float32:
    want = _value_and_grads(
        lambda q, k, v: attn_mod.reference_attention(
            q, k, v, causal=causal, q_segment_ids=q_ids, kv_segment_ids=kv_ids), q, k, v, do)
  else:  # bf16 kernel vs the float32 truth on the same (rounded) inputs
    want = _value_and_grads(
        lambda q, k, v: attn_mod.reference_attention(
            q, k, v, causal=causal, q_segment_ids=q_ids, kv_segment_ids=kv_ids),
        *(x.astype(jnp.float32) for x in (q, k, v, do)))
    want = tuple(w.astype(dtype) for w in want)
  _check(got, want, dtype)
  if segments:
    # Rows that see no key: exactly zero output and zero dq.
    seen = (q_ids[:, :, None] == kv_ids[:, None, :])
    if causal:
      seen = seen & jnp.tril(jnp.ones((q_len, kv_len), bool))[None]
    dead = ~jnp.any(seen, axis=-1)
    assert bool(jnp.any(dead))
    dead = np.asarray(dead)
    assert np.all(np.asarray(got[0], np.float32)[dead] == 0)
    assert np.all(np.asarray(got[1], np.float32)[dead] == 0)


# (batch, q_len, kv_len, heads, kv_heads, head_dim, causal, segments, dtype, blocks)
GPU_CASES = [
    (2, 17, 17, 4, 2, 16, True, False, jnp.float32, None),
    (1, 1, 17, 2, 1, 16, False, True, jnp.float32, None),
    (1, 1, 1, 1, 1, 16, True, False, jnp.float32, None),
    (1, 128, 128, 4, 1, 32, True, True, jnp.float32, SMALL_GPU),
    (1, 257, 257, 2, 2, 16, True, False, jnp.float32, SMALL_GPU),
    (1, 128, 257, 4, 2, 16, False, True, jnp.float32, None),
    (1, 257, 128, 2, 1, 16, False, False, jnp.float32, SMALL_GPU),
    (1, 40, 100, 2, 1, 16, False, False, jnp.float32, SMALL_GPU),  # padded keys, no mask else
    (1, 257, 17, 2, 2, 16, True, True, jnp.float32, SMALL_GPU),
    (1, 17, 128, 2, 1, 16, True, False, jnp.float32, SMALL_GPU),
    (1, 33, 40, 2, 1, 40, True, True, jnp.float32, SMALL_GPU),  # head_dim padded to 64
    (1, 128, 128, 2, 2, 64, True, True, jnp.float32, None),
    (1, 128, 128, 2, 1, 128, False, False, jnp.float32, None),
    (1, 128, 128, 4, 2, 64, True, True, jnp.bfloat16, SMALL_GPU),
]


@pytest.mark.parametrize(
    "batch,q_len,kv_len,heads,kv_heads,head_dim,causal,segments,dtype,blocks", GPU_CASES)
def test_gpu_kernel_matches_reference(batch, q_len, kv_len, heads, kv_heads, head_dim,
                                      causal, segments, dtype, blocks):
  kernel = lambda *a, **kw: gpu.flash_attention(*a, **kw, block_sizes=blocks, interpret=True)
  _compare(kernel, 0, batch, q_len, kv_len, heads, kv_heads, head_dim, causal, segments, dtype)


TPU_CASES = [
    (1, 17, 17, 2, 1, 16, True, True, jnp.float32),
    (1, 40, 24, 4, 2, 16, True, False, jnp.float32),
    (1, 24, 40, 2, 2, 16, False, True, jnp.bfloat16),
]


@pytest.mark.parametrize("batch,q_len,kv_len,heads,kv_heads,head_dim,causal,segments,dtype",
                         TPU_CASES)
def test_tpu_kernel_matches_reference(batch, q_len, kv_len, heads, kv_heads, head_dim,
                                      causal, segments, dtype):
  kernel = lambda *a, **kw: tpu.flash_attention(
      *a, **kw, block_sizes=SMALL_TPU, interpret=tpu.default_interpret())
  _compare(kernel, 1, batch, q_len, kv_len, heads, kv_heads, head_dim, causal, segments, dtype)


def test_causal_loops_skip_blocks_above_the_diagonal():
  cfg = gpu._Config(scale=1.0, causal=True, q_len=64, kv_len=64, groups=1, block_q=16,
                    block_kv=16, block_q_dkv=16, block_kv_dkv=16, block_q_dq=16,
                    block_kv_dq=16, num_warps=None, num_stages=2, interpret=True)
  # q block i runs kv blocks [0, i] unmasked below the diagonal, masked on it.
  assert [gpu._kv_block_range(cfg, i, 16, 16, False) for i in range(4)] == [
      (0, 1), (1, 2), (2, 3), (3, 4)]
  tcfg = tpu._Config(scale=1.0, causal=True, q_len=64, kv_len=64, groups=1, block_q=16,
                     block_kv=16, block_q_dkv=16, block_kv_dkv=16, block_q_dq=16,
                     block_kv_dq=16, interpret=True)
  assert [tuple(int(x) for x in tpu._kv_blocks(tcfg, i, 16, 16, False))
          for i in range(4)] == [(1, 0), (2, 1), (3, 2), (4, 3)]
  # kv block j needs q blocks [j, 4), masked only on the diagonal block.
  assert [tuple(int(x) for x in tpu._q_blocks(tcfg, j, 16, 16)) for j in range(4)] == [
      (0, 1, 4), (1, 2, 4), (2, 3, 4), (3, 4, 4)]


# ---------------------------------------------------------------- datong.ops.attention


def test_through_attention_op_in_interpret_mode():
  q, k, v, _, q_ids, kv_ids = _inputs(2, 2, 17, 17, 4, 2, 16, jnp.float32, True)
  with dpallas.interpret_mode(True):
    assert attn_mod.select_impl(q, k, v, impl="pallas_gpu", strict=True, causal=True,
                                q_segment_ids=q_ids, kv_segment_ids=kv_ids) == "pallas_gpu"
    got = jax.jit(lambda q, k, v: attn_mod.attention(
        q, k, v, causal=True, q_segment_ids=q_ids, kv_segment_ids=kv_ids,
        impl="pallas_gpu", strict=True))(q, k, v)
  want = attn_mod.reference_attention(q, k, v, causal=True, q_segment_ids=q_ids,
                                      kv_segment_ids=kv_ids)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_interpret_mode_env_var_and_context(monkeypatch):
  q, k, v, *_ = _inputs(0, 1, 8, 8, 2, 2, 16, jnp.float32, False)
  monkeypatch.delenv("DATONG_PALLAS_INTERPRET", raising=False)
  if jax.default_backend() != "gpu":
    assert "backend" in dpallas.unsupported_reason("gpu", q, k, v)
  if jax.default_backend() != "tpu":
    assert "backend" in dpallas.unsupported_reason("tpu", q, k, v)
  with dpallas.interpret_mode(True):
    assert dpallas.unsupported_reason("gpu", q, k, v) is None
    assert dpallas.unsupported_reason("tpu", q, k, v) is None
  monkeypatch.setenv("DATONG_PALLAS_INTERPRET", "1")
  assert dpallas.unsupported_reason("gpu", q, k, v) is None
  with dpallas.interpret_mode(False):  # the context wins over the env var
    if jax.default_backend() != "gpu":
      assert dpallas.unsupported_reason("gpu", q, k, v) is not None


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="needs a non-GPU backend")
def test_strict_raises_and_non_strict_falls_back_off_platform(monkeypatch):
  monkeypatch.delenv("DATONG_PALLAS_INTERPRET", raising=False)
  q, k, v, *_ = _inputs(0, 1, 8, 8, 2, 2, 16, jnp.float32, False)
  with pytest.raises(attn_mod.AttentionUnsupportedError, match="backend"):
    attn_mod.attention(q, k, v, impl="pallas_gpu", strict=True)
  with pytest.warns(UserWarning):
    out = attn_mod.attention(q, k, v, impl="pallas_gpu", strict=False)
  np.testing.assert_allclose(out, attn_mod.reference_attention(q, k, v), atol=1e-6)


def test_unsupported_reasons():
  q, k, v, *_ = _inputs(0, 1, 8, 8, 2, 2, 16, jnp.float32, False)
  with dpallas.interpret_mode(True):
    reason = lambda *a, **kw: dpallas.unsupported_reason("gpu", *a, **kw)
    assert "bias" in reason(q, k, v, bias=jnp.zeros((1, 2, 8, 8)))
    assert "mask" in reason(q, k, v, mask=jnp.ones((1, 1, 8, 8), bool))
    assert "dropout" in reason(q, k, v, dropout_rate=0.1)
    half = [x.astype(jnp.float16) for x in (q, k, v)]
    assert "float16" in reason(*half)
    big = jnp.zeros((1, 8, 2, 512))
    assert "head_dim" in reason(big, big, big)
    assert "platform" in dpallas.unsupported_reason("cpu", q, k, v)
    # Through the op: the reason reaches the user.
    with pytest.raises(attn_mod.AttentionUnsupportedError, match="bias"):
      attn_mod.attention(q, k, v, bias=jnp.zeros((1, 2, 8, 8)), impl="pallas_gpu", strict=True)


@pytest.mark.parametrize("platform", ["gpu", "tpu"])
def test_bad_inputs_raise_clear_errors(platform):
  q, k, v, _, q_ids, kv_ids = _inputs(0, 1, 8, 8, 4, 2, 16, jnp.float32, True)
  call = lambda *a, **kw: dpallas.attention(platform, *a, **kw)
  with dpallas.interpret_mode(True):
    with pytest.raises(ValueError, match="both"):
      call(q, k, v, q_segment_ids=q_ids)
    with pytest.raises(ValueError, match=r"\[batch, length\]"):
      call(q, k, v, q_segment_ids=q_ids[:, :4], kv_segment_ids=kv_ids)
    with pytest.raises(ValueError, match="integers"):
      call(q, k, v, q_segment_ids=q_ids.astype(jnp.float32),
           kv_segment_ids=kv_ids.astype(jnp.float32))
    with pytest.raises(ValueError, match="multiple of kv_heads"):
      call(q, k[:, :, :1].repeat(3, axis=2), v[:, :, :1].repeat(3, axis=2))
    with pytest.raises(ValueError, match="same shape"):
      call(q, k, v[:, :4])
    with pytest.raises(ValueError, match="share a dtype"):
      call(q, k.astype(jnp.bfloat16), v)
    with pytest.raises(ValueError, match="platform"):
      dpallas.attention("cpu", q, k, v)
  with pytest.raises(ValueError, match="power of two"):
    gpu.flash_attention(q, k, v, block_sizes=BlockSizes(block_q=48), interpret=True)
  with pytest.raises(ValueError, match="multiple of 128"):
    tpu.flash_attention(q, k, v, block_sizes=BlockSizes(block_q=100), interpret=False)


# ---------------------------------------------------------------- sharding

RULES = (("batch", ("data", "fsdp")), ("heads", "tensor"), ("kv_heads", "tensor"),
         ("length", None), ("kv", None))


def _mesh(axis_type="Auto"):
  assert jax.device_count() >= 8, "tests/conftest.py must provide 8 fake CPU devices"
  axis_type = getattr(jax.sharding.AxisType, axis_type)
  return jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(axis_type,) * 3)


def test_logical_to_mesh_axes():
  assert logical_to_mesh_axes(("batch", "length", "heads", "kv"), RULES) == (
      ("data", "fsdp"), None, "tensor", None)
  # First rule whose mesh axes are still free wins; unknown names replicate.
  rules = (("heads", "tensor"), ("kv", "tensor"), ("kv", "fsdp"))
  assert logical_to_mesh_axes(("heads", "kv", "other"), rules) == ("tensor", "fsdp", None)


# kv_heads 1: MQA, the kv head is repeated to shard over "tensor".
@pytest.mark.parametrize("kv_heads,axis_type", [(2, "Auto"), (1, "Explicit")])
def test_sharded_matches_unsharded(kv_heads, axis_type):
  mesh = _mesh(axis_type)
  q, k, v, do, q_ids, kv_ids = _inputs(3, 4, 33, 33, 4, kv_heads, 16, jnp.float32, True)

  def fn(rules):
    return lambda q, k, v: attn_mod.attention(
        q, k, v, causal=True, q_segment_ids=q_ids, kv_segment_ids=kv_ids,
        impl="pallas_gpu", strict=True, logical_rules=rules)

  with dpallas.interpret_mode(True):
    with jax.set_mesh(mesh):
      assert "shard_map" in str(jax.make_jaxpr(fn(RULES))(q, k, v))
      got = _value_and_grads(fn(RULES), q, k, v, do)
    want = _value_and_grads(fn(None), q, k, v, do)
  assert got[0].sharding.spec[0] == ("data", "fsdp") and got[0].sharding.spec[2] == "tensor"
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_sharded_rejects_indivisible_heads():
  mesh = _mesh()
  q, k, v, *_ = _inputs(0, 4, 8, 8, 3, 3, 16, jnp.float32, False)
  with dpallas.interpret_mode(True), jax.set_mesh(mesh):
    with pytest.raises(ValueError, match="heads"):
      dpallas.attention("gpu", q, k, v, logical_rules=RULES)

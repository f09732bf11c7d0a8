"""The Pallas kernels and whole train steps lower for GPU and TPU on a CPU.

``jax.export`` with ``platforms=("cuda",)`` / ``("tpu",)`` runs the Triton /
Mosaic lowering of every kernel without the hardware: block shapes Mosaic
rejects, ops Triton cannot lower and layout constraints fail here. Each test
asserts that the kernels are really in the lowered module (custom calls named
after them, on operands of the expected dtype), not a fallback. Compiling
the lowered code (and its correctness) needs the device: see
``tests/test_pallas_attention.py`` for the interpret-mode checks.
"""

import dataclasses
import re
import warnings

import jax
import jax.numpy as jnp
import pytest

from datong.backbone import TransformerConfig
from datong.ops import pallas as dpallas
from datong.ops.pallas import gpu, tpu
from datong.train import config as config_lib
from datong.train import loop, recipes

# jax refuses to export a Triton call unless told it is a deliberate one.
_TRITON = jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")
PLATFORMS = {
    # our platform name -> (jax.export platform, custom call target, kernel names)
    "gpu": ("cuda", "__gpu$xla.gpu.triton",
            ("datong_flash_fwd", "datong_flash_dkv", "datong_flash_dq")),
    "tpu": ("tpu", "tpu_custom_call",
            ("datong_flash_fwd_tpu", "datong_flash_dkv_tpu", "datong_flash_dq_tpu")),
}
KERNELS = {"gpu": gpu.flash_attention, "tpu": tpu.flash_attention}


def _export(fn, platform, *args):
  target, _, _ = PLATFORMS[platform]
  checks = [_TRITON] if platform == "gpu" else []
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # a fallback to the reference warns: fail on it
    return jax.export.export(fn, platforms=(target,), disabled_checks=checks)(*args)


def _kernel_calls(module_text: str, platform: str) -> list[tuple[str, str]]:
  """(kernel name, custom-call line) for every kernel custom call in the module."""
  _, call_target, _ = PLATFORMS[platform]
  calls = []
  for line in module_text.splitlines():
    if f"stablehlo.custom_call @{call_target}(" not in line:
      continue
    # Mosaic: kernel_name = "..."; Triton: name = "..." in its backend config.
    names = re.findall(r'\b(?:kernel_name|name) = "([^"]+)"', line)
    assert names, line[:300]
    calls.append((names[0], line))
  return calls


# (q_len, kv_len, heads, kv_heads, head_dim, dtype, causal, segments): head_dim
# 64/128 and sizes that pad (80 -> 128; 96 -> 128 on GPU); lengths that are and
# are not multiples of the blocks; q_len != kv_len; GQA and MQA.
CASES = [
    (1024, 1024, 4, 4, 128, jnp.bfloat16, True, False),
    (1024, 1024, 4, 2, 64, jnp.bfloat16, True, True),
    (197, 197, 4, 4, 64, jnp.float32, False, False),
    (1000, 1000, 4, 2, 128, jnp.float32, False, True),
    (300, 700, 4, 1, 80, jnp.bfloat16, False, False),
    (77, 77, 2, 2, 96, jnp.float32, True, False),
    (640, 384, 8, 2, 128, jnp.bfloat16, False, True),
]


@pytest.mark.parametrize("platform", sorted(PLATFORMS))
@pytest.mark.parametrize("case", CASES, ids=lambda c: "q{}-kv{}-h{}-kvh{}-d{}-{}-{}-{}".format(
    c[0], c[1], c[2], c[3], c[4], jnp.dtype(c[5]).name, "causal" if c[6] else "full",
    "seg" if c[7] else "noseg"))
def test_kernel_forward_and_backward_lower_to_the_platform_kernels(platform, case):
  q_len, kv_len, heads, kv_heads, head_dim, dtype, causal, segments = case
  batch = 2
  q = jax.ShapeDtypeStruct((batch, q_len, heads, head_dim), dtype)
  kv = jax.ShapeDtypeStruct((batch, kv_len, kv_heads, head_dim), dtype)
  q_ids = jax.ShapeDtypeStruct((batch, q_len), jnp.int32) if segments else None
  kv_ids = jax.ShapeDtypeStruct((batch, kv_len), jnp.int32) if segments else None
  kernel = KERNELS[platform]

  def fwd_bwd(q, k, v, q_ids, kv_ids):
    def loss(q, k, v):
      out = kernel(q, k, v, causal=causal, q_segment_ids=q_ids, kv_segment_ids=kv_ids)
      return jnp.sum(out.astype(jnp.float32) ** 2), out
    (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    return out, grads

  exported = _export(jax.jit(fwd_bwd), platform, q, kv, kv, q_ids, kv_ids)
  calls = _kernel_calls(exported.mlir_module(), platform)
  assert [name for name, _ in calls] == list(PLATFORMS[platform][2])
  short = {jnp.bfloat16: "bf16", jnp.float32: "f32"}[dtype]
  for name, line in calls:
    assert f"x{short}>" in line, (name, "operands are not", short)
  # The outputs keep the caller's shapes and dtypes.
  out_aval, grads = exported.out_avals[0], exported.out_avals[1:]
  assert (out_aval.shape, out_aval.dtype) == (q.shape, q.dtype)
  assert [(g.shape, g.dtype) for g in grads] == [(q.shape, dtype), (kv.shape, dtype),
                                                 (kv.shape, dtype)]


def test_kernels_lower_without_the_tpu_generation_query():
  """The Mosaic lowering of ``sign`` / floor division asks for the TPU
  generation, which fails off a TPU; the kernel's index maps avoid both, so
  GQA (``head // groups``) lowers on a CPU."""
  q = jax.ShapeDtypeStruct((1, 256, 4, 128), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((1, 256, 2, 128), jnp.bfloat16)
  exported = _export(jax.jit(lambda q, k, v: tpu.flash_attention(q, k, v, causal=True)),
                     "tpu", q, kv, kv)
  assert [n for n, _ in _kernel_calls(exported.mlir_module(), "tpu")] == ["datong_flash_fwd_tpu"]


def test_lowering_for_serves_only_its_platform_and_never_interprets():
  q = jnp.zeros((1, 16, 2, 8), jnp.float32)
  assert dpallas.unsupported_reason("tpu", q, q, q) is not None  # CPU backend
  with dpallas.lowering_for("tpu"), dpallas.interpret_mode(True):
    assert dpallas.unsupported_reason("tpu", q, q, q) is None
    assert "lowering for tpu" in dpallas.unsupported_reason("gpu", q, q, q)
    jaxpr = str(jax.make_jaxpr(lambda q: dpallas.attention("tpu", q, q, q))(q))
  assert "pallas_call" in jaxpr
  with pytest.raises(ValueError, match="expected 'gpu', 'tpu'"):
    with dpallas.lowering_for("cuda"):
      pass
  assert dpallas.lowering_target() is None


# ------------------------------------------------------------ whole train steps


def _gpt2_small(impl):
  from datong.train.tasks.text import GPTTaskConfig  # pylint: disable=import-outside-toplevel
  from datong.unimodal.text import TextConfig  # pylint: disable=import-outside-toplevel
  backbone = TransformerConfig.preset("gpt2-small", scan_layers=True, remat="full",
                                      attention_impl=impl, dtype="bfloat16")
  model = TextConfig(backbone=backbone, vocab_size=50257, positions="learned", max_length=1024)
  # Byte tokens: building the task reads no data (a BPE would learn from it).
  return GPTTaskConfig(model=model, seq_length=1024, tokenizer="byte")


def _vit_b16(impl):
  from datong.unimodal.vision import ViTConfig  # pylint: disable=import-outside-toplevel
  backbone = TransformerConfig.preset("vit-B", scan_layers=True, remat="dots_no_batch",
                                      attention_impl=impl, dtype="bfloat16")
  model = ViTConfig(backbone, image_size=(224, 224), patch_size=(16, 16), channels=3, pool="cls")
  task = recipes.get("vit-digits").task
  data = dataclasses.replace(task.data, dataset="imagenet2012")  # lowering reads no data
  return dataclasses.replace(task, model=model, data=data, num_classes=1000)


MODELS = {"gpt2-small": _gpt2_small, "vit-B/16": _vit_b16}


@pytest.mark.parametrize("platform", sorted(PLATFORMS))
@pytest.mark.parametrize("model", sorted(MODELS))
def test_train_step_lowers_with_the_kernels_inside_shard_map(model, platform, tmp_path):
  """The jitted, donated, sharded Trainer step (bf16 compute, fp32 AdamW) on
  a (data 2, fsdp 2, tensor 2) mesh of fake CPU devices, with the platform's
  kernel under ``shard_map`` (heads split over ``tensor``)."""
  make_task = MODELS[model]
  cfg = recipes.get("vit-digits")
  cfg = dataclasses.replace(
      cfg, task=make_task(f"pallas_{platform}"),
      train=dataclasses.replace(cfg.train, batch_size=8),
      mesh=config_lib.MeshConfig(data=2, fsdp=2, tensor=2))
  with dpallas.lowering_for(platform):
    trainer = loop.Trainer(cfg, str(tmp_path))
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=trainer.batch_sharding)
             for k, v in trainer.batch_spec.items()}
    with trainer._context():  # pylint: disable=protected-access
      exported = _export(trainer.step_fn, platform, trainer.abstract_state, batch)
  assert exported.nr_devices == 8
  text = exported.mlir_module()
  names = [name for name, _ in _kernel_calls(text, platform)]
  fwd, dkv, dq = PLATFORMS[platform][2]
  # Scanned layers: one forward in the scan body (plus its rematerialized
  # copy under remat="full"), one dk/dv and one dq kernel in the backward.
  assert names.count(dkv) == 1 and names.count(dq) == 1, names
  assert 1 <= names.count(fwd) <= 2 and set(names) == {fwd, dkv, dq}, names
  # The kernels run per device under shard_map (Shardy or GSPMD spelling).
  assert "sdy.manual_computation" in text or "SPMDFullToShardShape" in text
  # bf16 compute reaches the kernel: its q/k/v operands are bf16.
  assert all("xbf16>" in line for _, line in _kernel_calls(text, platform))

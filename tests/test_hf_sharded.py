"""``hf.load(..., mesh=, rules=)``: every parameter placed with its target sharding.

On the fake 8-device CPU mesh (tests/conftest.py) the placed parameters carry
the shardings the logical rules give (dimensions the mesh does not divide
stay whole) and equal the whole-file load, for a GPT-2 (fused q/k/v sliced
as views of the mapped file) and a ViT classifier (patch kernel copied).
"""

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from datong import hf
from datong.train.sharding import RULES
from test_hf import _tiny_gpt, _tiny_vit


@pytest.fixture(scope="module")
def mesh():
  devices = np.asarray(jax.devices()[:8])
  assert devices.size == 8, "tests/conftest.py gives 8 fake CPU devices; run under pytest"
  return Mesh(devices.reshape(1, 4, 2), ("data", "fsdp", "tensor"))


def _leaves(tree):
  return {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.mark.parametrize("family", ["gpt2", "vit"])
def test_sharded_load_places_every_tensor_and_equals_the_whole_load(tmp_path, mesh, family):
  model, params = _tiny_gpt(tie=False) if family == "gpt2" else _tiny_vit()
  hf.save(model, params, str(tmp_path))
  _, whole = hf.load(str(tmp_path))
  _, sharded = hf.load(str(tmp_path), mesh=mesh, rules=RULES)
  whole, sharded = _leaves(whole), _leaves(sharded)
  assert whole.keys() == sharded.keys()
  split = 0
  for key, arr in sharded.items():
    assert arr.sharding.mesh == mesh, key
    np.testing.assert_array_equal(np.asarray(arr), np.asarray(whole[key]), err_msg=key)
    assert arr.dtype == whole[key].dtype
    # Each device holds exactly its block of the full array.
    for shard in arr.addressable_shards:
      np.testing.assert_array_equal(np.asarray(shard.data), np.asarray(whole[key])[shard.index])
    split += any(axis is not None for axis in arr.sharding.spec)
  assert split >= len(sharded) // 2  # most parameters are really split
  query = sharded["['encoder']['backbone']['layer_0']['attention']['query']['kernel']"]
  # [embed 32, heads 4, kv 8] over fsdp=4, tensor=2.
  assert tuple(query.sharding.spec) == ("fsdp", "tensor", None)
  assert {s.data.shape for s in query.addressable_shards} == {(8, 2, 8)}
  if family == "gpt2":  # vocab 61 is not divisible by tensor=2: that dimension stays whole
    assert tuple(sharded["['encoder']['embed']['embedding']"].sharding.spec) == (None, "fsdp")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_sharded_load_of_a_16_bit_checkpoint_casts_per_shard(tmp_path, mesh, monkeypatch, dtype):
  """16-bit tensors stay views of the file and are cast per shard: the result
  equals the whole load (which casts every tensor up front)."""
  import ml_dtypes
  model, params = _tiny_gpt(tie=False)
  hf.save(model, params, str(tmp_path))
  file = str(tmp_path / "model.safetensors")
  low = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(np.float16)
  hf.write_safetensors(file, {k: v.astype(low) for k, v in hf.read_safetensors(file).items()})
  _, whole = hf.load(str(tmp_path))
  monkeypatch.setattr(hf.State, "VIEW_MIN_BYTES", 0)  # every tensor of the tiny model
  seen = []
  real_place = hf.placement.place
  monkeypatch.setattr(hf.placement, "place", lambda p, *a: seen.extend(
      np.asarray(x).dtype for x in jax.tree.leaves(p)) or real_place(p, *a))
  _, sharded = hf.load(str(tmp_path), mesh=mesh, rules=RULES)
  assert low in seen  # the converted tree really held the file's 16-bit views
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, sharded),
               jax.tree.map(np.asarray, whole))
  assert {x.dtype for x in jax.tree.leaves(sharded)} == {np.dtype(np.float32)}


def test_sharded_load_with_scanned_layers_stacks_per_shard(tmp_path, mesh, monkeypatch):
  """``scan_layers=True``: the stacked ``[depth, ...]`` parameters are built
  shard by shard (never whole on the host) and equal the whole scanned load."""
  model, params = _tiny_gpt()
  hf.save(model, params, str(tmp_path))
  _, whole = hf.load(str(tmp_path), scan_layers=True)
  kinds = set()
  real_place = hf.placement.place
  monkeypatch.setattr(hf.placement, "place", lambda p, *a: kinds.update(
      type(x).__name__ for x in jax.tree.leaves(p)) or real_place(p, *a))
  _, sharded = hf.load(str(tmp_path), mesh=mesh, rules=RULES, scan_layers=True)
  assert "LazyStack" in kinds
  whole, sharded = _leaves(whole), _leaves(sharded)
  assert whole.keys() == sharded.keys()
  for key, arr in sharded.items():
    np.testing.assert_array_equal(np.asarray(arr), np.asarray(whole[key]), err_msg=key)
  query = sharded["['encoder']['backbone']['layers']['attention']['query']['kernel']"]
  assert query.shape == (2, 32, 4, 8)  # [layers, embed, heads, kv]
  assert tuple(query.sharding.spec) == (None, "fsdp", "tensor", None)


def test_mesh_without_rules_is_named(tmp_path, mesh):
  model, params = _tiny_gpt()
  hf.save(model, params, str(tmp_path))
  with pytest.raises(ValueError, match="pass mesh and rules together"):
    hf.load(str(tmp_path), mesh=mesh)


def test_hf_load_bench_smoke_reports_every_case(tmp_path):
  """bench/hf_load.py --smoke: each case loads in a fresh process, the FSDP
  case with every parameter split and no more peak memory than the whole load."""
  import os
  import sys
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                  "bench"))
  import hf_load
  rows = {r["case"]: r for r in hf_load.main(["--smoke", "--dir", str(tmp_path / "ckpt")])}
  assert set(rows) == {"whole", "whole+put", "fsdp"}
  assert rows["fsdp"]["sharded_leaves"] == rows["fsdp"]["leaves"] > 0
  assert rows["whole"]["sharded_leaves"] == 0
  assert rows["fsdp"]["param_mb"] == rows["whole"]["param_mb"]
  assert all(r["seconds"] > 0 and r["peak_rss_mb"] >= r["base_rss_mb"] for r in rows.values())

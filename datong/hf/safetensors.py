"""The safetensors format and HF model directories, read and written with numpy.

A ``.safetensors`` file is an 8-byte little-endian header size, a JSON
header (name -> dtype, shape, byte range) and the raw little-endian buffers;
no torch is needed.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any, Mapping, Optional

import ml_dtypes
import numpy as np

from datong.hf.common import UnsupportedError

_DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype("<i8"), "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"), "I8": np.dtype("i1"), "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}
_NAMES = {v: k for k, v in _DTYPES.items()}


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """All tensors of one ``.safetensors`` file as numpy arrays (copies)."""
  with open(path, "rb") as f:
    (size,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(size))
    data = f.read()
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    if info["dtype"] not in _DTYPES:
      raise UnsupportedError(f"{path}: tensor {name} has dtype {info['dtype']}; "
                             f"supported: {sorted(_DTYPES)}")
    start, end = info["data_offsets"]
    arr = np.frombuffer(data[start:end], dtype=_DTYPES[info["dtype"]])
    out[name] = arr.reshape(info["shape"]).copy()
  return out


def write_safetensors(path: str, tensors: Mapping[str, Any],
                      metadata: Optional[Mapping[str, str]] = None):
  """Write ``tensors`` (name -> array) as one ``.safetensors`` file."""
  header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
  buffers, offset = [], 0
  for name in sorted(tensors):
    arr = np.asarray(tensors[name])  # (ascontiguousarray would make scalars 1-D)
    if arr.dtype not in _NAMES:
      raise ValueError(f"tensor {name}: dtype {arr.dtype} cannot be written to safetensors")
    raw = arr.astype(arr.dtype.newbyteorder("<")).tobytes()
    header[name] = {"dtype": _NAMES[arr.dtype], "shape": list(arr.shape),
                    "data_offsets": [offset, offset + len(raw)]}
    buffers.append(raw)
    offset += len(raw)
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)  # buffers start 8-byte aligned
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for raw in buffers:
      f.write(raw)


def read_checkpoint(path: str) -> tuple[dict, dict[str, np.ndarray]]:
  """``(config dict, state dict)`` of a local HF model directory."""
  config_file = os.path.join(path, "config.json")
  if not os.path.isfile(config_file):
    raise FileNotFoundError(f"{path}: no config.json (expected a Hugging Face model directory)")
  with open(config_file) as f:
    config = json.load(f)
  single = os.path.join(path, "model.safetensors")
  index = os.path.join(path, "model.safetensors.index.json")
  if os.path.isfile(single):
    return config, read_safetensors(single)
  if os.path.isfile(index):
    with open(index) as f:
      weight_map = json.load(f)["weight_map"]
    state = {}
    for shard in sorted(set(weight_map.values())):
      state.update(read_safetensors(os.path.join(path, shard)))
    missing = sorted(set(weight_map) - set(state))
    if missing:
      raise ValueError(f"{path}: the index lists tensors no shard holds: {missing[:5]}")
    return config, state
  if any(n.endswith((".bin", ".pt", ".pth")) for n in os.listdir(path)):
    raise UnsupportedError(
        f"{path}: only pickled PyTorch weights found; Datong reads safetensors only "
        "(re-save with model.save_pretrained(path, safe_serialization=True)).")
  raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")

"""The safetensors format and HF model directories, read and written with numpy.

A ``.safetensors`` file is an 8-byte little-endian header size, a JSON
header (name -> dtype, shape, byte range) and the raw little-endian buffers;
no torch is needed.
"""

from __future__ import annotations

import json
import mmap
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


def _header(path: str, f, file_size: int) -> dict:
  """The JSON header of an open ``.safetensors`` file, checked against its size."""
  raw = f.read(8)
  if len(raw) < 8:
    raise ValueError(f"{path}: not a safetensors file ({file_size} bytes, shorter than the "
                     "8-byte header size).")
  (size,) = struct.unpack("<Q", raw)
  if size > file_size - 8:
    raise ValueError(f"{path}: not a valid safetensors file: its header claims {size} bytes "
                     f"but the file has {file_size}; the file is truncated or not safetensors.")
  try:
    header = json.loads(f.read(size))
  except ValueError as e:
    raise ValueError(f"{path}: the safetensors header is not valid JSON ({e}); the file is "
                     "damaged.") from None
  if not isinstance(header, dict):
    raise ValueError(f"{path}: the safetensors header is not a JSON object.")
  return header


def _check_entries(path: str, header: dict, data_size: int) -> list[tuple[str, int, int]]:
  """Each tensor's ``(name, start, end)``: sizes match shapes, ranges lie in the
  data and do not overlap."""
  spans = []
  for name, info in header.items():
    if name == "__metadata__":
      continue
    try:
      dtype, shape, (start, end) = info["dtype"], info["shape"], info["data_offsets"]
    except (KeyError, TypeError, ValueError):
      raise ValueError(f"{path}: tensor {name!r} has a malformed header entry {info!r}.") from None
    if dtype not in _DTYPES:
      raise UnsupportedError(f"{path}: tensor {name} has dtype {dtype}; "
                             f"supported: {sorted(_DTYPES)}")
    want = int(np.prod(shape, dtype=np.int64)) * _DTYPES[dtype].itemsize
    if not 0 <= start <= end or end - start != want:
      raise ValueError(f"{path}: tensor {name!r} ({dtype}{list(shape)}, {want} bytes) has the "
                       f"byte range [{start}, {end}); the file is damaged.")
    if end > data_size:
      raise ValueError(f"{path}: tensor {name!r} ends at byte {end} of the data but the file "
                       f"holds {data_size}; the file is truncated (download or copy it again).")
    spans.append((name, start, end))
  spans.sort(key=lambda t: (t[1], t[2]))
  for (a, _, a_end), (b, b_start, _) in zip(spans, spans[1:]):
    if b_start < a_end:
      raise ValueError(f"{path}: tensors {a!r} and {b!r} overlap in the file; it is damaged.")
  return spans


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """All tensors of one ``.safetensors`` file as numpy arrays (copies).

  The header is checked first (size within the file, every tensor's byte
  range matching its shape, inside the data, not overlapping another), so a
  damaged or truncated file is an error naming the file and the tensor.
  """
  file_size = os.path.getsize(path)
  with open(path, "rb") as f:
    header = _header(path, f, file_size)
    data = f.read()
  out = {}
  for name, start, end in _check_entries(path, header, len(data)):
    info = header[name]
    arr = np.frombuffer(data[start:end], dtype=_DTYPES[info["dtype"]])
    out[name] = arr.reshape(info["shape"]).copy()
  return out


class MappedFiles:
  """Read-only memory maps of checkpoint files, whose pages can be let go.

  Arrays from ``map_safetensors`` are views into these maps: nothing is read
  until touched, and ``release()`` (``madvise(MADV_DONTNEED)``) drops the
  pages touched so far from this process (they stay in the OS page cache;
  a later touch reads them again), so the resident set stays near what is
  in use.
  """

  def __init__(self):
    self.maps: list[mmap.mmap] = []

  def release(self):
    for m in self.maps:
      if hasattr(m, "madvise"):
        m.madvise(mmap.MADV_DONTNEED)


def map_safetensors(path: str, files: MappedFiles) -> dict[str, np.ndarray]:
  """Every tensor of one ``.safetensors`` file as a read-only view into a
  memory map (checked as ``read_safetensors`` checks). The map joins ``files``."""
  file_size = os.path.getsize(path)
  with open(path, "rb") as f:
    header = _header(path, f, file_size)
    start = f.tell()  # the data follow the header
    data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
  files.maps.append(data)
  out = {}
  for name, lo, hi in _check_entries(path, header, file_size - start):
    info = header[name]
    dtype = _DTYPES[info["dtype"]]
    out[name] = np.frombuffer(data, dtype=dtype, count=(hi - lo) // dtype.itemsize,
                              offset=start + lo).reshape(info["shape"])
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


def read_checkpoint(path: str, files: Optional[MappedFiles] = None
                    ) -> tuple[dict, dict[str, np.ndarray]]:
  """``(config dict, state dict)`` of a local HF model directory.

  With ``files`` the tensors are memory-mapped views (``map_safetensors``)
  instead of copies read into memory.
  """
  read = read_safetensors if files is None else (lambda f: map_safetensors(f, files))
  config_file = os.path.join(path, "config.json")
  if not os.path.isfile(config_file):
    raise FileNotFoundError(f"{path}: no config.json (expected a Hugging Face model directory)")
  with open(config_file, encoding="utf-8") as f:
    try:
      config = json.load(f)
    except ValueError as e:
      raise ValueError(f"{config_file}: not valid JSON ({e}).") from None
  single = os.path.join(path, "model.safetensors")
  index = os.path.join(path, "model.safetensors.index.json")
  if os.path.isfile(single):
    return config, read(single)
  if os.path.isfile(index):
    with open(index, encoding="utf-8") as f:
      try:
        weight_map = json.load(f)["weight_map"]
      except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{index}: not a valid safetensors index (needs a 'weight_map'; "
                         f"{type(e).__name__}: {e}).") from None
    state = {}
    for shard in sorted(set(weight_map.values())):
      state.update(read(os.path.join(path, shard)))
    missing = sorted(set(weight_map) - set(state))
    if missing:
      raise ValueError(f"{path}: the index lists tensors no shard holds: {missing[:5]}")
    return config, state
  if any(n.endswith((".bin", ".pt", ".pth")) for n in os.listdir(path)):
    raise UnsupportedError(
        f"{path}: only pickled PyTorch weights found; Datong reads safetensors only "
        "(re-save with model.save_pretrained(path, safe_serialization=True)).")
  raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")

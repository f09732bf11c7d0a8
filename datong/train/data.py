"""Data: tfds array_record sources read through grain, sharded per process.

The order of examples is a property of the run, not of the machine count.
For a source of `n` records, global position `g` (counting examples from the
start of training) holds record `perm_e(g % n)` of epoch `e = g // n`, where
`perm_e` is grain's index shuffle seeded from `(seed, e)`. Global batch `s`
is positions `[s * batch_size, (s + 1) * batch_size)`; process `p` of `P`
gets the `p`-th contiguous block of `batch_size // P` of it, which is the
order `jax.make_array_from_process_local_data` expects. Consequences:

- an iterator's state is just the number of global batches taken (plus a
  fingerprint of the settings, checked on restore), so it is a small JSON
  dict, and a run may resume on a different number of processes;
- batches may straddle epochs when `n % batch_size != 0`: no example is
  dropped or repeated within an epoch while training runs forever;
- `transform(example, rng)` gets a generator keyed by `(seed, g)`, so
  augmentation is identical after a resume and across process counts.

    source = load_source("digits", "train")
    it = make_iterator(source, batch_size=128, seed=0)
    batch = to_global(next(it), NamedSharding(mesh, P("data")))
    state = it.get_state()  # JSON-serializable; it.set_state(state) resumes

Embedded datasets (`datong.train.datasets`) are built on first use into
`data_dir`: the explicit argument, else `$DATONG_DATA_DIR`, else
`~/.cache/datong/tfds`. Any other tfds catalog dataset is read from
`data_dir`, else `$DATONG_DATA_DIR`, else tfds's own default
(`$TFDS_DATA_DIR` or `~/tensorflow_datasets`), and must have been prepared
there with `file_format="array_record"`.
"""

import json
import os
import shutil
import tempfile
from typing import Any, Callable, Iterator, Mapping

import grain
import jax
import numpy as np
import tensorflow_datasets as tfds

from datong.train import datasets

Example = dict[str, Any]
Transform = Callable[[Example, np.random.Generator], Example]

DATA_DIR_ENV = "DATONG_DATA_DIR"
DEFAULT_DATA_DIR = os.path.join("~", ".cache", "datong", "tfds")
STATE_FORMAT = "datong.data/1"

# Threads only help reads that wait on I/O; records here are small and local,
# and a deep buffer would read hundreds of batches ahead of every new iterator.
_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)

# Splits up to this size on disk are decoded once and served from memory.
IN_MEMORY_MAX_BYTES = 256 * 2**20

# Purposes folded into the user's seed so the shuffle and the transform never
# share a stream, and seed s + 1 is not seed s one epoch later (grain folds the
# epoch into the shuffle seed by addition).
_SHUFFLE, _TRANSFORM, _EVAL_TRANSFORM = 0, 1, 2


# ----------------------------------------------------------------- sources ---

def _base_name(name: str) -> str:
  return name.split(":")[0].split("/")[0]


def _embedded_dir(data_dir: str | os.PathLike | None) -> str:
  d = data_dir or os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR
  return os.path.abspath(os.path.expanduser(os.fspath(d)))


def cache_path(*parts: str, data_dir: str | os.PathLike | None = None) -> str:
  """A path under ``<data dir>/cache/`` (made if missing) for results derived
  from the data once and reused by later processes, e.g. learned tokenizers."""
  path = os.path.join(_embedded_dir(data_dir), "cache", *parts)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  return path


def _catalog_dir(data_dir: str | os.PathLike | None) -> str:
  d = data_dir or os.environ.get(DATA_DIR_ENV) or tfds.core.constants.DATA_DIR
  return os.path.abspath(os.path.expanduser(os.fspath(d)))


def _is_built(path: str) -> bool:
  return os.path.exists(os.path.join(path, "dataset_info.json"))


def prepare(name: str, data_dir: str | os.PathLike | None = None) -> str:
  """Builds embedded dataset `name` unless built; returns the data_dir used.

  Safe to call often (a file check when built) and from concurrent
  processes: each builds into its own temporary directory and renames the
  result into place; a process that loses the race discards its copy.
  For a catalog dataset it only checks that it is prepared.
  """
  base = _base_name(name)
  if base not in datasets.BUILDERS:
    root = _catalog_dir(data_dir)
    _catalog_builder(name, root)  # raises unless prepared
    return root
  root = _embedded_dir(data_dir)
  cls = datasets.BUILDERS[base]
  final = os.path.join(root, cls.name, str(cls.VERSION))
  if _is_built(final):
    return root
  os.makedirs(os.path.join(root, cls.name), exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{cls.name}-building-", dir=root)
  try:
    cls(data_dir=tmp, file_format="array_record").download_and_prepare()
    try:
      # Atomic; replaces an empty leftover dir, fails on a non-empty one.
      os.rename(os.path.join(tmp, cls.name, str(cls.VERSION)), final)
    except OSError:
      if not _is_built(final):
        raise OSError(f"cannot move the built {cls.name} into {final}; if that directory "
                      "is a broken earlier build, delete it and retry") from None
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return root


def _catalog_builder(name: str, root: str):
  try:
    builder = tfds.builder(name, data_dir=root)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(f"unknown dataset {name!r}: not one of Datong's embedded datasets "
                     f"{sorted(datasets.BUILDERS)} nor in the tfds catalog") from e
  if not builder.is_prepared():
    raise FileNotFoundError(
        f"tfds dataset {name!r} is not prepared in {root} (looked for "
        f"{builder.data_dir}). Prepare it once, where TensorFlow and the network are "
        f"available, with `tfds build {name} --data_dir={root} --file_format=array_record` "
        f"or tfds.builder({name!r}, data_dir={root!r}, file_format='array_record')"
        ".download_and_prepare(), or pass data_dir= / set $DATONG_DATA_DIR to where it is.")
  return builder


def load_source(name: str, split: str, data_dir: str | os.PathLike | None = None,
                in_memory: bool | None = None):
  """Random-access source of `split`: `len(src)`, `src[i]` -> dict of numpy/bytes.

  Embedded datasets are prepared on first use. Text features come back as
  `bytes`; `digits` images as uint8 [8, 8, 1] and labels as int64.
  `in_memory`: decode every record once and keep them (`InMemorySource`);
  None does so when the split is at most `IN_MEMORY_MAX_BYTES` on disk.
  """
  root = prepare(name, data_dir)
  # download=False: for a catalog dataset tfds would otherwise try to fetch it.
  source = tfds.data_source(name, split=split, data_dir=root, download=False)
  if in_memory is None:
    in_memory = _split_bytes(source, split) <= IN_MEMORY_MAX_BYTES
  return InMemorySource(source) if in_memory else source


def _split_bytes(source, split: str) -> float:
  try:
    return float(source.dataset_info.splits[split].num_bytes)
  except (AttributeError, KeyError, TypeError):
    return float("inf")  # unknown size: stream it


class InMemorySource:
  """Every record of `source` decoded once and kept, for small splits.

  tfds decodes a record on every read (~0.2 ms for a digits image), which
  on a small model costs a noticeable share of the training step. Arrays
  are read-only, so a transform that would modify them in place fails
  loudly instead of corrupting later epochs.
  """

  def __init__(self, source):
    self._records = [_read_only(source[i]) for i in range(len(source))]

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index: int) -> Example:
    return dict(self._records[index])  # a fresh dict; the arrays are shared


def _read_only(example: Example) -> Example:
  def freeze(x):
    if isinstance(x, np.ndarray):
      x = x.copy()
      x.setflags(write=False)
    return x
  return {k: (_read_only(v) if isinstance(v, Mapping) else freeze(v)) for k, v in example.items()}


# ---------------------------------------------------------------- iterator ---

def _derive_seed(seed: int, purpose: int) -> int:
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
  return int(np.random.SeedSequence([int(seed), purpose]).generate_state(1)[0])


def _processes(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  count = jax.process_count() if process_count is None else int(process_count)
  index = jax.process_index() if process_index is None else int(process_index)
  if count < 1 or not 0 <= index < count:
    raise ValueError(f"need 0 <= process_index < process_count, got "
                     f"process_index={index}, process_count={count}")
  return index, count


def _local_batch_size(batch_size: int, count: int) -> int:
  if batch_size < 1 or batch_size % count:
    raise ValueError(f"batch_size is the global batch size and must be a positive multiple "
                     f"of process_count: got batch_size={batch_size}, process_count={count}")
  return batch_size // count


class DataIterator:
  """Iterator of per-process batches with exact, JSON-serializable resume.

  `next(it)` -> dict of numpy arrays stacked on a leading [batch_size //
  process_count] axis. `get_state()` -> dict; `set_state(state)` makes the
  next batch the one an uninterrupted iterator would give after the batches
  counted in `state` (also on a different process count).
  """

  def __init__(self, build: Callable[[int], Any], fingerprint: dict[str, Any],
               num_batches: int | None):
    self._build = build  # step -> grain IterDataset starting at that batch
    self._fingerprint = fingerprint
    self._num_batches = num_batches
    self._step = 0
    self._it = None

  def __iter__(self) -> "DataIterator":
    return self

  def __next__(self) -> Example:
    if self._it is None:
      self._it = iter(self._build(self._step))
    batch = next(self._it)
    self._step += 1
    return batch

  @property
  def num_batches(self) -> int | None:
    """Batches in total (from the start), None when repeating forever."""
    return self._num_batches

  def get_state(self) -> dict[str, Any]:
    return {"format": STATE_FORMAT, "step": self._step, **self._fingerprint}

  def set_state(self, state: Mapping[str, Any] | bytes | str) -> None:
    if isinstance(state, (bytes, str)):
      state = json.loads(state)
    if state.get("format") != STATE_FORMAT:
      raise ValueError(f"not a Datong data iterator state: {state!r}")
    changed = {k: (state.get(k), v) for k, v in self._fingerprint.items() if state.get(k) != v}
    if changed:
      raise ValueError("data iterator state was saved with other settings, "
                       f"{{name: (saved, now)}} = {changed}")
    self.close()
    self._step = int(state["step"])

  def close(self) -> None:
    """Stops background readers (worker processes); iteration may restart."""
    if self._it is not None and hasattr(self._it, "close"):
      self._it.close()
    self._it = None


def make_iterator(source, *, batch_size: int, seed: int, shuffle: bool = True,
                  num_epochs: int | None = None, transform: Transform | None = None,
                  process_index: int | None = None, process_count: int | None = None,
                  drop_remainder: bool = True, worker_count: int = 0) -> DataIterator:
  """Deterministic, resumable, per-process-sharded batches of `source`.

  Args:
    source: random-access source (`load_source`, or any `len` + `__getitem__`).
    batch_size: GLOBAL batch size; each process gets `batch_size //
      process_count` examples per batch (must divide).
    seed: non-negative int; fixes the order and the transform's randomness.
    shuffle: a fresh permutation per epoch; False reads in source order.
    num_epochs: None repeats forever; else stops after that many passes.
    transform: `transform(example, rng) -> example`, numpy, per example; `rng`
      is a `np.random.Generator` determined by `(seed, global position)`.
    process_index, process_count: default to jax's.
    drop_remainder: with finite `num_epochs`, drop the final partial global
      batch. False keeps it (single process only: use `iterate_once` to
      evaluate on many processes).
    worker_count: grain worker processes (0: read in this process). Workers
      need a `__main__` guard and a picklable `transform`.
  """
  index, count = _processes(process_index, process_count)
  local = _local_batch_size(batch_size, count)
  n = len(source)
  if n == 0:
    raise ValueError("source is empty")
  if num_epochs is not None and num_epochs < 1:
    raise ValueError(f"num_epochs must be None or >= 1, got {num_epochs}")
  if not drop_remainder and count > 1:
    raise ValueError("drop_remainder=False with several processes would give them uneven "
                     "batches; use iterate_once (padded, with a mask) to evaluate")
  shuffle_seed = _derive_seed(seed, _SHUFFLE)
  transform_seed = _derive_seed(seed, _TRANSFORM)

  ds = grain.MapDataset.source(source)
  if shuffle:
    ds = ds.shuffle(seed=shuffle_seed)  # before repeat: one permutation per epoch
  ds = ds.repeat(num_epochs)  # infinite when None (len = sys.maxsize)
  if transform is not None:
    ds = ds.random_map(transform, seed=transform_seed)  # rng keyed by global position
  if num_epochs is None:
    num_batches = None
  else:
    total = n * num_epochs
    num_batches = total // batch_size if drop_remainder else -(-total // batch_size)
  # Local batch k of the flat stream is block k % count of global batch k // count.
  ds = ds.batch(local, drop_remainder=drop_remainder)

  def build(step: int):
    stop = None if num_batches is None else num_batches * count
    it = ds[step * count + index:stop:count].to_iter_dataset(_READ_OPTIONS)
    if worker_count > 0:
      it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return it

  if worker_count > 0:
    from absl import flags  # pylint: disable=g-import-not-at-top
    if not flags.FLAGS.is_parsed():
      # grain's worker processes read absl flags; a library has no argv to parse.
      flags.FLAGS.mark_as_parsed()

  fingerprint = {"seed": int(seed), "batch_size": int(batch_size), "shuffle": bool(shuffle),
                 "num_epochs": num_epochs, "num_records": n,
                 "drop_remainder": bool(drop_remainder)}
  return DataIterator(build, fingerprint, num_batches)


def iterate_once(source, *, batch_size: int, transform: Transform | None = None,
                 process_index: int | None = None,
                 process_count: int | None = None) -> Iterator[Example]:
  """Every example once, in source order, for evaluation.

  Yields this process's block of each global batch of `batch_size`; the last
  global batch is padded (with copies of the last example) and the boolean
  `mask` [batch_size // process_count] is True on real examples, so summing
  `mask`-weighted metrics over all processes counts each example exactly once.
  `transform` gets an rng fixed by the example's position.
  """
  index, count = _processes(process_index, process_count)
  local = _local_batch_size(batch_size, count)
  n = len(source)
  num_batches = -(-n // batch_size)

  def fetch(pos: int):
    return pos, source[min(pos, n - 1)]

  def apply(item, rng):
    return item[0], transform(item[1], rng)

  def finish(item) -> Example:
    pos, example = item
    return {**example, "mask": np.bool_(pos < n)}

  ds = grain.MapDataset.range(num_batches * batch_size).map(fetch)
  if transform is not None:
    ds = ds.random_map(apply, seed=_derive_seed(0, _EVAL_TRANSFORM))
  ds = ds.map(finish).batch(local)[index::count]
  return iter(ds.to_iter_dataset(_READ_OPTIONS))


# ------------------------------------------------------------------ global ---

def to_global(batch: Mapping[str, Any], sharding) -> dict[str, jax.Array]:
  """Per-process numpy batch -> global jax.Arrays, batch on the first axis.

  `sharding` is one `jax.sharding.Sharding` (e.g. `NamedSharding(mesh,
  P("data"))`) for every leaf, or a pytree of them matching `batch`. Each
  process passes its own block; the global batch is their concatenation in
  process order. Text (bytes) must be tokenized first, in the transform.
  """
  def put(path, x, s):
    x = np.asarray(x)
    if x.dtype.kind in "SUO":
      raise TypeError(f"batch{jax.tree_util.keystr(path)} holds {x.dtype} (text?); "
                      "turn it into numbers in the transform before to_global")
    return jax.make_array_from_process_local_data(s, x)

  if isinstance(sharding, jax.sharding.Sharding):
    return jax.tree_util.tree_map_with_path(lambda p, x: put(p, x, sharding), dict(batch))
  return jax.tree_util.tree_map_with_path(put, dict(batch), sharding)

"""Data layer: embedded tfds builders and the grain pipeline.

Every test reads a session-private data_dir, never the user's cache.
"""

import json
import os
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from datong.train import data
from datong.train import datasets


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("tfds"))
  for name in datasets.BUILDERS:
    assert data.prepare(name, d) == d
  return d


class Indexed:
  """A source whose examples carry their record index, to track them."""

  def __init__(self, source):
    self.source = source

  def __len__(self):
    return len(self.source)

  def __getitem__(self, i):
    return {**self.source[i], "index": np.int64(i)}


def _all(source):
  return [source[i] for i in range(len(source))]


def _sklearn_digits():
  from sklearn.datasets import load_digits
  d = load_digits()
  return np.round(d.images * 255 / 16).astype(np.uint8), d.target


# ---------------------------------------------------------------- builders ---

def test_digits_splits_and_pixels(data_dir):
  images, labels = _sklearn_digits()
  train = data.load_source("digits", "train", data_dir)
  test = data.load_source("digits", "test", data_dir)
  assert (len(train), len(test)) == (1437, 360)
  for source, sl in ((train, slice(0, 1437)), (test, slice(1437, 1797))):
    rows = _all(source)
    assert rows[0]["image"].dtype == np.uint8 and rows[0]["image"].shape == (8, 8, 1)
    assert np.asarray(rows[0]["label"]).dtype == np.int64
    np.testing.assert_array_equal(np.stack([r["image"][..., 0] for r in rows]), images[sl])
    np.testing.assert_array_equal([r["label"] for r in rows], labels[sl])
  assert images.max() == 255 and images.min() == 0


def test_digit_captions(data_dir):
  images, labels = _sklearn_digits()
  assert len(datasets.CAPTION_TEMPLATES) >= 12
  test = data.load_source("digit_captions", "test", data_dir)
  train = data.load_source("digit_captions", "train", data_dir)
  assert (len(train), len(test)) == (1437, 360)
  rows = _all(test)
  np.testing.assert_array_equal(np.stack([r["image"][..., 0] for r in rows]), images[1437:])
  captions = [r["caption"] for r in rows]
  assert all(isinstance(c, bytes) for c in captions)
  for i, (c, label) in enumerate(zip(captions, labels[1437:])):
    c = c.decode()
    assert c == datasets.digit_caption(1437 + i, int(label))
    assert datasets.DIGIT_NAMES[label] in c or str(label) in c
  assert len(set(captions)) > 40  # many templates really drawn
  assert datasets.digit_caption(1500, 7) == datasets.digit_caption(1500, 7)


def test_zero_shot_templates_disjoint_from_captions():
  assert datasets.DIGIT_NAMES == ("zero", "one", "two", "three", "four",
                                  "five", "six", "seven", "eight", "nine")
  assert len(datasets.ZERO_SHOT_TEMPLATES) >= 4
  captions = {t.format(word=w, num=d) for t in datasets.CAPTION_TEMPLATES
              for d, w in enumerate(datasets.DIGIT_NAMES)}
  prompts = {t.format(c) for t in datasets.ZERO_SHOT_TEMPLATES
             for d, w in enumerate(datasets.DIGIT_NAMES) for c in (w, str(d))}
  assert not captions & prompts
  assert not {t.rstrip(".") for t in captions} & {t.rstrip(".") for t in prompts}
  bare = {t.replace("{word}", "{}").replace("{num}", "{}") for t in datasets.CAPTION_TEMPLATES}
  assert not bare & set(datasets.ZERO_SHOT_TEMPLATES)


def test_pydoc_splits(data_dir):
  from pydoc_data.topics import topics
  train = _all(data.load_source("pydoc_text", "train", data_dir))
  val = _all(data.load_source("pydoc_text", "validation", data_dir))
  t_titles = [r["title"].decode() for r in train]
  v_titles = [r["title"].decode() for r in val]
  assert len(t_titles) + len(v_titles) == len(topics) == 79
  assert not set(t_titles) & set(v_titles)
  keys = sorted(topics)
  assert v_titles == keys[::10] and t_titles == sorted(t_titles)
  assert all(r["text"].decode() == topics[r["title"].decode()] for r in train + val)
  held_bytes = sum(len(r["text"]) for r in val)
  assert 28_000 < held_bytes < 36_000, held_bytes


def test_pydoc_xz_baseline():
  bpb = datasets.pydoc_xz_baseline()
  assert 1.7 < bpb < 1.9
  if sys.version_info[:2] == (3, 11):
    assert bpb == pytest.approx(1.7933, abs=0.005)


# ----------------------------------------------------------------- prepare ---

def test_prepare_is_idempotent_and_honours_env(data_dir, tmp_path, monkeypatch):
  t = time.perf_counter()
  assert data.prepare("digits", data_dir) == data_dir
  assert time.perf_counter() - t < 0.5  # built: only a file check
  monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path / "env"))
  assert data.prepare("pydoc_text") == str(tmp_path / "env")
  assert len(data.load_source("pydoc_text", "validation")) == 8
  assert not [p for p in os.listdir(tmp_path / "env") if p.startswith(".")]  # temp dirs gone


def test_prepare_from_concurrent_processes(tmp_path):
  code = ("import sys; from datong.train import data; "
          "data.prepare('pydoc_text', sys.argv[1]); "
          "print(len(data.load_source('pydoc_text', 'train', sys.argv[1])))")
  env = {**os.environ, "PYTHONPATH": os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", "")}
  procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for _ in range(2)]
  outs = [p.communicate(timeout=120) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-2000:]
    assert out.split()[-1] == "71"
  assert sorted(os.listdir(tmp_path)) == ["pydoc_text"]  # no temp dirs left


def test_prepare_losing_the_race_keeps_the_winner(data_dir, tmp_path, monkeypatch):
  # Another process finishes first: our rename fails and our copy is dropped.
  import shutil
  version = str(datasets.PydocText.VERSION)
  winner = tmp_path / "pydoc_text" / version
  shutil.copytree(os.path.join(data_dir, "pydoc_text", version), winner)
  (winner / "marker").write_text("winner")
  real, calls = data._is_built, []

  def built_only_after_the_first_look(path):
    calls.append(path)
    return len(calls) > 1 and real(path)

  monkeypatch.setattr(data, "_is_built", built_only_after_the_first_look)
  assert data.prepare("pydoc_text", tmp_path) == str(tmp_path)
  assert len(calls) == 2 and (winner / "marker").read_text() == "winner"
  assert sorted(os.listdir(tmp_path)) == ["pydoc_text"]
  assert len(data.load_source("pydoc_text", "train", tmp_path)) == 71


def test_small_splits_are_decoded_once_and_read_only(data_dir, monkeypatch):
  streamed = data.load_source("digits", "train", data_dir, in_memory=False)
  cached = data.load_source("digits", "train", data_dir)  # auto: 165 KiB on disk
  assert isinstance(cached, data.InMemorySource)
  assert not isinstance(streamed, data.InMemorySource)
  assert len(cached) == len(streamed)
  for i in (0, 700, len(cached) - 1):
    a, b = cached[i], streamed[i]
    assert a.keys() == b.keys() and np.array_equal(a["image"], b["image"])
    assert a["label"] == b["label"]
  with pytest.raises(ValueError, match="read-only"):
    cached[0]["image"][0, 0, 0] = 1  # an in-place transform fails loudly
  monkeypatch.setattr(data, "IN_MEMORY_MAX_BYTES", 1024)
  assert not isinstance(data.load_source("digits", "train", data_dir), data.InMemorySource)


def test_unprepared_catalog_dataset_error(tmp_path):
  with pytest.raises(FileNotFoundError, match=f"not prepared in {tmp_path}.*array_record"):
    data.load_source("mnist", "train", tmp_path)
  with pytest.raises(ValueError, match="unknown dataset"):
    data.load_source("no_such_dataset_xyz", "train", tmp_path)


# ---------------------------------------------------------------- iterator ---

def _take(it, n):
  return [next(it) for _ in range(n)]


def _same(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])


def test_deterministic_order(data_dir):
  src = Indexed(data.load_source("digits", "train", data_dir))
  a = _take(data.make_iterator(src, batch_size=32, seed=3), 4)
  b = _take(data.make_iterator(src, batch_size=32, seed=3), 4)
  c = _take(data.make_iterator(src, batch_size=32, seed=4), 4)
  for x, y in zip(a, b):
    _same(x, y)
  assert a[0]["index"].shape == (32,) and a[0]["image"].shape == (32, 8, 8, 1)
  assert not np.array_equal(a[0]["index"], c[0]["index"])
  ordered = next(data.make_iterator(src, batch_size=32, seed=3, shuffle=False))
  np.testing.assert_array_equal(ordered["index"], np.arange(32))


def test_epochs_are_permutations(data_dir):
  src = Indexed(data.load_source("digits", "train", data_dir))
  it = data.make_iterator(src, batch_size=479, seed=0, num_epochs=2)  # 1437 = 3 * 479
  assert it.num_batches == 6
  idx = np.concatenate([b["index"] for b in it])
  assert len(idx) == 2 * 1437
  e0, e1 = idx[:1437], idx[1437:]
  np.testing.assert_array_equal(np.sort(e0), np.arange(1437))
  np.testing.assert_array_equal(np.sort(e1), np.arange(1437))
  assert not np.array_equal(e0, e1)


def _noisy(example, rng):
  """An augmentation whose output depends on the rng."""
  noise = rng.integers(0, 64, size=example["image"].shape, dtype=np.uint8)
  return {**example, "image": example["image"] // 2 + noise,
          "coin": rng.random(dtype=np.float32)}


@pytest.mark.parametrize("transform", [None, _noisy])
def test_resume_is_exact(data_dir, transform):
  src = Indexed(data.load_source("digits", "train", data_dir))
  kw = dict(batch_size=64, seed=7, transform=transform)
  full = _take(data.make_iterator(src, **kw), 26)  # crosses the epoch at 1437 / 64 = 22.5
  it = data.make_iterator(src, **kw)
  _take(it, 24)
  state = json.loads(json.dumps(it.get_state()))
  assert state["step"] == 24
  resumed = data.make_iterator(src, **kw)
  resumed.set_state(state)
  _same(next(resumed), full[24])
  _same(next(resumed), full[25])
  # the same iterator can also go back
  it.set_state(json.dumps(state).encode())
  _same(next(it), full[24])


def test_transform_rng_depends_on_position_not_batching(data_dir):
  src = Indexed(data.load_source("digits", "test", data_dir))
  a = next(data.make_iterator(src, batch_size=40, seed=1, transform=_noisy))
  b = _take(data.make_iterator(src, batch_size=20, seed=1, transform=_noisy), 2)
  np.testing.assert_array_equal(a["coin"], np.concatenate([x["coin"] for x in b]))
  assert len(set(a["coin"].tolist())) == 40


def test_set_state_rejects_other_settings(data_dir):
  src = data.load_source("digits", "test", data_dir)
  state = data.make_iterator(src, batch_size=8, seed=0).get_state()
  with pytest.raises(ValueError, match="seed"):
    data.make_iterator(src, batch_size=8, seed=1).set_state(state)
  with pytest.raises(ValueError, match="batch_size"):
    data.make_iterator(src, batch_size=16, seed=0).set_state(state)


def test_process_shards_are_disjoint_and_cover_an_epoch(data_dir):
  src = Indexed(data.load_source("digits", "test", data_dir))
  kw = dict(batch_size=8, seed=5, num_epochs=1)
  shards = [list(data.make_iterator(src, process_index=p, process_count=2, **kw))
            for p in range(2)]
  assert len(shards[0]) == len(shards[1]) == 45
  single = list(data.make_iterator(src, process_index=0, process_count=1, **kw))
  seen = []
  for b0, b1, g in zip(shards[0], shards[1], single):
    assert b0["index"].shape == b1["index"].shape == (4,)
    assert not set(b0["index"]) & set(b1["index"])
    # the global batch does not depend on the process count
    np.testing.assert_array_equal(np.concatenate([b0["index"], b1["index"]]), g["index"])
    seen += [*b0["index"], *b1["index"]]
  assert sorted(seen) == list(range(360))


def test_resume_on_another_process_count(data_dir):
  src = Indexed(data.load_source("digits", "train", data_dir))
  kw = dict(batch_size=32, seed=2, transform=_noisy)
  one = data.make_iterator(src, process_index=0, process_count=1, **kw)
  _take(one, 5)
  state = one.get_state()
  expected = next(one)
  parts = []
  for p in range(4):
    it = data.make_iterator(src, process_index=p, process_count=4, **kw)
    it.set_state(state)
    parts.append(next(it))
  for k in expected:
    np.testing.assert_array_equal(np.concatenate([x[k] for x in parts]), expected[k])


def test_batch_size_must_divide_by_process_count(data_dir):
  src = data.load_source("digits", "test", data_dir)
  with pytest.raises(ValueError, match="multiple of process_count.*batch_size=10, process_count=4"):
    data.make_iterator(src, batch_size=10, seed=0, process_index=0, process_count=4)
  with pytest.raises(ValueError, match="multiple of process_count"):
    data.iterate_once(src, batch_size=10, process_index=1, process_count=4)
  with pytest.raises(ValueError, match="process_index"):
    data.make_iterator(src, batch_size=8, seed=0, process_index=2, process_count=2)


def test_drop_remainder_false_keeps_the_last_batch(data_dir):
  src = Indexed(data.load_source("digits", "test", data_dir))
  batches = list(data.make_iterator(src, batch_size=100, seed=0, num_epochs=1,
                                    drop_remainder=False, process_index=0, process_count=1))
  assert [len(b["index"]) for b in batches] == [100, 100, 100, 60]
  assert sorted(np.concatenate([b["index"] for b in batches]).tolist()) == list(range(360))
  dropped = list(data.make_iterator(src, batch_size=100, seed=0, num_epochs=1,
                                    process_index=0, process_count=1))
  assert len(dropped) == 3


@pytest.mark.parametrize("process_count", [1, 2])
def test_iterate_once_covers_the_test_split(data_dir, process_count):
  src = Indexed(data.load_source("digit_captions", "test", data_dir))
  shards = [list(data.iterate_once(src, batch_size=64, process_index=p,
                                   process_count=process_count))
            for p in range(process_count)]
  assert len({len(s) for s in shards}) == 1 and len(shards[0]) == 6  # ceil(360 / 64)
  real = []
  for step in range(6):
    for s in shards:
      b = s[step]
      assert b["mask"].dtype == np.bool_ and b["mask"].shape == (64 // process_count,)
      assert b["caption"].shape == (64 // process_count,)
      real += b["index"][b["mask"]].tolist()
  assert real == list(range(360))  # each exactly once, in order
  assert sum(int(b["mask"].sum()) for s in shards for b in s) == 360


def test_iterate_once_transform(data_dir):
  src = Indexed(data.load_source("digits", "test", data_dir))
  a = list(data.iterate_once(src, batch_size=128, transform=_noisy))
  b = list(data.iterate_once(src, batch_size=128, transform=_noisy))
  assert len(a) == 3 and a[-1]["mask"].sum() == 360 - 256
  for x, y in zip(a, b):
    _same(x, y)


# ------------------------------------------------------------------ global ---

def test_to_global(data_dir):
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  mesh = Mesh(np.array(jax.devices()), ("data",))
  sharding = NamedSharding(mesh, P("data"))
  src = data.load_source("digit_captions", "test", data_dir)
  n = 2 * len(jax.devices())
  batch = next(data.make_iterator(src, batch_size=n, seed=0))
  caption = batch.pop("caption")
  out = data.to_global(batch, sharding)
  assert out["image"].shape == (n, 8, 8, 1) and out["image"].sharding == sharding
  np.testing.assert_array_equal(np.asarray(out["label"]), batch["label"])
  out = data.to_global(batch, {"image": sharding, "label": sharding})
  assert out["label"].dtype == jax.numpy.int64 or out["label"].dtype == jax.numpy.int32
  with pytest.raises(TypeError, match="caption"):
    data.to_global({**batch, "caption": caption}, sharding)

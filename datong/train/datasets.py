"""Embedded tensorflow-datasets builders: real data that needs no download.

Four builders, prepared on first use (see `datong.train.data.prepare`) as
array_record files read with `tfds.data_source`, so TensorFlow is never
needed:

- `digits`: scikit-learn's bundled 8x8 handwritten digits (1,797 images).
  Fixed split: the first 1,437 examples are `train`, the last 360 `test`
  (the split whose baselines are logistic regression 90.0%, SVC 94.2%,
  1-NN 95.6%). Features: `image` uint8 [8, 8, 1] with sklearn's 0..16 ink
  values scaled to 0..255 as `round(x * 255 / 16)`, `label` int64 in 0..9.
- `digit_captions`: the same images, splits and labels with an English
  `caption` each (Text, read back as bytes). The caption template is drawn
  deterministically from `CAPTION_TEMPLATES` by the example's index in
  sklearn's order, so a caption never depends on the split or the seed.
  `ZERO_SHOT_TEMPLATES` are prompts for zero-shot evaluation that no training
  caption uses; fill them with `DIGIT_NAMES` (or numerals).
- `pydoc_text`: Python's own documentation, `pydoc_data.topics.topics`
  (79 topics, ~465 KB of English on Python 3.11). Features: `title`, `text`
  (Text). Topic keys are sorted and every 10th one starting with the first
  (`i % 10 == 0`) is held out as `validation`; the other 71 are `train`.
- `pysource_text`: the Python standard library's own `.py` sources from the
  running interpreter (about 12 MB on 3.11), one document per module
  (`title` = dotted module name, `text` = the source). Left out: test
  packages (any `test`, `tests` or `idle_test` directory), `site-packages`,
  and the machine-generated `config-*` / `_sysconfigdata*` files (they
  differ between builds of one Python version). Split by top-level package
  or module name, sorted: every 20th starting with the third (`i % 20 == 2`)
  is `validation`, so a whole package is either seen or held out. Offset 2,
  because offset 0 holds out `encodings` (1.4 MB of codec tables, 2.1 MB in
  all) and offset 1 `idlelib`; offset 2 holds out 10 packages of ordinary
  code (`enum`, `configparser`, `unittest`, ...), 4.6% of the bytes.
  `pysource_split_bytes()` gives each split's exact UTF-8 byte count and
  `pysource_xz_baseline()` the `xz -9` anchor (both for the running
  interpreter; BENCHMARKS.md records them for 3.11.7). The version is the
  full Python version ("3.11.7"): a patch release edits the sources.

Why `i % 10 == 0`: it is the offset that reproduces the project note
"holding out every 10th topic (32 KB): xz -9 needs 1.79 bits/byte on the
held-out text given the training text". Measured over the ten offsets with
`bits/byte = 8 * (len(xz(train + heldout)) - len(xz(train))) / len(heldout)`,
where `train` and `heldout` are the UTF-8 texts of the topics concatenated in
sorted-title order and `xz` is `lzma.compress(data, preset=9 | PRESET_EXTREME)`:

    Python 3.11.7: offset 0 holds out 8 topics, 32,208 bytes -> 1.7933
                   bits/byte (plain preset 9: 1.7923). Other offsets give
                   0.22 .. 1.90 bits/byte on 10.9 .. 85.0 KB.
    Python 3.12.1: offset 0 holds out 8 topics, 32,570 bytes -> 1.7999
                   bits/byte (plain preset 9: 1.7970).

The docs change with the interpreter, so `pydoc_text`'s version is the
Python version that produced it ("3.11.0" on any 3.11) and two interpreters
sharing one cache directory never read each other's text.
`pydoc_xz_baseline()` recomputes the number for the running interpreter:
it is the target a language model must beat on `validation` (in bits per
UTF-8 byte, given everything in `train`).
"""

import functools
import hashlib
import lzma
import os
import sys
import sysconfig

import numpy as np
import tensorflow_datasets as tfds

DIGIT_NAMES = ("zero", "one", "two", "three", "four",
               "five", "six", "seven", "eight", "nine")

NUM_DIGITS = 1797
NUM_DIGITS_TEST = 360  # the last 360 examples in sklearn's order

# `{word}` is the digit's English name, `{num}` its numeral.
CAPTION_TEMPLATES = (
    "a handwritten digit {word}",
    "the number {num}",
    "{num}, written by hand",
    "a scan of a handwritten {word}",
    "a small grayscale image of the digit {num}",
    "someone wrote the number {word}",
    "the digit {word} ({num}) in pen",
    "a hand-drawn {num}",
    "an 8 by 8 pixel picture of a {word}",
    "a tiny handwritten {word}",
    "this is a {num}",
    "the numeral {num}, handwritten",
    "a sloppy {word} written with a marker",
    "a neat handwritten {word} on a form",
    "a low-resolution scan showing the digit {word}",
    "the handwritten number {word}, also written {num}",
)

# Zero-shot prompts, CLIP style; `{}` is a class name such as "seven".
# None of them is a training caption, for any digit, with names or numerals.
ZERO_SHOT_TEMPLATES = (
    "a photo of the number {}.",
    "an image of a {}.",
    "a picture of the digit {}.",
    "a black and white photo of a {}.",
    "a blurry photo of the number {}.",
    "a pixelated image of a {}.",
    "a close-up photo of the digit {}.",
    "a drawing of a {}.",
)

PYDOC_HOLDOUT_EVERY = 10
PYDOC_HOLDOUT_OFFSET = 0
PYSOURCE_HOLDOUT_EVERY = 20
PYSOURCE_HOLDOUT_OFFSET = 2
_PYSOURCE_SKIP_DIRS = ("test", "tests", "idle_test", "site-packages", "dist-packages",
                       "__pycache__")


def digit_caption(index: int, label: int) -> str:
  """The caption of example `index` (sklearn's order) showing digit `label`."""
  # A hash, not numpy's RNG: the choice must not change with numpy versions.
  h = int.from_bytes(hashlib.sha256(f"digit_captions/{index}".encode()).digest()[:8], "little")
  template = CAPTION_TEMPLATES[h % len(CAPTION_TEMPLATES)]
  return template.format(word=DIGIT_NAMES[label], num=label)


def _digits():
  """(images uint8 [1797, 8, 8, 1], labels int64 [1797]) in sklearn's order."""
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  d = load_digits()
  images = np.round(d.images * 255.0 / 16.0).astype(np.uint8)[..., None]
  return images, d.target.astype(np.int64)


def _digit_split_indices(split: str) -> range:
  n_train = NUM_DIGITS - NUM_DIGITS_TEST
  return range(0, n_train) if split == "train" else range(n_train, NUM_DIGITS)


def pydoc_split_titles() -> dict[str, list[str]]:
  """{'train': titles, 'validation': titles}, each sorted."""
  from pydoc_data.topics import topics  # pylint: disable=g-import-not-at-top
  keys = sorted(topics)
  held = [k for i, k in enumerate(keys) if i % PYDOC_HOLDOUT_EVERY == PYDOC_HOLDOUT_OFFSET]
  train = [k for i, k in enumerate(keys) if i % PYDOC_HOLDOUT_EVERY != PYDOC_HOLDOUT_OFFSET]
  return {"train": train, "validation": held}


@functools.lru_cache(maxsize=None)
def pydoc_xz_baseline(extreme: bool = True) -> float:
  """xz's bits per byte on `pydoc_text` validation given all of train.

  `8 * (len(xz(train + validation)) - len(xz(train))) / len(validation)` on
  the UTF-8 texts concatenated in sorted-title order, with lzma preset
  `9 | PRESET_EXTREME` (or plain 9 when `extreme=False`). 1.7933 on Python
  3.11.7, 1.7999 on 3.12.1 (module docstring). About 1.5 s on one core.
  """
  from pydoc_data.topics import topics  # pylint: disable=g-import-not-at-top
  split = pydoc_split_titles()
  train = "".join(topics[t] for t in split["train"]).encode("utf-8")
  held = "".join(topics[t] for t in split["validation"]).encode("utf-8")
  preset = 9 | lzma.PRESET_EXTREME if extreme else 9
  extra = len(lzma.compress(train + held, preset=preset)) - len(lzma.compress(train, preset=preset))
  return 8.0 * extra / len(held)


@functools.lru_cache(maxsize=None)
def pysource_modules() -> dict[str, str]:
  """Dotted module name -> path of its source, for `pysource_text` (sorted).

  Every `.py` file under the running interpreter's stdlib directory except
  test packages, site-packages and the machine-generated `config-*` /
  `_sysconfigdata*` files; `pkg/__init__.py` is module `pkg`.
  """
  root = sysconfig.get_paths()["stdlib"]
  found = {}
  for here, dirs, files in os.walk(root):
    rel = os.path.relpath(here, root)
    parts = () if rel == "." else tuple(rel.split(os.sep))
    # Prune in place: os.walk then never enters them.
    dirs[:] = sorted(d for d in dirs if d not in _PYSOURCE_SKIP_DIRS
                     and not (not parts and d.startswith("config-")))
    for f in files:
      if not f.endswith(".py") or (not parts and f.startswith("_sysconfigdata")):
        continue
      name = ".".join(parts + (f[:-3],))
      found[name.removesuffix(".__init__")] = os.path.join(here, f)
  return dict(sorted(found.items()))


def pysource_split_modules() -> dict[str, list[str]]:
  """{'train': module names, 'validation': module names}: whole top-level
  packages held out, every 20th name (sorted) starting with the third."""
  modules = pysource_modules()
  tops = sorted({m.split(".")[0] for m in modules})
  held = {t for i, t in enumerate(tops) if i % PYSOURCE_HOLDOUT_EVERY == PYSOURCE_HOLDOUT_OFFSET}
  return {"train": [m for m in modules if m.split(".")[0] not in held],
          "validation": [m for m in modules if m.split(".")[0] in held]}


def _pysource_text(split: str) -> bytes:
  modules = pysource_modules()
  out = []
  for name in pysource_split_modules()[split]:
    with open(modules[name], "rb") as f:
      out.append(f.read())
  return b"".join(out)


def pysource_split_bytes() -> dict[str, int]:
  """Exact UTF-8 byte count of each `pysource_text` split (running interpreter)."""
  return {s: len(_pysource_text(s)) for s in ("train", "validation")}


@functools.lru_cache(maxsize=None)
def pysource_xz_baseline(extreme: bool = True) -> float:
  """xz's bits per byte on `pysource_text` validation given all of train,
  computed as `pydoc_xz_baseline` does (modules concatenated in sorted
  order). About 20 s on one core: lzma over 12 MB, twice."""
  train, held = _pysource_text("train"), _pysource_text("validation")
  preset = 9 | lzma.PRESET_EXTREME if extreme else 9
  extra = len(lzma.compress(train + held, preset=preset)) - len(lzma.compress(train, preset=preset))
  return 8.0 * extra / len(held)


class Digits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn's 8x8 handwritten digits; last 360 are `test`."""

  name = "digits"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  # tfds derives a checksums path from the code path through
  # `importlib_resources`, which it does not install; there is nothing to
  # checksum here.
  code_path = None

  def _features(self) -> dict:
    return {
        "image": tfds.features.Tensor(shape=(8, 8, 1), dtype=np.uint8),
        "label": tfds.features.ClassLabel(names=DIGIT_NAMES),
    }

  def _info(self) -> tfds.core.DatasetInfo:
    # DatasetInfo(builder=self) directly: dataset_info_from_configs wants
    # README/citation files next to the builder.
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.__doc__,
        features=tfds.features.FeaturesDict(self._features()),
        supervised_keys=("image", "label"),
        disable_shuffling=True,  # keep sklearn's order
        homepage="https://scikit-learn.org/stable/datasets/toy_dataset.html#digits-dataset",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    return {s: self._generate_examples(s) for s in ("train", "test")}

  def _example(self, index: int, image: np.ndarray, label: int) -> dict:
    return {"image": image, "label": int(label)}

  def _generate_examples(self, split: str):
    images, labels = _digits()
    for i in _digit_split_indices(split):
      yield i, self._example(i, images[i], labels[i])


class DigitCaptions(Digits):
  """The digits with an English caption each, for image-text pretraining."""

  name = "digit_captions"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}

  def _features(self) -> dict:
    return {**super()._features(), "caption": tfds.features.Text()}

  def _example(self, index: int, image: np.ndarray, label: int) -> dict:
    return {**super()._example(index, image, label),
            "caption": digit_caption(index, int(label))}


class PydocText(tfds.core.GeneratorBasedBuilder):
  """Python's documentation topics (`pydoc_data.topics`) as English text."""

  name = "pydoc_text"
  # The text is whatever the running interpreter ships: version it by Python.
  VERSION = tfds.core.Version(f"{sys.version_info.major}.{sys.version_info.minor}.0")
  RELEASE_NOTES = {str(VERSION): f"pydoc_data.topics of Python {sys.version_info.major}."
                   f"{sys.version_info.minor}."}

  code_path = None  # as in `Digits`
  HOMEPAGE = "https://docs.python.org/3/library/pydoc.html"

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.__doc__,
        features=tfds.features.FeaturesDict({
            "title": tfds.features.Text(),
            "text": tfds.features.Text(),
        }),
        disable_shuffling=True,  # sorted by title
        homepage=self.HOMEPAGE,
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return {s: self._generate_examples(s) for s in ("train", "validation")}

  def _generate_examples(self, split: str):
    from pydoc_data.topics import topics  # pylint: disable=g-import-not-at-top
    for title in pydoc_split_titles()[split]:
      yield title, {"title": title, "text": topics[title]}


class PysourceText(PydocText):
  """The Python standard library's `.py` sources, one document per module."""

  name = "pysource_text"
  # The sources are whatever the running interpreter ships, and a patch
  # release edits them: version the corpus by the full Python version.
  VERSION = tfds.core.Version("{}.{}.{}".format(*sys.version_info[:3]))
  RELEASE_NOTES = {str(VERSION): f"The stdlib sources of Python {sys.version.split()[0]}."}
  HOMEPAGE = "https://docs.python.org/3/library/"

  def _generate_examples(self, split: str):
    modules = pysource_modules()
    for name in pysource_split_modules()[split]:
      with open(modules[name], "rb") as f:
        # Python sources are UTF-8 (PEP 3120); the stdlib's all decode.
        yield name, {"title": name, "text": f.read().decode("utf-8")}


BUILDERS = {b.name: b for b in (Digits, DigitCaptions, PydocText, PysourceText)}

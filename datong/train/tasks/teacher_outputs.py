"""Teacher outputs computed once over the training rows instead of in every step.

A frozen teacher's output depends only on its input. When every training
example is a fixed input (a GPT student's packed token windows), the
teacher can run once over the train split before training (jitted,
batched) and its logits ride with each row as a batch field
(``teacher_logits``): the data order, the iterator's state and resume are
those of the student's own source (same rows, same count, same shuffle),
and the jitted step reads the field instead of running the teacher.

It is exact only when the teacher sees the same input for an example at
every visit: students trained on augmented views (a ViT's random crops and
affine maps, drawn anew every step) must run the teacher in the step.

Storage (``teacher_dtype``): ``float32`` keeps the raw logits, the in-step
teacher's to float32 rounding (the same forward compiled in another program:
~1e-7 relative, not bitwise); ``float16`` / ``bfloat16`` keep
the log-softmax (``kd_loss`` is invariant to a per-row shift of the
teacher's logits, and log-probabilities near 0, where the probability mass
is, get the finest spacing), at half the host memory.
"""

from __future__ import annotations

import logging
import time

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

__all__ = ["FIELD", "STORAGE", "TEACHER_OUTPUTS", "check_choice", "precompute_logits",
           "refuse_precomputed"]

FIELD = "teacher_logits"  # the batch field of precomputed teacher logits
TEACHER_OUTPUTS = ("in_step", "precomputed")
STORAGE = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}


def check_choice(where: str, teacher_outputs: str, teacher_dtype: str = "float32") -> None:
  """A clear error for an unknown ``teacher_outputs`` or ``teacher_dtype``."""
  if teacher_outputs not in TEACHER_OUTPUTS:
    raise ValueError(f"{where}.teacher_outputs={teacher_outputs!r}: one of {TEACHER_OUTPUTS}.")
  if teacher_dtype not in STORAGE:
    raise ValueError(f"{where}.teacher_dtype={teacher_dtype!r}: one of {tuple(STORAGE)}.")


def refuse_precomputed(where: str, student: str) -> None:
  """Raise: ``teacher_outputs='precomputed'`` would not be exact for ``student``."""
  raise ValueError(
      f"{where}.teacher_outputs='precomputed' is for GPT students (fixed token windows) only: "
      f"{student} sees images augmented anew at every step (ImageData crop_pad on the host; "
      f"shift, rotate, scale in the step), so teacher outputs computed once per image would "
      f"not be the teacher's outputs on the views the student trains on. Set "
      f"task.teacher_outputs=in_step.")


def precompute_logits(apply, params, arrays, *, vocab: int, dtype: str = "float32",
                      batch_size: int = 64) -> np.ndarray:
  """The teacher's logits over every row of a packed source, on the host.

  Args:
    apply: ``apply(params, inputs, segment_ids, positions) -> logits [b, n, V]``
      (the teacher's forward; jitted here).
    params: the teacher's params (plain, as in the train state).
    arrays: the packed rows (``inputs``, ``segment_ids``, ``positions``,
      ``[rows, n]``).
    vocab: keep the first ``vocab`` logits (the tokenizer's ids).
    dtype: a ``STORAGE`` name; 16-bit dtypes store the log-softmax.
    batch_size: rows per forward (the last batch is padded, one compile).
  Returns:
    ``[rows, n, vocab]`` of ``dtype``.
  """
  store = STORAGE[dtype]
  normalize = dtype != "float32"

  @jax.jit
  def forward(p, inputs, segment_ids, positions):
    logits = apply(p, inputs, segment_ids, positions)[..., :vocab].astype(jnp.float32)
    if normalize:
      logits = jax.nn.log_softmax(logits, axis=-1)
    return logits.astype(store)

  inputs, segs, pos = (np.asarray(arrays[k]) for k in ("inputs", "segment_ids", "positions"))
  rows, length = inputs.shape
  out = np.empty((rows, length, vocab), store)
  start = time.perf_counter()
  for i in range(0, rows, batch_size):
    j = min(i + batch_size, rows)
    pad = batch_size - (j - i)
    chunk = [np.pad(a[i:j], ((0, pad), (0, 0))) for a in (inputs, segs, pos)]
    if pad:
      chunk[1][j - i:] = 1  # padding rows: one dummy segment (never read back)
    out[i:j] = np.asarray(forward(params, *chunk))[:j - i]
  logging.info("teacher logits precomputed over %d rows x %d positions in %.1f s: %.1f MiB "
               "(%s)", rows, length, time.perf_counter() - start, out.nbytes / 2**20, dtype)
  return out

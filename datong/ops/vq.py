"""Vector quantization as pure functions: nearest code, the straight-through
estimator with its codebook / commitment losses, EMA codebook updates,
k-means (initialization from data, iGPT's color palette), dead-code restarts
and codebook metrics.

Shapes: vectors ``z [..., d]``, codebook ``[K, d]``, ids ``[...]`` int32.
Everything is float32 and jittable.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


def squared_distances(z, codebook):
  """``[..., K]`` squared Euclidean distances from each vector to each code."""
  z = z.astype(jnp.float32)
  c = codebook.astype(jnp.float32)
  return (jnp.sum(z * z, -1, keepdims=True) - 2.0 * z @ c.T + jnp.sum(c * c, -1))


def nearest_code(z, codebook):
  """``[...]`` int32 id of the nearest code (ties: the lowest id)."""
  return jnp.argmin(squared_distances(z, codebook), axis=-1).astype(jnp.int32)


class Quantized(NamedTuple):
  """``quantized``: ``z + stop_gradient(code - z)`` (the value of the code, the
  gradient of ``z``: straight-through); ``ids``; ``codebook_loss`` =
  ``mean |sg(z) - code|^2`` (moves codes, VQ-VAE's second term);
  ``commitment_loss`` = ``mean |z - sg(code)|^2`` (moves the encoder)."""
  quantized: jax.Array
  ids: jax.Array
  codebook_loss: jax.Array
  commitment_loss: jax.Array


def quantize(z, codebook) -> Quantized:
  """Nearest-code quantization with the straight-through gradient."""
  z = z.astype(jnp.float32)
  ids = nearest_code(jax.lax.stop_gradient(z), codebook)
  code = codebook.astype(jnp.float32)[ids]
  codebook_loss = jnp.mean(jnp.sum((jax.lax.stop_gradient(z) - code) ** 2, -1))
  commitment_loss = jnp.mean(jnp.sum((z - jax.lax.stop_gradient(code)) ** 2, -1))
  return Quantized(z + jax.lax.stop_gradient(code - z), ids, codebook_loss, commitment_loss)


class EMAState(NamedTuple):
  """EMA codebook statistics: ``counts [K]`` (EMA of assignments) and
  ``sums [K, d]`` (EMA of the sum of assigned vectors); the codebook is
  ``sums / laplace_smoothed(counts)``."""
  counts: jax.Array
  sums: jax.Array


def ema_init(codebook) -> EMAState:
  return EMAState(jnp.ones(codebook.shape[0], jnp.float32), jnp.asarray(codebook, jnp.float32))


def assignment_stats(z, ids, k: int):
  """``(counts [K], sums [K, d])``: how many of the vectors ``z [..., d]``
  each code was assigned (``ids [...]``) and the sum of those vectors."""
  z = z.reshape(-1, z.shape[-1]).astype(jnp.float32)
  onehot = jax.nn.one_hot(ids.reshape(-1), k, dtype=jnp.float32)
  return onehot.sum(0), onehot.T @ z


def ema_step(state: EMAState, counts, sums, decay: float = 0.99, eps: float = 1e-5):
  """``ema_update`` from a batch's ``assignment_stats`` (or any common
  rescaling of both, e.g. shares of the batch). Returns ``(new state,
  codebook)``."""
  k = state.counts.shape[0]
  counts = decay * state.counts + (1.0 - decay) * counts
  sums = decay * state.sums + (1.0 - decay) * sums
  n = counts.sum()
  smoothed = (counts + eps) / (n + k * eps) * n
  return EMAState(counts, sums), sums / smoothed[:, None]


def ema_update(state: EMAState, z, ids, decay: float = 0.99, eps: float = 1e-5):
  """One EMA step (van den Oord et al. 2017, appendix): ``counts <- decay *
  counts + (1 - decay) * n_k``, ``sums <- decay * sums + (1 - decay) *
  sum_{i: id_i = k} z_i``, codebook ``= sums / n~`` with Laplace smoothing
  ``n~ = (counts + eps) / (N + K eps) * N`` (``N = sum counts``).
  Returns ``(new state, new codebook [K, d])``."""
  counts, sums = assignment_stats(z, ids, state.counts.shape[0])
  return ema_step(state, counts, sums, decay, eps)


def kmeans(rng, x, k: int, iterations: int = 20):
  """Lloyd's k-means on ``x [n, d]``: ``(centroids [k, d], ids [n])``.

  Seeded by k-means++ (each next seed drawn with probability proportional
  to its squared distance from the seeds so far; ``n >= k``); an empty
  cluster keeps its centroid. Deterministic for ``rng``.
  """
  x = jnp.asarray(x, jnp.float32)
  if x.shape[0] < k:
    raise ValueError(f"kmeans: {x.shape[0]} vectors cannot seed {k} clusters; give at least k.")
  first, rest = jax.random.split(rng)
  init = jnp.zeros((k, x.shape[1]), jnp.float32).at[0].set(
      x[jax.random.randint(first, (), 0, x.shape[0])])

  def seed(j, c):
    d2 = jnp.min(jnp.where(jnp.arange(k)[None] < j, squared_distances(x, c), jnp.inf), -1)
    d2 = jnp.maximum(d2, 0.0)
    logits = jnp.where(d2 > 0, jnp.log(jnp.where(d2 > 0, d2, 1.0)), -jnp.inf)
    pick = jax.random.categorical(jax.random.fold_in(rest, j), logits)
    return c.at[j].set(x[pick])

  init = jax.lax.fori_loop(1, k, seed, init)

  def step(c, _):
    ids = nearest_code(x, c)
    onehot = jax.nn.one_hot(ids, k, dtype=jnp.float32)
    n = onehot.sum(0)
    mean = (onehot.T @ x) / jnp.maximum(n, 1.0)[:, None]
    return jnp.where(n[:, None] > 0, mean, c), None

  c, _ = jax.lax.scan(step, init, None, length=iterations)
  return c, nearest_code(x, c)


def restart_dead_codes(rng, codebook, usage, z, threshold: float = 1.0):
  """Codes used fewer than ``threshold`` times (``usage [K]``) are moved to
  vectors of ``z [n, d]`` drawn at random (the current batch's encoder
  outputs); the others stay. Returns ``(codebook, restarted [K] bool)``."""
  z = z.reshape(-1, z.shape[-1]).astype(jnp.float32)
  dead = usage < threshold
  picks = z[jax.random.randint(rng, (codebook.shape[0],), 0, z.shape[0])]
  return jnp.where(dead[:, None], picks, codebook.astype(jnp.float32)), dead


def codebook_metrics(ids, k: int) -> dict:
  """``usage`` (fraction of codes used at least once), ``perplexity``
  (``exp`` of the entropy of the code frequencies: K when uniform, 1 when
  one code) of the ids ``[...]``."""
  counts = jnp.bincount(ids.reshape(-1), length=k).astype(jnp.float32)
  p = counts / jnp.maximum(counts.sum(), 1.0)
  entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))
  return {"usage": jnp.mean((counts > 0).astype(jnp.float32)), "perplexity": jnp.exp(entropy)}

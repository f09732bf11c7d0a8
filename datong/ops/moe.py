"""Mixture-of-experts routing, dispatch and router losses: pure functions.

Shapes: tokens come in groups ``[groups, tokens, ...]`` (the backbone uses one
group per sequence, so routing never mixes batch rows and a data-sharded
batch routes locally). ``E`` experts, ``k`` choices per token, ``C`` slots
per expert and group (the capacity).

Routers turn float32 probabilities ``[G, S, E]`` into assignments:

* ``token_choice``: each token takes its top-``k`` experts, weights
  renormalised to sum to 1 (``k=1``: Switch; ``k=2``: GShard).
* ``expert_choice``: each expert takes its top-``C`` tokens, weighted by
  their probabilities (Zhou et al. 2022); a token may get 0..E experts.
* ``modality``: a fixed route, token -> the expert of its modality id.

Dispatch: ``capacity_slots`` gives every assignment a slot in its expert's
buffer (or drops it), then either ``dispatch_and_combine`` (static one-hot
tensors for einsums: TPU-friendly, but ``O(tokens^2)`` per group) or
``slot_tokens`` (the same buffers by index gather); ``sort_by_expert`` is the
dropless form (assignments sorted by expert for ``jax.lax.ragged_dot``). All
compute the same layer when no assignment is dropped.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def capacity(tokens: int, experts: int, factor, choices: int = 1) -> int:
  """Slots per expert for a group of ``tokens``: ``ceil(factor * choices *
  tokens / experts)``, at most ``tokens`` (no expert can get more); ``factor``
  None: no limit."""
  if factor is None:
    return tokens
  return max(1, min(tokens, math.ceil(factor * choices * tokens / experts)))


def token_choice(probs, k: int):
  """Top-``k`` experts per token: ``(experts [..., k] int32, weights [..., k]
  float32)``, weights renormalised over the chosen ``k``. Ties go to the lower
  expert index (``lax.top_k``)."""
  weights, experts = jax.lax.top_k(probs.astype(jnp.float32), k)
  weights = weights / jnp.maximum(jnp.sum(weights, axis=-1, keepdims=True), 1e-9)
  return experts.astype(jnp.int32), weights


def modality_choice(modality_ids, experts: int):
  """The fixed route: modality ``m`` -> expert ``m``, weight 1. ``modality_ids
  [...]`` ints in ``[0, experts)`` -> ``(experts [..., 1], weights [..., 1])``."""
  ids = jnp.clip(modality_ids.astype(jnp.int32), 0, experts - 1)
  return ids[..., None], jnp.ones(ids.shape + (1,), jnp.float32)


def capacity_slots(experts, valid, num_experts: int, capacity_: int):
  """Each assignment's slot in its expert's buffer, or -1 when dropped.

  Args:
    experts: ``[G, S, k]`` int expert of each token's choices.
    valid: ``[G, S]`` bool; invalid tokens (padding) take no slot.
  Returns:
    ``[G, S, k]`` int32 slots. Drop order: within a group, all first choices
    are placed before any second choice, and choices of the same rank in
    token order (position 0 first); an expert's assignments beyond
    ``capacity_`` are dropped. So a later token loses its slot first, and a
    token's first choice outranks any other token's second choice.
  """
  g, s, k = experts.shape
  onehot = jax.nn.one_hot(experts, num_experts, dtype=jnp.int32) * valid[..., None, None]
  ranked = onehot.transpose(0, 2, 1, 3).reshape(g, k * s, num_experts)  # rank-major order
  before = jnp.cumsum(ranked, axis=1) - ranked  # assignments ahead in the same expert
  before = before.reshape(g, k, s, num_experts).transpose(0, 2, 1, 3)
  slot = jnp.sum(before * onehot, axis=-1)
  kept = valid[..., None] & (slot < capacity_)
  return jnp.where(kept, slot, -1).astype(jnp.int32)


def dispatch_and_combine(experts, slots, weights, num_experts: int, capacity_: int, dtype):
  """One-hot ``(dispatch, combine)`` ``[G, S, E, C]``: dispatch is 1 where
  token s fills slot c of expert e; combine holds its routing weight there.
  Dropped assignments (slot -1) appear in neither."""
  e_hot = jax.nn.one_hot(experts, num_experts, dtype=jnp.float32)
  c_hot = jax.nn.one_hot(slots, capacity_, dtype=jnp.float32)  # slot -1 -> all zero
  dispatch = jnp.einsum("gske,gskc->gsec", e_hot, c_hot)
  combine = jnp.einsum("gske,gskc,gsk->gsec", e_hot, c_hot, weights.astype(jnp.float32))
  return dispatch.astype(dtype), combine.astype(dtype)


def slot_tokens(experts, slots, num_experts: int, capacity_: int):
  """The gather form of ``dispatch_and_combine``: ``(tokens [G, E*C],
  positions [G, S, k])``. ``tokens[g, e*C + c]`` is the token in slot c of
  expert e, or S (a zero row appended to the group) when the slot is empty;
  ``positions`` is each assignment's flat slot ``e*C + c``, or ``E*C`` (a
  zero row after the expert outputs) when dropped."""
  g, s, k = experts.shape
  size = num_experts * capacity_
  pos = jnp.where(slots >= 0, experts * capacity_ + slots, size).astype(jnp.int32)
  rows = jnp.broadcast_to(jnp.arange(g)[:, None, None], pos.shape)
  token = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32)[None, :, None], pos.shape)
  tokens = jnp.full((g, size), s, jnp.int32).at[rows, pos].set(token, mode="drop")
  return tokens, pos


def expert_choice(probs, valid, capacity_: int, dtype):
  """Each expert takes its ``capacity_`` highest-probability valid tokens of
  the group: ``(dispatch, combine)`` ``[G, S, E, C]`` as
  ``dispatch_and_combine`` gives, and ``chosen [G, S]`` (times a token was
  taken). Slot order is the expert's ranking."""
  s = probs.shape[1]
  scores = jnp.where(valid[..., None], probs.astype(jnp.float32), -1.0)
  top, tokens = jax.lax.top_k(jnp.swapaxes(scores, 1, 2), capacity_)  # [G, E, C]
  picked = jax.nn.one_hot(tokens, s, dtype=jnp.float32) * (top >= 0)[..., None]  # [G, E, C, S]
  dispatch = jnp.transpose(picked, (0, 3, 1, 2))
  combine = dispatch * jnp.maximum(top, 0.0)[:, None]
  chosen = jnp.sum(dispatch, axis=(2, 3))
  return dispatch.astype(dtype), combine.astype(dtype), chosen


def sort_by_expert(experts, num_experts: int):
  """The dropless order: ``experts [T, k]`` -> ``(order [T*k], group_sizes
  [E])``. ``order`` lists the flat assignments (``token * k + choice``)
  grouped by expert, in token order within an expert (stable sort), so
  ``x[order // k]`` is the ``lhs`` of ``jax.lax.ragged_dot`` with
  ``group_sizes``; ``argsort(order)`` undoes it."""
  flat = experts.reshape(-1)
  order = jnp.argsort(flat, stable=True).astype(jnp.int32)
  sizes = jnp.sum(jax.nn.one_hot(flat, num_experts, dtype=jnp.int32), axis=0)
  return order, sizes


# ----------------------------------------------------------------- losses --

def expert_fractions(experts, valid, num_experts: int):
  """``[E]`` share of the valid tokens' assignments that chose each expert
  (before any capacity drop); sums to 1."""
  k = experts.shape[-1]
  hot = jax.nn.one_hot(experts, num_experts, dtype=jnp.float32) * valid[..., None, None]
  return jnp.sum(hot, axis=tuple(range(hot.ndim - 1))) / jnp.maximum(jnp.sum(valid) * k, 1)


def load_balancing_loss(probs, experts, valid):
  """Switch Transformer's ``E * sum_e f_e * P_e``: ``f_e`` the share of
  assignments to expert e (``expert_fractions``), ``P_e`` its mean router
  probability over valid tokens. 1 when routing is uniform (either factor
  uniform), up to E when every token goes to one expert with certainty.
  ``f`` is not differentiable; the gradient reaches the router through P."""
  e = probs.shape[-1]
  w = valid.astype(jnp.float32)[..., None]
  mean_prob = jnp.sum(probs * w, axis=tuple(range(probs.ndim - 1))) / jnp.maximum(jnp.sum(w), 1)
  frac = jax.lax.stop_gradient(expert_fractions(experts, valid, e))
  return e * jnp.sum(frac * mean_prob)


def router_z_loss(logits, valid):
  """ST-MoE's mean over valid tokens of ``logsumexp(logits)**2``: keeps the
  router's logits small (float32)."""
  lse = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
  w = valid.astype(jnp.float32)
  return jnp.sum(lse ** 2 * w) / jnp.maximum(jnp.sum(w), 1)


def _entropy(p):
  return -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.maximum(p, 1e-30)), 0.0), axis=-1)


def modality_entropy_losses(probs, modality_ids, valid, modalities: int, threshold: float):
  """LIMoE's per-modality router entropies, ``(local [M], global [M])``.

  For the tokens of modality m: ``local`` is the mean entropy of each token's
  routing distribution (minimized: confident routes); ``global`` is
  ``max(0, threshold - H(mean routing distribution))`` (minimized: the
  modality spreads over experts, at least ``threshold`` nats). 0 for a
  modality with no token.
  """
  m_hot = jax.nn.one_hot(modality_ids, modalities, dtype=jnp.float32) * valid[..., None]
  m_hot = m_hot.reshape(-1, modalities)  # [T, M]
  p = probs.reshape(-1, probs.shape[-1]).astype(jnp.float32)  # [T, E]
  counts = jnp.sum(m_hot, axis=0)
  present = counts > 0
  local = (m_hot.T @ _entropy(p)) / jnp.maximum(counts, 1)
  mean_p = (m_hot.T @ p) / jnp.maximum(counts, 1)[:, None]
  glob = jnp.where(present, jnp.maximum(0.0, threshold - _entropy(mean_p)), 0.0)
  return local, glob


def modality_fractions(experts, modality_ids, valid, num_experts: int, modalities: int):
  """``[M, E]``: for each modality, the share of its assignments per expert."""
  e_hot = jax.nn.one_hot(experts, num_experts, dtype=jnp.float32).sum(-2)  # [..., E]
  m_hot = jax.nn.one_hot(modality_ids, modalities, dtype=jnp.float32) * valid[..., None]
  joint = jnp.einsum("...m,...e->me", m_hot, e_hot)
  return joint / jnp.maximum(jnp.sum(joint, axis=-1, keepdims=True), 1)

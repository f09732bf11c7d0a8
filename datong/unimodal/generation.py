"""Decoding a ``GPT``: sampling one token, and batched KV-cache generation.

``generate`` runs the whole loop inside one jitted ``lax.while_loop``:
prompts are left- or right-padded, the cache is filled by one prefill pass,
then one token per step until ``max_new_tokens`` or every row has emitted
``eos_id``. ``sample_tokens`` is the per-token loop of any cached decoder
(the captioners of ``datong.multimodal``: fusion, CoCa).
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

from datong.backbone import init_cache
from datong.unimodal.text import GPT

__all__ = ["generate", "sample_logits", "sample_tokens"]

def sample_logits(rng, logits, *, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0):
  """One token per row from ``logits [batch, vocab]``; temperature 0 is greedy.

  ``top_k`` keeps the k largest logits, ``top_p`` the smallest set whose
  probability reaches p (nucleus); both apply after the temperature.
  """
  logits = logits.astype(jnp.float32)
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  if top_k > 0:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each token
    cutoff = jnp.min(jnp.where(before < top_p, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def sample_tokens(step, logits, state, rng=None, *, max_new_tokens: int, eos_id: int,
                  pad_id: int = 0, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                  vocab_size: int = 0):
  """``max_new_tokens`` tokens from a cached decoder, one per step (call under jit).

  ``logits [b, vocab]``: the prediction for the first new token (after a
  prefill); ``step(tokens [b], t, state) -> (logits, state)`` feeds new token
  ``t`` (0-based, traced) and returns the next prediction (``state``: the
  caches and whatever else the decoder carries). Sampling is
  ``sample_logits``'; ``vocab_size > 0`` samples only ids below it. A row
  that emitted ``eos_id`` gets ``pad_id`` after it. Returns ``{"tokens": [b,
  max_new_tokens], "lengths": [b]}`` (tokens before the EOS).
  """
  b = logits.shape[0]
  rng = jax.random.PRNGKey(0) if rng is None else rng

  def body(t, carry):
    state, logits, out, lengths, done, rng = carry
    rng, key = jax.random.split(rng)
    if vocab_size:
      logits = logits[:, :vocab_size]
    tok = sample_logits(key, logits, temperature=temperature, top_k=top_k, top_p=top_p)
    tok = jnp.where(done, pad_id, tok)
    out = out.at[:, t].set(tok)
    is_eos = tok == eos_id
    lengths = lengths + jnp.logical_not(done | is_eos).astype(jnp.int32)
    done = done | is_eos
    logits, state = step(tok, t, state)
    return state, logits, out, lengths, done, rng

  carry = (state, logits, jnp.full((b, max_new_tokens), pad_id, jnp.int32),
           jnp.zeros((b,), jnp.int32), jnp.zeros((b,), bool), rng)
  carry = jax.lax.fori_loop(0, max_new_tokens, body, carry)
  return {"tokens": carry[2], "lengths": carry[3]}


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "padding",
                                              "temperature", "top_k", "top_p",
                                              "eos_id", "pad_id"))
def generate(model: GPT, params, prompts, prompt_mask=None, rng=None, *,
             max_new_tokens: int, padding: str = "left", temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, eos_id: Optional[int] = None,
             pad_id: int = 0):
  """KV-cache decoding of a batch of prompts, jitted; stops at ``eos_id``.

  Args:
    model: a ``GPT``; ``params`` its ``params`` collection.
    prompts: ``[batch, prompt_length]`` ids, padded on the ``padding`` side
      ("left" or "right"); ``prompt_mask`` ``[batch, prompt_length]`` bool,
      True on real tokens (default all real). Every prompt needs >= 1 token.
    rng: PRNG key for sampling (unused when greedy).
    max_new_tokens, temperature, top_k, top_p: see ``sample_logits``.
  Returns:
    ``{"tokens": [batch, max_new_tokens], "lengths": [batch]}``: new tokens
    (the EOS included when emitted, ``pad_id`` after it) and how many tokens
    each row generated before its EOS.
  """
  if padding not in ("left", "right"):
    raise ValueError(f"padding={padding!r}: choose 'left' or 'right'.")
  batch, plen = prompts.shape
  prompts = prompts.astype(jnp.int32)
  prompt_mask = jnp.ones_like(prompts, bool) if prompt_mask is None else prompt_mask.astype(bool)
  lengths = jnp.sum(prompt_mask, axis=-1).astype(jnp.int32)
  if padding == "right":
    # Right-align every prompt: one code path, and the next token of every row
    # is predicted at the same (last) prompt position.
    shift = plen - lengths
    idx = (jnp.arange(plen)[None, :] - shift[:, None]) % plen
    prompts = jnp.take_along_axis(prompts, idx, axis=1)
    prompt_mask = jnp.arange(plen)[None, :] >= shift[:, None]
  rng = jax.random.PRNGKey(0) if rng is None else rng
  total = plen + max_new_tokens
  cache = init_cache(model.config.resolved_backbone, batch, total)
  valid = jnp.zeros((batch, total), bool).at[:, :plen].set(prompt_mask)
  positions = jnp.maximum(jnp.cumsum(prompt_mask, axis=-1) - 1, 0)
  apply = functools.partial(model.apply, {"params": params})
  logits, aux = apply(prompts, positions=positions, mask=valid[:, None, None, :],
                      cache=cache, cache_index=0)
  out = jnp.full((batch, max_new_tokens), pad_id, jnp.int32)
  done = jnp.zeros((batch,), bool)
  gen_len = jnp.zeros((batch,), jnp.int32)

  def cond(state):
    t, *_, done, _ = state
    return jnp.logical_and(t < max_new_tokens, ~jnp.all(done))

  def body(state):
    t, cache, logits, out, valid, gen_len, done, rng = state
    rng, key = jax.random.split(rng)
    tok = sample_logits(key, logits, temperature=temperature, top_k=top_k, top_p=top_p)
    tok = jnp.where(done, pad_id, tok)
    out = jax.lax.dynamic_update_slice_in_dim(out, tok[:, None], t, axis=1)
    is_eos = jnp.zeros_like(done) if eos_id is None else tok == eos_id
    gen_len = gen_len + jnp.logical_not(done | is_eos).astype(jnp.int32)
    done = done | is_eos
    valid = jax.lax.dynamic_update_slice_in_dim(valid, jnp.ones((batch, 1), bool), plen + t, axis=1)
    new_logits, aux = apply(tok[:, None], positions=(lengths + t)[:, None],
                            mask=valid[:, None, None, :], cache=cache, cache_index=plen + t)
    return t + 1, aux["cache"], new_logits[:, -1], out, valid, gen_len, done, rng

  state = (jnp.int32(0), aux["cache"], logits[:, -1], out, valid, gen_len, done, rng)
  state = jax.lax.while_loop(cond, body, state)
  return {"tokens": state[3], "lengths": state[5]}

"""Boolean attention masks, ``True`` = may attend.

All masks are ``[batch|1, 1, q_length, kv_length]`` so they broadcast over
heads and combine with ``&``. ``ops.attention`` takes them as ``mask=``; the
causal and segment cases are better passed as ``causal=`` and segment ids,
which the flash kernels handle without materializing a mask.
"""

import jax
import jax.numpy as jnp


def causal_mask(q_length: int, kv_length: int | None = None, *, offset: int = 0):
  """Query ``i`` sees key ``j`` iff ``j <= i + offset``: ``[1, 1, q, kv]``.

  ``offset`` is the number of keys before the first query (e.g. the cache
  length when decoding); 0 gives the top-left aligned mask of ``causal=True``.
  """
  kv_length = q_length if kv_length is None else kv_length
  q_pos = jnp.arange(q_length)[:, None] + offset
  return (jnp.arange(kv_length)[None, :] <= q_pos)[None, None]


def padding_mask(q_valid, kv_valid=None):
  """From ``[batch, length]`` booleans (True = real token) to ``[b, 1, q, kv]``.

  Padded keys are never attended; padded queries attend to the real keys
  (their outputs are ignored downstream).
  """
  kv_valid = q_valid if kv_valid is None else kv_valid
  return jnp.broadcast_to(kv_valid[:, None, None, :].astype(bool),
                          (kv_valid.shape[0], 1, q_valid.shape[1], kv_valid.shape[1]))


def key_mask(attention_mask, kv_length: int, who: str):
  """An HF-style ``attention_mask`` ``[batch, kv_length]`` (1 = real token) ->
  the backbone's boolean key mask ``[batch, 1, 1, kv_length]``.

  As in Hugging Face, only keys are masked: padded query rows still attend to
  the real keys (causally, for causal models), and a row that sees no real
  key outputs zero attention (torch's ``scaled_dot_product_attention``, HF's
  default). Positions stay ``arange(length)``, as HF's forward.
  """
  if attention_mask.ndim != 2 or attention_mask.shape[1] != kv_length:
    raise ValueError(f"{who}: attention_mask has shape {tuple(attention_mask.shape)}; pass a "
                     f"[batch, {kv_length}] key mask (1 = real token, 0 = padding), as "
                     "Hugging Face tokenizers return it.")
  return attention_mask.astype(bool)[:, None, None, :]


def segment_mask(q_segment_ids, kv_segment_ids=None):
  """Tokens attend only within their own segment (packed documents)."""
  kv_segment_ids = q_segment_ids if kv_segment_ids is None else kv_segment_ids
  return q_segment_ids[:, None, :, None] == kv_segment_ids[:, None, None, :]


def prefix_lm_mask(prefix_lengths, length: int):
  """Bidirectional over each row's prefix, causal after it: ``[b, 1, L, L]``.

  ``prefix_lengths``: ``[batch]`` ints; position ``j`` is visible to ``i`` iff
  ``j <= i`` or ``j < prefix_length``.
  """
  pos = jnp.arange(length)
  causal = pos[None, :] <= pos[:, None]
  prefix = pos[None, None, :] < jnp.asarray(prefix_lengths)[:, None, None]
  return (causal[None] | prefix)[:, None]


def fusion_mask(segment_ids, prefix, key_valid, *, causal: bool = True):
  """Packed prefix-LM attention, ``[b, 1, L, L]`` bool (single-stream fusion).

  ``segment_ids [b, L]``: positions attend only within their segment;
  ``prefix [b, L]``: positions every member of the segment sees (an image);
  ``key_valid [b, L]``: False keys (padding) are never seen. With
  ``causal``, a non-prefix key is seen only from its own position on
  (``j <= i``); without, the segment is bidirectional.
  """
  length = segment_ids.shape[1]
  same = segment_ids[:, :, None] == segment_ids[:, None, :]
  seen = same & key_valid.astype(bool)[:, None, :]
  if causal:
    pos = jnp.arange(length)
    seen = seen & (prefix.astype(bool)[:, None, :] | (pos[None, :] <= pos[:, None])[None])
  return seen[:, None]


def segment_positions(segment_ids):
  """Position of each token within its segment, ``[batch, length]`` int32.

  A new segment starts wherever the id changes from the previous token.
  """
  segment_ids = jnp.asarray(segment_ids)
  length = segment_ids.shape[-1]
  idx = jnp.arange(length)
  starts = jnp.concatenate(
      [jnp.ones_like(segment_ids[..., :1], bool),
       segment_ids[..., 1:] != segment_ids[..., :-1]], axis=-1)
  start_idx = jnp.where(starts, idx, 0)
  start_idx = jax.lax.cummax(start_idx, axis=start_idx.ndim - 1)
  return (idx - start_idx).astype(jnp.int32)

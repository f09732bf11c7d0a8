"""BEiT (Bao et al. 2021): masked-image modeling of discrete visual tokens.

The encoder is a ``ViTEncoder`` (no second copy): a learned mask token
replaces the masked patches, a relative-position bias with [CLS] entries
enters every layer through the backbone's ``layer_bias`` hook (one table per
layer) or as one shared bias, each branch has a layer scale
(``TransformerConfig.layer_scale``), keys have no bias
(``TransformerConfig.key_bias=False``), and the image feature is the
LayerNorm of the mean patch output (``ViTConfig.pool_norm``, no final norm)
or the [CLS] token after a final norm. ``beit_encoder`` builds that
``ViTConfig``.

``BEiT`` adds a LayerNorm and a linear head over the visual-token vocabulary
on every patch output; ``beit_loss`` is the cross-entropy of the masked
patches' token ids (from any visual tokenizer: ``visual_tokenizer`` or ids
precomputed elsewhere). Masks come from ``datong.ops.masking.blockwise_mask``
(``beit_masking``).

    cfg = BEiTConfig(beit_encoder(TransformerConfig.preset("vit-B"), image_size=224,
                                  patch_size=16), vocab_size=8192)
    logits, aux = BEiT(cfg).apply(params, images, mask)   # [b, n, vocab]
    loss, metrics = beit_loss(logits, token_ids, mask)
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import flax.linen as nn
import jax.numpy as jnp

from datong.backbone import Norm, TransformerConfig
from datong.ops.losses import cross_entropy
from datong.ops.masking import blockwise_mask, default_min_block, num_block_masked
from datong.unimodal.vision import ViTConfig, ViTEncoder


def beit_encoder(backbone: TransformerConfig, *, image_size=(224, 224), patch_size=(16, 16),
                 channels: int = 3, relative_position_bias: str = "layer",
                 layer_scale: float = 0.1, mean_pool: bool = True, posemb: str = "none",
                 **vit_fields) -> ViTConfig:
  """A BEiT encoder as a ``ViTConfig``: [CLS] token, mask token, keys without
  bias, layer scale, relative-position bias (``"layer"``, ``"shared"`` or
  ``"none"``), and ``mean_pool`` (LayerNorm of the mean patch output, no final
  norm) or the [CLS] token after a final norm."""
  bb = backbone.replace(key_bias=False, layer_scale=layer_scale,
                        final_norm=not mean_pool)
  return ViTConfig(bb, image_size=image_size, patch_size=patch_size, channels=channels,
                   pool="gap" if mean_pool else "cls", cls_token=True, posemb=posemb,
                   mask_token=True, relative_position_bias=relative_position_bias,
                   pool_norm=mean_pool, **vit_fields)


@dataclasses.dataclass(frozen=True)
class BEiTConfig:
  """BEiT pretraining: an encoder (``beit_encoder``), the visual-token
  vocabulary and the blockwise masking (``ratio``; ``min_block`` None: 16
  patches scaled from the paper's 14 x 14 grid; ``aspect``: block height /
  width in ``[aspect, 1 / aspect]``)."""
  encoder: ViTConfig
  vocab_size: int = 8192
  mask_ratio: float = 0.4
  min_block: Optional[int] = None
  max_block: Optional[int] = None
  aspect: float = 0.3

  def __post_init__(self):
    enc = self.encoder
    if not enc.mask_token or not enc.has_cls:
      raise ValueError("BEiTConfig.encoder needs mask_token=True and a [CLS] token; build it "
                       "with beit_encoder(...).")
    if self.vocab_size < 2:
      raise ValueError(f"BEiTConfig.vocab_size={self.vocab_size}: need at least 2 visual tokens.")
    num_block_masked(enc.grid, self.mask_ratio)  # validates the ratio
    if min(enc.grid) < 2:
      raise ValueError(f"BEiTConfig: blockwise masking needs a grid of at least 2 x 2 patches; "
                       f"the encoder's is {enc.grid}.")

  @property
  def resolved_min_block(self) -> int:
    return default_min_block(self.encoder.grid) if self.min_block is None else self.min_block


def beit_masking(rng, batch: int, config: BEiTConfig):
  """``[batch, n]`` bool blockwise mask (True = masked) for ``config``'s grid."""
  return blockwise_mask(rng, batch, config.encoder.grid, config.mask_ratio,
                        min_block=config.resolved_min_block, max_block=config.max_block,
                        aspect=config.aspect).mask


class BEiT(nn.Module):
  """``(images [b, h, w, c], mask [b, n] bool) -> (logits [b, n, vocab], aux)``.

  Parameters: ``encoder/...`` (a ``ViTEncoder``), ``norm`` and ``lm_head``
  (HF ``BeitForMaskedImageModeling``'s ``layernorm`` and ``lm_head``).
  ``aux`` is the encoder's, plus ``logits``. ``mask=None`` runs unmasked.
  """
  config: BEiTConfig

  @nn.compact
  def __call__(self, images, mask=None, *, train: bool = False, return_layers: bool = False):
    cfg = self.config
    enc = cfg.encoder
    bb = enc.backbone
    _, aux = ViTEncoder(enc, name="encoder")(images, mask=mask, train=train,
                                            return_layers=return_layers)
    hidden = Norm(bb, name="norm")(aux["patch_tokens"])
    logits = nn.Dense(
        cfg.vocab_size, dtype=jnp.float32, param_dtype=bb.params_dtype,
        kernel_init=nn.with_logical_partitioning(nn.initializers.truncated_normal(0.02),
                                                 ("embed", "vocab")),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("vocab",)),
        name="lm_head")(hidden.astype(jnp.float32))
    aux["logits"] = logits
    return logits, aux


def beit_loss(logits, tokens, mask):
  """Mean cross-entropy of the masked patches' visual tokens.

  ``logits [b, n, vocab]``, ``tokens [b, n]`` ints, ``mask [b, n]`` bool
  (True = masked, predicted). Returns ``(loss, {"loss", "accuracy",
  "mask_ratio"})``; the mean is over all masked patches of the batch (HF's
  ``CrossEntropyLoss`` on ``logits[mask]``).
  """
  nll, _ = cross_entropy(logits, tokens)
  m = mask.astype(jnp.float32)
  count = jnp.maximum(jnp.sum(m), 1.0)
  loss = jnp.sum(nll * m) / count
  correct = (jnp.argmax(logits, -1) == tokens).astype(jnp.float32)
  return loss, {"loss": loss, "accuracy": jnp.sum(correct * m) / count,
                "mask_ratio": jnp.mean(m)}

"""Pure functions with no parameters: attention, masks, positions, patches, losses."""

from datong.ops.attention import (AttentionUnsupportedError, IMPLEMENTATIONS,
                                  attention, attention_weights, reference_attention,
                                  select_impl)
from datong.ops.masks import (causal_mask, key_mask, padding_mask, prefix_lm_mask,
                              segment_mask, segment_positions)
from datong.ops.losses import classification_loss, cross_entropy, soft_cross_entropy
from datong.ops.patches import grid_shape, pair, patchify, unpatchify
from datong.ops.posemb import (apply_rotary, bicubic_matrix, interpolate_1d, interpolate_2d,
                               sincos_1d, sincos_2d)

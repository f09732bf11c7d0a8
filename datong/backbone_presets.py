"""Published backbone sizes by name: ``TransformerConfig.preset(name)`` reads
this table (decoded in one place)."""

from __future__ import annotations

from typing import Any


def _vit(width, depth, heads, mlp_dim):
  return dict(width=width, depth=depth, heads=heads, mlp_dim=mlp_dim,
              activation="gelu", norm_eps=1e-6, kernel_init="xavier_uniform")


def _bert(width, depth, heads):
  return dict(width=width, depth=depth, heads=heads, mlp_dim=4 * width,
              activation="gelu", norm_position="post", norm_eps=1e-12,
              kernel_init="normal")


def _gpt2(width, depth, heads):
  return dict(width=width, depth=depth, heads=heads, mlp_dim=4 * width,
              activation="gelu_tanh", norm_eps=1e-5, kernel_init="normal")


# All size variants, decoded in one place. ViT sizes from Dosovitskiy et al.
# and Zhai et al. (Ti/S); BERT from Devlin et al.; GPT-2 from Radford et al.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(width=64, depth=2, heads=4, mlp_dim=128),
    "vit-Ti": _vit(192, 12, 3, 768),
    "vit-S": _vit(384, 12, 6, 1536),
    "vit-B": _vit(768, 12, 12, 3072),
    "vit-L": _vit(1024, 24, 16, 4096),
    "vit-H": _vit(1280, 32, 16, 5120),
    "bert-base": _bert(768, 12, 12),
    "bert-large": _bert(1024, 24, 16),
    "gpt2-small": _gpt2(768, 12, 12),
    "gpt2-medium": _gpt2(1024, 24, 16),
    "gpt2-large": _gpt2(1280, 36, 20),
}

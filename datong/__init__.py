"""Datong (大同): one Transformer backbone for text, images and image-text."""

__version__ = "0.1.0"

from datong.backbone import PRESETS, Transformer, TransformerConfig, count_params, init_cache

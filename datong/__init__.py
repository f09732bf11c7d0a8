"""Datong (大同): one Transformer backbone for text, images and image-text."""

__version__ = "0.1.0"

from datong.backbone import PRESETS, Transformer, TransformerConfig, init_cache
from datong.params import count_params

# The notebook API (datong.notebook), imported on first use so that
# `import datong` stays light: datong.build(...), datong.fit(...), ...
_NOTEBOOK = (
    "KINDS", "abstract_params", "apply", "attention_maps", "attention_weights", "build", "caption",
    "confusion_matrix", "count", "describe", "example_inputs", "examples", "fit",
    "generate_text", "init", "plot_confusion_matrix", "quick_compile", "reconstruct",
    "run_config", "show_attention", "show_images", "tokenizer_of", "with_attention",
    "zero_shot_predict",
)


def __getattr__(name):
  if name in _NOTEBOOK:
    from datong import notebook  # pylint: disable=import-outside-toplevel
    return getattr(notebook, name)
  raise AttributeError(f"module 'datong' has no attribute {name!r}")


def __dir__():
  return sorted(list(globals()) + list(_NOTEBOOK))

"""One table of model kinds: what the notebook, the warm-start path and the
tasks need to know about each model.

A kind is one ``ModelKind`` entry: its flax module and config classes, the
default config for a backbone preset, example inputs, and where its image
encoder sits in its parameter tree (and which config describes it). Adding a
model kind is its module plus one entry here; ``datong.build``,
``datong.example_inputs``, ``datong.attention_maps``,
``warmstart.find_encoder`` and fine-tuning read the table and need no edit.

    from datong import registry
    kind = registry.get("mae")
    model = kind.module(kind.default_config(TransformerConfig.preset("tiny")))
    images, keep, restore = kind.example_inputs(model, 2, 0)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from datong.backbone import Transformer, TransformerConfig
from datong.multimodal.clip import CLIP, ClipConfig
from datong.multimodal.coca import CoCa, CocaConfig
from datong.multimodal.fusion import FusionConfig, FusionModel
from datong.unimodal import masked_image as mim
from datong.unimodal.beit import BEiT, BEiTConfig, beit_encoder, beit_masking
from datong.unimodal.encoders import ImageClassifier
from datong.unimodal.text import BERT, GPT, TextConfig, TextEncoder
from datong.unimodal.swin import PRESETS as SWIN_PRESETS
from datong.unimodal.swin import SwinConfig, swin_backbone
from datong.unimodal.vision import ViTConfig, ViTEncoder

__all__ = ["KINDS", "ModelKind", "encoder_of", "get", "kind_of", "register"]


@dataclasses.dataclass(frozen=True)
class ModelKind:
  """Everything generic code needs to know about one model kind.

  ``default_config(backbone)``: the model's config built around one backbone
  preset. ``module_defaults``: module fields other than ``config`` for a
  preset build (``num_classes`` of a classifier); ``module_kwargs(task)``:
  those fields from a recipe's task config. ``example_inputs(model, batch,
  seed)``: positional inputs ``model`` accepts. ``encoder_path``: the params
  path of its image encoder (``()``: the whole tree; None: it has none);
  ``encoder_config(config)``: that encoder's config. ``presets``: preset
  names of the kind's own (``swin-T``, ...) -> a function giving its config,
  accepted where backbone presets are.
  """
  name: str
  description: str
  module: type
  config: type
  default_config: Callable[[TransformerConfig], Any]
  example_inputs: Callable[[nn.Module, int, int], tuple]
  module_defaults: dict = dataclasses.field(default_factory=dict)
  module_kwargs: Callable[[Any], dict] = lambda task: {}
  encoder_path: Optional[tuple[str, ...]] = None
  encoder_config: Optional[Callable[[Any], Any]] = None
  presets: dict = dataclasses.field(default_factory=dict)  # own preset names -> () -> config


# ------------------------------------------------------------ example inputs

def _ids(rng: np.random.Generator, batch: int, length: int, vocab: int) -> jnp.ndarray:
  return jnp.asarray(rng.integers(0, min(vocab, 256), (batch, length)), jnp.int32)


def _images(encoder, batch: int, seed: int) -> jnp.ndarray:
  h, w = encoder.image_size
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.standard_normal((batch, h, w, encoder.channels)), jnp.float32)


def _text_inputs(model, batch, seed):
  cfg = model.config
  return (_ids(np.random.default_rng(seed), batch, min(16, cfg.max_length), cfg.vocab_size),)


def _mae_inputs(model, batch, seed):
  cfg = model.config
  m = mim.random_masking(jax.random.PRNGKey(seed), batch, cfg.encoder.num_patches, cfg.mask_ratio)
  return (_images(cfg.encoder, batch, seed), m.keep_indices, m.restore_indices)


def _simmim_inputs(model, batch, seed):
  cfg = model.config
  return (_images(cfg.encoder, batch, seed),
          mim.simmim_masking(jax.random.PRNGKey(seed), batch, cfg))


def _beit_inputs(model, batch, seed):
  cfg = model.config
  return (_images(cfg.encoder, batch, seed), beit_masking(jax.random.PRNGKey(seed), batch, cfg))


def _clip_inputs(model, batch, seed):
  cfg = model.config
  rng = np.random.default_rng(seed)
  images = _images(cfg.image, batch, seed)
  ids = np.array(_ids(rng, batch, cfg.text.max_length, cfg.text.vocab_size))
  ids[:, -1] = model.eos_id
  return (images, jnp.asarray(ids))


def _fusion_inputs(model, batch, seed):
  cfg = model.config
  rng = np.random.default_rng(seed)
  images = jnp.asarray(rng.uniform(-1, 1, (batch, *cfg.image_size, cfg.channels)), jnp.float32)
  return images, _ids(rng, batch, cfg.max_text_length, cfg.vocab_size)


def _coca_inputs(model, batch, seed):
  cfg = model.config
  rng = np.random.default_rng(seed)
  return _images(cfg.image, batch, seed), _ids(rng, batch, cfg.max_text_length, cfg.vocab_size)


def _backbone_inputs(model, batch, seed):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.standard_normal((batch, 16, model.config.width)), jnp.float32),)


# --------------------------------------------------------------------- table

KINDS: dict[str, ModelKind] = {}


def register(kind: ModelKind) -> ModelKind:
  """Add ``kind`` to the table (a name may be registered once)."""
  if kind.name in KINDS:
    raise ValueError(f"model kind {kind.name!r} is registered already.")
  KINDS[kind.name] = kind
  return kind


register(ModelKind(
    "gpt", "causal language model (datong.unimodal.text.GPT)", GPT, TextConfig,
    lambda bb: TextConfig(backbone=bb), _text_inputs))
register(ModelKind(
    "bert", "masked language model (datong.unimodal.text.BERT)", BERT, TextConfig,
    lambda bb: TextConfig(backbone=bb, positions="learned"), _text_inputs))
register(ModelKind(
    "vit", "image classifier: any image encoder + linear head "
    "(datong.unimodal.encoders.ImageClassifier)", ImageClassifier, ViTConfig, ViTConfig,
    lambda model, batch, seed: (_images(model.config, batch, seed),),
    module_defaults={"num_classes": 1000},
    module_kwargs=lambda task: ({"num_classes": task.num_classes}
                                if hasattr(task, "num_classes") else {}),
    encoder_path=("encoder",), encoder_config=lambda c: c))
register(ModelKind(
    "vit_encoder", "ViT encoder, no head (datong.unimodal.vision.ViTEncoder)", ViTEncoder,
    ViTConfig, ViTConfig, lambda model, batch, seed: (_images(model.config, batch, seed),),
    encoder_path=(), encoder_config=lambda c: c))
register(ModelKind(
    "mae", "masked autoencoder (datong.unimodal.masked_image.MAE)", mim.MAE, mim.MAEConfig,
    lambda bb: mim.MAEConfig(ViTConfig(bb), decoder=bb.replace(depth=max(1, bb.depth // 2))),
    _mae_inputs, encoder_path=("encoder",), encoder_config=lambda c: c.encoder))
register(ModelKind(
    "simmim", "SimMIM (datong.unimodal.masked_image.SimMIM)", mim.SimMIM, mim.SimMIMConfig,
    lambda bb: mim.SimMIMConfig(ViTConfig(bb, mask_token=True)), _simmim_inputs,
    encoder_path=("encoder",), encoder_config=lambda c: c.encoder))
register(ModelKind(
    "beit", "BEiT masked visual-token prediction (datong.unimodal.beit.BEiT)", BEiT, BEiTConfig,
    lambda bb: BEiTConfig(beit_encoder(bb)), _beit_inputs,
    encoder_path=("encoder",), encoder_config=lambda c: c.encoder))
def _swin_from_backbone(bb: TransformerConfig, version: int) -> SwinConfig:
  """A two-stage Swin with ``bb``'s width, heads and mlp ratio (for backbone presets)."""
  depths, heads = (2, 2), (bb.heads, 2 * bb.heads)
  block = swin_backbone(bb.width, depths, heads, version=version,
                        mlp_ratio=max(1, bb.mlp_dim // bb.width), dtype=bb.dtype,
                        param_dtype=bb.param_dtype)
  return SwinConfig(block, depths=depths, heads=heads, window_size=4, image_size=(32, 32),
                    patch_size=(2, 2), version=version)


for _version, _kind in ((1, "swin"), (2, "swinv2")):
  register(ModelKind(
      _kind, f"Swin V{_version} image classifier (ImageClassifier on "
      "datong.unimodal.swin.SwinConfig)", ImageClassifier, SwinConfig,
      functools.partial(_swin_from_backbone, version=_version),
      lambda model, batch, seed: (_images(model.config, batch, seed),),
      module_defaults={"num_classes": 1000},
      module_kwargs=lambda task: ({"num_classes": task.num_classes}
                                  if hasattr(task, "num_classes") else {}),
      encoder_path=("encoder",), encoder_config=lambda c: c,
      presets={name: functools.partial(SwinConfig.preset, name) for name in SWIN_PRESETS
               if name.startswith("swinv2") == (_version == 2)}))
register(ModelKind(
    "clip", "image-text two towers (datong.multimodal.clip.CLIP)", CLIP, ClipConfig,
    lambda bb: ClipConfig(image=ViTConfig(bb), text=TextConfig(backbone=bb, positions="learned",
                                                               max_length=64)),
    _clip_inputs, encoder_path=("image", "encoder"), encoder_config=lambda c: c.image))
register(ModelKind(
    "fusion", "single-stream image+text model, prefix-LM (datong.multimodal.fusion.FusionModel)",
    FusionModel, FusionConfig,
    lambda bb: FusionConfig(bb, vocab_size=262, max_text_length=32), _fusion_inputs))
register(ModelKind(
    "coca", "contrastive captioner: image encoder + unimodal / multimodal text decoder "
    "(datong.multimodal.coca.CoCa)", CoCa, CocaConfig,
    lambda bb: CocaConfig(image=ViTConfig(bb), text=TextConfig(
        backbone=bb.replace(depth=max(2, bb.depth)), positions="learned", max_length=32)),
    _coca_inputs, encoder_path=("encoder",), encoder_config=lambda c: c.image))
register(ModelKind(
    "text_encoder", "text encoder, no head, optional BERT pooler "
    "(datong.unimodal.text.TextEncoder)", TextEncoder, TextConfig,
    lambda bb: TextConfig(backbone=bb, positions="learned"), _text_inputs))


def get(name: str) -> ModelKind:
  """The entry of kind ``name``; an unknown name lists the known ones."""
  if name not in KINDS:
    raise ValueError(f"Unknown model kind {name!r}; choose one of: {', '.join(KINDS)}.")
  return KINDS[name]


def kind_of(model: nn.Module) -> Optional[ModelKind]:
  """The entry whose module class ``model`` is (None for other modules)."""
  # One module class may serve several kinds (a classifier on a ViT or a Swin):
  # the config class decides, then the module class alone.
  same = [k for k in KINDS.values() if type(model) is k.module]  # pylint: disable=unidiomatic-typecheck
  exact = [k for k in same if isinstance(getattr(model, "config", None), k.config)]
  return (exact or same or [None])[0]


def encoder_of(model: nn.Module, params) -> tuple[Any, Any]:
  """``(encoder config, its params)`` of the image encoder inside ``model``."""
  kind = kind_of(model)
  if kind is None or kind.encoder_path is None:
    names = [k.name for k in KINDS.values() if k.encoder_path is not None]
    raise TypeError(f"{type(model).__name__} has no image encoder; kinds with one: "
                    f"{', '.join(names)}.")
  if model.__class__ is CLIP and model.config.share_backbone:
    raise TypeError("a CLIP with a shared backbone keeps its image encoder's backbone at the "
                    "top level; build it without share_backbone to look at its encoder alone.")
  for key in kind.encoder_path:
    params = params[key]
  return kind.encoder_config(model.config), params


def example_inputs(model: nn.Module, batch: int = 2, seed: int = 0) -> tuple:
  """Positional inputs ``model`` accepts (random, fixed seed); see ``ModelKind``."""
  kind = kind_of(model)
  if kind is not None:
    return kind.example_inputs(model, batch, seed)
  if isinstance(model, Transformer):
    return _backbone_inputs(model, batch, seed)
  raise TypeError(f"example_inputs: no example inputs for {type(model).__name__}; registered: "
                  f"{', '.join(k.module.__name__ for k in KINDS.values())} and Transformer "
                  "(or pass inputs yourself).")

"""ViT (``ViTForImageClassification``) <-> Datong ``ViTClassifier``; ``ViTModel``
-> ``ViTEncoder`` (``ViTConfig.pooler=True`` when the checkpoint has HF's pooler).

Datong takes images ``[batch, h, w, c]``: transpose HF's NCHW pixel values.
HF adds a position embedding to the [CLS] token; Datong's position table
covers patches only, so ``cls = cls_token + pos[0]`` (exact: HF adds the same
two float32 numbers) and export writes ``pos[0] = 0``. ``vit_config`` and
``vit_encoder_params`` also serve ViT-MAE's encoder.
"""

from __future__ import annotations

from typing import Mapping

import jax.numpy as jnp
import numpy as np

from datong.backbone import TransformerConfig
from datong.hf.common import (ACTIVATIONS_OUT, State, UnsupportedError, activation,
                              backbone_export_problems, backbone_params, block_from_datong,
                              finish, layers_of, need, patch_kernel_from_datong,
                              patch_kernel_to_datong, put_block, take_block)
from datong.hf.safetensors import read_checkpoint
from datong.ops.patches import pair
from datong.ops.posemb import sincos_2d
from datong.unimodal.vision import ViTClassifier, ViTConfig, ViTEncoder

ARCHITECTURES = ("ViTForImageClassification", "ViTModel")
EXPORTS = (ViTClassifier,)

LAYER = {"q": "attention.attention.query", "k": "attention.attention.key",
         "v": "attention.attention.value", "o": "attention.output.dense",
         "ln1": "layernorm_before", "fc1": "intermediate.dense",
         "fc2": "output.dense", "ln2": "layernorm_after"}

# Every spelling of a ViT layer -> the hub's (transformers 4.x, also what 5.x
# ``save_pretrained`` writes for ViT): 5.x ``state_dict()`` names the layers
# ``layers.{i}`` with ``attention.{q,k,v,o}_proj`` and ``mlp.fc{1,2}``.
RESPELL = (
    (r"(^|\.)layers\.(\d+)\.", r"\1encoder.layer.\2."),
    (r"\.attention\.q_proj\.", ".attention.attention.query."),
    (r"\.attention\.k_proj\.", ".attention.attention.key."),
    (r"\.attention\.v_proj\.", ".attention.attention.value."),
    (r"\.attention\.o_proj\.", ".attention.output.dense."),
    (r"\.mlp\.fc1\.", ".intermediate.dense."),
    (r"\.mlp\.fc2\.", ".output.dense."),
)


def vit_config(config: Mapping, arch: str = "ViT", **backbone_overrides) -> ViTConfig:
  bb = TransformerConfig(
      width=config["hidden_size"], depth=config["num_hidden_layers"],
      heads=config["num_attention_heads"], mlp_dim=config["intermediate_size"],
      activation=activation(config, arch), norm_position="pre",
      norm_eps=config.get("layer_norm_eps", 1e-12), kernel_init="normal",
      init_std=config.get("initializer_range", 0.02), **backbone_overrides)
  return ViTConfig(bb, image_size=pair(config.get("image_size", 224)),
                   patch_size=pair(config.get("patch_size", 16)),
                   channels=config.get("num_channels", 3), pool="cls", posemb="learned")


def vit_encoder_params(cfg: ViTConfig, state: State, prefix: str, *,
                       zero_qkv_bias=False) -> dict:
  """``ViTEncoder`` params from HF's ``{prefix}embeddings`` / ``encoder`` / ``layernorm``."""
  bb = cfg.backbone
  d = bb.width
  n = cfg.num_patches
  e = f"{prefix}embeddings."
  pos = state.take(f"{e}position_embeddings", (1, n + 1, d))[0]
  cls = state.take(f"{e}cls_token", (1, 1, d))[0, 0]
  layers = [take_block(state, f"{prefix}encoder.layer.{i}.", LAYER, bb,
                       zero_qkv_bias=zero_qkv_bias) for i in range(bb.depth)]
  return {
      "stem": {"projection": {
          "kernel": patch_kernel_to_datong(state.take(
              f"{e}patch_embeddings.projection.weight", (d, cfg.channels) + cfg.patch_size)),
          "bias": state.take(f"{e}patch_embeddings.projection.bias")},
          "pos_embedding": pos[1:]},
      # HF adds pos[0] to the [CLS] token; Datong's table covers patches only.
      "cls": cls + pos[0],
      "backbone": backbone_params(layers, bb, (state.take(f"{prefix}layernorm.weight"),
                                               state.take(f"{prefix}layernorm.bias"))),
  }


def _num_labels(config: Mapping) -> int:
  if "id2label" in config:
    return len(config["id2label"])
  return int(config.get("num_labels", 2))


def load(config: Mapping, state: State, **backbone_overrides):
  """``(ViTClassifier, params)`` from a ViT ``config.json`` dict and its tensors."""
  state.respell(RESPELL)
  cfg = vit_config(config, "ViT", **backbone_overrides)
  if (config.get("architectures") or [""])[0] == "ViTModel":
    return _load_headless(config, cfg, state)
  model = ViTClassifier(cfg, _num_labels(config))
  params = {"encoder": vit_encoder_params(cfg, state, "vit.",
                                          zero_qkv_bias=not config.get("qkv_bias", True)),
            "head": {"kernel": state.take("classifier.weight").T,
                     "bias": state.take("classifier.bias")}}
  images = jnp.zeros((1,) + cfg.image_size + (cfg.channels,), jnp.float32)
  return model, finish(model, params, (images,), state)


def _load_headless(config: Mapping, cfg: ViTConfig, state: State):
  """``ViTModel`` -> ``ViTEncoder``; HF's pooler (dense + tanh on [CLS]) iff the file has it."""
  prefix = "vit." if any(k.startswith("vit.") for k in state.tensors) else ""
  pooler = state.has(f"{prefix}pooler.dense.weight")
  if pooler:
    need(config, "ViTModel", "pooler_act", "tanh", "tanh")
    need(config, "ViTModel", "pooler_output_size", (None, cfg.width), cfg.width)
  cfg = cfg.replace(pooler=pooler)
  model = ViTEncoder(cfg)
  params = vit_encoder_params(cfg, state, prefix, zero_qkv_bias=not config.get("qkv_bias", True))
  if pooler:
    params["pooler"] = {"kernel": state.take(f"{prefix}pooler.dense.weight").T,
                        "bias": state.take(f"{prefix}pooler.dense.bias")}
  images = jnp.zeros((1,) + cfg.image_size + (cfg.channels,), jnp.float32)
  return model, finish(model, params, (images,), state)


def load_vit(path: str, **backbone_overrides):
  """``(ViTClassifier, params)`` from a ``ViTForImageClassification`` directory,
  ``(ViTEncoder, params)`` from a ``ViTModel`` one.

  Datong takes images ``[batch, h, w, c]``: transpose HF's NCHW pixel values.
  """
  config, tensors = read_checkpoint(path)
  arch = (config.get("architectures") or ["ViTForImageClassification"])[0]
  return load(config, State(tensors, arch), **backbone_overrides)


def encoder_export_problems(cfg: ViTConfig) -> list[str]:
  """What in a ``ViTConfig`` HF's ViT / ViT-MAE encoder cannot express."""
  problems = backbone_export_problems(cfg.backbone, norm_position="pre")
  if cfg.pool != "cls":
    problems.append(f"ViTConfig.pool={cfg.pool!r} (HF ViT pools the [CLS] token)")
  if cfg.posemb not in ("learned", "sincos"):
    problems.append(f"ViTConfig.posemb={cfg.posemb!r}")
  for field in ("mask_token", "pre_norm", "pooler", "distill_token"):
    if getattr(cfg, field):
      problems.append(f"ViTConfig.{field}=True")
  return problems


def encoder_state(cfg: ViTConfig, enc, prefix: str) -> dict:
  """HF's ``{prefix}embeddings`` / ``encoder`` / ``layernorm`` tensors of a ViT encoder."""
  bb = cfg.backbone
  d = bb.width
  if cfg.posemb == "learned":
    pos = np.asarray(enc["stem"]["pos_embedding"])
  else:
    pos = np.asarray(sincos_2d(cfg.grid[0], cfg.grid[1], d))
  e = f"{prefix}embeddings."
  state = {
      f"{e}cls_token": np.asarray(enc["cls"]).reshape(1, 1, d),
      f"{e}position_embeddings": np.concatenate([np.zeros((1, d), pos.dtype), pos])[None],
      f"{e}patch_embeddings.projection.weight": patch_kernel_from_datong(
          enc["stem"]["projection"]["kernel"], cfg.patch_size, cfg.channels),
      f"{e}patch_embeddings.projection.bias": enc["stem"]["projection"]["bias"],
      f"{prefix}layernorm.weight": enc["backbone"]["final_norm"]["norm"]["scale"],
      f"{prefix}layernorm.bias": enc["backbone"]["final_norm"]["norm"]["bias"],
  }
  for i, layer in enumerate(layers_of(enc["backbone"], bb)):
    put_block(state, block_from_datong(layer, bb), f"{prefix}encoder.layer.{i}.", LAYER)
  return state


def encoder_config_json(cfg: ViTConfig) -> dict:
  bb = cfg.backbone
  size = lambda p: p[0] if p[0] == p[1] else list(p)
  return {
      "hidden_size": bb.width, "num_hidden_layers": bb.depth, "num_attention_heads": bb.heads,
      "intermediate_size": bb.mlp_dim, "hidden_act": ACTIVATIONS_OUT[bb.activation],
      "layer_norm_eps": bb.norm_eps, "image_size": size(cfg.image_size),
      "patch_size": size(cfg.patch_size), "num_channels": cfg.channels, "qkv_bias": True,
      "hidden_dropout_prob": bb.dropout, "attention_probs_dropout_prob": bb.attention_dropout,
      "initializer_range": bb.init_std,
  }


def export(model: ViTClassifier, params) -> tuple[dict, dict]:
  """``(config.json dict, state dict)`` of ``ViTForImageClassification``."""
  cfg = model.config
  if not isinstance(cfg, ViTConfig):
    raise UnsupportedError(f"ViT export: the classifier's encoder is a {type(cfg).__name__}; "
                           "only a ViT encoder maps to ViTForImageClassification.")
  from datong.hf import beit  # pylint: disable=import-outside-toplevel
  if beit.wants_beit(cfg):  # BEiT's options -> BeitForImageClassification
    return beit.export(model, params)
  problems = encoder_export_problems(cfg)
  if problems:
    raise UnsupportedError("ViT export: " + "; ".join(problems))
  state = encoder_state(cfg, params["encoder"], "vit.")
  state["classifier.weight"] = np.asarray(params["head"]["kernel"]).T
  state["classifier.bias"] = params["head"]["bias"]
  n = model.num_classes
  config = {
      "architectures": ["ViTForImageClassification"], "model_type": "vit",
      **encoder_config_json(cfg),
      "id2label": {str(i): f"LABEL_{i}" for i in range(n)},
      "label2id": {f"LABEL_{i}": i for i in range(n)},
  }
  return config, state

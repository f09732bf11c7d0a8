"""BEiT (``BeitForImageClassification``, ``BeitForMaskedImageModeling``,
``BeitModel``) <-> Datong ``ImageClassifier(ViTConfig)``, ``BEiT``, ``ViTEncoder``.

The encoder is Datong's ViT with BEiT's options (``unimodal.beit.beit_encoder``):
keys without bias, layer scale (``lambda_1`` / ``lambda_2`` ->
``{attention,mlp}_layer_scale``), a relative-position table per layer
(``attention_bias/table``) or shared (``encoder/relative_position_bias/table``),
mean pooling with a LayerNorm (``pool_norm``; no final norm) or the [CLS]
token after a final norm, the mask token, and an optional absolute position
table (HF adds its row 0 to [CLS]: loaded as ``cls + pos[0]``, like ViT).
Datong takes images ``[batch, h, w, c]``: transpose HF's NCHW pixel values;
HF's ``hidden_states`` are ``aux["embedded"]`` then ``aux["layers"]``.

Spellings read: the hub's (transformers 4.x, with ``relative_position_index``
buffers), 5.x ``save_pretrained`` (the same names) and 5.x ``state_dict()``
(``layers.{i}.attention.q_proj``, ``mlp.fc1``, ``shared_position_bias``).

Not reproduced (``UnsupportedError``): a relative-position bias on a
non-square patch grid (HF resamples its table there), per-layer and shared
biases together, a ``head_dim`` other than ``hidden_size / heads``; export
of a key bias (HF's BEiT has none) or of a non-pre-LN backbone.
"""

from __future__ import annotations

from typing import Mapping

import jax.numpy as jnp
import numpy as np

from datong.backbone import TransformerConfig
from datong.hf.common import (ACTIVATIONS_OUT, State, UnsupportedError, activation,
                              backbone_params, block_from_datong, finish, layers_of,
                              patch_kernel_from_datong, patch_kernel_to_datong, put_block,
                              take_block)
from datong.hf import vit as vit_hf
from datong.hf.safetensors import read_checkpoint
from datong.ops.patches import pair
from datong.ops.posemb import sincos_2d
from datong.unimodal.beit import BEiT, BEiTConfig, beit_encoder
from datong.unimodal.encoders import ImageClassifier
from datong.unimodal.vision import ViTConfig, ViTEncoder

ARCHITECTURES = ("BeitForImageClassification", "BeitForMaskedImageModeling", "BeitModel")
EXPORTS = (BEiT,)  # classifiers on a BEiT-style ViTConfig come through vit.export

LAYER = {"q": "attention.attention.query", "k": "attention.attention.key",
         "v": "attention.attention.value", "o": "attention.output.dense",
         "ln1": "layernorm_before", "fc1": "intermediate.dense",
         "fc2": "output.dense", "ln2": "layernorm_after"}
TABLE = "relative_position_bias.relative_position_bias_table"

# 5.x state_dict() names -> the hub's (= 5.x save_pretrained's): ViT's
# layer names, then BEiT's relative-position tables.
RESPELL = vit_hf.RESPELL + (
    (r"(encoder\.layer\.\d+)\.relative_position_bias\.", r"\1.attention.attention.relative_position_bias."),
    (r"(^|\.)shared_position_bias\.", r"\1encoder.relative_position_bias."),
)


def beit_config(config: Mapping, arch: str, *, pool_norm=None, **backbone_overrides) -> ViTConfig:
  """The ``ViTConfig`` of a BEiT ``config.json`` (``pool_norm`` None: with mean pooling)."""
  per_layer = bool(config.get("use_relative_position_bias", False))
  shared = bool(config.get("use_shared_relative_position_bias", False))
  if per_layer and shared:
    raise UnsupportedError(f"{arch}: use_relative_position_bias and "
                           "use_shared_relative_position_bias both True (Datong has one or the other)")
  width, heads = config["hidden_size"], config["num_attention_heads"]
  if config.get("head_dim", width // heads) * heads != width:
    raise UnsupportedError(f"{arch}: config option head_dim={config['head_dim']} (Datong needs "
                           "hidden_size / num_attention_heads)")
  image, patch = pair(config.get("image_size", 224)), pair(config.get("patch_size", 16))
  grid = (image[0] // patch[0], image[1] // patch[1])
  if (per_layer or shared) and grid[0] != grid[1]:
    raise UnsupportedError(f"{arch}: a relative-position bias on the non-square patch grid {grid} "
                           "(HF resamples its table there)")
  mean = bool(config.get("use_mean_pooling", True))
  bb = TransformerConfig(
      width=width, depth=config["num_hidden_layers"], heads=heads,
      mlp_dim=config["intermediate_size"], activation=activation(config, arch),
      norm_eps=config.get("layer_norm_eps", 1e-12), kernel_init="normal",
      init_std=config.get("initializer_range", 0.02), **backbone_overrides)
  cfg = beit_encoder(bb, image_size=image, patch_size=patch, channels=config.get("num_channels", 3),
                     relative_position_bias="layer" if per_layer else "shared" if shared else "none",
                     layer_scale=max(float(config.get("layer_scale_init_value", 0.1)), 0.0),
                     mean_pool=mean,
                     posemb="learned" if config.get("use_absolute_position_embeddings") else "none")
  return cfg.replace(mask_token=bool(config.get("use_mask_token", False)),
                     pool_norm=mean if pool_norm is None else pool_norm)


def encoder_params(cfg: ViTConfig, state: State, prefix: str) -> dict:
  """``ViTEncoder`` params from HF's ``{prefix}embeddings`` / ``encoder`` / norms."""
  bb = cfg.backbone
  d, e = bb.width, f"{prefix}embeddings."
  cls = state.take(f"{e}cls_token", (1, 1, d))[0, 0]
  stem = {"projection": {
      "kernel": patch_kernel_to_datong(state.take(
          f"{e}patch_embeddings.projection.weight", (d, cfg.channels) + cfg.patch_size)),
      "bias": state.take(f"{e}patch_embeddings.projection.bias")}}
  if cfg.posemb == "learned":
    pos = state.take(f"{e}position_embeddings", (1, cfg.num_patches + 1, d))[0]
    stem["pos_embedding"] = pos[1:]
    cls = cls + pos[0]  # HF adds row 0 to [CLS]
  if cfg.mask_token:
    stem["mask_token"] = state.take(f"{e}mask_token", (1, 1, d))[0, 0]
  layers = []
  for i in range(bb.depth):
    p = f"{prefix}encoder.layer.{i}."
    layer = take_block(state, p, LAYER, bb, zero_qkv_bias=True)
    del layer["attention"]["key"]["bias"]  # BEiT's keys have no bias
    if bb.layer_scale > 0:
      layer["attention_layer_scale"] = state.take(f"{p}lambda_1", (d,))
      layer["mlp_layer_scale"] = state.take(f"{p}lambda_2", (d,))
    if cfg.relative_position_bias == "layer":
      layer["attention_bias"] = {"table": state.take(f"{p}attention.attention.{TABLE}")}
    layers.append(layer)
  final = None
  if bb.has_final_norm:
    final = (state.take(f"{prefix}layernorm.weight"), state.take(f"{prefix}layernorm.bias"))
  out = {"stem": stem, "cls": cls, "backbone": backbone_params(layers, bb, final)}
  if cfg.relative_position_bias == "shared":
    out["relative_position_bias"] = {"table": state.take(f"{prefix}encoder.{TABLE}")}
  if cfg.pool_norm:
    out["pool_norm"] = {"norm": {"scale": state.take(f"{prefix}pooler.layernorm.weight"),
                                 "bias": state.take(f"{prefix}pooler.layernorm.bias")}}
  return out


def _drop_buffers(state: State) -> State:
  # 4.x checkpoints carry the index tables as buffers; Datong recomputes them.
  state.tensors = {k: v for k, v in state.tensors.items()
                   if not k.endswith("relative_position_index")}
  return state


def load(config: Mapping, state: State, **backbone_overrides):
  """``(model, params)`` from a BEiT ``config.json`` dict and its tensors."""
  arch = (config.get("architectures") or ["BeitForImageClassification"])[0]
  _drop_buffers(state.respell(RESPELL))
  if arch == "BeitModel":
    prefix = "beit." if any(k.startswith("beit.") for k in state.tensors) else ""
    cfg = beit_config(config, arch, pool_norm=bool(config.get("use_mean_pooling", True))
                      and state.has(f"{prefix}pooler.layernorm.weight"), **backbone_overrides)
    model, params = ViTEncoder(cfg), encoder_params(cfg, state, prefix)
  elif arch == "BeitForMaskedImageModeling":
    cfg = beit_config(config, arch, pool_norm=False, **backbone_overrides)
    model = BEiT(BEiTConfig(cfg, vocab_size=config.get("vocab_size", 8192)))
    params = {"encoder": encoder_params(cfg, state, "beit."),
              "norm": {"norm": {"scale": state.take("layernorm.weight"),
                                "bias": state.take("layernorm.bias")}},
              "lm_head": {"kernel": state.take("lm_head.weight").T,
                          "bias": state.take("lm_head.bias")}}
  else:
    cfg = beit_config(config, arch, **backbone_overrides)
    labels = len(config["id2label"]) if "id2label" in config else int(config.get("num_labels", 2))
    model = ImageClassifier(cfg, labels)
    params = {"encoder": encoder_params(cfg, state, "beit."),
              "head": {"kernel": state.take("classifier.weight").T,
                       "bias": state.take("classifier.bias")}}
  images = jnp.zeros((1,) + cfg.image_size + (cfg.channels,), jnp.float32)
  return model, finish(model, params, (images,), state)


def load_beit(path: str, **backbone_overrides):
  """``(model, params)`` from a BEiT directory (any of the three architectures)."""
  config, tensors = read_checkpoint(path)
  arch = (config.get("architectures") or ["BeitForImageClassification"])[0]
  return load(config, State(tensors, arch), **backbone_overrides)


def wants_beit(cfg: ViTConfig) -> bool:
  """True when a ``ViTConfig`` uses what only HF's BEiT (not its ViT) expresses."""
  bb = cfg.backbone
  return (cfg.relative_position_bias != "none" or cfg.pool_norm or bb.layer_scale > 0
          or not bb.key_bias)


def export_problems(cfg: ViTConfig, *, mim: bool = False) -> list[str]:
  """What in a ``ViTConfig`` HF's BEiT cannot express."""
  bb, problems = cfg.backbone, []
  for field, want in (("norm_position", "pre"), ("norm", "layernorm"), ("use_bias", True),
                      ("key_bias", False), ("qk_norm", False), ("rope", False),
                      ("cosine_attention", False), ("cross_attention", False)):
    if getattr(bb, field) != want:
      problems.append(f"TransformerConfig.{field}={getattr(bb, field)!r} (needs {want!r})")
  if bb.resolved_kv_heads != bb.heads or bb.resolved_head_dim * bb.heads != bb.width:
    problems.append("TransformerConfig.kv_heads / head_dim (HF BEiT: multi-head, width // heads)")
  if bb.activation not in ACTIVATIONS_OUT:
    problems.append(f"TransformerConfig.activation={bb.activation!r}")
  if not cfg.has_cls or cfg.pre_norm or cfg.pooler:
    problems.append("ViTConfig: BEiT needs a [CLS] token and no pre_norm / pooler")
  mean = not bb.has_final_norm
  if not mim and (cfg.pool, cfg.pool_norm) != (("gap", True) if mean else ("cls", False)):
    problems.append(f"ViTConfig.pool={cfg.pool!r}, pool_norm={cfg.pool_norm} with final_norm="
                    f"{bb.has_final_norm} (HF: mean pooling + norm without a final norm, or "
                    "[CLS] after a final norm)")
  if cfg.relative_position_bias != "none" and cfg.grid[0] != cfg.grid[1]:
    problems.append(f"a relative-position bias on the non-square grid {cfg.grid}")
  return problems


def encoder_state(cfg: ViTConfig, enc, prefix: str, *, pooler: bool) -> tuple[dict, dict]:
  """``(config.json fields, tensors)`` of a BEiT encoder under ``prefix``."""
  bb = cfg.backbone
  d, e = bb.width, f"{prefix}embeddings."
  state = {f"{e}cls_token": np.asarray(enc["cls"]).reshape(1, 1, d),
           f"{e}patch_embeddings.projection.weight": patch_kernel_from_datong(
               enc["stem"]["projection"]["kernel"], cfg.patch_size, cfg.channels),
           f"{e}patch_embeddings.projection.bias": enc["stem"]["projection"]["bias"]}
  if cfg.posemb != "none":
    pos = (np.asarray(enc["stem"]["pos_embedding"]) if cfg.posemb == "learned"
           else np.asarray(sincos_2d(cfg.grid[0], cfg.grid[1], d)))
    state[f"{e}position_embeddings"] = np.concatenate([np.zeros((1, d), pos.dtype), pos])[None]
  if cfg.mask_token:
    state[f"{e}mask_token"] = np.asarray(enc["stem"]["mask_token"]).reshape(1, 1, d)
  for i, layer in enumerate(layers_of(enc["backbone"], bb)):
    p = f"{prefix}encoder.layer.{i}."
    canon = block_from_datong({**layer, "attention": {
        **layer["attention"], "key": {**layer["attention"]["key"], "bias": np.zeros(d)}}}, bb)
    put_block(state, canon, p, LAYER)
    del state[f"{p}attention.attention.key.bias"]
    if bb.layer_scale > 0:
      state[f"{p}lambda_1"] = layer["attention_layer_scale"]
      state[f"{p}lambda_2"] = layer["mlp_layer_scale"]
    if cfg.relative_position_bias == "layer":
      state[f"{p}attention.attention.{TABLE}"] = layer["attention_bias"]["table"]
  if cfg.relative_position_bias == "shared":
    state[f"{prefix}encoder.{TABLE}"] = enc["relative_position_bias"]["table"]
  if bb.has_final_norm:
    state[f"{prefix}layernorm.weight"] = enc["backbone"]["final_norm"]["norm"]["scale"]
    state[f"{prefix}layernorm.bias"] = enc["backbone"]["final_norm"]["norm"]["bias"]
  if pooler and cfg.pool_norm:
    state[f"{prefix}pooler.layernorm.weight"] = enc["pool_norm"]["norm"]["scale"]
    state[f"{prefix}pooler.layernorm.bias"] = enc["pool_norm"]["norm"]["bias"]
  size = lambda v: v[0] if v[0] == v[1] else list(v)
  fields = {
      "model_type": "beit", "hidden_size": d, "num_hidden_layers": bb.depth,
      "num_attention_heads": bb.heads, "intermediate_size": bb.mlp_dim,
      "hidden_act": ACTIVATIONS_OUT[bb.activation], "layer_norm_eps": bb.norm_eps,
      "image_size": size(cfg.image_size), "patch_size": size(cfg.patch_size),
      "num_channels": cfg.channels, "initializer_range": bb.init_std,
      "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "drop_path_rate": 0.0,
      "use_mask_token": cfg.mask_token, "use_absolute_position_embeddings": cfg.posemb != "none",
      "use_relative_position_bias": cfg.relative_position_bias == "layer",
      "use_shared_relative_position_bias": cfg.relative_position_bias == "shared",
      "layer_scale_init_value": bb.layer_scale, "use_mean_pooling": not bb.has_final_norm,
  }
  return fields, state


def export(model, params) -> tuple[dict, dict]:
  """``BEiT`` -> ``BeitForMaskedImageModeling``; ``ImageClassifier`` on a
  BEiT-style ``ViTConfig`` -> ``BeitForImageClassification``."""
  mim = isinstance(model, BEiT)
  cfg = model.config.encoder if mim else model.config
  if not isinstance(cfg, ViTConfig):
    raise UnsupportedError(f"BEiT export: the encoder is a {type(cfg).__name__}, not a ViTConfig.")
  problems = export_problems(cfg, mim=mim)
  if mim and cfg.pool_norm:
    problems.append("ViTConfig.pool_norm=True in a BEiT (HF's BeitForMaskedImageModeling has no pooler)")
  if problems:
    raise UnsupportedError("BEiT export: " + "; ".join(problems))
  fields, state = encoder_state(cfg, params["encoder"], "beit.", pooler=not mim)
  if mim:
    state["layernorm.weight"] = params["norm"]["norm"]["scale"]
    state["layernorm.bias"] = params["norm"]["norm"]["bias"]
    state["lm_head.weight"] = np.asarray(params["lm_head"]["kernel"]).T
    state["lm_head.bias"] = params["lm_head"]["bias"]
    return {"architectures": ["BeitForMaskedImageModeling"], **fields,
            "vocab_size": model.config.vocab_size}, state
  state["classifier.weight"] = np.asarray(params["head"]["kernel"]).T
  state["classifier.bias"] = params["head"]["bias"]
  n = model.num_classes
  return {"architectures": ["BeitForImageClassification"], **fields,
          "id2label": {str(i): f"LABEL_{i}" for i in range(n)},
          "label2id": {f"LABEL_{i}": i for i in range(n)}}, state

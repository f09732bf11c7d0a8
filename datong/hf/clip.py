"""CLIP (``CLIPModel``) -> Datong ``CLIP``; its towers alone.

* ``CLIPModel`` -> ``CLIP`` (both towers, projections, logit scale);
* ``CLIPTextModel`` -> ``TextTower(project=False)`` (returns HF's
  ``pooler_output``), ``CLIPTextModelWithProjection`` -> ``TextTower``
  (``aux["projected"]`` is HF's ``text_embeds``), both on a text-only
  ``ClipConfig`` (``image=None``);
* ``CLIPVisionModel`` -> ``ViTEncoder``; ``CLIPVisionModelWithProjection`` ->
  ``ImageClassifier`` whose (bias-free) head is the projection: its output is
  HF's ``image_embeds``.

Both towers are pre-LN; the vision ``pre_layrnorm`` becomes
``ViTConfig.pre_norm``. CLIP's patch conv has no bias: loaded as zeros, which
is exact. ``export`` writes ``CLIPModel`` back in the hub's spelling. HF's vision ``last_hidden_state`` is before ``post_layernorm``
(Datong's ``aux["pre_norm"]``); its text ``last_hidden_state`` after
``final_layer_norm`` (``aux["encoded"]``). transformers 4.x (the hub) keeps
the headless towers under ``text_model.`` / ``vision_model.``, 5.x saves
them without the prefix: both are read.
"""

from __future__ import annotations

from typing import Mapping

import jax.numpy as jnp
import numpy as np

from datong.backbone import TransformerConfig
from datong.hf.common import (ACTIVATIONS_OUT, State, UnsupportedError, activation,
                              backbone_export_problems, backbone_params, block_from_datong,
                              finish, layers_of, norm, patch_kernel_from_datong,
                              patch_kernel_to_datong, put_block, take_block)
from datong.hf.safetensors import read_checkpoint
from datong.ops.patches import pair
from datong.ops.posemb import sincos_2d
from datong.multimodal.clip import CLIP, ClipConfig, TextTower
from datong.unimodal.encoders import ImageClassifier
from datong.unimodal.text import TextConfig
from datong.unimodal.vision import ViTConfig, ViTEncoder

ARCHITECTURES = ("CLIPModel", "CLIPTextModel", "CLIPTextModelWithProjection",
                 "CLIPVisionModel", "CLIPVisionModelWithProjection")

_LAYER = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
          "o": "self_attn.out_proj", "ln1": "layer_norm1", "fc1": "mlp.fc1",
          "fc2": "mlp.fc2", "ln2": "layer_norm2"}


def _backbone_config(c: Mapping, arch: str, **backbone_overrides) -> TransformerConfig:
  return TransformerConfig(
      width=c["hidden_size"], depth=c["num_hidden_layers"], heads=c["num_attention_heads"],
      mlp_dim=c["intermediate_size"], activation=activation(c, arch, "hidden_act"),
      norm_position="pre", norm_eps=c.get("layer_norm_eps", 1e-5), kernel_init="normal",
      **backbone_overrides)


def _ids(tc: Mapping) -> tuple[int, int]:
  """Datong's ``(pad_id, eos_id)`` for a CLIP text config.

  HF pools at the first ``eos_token_id``, or (legacy configs with
  ``eos_token_id == 2``) at the largest id, which for CLIP's tokenizer is
  its end-of-text token ``vocab_size - 1``. Without an ``attention_mask``
  Datong treats ``pad_id`` tokens as padding (HF does not): it must differ
  from the EOS id. With HF's ``attention_mask`` only the mask says what is
  padding, as in HF (real CLIP tokenizers pad with the EOS id).
  """
  vocab = tc.get("vocab_size", 49408)
  eos = tc.get("eos_token_id", 49407)
  if eos == 2:
    eos = vocab - 1
  pad = tc.get("pad_token_id", 1)
  if pad is None or pad == eos:
    pad = -1  # no id is padding: every token is real
  return pad, eos


def _text_config(tc: Mapping, **backbone_overrides) -> TextConfig:
  return TextConfig(backbone=_backbone_config(tc, "CLIP text", **backbone_overrides),
                    vocab_size=tc.get("vocab_size", 49408), positions="learned",
                    max_length=tc.get("max_position_embeddings", 77), tie_embeddings=False)


def _vision_config(vc: Mapping, **backbone_overrides) -> ViTConfig:
  return ViTConfig(_backbone_config(vc, "CLIP vision", **backbone_overrides),
                   image_size=pair(vc.get("image_size", 224)),
                   patch_size=pair(vc.get("patch_size", 32)),
                   channels=vc.get("num_channels", 3), pool="cls", posemb="learned",
                   pre_norm=True)


def _clip(image, text, embed_dim) -> ClipConfig:
  return ClipConfig(image=image, text=text, embed_dim=embed_dim, text_pool="eos",
                    text_causal=True, loss="softmax", max_scale=None, head_bias=False)


def clip_config(config: Mapping, **backbone_overrides) -> ClipConfig:
  return _clip(_vision_config(config["vision_config"], **backbone_overrides),
               _text_config(config["text_config"], **backbone_overrides),
               config.get("projection_dim", 512))


def _text_params(cfg: ClipConfig, state: State, p: str = "text_model.",
                 project: bool = True) -> dict:
  text = cfg.text
  bb = text.backbone
  layers = [take_block(state, f"{p}encoder.layers.{i}.", _LAYER, bb)
            for i in range(bb.depth)]
  params = {
      "stem": {"embedding": state.take(f"{p}embeddings.token_embedding.weight",
                                       (text.vocab_size, bb.width)),
               "pos_embedding": state.take(f"{p}embeddings.position_embedding.weight",
                                           (text.max_length, bb.width))},
      "backbone": backbone_params(layers, bb, (state.take(f"{p}final_layer_norm.weight"),
                                               state.take(f"{p}final_layer_norm.bias"))),
  }
  if project:
    params["head"] = {"kernel": state.take("text_projection.weight",
                                           (cfg.embed_dim, bb.width)).T}
  return params


def _image_params(cfg: ClipConfig, state: State) -> dict:
  return {"encoder": _image_encoder_params(cfg.image, state),
          "head": {"kernel": state.take("visual_projection.weight",
                                        (cfg.embed_dim, cfg.image.width)).T}}


def _image_encoder_params(vit: ViTConfig, state: State, p: str = "vision_model.") -> dict:
  bb = vit.backbone
  d = bb.width
  e = f"{p}embeddings."
  pos = state.take(f"{e}position_embedding.weight", (vit.num_patches + 1, d))
  layers = [take_block(state, f"{p}encoder.layers.{i}.", _LAYER, bb)
            for i in range(bb.depth)]
  return {
      "stem": {"projection": {
          "kernel": patch_kernel_to_datong(state.take(
              f"{e}patch_embedding.weight", (d, vit.channels) + vit.patch_size)),
          "bias": np.zeros((d,), np.float32)},  # CLIP's patch conv has no bias
          "pos_embedding": pos[1:]},
      "cls": state.take(f"{e}class_embedding", (d,)) + pos[0],
      "pre_norm": norm(state.take(f"{p}pre_layrnorm.weight"), state.take(f"{p}pre_layrnorm.bias")),
      # HF applies post_layernorm to the pooled [CLS] token only; Datong's
      # final norm covers every token and pools after it: same pooled output.
      "backbone": backbone_params(layers, bb, (state.take(f"{p}post_layernorm.weight"),
                                               state.take(f"{p}post_layernorm.bias"))),
  }


def _prefix(state: State, prefix: str) -> str:
  """``prefix`` if the checkpoint has it (transformers 4.x / the hub), else ``""`` (5.x)."""
  return prefix if any(k.startswith(prefix) for k in state.tensors) else ""


def _load_text(config: Mapping, state: State, project: bool, **backbone_overrides):
  cfg = _clip(None, _text_config(config, **backbone_overrides),
              config.get("projection_dim", 512))
  pad, eos = _ids(config)
  tower = TextTower(cfg, pad_id=pad, eos_id=eos, project=project)
  p = _prefix(state, "text_model.")
  params = _text_params(cfg, state, p, project=project)
  return tower, finish(tower, params, (jnp.zeros((1, 2), jnp.int32),), state)


def _load_vision(config: Mapping, state: State, project: bool, **backbone_overrides):
  vit = _vision_config(config, **backbone_overrides)
  encoder = _image_encoder_params(vit, state, _prefix(state, "vision_model."))
  if project:
    dim = config.get("projection_dim", 512)
    model = ImageClassifier(vit, dim)
    params = {"encoder": encoder,
              "head": {"kernel": state.take("visual_projection.weight", (dim, vit.width)).T,
                       "bias": np.zeros((dim,), np.float32)}}  # HF's projection has no bias
  else:
    model, params = ViTEncoder(vit), encoder
  images = jnp.zeros((1,) + vit.image_size + (vit.channels,), jnp.float32)
  return model, finish(model, params, (images,), state)


def load(config: Mapping, state: State, **backbone_overrides):
  """``(model, params)`` from a CLIP ``config.json`` dict and its tensors (see
  the module docstring for which model each architecture becomes)."""
  arch = (config.get("architectures") or ["CLIPModel"])[0]
  if arch.startswith("CLIPText"):
    return _load_text(config, state, arch.endswith("WithProjection"), **backbone_overrides)
  if arch.startswith("CLIPVision"):
    return _load_vision(config, state, arch.endswith("WithProjection"), **backbone_overrides)
  cfg = clip_config(config, **backbone_overrides)
  pad, eos = _ids(config["text_config"])
  model = CLIP(cfg, pad_id=pad, eos_id=eos)
  params = {"image": _image_params(cfg, state), "text": _text_params(cfg, state),
            "log_scale": state.take("logit_scale", ()).reshape(())}
  images = jnp.zeros((1,) + cfg.image.image_size + (cfg.image.channels,), jnp.float32)
  return model, finish(model, params, (images, jnp.zeros((1, 2), jnp.int32)), state)


def load_clip(path: str, **backbone_overrides):
  """``(CLIP, params)`` from a ``CLIPModel`` directory (vision ``pre_layrnorm``
  becomes ``ViTConfig.pre_norm``)."""
  config, tensors = read_checkpoint(path)
  return load(config, State(tensors, "CLIPModel"), **backbone_overrides)


def load_clip_text(path: str, **backbone_overrides):
  """``(TextTower, params)``: CLIP's text encoder + projection alone.

  ``tower.apply({"params": params}, ids) -> (normalized embeddings, aux)``;
  ``aux["pooled"]`` is HF's ``pooler_output``, ``aux["encoded"]`` its
  ``last_hidden_state`` (on real tokens).
  """
  config, tensors = read_checkpoint(path)
  state = State(tensors, "CLIPModel (text tower)")
  cfg = clip_config(config, **backbone_overrides)
  pad, eos = _ids(config["text_config"])
  tower = TextTower(cfg, pad_id=pad, eos_id=eos)
  params = _text_params(cfg, state)
  # The vision tower's tensors are known, just not wanted: not an error.
  state.used.update(k for k in state.tensors if k.startswith("vision_model.")
                    or k in ("visual_projection.weight", "logit_scale"))
  return tower, finish(tower, params, (jnp.zeros((1, 2), jnp.int32),), state)


EXPORTS = (CLIP,)


def _tower_json(bb: TransformerConfig) -> dict:
  return {"hidden_size": bb.width, "num_hidden_layers": bb.depth,
          "num_attention_heads": bb.heads, "intermediate_size": bb.mlp_dim,
          "hidden_act": ACTIVATIONS_OUT[bb.activation], "layer_norm_eps": bb.norm_eps,
          "dropout": bb.dropout, "attention_dropout": bb.attention_dropout}


def export(model: CLIP, params) -> tuple[dict, dict]:
  """``(config.json dict, state dict)`` of ``CLIPModel``, hub spelling.

  Rows with an EOS token embed as in HF; HF treats ``pad_id`` tokens as
  tokens where Datong masks them (equal outputs at real positions).
  """
  cfg = model.config
  vit, text = cfg.image, cfg.text
  problems = []
  if not isinstance(vit, ViTConfig):
    problems.append(f"ClipConfig.image is a {type(vit).__name__} (HF's CLIP has a ViT)")
  else:
    problems += [f"image {p}" for p in backbone_export_problems(vit.backbone,
                                                                norm_position="pre")]
    if vit.pool != "cls" or not vit.pre_norm or vit.mask_token or vit.pooler:
      problems.append("ClipConfig.image needs pool='cls', pre_norm=True, mask_token=False, "
                      "pooler=False (HF's CLIP vision tower)")
    if vit.posemb not in ("learned", "sincos"):
      problems.append(f"ViTConfig.posemb={vit.posemb!r}")
    if vit.image_size[0] != vit.image_size[1] or vit.patch_size[0] != vit.patch_size[1]:
      problems.append(f"ViTConfig.image_size={vit.image_size}, patch_size={vit.patch_size} "
                      "(HF's CLIP vision tower is square)")
  problems += [f"text {p}" for p in backbone_export_problems(cfg.text_backbone,
                                                             norm_position="pre")]
  checks = [("share_backbone", False), ("text_pool", "eos"), ("text_causal", True),
            ("loss", "softmax"), ("head_bias", False)]
  problems += [f"ClipConfig.{f}={getattr(cfg, f)!r} (needs {want!r})"
               for f, want in checks if getattr(cfg, f) != want]
  if text.positions != "learned":
    problems.append(f"TextConfig.positions={text.positions!r} (CLIP has learned positions)")
  if model.eos_id == 2:
    problems.append("CLIP.eos_id=2 (HF reads eos_token_id=2 as a legacy config and pools at "
                    "the largest id)")
  scale = float(np.exp(np.asarray(params["log_scale"])))
  if cfg.max_scale is not None and scale > cfg.max_scale:
    problems.append(f"logit scale {scale:.4g} > ClipConfig.max_scale={cfg.max_scale} (HF does "
                    "not clip it)")
  if problems:
    raise UnsupportedError("CLIP export: " + "; ".join(problems))
  if np.any(np.asarray(params["image"]["encoder"]["stem"]["projection"]["bias"]) != 0):
    raise UnsupportedError("CLIP export: the image stem's projection has a nonzero bias; "
                           "HF's CLIP patch convolution has none.")
  state = {"logit_scale": np.asarray(params["log_scale"], np.float32),
           "text_projection.weight": np.asarray(params["text"]["head"]["kernel"]).T,
           "visual_projection.weight": np.asarray(params["image"]["head"]["kernel"]).T}
  t = params["text"]
  tb = cfg.text_backbone
  state["text_model.embeddings.token_embedding.weight"] = t["stem"]["embedding"]
  state["text_model.embeddings.position_embedding.weight"] = t["stem"]["pos_embedding"]
  state["text_model.final_layer_norm.weight"] = t["backbone"]["final_norm"]["norm"]["scale"]
  state["text_model.final_layer_norm.bias"] = t["backbone"]["final_norm"]["norm"]["bias"]
  for i, layer in enumerate(layers_of(t["backbone"], tb)):
    put_block(state, block_from_datong(layer, tb), f"text_model.encoder.layers.{i}.", _LAYER)
  v = params["image"]["encoder"]
  vb = vit.backbone
  d = vb.width
  pos = (np.asarray(v["stem"]["pos_embedding"]) if vit.posemb == "learned"
         else np.asarray(sincos_2d(vit.grid[0], vit.grid[1], d)))
  e = "vision_model.embeddings."
  state[f"{e}class_embedding"] = np.asarray(v["cls"])
  # HF adds position 0 to the class embedding; Datong folded it into ``cls``.
  state[f"{e}position_embedding.weight"] = np.concatenate([np.zeros((1, d), pos.dtype), pos])
  state[f"{e}patch_embedding.weight"] = patch_kernel_from_datong(
      v["stem"]["projection"]["kernel"], vit.patch_size, vit.channels)
  state["vision_model.pre_layrnorm.weight"] = v["pre_norm"]["norm"]["scale"]
  state["vision_model.pre_layrnorm.bias"] = v["pre_norm"]["norm"]["bias"]
  state["vision_model.post_layernorm.weight"] = v["backbone"]["final_norm"]["norm"]["scale"]
  state["vision_model.post_layernorm.bias"] = v["backbone"]["final_norm"]["norm"]["bias"]
  for i, layer in enumerate(layers_of(v["backbone"], vb)):
    put_block(state, block_from_datong(layer, vb), f"vision_model.encoder.layers.{i}.", _LAYER)
  pad = model.pad_id if 0 <= model.pad_id < text.vocab_size else None
  config = {
      "architectures": ["CLIPModel"], "model_type": "clip",
      "projection_dim": cfg.embed_dim, "logit_scale_init_value": float(params["log_scale"]),
      "text_config": {**_tower_json(tb), "vocab_size": text.vocab_size,
                      "max_position_embeddings": text.max_length, "eos_token_id": model.eos_id,
                      "pad_token_id": pad, "bos_token_id": None,
                      "projection_dim": cfg.embed_dim},
      "vision_config": {**_tower_json(vb), "image_size": vit.image_size[0],
                        "patch_size": vit.patch_size[0], "num_channels": vit.channels,
                        "projection_dim": cfg.embed_dim},
  }
  return config, state

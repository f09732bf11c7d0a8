"""ViT-MAE (``ViTMAEForPreTraining``) <-> Datong ``MAE``.

The encoder is a ViT (shared with ``vit.py``); the fixed sin-cos tables HF
stores are loaded as (learned) tables, which reproduces them exactly.
``mae_masking(noise, ratio)`` reproduces HF's masking from its ``noise=``.
"""

from __future__ import annotations

from typing import Mapping

import jax.numpy as jnp
import numpy as np

from datong.backbone import TransformerConfig
from datong.hf.common import (State, UnsupportedError, backbone_export_problems, backbone_params,
                              block_from_datong, finish, layers_of, put_block, take_block)
from datong.hf.safetensors import read_checkpoint
from datong.hf.vit import (LAYER, RESPELL, encoder_config_json, encoder_export_problems,
                           encoder_state, vit_config, vit_encoder_params)
from datong.ops.posemb import sincos_2d
from datong.unimodal.masked_image import MAE, MAEConfig, Masking

ARCHITECTURES = ("ViTMAEForPreTraining",)
EXPORTS = (MAE,)

# The hub (transformers 4.x) names decoder blocks ``decoder.decoder_layers.{i}``
# with ViT's layer names; 5.x ``save_pretrained`` writes
# ``decoder.decoder_encoder.layer.{i}``, 5.x ``state_dict()`` ViT's 5.x names.
RESPELL_MAE = ((r"^decoder\.decoder_encoder\.layer\.", "decoder.decoder_layers."),) + RESPELL


def mae_masking(noise, mask_ratio: float) -> Masking:
  """HF ViT-MAE's masking from explicit ``noise [batch, n]``, as a ``Masking``.

  Keeps the ``int(n * (1 - mask_ratio))`` patches with the smallest noise
  (HF's count; ``masked_image.num_masked`` rounds the other way for some
  ``n``), so ``MAE`` given these indices sees exactly HF's visible patches.
  """
  noise = jnp.asarray(noise)
  n = noise.shape[1]
  n_keep = int(n * (1 - mask_ratio))
  shuffle = jnp.argsort(noise, axis=1)
  restore = jnp.argsort(shuffle, axis=1)
  mask = jnp.take_along_axis(jnp.arange(n)[None, :] >= n_keep, restore, axis=1)
  return Masking(shuffle[:, :n_keep].astype(jnp.int32), restore.astype(jnp.int32), mask)


def vit_mae_config(config: Mapping, **backbone_overrides) -> MAEConfig:
  arch = "ViTMAE"
  enc = vit_config(config, arch, **backbone_overrides)
  dec = TransformerConfig(
      width=config["decoder_hidden_size"], depth=config["decoder_num_hidden_layers"],
      heads=config["decoder_num_attention_heads"], mlp_dim=config["decoder_intermediate_size"],
      activation=enc.backbone.activation, norm_position="pre",
      norm_eps=config.get("layer_norm_eps", 1e-12), kernel_init="xavier_uniform",
      **backbone_overrides)
  return MAEConfig(encoder=enc, decoder=dec, mask_ratio=config.get("mask_ratio", 0.75),
                   norm_pix_loss=config.get("norm_pix_loss", False), decoder_posemb="learned",
                   decoder_pos_resize="sequence")


def load(config: Mapping, state: State, **backbone_overrides):
  """``(MAE, params)`` from a ViT-MAE ``config.json`` dict and its tensors."""
  state.respell(RESPELL_MAE)
  cfg = vit_mae_config(config, **backbone_overrides)
  model = MAE(cfg)
  dec = cfg.decoder
  n = cfg.encoder.num_patches
  dpos = state.take("decoder.decoder_pos_embed", (1, n + 1, dec.width))[0]
  if np.any(dpos[0] != 0):
    raise UnsupportedError("ViTMAE: decoder_pos_embed has a nonzero [CLS] row; Datong's MAE "
                           "decoder adds positions to patch tokens only.")
  zero_qkv_bias = not config.get("qkv_bias", True)
  layers = [take_block(state, f"decoder.decoder_layers.{i}.", LAYER, dec,
                       zero_qkv_bias=zero_qkv_bias)
            for i in range(dec.depth)]
  params = {
      "encoder": vit_encoder_params(cfg.encoder, state, "vit.", zero_qkv_bias=zero_qkv_bias),
      "decoder_projection": {"kernel": state.take("decoder.decoder_embed.weight").T,
                             "bias": state.take("decoder.decoder_embed.bias")},
      "mask_token": state.take("decoder.mask_token", (1, 1, dec.width))[0, 0],
      "decoder_pos_embedding": dpos[1:],
      "decoder": backbone_params(layers, dec, (state.take("decoder.decoder_norm.weight"),
                                               state.take("decoder.decoder_norm.bias"))),
      "pixel_head": {"kernel": state.take("decoder.decoder_pred.weight").T,
                     "bias": state.take("decoder.decoder_pred.bias")},
  }
  images = jnp.zeros((1,) + cfg.encoder.image_size + (cfg.encoder.channels,), jnp.float32)
  m = mae_masking(jnp.zeros((1, n)), cfg.mask_ratio)
  return model, finish(model, params, (images, m.keep_indices, m.restore_indices), state)


def load_vit_mae(path: str, **backbone_overrides):
  """``(MAE, params)`` from a ``ViTMAEForPreTraining`` directory.

  Mask with ``mae_masking(noise, ratio)`` to match HF's ``noise=`` argument.
  """
  config, tensors = read_checkpoint(path)
  return load(config, State(tensors, "ViTMAEForPreTraining"), **backbone_overrides)


def export(model: MAE, params) -> tuple[dict, dict]:
  """``(config.json dict, state dict)`` of ``ViTMAEForPreTraining``, hub spelling."""
  cfg = model.config
  enc, dec = cfg.encoder, cfg.decoder
  problems = encoder_export_problems(enc)
  problems += [f"decoder {p}" for p in backbone_export_problems(dec, norm_position="pre")]
  # HF's MAE config has one activation and one norm epsilon for both stacks.
  if dec.activation != enc.backbone.activation:
    problems.append(f"MAEConfig.decoder.activation={dec.activation!r} differs from the "
                    f"encoder's {enc.backbone.activation!r}")
  if dec.norm_eps != enc.backbone.norm_eps:
    problems.append(f"MAEConfig.decoder.norm_eps={dec.norm_eps} differs from the encoder's "
                    f"{enc.backbone.norm_eps}")
  if problems:
    raise UnsupportedError("ViT-MAE export: " + "; ".join(problems))
  state = encoder_state(enc, params["encoder"], "vit.")
  if cfg.decoder_posemb == "learned":
    dpos = np.asarray(params["decoder_pos_embedding"])
  else:
    dpos = np.asarray(sincos_2d(enc.grid[0], enc.grid[1], dec.width))
  # HF adds a decoder position to the [CLS] token too; Datong does not: row 0 is zero.
  state["decoder.decoder_pos_embed"] = np.concatenate(
      [np.zeros((1, dec.width), dpos.dtype), dpos])[None]
  state["decoder.mask_token"] = np.asarray(params["mask_token"]).reshape(1, 1, dec.width)
  state["decoder.decoder_embed.weight"] = np.asarray(params["decoder_projection"]["kernel"]).T
  state["decoder.decoder_embed.bias"] = params["decoder_projection"]["bias"]
  state["decoder.decoder_norm.weight"] = params["decoder"]["final_norm"]["norm"]["scale"]
  state["decoder.decoder_norm.bias"] = params["decoder"]["final_norm"]["norm"]["bias"]
  state["decoder.decoder_pred.weight"] = np.asarray(params["pixel_head"]["kernel"]).T
  state["decoder.decoder_pred.bias"] = params["pixel_head"]["bias"]
  for i, layer in enumerate(layers_of(params["decoder"], dec)):
    put_block(state, block_from_datong(layer, dec), f"decoder.decoder_layers.{i}.", LAYER)
  config = {
      "architectures": ["ViTMAEForPreTraining"], "model_type": "vit_mae",
      **encoder_config_json(enc),
      "decoder_hidden_size": dec.width, "decoder_num_hidden_layers": dec.depth,
      "decoder_num_attention_heads": dec.heads, "decoder_intermediate_size": dec.mlp_dim,
      "mask_ratio": cfg.mask_ratio, "norm_pix_loss": cfg.norm_pix_loss,
  }
  return config, state

"""GPT-2 (``GPT2LMHeadModel``, ``GPT2Model``) <-> Datong ``GPT``.

Learned positions, pre-LN, tied or untied head. GPT-2's ``Conv1D`` stores
``[in, out]`` with q/k/v fused in ``c_attn``: split and transposed to the
canonical ``[out, in]`` layout.
"""

from __future__ import annotations

from typing import Mapping

import jax.numpy as jnp
import numpy as np

from datong.backbone import TransformerConfig
from datong.hf.common import (ACTIVATIONS_OUT, State, UnsupportedError, activation,
                              backbone_export_problems, backbone_params, block_from_datong,
                              block_to_datong, finish, layers_of, need)
from datong.hf.safetensors import read_checkpoint
from datong.unimodal.text import GPT, TextConfig

ARCHITECTURES = ("GPT2LMHeadModel", "GPT2Model")
EXPORTS = (GPT,)


def gpt2_config(config: Mapping, **backbone_overrides) -> TextConfig:
  arch = "GPT-2"
  need(config, arch, "scale_attn_weights", True, True)
  need(config, arch, "scale_attn_by_inverse_layer_idx", False, False)
  need(config, arch, "add_cross_attention", False, False)
  width = config["n_embd"]
  bb = TransformerConfig(
      width=width, depth=config["n_layer"], heads=config["n_head"],
      mlp_dim=config.get("n_inner") or 4 * width,
      activation=activation(config, arch, "activation_function"),
      norm_position="pre", norm_eps=config.get("layer_norm_epsilon", 1e-5),
      kernel_init="normal", init_std=config.get("initializer_range", 0.02),
      **backbone_overrides)
  return TextConfig(backbone=bb, vocab_size=config["vocab_size"], positions="learned",
                    max_length=config["n_positions"],
                    tie_embeddings=config.get("tie_word_embeddings", True),
                    embed_init_std=config.get("initializer_range", 0.02))


def gpt2_params(cfg: TextConfig, state: State) -> dict:
  bb = cfg.backbone
  d = bb.width
  p = "transformer." if any(k.startswith("transformer.") for k in state.tensors) else ""
  layers = []
  for i in range(bb.depth):
    pre = f"{p}h.{i}."
    # GPT-2's Conv1D stores [in, out]: transpose to nn.Linear's [out, in].
    qkv_w = state.take(f"{pre}attn.c_attn.weight", (d, 3 * d)).T
    qkv_b = state.take(f"{pre}attn.c_attn.bias", (3 * d,))
    c = {"q_w": qkv_w[:d], "k_w": qkv_w[d:2 * d], "v_w": qkv_w[2 * d:],
         "q_b": qkv_b[:d], "k_b": qkv_b[d:2 * d], "v_b": qkv_b[2 * d:],
         "o_w": state.take(f"{pre}attn.c_proj.weight").T, "o_b": state.take(f"{pre}attn.c_proj.bias"),
         "fc1_w": state.take(f"{pre}mlp.c_fc.weight").T, "fc1_b": state.take(f"{pre}mlp.c_fc.bias"),
         "fc2_w": state.take(f"{pre}mlp.c_proj.weight").T, "fc2_b": state.take(f"{pre}mlp.c_proj.bias"),
         "ln1_w": state.take(f"{pre}ln_1.weight"), "ln1_b": state.take(f"{pre}ln_1.bias"),
         "ln2_w": state.take(f"{pre}ln_2.weight"), "ln2_b": state.take(f"{pre}ln_2.bias")}
    layers.append(block_to_datong(c, bb))
  embed = {"embedding": state.take(f"{p}wte.weight", (cfg.vocab_size, d)),
           "pos_embedding": state.take(f"{p}wpe.weight", (cfg.max_length, d))}
  params = {"encoder": {"embed": embed, "backbone": backbone_params(
      layers, bb, (state.take(f"{p}ln_f.weight"), state.take(f"{p}ln_f.bias")))}}
  if state.has("lm_head.weight"):
    head = state.take("lm_head.weight", (cfg.vocab_size, d))
    if cfg.tie_embeddings:
      if not np.array_equal(head, embed["embedding"]):
        raise UnsupportedError("GPT-2: tie_word_embeddings=True but lm_head.weight differs from wte")
    else:
      params["head"] = {"kernel": head.T}
  elif not cfg.tie_embeddings:
    raise ValueError("GPT-2: tie_word_embeddings=False but the checkpoint has no lm_head.weight")
  return params


def load(config: Mapping, state: State, **backbone_overrides):
  """``(GPT, params)`` from a GPT-2 ``config.json`` dict and its tensors."""
  cfg = gpt2_config(config, **backbone_overrides)
  model = GPT(cfg)
  params = gpt2_params(cfg, state)
  return model, finish(model, params, (jnp.zeros((1, 2), jnp.int32),), state)


def load_gpt2(path: str, **backbone_overrides):
  """``(GPT, params)`` from a ``GPT2LMHeadModel`` / ``GPT2Model`` directory."""
  config, tensors = read_checkpoint(path)
  return load(config, State(tensors, "GPT-2"), **backbone_overrides)


def export(model: GPT, params) -> tuple[dict, dict]:
  """``(config.json dict, state dict)`` of ``GPT2LMHeadModel`` for float32 ``params``."""
  cfg = model.config
  bb = cfg.backbone
  problems = []
  if cfg.positions != "learned":
    problems.append(f"TextConfig.positions={cfg.positions!r} (GPT-2 has learned positions)")
  if cfg.type_vocab_size:
    problems.append("TextConfig.type_vocab_size > 0")
  problems += backbone_export_problems(bb, norm_position="pre")
  if problems:
    raise UnsupportedError("GPT-2 export: " + "; ".join(problems))
  enc = params["encoder"]
  d = bb.width
  state = {"transformer.wte.weight": enc["embed"]["embedding"],
           "transformer.wpe.weight": enc["embed"]["pos_embedding"],
           "transformer.ln_f.weight": enc["backbone"]["final_norm"]["norm"]["scale"],
           "transformer.ln_f.bias": enc["backbone"]["final_norm"]["norm"]["bias"]}
  for i, layer in enumerate(layers_of(enc["backbone"], bb)):
    c = block_from_datong(layer, bb)
    pre = f"transformer.h.{i}."
    state[f"{pre}attn.c_attn.weight"] = np.concatenate([c["q_w"], c["k_w"], c["v_w"]], 0).T
    state[f"{pre}attn.c_attn.bias"] = np.concatenate([c["q_b"], c["k_b"], c["v_b"]])
    state[f"{pre}attn.c_proj.weight"] = c["o_w"].T
    state[f"{pre}attn.c_proj.bias"] = c["o_b"]
    state[f"{pre}mlp.c_fc.weight"] = c["fc1_w"].T
    state[f"{pre}mlp.c_fc.bias"] = c["fc1_b"]
    state[f"{pre}mlp.c_proj.weight"] = c["fc2_w"].T
    state[f"{pre}mlp.c_proj.bias"] = c["fc2_b"]
    state[f"{pre}ln_1.weight"], state[f"{pre}ln_1.bias"] = c["ln1_w"], c["ln1_b"]
    state[f"{pre}ln_2.weight"], state[f"{pre}ln_2.bias"] = c["ln2_w"], c["ln2_b"]
  if not cfg.tie_embeddings:
    state["lm_head.weight"] = np.asarray(params["head"]["kernel"]).T
  config = {
      "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
      "vocab_size": cfg.vocab_size, "n_positions": cfg.max_length, "n_embd": d,
      "n_layer": bb.depth, "n_head": bb.heads, "n_inner": bb.mlp_dim,
      "activation_function": ACTIVATIONS_OUT[bb.activation],
      "layer_norm_epsilon": bb.norm_eps, "initializer_range": cfg.embed_init_std,
      "resid_pdrop": bb.dropout, "embd_pdrop": bb.dropout, "attn_pdrop": bb.attention_dropout,
      "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
      "reorder_and_upcast_attn": False, "tie_word_embeddings": cfg.tie_embeddings,
      "use_cache": True,
  }
  return config, state

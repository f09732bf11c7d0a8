"""BERT (``BertForMaskedLM``, ``BertForPreTraining``) -> Datong ``BERT``.

Post-LN blocks; ``BertForPreTraining`` adds the pooler and next-sentence head
(``TextConfig.nsp=True``). Load only: there is no BERT export yet.
"""

from __future__ import annotations

from typing import Mapping

import jax.numpy as jnp
import numpy as np

from datong.backbone import TransformerConfig
from datong.hf.common import (State, UnsupportedError, activation, backbone_params, finish, need,
                              norm, take_block)
from datong.hf.safetensors import read_checkpoint
from datong.unimodal.text import BERT, TextConfig

ARCHITECTURES = ("BertForMaskedLM", "BertForPreTraining")

_LAYER = {"q": "attention.self.query", "k": "attention.self.key",
          "v": "attention.self.value", "o": "attention.output.dense",
          "ln1": "attention.output.LayerNorm", "fc1": "intermediate.dense",
          "fc2": "output.dense", "ln2": "output.LayerNorm"}


def bert_config(config: Mapping, *, nsp: bool = False, **backbone_overrides) -> TextConfig:
  arch = "BERT"
  need(config, arch, "position_embedding_type", "absolute", "absolute")
  need(config, arch, "is_decoder", False, False)
  need(config, arch, "add_cross_attention", False, False)
  act = activation(config, arch)
  if act != "gelu":
    # Datong's BERT MLM head (dense + gelu + norm) hard-codes exact gelu.
    raise UnsupportedError(f"BERT: hidden_act={config.get('hidden_act')!r}: Datong's MLM head "
                           "always uses exact gelu (needs a TextConfig.mlm_activation option).")
  width = config["hidden_size"]
  bb = TransformerConfig(
      width=width, depth=config["num_hidden_layers"], heads=config["num_attention_heads"],
      mlp_dim=config["intermediate_size"], activation=act, norm_position="post",
      norm_eps=config.get("layer_norm_eps", 1e-12), kernel_init="normal",
      init_std=config.get("initializer_range", 0.02), **backbone_overrides)
  return TextConfig(backbone=bb, vocab_size=config["vocab_size"], positions="learned",
                    max_length=config["max_position_embeddings"],
                    tie_embeddings=config.get("tie_word_embeddings", True),
                    embed_init_std=config.get("initializer_range", 0.02),
                    type_vocab_size=config.get("type_vocab_size", 2), nsp=nsp)


def bert_params(cfg: TextConfig, state: State) -> dict:
  bb = cfg.backbone
  d = bb.width
  layers = [take_block(state, f"bert.encoder.layer.{i}.", _LAYER, bb)
            for i in range(bb.depth)]
  e = "bert.embeddings."
  encoder = {
      "embed": {"embedding": state.take(f"{e}word_embeddings.weight", (cfg.vocab_size, d)),
                "pos_embedding": state.take(f"{e}position_embeddings.weight", (cfg.max_length, d))},
      "embed_norm": norm(state.take(f"{e}LayerNorm.weight"), state.take(f"{e}LayerNorm.bias")),
      "backbone": backbone_params(layers, bb),
  }
  if cfg.type_vocab_size:
    encoder["type_embed"] = {"embedding": state.take(f"{e}token_type_embeddings.weight",
                                                     (cfg.type_vocab_size, d))}
  t = "cls.predictions."
  params = {
      "encoder": encoder,
      "mlm_dense": {"kernel": state.take(f"{t}transform.dense.weight").T,
                    "bias": state.take(f"{t}transform.dense.bias")},
      "mlm_norm": norm(state.take(f"{t}transform.LayerNorm.weight"),
                       state.take(f"{t}transform.LayerNorm.bias")),
      "mlm_bias": state.take(f"{t}bias", (cfg.vocab_size,)),
  }
  if state.has(f"{t}decoder.bias"):
    if not np.array_equal(state.take(f"{t}decoder.bias"), params["mlm_bias"]):
      raise UnsupportedError("BERT: cls.predictions.decoder.bias differs from cls.predictions.bias")
  if state.has(f"{t}decoder.weight"):
    head = state.take(f"{t}decoder.weight", (cfg.vocab_size, d))
    if not cfg.tie_embeddings:
      params["head"] = {"kernel": head.T}
    elif not np.array_equal(head, encoder["embed"]["embedding"]):
      raise UnsupportedError("BERT: tie_word_embeddings=True but the decoder weight differs")
  elif not cfg.tie_embeddings:
    raise ValueError("BERT: tie_word_embeddings=False but no cls.predictions.decoder.weight")
  if cfg.nsp:
    params["pooler"] = {"kernel": state.take("bert.pooler.dense.weight").T,
                        "bias": state.take("bert.pooler.dense.bias")}
    params["nsp_head"] = {"kernel": state.take("cls.seq_relationship.weight").T,
                          "bias": state.take("cls.seq_relationship.bias")}
  return params


def _architecture(config: Mapping) -> str:
  return (config.get("architectures") or ["BertForMaskedLM"])[0]


def load(config: Mapping, state: State, **backbone_overrides):
  """``(BERT, params)``; the NSP head is loaded for ``BertForPreTraining`` configs."""
  nsp = _architecture(config) == "BertForPreTraining"
  cfg = bert_config(config, nsp=nsp, **backbone_overrides)
  model = BERT(cfg)
  params = bert_params(cfg, state)
  return model, finish(model, params, (jnp.zeros((1, 2), jnp.int32),), state)


def load_bert(path: str, **backbone_overrides):
  """``(BERT, params)`` from a ``BertForMaskedLM`` / ``BertForPreTraining`` directory."""
  config, tensors = read_checkpoint(path)
  return load(config, State(tensors, _architecture(config)), **backbone_overrides)

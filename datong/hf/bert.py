"""BERT (``BertForMaskedLM``, ``BertForPreTraining``, ``BertModel``) -> Datong.

Post-LN blocks; ``export`` writes them back in the hub's spelling. ``BertForPreTraining`` -> ``BERT`` with the pooler and
next-sentence head (``TextConfig.nsp=True``); so is a ``BertForMaskedLM``
checkpoint that carries them (the hub's ``bert-base-*`` files do, converted
from pre-training checkpoints). ``BertModel`` -> ``TextEncoder`` (with
``pooler=True`` when the checkpoint has one).
"""

from __future__ import annotations

from typing import Mapping

import jax.numpy as jnp
import numpy as np

from datong.backbone import TransformerConfig
from datong.hf.common import (ACTIVATIONS_OUT, State, UnsupportedError, activation,
                              backbone_export_problems, backbone_params, block_from_datong,
                              finish, layers_of, need, norm, put_block, take_block)
from datong.hf.safetensors import read_checkpoint
from datong.unimodal.text import BERT, TextConfig, TextEncoder

ARCHITECTURES = ("BertForMaskedLM", "BertForPreTraining", "BertModel")

_LAYER = {"q": "attention.self.query", "k": "attention.self.key",
          "v": "attention.self.value", "o": "attention.output.dense",
          "ln1": "attention.output.LayerNorm", "fc1": "intermediate.dense",
          "fc2": "output.dense", "ln2": "output.LayerNorm"}


def bert_config(config: Mapping, *, nsp: bool = False, mlm_head: bool = True,
                **backbone_overrides) -> TextConfig:
  arch = "BERT"
  need(config, arch, "position_embedding_type", "absolute", "absolute")
  need(config, arch, "is_decoder", False, False)
  need(config, arch, "add_cross_attention", False, False)
  act = activation(config, arch)
  if act != "gelu" and mlm_head:
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


def _encoder_params(cfg: TextConfig, state: State, prefix: str) -> dict:
  """The shared ``encoder`` tree from HF's ``{prefix}embeddings`` / ``encoder``."""
  bb = cfg.backbone
  d = bb.width
  layers = [take_block(state, f"{prefix}encoder.layer.{i}.", _LAYER, bb)
            for i in range(bb.depth)]
  e = f"{prefix}embeddings."
  encoder = {
      "embed": {"embedding": state.take(f"{e}word_embeddings.weight", (cfg.vocab_size, d)),
                "pos_embedding": state.take(f"{e}position_embeddings.weight", (cfg.max_length, d))},
      "embed_norm": norm(state.take(f"{e}LayerNorm.weight"), state.take(f"{e}LayerNorm.bias")),
      "backbone": backbone_params(layers, bb),
  }
  if cfg.type_vocab_size:
    encoder["type_embed"] = {"embedding": state.take(f"{e}token_type_embeddings.weight",
                                                     (cfg.type_vocab_size, d))}
  return encoder


def _pooler(state: State, prefix: str) -> dict:
  return {"kernel": state.take(f"{prefix}pooler.dense.weight").T,
          "bias": state.take(f"{prefix}pooler.dense.bias")}


def bert_params(cfg: TextConfig, state: State) -> dict:
  d = cfg.backbone.width
  encoder = _encoder_params(cfg, state, "bert.")
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
    params["pooler"] = _pooler(state, "bert.")
    params["nsp_head"] = {"kernel": state.take("cls.seq_relationship.weight").T,
                          "bias": state.take("cls.seq_relationship.bias")}
  return params


def _architecture(config: Mapping) -> str:
  return (config.get("architectures") or ["BertForMaskedLM"])[0]


def load(config: Mapping, state: State, **backbone_overrides):
  """``(BERT, params)``, or ``(TextEncoder, params)`` for ``BertModel``.

  The NSP head is loaded for ``BertForPreTraining`` and for any checkpoint
  that has it (nothing in the file is dropped).
  """
  arch = _architecture(config)
  if arch == "BertModel":
    return _load_headless(config, state, **backbone_overrides)
  nsp = arch == "BertForPreTraining" or (state.has("bert.pooler.dense.weight")
                                         and state.has("cls.seq_relationship.weight"))
  cfg = bert_config(config, nsp=nsp, **backbone_overrides)
  model = BERT(cfg)
  params = bert_params(cfg, state)
  return model, finish(model, params, (jnp.zeros((1, 2), jnp.int32),), state)


def _load_headless(config: Mapping, state: State, **backbone_overrides):
  """``BertModel`` -> ``TextEncoder``: bidirectional, pooler iff the file has one."""
  # A BertModel saved out of a BertFor* model keeps the ``bert.`` prefix.
  prefix = "bert." if any(k.startswith("bert.") for k in state.tensors) else ""
  cfg = bert_config(config, mlm_head=False, **backbone_overrides)
  pooler = state.has(f"{prefix}pooler.dense.weight")
  model = TextEncoder(cfg, causal=False, pooler=pooler)
  params = {"encoder": _encoder_params(cfg, state, prefix)}
  if pooler:
    params["pooler"] = _pooler(state, prefix)
  return model, finish(model, params, (jnp.zeros((1, 2), jnp.int32),), state)


def load_bert(path: str, **backbone_overrides):
  """``(BERT, params)`` from a ``BertForMaskedLM`` / ``BertForPreTraining`` directory,
  ``(TextEncoder, params)`` from a ``BertModel`` one."""
  config, tensors = read_checkpoint(path)
  return load(config, State(tensors, _architecture(config)), **backbone_overrides)


EXPORTS = (BERT, TextEncoder)


def export(model, params) -> tuple[dict, dict]:
  """``(config.json dict, state dict)`` in the hub's spelling: ``BERT`` ->
  ``BertForMaskedLM`` (``BertForPreTraining`` with ``nsp``), ``TextEncoder``
  -> ``BertModel`` (with its pooler when it has one)."""
  cfg = model.config
  bb = cfg.backbone
  headless = isinstance(model, TextEncoder)
  problems = backbone_export_problems(bb, norm_position="post")
  if cfg.positions != "learned":
    problems.append(f"TextConfig.positions={cfg.positions!r} (BERT has learned positions)")
  if headless and model.causal:
    problems.append("TextEncoder.causal=True (BERT attends both ways)")
  if not headless and bb.activation != "gelu":
    # HF's MLM transform uses hidden_act; Datong's always uses exact gelu.
    problems.append(f"TransformerConfig.activation={bb.activation!r} (Datong's MLM head uses "
                    "exact gelu, HF's the block activation: only 'gelu' agrees)")
  if problems:
    raise UnsupportedError("BERT export: " + "; ".join(problems))
  prefix = "" if headless else "bert."
  enc = params["encoder"]
  d = bb.width
  e = f"{prefix}embeddings."
  # HF's BERT always adds a token-type embedding: a zero row is exact.
  types = (np.asarray(enc["type_embed"]["embedding"]) if cfg.type_vocab_size
           else np.zeros((1, d), np.float32))
  state = {f"{e}word_embeddings.weight": enc["embed"]["embedding"],
           f"{e}position_embeddings.weight": enc["embed"]["pos_embedding"],
           f"{e}token_type_embeddings.weight": types,
           f"{e}LayerNorm.weight": enc["embed_norm"]["norm"]["scale"],
           f"{e}LayerNorm.bias": enc["embed_norm"]["norm"]["bias"]}
  for i, layer in enumerate(layers_of(enc["backbone"], bb)):
    put_block(state, block_from_datong(layer, bb), f"{prefix}encoder.layer.{i}.", _LAYER)
  pooler = ("pooler" in params) if headless else cfg.nsp
  if pooler:
    state[f"{prefix}pooler.dense.weight"] = np.asarray(params["pooler"]["kernel"]).T
    state[f"{prefix}pooler.dense.bias"] = params["pooler"]["bias"]
  if headless:
    arch = "BertModel"
  else:
    t = "cls.predictions."
    state[f"{t}transform.dense.weight"] = np.asarray(params["mlm_dense"]["kernel"]).T
    state[f"{t}transform.dense.bias"] = params["mlm_dense"]["bias"]
    state[f"{t}transform.LayerNorm.weight"] = params["mlm_norm"]["norm"]["scale"]
    state[f"{t}transform.LayerNorm.bias"] = params["mlm_norm"]["norm"]["bias"]
    state[f"{t}bias"] = params["mlm_bias"]
    if not cfg.tie_embeddings:
      state[f"{t}decoder.weight"] = np.asarray(params["head"]["kernel"]).T
    if cfg.nsp:
      state["cls.seq_relationship.weight"] = np.asarray(params["nsp_head"]["kernel"]).T
      state["cls.seq_relationship.bias"] = params["nsp_head"]["bias"]
    arch = "BertForPreTraining" if cfg.nsp else "BertForMaskedLM"
  config = {
      "architectures": [arch], "model_type": "bert", "vocab_size": cfg.vocab_size,
      "hidden_size": d, "num_hidden_layers": bb.depth, "num_attention_heads": bb.heads,
      "intermediate_size": bb.mlp_dim, "hidden_act": ACTIVATIONS_OUT[bb.activation],
      "max_position_embeddings": cfg.max_length, "type_vocab_size": max(cfg.type_vocab_size, 1),
      "layer_norm_eps": bb.norm_eps, "initializer_range": cfg.embed_init_std,
      "hidden_dropout_prob": bb.dropout, "attention_probs_dropout_prob": bb.attention_dropout,
      "position_embedding_type": "absolute", "is_decoder": False, "add_cross_attention": False,
      "tie_word_embeddings": cfg.tie_embeddings, "pad_token_id": 0,
  }
  return config, state

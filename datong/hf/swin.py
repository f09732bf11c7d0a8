"""Swin and Swin V2 (``Swin[v2]ForImageClassification``, ``Swin[v2]Model``)
<-> Datong ``ImageClassifier(SwinConfig)`` / ``SwinEncoder``.

Datong takes images ``[batch, h, w, c]``: transpose HF's NCHW pixel values.
``hidden_states[k]`` of HF is ``aux["hidden_states"][k]`` (the stem output,
then every stage's output after its merging); ``last_hidden_state`` is
``aux["encoded"]`` and ``pooler_output`` the pooled features.

transformers >= 5 keeps V1's attention and MLP under other names in memory
(``attention.q_proj``, ``mlp.fc1``, ...) than it writes with
``save_pretrained`` (``attention.self.query``, ``intermediate.dense``, ...,
the names of the published checkpoints); both spellings load, export writes
the published one.

Not reproduced (``UnsupportedError``): a V1 stage whose grid is smaller
than the window (HF keeps the full-window table and cannot run it either),
a V2 whose window rule (HF decides per stage from the configured height only)
differs from Datong's at the configured size, V2 with absolute position
embeddings (HF's table has one row too many), images not divisible by the
patch (HF pads them), ``layer_norm_eps`` other than 1e-5 (HF's stem and
merging norms always use 1e-5), and non-integer ``mlp_ratio``.
"""

from __future__ import annotations

from typing import Mapping

import jax.numpy as jnp
import numpy as np

from datong.hf.common import (ACTIVATIONS_OUT, State, UnsupportedError, activation,
                              block_from_datong, block_to_datong, finish, norm,
                              patch_kernel_from_datong, patch_kernel_to_datong, put_block)
from datong.ops.patches import pair
from datong.ops.windows import stage_window
from datong.unimodal.encoders import ImageClassifier
from datong.unimodal.swin import SwinConfig, SwinEncoder, swin_backbone

ARCHITECTURES = ("SwinForImageClassification", "SwinModel", "Swinv2ForImageClassification",
                 "Swinv2Model")
EXPORTS = (ImageClassifier,)
EXPORT_CONFIGS = (SwinConfig,)

LAYER = {"q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
         "o": "attention.output.dense", "ln1": "layernorm_before", "fc1": "intermediate.dense",
         "fc2": "output.dense", "ln2": "layernorm_after"}
# transformers >= 5 in-memory names of V1 -> the published (save_pretrained) ones.
_V1_RENAMES = (("attention.q_proj.", "attention.self.query."),
               ("attention.k_proj.", "attention.self.key."),
               ("attention.v_proj.", "attention.self.value."),
               ("attention.o_proj.", "attention.output.dense."),
               ("attention.relative_position_bias.relative_position_bias_table",
                "attention.self.relative_position_bias_table"),
               ("mlp.fc1.", "intermediate.dense."), ("mlp.fc2.", "output.dense."))


def canonical_names(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """State-dict names of either spelling -> the published one."""
  out = {}
  for key, value in tensors.items():
    for old, new in _V1_RENAMES:
      key = key.replace(old, new)
    out[key] = value
  return out


def _hf_v2_windows(config: SwinConfig) -> list[tuple[int, int]]:
  """(window, shift of odd layers) per stage as HF's Swin V2 decides them: from
  the configured grid ``(gh // 2**s, gw // 2**s)``, by its height alone."""
  gh, gw = config.grid
  out = []
  for s in range(config.num_stages):
    rh = gh // 2 ** s
    window = min(rh, config.window_size)
    out.append((window, 0 if rh <= window else config.window_size // 2))
  return out


def _datong_windows(config: SwinConfig) -> list[tuple[int, int]]:
  return [stage_window(g, config.window_size, config.window_size // 2)
          for g in config.stage_grids()]


def reproduction_problems(config: SwinConfig) -> list[str]:
  """What about ``config`` HF's Swin (V1 or V2) would compute differently."""
  problems = []
  if config.version == 1:
    for s, g in enumerate(config.stage_grids()):
      if min(g) < config.window_size:
        problems.append(f"stage {s} grid {g} is smaller than window_size={config.window_size} "
                        "(HF's SwinModel keeps the full-window bias table and cannot run it)")
  else:
    if _hf_v2_windows(config) != _datong_windows(config):
      problems.append(f"HF Swin V2 picks (window, shift) per stage {_hf_v2_windows(config)} "
                      f"from the configured height; Datong {_datong_windows(config)}")
    gh, gw = config.grid
    if [(gh >> s, gw >> s) for s in range(config.num_stages)] != config.stage_grids():
      problems.append(f"grid {config.grid} halves unevenly (HF V2 floors the stage sizes)")
  if config.version == 2 and config.absolute_posemb:
    problems.append("use_absolute_embeddings=True with Swin V2 (HF's V2 table has one row "
                    "more than there are patches and cannot run)")
  if config.backbone.norm_eps != 1e-5:
    problems.append(f"layer_norm_eps={config.backbone.norm_eps} (HF's stem and merging norms "
                    "use 1e-5)")
  return problems


def swin_config(config: Mapping, arch: str, **backbone_overrides) -> SwinConfig:
  version = 2 if config.get("model_type") == "swinv2" or arch.startswith("Swinv2") else 1
  dim, depths, heads = config["embed_dim"], tuple(config["depths"]), tuple(config["num_heads"])
  ratio = config.get("mlp_ratio", 4.0)
  if float(ratio) != int(ratio):
    raise UnsupportedError(f"{arch}: config option mlp_ratio={ratio} (Datong needs an integer)")
  bb = swin_backbone(dim, depths, heads, version=version, mlp_ratio=int(ratio),
                     activation=activation(config, arch),
                     norm_eps=config.get("layer_norm_eps", 1e-5),
                     init_std=config.get("initializer_range", 0.02), **backbone_overrides)
  pretrained = tuple(config.get("pretrained_window_sizes") or ()) if version == 2 else ()
  cfg = SwinConfig(bb, depths=depths, heads=heads, window_size=config.get("window_size", 7),
                   image_size=pair(config.get("image_size", 224)),
                   patch_size=pair(config.get("patch_size", 4)),
                   channels=config.get("num_channels", 3), version=version,
                   absolute_posemb=bool(config.get("use_absolute_embeddings", False)),
                   pretrained_window_sizes=pretrained if any(pretrained) else ())
  problems = reproduction_problems(cfg)
  if problems:
    raise UnsupportedError(f"{arch}: " + "; ".join(problems))
  return cfg


def swin_encoder_params(cfg: SwinConfig, state: State, prefix: str, *, qkv_bias=True) -> dict:
  """``SwinEncoder`` params from HF's ``{prefix}embeddings`` / ``encoder`` / ``layernorm``."""
  d = cfg.backbone.width
  e = f"{prefix}embeddings."
  out = {
      "patch_embedding": {
          "kernel": patch_kernel_to_datong(state.take(
              f"{e}patch_embeddings.projection.weight", (d, cfg.channels) + cfg.patch_size)),
          "bias": state.take(f"{e}patch_embeddings.projection.bias")},
      "stem_norm": norm(state.take(f"{e}norm.weight"), state.take(f"{e}norm.bias")),
      "final_norm": norm(state.take(f"{prefix}layernorm.weight"),
                         state.take(f"{prefix}layernorm.bias")),
  }
  if cfg.absolute_posemb:
    out["pos_embedding"] = state.take(f"{e}position_embeddings", (1, cfg.num_patches, d))[0]
  for s in range(cfg.num_stages):
    bb = cfg.stage_backbone(s)
    stage = {}
    for i in range(cfg.depths[s]):
      p = f"{prefix}encoder.layers.{s}.blocks.{i}."
      c = {}
      for canon, name in LAYER.items():
        c[f"{canon}_w"] = state.take(f"{p}{name}.weight")
        if canon in "qkv" and (not qkv_bias or (canon == "k" and cfg.version == 2)):
          c[f"{canon}_b"] = np.zeros(c[f"{canon}_w"].shape[0], np.float32)
        else:
          c[f"{canon}_b"] = state.take(f"{p}{name}.bias")
      block = block_to_datong(c, bb)
      a = f"{p}attention.self."
      if cfg.version == 1:
        block["attention_bias"] = {"table": state.take(f"{a}relative_position_bias_table")}
      else:
        del block["attention"]["key"]["bias"]
        block["attention"]["logit_scale"] = state.take(f"{a}logit_scale", (bb.heads, 1, 1)).reshape(-1)
        m = f"{a}continuous_position_bias_mlp."
        block["attention_bias"] = {
            "hidden": {"kernel": state.take(f"{m}0.weight").T, "bias": state.take(f"{m}0.bias")},
            "out": {"kernel": state.take(f"{m}2.weight").T}}
      stage[f"layer_{i}"] = block
    if s + 1 < cfg.num_stages:
      down = f"{prefix}encoder.layers.{s}.downsample."
      stage["reduction"] = {"kernel": state.take(f"{down}reduction.weight").T}
      stage["norm"] = norm(state.take(f"{down}norm.weight"), state.take(f"{down}norm.bias"))
    out[f"stage_{s}"] = stage
  return out


def load(config: Mapping, state: State, **backbone_overrides):
  """``(ImageClassifier | SwinEncoder, params)`` from a Swin / Swin V2 config and tensors."""
  arch = state.arch
  state = State(canonical_names(state.tensors), arch)
  cfg = swin_config(config, arch, **backbone_overrides)
  base = "swinv2" if cfg.version == 2 else "swin"
  images = jnp.zeros((1,) + cfg.image_size + (cfg.channels,), jnp.float32)
  qkv_bias = config.get("qkv_bias", True)
  if arch.endswith("Model"):
    # A bare model is saved with or without its base prefix.
    prefix = f"{base}." if state.has(f"{base}.layernorm.weight") else ""
    model = SwinEncoder(cfg)
    params = swin_encoder_params(cfg, state, prefix, qkv_bias=qkv_bias)
    return model, finish(model, params, (images,), state)
  n = len(config["id2label"]) if "id2label" in config else int(config.get("num_labels", 2))
  model = ImageClassifier(cfg, n)
  params = {"encoder": swin_encoder_params(cfg, state, f"{base}.", qkv_bias=qkv_bias),
            "head": {"kernel": state.take("classifier.weight").T,
                     "bias": state.take("classifier.bias")}}
  return model, finish(model, params, (images,), state)


def export(model: ImageClassifier, params) -> tuple[dict, dict]:
  """``(config.json dict, state dict)`` of ``Swin[v2]ForImageClassification``."""
  cfg = model.config
  bb = cfg.backbone
  problems = reproduction_problems(cfg)
  if cfg.mask_token:
    problems.append("SwinConfig.mask_token=True (the HF classifier has no mask token)")
  if bb.activation not in ACTIVATIONS_OUT:
    problems.append(f"TransformerConfig.activation={bb.activation!r}")
  if bb.norm != "layernorm" or not bb.use_bias:
    problems.append("TransformerConfig.norm / use_bias (HF has LayerNorm and biases)")
  if problems:
    raise UnsupportedError("Swin export: " + "; ".join(problems))
  v2 = cfg.version == 2
  base = "swinv2." if v2 else "swin."
  enc = params["encoder"]
  e = f"{base}embeddings."
  state = {
      f"{e}patch_embeddings.projection.weight": patch_kernel_from_datong(
          enc["patch_embedding"]["kernel"], cfg.patch_size, cfg.channels),
      f"{e}patch_embeddings.projection.bias": enc["patch_embedding"]["bias"],
      f"{e}norm.weight": enc["stem_norm"]["norm"]["scale"],
      f"{e}norm.bias": enc["stem_norm"]["norm"]["bias"],
      f"{base}layernorm.weight": enc["final_norm"]["norm"]["scale"],
      f"{base}layernorm.bias": enc["final_norm"]["norm"]["bias"],
      "classifier.weight": np.asarray(params["head"]["kernel"]).T,
      "classifier.bias": params["head"]["bias"],
  }
  if cfg.absolute_posemb:
    state[f"{e}position_embeddings"] = np.asarray(enc["pos_embedding"])[None]
  for s in range(cfg.num_stages):
    bb_s = cfg.stage_backbone(s)
    stage = enc[f"stage_{s}"]
    for i in range(cfg.depths[s]):
      p = f"{base}encoder.layers.{s}.blocks.{i}."
      layer = stage[f"layer_{i}"]
      if v2:  # block_from_datong expects a key bias; V2 has none (and writes none)
        layer = {**layer, "attention": {**layer["attention"], "key": {
            "kernel": layer["attention"]["key"]["kernel"],
            "bias": np.zeros(bb_s.width, np.float32)}}}
      put_block(state, block_from_datong(layer, bb_s), p, LAYER)
      a = f"{p}attention.self."
      if v2:
        del state[f"{a}key.bias"]
        state[f"{a}logit_scale"] = np.asarray(layer["attention"]["logit_scale"]).reshape(-1, 1, 1)
        m = f"{a}continuous_position_bias_mlp."
        state[f"{m}0.weight"] = np.asarray(layer["attention_bias"]["hidden"]["kernel"]).T
        state[f"{m}0.bias"] = layer["attention_bias"]["hidden"]["bias"]
        state[f"{m}2.weight"] = np.asarray(layer["attention_bias"]["out"]["kernel"]).T
      else:
        state[f"{a}relative_position_bias_table"] = layer["attention_bias"]["table"]
    if s + 1 < cfg.num_stages:
      down = f"{base}encoder.layers.{s}.downsample."
      state[f"{down}reduction.weight"] = np.asarray(stage["reduction"]["kernel"]).T
      state[f"{down}norm.weight"] = stage["norm"]["norm"]["scale"]
      state[f"{down}norm.bias"] = stage["norm"]["norm"]["bias"]
  size = lambda p: p[0] if p[0] == p[1] else list(p)
  n = model.num_classes
  config = {
      "architectures": ["Swinv2ForImageClassification" if v2 else "SwinForImageClassification"],
      "model_type": "swinv2" if v2 else "swin",
      "embed_dim": bb.width, "depths": list(cfg.depths), "num_heads": list(cfg.heads),
      "window_size": cfg.window_size, "mlp_ratio": float(bb.mlp_dim // bb.width),
      "qkv_bias": True, "hidden_act": ACTIVATIONS_OUT[bb.activation],
      "layer_norm_eps": bb.norm_eps, "image_size": size(cfg.image_size),
      "patch_size": size(cfg.patch_size), "num_channels": cfg.channels,
      "use_absolute_embeddings": cfg.absolute_posemb, "hidden_dropout_prob": bb.dropout,
      "attention_probs_dropout_prob": bb.attention_dropout,
      "drop_path_rate": bb.stochastic_depth, "initializer_range": bb.init_std,
      "id2label": {str(i): f"LABEL_{i}" for i in range(n)},
      "label2id": {f"LABEL_{i}": i for i in range(n)},
  }
  if v2:
    config["pretrained_window_sizes"] = list(cfg.pretrained_window_sizes or (0,) * cfg.num_stages)
  return config, state

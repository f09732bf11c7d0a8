"""Hugging Face checkpoints <-> Datong models, without torch.

Reads a local Hugging Face model directory (``config.json`` +
``model.safetensors``, or shards listed in ``model.safetensors.index.json``),
maps the config to Datong's config dataclasses, converts the weights and
returns the Datong model with its ``params`` collection::

    model, params = datong.hf.load("path/to/gpt2")
    logits, aux = model.apply({"params": params}, ids)

Supported ``architectures`` (the first entry of ``config.json``'s list):

* ``GPT2LMHeadModel``, ``GPT2Model`` -> ``GPT`` (learned positions, pre-LN,
  tied or untied head);
* ``BertForMaskedLM`` -> ``BERT``; ``BertForPreTraining`` -> ``BERT`` with
  ``nsp=True`` (pooler + next-sentence head);
* ``ViTForImageClassification`` -> ``ViTClassifier`` (images NHWC: transpose
  HF's NCHW pixel values);
* ``ViTMAEForPreTraining`` -> ``MAE``; ``mae_masking(noise, ratio)``
  reproduces HF's masking from its explicit ``noise``;
* ``CLIPModel`` -> ``CLIP`` (both towers, projections, logit scale);
  ``load_clip_text`` loads the text tower alone.

Anything else, and any config option Datong cannot reproduce exactly, raises
``UnsupportedError`` naming it; checkpoint tensors the conversion does not
use are an error too, so nothing is dropped silently.

``save(model, params, path)`` writes the HF format back (``GPT`` ->
``GPT2LMHeadModel``, ``ViTClassifier`` -> ``ViTForImageClassification``), so
``transformers.AutoModel*.from_pretrained(path)`` loads a Datong-trained model.

Layout notes (why the conversion is not a plain rename):

* HF ``nn.Linear`` stores ``[out, in]``; GPT-2's ``Conv1D`` stores ``[in, out]``
  with q/k/v fused in ``c_attn``. Datong's attention kernels are ``[embed,
  heads, head_dim]`` (out: ``[heads, head_dim, embed]``).
* HF ViT/CLIP/MAE add a position embedding to the [CLS] token; Datong's
  position table covers patches only, so ``cls = cls_token + pos[0]`` (exact:
  HF adds the same two float32 numbers). Export writes ``pos[0] = 0``.
* Conv patch kernels ``[width, c, ph, pw]`` become the stem's dense kernel
  ``[ph * pw * c, width]`` in ``ops.patchify`` order; missing biases (CLIP's
  conv, ``qkv_bias=False``) are loaded as zeros, which is exact.
* Dropout rates are not carried over (Datong applies dropout at other
  places); pass ``dropout=...`` through ``backbone_overrides`` to fine-tune.

No torch is needed: the safetensors format (8-byte little-endian header size,
JSON header, raw little-endian buffers) is read and written here with numpy.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from typing import Any, Callable, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from datong.backbone import TransformerConfig
from datong.unimodal.masked_image import MAE, MAEConfig, Masking
from datong.unimodal.text import BERT, GPT, TextConfig
from datong.unimodal.vision import ViTClassifier, ViTConfig

__all__ = [
    "UnsupportedError", "load", "load_gpt2", "load_bert", "load_vit", "load_vit_mae",
    "load_clip", "load_clip_text", "mae_masking", "save", "read_checkpoint",
    "read_safetensors", "write_safetensors", "SUPPORTED",
]


class UnsupportedError(NotImplementedError):
  """A checkpoint's architecture or config option Datong cannot reproduce."""


# ---------------------------------------------------------------- safetensors

_DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype("<i8"), "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"), "I8": np.dtype("i1"), "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}
_NAMES = {v: k for k, v in _DTYPES.items()}


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """All tensors of one ``.safetensors`` file as numpy arrays (copies)."""
  with open(path, "rb") as f:
    (size,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(size))
    data = f.read()
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    if info["dtype"] not in _DTYPES:
      raise UnsupportedError(f"{path}: tensor {name} has dtype {info['dtype']}; "
                             f"supported: {sorted(_DTYPES)}")
    start, end = info["data_offsets"]
    arr = np.frombuffer(data[start:end], dtype=_DTYPES[info["dtype"]])
    out[name] = arr.reshape(info["shape"]).copy()
  return out


def write_safetensors(path: str, tensors: Mapping[str, Any],
                      metadata: Optional[Mapping[str, str]] = None):
  """Write ``tensors`` (name -> array) as one ``.safetensors`` file."""
  header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
  buffers, offset = [], 0
  for name in sorted(tensors):
    arr = np.asarray(tensors[name])  # (ascontiguousarray would make scalars 1-D)
    if arr.dtype not in _NAMES:
      raise ValueError(f"tensor {name}: dtype {arr.dtype} cannot be written to safetensors")
    raw = arr.astype(arr.dtype.newbyteorder("<")).tobytes()
    header[name] = {"dtype": _NAMES[arr.dtype], "shape": list(arr.shape),
                    "data_offsets": [offset, offset + len(raw)]}
    buffers.append(raw)
    offset += len(raw)
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)  # buffers start 8-byte aligned
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for raw in buffers:
      f.write(raw)


def read_checkpoint(path: str) -> tuple[dict, dict[str, np.ndarray]]:
  """``(config dict, state dict)`` of a local HF model directory."""
  config_file = os.path.join(path, "config.json")
  if not os.path.isfile(config_file):
    raise FileNotFoundError(f"{path}: no config.json (expected a Hugging Face model directory)")
  with open(config_file) as f:
    config = json.load(f)
  single = os.path.join(path, "model.safetensors")
  index = os.path.join(path, "model.safetensors.index.json")
  if os.path.isfile(single):
    return config, read_safetensors(single)
  if os.path.isfile(index):
    with open(index) as f:
      weight_map = json.load(f)["weight_map"]
    state = {}
    for shard in sorted(set(weight_map.values())):
      state.update(read_safetensors(os.path.join(path, shard)))
    missing = sorted(set(weight_map) - set(state))
    if missing:
      raise ValueError(f"{path}: the index lists tensors no shard holds: {missing[:5]}")
    return config, state
  if any(n.endswith((".bin", ".pt", ".pth")) for n in os.listdir(path)):
    raise UnsupportedError(
        f"{path}: only pickled PyTorch weights found; Datong reads safetensors only "
        "(re-save with model.save_pretrained(path, safe_serialization=True)).")
  raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")


class _State:
  """A state dict that remembers which tensors were taken (strict loading)."""

  # Buffers that are not weights (older transformers versions saved them).
  IGNORED = (".attn.bias", ".attn.masked_bias", "position_ids")

  def __init__(self, tensors: Mapping[str, np.ndarray], arch: str):
    self.arch = arch
    self.tensors = {}
    for k, v in tensors.items():
      # Old BERT checkpoints name LayerNorm parameters gamma / beta.
      k = k.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
      self.tensors[k] = np.asarray(v)
    self.used: set[str] = set()

  def has(self, key):
    return key in self.tensors

  def take(self, key, shape=None) -> np.ndarray:
    if key not in self.tensors:
      raise KeyError(f"{self.arch} checkpoint has no tensor {key!r}")
    self.used.add(key)
    arr = self.tensors[key].astype(np.float32)
    if shape is not None and tuple(arr.shape) != tuple(shape):
      raise ValueError(f"{self.arch}: tensor {key} has shape {arr.shape}, expected {tuple(shape)}")
    return arr

  def take_opt(self, key, default):
    return self.take(key) if key in self.tensors else default

  def finish(self):
    left = sorted(k for k in self.tensors
                  if k not in self.used and not any(k.endswith(s) for s in self.IGNORED))
    if left:
      raise UnsupportedError(f"{self.arch}: checkpoint tensors Datong has no place for: "
                             f"{left[:8]}{' ...' if len(left) > 8 else ''}")


def _need(config: Mapping, arch: str, key: str, allowed, default=None):
  value = config.get(key, default)
  ok = value in allowed if isinstance(allowed, (tuple, list, set)) else value == allowed
  if not ok:
    raise UnsupportedError(f"{arch}: config option {key}={value!r} is not supported "
                           f"(Datong reproduces {allowed!r}).")
  return value


_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                "quick_gelu": "quick_gelu", "relu": "relu"}
_ACTIVATIONS_OUT = {"gelu": "gelu", "gelu_tanh": "gelu_new", "quick_gelu": "quick_gelu",
                    "relu": "relu"}


def _activation(config, arch, key="hidden_act"):
  act = config.get(key, "gelu")
  if act not in _ACTIVATIONS:
    raise UnsupportedError(f"{arch}: config option {key}={act!r} is not supported; "
                           f"Datong has {sorted(_ACTIVATIONS)}.")
  return _ACTIVATIONS[act]


# --------------------------------------------------------- shared block math
#
# A "canonical" layer is a dict of torch-layout arrays: q/k/v/o and fc1/fc2
# weights as nn.Linear ``[out, in]`` with biases, ln1/ln2 weight and bias.
# ln1 is the norm of the attention branch (before it for pre-LN, after the
# residual add for post-LN), ln2 that of the MLP branch; Datong names them
# attention_norm / mlp_norm in both cases.

def _norm(w, b):
  return {"norm": {"scale": w, "bias": b}}


def _block_to_datong(c: Mapping[str, np.ndarray], cfg: TransformerConfig) -> dict:
  d, h, hd = cfg.width, cfg.heads, cfg.resolved_head_dim

  def qkv(name):
    return {"kernel": c[f"{name}_w"].T.reshape(d, h, hd), "bias": c[f"{name}_b"].reshape(h, hd)}

  return {
      "attention": {"query": qkv("q"), "key": qkv("k"), "value": qkv("v"),
                    "out": {"kernel": c["o_w"].T.reshape(h, hd, d), "bias": c["o_b"]}},
      "attention_norm": _norm(c["ln1_w"], c["ln1_b"]),
      "mlp": {"wi": {"kernel": c["fc1_w"].T, "bias": c["fc1_b"]},
              "wo": {"kernel": c["fc2_w"].T, "bias": c["fc2_b"]}},
      "mlp_norm": _norm(c["ln2_w"], c["ln2_b"]),
  }


def _block_from_datong(p: Mapping[str, Any], cfg: TransformerConfig) -> dict[str, np.ndarray]:
  d = cfg.width
  a = p["attention"]
  out = {}
  for name, key in (("q", "query"), ("k", "key"), ("v", "value")):
    out[f"{name}_w"] = np.asarray(a[key]["kernel"]).reshape(d, -1).T
    out[f"{name}_b"] = np.asarray(a[key]["bias"]).reshape(-1)
  out["o_w"] = np.asarray(a["out"]["kernel"]).reshape(-1, d).T
  out["o_b"] = np.asarray(a["out"]["bias"])
  out["fc1_w"] = np.asarray(p["mlp"]["wi"]["kernel"]).T
  out["fc1_b"] = np.asarray(p["mlp"]["wi"]["bias"])
  out["fc2_w"] = np.asarray(p["mlp"]["wo"]["kernel"]).T
  out["fc2_b"] = np.asarray(p["mlp"]["wo"]["bias"])
  for ln, key in (("ln1", "attention_norm"), ("ln2", "mlp_norm")):
    out[f"{ln}_w"] = np.asarray(p[key]["norm"]["scale"])
    out[f"{ln}_b"] = np.asarray(p[key]["norm"]["bias"])
  return out


def _take_block(state: _State, prefix: str, names: Mapping[str, str], cfg: TransformerConfig,
                *, zero_qkv_bias: bool = False) -> dict:
  """Read one layer with HF module ``names`` (canonical -> HF submodule)."""
  c = {}
  for canon, hf in names.items():
    c[f"{canon}_w"] = state.take(f"{prefix}{hf}.weight")
    bias_key = f"{prefix}{hf}.bias"
    if canon in ("q", "k", "v") and zero_qkv_bias and not state.has(bias_key):
      c[f"{canon}_b"] = np.zeros(c[f"{canon}_w"].shape[0], np.float32)
    else:
      c[f"{canon}_b"] = state.take(bias_key)
  return _block_to_datong(c, cfg)


def _backbone(layers: list[dict], cfg: TransformerConfig, final_norm=None) -> dict:
  """Per-layer dicts -> the backbone's params (stacked under ``layers`` when scanned)."""
  if cfg.scan_layers:
    out = {"layers": jax.tree.map(lambda *xs: np.stack(xs), *layers)}
  else:
    out = {f"layer_{i}": layer for i, layer in enumerate(layers)}
  if final_norm is not None:
    out["final_norm"] = _norm(*final_norm)
  return out


def _layers_of(backbone_params: Mapping[str, Any], cfg: TransformerConfig) -> list[dict]:
  if "layers" in backbone_params:
    stacked = backbone_params["layers"]
    return [jax.tree.map(lambda x, i=i: np.asarray(x)[i], stacked) for i in range(cfg.depth)]
  return [backbone_params[f"layer_{i}"] for i in range(cfg.depth)]


def _patch_kernel_to_datong(w: np.ndarray) -> np.ndarray:
  """Conv ``[width, c, ph, pw]`` -> dense ``[ph * pw * c, width]`` (patchify order)."""
  width = w.shape[0]
  return w.transpose(2, 3, 1, 0).reshape(-1, width)


def _patch_kernel_from_datong(k: np.ndarray, patch, channels: int) -> np.ndarray:
  ph, pw = patch
  return np.asarray(k).reshape(ph, pw, channels, -1).transpose(3, 2, 0, 1)


def _finish(model: nn.Module, params: dict, example_args: tuple, state: _State):
  """Check the converted tree against the model's own (names and shapes)."""
  state.finish()
  expected = jax.eval_shape(lambda: nn.unbox(
      model.init(jax.random.PRNGKey(0), *example_args)["params"]))
  want = {jax.tree_util.keystr(p): v.shape for p, v in
          jax.tree_util.tree_flatten_with_path(expected)[0]}
  got = {jax.tree_util.keystr(p): np.shape(v) for p, v in
         jax.tree_util.tree_flatten_with_path(params)[0]}
  if want != got:
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    shapes = sorted(k for k in set(want) & set(got) if want[k] != got[k])
    raise ValueError(f"{state.arch}: converted params do not match {type(model).__name__}'s "
                     f"layout; missing {missing[:5]}, unexpected {extra[:5]}, "
                     f"wrong shapes {[(k, got[k], want[k]) for k in shapes[:5]]}. "
                     "Did a Datong module rename a parameter?")
  dtype = _param_dtype(model)
  return jax.tree.map(lambda x: jnp.asarray(x, dtype), params)


def _param_dtype(model: nn.Module):
  """The ``param_dtype`` of the first backbone config found in ``model.config``."""
  todo = [model.config]
  while todo:
    cfg = todo.pop(0)
    if isinstance(cfg, TransformerConfig):
      return cfg.params_dtype
    if dataclasses.is_dataclass(cfg):
      todo += [getattr(cfg, f.name) for f in dataclasses.fields(cfg)]
  return jnp.float32


# ------------------------------------------------------------------- GPT-2

def gpt2_config(config: Mapping, **backbone_overrides) -> TextConfig:
  arch = "GPT-2"
  _need(config, arch, "scale_attn_weights", True, True)
  _need(config, arch, "scale_attn_by_inverse_layer_idx", False, False)
  _need(config, arch, "add_cross_attention", False, False)
  width = config["n_embd"]
  bb = TransformerConfig(
      width=width, depth=config["n_layer"], heads=config["n_head"],
      mlp_dim=config.get("n_inner") or 4 * width,
      activation=_activation(config, arch, "activation_function"),
      norm_position="pre", norm_eps=config.get("layer_norm_epsilon", 1e-5),
      kernel_init="normal", init_std=config.get("initializer_range", 0.02),
      **backbone_overrides)
  return TextConfig(backbone=bb, vocab_size=config["vocab_size"], positions="learned",
                    max_length=config["n_positions"],
                    tie_embeddings=config.get("tie_word_embeddings", True),
                    embed_init_std=config.get("initializer_range", 0.02))


def gpt2_params(cfg: TextConfig, state: _State) -> dict:
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
    layers.append(_block_to_datong(c, bb))
  embed = {"embedding": state.take(f"{p}wte.weight", (cfg.vocab_size, d)),
           "pos_embedding": state.take(f"{p}wpe.weight", (cfg.max_length, d))}
  params = {"encoder": {"embed": embed, "backbone": _backbone(
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


def load_gpt2(path: str, **backbone_overrides):
  """``(GPT, params)`` from a ``GPT2LMHeadModel`` / ``GPT2Model`` directory."""
  config, tensors = read_checkpoint(path)
  return _load_gpt2(config, _State(tensors, "GPT-2"), **backbone_overrides)


def _load_gpt2(config, state, **backbone_overrides):
  cfg = gpt2_config(config, **backbone_overrides)
  model = GPT(cfg)
  params = gpt2_params(cfg, state)
  return model, _finish(model, params, (jnp.zeros((1, 2), jnp.int32),), state)


def _export_gpt2(model: GPT, params) -> tuple[dict, dict]:
  cfg = model.config
  bb = cfg.backbone
  problems = []
  if cfg.positions != "learned":
    problems.append(f"TextConfig.positions={cfg.positions!r} (GPT-2 has learned positions)")
  if cfg.type_vocab_size:
    problems.append("TextConfig.type_vocab_size > 0")
  problems += _backbone_export_problems(bb, norm_position="pre")
  if problems:
    raise UnsupportedError("GPT-2 export: " + "; ".join(problems))
  enc = params["encoder"]
  d = bb.width
  state = {"transformer.wte.weight": enc["embed"]["embedding"],
           "transformer.wpe.weight": enc["embed"]["pos_embedding"],
           "transformer.ln_f.weight": enc["backbone"]["final_norm"]["norm"]["scale"],
           "transformer.ln_f.bias": enc["backbone"]["final_norm"]["norm"]["bias"]}
  for i, layer in enumerate(_layers_of(enc["backbone"], bb)):
    c = _block_from_datong(layer, bb)
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
      "activation_function": _ACTIVATIONS_OUT[bb.activation],
      "layer_norm_epsilon": bb.norm_eps, "initializer_range": cfg.embed_init_std,
      "resid_pdrop": bb.dropout, "embd_pdrop": bb.dropout, "attn_pdrop": bb.attention_dropout,
      "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
      "reorder_and_upcast_attn": False, "tie_word_embeddings": cfg.tie_embeddings,
      "use_cache": True,
  }
  return config, state


def _backbone_export_problems(bb: TransformerConfig, *, norm_position: str) -> list[str]:
  problems = []
  checks = [("norm_position", norm_position), ("norm", "layernorm"), ("use_bias", True),
            ("qk_norm", False), ("rope", False), ("cross_attention", False)]
  for field, want in checks:
    if getattr(bb, field) != want:
      problems.append(f"TransformerConfig.{field}={getattr(bb, field)!r} (needs {want!r})")
  if bb.resolved_kv_heads != bb.heads:
    problems.append(f"TransformerConfig.kv_heads={bb.kv_heads} (HF has multi-head attention)")
  if bb.resolved_head_dim * bb.heads != bb.width:
    problems.append(f"TransformerConfig.head_dim={bb.head_dim} (HF needs width // heads)")
  if bb.activation not in _ACTIVATIONS_OUT:
    problems.append(f"TransformerConfig.activation={bb.activation!r}")
  if bb.has_final_norm != (norm_position == "pre"):
    problems.append(f"TransformerConfig.final_norm={bb.final_norm!r}")
  return problems


# -------------------------------------------------------------------- BERT

_BERT_LAYER = {"q": "attention.self.query", "k": "attention.self.key",
               "v": "attention.self.value", "o": "attention.output.dense",
               "ln1": "attention.output.LayerNorm", "fc1": "intermediate.dense",
               "fc2": "output.dense", "ln2": "output.LayerNorm"}


def bert_config(config: Mapping, *, nsp: bool = False, **backbone_overrides) -> TextConfig:
  arch = "BERT"
  _need(config, arch, "position_embedding_type", "absolute", "absolute")
  _need(config, arch, "is_decoder", False, False)
  _need(config, arch, "add_cross_attention", False, False)
  act = _activation(config, arch)
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


def bert_params(cfg: TextConfig, state: _State) -> dict:
  bb = cfg.backbone
  d = bb.width
  layers = [_take_block(state, f"bert.encoder.layer.{i}.", _BERT_LAYER, bb)
            for i in range(bb.depth)]
  e = "bert.embeddings."
  encoder = {
      "embed": {"embedding": state.take(f"{e}word_embeddings.weight", (cfg.vocab_size, d)),
                "pos_embedding": state.take(f"{e}position_embeddings.weight", (cfg.max_length, d))},
      "embed_norm": _norm(state.take(f"{e}LayerNorm.weight"), state.take(f"{e}LayerNorm.bias")),
      "backbone": _backbone(layers, bb),
  }
  if cfg.type_vocab_size:
    encoder["type_embed"] = {"embedding": state.take(f"{e}token_type_embeddings.weight",
                                                     (cfg.type_vocab_size, d))}
  t = "cls.predictions."
  params = {
      "encoder": encoder,
      "mlm_dense": {"kernel": state.take(f"{t}transform.dense.weight").T,
                    "bias": state.take(f"{t}transform.dense.bias")},
      "mlm_norm": _norm(state.take(f"{t}transform.LayerNorm.weight"),
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


def load_bert(path: str, **backbone_overrides):
  """``(BERT, params)`` from a ``BertForMaskedLM`` / ``BertForPreTraining`` directory."""
  config, tensors = read_checkpoint(path)
  arch = (config.get("architectures") or ["BertForMaskedLM"])[0]
  return _load_bert(config, _State(tensors, arch), nsp=arch == "BertForPreTraining",
                    **backbone_overrides)


def _load_bert(config, state, nsp=False, **backbone_overrides):
  cfg = bert_config(config, nsp=nsp, **backbone_overrides)
  model = BERT(cfg)
  params = bert_params(cfg, state)
  return model, _finish(model, params, (jnp.zeros((1, 2), jnp.int32),), state)


# --------------------------------------------------------------------- ViT

_VIT_LAYER = {"q": "attention.attention.query", "k": "attention.attention.key",
              "v": "attention.attention.value", "o": "attention.output.dense",
              "ln1": "layernorm_before", "fc1": "intermediate.dense",
              "fc2": "output.dense", "ln2": "layernorm_after"}


def _pair(x):
  return (int(x), int(x)) if isinstance(x, (int, float)) else tuple(int(v) for v in x)


def vit_config(config: Mapping, arch: str = "ViT", **backbone_overrides) -> ViTConfig:
  bb = TransformerConfig(
      width=config["hidden_size"], depth=config["num_hidden_layers"],
      heads=config["num_attention_heads"], mlp_dim=config["intermediate_size"],
      activation=_activation(config, arch), norm_position="pre",
      norm_eps=config.get("layer_norm_eps", 1e-12), kernel_init="normal",
      init_std=config.get("initializer_range", 0.02), **backbone_overrides)
  return ViTConfig(bb, image_size=_pair(config.get("image_size", 224)),
                   patch_size=_pair(config.get("patch_size", 16)),
                   channels=config.get("num_channels", 3), pool="cls", posemb="learned")


def _vit_encoder_params(cfg: ViTConfig, state: _State, prefix: str, names=_VIT_LAYER,
                        layer_fmt="{p}encoder.layer.{i}.", *, final_norm_key="layernorm",
                        zero_qkv_bias=False) -> dict:
  bb = cfg.backbone
  d = bb.width
  n = cfg.num_patches
  e = f"{prefix}embeddings."
  pos = state.take(f"{e}position_embeddings", (1, n + 1, d))[0]
  cls = state.take(f"{e}cls_token", (1, 1, d))[0, 0]
  layers = [_take_block(state, layer_fmt.format(p=prefix, i=i), names, bb,
                        zero_qkv_bias=zero_qkv_bias) for i in range(bb.depth)]
  return {
      "stem": {"projection": {
          "kernel": _patch_kernel_to_datong(state.take(
              f"{e}patch_embeddings.projection.weight", (d, cfg.channels) + cfg.patch_size)),
          "bias": state.take(f"{e}patch_embeddings.projection.bias")},
          "pos_embedding": pos[1:]},
      # HF adds pos[0] to the [CLS] token; Datong's table covers patches only.
      "cls": cls + pos[0],
      "backbone": _backbone(layers, bb, (state.take(f"{prefix}{final_norm_key}.weight"),
                                         state.take(f"{prefix}{final_norm_key}.bias"))),
  }


def _num_labels(config: Mapping) -> int:
  if "id2label" in config:
    return len(config["id2label"])
  return int(config.get("num_labels", 2))


def load_vit(path: str, **backbone_overrides):
  """``(ViTClassifier, params)`` from a ``ViTForImageClassification`` directory.

  Datong takes images ``[batch, h, w, c]``: transpose HF's NCHW pixel values.
  """
  config, tensors = read_checkpoint(path)
  return _load_vit(config, _State(tensors, "ViTForImageClassification"), **backbone_overrides)


def _load_vit(config, state, **backbone_overrides):
  cfg = vit_config(config, "ViT", **backbone_overrides)
  model = ViTClassifier(cfg, _num_labels(config))
  params = {"encoder": _vit_encoder_params(cfg, state, "vit.",
                                           zero_qkv_bias=not config.get("qkv_bias", True)),
            "head": {"kernel": state.take("classifier.weight").T,
                     "bias": state.take("classifier.bias")}}
  images = jnp.zeros((1,) + cfg.image_size + (cfg.channels,), jnp.float32)
  return model, _finish(model, params, (images,), state)


def _export_vit(model: ViTClassifier, params) -> tuple[dict, dict]:
  cfg = model.config
  bb = cfg.backbone
  problems = _backbone_export_problems(bb, norm_position="pre")
  if cfg.pool != "cls":
    problems.append(f"ViTConfig.pool={cfg.pool!r} (HF ViT classifies the [CLS] token)")
  if cfg.posemb not in ("learned", "sincos"):
    problems.append(f"ViTConfig.posemb={cfg.posemb!r}")
  if cfg.mask_token:
    problems.append("ViTConfig.mask_token=True")
  if problems:
    raise UnsupportedError("ViT export: " + "; ".join(problems))
  enc = params["encoder"]
  d = bb.width
  if cfg.posemb == "learned":
    pos = np.asarray(enc["stem"]["pos_embedding"])
  else:
    from datong.ops.posemb import sincos_2d  # pylint: disable=import-outside-toplevel
    pos = np.asarray(sincos_2d(cfg.grid[0], cfg.grid[1], d))
  e = "vit.embeddings."
  state = {
      f"{e}cls_token": np.asarray(enc["cls"]).reshape(1, 1, d),
      f"{e}position_embeddings": np.concatenate([np.zeros((1, d), pos.dtype), pos])[None],
      f"{e}patch_embeddings.projection.weight": _patch_kernel_from_datong(
          enc["stem"]["projection"]["kernel"], cfg.patch_size, cfg.channels),
      f"{e}patch_embeddings.projection.bias": enc["stem"]["projection"]["bias"],
      "vit.layernorm.weight": enc["backbone"]["final_norm"]["norm"]["scale"],
      "vit.layernorm.bias": enc["backbone"]["final_norm"]["norm"]["bias"],
      "classifier.weight": np.asarray(params["head"]["kernel"]).T,
      "classifier.bias": params["head"]["bias"],
  }
  for i, layer in enumerate(_layers_of(enc["backbone"], bb)):
    c = _block_from_datong(layer, bb)
    for canon, hf in _VIT_LAYER.items():
      state[f"vit.encoder.layer.{i}.{hf}.weight"] = c[f"{canon}_w"]
      state[f"vit.encoder.layer.{i}.{hf}.bias"] = c[f"{canon}_b"]
  size = lambda p: p[0] if p[0] == p[1] else list(p)
  n = model.num_classes
  config = {
      "architectures": ["ViTForImageClassification"], "model_type": "vit",
      "hidden_size": d, "num_hidden_layers": bb.depth, "num_attention_heads": bb.heads,
      "intermediate_size": bb.mlp_dim, "hidden_act": _ACTIVATIONS_OUT[bb.activation],
      "layer_norm_eps": bb.norm_eps, "image_size": size(cfg.image_size),
      "patch_size": size(cfg.patch_size), "num_channels": cfg.channels, "qkv_bias": True,
      "hidden_dropout_prob": bb.dropout, "attention_probs_dropout_prob": bb.attention_dropout,
      "initializer_range": bb.init_std,
      "id2label": {str(i): f"LABEL_{i}" for i in range(n)},
      "label2id": {f"LABEL_{i}": i for i in range(n)},
  }
  return config, state


# ------------------------------------------------------------------ ViT-MAE

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
                   norm_pix_loss=config.get("norm_pix_loss", False), decoder_posemb="learned")


def load_vit_mae(path: str, **backbone_overrides):
  """``(MAE, params)`` from a ``ViTMAEForPreTraining`` directory.

  The fixed sin-cos tables HF stores are loaded as (learned) tables, which
  reproduces them exactly. Mask with ``mae_masking(noise, ratio)`` to match
  HF's ``noise=`` argument.
  """
  config, tensors = read_checkpoint(path)
  return _load_vit_mae(config, _State(tensors, "ViTMAEForPreTraining"), **backbone_overrides)


def _load_vit_mae(config, state, **backbone_overrides):
  cfg = vit_mae_config(config, **backbone_overrides)
  model = MAE(cfg)
  dec = cfg.decoder
  n = cfg.encoder.num_patches
  dpos = state.take("decoder.decoder_pos_embed", (1, n + 1, dec.width))[0]
  if np.any(dpos[0] != 0):
    raise UnsupportedError("ViTMAE: decoder_pos_embed has a nonzero [CLS] row; Datong's MAE "
                           "decoder adds positions to patch tokens only.")
  layers = [_take_block(state, f"decoder.decoder_encoder.layer.{i}.", _VIT_LAYER, dec,
                        zero_qkv_bias=not config.get("qkv_bias", True))
            for i in range(dec.depth)]
  params = {
      "encoder": _vit_encoder_params(cfg.encoder, state, "vit.",
                                     zero_qkv_bias=not config.get("qkv_bias", True)),
      "decoder_projection": {"kernel": state.take("decoder.decoder_embed.weight").T,
                             "bias": state.take("decoder.decoder_embed.bias")},
      "mask_token": state.take("decoder.mask_token", (1, 1, dec.width))[0, 0],
      "decoder_pos_embedding": dpos[1:],
      "decoder": _backbone(layers, dec, (state.take("decoder.decoder_norm.weight"),
                                         state.take("decoder.decoder_norm.bias"))),
      "pixel_head": {"kernel": state.take("decoder.decoder_pred.weight").T,
                     "bias": state.take("decoder.decoder_pred.bias")},
  }
  images = jnp.zeros((1,) + cfg.encoder.image_size + (cfg.encoder.channels,), jnp.float32)
  m = mae_masking(jnp.zeros((1, n)), cfg.mask_ratio)
  return model, _finish(model, params, (images, m.keep_indices, m.restore_indices), state)


# -------------------------------------------------------------------- CLIP

_CLIP_LAYER = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
               "o": "self_attn.out_proj", "ln1": "layer_norm1", "fc1": "mlp.fc1",
               "fc2": "mlp.fc2", "ln2": "layer_norm2"}


def _clip_backbone(c: Mapping, arch: str, **backbone_overrides) -> TransformerConfig:
  return TransformerConfig(
      width=c["hidden_size"], depth=c["num_hidden_layers"], heads=c["num_attention_heads"],
      mlp_dim=c["intermediate_size"], activation=_activation(c, arch, "hidden_act"),
      norm_position="pre", norm_eps=c.get("layer_norm_eps", 1e-5), kernel_init="normal",
      **backbone_overrides)


def _clip_ids(tc: Mapping) -> tuple[int, int]:
  """Datong's ``(pad_id, eos_id)`` for a CLIP text config.

  HF pools at the first ``eos_token_id``, or (legacy configs with
  ``eos_token_id == 2``) at the largest id, which for CLIP's tokenizer is
  its end-of-text token ``vocab_size - 1``. Datong treats ``pad_id`` tokens
  as padding (HF does not without an attention mask): it must differ from
  the EOS id.
  """
  vocab = tc.get("vocab_size", 49408)
  eos = tc.get("eos_token_id", 49407)
  if eos == 2:
    eos = vocab - 1
  pad = tc.get("pad_token_id", 1)
  if pad is None or pad == eos:
    pad = -1  # no id is padding: every token is real
  return pad, eos


def clip_config(config: Mapping, **backbone_overrides):
  from datong.multimodal.clip import ClipConfig  # pylint: disable=import-outside-toplevel
  tc, vc = config["text_config"], config["vision_config"]
  text = TextConfig(backbone=_clip_backbone(tc, "CLIP text", **backbone_overrides),
                    vocab_size=tc.get("vocab_size", 49408), positions="learned",
                    max_length=tc.get("max_position_embeddings", 77), tie_embeddings=False)
  image = ViTConfig(_clip_backbone(vc, "CLIP vision", **backbone_overrides),
                    image_size=_pair(vc.get("image_size", 224)),
                    patch_size=_pair(vc.get("patch_size", 32)),
                    channels=vc.get("num_channels", 3), pool="cls", posemb="learned",
                    pre_norm=True)
  return ClipConfig(image=image, text=text, embed_dim=config.get("projection_dim", 512),
                    text_pool="eos", text_causal=True, loss="softmax", max_scale=None,
                    head_bias=False)


def _clip_text_params(cfg, state: _State) -> dict:
  text = cfg.text
  bb = text.backbone
  p = "text_model."
  layers = [_take_block(state, f"{p}encoder.layers.{i}.", _CLIP_LAYER, bb)
            for i in range(bb.depth)]
  return {
      "stem": {"embedding": state.take(f"{p}embeddings.token_embedding.weight",
                                       (text.vocab_size, bb.width)),
               "pos_embedding": state.take(f"{p}embeddings.position_embedding.weight",
                                           (text.max_length, bb.width))},
      "backbone": _backbone(layers, bb, (state.take(f"{p}final_layer_norm.weight"),
                                         state.take(f"{p}final_layer_norm.bias"))),
      "head": {"kernel": state.take("text_projection.weight", (cfg.embed_dim, bb.width)).T},
  }


def _clip_image_params(cfg, state: _State) -> dict:
  vit = cfg.image
  bb = vit.backbone
  d = bb.width
  p = "vision_model."
  e = f"{p}embeddings."
  pos = state.take(f"{e}position_embedding.weight", (vit.num_patches + 1, d))
  layers = [_take_block(state, f"{p}encoder.layers.{i}.", _CLIP_LAYER, bb)
            for i in range(bb.depth)]
  encoder = {
      "stem": {"projection": {
          "kernel": _patch_kernel_to_datong(state.take(
              f"{e}patch_embedding.weight", (d, vit.channels) + vit.patch_size)),
          "bias": np.zeros((d,), np.float32)},  # CLIP's patch conv has no bias
          "pos_embedding": pos[1:]},
      "cls": state.take(f"{e}class_embedding", (d,)) + pos[0],
      "pre_norm": _norm(state.take(f"{p}pre_layrnorm.weight"), state.take(f"{p}pre_layrnorm.bias")),
      # HF applies post_layernorm to the pooled [CLS] token only; Datong's
      # final norm covers every token and pools after it: same pooled output.
      "backbone": _backbone(layers, bb, (state.take(f"{p}post_layernorm.weight"),
                                         state.take(f"{p}post_layernorm.bias"))),
  }
  return {"encoder": encoder,
          "head": {"kernel": state.take("visual_projection.weight", (cfg.embed_dim, d)).T}}


def load_clip(path: str, **backbone_overrides):
  """``(CLIP, params)`` from a ``CLIPModel`` directory (vision ``pre_layrnorm``
  becomes ``ViTConfig.pre_norm``)."""
  config, tensors = read_checkpoint(path)
  return _load_clip(config, _State(tensors, "CLIPModel"), **backbone_overrides)


def _load_clip(config, state, **backbone_overrides):
  from datong.multimodal.clip import CLIP  # pylint: disable=import-outside-toplevel
  cfg = clip_config(config, **backbone_overrides)
  pad, eos = _clip_ids(config["text_config"])
  model = CLIP(cfg, pad_id=pad, eos_id=eos)
  params = {"image": _clip_image_params(cfg, state), "text": _clip_text_params(cfg, state),
            "log_scale": state.take("logit_scale", ()).reshape(())}
  images = jnp.zeros((1,) + cfg.image.image_size + (cfg.image.channels,), jnp.float32)
  return model, _finish(model, params, (images, jnp.zeros((1, 2), jnp.int32)), state)


def load_clip_text(path: str, **backbone_overrides):
  """``(TextTower, params)``: CLIP's text encoder + projection alone.

  ``tower.apply({"params": params}, ids) -> (normalized embeddings, aux)``;
  ``aux["pooled"]`` is HF's ``pooler_output``, ``aux["encoded"]`` its
  ``last_hidden_state`` (on real tokens).
  """
  from datong.multimodal.clip import TextTower  # pylint: disable=import-outside-toplevel
  config, tensors = read_checkpoint(path)
  state = _State(tensors, "CLIPModel (text tower)")
  cfg = clip_config(config, **backbone_overrides)
  pad, eos = _clip_ids(config["text_config"])
  tower = TextTower(cfg, pad_id=pad, eos_id=eos)
  params = _clip_text_params(cfg, state)
  state.used.update(k for k in state.tensors if k.startswith("vision_model.")
                    or k in ("visual_projection.weight", "logit_scale"))
  return tower, _finish(tower, params, (jnp.zeros((1, 2), jnp.int32),), state)


# ----------------------------------------------------------------- dispatch

_LOADERS: dict[str, Callable] = {
    "GPT2LMHeadModel": lambda c, s, **kw: _load_gpt2(c, s, **kw),
    "GPT2Model": lambda c, s, **kw: _load_gpt2(c, s, **kw),
    "BertForMaskedLM": lambda c, s, **kw: _load_bert(c, s, **kw),
    "BertForPreTraining": lambda c, s, **kw: _load_bert(c, s, nsp=True, **kw),
    "ViTForImageClassification": lambda c, s, **kw: _load_vit(c, s, **kw),
    "ViTMAEForPreTraining": lambda c, s, **kw: _load_vit_mae(c, s, **kw),
    "CLIPModel": lambda c, s, **kw: _load_clip(c, s, **kw),
}
SUPPORTED = tuple(_LOADERS)


def load(path: str, **backbone_overrides):
  """``(model, params)`` for the HF model directory ``path``.

  ``backbone_overrides`` go to every ``TransformerConfig`` built (e.g.
  ``scan_layers=True``, ``attention_impl="xla"``, ``dtype="bfloat16"``,
  ``dropout=0.1``). ``params`` is the plain ``params`` collection:
  ``model.apply({"params": params}, ...)``.
  """
  config, tensors = read_checkpoint(path)
  archs = config.get("architectures") or []
  if not archs:
    raise UnsupportedError(f"{path}: config.json has no 'architectures' entry; call a "
                           "per-architecture loader (load_gpt2, load_bert, ...).")
  arch = archs[0]
  if arch not in _LOADERS:
    raise UnsupportedError(f"{path}: architecture {arch!r} (model_type "
                           f"{config.get('model_type')!r}) is not supported; "
                           f"supported: {', '.join(SUPPORTED)}.")
  return _LOADERS[arch](config, _State(tensors, arch), **backbone_overrides)


def save(model: nn.Module, params, path: str) -> str:
  """Write ``model`` + ``params`` as an HF directory (``config.json`` +
  ``model.safetensors``) loadable by ``transformers``' ``from_pretrained``.

  Supported: ``GPT`` (-> ``GPT2LMHeadModel``), ``ViTClassifier`` (->
  ``ViTForImageClassification``). ``params`` may be boxed, scanned, or
  wrapped in ``{"params": ...}``. Weights are written as float32.
  """
  params = nn.unbox(params)
  if isinstance(params, Mapping) and set(params) == {"params"}:
    params = params["params"]
  params = jax.tree.map(lambda x: np.asarray(x, np.float32), params)
  if isinstance(model, GPT):
    config, state = _export_gpt2(model, params)
  elif isinstance(model, ViTClassifier):
    config, state = _export_vit(model, params)
  else:
    raise UnsupportedError(f"save: no Hugging Face export for {type(model).__name__}; "
                           "supported: GPT, ViTClassifier.")
  config = {**config, "dtype": "float32", "torch_dtype": "float32"}
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config, f, indent=2, sort_keys=True)
  write_safetensors(os.path.join(path, "model.safetensors"),
                    {k: np.asarray(v, np.float32) for k, v in state.items()})
  return path

"""Pieces every family converter shares: strict state, config checks, block math.

A "canonical" layer is a dict of torch-layout arrays: q/k/v/o and fc1/fc2
weights as nn.Linear ``[out, in]`` with biases, ln1/ln2 weight and bias.
ln1 is the norm of the attention branch (before it for pre-LN, after the
residual add for post-LN), ln2 that of the MLP branch; Datong names them
attention_norm / mlp_norm in both cases. Each family maps its HF layer names
to this layout and the block code below does the rest.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from datong.backbone import TransformerConfig
from datong.hf import placement


class UnsupportedError(NotImplementedError):
  """A checkpoint's architecture or config option Datong cannot reproduce."""


class State:
  """A state dict that remembers which tensors were taken (strict loading)."""

  # Buffers that are not weights (older transformers versions saved them).
  IGNORED = (".attn.bias", ".attn.masked_bias", "position_ids")
  # When placing onto a mesh, 16-bit float tensors at least this large stay
  # views of the mapped file (cast per shard at placement); smaller ones,
  # which a family may add to others (cls + pos[0]), become float32 here.
  VIEW_MIN_BYTES = 1 << 20

  def __init__(self, tensors: Mapping[str, np.ndarray], arch: str):
    self.arch = arch
    self.tensors = {}
    for k, v in tensors.items():
      # Old BERT checkpoints name LayerNorm parameters gamma / beta.
      k = k.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
      self.tensors[k] = np.asarray(v)
    self.used: set[str] = set()
    # (mesh, rules, release) when ``hf.load`` places params onto a mesh.
    self.placement = None

  def respell(self, rules) -> "State":
    """Rewrite every key by ``rules`` (``(regex, replacement)`` pairs, in order).

    Families map each spelling a user meets (the hub's transformers 4.x
    names, 5.x ``save_pretrained``, 5.x ``state_dict()``) to one, so the
    conversion code reads a single spelling. Two tensors that end up with
    one name are an error rather than one silently winning.
    """
    out = {}
    for k, v in self.tensors.items():
      new = k
      for pattern, repl in rules:
        new = re.sub(pattern, repl, new)
      if new in out:
        raise UnsupportedError(f"{self.arch}: two checkpoint tensors both mean {new!r} "
                               f"(one is {k!r}); the file mixes two spellings.")
      out[new] = v
    self.tensors = out
    return self

  def has(self, key):
    return key in self.tensors

  def take(self, key, shape=None) -> np.ndarray:
    if key not in self.tensors:
      raise KeyError(f"{self.arch} checkpoint has no tensor {key!r}")
    self.used.add(key)
    arr = self.tensors[key]
    lazy = (self.placement is not None and arr.nbytes >= self.VIEW_MIN_BYTES
            and arr.dtype in (np.float16, ml_dtypes.bfloat16))
    if not lazy:  # no copy for float32: a mapped file stays a view until placed
      arr = arr.astype(np.float32, copy=False)
    if shape is not None and tuple(arr.shape) != tuple(shape):
      raise ValueError(f"{self.arch}: tensor {key} has shape {arr.shape}, expected {tuple(shape)}")
    return arr

  def finish(self):
    left = sorted(k for k in self.tensors
                  if k not in self.used and not any(k.endswith(s) for s in self.IGNORED))
    if left:
      raise UnsupportedError(f"{self.arch}: checkpoint tensors Datong has no place for: "
                             f"{left[:8]}{' ...' if len(left) > 8 else ''}")


def need(config: Mapping, arch: str, key: str, allowed, default=None):
  """``config[key]``, or an ``UnsupportedError`` when Datong cannot reproduce it."""
  value = config.get(key, default)
  ok = value in allowed if isinstance(allowed, (tuple, list, set)) else value == allowed
  if not ok:
    raise UnsupportedError(f"{arch}: config option {key}={value!r} is not supported "
                           f"(Datong reproduces {allowed!r}).")
  return value


ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
               "quick_gelu": "quick_gelu", "relu": "relu"}
ACTIVATIONS_OUT = {"gelu": "gelu", "gelu_tanh": "gelu_new", "quick_gelu": "quick_gelu",
                   "relu": "relu"}


def activation(config, arch, key="hidden_act"):
  act = config.get(key, "gelu")
  if act not in ACTIVATIONS:
    raise UnsupportedError(f"{arch}: config option {key}={act!r} is not supported; "
                           f"Datong has {sorted(ACTIVATIONS)}.")
  return ACTIVATIONS[act]


# ------------------------------------------------------------- block math

def norm(w, b):
  return {"norm": {"scale": w, "bias": b}}


def block_to_datong(c: Mapping[str, np.ndarray], cfg: TransformerConfig) -> dict:
  d, h, hd = cfg.width, cfg.heads, cfg.resolved_head_dim

  def qkv(name):
    return {"kernel": c[f"{name}_w"].T.reshape(d, h, hd), "bias": c[f"{name}_b"].reshape(h, hd)}

  return {
      "attention": {"query": qkv("q"), "key": qkv("k"), "value": qkv("v"),
                    "out": {"kernel": c["o_w"].T.reshape(h, hd, d), "bias": c["o_b"]}},
      "attention_norm": norm(c["ln1_w"], c["ln1_b"]),
      "mlp": {"wi": {"kernel": c["fc1_w"].T, "bias": c["fc1_b"]},
              "wo": {"kernel": c["fc2_w"].T, "bias": c["fc2_b"]}},
      "mlp_norm": norm(c["ln2_w"], c["ln2_b"]),
  }


def block_from_datong(p: Mapping[str, Any], cfg: TransformerConfig) -> dict[str, np.ndarray]:
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


def take_block(state: State, prefix: str, names: Mapping[str, str], cfg: TransformerConfig,
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
  return block_to_datong(c, cfg)


def put_block(state: dict, c: Mapping[str, np.ndarray], prefix: str, names: Mapping[str, str]):
  """Write one canonical layer under HF module ``names`` (inverse of ``take_block``)."""
  for canon, hf in names.items():
    state[f"{prefix}{hf}.weight"] = c[f"{canon}_w"]
    state[f"{prefix}{hf}.bias"] = c[f"{canon}_b"]


def backbone_params(layers: list[dict], cfg: TransformerConfig, final_norm=None) -> dict:
  """Per-layer dicts -> the backbone's params (stacked under ``layers`` when scanned)."""
  if cfg.scan_layers:
    stack = placement.LazyStack if placement.LAZY_STACKS.get() else (lambda xs: np.stack(xs))
    out = {"layers": jax.tree.map(lambda *xs: stack(xs), *layers)}
  else:
    out = {f"layer_{i}": layer for i, layer in enumerate(layers)}
  if final_norm is not None:
    out["final_norm"] = norm(*final_norm)
  return out


def layers_of(backbone: Mapping[str, Any], cfg: TransformerConfig) -> list[dict]:
  """The backbone's params as one dict per layer (unstacks scanned layers)."""
  if "layers" in backbone:
    stacked = backbone["layers"]
    return [jax.tree.map(lambda x, i=i: np.asarray(x)[i], stacked) for i in range(cfg.depth)]
  return [backbone[f"layer_{i}"] for i in range(cfg.depth)]


def patch_kernel_to_datong(w: np.ndarray) -> np.ndarray:
  """Conv ``[width, c, ph, pw]`` -> dense ``[ph * pw * c, width]`` (patchify order)."""
  width = w.shape[0]
  return w.transpose(2, 3, 1, 0).reshape(-1, width)


def patch_kernel_from_datong(k: np.ndarray, patch, channels: int) -> np.ndarray:
  ph, pw = patch
  return np.asarray(k).reshape(ph, pw, channels, -1).transpose(3, 2, 0, 1)


# ---------------------------------------------------------- load / export

def finish(model: nn.Module, params: dict, example_args: tuple, state: State):
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
  dtype = param_dtype(model)
  if state.placement is not None:
    mesh, rules, release = state.placement
    return placement.place(params, placement.target_shardings(model, example_args, mesh, rules),
                           dtype, release)
  return jax.tree.map(lambda x: jnp.asarray(x, dtype), params)


def param_dtype(model: nn.Module):
  """The ``param_dtype`` of the first backbone config found in ``model.config``."""
  todo = [model.config]
  while todo:
    cfg = todo.pop(0)
    if isinstance(cfg, TransformerConfig):
      return cfg.params_dtype
    if dataclasses.is_dataclass(cfg):
      todo += [getattr(cfg, f.name) for f in dataclasses.fields(cfg)]
  return jnp.float32


def backbone_export_problems(bb: TransformerConfig, *, norm_position: str) -> list[str]:
  """What in ``bb`` an HF BERT-style / GPT-2-style block cannot express."""
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
  if bb.activation not in ACTIVATIONS_OUT:
    problems.append(f"TransformerConfig.activation={bb.activation!r}")
  if bb.has_final_norm != (norm_position == "pre"):
    problems.append(f"TransformerConfig.final_norm={bb.final_norm!r}")
  return problems

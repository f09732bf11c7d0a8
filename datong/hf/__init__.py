"""Hugging Face checkpoints <-> Datong models, without torch.

Reads a Hugging Face model directory (``config.json`` +
``model.safetensors``, or shards listed in ``model.safetensors.index.json``)
or a hub id (``hub.resolve``: huggingface_hub's local cache first, at a
``revision``), maps the config to Datong's config dataclasses, converts the
weights and returns the Datong model with its ``params`` collection::

    model, params = datong.hf.load("path/to/gpt2")
    logits, aux = model.apply({"params": params}, ids, attention_mask=mask)
    tokenizer = datong.hf.load_tokenizer("path/to/gpt2")
    model, params = datong.hf.load("org/name", mesh=mesh, rules=rules)  # sharded

Text models take HF's ``attention_mask`` and equal HF at every position,
padded ones included; position tables at a new resolution use torch's
bicubic (``ops.posemb``), as HF's ``interpolate_pos_encoding``. With
``mesh`` and ``rules`` each parameter is placed shard by shard from the
memory-mapped file (``hf.placement``).

Supported ``architectures`` (the first entry of ``config.json``'s list), one
module per family:

* ``gpt2``: ``GPT2LMHeadModel``, ``GPT2Model`` -> ``GPT`` (learned positions,
  pre-LN, tied or untied head);
* ``bert``: ``BertForMaskedLM`` -> ``BERT``; ``BertForPreTraining`` -> ``BERT``
  with ``nsp=True`` (pooler + next-sentence head); ``BertModel`` ->
  ``TextEncoder`` (with its pooler);
* ``vit``: ``ViTForImageClassification`` -> ``ViTClassifier`` (images NHWC:
  transpose HF's NCHW pixel values); ``ViTModel`` -> ``ViTEncoder`` (with
  its pooler: ``ViTConfig.pooler``);
* ``vit_mae``: ``ViTMAEForPreTraining`` -> ``MAE``; ``mae_masking(noise,
  ratio)`` reproduces HF's masking from its explicit ``noise``;
* ``clip``: ``CLIPModel`` -> ``CLIP`` (both towers, projections, logit
  scale); ``CLIPTextModel(WithProjection)`` -> ``TextTower``,
  ``CLIPVisionModel`` -> ``ViTEncoder``, ``CLIPVisionModelWithProjection`` ->
  ``ImageClassifier`` (see ``hf.clip``); ``load_clip_text`` loads
  ``CLIPModel``'s text tower alone;
* ``swin``: ``SwinForImageClassification``, ``Swinv2ForImageClassification``
  -> ``ImageClassifier(SwinConfig)``; ``SwinModel``, ``Swinv2Model`` ->
  ``SwinEncoder`` (V2 with ``pretrained_window_sizes``);
* ``beit``: ``BeitForImageClassification`` -> ``ImageClassifier(ViTConfig)``
  with BEiT's options, ``BeitForMaskedImageModeling`` -> ``BEiT``,
  ``BeitModel`` -> ``ViTEncoder`` (see ``hf.beit``).

Every spelling of a checkpoint is read: the hub's (transformers 4.x names,
old ``LayerNorm.gamma`` / ``beta``, buffers such as ``position_ids``), what
transformers 5.x ``save_pretrained`` writes, and 5.x ``model.state_dict()``
saved with ``safetensors.torch.save_file`` (its new module names, e.g.
``vit.layers.{i}.attention.q_proj``); each family maps them to the hub's.
Models return HF's ``hidden_states`` as ``aux["embedded"]`` followed by
``aux["layers"]`` (``return_layers=True``).

Anything else, and any config option Datong cannot reproduce exactly, raises
``UnsupportedError`` naming it; checkpoint tensors the conversion does not
use are an error too, so nothing is dropped silently.

``save(model, params, path)`` writes the HF format back in the hub's
spelling (``GPT`` -> ``GPT2LMHeadModel``, ``ViTClassifier`` ->
``ViTForImageClassification``, ``BERT`` -> ``BertForMaskedLM`` /
``BertForPreTraining``, ``TextEncoder`` -> ``BertModel``, ``MAE`` ->
``ViTMAEForPreTraining``, ``CLIP`` -> ``CLIPModel``, a classifier on a Swin ->
``Swin[v2]ForImageClassification``), so
``transformers.AutoModel*.from_pretrained(path)`` loads a Datong-trained model.

Each family module has ``ARCHITECTURES``, ``load(config, state,
**backbone_overrides) -> (model, params)`` and, where it exports,
``EXPORTS`` (model classes; with ``EXPORT_CONFIGS``, only for models whose
``config`` is one of those classes) and ``export(model, params) -> (config,
tensors)``; the tables below are built from them.

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

No torch is needed: ``hf.safetensors`` reads and writes the format with numpy.
"""

from __future__ import annotations

import json
import os
from typing import Mapping, Optional

import flax.linen as nn
import jax
import numpy as np

from datong.hf import beit, bert, clip, gpt2, placement, swin, vit, vit_mae
from datong.hf.bert import load_bert
from datong.hf.clip import load_clip, load_clip_text
from datong.hf.common import State, UnsupportedError
from datong.hf.gpt2 import load_gpt2
from datong.hf.hub import load_tokenizer, resolve
from datong.hf.safetensors import (MappedFiles, read_checkpoint, read_safetensors,
                                   write_safetensors)
from datong.hf.vit import load_vit
from datong.hf.vit_mae import load_vit_mae, mae_masking
# Config translations alone, reachable as hf.<name> as before the split.
from datong.hf.bert import bert_config, bert_params  # noqa: F401
from datong.hf.clip import clip_config  # noqa: F401
from datong.hf.gpt2 import gpt2_config, gpt2_params  # noqa: F401
from datong.hf.vit import vit_config  # noqa: F401
from datong.hf.vit_mae import vit_mae_config  # noqa: F401

__all__ = [
    "UnsupportedError", "load", "load_gpt2", "load_bert", "load_vit", "load_vit_mae",
    "load_clip", "load_clip_text", "mae_masking", "save", "read_checkpoint",
    "read_safetensors", "write_safetensors", "SUPPORTED", "load_tokenizer", "resolve",
]

# The one registry: HF architecture name -> family loader, Datong model class
# -> family exporter (checked with isinstance, in this order).
_FAMILIES = (gpt2, bert, swin, vit, vit_mae, clip, beit)
_LOADERS = {arch: family.load for family in _FAMILIES for arch in family.ARCHITECTURES}
_EXPORTERS = tuple((cls, getattr(family, "EXPORT_CONFIGS", None), family.export)
                   for family in _FAMILIES for cls in getattr(family, "EXPORTS", ()))
SUPPORTED = tuple(_LOADERS)


def load(path: str, *, revision: Optional[str] = None, cache_dir: Optional[str] = None,
         local_files_only: bool = False, mesh=None, rules=None, **backbone_overrides):
  """``(model, params)`` for an HF model directory or hub id ``path``.

  A hub id (``"org/name"``) resolves through ``huggingface_hub``'s local
  cache first, at ``revision``, and downloads only when it is not cached and
  the hub may be reached (``hub.resolve``). ``backbone_overrides`` go to
  every ``TransformerConfig`` built (e.g. ``scan_layers=True``,
  ``attention_impl="xla"``, ``dtype="bfloat16"``, ``dropout=0.1``).
  ``params`` is the plain ``params`` collection: ``model.apply({"params":
  params}, ...)``.

  ``mesh`` + ``rules`` (flax logical-axis rules, e.g.
  ``datong.train.sharding.RULES``): every parameter is built directly with
  its target ``NamedSharding`` from the memory-mapped file, each device
  reading only its shard, and the pages read are let go after each
  parameter (``hf.placement``); host memory stays near the placed shards
  plus one tensor. Float32 and large 16-bit tensors convert as views of
  the file (16-bit ones are cast per shard), ``scan_layers=True`` stacks
  are built per shard; patch kernels are copied on the host.
  """
  if (mesh is None) != (rules is None):
    raise ValueError("hf.load: pass mesh and rules together (rules: flax logical-axis rules "
                     "such as datong.train.sharding.RULES), or neither for a whole load.")
  path = resolve(path, revision=revision, cache_dir=cache_dir,
                 local_files_only=local_files_only)
  files = MappedFiles() if mesh is not None else None
  config, tensors = read_checkpoint(path, files)
  archs = config.get("architectures") or []
  if not archs:
    raise UnsupportedError(f"{path}: config.json has no 'architectures' entry; call a "
                           "per-architecture loader (load_gpt2, load_bert, ...).")
  arch = archs[0]
  if arch not in _LOADERS:
    raise UnsupportedError(f"{path}: architecture {arch!r} (model_type "
                           f"{config.get('model_type')!r}) is not supported; "
                           f"supported: {', '.join(SUPPORTED)}.")
  state = State(tensors, arch)
  if mesh is None:
    return _LOADERS[arch](config, state, **backbone_overrides)
  state.placement = (mesh, rules, files.release)
  token = placement.LAZY_STACKS.set(True)
  try:
    return _LOADERS[arch](config, state, **backbone_overrides)
  finally:
    placement.LAZY_STACKS.reset(token)


def save(model: nn.Module, params, path: str) -> str:
  """Write ``model`` + ``params`` as an HF directory (``config.json`` +
  ``model.safetensors``) loadable by ``transformers``' ``from_pretrained``.

  Supported: ``GPT`` (-> ``GPT2LMHeadModel``), ``ViTClassifier`` (->
  ``ViTForImageClassification``), ``BERT`` (-> ``BertForMaskedLM``, or
  ``BertForPreTraining`` with ``nsp``), ``TextEncoder`` (-> ``BertModel``),
  ``MAE`` (-> ``ViTMAEForPreTraining``), ``CLIP`` (-> ``CLIPModel``), a
  classifier on a ``SwinConfig`` (-> ``Swin[v2]ForImageClassification``).
  Tensor names are the hub's (transformers 4.x). ``params`` may be boxed,
  scanned, or wrapped in ``{"params": ...}``. Weights are written as float32.
  A setting HF cannot express raises ``UnsupportedError`` naming it.
  """
  params = nn.unbox(params)
  if isinstance(params, Mapping) and set(params) == {"params"}:
    params = params["params"]
  params = jax.tree.map(lambda x: np.asarray(x, np.float32), params)
  export = next((fn for cls, configs, fn in _EXPORTERS if isinstance(model, cls)
                 and (configs is None or isinstance(getattr(model, "config", None), configs))),
                None)
  if export is None:
    names = ", ".join(cls.__name__ + (f" of {'/'.join(c.__name__ for c in configs)}" if configs else "")
                      for cls, configs, _ in _EXPORTERS)
    raise UnsupportedError(f"save: no Hugging Face export for {type(model).__name__}; "
                           f"supported: {names}.")
  config, state = export(model, params)
  config = {**config, "dtype": "float32", "torch_dtype": "float32"}
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config, f, indent=2, sort_keys=True)
  write_safetensors(os.path.join(path, "model.safetensors"),
                    {k: np.asarray(v, np.float32) for k, v in state.items()})
  return path

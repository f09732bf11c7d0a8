"""The image-encoder protocol, and the classifier that takes any encoder.

An image encoder is described by a frozen config dataclass that has

* ``image_size`` ``(h, w)`` and ``channels``: the images it is built for;
* ``width``: the width of its pooled features and of each output token;
* ``num_tokens``: the sequence positions one image occupies (for tokens/s);
* ``flops_per_example()``: training FLOPs (forward + backward) per image;
* ``make(shared_backbone=None, name=None)``: the flax module, whose call is
  ``module(images [b, h, w, c], *, mask=None, train=False) -> (pooled [b,
  width], aux)`` with ``aux["pooled"]``, ``aux["patch_tokens"]`` (the token map
  ``[b, n, width]``) and ``aux["encoded"]`` (every output position, any
  prefix tokens such as [CLS] first); optionally ``aux["layers"]`` (``[depth,
  b, length, width]``) when called with ``return_layers=True``. An encoder
  that cannot run a shared backbone raises when given one;
* optionally ``resize_param(path, value, shape)``: how a pretrained leaf of
  another shape is made to fit (a position table at a new resolution),
  ``depth`` (its layer count, for layer-wise learning-rate decay) with
  ``layer_index(path_names)`` (a parameter's layer id when the default
  ``layer_i`` rule does not fit, e.g. Swin's stages), and
  ``attention_map(weights, layer, image_size)`` (a layer's sown attention
  probabilities as ``[b, heads, h, w]`` maps when they are not over one
  sequence of patches, e.g. Swin's windows).

``ViTConfig`` (``datong.unimodal.vision``) and ``SwinConfig``
(``datong.unimodal.swin``) meet it; so must BEiT.
Everything that consumes images (``ImageClassifier``, the linear probe and
k-NN, fine-tuning with layer-wise decay, CLIP's image tower, the notebook's
attention maps) asks only for this, so a new encoder is its own file plus
one registry entry (``datong.registry``).
"""

from __future__ import annotations

import functools
from typing import Any, Optional, Protocol, runtime_checkable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from datong.backbone import WEIGHTS_COLLECTION

__all__ = ["DistilledClassifier", "ImageClassifier", "ImageEncoderConfig", "attention_map",
           "check_image_encoder", "encoder_attention_maps", "head_param_dtype",
           "is_image_encoder", "sown_attention_weights"]


@runtime_checkable
class ImageEncoderConfig(Protocol):
  """What consumers of an image encoder may ask of its config (see the module docstring)."""
  image_size: tuple[int, int]
  channels: int

  @property
  def width(self) -> int: ...

  @property
  def num_tokens(self) -> int: ...

  def flops_per_example(self) -> float: ...

  def make(self, *, shared_backbone: Optional[nn.Module] = None,
           name: Optional[str] = None) -> nn.Module: ...


def is_image_encoder(config: Any) -> bool:
  """True when ``config`` meets the image-encoder protocol."""
  return isinstance(config, ImageEncoderConfig)


def check_image_encoder(config: Any, where: str) -> None:
  """A clear error when ``config`` (the value of field ``where``) is no image encoder."""
  if not is_image_encoder(config):
    missing = [a for a in ("image_size", "channels", "width", "num_tokens", "flops_per_example",
                           "make") if not hasattr(config, a)]
    raise TypeError(f"{where} must be an image-encoder config (ViTConfig or another that meets "
                    f"datong.unimodal.encoders.ImageEncoderConfig); {type(config).__name__} "
                    f"lacks {', '.join(missing)}.")


def head_param_dtype(config: Any):
  """Heads on an encoder are stored like its backbone's parameters (float32
  when the encoder has no single backbone)."""
  backbone = getattr(config, "backbone", None)
  return backbone.params_dtype if backbone is not None else jnp.float32


class ImageClassifier(nn.Module):
  """Any image encoder + a (zero-initialized) linear class head: ``-> (logits, aux)``.

  Parameters: ``encoder/...`` (the encoder's own tree) and ``head``.
  ``encoder_kwargs`` (e.g. ``return_layers=True``) pass through to the encoder.
  """
  config: Any  # an ImageEncoderConfig
  num_classes: int

  @nn.compact
  def __call__(self, images, *, train: bool = False, **encoder_kwargs):
    pooled, aux = self.config.make(name="encoder")(images, train=train, **encoder_kwargs)
    logits = nn.Dense(
        self.num_classes, dtype=jnp.float32, param_dtype=head_param_dtype(self.config),
        kernel_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed", None)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (None,)),
        name="head")(pooled.astype(jnp.float32))
    aux["logits"] = logits
    return logits, aux


class DistilledClassifier(nn.Module):
  """DeiT's classifier: a class head on the pooled features and a
  distillation head on the encoder's distillation token
  (``aux["distill_token"]``, e.g. ``ViTConfig(distill_token=True)``).

  Returns ``(logits, aux)``: ``logits`` are ``log`` of the two heads' mean
  softmax (DeiT's prediction), ``aux["class_logits"]`` and
  ``aux["distill_logits"]`` each head's own. Parameters: ``encoder``,
  ``head`` (as ``ImageClassifier``'s) and ``distill_head``.
  """
  config: Any
  num_classes: int

  @nn.compact
  def __call__(self, images, *, train: bool = False, **encoder_kwargs):
    pooled, aux = self.config.make(name="encoder")(images, train=train, **encoder_kwargs)
    if "distill_token" not in aux:
      raise ValueError(f"DistilledClassifier: {type(self.config).__name__} has no distillation "
                       "token; set distill_token=True on the encoder config.")
    head = lambda name: nn.Dense(
        self.num_classes, dtype=jnp.float32, param_dtype=head_param_dtype(self.config),
        kernel_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed", None)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (None,)), name=name)
    logits = head("head")(pooled.astype(jnp.float32))
    distill = head("distill_head")(aux["distill_token"].astype(jnp.float32))
    aux["class_logits"], aux["distill_logits"] = logits, distill
    aux["logits"] = jnp.logaddexp(nn.log_softmax(logits), nn.log_softmax(distill)) - jnp.log(2.0)
    return aux["logits"], aux


# ------------------------------------------------------------ attention read-out

def _natural(path: str) -> list:
  """Sort key: ``layer_10`` after ``layer_9``."""
  return [(0, int(p[6:]), "") if p.startswith("layer_") and p[6:].isdigit() else (1, 0, p)
          for p in path.split("/")]


def sown_attention_weights(state) -> dict[str, np.ndarray]:
  """The attention probabilities an ``apply(..., mutable=[WEIGHTS_COLLECTION])``
  sowed, ``{module path: [batch, heads, q, kv]}`` in layer order (scanned
  layers split into ``layer_<i>`` entries)."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(
      state.get(WEIGHTS_COLLECTION, {}), is_leaf=lambda x: isinstance(x, tuple))[0]:
    names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path][:-1]  # drop "weights"
    value = np.asarray(leaf[0])
    if "layers" in names:  # scanned: [depth, batch, heads, q, kv]
      i = names.index("layers")
      for layer in range(value.shape[0]):
        out["/".join(names[:i] + [f"layer_{layer}"] + names[i + 1:])] = value[layer]
    else:
      out["/".join(names)] = value
  return dict(sorted(out.items(), key=lambda kv: _natural(kv[0])))


def attention_map(config: Any, weights: np.ndarray, layer: int, image_hw) -> np.ndarray:
  """Where an image encoder's layer ``layer`` looks, from its attention
  ``weights [batch, heads, q, kv]`` on images of size ``image_hw``:
  ``[batch, heads, grid_h, grid_w]``, each map summing to 1. With a [CLS]
  token: the [CLS] query's attention over the patches (renormalized without
  the [CLS] key); without one: the attention each patch receives, averaged
  over the queries. Windowed encoders (Swin) map their windows back
  themselves (``config.attention_map``)."""
  if hasattr(config, "attention_map"):
    return config.attention_map(weights, layer, tuple(image_hw))
  maps = weights[:, :, 0, 1:] if config.has_cls else weights.mean(axis=2)
  maps = maps / np.maximum(maps.sum(-1, keepdims=True), 1e-12)
  gh, gw = (config.grid if tuple(image_hw) == tuple(config.image_size) else
            (image_hw[0] // config.patch_size[0], image_hw[1] // config.patch_size[1]))
  return maps.reshape(maps.shape[0], maps.shape[1], gh, gw)


@functools.lru_cache(maxsize=16)
def _sowing_apply(config: Any):
  """``config``'s module applied with the attention weights sown, jitted once."""
  return jax.jit(lambda p, x: config.make().apply({"params": p}, x,
                                                  mutable=(WEIGHTS_COLLECTION,)))


def encoder_attention_maps(config: Any, params, images, layer: int = -1) -> np.ndarray:
  """``attention_map`` of the image encoder ``config`` (its ``make()``d
  module with ``params``) on ``images [b, h, w, c]``; ``layer`` indexes its
  layers (-1: the last)."""
  images = jnp.asarray(images, jnp.float32)
  _, state = _sowing_apply(config)(params, images)
  weights = list(sown_attention_weights(state).values())
  if not -len(weights) <= layer < len(weights):
    raise ValueError(f"attention_maps: layer={layer} but the encoder has {len(weights)} layers "
                     f"(valid: {-len(weights)}..{len(weights) - 1}).")
  return attention_map(config, weights[layer], layer % len(weights), images.shape[1:3])

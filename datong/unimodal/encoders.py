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

from typing import Any, Optional, Protocol, runtime_checkable

import flax.linen as nn
import jax.numpy as jnp

__all__ = ["DistilledClassifier", "ImageClassifier", "ImageEncoderConfig", "check_image_encoder", "head_param_dtype",
           "is_image_encoder"]


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

"""Swin Transformer (V1 and V2) on the shared backbone's block.

Liu et al. 2021 (Swin) and 2022 (Swin V2). Images are cut into small
patches (4x4), embedded and normed; stages of ``Block``s (the shared
Transformer layer, no copy of attention or MLP) attend inside ``m x m``
windows, every second layer with the windows shifted by ``m // 2``; between
stages a patch merging halves the grid and doubles the width. The window
math (padding, cyclic shift and its mask, relative-position indices) lives
in ``datong.ops.windows``; each layer's relative-position bias reaches the
block through its ``layer_bias`` hook:

* V1: a learned table ``[(2m-1)**2, heads]`` per layer, pre-norm blocks,
  merging = 2x2 concat -> norm -> linear ``4C -> 2C``;
* V2: residual post-norm (``x + norm(f(x))``), scaled cosine attention with a
  learned per-head temperature (``TransformerConfig.cosine_attention``), no
  key bias, and a continuous position bias: an MLP on log-spaced offsets
  (``16 * sigmoid``), normalized by ``pretrained_window_sizes`` so a model
  trained with one window runs with a larger one; merging = concat ->
  linear -> norm.

A stage whose grid is not larger than the window uses one window of the
grid's smaller side and no shift. Grids that are not a multiple of the window
are zero-padded (bottom / right) inside each layer, and the padded positions
take part in attention as zeros, as in the reference implementation.

    cfg = SwinConfig.preset("swin-T")                    # 28.3M params with a 1000-class head
    pooled, aux = SwinEncoder(cfg).apply(params, images)  # images [b, h, w, c]

``SwinConfig`` meets the image-encoder protocol (``datong.unimodal.encoders``).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from datong.backbone import _REMAT_POLICIES as REMAT_POLICIES  # the backbone's one table
from datong.backbone import Block, Norm, TransformerConfig, block_inputs
from datong.backbone_moe import moe_metrics
from datong.ops import windows as W
from datong.ops.patches import grid_shape, pair, patchify

VERSIONS = (1, 2)
MASKED = -1e9  # logit bias between tokens of different regions of a shifted window

# Published sizes: (embed dim, depths, heads, window, image size, drop-path rate).
# Swin-T/S/B from Liu et al. 2021 (224 px, window 7); the V2 sizes are the
# 256 px, window 8 models of Liu et al. 2022.
PRESETS = {
    "swin-T": (96, (2, 2, 6, 2), (3, 6, 12, 24), 7, 224, 0.2),
    "swin-S": (96, (2, 2, 18, 2), (3, 6, 12, 24), 7, 224, 0.3),
    "swin-B": (128, (2, 2, 18, 2), (4, 8, 16, 32), 7, 224, 0.5),
    "swinv2-T": (96, (2, 2, 6, 2), (3, 6, 12, 24), 8, 256, 0.2),
    "swinv2-S": (96, (2, 2, 18, 2), (3, 6, 12, 24), 8, 256, 0.3),
    "swinv2-B": (128, (2, 2, 18, 2), (4, 8, 16, 32), 8, 256, 0.5),
}


def swin_backbone(embed_dim: int, depths, heads, *, version: int = 1, mlp_ratio: int = 4,
                  **overrides) -> TransformerConfig:
  """The block settings of a Swin (its stage 0) for ``SwinConfig.backbone``."""
  v2 = dict(norm_position="residual_post", cosine_attention=True, key_bias=False)
  return TransformerConfig(**{
      "width": embed_dim, "depth": sum(depths), "heads": heads[0],
      "mlp_dim": mlp_ratio * embed_dim, "activation": "gelu", "norm_eps": 1e-5,
      "kernel_init": "normal", "init_std": 0.02, **(v2 if version == 2 else {}), **overrides})


@dataclasses.dataclass(frozen=True)
class SwinConfig:
  """A Swin encoder. ``backbone`` holds the block settings of stage 0
  (``width`` = embedding dim, ``heads`` = ``heads[0]``, ``depth`` =
  ``sum(depths)``, ``mlp_dim`` = mlp ratio x width); stage ``s`` runs the
  same settings at width ``width * 2**s`` with ``heads[s]`` heads.
  ``swin_backbone`` builds it; ``SwinConfig.preset`` builds the whole thing.
  """
  backbone: TransformerConfig
  depths: tuple[int, ...] = (2, 2, 6, 2)
  heads: tuple[int, ...] = (3, 6, 12, 24)
  window_size: int = 7
  image_size: tuple[int, int] = (224, 224)
  patch_size: tuple[int, int] = (4, 4)
  channels: int = 3
  version: int = 1
  absolute_posemb: bool = False  # a learned table added after the stem
  pretrained_window_sizes: tuple[int, ...] = ()  # V2, per stage; () or 0: the window itself
  mask_token: bool = False  # a learned token replacing masked patches (SimMIM)

  def __post_init__(self):
    for name in ("image_size", "patch_size"):
      object.__setattr__(self, name, pair(getattr(self, name)))
    for name in ("depths", "heads", "pretrained_window_sizes"):
      object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))

    def bad(field, why):
      raise ValueError(f"SwinConfig.{field}={getattr(self, field)!r}: {why}")
    bb = self.backbone
    if self.version not in VERSIONS:
      bad("version", f"choose one of {VERSIONS}")
    if not self.depths or any(d <= 0 for d in self.depths):
      bad("depths", "must be a non-empty tuple of positive layer counts")
    if len(self.heads) != len(self.depths):
      bad("heads", f"needs one entry per stage ({len(self.depths)})")
    if self.window_size <= 0:
      bad("window_size", "must be positive")
    if self.pretrained_window_sizes and (len(self.pretrained_window_sizes) != len(self.depths)
                                         or self.version != 2):
      bad("pretrained_window_sizes", "is a Swin V2 setting with one entry per stage")
    if bb.depth != sum(self.depths) or bb.heads != self.heads[0]:
      raise ValueError(f"SwinConfig.backbone: depth={bb.depth}, heads={bb.heads} must be "
                       f"sum(depths)={sum(self.depths)} and heads[0]={self.heads[0]}; "
                       "build it with swin_backbone(embed_dim, depths, heads).")
    if bb.mlp_dim % bb.width:
      raise ValueError(f"SwinConfig.backbone.mlp_dim={bb.mlp_dim} must be a multiple of "
                       f"width={bb.width} (Swin's mlp ratio).")
    want = (("residual_post", True, False) if self.version == 2 else ("pre", False, True))
    got = (bb.norm_position, bb.cosine_attention, bb.key_bias)
    if got != want:
      raise ValueError(f"SwinConfig.version={self.version} needs backbone norm_position, "
                       f"cosine_attention, key_bias = {want}; got {got}. Build it with "
                       f"swin_backbone(..., version={self.version}).")
    if bb.scan_layers:
      raise ValueError("SwinConfig.backbone.scan_layers=True: a Swin stage runs its blocks one "
                       "by one (the windows regroup between layers); set it False.")
    if bb.head_dim is not None or bb.kv_heads is not None or bb.rope or bb.cross_attention:
      raise ValueError("SwinConfig.backbone: head_dim, kv_heads, rope and cross_attention are "
                       "not Swin settings; leave them at their defaults.")
    for s in range(len(self.depths)):
      if (bb.width << s) % self.heads[s]:
        bad("heads", f"stage {s} has {self.heads[s]} heads for width {bb.width << s}")
    if self.channels <= 0:
      bad("channels", "must be positive")
    grid_shape(self.image_size, self.patch_size)  # raises with the sizes named

  @classmethod
  def preset(cls, name: str, *, image_size=None, window_size=None, **overrides) -> "SwinConfig":
    """A published size by name (see ``PRESETS``); ``overrides`` go to the
    backbone when they are ``TransformerConfig`` fields, else to the config."""
    if name not in PRESETS:
      raise ValueError(f"Unknown Swin preset {name!r}; known: {sorted(PRESETS)}.")
    dim, depths, heads, window, size, drop_path = PRESETS[name]
    version = 2 if name.startswith("swinv2") else 1
    fields = {f.name for f in dataclasses.fields(TransformerConfig)}
    bb_kw = {k: v for k, v in overrides.items() if k in fields}
    kw = {k: v for k, v in overrides.items() if k not in fields}
    bb = swin_backbone(dim, depths, heads, version=version,
                       **{"stochastic_depth": drop_path, **bb_kw})
    return cls(bb, depths=depths, heads=heads, version=version,
               window_size=window if window_size is None else window_size,
               image_size=size if image_size is None else image_size, **kw)

  def replace(self, **changes) -> "SwinConfig":
    return dataclasses.replace(self, **changes)

  @property
  def num_stages(self) -> int:
    return len(self.depths)

  def stage_backbone(self, stage: int) -> TransformerConfig:
    """The block settings of stage ``stage``."""
    bb = self.backbone
    width = bb.width << stage
    return bb.replace(width=width, heads=self.heads[stage], depth=self.depths[stage],
                      mlp_dim=bb.mlp_dim // bb.width * width)

  def stage_grids(self, image_size=None) -> list[tuple[int, int]]:
    """The token grid of every stage (merging pads odd sides)."""
    grid = grid_shape(pair(image_size or self.image_size), self.patch_size)
    grids = [grid]
    for _ in range(self.num_stages - 1):
      grid = ((grid[0] + 1) // 2, (grid[1] + 1) // 2)
      grids.append(grid)
    return grids

  @property
  def grid(self) -> tuple[int, int]:
    return self.stage_grids()[0]

  @property
  def num_patches(self) -> int:
    return self.grid[0] * self.grid[1]

  @property
  def patch_dim(self) -> int:
    return self.patch_size[0] * self.patch_size[1] * self.channels

  @property
  def stride(self) -> int:
    """Pixels per output token along each side (patch x 2 per merging)."""
    return self.patch_size[0] << (self.num_stages - 1)

  # --- the image-encoder protocol (datong.unimodal.encoders) ---
  @property
  def width(self) -> int:
    """Width of the pooled features and of the last stage's tokens."""
    return self.backbone.width << (self.num_stages - 1)

  @property
  def depth(self) -> int:
    """All layers (for layer-wise learning-rate decay)."""
    return sum(self.depths)

  @property
  def num_tokens(self) -> int:
    """Patches of one image at the first stage (for tokens/s)."""
    return self.num_patches

  def make(self, *, shared_backbone: Optional[nn.Module] = None, name: Optional[str] = None):
    if shared_backbone is not None:
      raise ValueError("a Swin encoder runs its own stages and cannot run a shared backbone; "
                       "build the CLIP without share_backbone.")
    return SwinEncoder(self, name=name)

  def layer_index(self, names: tuple[str, ...]) -> Optional[int]:
    """Layer id of a parameter (by its path names) for layer-wise lr decay:
    the stem 0, layer ``i`` of stage ``s`` ``sum(depths[:s]) + i + 1``, a
    stage's merging that of its last layer; None: not an encoder layer
    (the final norm and a head: ``depth + 1``)."""
    for k, n in enumerate(names):
      if n in ("patch_embedding", "stem_norm", "pos_embedding", "mask_token"):
        return 0
      if n.startswith("stage_") and n[6:].isdigit():
        s = int(n[6:])
        first = sum(self.depths[:s])
        rest = names[k + 1] if k + 1 < len(names) else ""
        if rest.startswith("layer_"):
          return first + int(rest[6:]) + 1
        return first + self.depths[s]
    return None

  def attention_map(self, weights, layer: int, image_size) -> np.ndarray:
    """Where layer ``layer`` (global index) looks, per window: ``weights``
    ``[b * windows, heads, m*m, m*m]`` (its sown probabilities) -> the
    attention each position receives, averaged over the queries of its
    window, on the image's token grid ``[b, heads, h, w]``, summing to 1."""
    stage = int(np.searchsorted(np.cumsum(self.depths), layer, side="right"))
    i = layer - sum(self.depths[:stage])
    h, w = self.stage_grids(image_size)[stage]
    window, shift = W.stage_window((h, w), self.window_size,
                                   self.window_size // 2 if i % 2 else 0)
    hp, wp = W.padded_size(h, window), W.padded_size(w, window)
    received = np.asarray(weights).mean(axis=2).transpose(0, 2, 1)  # [b * windows, m*m, heads]
    grid = np.roll(W.window_merge(received, window, (hp, wp)), (shift, shift), axis=(1, 2))
    maps = grid[:, :h, :w].transpose(0, 3, 1, 2)
    return maps / np.maximum(maps.sum(axis=(2, 3), keepdims=True), 1e-12)

  def flops_per_example(self) -> float:
    """Training FLOPs (3x forward) of one image: windowed layers (attention
    over ``window**2`` keys, padding not counted), patch stem and mergings."""
    total = 3 * 2 * self.num_patches * self.patch_dim * self.backbone.width
    for s, (gh, gw) in enumerate(self.stage_grids()):
      window, _ = W.stage_window((gh, gw), self.window_size, 0)
      bb = self.stage_backbone(s)
      total += gh * gw * bb.flops_per_token(window * window)
      if s + 1 < self.num_stages:
        n = ((gh + 1) // 2) * ((gw + 1) // 2)
        total += 3 * 2 * n * (4 * bb.width) * (2 * bb.width)
    return float(total)


def _layer_aux(backbone: TransformerConfig, layer_aux) -> dict:
  """The ``Transformer``'s aux keys from every layer's ``(losses, stats)``:
  ``losses`` (name -> sum over layers), ``layer_losses`` (name -> ``[layers]``),
  and for MoE layers ``moe`` (name -> ``[moe_layers, ...]``) and ``metrics``;
  no key for what no layer has."""
  losses = [loss for loss, _ in layer_aux]
  out = {}
  if losses and losses[0]:
    out["layer_losses"] = {k: jnp.stack([jnp.asarray(loss[k], jnp.float32) for loss in losses])
                           for k in losses[0]}
    out["losses"] = {k: jnp.sum(v) for k, v in out["layer_losses"].items()}
  stats = [st for _, st in layer_aux if st]
  if stats:
    out["moe"] = {k: jnp.stack([st[k] for st in stats]) for k in stats[0]}
    out["metrics"] = moe_metrics(out["moe"], [i for i in range(len(layer_aux))
                                              if backbone.moe.is_moe_layer(i)])
  return out


class RelativePositionBias(nn.Module):
  """Swin V1's bias: a learned ``table [(2m-1)**2, heads]`` looked up by offset."""
  config: TransformerConfig
  window: int

  @nn.compact
  def __call__(self, layer_index, x):
    del layer_index, x
    m, heads = self.window, self.config.heads
    table = self.param("table", nn.with_logical_partitioning(
        nn.initializers.truncated_normal(0.02), (None, "heads")),
        ((2 * m - 1) ** 2, heads), self.config.params_dtype)
    bias = table.astype(jnp.float32)[W.relative_position_index(m).reshape(-1)]
    return {"bias": bias.reshape(m * m, m * m, heads).transpose(2, 0, 1)[None]}


class ContinuousPositionBias(nn.Module):
  """Swin V2's bias: ``16 * sigmoid(mlp(log-spaced offsets))``, an MLP
  ``2 -> 512 -> heads`` (``hidden``, ``out``; the second without bias)."""
  config: TransformerConfig
  window: int
  pretrained_window: int = 0
  hidden: int = 512

  @nn.compact
  def __call__(self, layer_index, x):
    del layer_index, x
    cfg, m = self.config, self.window
    dense = functools.partial(nn.Dense, dtype=jnp.float32, param_dtype=cfg.params_dtype)
    coords = jnp.asarray(W.log_spaced_coords(m, self.pretrained_window))
    h = nn.relu(dense(self.hidden, kernel_init=nn.with_logical_partitioning(
        nn.initializers.lecun_normal(), (None, "mlp")), bias_init=nn.with_logical_partitioning(
        nn.initializers.zeros, ("mlp",)), name="hidden")(coords))
    table = dense(cfg.heads, use_bias=False, kernel_init=nn.with_logical_partitioning(
        nn.initializers.lecun_normal(), ("mlp", "heads")), name="out")(h)
    bias = table[W.relative_position_index(m).reshape(-1)].reshape(m * m, m * m, cfg.heads)
    return {"bias": 16.0 * nn.sigmoid(bias.transpose(2, 0, 1))[None]}


class SwinStage(nn.Module):
  """One stage: ``depth`` windowed blocks, then (``merge``) a patch merging.

  ``__call__(x [b, h, w, c], first_layer) -> (stage output [b, h, w, c],
  merged [b, ceil(h/2), ceil(w/2), 2c] or None, every layer's output [b, h*w,
  c], every layer's (auxiliary losses, MoE statistics) as ``Block`` returns
  them)``. Parameters:
  ``layer_{i}`` (the shared ``Block``'s, with ``attention_bias`` from the
  position-bias hook) and the merging's ``reduction`` (``[4c, 2c]``, no bias)
  and ``norm``.
  """
  config: SwinConfig
  stage: int
  merge: bool
  train: bool = False

  @nn.compact
  def __call__(self, x, first_layer: int):
    cfg = self.config
    bb = cfg.stage_backbone(self.stage)
    total = sum(cfg.depths)
    b, h, w, c = x.shape
    layers, layer_aux = [], []
    block_cls = Block if bb.remat == "none" else nn.remat(Block, policy=REMAT_POLICIES[bb.remat])
    for i in range(cfg.depths[self.stage]):
      window, shift = W.stage_window((h, w), cfg.window_size, cfg.window_size // 2 if i % 2 else 0)
      hp, wp = W.padded_size(h, window), W.padded_size(w, window)
      grid = W.pad_to_windows(x, window)
      if shift:
        grid = jnp.roll(grid, (-shift, -shift), axis=(1, 2))
      tokens = W.window_partition(grid, window)  # [b * windows, m*m, c]
      windows = tokens.shape[0] // b

      def per_window(a):  # [windows, ...] -> [b * windows, ...]
        return jnp.broadcast_to(a[None], (b,) + a.shape).reshape((b * windows,) + a.shape[1:])
      inputs = {}
      if shift:
        # An additive bias, not a boolean mask: XLA constant-folds the reduction a
        # boolean mask gets in the attention op, slowly (seconds per layer).
        mask = W.shifted_window_mask((hp, wp), window, shift)[:, None]
        inputs["bias"] = per_window(jnp.asarray(np.where(mask, 0.0, MASKED), jnp.float32))
      if (hp, wp) != (h, w):
        valid = np.zeros((1, hp, wp, 1), np.float32)
        valid[:, :h, :w] = 1.0
        valid = np.roll(valid, (-shift, -shift), axis=(1, 2))
        inputs["attention_input_mask"] = per_window(jnp.asarray(W.window_partition(valid, window)[..., 0] > 0))
      if cfg.version == 2:
        pretrained = cfg.pretrained_window_sizes[self.stage] if cfg.pretrained_window_sizes else 0
        hook = functools.partial(ContinuousPositionBias, window=window, pretrained_window=pretrained)
      else:
        hook = functools.partial(RelativePositionBias, window=window)
      layer = first_layer + i
      rate = bb.stochastic_depth * layer / max(total - 1, 1)
      tokens, (_, _, losses, stats) = block_cls(
          bb, train=self.train, layer_bias=hook, moe_layer=bb.moe.is_moe_layer(layer),
          name=f"layer_{i}")(tokens, jnp.int32(layer), jnp.float32(rate), None,
                             block_inputs(**inputs))
      layer_aux.append((losses, stats))
      grid = W.window_merge(tokens, window, (hp, wp))
      if shift:
        grid = jnp.roll(grid, (shift, shift), axis=(1, 2))
      x = grid[:, :h, :w]
      layers.append(x.reshape(b, h * w, c))
    if not self.merge:
      return x, None, layers, layer_aux
    merged = jnp.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))
    # 2x2 neighbours concatenated as (0, 0), (1, 0), (0, 1), (1, 1): the reference order.
    merged = jnp.concatenate([merged[:, 0::2, 0::2], merged[:, 1::2, 0::2],
                              merged[:, 0::2, 1::2], merged[:, 1::2, 1::2]], axis=-1)
    down = bb.replace(width=4 * c) if cfg.version == 1 else bb.replace(width=2 * c)
    with_norm = functools.partial(Norm, down, name="norm")
    reduction = nn.Dense(2 * c, use_bias=False, dtype=bb.compute_dtype, param_dtype=bb.params_dtype,
                         kernel_init=nn.with_logical_partitioning(
                             nn.initializers.truncated_normal(bb.init_std), ("mlp", "embed")),
                         name="reduction")
    if cfg.version == 1:
      merged = reduction(with_norm()(merged))
    else:
      merged = with_norm()(reduction(merged))
    return x, merged, layers, layer_aux


class SwinEncoder(nn.Module):
  """Patch stem + Swin stages + final norm: ``images -> (pooled, aux)``.

  Args of ``__call__``: ``images [b, h, w, c]`` (h, w divisible by the
  patch), ``mask`` ``[b, patches]`` bool (True: replace that patch by the
  mask token; needs ``mask_token``), ``train`` (dropout / drop path),
  ``return_layers``: also ``aux["layers"]``, every layer's output (a list:
  the stages differ in length and width).

  Returns ``pooled [b, width]`` (mean of the final tokens) and ``aux`` with
  ``embedded`` (stem output ``[b, patches, c]``), ``hidden_states`` (the
  stem output and every stage's output after its merging, ``[b, n_s,
  c_s]``: Hugging Face's ``hidden_states``), ``stages`` (each stage's output
  before merging), ``grids`` (their ``(h, w)``), ``encoded`` =
  ``patch_tokens`` (final tokens after the norm, ``[b, n, width]``) and
  ``pooled``. Like the ``Transformer``'s, it holds the layers' auxiliary
  losses (an MoE backbone's balance and z-losses) as ``losses`` (summed over
  every stage's layers; the engine minimizes them) and ``layer_losses``
  (``[layers]``), and with experts ``moe`` and ``metrics``.
  """
  config: SwinConfig

  @nn.compact
  def __call__(self, images, *, mask=None, train: bool = False, return_layers: bool = False):
    cfg = self.config
    bb = cfg.backbone
    if images.ndim != 4 or images.shape[-1] != cfg.channels:
      raise ValueError(f"SwinEncoder expects [batch, h, w, {cfg.channels}] images; "
                       f"got {images.shape}.")
    b = images.shape[0]
    gh, gw = grid_shape(images.shape[1:3], cfg.patch_size)
    x = nn.Dense(bb.width, dtype=bb.compute_dtype, param_dtype=bb.params_dtype,
                 kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                          ("patch", "embed")),
                 bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
                 name="patch_embedding")(patchify(images.astype(bb.compute_dtype), cfg.patch_size))
    x = Norm(bb, name="stem_norm")(x)
    if cfg.mask_token:
      token = self.param("mask_token", nn.with_logical_partitioning(
          nn.initializers.normal(0.02), ("embed",)), (bb.width,), bb.params_dtype)
      if mask is not None:
        x = jnp.where(mask[..., None], token.astype(x.dtype), x)
    elif mask is not None:
      raise ValueError("SwinEncoder got a mask but has no mask token; set SwinConfig.mask_token=True.")
    if cfg.absolute_posemb:
      if (gh, gw) != cfg.grid:
        raise ValueError(f"SwinEncoder: the absolute position table is made for the grid "
                         f"{cfg.grid}; got images of grid {(gh, gw)}.")
      pos = self.param("pos_embedding", nn.with_logical_partitioning(
          nn.initializers.truncated_normal(0.02), (None, "embed")), (cfg.num_patches, bb.width),
          bb.params_dtype)
      x = x + pos.astype(x.dtype)[None]
    aux = {"embedded": x, "hidden_states": [x], "stages": [], "grids": [], "layers": []}
    grid = x.reshape(b, gh, gw, bb.width)
    first, layer_aux = 0, []
    for s in range(cfg.num_stages):
      merge = s + 1 < cfg.num_stages
      out, merged, layers, stage_aux = SwinStage(cfg, s, merge, train, name=f"stage_{s}")(
          grid, first)
      first += cfg.depths[s]
      aux["layers"] += layers
      layer_aux += stage_aux
      aux["stages"].append(out.reshape(b, -1, out.shape[-1]))
      aux["grids"].append(out.shape[1:3])
      grid = merged if merge else out
      aux["hidden_states"].append(grid.reshape(b, -1, grid.shape[-1]))
    tokens = Norm(cfg.stage_backbone(cfg.num_stages - 1), name="final_norm")(
        grid.reshape(b, -1, grid.shape[-1]))
    pooled = jnp.mean(tokens.astype(jnp.float32), axis=1).astype(tokens.dtype)
    aux.update(encoded=tokens, patch_tokens=tokens, pooled=pooled)
    aux.update(_layer_aux(bb, layer_aux))
    if not return_layers:
      del aux["layers"]
    return pooled, aux

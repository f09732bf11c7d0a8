"""Datong's train step against peer implementations, interleaved in one run.

    python bench/peers.py                      # both models, 3 rounds of 10 steps
    python bench/peers.py --models gpt --steps 10 --rounds 5 --torch-compile

* ViT (width 384, depth 6, 6 heads, MLP 1536, 64x64 one-channel images,
  patch 8 -> 64 tokens, global average pooling, 10 classes, batch 32):
  ``loop.Trainer``'s step vs a big_vision-style ViT (``models/vit.py``'s
  architecture, written below in flax linen) trained by a plain
  ``jax.jit(donate_argnums=0)`` step with optax AdamW, clipping and a cosine
  schedule. Same parameter count (checked), no augmentation in either.
* GPT (the ``gpt-pydoc`` recipe: width 192, depth 4, 4 heads, vocabulary
  1024, rotary positions, tied embeddings, no biases, batch 8 x 256):
  ``loop.Trainer``'s step on a real packed batch vs nanoGPT's ``model.py``
  architecture (learned positions, tied embeddings, no biases, PyTorch's
  fused ``scaled_dot_product_attention``), written below in PyTorch, with
  ``torch.optim.AdamW`` and ``clip_grad_norm_`` (eager; ``--torch-compile``
  adds a ``torch.compile``'d row). Skipped with a message if torch is missing.

Every implementation is built, compiled and warmed up first; then the rounds
run the implementations one after the other (interleaved), ``--steps`` steps
each, and the median round is reported with the ratio Datong time / peer
time (< 1: Datong faster). On a shared CPU run it when quiet: the load
average is printed before and after.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import statistics
import sys
import time
from typing import Callable

if __package__ in (None, ""):
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from datong.train import recipes
from datong.train.config import override
from step_time import step_runner  # bench/ is this script's directory

# ---------------------------------------------------------------- Datong


def datong_runner(cfg) -> tuple[Callable[[int], float], int]:
  """(run(n) -> seconds per step, parameter count) for a recipe config."""
  run = step_runner(cfg)
  return run, run.num_params


def vit_config():
  return override(recipes.get("vit-digits"), {
      "task.model.backbone.width": "384", "task.model.backbone.depth": "6",
      "task.model.backbone.heads": "6", "task.model.backbone.mlp_dim": "1536",
      "task.model.image_size": "[64, 64]", "task.model.patch_size": "[8, 8]",
      "task.model.pool": "gap", "task.data.upsample": "8", "task.data.crop_pad": "0",
      "task.data.shift": "0", "task.data.rotate": "0", "task.data.scale": "0",
      "task.label_smoothing": "0", "train.batch_size": "32"})


# ---------------------------------------------------------------- big_vision ViT (flax)


class _MlpBlock(nn.Module):
  mlp_dim: int

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    x = nn.Dense(self.mlp_dim, kernel_init=nn.initializers.xavier_uniform(),
                 bias_init=nn.initializers.normal(stddev=1e-6))(x)
    x = nn.gelu(x)
    return nn.Dense(d, kernel_init=nn.initializers.xavier_uniform(),
                    bias_init=nn.initializers.normal(stddev=1e-6))(x)


class _Encoder1DBlock(nn.Module):
  mlp_dim: int
  num_heads: int

  @nn.compact
  def __call__(self, x):
    y = nn.LayerNorm()(x)
    y = nn.MultiHeadDotProductAttention(num_heads=self.num_heads,
                                        kernel_init=nn.initializers.xavier_uniform())(y, y)
    x = x + y
    y = nn.LayerNorm()(x)
    return x + _MlpBlock(self.mlp_dim)(y)


class BigVisionViT(nn.Module):
  """big_vision ``models/vit.py``: conv stem, learned posemb, pre-LN blocks, GAP head."""
  num_classes: int
  patch: int
  width: int
  depth: int
  mlp_dim: int
  num_heads: int

  @nn.compact
  def __call__(self, image):
    x = nn.Conv(self.width, (self.patch, self.patch), strides=(self.patch, self.patch),
                padding="VALID", name="embedding")(image)
    n, h, w, c = x.shape
    x = x.reshape(n, h * w, c)
    x = x + self.param("pos_embedding", nn.initializers.normal(stddev=1 / math.sqrt(c)),
                       (1, h * w, c), x.dtype)
    for i in range(self.depth):
      x = _Encoder1DBlock(self.mlp_dim, self.num_heads, name=f"encoderblock_{i}")(x)
    x = nn.LayerNorm(name="encoder_norm")(x)
    x = jnp.mean(x, axis=1)
    return nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros, name="head")(x)


def big_vision_runner(cfg) -> tuple[Callable[[int], float], int]:
  task, opt = cfg.task, cfg.optimizer
  m, bb = task.model, task.model.backbone
  model = BigVisionViT(num_classes=task.num_classes, patch=m.patch_size[0], width=bb.width,
                       depth=bb.depth, mlp_dim=bb.mlp_dim, num_heads=bb.heads)
  batch_size = cfg.train.batch_size
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.uniform(-1, 1, (batch_size, *m.image_size, m.channels)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, task.num_classes, batch_size), jnp.int32)
  params = model.init(jax.random.PRNGKey(0), images)["params"]
  schedule = optax.warmup_cosine_decay_schedule(0.0, opt.learning_rate, opt.warmup_steps,
                                                cfg.train.steps)
  tx = optax.chain(optax.clip_by_global_norm(opt.grad_clip_norm),
                   optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps,
                               weight_decay=opt.weight_decay))

  def loss_fn(params, images, labels):
    logits = model.apply({"params": params}, images)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  @jax.jit
  def init(params):
    return params, tx.init(params)

  @jax.jit
  def step(state, images, labels):
    params, opt_state = state
    loss, grads = jax.value_and_grad(loss_fn)(params, images, labels)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss

  step = jax.jit(step, donate_argnums=0)
  state = init(params)
  for _ in range(3):
    state, loss = step(state, images, labels)
  jax.block_until_ready(loss)
  n_params = sum(x.size for x in jax.tree.leaves(params))

  def run(n: int) -> float:
    nonlocal state
    start = time.perf_counter()
    for _ in range(n):
      state, out = step(state, images, labels)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / n
  return run, n_params


# ---------------------------------------------------------------- nanoGPT (PyTorch)


def nanogpt_runner(cfg, compile_model: bool) -> tuple[Callable[[int], float], int]:
  """nanoGPT's model.py architecture at the recipe's sizes, AdamW, clipping."""
  import torch  # pylint: disable=import-outside-toplevel
  from torch import nn as tnn  # pylint: disable=import-outside-toplevel
  from torch.nn import functional as F  # pylint: disable=import-outside-toplevel

  bb = cfg.task.model.backbone
  vocab, block = cfg.task.model.vocab_size, cfg.task.seq_length
  width, heads = bb.width, bb.heads

  class LayerNorm(tnn.Module):
    def __init__(self, ndim):
      super().__init__()
      self.weight = tnn.Parameter(torch.ones(ndim))

    def forward(self, x):
      return F.layer_norm(x, self.weight.shape, self.weight, None, 1e-5)

  class CausalSelfAttention(tnn.Module):
    def __init__(self):
      super().__init__()
      self.c_attn = tnn.Linear(width, 3 * width, bias=False)
      self.c_proj = tnn.Linear(width, width, bias=False)

    def forward(self, x):
      b, t, c = x.size()
      q, k, v = self.c_attn(x).split(width, dim=2)
      q, k, v = (y.view(b, t, heads, c // heads).transpose(1, 2) for y in (q, k, v))
      y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
      return self.c_proj(y.transpose(1, 2).contiguous().view(b, t, c))

  class MLP(tnn.Module):
    def __init__(self):
      super().__init__()
      self.c_fc = tnn.Linear(width, bb.mlp_dim, bias=False)
      self.c_proj = tnn.Linear(bb.mlp_dim, width, bias=False)

    def forward(self, x):
      return self.c_proj(F.gelu(self.c_fc(x)))

  class Block(tnn.Module):
    def __init__(self):
      super().__init__()
      self.ln_1, self.attn = LayerNorm(width), CausalSelfAttention()
      self.ln_2, self.mlp = LayerNorm(width), MLP()

    def forward(self, x):
      x = x + self.attn(self.ln_1(x))
      return x + self.mlp(self.ln_2(x))

  class GPT(tnn.Module):
    def __init__(self):
      super().__init__()
      self.wte = tnn.Embedding(vocab, width)
      self.wpe = tnn.Embedding(block, width)
      self.h = tnn.ModuleList([Block() for _ in range(bb.depth)])
      self.ln_f = LayerNorm(width)
      self.lm_head = tnn.Linear(width, vocab, bias=False)
      self.wte.weight = self.lm_head.weight  # tied
      for name, p in self.named_parameters():
        if p.dim() == 2:
          std = 0.02 / math.sqrt(2 * bb.depth) if name.endswith("c_proj.weight") else 0.02
          tnn.init.normal_(p, 0.0, std)

    def forward(self, idx, targets):
      pos = torch.arange(idx.size(1), device=idx.device)
      x = self.wte(idx) + self.wpe(pos)
      for blk in self.h:
        x = blk(x)
      logits = self.lm_head(self.ln_f(x))
      return F.cross_entropy(logits.view(-1, vocab), targets.view(-1))

  torch.manual_seed(0)
  model = GPT()
  opt = cfg.optimizer
  decay = [p for p in model.parameters() if p.dim() >= 2]
  no_decay = [p for p in model.parameters() if p.dim() < 2]
  optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": opt.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}],
                                lr=opt.learning_rate, betas=(opt.b1, opt.b2), eps=opt.eps)
  forward = torch.compile(model) if compile_model else model
  g = torch.Generator().manual_seed(0)
  batch = cfg.train.batch_size
  x = torch.randint(0, vocab, (batch, block), generator=g)
  y = torch.randint(0, vocab, (batch, block), generator=g)

  def one_step():
    loss = forward(x, y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), opt.grad_clip_norm)
    optimizer.step()
    return loss

  for _ in range(3):
    one_step()
  n_params = sum(p.numel() for p in model.parameters())

  def run(n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
      loss = one_step()
    loss.item()
    return (time.perf_counter() - start) / n
  return run, n_params


# ---------------------------------------------------------------- main


@dataclasses.dataclass
class Contender:
  model: str
  name: str
  run: Callable[[int], float]
  params: int
  times: list = dataclasses.field(default_factory=list)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", nargs="+", default=["vit", "gpt"], choices=("vit", "gpt"))
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--torch-compile", action="store_true")
  args = parser.parse_args(argv)
  load_before = os.getloadavg()
  try:
    import torch  # pylint: disable=import-outside-toplevel
    torch_version = torch.__version__
  except ImportError:
    torch = None
    torch_version = "missing"
  print(f"jax {jax.__version__} ({jax.devices()[0].device_kind}), torch {torch_version}"
        + (f" ({torch.get_num_threads()} threads)" if torch else "")
        + f"; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; load {load_before[0]:.2f}", flush=True)

  contenders = []
  if "vit" in args.models:
    cfg = vit_config()
    contenders.append(Contender("vit", "datong Trainer", *datong_runner(cfg)))
    contenders.append(Contender("vit", "big_vision ViT + optax", *big_vision_runner(cfg)))
  if "gpt" in args.models:
    cfg = recipes.get("gpt-pydoc")
    contenders.append(Contender("gpt", "datong Trainer", *datong_runner(cfg)))
    if torch is None:
      print("gpt: torch is not installed; the nanoGPT peer is skipped.")
    else:
      contenders.append(Contender("gpt", "nanoGPT (torch eager)", *nanogpt_runner(cfg, False)))
      if args.torch_compile:
        contenders.append(Contender("gpt", "nanoGPT (torch.compile)", *nanogpt_runner(cfg, True)))

  for _ in range(args.rounds):
    for c in contenders:
      c.times.append(c.run(args.steps))

  print("| model | implementation | params | ms/step (median) | rounds (ms) | datong / this |")
  print("| --- | --- | --- | --- | --- | --- |")
  rows = []
  for c in contenders:
    t = statistics.median(c.times)
    ours = statistics.median(next(d.times for d in contenders
                                  if d.model == c.model and d.name.startswith("datong")))
    rows.append((c, t, ours / t))
    print(f"| {c.model} | {c.name} | {c.params:,} | {t * 1e3:.1f} | "
          f"{', '.join(f'{x * 1e3:.1f}' for x in c.times)} | {ours / t:.3f} |")
  print(f"load {load_before[0]:.2f} -> {os.getloadavg()[0]:.2f} "
        f"({args.rounds} rounds x {args.steps} steps)")
  return rows


if __name__ == "__main__":
  main()

"""GPT on Python's docs with 8 experts top-2 in every layer: ``gpt-pydoc`` at equal active parameters.

The ``gpt-pydoc`` model and run with each MLP (768 wide) replaced by a
mixture of 8 experts 384 wide, 2 per token (GShard top-2, capacity factor
1.25 per sequence, dropless dispatch: ``jax.lax.ragged_dot``): the same
active MLP parameters and FLOPs per token (+ a 192 x 8 router per layer),
4x the MLP parameters (7.1M in the backbone instead of 1.8M). Auxiliary
losses: Switch load balancing (0.01) and router z-loss (0.001), logged as
``train/aux_loss/...``; expert load and dropped fraction as
``train/moe/...``.

Same target as ``gpt-pydoc``: held-out ``eval/bits_per_byte`` below 1.79
(xz -9). Not yet measured over a full run on a quiet machine (BENCHMARKS.md
"Mixture of experts" has the step-time ratio to the dense model).

    datong train gpt-pydoc-moe --workdir /tmp/gpt-pydoc-moe
"""

import dataclasses

from datong.backbone_config import MoEConfig
from datong.train.recipes import gpt_pydoc

NAME = "gpt-pydoc-moe"
METRIC = gpt_pydoc.METRIC
TARGET = gpt_pydoc.TARGET


def config():
  base = gpt_pydoc.config()
  model = base.task.model
  backbone = model.backbone.replace(moe=MoEConfig(
      experts=8, top_k=2, expert_dim=model.backbone.mlp_dim // 2, dispatch="dropless",
      capacity_factor=1.25, load_balancing_weight=1e-2, router_z_weight=1e-3))
  task = dataclasses.replace(base.task, model=dataclasses.replace(model, backbone=backbone))
  return dataclasses.replace(base, task=task)

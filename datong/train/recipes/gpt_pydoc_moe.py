"""GPT on Python's docs, 8 experts top-2 per layer: ``gpt-pydoc`` at equal active parameters.

The ``gpt-pydoc`` model and run with each MLP (768 wide) replaced by a
mixture of 8 experts 384 wide, 2 per token (GShard top-2, capacity factor
1.25 per sequence, the gather form of the capacity dispatch): the same
active MLP parameters and FLOPs per token (+ a 192 x 8 router per layer),
4x the MLP parameters (5.51M parameters in all against the dense 1.97M).
Auxiliary losses: Switch load balancing (0.01) and router z-loss (0.001),
logged as ``train/aux_loss/...``; expert load and dropped fraction as
``train/moe/...``. On the CPU the gather dispatch was the fastest form:
a step takes 1.32x the dense step (capacity einsums 1.58x, dropless
``ragged_dot`` 3.57x; ``bench/moe.py``, loaded machine).

Same target as ``gpt-pydoc``: held-out ``eval/bits_per_byte`` below 1.79
(xz -9). 660 steps instead of 880: at the measured 1.32x step time that is
``gpt-pydoc``'s wall time (~9.5 min quiet), the equal-wall-time comparison
(at equal steps: ``--set train.steps=880``). Measured (BENCHMARKS.md, 1738957, quiet 2-core CPU): 1.9669
held-out bits/byte in 5m50s, against gpt-pydoc's 1.9560 in 5m53s.

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
      experts=8, top_k=2, expert_dim=model.backbone.mlp_dim // 2, dispatch="gather",
      capacity_factor=1.25, load_balancing_weight=1e-2, router_z_weight=1e-3))
  task = dataclasses.replace(base.task, model=dataclasses.replace(model, backbone=backbone))
  train = dataclasses.replace(base.train, steps=660)  # equal wall time (see above)
  return dataclasses.replace(base, task=task, train=train)

"""DINO on the embedded 8x8 digits: self-distillation with an EMA teacher, centering, sharpening and multi-crop; linear probe and k-NN on frozen features.

Measured (BENCHMARKS.md, "Teachers and students"): **collapses** to the
uniform output (loss ln 256; probe 0.836, k-NN 0.689 in 3m11s with a
dense last layer; the weight-normalized one collapses as well). Views
(host, per example and seed): 2 global
crops (40-100% of the area) at 16x16 and 4 local crops (10-40%) at 8x8,
contrast / brightness jitter, Gaussian blur half the time, no flips. The
student (the simclr-digits ViT + DINO head: 2 x 256 MLP, 64-d L2-normalized
bottleneck, 256 weight-normalized prototypes) sees all 6 views (the 8x8 ones through the
interpolated position table); the teacher, an EMA of the student with
momentum 0.99 -> 1 on a cosine, sees the 2 global ones, centered (center
momentum 0.9) and sharpened (temperature 0.04 vs the student's 0.1).
Evaluation: ``eval/linear_probe_accuracy`` and ``eval/knn_accuracy`` on the
student encoder's pooled features; the encoder is exported to
``encoder_params.msgpack``.

    datong train dino-digits --workdir /tmp/dino-digits

The teacher's momentum reaches 1 at ``task.momentum_steps``: set it with
``train.steps`` when changing the run's length.
"""

from datong.train.config import OptimizerConfig, RunConfig, TrainConfig
from datong.train.recipes.simclr_digits import encoder
from datong.train.tasks.probes import ProbeConfig
from datong.train.tasks.selfsup import DINOConfig
from datong.train.tasks.views import ViewData
from datong.unimodal.selfsup import SelfSupConfig

NAME = "dino-digits"
METRIC = "eval/linear_probe_accuracy"
TARGET = None  # reported (BENCHMARKS.md)

STEPS = 1000


def config() -> RunConfig:
  model = SelfSupConfig(encoder(), head="dino", hidden=256, bottleneck=64, out_dim=256)
  data = ViewData(global_size=(16, 16), local_size=(8, 8), global_views=2, local_views=4,
                  global_scale=(0.4, 1.0), local_scale=(0.1, 0.4), jitter=0.4, blur=0.5,
                  blur_sigma=0.75,
                  flip=False)
  return RunConfig(
      task=DINOConfig(model=model, data=data, momentum_steps=STEPS, teacher_momentum=0.99,
                      center_momentum=0.9, student_temperature=0.1, teacher_temperature=0.04,
                      probe=ProbeConfig(features="pooled", c=0.0)),
      train=TrainConfig(steps=STEPS, batch_size=64, log_every=50, eval_every=0,
                        checkpoint_every=0, seed=0),
      optimizer=OptimizerConfig(learning_rate=5e-4, schedule="cosine", warmup_steps=100,
                                weight_decay=0.04, grad_clip_norm=3.0))

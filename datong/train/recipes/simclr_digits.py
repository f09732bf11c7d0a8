"""SimCLR on the embedded 8x8 digits: NT-Xent between two augmented views; linear probe and k-NN on frozen features.

Views (host, per example and seed): random resized crops (40-100% of the
area) of the digit resampled to 16x16, contrast / brightness jitter,
Gaussian blur (sigma up to 0.75) half the time; no flips (a mirrored digit
is another symbol or none). Encoder: a ViT on 16x16 with 4x4 patches (16
tokens), width 128, depth 4, GAP, sin-cos positions, with a 256-wide
projection MLP to 64-d; NT-Xent at temperature 0.2 over the global batch
of 2 x 128 views, 1000 steps. Evaluation: ``eval/linear_probe_accuracy``
and ``eval/knn_accuracy`` on the frozen encoder's pooled features (MAE's
``mae-digits``: 0.9611); the encoder is exported to
``encoder_params.msgpack`` for fine-tuning. Measured (BENCHMARKS.md, issue
#23, quiet 2-core CPU): at 16x16, probe 0.9472, k-NN 0.9500 in 3m29s; the
same run at 32x32 (mae-digits' resolution, 64 tokens): 0.9417 / 0.9389 in
14m36s, over the 10-minute budget.

    datong train simclr-digits --workdir /tmp/simclr-digits
"""

from datong.backbone import TransformerConfig
from datong.train.config import OptimizerConfig, RunConfig, TrainConfig
from datong.train.tasks.probes import ProbeConfig
from datong.train.tasks.selfsup import SimCLRConfig
from datong.train.tasks.views import ViewData
from datong.unimodal.selfsup import SelfSupConfig
from datong.unimodal.vision import ViTConfig

NAME = "simclr-digits"
METRIC = "eval/linear_probe_accuracy"
TARGET = None  # reported (BENCHMARKS.md)


def encoder() -> ViTConfig:
  return ViTConfig(TransformerConfig(width=128, depth=4, heads=2, mlp_dim=256),
                   image_size=(16, 16), patch_size=(4, 4), channels=1, pool="gap",
                   posemb="sincos")


def config() -> RunConfig:
  model = SelfSupConfig(encoder(), head="simclr", hidden=256, out_dim=64)
  return RunConfig(
      task=SimCLRConfig(model=model, data=ViewData(global_size=(16, 16), global_views=2,
                                                   global_scale=(0.4, 1.0), jitter=0.4,
                                                   blur=0.5, blur_sigma=0.75, flip=False),
                        temperature=0.2, probe=ProbeConfig(features="pooled", c=0.0)),
      train=TrainConfig(steps=1000, batch_size=128, log_every=50, eval_every=0,
                        checkpoint_every=0, seed=0),
      optimizer=OptimizerConfig(learning_rate=1e-3, schedule="cosine", warmup_steps=100,
                                weight_decay=0.05, grad_clip_norm=1.0))

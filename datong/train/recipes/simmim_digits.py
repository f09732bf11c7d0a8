"""SimMIM on the embedded 8x8 digits: linear probe reported.

Expected (2-core CPU shared with other jobs, float32): ``eval/linear_probe_accuracy``
and ``eval/knn_accuracy`` on the fixed 360-image test split in under 10
minutes wall time. Measured (load average ~7, 78% CPU): token-map probe 0.9306, k-NN 0.8889,
pooled (GAP) probe 0.5611, in 5m32s wall.

Model: ViT on 8x8 images with 2x2 patches (16 tokens), width 96, depth 4,
GAP, learned positions, a learned mask token; masks drawn on 4x4-pixel
cells (2x2 model patches: SimMIM's 32-over-16 scaled down), ratio 0.5;
linear head to raw pixels; L1 on masked pixels. Probe: logistic regression
on the flattened patch-token map (``eval/linear_probe_accuracy``) and on
the pooled feature (``eval/pooled_linear_probe_accuracy``).

    datong train simmim-digits --workdir /tmp/simmim-digits
"""

from datong.backbone import TransformerConfig
from datong.train.config import OptimizerConfig, RunConfig, TrainConfig
from datong.unimodal.masked_image import SimMIMConfig
from datong.unimodal.vision import ViTConfig
from datong.train.tasks.images import ImageData
from datong.train.tasks.probes import ProbeConfig
from datong.train.tasks.vision import SimMIMTaskConfig

NAME = "simmim-digits"
METRIC = "eval/linear_probe_accuracy"
TARGET = None  # reported


def config() -> RunConfig:
  encoder = ViTConfig(TransformerConfig(width=96, depth=4, heads=4, mlp_dim=192),
                      image_size=(8, 8), patch_size=(2, 2), channels=1, pool="gap",
                      posemb="learned", mask_token=True)
  return RunConfig(
      task=SimMIMTaskConfig(model=SimMIMConfig(encoder, mask_patch_size=4, mask_ratio=0.5),
                            data=ImageData(upsample=1, crop_pad=1, shift=1.0, rotate=10.0,
                                        scale=0.1),
                            probe=ProbeConfig(features="tokens", c=0.1)),
      train=TrainConfig(steps=800, batch_size=128, log_every=100, eval_every=0,
                        checkpoint_every=0, seed=0),
      optimizer=OptimizerConfig(learning_rate=1e-3, schedule="cosine", warmup_steps=100,
                                b2=0.95, weight_decay=0.05, grad_clip_norm=1.0))

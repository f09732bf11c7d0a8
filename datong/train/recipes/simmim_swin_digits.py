"""SimMIM on a Swin encoder on the embedded 8x8 digits: linear probe reported.

Expected (2-core CPU, float32): ``eval/linear_probe_accuracy`` and
``eval/knn_accuracy`` on the fixed 360-image test split in under 10 minutes
wall time, next to ``simmim-digits`` (the same objective on a ViT). Measured:
see BENCHMARKS.md.

Model: a Swin on the raw 8x8 images with 1x1 patches (an 8x8 grid): 2
layers at width 48 (2 heads) in 4x4 windows (the second shifted), a patch
merging to 4x4, 2 layers at width 96 (4 heads) in one window; a learned mask
token after the stem. Masks are drawn on 4x4-pixel cells (as
``simmim-digits``; a multiple of the encoder's output stride 2), ratio 0.5;
a linear head predicts the 2x2 pixels of each output token; L1 on masked
pixels. Probe: logistic regression on the flattened final token map
(``eval/linear_probe_accuracy``, 16 tokens x 96, the size of
``simmim-digits``' map) and on the pooled feature.

    datong train simmim-swin-digits --workdir /tmp/simmim-swin-digits
"""

from datong.train.config import OptimizerConfig, RunConfig, TrainConfig
from datong.train.tasks.images import ImageData
from datong.train.tasks.probes import ProbeConfig
from datong.train.tasks.vision import SimMIMTaskConfig
from datong.unimodal.masked_image import SimMIMConfig
from datong.unimodal.swin import SwinConfig, swin_backbone

NAME = "simmim-swin-digits"
METRIC = "eval/linear_probe_accuracy"
TARGET = None  # reported


def config() -> RunConfig:
  depths, heads = (2, 2), (2, 4)
  encoder = SwinConfig(swin_backbone(48, depths, heads, mlp_ratio=2), depths=depths,
                       heads=heads, window_size=4, image_size=(8, 8), patch_size=(1, 1),
                       channels=1, mask_token=True)
  return RunConfig(
      task=SimMIMTaskConfig(model=SimMIMConfig(encoder, mask_patch_size=4, mask_ratio=0.5),
                            data=ImageData(upsample=1, crop_pad=1, shift=1.0, rotate=10.0,
                                           scale=0.1),
                            probe=ProbeConfig(features="tokens", c=0.1)),
      train=TrainConfig(steps=800, batch_size=128, log_every=100, eval_every=0,
                        checkpoint_every=0, seed=0),
      optimizer=OptimizerConfig(learning_rate=1e-3, schedule="cosine", warmup_steps=100,
                                b2=0.95, weight_decay=0.05, grad_clip_norm=1.0))

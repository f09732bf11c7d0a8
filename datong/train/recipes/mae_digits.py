"""MAE on the embedded 8x8 digits: linear probe on frozen features >= 95%.

Measured on a quiet 2-core CPU (float32, jax 0.10.2), 8m57s wall (9m32s
in a re-run with the same result): ``eval/linear_probe_accuracy``
**0.9611** (logistic regression on the frozen, global-average-pooled
encoder output; raw pixels: 90.0%), k-NN 0.9028. The workdir also gets a
PNG of test reconstructions (``mae_reconstructions_step<N>.png``: input |
masked | reconstruction) and ``encoder_params.msgpack``.

Model: encoder ViT on the 4x upsampled 32x32 digits with 4x4 patches (64
tokens, 48 masked), width 128, depth 4, 2 heads, GAP, fixed 2-D sin-cos
positions; decoder width 64, depth 8; raw-pixel targets. What moved the
probe (BENCHMARKS.md, session 3):

- the probe is fit on the train images plus 3 augmented copies
  (``train_views=4``), as MAE's own linear probe trains with augmentation:
  0.925 -> 0.961 on the same encoder;
- an 8-block decoder (MAE's paper also finds deeper decoders give better
  linear probes): with 4 blocks the pooled probe peaked mid-run (~0.95) and
  fell to 0.936-0.942 by the end (MAE's explanation, not tested here: a
  shallow decoder leaves the encoder's last blocks to specialize in
  reconstruction);
- raw-pixel targets: a 4x4 patch here is about one source pixel, so the
  per-patch normalized target is mostly interpolation gradient.

The probe's L2 strength is chosen by 3-fold cross-validation with the views
of one image kept in one fold.

    datong train mae-digits --workdir /tmp/mae-digits
"""

from datong.backbone import TransformerConfig
from datong.train.config import OptimizerConfig, RunConfig, TrainConfig
from datong.unimodal.masked_image import MAEConfig
from datong.unimodal.vision import ViTConfig
from datong.train.tasks.images import ImageData
from datong.train.tasks.probes import ProbeConfig
from datong.train.tasks.vision import MAETaskConfig

NAME = "mae-digits"
METRIC = "eval/linear_probe_accuracy"
TARGET = (">=", 0.95)


def config() -> RunConfig:
  encoder = ViTConfig(TransformerConfig(width=128, depth=4, heads=2, mlp_dim=256),
                      image_size=(32, 32), patch_size=(4, 4), channels=1, pool="gap",
                      posemb="sincos")
  decoder = TransformerConfig(width=64, depth=8, heads=2, mlp_dim=128)
  return RunConfig(
      task=MAETaskConfig(model=MAEConfig(encoder, decoder, mask_ratio=0.75, norm_pix_loss=False),
                         data=ImageData(upsample=4, crop_pad=1, shift=4.0, rotate=10.0,
                                        scale=0.1),
                         probe=ProbeConfig(features="pooled", c=0.0, train_views=4)),
      train=TrainConfig(steps=1150, batch_size=64, log_every=100, eval_every=0,
                        checkpoint_every=0, seed=0),
      optimizer=OptimizerConfig(learning_rate=1e-3, schedule="cosine", warmup_steps=100,
                                b2=0.95, weight_decay=0.05, grad_clip_norm=1.0))

"""MAE on the embedded 8x8 digits: linear probe on frozen features >= 95%.

Expected (2-core CPU shared with other jobs, float32):
``eval/linear_probe_accuracy`` >= 0.95 on the fixed 360-image test split
(logistic regression on raw pixels: 90.0%) in under 10 minutes wall time;
also ``eval/knn_accuracy`` and a PNG of test reconstructions
(``mae_reconstructions_step<N>.png``: input | masked | reconstruction) and
``encoder_params.msgpack`` in the workdir. Measured numbers are in the
final report / BENCHMARKS.md. Measured (load average ~9, 48% CPU): token-map
probe 0.9444, k-NN 0.9361, pooled [CLS] probe 0.8139, in 8m27s wall: the 95%
target is NOT yet met (an untrained tiny encoder's token map probes at ~0.91).

Model: encoder ViT on 8x8 images with 2x2 patches (16 tokens, 12 masked),
width 96, depth 4, [CLS], fixed 2-D sin-cos positions; decoder width 64,
depth 2; per-patch normalized pixel targets. Probe: logistic regression on
the standardized, flattened patch-token map of the full (unmasked) image
(``eval/linear_probe_accuracy``) and on the pooled [CLS] feature
(``eval/pooled_linear_probe_accuracy``).

    datong train mae-digits --workdir /tmp/mae-digits
"""

from datong.backbone import TransformerConfig
from datong.train.config import OptimizerConfig, RunConfig, TrainConfig
from datong.unimodal.masked_image import MAEConfig
from datong.unimodal.vision import ViTConfig
from datong.unimodal.vision_tasks import ImageData, MAETaskConfig, ProbeConfig

NAME = "mae-digits"


def config() -> RunConfig:
  encoder = ViTConfig(TransformerConfig(width=96, depth=4, heads=4, mlp_dim=192),
                      image_size=(8, 8), patch_size=(2, 2), channels=1, pool="cls",
                      posemb="sincos")
  decoder = TransformerConfig(width=64, depth=2, heads=4, mlp_dim=128)
  return RunConfig(
      task=MAETaskConfig(model=MAEConfig(encoder, decoder, mask_ratio=0.75, norm_pix_loss=True),
                         data=ImageData(upsample=1, crop_pad=1, shift=1.0, rotate=10.0,
                                        scale=0.1),
                         probe=ProbeConfig(features="tokens", c=0.1)),
      train=TrainConfig(steps=1000, batch_size=128, log_every=100, eval_every=0,
                        checkpoint_every=0, seed=0),
      optimizer=OptimizerConfig(learning_rate=1e-3, schedule="cosine", warmup_steps=100,
                                b2=0.95, weight_decay=0.05, grad_clip_norm=1.0))

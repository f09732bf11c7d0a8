"""Supervised ViT on the embedded 8x8 digits: test accuracy >= 98%.

Expected (2-core CPU shared with other jobs, float32): ``eval/accuracy``
>= 0.98 on the fixed 360-image test split (logistic regression on raw
pixels 90.0%, RBF SVM 94.2%, 1-NN 95.6%) in under 10 minutes wall time.
Measured (this recipe, load average ~10 on the 2-core CPU, the job got 35% CPU):
eval/accuracy 0.9361 in 17m12s wall (283 s user CPU): the 98% target is NOT
yet met; see BENCHMARKS.md.

Model: ViT on 8x8 images with 2x2 patches (16 tokens), width 96, depth 4,
4 heads, global-average pooling, learned position embeddings. Training:
random integer shifts (host) and random sub-pixel shifts / rotations /
scalings (device), label smoothing 0.1. Evaluation averages the softmax
over the 9 one-pixel shifts of each test image (``task.tta_shift=1``).

    datong train vit-digits --workdir /tmp/vit-digits

Fine-tuning a pretrained encoder with layer-wise lr decay (the encoder
must have the same shape, e.g. from ``mae-digits`` with pool=gap):

    datong train vit-digits --workdir /tmp/vit-ft \
        --set task.pretrained=/tmp/mae-digits/encoder_params.msgpack \
        --set task.layer_decay=0.75
"""

from datong.backbone import TransformerConfig
from datong.train.config import OptimizerConfig, RunConfig, TrainConfig
from datong.unimodal.vision import ViTConfig
from datong.unimodal.vision_tasks import ImageData, ViTClassifierConfig

NAME = "vit-digits"


def config() -> RunConfig:
  backbone = TransformerConfig(width=96, depth=4, heads=4, mlp_dim=192)
  model = ViTConfig(backbone, image_size=(8, 8), patch_size=(2, 2), channels=1, pool="gap",
                    posemb="learned")
  return RunConfig(
      task=ViTClassifierConfig(model=model,
                               data=ImageData(upsample=1, crop_pad=1, shift=1.0, rotate=10.0,
                                              scale=0.1),
                               label_smoothing=0.1, mixup=0.0, tta_shift=1),
      train=TrainConfig(steps=1400, batch_size=128, log_every=100, eval_every=0,
                        checkpoint_every=0, seed=0),
      optimizer=OptimizerConfig(learning_rate=1e-3, schedule="cosine", warmup_steps=100,
                                weight_decay=0.05, grad_clip_norm=1.0))

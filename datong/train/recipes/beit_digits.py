"""BEiT on the embedded 8x8 digits: masked prediction of a VQ-VAE's visual tokens, linear probe >= 95%.

Model: a BEiT encoder (``unimodal.beit.beit_encoder``) on 8x8 images with 2x2
patches (a 4 x 4 grid, 16 tokens), width 96, depth 4: [CLS], mask token,
per-layer relative-position bias with [CLS] entries, layer scale 0.1, keys
without bias, mean pooling with a LayerNorm. Blockwise masks (ratio 0.4,
minimum block scaled from the paper's 16 of 196 patches to 1 of 16, aspect
0.3-3.3). Targets: the token ids of a ``vqvae-digits`` run (its workdir is
``task.tokenizer_path``; ``REQUIRES`` says so to ``bench/recipes.py``), or,
needing no other run, each patch's nearest of 64 k-means centroids of
training patches (``--set task.tokenizer=kmeans``). 1600 steps. Probe:
logistic regression on the flattened patch-token map
(``eval/linear_probe_accuracy``, target >= 0.95; fit on the train images and
3 augmented copies, L2 strength by 3-fold cross-validation, as mae-digits)
and on the pooled feature. What moved the probe (BENCHMARKS.md, issue #20):
k-means targets 800 steps 0.9000 (0.9389 with the augmented, cross-validated
probe), 1600 steps 0.9444; VQ-VAE targets at 1600 steps 0.9528.

    datong train vqvae-digits --workdir /tmp/vqvae-digits     # about a minute
    datong train beit-digits --workdir /tmp/beit-digits --set task.tokenizer_path=/tmp/vqvae-digits
"""

from datong.backbone import TransformerConfig
from datong.train.config import OptimizerConfig, RunConfig, TrainConfig
from datong.train.tasks.images import ImageData
from datong.train.tasks.probes import ProbeConfig
from datong.train.tasks.visual_tokens import BEiTTaskConfig
from datong.unimodal.beit import BEiTConfig, beit_encoder

NAME = "beit-digits"
METRIC = "eval/linear_probe_accuracy"
TARGET = (">=", 0.95)
REQUIRES = {"task.tokenizer_path": "vqvae-digits"}


def config() -> RunConfig:
  encoder = beit_encoder(TransformerConfig(width=96, depth=4, heads=4, mlp_dim=192),
                         image_size=(8, 8), patch_size=(2, 2), channels=1,
                         relative_position_bias="layer", layer_scale=0.1, mean_pool=True)
  return RunConfig(
      task=BEiTTaskConfig(model=BEiTConfig(encoder, vocab_size=64, mask_ratio=0.4),
                          data=ImageData(upsample=1, crop_pad=1, shift=1.0, rotate=10.0,
                                         scale=0.1),
                          probe=ProbeConfig(features="tokens", c=0.0, train_views=4),
                          tokenizer="vqvae"),
      train=TrainConfig(steps=1600, batch_size=128, log_every=100, eval_every=0,
                        checkpoint_every=0, seed=0),
      optimizer=OptimizerConfig(learning_rate=1e-3, schedule="cosine", warmup_steps=100,
                                b2=0.95, weight_decay=0.05, grad_clip_norm=1.0))

"""A VQ-VAE visual tokenizer on the embedded 8x8 digits: reconstruction error and codebook use.

Model (``unimodal.visual_tokenizer.VQVAE``): 2x2 patches (16 tokens per
image), a width-64 depth-2 Transformer encoder, 16-d codes, a 64-code
codebook seeded by k-means on encoder outputs of 512 training images, a
width-64 depth-2 decoder to pixels; loss = pixel MSE + 0.25 x commitment
(straight-through). The codes move by exponential moving averages (decay
0.99) of the encoder outputs assigned to them, and a code whose moving
share of the assignments falls below 3% of the uniform share restarts at a
random encoder output of the batch (both in the train step:
``Task.post_update``). At 150 steps this beat the codebook-loss update
(test recon MSE 0.0587 vs 0.0649, codebook usage 0.81 vs 0.72;
BENCHMARKS.md, issue #20). Reports ``eval/recon_mse`` (pixels in
[-1, 1]), ``eval/codebook_usage`` and ``eval/perplexity`` on the test split,
and a PNG of reconstructions. Its workdir is a BEiT tokenizer
(``BEiTTaskConfig(tokenizer="vqvae", tokenizer_path=WORKDIR, ...)``).

    datong train vqvae-digits --workdir /tmp/vqvae-digits
"""

from datong.backbone import TransformerConfig
from datong.train.config import OptimizerConfig, RunConfig, TrainConfig
from datong.train.tasks.images import ImageData
from datong.train.tasks.visual_tokens import VQVAETaskConfig
from datong.unimodal.visual_tokenizer import VQVAEConfig

NAME = "vqvae-digits"
METRIC = "eval/recon_mse"
TARGET = None  # reported, with eval/codebook_usage and eval/perplexity


def model() -> VQVAEConfig:
  bb = TransformerConfig(width=64, depth=2, heads=4, mlp_dim=128)
  return VQVAEConfig(bb, bb, image_size=(8, 8), patch_size=(2, 2), channels=1,
                     codebook_size=64, code_dim=16, commitment=0.25, codebook_update="ema",
                     ema_decay=0.99, dead_code_threshold=0.03)


def config() -> RunConfig:
  return RunConfig(
      task=VQVAETaskConfig(model=model(), data=ImageData(upsample=1), kmeans_images=512),
      train=TrainConfig(steps=1000, batch_size=128, log_every=100, eval_every=0,
                        checkpoint_every=0, seed=0),
      optimizer=OptimizerConfig(learning_rate=1e-3, schedule="cosine", warmup_steps=50,
                                weight_decay=0.0, grad_clip_norm=1.0))

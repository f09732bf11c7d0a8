"""iGPT on the embedded 8x8 digits: palette-index sequences, per-layer linear probe and samples.

Palette: 16 intensity clusters (k-means on the pixels of 1,000 training
images, sorted dark to light); each image is 64 palette ids in raster order
after a start token. Model: the shared GPT (learned positions, tied head),
width 96, depth 6, 4 heads; the GPT objective (next-pixel cross-entropy).
Reports ``eval/bits_per_pixel``, the probe curve over depth
(``eval/layer{l}_linear_probe_accuracy``: logistic regression on the
layer's hidden states at every pixel, flattened; L2 strength by 3-fold
cross-validation), its best layer (``eval/best_layer``) and accuracy
(``eval/linear_probe_accuracy``, target >= 0.93), and writes a PNG grid of
32 KV-cache samples (temperature 1). 700 steps, to fit 10 CPU-minutes with
the probes. From the same 700-step model (BENCHMARKS.md, issue #20): the
layer's mean over positions (iGPT's own probe) gives 0.811-0.828 over the
six layers; every pixel's state, c = 0.1: 0.911-0.922; cross-validated:
0.914-0.925 (best: layers 2 and 5). Raw pixels give 0.90.

    datong train igpt-digits --workdir /tmp/igpt-digits
"""

from datong.backbone import TransformerConfig
from datong.train.config import OptimizerConfig, RunConfig, TrainConfig
from datong.train.tasks.igpt import IGPTTaskConfig
from datong.train.tasks.images import ImageData
from datong.train.tasks.probes import ProbeConfig
from datong.unimodal.igpt import IGPTConfig

NAME = "igpt-digits"
METRIC = "eval/linear_probe_accuracy"
TARGET = (">=", 0.93)


def config() -> RunConfig:
  model = IGPTConfig(TransformerConfig(width=96, depth=6, heads=4, mlp_dim=384),
                     image_size=(8, 8), channels=1, palette_size=16)
  return RunConfig(
      task=IGPTTaskConfig(model=model, data=ImageData(upsample=1),
                          probe=ProbeConfig(features="tokens", c=0.0), palette_images=1000,
                          samples=32),
      train=TrainConfig(steps=700, batch_size=128, log_every=100, eval_every=0,
                        checkpoint_every=0, seed=0),
      optimizer=OptimizerConfig(learning_rate=1e-3, schedule="cosine", warmup_steps=100,
                                b2=0.95, weight_decay=0.05, grad_clip_norm=1.0))

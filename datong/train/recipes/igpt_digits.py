"""iGPT on the embedded 8x8 digits: palette-index sequences, per-layer linear probe and samples.

Palette: 16 intensity clusters (k-means on the pixels of 1,000 training
images, sorted dark to light); each image is 64 palette ids in raster order
after a start token. Model: the shared GPT (learned positions, tied head),
width 96, depth 6, 4 heads; the GPT objective (next-pixel cross-entropy) on
the images as they are (``train_augment=False``), 700 steps. Reports
``eval/bits_per_pixel``, the probe curve over depth
(``eval/layer{l}_linear_probe_accuracy``: logistic regression, C = 0.1, on
the layer's hidden states at every pixel, flattened, fit on the train images
plus 3 augmented views of them: shift 1 pixel, rotation 10 degrees, scale
0.1), its best layer (``eval/best_layer``) and accuracy
(``eval/linear_probe_accuracy``, target >= 0.93), and writes a PNG grid of
32 KV-cache samples (temperature 1).

Measured on the 700-step model (``python bench/reevaluate.py igpt-digits
WORKDIR``, machine load ~6-9 on 2 cores): layers 1-6: 0.925, 0.950, 0.942,
0.939, 0.928, 0.906; best layer 2, 0.950; 2.096 bits/pixel; the evaluation
took 249 CPU-seconds (user + sys). Without the augmented views the same
model's curve is 0.911-0.922 (C = 0.1). Raw pixels give 0.90. The whole
recipe, end to end on the quiet 2-core CPU (BENCHMARKS.md recipe table,
4404b8a): the same curve and 0.9500 in 8m56s (CPU 16m06s).

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
      task=IGPTTaskConfig(model=model,
                          data=ImageData(upsample=1, shift=1.0, rotate=10.0, scale=0.1),
                          train_augment=False,
                          probe=ProbeConfig(features="tokens", c=0.1, train_views=4),
                          palette_images=1000, samples=32),
      train=TrainConfig(steps=700, batch_size=128, log_every=100, eval_every=0,
                        checkpoint_every=0, seed=0),
      optimizer=OptimizerConfig(learning_rate=1e-3, schedule="cosine", warmup_steps=100,
                                b2=0.95, weight_decay=0.05, grad_clip_norm=1.0))

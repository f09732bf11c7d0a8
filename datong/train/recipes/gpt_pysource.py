"""GPT on the Python standard library's sources: held-out bits per byte vs xz -9.

The corpus for scaling laws (``pysource_text``: ~11.5 MB of training code,
so every run here is single-epoch; 553 KB of held-out packages). The anchor
is ``pysource_xz_baseline()``: xz -9 on the held-out split given all of the
training split, 1.408 bits/byte on Python 3.11.7.

Model as ``gpt-pydoc``: 4 layers, width 192, 4 heads, rotary positions,
sequence 256, packed modules (no attention across them), a byte-level BPE
of 1024 ids learned from the training split at task build. Held-out
evaluation scores every token once with >= 128 tokens of context.

    datong train gpt-pysource --workdir /tmp/gpt-pysource

Scaling-law sweeps run on it (``datong sweep gpt-pysource ...``; README).
"""

from datong.backbone import TransformerConfig
from datong.train.config import OptimizerConfig, RunConfig, TrainConfig
from datong.train.tasks.text import GPTTaskConfig
from datong.unimodal.text import TextConfig

NAME = "gpt-pysource"
METRIC = "eval/bits_per_byte"
TARGET = None  # reported next to the xz -9 anchor (1.408 on 3.11.7), not a bound


def config() -> RunConfig:
  backbone = TransformerConfig(width=192, depth=4, heads=4, mlp_dim=768, activation="gelu_tanh",
                               norm_eps=1e-5, kernel_init="normal", init_std=0.02,
                               use_bias=False)
  model = TextConfig(backbone=backbone, vocab_size=1024, positions="rope", tie_embeddings=True)
  return RunConfig(
      task=GPTTaskConfig(model=model, seq_length=256, z_loss=1e-4, tokenizer="bpe:1024",
                         dataset="pysource_text"),
      train=TrainConfig(steps=700, batch_size=8, log_every=25, eval_every=350,
                        checkpoint_every=0, seed=0),
      optimizer=OptimizerConfig(learning_rate=2e-3, schedule="cosine", warmup_steps=20,
                                end_learning_rate_factor=0.1, b2=0.95, weight_decay=0.1,
                                grad_clip_norm=1.0))

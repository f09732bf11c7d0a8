"""GPT byte-level causal LM on Python's docs: beats xz -9 on held-out topics.

Expected (2-core CPU, float32, shared machine): held-out ``eval/bits_per_byte``
below 1.79 (xz -9 given the training text: ``pydoc_xz_baseline()``) in under
10 minutes. Measured numbers are in the final report / BENCHMARKS.md.

Model: 4 layers, width 192, 4 heads (1.8M parameters), rotary positions, tied byte embeddings
(262 ids), sequence 256, packed documents (no attention across topics).

    datong train gpt-pydoc --workdir /tmp/gpt-pydoc
"""

from datong.backbone import TransformerConfig
from datong.train.config import OptimizerConfig, RunConfig, TrainConfig
from datong.unimodal.text import GPTTaskConfig, TextConfig

NAME = "gpt-pydoc"


def config() -> RunConfig:
  backbone = TransformerConfig(width=192, depth=4, heads=4, mlp_dim=768, activation="gelu_tanh",
                               norm_eps=1e-5, kernel_init="normal", init_std=0.02,
                               use_bias=False)
  model = TextConfig(backbone=backbone, positions="rope", tie_embeddings=True)
  return RunConfig(
      task=GPTTaskConfig(model=model, seq_length=256, z_loss=1e-4),
      train=TrainConfig(steps=240, batch_size=8, log_every=25, eval_every=0,
                        checkpoint_every=0, seed=0),
      optimizer=OptimizerConfig(learning_rate=3e-3, schedule="cosine", warmup_steps=20,
                                end_learning_rate_factor=0.1, b2=0.95, weight_decay=0.1,
                                grad_clip_norm=1.0))

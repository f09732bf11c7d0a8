"""BERT byte-level masked LM on Python's docs: masked-byte accuracy on held-out topics.

Reports ``eval/mlm_accuracy`` on the ``validation`` topics (15% of held-out
bytes selected, 80/10/10, masks fixed by ``eval_seed``). Measured on a quiet
2-core CPU (float32, jax 0.10.2): 750 steps in 8m14s wall,
eval/mlm_accuracy 0.4887, eval/mlm_loss 1.91 nats over the 4,846 masked
bytes. The learning rate matters most: at 300 steps, 1e-2 / 4e-3 / 1.5e-3 /
7e-4 / 3e-4 give 0.196 / 0.202 / 0.274 / 0.344 / 0.349 (BENCHMARKS.md);
with only 15% of bytes carrying a loss, a high rate keeps the model near
the unigram level for most of the run.

Model: 4 layers, width 192, 4 heads (1.8M parameters), pre-LN, rotary positions, tied byte
embeddings, sequence 256, packed documents (no attention across topics).

    datong train bert-pydoc --workdir /tmp/bert-pydoc
"""

from datong.backbone import TransformerConfig
from datong.train.config import OptimizerConfig, RunConfig, TrainConfig
from datong.train.tasks.text import BERTTaskConfig
from datong.unimodal.text import TextConfig

NAME = "bert-pydoc"
METRIC = "eval/mlm_accuracy"
TARGET = None  # reported


def config() -> RunConfig:
  backbone = TransformerConfig(width=192, depth=4, heads=4, mlp_dim=768, activation="gelu",
                               norm_eps=1e-5, kernel_init="normal", init_std=0.02,
                               use_bias=False)
  model = TextConfig(backbone=backbone, positions="rope", tie_embeddings=True)
  return RunConfig(
      task=BERTTaskConfig(model=model, seq_length=256),
      train=TrainConfig(steps=750, batch_size=8, log_every=25, eval_every=250,
                        checkpoint_every=0, seed=0),
      optimizer=OptimizerConfig(learning_rate=7e-4, schedule="cosine", warmup_steps=20,
                                end_learning_rate_factor=0.1, b2=0.95, weight_decay=0.1,
                                grad_clip_norm=1.0))

"""Feature distillation from CLIP on the digits: a ViT's tokens predict a clip-digits image tower's whitened token features; linear probe and k-NN on frozen features.

Measured (BENCHMARKS.md, "Teachers and students"): probe 0.8528, k-NN
0.8389 in 0m38s; fine-tuned (``bench/finetune.py``) 0.800, against 0.489
for the same ViT from scratch and 0.972 for CLIP's tower itself. The
teacher is a ``clip-digits`` run's workdir
(its image encoder is found in the run's settings and params) or an
exported image-encoder ``.msgpack`` with ``task.teacher_model`` matching
it (the default: clip-digits' image tower):

    datong train clip-digits --workdir /tmp/clip-digits
    datong train fd-clip-digits --workdir /tmp/fd-clip --set task.teacher=/tmp/clip-digits

Student: ViT on the 8x8 digits with 2x2 patches (16 tokens), width 64,
depth 4, GAP, plus a linear head to the teacher's width (128). Target: the
teacher's last token map (2x2 tokens, bilinearly resized to the student's
4x4 grid), whitened per token (a LayerNorm with no parameters); loss:
smooth-L1 with beta 2 (Wei et al., "Contrastive learning rivals masked
image modeling in fine-tuning via feature distillation"). Training augments
the images on device (shift / rotation / scaling; teacher and student see
the same ones). Evaluation: the student encoder's linear probe and k-NN;
the encoder is exported to ``encoder_params.msgpack`` for fine-tuning.
"""

from datong.backbone import TransformerConfig
from datong.train.config import OptimizerConfig, RunConfig, TrainConfig
from datong.train.recipes import clip_digits
from datong.train.tasks.distill import FeatureDistillConfig, find_encoder_config
from datong.train.tasks.images import ImageData
from datong.train.tasks.probes import ProbeConfig
from datong.unimodal.vision import ViTConfig

NAME = "fd-clip-digits"
METRIC = "eval/linear_probe_accuracy"
TARGET = None  # reported (BENCHMARKS.md)
REQUIRES = {"task.teacher": "clip-digits"}


def config() -> RunConfig:
  student = ViTConfig(TransformerConfig(width=64, depth=4, heads=2, mlp_dim=128),
                      image_size=(8, 8), patch_size=(2, 2), channels=1, pool="gap",
                      posemb="learned")
  teacher = find_encoder_config(clip_digits.config().task)
  return RunConfig(
      task=FeatureDistillConfig(student=student, teacher="", teacher_model=teacher,
                                layer="last", loss="smooth_l1", beta=2.0,
                                data=ImageData(shift=1.0, rotate=10.0, scale=0.1),
                                probe=ProbeConfig(features="pooled", c=0.0)),
      train=TrainConfig(steps=1000, batch_size=64, log_every=50, eval_every=0,
                        checkpoint_every=0, seed=0),
      optimizer=OptimizerConfig(learning_rate=1e-3, schedule="cosine", warmup_steps=50,
                                weight_decay=0.05, grad_clip_norm=1.0))

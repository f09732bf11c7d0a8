"""Knowledge distillation on the digits: a ViT at ~1/4 of vit-digits' FLOPs learns from a vit-digits run.

Measured (BENCHMARKS.md, "Teachers and students"): 0.9694 distilled vs
0.9472 for the same student alone, teacher 0.9778, in 7m42s (CPU 5m40s).
The teacher is a ``vit-digits`` run's workdir
(or its HF export, or a ``.msgpack`` of its params with ``task.teacher_model``
matching it, which is the default: vit-digits' task settings):

    datong train vit-digits --workdir /tmp/vit-digits
    datong train distill-vit-digits --workdir /tmp/distill-vit \
        --set task.teacher=/tmp/vit-digits

Student: the vit-digits ViT at width 32, depth 3 (0.23x the teacher's
FLOPs per image), same data and augmentation. Loss: ``0.5 * T^2
KL(teacher || student) + 0.5 * CE(labels)`` at ``T = 2``; teacher and
student see the same augmented images. Reports the student's
``eval/accuracy`` (with the same test-time shifts as vit-digits).
``--set task.distill_token=true``: DeiT's variant (a distillation token
and head learn from the teacher, the class head from the labels;
predictions average both heads).
"""

import dataclasses

from datong.backbone import TransformerConfig
from datong.train.config import RunConfig
from datong.train.recipes import vit_digits
from datong.train.tasks.distill import LogitDistillConfig

NAME = "distill-vit-digits"
METRIC = "eval/accuracy"
TARGET = None  # reported (BENCHMARKS.md)
REQUIRES = {"task.teacher": "vit-digits"}


def config() -> RunConfig:
  base = vit_digits.config()
  teacher = base.task
  student = dataclasses.replace(teacher, model=teacher.model.replace(
      backbone=TransformerConfig(width=32, depth=3, heads=2, mlp_dim=64)))
  return dataclasses.replace(base, task=LogitDistillConfig(
      student=student, teacher="", teacher_model=teacher, temperature=2.0, alpha=0.5))

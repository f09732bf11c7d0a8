"""SigLIP on the embedded digit captions: zero-shot digit classification >= 95%.

Expected (2-core CPU shared with other jobs, float32): ``eval/zero_shot_accuracy``
>= 0.95 on the 360 test digits, with prompts (``ZERO_SHOT_TEMPLATES`` filled
with each digit's name and numeral) that no training caption uses, plus
class-level retrieval recall (``eval/i2t_recall@1`` etc.), in under 10
minutes wall time. Measured numbers are in the final report / BENCHMARKS.md.

The towers of ``clip-digits`` trained with SigLIP's pairwise sigmoid loss
(learnable temperature and bias, initialized at 10 and -10), computed in
chunks of 32 texts (``lax.scan`` with a rematerialized body) so the loss
never holds a ``[batch, batch]`` array. The temperature and bias learn at
10x the learning rate (``task.logit_lr_scale``; measured at 1000 steps on an
earlier stack: zero-shot 0.9556 vs 0.9500 at 1x, one run each). 2000 steps,
twice CLIP's: at 1000 the result sat on the target (0.9472 with today's
packages, where the commit that first measured 0.9556 gives 0.9444); 2000
steps give 0.9639 with seed 0 and with seed 1 (BENCHMARKS.md).

    datong train siglip-digits --workdir /tmp/siglip-digits

LiT (locked image tower from a ViT / MAE / CLIP run, text tower trained):

    datong train siglip-digits --workdir /tmp/lit-digits \\
        --set task.image_init=/tmp/clip-digits --set task.lock_image=encoder
"""

import dataclasses

from datong.train.recipes import clip_digits

NAME = "siglip-digits"
METRIC = "eval/zero_shot_accuracy"
TARGET = (">=", 0.95)


def config():
  base = clip_digits.config()
  task = dataclasses.replace(base.task, model=clip_digits.model("sigmoid"), chunk_size=32,
                             logit_lr_scale=10.0)
  return dataclasses.replace(base, task=task, train=dataclasses.replace(base.train, steps=2000))

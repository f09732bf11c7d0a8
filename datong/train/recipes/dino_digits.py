"""DINO on the embedded 8x8 digits: self-distillation with an EMA teacher, centering and sharpening (multi-crop available); linear probe and k-NN on frozen features.

Issue #23: the first version (4 local 8x8 crops of 10-40% of the digit,
jitter 0.4, teacher temperature 0.04) collapsed to the uniform output (loss
ln 256, probe 0.836 / k-NN 0.689, BENCHMARKS.md). The implementation checks
out against DINO (tests/test_selfsup.py); the cause was the views: at
initialization the encoder's outputs vary as much between two views of a
digit (brightness / contrast jitter) as between digits, and a local crop of
a few pixels says less about the digit than about where it was cut, so the
best prediction of the teacher's target from another view is its average:
the centered teacher becomes uniform (entropy 5.1 of 5.55 at step 50).
Now: 2 global crops (40-100% of the area) at 16x16, jitter 0.1, Gaussian
blur half the time, no flips, no local crops (``task.data.local_views``
adds them back), and a sharper teacher (temperature 0.02; DINO's 0.04
with these views does not collapse either: probe 0.8917 / k-NN 0.8611 at
1000 steps, entropy 1.38). The student (the simclr-digits ViT + DINO
head: 2 x 256 MLP, 64-d L2-normalized bottleneck, 256 weight-normalized prototypes)
and the teacher, an EMA of the student with momentum 0.99 -> 1 on a cosine,
see both views; the teacher's targets are centered (momentum 0.9) and
sharpened (0.02 vs the student's 0.1). Evaluation:
``eval/linear_probe_accuracy`` and ``eval/knn_accuracy`` on the student
encoder's pooled features; the encoder is exported to
``encoder_params.msgpack``.

Measured (BENCHMARKS.md keeps the collapsed run until it is updated), 2-core
CPU shared with other jobs: ``datong train dino-digits --workdir
/tmp/dino-digits`` (batch 128, learning rate 1e-3 with 200 warmup steps),
1000 steps: probe 0.9111, k-NN 0.8972 in 4m09s under a load average of
1.8-2.3 (run at commit 5280262 as ``--set train.batch_size=128 --set
optimizer.learning_rate=1e-3 --set optimizer.warmup_steps=200``; the
default command at commit f29870d gave the same numbers in 4m00s, load
1.1-2.6); final loss 0.88, teacher entropy 0.21 (of ln 256 = 5.55). Batch 64 at 5e-4 with
100 warmup steps (the previous default, commit b2ed131): 0.9028 / 0.8306
in 4m51s (load 3.2-4.8), final loss 0.93, entropy 0.25; batch 128 at
5e-4: 0.9083 / 0.8778 in 7m54s (load 4.6-4.9), loss 1.02, entropy 0.21.
Below MAE's 0.9611 and simclr-digits' 0.9472 / 0.9500: no longer collapsed,
not at the target. Trials (300 steps unless said, momentum_steps = steps,
learning rate 5e-4 throughout): the previous defaults (batch 64): 0.847 /
0.736 (entropy 1.5); batch 128: 0.853 / 0.792 (entropy 1.7); teacher
momentum 0.996: 0.842 / 0.758 (entropy still 3.1), and at 1000 steps with
batch 128: 0.8944 / 0.8556 (loss 1.91, entropy 0.88); 2 local crops of
30-60% at 12x12: 0.819 / 0.722 (entropy 2.2). Earlier: teacher temperature
0.01 with the old views: 0.814 / 0.639 (entropy falls, then rises to 3.8);
no local crops + 0.02 with jitter 0.4: 0.844 / 0.753 (entropy rises to 4.2);
jitter 0 + no blur: 0.836 / 0.733 with entropy 1.1 (no collapse); 1000 steps
with a 0.02 -> 0.03 teacher warmup over 300 steps and 1024 prototypes:
0.881 / 0.842. The probe's features matter more than any of these: the
batch-64 encoder probed offline (same probe and split) on its 16
last-layer patch tokens flattened (``--set task.probe.features=tokens``,
2048 features; an evaluation change, not used here) gives 0.9528 /
0.9389, 2 x 2-pooled (512) 0.925 / 0.875, every block's mean token (768)
0.906 / 0.842.

    datong train dino-digits --workdir /tmp/dino-digits

The teacher's momentum reaches 1 at ``task.momentum_steps``: set it with
``train.steps`` when changing the run's length. ``task.warmup_teacher_temperature``
/ ``task.teacher_temperature_steps`` (a linear teacher-temperature warmup)
and ``task.freeze_prototypes_steps`` are off here.
"""

from datong.train.config import OptimizerConfig, RunConfig, TrainConfig
from datong.train.recipes.simclr_digits import encoder
from datong.train.tasks.probes import ProbeConfig
from datong.train.tasks.selfsup import DINOConfig
from datong.train.tasks.views import ViewData
from datong.unimodal.selfsup import SelfSupConfig

NAME = "dino-digits"
METRIC = "eval/linear_probe_accuracy"
TARGET = None  # reported (BENCHMARKS.md)

STEPS = 1000


def config() -> RunConfig:
  model = SelfSupConfig(encoder(), head="dino", hidden=256, bottleneck=64, out_dim=256)
  # No local crops and a mild jitter: the teacher's targets must depend on the
  # digit more than on the view (see the module docstring).
  data = ViewData(global_size=(16, 16), local_size=(8, 8), global_views=2, local_views=0,
                  global_scale=(0.4, 1.0), local_scale=(0.1, 0.4), jitter=0.1, blur=0.5,
                  blur_sigma=0.75, flip=False)
  return RunConfig(
      task=DINOConfig(model=model, data=data, momentum_steps=STEPS, teacher_momentum=0.99,
                      center_momentum=0.9, student_temperature=0.1, teacher_temperature=0.02,
                      probe=ProbeConfig(features="pooled", c=0.0)),
      train=TrainConfig(steps=STEPS, batch_size=128, log_every=50, eval_every=0,
                        checkpoint_every=0, seed=0),
      optimizer=OptimizerConfig(learning_rate=1e-3, schedule="cosine", warmup_steps=200,
                                weight_decay=0.04, grad_clip_norm=3.0))

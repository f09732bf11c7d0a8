"""Fine-tune the image encoder of finished runs on the digits, all on one schedule.

    python bench/finetune.py /tmp/s10/fd-clip-digits /tmp/s10/clip-digits /tmp/mae-digits
    python bench/finetune.py RUN... --steps 1000 --layer-decay 0.75 --out ft.json

For each run: its encoder's settings are read from the run's stored config
(the first image-encoder config in its task: a student before its teacher,
CLIP's image tower, MAE's encoder), its weights from the run's exported
``encoder_params.msgpack`` when there is one (a distillation run's student;
its workdir also holds the teacher) and otherwise from its checkpoint
(``warmstart.find_encoder``). The classifier is ``vit-digits``' task and
optimizer (augmentation, label smoothing, test-time shifts) at the encoder's
resolution (digits upsampled to its image size, shifts scaled with it), with
``--steps`` steps and layer-wise lr decay ``--layer-decay``. Prints and
saves each run's ``eval/accuracy`` with the wall time; workdirs go under
``--workroot``. ``--from-scratch``: the same architecture and schedule from
a fresh initialization (the control for what the pretraining adds).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time

from datong.train import checkpoint as ckpt_lib
from datong.train import config as config_lib
from datong.train import loop
from datong.train.recipes import vit_digits
from datong.train.tasks.distill import find_encoder_config

DIGIT_SIZE = 8


def finetune_config(run: str, steps: int, layer_decay: float, from_scratch: bool = False):
  stored = ckpt_lib.stored_run_config(run)
  if stored is None:
    raise SystemExit(f"{run}: no checkpoint with stored settings (is it a finished run?).")
  encoder = find_encoder_config(config_lib.from_json(stored).task)
  if encoder is None:
    raise SystemExit(f"{run}: its task has no image encoder to fine-tune.")
  exported = os.path.join(run, "encoder_params.msgpack")
  base = vit_digits.config()
  upsample = encoder.image_size[0] // DIGIT_SIZE
  data = dataclasses.replace(base.task.data, upsample=upsample,
                             shift=base.task.data.shift * upsample / base.task.data.upsample)
  task = dataclasses.replace(base.task, model=encoder, data=data, layer_decay=layer_decay,
                             pretrained="" if from_scratch else (
                                 exported if os.path.exists(exported) else run),
                             tta_shift=max(1, upsample // 4))
  train = dataclasses.replace(base.train, steps=steps, eval_every=0)
  optimizer = dataclasses.replace(base.optimizer, warmup_steps=min(base.optimizer.warmup_steps,
                                                                   steps // 10))
  return dataclasses.replace(base, task=task, train=train, optimizer=optimizer)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("runs", nargs="+", help="finished runs' workdirs")
  p.add_argument("--steps", type=int, default=1000)
  p.add_argument("--layer-decay", type=float, default=0.75)
  p.add_argument("--workroot", default="")
  p.add_argument("--out", default="")
  p.add_argument("--from-scratch", action="store_true")
  args = p.parse_args(argv)
  workroot = args.workroot or tempfile.mkdtemp(prefix="datong-finetune-")
  results = {}
  for run in args.runs:
    config = finetune_config(run, args.steps, args.layer_decay, args.from_scratch)
    workdir = os.path.join(workroot, os.path.basename(os.path.normpath(run))
                           + ("-scratch" if args.from_scratch else ""))
    start = time.perf_counter()
    metrics = loop.train(config, workdir, progress=False).metrics
    results[run] = dict(accuracy=metrics["eval/accuracy"], wall=time.perf_counter() - start,
                        pretrained=config.task.pretrained, steps=args.steps,
                        layer_decay=args.layer_decay, from_scratch=args.from_scratch,
                        workdir=workdir)
    print(json.dumps({run: results[run]}), flush=True)
    if args.out:
      with open(args.out, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())

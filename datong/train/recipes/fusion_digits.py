"""Single-stream fusion on the digit captions: one backbone over [patches, caption], captioning.

Model (``multimodal.fusion.FusionModel``): 4x4 patches of the 8x8 digits (4
image positions) then ``[BOS] caption [EOS]`` in a byte-level BPE learned
from the training captions (``bpe:512``: 417 ids; a caption is at most 9
tokens, an unseen zero-shot prompt at most 20; 24 positions), through one
width-128, depth-3 Transformer; modality embeddings; a prefix-LM mask
(bidirectional over the image, causal over the caption). Objective:
captioning (next-token cross-entropy of the caption given the image), 2400
steps of 64; training augments the images (shift, rotation, scaling) as
``clip-digits`` does, but not the captions. The task's other objectives
(image-text matching against hard in-batch negatives, masked multimodal
modeling: ``task.match_weight`` / ``task.masked_weight``) are off: in the
runs below they did not help the captioner (BENCHMARKS.md, "Single-stream
fusion").

Headline: ``eval/zero_shot_accuracy``, the digit whose 8 unseen CLIP-style
prompts (``ZERO_SHOT_TEMPLATES`` x name or numeral) the model finds
likeliest as the image's caption (target >= 0.95); also
``eval/caption_accuracy`` (greedy captions that name the right digit and no
other; target >= 0.95 too). What got here (issue #22, each run's command in
BENCHMARKS.md): 2x2 patches with all three objectives and caption noise
words, 600 steps: caption accuracy 0.147, zero-shot 0.092; captioning only,
no caption noise, 400 steps: 0.492 / 0.508; 1200 steps: 0.858 / 0.844;
4x4 patches, 2400 steps: 0.9528 / 0.9500.

    datong train fusion-digits --workdir /tmp/fusion-digits
"""

from datong.backbone import TransformerConfig
from datong.multimodal.fusion import FusionConfig
from datong.train.config import OptimizerConfig, RunConfig, TrainConfig
from datong.train.datasets import ZERO_SHOT_TEMPLATES
from datong.train.recipes.clip_digits import digit_classes
from datong.train.tasks.fusion import FusionTaskConfig
from datong.train.tasks.images import ImageData

NAME = "fusion-digits"
METRIC = "eval/zero_shot_accuracy"
TARGET = (">=", 0.95)


def model() -> FusionConfig:
  return FusionConfig(TransformerConfig(width=128, depth=3, heads=4, mlp_dim=256),
                      vocab_size=512, max_text_length=24, image_size=(8, 8), patch_size=(4, 4),
                      channels=1)


def config() -> RunConfig:
  return RunConfig(
      task=FusionTaskConfig(
          model=model(), tokenizer="bpe:512",
          image=ImageData(dataset="digit_captions", shift=1.0, rotate=10.0, scale=0.1),
          class_names=digit_classes(), templates=ZERO_SHOT_TEMPLATES,
          match_weight=0.0, masked_weight=0.0),
      train=TrainConfig(steps=2400, batch_size=64, log_every=100, eval_every=0,
                        checkpoint_every=0, seed=0),
      optimizer=OptimizerConfig(learning_rate=2e-3, schedule="cosine", warmup_steps=50,
                                weight_decay=0.05, grad_clip_norm=1.0))

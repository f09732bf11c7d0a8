"""Single-stream fusion on the digit captions: one backbone over [patches, caption], three objectives.

Model (``multimodal.fusion.FusionModel``): 2x2 patches of the 8x8 digits (16
image positions) then ``[BOS] caption [EOS]`` in a byte-level BPE learned
from the training captions (``bpe:512``: 417 ids; a caption is at most 9
tokens, an unseen zero-shot prompt at most 20; 24 positions),
through one width-128, depth-3 Transformer; modality embeddings; a
prefix-LM mask (bidirectional over the image, causal over the caption).
Objectives per step (``tasks.fusion``): captioning, image-text matching
against the hardest of 4 in-batch captions of another digit, and masked
multimodal modeling (half the patches and a quarter of the caption tokens
masked, one bidirectional pass). Training augments images (shift, rotation,
scaling) and captions (word dropout, random words), as ``clip-digits`` does.

Headline: ``eval/zero_shot_accuracy``, the digit whose 8 unseen CLIP-style
prompts (``ZERO_SHOT_TEMPLATES`` x name or numeral) the model finds
likeliest as the image's caption; also ``eval/caption_accuracy`` (greedy
captions that name the right digit and no other; target >= 0.95 too) and
matching-based zero-shot. First run (BENCHMARKS.md, "Single-stream
fusion"): caption accuracy 0.147, zero-shot 0.092 after 6m22s: **targets
not met**; the model writes fluent templates but has not learned which
digit it sees.

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
                      vocab_size=512, max_text_length=24, image_size=(8, 8), patch_size=(2, 2),
                      channels=1)


def config() -> RunConfig:
  return RunConfig(
      task=FusionTaskConfig(
          model=model(), tokenizer="bpe:512",
          image=ImageData(dataset="digit_captions", shift=1.0, rotate=10.0, scale=0.1),
          class_names=digit_classes(), templates=ZERO_SHOT_TEMPLATES,
          word_dropout=0.05, noise_words=0.5, match_candidates=4),
      train=TrainConfig(steps=600, batch_size=64, log_every=50, eval_every=0,
                        checkpoint_every=0, seed=0),
      optimizer=OptimizerConfig(learning_rate=2e-3, schedule="cosine", warmup_steps=50,
                                weight_decay=0.05, grad_clip_norm=1.0))

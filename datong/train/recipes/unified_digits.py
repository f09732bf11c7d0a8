"""One backbone trained at once on GPT (pydoc_text), MAE (digits), CLIP and captioning (digit_captions).

The unified-pretraining recipe: a ``MixtureTask`` whose members are GPT
over Python's docs (byte-level BPE, 1024 ids), MAE over the 8x8 digits
(4x upsampled, 4x4 patches) and CLIP over the digit captions (a learned
``bpe:512`` vocabulary, 24 tokens). The one Transformer backbone (width
128, depth 4, 4 heads) is stored once under ``params["shared"]["backbone"]``;
GPT's embedding, MAE's stem / decoder / pixel head and CLIP's image stem,
text stem and projections are each member's own. CLIP's image and text
towers both run on the shared backbone. The fourth member, ``caption``, is
the single-stream fusion model (``tasks.fusion``: [4 patches of 4x4,
caption in a learned BPE] through the same shared backbone, prefix-LM
captioning alone, as ``fusion-digits``, whose runs found matching and
masked modeling no help). Every step sums the four members' losses
(``mode="all"``, weights 1) over their own batches: 8 GPT rows of 128
tokens, 64 MAE images, 128 CLIP pairs and 64 captioned images per step
(``per_row`` 1 / 8 / 16 / 8 times ``train.batch_size=8``), 1200 steps.

Evaluation is per member: ``eval/gpt/bits_per_byte``,
``eval/mae/linear_probe_accuracy``, ``eval/clip/zero_shot_accuracy``,
``eval/caption/caption_accuracy``, ...

Measured (BENCHMARKS.md, "unified-digits against each member alone";
``python bench/unified.py --workroot /tmp/s11/unified`` at a4d9322): 11m52s
on the quiet 2-core CPU (CPU 22m09s). Each member next to the same member
alone (``--set task.only=<member>``: its own backbone, same batches and
steps): GPT 2.3550 vs 2.1816 bits/byte, MAE probe 0.9583 vs 0.9472, CLIP
zero-shot 0.9472 vs 0.9639, captions 0.9250 vs 0.9667. Sharing helps the
MAE probe (CLIP and the captioner teach the shared backbone the digits)
and costs the members that must fit their data in a shared 0.8 M-parameter
backbone, GPT most. The headline is reported, not a target (``TARGET``
None). ``examples/06_unified.ipynb`` asks the trained model for all four.

    datong train unified-digits --workdir /tmp/unified-digits
"""

from datong.backbone import TransformerConfig
from datong.multimodal.clip import ClipConfig
from datong.multimodal.fusion import FusionConfig
from datong.train.config import OptimizerConfig, RunConfig, TrainConfig
from datong.train.datasets import ZERO_SHOT_TEMPLATES
from datong.train.recipes.clip_digits import digit_classes
from datong.train.tasks.clip import ClipTaskConfig
from datong.train.tasks.fusion import FusionTaskConfig
from datong.train.tasks.images import ImageData
from datong.train.tasks.mixture import MemberConfig, MixtureTaskConfig
from datong.train.tasks.probes import ProbeConfig
from datong.train.tasks.text import GPTTaskConfig
from datong.train.tasks.vision import MAETaskConfig
from datong.unimodal.masked_image import MAEConfig
from datong.unimodal.text import TextConfig
from datong.unimodal.vision import ViTConfig

NAME = "unified-digits"
METRIC = "eval/clip/zero_shot_accuracy"
TARGET = None  # reported (BENCHMARKS.md)


def members(backbone: TransformerConfig, *, seq_length: int = 128, tokenizer: str = "bpe:1024",
            vocab_size: int = 1024, upsample: int = 4, decoder: TransformerConfig = None,
            embed_dim: int = 64, per_row=(1, 8, 16, 8), probe: ProbeConfig = ProbeConfig(),
            png_examples: int = 8, caption: bool = False) -> tuple:
  """GPT, MAE and CLIP members (and with ``caption`` the fusion captioner)
  whose backbones all have ``backbone``'s shape."""
  decoder = decoder or TransformerConfig(width=64, depth=4, heads=2, mlp_dim=128)
  size = (8 * upsample, 8 * upsample)
  gpt = GPTTaskConfig(model=TextConfig(backbone=backbone, vocab_size=vocab_size, positions="rope",
                                       tie_embeddings=True),
                      seq_length=seq_length, tokenizer=tokenizer)
  encoder = ViTConfig(backbone, image_size=size, patch_size=(4, 4), channels=1, pool="gap",
                      posemb="sincos")
  mae = MAETaskConfig(model=MAEConfig(encoder, decoder, mask_ratio=0.75, norm_pix_loss=False),
                      data=ImageData(upsample=upsample, crop_pad=1, shift=float(upsample),
                                     rotate=10.0, scale=0.1),
                      probe=probe, png_examples=png_examples, export_encoder=False)
  clip_model = ClipConfig(
      image=ViTConfig(backbone, image_size=(8, 8), patch_size=(4, 4), channels=1, pool="gap"),
      text=TextConfig(backbone=backbone, vocab_size=512, positions="learned", max_length=24),
      embed_dim=embed_dim, text_pool="mean", text_causal=False, loss="softmax")
  clip = ClipTaskConfig(model=clip_model,
                        image=ImageData(dataset="digit_captions", shift=1.0, rotate=10.0,
                                        scale=0.1),
                        tokenizer="bpe:512", class_names=digit_classes(),
                        templates=ZERO_SHOT_TEMPLATES, word_dropout=0.05, noise_words=0.5)
  out = (MemberConfig("gpt", gpt, per_row=per_row[0]),
         MemberConfig("mae", mae, per_row=per_row[1]),
         MemberConfig("clip", clip, per_row=per_row[2]))
  if not caption:
    return out
  fusion = FusionTaskConfig(
      model=FusionConfig(backbone, vocab_size=512, max_text_length=24, image_size=(8, 8),
                         patch_size=(4, 4), channels=1),
      image=ImageData(dataset="digit_captions", shift=1.0, rotate=10.0, scale=0.1),
      tokenizer="bpe:512", class_names=digit_classes(), templates=ZERO_SHOT_TEMPLATES,
      match_weight=0.0, masked_weight=0.0,  # as fusion-digits: captioning alone
      sample_captions=16 if png_examples else 0)
  return out + (MemberConfig("caption", fusion, per_row=per_row[3]),)


def config() -> RunConfig:
  backbone = TransformerConfig(width=128, depth=4, heads=4, mlp_dim=512)
  return RunConfig(
      task=MixtureTaskConfig(members=members(backbone, probe=ProbeConfig(train_views=4),
                                             caption=True)),
      train=TrainConfig(steps=1200, batch_size=8, log_every=50, eval_every=0,
                        checkpoint_every=0, seed=0),
      optimizer=OptimizerConfig(learning_rate=1e-3, schedule="cosine", warmup_steps=50,
                                b2=0.95, weight_decay=0.05, grad_clip_norm=1.0))

"""CoCa pretraining for the engine: contrastive + captioning in one pass.

One ``multimodal.coca.CoCa`` per step on an (image, caption[, label]) batch:
``contrastive_weight`` x CLIP's contrastive loss between the image and
text embeddings + ``caption_weight`` x next-token cross-entropy of
``[BOS] caption [EOS]`` given the image (``coca.coca_loss``). Images and
captions are preprocessed and augmented as in the CLIP and fusion tasks.

Evaluation on the test split, through the CLIP and fusion evaluators:
``eval/zero_shot_accuracy`` (CLIP's prompt-ensemble classifier on the
contrastive embeddings), ``eval/loss`` and class-level retrieval recall
(``tasks.clip.contrastive_metrics``), ``eval/caption_accuracy`` (greedy
cached captions that name the image's digit and no other,
``tasks.fusion.score_captions``) and ``eval/caption_loss``; a
``captions_step<N>.txt`` of samples.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from datong.multimodal.coca import CoCa, CocaConfig, caption, coca_loss
from datong.multimodal.fusion import next_token_loss
from datong.train.datasets import DIGIT_NAMES
from datong.train.task import with_aux_losses
from datong.train.tasks.clip import class_prompts, contrastive_metrics, ensemble_classifier
from datong.train.tasks.fusion import (CaptionedImageTask, score_captions,
                                      write_caption_samples)
from datong.train.tasks.images import ImageData

__all__ = ["CocaTask", "CocaTaskConfig"]


@dataclasses.dataclass(frozen=True)
class CocaTaskConfig:
  """CoCa on an (image, caption[, label]) dataset; see the module doc.

  ``class_names`` / ``templates``: CLIP's zero-shot prompts (empty: no
  zero-shot metric); ``caption_names``: per class, the words a caption may
  name it by (caption accuracy). ``word_dropout`` / ``noise_words``: CLIP's
  caption augmentation (training only). ``max_new_tokens``: caption length
  at evaluation (0: up to ``max_text_length - 1``).
  """
  model: CocaConfig
  image: ImageData = ImageData(dataset="digit_captions")
  caption_key: str = "caption"
  tokenizer: str = "byte"
  contrastive_weight: float = 1.0
  caption_weight: float = 2.0
  chunk_size: int = 0
  word_dropout: float = 0.0
  noise_words: float = 0.0
  class_names: tuple = ()
  templates: tuple = ("{}",)
  caption_names: tuple = tuple((n, str(i)) for i, n in enumerate(DIGIT_NAMES))
  retrieval_ks: tuple = (1, 5)
  max_new_tokens: int = 0
  sample_captions: int = 16

  def __post_init__(self):
    for f in ("contrastive_weight", "caption_weight"):
      if getattr(self, f) < 0:
        raise ValueError(f"CocaTaskConfig.{f}={getattr(self, f)}: must be >= 0.")
    if not (self.contrastive_weight or self.caption_weight):
      raise ValueError("CocaTaskConfig: contrastive_weight and caption_weight are both 0; set "
                       "one above 0.")
    if not 0.0 <= self.word_dropout < 1.0 or self.noise_words < 0:
      raise ValueError("CocaTaskConfig.word_dropout must be in [0, 1) and noise_words >= 0.")
    if self.chunk_size < 0:
      raise ValueError(f"CocaTaskConfig.chunk_size={self.chunk_size}: must be >= 0.")
    if self.max_new_tokens < 0 or self.max_new_tokens >= self.model.max_text_length:
      raise ValueError(f"CocaTaskConfig.max_new_tokens={self.max_new_tokens}: must be in [0, "
                       f"{self.model.max_text_length}) (after the BOS; 0: all positions left).")

  def build(self) -> "CocaTask":
    return CocaTask(self)


class CocaTask(CaptionedImageTask):
  """Contrastive + captioning on one ``CoCa``."""

  def __init__(self, config: CocaTaskConfig):
    super().__init__(config, CoCa(config.model))

  def loss(self, params, batch, rng, *, train=True):
    c = self.config
    images = batch["image"]
    rngs = {}
    if train:
      r_aug, r_drop = jax.random.split(rng)
      images = c.image.augment(images, r_aug)
      rngs = {"dropout": r_drop}
    out, aux = self.model.apply({"params": params}, images, batch["text"], batch["text_valid"],
                                train=train, rngs=rngs)
    loss, metrics = coca_loss(c.model, out, batch["text"], batch["text_valid"],
                              contrastive_weight=c.contrastive_weight,
                              caption_weight=c.caption_weight, mask=batch.get("mask"),
                              chunk_size=c.chunk_size)
    return loss, with_aux_losses(metrics, aux)

  # --- evaluation ---
  def zero_shot_classifier(self, params):
    """``[classes, embed_dim]`` from ``class_names`` x ``templates`` (prompt ensemble)."""
    c = self.config
    prompts, per_class, counts = class_prompts(c.class_names, c.templates)
    ids, valid = self.encode_texts(prompts)
    emb = jax.jit(lambda p, i, v: self.model.apply({"params": p}, i, v, method="encode_text"))(
        params, ids, valid)
    return ensemble_classifier(emb, per_class, counts)

  def evaluate(self, params, ctx):
    c = self.config
    tok = self.tokenizer
    apply = jax.jit(lambda p, b: self.model.apply({"params": p}, b["image"], b["text"],
                                                  b["text_valid"])[0])
    max_new = c.max_new_tokens or c.model.max_text_length - 1
    imgs, txts, labels_all, samples = [], [], [], []
    correct_cap = total = 0
    cap_sum = cap_n = 0.0
    for batch in ctx.batches(self.eval_split):
      keep = ctx.to_host(batch["mask"]).astype(bool)
      labels = ctx.to_host(batch["label"])[keep]
      out = apply(params, batch)
      imgs.append(ctx.to_host(out["image_emb"])[keep])
      txts.append(ctx.to_host(out["text_emb"])[keep])
      labels_all.append(labels)
      valid = ctx.to_host(batch["text_valid"])[keep]
      loss, _ = next_token_loss(jnp.asarray(ctx.to_host(out["text_logits"])[keep]),
                                jnp.asarray(ctx.to_host(batch["text"])[keep]), jnp.asarray(valid))
      weight = float(np.sum(valid[:, 1:]))
      cap_sum, cap_n = cap_sum + float(loss) * weight, cap_n + weight
      prompt = jnp.full((batch["image"].shape[0], 1), tok.bos_id, jnp.int32)
      gen = caption(self.model, params, batch["image"], prompt, max_new_tokens=max_new,
                    eos_id=tok.eos_id, pad_id=tok.pad_id, vocab_size=tok.vocab_size)
      correct_cap += score_captions(ctx.to_host(gen["tokens"])[keep],
                                    ctx.to_host(gen["lengths"])[keep], labels, tok,
                                    c.caption_names, samples, c.sample_captions)
      total += int(keep.sum())
    scale, bias = jax.jit(lambda p: self.model.apply({"params": p}, method="logit_params"))(params)
    classifier = self.zero_shot_classifier(params) if c.class_names else None
    metrics = contrastive_metrics(c.model, np.concatenate(imgs), np.concatenate(txts),
                                  np.concatenate(labels_all), scale, bias, ks=c.retrieval_ks,
                                  classifier=classifier)
    metrics["eval/caption_loss"] = cap_sum / max(cap_n, 1.0)
    metrics["eval/caption_accuracy"] = correct_cap / max(total, 1)
    write_caption_samples(ctx, samples)
    return metrics

  # --- accounting ---
  def tokens_per_example(self):
    mc = self.config.model
    return mc.image.num_tokens + mc.max_text_length

  def flops_per_example(self):
    return self.config.model.flops_per_example()

"""Single-stream fusion pretraining for the engine: captioning, matching, masked modeling.

One ``multimodal.fusion.FusionModel`` reads [image patches, caption tokens]
as one sequence. Per step, on an (image, caption[, label]) batch:

* **captioning** (``caption_weight``): the prefix-LM pass, next-token
  cross-entropy over the caption (``[BOS] caption [EOS]``);
* **image-text matching** (``match_weight``): the same pass's match logits
  are the positives; each image's negative is the hardest of
  ``match_candidates`` other captions of the batch (the one the model
  scores likeliest to match, scored without gradient), never a caption
  of the image's own class when labels exist (a caption of another "3"
  describes this "3" too);
* **masked multimodal modeling** (``masked_weight``): a bidirectional pass
  with ``image_mask_ratio`` of the patches replaced by the mask token and
  ``text_mask_ratio`` of the caption tokens by ``[MASK]``; MSE on the
  normalized masked patches plus cross-entropy on the masked tokens.

Evaluation on the test split: ``eval/zero_shot_accuracy`` (the class whose
prompts, ``templates`` x ``class_names`` as in CLIP, the model finds likeliest
as the image's caption), ``eval/match_zero_shot_accuracy`` (the class whose
prompts get the highest match probability), ``eval/caption_accuracy``
(greedy captions that name the image's digit and no other) and
``eval/caption_loss``; a ``captions_step<N>.txt`` of samples.
"""

from __future__ import annotations

import dataclasses
import os
import re

import jax
import jax.numpy as jnp
import numpy as np

from datong.multimodal.clip import tokenize
from datong.multimodal.fusion import (FusionConfig, FusionModel, caption, caption_log_likelihood,
                                      masked_patch_loss, masked_token_loss, match_loss,
                                      next_token_loss)
from datong.train.datasets import DIGIT_NAMES
from datong.train.task import Task, with_aux_losses
from datong.train.tasks.clip import augment_caption
from datong.train.tasks.images import ImageData
from datong.train.tasks.text import make_tokenizer


@dataclasses.dataclass(frozen=True)
class FusionTaskConfig:
  """Single-stream fusion on an (image, caption[, label]) dataset; see the module doc."""
  model: FusionConfig
  image: ImageData = ImageData(dataset="digit_captions")
  caption_key: str = "caption"
  tokenizer: str = "byte"
  caption_weight: float = 1.0
  match_weight: float = 1.0
  masked_weight: float = 1.0
  match_candidates: int = 4
  image_mask_ratio: float = 0.5
  text_mask_ratio: float = 0.25
  word_dropout: float = 0.0
  noise_words: float = 0.0
  class_names: tuple = ()  # per class, one or more names (zero-shot)
  templates: tuple = ("{}",)
  caption_names: tuple = tuple((n, str(i)) for i, n in enumerate(DIGIT_NAMES))
  max_new_tokens: int = 0  # caption length at evaluation; 0: up to max_text_length - 1
  sample_captions: int = 16

  def __post_init__(self):
    for f in ("caption_weight", "match_weight", "masked_weight"):
      if getattr(self, f) < 0:
        raise ValueError(f"FusionTaskConfig.{f}={getattr(self, f)}: must be >= 0.")
    if not (self.caption_weight or self.match_weight or self.masked_weight):
      raise ValueError("FusionTaskConfig: every objective weight is 0; set caption_weight, "
                       "match_weight or masked_weight above 0.")
    for f in ("image_mask_ratio", "text_mask_ratio"):
      if not 0.0 <= getattr(self, f) < 1.0:
        raise ValueError(f"FusionTaskConfig.{f}={getattr(self, f)}: must be in [0, 1).")
    if self.match_weight and self.match_candidates < 1:
      raise ValueError("FusionTaskConfig.match_candidates must be >= 1 with match_weight > 0.")

  def build(self) -> "FusionTask":
    return FusionTask(self)


def names_digit(text: str, label: int, names: tuple) -> bool:
  """Whether ``text`` names class ``label`` (any of its names, as a whole
  word) and no other class."""
  words = set(re.findall(r"[a-z0-9]+", text.lower()))
  said = {c for c, synonyms in enumerate(names) if words & {s.lower() for s in synonyms}}
  return said == {label}


def encode_captions(texts, tokenizer, length: int) -> tuple[np.ndarray, np.ndarray]:
  """``[BOS] text [EOS]`` ids padded to ``length`` (the text truncated so the
  EOS stays) and their validity (BOS through EOS), ``[n, length]`` each."""
  ids = tokenize(texts, tokenizer, length - 1)
  ids = np.concatenate([np.full((len(texts), 1), tokenizer.bos_id, np.int32), ids], 1)
  valid = np.zeros_like(ids, bool)
  for row in range(len(texts)):  # BOS + ids up to and including the EOS
    valid[row, :1 + int(np.argmax(ids[row, 1:] == tokenizer.eos_id)) + 1] = True
  return ids, valid


def score_captions(tokens, lengths, labels, tokenizer, names: tuple, samples: list,
                   max_samples: int) -> int:
  """How many generated captions (``tokens [n, max_new]`` host ids, the first
  ``lengths [n]`` real) name their image's ``labels [n]`` and no other class
  (``names_digit``); the first ``max_samples`` go to ``samples`` as lines
  ``label, ok / WRONG, caption``."""
  correct = 0
  for row, label in enumerate(labels):
    text = tokenizer.decode([int(t) for t in tokens[row, :lengths[row]]])
    ok = names_digit(text, int(label), names)
    correct += int(ok)
    if len(samples) < max_samples:
      samples.append(f"{int(label)}\t{'ok' if ok else 'WRONG'}\t{text}")
  return correct


def write_caption_samples(ctx, samples: list) -> None:
  """``captions_step<N>.txt`` in the workdir (process 0, when any)."""
  if ctx.workdir and jax.process_index() == 0 and samples:
    os.makedirs(ctx.workdir, exist_ok=True)
    with open(os.path.join(ctx.workdir, f"captions_step{ctx.step}.txt"), "w") as f:
      f.write("label\tnames it\tgenerated caption\n" + "\n".join(samples) + "\n")


class CaptionedImageTask(Task):
  """What the fusion and CoCa tasks share: ``{image, text, text_valid,
  label}`` batches of an (image, caption[, label]) dataset, text ``[BOS]
  caption [EOS]`` in the task's tokenizer; ``model`` any captioner config
  with ``image_size``, ``channels``, ``vocab_size`` and ``max_text_length``."""

  def __init__(self, config, model):
    self.config = config
    self.dataset = config.image.dataset
    self.tokenizer = make_tokenizer(config.tokenizer, (self.dataset, "train", config.caption_key))
    if config.model.vocab_size < self.tokenizer.vocab_size:
      raise ValueError(f"{type(config.model).__name__}.vocab_size={config.model.vocab_size} is "
                       f"smaller than the tokenizer's {self.tokenizer.vocab_size}.")
    self.model = model

  def batch_spec(self, batch_size):
    mc = self.config.model
    t = mc.max_text_length
    return {"image": jax.ShapeDtypeStruct((batch_size, *mc.image_size, mc.channels), jnp.float32),
            "text": jax.ShapeDtypeStruct((batch_size, t), jnp.int32),
            "text_valid": jax.ShapeDtypeStruct((batch_size, t), jnp.bool_),
            "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32)}

  def encode_texts(self, texts) -> tuple[np.ndarray, np.ndarray]:
    """``[BOS] text [EOS]`` ids, padded, and their validity, ``[n, T]`` each."""
    return encode_captions(texts, self.tokenizer, self.config.model.max_text_length)

  def preprocess(self, example, rng, train):
    c = self.config
    out = c.image(example, rng, train)
    out.setdefault("label", np.int32(-1))
    text = example[c.caption_key]
    if train and (c.word_dropout or c.noise_words):
      text = augment_caption(text, rng, word_dropout=c.word_dropout, noise_words=c.noise_words)
    ids, valid = self.encode_texts([text])
    out["text"], out["text_valid"] = ids[0], valid[0]
    return out

  def init(self, rng, batch):
    spec = self.batch_spec(1)
    return self.model.init(rng, jnp.zeros(spec["image"].shape),
                           jnp.zeros(spec["text"].shape, jnp.int32))


class FusionTask(CaptionedImageTask):
  """Captioning, matching and masked modeling on one ``FusionModel``."""

  def __init__(self, config: FusionTaskConfig):
    super().__init__(config, FusionModel(config.model))

  # --- objectives ---
  def _negatives(self, params, images, ids, valid, labels, rng):
    """Per image, the index of its hardest in-batch negative caption."""
    b = ids.shape[0]
    k = self.config.match_candidates
    # Candidates: k random other rows (a shift by 1..b-1 never picks the row itself).
    shifts = jax.random.randint(rng, (b, k), 1, b)
    cand = (jnp.arange(b)[:, None] + shifts) % b
    apply = lambda i: self.model.apply({"params": params}, images, ids[i], valid[i])[0]["match"]
    scores = jax.lax.stop_gradient(jax.lax.map(apply, cand.T))  # [k, b, 2]
    match_logit = scores[..., 1] - scores[..., 0]
    same_class = (labels[cand].T == labels[None]) & (labels[None] >= 0)
    match_logit = jnp.where(same_class, -jnp.inf, match_logit)
    best = jnp.argmax(match_logit, 0)
    usable = jnp.any(~same_class, 0)  # some candidate of another class
    return jnp.take_along_axis(cand, best[:, None], 1)[:, 0], usable

  def loss(self, params, batch, rng, *, train=True):
    c = self.config
    images, ids, valid, labels = batch["image"], batch["text"], batch["text_valid"], batch["label"]
    r_aug, r_neg, r_img, r_txt, r_drop = jax.random.split(rng, 5)
    if train:
      images = c.image.augment(images, r_aug)
    rngs = {"dropout": r_drop} if train else {}
    out, aux = self.model.apply({"params": params}, images, ids, valid, train=train, rngs=rngs)
    cap, cap_acc = next_token_loss(out["text_logits"], ids, valid)
    loss = c.caption_weight * cap
    metrics = {"caption_loss": cap, "caption_token_accuracy": cap_acc}
    if c.match_weight:
      neg, usable = self._negatives(params, images, ids, valid, labels, r_neg)
      neg_out, _ = self.model.apply({"params": params}, images, ids[neg], valid[neg], train=train,
                                    rngs=rngs)
      logits = jnp.concatenate([out["match"], neg_out["match"]], 0)
      targets = jnp.concatenate([jnp.ones_like(labels, bool), jnp.zeros_like(labels, bool)])
      weights = jnp.concatenate([jnp.ones_like(labels, jnp.float32), usable.astype(jnp.float32)])
      m_loss, m_acc = match_loss(logits, targets, weights)
      loss = loss + c.match_weight * m_loss
      metrics.update(match_loss=m_loss, match_accuracy=m_acc)
    if c.masked_weight:
      n = c.model.num_patches
      image_mask = jax.random.uniform(r_img, (ids.shape[0], n)) < c.image_mask_ratio
      selected = (jax.random.uniform(r_txt, ids.shape) < c.text_mask_ratio) & valid
      selected = selected.at[:, 0].set(False)  # the BOS stays
      masked_ids = jnp.where(selected, self.tokenizer.mask_id, ids)
      mm, _ = self.model.apply({"params": params}, images, masked_ids, valid,
                               image_mask=image_mask, text_causal=False, train=train, rngs=rngs)
      pix = masked_patch_loss(mm["pixels"], images, image_mask, c.model)
      tok, tok_acc = masked_token_loss(mm["text_logits"], ids, selected)
      loss = loss + c.masked_weight * (pix + tok)
      metrics.update(masked_patch_loss=pix, masked_token_loss=tok, masked_token_accuracy=tok_acc)
    return loss, with_aux_losses(metrics, aux)

  # --- evaluation ---
  def class_prompts(self):
    """``(ids, valid) [classes * prompts, T]`` and prompts per class (padded by repeats)."""
    c = self.config
    names = [(n,) if isinstance(n, str) else tuple(n) for n in c.class_names]
    rows = [[t.format(n) for n in synonyms for t in c.templates] for synonyms in names]
    per = max(len(r) for r in rows)
    flat = [p for r in rows for p in (r + r[:1] * (per - len(r)))]
    ids, valid = self.encode_texts(flat)
    return ids, valid, per, np.array([len(r) for r in rows])

  def evaluate(self, params, ctx):
    c = self.config
    mc = c.model
    tok = self.tokenizer
    metrics = {}
    apply = jax.jit(lambda p, x, i, v: self.model.apply({"params": p}, x, i, v)[0])
    if c.class_names:
      p_ids, p_valid, per, counts = self.class_prompts()
      classes = len(counts)
      real = (np.arange(per)[None] < counts[:, None]).astype(np.float32)

      def score(p, images):  # [b, classes] mean log-likelihood and match log-odds over prompts
        b = images.shape[0]
        def one(j):
          i = jnp.broadcast_to(jnp.asarray(p_ids)[j], (b, p_ids.shape[1]))
          v = jnp.broadcast_to(jnp.asarray(p_valid)[j], i.shape)
          out = self.model.apply({"params": p}, images, i, v)[0]
          return caption_log_likelihood(out, i, v), out["match"][:, 1] - out["match"][:, 0]
        ll, odds = jax.lax.map(one, jnp.arange(p_ids.shape[0]))  # [classes * per, b]
        w = jnp.asarray(real.reshape(-1))[:, None] / jnp.asarray(counts).repeat(per)[:, None]
        reduce = lambda s: jnp.sum((s * w).reshape(classes, per, b), 1).T
        return reduce(ll), reduce(odds)
      score = jax.jit(score)
    max_new = c.max_new_tokens or mc.max_text_length - 1
    prompt_len = 1
    total = correct_ll = correct_match = correct_cap = 0
    cap_sum = cap_n = 0.0
    samples = []
    for batch in ctx.batches(self.eval_split):
      keep = ctx.to_host(batch["mask"]).astype(bool)
      labels = ctx.to_host(batch["label"])[keep]
      out = apply(params, batch["image"], batch["text"], batch["text_valid"])
      valid = ctx.to_host(batch["text_valid"])[keep]
      loss, _ = next_token_loss(jnp.asarray(ctx.to_host(out["text_logits"])[keep]),
                                jnp.asarray(ctx.to_host(batch["text"])[keep]), jnp.asarray(valid))
      weight = float(np.sum(valid[:, 1:]))
      cap_sum, cap_n = cap_sum + float(loss) * weight, cap_n + weight
      if c.class_names:
        ll, odds = score(params, batch["image"])
        correct_ll += int(np.sum(np.argmax(ctx.to_host(ll)[keep], 1) == labels))
        correct_match += int(np.sum(np.argmax(ctx.to_host(odds)[keep], 1) == labels))
      b = batch["image"].shape[0]
      prompt = jnp.full((b, prompt_len), tok.bos_id, jnp.int32)
      gen = caption(self.model, params, batch["image"], prompt, max_new_tokens=max_new,
                    eos_id=tok.eos_id, pad_id=tok.pad_id, vocab_size=tok.vocab_size)
      correct_cap += score_captions(ctx.to_host(gen["tokens"])[keep],
                                    ctx.to_host(gen["lengths"])[keep], labels, tok,
                                    c.caption_names, samples, c.sample_captions)
      total += int(keep.sum())
    metrics["eval/caption_loss"] = cap_sum / max(cap_n, 1.0)
    metrics["eval/caption_accuracy"] = correct_cap / max(total, 1)
    if c.class_names:
      metrics["eval/zero_shot_accuracy"] = correct_ll / max(total, 1)
      metrics["eval/match_zero_shot_accuracy"] = correct_match / max(total, 1)
    write_caption_samples(ctx, samples)
    return metrics

  # --- accounting ---
  def tokens_per_example(self):
    return self.config.model.length

  def flops_per_example(self):
    c = self.config
    passes = (1.0 + (c.match_weight > 0) + (c.masked_weight > 0)
              + (c.match_weight > 0) * c.match_candidates / 3.0)  # scoring: forward only
    return passes * c.model.flops_per_example()


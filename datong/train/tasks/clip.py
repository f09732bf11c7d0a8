"""Image-text contrastive objectives for the engine: CLIP, SigLIP, LiT.

Data: an (image, caption[, label]) dataset (``digit_captions`` by default);
images through the vision tasks' ``ImageData``, captions tokenized (and, in
training, augmented: ``augment_caption``). Evaluation: zero-shot
classification from prompt ensembles and class-level retrieval recall.
LiT (locked-image tuning) is ``lock_image="encoder"``, usually with
``image_init=WORKDIR`` of a ViT / MAE / CLIP run: the engine's optimizer
applies ``Task.trainable`` so locked leaves get exactly zero updates. The
towers and losses are in ``datong.multimodal.clip``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from datong.multimodal import contrastive
from datong.multimodal.clip import CLIP, ClipConfig, contrastive_loss, tokenize
from datong.train import warmstart
from datong.train.task import EvalContext, Task, path_names, with_aux_losses
from datong.train.tasks.images import ImageData
from datong.train.tasks.text import make_tokenizer

__all__ = ["ClipTask", "ClipTaskConfig", "augment_caption", "class_prompts", "contrastive_metrics",
           "ensemble_classifier"]

LOCKS = ("", "encoder", "tower")

@dataclasses.dataclass(frozen=True)
class ClipTaskConfig:
  """Image-text contrastive pretraining on an (image, caption[, label]) dataset.

  ``class_names``: per class, one or more names; the zero-shot classifier
  averages the text embeddings of every template filled with every name.
  Empty: no zero-shot metric. ``chunk_size > 0`` uses the chunked loss.
  ``image``: the vision tasks' preprocessing (pixels to [-1, 1], host) and
  augmentation (random affine, on device, training only), so encoders move
  between ViT / MAE / CLIP runs with the same input convention; its
  ``dataset`` names the image-text dataset. ``lock_image``: ``encoder``
  (LiT: freeze the ViT encoder, train its head) or ``tower`` (freeze the
  head too). ``image_init``: a ViT / MAE / CLIP run's workdir, or an
  exported ``encoder_params.msgpack``, whose encoder initializes the image
  tower.

  Caption augmentation (training only, EDA-style, ``augment_caption``):
  ``word_dropout`` deletes each word with that probability; ``noise_words``
  is the mean number (Poisson) of random lowercase strings inserted at
  random places. Both teach the text tower to ignore words that carry no
  image information, which is most of what an unseen zero-shot prompt is.
  """
  model: ClipConfig
  image: ImageData = ImageData(dataset="digit_captions")
  caption_key: str = "caption"
  tokenizer: str = "byte"
  train_split: str = "train"
  eval_split: str = "test"
  class_names: tuple = ()
  templates: tuple = ("{}",)
  chunk_size: int = 0
  word_dropout: float = 0.0
  noise_words: float = 0.0
  lock_image: str = ""
  image_init: str = ""
  logit_lr_scale: float = 1.0  # learning-rate multiplier of log_scale and bias
  retrieval_ks: tuple = (1, 5)
  eval_batch_size: int = 0  # 0: the train batch size

  def __post_init__(self):
    if self.lock_image not in LOCKS:
      raise ValueError(f"ClipTaskConfig.lock_image={self.lock_image!r}: choose one of {LOCKS}.")
    if self.lock_image and self.model.share_backbone:
      raise ValueError("ClipTaskConfig.lock_image with model.share_backbone=True would freeze "
                       "the text tower's backbone too; unshare or do not lock.")
    if not 0.0 <= self.word_dropout < 1.0 or self.noise_words < 0:
      raise ValueError("ClipTaskConfig.word_dropout must be in [0, 1) and noise_words >= 0.")
    if self.chunk_size < 0:
      raise ValueError(f"ClipTaskConfig.chunk_size={self.chunk_size}: must be >= 0.")

  def build(self) -> "ClipTask":
    return ClipTask(self)


class ClipTask(Task):
  """CLIP / SigLIP for the engine: batches ``{image, text, label}``."""

  def __init__(self, config: ClipTaskConfig):
    self.config = config
    self.dataset = config.image.dataset
    self.train_split = config.train_split
    self.eval_split = config.eval_split
    self.tokenizer = make_tokenizer(config.tokenizer,
                                    (self.dataset, self.train_split, config.caption_key))
    mc = config.model
    if mc.text.vocab_size < self.tokenizer.vocab_size:
      raise ValueError(f"ClipConfig.text.vocab_size={mc.text.vocab_size} is smaller than the "
                       f"tokenizer's {self.tokenizer.vocab_size}.")
    self.model = CLIP(mc, pad_id=self.tokenizer.pad_id, eos_id=self.tokenizer.eos_id)
    # Only the pretrained encoder is kept; a tree without one fails here, at build.
    self._pretrained = (warmstart.find_encoder(warmstart.load_pretrained(config.image_init))
                        if config.image_init else None)

  # --- model ---
  def _dummy(self, batch):
    return (jnp.zeros(batch["image"].shape, jnp.float32), jnp.zeros(batch["text"].shape, jnp.int32))

  def init(self, rng, batch):
    images, ids = self._dummy(batch)
    variables = self.model.init(rng, images[:1], ids[:1])
    if self._pretrained is not None:
      variables = {**variables, "params": warmstart.merge_encoder(
          variables["params"], self._pretrained, self.config.model.image, at="image/encoder")}
    return variables

  def batch_spec(self, batch_size):
    mc = self.config.model
    h, w = mc.image.image_size
    return {"image": jax.ShapeDtypeStruct((batch_size, h, w, mc.image.channels), jnp.float32),
            "text": jax.ShapeDtypeStruct((batch_size, mc.text.max_length), jnp.int32),
            "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32)}

  def loss(self, params, batch, rng, *, train=True):
    images = batch["image"]
    rngs = {}
    if train:
      rng_aug, rng_drop = jax.random.split(rng)
      images = self.config.image.augment(images, rng_aug)
      rngs = {"dropout": rng_drop}
    img, txt, aux = self.model.apply({"params": params}, images, batch["text"],
                                     train=train, rngs=rngs)
    loss, metrics = contrastive_loss(self.config.model, img, txt, aux["scale"], aux["bias"],
                                     chunk_size=self.config.chunk_size, mask=batch.get("mask"))
    metrics = {**metrics, "scale": aux["scale"]}
    if self.config.model.loss == "sigmoid":
      metrics["bias"] = aux["bias"]
    return loss, with_aux_losses(metrics, aux)

  # --- data ---
  def preprocess(self, example, rng, train):
    c = self.config
    out = c.image(example, rng, train)  # image in [-1, 1]; label when present
    out.setdefault("label", np.int32(-1))
    caption = example[c.caption_key]
    if train and (c.word_dropout or c.noise_words):
      caption = augment_caption(caption, rng, word_dropout=c.word_dropout,
                                noise_words=c.noise_words)
    out["text"] = tokenize([caption], self.tokenizer, c.model.text.max_length,
                           pool=c.model.text_pool)[0]
    return out

  # --- evaluation ---
  def zero_shot_classifier(self, params):
    """``[classes, embed_dim]`` from ``class_names`` x ``templates`` (prompt ensemble)."""
    c = self.config
    prompts, per_class, counts = class_prompts(c.class_names, c.templates)
    ids = tokenize(prompts, self.tokenizer, c.model.text.max_length, pool=c.model.text_pool)
    emb = jax.jit(lambda p, x: self.model.apply({"params": p}, x, method="encode_text"))(params, ids)
    return ensemble_classifier(emb, per_class, counts)

  def embed_split(self, params, ctx: EvalContext, split: str):
    """Host arrays ``image_emb, text_emb, label`` of every example of ``split``."""
    encode = jax.jit(lambda p, b: self.model.apply({"params": p}, b["image"], b["text"])[:2])
    imgs, txts, labels = [], [], []
    for batch in ctx.batches(split, self.config.eval_batch_size or None):
      img, txt = encode(params, batch)
      keep = ctx.to_host(batch["mask"]).astype(bool)
      imgs.append(ctx.to_host(img)[keep])
      txts.append(ctx.to_host(txt)[keep])
      labels.append(ctx.to_host(batch["label"])[keep])
    return np.concatenate(imgs), np.concatenate(txts), np.concatenate(labels)

  def evaluate(self, params, ctx):
    c = self.config
    img, txt, labels = self.embed_split(params, ctx, self.eval_split)
    scale, bias = jax.jit(lambda p: self.model.apply({"params": p}, method="logit_params"))(params)
    classifier = self.zero_shot_classifier(params) if c.class_names else None
    return contrastive_metrics(c.model, img, txt, labels, scale, bias, ks=c.retrieval_ks,
                               classifier=classifier)

  # --- accounting ---
  def tokens_per_example(self):
    mc = self.config.model
    return mc.image.num_tokens + mc.text.max_length

  def flops_per_example(self):
    mc = self.config.model
    tb, n_txt = mc.text_backbone, mc.text.max_length
    img = mc.image.flops_per_example() + 6.0 * mc.image.width * mc.embed_dim
    txt = n_txt * tb.flops_per_token(n_txt, causal=mc.text_causal) + 6.0 * tb.width * mc.embed_dim
    return float(img + txt)

  # --- optimizer hooks ---
  def learning_rate_scale(self, params):
    """``logit_lr_scale`` on the temperature and bias (small batches move the
    SigLIP bias far from its -10 start), 1 elsewhere; None when 1."""
    scale = self.config.logit_lr_scale
    if scale == 1.0:
      return None
    return {k: (jax.tree.map(lambda _: scale, v) if k in ("log_scale", "bias")
                else jax.tree.map(lambda _: 1.0, v)) for k, v in params.items()}

  def trainable(self, params):
    lock = self.config.lock_image
    if not lock:
      return None

    def keep(path, _):
      names = path_names(path)
      if names[:1] != ["image"]:
        return True
      return lock == "encoder" and names[1:2] == ["head"]

    return jax.tree_util.tree_map_with_path(keep, params)


def class_prompts(class_names, templates) -> tuple[list[str], int, np.ndarray]:
  """CLIP's prompt ensemble: every template filled with every name of each
  class (``class_names``: per class a name or a tuple of names). Returns
  ``(prompts [classes * per_class], per_class, counts [classes])``; a class
  with fewer prompts is padded by repeating its first."""
  names = [(n,) if isinstance(n, str) else tuple(n) for n in class_names]
  rows = [[t.format(n) for n in synonyms for t in templates] for synonyms in names]
  per_class = max(len(r) for r in rows)
  prompts = [p for r in rows for p in (r + r[:1] * (per_class - len(r)))]
  return prompts, per_class, np.array([len(r) for r in rows])


def ensemble_classifier(prompt_embeddings, per_class: int, counts) -> np.ndarray:
  """``[classes, dim]`` zero-shot weights from the embeddings ``[classes *
  per_class, dim]`` of ``class_prompts``: each class's real prompts averaged
  (normalized, then renormalized); the padding repeats are dropped."""
  counts = np.asarray(counts)
  emb = np.asarray(prompt_embeddings).reshape(len(counts), per_class, -1)
  keep = np.arange(per_class)[None, :] < counts[:, None]
  summed = np.einsum("cpd,cp->cd", contrastive.l2_normalize(emb), keep) / counts[:, None]
  return np.asarray(contrastive.l2_normalize(summed))


def contrastive_metrics(loss_config, img, txt, labels, scale, bias, *, ks=(1, 5),
                        classifier=None) -> dict[str, float]:
  """Evaluation of paired embeddings ``[n, dim]`` (host): ``eval/loss`` (the
  configured contrastive loss, ``clip.contrastive_loss``), retrieval recall
  and, with a zero-shot ``classifier [classes, dim]``,
  ``eval/zero_shot_accuracy``."""
  loss, _ = contrastive_loss(loss_config, img, txt, scale, bias)
  metrics = {"eval/loss": float(loss)}
  # Captions carry the digit but nothing else of the image, so the pair is
  # only determined up to its label: a retrieved item counts when it shows /
  # names the query's class. Without labels, only the exact partner counts.
  keys = labels if np.all(labels >= 0) else None
  recall = contrastive.retrieval_recall(img, txt, ks, image_keys=keys, text_keys=keys)
  metrics.update({f"eval/{k}": v for k, v in recall.items()})
  if classifier is not None:
    logits = contrastive.zero_shot_logits(img, classifier)
    metrics["eval/zero_shot_accuracy"] = float(np.mean(np.argmax(logits, 1) == labels))
  return metrics


def augment_caption(caption, rng: np.random.Generator, *, word_dropout: float = 0.0,
                    noise_words: float = 0.0) -> str:
  """Randomly delete words and insert random lowercase strings (numpy rng)."""
  text = caption.decode("utf-8") if isinstance(caption, (bytes, np.bytes_)) else str(caption)
  words = text.split()
  kept = [w for w in words if rng.random() >= word_dropout] or words
  letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
  for _ in range(rng.poisson(noise_words) if noise_words else 0):
    noise = "".join(rng.choice(letters, size=int(rng.integers(2, 9))))
    kept.insert(int(rng.integers(0, len(kept) + 1)), noise)
  return " ".join(kept)

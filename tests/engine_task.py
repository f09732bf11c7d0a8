"""A small real objective for engine tests: classify the embedded digits.

Patches of the 8x8 digits -> the shared backbone -> mean pool -> classes.
(The library's own ViT lives in datong.unimodal.vision; this one keeps the
engine tests independent of it.)
"""

import dataclasses
import functools
import os
import signal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from datong import ops
from datong.backbone import Transformer, TransformerConfig
from datong.train.task import Task


class L2Mlp(nn.Module):
  """A backbone MLP hook that also adds an auxiliary loss on its hidden
  activations ``h`` ``[batch, length, mlp_dim]``: ``l2 = weight * mean(h**2)``."""
  config: TransformerConfig
  train: bool = False
  weight: float = 0.01

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    dense = lambda features, axes, name: nn.Dense(features, kernel_init=nn.with_logical_partitioning(
        nn.initializers.lecun_normal(), axes), name=name)
    h = nn.gelu(dense(cfg.mlp_dim, ("embed", "mlp"), "wi")(x))
    y = dense(cfg.width, ("mlp", "embed"), "wo")(h)
    return y, {"l2": self.weight * jnp.mean(jnp.square(h.astype(jnp.float32)))}


class DigitNet(nn.Module):
  backbone: TransformerConfig
  aux_l2: float = 0.0  # > 0: every layer's MLP adds an "l2" auxiliary loss

  @nn.compact
  def __call__(self, images, train=False, return_aux=False):
    x = ops.patchify(images.astype(jnp.float32) / 255.0, 2)  # [b, 16, 4]
    x = nn.Dense(self.backbone.width, kernel_init=nn.with_logical_partitioning(
        nn.initializers.lecun_normal(), ("patch", "embed")), name="stem")(x)
    x = x + self.param("pos_embedding", nn.with_logical_partitioning(
        nn.initializers.normal(0.02), ("length", "embed")), (16, self.backbone.width))
    mlp = functools.partial(L2Mlp, weight=self.aux_l2) if self.aux_l2 else None
    x, aux = Transformer(self.backbone, mlp=mlp, name="backbone")(x, train=train)
    logits = nn.Dense(10, name="head")(x.mean(axis=1))
    return (logits, aux) if return_aux else logits


@dataclasses.dataclass(frozen=True)
class DigitsTaskConfig:
  backbone: TransformerConfig = TransformerConfig(width=32, depth=2, heads=4, mlp_dim=64)
  nan_loss: bool = False  # tests: every loss is NaN (also when DIGITS_NAN_LOSS=1 is set, so a
  # resumed run can turn NaN without a settings change, which a resume refuses)
  aux_l2: float = 0.0  # tests: weight of an auxiliary loss inside the backbone
  ema_decay: float = 0.0  # tests: > 0 keeps a frozen EMA copy of the head (``post_update``)

  def build(self):
    return DigitsTask(self)


class DigitsTask(Task):
  dataset = "digits"

  def __init__(self, config):
    self.config = config
    self.model = DigitNet(config.backbone, aux_l2=config.aux_l2)

  def batch_spec(self, batch_size):
    return {"image": jax.ShapeDtypeStruct((batch_size, 8, 8, 1), jnp.uint8),
            "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32)}

  def preprocess(self, example, rng, train):
    image = example["image"]
    if train:  # a random 1-pixel shift, from the per-example rng
      dy, dx = rng.integers(-1, 2, size=2)
      image = np.roll(image, (dy, dx), axis=(0, 1))
    return {"image": image, "label": np.int32(example["label"])}

  def init(self, rng, batch):
    variables = self.model.init(rng, jnp.zeros(batch["image"].shape, jnp.uint8))
    if not self.config.ema_decay:
      return variables
    params = dict(variables["params"])
    # A frozen EMA copy of the head and a running sum of the batches' mean labels.
    params["ema"] = {"head": params["head"], "label_sum": jnp.zeros((), jnp.float32)}
    return {**variables, "params": params}

  def trainable(self, params):
    if not self.config.ema_decay:
      return None
    return {k: jax.tree.map(lambda _, frozen=(k == "ema"): not frozen, v) for k, v in params.items()}

  def post_update(self, params, stats, step):
    if not self.config.ema_decay:
      return params
    d = self.config.ema_decay
    head = jax.tree.map(lambda e, p: d * e + (1 - d) * p, params["ema"]["head"], params["head"])
    return {**params, "ema": {"head": head,
                              "label_sum": params["ema"]["label_sum"] + stats["mean_label"]}}

  def loss(self, params, batch, rng, *, train=True):
    params = {k: v for k, v in params.items() if k != "ema"}
    logits, aux = self.model.apply({"params": params}, batch["image"], train=train,
                                   return_aux=True, rngs={"dropout": rng})
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
    if self.config.nan_loss or os.environ.get("DIGITS_NAN_LOSS") == "1":
      loss = loss * jnp.nan
    metrics = {"accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"])}
    if self.config.ema_decay:
      metrics["update_stats"] = {"mean_label": jnp.mean(batch["label"].astype(jnp.float32))}
    if "losses" in aux:  # the engine adds them to the objective
      metrics["aux_losses"] = aux["losses"]
    return loss, metrics

  def evaluate(self, params, ctx):
    if os.environ.get("DIGITS_SIGINT_IN_EVAL") == "1":  # tests: Ctrl-C during evaluation
      os.kill(os.getpid(), signal.SIGINT)
    params = {k: v for k, v in params.items() if k != "ema"}
    apply = jax.jit(lambda p, x: jnp.argmax(self.model.apply({"params": p}, x), -1))
    correct = total = 0
    for batch in ctx.batches(self.eval_split):
      mask = ctx.to_host(batch["mask"])
      pred = ctx.to_host(apply(params, batch["image"]))
      correct += int(((pred == ctx.to_host(batch["label"])) & mask).sum())
      total += int(mask.sum())
    return {"eval/accuracy": correct / total, "eval/count": total}

  def flops_per_example(self):
    b = self.config.backbone
    return 16 * b.flops_per_token(16)

  def tokens_per_example(self):
    return 16


def run_config():
  """A recipe for CLI tests: `datong train tests/engine_task.py:run_config`."""
  from datong.train.config import MeshConfig, OptimizerConfig, RunConfig, TrainConfig
  return RunConfig(task=DigitsTaskConfig(),
                   train=TrainConfig(steps=400, batch_size=32, log_every=5, checkpoint_every=0),
                   optimizer=OptimizerConfig(learning_rate=1e-3), mesh=MeshConfig())

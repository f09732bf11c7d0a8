"""Datong from a notebook: build, look inside, swap kernels, train, show.

The shared parts, composed in a few cells::

    import datong
    model = datong.build("vit", "tiny", image_size=8, patch_size=2, channels=1, num_classes=10)
    params = datong.init(model)                  # on example inputs; logical axes kept
    datong.describe(params)                      # path, shape, dtype, logical axes, sharding
    logits, aux = datong.apply(model, params)    # example inputs, or pass your own
    fast = datong.with_attention(model, "xla")   # same parameters, another kernel
    run = datong.fit("mae-digits", steps=50, batch_size=64)   # the engine of `datong train`
    run.plot()                                   # the loss curve from metrics.jsonl
    out = datong.reconstruct(run.model, run.params, datong.examples(run)["image"])
    datong.show_images([out["masked"], out["reconstruction"]])   # inline in a notebook

Everything here is a thin layer over the library: models are the modules of
``datong.unimodal`` / ``datong.multimodal``, ``fit`` calls
``datong.train.loop.train``, attention maps come from the backbone's own
``Attention`` (the reference softmax of the same q and k), reconstructions
from ``datong.unimodal.masked_image``. Unknown names raise a ``ValueError``
that lists the valid ones.

Overrides (``build``, ``fit``) name config fields: a dotted path
(``**{"decoder.depth": 1}``, or ``decoder__depth=1``) or just the last name
when that is unambiguous (``image_size=8``, ``learning_rate=1e-3``). A
backbone field without a path (``depth``, ``attention_impl``, ...) sets it in
every backbone of the model (both CLIP towers, MAE's encoder and decoder).

The modules, one job each: ``models`` (build, init, apply, count, swap the
attention kernel), ``params`` (``describe``: a table of the parameters and
their sharding), ``runs`` (``fit`` and its ``FitResult``, a run's examples,
tokenizer, generated text and zero-shot predictions), ``views`` (images,
confusion matrices, reconstructions, attention maps); ``_common`` holds the
small helpers they share.
"""

# Also public but outside ``__all__``, as before the split (``datong`` exports
# ``__all__`` only): map_backbones, resolve_overrides, ParamInfo.
from datong.notebook.models import (KINDS, abstract_params, apply, build, count, example_inputs,
                                    init, map_backbones, quick_compile, resolve_overrides,
                                    with_attention)
from datong.notebook.params import ParamInfo, ParamTable, describe
from datong.notebook.runs import (FitResult, caption, examples, fit, generate_text, run_config,
                                  tokenizer_of, zero_shot_predict)
from datong.notebook.views import (attention_maps, attention_weights, confusion_matrix,
                                   plot_confusion_matrix, reconstruct, show_attention, show_images)

__all__ = [
    "KINDS", "FitResult", "ParamTable", "abstract_params", "apply", "attention_maps",
    "attention_weights", "build", "caption", "confusion_matrix", "count", "describe", "example_inputs",
    "examples", "fit", "generate_text", "init", "plot_confusion_matrix", "quick_compile",
    "reconstruct", "run_config", "show_attention", "show_images", "tokenizer_of",
    "with_attention", "zero_shot_predict",
]

"""Per-layer outputs against Hugging Face's, and position tables at new resolutions.

MAE: the encoder's ``hidden_states`` (HF's ``output_hidden_states``) and the
decoder's per-layer outputs (HF does not return those: read with forward
hooks on its decoder layers) at every position.
"""

import jax.numpy as jnp
import numpy as np

from test_hf import _np, _randomize, _save, check, run, torch_hf  # noqa: F401

from datong import hf


def _mae(torch, T, image_size=16):
  cfg = T.ViTMAEConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=64, image_size=image_size, patch_size=4,
                       decoder_hidden_size=16, decoder_num_hidden_layers=2,
                       decoder_num_attention_heads=2, decoder_intermediate_size=32,
                       mask_ratio=0.75)
  ref = _randomize(torch, T.ViTMAEForPreTraining(cfg))
  with torch.no_grad():  # HF's decoder [CLS] position is a zero row (fixed sin-cos)
    ref.decoder.decoder_pos_embed[:, 0] = 0
  return ref


def _decoder_states(torch, ref, run_ref):
  """HF's MAE decoder: (input of its first layer, every layer's output)."""
  states = []
  hooks = [ref.decoder.decoder_layers[0].register_forward_pre_hook(
      lambda mod, args: states.append(args[0].detach().clone()))]
  for layer in ref.decoder.decoder_layers:
    hooks.append(layer.register_forward_hook(
        lambda mod, args, out: states.append((out[0] if isinstance(out, tuple) else out)
                                             .detach().clone())))
  try:
    with torch.no_grad():
      out = run_ref()
  finally:
    for h in hooks:
      h.remove()
  return out, states


def test_mae_encoder_and_decoder_layers_match_hf(torch_hf, tmp_path):
  torch, T = torch_hf
  ref = _mae(torch, T)
  rs = np.random.RandomState(3)
  pixels = rs.randn(2, 3, 16, 16).astype(np.float32)
  noise = rs.rand(2, 16).astype(np.float32)
  out, dec_states = _decoder_states(torch, ref, lambda: ref(
      torch.tensor(pixels), noise=torch.tensor(noise), output_hidden_states=True))
  model, params = hf.load(_save(ref, tmp_path / "mae"))
  m = hf.mae_masking(noise, model.config.mask_ratio)
  pred, aux = run(model, params, jnp.asarray(pixels.transpose(0, 2, 3, 1)), m.keep_indices,
                  m.restore_indices, return_layers=True)
  errs = {}
  check("logits", pred, _np(out.logits), errs)
  ours = [aux["embedded"]] + list(aux["layers"])
  assert len(ours) == len(out.hidden_states) == 3
  for i, (a, b) in enumerate(zip(ours, out.hidden_states)):
    check(f"encoder hidden_states[{i}]", a, _np(b), errs)
  ours = [aux["decoder_embedded"]] + list(aux["decoder_layers"])
  assert len(ours) == len(dec_states) == 3
  for i, (a, b) in enumerate(zip(ours, dec_states)):
    check(f"decoder hidden_states[{i}]", a, _np(b), errs)
  print("mae layers", {k: f"{v:.2e}" for k, v in errs.items()})

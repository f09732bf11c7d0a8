"""Per-layer outputs against Hugging Face's, and position tables at new resolutions.

MAE: the encoder's ``hidden_states`` (HF's ``output_hidden_states``) and the
decoder's per-layer outputs (HF does not return those: read with forward
hooks on its decoder layers) at every position. ViT, CLIP's vision tower and
MAE (encoder and decoder) at new, non-square resolutions equal HF's with
``interpolate_pos_encoding=True`` (torch's bicubic, ``ops.posemb``).
Checkpoints in every spelling (hub, 5.x ``save_pretrained``, 5.x
``state_dict()``) load to the same parameters.
"""

import jax.numpy as jnp
import numpy as np
import pytest

from test_hf import (_load_every_spelling, _np, _randomize, _spellings, check, rel, run,  # noqa: F401
                     torch_hf)

from datong import hf


def _every_spelling(torch, ref, tmp_path, family, pixels, **kw):
  """``ref`` saved in every spelling (hub, 5.x save_pretrained, 5.x
  state_dict), each checked to give the same params; the hub one loaded."""
  def forward(m):
    out = m(torch.tensor(pixels), **kw)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state
  return _load_every_spelling(_spellings(torch, ref, tmp_path, family, forward))


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
  model, params = _every_spelling(torch, ref, tmp_path, "vit_mae", pixels,
                                  noise=torch.tensor(noise))
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


# ------------------------------------------- position tables at new sizes --
# Trained at 16 x 16 (a 4 x 4 grid); run smaller and larger, never square.
SIZES = [(12, 20), (24, 32)]


def test_torch_bicubic_equals_torch_interpolate(torch_hf):
  from datong.ops.posemb import interpolate_1d, interpolate_2d
  torch, _ = torch_hf
  rs = np.random.RandomState(0)
  for old, new in [((4, 4), (6, 10)), ((5, 5), (3, 7)), ((3, 4), (8, 2)), ((14, 14), (24, 40))]:
    table = rs.randn(old[0] * old[1], 8).astype(np.float32)
    want = torch.nn.functional.interpolate(
        torch.tensor(table.reshape(1, *old, 8)).permute(0, 3, 1, 2), size=new, mode="bicubic",
        align_corners=False).permute(0, 2, 3, 1).reshape(-1, 8).numpy()
    check(f"bicubic {old}->{new}", interpolate_2d(jnp.asarray(table), old, new), want)
    # jax.image.resize's bicubic (Keys a = -0.5) is another function, kept on request.
    assert rel(interpolate_2d(jnp.asarray(table), old, new, method="bicubic"), want) > 1e-3
  table = rs.randn(16, 8).astype(np.float32)
  want = torch.nn.functional.interpolate(torch.tensor(table).T[None, :, None], size=(1, 40),
                                         mode="bicubic", align_corners=False)[0, :, 0].T.numpy()
  check("bicubic 1-d", interpolate_1d(jnp.asarray(table), 40), want)


def _vit_family_case(torch, T, kind):
  common = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=64, image_size=16, patch_size=4)
  if kind == "vit":
    return _randomize(torch, T.ViTModel(T.ViTConfig(**common), add_pooling_layer=True))
  return _randomize(torch, T.CLIPVisionModel(T.CLIPVisionConfig(**common)))


@pytest.mark.parametrize("kind", ["vit", "clip_vision"])
def test_vit_and_clip_vision_at_new_resolutions_match_hf(torch_hf, tmp_path, kind):
  torch, T = torch_hf
  ref = _vit_family_case(torch, T, kind)
  rs = np.random.RandomState(4)
  model, params = _every_spelling(torch, ref, tmp_path, kind,
                                  rs.randn(2, 3, 16, 16).astype(np.float32))
  for h, w in SIZES:
    pixels = rs.randn(2, 3, h, w).astype(np.float32)
    with torch.no_grad():
      out = ref(pixel_values=torch.tensor(pixels), interpolate_pos_encoding=True,
                output_hidden_states=True)
    _, aux = run(model, params, jnp.asarray(pixels.transpose(0, 2, 3, 1)), return_layers=True)
    errs = {}
    last = aux["encoded"] if kind == "vit" else aux["pre_norm"]
    check(f"last_hidden_state {h}x{w}", last, _np(out.last_hidden_state), errs)
    check(f"pooler_output {h}x{w}", aux["pooled"], _np(out.pooler_output), errs)
    for i, (a, b) in enumerate(zip([aux["embedded"]] + list(aux["layers"]), out.hidden_states)):
      check(f"hidden_states[{i}] {h}x{w}", a, _np(b), errs)
    print(kind, h, w, {k: f"{v:.2e}" for k, v in errs.items()})


def test_mae_at_new_resolutions_matches_hf(torch_hf, tmp_path):
  torch, T = torch_hf
  ref = _mae(torch, T)
  rs = np.random.RandomState(5)
  model, params = _every_spelling(torch, ref, tmp_path, "vit_mae",
                                  rs.randn(2, 3, 16, 16).astype(np.float32),
                                  noise=torch.tensor(rs.rand(2, 16).astype(np.float32)))
  for h, w in SIZES:
    pixels = rs.randn(2, 3, h, w).astype(np.float32)
    noise = rs.rand(2, (h // 4) * (w // 4)).astype(np.float32)
    out, dec_states = _decoder_states(torch, ref, lambda: ref(
        torch.tensor(pixels), noise=torch.tensor(noise), interpolate_pos_encoding=True,
        output_hidden_states=True))
    m = hf.mae_masking(noise, model.config.mask_ratio)
    pred, aux = run(model, params, jnp.asarray(pixels.transpose(0, 2, 3, 1)), m.keep_indices,
                    m.restore_indices, return_layers=True)
    errs = {}
    check(f"logits {h}x{w}", pred, _np(out.logits), errs)
    for i, (a, b) in enumerate(zip([aux["embedded"]] + list(aux["layers"]), out.hidden_states)):
      check(f"encoder hidden_states[{i}]", a, _np(b), errs)
    for i, (a, b) in enumerate(zip([aux["decoder_embedded"]] + list(aux["decoder_layers"]),
                                   dec_states)):
      check(f"decoder hidden_states[{i}]", a, _np(b), errs)
    print("mae", h, w, {k: f"{v:.2e}" for k, v in errs.items()})

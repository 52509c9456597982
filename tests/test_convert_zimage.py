"""Z-Image converter: parity with diffusers' ZImageTransformer2DModel on tiny random models.

Tiny models with different head counts and widths, patch sizes (spatial and temporal),
refiner depths, with and without qk-norm and SigLIP parameters are built in torch, every
parameter redrawn (pad tokens and adaLN linears included), saved with ``save_pretrained``
and loaded with ``converters.from_diffusers``. Batches mix image sizes and caption lengths
(so the 32-token padding, pad tokens and attention masks are all exercised). The whole model
and every block (fed the inputs the torch block saw) must agree within the issue's bar.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.models.transformers.transformer_z_image import RopeEmbedder
from flax import nnx

import converters
from converters import zimage
from tests import diffusers_models as dm

CLASS = "ZImageTransformer2DModel"
PARITY_RTOL = 1e-5  # the bar for fp32 parity
F32_EPS = float(np.finfo(np.float32).eps)

TINY = {
    # Two heads of 16, one refiner layer of each kind, patch 2.
    "base": dict(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32,
                 n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=16,
                 axes_dims=[4, 6, 6], axes_lens=[160, 16, 16]),
    # Three heads, no qk-norm, two refiner layers, two patchifiers (uses patch 1 x frame 2).
    "multi_patch": dict(all_patch_size=(2, 1), all_f_patch_size=(1, 2), in_channels=3, dim=48,
                        n_layers=1, n_refiner_layers=2, n_heads=3, n_kv_heads=3, qk_norm=False,
                        cap_feat_dim=8, axes_dims=[8, 4, 4], axes_lens=[128, 16, 16],
                        norm_eps=1e-6, rope_theta=10000.0, t_scale=500.0),
    # Eight narrow heads, no refiner layers, SigLIP parameters present (omni checkpoints).
    "narrow_heads": dict(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=64,
                         n_layers=2, n_refiner_layers=0, n_heads=8, n_kv_heads=8,
                         cap_feat_dim=12, siglip_feat_dim=8, axes_dims=[2, 2, 4],
                         axes_lens=[128, 16, 16]),
}

# Per item: latent (C, F, H, W) spatial part (F, H, W) and caption length.
ITEMS = {
    "base": [((1, 8, 8), 5), ((1, 12, 8), 40)],           # 16 / 24 tokens, ragged batch
    "multi_patch": [((2, 4, 6), 32), ((2, 4, 6), 32)],     # equal lengths: no attention mask
    "narrow_heads": [((1, 16, 16), 33)],                   # 64 image tokens: no image padding
}
PATCH = {"base": (2, 1), "multi_patch": (1, 2), "narrow_heads": (2, 1)}

# Z-Image-Turbo's transformer/config.json (Tongyi-MAI/Z-Image-Turbo, diffusers 0.36).
Z_IMAGE_TURBO = dict(all_patch_size=[2], all_f_patch_size=[1], in_channels=16, dim=3840,
                     n_layers=30, n_refiner_layers=2, n_heads=30, n_kv_heads=30, norm_eps=1e-5,
                     qk_norm=True, cap_feat_dim=2560, rope_theta=256.0, t_scale=1000.0,
                     axes_dims=[32, 48, 48], axes_lens=[1536, 512, 512])


def _inputs(name: str, seed: int) -> dict:
  """``x`` and ``cap_feats`` lists, ``t`` in (0, 1), patch sizes; NumPy float32."""
  rng = np.random.default_rng(seed)
  config = TINY[name]
  normal = lambda *shape: rng.standard_normal(shape, dtype=np.float32)  # noqa: E731
  items = ITEMS[name]
  p, pf = PATCH[name]
  return dict(x=[normal(config["in_channels"], *fhw) for fhw, _ in items],
              cap_feats=[normal(n, config["cap_feat_dim"]) for _, n in items],
              t=rng.uniform(0.0, 1.0, len(items)).astype(np.float32),
              patch_size=p, f_patch_size=pf)


def _jax_inputs(inputs: dict) -> dict:
  return jax.tree.map(lambda v: jnp.asarray(v) if isinstance(v, np.ndarray) else v, inputs)


def _torch_inputs(inputs: dict) -> dict:
  return {k: [torch.from_numpy(a) for a in v] if isinstance(v, list) else dm.to_torch(v)
          for k, v in inputs.items()}


@nnx.jit(static_argnums=(2, 3))
def _jit_forward(model, arrays, patch_size, f_patch_size):
  return model(**arrays, patch_size=patch_size, f_patch_size=f_patch_size)


def _forward(model, inputs: dict, **extra) -> list:
  """The JAX model on ``inputs`` under ``jit`` (patch sizes static)."""
  arrays = {k: v for k, v in inputs.items() if k not in ("patch_size", "f_patch_size")}
  arrays = jax.tree.map(jnp.asarray, {**arrays, **extra})
  return _jit_forward(model, arrays, inputs["patch_size"], inputs["f_patch_size"])


@nnx.jit
def _jit_block(block, args):
  return block(*args)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
  """``zoo(name)``: (torch model, JAX model, inputs) for a tiny config, via save_pretrained,
  built once per module."""
  cache = {}

  def get(name: str):
    if name not in cache:
      folder = tmp_path_factory.mktemp(f"zimage-{name}")
      cache[name] = (*dm.build_and_convert(CLASS, TINY[name], folder, seed=1),
                     _inputs(name, seed=2))
    return cache[name]

  return get


@pytest.fixture(params=sorted(TINY))
def converted(request, zoo):
  """(name, torch model, JAX model, inputs), for each tiny config."""
  return (request.param, *zoo(request.param))


def test_model_parity(converted):
  _, torch_model, model, inputs = converted
  with torch.no_grad():
    want = torch_model(**_torch_inputs(inputs)).sample
  got = _forward(model, inputs)
  assert len(got) == len(want)
  for g, w in zip(got, want):
    assert g.shape == tuple(w.shape)
    assert dm.rel_err(g, w) <= PARITY_RTOL


def test_block_parity(converted):
  """Every refiner and main block, fed what the torch block saw inside the model."""
  _, torch_model, model, inputs = converted
  n_calls = 0
  for list_name in ("noise_refiner", "context_refiner", "layers"):
    blocks = getattr(model, list_name)
    calls = dm.capture_blocks(torch_model, getattr(torch_model, list_name),
                              _torch_inputs(inputs))
    assert len(calls) == len(blocks)
    for block, (args, kwargs, want) in zip(blocks, calls):
      assert not kwargs
      got = _jit_block(block, tuple(dm.to_jax(a) for a in args))
      assert dm.rel_err(got, want) <= PARITY_RTOL, list_name
      n_calls += 1
  assert n_calls == len(model.blocks())


def test_controlnet_block_samples(zoo):
  name = "base"
  torch_model, model, inputs = zoo(name)
  # Unified length: per item padded image tokens + padded caption tokens, then the longest.
  pad = lambda n: n + (-n) % zimage.SEQ_MULTI_OF  # noqa: E731
  seq = max(pad(math.prod(fhw) // 4) + pad(n) for fhw, n in ITEMS[name])
  rng = np.random.default_rng(3)
  samples = {1: rng.standard_normal((len(ITEMS[name]), seq, TINY[name]["dim"]), np.float32)}
  with torch.no_grad():
    want = torch_model(**_torch_inputs(inputs),
                       controlnet_block_samples=dm.to_torch(samples)).sample
  got = _forward(model, inputs, controlnet_block_samples=samples)
  plain = _forward(model, inputs)
  for g, w, p in zip(got, want, plain):
    assert dm.rel_err(g, w) <= PARITY_RTOL
    assert dm.rel_err(p, w) > PARITY_RTOL  # the residual changed the output


def test_per_token_modulation_matches_diffusers(zoo):
  """Omni-mode blocks: noisy and clean tokens take different modulations, masked keys."""
  name = "base"
  torch_model, model, _ = zoo(name)
  rng = np.random.default_rng(4)
  b, t, dim = 2, 12, TINY[name]["dim"]
  adaln = min(dim, zimage.ADALN_EMBED_DIM)
  angles = rng.uniform(-np.pi, np.pi, (b, t, dim // TINY[name]["n_heads"] // 2))
  args = (rng.standard_normal((b, t, dim), np.float32),
          np.arange(t)[None] < np.array([[t], [t - 5]]),
          np.exp(1j * angles).astype(np.complex64),
          None,
          rng.integers(0, 2, (b, t)),
          rng.standard_normal((b, adaln), np.float32),
          rng.standard_normal((b, adaln), np.float32))
  targs = tuple(None if a is None else torch.from_numpy(np.asarray(a)) for a in args)
  with torch.no_grad():
    want = torch_model.layers[0](*targs)
    final = torch_model.all_final_layer["2-1"]
    want_final = final(targs[0], noise_mask=targs[4], c_noisy=targs[5], c_clean=targs[6])
  jargs = tuple(None if a is None else jnp.asarray(a) for a in args)
  assert dm.rel_err(_jit_block(model.layers[0], jargs), want) <= PARITY_RTOL
  got_final = model.all_final_layer["2-1"](jargs[0], noise_mask=jargs[4], c_noisy=jargs[5],
                                           c_clean=jargs[6])
  assert dm.rel_err(got_final, want_final) <= PARITY_RTOL


def test_bf16_checkpoint_loads_exactly(tmp_path):
  """A bf16 checkpoint read into float32 holds the bf16 values exactly: fp32 parity with
  the torch model whose weights were rounded the same way."""
  torch_model = dm.build(CLASS, TINY["base"], seed=5).to(torch.bfloat16)
  model = converters.from_diffusers(dm.save(torch_model, tmp_path), dtype=jnp.float32)
  inputs = _inputs("base", seed=6)
  with torch.no_grad():
    want = torch_model.float()(**_torch_inputs(inputs)).sample
  for g, w in zip(_forward(model, inputs), want):
    assert dm.rel_err(g, w) <= PARITY_RTOL


def test_rope_matches_diffusers_at_full_size():
  """Z-Image-Turbo's axes at the far ends of its tables: angles rounded from float64."""
  dims, lens = Z_IMAGE_TURBO["axes_dims"], Z_IMAGE_TURBO["axes_lens"]
  rng = np.random.default_rng(7)
  ids = np.stack([rng.integers(0, n, 4096) for n in lens], axis=-1).astype(np.int32)
  ids[:3] = np.array(lens) - 1
  want = RopeEmbedder(theta=256.0, axes_dims=dims, axes_lens=lens)(torch.from_numpy(ids))
  got = zimage.rope_frequencies(ids, dims, lens, 256.0)
  # Same float32 angles; cos/sin each within ~1 ulp of the exactly rounded value.
  assert np.abs(got - want.numpy()).max() <= 2 * F32_EPS


def test_to_diffusers_round_trip(tmp_path):
  torch_model, model = dm.build_and_convert(CLASS, TINY["narrow_heads"], tmp_path / "in", seed=8)
  dm.assert_round_trip(torch_model, model, tmp_path / "out")


def test_full_size_z_image_turbo_from_config_matches_diffusers_layout():
  """Z-Image-Turbo at real size, abstract (no allocation): same keys, shapes, param count."""
  dm.assert_full_size_layout(CLASS, Z_IMAGE_TURBO)


# ----------------------------------------------------------------------------- sites


BLOCK_LISTS = ("noise_refiner", "context_refiner", "siglip_refiner", "layers")


def test_sites_cover_every_block_linear_exactly_once():
  config = {"_class_name": CLASS, **TINY["narrow_heads"], "n_refiner_layers": 1}
  model = nnx.eval_shape(lambda: converters.from_config(config, dtype=jnp.float32))
  linears = dm.linear_paths(model)
  in_blocks = [k for k in linears if k.split(".")[0] in BLOCK_LISTS]
  dm.check_site_coverage(model, in_blocks)
  # Embedders and the final layer stay in float.
  assert {k.split(".")[0] for k in set(linears) - set(in_blocks)} == {
      "all_x_embedder", "all_final_layer", "t_embedder", "cap_embedder", "siglip_embedder"}
  sites = model.permutation_sites()
  kinds = [s.kind for s in sites if s.name.startswith("noise_refiner.0.")]
  assert kinds == ["norm", "producer", "norm", "producer", "input"]
  kinds = [s.kind for s in sites if s.name.startswith("siglip_refiner.0.")]
  assert kinds == ["norm", "producer", "norm", "producer"]  # unmodulated: no adaLN linear


def test_folding_random_permutations_at_every_site_keeps_the_output(tmp_path):
  """Each site's description is complete: folding a permutation there changes nothing."""
  _, model = dm.build_and_convert(CLASS, TINY["base"], tmp_path, seed=9)
  inputs = _inputs("base", seed=10)
  want = _forward(model, inputs)
  rng = np.random.default_rng(11)
  perms = {s.name: dm.random_site_permutation(s, rng) for s in model.permutation_sites()}
  # Only the summation order inside the permuted matmuls changes, the same kind of float32
  # difference the parity bar admits.
  for g, w in zip(_forward(dm.fold_permutations(model, perms), inputs), want):
    assert dm.rel_err(g, w) <= PARITY_RTOL
  # A cross-head permutation at a P2 site is not foldable: the check above can fail.
  across = {**perms, "layers.0.P2": rng.permutation(perms["layers.0.P2"].size)}
  folded = dm.fold_permutations(model, across)
  assert max(dm.rel_err(g, w) for g, w in zip(_forward(folded, inputs), want)) > PARITY_RTOL


# ----------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def tiny_model():
  """Abstract (no weights): every check below must fire before any computation."""
  config = {"_class_name": CLASS, **TINY["base"]}
  return nnx.eval_shape(lambda: converters.from_config(config, dtype=jnp.float32))


def _bad(case: str) -> tuple[dict, str]:
  inputs = _inputs("base", seed=0)
  if case == "channels":
    inputs["x"][0] = inputs["x"][0][:3]
    return inputs, r"x\[0\] has shape \(3, 1, 8, 8\)"
  if case == "odd_height":
    inputs["x"][1] = inputs["x"][1][:, :, :11]
    return inputs, r"x\[1\] has shape \(4, 1, 11, 8\)"
  if case == "cap_width":
    inputs["cap_feats"][1] = inputs["cap_feats"][1][:, :15]
    return inputs, r"cap_feats\[1\] has shape \(40, 15\)"
  if case == "item_count":
    inputs["cap_feats"] = inputs["cap_feats"][:1]
    return inputs, "x has 2 items and cap_feats 1"
  if case == "t_shape":
    inputs["t"] = inputs["t"][:1]
    return inputs, r"t has shape \(1,\)"
  if case == "patch":
    inputs["patch_size"] = 1
    return inputs, r"\(patch_size, f_patch_size\) = \(1, 1\)"
  if case == "rope_overflow":
    inputs["cap_feats"][0] = np.zeros((150, 16), np.float32)  # 160 padded > axes_lens[0]
    return inputs, r"RoPE axis 0 position 1[0-9]{2} is outside \[0, axes_lens\[0\]=160\)"
  raise AssertionError(case)


@pytest.mark.parametrize("case", ["channels", "odd_height", "cap_width", "item_count",
                                  "t_shape", "patch", "rope_overflow"])
def test_bad_input_raises_naming_it(tiny_model, case):
  inputs, match = _bad(case)
  with pytest.raises(ValueError, match=match):
    tiny_model(**_jax_inputs(inputs))


def test_omni_inputs_are_refused(tiny_model):
  inputs = _jax_inputs(_inputs("base", seed=0))
  with pytest.raises(NotImplementedError, match="omni mode"):
    tiny_model(**{**inputs, "x": [[a] for a in inputs["x"]]})
  with pytest.raises(NotImplementedError, match="siglip_feats"):
    tiny_model(**inputs, siglip_feats=[[None], [None]])


def test_controlnet_key_past_the_layers_raises(tiny_model):
  inputs = _jax_inputs(_inputs("base", seed=0))
  with pytest.raises(ValueError, match=r"keys \[2\] are not layer indices \[0, 2\)"):
    tiny_model(**inputs, controlnet_block_samples={2: jnp.zeros((2, 96, 32))})


@pytest.mark.parametrize("change,match", [
    ({"axes_dims": [4, 4, 4]}, r"dim // n_heads = 16 must equal sum\(axes_dims\) = 12"),
    ({"all_f_patch_size": (1, 1)}, r"all_patch_size \(2,\) and all_f_patch_size \(1, 1\)"),
])
def test_bad_config_raises_naming_it(change, match):
  with pytest.raises(ValueError, match=match):
    converters.from_config({"_class_name": CLASS, **TINY["base"], **change}, dtype=jnp.float32)

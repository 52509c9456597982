"""SANA converter: parity with diffusers' SanaTransformer2DModel, layouts, permutation sites."""

from __future__ import annotations

import inspect

import diffusers
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import converters
from converters.checkpoint import module_at
from converters.sana import DEFAULTS, PointwiseConv, SanaTransformer2DModel
from tests import diffusers_models as dm

NAME = "SanaTransformer2DModel"
TOL = 1e-5  # the parity bound (relative Frobenius error, fp32)
EPS32 = float(np.finfo(np.float32).eps)

_TINY = dict(in_channels=4, num_layers=2, caption_channels=12, sample_size=8, mlp_ratio=2.5)

CONFIGS = {
    # plain SANA: no qk norm, no mask, one-pixel patches
    "sana": dict(_TINY, num_attention_heads=2, attention_head_dim=8,
                 num_cross_attention_heads=2, cross_attention_head_dim=8,
                 cross_attention_dim=16),
    # SANA-1.5-like: RMS q/k norms, 2x2 patches, cross-attention narrower than the stream,
    # affine norm2, biased self-attention, more output channels, caption mask
    "sana15_mask": dict(_TINY, out_channels=8, num_attention_heads=4, attention_head_dim=4,
                        num_cross_attention_heads=4, cross_attention_head_dim=2,
                        cross_attention_dim=16, patch_size=2, qk_norm="rms_norm_across_heads",
                        norm_elementwise_affine=True, attention_bias=True, mlp_ratio=2.0),
    # SANA-Sprint-like: guidance embedding, sincos positions, LayerNorm q/k, one head
    "sprint_pos": dict(_TINY, num_attention_heads=1, attention_head_dim=16,
                       num_cross_attention_heads=2, cross_attention_head_dim=8,
                       cross_attention_dim=16, patch_size=2, guidance_embeds=True,
                       interpolation_scale=1.0, qk_norm="layer_norm_across_heads"),
}
MASKED = {"sana15_mask", "sprint_pos"}


def _inputs(name: str, cfg: dict, seed: int = 1) -> dict[str, torch.Tensor]:
  g = torch.Generator().manual_seed(seed)
  b, tokens = 2, 5
  inputs = {
      # non-square latents exercise the (h, w) order of patchify/unpatchify
      "hidden_states": torch.randn(b, cfg["in_channels"], 8, 12, generator=g),
      "encoder_hidden_states": torch.randn(b, tokens, cfg["caption_channels"], generator=g),
      "timestep": torch.tensor([17.0, 640.0]),
  }
  if name in MASKED:
    inputs["encoder_attention_mask"] = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    # diffusers accepts a self-attention mask and ignores it (linear attention): so do we
    inputs["attention_mask"] = torch.ones(b, 8 * 12 // cfg.get("patch_size", 1) ** 2)
  if cfg.get("guidance_embeds"):
    inputs["guidance"] = torch.tensor([3.5, 4.5])
  return inputs


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def converted(request, tmp_path_factory):
  """(config name, torch model, our fp32 model loaded from its save_pretrained folder)."""
  name = request.param
  return name, *dm.build_and_convert(NAME, CONFIGS[name], tmp_path_factory.mktemp(name),
                                     seed=len(name))


def test_whole_model_and_block_parity(converted):
  name, ref, model = converted
  inputs = _inputs(name, CONFIGS[name])
  with torch.no_grad():
    want = ref(**inputs).sample
  got = model(**dm.to_jax(inputs))
  assert got.shape == tuple(want.shape)
  assert dm.rel_err(got, want) <= TOL
  if name in MASKED:  # the caption mask matters: dropping it changes the output
    unmasked = dict(dm.to_jax(inputs), encoder_attention_mask=None)
    assert dm.rel_err(model(**unmasked), want) > 1e-3

  calls = dm.capture_blocks(ref, ref.transformer_blocks, inputs)
  assert len(calls) == len(model.transformer_blocks)
  for block, (args, kwargs, out) in zip(model.transformer_blocks, calls):
    got = block(*[dm.to_jax(a) for a in args], **dm.to_jax(kwargs))
    assert dm.rel_err(got, out) <= TOL


def test_to_diffusers_round_trip(converted, tmp_path):
  _, ref, model = converted
  dm.assert_round_trip(ref, model, tmp_path / "out")


# ----------------------------------------------------------------------------- structure


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_permutation_sites_cover_every_block_linear_once(name):
  cfg = dict(CONFIGS[name], _class_name=NAME)
  model = nnx.eval_shape(lambda: converters.from_config(cfg, dtype=jnp.float32))
  block_linears = [p for p in dm.linear_paths(model) if p.startswith("transformer_blocks.")]
  # each exactly once, nothing outside blocks
  dm.check_site_coverage(model, block_linears)
  # the GLUMBConv 1x1 convs are linears for the pipeline
  assert isinstance(model.transformer_blocks[0].ff.conv_inverted, PointwiseConv)


@pytest.mark.parametrize("site_suffix", ["P4", "attn1.P2", "attn2.P2"])
def test_producer_sites_fold_exactly(converted, site_suffix):
  """Folding a permutation at P4 (both GLU halves + depthwise conv) or P2 (V within heads)
  leaves the block output equal up to fp32 re-association of the consumer's sum."""
  name, ref, model = converted
  inputs = _inputs(name, CONFIGS[name])
  args = [dm.to_jax(a) for a in dm.capture_blocks(ref, ref.transformer_blocks, inputs)[0][0]]
  site = next(s for s in model.permutation_sites()
              if s.name == f"transformer_blocks.0.{site_suffix}")
  before = model.transformer_blocks[0](*args)
  folded = nnx.clone(model)
  dm.permute_site_params(folded, site, dm.random_site_permutation(site, np.random.default_rng(0)))
  after = folded.transformer_blocks[0](*args)
  # Only the consumer's K-term sums are reordered. Each ordering is within gamma_K ~ K*u of
  # the exact sum (u = eps/2, Higham), so the two differ by <= K*eps relative; 2*K*eps leaves
  # room for the norm-wise comparison.
  assert dm.rel_err(after, before) <= 2 * site.width * EPS32
  assert not np.array_equal(np.asarray(module_at(folded, site.consumers[0].path).kernel[...]),
                            np.asarray(module_at(model, site.consumers[0].path).kernel[...]))


def test_p4_fold_needs_both_glu_halves(converted):
  """Control for the fold test: permuting only the GLU value half breaks the block."""
  name, ref, model = converted
  inputs = _inputs(name, CONFIGS[name])
  args = [dm.to_jax(a) for a in dm.capture_blocks(ref, ref.transformer_blocks, inputs)[0][0]]
  site = next(s for s in model.permutation_sites() if s.name == "transformer_blocks.0.P4")
  half = type(site)(site.name, site.kind, site.width, site.consumers,
                    producers=site.producers[:1], channelwise=site.channelwise)
  before = model.transformer_blocks[0](*args)
  broken = nnx.clone(model)
  dm.permute_site_params(broken, half, np.random.default_rng(0).permutation(site.width))
  assert dm.rel_err(broken.transformer_blocks[0](*args), before) > 1e-3


# ----------------------------------------------------------------------------- full size


SANA_1600M = {}  # diffusers' defaults are Sana_1600M's dimensions
SANA15_1600M = {"qk_norm": "rms_norm_across_heads"}


@pytest.mark.parametrize("config", [SANA_1600M, SANA15_1600M], ids=["1600M", "1.5-1600M"])
def test_full_size_layout_matches_diffusers(config):
  assert dm.assert_full_size_layout(NAME, config) > 1.5e9


def test_defaults_are_diffusers_defaults():
  sig = inspect.signature(diffusers.SanaTransformer2DModel.__init__)
  want = {k: p.default for k, p in sig.parameters.items() if k != "self"}
  assert DEFAULTS == want


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("change, word", [
    ({"qk_norm": "rms_norm"}, "qk_norm"),
    ({"cross_attention_dim": 8}, "cross_attention_dim"),
    ({"cross_attention_dim": None}, "cross_attention_dim"),
])
def test_bad_config_raises(change, word):
  cfg = dict(CONFIGS["sana"], **change)
  with pytest.raises(ValueError, match=word):
    SanaTransformer2DModel(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0))


def _abstract(name: str) -> SanaTransformer2DModel:
  # Input checks run before any parameter is read, so a shape-only model suffices.
  cfg = CONFIGS[name]
  return nnx.eval_shape(lambda: SanaTransformer2DModel(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0)))


@pytest.mark.parametrize("name, drop, add", [
    ("sprint_pos", "guidance", None),
    ("sana", None, "guidance"),
])
def test_guidance_mismatch_raises(name, drop, add):
  cfg = CONFIGS[name]
  model = _abstract(name)
  inputs = dm.to_jax(_inputs(name, cfg))
  inputs.pop(drop, None)
  if add:
    inputs[add] = jnp.ones((2,))
  with pytest.raises(ValueError, match="guidance"):
    model(**inputs)


@pytest.mark.parametrize("key, value, word", [
    ("encoder_attention_mask", np.ones((5,)), "encoder_attention_mask"),
    ("hidden_states", np.ones((2, 4, 8, 11), np.float32), "patch_size"),
])
def test_bad_input_raises(key, value, word):
  cfg = CONFIGS["sana15_mask"]
  model = _abstract("sana15_mask")
  inputs = dict(dm.to_jax(_inputs("sana15_mask", cfg)), **{key: value})
  with pytest.raises(ValueError, match=word):
    model(**inputs)

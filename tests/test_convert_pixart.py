"""PixArtTransformer2DModel (alpha and Sigma configs): parity with diffusers (whole model, each
block; with and without masks), bf16 and sharded checkpoints, ``to_diffusers``, sites."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from tests import diffusers_models as dm

# fp32 parity bound of issue 3 (torch and XLA differ in summation order and rounding only).
RTOL = 1e-5

CONFIGS = {
    # sample_size 128 derives use_additional_conditions=True and interpolation_scale=2.
    "alpha_derived": dict(num_attention_heads=3, attention_head_dim=8, in_channels=4,
                          out_channels=8, num_layers=2, sample_size=128, patch_size=2,
                          caption_channels=12, cross_attention_dim=24),
    "alpha_explicit": dict(num_attention_heads=6, attention_head_dim=4, in_channels=4,
                           out_channels=8, num_layers=2, sample_size=8, patch_size=2,
                           caption_channels=10, cross_attention_dim=24,
                           use_additional_conditions=True, interpolation_scale=1),
    "sigma": dict(num_attention_heads=4, attention_head_dim=4, in_channels=4, out_channels=8,
                  num_layers=2, sample_size=16, patch_size=2, caption_channels=12,
                  cross_attention_dim=16, use_additional_conditions=False,
                  interpolation_scale=2),
    "no_caption_proj_geglu": dict(num_attention_heads=2, attention_head_dim=8, in_channels=3,
                                  out_channels=None, num_layers=2, sample_size=8, patch_size=1,
                                  cross_attention_dim=12, use_additional_conditions=False,
                                  norm_elementwise_affine=True, attention_bias=False,
                                  activation_fn="geglu"),
}


def uses_conditions(cfg: dict) -> bool:
  flag = cfg.get("use_additional_conditions")
  return cfg["sample_size"] == 128 if flag is None else flag


def make_inputs(cfg: dict, *, mask: str | None = None, height: int = 8, width: int = 12,
                seed: int = 1) -> dict:
  """Latents ``(2, C, height, width)`` (non-square), 5 caption tokens, ``mask`` in
  ``None | "keep" (B, S) 0/1 | "bias" (B, 1, S) | "self"`` (a keep-mask on image tokens too)."""
  g = torch.Generator().manual_seed(seed)
  s = 5
  enc_dim = cfg.get("caption_channels") or cfg["cross_attention_dim"]
  inputs = {
      "hidden_states": torch.randn(2, cfg["in_channels"], height, width, generator=g),
      "encoder_hidden_states": torch.randn(2, s, enc_dim, generator=g),
      "timestep": torch.tensor([7, 981]),
  }
  if uses_conditions(cfg):
    inputs["added_cond_kwargs"] = {"resolution": torch.tensor([[512.0, 768.0], [1024, 1024]]),
                                   "aspect_ratio": torch.tensor([[1.5], [1.0]])}
  keep = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
  if mask == "keep":
    inputs["encoder_attention_mask"] = keep
  elif mask == "bias":
    inputs["encoder_attention_mask"] = ((1 - keep.float()) * -10000.0)[:, None]
  elif mask == "self":
    inputs["encoder_attention_mask"] = keep
    p = cfg["patch_size"]
    tokens = (height // p) * (width // p)
    inputs["attention_mask"] = (torch.arange(tokens)[None] < torch.tensor([[tokens - 3],
                                                                          [tokens]])).long()
  return inputs


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def case(request, tmp_path_factory):
  cfg = CONFIGS[request.param]
  folder = tmp_path_factory.mktemp(request.param)
  return cfg, *dm.build_and_convert("PixArtTransformer2DModel", cfg, folder)


@pytest.mark.parametrize("mask", [None, "keep", "bias", "self"])
def test_model_parity(case, mask):
  cfg, model, jmodel = case
  inputs = make_inputs(cfg, mask=mask)
  want = dm.torch_sample(model, inputs)
  assert dm.rel_err(jmodel(**dm.to_jax(inputs)), want) <= RTOL
  if mask is not None:
    # the mask matters, so parity above is not vacuous about it
    assert dm.rel_err(dm.torch_sample(model, make_inputs(cfg)), want) > 1e-3


@pytest.mark.parametrize("case", ["alpha_explicit"], indirect=True)
def test_jit_matches_eager(case):
  cfg, _, jmodel = case
  inputs = dm.to_jax(make_inputs(cfg, mask="keep"))
  jitted = nnx.jit(lambda m, kw: m(**kw))(jmodel, inputs)
  assert dm.rel_err(jitted, jmodel(**inputs)) <= RTOL


def test_block_parity(case):
  cfg, model, jmodel = case
  inputs = make_inputs(cfg, mask="self")
  calls = dm.capture_blocks(model, model.transformer_blocks, inputs)
  assert len(calls) == cfg["num_layers"]
  for block, (args, kwargs, out) in zip(jmodel.transformer_blocks, calls):
    got = block(dm.to_jax(args[0]),
                attention_mask=dm.to_jax(kwargs["attention_mask"]),
                encoder_hidden_states=dm.to_jax(kwargs["encoder_hidden_states"]),
                encoder_attention_mask=dm.to_jax(kwargs["encoder_attention_mask"]),
                timestep=dm.to_jax(kwargs["timestep"]))
    assert dm.rel_err(got, out) <= RTOL


def test_permutation_sites_cover_and_fold(case):
  cfg, _, jmodel = case
  block_linears = [p for p in dm.linear_paths(jmodel) if p.startswith("transformer_blocks.")]
  dm.check_site_coverage(jmodel, block_linears)
  sites = jmodel.permutation_sites()
  assert [(s.name.split(".", 2)[2], s.kind) for s in sites[:7]] == [
      ("P1", "norm"), ("P2", "producer"), ("attn2.q", "input"), ("attn2.kv", "input"),
      ("attn2.P2", "producer"), ("P3", "norm"), ("P4", "producer")]
  assert sites[0].norm == "transformer_blocks.0.norm1"
  assert sites[5].norm == "transformer_blocks.0.norm2"
  if cfg.get("activation_fn") == "geglu":
    assert len(sites[6].producers) == 2
  rng = np.random.default_rng(0)
  perms = {s.name: dm.random_site_permutation(s, rng) for s in sites}
  inputs = dm.to_jax(make_inputs(cfg, mask="keep"))
  want = jmodel(**inputs)
  # Folding only reorders sums, so the bound is the parity bound.
  assert dm.rel_err(dm.fold_permutations(jmodel, perms)(**inputs), want) <= RTOL


def test_bf16_checkpoint(tmp_path):
  cfg = CONFIGS["sigma"]
  inputs = make_inputs(cfg, mask="keep")
  jbf = dm.assert_bf16_checkpoint("PixArtTransformer2DModel", cfg, tmp_path / "bf16", inputs,
                                 ("hidden_states", "encoder_hidden_states"), RTOL)
  assert jbf.proj_out.kernel[...].dtype == jnp.bfloat16


def test_sharded_checkpoint(tmp_path):
  cfg = CONFIGS["alpha_explicit"]
  dm.assert_sharded_checkpoint("PixArtTransformer2DModel", cfg, tmp_path / "sharded", "30KB",
                               make_inputs(cfg, mask="keep"), RTOL)


def test_to_diffusers_round_trip(case, tmp_path):
  cfg, model, jmodel = case
  back = dm.assert_round_trip(model, jmodel, tmp_path / "out")
  inputs = make_inputs(cfg, mask="keep")
  assert torch.equal(dm.torch_sample(back, inputs), dm.torch_sample(model, inputs))


def test_missing_additional_conditions_raise(case):
  cfg, _, jmodel = case
  if not uses_conditions(cfg):
    pytest.skip("no additional conditions")
  inputs = dm.to_jax(make_inputs(cfg))
  del inputs["added_cond_kwargs"]
  with pytest.raises(ValueError, match="added_cond_kwargs"):
    jmodel(**inputs)

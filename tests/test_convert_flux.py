"""FLUX.1 converter: parity with diffusers' FluxTransformer2DModel on tiny random models.

Tiny dev-like (guidance embedding) and schnell-like models with different head counts, head
widths and RoPE axes are built in torch, every parameter redrawn, saved with
``save_pretrained`` and loaded with ``converters.from_diffusers``. The whole model and every
block (fed the inputs the torch block saw) must agree within the issue's relative error bar.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.models.transformers.transformer_flux import FluxPosEmbed as TorchFluxPosEmbed
from flax import nnx

import converters
from converters import flux
from converters.checkpoint import module_at
from pqjax.fold import fold_site
from tests import diffusers_models as dm

CLASS = "FluxTransformer2DModel"
PARITY_RTOL = 1e-5  # the bar for fp32 parity
F32_EPS = float(np.finfo(np.float32).eps)

TINY = {
    "dev": dict(in_channels=8, num_layers=2, num_single_layers=2, attention_head_dim=16,
                num_attention_heads=2, joint_attention_dim=24, pooled_projection_dim=12,
                guidance_embeds=True, axes_dims_rope=(4, 6, 6)),
    "schnell": dict(patch_size=2, in_channels=12, out_channels=6, num_layers=1,
                    num_single_layers=2, attention_head_dim=8, num_attention_heads=3,
                    joint_attention_dim=16, pooled_projection_dim=8, guidance_embeds=False,
                    axes_dims_rope=(2, 2, 4)),
    "one_wide_head": dict(in_channels=4, num_layers=1, num_single_layers=1,
                          attention_head_dim=32, num_attention_heads=1, joint_attention_dim=8,
                          pooled_projection_dim=4, guidance_embeds=True,
                          axes_dims_rope=(8, 12, 12)),
}

FLUX1_DEV = dict(patch_size=1, in_channels=64, out_channels=None, num_layers=19,
                 num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
                 joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                 axes_dims_rope=[16, 56, 56])


def _inputs(config: dict, *, ids_ndim: int, seed: int, batch: int = 2, grid=(3, 4),
            n_txt: int = 5) -> dict[str, np.ndarray]:
  """Pipeline-shaped inputs: image ids ``(0, row, col)``, random small text ids."""
  rng = np.random.default_rng(seed)
  h, w = grid
  rows, cols = np.divmod(np.arange(h * w), w)
  img_ids = np.stack([np.zeros(h * w), rows, cols], axis=-1).astype(np.float32)
  txt_ids = rng.integers(0, 8, (n_txt, 3)).astype(np.float32)
  if ids_ndim == 3:
    img_ids, txt_ids = (np.broadcast_to(i, (batch, *i.shape)).copy() for i in (img_ids, txt_ids))

  def normal(*shape: int) -> np.ndarray:
    return rng.standard_normal(shape, dtype=np.float32)

  out = dict(hidden_states=normal(batch, h * w, config["in_channels"]),
             encoder_hidden_states=normal(batch, n_txt, config["joint_attention_dim"]),
             pooled_projections=normal(batch, config["pooled_projection_dim"]),
             timestep=rng.uniform(0.0, 1.0, batch).astype(np.float32),
             img_ids=img_ids, txt_ids=txt_ids)
  if config["guidance_embeds"]:
    out["guidance"] = rng.uniform(1.0, 5.0, batch).astype(np.float32)
  return out


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict:
  """name -> (torch model, its save_pretrained folder), for every tiny config."""
  out = {}
  for seed, (name, config) in enumerate(TINY.items()):
    torch_model = dm.build(CLASS, config, seed=seed)
    out[name] = torch_model, dm.save(torch_model, tmp_path_factory.mktemp(f"flux-{name}"))
  return out


def _load(saved: dict, name: str) -> nnx.Module:
  return converters.from_diffusers(saved[name][1], dtype=jnp.float32)


# Traced once per model structure; eager dispatch would compile every primitive separately.
_run = nnx.jit(lambda model, inputs: model(**inputs))
_run_block = nnx.jit(lambda block, args: block(*args))


def _jax_inputs(name: str, *, ids_ndim: int = 2, seed: int = 0) -> dict[str, jax.Array]:
  return {k: jnp.asarray(v) for k, v in _inputs(TINY[name], ids_ndim=ids_ndim, seed=seed).items()}


@pytest.fixture(scope="module", params=[("dev", 2), ("schnell", 3), ("one_wide_head", 3)],
                ids=lambda p: f"{p[0]}-ids{p[1]}d")
def converted(request, saved):
  """(torch model, JAX model loaded from its folder, inputs) for one tiny config."""
  name, ids_ndim = request.param
  return saved[name][0], _load(saved, name), _inputs(TINY[name], ids_ndim=ids_ndim, seed=10)


def test_model_parity(converted):
  torch_model, model, inputs = converted
  with torch.no_grad():
    want = torch_model(**dm.to_torch(inputs)).sample
  got = _run(model, {k: jnp.asarray(v) for k, v in inputs.items()})
  assert got.shape == tuple(want.shape)
  assert dm.rel_err(got, want) <= PARITY_RTOL


def test_block_parity(converted):
  """Each double and single block, fed what the torch block saw inside the model."""
  torch_model, model, inputs = converted
  for torch_blocks, blocks in ((torch_model.transformer_blocks, model.transformer_blocks),
                               (torch_model.single_transformer_blocks,
                                model.single_transformer_blocks)):
    calls = dm.capture_blocks(torch_model, torch_blocks, dm.to_torch(inputs))
    assert len(calls) == len(blocks)
    for block, (_, kwargs, want) in zip(blocks, calls):
      rope = tuple(dm.to_jax(t) for t in kwargs["image_rotary_emb"])
      args = (dm.to_jax(kwargs["hidden_states"]), dm.to_jax(kwargs["encoder_hidden_states"]),
              dm.to_jax(kwargs["temb"]), rope)
      got = _run_block(block, args)
      for g, w in zip(got, want):
        assert dm.rel_err(g, w) <= PARITY_RTOL


def test_rope_matches_float64_diffusers_at_full_resolution():
  """A 128x128 latent grid (2048px images): diffusers computes angles in float64."""
  axes = (16, 56, 56)
  rows, cols = np.divmod(np.arange(128 * 128), 128)
  ids = np.stack([np.zeros_like(rows), rows, cols], axis=-1).astype(np.float32)
  want_cos, want_sin = TorchFluxPosEmbed(10000, list(axes))(torch.from_numpy(ids))
  got_cos, got_sin = jax.jit(lambda i: flux.rope_cos_sin(i, axes))(jnp.asarray(ids))
  # Exactly rounded reference; ours: cos/sin of two float32 angles (~1 ulp each) combined
  # with two products and a sum, each rounding once: under 4 ulps of 1.0.
  assert np.abs(np.asarray(got_cos) - want_cos.numpy()).max() <= 4 * F32_EPS
  assert np.abs(np.asarray(got_sin) - want_sin.numpy()).max() <= 4 * F32_EPS


def test_to_diffusers_round_trip(saved, tmp_path):
  dm.assert_round_trip(saved["schnell"][0], _load(saved, "schnell"), tmp_path / "out")


def test_full_size_flux1_dev_from_config_matches_diffusers_layout():
  """FLUX.1-dev at real size, abstract (no allocation): same keys, shapes and param count."""
  dm.assert_full_size_layout(CLASS, FLUX1_DEV)


# ----------------------------------------------------------------------------- sites


def test_sites_cover_every_block_linear_exactly_once():
  model = nnx.eval_shape(
      lambda: converters.from_config({"_class_name": CLASS, **TINY["dev"]}, dtype=jnp.float32))
  block_linears = [p for p in dm.linear_paths(model)
                   if p.split(".")[0] in ("transformer_blocks", "single_transformer_blocks")]
  rows = dm.check_site_coverage(model, block_linears, split_consumers=True)
  for site in model.permutation_sites():
    if site.kind == "norm":
      norm = module_at(model, site.norm)
      assert norm.weight is None and norm.bias is None, f"{site.norm} holds torch keys"
  # Single blocks: attention output rows [0, dim), MLP rows [dim, dim + mlp_dim) of proj_out.
  dim = TINY["dev"]["num_attention_heads"] * TINY["dev"]["attention_head_dim"]
  assert rows["single_transformer_blocks.0.proj_out"] == [(0, dim), (dim, 5 * dim)]


def test_folding_random_permutations_at_every_site_keeps_the_output(saved):
  """Sites are complete: ``pqjax.fold.fold_site`` of random permutations changes nothing."""
  model = _load(saved, "dev")
  inputs = _jax_inputs("dev", seed=5)
  want = _run(model, inputs)
  rng = np.random.default_rng(6)
  for site in model.permutation_sites():
    fold_site(model, site, dm.random_site_permutation(site, rng).astype(np.int32))
  # Only the summation order inside the permuted matmuls changes, the same kind of float32
  # difference the parity bar admits.
  assert dm.rel_err(_run(model, inputs), want) <= PARITY_RTOL
  # A cross-head permutation at a P2 site is not foldable: the check above can fail.
  site = next(s for s in model.permutation_sites() if s.name.endswith("attn.P2"))
  fold_site(model, site, rng.permutation(site.width).astype(np.int32))
  assert dm.rel_err(_run(model, inputs), want) > PARITY_RTOL


# ----------------------------------------------------------------------------- bad input


def test_guidance_required_for_dev_and_rejected_for_schnell(saved):
  inputs = _jax_inputs("dev")
  del inputs["guidance"]
  with pytest.raises(ValueError, match="guidance is required"):
    _run(_load(saved, "dev"), inputs)
  with pytest.raises(ValueError, match="guidance_embeds=False"):
    _run(_load(saved, "schnell"), {**_jax_inputs("schnell"), "guidance": jnp.ones((2,))})


@pytest.mark.parametrize("key,shape", [("img_ids", (12,)), ("txt_ids", (1, 2, 5, 3)),
                                       ("img_ids", (12, 2))])
def test_bad_ids_shape_raises_naming_it(saved, key, shape):
  inputs = {**_jax_inputs("schnell"), key: jnp.zeros(shape)}
  with pytest.raises(ValueError, match=rf"{key} .*got \({', '.join(map(str, shape))}"):
    _run(_load(saved, "schnell"), inputs)


def test_axes_dims_rope_must_sum_to_head_dim():
  config = {"_class_name": CLASS, **TINY["dev"], "axes_dims_rope": (4, 4, 4)}
  with pytest.raises(ValueError, match=r"axes_dims_rope=\[4, 4, 4\].*attention_head_dim=16"):
    nnx.eval_shape(lambda: converters.from_config(config, dtype=jnp.float32))

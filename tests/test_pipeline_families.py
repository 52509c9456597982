"""The pipeline on tiny converted diffusers models of every family: folding parity, and
PermuQuant no worse than RTN on calibration and held-out inputs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import converters
import pqjax
from pqjax import fold, search
from tests import diffusers_models as dm
from tests import test_convert_dit as tdit
from tests import test_convert_flux as tflux
from tests import test_convert_pixart as tpix
from tests import test_convert_sana as tsana
from tests import test_convert_zimage as tz
from tests.test_pipeline_toy import fold_tolerance, rel_err

# heads of two 16-groups, so that channel order inside a head matters to NVFP4
DIT = dict(tdit.CONFIGS["p2_h2"], num_attention_heads=2, attention_head_dim=32)
PIXART = dict(tpix.CONFIGS["sigma"], num_attention_heads=2, attention_head_dim=32,
              cross_attention_dim=64)
SANA = dict(tsana.CONFIGS["sana"], attention_head_dim=32, cross_attention_head_dim=32,
            cross_attention_dim=64, mlp_ratio=2.0)  # FF width 128: a multiple of 16
FLUX = dict(tflux.TINY["dev"], attention_head_dim=32, axes_dims_rope=(8, 12, 12))
ZIMAGE = dict(tz.TINY["base"], dim=48, n_heads=3, n_kv_heads=3)  # FF width 128


def _pixart_inputs(seed):
  return dm.to_jax(tpix.make_inputs(PIXART, seed=seed))


def _zimage_inputs(seed):
  inputs = tz._inputs("base", seed)
  inputs["x"] = [np.resize(x, (ZIMAGE["in_channels"], *x.shape[1:])) for x in inputs["x"]]
  return tz._jax_inputs(inputs)


FAMILIES = {
    "dit": ("DiTTransformer2DModel", DIT, lambda s: dm.to_jax(tdit.make_inputs(DIT, seed=s))),
    "pixart": ("PixArtTransformer2DModel", PIXART, _pixart_inputs),
    "flux": ("FluxTransformer2DModel", FLUX,
             lambda s: jax.tree.map(jnp.asarray, tflux._inputs(FLUX, ids_ndim=2, seed=s))),
    "sana": ("SanaTransformer2DModel", SANA,
             lambda s: dm.to_jax(tsana._inputs("sana", SANA, seed=s))),
    "zimage": ("ZImageTransformer2DModel", ZIMAGE, _zimage_inputs),
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
  cls, cfg, inputs = FAMILIES[request.param]
  path = dm.save(dm.build(cls, cfg), tmp_path_factory.mktemp(request.param))
  return request.param, converters.from_diffusers(path, dtype=jnp.float32), inputs


def _forward(model, batch):
  arrays = {k: v for k, v in batch.items() if not isinstance(v, int)}
  static = {k: v for k, v in batch.items() if isinstance(v, int)}
  return nnx.jit(lambda m, a: m(**a, **static))(model, arrays)


def test_fold_random_permutations_keeps_output(family):
  name, model, inputs = family
  batch = inputs(1)
  y = _forward(model, batch)
  folded = nnx.clone(model)
  for i, s in enumerate(model.permutation_sites()):
    perm = search.random_permutation(jax.random.key(i), s.width, s.head_dim)
    assert fold.is_bijection(np.asarray(perm), s.width)
    fold.fold_site(folded, s, perm)
  err = max(float(jnp.max(jnp.abs(a - b))) for a, b in
            zip(jax.tree.leaves(_forward(folded, batch)), jax.tree.leaves(y)))
  tol = max(fold_tolerance(model, leaf) for leaf in jax.tree.leaves(y))
  assert err <= tol, (name, err, tol)


def inject_outliers(model, factor: float, seed: int = 0):
  """Moves scales from out-projection rows into V columns inside heads (exact in float).

  Attention is linear in V, so ``V[:, c] * s`` with ``W_out[c] / s`` leaves the output
  unchanged while the out projection's input gets large channels with small weights.
  """
  model = nnx.clone(model)
  rng = np.random.default_rng(seed)
  for site in model.permutation_sites():
    if site.kind != "producer" or site.head_dim is None:
      continue
    s = np.ones(site.width, np.float32)
    idx = rng.choice(site.width, max(1, site.width // 8), replace=False)
    s[idx] = factor
    for p in site.producers:
      lin = fold.get_module(model, p.path)
      sl = slice(p.offset, p.offset + site.width)
      lin.kernel.value = lin.kernel.value.at[:, sl].multiply(s[None])
      if lin.bias is not None:
        lin.bias.value = lin.bias.value.at[sl].multiply(s)
    for c in site.consumers:
      lin = fold.get_module(model, c.path)
      sl = slice(c.offset, c.offset + site.width)
      lin.kernel.value = lin.kernel.value.at[sl].divide(s[:, None])
  return model


def _quantize_pair(model, inputs):
  cal = [inputs(1), inputs(2)]
  cfgs = {m: pqjax.QuantConfig(method=m, error_tokens=128) for m in ("rtn", "permuquant")}
  return {m: pqjax.quantize(model, cal, c) for m, c in cfgs.items()}


@pytest.mark.parametrize("family", ["dit", "pixart"], indirect=True)
def test_permuquant_no_worse_than_rtn(family):
  _check_pq_vs_rtn(*family[1:])


@pytest.mark.slow
@pytest.mark.parametrize("family", ["flux", "sana", "zimage"], indirect=True)
def test_permuquant_no_worse_than_rtn_slow(family):
  _check_pq_vs_rtn(*family[1:])


def _check_pq_vs_rtn(model, inputs):
  model = inject_outliers(model, 20.0)
  q = _quantize_pair(model, inputs)
  for site, dec in zip(model.permutation_sites(), q["permuquant"].pqjax_info.decisions):
    assert fold.is_bijection(np.asarray(q["permuquant"].pqjax_info.perm(site.name)), site.width)
  for seed in (1, 7):  # a calibration batch, and other timesteps/conditions
    batch = inputs(seed)
    y = _forward(model, batch)
    e = {m: rel_err(jnp.concatenate([l.ravel() for l in jax.tree.leaves(_forward(qm, batch))]),
                    jnp.concatenate([l.ravel() for l in jax.tree.leaves(y)]))
         for m, qm in q.items()}
    assert e["permuquant"] <= e["rtn"], (seed, e)


def test_save_load_round_trip_bit_identical(family, tmp_path):
  name, model, inputs = family
  q = pqjax.quantize(model, [inputs(1)], pqjax.QuantConfig(method="permuquant",
                                                             error_tokens=64))
  restored = pqjax.load(pqjax.save(q, tmp_path / name))
  assert type(restored) is type(q)
  assert restored.pqjax_info.decisions == q.pqjax_info.decisions
  batch = inputs(7)
  for a, b in zip(jax.tree.leaves(_forward(q, batch)), jax.tree.leaves(_forward(restored, batch))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

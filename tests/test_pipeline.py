"""``pqjax.quantize`` on the toy model: error vs RTN, determinism, formats, modes, methods,
options and bad input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import pqjax
from converters.layers import Linear
from pqjax import calibrate, fold
from pqjax.qmodules import GatheredNorm, QuantLinear
from tests.test_pipeline_toy import make_toy, rel_err, toy_batch

CAL = [1, 2]
HELD_OUT = 11
_CACHE: dict = {}


@nnx.jit
def forward(model, batch):
  return model(**batch)


@pytest.fixture(scope="module")
def toy():
  return make_toy(outliers=30.0)


def quantized(toy, **kw) -> nnx.Module:
  """``quantize`` once per config in this module (the CPU compile dominates test time)."""
  key = tuple(sorted(kw.items()))
  if key not in _CACHE:
    cfg = pqjax.QuantConfig(error_tokens=128, **kw)
    _CACHE[key] = pqjax.quantize(toy, [toy_batch(s) for s in CAL], cfg)
  return _CACHE[key]


def check_structure(toy, qmodel) -> None:
  info = qmodel.pqjax_info
  assert type(qmodel) is type(toy)
  for site, dec in zip(toy.permutation_sites(), info.decisions):
    perm = np.asarray(info.perm(site.name))
    assert fold.is_bijection(perm, site.width), site.name
    if site.head_dim:
      heads = np.arange(site.width) // site.head_dim
      assert np.array_equal(heads[perm], heads), site.name
    if not dec.permuted:
      assert np.array_equal(perm, np.arange(site.width)), site.name
    for c in site.consumers:
      assert isinstance(fold.get_module(qmodel, c.path), QuantLinear), c.path
    if site.kind == "norm":
      norm = fold.get_module(qmodel, site.norm)
      if dec.permuted:
        assert isinstance(norm, GatheredNorm)
        assert np.array_equal(np.asarray(norm.perm.value), perm)
    if info.config.method in ("permuquant", "auto") and dec.accepted:
      assert dec.err_chosen < dec.err_identity, site.name  # the acceptance rule with tau=0


def test_permuquant_no_worse_than_rtn_on_calibration_and_held_out(toy):
  rtn, pq = quantized(toy, method="rtn"), quantized(toy, method="permuquant")
  assert any(d.accepted for d in pq.pqjax_info.decisions)
  for seed in (CAL[0], HELD_OUT):
    batch = toy_batch(seed)
    y = forward(toy, batch)
    e_rtn, e_pq = rel_err(forward(rtn, batch), y), rel_err(forward(pq, batch), y)
    assert e_pq <= e_rtn, (seed, e_pq, e_rtn)


def test_model_and_original_untouched(toy):
  before = jax.tree.map(np.asarray, nnx.state(toy))
  q = quantized(toy, method="permuquant")
  check_structure(toy, q)
  after = jax.tree.map(np.asarray, nnx.state(toy))
  assert jax.tree.all(jax.tree.map(np.array_equal, before, after))
  assert isinstance(toy.blocks[0].to_q, Linear)


@pytest.mark.slow
def test_deterministic(toy):
  cfg = pqjax.QuantConfig(error_tokens=128, method="auto")
  a = pqjax.quantize(toy, [toy_batch(s) for s in CAL], cfg)
  b = pqjax.quantize(toy, [toy_batch(s) for s in CAL], cfg)
  assert repr(a.pqjax_info.decisions) == repr(b.pqjax_info.decisions)  # nan-safe
  np.testing.assert_array_equal(a.pqjax_info.perms.value, b.pqjax_info.perms.value)
  batch = toy_batch(HELD_OUT)
  np.testing.assert_array_equal(forward(a, batch), forward(b, batch))


@pytest.mark.parametrize("fmt,mode,method", [
    ("nvfp4", "w4a4", "permuquant-h"),
    ("mxfp4", "w4a4", "auto"),
    ("int4", "w4a16", "permuquant"),
    pytest.param("int3", "w4a4", "auto", marks=pytest.mark.slow),
    pytest.param("nvfp4", "w4a16", "absmax", marks=pytest.mark.slow),
    pytest.param("int4", "w4a4", "random", marks=pytest.mark.slow),
])
def test_formats_modes_methods(toy, fmt, mode, method):
  g = 16 if fmt.startswith("int") else None  # the toy's context width is 32
  q = quantized(toy, format=fmt, mode=mode, method=method, group_size=g)
  check_structure(toy, q)
  lin = q.blocks[0].to_q
  assert lin.fmt == fmt and lin.act_format == (fmt if mode == "w4a4" else None)
  decisions = q.pqjax_info.decisions
  if method == "permuquant-h":
    assert all(d.rotate for d in decisions)
  if method in ("absmax", "random"):
    assert all(d.permuted for d in decisions)
  y = forward(q, toy_batch(HELD_OUT))
  assert bool(jnp.all(jnp.isfinite(y)))
  assert rel_err(y, forward(toy, toy_batch(HELD_OUT))) < 1.0


@pytest.mark.slow
def test_sequential_and_options(toy):
  q = quantized(toy, calibration="sequential", act_scale="dynamic", alpha=1.0,
                keep_float=("blocks.1.ff*",))
  assert isinstance(q.blocks[1].ff1, Linear) and isinstance(q.blocks[1].ff2, Linear)
  assert q.blocks[0].to_q.act_tensor_scale is None
  for d in q.pqjax_info.decisions:
    assert d.alpha in (None, 1.0)
  assert bool(jnp.all(jnp.isfinite(forward(q, toy_batch(HELD_OUT)))))


def test_tau_rejects_everything(toy):
  q = quantized(toy, method="permuquant", tau=0.999)
  assert not any(d.accepted or d.permuted for d in q.pqjax_info.decisions)
  assert not any(isinstance(fold.get_module(q, s.norm), GatheredNorm)
                 for s in toy.permutation_sites() if s.kind == "norm")


def test_static_act_scale_covers_calibration_amax(toy):
  q = quantized(toy, method="permuquant")
  lin = q.blocks[0].ctx_k
  amax = float(jnp.max(jnp.abs(jnp.concatenate([toy_batch(s)["context"] for s in CAL]))))
  # nvfp4 tensor scale amax / (6 * 448): the context feeds ctx_k directly
  assert float(lin.act_tensor_scale.value) == pytest.approx(amax / 2688, rel=1e-6)


# ----------------------------------------------------------------------------- bad input


def test_nan_batch_names_input_and_step(toy):
  bad = toy_batch(2)
  bad["context"] = bad["context"].at[0, 0, 0].set(jnp.nan)
  with pytest.raises(calibrate.NonFiniteInputError, match=r"'context' of batch 1"):
    pqjax.quantize(toy, [toy_batch(1), bad], pqjax.QuantConfig(method="rtn"))
  bad["context"] = bad["context"].at[0, 0, 0].set(jnp.inf)
  with pytest.raises(calibrate.NonFiniteInputError, match=r"'context' of batch 0"):
    pqjax.quantize(toy, bad, pqjax.QuantConfig(method="rtn"))


def test_batch_that_does_not_fit(toy):
  bad = toy_batch(1)
  bad["hidden_states"] = bad["hidden_states"][..., :5]
  with pytest.raises(calibrate.BatchShapeError, match=r"hidden_states.*\(4, 32, 5\)"):
    pqjax.quantize(toy, bad, pqjax.QuantConfig(method="rtn"))
  with pytest.raises(calibrate.BatchShapeError, match=r"\['timestep'\]"):
    pqjax.quantize(toy, {**toy_batch(1), "timestep": jnp.zeros(4)},
                   pqjax.QuantConfig(method="rtn"))
  with pytest.raises(calibrate.BatchShapeError, match=r"missing.*'cond'"):
    pqjax.quantize(toy, {k: v for k, v in toy_batch(1).items() if k != "cond"},
                   pqjax.QuantConfig(method="rtn"))
  with pytest.raises(calibrate.CalibrationError, match="no batch"):
    pqjax.quantize(toy, [], pqjax.QuantConfig(method="rtn"))


def test_group_size_not_dividing_names_layer(toy):
  with pytest.raises(pqjax.ConfigError, match=r"input width 32 of layer 'blocks.0.ctx_k'"):
    pqjax.quantize(toy, toy_batch(1), pqjax.QuantConfig(format="int4"))  # default group 64
  with pytest.raises(pqjax.ConfigError, match="power-of-two group_size, got 48"):
    pqjax.quantize(toy, toy_batch(1), pqjax.QuantConfig(format="int4", group_size=48,
                                                        method="auto"))


@pytest.mark.parametrize("field,value", [("format", "fp8"), ("mode", "w8a8"),
                                         ("method", "gptq"), ("alpha", 2.0), ("tau", -1.0),
                                         ("group_size", 15), ("error_tokens", 0)])
def test_bad_config_values(field, value):
  with pytest.raises(pqjax.ConfigError, match=field):
    pqjax.QuantConfig(**{field: value})


def test_unsupported_models(toy):
  with pytest.raises(pqjax.UnsupportedModelError, match="Linear has no permutation_sites"):
    pqjax.quantize(nnx.Linear(4, 4, rngs=nnx.Rngs(0)), {}, pqjax.QuantConfig())
  with pytest.raises(pqjax.UnsupportedModelError, match="got State"):
    pqjax.quantize(nnx.state(toy), {}, pqjax.QuantConfig())
  with pytest.raises(pqjax.UnsupportedModelError, match="already quantized"):
    pqjax.quantize(quantized(toy, method="rtn"), toy_batch(1), pqjax.QuantConfig())

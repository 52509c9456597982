"""Gathered norm / quantize reference against pqjax.formats and a direct computation."""

import jax.numpy as jnp
import numpy as np
import pytest

from pqjax import formats, hadamard
from pqjax_kernels import norm as gn


def _x(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def test_nvfp4_quantize_bit_exact_with_formats():
  x = _x((4, 64)) * 3
  for ts in (None, jnp.float32(0.002)):
    q = gn.quantize_nvfp4(x, ts)
    qt = formats.quantize(x, "nvfp4", tensor_scale=ts)
    np.testing.assert_array_equal(np.asarray(q.codes), np.asarray(qt.codes))
    np.testing.assert_array_equal(np.asarray(q.scales.astype(jnp.float32)),
                                  np.asarray(qt.scales.astype(jnp.float32)))
    assert float(q.tensor_scale) == float(qt.tensor_scale)


@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_gathered_norm_equals_norm_of_gathered_input(kind):
  b, t, d = 2, 3, 32
  x = _x((b, t, d))
  perm = jnp.asarray(np.random.default_rng(1).permutation(d), jnp.int32)
  w, bias, shift, scale = (_x((d,), 2), _x((d,), 3), _x((b, d), 4), _x((b, 1, d), 5))
  out = gn.reference(x, perm, kind=kind, weight=w, bias=bias, shift=shift, scale=scale,
                     eps=1e-6, out_dtype=jnp.float32)
  xp = np.asarray(x)[..., perm]
  mu = xp.mean(-1, keepdims=True) if kind == "layer" else 0.0
  var = ((xp - mu) ** 2).mean(-1, keepdims=True)
  y = (xp - mu) / np.sqrt(var + 1e-6) * np.asarray(w)[perm] + np.asarray(bias)[perm]
  y = y * (1 + np.asarray(scale)[..., perm]) + np.asarray(shift)[:, None, perm]
  np.testing.assert_allclose(np.asarray(out), y, rtol=1e-5, atol=1e-5)


def test_gathered_quantize_with_hadamard_matches_pipeline_rotation():
  x = _x((3, 64))
  perm = jnp.asarray(np.random.default_rng(2).permutation(64), jnp.int32)
  q = gn.gathered_quantize(x, perm, hadamard=True)
  rot = hadamard.block_hadamard(x[:, perm], 16)
  qt = formats.quantize(rot, "nvfp4")
  np.testing.assert_array_equal(np.asarray(q.codes), np.asarray(qt.codes))


@pytest.mark.parametrize("perm,match", [
    (jnp.arange(32, dtype=jnp.int16), "int32"),
    (jnp.arange(31, dtype=jnp.int32), "shape"),
])
def test_bad_perm_raises(perm, match):
  with pytest.raises(ValueError, match=match):
    gn.reference(_x((2, 32)), perm)


def test_bad_shift_raises():
  with pytest.raises(ValueError, match="shift"):
    gn.reference(_x((2, 3, 32)), None, shift=_x((5, 32)))

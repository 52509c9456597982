"""Gathered norm / quantize reference against pqjax.formats and a direct computation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pqjax import formats, hadamard
from pqjax_kernels import norm as gn


def _x(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _assert_same_quantization(q, qt):
  np.testing.assert_array_equal(np.asarray(q.scales.astype(jnp.float32)),
                                np.asarray(qt.scales.astype(jnp.float32)))
  np.testing.assert_array_equal(np.asarray(q.codes), np.asarray(qt.codes))


def test_nvfp4_quantize_bit_exact_with_formats():
  x = _x((4, 64)) * 3
  for ts in (None, jnp.float32(0.002)):
    q = gn.quantize_nvfp4(x, ts)
    qt = formats.quantize(x, "nvfp4", tensor_scale=ts)
    _assert_same_quantization(q, qt)
    assert float(q.tensor_scale) == float(qt.tensor_scale)


@pytest.mark.parametrize("ts", [0.01, 0.0037, 1 / 3, None])
def test_nvfp4_quantize_bit_exact_with_formats_on_bf16(ts):
  """bf16 data with round static tensor scales land on E4M3 and E2M1 rounding midpoints
  (amax 1.5 with s_t = 0.01 gives exactly 25, between 24 and 26): both modules decide them
  by the same comparisons with rounded products, ties to even."""
  rng = np.random.default_rng(7)
  x = (rng.standard_normal((512, 256)) * rng.choice([0.01, 1.0, 30.0], (512, 1)))
  x = jnp.asarray(x, jnp.bfloat16).astype(jnp.float32)
  ts = None if ts is None else jnp.float32(ts)
  _assert_same_quantization(gn.quantize_nvfp4(x, ts), formats.quantize(x, "nvfp4",
                                                                        tensor_scale=ts))


def test_nvfp4_block_scale_ties_go_to_even():
  """Groups whose ``amax / (6 s_t)`` is exactly each E4M3 midpoint, and its float32
  neighbours: the block scale is the even neighbour at the tie, the nearer one beside it."""
  e4m3 = np.arange(1, 127, dtype=np.uint8).view(jnp.float8_e4m3fn).astype(np.float32)
  mids = (e4m3[1:] + e4m3[:-1]) / 2
  ts = np.float32(2.0**-4)  # a power of two: the quotients below are exact
  amax = np.concatenate([mids, np.nextafter(mids, 0), np.nextafter(mids, np.inf)]) * 6 * ts
  x = np.zeros((amax.size, 16), np.float32)
  x[:, 3] = amax
  q = gn.quantize_nvfp4(jnp.asarray(x), jnp.float32(ts))
  expected = (amax / (6 * ts)).astype(jnp.float8_e4m3fn).astype(np.float32)  # ml_dtypes RNE
  np.testing.assert_array_equal(np.asarray(q.scales.astype(jnp.float32))[:, 0], expected)
  _assert_same_quantization(q, formats.quantize(jnp.asarray(x), "nvfp4",
                                                tensor_scale=jnp.float32(ts)))


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


@pytest.mark.parametrize("hadamard", [False, True])
def test_round_to_quantizes_the_stored_norm(hadamard):
  """``round_to=bf16``: the quantize of the norm's bf16 output (what a linear reading it
  quantizes), bit for bit; without it the float32 norm is quantized (codes differ)."""
  b, t, d = 2, 8, 64
  x = _x((b, t, d)).astype(jnp.bfloat16)
  perm = jnp.asarray(np.random.default_rng(2).permutation(d), jnp.int32)
  vecs = dict(weight=_x((d,), 2), bias=_x((d,), 3), shift=_x((b, d), 4), scale=_x((b, d), 5))
  ts = jnp.float32(0.004)
  stored = gn.reference(x, perm, **vecs, eps=1e-6, out_dtype=jnp.bfloat16)
  want = gn.gathered_quantize(stored, None, out="nvfp4_f16", tensor_scale=ts, hadamard=hadamard)
  kw = dict(**vecs, eps=1e-6, out="nvfp4_f16", tensor_scale=ts, hadamard=hadamard)
  got = gn.reference(x, perm, round_to=jnp.bfloat16, **kw)
  np.testing.assert_array_equal(np.asarray(got.values), np.asarray(want.values))
  assert (np.asarray(gn.reference(x, perm, **kw).values) != np.asarray(want.values)).any()
  with pytest.raises(ValueError, match="round_to"):
    gn.reference(x, perm, round_to=jnp.float32, **kw)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_round_through_is_the_cast(dtype):
  """``round_through`` rounds as the float32 -> dtype -> float32 casts do, bit for bit, over
  normal, subnormal (float16's flushed by ``reduce_precision`` alone), overflowing and
  special values; the casts themselves would be dropped by XLA on the GPU."""
  rng = np.random.default_rng(7)
  x = np.concatenate([rng.standard_normal(4096) * s for s in (1e-7, 1e-5, 1.0, 1e2, 1e5)]
                     + [[65519.0, 65520.0, -7e4, np.inf, -np.inf, 0.0, -0.0, 1e-40, 2.0**-25,
                         3 * 2.0**-25, 2.0**-14, 2.0**-14 * (1 - 2.0**-12)]])
  x = jnp.asarray(x, jnp.float32)
  want = np.asarray(x.astype(dtype).astype(jnp.float32)).view(np.int32)
  got = np.asarray(jax.jit(gn.round_through, static_argnums=1)(x, dtype)).view(np.int32)
  np.testing.assert_array_equal(got, want)


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


@pytest.mark.parametrize("s", [1.0, 0.0123, 3.0 * 2.0**-20, 2.0**-124, 448.0 * 7e4])
def test_e2m1_codes_count_the_boundaries_passed(s):
  """``e2m1_codes`` (bisection) equals the count of E2M1 boundaries ``|y|`` passes (``>=``
  where ties round up, ``>`` where down) at every boundary, its float32 neighbours, both
  signs, zeros, infinities and NaN. ``s >= 2**-124`` keeps the boundaries normal floats
  (XLA on the CPU flushes subnormal ones to zero, see ``e2m1_codes``)."""
  th = gn.e2m1_thresholds(jnp.float32(s))
  t = np.array([float(v) for v, _ in th], np.float32)
  mag = np.concatenate([t, np.nextafter(t, 0), np.nextafter(t, np.inf), [0.0, 1e-30, np.inf]])
  y = np.concatenate([mag, -mag, [np.nan]]).astype(np.float32)
  count = sum(((np.abs(y) >= v) if up else (np.abs(y) > v)).astype(np.int32)
              for v, (_, up) in zip(t, th))
  want = count | ((y.view(np.int32) >> 31 & 1) << 3)
  got = jax.jit(lambda v: gn.e2m1_codes(v, th))(jnp.asarray(y))
  np.testing.assert_array_equal(np.asarray(got), want)


@pytest.mark.parametrize("s_t", [0.01, 2.0**-4, 1 / 3, 3.7e-5, 250.0])
def test_e4m3_block_scale_matches_formats_at_every_midpoint(s_t):
  """``amax`` at ``fl(midpoint * d)`` of every E4M3 midpoint, at its float32 neighbours, at
  the E4M3 values and beyond the range: the kernels' arithmetic rounding equals
  ``pqjax.formats``' table search."""
  e4m3 = np.arange(1, 127, dtype=np.uint8).view(jnp.float8_e4m3fn).astype(np.float32)
  mids = (e4m3[1:] + e4m3[:-1]) / 2
  d = np.float32(6) * np.float32(s_t)
  t = np.concatenate([mids, e4m3, [2.0**-12, 2.0**-10, 500.0, 1e4]]).astype(np.float32) * d
  amax = np.concatenate([t, np.nextafter(t, 0), np.nextafter(t, np.inf), [0.0]])
  amax = jnp.asarray(amax.astype(np.float32))
  got = jax.jit(gn.e4m3_block_scale)(amax, jnp.float32(d), jnp.float32(1) / jnp.float32(d))
  want = jnp.where(amax == 0, 1.0, formats._nearest_e4m3(amax, jnp.float32(d)))  # noqa: SLF001
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("ts", [None, 0.003])
def test_nvfp4_values_are_the_decoded_codes(ts):
  """``out="nvfp4_f16"``: every value is its code's E2M1 value (``e2m1_values``, arithmetic)
  times its block scale, as the matmul's table decode gives it, bit for bit in float16
  (-0.0 included), with the same tensor scale; from ``reference`` and ``gathered_quantize``."""
  from pqjax_kernels import matmul_fp4  # noqa: PLC0415

  rng = np.random.default_rng(31)
  x = jnp.asarray(rng.standard_normal((6, 256)) * np.logspace(-3, 2, 256), jnp.bfloat16)
  x = x.at[0, :16].set(-0.0)  # negative zeros: code 8, value -0.0
  perm = jnp.asarray(rng.permutation(256), jnp.int32)
  act = gn.reference(x, perm, kind="rms", out="nvfp4", tensor_scale=ts)
  want = matmul_fp4.dequantize(act.codes, act.scales, 1.0, "nvfp4").astype(jnp.float16)
  bits = lambda a: np.asarray(jax.lax.bitcast_convert_type(a, jnp.uint16))  # noqa: E731
  for got in (gn.reference(x, perm, kind="rms", out="nvfp4_f16", tensor_scale=ts),
              gn.nvfp4_values(act)):
    assert got.values.dtype == jnp.float16 and got.values.shape == x.shape
    np.testing.assert_array_equal(bits(got.values), bits(want))
    assert float(got.tensor_scale) == float(act.tensor_scale)
  plain = gn.gathered_quantize(x, perm, tensor_scale=ts, out="nvfp4_f16")
  np.testing.assert_array_equal(
      bits(plain.values), bits(gn.nvfp4_values(gn.gathered_quantize(x, perm,
                                                                    tensor_scale=ts)).values))
  assert (bits(want) == 0x8000).any()  # signed zeros occur, and survive
  with pytest.raises(ValueError, match="out must be 'nvfp4' or 'nvfp4_f16'"):
    gn.gathered_quantize(x, perm, out="bf16")

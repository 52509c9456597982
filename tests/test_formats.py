"""Bit-exactness and properties of pqjax.formats against independent NumPy references."""

import re

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pqjax import formats
from tests.bounds import U32

FTZ = 2.0**-126  # smallest normal float32; anything smaller may be flushed to zero
E2M1_GRID = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
INT_QMAX = {"int4": 7, "int3": 3}
GROUP_SIZES = {"nvfp4": (16,), "mxfp4": (32,), "int4": (8, 32, 64), "int3": (8, 16)}
HYP = settings(max_examples=20, deadline=None)


pytestmark = pytest.mark.usefixtures("strict_promotion")


# ---------------------------------------------------------------- NumPy references
# The format rounds "v / S to the nearest grid point" by comparing |v| with the float32
# products fl(boundary * S) (see pqjax.formats). The references below do that in float64 on
# float32 operands, rounding each product once to float32 (a product of two float32 values is
# exact in float64, so this is the float32 product). Each reference also checks itself
# against the exact quotient rounded by ml_dtypes / np.round wherever the quotient is farther
# than the float32 product's rounding (2**-24 relative) from a rounding boundary.

NEAR = 2.0**-24 + 2.0**-50  # fl(b * S) error, plus float64 rounding of the exact quotient
E2M1_BOUNDS = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
E2M1_TIE_UP = np.array([False, True, False, True, False, True, False])  # tie -> even code
E4M3 = np.arange(1, 127, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float64)
E4M3_MIDS = (E4M3[1:] + E4M3[:-1]) / 2
E4M3_TIE_UP = np.arange(E4M3_MIDS.size) % 2 == 0


def f32(v):
  return np.asarray(v, np.float64).astype(np.float32).astype(np.float64)


def np_e2m1(v):
  return np.asarray(v, np.float32).astype(ml_dtypes.float4_e2m1fn).view(np.uint8)


def np_groups(x, axis, g):
  xl = np.moveaxis(np.asarray(x, np.float64), axis, -1)
  return xl.reshape(*xl.shape[:-1], xl.shape[-1] // g, g)


def np_unpack(packed, axis):
  p = np.moveaxis(np.asarray(packed), axis, -1)
  out = np.stack([p & 15, p >> 4], axis=-1)
  return np.moveaxis(out.reshape(*p.shape[:-1], 2 * p.shape[-1]), -1, axis)


def boundaries_passed(v, scale, bounds, tie_up):
  """Number of boundaries b with |v| above fl(b * scale) (at or above where ties go up)."""
  mag = np.abs(v)[..., None]
  thr = f32(bounds * np.asarray(scale)[..., None])
  return np.where(tie_up, mag >= thr, mag > thr).sum(-1)


def near_boundary(ratio, bounds):
  r = np.abs(ratio)[..., None]
  return np.any(np.abs(r - bounds) <= NEAR * bounds, axis=-1)


def e2m1_codes(xg, scale):
  """Codes of xg / scale (scale broadcast per group), checked against ml_dtypes."""
  mag = boundaries_passed(xg, scale, E2M1_BOUNDS, E2M1_TIE_UP)
  codes = (mag | (np.signbit(xg) << 3)).astype(np.uint8)
  ratio = xg / scale
  exact = np_e2m1(np.clip(ratio, -6, 6).astype(np.float32))
  far = ~near_boundary(ratio, E2M1_BOUNDS) & (np.abs(ratio) < 2.0**100)
  np.testing.assert_array_equal(codes[far], exact[far])
  return codes


def ref_nvfp4(xg, tensor_scale=None):
  if tensor_scale is None:
    amax = np.max(np.abs(xg))
    s_t = max(f32(amax * f32(1 / 2688)), 2.0**-117) if amax > 0 else 1.0
  else:
    s_t = max(f32(tensor_scale), 2.0**-117)
  amax_b = np.max(np.abs(xg), axis=-1)
  d = f32(6 * s_t)
  s_b = E4M3[boundaries_passed(amax_b, d, E4M3_MIDS, E4M3_TIE_UP)]
  exact = np.clip(amax_b / d, 2.0**-9, 448.0).astype(ml_dtypes.float8_e4m3fn).astype(np.float64)
  far = ~near_boundary(amax_b / d, E4M3_MIDS)
  np.testing.assert_array_equal(s_b[far], exact[far])
  s_b = np.where(amax_b == 0, 1.0, s_b)
  codes = e2m1_codes(xg, f32(s_b * s_t)[..., None])
  return codes, s_b.astype(np.float32).astype(ml_dtypes.float8_e4m3fn), s_t


def ref_mxfp4(xg):
  amax_b = np.max(np.abs(xg), axis=-1)
  _, exp = np.frexp(amax_b)  # amax = m * 2**exp, m in [0.5, 1): floor(log2(amax)) = exp - 1
  e = np.where(amax_b == 0, 0, np.clip(exp - 1 - 2, -127, 127))
  codes = e2m1_codes(np.ldexp(xg, -e[..., None]), np.ones(e.shape + (1,)))
  return codes, (e + 127).astype(np.uint8), 1.0


def ref_int(xg, qmax):
  amax_b = np.max(np.abs(xg), axis=-1)
  s = np.maximum(f32(amax_b * f32(1 / qmax)), 2.0**-126)
  s = np.where(amax_b == 0, 1.0, s)[..., None]
  halves = np.arange(qmax) + 0.5
  q = boundaries_passed(xg, s, halves, np.arange(qmax) % 2 == 1)  # tie -> even integer
  q = np.where(xg < 0, -q, q)
  ratio = xg / s
  exact = np.clip(np.round(ratio), -qmax - 1, qmax)
  far = ~near_boundary(ratio, halves)
  np.testing.assert_array_equal(q[far], exact[far])
  return (q & 15).astype(np.uint8), s[..., 0].astype(np.float32), 1.0


def reference(x, fmt, axis, g, tensor_scale=None):
  xg = np_groups(x, axis, g)
  if fmt == "nvfp4":
    return ref_nvfp4(xg, tensor_scale)
  if fmt == "mxfp4":
    return ref_mxfp4(xg)
  return ref_int(xg, INT_QMAX[fmt])


def assert_matches_reference(x, fmt, axis, g, tensor_scale=None):
  qt = formats.quantize(x, fmt, axis=axis, group_size=g, tensor_scale=tensor_scale)
  codes, scales, s_t = reference(x, fmt, axis, g, tensor_scale)
  ours_codes = np_groups(np_unpack(qt.codes, qt.axis), qt.axis, g).astype(np.uint8)
  np.testing.assert_array_equal(ours_codes, codes)
  ours_scales = np.moveaxis(np.asarray(qt.scales), qt.axis, -1)
  assert ours_scales.dtype == scales.dtype
  np.testing.assert_array_equal(ours_scales.view(np.uint8), scales.view(np.uint8))
  assert np.float32(qt.tensor_scale) == np.float32(s_t)


def np_decode_scales(qt):
  s = np.moveaxis(np.asarray(qt.scales), qt.axis, -1)
  if qt.fmt == "mxfp4":
    return np.ldexp(1.0, s.astype(np.int64) - 127)
  return s.astype(np.float64) * np.float64(qt.tensor_scale)


def e2m1_half_step(r):
  """Half the E2M1 grid spacing around magnitude r (r <= 6)."""
  return np.where(r < 2, 0.25, np.where(r < 4, 0.5, 1.0))


def error_bound(x, qt):
  """Largest |x - dequant| allowed: half the local step of the group's scaled grid, or the
  clip distance beyond the top of the grid; plus float32 rounding of the scaled ratio
  (3 roundings: scale product, reciprocal, multiply) and of the dequantized product, plus
  two flushed subnormals."""
  g = qt.group_size
  xg = np.abs(np_groups(x, qt.axis, g))
  step = np_decode_scales(qt)[..., None]
  r = xg / step
  if qt.fmt in ("nvfp4", "mxfp4"):
    top, half = 6.0, e2m1_half_step(np.minimum(r, 6.0)) * step
  else:
    top, half = INT_QMAX[qt.fmt], 0.5 * step
  grid = np.where(r > top, (r - top) * step, half)
  bound = grid + 3 * U32 * xg + U32 * (xg + grid) + 2 * FTZ
  return np.moveaxis(bound.reshape(*bound.shape[:-2], -1), -1, qt.axis)


# ---------------------------------------------------------------- E2M1


MIDPOINTS = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], np.float32)


def test_e2m1_midpoints_match_ml_dtypes():
  x = np.concatenate([MIDPOINTS, -MIDPOINTS])
  np.testing.assert_array_equal(np.asarray(formats.e2m1_encode(x)), np_e2m1(x))
  # Midpoints go to the even code; spelled out so a shared bug in ml_dtypes cannot hide.
  np.testing.assert_array_equal(np.asarray(formats.e2m1_decode(formats.e2m1_encode(MIDPOINTS))),
                                [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0])


def test_e2m1_neighbours_of_midpoints_match_ml_dtypes():
  up = np.nextafter(MIDPOINTS, np.float32(np.inf))
  down = np.nextafter(MIDPOINTS, np.float32(0))
  x = np.concatenate([up, down, -up, -down, E2M1_GRID.astype(np.float32)])
  np.testing.assert_array_equal(np.asarray(formats.e2m1_encode(x)), np_e2m1(x))


def test_e2m1_saturation_matches_ml_dtypes():
  big = np.array([6.0, np.nextafter(np.float32(6), np.float32(7)), 7.0, 100.0, 1e30, 3.4e38,
                  np.inf], np.float32)
  x = np.concatenate([big, -big])
  np.testing.assert_array_equal(np.asarray(formats.e2m1_encode(x)), np_e2m1(x))


def test_e2m1_random_matches_ml_dtypes():
  rng = np.random.default_rng(0)
  x = np.concatenate([rng.uniform(-8, 8, 20000), rng.normal(size=5000) * 1e-3,
                      [0.0, -0.0, 1e-45, -1e-45]]).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(jax.jit(formats.e2m1_encode)(x)), np_e2m1(x))


def test_e2m1_decode_matches_ml_dtypes():
  codes = np.arange(16, dtype=np.uint8)
  expected = codes.view(ml_dtypes.float4_e2m1fn).astype(np.float32)
  out = np.asarray(formats.e2m1_decode(codes))
  np.testing.assert_array_equal(out, expected)
  np.testing.assert_array_equal(np.signbit(out), np.signbit(expected))


@pytest.mark.parametrize("d", [1.0, 2.0**-20, 2.0**40])
def test_e4m3_rounding_matches_ml_dtypes(d):
  """NVFP4 block-scale rounding v / d -> e4m3 (d a power of two, so thresholds are exact) on
  every value, midpoint, float32 neighbour of each midpoint and random values, clamped to
  [2**-9, 448]."""
  e4m3 = E4M3.astype(np.float32)
  mids = E4M3_MIDS.astype(np.float32)
  rand = np.random.default_rng(8).uniform(0, 500, 20000).astype(np.float32)
  v = np.concatenate([e4m3, mids, np.nextafter(mids, np.float32(0)),
                      np.nextafter(mids, np.float32(500)), rand, [0.0, 2.0**-11, 600.0]])
  v = v.astype(np.float32)
  out = np.asarray(jax.jit(formats._nearest_e4m3)(v * np.float32(d), jnp.float32(d)))
  expected = np.clip(v, 2.0**-9, 448).astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
  np.testing.assert_array_equal(out, expected)


# ---------------------------------------------------------------- reference formulas


def structured_input(rng, shape, axis, g):
  """Gaussian groups with magnitudes spread over 16 decades, one all-zero group and one
  group far below the tensor maximum (NVFP4 block scale clamped at 2**-9)."""
  x = np.moveaxis(rng.normal(size=shape), axis, -1)
  xg = x.reshape(*x.shape[:-1], -1, g)
  xg *= 10.0 ** rng.uniform(-8, 8, size=xg.shape[:-1] + (1,))
  flat = xg.reshape(-1, g)
  flat[0] = 0.0
  flat[1] *= 1e-7 * np.max(np.abs(flat)) / np.max(np.abs(flat[1]))
  return np.moveaxis(flat.reshape(x.shape), -1, axis).astype(np.float32)


@pytest.mark.parametrize("fmt", list(formats.FORMATS))
@pytest.mark.parametrize("shape,axis", [((4, 128), -1), ((3, 64, 5), 1), ((64, 6), 0)])
def test_codes_and_scales_match_numpy(fmt, shape, axis):
  g = formats.FORMATS[fmt].group_size
  if shape[axis] % g:
    g = 32 if shape[axis] % 32 == 0 else 16
  x = structured_input(np.random.default_rng(1), shape, axis, g)
  assert_matches_reference(x, fmt, axis, g)


def test_nvfp4_static_tensor_scale_matches_numpy():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(6, 64)).astype(np.float32)
  calibrated = np.float32(0.5 * np.max(np.abs(x)) / 2688)  # half the range: top saturates
  assert_matches_reference(x, "nvfp4", -1, 16, tensor_scale=calibrated)
  qt = formats.quantize(x, "nvfp4", tensor_scale=calibrated)
  assert np.float32(qt.tensor_scale) == calibrated
  assert np.max(np.abs(np.asarray(formats.dequantize(qt)))) == pytest.approx(
      6 * 448 * calibrated, rel=U32)


NICE = st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 5.0, 6.0,
                        7.0, 10.0, 448.0, 1.0 / 3.0])


@st.composite
def tie_heavy_arrays(draw, fmt):
  """Arrays of 'nice' values times powers of two: ratios land exactly on rounding ties."""
  g = draw(st.sampled_from(GROUP_SIZES[fmt]))
  n = draw(st.integers(1, 2))
  rows = draw(st.integers(1, 2))
  mags = draw(hnp.arrays(np.float64, (rows, n * g), elements=NICE))
  signs = draw(hnp.arrays(np.bool_, (rows, n * g)))
  pow2 = draw(hnp.arrays(np.int64, (rows, n, 1), elements=st.integers(-20, 20)))
  x = np.where(signs, -mags, mags).reshape(rows, n, g) * np.ldexp(1.0, pow2)
  return x.reshape(rows, n * g).astype(np.float32), g


@pytest.mark.parametrize("fmt", list(formats.FORMATS))
@HYP
@given(data=st.data())
def test_ties_match_numpy(fmt, data):
  x, g = data.draw(tie_heavy_arrays(fmt))
  assert_matches_reference(x, fmt, -1, g)


E2M1_POINTS = np.concatenate([[0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], E2M1_BOUNDS])


@st.composite
def exact_tie_groups(draw, fmt):
  """Groups built on a chosen scale S so that every element is exactly a grid point or a
  rounding midpoint times S, with one element at the top of the grid (so that quantize
  recovers S exactly); returns x, group size, the NVFP4 tensor scale and S per group."""
  g = GROUP_SIZES[fmt][0]
  n = draw(st.integers(1, 3))
  pow2 = draw(hnp.arrays(np.int64, (n, 1), elements=st.integers(-20, 20)))
  if fmt == "nvfp4":
    s_t = 2.0 ** draw(st.integers(-10, 10))
    s_b = E4M3[draw(hnp.arrays(np.int64, (n, 1), elements=st.integers(0, E4M3.size - 1)))]
    scale, top, points, tensor_scale = s_b * s_t, 6.0, E2M1_POINTS, np.float32(s_t)
  else:
    # mxfp4: the E8M0 scale; int: s = fl(amax * fl(1/qmax)) is exactly 2**k for amax = qmax 2**k.
    scale, tensor_scale = np.ldexp(1.0, pow2), None
    top = 6.0 if fmt == "mxfp4" else INT_QMAX[fmt]
    points = E2M1_POINTS if fmt == "mxfp4" else np.arange(0, 2 * top + 1) / 2
  idx = draw(hnp.arrays(np.int64, (n, g), elements=st.integers(0, points.size - 1)))
  signs = draw(hnp.arrays(np.bool_, (n, g)))
  mags = points[idx]
  mags[:, 0] = top
  x = np.where(signs, -mags, mags) * scale
  return x.reshape(1, n * g).astype(np.float32), g, tensor_scale, scale[:, 0]


@pytest.mark.parametrize("fmt", list(formats.FORMATS))
@HYP
@given(data=st.data())
def test_exact_ties_round_to_even(fmt, data):
  """At exact midpoints the codes equal ml_dtypes' E2M1 cast / np.round (ties to even)."""
  x, g, tensor_scale, scale = data.draw(exact_tie_groups(fmt))
  assert_matches_reference(x, fmt, -1, g, tensor_scale)
  qt = formats.quantize(x, fmt, group_size=g, tensor_scale=tensor_scale)
  np.testing.assert_array_equal(np_decode_scales(qt)[0], scale)
  ratio = np_groups(x, -1, g)[0] / scale[:, None]
  codes = np_groups(np_unpack(qt.codes, 1), 1, g)[0]
  if fmt in ("nvfp4", "mxfp4"):
    np.testing.assert_array_equal(codes, np_e2m1(ratio))
  else:
    np.testing.assert_array_equal(codes, np.round(ratio).astype(np.int64) & 15)


def test_zeros_stay_zero_beside_tiny_values():
  """NVFP4 scales of a tiny tensor meet the floors, where some thresholds fl(b * S) are
  float32 subnormals (flushed to zero on CPU); exact zeros must still get code 0."""
  x = np.zeros((1, 32), np.float32)
  x[0, 0] = x[0, 16] = 2e-38  # s_t and s_b meet their floors: S = 2**-126
  qt = formats.quantize(x, "nvfp4")
  assert float(qt.tensor_scale) == 2.0**-117
  np.testing.assert_array_equal(np.asarray(qt.scales).astype(np.float32), 2.0**-9)
  np.testing.assert_array_equal(np_unpack(qt.codes, 1)[x == 0], 0)


# ---------------------------------------------------------------- properties


@st.composite
def quantize_cases(draw):
  fmt = draw(st.sampled_from(list(formats.FORMATS)))
  g = draw(st.sampled_from(GROUP_SIZES[fmt]))
  ndim = draw(st.integers(1, 3))
  axis = draw(st.integers(-ndim, ndim - 1))
  shape = [draw(st.integers(1, 2)) for _ in range(ndim)]
  shape[axis] = g * draw(st.integers(1, 2))
  elements = st.one_of(
      st.floats(-1e3, 1e3, width=32),
      st.floats(-2.0**-125, 2.0**-125, width=32),  # subnormals and tiny normals
      st.sampled_from([0.0, -0.0, 1e30, -1e30, 3e38, -3e38, 1e-45]),
  )
  scale = draw(st.sampled_from([1.0, 1e-30, 1e20]))
  x = draw(hnp.arrays(np.float32, tuple(shape), elements=elements))
  with np.errstate(over="ignore"):
    x = np.clip(x.astype(np.float64) * scale, -3e38, 3e38).astype(np.float32)
  return x, fmt, axis, g


@HYP
@given(case=quantize_cases())
def test_error_within_half_grid_step(case):
  x, fmt, axis, g = case
  qt = formats.quantize(x, fmt, axis=axis, group_size=g)
  out = np.asarray(formats.dequantize(qt))
  assert out.shape == x.shape and out.dtype == np.float32
  assert np.all(np.isfinite(out))
  err = np.abs(out.astype(np.float64) - x.astype(np.float64))
  bound = error_bound(x, qt)
  assert np.all(err <= bound), (err - bound).max()


def bits(a):
  return np.atleast_1d(np.asarray(a)).view(np.uint8)


@pytest.mark.parametrize("fmt", list(formats.FORMATS))
def test_jit_and_vmap_equal_eager(fmt):
  g = GROUP_SIZES[fmt][0]
  x = structured_input(np.random.default_rng(7), (3, 4 * g), -1, g)
  eager = [formats.quantize(row, fmt, group_size=g) for row in x]
  jitted = jax.jit(formats.quantize, static_argnames=("fmt", "group_size"))(
      x[1], fmt, group_size=g)
  vmapped = jax.jit(jax.vmap(lambda r: formats.quantize(r, fmt, group_size=g)))(x)
  assert jax.tree.structure(jitted) == jax.tree.structure(eager[1])
  for u, v in zip(jax.tree.leaves(eager[1]), jax.tree.leaves(jitted)):
    np.testing.assert_array_equal(bits(u), bits(v))
  for i, row in enumerate(eager):
    for u, v in zip(jax.tree.leaves(row), jax.tree.leaves(vmapped)):
      np.testing.assert_array_equal(bits(u), bits(v[i]))


@HYP
@given(data=st.data())
def test_pack_unpack_bijection(data):
  shape = data.draw(hnp.array_shapes(min_dims=1, max_dims=3, max_side=4))
  axis = data.draw(st.integers(-len(shape), len(shape) - 1))
  packed = data.draw(hnp.arrays(np.uint8, shape))
  codes = formats.unpack_nibbles(packed, axis)
  assert codes.shape[axis % len(shape)] == 2 * shape[axis]
  assert int(jnp.max(codes)) < 16
  np.testing.assert_array_equal(np.asarray(formats.pack_nibbles(codes, axis)), packed)
  np.testing.assert_array_equal(np.asarray(codes), np_unpack(packed, axis))


def test_pack_layout_low_nibble_first():
  packed = formats.pack_nibbles(jnp.array([[1, 2, 15, 0]], jnp.uint8), axis=1)
  np.testing.assert_array_equal(np.asarray(packed), [[1 | 2 << 4, 15]])


@pytest.mark.parametrize("fmt", list(formats.FORMATS))
def test_all_zero_groups(fmt):
  g = GROUP_SIZES[fmt][0]
  x = np.zeros((2, 3 * g), np.float32)
  x[1, g:2 * g] = np.linspace(-1, 1, g)
  qt = formats.quantize(x, fmt, group_size=g)
  zero_groups = np.array([[1, 1, 1], [1, 0, 1]], bool)
  scales = np.asarray(qt.scales)
  one = {"nvfp4": np.float32(1).astype(ml_dtypes.float8_e4m3fn).view(np.uint8),
         "mxfp4": np.uint8(127)}.get(fmt, np.float32(1).view(np.uint32))
  np.testing.assert_array_equal(scales.view(one.dtype)[zero_groups], one)
  codes = np_groups(np_unpack(qt.codes, 1), 1, g)
  assert np.all(codes[zero_groups] == 0)
  out = np.asarray(formats.dequantize(qt))
  assert np.all(out[x == 0] == 0)
  whole = formats.quantize(np.zeros((2, 3 * g), np.float32), fmt, group_size=g)
  assert float(whole.tensor_scale) == 1.0
  assert np.all(np.asarray(formats.dequantize(whole)) == 0)


@pytest.mark.parametrize("fmt", list(formats.FORMATS))
@pytest.mark.parametrize("value", [1e-40, 1e-45, 1e-38, 1e30, 3e38])
def test_extreme_magnitudes_stay_finite(fmt, value):
  g = GROUP_SIZES[fmt][0]
  x = (np.linspace(-1, 1, 2 * g) * value).astype(np.float32)
  qt = formats.quantize(x, fmt, group_size=g)
  out = np.asarray(formats.dequantize(qt))
  assert np.all(np.isfinite(out))
  assert np.all(np.abs(out.astype(np.float64) - x) <= error_bound(x, qt))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("fmt", list(formats.FORMATS))
def test_half_inputs_equal_float32_upcast(fmt, dtype):
  x = jnp.asarray(np.random.default_rng(3).normal(size=(3, 64)), dtype)
  a = formats.quantize(x, fmt, group_size=GROUP_SIZES[fmt][0])
  b = formats.quantize(x.astype(jnp.float32), fmt, group_size=GROUP_SIZES[fmt][0])
  assert a.dtype == jnp.dtype(dtype) and b.dtype == jnp.dtype(jnp.float32)
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(bits(u), bits(v))
  assert formats.dequantize(a, dtype).dtype == jnp.dtype(dtype)


# ---------------------------------------------------------------- QTensor


def test_qtensor_layout_and_pytree():
  x = np.random.default_rng(4).normal(size=(5, 64, 3)).astype(np.float32)
  qt = formats.quantize(x, "nvfp4", axis=-2)
  assert qt.axis == 1 and qt.shape == (5, 64, 3) and qt.group_size == 16
  assert qt.codes.shape == (5, 32, 3) and qt.codes.dtype == jnp.uint8
  assert qt.scales.shape == (5, 4, 3) and qt.scales.dtype == jnp.float8_e4m3fn
  assert qt.tensor_scale.shape == () and qt.tensor_scale.dtype == jnp.float32
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(qt)[0]]
  assert paths == [".codes", ".scales", ".tensor_scale"]
  assert qt.nbytes == 5 * 32 * 3 + 5 * 4 * 3 + 4
  roundtrip = jax.jit(lambda q: q)(qt)
  assert (roundtrip.fmt, roundtrip.axis, roundtrip.shape) == ("nvfp4", 1, (5, 64, 3))
  np.testing.assert_array_equal(np.asarray(formats.dequantize(roundtrip)),
                                np.asarray(formats.dequantize(qt)))


def test_scale_dtypes():
  x = np.ones((2, 64), np.float32)
  for fmt, spec in formats.FORMATS.items():
    assert formats.quantize(x, fmt).scales.dtype == spec.scale_dtype


# ---------------------------------------------------------------- non-finite input


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_concrete_non_finite_raises(bad):
  x = np.ones((3, 32), np.float32)
  x[1, 3] = bad
  x[2, 0] = bad
  with pytest.raises(formats.NonFiniteError, match=re.escape("2 non-finite") + ".*" +
                     re.escape("(1, 3)")):
    formats.quantize(x, "int4", group_size=32)
  with pytest.raises(formats.NonFiniteError):
    formats.quantize(jnp.asarray(x, jnp.bfloat16), "nvfp4")


@pytest.mark.parametrize("fmt", list(formats.FORMATS))
def test_traced_non_finite_poisons_groups(fmt):
  g = GROUP_SIZES[fmt][0]
  x = np.random.default_rng(5).normal(size=(2, 2 * g)).astype(np.float32)
  bad = x.copy()
  bad[1, g + 1] = np.nan
  bad[0, 0] = np.inf
  quant = jax.jit(lambda v: formats.quantize(v, fmt, group_size=g))
  qt, clean = quant(bad), quant(x)
  poisoned = np.zeros((2, 2), bool)
  poisoned[1, 1] = poisoned[0, 0] = True
  if fmt == "nvfp4":  # the dynamic tensor scale sees the NaN: every group is poisoned
    poisoned[:] = True
    assert np.isnan(float(qt.tensor_scale))
  codes = np_groups(np_unpack(qt.codes, 1), 1, g)
  assert np.all(codes[poisoned] == 0)
  out = np_groups(np.asarray(formats.dequantize(qt)), 1, g)
  assert np.all(np.isnan(out[poisoned]))
  scales = np.asarray(qt.scales)
  if fmt == "mxfp4":
    assert np.all(scales[poisoned] == 255)
  else:
    assert np.all(np.isnan(scales[poisoned].astype(np.float32)))
  clean_codes = np_groups(np_unpack(clean.codes, 1), 1, g)
  np.testing.assert_array_equal(codes[~poisoned], clean_codes[~poisoned])
  np.testing.assert_array_equal(out[~poisoned],
                                np_groups(np.asarray(formats.dequantize(clean)), 1, g)[~poisoned])


def test_traced_non_finite_with_static_tensor_scale_poisons_only_its_group():
  x = np.random.default_rng(6).normal(size=(1, 64)).astype(np.float32)
  s_t = formats.nvfp4_tensor_scale(x)
  bad = x.copy()
  bad[0, 20] = np.inf
  quant = jax.jit(lambda v: formats.quantize(v, "nvfp4", tensor_scale=s_t))
  out = np.asarray(formats.dequantize(quant(bad)))
  expected = np.asarray(formats.dequantize(quant(x)))
  assert np.all(np.isnan(out[0, 16:32]))
  np.testing.assert_array_equal(np.delete(out, np.s_[16:32], axis=1),
                                np.delete(expected, np.s_[16:32], axis=1))


def test_nvfp4_tensor_scale_special_values():
  assert float(formats.nvfp4_tensor_scale(jnp.zeros(4))) == 1.0
  assert float(formats.nvfp4_tensor_scale(jnp.float32(2688.0))) == pytest.approx(1.0, rel=U32)
  assert float(formats.nvfp4_tensor_scale(jnp.float32(1e-36))) == 2.0**-117
  assert np.isnan(float(jax.jit(formats.nvfp4_tensor_scale)(jnp.array([1.0, np.nan]))))


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("kwargs,pattern", [
    (dict(x=np.ones((2, 40), np.float32), fmt="nvfp4"), r"\(2, 40\).*group_size 16"),
    (dict(x=np.ones((2, 9), np.float32), fmt="int4", group_size=3), r"odd length 9"),
    (dict(x=np.ones((2, 64), np.int32), fmt="int4"), r"dtype int32"),
    (dict(x=np.ones((2, 64), np.float64), fmt="int4"), r"dtype float64"),
    (dict(x=np.ones((2, 64), bool), fmt="int4"), r"dtype bool"),
    (dict(x=np.ones((2, 64), np.float32), fmt="fp4"), r"unknown format 'fp4'"),
    (dict(x=np.ones((2, 64), np.float32), fmt="int4", axis=2), r"axis 2 out of range"),
    (dict(x=np.ones((2, 64), np.float32), fmt="int4", group_size=0), r"group_size .*0"),
    (dict(x=np.float32(1.0), fmt="int4"), r"scalar"),
    (dict(x=np.ones((2, 64), np.float32), fmt="int4", tensor_scale=1.0), r"'int4' has no"),
    (dict(x=np.ones((2, 64), np.float32), fmt="nvfp4", tensor_scale=np.ones(2)),
     r"scalar, got shape \(2,\)"),
    (dict(x=np.ones((2, 64), np.float32), fmt="nvfp4", tensor_scale=-1.0), r"positive.*-1"),
    (dict(x=np.ones((2, 64), np.float32), fmt="nvfp4", tensor_scale=np.inf), r"non-finite"),
])
def test_bad_quantize_input(kwargs, pattern):
  x = kwargs.pop("x")
  fmt = kwargs.pop("fmt")
  with pytest.raises(ValueError, match=pattern):
    formats.quantize(x, fmt, **kwargs)


def test_bad_pack_input():
  with pytest.raises(ValueError, match=r"odd length 3"):
    formats.pack_nibbles(jnp.zeros((2, 3), jnp.uint8))
  with pytest.raises(ValueError, match=r"dtype int32"):
    formats.pack_nibbles(jnp.zeros((2, 4), jnp.int32))
  with pytest.raises(ValueError, match=r"dtype float32"):
    formats.unpack_nibbles(jnp.zeros((2, 4), jnp.float32))

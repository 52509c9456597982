"""The reference quantized matmul against float64 NumPy and JAX's block-scaled dot."""

import dataclasses

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from pqjax import formats, qmatmul
from tests.bounds import U32, gamma

GROUP = {"nvfp4": 16, "mxfp4": 32, "int4": 32, "int3": 32}


pytestmark = pytest.mark.usefixtures("strict_promotion")




def operands(seed, m=(2, 3), k=128, n=24):
  rng = np.random.default_rng(seed)
  x = (rng.normal(size=(*m, k)) * rng.uniform(0.1, 10, size=(k,))).astype(np.float32)
  kernel = rng.normal(size=(k, n)).astype(np.float32)
  bias = rng.normal(size=(n,)).astype(np.float32)
  return x, kernel, bias


def assert_close_to_f64(y, a, b, bias=None):
  """y vs the float64 product a @ b.T (+ bias) of float32 operands: a float32 dot of length K
  plus the bias add is within gamma(K + 1) of sum |a||b| + |bias|."""
  a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
  exact = a64 @ b64.T
  mag = np.abs(a64) @ np.abs(b64).T
  if bias is not None:
    exact, mag = exact + bias, mag + np.abs(bias)
  bound = gamma(a64.shape[-1] + 1) * mag
  assert np.all(np.abs(np.asarray(y, np.float64) - exact) <= bound)


def test_quantize_weight_stores_the_transpose():
  _, kernel, _ = operands(0)
  w = qmatmul.quantize_weight(kernel, "nvfp4")
  assert w.shape == (24, 128) and w.axis == 1
  assert w.codes.shape == (24, 64) and w.scales.shape == (24, 8)
  direct = formats.quantize(kernel.T, "nvfp4", axis=-1)
  np.testing.assert_array_equal(np.asarray(w.codes), np.asarray(direct.codes))
  np.testing.assert_array_equal(np.asarray(formats.dequantize(w)),
                                np.asarray(formats.dequantize(direct)))


@pytest.mark.parametrize("fmt", list(GROUP))
def test_w4a16_equals_float64_product(fmt):
  x, kernel, bias = operands(1)
  w = qmatmul.quantize_weight(kernel, fmt, GROUP[fmt])
  y = qmatmul.reference_matmul(x, w, bias=bias)
  assert y.shape == (2, 3, 24) and y.dtype == jnp.float32
  assert_close_to_f64(y, x, formats.dequantize(w), bias)


@pytest.mark.parametrize("fmt", list(GROUP))
def test_w4a4_quantizes_activations_per_row_along_k(fmt):
  x, kernel, bias = operands(2)
  w = qmatmul.quantize_weight(kernel, fmt, GROUP[fmt])
  y = jax.jit(lambda x, w: qmatmul.reference_matmul(x, w, act_format=fmt, bias=bias))(x, w)
  xq = formats.dequantize(formats.quantize(x, fmt, group_size=GROUP[fmt]))
  assert_close_to_f64(y, xq, formats.dequantize(w), bias)
  # Activations are quantized, so the result must differ from W4A16 (the check can fail).
  assert not np.array_equal(np.asarray(y), np.asarray(qmatmul.reference_matmul(x, w, bias=bias)))


def test_w4a4_static_activation_tensor_scale():
  x, kernel, _ = operands(3)
  w = qmatmul.quantize_weight(kernel, "nvfp4")
  s = formats.nvfp4_tensor_scale(0.25 * np.max(np.abs(x)))
  y = qmatmul.reference_matmul(x, w, act_format="nvfp4", act_tensor_scale=s)
  xq = formats.dequantize(formats.quantize(x, "nvfp4", tensor_scale=s))
  assert float(jnp.max(jnp.abs(xq))) == pytest.approx(6 * 448 * float(s), rel=U32)  # saturated
  assert_close_to_f64(y, xq, formats.dequantize(w))


def block_scaled_dot_cpu(lhs, rhs, lhs_scales, rhs_scales):
  return jax.lax.scaled_dot(lhs, rhs, lhs_scale=lhs_scales, rhs_scale=rhs_scales,
                            dimension_numbers=(((2,), (2,)), ((0,), (0,))),
                            preferred_element_type=jnp.float32)


BLOCK_SCALED = [
    # jax.nn.scaled_matmul has only CUDA/ROCm lowerings in JAX 0.10.2; on the CPU the same
    # (B, M, K) x (B, N, K) block-scaled product is jax.lax.scaled_dot (what ROCm lowers to).
    pytest.param(jax.nn.scaled_matmul, id="scaled_matmul", marks=pytest.mark.skipif(
        jax.default_backend() == "cpu", reason="jax.nn.scaled_matmul has no CPU lowering")),
    pytest.param(block_scaled_dot_cpu, id="lax_scaled_dot"),
]


@pytest.mark.parametrize("block_scaled", BLOCK_SCALED)
def test_w4a4_nvfp4_equals_block_scaled_matmul(block_scaled):
  x, kernel, _ = operands(4, m=(16,), k=256, n=32)
  w = qmatmul.quantize_weight(kernel, "nvfp4")
  qx = formats.quantize(x, "nvfp4")
  ours = np.asarray(qmatmul.reference_matmul(x, w, act_format="nvfp4"), np.float64)

  def e2m1(qt):
    return formats.e2m1_decode(formats.unpack_nibbles(qt.codes))[None].astype(jnp.float4_e2m1fn)

  theirs = block_scaled(e2m1(qx), e2m1(w), qx.scales[None], w.scales[None])[0]
  theirs = np.asarray(theirs * (qx.tensor_scale * w.tensor_scale), np.float64)

  # a_k = code * block scale is exact in float32 (2 + 4 significant bits), and so is each
  # product a_k b_k. Ours rounds a_k * s_t and b_k * s_t (2 roundings), then a K-term float32
  # dot (gamma(K)); theirs a K-term dot (gamma(K)), s_tx * s_tw and the final multiply
  # (2 roundings). Both lie within gamma(K + 2) of sum_k a_k b_k s_tx s_tw, so they differ by
  # at most 2 gamma(K + 2) sum_k |a_k b_k| s_tx s_tw.
  def exact_parts(qt):
    unit = dataclasses.replace(qt, tensor_scale=jnp.float32(1.0))
    return np.asarray(formats.dequantize(unit), np.float64)

  a, b = exact_parts(qx), exact_parts(w)
  st = float(qx.tensor_scale) * float(w.tensor_scale)
  exact = (a @ b.T) * st
  bound = gamma(256 + 2) * (np.abs(a) @ np.abs(b).T) * st
  assert np.all(np.abs(theirs - exact) <= bound)
  assert np.all(np.abs(ours - theirs) <= 2 * bound)
  assert np.abs(ours).max() > 0


def test_e2m1_times_e4m3_is_exact_in_bfloat16():
  """The claim behind bf16 tensor-core NVFP4 products: every code * block scale is a bf16."""
  grid = np.arange(16, dtype=np.uint8).view(ml_dtypes.float4_e2m1fn).astype(np.float64)
  scales = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float64)
  prod = np.outer(grid, scales[np.isfinite(scales)]).ravel()
  np.testing.assert_array_equal(prod.astype(ml_dtypes.bfloat16).astype(np.float64), prod)


def test_out_dtype_and_bfloat16_activations():
  x, kernel, bias = operands(5)
  w = qmatmul.quantize_weight(kernel, "int4", 32)
  xb = jnp.asarray(x, jnp.bfloat16)
  assert qmatmul.reference_matmul(xb, w).dtype == jnp.bfloat16
  y32 = qmatmul.reference_matmul(xb, w, bias=bias, out_dtype=jnp.float32)
  assert y32.dtype == jnp.float32
  assert_close_to_f64(y32, np.asarray(xb.astype(jnp.float32)), formats.dequantize(w), bias)


def test_rank1_activation():
  x, kernel, bias = operands(6)
  w = qmatmul.quantize_weight(kernel, "mxfp4")
  y = qmatmul.reference_matmul(x[0, 0], w, bias=bias)
  assert y.shape == (24,)
  assert_close_to_f64(y, x[0, 0], formats.dequantize(w), bias)


def test_bad_input():
  x, kernel, bias = operands(7)
  w = qmatmul.quantize_weight(kernel, "nvfp4")
  with pytest.raises(ValueError, match=r"\(2, 3, 64\).*\(24, 128\)"):
    qmatmul.reference_matmul(x[..., :64], w)
  with pytest.raises(ValueError, match=r"bias shape \(23,\)"):
    qmatmul.reference_matmul(x, w, bias=bias[:23])
  with pytest.raises(ValueError, match=r"axis 0"):
    qmatmul.reference_matmul(x, formats.quantize(kernel, "nvfp4", axis=0))
  with pytest.raises(ValueError, match=r"act_tensor_scale given without act_format"):
    qmatmul.reference_matmul(x, w, act_tensor_scale=1.0)
  with pytest.raises(ValueError, match=r"\(4, 128, 24\)"):
    qmatmul.quantize_weight(np.ones((4, 128, 24), np.float32), "nvfp4")
  with pytest.raises(ValueError, match=r"unknown format 'nf4'"):
    qmatmul.reference_matmul(x, w, act_format="nf4")

"""Gathered LayerNorm / RMSNorm with adaLN shift/scale and optional NVFP4 output.

``gathered_norm(x, perm, ...)`` computes ``norm(x) * (1 + scale) + shift`` read in the channel
order ``perm`` (``out[..., j] = f(x)[..., perm[j]]``), and optionally quantizes the result to
NVFP4 along the last axis (16-wide groups, E4M3 block scales, float32 tensor scale) after an
optional orthonormal 16x16 block Hadamard rotation inside each group.
``gathered_quantize`` is the same without the norm.

This module is plain ``jax.numpy``: XLA fuses the gather, the statistics and the quantization
into a couple of fusions, and it is the definition the Mosaic GPU kernel
(``pqjax_kernels.norm_kernel``, what ``pqjax.dispatch`` runs on Hopper) is tested against.

The NVFP4 arithmetic is ``pqjax.formats.quantize``'s, bit for bit on finite input (both
decide each rounding by comparing with rounded products, ties to even):
``s_t = max(fl(amax * fl(1/2688)), 2**-117)`` (1 for an all-zero tensor); ``s_b`` the E4M3
value in ``[2**-9, 448]`` nearest ``amax_b / fl(6 s_t)`` (1 for an all-zero group), decided
by comparing ``amax_b`` with ``fl(midpoint * fl(6 s_t))`` for the E4M3 midpoint beside a first
guess; the code of ``x`` counts the E2M1 boundaries ``b`` with ``|x|`` above
``fl(b * fl(s_b s_t))`` (at or above where a tie goes up). Comparing with products instead
of rounding a computed quotient is what makes the two agree at exact rounding midpoints,
which are common with bf16 activations and a round static tensor scale (amax 1.5 and
``s_t = 0.01``: 25 lies between the E4M3 values 24 and 26 and goes to 24).

The E4M3 rounding of ``s_b`` is float32/int32 arithmetic, never a convert to float8 and
back: XLA's GPU pipeline (``simplify-fp-conversions``) rewrites a ``f32 -> f8 -> f32`` convert
chain to the identity, which once silently dropped that rounding (9.5% of the codes changed
on an H200).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp

NormKind = Literal["layer", "rms"]
OutKind = Literal["bf16", "nvfp4", "nvfp4_f16"]
QUANTIZED = ("nvfp4", "nvfp4_f16")  # the outputs that quantize

GROUP = 16
_E2M1_MAX = 6.0
_E4M3_MAX = 448.0
_E4M3_MIN = 2.0**-9
_TENSOR_SCALE_FLOOR = 2.0**-117
# E2M1 rounding boundaries; True: a tie rounds up (to the even code above).
_E2M1_BOUNDS = ((0.25, False), (0.75, True), (1.25, False), (1.75, True), (2.5, False),
                (3.5, True), (5.0, False))


@dataclasses.dataclass(frozen=True)
class NVFP4Activation:
  """Packed NVFP4 activations: codes ``(..., D/2)`` uint8 (low nibble first), scales
  ``(..., D/16)`` float8_e4m3fn, float32 scalar tensor scale."""

  codes: jax.Array
  scales: jax.Array
  tensor_scale: jax.Array


jax.tree_util.register_dataclass(
    NVFP4Activation, data_fields=["codes", "scales", "tensor_scale"], meta_fields=[])


@dataclasses.dataclass(frozen=True)
class NVFP4Values:
  """NVFP4 activations decoded but for the tensor scale: ``values (..., D)`` float16, each
  element's E2M1 value times its group's E4M3 scale (exact in float16: ``2**-10 <= |v| <=
  2688`` or 0), and the float32 scalar ``tensor_scale``. What a W4A4 matmul kernel
  multiplies (``pqjax_kernels.fp4_matmul`` takes ``values`` with ``a_tensor_scale``)."""

  values: jax.Array
  tensor_scale: jax.Array


jax.tree_util.register_dataclass(NVFP4Values, data_fields=["values", "tensor_scale"],
                                 meta_fields=[])


def _check_perm(perm, d: int) -> None:
  if perm is None:
    return
  if not hasattr(perm, "dtype") or jnp.dtype(perm.dtype) != jnp.int32:
    raise ValueError(f"perm must be an int32 array, got dtype {getattr(perm, 'dtype', type(perm))}")
  if tuple(perm.shape) != (d,):
    raise ValueError(f"perm must have shape ({d},) to match the last axis of x, got {perm.shape}")


def _check_vec(name: str, v, x_shape: tuple[int, ...], per_sample: bool) -> None:
  """``v`` must end in D and broadcast against x; adaLN vectors may be ``(B, D)`` per sample."""
  if v is None:
    return
  d = x_shape[-1]
  shape = tuple(v.shape)
  if per_sample and len(shape) == 2 and len(x_shape) == 3 and shape == (x_shape[0], d):
    return
  ok = len(shape) >= 1 and shape[-1] == d and len(shape) <= len(x_shape) and all(
      s in (1, xs) for s, xs in zip(shape[::-1], x_shape[::-1]))
  if not ok or (not per_sample and len(shape) != 1):
    want = f"({d},)" + (f", ({x_shape[0]}, {d}) or broadcastable to {x_shape}" if per_sample
                        else "")
    raise ValueError(f"{name} must have shape {want} for x of shape {x_shape}, got {shape}")


def check_inputs(x, perm, *, kind: str = "layer", weight=None, bias=None, shift=None,
                 scale=None, out: str = "bf16", hadamard: bool = False) -> None:
  """Raises ``ValueError`` naming the argument for bad shapes, dtypes or options."""
  if not hasattr(x, "dtype") or jnp.dtype(x.dtype) not in (jnp.dtype(jnp.float32),
                                                            jnp.dtype(jnp.bfloat16),
                                                            jnp.dtype(jnp.float16)):
    raise ValueError(f"x must be float32/bfloat16/float16, got {getattr(x, 'dtype', type(x))}")
  if x.ndim not in (2, 3):
    raise ValueError(f"x must be (M, D) or (B, T, D), got shape {x.shape}")
  if kind not in ("layer", "rms"):
    raise ValueError(f"kind must be 'layer' or 'rms', got {kind!r}")
  if out not in ("bf16", *QUANTIZED):
    raise ValueError(f"out must be 'bf16', 'nvfp4' or 'nvfp4_f16', got {out!r}")
  if hadamard and out not in QUANTIZED:
    raise ValueError("hadamard=True needs a quantized out (the rotation precedes "
                     "quantization)")
  if out in QUANTIZED and x.shape[-1] % GROUP:
    raise ValueError(f"out={out!r} needs the last axis of x ({x.shape[-1]}) to be a multiple "
                     f"of {GROUP}")
  _check_perm(perm, x.shape[-1])
  _check_vec("weight", weight, x.shape, False)
  _check_vec("bias", bias, x.shape, False)
  _check_vec("shift", shift, x.shape, x.ndim == 3)
  _check_vec("scale", scale, x.shape, x.ndim == 3)


def _gather(v, perm):
  return v if perm is None else jnp.take(v, perm, axis=-1)


def _per_sample(v, x):
  """Broadcasts a ``(D,)`` or per-sample ``(B, D)`` vector against ``x``."""
  v = v.astype(jnp.float32)
  if v.ndim == 2 and x.ndim == 3 and v.shape[0] == x.shape[0]:
    return v[:, None, :]
  return v.reshape((1,) * (x.ndim - v.ndim) + v.shape)


def e2m1_thresholds(s: jax.Array) -> list[tuple[jax.Array, bool]]:
  """The E2M1 rounding boundaries of a group with scale ``s``: ``(fl(b * s), tie_up)``.

  ``s >= 2**-126`` (the floors of both scales), so no threshold is zero: a zero stays zero.
  """
  return [(jnp.float32(bound) * s, tie_up) for bound, tie_up in _E2M1_BOUNDS]


def e2m1_codes(y: jax.Array, thresholds) -> jax.Array:
  """E2M1 codes (int32, ``s<<3|e<<1|m``) of float32 ``y`` given its ``e2m1_thresholds``
  (broadcast against ``y``): the number of boundaries ``|y|`` passes, saturating, sign from
  the bits.

  The boundaries ascend, so the count is found by bisection: three comparisons (with the
  middle boundary, then the middle one of the half ``|y|`` lies in, then that quarter's)
  instead of seven; the same comparisons decide, so the codes are the same. Level 1 and 2
  boundaries round ties up (to the even code above), level 3 ones down. (Where a platform
  flushes subnormal floats to zero, as XLA on the CPU does, boundaries below 2**-126, which
  only ``s < 2**-124`` gives, become 0 and no longer ascend strictly; codes of values that
  small can then differ from a count by one step.)
  """
  (t0, u0), (t1, u1), (t2, u2), (t3, u3), (t4, u4), (t5, u5), (t6, u6) = thresholds
  assert u1 == u3 == u5 and u0 == u2 == u4 == u6, "tie rule per bisection level"
  mag = jnp.abs(y)
  passes = lambda t, tie_up: mag >= t if tie_up else mag > t  # noqa: E731
  hi = passes(t3, u3)
  mid = passes(jnp.where(hi, t5, t1), u1)
  lo = passes(jnp.where(hi, jnp.where(mid, t6, t4), jnp.where(mid, t2, t0)), u0)
  i32 = jnp.int32
  code = (hi.astype(i32) << 2) | (mid.astype(i32) << 1) | lo.astype(i32)
  sign = jax.lax.shift_right_logical(jax.lax.bitcast_convert_type(y, i32), i32(31))
  return code | (sign << 3)


def e4m3_block_scale(amax: jax.Array, d: jax.Array, inv_d: jax.Array) -> jax.Array:
  """The E4M3 value in ``[2**-9, 448]`` nearest ``amax / d`` (ties to even), float32; 1 where
  ``amax == 0``, NaN where it is NaN. ``d = fl(6 s_t)``, ``inv_d = fl(1 / d)``.

  The product ``q = fl(amax * inv_d)`` is within two float32 ulps of the quotient, so its
  nearest E4M3 value ``v`` is the answer or the neighbour on the side where ``q`` lies; one
  comparison of ``amax`` with ``fl(midpoint * d)`` for the midpoint on that side settles it
  exactly as ``pqjax.formats`` decides. All in float32/int32 arithmetic, elementwise: the
  Mosaic GPU kernel runs this function as is, once per group (a cvt to float8 and back
  would cost more).
  """
  i32, f32 = jnp.int32, jnp.float32
  as_int = lambda v: jax.lax.bitcast_convert_type(v, i32)  # noqa: E731
  as_float = lambda v: jax.lax.bitcast_convert_type(v, f32)  # noqa: E731
  q = jnp.clip(amax * inv_d, _E4M3_MIN, _E4M3_MAX)
  # Round the float32 significand of q to the bits E4M3 keeps, ties to even, on its bits:
  # 3 below the leading one from 2**-6 up, fewer below (a fixed quantum of 2**-9). Integer
  # operations: XLA folds a float ``(q + c) - c`` rounding trick back to ``q``.
  bits = as_int(q)
  drop = jnp.maximum(141 - (bits >> 23), 20)  # 141 = 127 + 14: drop 23 at q < 2**-8
  keep_one = jnp.left_shift(i32(1), drop)
  rounded = (bits + (keep_one >> 1) - 1 + (jnp.right_shift(bits, drop) & 1)) & -keep_one
  v = as_float(rounded)
  # The E4M3 byte's last bit: the mantissa's (bit 20) from 2**-6 up, else that of v / 2**-9.
  sub = v < f32(2.0**-6)
  odd = jnp.where(sub, as_int(v * f32(512) + f32(2.0**23)), rounded >> 20) & 1
  # Half the gap to the neighbour above (2**(E-4) for v = 2**E * 1.m, 2**-10 below 2**-6);
  # below a power of two >= 2**-5 the gap halves. Flags are int32: the kernel selects and
  # combines integers, not booleans.
  flag = lambda b: b.astype(i32)  # noqa: E731
  half_up = jnp.maximum(as_float((as_int(v) & 0x7F800000) - (4 << 23)), f32(2.0**-10))
  pow2 = flag((as_int(v) & 0x7FFFFF) == 0) & flag(v > f32(2.0**-6))
  up = q >= v
  step = jnp.where(up, half_up, jnp.where(pow2 == 1, half_up * f32(-0.5), -half_up))
  t = (v + step) * d  # fl(midpoint * d); v + step is exact
  beyond = jnp.where(up, flag(amax > t), flag(amax < t)) | (flag(amax == t) & odd)
  moved = beyond & (flag(v < f32(_E4M3_MAX)) | flag(q < v))  # never above 448
  v = jnp.where(moved == 1, v + step * f32(2.0), v)
  v = jnp.where(amax == 0, f32(1.0), v)
  return jnp.where(amax != amax, f32(jnp.nan), v)


def static_tensor_scale(tensor_scale) -> jax.Array:
  """A given (static, calibrated) NVFP4 tensor scale as float32, floored at ``2**-117``."""
  return jnp.maximum(jnp.asarray(tensor_scale, jnp.float32), jnp.float32(_TENSOR_SCALE_FLOOR))


def nvfp4_tensor_scale(y: jax.Array) -> jax.Array:
  """Dynamic NVFP4 tensor scale ``max(amax / 2688, 2**-117)`` (1 for all-zero ``y``)."""
  amax = jnp.max(jnp.abs(y.astype(jnp.float32)))
  s_t = jnp.maximum(amax * jnp.float32(1.0 / (_E2M1_MAX * _E4M3_MAX)),
                    jnp.float32(_TENSOR_SCALE_FLOOR))
  return jnp.where(amax == 0, jnp.float32(1.0), s_t)


def quantize_nvfp4(y: jax.Array, tensor_scale=None) -> NVFP4Activation:
  """NVFP4-quantizes ``y (..., D)`` along the last axis (static or dynamic tensor scale)."""
  y = y.astype(jnp.float32)
  if tensor_scale is None:
    s_t = nvfp4_tensor_scale(y)
  else:
    s_t = static_tensor_scale(tensor_scale)
  yg = y.reshape(*y.shape[:-1], y.shape[-1] // GROUP, GROUP)
  amax = jnp.max(jnp.abs(yg), axis=-1)
  d = jnp.float32(_E2M1_MAX) * s_t
  s_b = e4m3_block_scale(amax, d, jnp.float32(1.0) / d)
  codes = e2m1_codes(yg, [(t[..., None], up) for t, up in e2m1_thresholds(s_b * s_t)])
  codes = codes.reshape(*y.shape[:-1], y.shape[-1] // 2, 2)
  packed = (codes[..., 0] | (codes[..., 1] << 4)).astype(jnp.uint8)
  return NVFP4Activation(packed, s_b.astype(jnp.float8_e4m3fn), s_t)


def e2m1_values(codes: jax.Array) -> jax.Array:
  """Float32 values of int32 E2M1 codes ``s<<3|e<<1|m`` (a zero with the sign bit: -0.0).

  Arithmetic, no table: a magnitude code c >= 2 is the float32 with bits ``(c + 252) << 22``
  (exponent ``c // 2 - 1``, the mantissa's top bit ``c % 2``), below it ``c / 2``; the sign
  bit is ORed in. The norm kernel runs this function as is."""
  i32, f32 = jnp.int32, jnp.float32
  mag = codes & 7
  v = jnp.where(mag >= 2, jax.lax.bitcast_convert_type((mag + 252) << 22, f32),
                mag.astype(f32) * f32(0.5))
  sign = (codes & 8) << 28
  return jax.lax.bitcast_convert_type(jax.lax.bitcast_convert_type(v, i32) | sign, f32)


def nvfp4_values(act: NVFP4Activation) -> NVFP4Values:
  """``act`` decoded but for its tensor scale (``NVFP4Values``)."""
  c = act.codes.astype(jnp.int32)
  codes = jnp.stack([c & 15, c >> 4], axis=-1).reshape(*c.shape[:-1], 2 * c.shape[-1])
  s = jnp.repeat(act.scales.astype(jnp.float32), GROUP, axis=-1)
  return NVFP4Values((e2m1_values(codes) * s).astype(jnp.float16), act.tensor_scale)


def walsh_hadamard(y: jax.Array, n: int) -> jax.Array:
  """Unnormalized Walsh-Hadamard transform of every contiguous ``n``-wide group of the last
  axis (``n`` a power of two dividing it): ``y @ (sqrt(n) * H_n)`` as the butterfly over
  the index bits 0, 1, ... (``a + b`` and ``a - b`` of the pairs differing in one bit).

  This order of float32 additions is the definition: the kernel's butterfly (bit 0 inside a
  thread's register pair, bits 1-3 across lanes) makes the same additions, so it agrees bit
  for bit, which a matrix product (an unspecified summation order) would not.
  """
  shape = y.shape
  h = 1
  while h < n:
    v = y.reshape(*shape[:-1], shape[-1] // (2 * h), 2, h)
    a, b = v[..., 0, :], v[..., 1, :]
    y = jnp.stack([a + b, a - b], axis=-2).reshape(shape)
    h *= 2
  return y


def block_hadamard(y: jax.Array) -> jax.Array:
  """Applies the orthonormal 16x16 Sylvester Hadamard matrix inside each 16-wide group of
  the last axis: the butterfly ``walsh_hadamard(y, 16)``, then the exact scaling by 1/4."""
  return walsh_hadamard(y, GROUP) * jnp.float32(0.25)


def _finish(y, out: str, tensor_scale, hadamard: bool, out_dtype):
  if out == "bf16":
    return y.astype(out_dtype)
  if hadamard:
    y = block_hadamard(y)
  act = quantize_nvfp4(y, tensor_scale)
  return nvfp4_values(act) if out == "nvfp4_f16" else act


_ROUND_TO = (jnp.bfloat16, jnp.float16)


def check_round_to(round_to) -> None:
  """``round_to`` is None or a two-byte float dtype (``ValueError`` naming it otherwise)."""
  if round_to is not None and jnp.dtype(round_to) not in [jnp.dtype(t) for t in _ROUND_TO]:
    raise ValueError(f"round_to must be None, bfloat16 or float16, got {round_to!r}")


def round_through(y: jax.Array, dtype) -> jax.Array:
  """float32 ``y`` rounded to ``dtype`` (bfloat16 or float16) and back, as the cast does.

  Written without the casts: XLA on the GPU drops a float32 -> bf16 -> float32 round trip
  (``xla_allow_excess_precision``), which would make this reference skip the rounding the
  kernels do. ``reduce_precision`` is kept, but flushes float16's subnormals, which are
  rounded to multiples of 2**-24 here instead.
  """
  fi = jnp.finfo(dtype)
  r = jax.lax.reduce_precision(y, exponent_bits=fi.nexp, mantissa_bits=fi.nmant)
  if jnp.dtype(dtype) == jnp.dtype(jnp.float16):
    tiny = jnp.float32(fi.smallest_normal)
    r = jnp.where(jnp.abs(y) < tiny, jnp.round(y * 2.0**24) * 2.0**-24, r)
  return r


def reference(x: jax.Array, perm: jax.Array | None, *, kind: NormKind = "layer",
              weight=None, bias=None, shift=None, scale=None, eps: float = 1e-6,
              out: OutKind = "bf16", tensor_scale=None, hadamard: bool = False,
              out_dtype=jnp.bfloat16, round_to=None):
  """Plain-jnp gathered norm (+ quantize); the definition the fast paths are tested against.

  Args:
    x: ``(M, D)`` or ``(B, T, D)`` activations.
    perm: int32 ``(D,)`` channel order of the output, or None.
    kind: ``"layer"`` (mean and variance) or ``"rms"``.
    weight, bias: optional ``(D,)`` affine parameters of the norm, in input channel order.
    shift, scale: optional adaLN vectors ``(D,)`` or per-sample ``(B, D)`` (x 3-D), in input
      channel order.
    eps: variance epsilon.
    out: ``"bf16"`` (array in ``out_dtype``), ``"nvfp4"`` (``NVFP4Activation``) or
      ``"nvfp4_f16"`` (the same decoded, ``NVFP4Values``).
    tensor_scale: NVFP4 static tensor scale; None computes it from the result (dynamic).
    hadamard: rotate each 16-group with ``block_hadamard`` before quantizing.
    out_dtype: dtype of the ``"bf16"`` output.
    round_to: None, or ``jnp.bfloat16`` / ``jnp.float16``: the normalized values are rounded
      to it before the rest (quantizing, then, what a norm stored in that dtype holds).

  Returns:
    The normalized, gathered array, or its ``NVFP4Activation`` / ``NVFP4Values``.
  """
  check_inputs(x, perm, kind=kind, weight=weight, bias=bias, shift=shift, scale=scale,
               out=out, hadamard=hadamard)
  check_round_to(round_to)
  xf = x.astype(jnp.float32)
  if kind == "layer":
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    xc = xf - mean
    var = jnp.mean(xc * xc, axis=-1, keepdims=True)
  else:
    xc = xf
    var = jnp.mean(xf * xf, axis=-1, keepdims=True)
  y = xc * jax.lax.rsqrt(var + jnp.float32(eps))
  if weight is not None:
    y = y * _per_sample(weight, y)
  if bias is not None:
    y = y + _per_sample(bias, y)
  if scale is not None:
    y = y * (1.0 + _per_sample(scale, xf))
  if shift is not None:
    y = y + _per_sample(shift, xf)
  if round_to is not None:
    y = round_through(y, round_to)
  return _finish(_gather(y, perm), out, tensor_scale, hadamard, out_dtype)


def gathered_norm(x, perm, **kwargs):
  """Gathered norm (+ NVFP4 quantize); runs ``reference`` under XLA (see module docstring)."""
  return reference(x, perm, **kwargs)


def gathered_quantize(x: jax.Array, perm: jax.Array | None, *, tensor_scale=None,
                      hadamard: bool = False,
                      out: str = "nvfp4") -> NVFP4Activation | NVFP4Values:
  """Plain gathered NVFP4 quantize of ``x[..., perm]`` (no norm), optional block Hadamard.

  Args:
    x: ``(..., D)`` float activations, D a multiple of 16.
    perm: int32 ``(D,)`` or None.
    tensor_scale: static tensor scale or None (dynamic).
    hadamard: rotate each 16-group before quantizing.
    out: ``"nvfp4"`` (codes and scales) or ``"nvfp4_f16"`` (decoded, ``NVFP4Values``).

  Returns:
    ``NVFP4Activation`` (or ``NVFP4Values``) of ``x[..., perm]``.
  """
  if out not in QUANTIZED:
    raise ValueError(f"out must be 'nvfp4' or 'nvfp4_f16', got {out!r}")
  if not hasattr(x, "dtype") or not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"x must be a float array, got {getattr(x, 'dtype', type(x))}")
  if x.ndim < 1 or x.shape[-1] % GROUP:
    raise ValueError(f"the last axis of x (shape {x.shape}) must be a multiple of {GROUP}")
  _check_perm(perm, x.shape[-1])
  y = _gather(x.astype(jnp.float32), perm)
  return _finish(y, out, tensor_scale, hadamard, None)

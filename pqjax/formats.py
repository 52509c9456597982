"""Bit-exact 4-bit number formats: NVFP4, MXFP4, INT4 and INT3 group quantization.

Definitions follow ``shared/notes/formats.md``; this module fixes the float32 arithmetic so
that codes are reproducible bit for bit (a kernel doing the same float32 operations gets
the same codes):

* No division: XLA's float32 division is not correctly rounded on GPU (and XLA:CPU turns
  ``x / broadcast(s)`` into ``x * (1 / s)``), so every rounding decision "nearest grid point
  of ``v / S``" compares ``|v|`` with the float32 products ``fl(boundary * S)`` of the grid's
  midpoints (ties to the even code, as ``ml_dtypes`` casts do). Multiplication and
  comparison are exact IEEE operations on every backend, so codes and scales are bit-identical
  on CPU, GPU and in a kernel doing the same. They equal rounding the exact quotient except
  when ``v / S`` lies within float32 rounding (``2**-24`` relative) of a boundary.
* NVFP4: ``s_t = fl(amax * fl(1/2688))`` floored at ``2**-117``; ``s_b`` = the
  float8_e4m3fn value in ``[2**-9, 448]`` nearest ``amax_b / fl(6 * s_t)``;
  ``q`` = the E2M1 value nearest ``x / fl(s_b * s_t)``, saturating at 6;
  ``x_hat = fl(fl(q * s_b) * s_t)``. The floor keeps ``s_b * s_t >= 2**-126`` a normal
  float32 (XLA:CPU flushes subnormals).
* MXFP4: ``e = clip(floor(log2(amax_b)) - 2, -127, 127)`` read from the float32 exponent bits;
  ``q = e2m1(x * 2**-e)`` (exact), stored ``e + 127`` as an E8M0 byte.
* INT4/INT3: ``s = max(fl(amax_b * fl(1/qmax)), 2**-126)``; ``q`` = the integer nearest
  ``x / s`` (ties to even), clipped to ``[-qmax, qmax]``, stored as 4-bit two's complement.
* Every format gives an all-zero group the scale 1 (codes 0); an all-zero tensor gets
  ``s_t = 1``.

Non-finite input: a concrete (non-traced) input containing NaN or +-Inf raises
``NonFiniteError``. Under ``jit`` values cannot be inspected, so instead every group whose
scale computation sees a NaN or Inf gets codes 0 and a NaN scale (e4m3 NaN, E8M0 ``0xFF``,
float32 NaN) and dequantizes to NaN. For NVFP4 with a computed tensor scale that is every
group of the tensor (``tensor_scale`` is NaN too); with a given finite tensor scale only the
groups holding the non-finite values.

Subnormal float32 inputs may be flushed to zero by the backend (XLA:CPU does); results then
differ from exact arithmetic by less than ``2**-126`` per element.
"""

from __future__ import annotations

import dataclasses
import functools
import types
from collections.abc import Mapping
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike, DTypeLike

FormatName = Literal["nvfp4", "mxfp4", "int4", "int3"]

E2M1_MAX = 6.0
E4M3_MAX = 448.0
NVFP4_TENSOR_SCALE_FLOOR = 2.0**-117
INT_SCALE_FLOOR = 2.0**-126
E8M0_BIAS = 127
E8M0_NAN = 255
_E2M1_EMAX = 2
_INPUT_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))

# Positive finite float8_e4m3fn values (codes 1..126, ascending) and their midpoints; a
# midpoint tie goes up when the upper neighbour's code is even.
_E4M3_VALUES = np.arange(1, 127, dtype=np.uint8).view(jnp.float8_e4m3fn).astype(np.float32)
_E4M3_MIDPOINTS = (_E4M3_VALUES[1:] + _E4M3_VALUES[:-1]) / np.float32(2)
_E4M3_TIE_UP = np.arange(_E4M3_MIDPOINTS.size) % 2 == 0
# Magnitudes of E2M1 codes 0..7 (code = e << 1 | m); bit 3 is the sign.
_E2M1_GRID = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], np.float32)
# Rounding boundaries between consecutive grid points, with the comparison that sends a tie
# to the neighbour whose mantissa bit is 0 (even code): ``>`` keeps the tie below, ``>=``
# moves it up.
_E2M1_BOUNDS = ((0.25, False), (0.75, True), (1.25, False), (1.75, True), (2.5, False),
                (3.5, True), (5.0, False))


class NonFiniteError(ValueError):
  """A concrete input to quantize holds NaN or Inf."""


@dataclasses.dataclass(frozen=True)
class FormatSpec:
  """Static description of a 4-bit format.

  Attributes:
    name: format name, a key of ``FORMATS``.
    kind: ``"e2m1"`` (FP4 elements) or ``"int"`` (two's complement integers).
    group_size: default number of contiguous elements sharing one scale.
    elem_max: largest element magnitude on the positive side (6 for E2M1, qmax for INT).
    elem_min: most negative element value (-6 for E2M1, -qmax - 1 for INT).
    scale_dtype: dtype of ``QTensor.scales``.
    has_tensor_scale: whether a second-level float32 tensor scale is used.
  """

  name: str
  kind: Literal["e2m1", "int"]
  group_size: int
  elem_max: float
  elem_min: float
  scale_dtype: jnp.dtype
  has_tensor_scale: bool


FORMATS: Mapping[str, FormatSpec] = types.MappingProxyType({
    "nvfp4": FormatSpec("nvfp4", "e2m1", 16, E2M1_MAX, -E2M1_MAX,
                        jnp.dtype(jnp.float8_e4m3fn), True),
    "mxfp4": FormatSpec("mxfp4", "e2m1", 32, E2M1_MAX, -E2M1_MAX, jnp.dtype(jnp.uint8), False),
    "int4": FormatSpec("int4", "int", 64, 7.0, -8.0, jnp.dtype(jnp.float32), False),
    "int3": FormatSpec("int3", "int", 64, 3.0, -4.0, jnp.dtype(jnp.float32), False),
})


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["codes", "scales", "tensor_scale"],
    meta_fields=["fmt", "group_size", "axis", "shape", "dtype"],
)
@dataclasses.dataclass(frozen=True)
class QTensor:
  """A group-quantized tensor (layout in DESIGN.md, "Number formats").

  Attributes:
    codes: uint8, ``shape`` with ``axis`` halved; element ``2i`` in the low nibble of byte i.
    scales: ``shape`` with ``axis`` divided by ``group_size``; dtype ``FORMATS[fmt].scale_dtype``.
    tensor_scale: float32 scalar (NVFP4 second-level scale, 1.0 for other formats).
    fmt: format name.
    group_size: elements per scale group along ``axis``.
    axis: the quantized axis, non-negative.
    shape: shape of the original tensor.
    dtype: dtype of the original tensor (the default ``dequantize`` target is float32).
  """

  codes: jax.Array
  scales: jax.Array
  tensor_scale: jax.Array
  fmt: str
  group_size: int
  axis: int
  shape: tuple[int, ...]
  dtype: jnp.dtype

  @property
  def nbytes(self) -> int:
    """Bytes held by codes, scales and tensor scale."""
    return sum(int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize
               for a in (self.codes, self.scales, self.tensor_scale))


def format_spec(fmt: str) -> FormatSpec:
  """Returns the ``FormatSpec`` of ``fmt``; raises ``ValueError`` for an unknown name."""
  try:
    return FORMATS[fmt]
  except (KeyError, TypeError):
    raise ValueError(f"unknown format {fmt!r}; expected one of {sorted(FORMATS)}") from None


def _nearest_e2m1(x: jax.Array, scale: jax.Array) -> jax.Array:
  """E2M1 codes of ``x / scale`` by comparing ``|x|`` with ``fl(boundary * scale)``."""
  mag = jnp.abs(x)
  code = jnp.zeros(x.shape, jnp.uint8)
  for bound, tie_up in _E2M1_BOUNDS:
    threshold = jnp.float32(bound) * scale
    above = mag >= threshold if tie_up else mag > threshold
    code = code + above.astype(jnp.uint8)
  # A threshold flushed to zero must not lift an exact zero.
  code = jnp.where(mag == 0, jnp.uint8(0), code)
  sign = jnp.signbit(x) & ~jnp.isnan(x)
  return code | (sign.astype(jnp.uint8) << 3)


@jax.jit
def e2m1_encode(x: ArrayLike) -> jax.Array:
  """Rounds to the nearest E2M1 value and returns its 4-bit code as uint8.

  Identical to casting to ``ml_dtypes.float4_e2m1fn`` for every non-NaN input: ties go to the
  even code, ``|x| > 6`` (and Inf) saturates to 6, negative values rounding to zero keep the
  sign bit (code 8). NaN gives code 0.

  Args:
    x: floating-point array.

  Returns:
    uint8 array of codes ``s << 3 | e << 1 | m`` with the shape of ``x``.
  """
  return _nearest_e2m1(jnp.asarray(x).astype(jnp.float32), jnp.float32(1.0))


@jax.jit
def e2m1_decode(codes: ArrayLike) -> jax.Array:
  """Returns the float32 value of 4-bit E2M1 codes (only the low nibble is read)."""
  codes = jnp.asarray(codes)
  mag = jnp.asarray(_E2M1_GRID)[codes & 7]
  return jnp.where((codes & 8) != 0, -mag, mag)


def _int_decode(codes: jax.Array) -> jax.Array:
  """Sign-extends 4-bit two's complement codes to float32."""
  nibble = (codes & 15).astype(jnp.int32)
  return jnp.where(nibble >= 8, nibble - 16, nibble).astype(jnp.float32)


def _normalize_axis(axis: int, ndim: int) -> int:
  if not -ndim <= axis < ndim:
    raise ValueError(f"axis {axis} out of range for an array of rank {ndim}")
  return axis % ndim


def pack_nibbles(codes: ArrayLike, axis: int = -1) -> jax.Array:
  """Packs pairs of 4-bit codes along ``axis`` into bytes (element 2i in the low nibble).

  Args:
    codes: uint8 array of values below 16 (higher bits are dropped); even length on ``axis``.
    axis: axis to pack along.

  Returns:
    uint8 array with ``axis`` halved.
  """
  codes = jnp.asarray(codes)
  if codes.dtype != jnp.uint8:
    raise ValueError(f"pack_nibbles expects uint8 codes, got dtype {codes.dtype}")
  axis = _normalize_axis(axis, codes.ndim)
  if codes.shape[axis] % 2:
    raise ValueError(f"cannot pack odd length {codes.shape[axis]} on axis {axis} of shape "
                     f"{codes.shape}")
  return _pack_core(codes, axis=axis)


@functools.partial(jax.jit, static_argnames="axis")
def _pack_core(codes: jax.Array, *, axis: int) -> jax.Array:
  c = jnp.moveaxis(codes, axis, -1)
  c = c.reshape(*c.shape[:-1], c.shape[-1] // 2, 2) & 15
  packed = c[..., 0] | (c[..., 1] << 4)
  return jnp.moveaxis(packed, -1, axis)


def unpack_nibbles(packed: ArrayLike, axis: int = -1) -> jax.Array:
  """Inverse of ``pack_nibbles``: returns uint8 codes with ``axis`` doubled."""
  packed = jnp.asarray(packed)
  if packed.dtype != jnp.uint8:
    raise ValueError(f"unpack_nibbles expects uint8 bytes, got dtype {packed.dtype}")
  return _unpack_core(packed, axis=_normalize_axis(axis, packed.ndim))


@functools.partial(jax.jit, static_argnames="axis")
def _unpack_core(packed: jax.Array, *, axis: int) -> jax.Array:
  p = jnp.moveaxis(packed, axis, -1)
  codes = jnp.stack([p & 15, p >> 4], axis=-1).reshape(*p.shape[:-1], 2 * p.shape[-1])
  return jnp.moveaxis(codes, -1, axis)


def _nearest_e4m3(v: jax.Array, d: jax.Array) -> jax.Array:
  """The float8_e4m3fn value in ``[2**-9, 448]`` nearest ``v / d``, as float32.

  Binary search over the 125 midpoints, comparing ``v`` with ``fl(midpoint * d)``.
  """
  mids, tie_up = jnp.asarray(_E4M3_MIDPOINTS), jnp.asarray(_E4M3_TIE_UP)
  idx = jnp.zeros(v.shape, jnp.int32)
  for step in (64, 32, 16, 8, 4, 2, 1):
    j = jnp.minimum(idx + step - 1, mids.size - 1)
    threshold = mids[j] * d
    passed = jnp.where(tie_up[j], v >= threshold, v > threshold) & (idx + step <= mids.size)
    idx = jnp.where(passed, idx + step, idx)
  return jnp.asarray(_E4M3_VALUES)[idx]


def _nearest_int(x: jax.Array, scale: jax.Array, qmax: int) -> jax.Array:
  """Integers nearest ``x / scale`` (ties to even) clipped to ``[-qmax, qmax]``, as int32."""
  mag = jnp.abs(x)
  q = jnp.zeros(x.shape, jnp.int32)
  for k in range(qmax):
    threshold = jnp.float32(k + 0.5) * scale
    above = mag >= threshold if k % 2 else mag > threshold
    q = q + above.astype(jnp.int32)
  q = jnp.where(mag == 0, 0, q)  # as in _nearest_e2m1
  return jnp.where(x < 0, -q, q)


def nvfp4_tensor_scale(x: ArrayLike) -> jax.Array:
  """NVFP4 second-level scale ``amax(|x|) / (6 * 448)`` as a float32 scalar.

  Pass a calibrated amax (a scalar) as ``x`` to get its static scale. An all-zero ``x`` gives
  1.0; the result is floored at ``2**-117``; a non-finite ``x`` gives NaN.

  Args:
    x: floating-point array.

  Returns:
    float32 scalar.
  """
  x = jnp.asarray(x).astype(jnp.float32)
  amax = jnp.max(jnp.abs(x))
  s_t = jnp.maximum(amax * jnp.float32(1.0 / (E2M1_MAX * E4M3_MAX)),
                    jnp.float32(NVFP4_TENSOR_SCALE_FLOOR))
  s_t = jnp.where(amax == 0, jnp.float32(1.0), s_t)
  return jnp.where(jnp.all(jnp.isfinite(x)), s_t, jnp.float32(jnp.nan))


def _check_finite(x: ArrayLike, what: str) -> None:
  """Raises NonFiniteError for a concrete array holding NaN/Inf; tracers pass unchecked."""
  if isinstance(x, jax.core.Tracer):
    return
  values = np.asarray(x)
  bad = ~np.isfinite(values.astype(np.float32))
  if bad.any():
    first = tuple(int(i) for i in np.argwhere(bad)[0])
    raise NonFiniteError(f"{what} of shape {values.shape} holds {int(bad.sum())} non-finite "
                         f"values; first at index {first}: {values[first]}")


def _check_input(x: ArrayLike) -> jax.Array:
  dtype = getattr(x, "dtype", None)
  arr = jnp.asarray(x)
  dtype = jnp.dtype(dtype) if dtype is not None else arr.dtype
  if dtype not in _INPUT_DTYPES:
    raise ValueError(f"quantize expects float32, bfloat16 or float16 input, got dtype {dtype} "
                     f"(shape {arr.shape})")
  if arr.ndim == 0:
    raise ValueError("quantize expects an array of rank >= 1, got a scalar")
  return arr


def _group_size(spec: FormatSpec, group_size: int | None, shape: tuple[int, ...],
                axis: int) -> int:
  g = spec.group_size if group_size is None else group_size
  if not isinstance(g, (int, np.integer)) or isinstance(g, bool) or g <= 0:
    raise ValueError(f"group_size must be a positive int, got {group_size!r}")
  length = shape[axis]
  if length % g:
    raise ValueError(f"axis {axis} of shape {shape} has length {length}, not divisible by "
                     f"group_size {g} ({spec.name})")
  if length % 2:
    raise ValueError(f"axis {axis} of shape {shape} has odd length {length}; codes are packed "
                     "two per byte")
  return int(g)


def _quantize_groups(xg: jax.Array, spec: FormatSpec, tensor_scale: jax.Array | None):
  """Quantizes float32 groups ``(..., n_groups, G)``; returns (codes, scales, tensor scale)."""
  amax = jnp.max(jnp.abs(xg), axis=-1)
  finite = jnp.all(jnp.isfinite(xg), axis=-1)
  zero = amax == 0
  one = jnp.float32(1.0)
  if spec.name == "nvfp4":
    s_t = nvfp4_tensor_scale(xg) if tensor_scale is None else tensor_scale
    ok = finite & jnp.isfinite(s_t)
    s_b = _nearest_e4m3(amax, jnp.float32(E2M1_MAX) * s_t)
    s_b = jnp.where(zero, one, s_b)
    codes = _nearest_e2m1(xg, (s_b * s_t)[..., None])
    scales = jnp.where(ok, s_b, jnp.float32(jnp.nan)).astype(jnp.float8_e4m3fn)
  elif spec.name == "mxfp4":
    s_t = one
    ok = finite
    biased = (jax.lax.bitcast_convert_type(amax, jnp.int32) >> 23) & 0xFF
    e = jnp.clip(biased - E8M0_BIAS - _E2M1_EMAX, -E8M0_BIAS, E8M0_BIAS)
    e = jnp.where(zero, 0, e)
    codes = _nearest_e2m1(xg * _pow2(-e)[..., None], one)
    scales = jnp.where(ok, e + E8M0_BIAS, E8M0_NAN).astype(jnp.uint8)
  else:
    s_t = one
    ok = finite
    s = jnp.maximum(amax * jnp.float32(1.0 / spec.elem_max), jnp.float32(INT_SCALE_FLOOR))
    s = jnp.where(zero, one, s)
    codes = (_nearest_int(xg, s[..., None], int(spec.elem_max)) & 15).astype(jnp.uint8)
    scales = jnp.where(ok, s, jnp.float32(jnp.nan))
  codes = jnp.where(ok[..., None], codes, jnp.uint8(0))
  return codes, scales, jnp.asarray(s_t, jnp.float32)


# Jitted cores: eager callers compile once per shape instead of once per primitive.
@functools.partial(jax.jit, static_argnames=("fmt", "axis", "group_size"))
def _quantize_core(x: jax.Array, tensor_scale: jax.Array | None, *, fmt: str, axis: int,
                   group_size: int):
  if tensor_scale is not None:
    tensor_scale = jnp.maximum(tensor_scale, jnp.float32(NVFP4_TENSOR_SCALE_FLOOR))
  xl = jnp.moveaxis(x.astype(jnp.float32), axis, -1)
  xg = xl.reshape(*xl.shape[:-1], xl.shape[-1] // group_size, group_size)
  codes, scales, s_t = _quantize_groups(xg, FORMATS[fmt], tensor_scale)
  codes = pack_nibbles(codes.reshape(xl.shape), axis=-1)
  return jnp.moveaxis(codes, -1, axis), jnp.moveaxis(scales, -1, axis), s_t


def quantize(x: ArrayLike, fmt: FormatName, *, axis: int = -1, group_size: int | None = None,
             tensor_scale: ArrayLike | None = None) -> QTensor:
  """Group-quantizes ``x`` along ``axis`` (see the module docstring for the exact arithmetic).

  Args:
    x: float32, bfloat16 or float16 array of rank >= 1.
    fmt: ``"nvfp4"``, ``"mxfp4"``, ``"int4"`` or ``"int3"`` (static under jit).
    axis: quantized (reduction) axis; its length must be even and divisible by the group size.
    group_size: elements per scale; None uses ``FORMATS[fmt].group_size``.
    tensor_scale: NVFP4 only: a static (calibrated) float32 tensor scale, e.g.
      ``nvfp4_tensor_scale(amax)``; values beyond ``6 * 448 * tensor_scale`` saturate.
      None computes it from ``x``.

  Returns:
    The ``QTensor``.

  Raises:
    ValueError: unknown format, bad dtype/axis/group size, a tensor scale for a format without
      one, or a non-positive concrete tensor scale.
    NonFiniteError: a concrete ``x`` or ``tensor_scale`` holding NaN/Inf.
  """
  spec = format_spec(fmt)
  x = _check_input(x)
  axis = _normalize_axis(axis, x.ndim)
  g = _group_size(spec, group_size, x.shape, axis)
  _check_finite(x, "quantize input")
  if tensor_scale is not None:
    if not spec.has_tensor_scale:
      raise ValueError(f"format {fmt!r} has no tensor scale; got tensor_scale={tensor_scale!r}")
    tensor_scale = jnp.asarray(tensor_scale).astype(jnp.float32)
    if tensor_scale.shape != ():
      raise ValueError(f"tensor_scale must be a scalar, got shape {tensor_scale.shape}")
    _check_finite(tensor_scale, "tensor_scale")
    if not isinstance(tensor_scale, jax.core.Tracer) and not float(tensor_scale) > 0:
      raise ValueError(f"tensor_scale must be positive, got {float(tensor_scale)}")
  codes, scales, s_t = _quantize_core(x, tensor_scale, fmt=spec.name, axis=axis,
                                      group_size=g)
  return QTensor(codes=codes, scales=scales, tensor_scale=s_t, fmt=spec.name, group_size=g,
                 axis=axis, shape=tuple(x.shape), dtype=x.dtype)


def _pow2(exponent: jax.Array) -> jax.Array:
  """Builds ``2**exponent`` in float32 from its bits, for exponents in [-126, 127]."""
  return jax.lax.bitcast_convert_type((exponent + E8M0_BIAS) << 23, jnp.float32)


def decode_scales(qt: QTensor) -> jax.Array:
  """Returns the block scales of ``qt`` as float32 (E8M0 bytes become ``2**(b - 127)``).

  The E8M0 byte 0 is ``2**-127``, a float32 subnormal that backends flushing subnormals read
  as 0; ``dequantize`` applies it in two exact steps instead.
  """
  if qt.fmt == "mxfp4":
    b = qt.scales.astype(jnp.int32)
    bits = jnp.where(b == 0, 1 << 22, b << 23)
    pow2 = jax.lax.bitcast_convert_type(bits, jnp.float32)
    return jnp.where(b == E8M0_NAN, jnp.float32(jnp.nan), pow2)
  return qt.scales.astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("fmt", "axis", "group_size", "dtype"))
def _dequantize_core(codes: jax.Array, scales: jax.Array, tensor_scale: jax.Array, *, fmt: str,
                     axis: int, group_size: int, dtype: jnp.dtype) -> jax.Array:
  codes = jnp.moveaxis(unpack_nibbles(codes, axis=axis), axis, -1)
  values = e2m1_decode(codes) if FORMATS[fmt].kind == "e2m1" else _int_decode(codes)
  values = values.reshape(*values.shape[:-1], values.shape[-1] // group_size, group_size)
  if fmt == "mxfp4":
    b = jnp.moveaxis(scales, axis, -1).astype(jnp.int32)
    out = values * _pow2(jnp.maximum(b, 1) - E8M0_BIAS)[..., None]
    out = out * jnp.where(b == 0, jnp.float32(0.5), jnp.float32(1.0))[..., None]
    out = jnp.where((b == E8M0_NAN)[..., None], jnp.float32(jnp.nan), out)
  else:
    s = jnp.moveaxis(scales, axis, -1).astype(jnp.float32)
    out = (values * s[..., None]) * tensor_scale
  out = out.reshape(*out.shape[:-2], out.shape[-2] * group_size)
  return jnp.moveaxis(out, -1, axis).astype(dtype)


def dequantize(qt: QTensor, dtype: DTypeLike = jnp.float32) -> jax.Array:
  """Reconstructs ``decode(code) * block_scale * tensor_scale`` in float32, cast to ``dtype``.

  Args:
    qt: a ``QTensor`` from ``quantize``.
    dtype: output dtype.

  Returns:
    Array of shape ``qt.shape``.
  """
  format_spec(qt.fmt)
  return _dequantize_core(qt.codes, qt.scales, qt.tensor_scale, fmt=qt.fmt, axis=qt.axis,
                          group_size=qt.group_size, dtype=jnp.dtype(dtype))

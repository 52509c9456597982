"""norm_quantize (Pallas Mosaic GPU) against the plain-jnp ``pqjax_kernels.norm.reference``.

Exactness: the kernel repeats every elementwise operation of the reference in float32, in the
same order, so its output equals the reference's bit for bit whenever the row statistics
(mean, variance) do. Those are sums in another order than XLA's, so the exact tests use data
whose sums are exact in any order: small integers (sums of squares are integers below 2**24)
with, for LayerNorm, rows made of +-v pairs (mean exactly 0). On general data the statistics
differ by a few float32 ulps: a bf16 output then differs by at most one bf16 ulp (rounding a
value that moved by less than a bf16 ulp), and an NVFP4 code or E4M3 scale only where its
value lies within that distance of a rounding boundary (rare: bounded by a small fraction).
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pqjax_kernels import norm
from pqjax_kernels import norm_kernel as nk
from tests import bounds, interpret

TS = 0.004  # static tensor scale: block scales then span the E4M3 range on these data


def _exact_x(rng, shape, kind, dtype):
  """Integer data whose row sums and sums of squares are exact (LayerNorm: zero mean)."""
  d = shape[-1]
  v = rng.integers(-8, 9, size=(*shape[:-1], d // 2))
  if kind == "layer":
    v = np.concatenate([v, -v], axis=-1)
    v = np.take_along_axis(v, rng.permuted(np.broadcast_to(np.arange(d), v.shape), axis=-1),
                           axis=-1)
  else:
    v = np.concatenate([v, rng.integers(-8, 9, size=v.shape)], axis=-1)
  return jnp.asarray(v, dtype)


def _vectors(rng, shape, per_sample):
  d = shape[-1]
  sv = (shape[0], d) if per_sample else (d,)
  f = lambda s, k: jnp.asarray(rng.standard_normal(s) * k, jnp.float32)  # noqa: E731
  return dict(weight=f(d, 1.0), bias=f(d, 0.5), shift=f(sv, 0.5),
              scale=jnp.asarray(rng.standard_normal(sv) * 0.2, jnp.bfloat16))


def _call(x, kind, out, vecs, perm=None, gpu=False, rows=None, dynamic=False, chunk=None,
          hadamard=False, round_to=None):
  """Kernel (under the interpreter, or on the GPU) and the jitted reference (XLA contracts
  multiply-adds into FMAs, as Mosaic GPU does; the interpreter compiles the kernel body with
  XLA likewise). ``kind="none"``: the plain quantize, against ``norm.gathered_quantize``."""
  ts = jnp.float32(TS) if out in norm.QUANTIZED and not dynamic else None
  kw = dict(kind=kind, out=out, tensor_scale=ts, rows=rows, chunk=chunk, hadamard=hadamard,
            round_to=round_to, **vecs)
  if gpu:
    got = jax.jit(nk.norm_quantize, static_argnames=("kind", "out", "rows", "chunk", "hadamard",
                                                     "round_to"))(x, perm, **kw)
  else:
    with interpret.gpu_interpreter():
      got = nk.norm_quantize(x, perm, interpret=True, **kw)
  if kind == "none":
    ref = jax.jit(norm.gathered_quantize, static_argnames=("hadamard", "out"))(
        x, perm, tensor_scale=ts, hadamard=hadamard, out=out)
  else:
    ref = jax.jit(norm.reference, static_argnames=("kind", "out", "hadamard", "round_to"))(
        x, perm, kind=kind, out=out, tensor_scale=ts, hadamard=hadamard, round_to=round_to,
        **vecs)
  return got, ref


def _assert_within_rounding(got, ref, out):
  """bf16: at most one ulp; NVFP4: codes and scales (decoded values) differ only near
  rounding boundaries."""
  if out == "nvfp4_f16":
    assert np.mean(_bits(got.values) != _bits(ref.values)) <= 1e-3
    assert float(got.tensor_scale) == pytest.approx(float(ref.tensor_scale), rel=2**-20)
  elif out == "bf16":
    ulps = np.abs(_bits(got).astype(np.int32) - _bits(ref).astype(np.int32))
    assert ulps.max() <= 1  # same signs here: a bit distance is an ulp distance
  else:
    assert np.mean(np.asarray(got.codes) != np.asarray(ref.codes)) <= 1e-3
    assert np.mean(_bits(got.scales) != _bits(ref.scales)) <= 1e-3


def _assert_nvfp4_equal(got, ref):
  """Codes, scale bytes and tensor scale of two ``NVFP4Activation`` (the values of two
  ``NVFP4Values``) equal bit for bit."""
  assert float(got.tensor_scale) == float(ref.tensor_scale)
  if isinstance(ref, norm.NVFP4Values):
    assert got.values.dtype == jnp.float16 and got.values.shape == ref.values.shape
    np.testing.assert_array_equal(_bits(got.values), _bits(ref.values))
    return
  np.testing.assert_array_equal(np.asarray(got.codes), np.asarray(ref.codes))
  np.testing.assert_array_equal(_bits(got.scales), _bits(ref.scales))


def _bits(a):
  return np.asarray(jax.lax.bitcast_convert_type(a, jnp.uint8 if a.dtype.itemsize == 1
                                                 else jnp.uint16))


CASES = [  # shape, x dtype, kind, vectors, per-sample adaLN, rows per CTA
    ((32, 128), jnp.bfloat16, "layer", True, False, 16),
    ((40, 192), jnp.float32, "rms", False, False, 16),  # ragged M: padded to 48 rows
    ((2, 16, 256), jnp.bfloat16, "layer", True, True, 4),
    ((16, 1152), jnp.float16, "rms", True, False, 8),
]


@pytest.mark.skipif(not interpret.AVAILABLE, reason="JAX GPU interpreter not available")
class TestInterpreter:

  @pytest.mark.parametrize("shape,dtype,kind,vecs,per_sample,rows", CASES)
  def test_nvfp4_bit_exact(self, shape, dtype, kind, vecs, per_sample, rows):
    rng = np.random.default_rng(sum(shape))
    x = _exact_x(rng, shape, kind, dtype)
    got, ref = _call(x, kind, "nvfp4", _vectors(rng, shape, per_sample) if vecs else {},
                     rows=rows)
    assert got.codes.shape == ref.codes.shape and got.codes.dtype == jnp.uint8
    assert got.scales.shape == ref.scales.shape and got.scales.dtype == jnp.float8_e4m3fn
    _assert_nvfp4_equal(got, ref)

  @pytest.mark.parametrize("shape,dtype,kind,vecs,per_sample,rows", CASES)
  def test_bf16_bit_exact(self, shape, dtype, kind, vecs, per_sample, rows):
    rng = np.random.default_rng(sum(shape) + 1)
    x = _exact_x(rng, shape, kind, dtype)
    got, ref = _call(x, kind, "bf16", _vectors(rng, shape, per_sample) if vecs else {},
                     rows=rows)
    assert got.shape == ref.shape and got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(_bits(got), _bits(ref))

  @pytest.mark.parametrize("out", ["nvfp4", "bf16"])
  def test_gathered_bit_exact(self, out):
    """The interpreter runs the gather in jnp (the GPU path is inline Mosaic GPU: lowered
    in test_lowers_for_cuda)."""
    shape = (2, 16, 192)
    rng = np.random.default_rng(9)
    x = _exact_x(rng, shape, "layer", jnp.bfloat16)
    perm = jnp.asarray(rng.permutation(shape[-1]), jnp.int32)
    got, ref = _call(x, "layer", out, _vectors(rng, shape, True), perm)
    if out == "bf16":
      np.testing.assert_array_equal(_bits(got), _bits(ref))
    else:
      _assert_nvfp4_equal(got, ref)

  @pytest.mark.parametrize("gathered", [False, True])
  @pytest.mark.parametrize("dynamic", [False, True])
  def test_plain_quantize_bit_exact(self, gathered, dynamic):
    """kind='none' has no sums (the dynamic amax is a max: exact in any order), so it equals
    ``norm.gathered_quantize`` bit for bit on any data."""
    shape = (2, 24, 192)  # 48 rows: ragged for rows=16
    rng = np.random.default_rng(11)
    x = jnp.asarray(rng.standard_normal(shape) * 3, jnp.bfloat16)
    perm = jnp.asarray(rng.permutation(shape[-1]), jnp.int32) if gathered else None
    got, ref = _call(x, "none", "nvfp4", {}, perm, rows=16, dynamic=dynamic)
    _assert_nvfp4_equal(got, ref)

  @pytest.mark.parametrize("kind,dynamic", [("none", False), ("none", True), ("layer", False),
                                            ("layer", True)])
  def test_hadamard_bit_exact(self, kind, dynamic):
    """The block Hadamard is the reference's butterfly, addition for addition: with the
    gather, both tensor scales, after a norm whose adaLN ends in an add (the shift), so that
    no multiply can be contracted into the butterfly's first addition."""
    shape = (2, 16, 256)
    rng = np.random.default_rng(13 + dynamic)
    if kind == "none":
      x = jnp.asarray(rng.standard_normal(shape) * 3, jnp.bfloat16)
      vecs = {}
    else:
      x = _exact_x(rng, shape, kind, jnp.bfloat16)
      vecs = _vectors(rng, shape, True)
    perm = jnp.asarray(rng.permutation(shape[-1]), jnp.int32)
    got, ref = _call(x, kind, "nvfp4", vecs, perm, rows=8, dynamic=dynamic, hadamard=True)
    unrotated = _call(x, kind, "nvfp4", vecs, perm, rows=8, dynamic=dynamic)[1]
    assert np.mean(np.asarray(ref.codes) != np.asarray(unrotated.codes)) > 0.5  # it rotates
    _assert_nvfp4_equal(got, ref)

  @pytest.mark.parametrize("chunk", [128, 256, 512])
  def test_wide_chunks_bit_exact(self, chunk):
    shape = (2, 16, 1024)
    rng = np.random.default_rng(chunk)
    x = _exact_x(rng, shape, "layer", jnp.bfloat16)
    perm = jnp.asarray(rng.permutation(shape[-1]), jnp.int32)
    got, ref = _call(x, "layer", "nvfp4", _vectors(rng, shape, True), perm, rows=4,
                     chunk=chunk)
    _assert_nvfp4_equal(got, ref)

  def test_dynamic_scale_bit_exact(self):
    """Dynamic tensor scale: the amax pass and the quantize pass, on exact-sum data."""
    shape = (2, 16, 256)
    rng = np.random.default_rng(12)
    x = _exact_x(rng, shape, "layer", jnp.bfloat16)
    got, ref = _call(x, "layer", "nvfp4", _vectors(rng, shape, True), rows=8, dynamic=True)
    _assert_nvfp4_equal(got, ref)

  # NVFP4 values written as float16 (out="nvfp4_f16"): after a norm (exact sums), the plain
  # quantize (dynamic, ragged rows), the Hadamard, float32 x; the norm rounded to bf16 first
  # (round_to: what quantizing its stored output gives), static and dynamic
  @pytest.mark.parametrize("kind,dtype,gathered,dynamic,hadamard,rows,round_to", [
      ("layer", jnp.bfloat16, True, False, False, 8, None),
      ("none", jnp.bfloat16, False, True, False, 16, None),
      ("none", jnp.bfloat16, True, False, True, 4, None),
      ("rms", jnp.float32, False, False, True, 8, None),
      ("layer", jnp.bfloat16, True, False, True, 4, jnp.bfloat16),
      ("layer", jnp.bfloat16, False, True, False, 8, jnp.bfloat16)])
  def test_values_bit_exact(self, kind, dtype, gathered, dynamic, hadamard, rows, round_to):
    shape = (2, 24, 256)
    rng = np.random.default_rng(21 + rows)
    if kind == "none":
      x = jnp.asarray(rng.standard_normal(shape) * 3, dtype)
    else:
      x = _exact_x(rng, shape, kind, dtype)
    perm = jnp.asarray(rng.permutation(shape[-1]), jnp.int32) if gathered else None
    vecs = {} if kind == "none" else _vectors(rng, shape, False)
    got, ref = _call(x, kind, "nvfp4_f16", vecs, perm, rows=rows, dynamic=dynamic,
                     hadamard=hadamard, round_to=round_to)
    assert got.values.shape == shape
    _assert_nvfp4_equal(got, ref)

  @pytest.mark.parametrize("kind", ["layer", "rms"])
  def test_random_data_within_rounding(self, kind):
    shape = (2, 32, 320)
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.standard_normal(shape) * 3 + 1, jnp.bfloat16)
    vecs = _vectors(rng, shape, True)
    for out in ("bf16", "nvfp4"):
      _assert_within_rounding(*_call(x, kind, out, vecs), out)


@pytest.mark.skipif(not interpret.has_gpu(), reason="needs a CUDA GPU")
class TestGPU:
  """The compiled kernel (inline Mosaic GPU gather included) at DiT widths on fresh random
  data: the GPU's rsqrt and summation order differ from XLA's, so within rounding."""

  @pytest.mark.parametrize("shape,kind,gathered", [
      ((2, 256, 3072), "layer", True), ((2, 256, 3072), "layer", False),
      ((4, 64, 1152), "rms", True), ((300, 1152), "layer", True)])
  @pytest.mark.parametrize("out", ["nvfp4", "bf16"])
  def test_random_data_within_rounding(self, shape, kind, gathered, out):
    rng = np.random.default_rng(sum(shape))
    x = jnp.asarray(rng.standard_normal(shape) * 3 + 1, jnp.bfloat16)
    perm = jnp.asarray(rng.permutation(shape[-1]), jnp.int32) if gathered else None
    vecs = _vectors(rng, shape, len(shape) == 3)
    got, ref = _call(x, kind, out, vecs, perm, gpu=True)
    if out == "nvfp4":
      _assert_within_rounding(got, ref, out)
      return
    err = np.abs(np.asarray(got, np.float64) - np.asarray(ref, np.float64))
    assert (err <= bounds.norm_bf16_tolerance(x, ref, kind=kind, perm=perm, **vecs)).all()

  @pytest.mark.parametrize("kind,gathered,rows", [
      ("none", True, 4), ("none", False, 16), ("layer", True, 4), ("rms", False, 16)])
  @pytest.mark.parametrize("dynamic", [False, True])
  def test_plain_dynamic_and_rows(self, kind, gathered, rows, dynamic):
    """Plain quantize, the two-launch dynamic scale and the other block heights on the GPU."""
    shape = (2, 512, 3072)
    rng = np.random.default_rng(rows + 7 * dynamic)
    x = jnp.asarray(rng.standard_normal(shape) * 3 + 1, jnp.bfloat16)
    perm = jnp.asarray(rng.permutation(shape[-1]), jnp.int32) if gathered else None
    vecs = {} if kind == "none" else _vectors(rng, shape, True)
    got, ref = _call(x, kind, "nvfp4", vecs, perm, gpu=True, rows=rows, dynamic=dynamic)
    np.testing.assert_allclose(float(got.tensor_scale), float(ref.tensor_scale), rtol=2**-20)
    _assert_within_rounding(got, ref, "nvfp4")

  @pytest.mark.parametrize("kind,dynamic", [("none", False), ("none", True), ("layer", False)])
  def test_hadamard(self, kind, dynamic):
    """The shuffle butterfly on the GPU: the plain quantize (no sums: bit for bit) and after
    a LayerNorm (within rounding: the statistics), gathered, at a DiT width."""
    shape = (2, 512, 3072)
    rng = np.random.default_rng(17 + dynamic)
    x = jnp.asarray(rng.standard_normal(shape) * 3 + 1, jnp.bfloat16)
    perm = jnp.asarray(rng.permutation(shape[-1]), jnp.int32)
    vecs = {} if kind == "none" else _vectors(rng, shape, True)
    got, ref = _call(x, kind, "nvfp4", vecs, perm, gpu=True, dynamic=dynamic, hadamard=True)
    if kind == "none":
      _assert_nvfp4_equal(got, ref)
    else:
      _assert_within_rounding(got, ref, "nvfp4")

  @pytest.mark.parametrize("kind,gathered,dynamic,hadamard,round_to", [
      ("none", True, False, True, None), ("none", False, True, False, None),
      ("none", False, False, False, None), ("layer", True, False, False, None),
      ("layer", False, True, True, None), ("layer", True, False, False, jnp.bfloat16)])
  def test_values(self, kind, gathered, dynamic, hadamard, round_to):
    """NVFP4 values written as float16 at a DiT width: the plain quantize bit for bit, after
    a LayerNorm within rounding (the statistics), also rounded to bf16 first."""
    shape = (2, 512, 3072)
    rng = np.random.default_rng(23 + dynamic)
    x = jnp.asarray(rng.standard_normal(shape) * 3 + 1, jnp.bfloat16)
    perm = jnp.asarray(rng.permutation(shape[-1]), jnp.int32) if gathered else None
    vecs = {} if kind == "none" else _vectors(rng, shape, True)
    got, ref = _call(x, kind, "nvfp4_f16", vecs, perm, gpu=True, dynamic=dynamic,
                     hadamard=hadamard, round_to=round_to)
    if kind == "none":
      _assert_nvfp4_equal(got, ref)
    else:
      _assert_within_rounding(got, ref, "nvfp4_f16")


LOWER_CASES = [  # shape, x dtype, kind, out, vectors, per-sample adaLN, gathered
    ((4096, 1152), jnp.bfloat16, "layer", "nvfp4", True, False, False),
    ((2, 1024, 3072), jnp.bfloat16, "layer", "nvfp4", True, True, False),
    ((2, 1024, 3072), jnp.bfloat16, "layer", "bf16", True, True, False),
    ((100, 3072), jnp.bfloat16, "rms", "nvfp4", False, False, False),
    ((64, 1152), jnp.float32, "rms", "bf16", True, False, False),
    ((64, 2304), jnp.float16, "layer", "nvfp4", True, False, False),
    ((4096, 1152), jnp.bfloat16, "layer", "nvfp4", True, False, True),
    ((2, 256, 2304), jnp.bfloat16, "rms", "bf16", True, True, True),
    ((4096, 1152), jnp.bfloat16, "none", "nvfp4", False, False, True),
    ((2, 1024, 3072), jnp.bfloat16, "layer", "nvfp4_f16", True, True, True),
    ((4096, 3072), jnp.bfloat16, "none", "nvfp4_f16", False, False, False),
]


@pytest.mark.parametrize("shape,dtype,kind,out,vecs,per_sample,gathered", LOWER_CASES)
def test_lowers_for_cuda(shape, dtype, kind, out, vecs, per_sample, gathered):
  """The real (non-interpreted) kernel, with its layout casts and inline Mosaic GPU gather
  (and shuffle Hadamard, for the gathered NVFP4 outputs), lowers to Mosaic GPU."""
  x = jax.ShapeDtypeStruct(shape, dtype)
  kw = _vectors(np.random.default_rng(0), shape, per_sample) if vecs else {}
  perm = jax.ShapeDtypeStruct(shape[-1:], jnp.int32) if gathered else None
  ts = jnp.float32(TS) if out in norm.QUANTIZED else None
  f = lambda x, p, kw: nk.norm_quantize(x, p, kind=kind, out=out, tensor_scale=ts,  # noqa: E731
                                        hadamard=out in norm.QUANTIZED and gathered, **kw)
  text = jax.jit(f).trace(x, perm, kw).lower(lowering_platforms=("cuda",)).as_text()
  assert "mosaic_gpu" in text


def test_round_to_lowers_for_cuda():
  """The norm rounded to bf16 before the quantize (``round_to``) lowers to Mosaic GPU."""
  x = jax.ShapeDtypeStruct((2, 1024, 3072), jnp.bfloat16)
  kw = _vectors(np.random.default_rng(0), x.shape, True)
  f = lambda x, p, kw: nk.norm_quantize(x, p, out="nvfp4_f16", round_to=jnp.bfloat16,  # noqa: E731
                                        tensor_scale=jnp.float32(TS), **kw)
  perm = jax.ShapeDtypeStruct((3072,), jnp.int32)
  assert "mosaic_gpu" in jax.jit(f).trace(x, perm, kw).lower(
      lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("kind,gathered,rows,chunk", [
    ("none", True, 4, 64), ("layer", False, 16, 128), ("rms", True, 8, 256),
    ("layer", True, 4, 512)])
def test_dynamic_scale_lowers_for_cuda(kind, gathered, rows, chunk):
  """Both launches of the dynamic path (group amax, then quantize) lower to Mosaic GPU, at
  each chunk width (the gather included)."""
  shape = (2, 512, 3072)
  x = jax.ShapeDtypeStruct(shape, jnp.bfloat16)
  perm = jax.ShapeDtypeStruct(shape[-1:], jnp.int32) if gathered else None
  f = lambda x, p: nk.norm_quantize(x, p, kind=kind, rows=rows, chunk=chunk)  # noqa: E731
  text = jax.jit(f).trace(x, perm).lower(lowering_platforms=("cuda",)).as_text()
  assert text.count("mosaic_gpu") >= 2


@pytest.mark.parametrize("kwargs,match", [
    (dict(x=jnp.zeros((16, 128), jnp.int32)), "x must be"),
    (dict(x=jnp.zeros((16, 96), jnp.bfloat16)), "multiple of 64"),
    (dict(kind="batch"), "kind"),
    (dict(out="fp8"), "out"),
    (dict(rows=12), "rows"),
    (dict(chunk=96), "chunk"),
    (dict(x=jnp.zeros((16, 512), jnp.bfloat16), rows=8, chunk=512), "rows <= 4"),
    (dict(x=jnp.zeros((16, 192), jnp.bfloat16), chunk=128), "multiple of 128"),
    (dict(kind="none", weight=jnp.ones(128)), "kind='none'"),
    (dict(kind="none", out="bf16"), "kind='none'"),
    (dict(out="bf16", hadamard=True), "hadamard"),
    (dict(weight=jnp.ones((64,))), "weight"),
    (dict(x=jnp.zeros((2, 4, 128), jnp.bfloat16), shift=jnp.zeros((2, 128))), "shift"),
    (dict(x=jnp.zeros((2, 16, 128), jnp.bfloat16), scale=jnp.zeros((16, 128))), "scale"),
    (dict(x=jnp.zeros((16, 16384), jnp.float32)), "shared memory"),
    (dict(x=jnp.zeros((16, 3072), jnp.bfloat16), out="bf16", weight=jnp.ones(3072),
          bias=jnp.ones(3072), perm=jnp.arange(3072, dtype=jnp.int32), rows=16),
     "shared memory"),
    (dict(round_to=jnp.float32), "round_to"),
    (dict(perm=jnp.arange(64, dtype=jnp.int32)), "perm"),
    (dict(perm=jnp.arange(128, dtype=jnp.float32)), "perm"),
])
def test_bad_input_raises(kwargs, match):
  args = dict(x=jnp.zeros((16, 128), jnp.bfloat16), kind="layer", out="nvfp4",
              tensor_scale=jnp.float32(1.0))
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    nk.norm_quantize(args.pop("x"), **args)


def test_gather_wavefronts_counts_bank_conflicts():
  """One load instruction per slab and element: in order, 32 distinct words in 32 banks (1
  wavefront); words 32 apart share a bank; two columns of one word are one wavefront."""
  d = 256
  assert (nk.gather_wavefronts(np.arange(d)) == 1).all()
  clash = np.arange(d)
  clash[[2, 64]] = clash[[64, 2]]  # slab 0, element 0 reads words 0 and 32: both bank 0
  w = nk.gather_wavefronts(clash)
  assert w[0, 0] == 2 and w[1, 0] == 2 and w.sum() == w.size + 2
  same_word = np.arange(d)
  same_word[[1, 2]] = same_word[[2, 1]]  # element 0 reads columns 0 and 1: word 0 twice
  assert (nk.gather_wavefronts(same_word) == 1).all()


@pytest.mark.parametrize("d", [1152, 3072])
def test_bank_friendly_perm_keeps_groups_and_cuts_conflicts(d):
  """The reordered permutation holds the same 16-groups (as sets: the same NVFP4 codes and
  scales per group) and needs far fewer wavefronts per load than a random one."""
  perm = np.random.default_rng(d).permutation(d).astype(np.int32)
  got = nk.bank_friendly_perm(perm)
  assert got.dtype == np.int32 and np.array_equal(np.sort(got), np.arange(d))
  as_sets = lambda p: sorted(map(tuple, np.sort(p.reshape(-1, 16), axis=1)))  # noqa: E731
  assert as_sets(got) == as_sets(perm)
  assert nk.gather_wavefronts(perm).mean() > 3.0
  assert nk.gather_wavefronts(got).mean() <= 2.1
  np.testing.assert_array_equal(got, nk.bank_friendly_perm(perm))  # deterministic
  with pytest.raises(ValueError, match="multiple of 64"):
    nk.bank_friendly_perm(np.arange(80))


# ----------------------------------------------------------------------------- parts


def _parts_case(rng, lead, widths, dtype=jnp.bfloat16):
  parts = [jnp.asarray(rng.standard_normal((*lead, w)) * 3, dtype) for w in widths]
  return parts, jnp.concatenate(parts, axis=-1)


@pytest.mark.skipif(not interpret.AVAILABLE, reason="JAX GPU interpreter not available")
@pytest.mark.parametrize("lead,widths,rows", [
    ((5,), (128, 256), 4),  # 15 sub-rows of 128: the last block copies its last one twice
    ((2, 3), (192, 64, 128), None),  # three parts, 3-D
    ((4,), (384,), 8)])  # one part (sub-rows of 384)
@pytest.mark.parametrize("out,dynamic,hadamard", [
    ("nvfp4", False, False), ("nvfp4_f16", True, False), ("nvfp4_f16", False, True)])
def test_parts_equal_the_concatenation(lead, widths, rows, out, dynamic, hadamard):
  """The plain quantize of parts (``x`` a tuple: each CTA copies its rows from the part
  holding them) equals ``gathered_quantize`` of their concatenation bit for bit (the same
  elementwise arithmetic; a dynamic tensor scale is a maximum, exact in any order)."""
  rng = np.random.default_rng(len(widths) + 3 * dynamic)
  parts, cat = _parts_case(rng, lead, widths)
  ts = None if dynamic else jnp.float32(TS)
  with interpret.gpu_interpreter():
    got = nk.norm_quantize(tuple(parts), kind="none", out=out, tensor_scale=ts, rows=rows,
                           hadamard=hadamard, interpret=True)
  ref = norm.gathered_quantize(cat, None, out=out, tensor_scale=ts, hadamard=hadamard)
  _assert_nvfp4_equal(got, ref)
  assert nk.accepts(parts, kind="none", out=out)


@pytest.mark.parametrize("widths", [(3072, 12288), (1152, 4608)])
def test_parts_lower_for_cuda(widths):
  """The parts' per-row conditional copies lower to one Mosaic GPU kernel, with no
  concatenation in the program."""
  parts = tuple(jax.ShapeDtypeStruct((1000, w), jnp.bfloat16) for w in widths)
  f = lambda ps: nk.norm_quantize(ps, kind="none", out="nvfp4_f16",  # noqa: E731
                                  tensor_scale=jnp.float32(TS))
  text = jax.jit(f).trace(parts).lower(lowering_platforms=("cuda",)).as_text()
  assert text.count("mosaic_gpu") >= 1
  assert not re.search(rf"concatenate[^\n]*1000x{sum(widths)}", text)


@pytest.mark.parametrize("parts,kwargs,match", [
    ((jnp.zeros((8, 128), jnp.bfloat16),), dict(kind="layer"), "kind='none'"),
    ((jnp.zeros((8, 128), jnp.bfloat16),), dict(perm=jnp.arange(128, dtype=jnp.int32)),
     "perm=None"),
    ((), {}, "non-empty"),
    ((jnp.zeros((8, 128), jnp.bfloat16), jnp.zeros((4, 128), jnp.bfloat16)), {},
     r"\(8, 128\), \(4, 128\)"),
    ((jnp.zeros((8, 128), jnp.bfloat16), jnp.zeros((8, 128), jnp.float32)), {}, "float32"),
    ((jnp.zeros((8, 128), jnp.bfloat16), jnp.zeros((8, 96), jnp.bfloat16)), {}, r"\[128, 96\]"),
])
def test_parts_bad_input_raises(parts, kwargs, match):
  args = {**dict(kind="none", out="nvfp4", tensor_scale=jnp.float32(1.0)), **kwargs}
  with pytest.raises(ValueError, match=match):
    nk.norm_quantize(parts, **args)
  assert not nk.accepts(parts, **{k: v for k, v in args.items() if k != "tensor_scale"})


@pytest.mark.skipif(not interpret.has_gpu(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("lead,widths", [((1000,), (3072, 12288)), ((2, 2304), (3072, 12288)),
                                         ((333,), (1152, 4608))])
def test_parts_gpu(lead, widths):
  """The parts at FLUX's single-block widths (attention + MLP into ``proj_out``) on the GPU,
  ragged row counts, output memory poisoned first: bit for bit the quantize of the
  concatenation (elementwise arithmetic in the same order)."""
  rng = np.random.default_rng(sum(lead))
  parts, cat = _parts_case(rng, lead, widths)
  jax.block_until_ready(jnp.full(cat.shape, jnp.nan, jnp.float16))  # poison freed memory
  f = jax.jit(lambda ps: nk.norm_quantize(ps, kind="none", out="nvfp4_f16",
                                          tensor_scale=jnp.float32(TS)))
  got = f(tuple(parts))
  ref = jax.jit(lambda x: norm.gathered_quantize(x, None, out="nvfp4_f16",
                                                 tensor_scale=jnp.float32(TS)))(cat)
  _assert_nvfp4_equal(got, ref)

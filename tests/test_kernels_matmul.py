"""fp4_matmul (Pallas Mosaic GPU) against its plain-jnp reference and pqjax's oracle.

Tolerance: every product of a decoded weight (E2M1 x E4M3, or E2M1 x 2**e) and a bf16
activation is exact in float32, so kernel and reference differ only in the float32
summation order: |err| <= (K + 2) * 2**-24 * sum_k |a_k w_k| per output (a standard
recursive-summation bound, K terms plus the tensor-scale multiply and the split-K add).
For int4 the kernel rounds the float32 scales to bf16 (relative 2**-9 per weight), adding
2**-9 * sum_k |a_k w_k|. The XLA method folds the tensor scales into the activations, one
bf16 rounding each (relative <= 2**-8), adding 2**-8 * sum_k |a_k w_k|.
"""

import contextlib
import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from pqjax import formats, qmatmul
from pqjax_kernels import matmul_fp4 as fm
from pqjax_kernels import norm as gn
from tests import interpret


def _bound(a, w_codes, w_scales, ts, fmt, extra=0.0):
  x = jnp.abs(a.astype(jnp.float32))
  wa = jnp.abs(fm.dequantize(w_codes, w_scales, ts, fmt))
  mag = np.asarray(x @ wa.T)
  k = a.shape[-1]
  return mag * ((k + 2) * 2.0**-24 + extra) + 1e-30


def _assert_within_bound(out, ref, a, qt, fmt, extra=0.0):
  """``out`` finite and within ``_bound`` of ``ref`` for activations ``a`` (values) and the
  quantized weights ``qt``."""
  out = np.asarray(out)
  assert np.isfinite(out).all()
  err = np.abs(out - np.asarray(ref))
  assert (err <= _bound(a, qt.codes, qt.scales, qt.tensor_scale, fmt, extra)).all()


def _stream_reference(qa, qt, kw, gelu: bool, bf16: bool, extra: float = 0.0):
  """The float32 reference of a streaming-kernel W4A4 call (bias in ``kw``) and the bound on
  the kernel's distance from it: the summation bound (plus ``extra`` relative rounding of the
  operands, as ``_bound``), the kernel's own multiply-add of scale and bias (one float32
  rounding), through the GELU (1.13-Lipschitz; its tanh a few float32 ulps from XLA's), then
  one rounding to bf16 (half an ulp: 2**-8 relative)."""
  lin = np.asarray(fm.reference(qa.codes, qt.codes, qt.scales, qt.tensor_scale,
                                out_dtype=jnp.float32, **kw))
  ad = fm.dequantize(qa.codes, qa.scales, qa.tensor_scale, "nvfp4")
  bound = (_bound(ad, qt.codes, qt.scales, qt.tensor_scale, "nvfp4", extra)
           + 2.0**-24 * np.abs(lin))
  ref = lin
  if gelu:
    ref = np.asarray(jax.nn.gelu(jnp.asarray(lin), approximate=True))
    bound = 1.13 * bound + 2.0**-20 * np.abs(lin)
  if bf16:
    bound = bound + 2.0**-8 * (np.abs(ref) + bound)
  return ref, bound


def _case(seed, m, n, k, fmt):
  rng = np.random.default_rng(seed)
  w = rng.standard_normal((n, k)).astype(np.float32) * 0.1
  qt = formats.quantize(w, "int4" if fmt == "int4" else fmt, group_size=64 if fmt == "int4" else None)
  a = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
  return a, qt


class KernelCases:
  """The kernel checks; subclasses choose the method and where they run (GPU, CPU
  interpreter, or plain CPU for the XLA method)."""

  interpret = False
  method = "kernel"
  m_major = False
  extra = 0.0  # relative rounding of the operands beyond the exact products

  def run(self, fn):
    return fn()

  def config(self, splits=1, tiles=1, k_tiles=1, wgs=1, ovl=False):
    if self.method == "xla":
      return None
    return fm.MatmulConfig(tile_m=16, k_splits=splits, tiles_per_cta=tiles, k_tiles=k_tiles,
                           warpgroups=wgs, m_major=self.m_major, overlap_wgmma=ovl)

  # N = 128 is two weight tiles: tiles=2 streams both through one CTA (wgs=2: one per
  # warpgroup); k_tiles=2 copies two K tiles per pipeline step; ovl: overlap_wgmma, with
  # more pipeline steps than slots, so that slots are refilled (K = 384: an odd number of
  # steps per weight tile, past the K loop unrolled by two).
  @pytest.mark.parametrize("fmt,m,k,splits,tiles,k_tiles,wgs,ovl", [
      ("nvfp4", 5, 512, 2, 1, 2, 1, False), ("mxfp4", 20, 256, 1, 2, 1, 1, False),
      ("int4", 3, 256, 1, 1, 2, 1, False), ("nvfp4", 17, 512, 1, 2, 2, 2, False),
      ("nvfp4", 9, 512, 1, 2, 1, 1, True), ("nvfp4", 9, 384, 1, 2, 1, 1, True)])
  def test_w4a16_matches_reference(self, fmt, m, k, splits, tiles, k_tiles, wgs, ovl):
    a, qt = _case(m, m, 128, k, fmt)
    cfg = self.config(splits, tiles, k_tiles, wgs, ovl)
    out = self.run(lambda: fm.fp4_matmul(a, qt.codes, qt.scales, qt.tensor_scale, fmt=fmt,
                                         out_dtype=jnp.float32, config=cfg,
                                         method=self.method, interpret=self.interpret))
    ref = fm.reference(a, qt.codes, qt.scales, qt.tensor_scale, fmt=fmt, out_dtype=jnp.float32)
    _assert_within_bound(out, ref, a, qt, fmt, (2.0**-9 if fmt == "int4" else 0.0) + self.extra)

  @pytest.mark.parametrize("m,k,splits,tiles,k_tiles,wgs,ovl", [
      (9, 256, 1, 2, 1, 1, False), (42, 512, 1, 2, 2, 1, False), (21, 512, 2, 2, 1, 2, False),
      (21, 1024, 1, 2, 2, 1, True), (12, 1024, 1, 2, 1, 2, True)])
  def test_w4a4_nvfp4_epilogue(self, m, k, splits, tiles, k_tiles, wgs, ovl):
    n = 128
    a, qt = _case(7, m, n, k, "nvfp4")
    qa = gn.quantize_nvfp4(a)
    rng = np.random.default_rng(1)
    bias = jnp.asarray(rng.standard_normal(n), jnp.float32)
    gate = jnp.asarray(rng.standard_normal((3, n)), jnp.float32)
    res = jnp.asarray(rng.standard_normal((m, n)), jnp.float32)
    kw = dict(a_scales=qa.scales, a_tensor_scale=qa.tensor_scale, bias=bias,
              epilogue="gelu_tanh", gate=gate, residual=res, out_dtype=jnp.float32)
    out = self.run(lambda: fm.fp4_matmul(qa.codes, qt.codes, qt.scales, qt.tensor_scale,
                                         config=self.config(splits, tiles, k_tiles, wgs, ovl),
                                         method=self.method, **kw,
                                         interpret=self.interpret))
    ref = fm.reference(qa.codes, qt.codes, qt.scales, qt.tensor_scale, **kw)
    # gelu and the gate are 1-Lipschitz up to max|gate|; the matmul bound carries through.
    ad = fm.dequantize(qa.codes, qa.scales, qa.tensor_scale, "nvfp4")
    bound = _bound(ad, qt.codes, qt.scales, qt.tensor_scale, "nvfp4", self.extra) * float(
        jnp.abs(gate).max()) * 1.13 + 1e-6
    assert (np.abs(np.asarray(out) - np.asarray(ref)) <= bound).all()

  # The streaming kernel with bf16 activations (W4A16) and each weight format; "auto" does not
  # pick it for W4A16 (not yet measured), but it is the same kernel as for W4A4 NVFP4.
  @pytest.mark.parametrize("fmt,out", [("nvfp4", "bf16"), ("mxfp4", "f32"), ("int4", "bf16")])
  def test_stream_w4a16(self, fmt, out):
    if self.method == "xla":
      pytest.skip("a kernel tiling")
    m, n, k = 20, 256, 640
    a, qt = _case(19, m, n, k, fmt)
    bias = jnp.asarray(np.random.default_rng(3).standard_normal(n), jnp.float32)
    out_dtype = jnp.bfloat16 if out == "bf16" else jnp.float32
    cfg = fm.MatmulConfig(tile_m=32, tiles_per_cta=2, warpgroups=2, max_concurrent_steps=3,
                          m_major=True, stream=True)
    got = self.run(lambda: fm.fp4_matmul(
        a, qt.codes, qt.scales, qt.tensor_scale, fmt=fmt, bias=bias, config=cfg,
        method=self.method, out_dtype=out_dtype, interpret=self.interpret))
    ref = np.asarray(fm.reference(a, qt.codes, qt.scales, qt.tensor_scale, fmt=fmt, bias=bias,
                                 out_dtype=jnp.float32))
    # the summation bound (INT4: its float32 scales rounded to bf16 in the decode, 2**-9),
    # the scale and bias multiply-add (one float32 rounding), a bf16 output's half ulp
    bound = _bound(a, qt.codes, qt.scales, qt.tensor_scale, fmt,
                   2.0**-9 if fmt == "int4" else 0.0) + 2.0**-24 * np.abs(ref)
    if out == "bf16":
      bound = bound + 2.0**-8 * (np.abs(ref) + bound)
    assert got.dtype == out_dtype and got.shape == (m, n)
    assert (np.abs(np.asarray(got, np.float32) - ref) <= bound).all()

  # The streaming kernel: N = 256 is four weight tiles; (wgs, tiles) = (2, 4): two output
  # tiles per warpgroup in turn; K = 640 / k_tiles = 2: an odd step count, with depth 2 and
  # 3 the slots are refilled. bf16 out is written finished by the kernel (scale, bias, GELU).
  # wt = 2: two weight tiles (accumulators) per warpgroup and step; (1, 4, wt 2): two rounds.
  # alias: the output tiles in the pipeline's memory (one round per CTA). splits: CTAs per
  # output tile along K (float32 partials summed by XLA, so bf16 is not written finished):
  # K = 1024 in two splits of four steps (slots refilled), K = 768 in three of two. ni: the
  # CTAs sweep N for each block of rows (two of each here). ac: the producer decodes the
  # activation codes (tile_m 64): with the output tiles in the decoded tiles' memory, an odd
  # step count past both decoded tiles and refilled ring slots; split K, float32; two rounds
  # of two tiles per consumer. One consumer only: the interpreter runs each warpgroup's
  # barrier waits in host callbacks on a pool of as many threads as CPUs, and a producer
  # busy decoding while two consumers wait for it deadlocks that pool on a 2-CPU machine
  # (the GPU tests check two consumers).
  @pytest.mark.parametrize("m,k,wgs,tiles,k_tiles,depth,ovl,out,gelu,wt,alias,splits,ni,ac", [
      (70, 640, 1, 1, 1, 3, True, "bf16", True, 1, True, 1, False, True),
      (37, 1024, 1, 2, 1, 2, False, "f32", False, 1, False, 2, True, True),
      (20, 384, 1, 4, 1, 2, True, "bf16", False, 2, False, 1, False, True),
      (20, 512, 2, 2, 1, 2, True, "bf16", False, 1, False, 1, True, False),
      (20, 640, 1, 2, 1, 3, True, "f32", True, 1, False, 1, False, False),
      (37, 512, 2, 4, 2, 2, False, "bf16", True, 1, False, 1, False, False),
      (9, 640, 2, 2, 1, 3, True, "f32", False, 1, False, 1, False, False),
      (70, 384, 2, 2, 1, 2, True, "bf16", False, 1, False, 1, False, False),
      (20, 640, 2, 4, 1, 3, True, "bf16", True, 2, False, 1, False, False),
      (37, 512, 1, 4, 2, 2, True, "f32", False, 2, False, 1, False, False),
      (20, 640, 2, 2, 1, 3, True, "bf16", True, 1, True, 1, False, False),
      (37, 512, 2, 4, 1, 2, False, "f32", False, 2, True, 1, False, False),
      (20, 1024, 2, 2, 1, 3, True, "bf16", True, 1, True, 2, True, False),
      (37, 768, 1, 2, 1, 2, False, "f32", False, 1, False, 3, False, False)])
  def test_stream_w4a4_bias(self, m, k, wgs, tiles, k_tiles, depth, ovl, out, gelu, wt, alias,
                            splits, ni, ac):
    cfg = fm.MatmulConfig(tile_m=64 if ac else 32 if m > 40 else 16, tiles_per_cta=tiles,
                          warpgroups=wgs, k_tiles=k_tiles, max_concurrent_steps=depth,
                          overlap_wgmma=ovl, m_major=True, stream=True, wg_tiles=wt,
                          alias_out=alias, k_splits=splits, n_inner=ni, act_codes=ac)
    self._check_stream(13, 2, m, k, cfg, jnp.bfloat16 if out == "bf16" else jnp.float32, gelu)

  # The bias in its own dtype (widened in the kernel) or none: the finished output's epilogue
  # without XLA before the kernel.
  @pytest.mark.parametrize("bias_dtype", [None, jnp.bfloat16])
  def test_stream_bias_dtype(self, bias_dtype):
    cfg = fm.MatmulConfig(tile_m=32, tiles_per_cta=2, max_concurrent_steps=2, m_major=True,
                          stream=True)
    self._check_stream(19, 4, 40, 384, cfg, jnp.bfloat16, True, bias_dtype)

  # decode_ctas: extra CTAs decode the activation codes into a float16 workspace while the
  # others multiply (tile_m 64), past each split's first `depth` K steps (XLA's). Ragged M
  # over two row blocks with bf16 written finished; split K with float32 partials, two
  # rounds of output tiles, six decoding warpgroups for three pieces of one K step per
  # split; the splits summed in order (fixup_splits, bf16, GELU) behind one decoding CTA.
  # One consumer only, as for act_codes above.
  @pytest.mark.parametrize("m,k,tiles,depth,alias,splits,ni,fx,dec", [
      (70, 640, 1, 3, True, 1, False, False, 2),
      (130, 768, 2, 2, False, 2, True, False, 3),
      (200, 1024, 1, 2, False, 2, False, True, 1)])
  def test_stream_decode_ctas(self, m, k, tiles, depth, alias, splits, ni, fx, dec):
    cfg = fm.MatmulConfig(tile_m=64, tiles_per_cta=tiles, max_concurrent_steps=depth,
                          m_major=True, stream=True, alias_out=alias, k_splits=splits,
                          n_inner=ni, fixup_splits=fx, decode_ctas=dec)
    self._check_stream(17, 3, m, k, cfg, jnp.float32 if splits > 1 and not fx else
                       jnp.bfloat16, fx)

  def _check_stream(self, seed, bias_seed, m, k, cfg, out_dtype, gelu,
                    bias_dtype=jnp.float32):
    """One W4A4 NVFP4 streaming-kernel call, N = 256 with a ``bias_dtype`` bias (None: no
    bias), within ``_stream_reference``'s bound (a 2-byte output's rounding included)."""
    if self.method == "xla":
      pytest.skip("a kernel tiling")
    n = 256
    a, qt = _case(seed, m, n, k, "nvfp4")
    qa = gn.quantize_nvfp4(a)
    bias = None if bias_dtype is None else jnp.asarray(
        np.random.default_rng(bias_seed).standard_normal(n), bias_dtype)
    kw = dict(a_scales=qa.scales, a_tensor_scale=qa.tensor_scale, bias=bias)
    got = self.run(lambda: fm.fp4_matmul(
        qa.codes, qt.codes, qt.scales, qt.tensor_scale, config=cfg, method=self.method,
        out_dtype=out_dtype, epilogue="gelu_tanh" if gelu else None,
        interpret=self.interpret, **kw))
    ref, bound = _stream_reference(qa, qt, kw, gelu, jnp.dtype(out_dtype).itemsize == 2)
    assert got.dtype == out_dtype and got.shape == (m, n)
    assert (np.abs(np.asarray(got, np.float32) - ref) <= bound).all()

  # W4A4 activations given as their float16 values with the tensor scale apart
  # (norm.NVFP4Values, what norm_quantize(out="nvfp4_f16") writes): the product of the packed
  # codes, which fp4_matmul decodes to those very values (the small-M kernel, the streaming
  # kernel, the XLA path), bit for bit; and the reference scales float a by a_tensor_scale.
  @pytest.mark.parametrize("m,stream", [(20, False), (70, True)])
  def test_w4a4_values_equal_codes(self, m, stream):
    n, k = 256, 512
    a, qt = _case(23 + m, m, n, k, "nvfp4")
    qa = gn.quantize_nvfp4(a, 0.01)
    vals = gn.nvfp4_values(qa)
    cfg = None
    if self.method != "xla":
      cfg = (fm.stream_config(m, n, k, warpgroups=1) if stream else
             dataclasses.replace(fm.default_config(m, n, k), m_major=self.m_major))
    bias = jnp.asarray(np.random.default_rng(m).standard_normal(n), jnp.float32)
    call = lambda x, **kw: self.run(lambda: fm.fp4_matmul(  # noqa: E731
        x, qt.codes, qt.scales, qt.tensor_scale, bias=bias, config=cfg, method=self.method,
        interpret=self.interpret, **kw))
    got = call(vals.values, a_tensor_scale=vals.tensor_scale)
    want = call(qa.codes, a_scales=qa.scales, a_tensor_scale=qa.tensor_scale)
    assert got.dtype == want.dtype == jnp.bfloat16
    if self.method == "xla":  # the scales folded into the values in another order
      np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                                 rtol=2**-7, atol=1e-3)
    else:
      np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    ref_vals = fm.reference(vals.values, qt.codes, qt.scales, qt.tensor_scale,
                            a_tensor_scale=vals.tensor_scale, bias=bias, out_dtype=jnp.float32)
    ref_codes = fm.reference(qa.codes, qt.codes, qt.scales, qt.tensor_scale,
                             a_scales=qa.scales, a_tensor_scale=qa.tensor_scale, bias=bias,
                             out_dtype=jnp.float32)
    np.testing.assert_allclose(np.asarray(ref_vals), np.asarray(ref_codes), rtol=1e-6,
                               atol=1e-5)

  # fixup_splits: the splits of an output tile sum in order through a float32 workspace and
  # the last finishes it (bf16/f16, GELU). K = 1024 in two splits of four steps (slots
  # refilled), two consumers; K = 1536 in three (a middle split that adds and stores again),
  # float16 out; K = 1024 in four, tile_m 128 (two column chunks), two weight tiles per
  # consumer. Ragged M: the rows past M are computed and dropped.
  @pytest.mark.parametrize("m,k,wgs,wt,tm,splits,out,gelu", [
      (70, 1024, 2, 1, 64, 2, jnp.bfloat16, True),
      (37, 1536, 1, 1, 64, 3, jnp.float16, False),
      (130, 1024, 1, 2, 128, 4, jnp.bfloat16, True)])
  def test_stream_fixup_splits(self, m, k, wgs, wt, tm, splits, out, gelu):
    cfg = fm.MatmulConfig(tile_m=tm, tiles_per_cta=wgs * wt, warpgroups=wgs, wg_tiles=wt,
                          max_concurrent_steps=2, m_major=True, stream=True, alias_out=True,
                          k_splits=splits, fixup_splits=True)
    self._check_stream(19, 3, m, k, cfg, out, gelu)


@pytest.mark.skipif(not interpret.has_gpu(), reason="needs a CUDA GPU")
class TestKernelsGPU(KernelCases):
  pass


@pytest.mark.skipif(not interpret.has_gpu(), reason="needs a CUDA GPU")
class TestKernelsMMajorGPU(KernelCases):
  """Activations kept (M, K), B read transposed by the wgmma (GPU only)."""

  m_major = True


@pytest.mark.skipif(not interpret.has_gpu(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("ovl", [False, True])
@pytest.mark.parametrize("m,k,n,k_tiles", [(16, 3072, 12288, 1), (64, 12288, 3072, 1),
                                           (16, 3072, 12288, 2), (64, 3072, 12288, 1)])
def test_w4a4_dit_shapes_gpu(m, k, n, k_tiles, ovl):
  """``default_config``'s tiling at DiT shapes, where every CTA runs many pipeline steps
  concurrently with the others (the small cases above run a handful): a register race, such
  as a decode overwriting the A operand of a wgmma still in flight, shows here. Output
  memory is poisoned first; bound as in the module docstring."""
  cfg = dataclasses.replace(fm.default_config(m, n, k, k_tiles=k_tiles), overlap_wgmma=ovl)
  _check_small_m(11 + m + k_tiles, m, k, n, cfg, (m, n))


def _check_small_m(seed, m, k, n, cfg, poison_shape=None, interpret_=False):
  """One small-M kernel W4A4 NVFP4 call with ``cfg`` (None: ``fp4_matmul``'s own), within
  the module docstring's bound: on the GPU after a float32 NaN array of ``poison_shape`` was
  freed, or under the GPU interpreter."""
  a, qt = _case(seed, m, n, k, "nvfp4")
  qa = gn.quantize_nvfp4(a)
  kw = dict(a_scales=qa.scales, a_tensor_scale=qa.tensor_scale, out_dtype=jnp.float32)
  if poison_shape is not None:
    jax.block_until_ready(jnp.full(poison_shape, jnp.nan, jnp.float32))  # poison freed memory
  with interpret.gpu_interpreter() if interpret_ else contextlib.nullcontext():
    out = fm.fp4_matmul(qa.codes, qt.codes, qt.scales, qt.tensor_scale, config=cfg,
                        method="kernel", interpret=interpret_, **kw)
  ref = fm.reference(qa.codes, qt.codes, qt.scales, qt.tensor_scale, **kw)
  _assert_within_bound(out, ref, fm.dequantize(qa.codes, qa.scales, qa.tensor_scale, "nvfp4"),
                       qt, "nvfp4")


def _check_stream_gpu(seed, m, k, n, cfg, poison, gelu=True, out_dtype=jnp.bfloat16):
  """One streaming-kernel W4A4 NVFP4 call at a DiT shape with a bias (and tanh-GELU), run
  after a NaN array like ``poison`` (a ``jax.ShapeDtypeStruct``: the buffer the kernel will
  write) was freed, so stale memory cannot pass; checked within ``_stream_reference``'s
  bound."""
  a, qt = _case(seed, m, n, k, "nvfp4")
  qa = gn.quantize_nvfp4(a)
  bias = jnp.asarray(np.random.default_rng(m).standard_normal(n), jnp.float32)
  kw = dict(a_scales=qa.scales, a_tensor_scale=qa.tensor_scale, bias=bias)
  jax.block_until_ready(jnp.full(poison.shape, jnp.nan, poison.dtype))  # poison freed memory
  got = fm.fp4_matmul(qa.codes, qt.codes, qt.scales, qt.tensor_scale, config=cfg,
                      method="kernel", epilogue="gelu_tanh" if gelu else None,
                      out_dtype=out_dtype, **kw)
  ref, bound = _stream_reference(qa, qt, kw, gelu, jnp.dtype(out_dtype).itemsize == 2)
  got = np.asarray(got, np.float32)
  assert np.isfinite(got).all() and (np.abs(got - ref) <= bound).all()


@pytest.mark.skipif(not interpret.has_gpu(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("ovl", [False, True])
@pytest.mark.parametrize("m,k,n,gelu", [(256, 3072, 12288, True), (1024, 12288, 3072, False),
                                        (200, 3072, 3072, False), (64, 3072, 12288, False)])
def test_stream_dit_shapes_gpu(m, k, n, gelu, ovl):
  """The streaming kernel (``stream_config``) at DiT shapes, bf16 written by the kernel (scale,
  bias, GELU), output memory poisoned first; bound: ``_stream_reference``."""
  cfg = dataclasses.replace(fm.stream_config(m, n, k, warpgroups=1 if m <= 64 else 2),
                            overlap_wgmma=ovl)
  _check_stream_gpu(17 + m, m, k, n, cfg, jax.ShapeDtypeStruct((m, n), jnp.bfloat16), gelu)


@pytest.mark.skipif(not interpret.has_gpu(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("m,splits", [(1024, 2), (1024, 4), (4608, 3)])
def test_stream_split_k_gpu(m, splits):
  """The streaming kernel with K split (float32 partials summed by XLA, then scale, bias,
  GELU, bf16) at the MLP down projection, 12288 x 3072, output memory poisoned first."""
  k, n = 12288, 3072
  cfg = fm.stream_config(m, n, k, k_splits=splits)
  _check_stream_gpu(29 + m, m, k, n, cfg, jax.ShapeDtypeStruct((splits, n, m), jnp.float32))


@pytest.mark.skipif(not interpret.has_gpu(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("m,splits,tm", [(1024, 4, 256), (1000, 2, 256), (2048, 2, 256),
                                         (4608, 2, 256), (300, 4, 128), (200, 2, 64)])
def test_stream_cluster_splits_gpu(m, splits, tm):
  """Split K summed in the cluster's shared memory (version 15), at the MLP down projection,
  12288 x 3072: each CTA of a cluster finishes its rows of the tile from every split's
  accumulators (float32, in split order), then scale, bias, GELU, bf16, through the output
  tile of its own; the same bound as the float32 partials (the sum's order aside, which it
  covers). Ragged M; output memory poisoned first."""
  k, n = 12288, 3072
  cfg = fm.stream_config(m, n, k, tile_m=tm, warpgroups=2, k_splits=splits,
                         cluster_splits=True)
  assert cfg.cluster_splits
  _check_stream_gpu(31 + m, m, k, n, cfg, jax.ShapeDtypeStruct((m, n), jnp.bfloat16))


@pytest.mark.skipif(not interpret.has_gpu(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("m,splits,tm", [(1024, 4, 256), (2048, 2, 256), (4608, 2, 256),
                                         (1000, 3, 128), (200, 2, 64)])
def test_stream_fixup_splits_gpu(m, splits, tm):
  """Split K summed in order through the float32 workspace behind a global semaphore, the
  last split finishing the tile (scale, bias, GELU, bf16), at the MLP down projection,
  12288 x 3072, with ``stream_config``'s tilings (two consumers where the waves allow);
  ragged M; output memory poisoned first; the partials' bound (the sum's order aside, which
  it covers)."""
  k, n = 12288, 3072
  cfg = fm.stream_config(m, n, k, tile_m=tm, k_splits=splits, fixup_splits=True)
  assert cfg.fixup_splits
  _check_stream_gpu(41 + m, m, k, n, cfg, jax.ShapeDtypeStruct((m, n), jnp.bfloat16))


@pytest.mark.skipif(not interpret.has_gpu(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("m,k,n", [(768, 12288, 3072), (2047, 12288, 3072), (1010, 3072, 3072),
                                   (4608, 3072, 12288)])
def test_stream_fitted_tile_gpu(m, k, n):
  """``auto_config``'s fitted tiles (tile_m 160, 192, 208, 248; ragged last row blocks),
  two consumers, bf16 written by the kernel, GELU; output memory poisoned first; bound:
  ``_stream_reference``."""
  cfg = fm.auto_config(m, n, k)
  assert cfg.tile_m == fm.fitted_tile_m(m, n) < 256 and m % cfg.tile_m
  _check_stream_gpu(53 + m, m, k, n, cfg, jax.ShapeDtypeStruct((m, n), jnp.bfloat16), True)


@pytest.mark.skipif(not interpret.has_gpu(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("m,k,n,splits,out", [
    (1024, 12288, 3072, 4, "bf16"), (2048, 12288, 3072, 2, "bf16"),
    (4608, 12288, 3072, 1, "bf16"), (2048, 3072, 12288, 1, "bf16"),
    (1000, 3072, 3072, 1, "f32"), (200, 3072, 3072, 1, "bf16")])
def test_stream_act_codes_gpu(m, k, n, splits, out):
  """The activation codes decoded by the producer warpgroup (``act_codes``, version 16) at
  DiT shapes, with ``stream_config``'s tilings (tile_m 256 and two consumers of 224
  registers, or one consumer; split K), GELU, ragged M; output memory poisoned first;
  bound: ``_stream_reference``."""
  out_dtype = jnp.bfloat16 if out == "bf16" else jnp.float32
  cfg = fm.stream_config(m, n, k, k_splits=splits, act_codes=True,
                         out_itemsize=jnp.dtype(out_dtype).itemsize)
  _check_stream_gpu(37 + m, m, k, n, cfg, jax.ShapeDtypeStruct((splits, n, m), jnp.float32),
                    out_dtype=out_dtype)


@pytest.mark.skipif(not interpret.has_gpu(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("m,k,n,dec", [
    (1024, 12288, 3072, 12), (1024, 3072, 3072, 12), (1000, 3072, 3072, 12),
    (1030, 3072, 3072, 12), (4608, 12288, 3072, 8), (256, 3072, 12288, 4)])
def test_stream_decode_ctas_gpu(m, k, n, dec):
  """Extra CTAs decoding the activation codes (``decode_ctas``) beside the tiling
  ``auto_config`` would take without them, at DiT shapes: 120 CTAs and the 12 idle SMs
  decoding, ragged M (a multiple of 8 read unpadded, and not), four waves, one consumer;
  GELU; output memory poisoned first; bound: ``_stream_reference``."""
  cfg = dataclasses.replace(fm.auto_config(m, n, k), decode_ctas=dec)
  _check_stream_gpu(29 + m, m, k, n, cfg, jax.ShapeDtypeStruct((m, n), jnp.bfloat16))


@functools.cache
def _dit_weights(k: int, n: int):
  return _case(100 + k + n, 1, n, k, "nvfp4")[1]


@pytest.mark.skipif(not interpret.has_gpu(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("m", [1, 16, 40, 64, 256, 1024, 4096, 4608])
@pytest.mark.parametrize("k,n", [(3072, 3072), (3072, 12288), (12288, 3072), (1152, 4608)])
def test_auto_dit_shapes_gpu(k, n, m):
  """What a model runs: ``method="auto"`` (small-M kernel, streaming kernel or XLA path by M)
  at every DiT shape the issue names (and 40 rows: ragged in the cluster's 64-row tile), W4A4 with bias, bf16 out; activations redrawn per case,
  output memory poisoned first. Bound: ``_stream_reference``; where the XLA path runs, plus
  its bf16 rounding of the scaled activations and of the GEMM's output before the bias (two
  roundings of 2**-8 relative to ``sum |a w|``)."""
  qt = _dit_weights(k, n)
  rng = np.random.default_rng(k + n + m)
  qa = gn.quantize_nvfp4(jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16))
  kw = dict(a_scales=qa.scales, a_tensor_scale=qa.tensor_scale,
            bias=jnp.asarray(rng.standard_normal(n), jnp.float32))
  jax.block_until_ready(jnp.full((m, n), jnp.nan, jnp.bfloat16))  # poison freed memory
  got = np.asarray(fm.fp4_matmul(qa.codes, qt.codes, qt.scales, qt.tensor_scale, **kw),
                   np.float32)
  extra = 2 * 2.0**-8 if fm.pick_method(m, n, k) == "xla" else 0.0
  ref, bound = _stream_reference(qa, qt, kw, False, True, extra)
  assert np.isfinite(got).all() and (np.abs(got - ref) <= bound).all()


class TestMethodXLA(KernelCases):
  """The decode + XLA dot path: plain XLA, so it runs on any backend."""

  method = "xla"
  extra = 2.0**-8


@pytest.mark.slow
@pytest.mark.skipif(not interpret.AVAILABLE, reason="JAX GPU interpreter not available")
class TestKernelsInterpreter(KernelCases):
  interpret = True

  def run(self, fn):
    with interpret.gpu_interpreter():
      return fn()


def test_untiled_inverts_prepare_weights():
  _, qt = _case(12, 1, 128, 384, "nvfp4")
  codes, scales = fm.prepare_weights(qt.codes, qt.scales, qt.tensor_scale).untiled()
  np.testing.assert_array_equal(np.asarray(codes), np.asarray(qt.codes))
  np.testing.assert_array_equal(np.asarray(scales, np.float32),
                                np.asarray(qt.scales.astype(jnp.float32)))


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_decode_weights_bf16_is_exact(fmt):
  _, qt = _case(11, 1, 128, 256, fmt)
  pw = fm.prepare_weights(qt.codes, qt.scales, qt.tensor_scale, fmt=fmt)
  got = np.asarray(jax.jit(fm.decode_weights_bf16)(pw), np.float32)
  want = np.asarray(fm.dequantize(qt.codes, qt.scales, 1.0, fmt))
  np.testing.assert_array_equal(got, want)


def test_pick_method_thresholds():
  """Up to M = 64 the small-M kernel. From STREAM_MIN_M, W4A4 NVFP4 streams (JAX >= 0.11),
  except with K < 3072 from SHORT_K_XLA_M, and from XLA_MIN_M to STREAM_MAX_M only where its
  CTAs fill >= 90% of their waves, else it takes the XLA path; everything else takes the XLA
  path from STREAM_MIN_M."""
  for k, n in [(3072, 12288), (12288, 3072), (1152, 4608)]:
    assert fm.pick_method(fm.STREAM_MIN_M - 1, n, k) == "kernel"
    assert fm.pick_method(fm.STREAM_MIN_M - 1, n, k, w4a4_nvfp4=False) == "kernel"
    assert fm.pick_method(fm.STREAM_MIN_M, n, k, w4a4_nvfp4=False) == "xla"
  streams = "kernel" if fm._REGISTER_CONCAT else "xla"  # noqa: SLF001
  # K 1152 below SHORT_K_XLA_M rows; below XLA_MIN_M; fitted tiles filling 100%, 100% and
  # 99% of their waves
  for m, k, n in [(65, 1152, 4608), (fm.SHORT_K_XLA_M - 1, 1152, 4608), (2047, 12288, 3072),
                  (2048, 3072, 12288), (4608, 12288, 3072), (4608, 3072, 12288)]:
    assert fm.pick_method(m, n, k) == streams, (m, k, n)
  # 128 columns (at most 16 CTAs: 12% fill); K 1152 from XLA_MIN_M and from SHORT_K_XLA_M
  # rows; STREAM_MAX_M rows
  for m, k, n in [(2048, 3072, 128), (2048, 1152, 4608), (fm.SHORT_K_XLA_M, 1152, 4608),
                  (fm.STREAM_MAX_M, 3072, 12288)]:
    assert fm.pick_method(m, n, k) == "xla", (m, k, n)


def test_wave_fill():
  """432 CTAs (18 rows of 256 x 24 columns of 128) on 132 SMs: four waves, 432 / 528 full."""
  cfg = fm.stream_config(4608, 3072, 12288)
  assert (cfg.tile_m, cfg.tiles_per_cta) == (256, 2)
  assert fm.wave_fill(cfg, 4608, 3072) == pytest.approx(432 / 528)
  assert fm.wave_fill(cfg, 4608, 3072, num_sms=108) == 1.0


@pytest.mark.parametrize("m,k,n,wgs,tm,splits,ni", [
    (1024, 3072, 12288, 2, 256, 1, False), (1024, 12288, 3072, 2, 208, 1, True),
    (2047, 12288, 3072, 2, 192, 1, True), (256, 12288, 3072, 1, 128, 1, False),
    (512, 12288, 3072, 2, 128, 4, False), (4608, 12288, 3072, 2, 216, 1, True),
    (65, 3072, 3072, 1, 64, 1, False), (1024, 3072, 3072, 2, 208, 1, False),
    (4608, 3072, 12288, 2, 248, 1, True)])
def test_auto_config(m, k, n, wgs, tm, splits, ni):
  """From STREAM_MIN_M W4A4 NVFP4 streams. Below FIT_MIN_M: tile_m 256 with two consumer
  warpgroups where that keeps two waves of CTAs, else 128 with two consumers only where
  that does; from SPLIT_MIN_M rows K split in the fewest of 2 and 4 that give tile_m 256 two
  waves, else the most that keep 3072 of K each. From FIT_MIN_M: two consumers, K unsplit,
  ``fitted_tile_m``'s tile. The CTAs sweep N where the f16 activations exceed 16 MiB (the
  measured choices at these shapes). Tiles over 128 rows do not overlap wgmma groups. Below
  STREAM_MIN_M, and for other formats, ``default_config``; a float32 output gets a pipeline
  that fits its tile. Two splits sum in order in the kernel (``fixup_splits``), four (and
  float32 outputs) in XLA."""
  cfg = fm.auto_config(m, n, k)
  assert cfg.stream and (cfg.warpgroups, cfg.tile_m) == (wgs, tm)
  assert (cfg.k_splits, cfg.n_inner, cfg.cluster_splits) == (splits, ni, False)
  assert cfg.fixup_splits == (splits == 2)
  if m < fm.FIT_MIN_M:
    assert fm.stream_splits(m, n, k) == splits
  else:
    assert tm == fm.fitted_tile_m(m, n)
  assert cfg.overlap_wgmma == (tm <= 128)
  fm._check_config(cfg, n, k, 2 if splits == 1 else 4)  # noqa: SLF001
  assert fm.auto_config(m, n, k, w4a4_nvfp4=False) == fm.default_config(m, n, k)
  small = fm.CLUSTER_MIN_M - 1
  assert fm.auto_config(small, n, k) == fm.default_config(small, n, k)
  f32 = fm.auto_config(m, n, k, out_itemsize=4)
  assert fm.smem_bytes(f32, k, 4) <= fm.SMEM_BYTES and not f32.fixup_splits
  # packed codes: the SMs one wave of CTAs leaves idle decode them, where enough are idle
  # (12 at N = 3072: 1024 rows on 120 CTAs), and nowhere else
  codes = fm.auto_config(m, n, k, codes=True)
  dec = 12 if (m, n) == (1024, 3072) else 0
  assert codes == dataclasses.replace(cfg, decode_ctas=dec)
  assert fm.auto_config(m, n, k, codes=True, num_sms=128).decode_ctas == 0


@pytest.mark.parametrize("m", [fm.CLUSTER_MIN_M, 48, fm.STREAM_MIN_M - 1])
@pytest.mark.parametrize("k,n", [(3072, 3072), (12288, 3072), (3072, 12288), (1152, 4608)])
def test_auto_config_at_cluster_rows(k, n, m):
  """From CLUSTER_MIN_M rows to 64, W4A4 NVFP4 with K >= STREAM_MIN_K and a 2-byte output
  streams on a 64-row tile with K split in two, summed in the cluster (valid for that
  output); shorter K, float32 outputs, other formats and fewer rows take
  ``default_config``."""
  cfg = fm.auto_config(m, n, k)
  if k >= fm.STREAM_MIN_K:
    assert cfg.stream and cfg.cluster_splits and cfg.k_splits == 2 and cfg.tile_m == 64
    fm._check_config(cfg, n, k, 2)  # noqa: SLF001
  else:
    assert cfg == fm.default_config(m, n, k)
  for other in (fm.auto_config(m, n, k, out_itemsize=4),
                fm.auto_config(m, n, k, w4a4_nvfp4=False)):
    assert other == fm.default_config(m, n, k)
  assert not fm.auto_config(fm.CLUSTER_MIN_M - 1, n, k).stream


def test_cluster_rows_lower_for_cuda():
  """On JAX >= 0.11, ``fp4_matmul`` with no config at 64 rows lowers for CUDA to a
  Mosaic GPU kernel with no XLA reduction after it (the cluster writes the output finished;
  the small-M kernel's split-K partials would be summed by a ``reduce``)."""
  if not fm._REGISTER_CONCAT:  # noqa: SLF001
    pytest.skip("the streaming kernel needs JAX >= 0.11")
  m, k, n = 64, 3072, 512
  a, qt = _case(6, m, n, k, "nvfp4")
  vals = gn.nvfp4_values(gn.quantize_nvfp4(a))
  f = lambda v, t: fm.fp4_matmul(v, qt.codes, qt.scales, qt.tensor_scale,  # noqa: E731
                                 a_tensor_scale=t, bias=jnp.ones((n,), jnp.bfloat16))
  txt = jax.jit(f).trace(vals.values, vals.tensor_scale).lower(
      lowering_platforms=("cuda",)).as_text()
  assert txt.count("mosaic_gpu") >= 1 and "reduce" not in txt


@pytest.mark.skipif(not interpret.AVAILABLE, reason="JAX GPU interpreter not available")
def test_cluster_rows_fall_back_under_the_interpreter():
  """``fp4_matmul`` with no config at 40 rows (ragged in the 64-row tile), where ``auto_config`` picks clusters,
  runs ``default_config``'s small-M kernel under the interpreter (no clusters there), within
  ``_stream_reference``'s bound (bf16 output)."""
  m, k, n = 40, 3072, 256
  a, qt = _case(5, m, n, k, "nvfp4")
  qa = gn.quantize_nvfp4(a)
  assert fm.auto_config(m, n, k).cluster_splits
  kw = dict(a_scales=qa.scales, a_tensor_scale=qa.tensor_scale)
  with interpret.gpu_interpreter():
    out = fm.fp4_matmul(qa.codes, qt.codes, qt.scales, qt.tensor_scale, method="kernel",
                        interpret=True, **kw)
  ref, bound = _stream_reference(qa, qt, kw, False, True)
  assert out.dtype == jnp.bfloat16
  assert (np.abs(np.asarray(out, np.float32) - ref) <= bound).all()


@pytest.mark.parametrize("m,n,tm,waves", [(4608, 3072, 216, 4), (4096, 3072, 256, 3),
                                          (1024, 3072, 208, 1), (768, 3072, 160, 1),
                                          (2048, 3072, 192, 2), (4608, 12288, 248, 14)])
def test_fitted_tile_m(m, n, tm, waves):
  """The tile the cost model picks (two consumers, one CTA per SM): the measured fastest at
  4608 x 12288 x 3072 (216: 528 CTAs in four full waves; 256 leaves a fourth wave 27% full)
  and 768 / 1024 rows (one wave of 120 CTAs, not 96 of 256 rows); 256 where it fills its
  waves already; a multiple of 8 in [lo, 256]."""
  got = fm.fitted_tile_m(m, n)
  assert got == tm and got % 8 == 0
  ctas = fm._ctas(m, n, got, 2)  # noqa: SLF001
  assert -(-ctas // 132) == waves and ctas > (waves - 1) * 132
  assert fm.fitted_tile_m(m, n, lo=256) == 256


def test_stream_splits_where_tile_m_256_cannot_fill_two_waves():
  """From SPLIT_MIN_M rows, where no split count gives tile_m 256 two waves of CTAs (512 x
  12288 x 3072: at most 192 CTAs), the most splits that keep 3072 of K each: four, the
  tiling measured fastest there (78.5 us against 95.2 unsplit, v17d); none below
  SPLIT_MIN_M, nor where K cannot keep 3072 per split."""
  assert fm.stream_splits(512, 3072, 12288) == 4
  assert fm.auto_config(512, 3072, 12288) == fm.stream_config(512, 3072, 12288, k_splits=4)
  assert fm.stream_splits(fm.SPLIT_MIN_M - 1, 3072, 12288) == 1
  assert fm.stream_splits(512, 4608, 1152) == fm.stream_splits(512, 3072, 3072) == 1


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4", "int4"])
def test_reference_matches_pqjax_oracle(fmt):
  a, qt = _case(3, 6, 128, 256, fmt)
  ref = fm.reference(a, qt.codes, qt.scales, qt.tensor_scale, fmt=fmt, out_dtype=jnp.float32)
  oracle = qmatmul.reference_matmul(a, qt, out_dtype=jnp.float32)
  _assert_within_bound(ref, oracle, a, qt, fmt)


def test_w4a4_reference_matches_oracle():
  a, qt = _case(4, 6, 128, 256, "nvfp4")
  qa = gn.quantize_nvfp4(a)
  ref = fm.reference(qa.codes, qt.codes, qt.scales, qt.tensor_scale, a_scales=qa.scales,
                     a_tensor_scale=qa.tensor_scale, out_dtype=jnp.float32)
  oracle = qmatmul.reference_matmul(a, qt, act_format="nvfp4", out_dtype=jnp.float32)
  _assert_within_bound(ref, oracle, fm.dequantize(qa.codes, qa.scales, qa.tensor_scale,
                                                  "nvfp4"), qt, "nvfp4")


@pytest.mark.parametrize("kwargs,match", [
    (dict(k=192), "K=192"),
    (dict(n=96), "N=96"),
    (dict(codes_dtype=jnp.int8), "w_codes"),
    (dict(scales_dtype=jnp.float32), "w_scales"),
    (dict(a_dtype=jnp.int32), "a must be"),
    (dict(bias_n=7), "bias"),
    (dict(epilogue="relu"), "epilogue"),
    (dict(method="cuda"), "method"),
    (dict(method="kernel", config=fm.MatmulConfig(tile_m=12)), "tile_m"),
    (dict(method="kernel", config=fm.MatmulConfig(tile_m=8)), "tile_m=8 needs m_major=True"),
    (dict(method="kernel", config=fm.MatmulConfig(k_splits=3)), "k_splits"),
    (dict(method="kernel", config=fm.MatmulConfig(tiles_per_cta=3)), "tiles_per_cta"),
    (dict(method="kernel", config=fm.MatmulConfig(k_tiles=3)), "k_tiles"),
    (dict(method="kernel", config=fm.MatmulConfig(tiles_per_cta=1, warpgroups=2)), "warpgroups"),
    (dict(method="kernel", config=fm.MatmulConfig(tiles_per_cta=2, wg_tiles=2)), "wg_tiles"),
    (dict(method="kernel", config=fm.MatmulConfig(stream=True, tiles_per_cta=2, wg_tiles=3)),
     "wg_tiles"),
    (dict(method="kernel", config=fm.MatmulConfig(stream=True, tiles_per_cta=2, alias_out=True)),
     "alias_out"),
    (dict(k=12288, method="kernel", config=fm.MatmulConfig(tile_m=64)), "shared memory"),
    (dict(method="kernel", config=fm.MatmulConfig(tile_m=64, stream=True, k_splits=2,
                                                  cluster_splits=True)),
     "cluster_splits=True needs stream=True, alias_out=True"),
    (dict(method="kernel", config=fm.MatmulConfig(tile_m=32, stream=True, act_codes=True)),
     "act_codes=True needs stream=True, tile_m=32 a multiple of 64"),
    (dict(method="kernel", config=fm.MatmulConfig(tile_m=64, stream=True, act_codes=True)),
     "act_codes=True needs W4A4 NVFP4: packed uint8 activations"),
    (dict(method="kernel", config=fm.MatmulConfig(tile_m=32, stream=True, decode_ctas=4)),
     "decode_ctas=4 must be >= 0, and > 0 needs stream=True, tile_m=32 >= 64"),
    (dict(method="kernel", config=fm.MatmulConfig(tile_m=64, stream=True, decode_ctas=4)),
     "decode_ctas=4 needs W4A4 NVFP4: packed uint8 activations"),
    (dict(method="kernel", config=fm.MatmulConfig(tile_m=32, stream=True, k_splits=2,
                                                  fixup_splits=True)),
     "fixup_splits=True needs stream=True, k_splits=2 > 1, tile_m=32 a multiple of 64"),
    (dict(a_dtype=jnp.float16, a_tensor_scale=jnp.ones(3)), "a_tensor_scale must be a scalar"),
])
def test_bad_input_raises(kwargs, match):
  n, k = kwargs.get("n", 128), kwargs.get("k", 256)
  codes = jnp.zeros((n, k // 2), kwargs.get("codes_dtype", jnp.uint8))
  scales = jnp.ones((n, k // 16), kwargs.get("scales_dtype", jnp.float8_e4m3fn))
  a = jnp.ones((4, k), kwargs.get("a_dtype", jnp.bfloat16))
  bias = jnp.ones((kwargs["bias_n"],)) if "bias_n" in kwargs else None
  with pytest.raises(ValueError, match=match):
    fm.fp4_matmul(a, codes, scales, jnp.float32(1), bias=bias,
                  epilogue=kwargs.get("epilogue"), method=kwargs.get("method", "auto"),
                  config=kwargs.get("config"), a_tensor_scale=kwargs.get("a_tensor_scale"))


@pytest.mark.parametrize("fmt,packed", [("nvfp4", True), ("nvfp4", False), ("mxfp4", False)])
@pytest.mark.parametrize("m_major,wgs,ovl", [(True, 1, False), (False, 1, False), (True, 2, False),
                                            (True, 1, True), (False, 2, True)])
def test_kernel_lowers_for_cuda(fmt, packed, m_major, wgs, ovl):
  """The GPU path (register A operand, inline-PTX E2M1 decode, resident activation slice,
  per-tile accumulator stores) lowers to Mosaic GPU; the interpreter runs another decode."""
  a, qt = _case(5, 20, 256, 512, fmt)
  cfg = fm.MatmulConfig(tile_m=16, k_splits=1, tiles_per_cta=2, k_tiles=2, warpgroups=wgs,
                        m_major=m_major, overlap_wgmma=ovl)
  kw = {}
  if packed:
    qa = gn.quantize_nvfp4(a)
    a, kw = qa.codes, dict(a_scales=qa.scales, a_tensor_scale=qa.tensor_scale)
  f = lambda a, c, s, t, kw: fm.fp4_matmul(a, c, s, t, fmt=fmt, method="kernel",  # noqa: E731
                                           config=cfg, **kw)
  text = jax.jit(f).trace(a, qt.codes, qt.scales, qt.tensor_scale, kw).lower(
      lowering_platforms=("cuda",)).as_text()
  assert "mosaic_gpu" in text


@pytest.mark.parametrize("out", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("tm,wt,alias,splits,cl,ac,fx", [
    (64, 1, False, 1, False, False, False), (64, 2, False, 1, False, False, False),
    (256, 1, True, 1, False, False, False), (128, 2, True, 1, False, False, False),
    (256, 1, True, 2, False, False, False), (256, 1, True, 4, True, False, False),
    (128, 1, True, 2, True, False, False), (64, 1, False, 1, False, True, False),
    (256, 1, True, 1, False, True, False), (256, 1, None, 2, False, True, False),
    (128, 2, None, 1, False, True, False), (256, 1, None, 2, False, False, True),
    (128, 1, None, 4, False, False, True), (128, 1, None, 2, False, True, True)])
def test_stream_kernel_lowers_for_cuda(out, tm, wt, alias, splits, cl, ac, fx):
  """The streaming kernel lowers to Mosaic GPU on JAX >= 0.11 (its finished bf16 output is a
  transposed store into a swizzled tile, which JAX 0.10.2 refuses); before, a clear error.
  ``wt`` 2 or ``tm`` 256: two consumers of 128 accumulator registers each, registers
  rebalanced (``setmaxnreg``); ``alias``: output tiles in the pipeline's memory; ``splits``:
  split K (float32 partials); ``cl``: the splits summed in their cluster's shared memory
  (bf16 out; float32 out falls back to the partials); ``ac``: the producer decodes the
  activation codes (56 registers for it, 224 for each of two wide consumers); ``fx``: the
  splits sum in order through a workspace behind a global semaphore (bf16 out; float32
  falls back to the partials)."""
  cfg = fm.stream_config(200, 512, 1024, tile_m=tm, warpgroups=2, wg_tiles=wt,
                         alias_out=alias, out_itemsize=jnp.dtype(out).itemsize,
                         k_splits=splits, cluster_splits=cl, act_codes=ac, fixup_splits=fx)
  _stream_lowers_on_jax011(5, 200, cfg, out)


@pytest.mark.parametrize("splits,fx", [(1, False), (2, True)])
def test_decode_ctas_lowers_for_cuda(splits, fx):
  """The streaming kernel with decoding CTAs (``decode_ctas``: their buffers in a
  ``RefUnion`` with the pipeline's, global semaphores, a one-dimensional grid) lowers to
  Mosaic GPU for CUDA on JAX >= 0.11: unsplit, the output tiles in memory of their own,
  and split K summed in order (``fixup_splits``), the output tiles in the pipeline's memory
  (both ways the decoders' buffers join the ``RefUnion``)."""
  cfg = dataclasses.replace(
      fm.stream_config(256, 512, 1024, tile_m=128, warpgroups=2, k_splits=splits,
                       fixup_splits=fx), decode_ctas=5)
  _stream_lowers_on_jax011(7, 256, cfg, jnp.bfloat16)


def _stream_lowers_on_jax011(seed, m, cfg, out, bias_dtype=None) -> None:
  """A W4A4 NVFP4 ``fp4_matmul`` from codes, ``(m, 1024) x (1024, 512)``, with ``cfg``'s
  streaming kernel, tanh-GELU and a ``bias_dtype`` bias if any, through
  ``_lowers_on_jax011``."""
  a, qt = _case(seed, m, 512, 1024, "nvfp4")
  qa = gn.quantize_nvfp4(a)
  bias = None if bias_dtype is None else jnp.linspace(-1, 1, 512, dtype=bias_dtype)
  f = lambda c, s, t: fm.fp4_matmul(c, qt.codes, qt.scales, qt.tensor_scale,  # noqa: E731
                                    a_scales=s, a_tensor_scale=t, config=cfg, bias=bias,
                                    method="kernel", out_dtype=out, epilogue="gelu_tanh")
  _lowers_on_jax011(f, (qa.codes, qa.scales, qa.tensor_scale), "stream=True needs JAX >= 0.11")


@pytest.mark.parametrize("bias_dtype", [jnp.bfloat16, jnp.float32])
def test_stream_bias_lowers_for_cuda(bias_dtype):
  """The bias in its own dtype, copied per output tile and widened in the kernel, and the
  output scale's factors read from global memory, lower for CUDA."""
  _stream_lowers_on_jax011(8, 256, fm.auto_config(256, 512, 1024), jnp.bfloat16, bias_dtype)


def _lowers_on_jax011(f, args, match: str) -> None:
  """``jax.jit(f)`` on ``args`` lowers to Mosaic GPU for CUDA on JAX >= 0.11 (register
  concatenate); before, ``fp4_matmul`` raises a ``ValueError`` matching ``match``."""
  lower = lambda: jax.jit(f).trace(*args).lower(  # noqa: E731
      lowering_platforms=("cuda",)).as_text()
  if fm._REGISTER_CONCAT:  # noqa: SLF001
    assert "mosaic_gpu" in lower()
  else:
    with pytest.raises(ValueError, match=match):
      lower()


def test_stream_config_for_bf16_refuses_float32_output():
  """A streaming tiling sized for bf16 outputs (the deepest pipeline) does not fit a float32
  output tile: a ValueError before launch that names the fix, not a failed compile."""
  a, qt = _case(6, 256, 256, 3072, "nvfp4")
  cfg = fm.stream_config(256, 256, 3072, warpgroups=2)
  assert fm.smem_bytes(cfg, 3072, 4) > fm.SMEM_BYTES >= fm.smem_bytes(cfg, 3072, 2)
  with pytest.raises(ValueError, match="out_itemsize=4"):
    fm.fp4_matmul(a, qt.codes, qt.scales, qt.tensor_scale, config=cfg, method="kernel",
                  out_dtype=jnp.float32, interpret=True)


@pytest.mark.parametrize("k,n", [(3072, 12288), (12288, 3072), (3072, 3072), (1152, 4608)])
@pytest.mark.parametrize("m", [65, 256, 1024, 4608])
@pytest.mark.parametrize("out_itemsize", [2, 4])
def test_stream_config_is_valid(m, k, n, out_itemsize):
  """``stream_config`` fits shared memory at every DiT shape, for bf16 outputs written by the
  kernel and float32 ones, and passes the checks; split K (float32 partial tiles) too, and
  a split count that does not divide the K steps raises."""
  cfg = fm.stream_config(m, n, k, out_itemsize=out_itemsize)
  fm._check_config(cfg, n, k, out_itemsize)  # noqa: SLF001
  assert cfg.stream and cfg.k_splits == 1
  assert fm.smem_bytes(cfg, k, out_itemsize) <= fm.SMEM_BYTES
  steps = k // fm.TILE_K
  splits = next(d for d in range(2, steps + 1) if steps % d == 0)
  split = fm.stream_config(m, n, k, out_itemsize=out_itemsize, k_splits=splits)
  fm._check_config(split, n, k, 4)  # noqa: SLF001
  bad = next(d for d in range(2, steps + 2) if steps % d)
  with pytest.raises(ValueError, match=f"k_splits={bad} must divide the {steps} K steps"):
    fm._check_config(dataclasses.replace(cfg, k_splits=bad), n, k)  # noqa: SLF001


@pytest.mark.parametrize("k,n", [(3072, 12288), (12288, 3072), (3072, 3072), (1152, 4608)])
@pytest.mark.parametrize("m", [1, 16, 64, 256, 4608])
def test_default_config_is_valid(m, k, n):
  """Every M gets a tiling that passes the checks and fits shared memory; at the small M the
  kernel runs by default, all CTAs are resident at once (one wave) and no SM idles."""
  cfg = fm.default_config(m, n, k)
  fm._check_config(cfg, n, k)
  assert cfg.tile_m >= min(m, 16) and cfg.tile_m % 8 == 0
  if m < fm.STREAM_MIN_M:
    ctas = n // fm.TILE_N // cfg.tiles_per_cta * -(-m // cfg.tile_m) * cfg.k_splits
    assert 132 <= ctas <= 132 * (fm.SMEM_BYTES // fm.smem_bytes(cfg, k))


def _element_coords(layout, shape):
  """{(thread, register index): [(row, col) of each vector element]} of a Mosaic GPU
  ``TiledLayout``: ``TiledLayout.thread_idxs`` evaluated with integers."""
  from jax.experimental.mosaic.gpu import fragmented_array as fa
  contig = tuple(int(np.prod(shape[i + 1:])) for i in range(len(shape)))
  strides = layout.tiling.tile_strides(contig)
  dyn = strides[-layout.tiled_tiling_rank:]
  tshape = layout.tiled_tiling_shape

  def delinearize(idx, dims):
    sizes = [d.times if isinstance(d, fa.Replicated) else tshape[d] for d in dims]
    full = [0] * layout.tiled_tiling_rank
    for j, (d, size) in enumerate(zip(dims, sizes)):
      if not isinstance(d, fa.Replicated):
        full[d] = idx // int(np.prod(sizes[j + 1:])) % size
    return full

  out = {}
  for t in range(128):
    base = [a + b for a, b in zip(delinearize(t // 32 % 4, layout.warp_dims),
                                  delinearize(t % 32, layout.lane_dims))]
    off = sum(i * s for i, s in zip(base, dyn))
    for idx in np.ndindex(layout.registers_shape(shape)):
      row, col = divmod(off + sum(i * s for i, s in zip(idx, strides)), shape[1])
      out[t, idx] = [(row, col + e) for e in range(layout.vector_length)]
  return out


def test_register_order_matches_mosaic_layouts():
  """The kernel decodes each ``WGMMA_UPCAST_4X`` word of a tile stored by
  ``_swap_byte_blocks`` straight into WGMMA registers (``_wgmma_index``). Checked against
  Mosaic GPU's layouts, and the WGMMA layout against the PTX ISA's m64nNk16 A fragment
  (thread t: row 16 (t // 32) + (t % 32) // 4 (+ 8), columns 8 j + 2 (t % 4) (+ 1))."""
  from jax.experimental.mosaic.gpu import fragmented_array as fa
  shape = (fm.TILE_N, fm.TILE_K)
  up = _element_coords(fa.WGMMA_LAYOUT_UPCAST_4X, shape)
  wg = _element_coords(fa.WGMMA_LAYOUT, shape)
  for (t, idx), els in wg.items():
    row = 16 * (t // 32) + (t % 32) // 4 + 8 * idx[4]
    assert els == [(row, 8 * idx[1] + 2 * (t % 4) + b) for b in range(2)]
  # Column c of a stored tile holds logical column logical[c].
  logical = np.asarray(fm._swap_byte_blocks(np.arange(shape[1] // 2, dtype=np.uint8)))
  logical = (2 * logical[:, None] + np.arange(2)).reshape(-1)
  for (t, idx), els in up.items():
    for i in range(4):
      got = [(r, int(logical[c])) for r, c in els[2 * i:2 * i + 2]]
      assert got == wg[t, fm._wgmma_index(idx, i)]


def test_swap_byte_blocks_is_an_involution():
  x = np.random.default_rng(0).integers(0, 256, (3, 128), dtype=np.uint8)
  y = np.asarray(fm._swap_byte_blocks(x))
  assert not np.array_equal(x, y)
  np.testing.assert_array_equal(np.asarray(fm._swap_byte_blocks(y)), x)


def _run_ptx(text: str, ins: list[int], n_out: int) -> list[int]:
  """Runs the integer PTX of an inline-asm block on Python ints (the instructions the E2M1
  decode uses, with their PTX ISA semantics); ``$i`` are the outputs, then the inputs."""
  regs = {f"${n_out + i}": v for i, v in enumerate(ins)}
  val = lambda o: int(o, 0) if o[0].isdigit() else regs[o]  # noqa: E731
  for line in text.splitlines():
    line = line.strip().rstrip(";")
    if not line or line[0] in "{}.":
      continue
    op, args = line.split(None, 1)
    if op == "mov.b32" and args.startswith("{"):  # split a b32 into two b16
      dst, src = args.split("},")
      lo, hi = (d.strip() for d in dst.strip("{ ").split(","))
      regs[lo], regs[hi] = val(src.strip()) & 0xFFFF, val(src.strip()) >> 16
      continue
    d, *a = (x.strip() for x in args.split(","))
    if op == "mov.b32":
      r = val(a[0])
    elif op == "and.b32":
      r = val(a[0]) & val(a[1])
    elif op == "or.b32":
      r = val(a[0]) | val(a[1])
    elif op == "shr.u32":
      r = val(a[0]) >> val(a[1])
    elif op == "shl.b32":
      r = (val(a[0]) << val(a[1])) & 0xFFFFFFFF
    elif op == "prmt.b32":  # byte i: selector nibble i picks a byte of {b, a}; bit 3: sign
      src = val(a[0]) | val(a[1]) << 32
      r = 0
      for i in range(4):
        sel = (val(a[2]) >> 4 * i) & 15
        byte = (src >> 8 * (sel & 7)) & 0xFF
        r |= ((0xFF if byte & 0x80 else 0) if sel & 8 else byte) << 8 * i
    elif op == "lop3.b32":  # bit-wise look-up: result bit = lut[4 a + 2 b + c]
      x, y, z, lut = (val(v) for v in a)
      r = 0
      for bit in range(32):
        i = 4 * (x >> bit & 1) + 2 * (y >> bit & 1) + (z >> bit & 1)
        r |= (lut >> i & 1) << bit
    elif op == "cvt.rn.f16x2.e4m3x2":  # two E4M3 bytes -> two float16, low byte first
      h = np.array([val(a[0]) & 0xFF, val(a[0]) >> 8], np.uint8).view(ml_dtypes.float8_e4m3fn)
      f = h.astype(np.float16).view(np.uint16)
      r = int(f[0]) | int(f[1]) << 16
    else:
      raise NotImplementedError(op)
    regs[d] = r
  return [regs[f"${i}"] for i in range(n_out)]


def test_e2m1_ptx_decodes_words():
  """The kernel's inline-PTX E2M1 decode, run instruction by instruction (``_run_ptx``) on
  stored 32-bit words, gives the float16 E2M1 values of the word's 8 nibbles in order, for
  every nibble value in every slot."""
  rng = np.random.default_rng(0)
  words = np.concatenate([rng.integers(0, 2**32, 48, dtype=np.uint64),
                          [0x76543210, 0xFEDCBA98, 0x89ABCDEF, 0xFFFFFFFF, 0]]).astype(np.uint32)
  for w in words:
    out = _run_ptx(fm._E2M1_TO_F16X2_PTX, [int(w)], 4)
    got = np.array(out, np.uint32).view(np.float16).astype(np.float32)
    nib = np.array([(int(w) >> 4 * j) & 15 for j in range(8)])
    want = np.asarray(fm._nibble_values(jnp.asarray(nib), "nvfp4"))
    np.testing.assert_array_equal(got, want, err_msg=f"word {int(w):#010x}")


def test_cluster_splits_refused_under_the_interpreter():
  """The interpreter has no CTA clusters: a clear error before anything runs, not a hang."""
  a, qt = _case(7, 300, 512, 2048, "nvfp4")
  qa = gn.quantize_nvfp4(a)
  cfg = fm.stream_config(300, 512, 2048, tile_m=256, warpgroups=2, k_splits=2,
                         cluster_splits=True)
  with pytest.raises(ValueError, match="cluster_splits=True needs a GPU"):
    fm.fp4_matmul(qa.codes, qt.codes, qt.scales, qt.tensor_scale, a_scales=qa.scales,
                  a_tensor_scale=qa.tensor_scale, config=cfg, method="kernel", interpret=True)


def _tm8_config(m, n, k):
  return dataclasses.replace(fm.default_config(m, n, k), tile_m=8, m_major=True)


@pytest.mark.parametrize("m", [1, 8, 9])
def test_default_config_tile_m_8(m):
  """``default_config`` takes the 8-row activation tile up to M = 8 where the activations
  can stay (M, K) (JAX >= 0.11), the same splits and tiles as 16 rows; 16 otherwise."""
  cfg = fm.default_config(m, 12288, 3072)
  tm8 = m <= 8 and fm._REGISTER_CONCAT  # noqa: SLF001
  assert cfg.tile_m == (8 if tm8 else 16) and cfg.m_major
  if tm8:
    assert dataclasses.replace(cfg, tile_m=16) == fm.default_config(16, 12288, 3072)


def test_tile_m_8_lowers_for_cuda():
  """An 8-row activation tile (wgmma N = 8) lowers for CUDA with the activations kept (M, K)
  (JAX >= 0.11); before, the (K, M) layout cannot hold it: a clear error."""
  a, qt = _case(5, 3, 256, 1024, "nvfp4")
  f = lambda a, c, s, t: fm.fp4_matmul(a, c, s, t, method="kernel",  # noqa: E731
                                       config=_tm8_config(3, 256, 1024))
  _lowers_on_jax011(f, (a, qt.codes, qt.scales, qt.tensor_scale), "tile_m=8 needs m_major=True")


def test_default_tiling_at_m_8_runs_in_the_interpreter():
  """With no config given, the interpreter (activations (K, M)) runs the 16-row tile where
  ``default_config`` picks 8: the product of the reference within its bound."""
  _check_small_m(9, 3, 1024, 256, None, interpret_=True)


@pytest.mark.skipif(not interpret.has_gpu(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("m,k,n", [(1, 3072, 12288), (5, 12288, 3072), (8, 3072, 3072)])
def test_tile_m_8_gpu(m, k, n):
  """The 8-row tile (``default_config``'s up to M = 8) at DiT shapes on the GPU, W4A4,
  output memory poisoned first."""
  _check_small_m(60 + m, m, k, n, _tm8_config(m, n, k), (8, n, 16))


@pytest.mark.skipif(not interpret.has_gpu(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("fmt,m", [("nvfp4", 1), ("int4", 2), ("mxfp4", 8)])
def test_tile_m_8_w4a16_gpu(fmt, m):
  """The 8-row tile with bf16 activations (W4A16, each weight format) at 3072 x 3072 on
  the GPU, output memory poisoned first."""
  k = n = 3072
  a, qt = _case(70 + m, m, n, k, fmt)
  jax.block_until_ready(jnp.full((8, n, 16), jnp.nan, jnp.float32))  # poison freed memory
  out = fm.fp4_matmul(a, qt.codes, qt.scales, qt.tensor_scale, fmt=fmt, out_dtype=jnp.float32,
                      config=_tm8_config(m, n, k), method="kernel")
  ref = fm.reference(a, qt.codes, qt.scales, qt.tensor_scale, fmt=fmt, out_dtype=jnp.float32)
  _assert_within_bound(out, ref, a, qt, fmt, 2.0**-9 if fmt == "int4" else 0.0)

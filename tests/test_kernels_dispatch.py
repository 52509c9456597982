"""pqjax.dispatch: backend choice and the reference paths (CPU)."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pqjax import dispatch, hadamard, qmatmul
from tests import bounds, interpret


def test_cpu_picks_reference_and_override():
  assert dispatch.device_backend() in dispatch.BACKENDS
  with dispatch.use_backend("mosaic"):
    assert dispatch.current_backend() == "mosaic"
  with pytest.raises(ValueError, match="backend"):
    with dispatch.use_backend("cuda"):
      pass


def test_linear_reference_with_perm_and_rotation():
  rng = np.random.default_rng(0)
  w = qmatmul.quantize_weight(rng.standard_normal((64, 32)).astype(np.float32), "nvfp4")
  x = jnp.asarray(rng.standard_normal((2, 3, 64)), jnp.float32)
  perm = jnp.asarray(rng.permutation(64), jnp.int32)
  y = dispatch.linear(x, w, act_format="nvfp4", in_perm=perm, rotate=True,
                      backend="reference")
  xr = hadamard.block_hadamard(x[..., perm], 16)
  np.testing.assert_array_equal(np.asarray(y),
                                np.asarray(qmatmul.reference_matmul(xr, w, act_format="nvfp4")))


def test_mosaic_falls_back_off_tiling():
  rng = np.random.default_rng(1)
  w = qmatmul.quantize_weight(rng.standard_normal((64, 32)).astype(np.float32), "nvfp4")
  x = jnp.asarray(rng.standard_normal((3, 64)), jnp.float32)
  y = dispatch.linear(x, w, act_format=None, backend="mosaic")  # K=64: not a kernel shape
  np.testing.assert_array_equal(np.asarray(y), np.asarray(qmatmul.reference_matmul(x, w)))


def test_bad_in_perm_raises():
  w = qmatmul.quantize_weight(np.ones((64, 32), np.float32), "nvfp4")
  with pytest.raises(ValueError, match="in_perm"):
    dispatch.linear(jnp.ones((2, 64)), w, act_format=None,
                    in_perm=jnp.arange(64, dtype=jnp.int16))


@pytest.mark.parametrize("backend", ["reference", "mosaic"])
def test_linear_gelu_epilogue_off_the_kernels(backend):
  """``epilogue="gelu_tanh"`` where no kernel runs (the reference; mosaic off the tiling):
  the GELU of the result, bit for bit what ``jax.nn.gelu(linear(...))`` gives (so converted
  models keep their numerics); another epilogue is a ``ValueError`` naming it."""
  import jax
  rng = np.random.default_rng(3)
  w = qmatmul.quantize_weight(rng.standard_normal((64, 32)).astype(np.float32), "nvfp4")
  x = jnp.asarray(rng.standard_normal((3, 64)), jnp.bfloat16)
  kw = dict(act_format="nvfp4", backend=backend)
  y = dispatch.linear(x, w, epilogue="gelu_tanh", **kw)
  want = jax.nn.gelu(dispatch.linear(x, w, **kw), approximate=True)
  np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(want, np.float32))
  with pytest.raises(ValueError, match="epilogue.*'gelu'"):
    dispatch.linear(x, w, epilogue="gelu", **kw)


@pytest.mark.parametrize("act_format", ["nvfp4", None])
def test_mosaic_gelu_epilogue_reaches_the_matmul(monkeypatch, act_format):
  """On mosaic (lowered for CUDA on the CPU) the GELU goes to ``fp4_matmul``'s epilogue (the
  streaming kernel writes it finished); under ``fusion(False)`` it is applied after."""
  import jax
  import pqjax_kernels
  rng = np.random.default_rng(4)
  w = qmatmul.quantize_weight(rng.standard_normal((256, 128)).astype(np.float32), "nvfp4")
  x = jnp.asarray(rng.standard_normal((1024, 256)), jnp.bfloat16)
  seen, matmul = [], pqjax_kernels.fp4_matmul
  def spy(*a, **kw):
    seen.append(kw.get("epilogue"))
    return matmul(*a, **kw)
  monkeypatch.setattr(pqjax_kernels, "fp4_matmul", spy)
  def lower():  # a new function each time: jit's cache does not key on the contexts
    f = lambda x: dispatch.linear(x, w, act_format=act_format, epilogue="gelu_tanh",  # noqa: E731
                                  act_tensor_scale=jnp.float32(0.01) if act_format else None)
    jax.jit(f).trace(x).lower(lowering_platforms=("cuda",))
  with dispatch.use_backend("mosaic"):
    lower()
    with dispatch.fusion(False):
      lower()
  assert seen == ["gelu_tanh", None]


def test_converted_gelu_fuses_into_a_quantized_linear(monkeypatch):
  """``converters``' tanh-GELU feed-forward hands the GELU to a quantized projection
  (``linear_act``: ``QuantLinear.fused_epilogues``) and gets what it computed before; a
  float projection keeps ``gelu(proj(x))``."""
  import jax
  from converters.attention import GELU
  from pqjax.qmodules import QuantLinear
  rng = np.random.default_rng(5)
  mod = GELU(64, 32, approximate="tanh", rngs=nnx.Rngs(0))
  x = jnp.asarray(rng.standard_normal((2, 5, 64)), jnp.float32)
  np.testing.assert_array_equal(np.asarray(mod(x)),
                                np.asarray(jax.nn.gelu(mod.proj(x), approximate=True)))
  qt = qmatmul.quantize_weight(np.asarray(mod.proj.kernel[...]), "nvfp4")
  mod.proj = QuantLinear(qt, mod.proj.bias[...], act_format="nvfp4")
  epilogues, linear = [], dispatch.linear
  def spy(*a, **kw):
    epilogues.append(kw.get("epilogue"))
    return linear(*a, **kw)
  monkeypatch.setattr(dispatch, "linear", spy)
  y = mod(x)
  assert epilogues == ["gelu_tanh"]
  np.testing.assert_array_equal(np.asarray(y),
                                np.asarray(jax.nn.gelu(mod.proj(x), approximate=True)))


@pytest.mark.parametrize("gathered,rotate", [(False, False), (True, True)])
def test_prepared_weights_used_by_mosaic_xla_path(gathered, rotate):
  """M = XLA_MIN_M at K = 128 (below STREAM_MIN_K) takes the decode + XLA dot path, which
  runs on any backend; its activation quantize (``pqjax_kernels.norm``) and the reference's
  (``pqjax.formats``) pick the same codes, so the two backends differ only in the product's
  arithmetic."""
  from pqjax_kernels import matmul_fp4 as fm
  from pqjax_kernels import norm
  rng = np.random.default_rng(2)
  w = qmatmul.quantize_weight(rng.standard_normal((128, 256)).astype(np.float32), "nvfp4")
  x = jnp.asarray(rng.standard_normal((fm.XLA_MIN_M, 128)), jnp.bfloat16)
  perm = jnp.asarray(rng.permutation(128), jnp.int32) if gathered else None
  kw = dict(act_format="nvfp4", act_tensor_scale=jnp.float32(0.01), in_perm=perm,
            rotate=rotate, out_dtype=jnp.float32)
  y = dispatch.linear(x, w, backend="mosaic", prepared=dispatch.prepare(w), **kw)
  ref = dispatch.linear(x, w, backend="reference", **kw)
  # The tensor scales folded into the activations (one bf16 rounding each, relative
  # <= 2**-8), then float32 sums in another order:
  # |err| <= (2**-8 + (K + 2) 2**-24) sum |x_k w_k|.
  q = norm.gathered_quantize(x, perm, tensor_scale=jnp.float32(0.01), hadamard=rotate)
  xa = jnp.abs(fm.dequantize(q.codes, q.scales, q.tensor_scale, "nvfp4"))
  wa = jnp.abs(fm.dequantize(w.codes, w.scales, w.tensor_scale, "nvfp4"))
  bound = np.asarray(xa @ wa.T) * (2.0**-8 + (128 + 2) * 2.0**-24) + 1e-30
  assert (np.abs(np.asarray(y) - np.asarray(ref)) <= bound).all()


def test_prepare_declines_and_checks():
  rng = np.random.default_rng(3)
  w = qmatmul.quantize_weight(rng.standard_normal((128, 256)).astype(np.float32), "nvfp4")
  assert dispatch.prepare(qmatmul.quantize_weight(np.ones((64, 32), np.float32), "nvfp4")) \
      is None
  other = dispatch.prepare(qmatmul.quantize_weight(np.ones((256, 128), np.float32), "nvfp4"))
  with pytest.raises(ValueError, match="prepared"):
    dispatch.linear(jnp.ones((2, 128)), w, act_format=None, prepared=other)


def _norm_args(rng, b=2, t=32, d=256):
  x = jnp.asarray(rng.standard_normal((b, t, d)) * 2 + 1, jnp.bfloat16)
  perm = jnp.asarray(rng.permutation(d), jnp.int32)
  vec = lambda *s: jnp.asarray(rng.standard_normal(s) * 0.3, jnp.float32)  # noqa: E731
  return x, perm, dict(kind="layer", weight=vec(d), bias=vec(d), shift=vec(b, 1, d),
                       scale=vec(b, 1, d), eps=1e-6)


@pytest.mark.parametrize("dtype,d,uses_kernel", [(jnp.bfloat16, 256, True),
                                                 (jnp.float32, 256, False),  # bf16 only
                                                 (jnp.bfloat16, 80, False)])  # D % 64
def test_mosaic_norm_picks_kernel_where_it_runs(monkeypatch, dtype, d, uses_kernel):
  """On a GPU the mosaic backend's gathered norm (bf16) and W4A4 activation quantize are the
  Pallas kernel (seen in the CUDA lowering, made here on the CPU); other inputs keep the
  reference."""
  import jax
  monkeypatch.setattr(dispatch, "_norm_kernel_runs", lambda: True)
  x, perm, kw = _norm_args(np.random.default_rng(4), d=d)
  x = x.astype(dtype)
  f = lambda x, p: dispatch.gathered_norm(x, p, backend="mosaic", **kw)  # noqa: E731
  text = jax.jit(f).trace(x, perm).lower(lowering_platforms=("cuda",)).as_text()
  assert ("mosaic_gpu" in text) == uses_kernel
  # the W4A4 activation quantize (any float dtype), gathered, rotated or in order: the
  # kernel from NORM_KERNEL_MIN_ROWS rows wherever D fits it
  rows = x.reshape(-1, d)
  tall = jnp.tile(rows, (-(-dispatch.NORM_KERNEL_MIN_ROWS // rows.shape[0]), 1))
  for p, rotate in ((perm, False), (None, False), (None, True), (perm, True)):
    assert ("mosaic_gpu" in _quantize_lowered(tall, p, rotate)) == (d % 64 == 0)
    assert "mosaic_gpu" not in _quantize_lowered(tall[:dispatch.NORM_KERNEL_MIN_ROWS - 4], p,
                                                 rotate)


def _quantize_lowered(x2, perm, rotate: bool) -> str:
  """The CUDA lowering (made on the CPU) of the mosaic backend's W4A4 activation quantize."""
  import jax
  def g(x):
    return dispatch._quantize_activations(x, jnp.float32(0.01), perm, rotate)  # noqa: SLF001
  return jax.jit(g).trace(x2).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.skipif(not interpret.AVAILABLE, reason="JAX GPU interpreter not available")
@pytest.mark.parametrize("rotate", [False, True])
def test_mosaic_quantize_cuts_wide_rows_in_order(monkeypatch, rotate):
  """In order, rows wider than ``QUANTIZE_ROW`` (a multiple of it) reach the norm kernel cut
  into rows of that width (run here under the GPU interpreter): the same float16 values as
  the plain-jnp quantize of the whole rows, bit for bit; a gather keeps whole rows."""
  from pqjax_kernels import norm, norm_kernel
  monkeypatch.setattr(dispatch, "_norm_kernel_runs", lambda: True)
  monkeypatch.setattr(dispatch, "QUANTIZE_ROW", 128)
  seen, kernel = [], norm_kernel.norm_quantize
  def spy(x, perm, **kw):
    seen.append(x.shape)
    with interpret.gpu_interpreter():
      return kernel(x, perm, interpret=True, **kw)
  monkeypatch.setattr(norm_kernel, "norm_quantize", spy)
  rng = np.random.default_rng(11 + rotate)
  m, d = dispatch.NORM_KERNEL_MIN_ROWS, 384
  x2 = jnp.asarray(rng.standard_normal((m, d)) * 3, jnp.bfloat16)
  ts = jnp.float32(0.01)
  got = dispatch._quantize_activations(x2, ts, None, rotate)  # noqa: SLF001
  want = norm.gathered_quantize(x2, None, out="nvfp4_f16", tensor_scale=ts, hadamard=rotate)
  assert seen == [(m * 3, 128)] and got.values.shape == (m, d)
  np.testing.assert_array_equal(np.asarray(got.values), np.asarray(want.values))
  perm = jnp.asarray(rng.permutation(d), jnp.int32)
  dispatch._quantize_activations(x2, ts, perm, rotate)  # noqa: SLF001
  assert seen[-1] == (m, d)


@pytest.mark.parametrize("backend", ["reference", "mosaic"])
@pytest.mark.parametrize("act_format", [None, "nvfp4"])
def test_linear_parts_equal_the_concatenation(backend, act_format):
  """``x`` as parts (``converters.layers.linear_concat``) where no kernel runs (the reference;
  mosaic off the tiling, K = 192): the linear of their concatenation, bit for bit; parts
  that do not add up to K raise."""
  rng = np.random.default_rng(14)
  w = qmatmul.quantize_weight(rng.standard_normal((192, 128)).astype(np.float32), "nvfp4")
  parts = [jnp.asarray(rng.standard_normal((2, 3, k)), jnp.bfloat16) for k in (64, 128)]
  kw = dict(act_format=act_format, backend=backend,
            act_tensor_scale=None if act_format is None else jnp.float32(0.01))
  got = dispatch.linear(tuple(parts), w, **kw)
  want = dispatch.linear(jnp.concatenate(parts, axis=-1), w, **kw)
  assert got.shape == (2, 3, 128)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  with pytest.raises(ValueError, match=r"\(2, 3, 128\)"):
    dispatch.linear((parts[1],), w, **kw)


def _lowered_parts_linear(parts, w, **kw):
  import jax
  f = lambda ps: dispatch.linear(ps, w, act_format="nvfp4", backend="mosaic",  # noqa: E731
                                 act_tensor_scale=jnp.float32(0.01), **kw)
  return jax.jit(f).trace(parts).lower(lowering_platforms=("cuda",)).as_text()


def test_mosaic_quantizes_parts_in_place(monkeypatch):
  """Traced on the mosaic backend, a W4A4 linear given parts from ``NORM_KERNEL_MIN_ROWS``
  rows quantizes them in place (the norm kernel with the parts: no concatenation in the
  program); with an input gather, below those rows, or under ``fusion(False)`` it
  concatenates them first."""
  import re
  import jax
  monkeypatch.setattr(dispatch, "_norm_kernel_runs", lambda: True)
  rng = np.random.default_rng(15)
  w = qmatmul.quantize_weight(rng.standard_normal((384, 128)).astype(np.float32), "nvfp4")
  m = dispatch.NORM_KERNEL_MIN_ROWS
  parts = tuple(jax.ShapeDtypeStruct((m, k), jnp.bfloat16) for k in (128, 256))
  cat = re.compile(rf"concatenate[^\n]*{m}x384")
  text = _lowered_parts_linear(parts, w)
  assert "mosaic_gpu" in text and not cat.search(text)
  assert dispatch._quantizes_parts(parts, w, "nvfp4", None, False, "mosaic")  # noqa: SLF001
  assert cat.search(_lowered_parts_linear(parts, w, in_perm=jnp.arange(384, dtype=jnp.int32)))
  with dispatch.fusion(False):
    assert cat.search(_lowered_parts_linear(parts, w))
  few = tuple(jax.ShapeDtypeStruct((m - 1, k), jnp.bfloat16) for k in (128, 256))
  assert re.search(rf"concatenate[^\n]*{m - 1}x384", _lowered_parts_linear(few, w))


def _norm_then_linears(x, perm, kw, ws, ts, rotate=False, other=None):
  """What a norm site computes: the gathered norm, then W4A4 linears reading its output
  (``other``: one more reading a different array of the same values)."""
  y = dispatch.gathered_norm(x, perm, backend="mosaic", **kw)
  outs = [dispatch.linear(y, w, act_format="nvfp4", act_tensor_scale=ts, rotate=rotate,
                          backend="mosaic") for w in ws]
  if other is not None:
    outs.append(dispatch.linear(y + 0, other, act_format="nvfp4", act_tensor_scale=ts,
                                backend="mosaic"))
  return outs


def test_mosaic_norm_site_quantizes_in_the_norm_pass(monkeypatch):
  """Traced on the mosaic backend, W4A4 linears reading the very array ``gathered_norm``
  returned quantize it in one norm-kernel pass from the norm's input (rounded to bf16:
  ``round_to``), with the norm's arguments; a linear reading another array quantizes that
  (plain quantize, ``kind="none"``), as all do under ``fusion(False)``. The registry
  holds arrays only weakly (a tracer reaches its whole trace)."""
  import weakref
  import jax
  from pqjax_kernels import norm_kernel
  monkeypatch.setattr(dispatch, "_norm_kernel_runs", lambda: True)
  calls, entries, kernel = [], [], norm_kernel.norm_quantize
  def spy(x, perm, **kw):
    calls.append((kw.get("kind"), kw.get("out"), kw.get("round_to"), perm is not None,
                  kw.get("hadamard", False)))
    if kw.get("round_to") is not None:  # the registry while the trace is alive
      entries.extend(dispatch._NORM_OUTPUTS.values())  # noqa: SLF001
    return kernel(x, perm, **kw)
  monkeypatch.setattr(norm_kernel, "norm_quantize", spy)
  rng = np.random.default_rng(8)
  x, perm, kw = _norm_args(rng, b=2, t=256, d=256)
  ws = [qmatmul.quantize_weight(rng.standard_normal((256, 128)).astype(np.float32), "nvfp4")
        for _ in range(3)]
  ts = jnp.float32(0.01)
  for rotate in (False, True):
    calls.clear()
    f = lambda x, p: _norm_then_linears(x, p, kw, ws[:2], ts, rotate, ws[2])  # noqa: E731
    text = jax.jit(f).trace(x, perm).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text
    fused = ("layer", "nvfp4_f16", jnp.bfloat16, True, rotate)
    assert calls == [("layer", "bf16", None, True, False), fused, fused,
                     ("none", "nvfp4_f16", None, False, False)]
  calls.clear()
  with dispatch.fusion(False):  # two passes: the plain quantize of the norm's output
    jax.jit(lambda x, p: _norm_then_linears(x, p, kw, ws[:1], ts)).trace(x, perm).lower(
        lowering_platforms=("cuda",))
  assert calls == [("layer", "bf16", None, True, False), ("none", "nvfp4_f16", None, False,
                                                          False)]
  assert entries
  for ref, fields in entries:
    assert isinstance(ref, weakref.ref) and isinstance(fields["x"], weakref.ref)
    assert not [k for k, v in fields.items() if isinstance(v, jax.Array)]


def test_quantized_model_norm_sites_take_the_one_pass(monkeypatch):
  """In a model from ``pqjax.quantize`` traced on the mosaic backend, the norm sites'
  consumers reach the one-pass norm + quantize: the converted modules hand the norm's output
  array itself to the linears."""
  import jax
  import pqjax
  from pqjax_kernels import norm_kernel
  from tests.test_pipeline_toy import make_toy, toy_batch
  bf16 = jnp.bfloat16  # the norm kernel's dtype
  model = make_toy(dim=128, ff_dim=256, outliers=30.0, dtype=bf16)
  cfg = pqjax.QuantConfig(method="permuquant", error_tokens=64)
  with dispatch.use_backend("mosaic"):
    q = pqjax.quantize(model, [toy_batch(s, tokens=16, dtype=bf16) for s in (1, 2)], cfg)
  monkeypatch.setattr(dispatch, "_norm_kernel_runs", lambda: True)
  monkeypatch.setattr(dispatch, "NORM_KERNEL_MIN_ROWS", 1)
  fused, kernel = [], norm_kernel.norm_quantize
  def spy(x, perm, **kw):
    fused.append(kw.get("round_to") is not None)
    return kernel(x, perm, **kw)
  monkeypatch.setattr(norm_kernel, "norm_quantize", spy)
  graphdef, state = nnx.split(q)
  batch = toy_batch(1, tokens=16, dtype=bf16)
  with dispatch.use_backend("mosaic"):
    jax.jit(lambda st, b: nnx.merge(graphdef, st)(**b)).trace(state, batch).lower(
        lowering_platforms=("cuda",))
  assert any(fused)


def test_mosaic_quantize_codes_where_values_do_not_fit(monkeypatch):
  """Where a row block with float16 values exceeds the norm kernel's shared memory but one
  with codes fits, the site still quantizes in the kernel (codes, decoded by XLA)."""
  from pqjax_kernels import norm_kernel
  monkeypatch.setattr(dispatch, "_norm_kernel_runs", lambda: True)
  rng = np.random.default_rng(7)
  d = 256
  x2 = jnp.asarray(rng.standard_normal((dispatch.NORM_KERNEL_MIN_ROWS, d)), jnp.bfloat16)
  perm = jnp.asarray(rng.permutation(d), jnp.int32)
  # 4-row blocks: float16 values 4 * 256 * 4 + 512 (int16 perm) = 4608 bytes, codes 3136
  monkeypatch.setattr(norm_kernel, "SMEM_BYTES", 4000)
  assert not norm_kernel.accepts(x2, perm, kind="none", hadamard=True, out="nvfp4_f16")
  assert norm_kernel.accepts(x2, perm, kind="none", hadamard=True, out="nvfp4")
  assert "mosaic_gpu" in _quantize_lowered(x2, perm, True)
  assert "mosaic_gpu" in _quantize_lowered(x2, perm, False)
  monkeypatch.setattr(norm_kernel, "SMEM_BYTES", 2000)  # neither fits: XLA's fusion
  assert "mosaic_gpu" not in _quantize_lowered(x2, perm, False)


@pytest.mark.skipif(not interpret.has_gpu(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("m,act_format", [(1024, "nvfp4"), (16, "nvfp4"), (1024, None)])
def test_mosaic_gelu_epilogue_on_gpu(m, act_format):
  """A W4A4 / W4A16 linear with its tanh-GELU in the matmul's epilogue (the streaming kernel
  at 1024 rows, the small-M kernel's XLA epilogue at 16) against the GELU applied after
  (``fusion(False)``): the same products and sums, so they differ by the GELU of the
  float32 result against that of its bf16 rounding (|gelu'| < 1.13 times 2**-9 relative)
  plus the final rounding (2**-9): within 2**-7 of the result's magnitude, with an absolute
  floor of 2**-8 of the largest result where GELU is near zero."""
  import jax
  rng = np.random.default_rng(13)
  w = qmatmul.quantize_weight(rng.standard_normal((3072, 3072)).astype(np.float32) * 0.05,
                              "nvfp4")
  x = jnp.asarray(rng.standard_normal((m, 3072)), jnp.bfloat16)
  f = lambda x: dispatch.linear(x, w, act_format=act_format, epilogue="gelu_tanh",  # noqa: E731
                                act_tensor_scale=jnp.float32(0.01) if act_format else None)
  got = np.asarray(jax.jit(f)(x), np.float64)
  with dispatch.fusion(False):
    apart = np.asarray(jax.jit(lambda x: f(x))(x), np.float64)
  assert np.isfinite(got).all()
  tol = 2.0**-7 * np.abs(apart) + 2.0**-8 * np.abs(apart).max()
  assert (np.abs(got - apart) <= tol).all()


@pytest.mark.skipif(not interpret.has_gpu(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("rotate", [False, True])
def test_mosaic_norm_site_on_gpu(rotate):
  """A norm site's W4A4 linears, jitted: the norm and quantize in one kernel pass give what
  the two passes give (the norm kernel's bf16 output, quantized) within the activation
  rounding (2**-8: a bf16 result at a boundary may round either way) plus float32 sums."""
  import jax
  from pqjax_kernels import matmul_fp4 as fm
  from pqjax_kernels import norm
  rng = np.random.default_rng(9 + rotate)
  x, perm, kw = _norm_args(rng, b=2, t=512, d=3072)
  w = qmatmul.quantize_weight(rng.standard_normal((3072, 256)).astype(np.float32), "nvfp4")
  ts = jnp.float32(0.004)
  f = lambda x, p: _norm_then_linears(x, p, kw, [w], ts, rotate)[0]  # noqa: E731
  got = np.asarray(jax.jit(f)(x, perm), np.float64)
  with dispatch.fusion(False):
    two = np.asarray(jax.jit(lambda x, p: f(x, p))(x, perm), np.float64)
  y = dispatch.gathered_norm(x, perm, backend="reference", **kw)
  q = norm.gathered_quantize(y.reshape(-1, 3072), None, tensor_scale=ts, hadamard=rotate)
  xd = np.asarray(fm.dequantize(q.codes, q.scales, q.tensor_scale, "nvfp4"), np.float64)
  wd = np.asarray(fm.dequantize(w.codes, w.scales, w.tensor_scale, "nvfp4"), np.float64)
  bound = np.abs(xd) @ np.abs(wd).T * (2.0**-8 + (3072 + 2) * 2.0**-24) + 1e-30
  assert (np.abs(got.reshape(-1, 256) - two.reshape(-1, 256)) <= 2 * bound).all()


@pytest.mark.skipif(not interpret.has_gpu(), reason="needs a CUDA GPU")
def test_mosaic_norm_matches_reference_on_gpu():
  """The kernel path against the reference path: statistics summed in another order, so
  within one bf16 ulp plus the float32 error where terms cancel (``tests/bounds.py``)."""
  x, perm, kw = _norm_args(np.random.default_rng(5), b=2, t=256, d=3072)
  got = dispatch.gathered_norm(x, perm, backend="mosaic", **kw)
  ref = dispatch.gathered_norm(x, perm, backend="reference", **kw)
  assert got.dtype == ref.dtype == jnp.bfloat16
  err = np.abs(np.asarray(got, np.float64) - np.asarray(ref, np.float64))
  kw.pop("eps")
  assert (err <= bounds.norm_bf16_tolerance(x, ref, perm=perm, **kw)).all()


@pytest.mark.skipif(not interpret.has_gpu(), reason="needs a CUDA GPU")
# 32, 80: the Mosaic matmul and the decode + XLA dot path, XLA's activation quantize; 600:
# the streaming kernel on the norm kernel's activation values, gathered and in order
@pytest.mark.parametrize("m", [32, 80, 600])
@pytest.mark.parametrize("rotate", [False, True])
def test_mosaic_w4a4_gathered_linear_on_gpu(m, rotate):
  """W4A4 with an input permutation (and block Hadamard: then both fused into the norm
  kernel's activation quantize) gives what gathering first gives; the product of the
  ``norm.gathered_quantize`` codes is within the XLA path's activation rounding (2**-8)
  plus float32 sums in another order, of the float64 product and of the reference backend
  (which quantizes with ``pqjax.formats``: the same codes)."""
  from pqjax_kernels import matmul_fp4 as fm
  from pqjax_kernels import norm
  rng = np.random.default_rng(6 + rotate)
  k = 256
  w = qmatmul.quantize_weight(rng.standard_normal((k, 128)).astype(np.float32), "nvfp4")
  x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
  perm = jnp.asarray(rng.permutation(k), jnp.int32)
  ts = jnp.float32(0.01)
  kw = dict(act_format="nvfp4", act_tensor_scale=ts, out_dtype=jnp.float32, rotate=rotate)
  got = np.asarray(dispatch.linear(x, w, in_perm=perm, backend="mosaic", **kw))
  xg = jnp.take(x, perm, axis=-1)
  np.testing.assert_array_equal(got, np.asarray(dispatch.linear(xg, w, backend="mosaic", **kw)))
  q = norm.gathered_quantize(x, perm, tensor_scale=ts, hadamard=rotate)
  xd = np.asarray(fm.dequantize(q.codes, q.scales, q.tensor_scale, "nvfp4"), np.float64)
  wd = np.asarray(fm.dequantize(w.codes, w.scales, w.tensor_scale, "nvfp4"), np.float64)
  bound = np.abs(xd) @ np.abs(wd).T * (2.0**-8 + (k + 2) * 2.0**-24) + 1e-30
  assert (np.abs(got - xd @ wd.T) <= bound).all()
  ref = np.asarray(dispatch.linear(x, w, in_perm=perm, backend="reference", **kw), np.float64)
  assert (np.abs(got - ref) <= 2 * bound).all()


@pytest.mark.skipif(not interpret.has_gpu(), reason="needs a CUDA GPU")
def test_mosaic_parts_linear_on_gpu():
  """A W4A4 linear given parts (quantized in place by the norm kernel) against the same
  linear given their concatenation, jitted on the GPU: the same float16 values reach the
  same matmul, so the outputs are equal bit for bit."""
  import jax
  rng = np.random.default_rng(16)
  w = qmatmul.quantize_weight(rng.standard_normal((4096, 256)).astype(np.float32), "nvfp4")
  parts = tuple(jnp.asarray(rng.standard_normal((2, 520, k)), jnp.bfloat16)
                for k in (3072, 1024))
  kw = dict(act_format="nvfp4", act_tensor_scale=jnp.float32(0.004), backend="mosaic")
  assert dispatch._quantizes_parts(parts, w, "nvfp4", None, False, "mosaic")  # noqa: SLF001
  got = jax.jit(lambda ps: dispatch.linear(ps, w, **kw))(parts)
  want = jax.jit(lambda ps: dispatch.linear(jnp.concatenate(ps, axis=-1), w, **kw))(parts)
  assert got.shape == (2, 520, 256) and np.isfinite(np.asarray(got, np.float32)).all()
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


"""Correctness checks and side-by-side timings of the pqjax kernels on one GPU.

    python benchmarks/bench_kernels.py --out DIR [--prev OLD.json] [--tiny]

For every timed (shape, M): fresh random weights per shape and activations per M, and the
device memory poisoned with NaN before each checked call; each of our W4A4 NVFP4 candidates
(``fp4_matmul`` with ``method`` "xla", "kernel" and tiling variants of the kernel) is
checked against a float32 HIGHEST reference computed on the same GPU from the same inputs:
relative Frobenius error <= 2**-8 (bf16 unit roundoff of the output; products are exact and
the float32 accumulation adds ~1e-6) and nothing NaN. Then kernel time (CUPTI,
summed over the kernels of one call, median) and wall time per call beside XLA bf16
``jnp.dot`` and ``jax.nn.scaled_matmul`` NVFP4 (skipped where ``--prev`` already holds it);
each timed call runs R weight buffers (each its own array, R from the candidate's own weight
bytes so that they exceed L2) and the times are divided by R. Gathered norm: XLA's fusion of
gather + LayerNorm + NVFP4 quantize (the shipped path) versus the same reading in order,
versus the bf16-output norm, versus the Mosaic GPU kernel (``norm_kernel``; its fraction of
codes differing from the reference is recorded), versus a device copy.
The JSON (``kernels_<device>_<date>.json`` under ``--out``) is rewritten after every row, so
a run stopped at its time limit keeps what it measured. ``--tiny``: small shapes on the CPU,
the XLA candidates only (wall time), to test this script; the kernels are tested on the CPU
by ``tests/test_kernels_matmul.py`` under the GPU interpreter.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import functools
import itertools
import json
import os
import re
import statistics
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from pqjax_kernels import matmul_fp4 as fm  # noqa: E402
from pqjax_kernels import norm as gn  # noqa: E402
from pqjax_kernels import norm_kernel as nk  # noqa: E402

SHAPES_KN = [(3072, 12288), (12288, 3072), (3072, 3072), (1152, 4608)]
MS = [16, 4096, 1024, 256]
L2_DEFEAT_BYTES = 128 << 20
MAX_REPS = 8
REL_TOL = 2.0**-8 + 1e-5


def _rand_weights(key, n, k):
  """Random NVFP4 weights: uniform codes, e4m3 block scales in [2**-3, 2**3], tensor scale."""
  k1, k2 = jax.random.split(key)
  codes = jax.random.randint(k1, (n, k // 2), 0, 256, jnp.int32).astype(jnp.uint8)
  scales = (2.0 ** jax.random.uniform(k2, (n, k // 16), minval=-3, maxval=3)).astype(
      jnp.float8_e4m3fn)
  return codes, scales, jnp.float32(0.01)


def _rand_act(key, m, k):
  return jax.random.normal(key, (m, k), jnp.float32).astype(jnp.bfloat16)


def _reps(bytes_per_weight):
  return int(min(MAX_REPS, max(min(2, MAX_REPS), -(-L2_DEFEAT_BYTES // bytes_per_weight))))


def _f4(codes_u8, rows, k):
  """Packed uint8 E2M1 codes -> float4_e2m1fn (rows, k) for ``jax.nn.scaled_matmul``."""
  vals = fm._decode_values(codes_u8, "nvfp4")
  return vals.astype(jnp.float4_e2m1fn).reshape(rows, k)


def _w4a4_reference(qa, w_dequant) -> np.ndarray:
  """Float64 copy of the float32 HIGHEST product of the dequantized NVFP4 activations ``qa``
  and dequantized weights ``w_dequant`` (N, K): what every candidate is checked against."""
  a = fm.dequantize(qa.codes, qa.scales, qa.tensor_scale, "nvfp4")
  return np.asarray(jnp.dot(a, w_dequant.T, precision=jax.lax.Precision.HIGHEST), np.float64)


def _check(out, ref: np.ndarray) -> tuple[float, bool]:
  """(relative Frobenius error of ``out`` against ``ref``, whether it passes: finite and
  within ``REL_TOL``)."""
  o = np.asarray(out, np.float64)
  rel = float(np.linalg.norm(o - ref) / max(np.linalg.norm(ref), 1e-30))
  return rel, bool(np.isfinite(o).all()) and rel <= REL_TOL


def replot(path: str | None, draw) -> bool:
  """A script's ``--plot RESULTS.json``: ``draw(results, png_path)`` with the PNG beside the
  JSON; whether there was one to draw (the script then stops)."""
  if not path:
    return False
  with open(path) as f:
    draw(json.load(f), os.path.splitext(path)[0] + ".png")
  return True


def _poison(nbytes: int = 512 << 20) -> None:
  """Fills a NaN buffer and frees it, so that the buffers of the next call (the checked one;
  XLA's allocator hands the freed memory out again) start as NaN: a kernel that leaves part
  of its output unwritten then fails the finite check instead of passing on stale values of
  an earlier call with the same shapes."""
  jnp.full((nbytes // 4,), jnp.nan, jnp.float32).block_until_ready().delete()


class Timer:
  """Kernel time from CUPTI on a GPU; wall time only (kernel = NaN) under ``--tiny``. With
  ``breakdown``, ``kernels`` holds the last call's median time per kernel (us per op, by
  name: an XLA fusion's share of the whole is otherwise invisible)."""

  def __init__(self, tiny: bool, breakdown: bool = False):
    self.tiny = tiny
    self.breakdown = breakdown and not tiny
    self.kernels = {}

  def __call__(self, fn, args, reps):
    """(median kernel us per op, median wall us per op, first output)."""
    self.kernels = {}
    if not self.tiny:
      _poison()
    out = jax.block_until_ready(fn(*args))
    kern = float("nan")
    if not self.tiny:
      from jax.experimental.mosaic.gpu import profiler
      _, kt = profiler.measure(fn, iterations=20)(*args)
      kern = statistics.median(kt) * 1e3 / reps if kt else float("nan")
      if self.breakdown:
        _, its = profiler.measure(fn, aggregate=False, iterations=10)(*args)
        self.kernels = {name: statistics.median(
            sum(t for nm, t in it if nm == name) for it in its) * 1e3 / reps
            for name in dict.fromkeys(nm for nm, _ in its[0])}
    walls = []
    for _ in range(1 if self.tiny else 3):
      t0 = time.perf_counter()
      for _ in range(1 if self.tiny else 5):
        o = fn(*args)
      jax.block_until_ready(o)
      walls.append((time.perf_counter() - t0) / (1 if self.tiny else 5) * 1e6 / reps)
    return kern, statistics.median(walls), out


def _ours(method, config=None, interpret=False):
  def f(ac, asc, ats, pws):
    return [fm.fp4_matmul(ac, p, a_scales=asc, a_tensor_scale=ats, method=method,
                          config=config, interpret=interpret) for p in pws]
  return jax.jit(f)


def _stream_only(pw, at, config):
  """Diagnostic: the kernel's memory traffic with an empty body (the activation slice loaded
  once per CTA, then its weight tiles one K tile per step): the ceiling that access pattern
  allows. Its pipeline is ``emit_pipeline`` (the kernel's own until version 7), not the
  kernel's hand-written per-warpgroup one, and it ignores ``k_tiles``, ``warpgroups`` and
  ``overlap_wgmma``: since version 8 the kernel alone can beat it (13.0 vs 14.4 us at
  16 x 3072 x 12288, H200)."""
  import jax.experimental.pallas as pl
  import jax.experimental.pallas.mosaic_gpu as plgpu
  n, k = pw.shape
  tm, tiles, tk = config.tile_m, config.tiles_per_cta, fm.TILE_K
  steps = k // tk // config.k_splits

  def kernel(at_gmem, wq_gmem, ws_gmem, out_gmem, act_smem, barrier):
    ni, mi, si = (jax.lax.axis_index(a) for a in ("n", "m", "s"))
    for j in range(steps):
      plgpu.copy_gmem_to_smem(at_gmem.at[pl.ds((si * steps + j) * tk, tk), pl.ds(mi * tm, tm)],
                              act_smem.at[j], barrier.at[0])
    sl = (pl.ds(ni * tiles, tiles), pl.ds(si * steps, steps))

    def body(idx, *_):
      @pl.when((idx[0] == 0) & (idx[1] == 0))
      def _():
        plgpu.barrier_wait(barrier.at[0])

    plgpu.emit_pipeline(
        body, grid=(tiles, steps), max_concurrent_steps=config.max_concurrent_steps,
        in_specs=[plgpu.BlockSpec((1, 1, fm.TILE_N, tk), lambda t, kk: (t, kk, 0, 0),
                                  transforms=fm._CODES_TRANSFORMS),
                  plgpu.BlockSpec((1, 1, tk // pw.group_size, fm.TILE_N),
                                  lambda t, kk: (t, kk, 0, 0))])(
        wq_gmem.at[sl], ws_gmem.at[sl])

  call = plgpu.kernel(
      kernel, out_type=jax.ShapeDtypeStruct((8,), jnp.float32),
      grid=(n // fm.TILE_N // tiles, at.shape[1] // tm, config.k_splits),
      grid_names=("n", "m", "s"),
      scratch_types=[plgpu.SMEM((steps, tk, tm), at.dtype, transforms=fm._swz(fm._SWIZZLE)),
                     plgpu.Barrier(num_arrivals=steps, num_barriers=1)])
  return call(at, pw.codes, pw.scales_t)


def _candidates(m, n, k, interpret):
  """Our W4A4 candidates for this M: name -> (method, config)."""
  c = {"ours_w4a4_xla": ("xla", None)}
  if m <= 64 and not interpret:  # kernels under the interpreter inside jit hang on the CPU
    seen = set()
    # default_config's tiling, then with two K tiles per step, 4 CTAs per SM, two warpgroups
    # per CTA (the variants that were best or tied in versions 7 and 8); then the default
    # tiling with overlap_wgmma off (each step's wgmma waited for: versions 8 and earlier)
    for wgs, kt, occ in [(1, 1, None), (1, 2, None), (1, 1, 4), (1, 2, 4), (2, 1, None)]:
      cfg = fm.default_config(m, n, k, ctas_per_sm=occ, k_tiles=kt, warpgroups=wgs)
      if cfg not in seen:
        seen.add(cfg)
        c["ours_w4a4_kernel" + ("" if wgs == 1 else f"_wg{wgs}")
          + ("" if occ is None else f"_occ{occ}") + ("" if kt == 1 else f"_kt{kt}")] = (
              "kernel", cfg)
    if m <= 8:  # beside default_config's 8-row activation tile, the 16-row one (version 28)
      c["ours_w4a4_kernel_tm16"] = (
          "kernel", dataclasses.replace(fm.default_config(m, n, k), tile_m=16))
    c["ours_w4a4_kernel_serial"] = (
        "kernel", dataclasses.replace(fm.default_config(m, n, k), overlap_wgmma=False))
    if n // fm.TILE_N >= 132:  # the streaming kernel, unsplit, only where N fills the SMs
      c["ours_w4a4_stream"] = ("kernel", fm.stream_config(m, n, k, warpgroups=1))
    # the streaming kernel with K split and the splits summed in the kernel (in the cluster,
    # or in order), where the small-M kernel's float32 partials cost an XLA pass (version 30)
    for s, kind in itertools.product((2, 4, 8), ("cl", "fx")):
      try:
        cfg = fm.stream_config(m, n, k, k_splits=s, cluster_splits=kind == "cl",
                               fixup_splits=kind == "fx")
        fm._check_config(cfg, n, k, 2)
      except ValueError:
        continue
      c[f"ours_w4a4_stream_{kind}{s}"] = ("kernel", cfg)
  elif not interpret:  # the streaming kernel (auto_config's from STREAM_MIN_M), beside XLA
    # its default tiling, then tile_m 128 (version 12's default) with the automatic number of
    # consumer warpgroups and with the other one; where the default leaves SMs idle in its
    # last wave or cannot use tile_m 256, K split in 2, 3 and 4 (version 14: float32
    # partials; version 15: summed in the cluster's shared memory; version 17: summed in
    # order through a workspace, the last split finishing the tile)
    base = fm.stream_config(m, n, k)
    tm128 = fm.stream_config(m, n, k, tile_m=128)
    alt = 3 - tm128.warpgroups
    cands = [("", base), ("_tm128", tm128),
             (f"_tm128_wg{alt}", fm.stream_config(m, n, k, tile_m=128, warpgroups=alt))]
    if fm.wave_fill(base, m, n) < fm.STREAM_MIN_FILL or base.tile_m < 256:
      for s in (2, 3, 4):
        if (k // fm.TILE_K) % s == 0:
          cands.append((f"_ks{s}", fm.stream_config(m, n, k, k_splits=s)))
          fx = fm.stream_config(m, n, k, k_splits=s, fixup_splits=True)
          if fx.tile_m % 64 == 0:
            cands.append((f"_fx{s}", fx))
          cl = fm.stream_config(m, n, k, k_splits=s, cluster_splits=True)
          if cl.tile_m % (32 * s) == 0:
            cands.append((f"_cl{s}", cl))
    # two consumers with fitted_tile_m's tile, unsplit and K split in two summed in order
    for s in (1, 2):
      t = fm.fitted_tile_m(m, n, k_splits=s)
      if (k // fm.TILE_K) % s == 0 and (s == 1 or t % fm._FIX_CHUNK == 0):
        cands.append((f"_tm{t}" + ("" if s == 1 else f"_fx{s}"), fm.stream_config(
            m, n, k, tile_m=t, warpgroups=2, k_splits=s, fixup_splits=s > 1)))
    # each with the CTAs sweeping N for each block of rows (version 15), where the
    # activations outgrow the L2 cache
    if m * k * 2 > 2**24:
      cands += [(name + "_ni", dataclasses.replace(cfg, n_inner=True)) for name, cfg in cands]
    # auto_config's tiling with the activation codes decoded in the kernel (version 16:
    # 1.3-1.7x slower at every tiling timed; this one keeps it in view), at the deepest ring
    # that fits
    for name, cfg in [(nm, cfg) for nm, cfg in cands if cfg == fm.auto_config(m, n, k)]:
      for depth in range(cfg.max_concurrent_steps, 1, -1):
        ac = dataclasses.replace(cfg, act_codes=True, max_concurrent_steps=depth)
        try:
          fm._check_config(ac, n, k, 2 if cfg.k_splits == 1 else 4)
        except ValueError:
          continue
        cands.append((name + "_ac", ac))
        break
    # auto_config's tiling with extra CTAs decoding the activation codes (version 29): as
    # many as the SMs its CTAs leave idle, else 8
    auto = fm.auto_config(m, n, k)
    if auto.tile_m >= fm._DEC_ROWS:
      idle = 132 - fm._ctas(m, n, auto.tile_m, auto.tiles_per_cta, auto.k_splits)
      name = next(nm for nm, cfg in cands if cfg == auto)
      for d in sorted({idle if idle > 0 else 8, 8}):
        cands.append((f"{name}_dec{d}", dataclasses.replace(auto, decode_ctas=d)))
    for name, cfg in cands:
      if n % (fm.TILE_N * cfg.tiles_per_cta) == 0 and ("kernel", cfg) not in c.values():
        c["ours_w4a4_stream" + name] = ("kernel", cfg)
  return c


def bench_matmul(results, log, save, shapes, ms, prev, timer, interpret, only=""):
  key = jax.random.key(1)
  ctx = _interp_ctx(interpret)
  for k, n in shapes:
    key, kw = jax.random.split(key)
    r16 = _reps(n * k * 2)
    r4 = _reps(fm.weight_bytes(n, k))
    ws = [jax.random.normal(jax.random.fold_in(kw, i), (k, n), jnp.bfloat16)
          for i in range(r16)]
    q = [_rand_weights(jax.random.fold_in(kw, 100 + i), n, k) for i in range(max(r4, r16))]
    pws = [fm.prepare_weights(*qi) for qi in q[:r4]]
    wref = fm.dequantize(*q[0], "nvfp4")
    for m in ms:
      key, ka = jax.random.split(key)
      a = _rand_act(ka, m, k)
      qa = gn.quantize_nvfp4(a)
      ac, asc, ats = qa.codes, qa.scales, qa.tensor_scale
      ref = _w4a4_reference(qa, wref)
      row = dict(m=m, k=k, n=n, reps_bf16=r16, reps_4bit=r4)
      cands = {"xla_bf16": (jax.jit(lambda a, ws: [a @ w for w in ws]), (a, ws), r16)}
      if (m, k, n) not in prev and not interpret:
        f4 = [(_f4(qi[0], n, k), qi[1]) for qi in q[:r16]]
        cands["scaled_matmul_nvfp4"] = (jax.jit(lambda af, asc, f4: [
            jax.nn.scaled_matmul(af[None], c[None], asc[None], sc[None],
                                 preferred_element_type=jnp.bfloat16)[0] for c, sc in f4]),
            (_f4(ac, m, k), asc, f4), r16)
      if m > 64 and not interpret:  # diagnostic: the streaming kernel alone (no XLA decode)
        cfg0 = fm.auto_config(m, n, k)
        mp = -(-m // cfg0.tile_m) * cfg0.tile_m
        am = jnp.pad(fm.dequantize(ac, asc, 1.0, "nvfp4").astype(jnp.float16),
                     ((0, mp - m), (0, 0)))
        cands["diag_stream_kernel_only"] = (jax.jit(lambda am, pws: [
            fm._stream_call(am, p, cfg0, fm._out_scales(p.tensor_scale, ats),
                            jnp.dtype(jnp.bfloat16), False)
            for p in pws]), (am, pws), r4)
      if m <= 64 and not interpret:  # diagnostic: the Mosaic kernel alone (no XLA pro/epilogue)
        cfg0 = fm.default_config(m, n, k)
        mp = -(-m // cfg0.tile_m) * cfg0.tile_m
        am = jnp.pad(fm.dequantize(ac, asc, 1.0, "nvfp4").astype(jnp.float16),
                     ((0, mp - m), (0, 0)))
        at = am.T
        cands["diag_kernel_only"] = (jax.jit(lambda am, pws: [
            fm._kernel_call(am if cfg0.m_major else am.T, p, cfg0, False, cfg0.m_major)
            for p in pws]), (am, pws), r4)
        cands["diag_stream_only"] = (jax.jit(lambda at, pws: [
            _stream_only(p, at, cfg0) for p in pws]), (at, pws), r4)
      if not interpret:  # W4A4 from the NVFP4 values as float16 (what a norm kernel or
        # XLA's quantize can write instead of codes): no activation decode in the call
        vals = gn.nvfp4_values(qa)
        cands["ours_w4a4_values"] = (jax.jit(lambda av, avt, pws: [
            fm.fp4_matmul(av, p, a_tensor_scale=avt) for p in pws]),
            (vals.values, vals.tensor_scale, pws), r4)
      for name, (method, cfg) in _candidates(m, n, k, interpret).items():
        cands[name] = (_ours(method, cfg, interpret), (ac, asc, ats, pws), r4)
        if cfg is not None:
          row[name + "_config"] = dataclasses.asdict(cfg)
      refs = {}
      if m > 64:  # W4A16 (the bf16 activations): the XLA path and (GPU) the streaming kernel
        ref16 = np.asarray(jnp.dot(a.astype(jnp.float32), wref.T,
                                   precision=jax.lax.Precision.HIGHEST), np.float64)
        w4a16 = [("ours_w4a16_xla", "xla", None)] + ([] if interpret else [
            ("ours_w4a16_stream", "kernel", fm.stream_config(m, n, k))])
        for name, method, cfg in w4a16:
          cands[name] = (jax.jit(lambda a, pws, method=method, cfg=cfg: [
              fm.fp4_matmul(a, p, method=method, config=cfg) for p in pws]), (a, pws), r4)
          refs[name] = ref16
      cands = {c: v for c, v in cands.items() if c == "xla_bf16" or re.search(only, c)}
      for name, (fn, args, reps) in cands.items():
        try:
          with ctx():
            kern, wall, out = timer(fn, args, reps)
          if name.startswith("ours"):
            rel, ok = _check(out[0], refs.get(name, ref))
            row[name + "_rel_err"] = rel
            row[name + "_ok"] = ok
            results["check"].append(dict(mode=name, m=m, k=k, n=n, rel_err=rel, ok=ok))
        except Exception as e:  # keep going: report every failing candidate
          kern, wall = float("nan"), float("nan")
          row[name + "_ok"] = False
          results["check"].append(dict(mode=name, m=m, k=k, n=n, ok=False,
                                       error=f"{type(e).__name__}: {str(e)[:300]}"))
          log(f"  {name} M={m} K={k} N={n} raised {type(e).__name__}: {str(e)[:300]}")
        row[name + "_kernel_us"] = kern
        row[name + "_wall_us"] = wall
        if timer.breakdown and timer.kernels:
          row[name + "_kernels_us"] = timer.kernels
          log(f"  {name}: " + ", ".join(f"{nm[:40]} {t:.1f}"
                                        for nm, t in timer.kernels.items()))
      results["matmul"].append(row)
      save()
      log(f"M={m:5d} K={k:5d} N={n:5d} " + " ".join(
          f"{c}={row[c + '_kernel_us']:.1f}/{row[c + '_wall_us']:.1f}"
          + ("" if c + "_ok" not in row else ("" if row[c + "_ok"] else "(BAD)"))
          for c in cands))


def _norm_mismatch(got, ref) -> float:
  """Fraction of NVFP4 codes (or bf16 values) that differ from the reference's; near 0 (only
  values at rounding boundaries) when the kernel is right."""
  if isinstance(got, gn.NVFP4Activation):
    return float(np.mean(np.asarray(got.codes) != np.asarray(ref.codes)))
  if isinstance(got, gn.NVFP4Values):
    got, ref = got.values, ref.values
  return float(np.mean(np.asarray(got, np.float32) != np.asarray(ref, np.float32)))


def bench_norm(results, log, save, shapes, timer, sweep=False):
  key = jax.random.key(2)
  for (b, t, d) in shapes:
    k1, k2, k3 = jax.random.split(jax.random.fold_in(key, d * t), 3)
    x = jax.random.normal(k1, (b, t, d), jnp.bfloat16)
    perm = jax.random.permutation(k2, d).astype(jnp.int32)
    ident = jnp.arange(d, dtype=jnp.int32)
    friendly = jnp.asarray(nk.bank_friendly_perm(np.asarray(perm)))
    shift, scale = (jax.random.normal(k3, (2, b, d), jnp.float32) * 0.1)
    nbytes = b * t * d * 2
    r = _reps(nbytes)
    xs = [x + i for i in range(r)]
    copy = jax.jit(lambda xs: [xi + 1 for xi in xs])

    def norm_fn(out, ts, kernel=False, **kw):
      impl = nk.norm_quantize if kernel else gn.gathered_norm
      return jax.jit(lambda xs, p: [impl(xi, p, kind="layer", shift=shift, scale=scale,
                                         out=out, tensor_scale=ts, **kw) for xi in xs])

    def quant_fn(ts, kernel=False, hadamard=False, out="nvfp4"):
      impl = (functools.partial(nk.norm_quantize, kind="none") if kernel
              else gn.gathered_quantize)
      return jax.jit(lambda xs, p: [impl(xi, p, tensor_scale=ts, hadamard=hadamard, out=out)
                                    for xi in xs])

    ts = jnp.float32(0.01)
    q_bytes = nbytes + nbytes // 4 + nbytes // 16  # read bf16, write 4-bit codes + scales
    row = dict(b=b, t=t, d=d, reps=r, **{
        f"gather_wavefronts_{name}": float(nk.gather_wavefronts(np.asarray(p)).mean())
        for name, p in (("random", perm), ("bankfriendly", friendly))})
    # Each variant once: XLA's candidate, the Mosaic kernel's name (or None), a builder
    # taking ``kernel``, the arguments and the bytes moved.
    variants = [
        ("copy", None, lambda k: copy, (xs,), 2 * nbytes),
        ("gathered_norm_nvfp4_static", "kernel_gathered_nvfp4_static",
         lambda k: norm_fn("nvfp4", ts, k), (xs, perm), q_bytes),
        # the gather's code path reading in order (conflict-free loads), and reading the
        # same groups as perm reordered for fewer bank conflicts (nk.bank_friendly_perm)
        ("inorder_norm_nvfp4_static", "kernel_gathered_identity_nvfp4_static",
         lambda k: norm_fn("nvfp4", ts, k), (xs, ident), q_bytes),
        ("bankfriendly_norm_nvfp4_static", "kernel_gathered_bankfriendly_nvfp4_static",
         lambda k: norm_fn("nvfp4", ts, k), (xs, friendly), q_bytes),
        ("plain_norm_nvfp4_static", "kernel_inorder_nvfp4_static",
         lambda k: norm_fn("nvfp4", ts, k), (xs, None), q_bytes),
        ("gathered_norm_nvfp4_dynamic", "kernel_gathered_nvfp4_dynamic",
         lambda k: norm_fn("nvfp4", None, k), (xs, perm), q_bytes),
        ("gathered_norm_hadamard_static", "kernel_gathered_hadamard_static",
         lambda k: norm_fn("nvfp4", ts, k, hadamard=True), (xs, perm), q_bytes),
        ("gathered_norm_bf16", "kernel_gathered_bf16", lambda k: norm_fn("bf16", None, k),
         (xs, perm), 2 * nbytes),
        ("gathered_quantize_static", "kernel_gathered_quantize_static",
         lambda k: quant_fn(ts, k), (xs, perm), q_bytes),
        ("plain_quantize_static", "kernel_plain_quantize_static", lambda k: quant_fn(ts, k),
         (xs, None), q_bytes),
        ("gathered_quantize_hadamard_static", "kernel_gathered_quantize_hadamard_static",
         lambda k: quant_fn(ts, k, hadamard=True), (xs, perm), q_bytes),
        ("plain_quantize_hadamard_static", "kernel_plain_quantize_hadamard_static",
         lambda k: quant_fn(ts, k, hadamard=True), (xs, None), q_bytes),
        # the NVFP4 values as float16 (what a W4A4 matmul reads): XLA's fusion of gather,
        # quantize and decode (a W4A4 linear's activation step today) against the kernel
        ("gathered_quantize_values_static", "kernel_gathered_quantize_values_static",
         lambda k: quant_fn(ts, k, out="nvfp4_f16"), (xs, perm), 2 * nbytes),
        ("inorder_quantize_values_static", "kernel_gathered_identity_quantize_values_static",
         lambda k: quant_fn(ts, k, out="nvfp4_f16"), (xs, ident), 2 * nbytes),
        ("bankfriendly_quantize_values_static",
         "kernel_gathered_bankfriendly_quantize_values_static",
         lambda k: quant_fn(ts, k, out="nvfp4_f16"), (xs, friendly), 2 * nbytes),
        ("gathered_quantize_hadamard_values_static",
         "kernel_gathered_quantize_hadamard_values_static",
         lambda k: quant_fn(ts, k, hadamard=True, out="nvfp4_f16"), (xs, perm), 2 * nbytes)]
    # name, jitted fn, args, bytes moved, the XLA candidate it must agree with (or None)
    cands = [(name, build(False), args, moved, None)
             for name, _, build, args, moved in variants]
    cands += [(kname, build(True), args, moved, name)
              for name, kname, build, args, moved in variants if kname]
    # what a rotated W4A4 linear runs today: the kernel's codes, decoded by XLA
    codes_fn = quant_fn(ts, True, hadamard=True)
    cands.append(("kernel_gathered_quantize_hadamard_codes_decoded",
                  jax.jit(lambda xs, p: [gn.nvfp4_values(a) for a in codes_fn(xs, p)]),
                  (xs, perm), 2 * nbytes, "gathered_quantize_hadamard_values_static"))
    # The sweep: block height x chunk width for the gathered norm.
    for rows, chunk in itertools.product(nk.ROW_CHOICES, nk.CHUNK_CHOICES) if sweep else ():
      if nk.accepts(x, perm, shift=shift, scale=scale, rows=rows, chunk=chunk):
        cands.append((f"kernel_gathered_nvfp4_static_r{rows}_c{chunk}",
                      norm_fn("nvfp4", ts, True, rows=rows, chunk=chunk), (xs, perm), q_bytes,
                      "gathered_norm_nvfp4_static"))
    fns = {c[0]: c[1] for c in cands}
    for name, fn, args, moved, ref_name in cands:
      try:
        kern, wall, out = timer(fn, args, r)
        if ref_name:  # the Mosaic kernel against XLA's fusion of the reference
          row[name + "_mismatch"] = _norm_mismatch(out[0], fns[ref_name](*args)[0])
      except Exception as e:
        kern, wall = float("nan"), float("nan")
        log(f"  norm {name} raised {type(e).__name__}: {str(e)[:300]}")
      row[name + "_kernel_us"] = kern
      row[name + "_wall_us"] = wall
      row[name + "_TBps"] = moved / (kern * 1e-6) / 1e12
    results["norm"].append(row)
    save()
    log(f"norm {b}x{t}x{d}: " + " ".join(
        f"{c[:-10]}={row[c]:.1f}us" for c in row if c.endswith("_kernel_us")))


@contextlib.contextmanager
def _nothing():
  yield


def _interp_ctx(interpret):
  if not interpret:
    return _nothing
  from tests import interpret as it
  return it.gpu_interpreter


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--out", default=os.environ.get("OUT", "."))
  p.add_argument("--prev", default=None, help="earlier results JSON: skip its scaled_matmul")
  p.add_argument("--tiny", action="store_true", help="CPU + GPU interpreter, small shapes")
  p.add_argument("--skip-norm", action="store_true")
  p.add_argument("--skip-matmul", action="store_true")
  p.add_argument("--norm-sweep", action="store_true", help="also time rows / chunk choices")
  p.add_argument("--ms", default=",".join(map(str, MS)), help="comma-separated M values")
  p.add_argument("--shapes", default=None, help="comma-separated KxN, e.g. 3072x12288")
  p.add_argument("--breakdown", action="store_true",
                 help="also log and save each candidate's median time per kernel")
  p.add_argument("--only", default="", help="regex: time only the candidates it matches "
                 "(and XLA bf16)")
  args = p.parse_args()
  dev = jax.devices()[0]
  date = datetime.date.today().isoformat()
  name = dev.device_kind.replace(" ", "_")
  results = dict(device=dev.device_kind, jax_version=jax.__version__, date=date,
                 check=[], matmul=[], norm=[])
  path = os.path.join(args.out, f"kernels_{name}_{date}.json")
  logf = open(os.path.join(args.out, "bench_log.txt"), "w")

  def log(s):
    print(s, flush=True)
    logf.write(s + "\n")
    logf.flush()

  def save():
    results["check_ok"] = all(c["ok"] for c in results["check"])
    with open(path, "w") as f:
      json.dump(results, f, indent=1)

  prev = set()
  if args.prev:
    with open(args.prev) as f:
      prev = {(r["m"], r["k"], r["n"]) for r in json.load(f)["matmul"]
              if r.get("scaled_matmul_nvfp4_kernel_us") == r.get("scaled_matmul_nvfp4_kernel_us")}
  log(f"device {dev.device_kind} jax {jax.__version__}")
  timer = Timer(args.tiny, args.breakdown)
  if args.tiny:  # the interpreter runs each kernel call in seconds: one buffer per call
    global MAX_REPS
    MAX_REPS = 1
  t0 = time.time()
  try:
    if args.tiny:
      bench_matmul(results, log, save, [(256, 128)], [5, 80], prev, timer, True)
      if not args.skip_norm:
        bench_norm(results, log, save, [(2, 8, 64)], timer)
    else:
      if not args.skip_norm:
        bench_norm(results, log, save, [(2, 4608, 3072), (4, 1024, 1152)], timer,
                   args.norm_sweep)
      shapes = [] if args.skip_matmul else SHAPES_KN if not args.shapes else [
          tuple(int(v) for v in kn.split("x")) for kn in args.shapes.split(",")]
      bench_matmul(results, log, save, shapes, [int(v) for v in args.ms.split(",")],
                   prev, timer, False, args.only)
  except Exception:
    log(traceback.format_exc())
  save()
  log(f"done in {time.time() - t0:.0f} s; check_ok={results['check_ok']}")


if __name__ == "__main__":
  main()

"""Correctness checks and side-by-side timings of the pqjax kernels on one GPU.

    python benchmarks/bench_kernels.py --check --bench --out DIR

``--check``: for every DiT shape, fresh random inputs, ``fp4_matmul`` (W4A16 and W4A4 NVFP4)
against a float32 reference computed on the same GPU; the relative Frobenius error must
stay under 1e-5 (exact bf16 products, float32 accumulation) and nothing may be NaN.
``--bench``: kernel time (CUPTI, summed over the kernels of one call, median) and wall time
per call for XLA bf16 ``jnp.dot``, ``jax.nn.scaled_matmul`` NVFP4, and ``fp4_matmul``;
each timed call runs R weight buffers (each its own array, R large enough to exceed L2) and
the times are divided by R. Gathered norm: XLA's fusion of gather + LayerNorm + NVFP4
quantize versus the same reading in order and versus a device copy.
Writes ``kernels_<device>_<date>.json`` under ``--out`` and prints a table last.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
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

SHAPES_KN = [(3072, 3072), (3072, 12288), (12288, 3072), (1152, 4608)]
MS = [1, 16, 64, 256, 1024, 4096, 4608]
L2_DEFEAT_BYTES = 256 << 20


def _rand_weights(key, n, k):
  """Random NVFP4 weights: uniform codes, e4m3 block scales in [2**-3, 2**3], tensor scale."""
  k1, k2 = jax.random.split(key)
  codes = jax.random.randint(k1, (n, k // 2), 0, 256, jnp.int32).astype(jnp.uint8)
  scales = (2.0 ** jax.random.uniform(k2, (n, k // 16), minval=-3, maxval=3)).astype(
      jnp.float8_e4m3fn)
  return codes, scales, jnp.float32(0.01)


def _rand_act(key, m, k):
  return jax.random.normal(key, (m, k), jnp.float32).astype(jnp.bfloat16)


def _quant_act(a):
  q = gn.quantize_nvfp4(a)
  return q.codes, q.scales, q.tensor_scale


def _ref_gpu(a_f32, codes, scales, ts):
  w = fm.dequantize(codes, scales, ts, "nvfp4")
  return jnp.dot(a_f32, w.T, precision=jax.lax.Precision.HIGHEST,
                 preferred_element_type=jnp.float32)


def check(results, log):
  key = jax.random.key(0)
  ok_all = True
  for k, n in SHAPES_KN:
    for m in MS:
      key, k1, k2 = jax.random.split(key, 3)
      codes, scales, ts = _rand_weights(k1, n, k)
      a = _rand_act(k2, m, k)
      pw = fm.prepare_weights(codes, scales, ts)
      for mode in ("w4a16", "w4a4"):
        try:
          if mode == "w4a16":
            out = jax.jit(lambda a, pw: fm.fp4_matmul(a, pw, out_dtype=jnp.float32))(a, pw)
            ref = _ref_gpu(a.astype(jnp.float32), codes, scales, ts)
          else:
            ac, asc, ats = _quant_act(a)
            out = jax.jit(lambda ac, asc, ats, pw: fm.fp4_matmul(
                ac, pw, a_scales=asc, a_tensor_scale=ats, out_dtype=jnp.float32))(
                    ac, asc, ats, pw)
            ref = _ref_gpu(fm.dequantize(ac, asc, ats, "nvfp4"), codes, scales, ts)
          out = np.asarray(out, np.float64)
          ref = np.asarray(ref, np.float64)
          rel = float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))
          finite = bool(np.isfinite(out).all())
          ok = finite and rel < 1e-5
        except Exception as e:  # keep going: report every failing shape
          rel, finite, ok = float("nan"), False, False
          log(f"check {mode} M={m} K={k} N={n} raised {type(e).__name__}: {str(e)[:400]}")
        ok_all &= ok
        results["check"].append(dict(mode=mode, m=m, k=k, n=n, rel_err=rel, finite=finite,
                                     ok=ok))
        log(f"check {mode:5s} M={m:5d} K={k:5d} N={n:5d} rel={rel:.2e} ok={ok}")
  return ok_all


def _time(fn, args, reps, iters=20):
  """(median kernel us per op from CUPTI, median wall us per op)."""
  from jax.experimental.mosaic.gpu import profiler
  out = jax.block_until_ready(fn(*args))
  _, kt = profiler.measure(fn, iterations=iters)(*args)
  kern = statistics.median(kt) * 1e3 / reps if kt else float("nan")
  walls = []
  for _ in range(5):
    t0 = time.perf_counter()
    for _ in range(10):
      out = fn(*args)
    jax.block_until_ready(out)
    walls.append((time.perf_counter() - t0) / 10 * 1e6 / reps)
  return kern, statistics.median(walls)


def _reps(bytes_per_weight):
  return int(min(16, max(2, -(-L2_DEFEAT_BYTES // bytes_per_weight))))


def bench_matmul(results, log):
  key = jax.random.key(1)
  for k, n in SHAPES_KN:
    key, kw = jax.random.split(key)
    wb_bf16 = n * k * 2
    r = _reps(wb_bf16)
    ws = [jax.random.normal(jax.random.fold_in(kw, i), (k, n), jnp.bfloat16) for i in range(r)]
    q = [_rand_weights(jax.random.fold_in(kw, 100 + i), n, k) for i in range(r)]
    pws = [fm.prepare_weights(*qi) for qi in q]
    f4 = [(_f4(qi[0], n, k), qi[1]) for qi in q]
    for m in MS:
      key, ka = jax.random.split(key)
      a = _rand_act(ka, m, k)
      ac, asc, ats = _quant_act(a)
      row = dict(m=m, k=k, n=n, reps=r)
      cands = {
          "xla_bf16": (jax.jit(lambda a, ws: [a @ w for w in ws]), (a, ws)),
          "scaled_matmul_nvfp4": (jax.jit(lambda af, asc, f4: [
              jax.nn.scaled_matmul(af[None], c[None], asc[None], sc[None],
                                   preferred_element_type=jnp.bfloat16)[0] for c, sc in f4]),
              (_f4(ac, m, k), asc, f4)),
          "ours_w4a16": (jax.jit(lambda a, pws: [fm.fp4_matmul(a, p) for p in pws]), (a, pws)),
          "ours_w4a4": (jax.jit(lambda ac, asc, ats, pws: [
              fm.fp4_matmul(ac, p, a_scales=asc, a_tensor_scale=ats) for p in pws]),
              (ac, asc, ats, pws)),
      }
      for name, (fn, args) in cands.items():
        try:
          kern, wall = _time(fn, args, r)
        except Exception as e:
          kern, wall = float("nan"), float("nan")
          log(f"bench {name} M={m} K={k} N={n} raised {type(e).__name__}: {str(e)[:300]}")
        row[name + "_kernel_us"] = kern
        row[name + "_wall_us"] = wall
      results["matmul"].append(row)
      log("bench M={m:5d} K={k:5d} N={n:5d} ".format(**row) + " ".join(
          f"{c}={row[c + '_kernel_us']:.1f}/{row[c + '_wall_us']:.1f}" for c in cands))


def _f4(codes_u8, rows, k):
  """Packed uint8 E2M1 codes -> float4_e2m1fn (rows, k) for ``jax.nn.scaled_matmul``."""
  vals = fm._decode_values(codes_u8, "nvfp4")
  return vals.astype(jnp.float4_e2m1fn).reshape(rows, k)


def bench_norm(results, log):
  key = jax.random.key(2)
  for (b, t, d) in [(1, 4096, 3072), (2, 4608, 3072), (4, 1024, 1152)]:
    k1, k2, k3 = jax.random.split(jax.random.fold_in(key, d * t), 3)
    x = jax.random.normal(k1, (b, t, d), jnp.bfloat16)
    perm = jax.random.permutation(k2, d).astype(jnp.int32)
    ident = jnp.arange(d, dtype=jnp.int32)
    shift, scale = (jax.random.normal(k3, (2, b, d), jnp.float32) * 0.1)
    nbytes = b * t * d * 2
    r = _reps(nbytes)
    xs = [x + i for i in range(r)]
    copy = jax.jit(lambda xs: [xi + 1 for xi in xs])
    norm = jax.jit(lambda xs, p: [gn.reference(xi, p, kind="layer", shift=shift, scale=scale,
                                               out="nvfp4") for xi in xs])
    row = dict(b=b, t=t, d=d, reps=r)
    for name, fn, args, moved in [
        ("copy", copy, (xs,), 2 * nbytes),
        ("xla_gathered_norm_nvfp4", norm, (xs, perm), nbytes + nbytes // 4 + nbytes // 16),
        ("xla_inorder_norm_nvfp4", norm, (xs, ident), nbytes + nbytes // 4 + nbytes // 16)]:
      kern, wall = _time(fn, args, r)
      row[name + "_kernel_us"] = kern
      row[name + "_wall_us"] = wall
      row[name + "_TBps"] = moved / (kern * 1e-6) / 1e12
    results["norm"].append(row)
    log(f"norm {b}x{t}x{d}: " + " ".join(f"{c}={row[c + '_kernel_us']:.1f}us/"
                                          f"{row[c + '_TBps']:.2f}TB/s" for c in
                                          ("copy", "xla_gathered_norm_nvfp4",
                                           "xla_inorder_norm_nvfp4")))


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--check", action="store_true")
  p.add_argument("--bench", action="store_true")
  p.add_argument("--out", default=os.environ.get("OUT", "."))
  args = p.parse_args()
  dev = jax.devices()[0]
  date = datetime.date.today().isoformat()
  name = dev.device_kind.replace(" ", "_")
  results = dict(device=dev.device_kind, jax_version=jax.__version__, date=date,
                 check=[], matmul=[], norm=[])
  logf = open(os.path.join(args.out, "bench_log.txt"), "w")

  def log(s):
    print(s, flush=True)
    logf.write(s + "\n")
    logf.flush()

  log(f"device {dev.device_kind} jax {jax.__version__}")
  path = os.path.join(args.out, f"kernels_{name}_{date}.json")
  try:
    if args.check:
      results["check_ok"] = check(results, log)
    if args.bench:
      bench_matmul(results, log)
      bench_norm(results, log)
  except Exception:
    log(traceback.format_exc())
  with open(path, "w") as f:
    json.dump(results, f, indent=1)
  log("\n| M | K | N | XLA bf16 us | scaled_matmul us | ours W4A16 us | ours W4A4 us | "
      "speedup W4A4 vs bf16 |")
  for r in results["matmul"]:
    log(f"| {r['m']} | {r['k']} | {r['n']} | {r['xla_bf16_kernel_us']:.1f} | "
        f"{r['scaled_matmul_nvfp4_kernel_us']:.1f} | {r['ours_w4a16_kernel_us']:.1f} | "
        f"{r['ours_w4a4_kernel_us']:.1f} | "
        f"{r['xla_bf16_kernel_us'] / r['ours_w4a4_kernel_us']:.2f} |")
  log(f"check_ok={results.get('check_ok')}")


if __name__ == "__main__":
  main()

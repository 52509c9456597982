"""Diagnostic: what the small-M W4A4 kernel's body costs, part by part (H100/H200).

The small-M kernel (``fp4_matmul`` up to M = 64) runs at ~2x its empty-body weight stream
(NOTES_kernels.md, versions 7-10). This times the Mosaic kernel alone (``_kernel_call``, on
float16 activation values, default tiling) with parts of its body replaced by cheaper,
WRONG stand-ins, to find which part holds it back:

- ``shipped``: the kernel as it is (its output is checked against the float32 reference);
- ``no_cvt``: the E2M1 decode without its four ``cvt.rn.f16x2.e4m3x2`` (the byte permutes
  kept; the four words moved out instead);
- ``shift_and``: a decode of two integer instructions per f16x2 register (shift, and), no
  table look-up and no ``cvt``: the cost of a decode that places the E2M1 bits straight into
  float16 bits;
- ``no_scale``: the shipped decode, no block-scale multiply (the scales are still loaded);
- ``no_decode``: one rotate per register instead of the decode, and no scale multiply: the
  pipeline, ``wgmma`` and bookkeeping alone;
- ``no_wgmma``: no decode and no ``wgmma`` either (the loads and decode then go unused): the
  pipeline's copies, waits and output stores alone;
- ``*_auto_barriers``: ``shipped`` and ``no_decode`` with Pallas's automatic warpgroup
  barriers (a ``bar.sync`` before each TMA load: the kernel before version 22);
- ``stream_only``: ``bench_kernels``' empty-body pipeline over the same tiles.

    python benchmarks/diag_decode.py --out $OUT [--shapes 16x3072x12288,...]
        [--tilings 4:2:4,2:1:8]   # k_splits:tiles_per_cta:depth, at the first shape
    ncu -k regex:mosaic --launch-count 1 --section SpeedOfLight \\
        python benchmarks/diag_decode.py --profile no_decode --shapes 16x3072x12288

Kernel time from CUPTI, median, several weight buffers per call (L2 defeated). Writes
``diag_decode_<device>_<date>.json`` and a bar plot beside it (``--plot RESULTS.json``
draws it again).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from benchmarks import bench_kernels as bk  # noqa: E402
from pqjax_kernels import matmul_fp4 as fm  # noqa: E402
from pqjax_kernels import norm as gn  # noqa: E402

_SHIPPED_PTX = fm._E2M1_TO_F16X2_PTX

# Stand-ins for the decode (same operands: $4 the word in, $0-$3 the four f16x2 words out).
_NO_CVT_PTX = _SHIPPED_PTX.split("mov.b32 {h0")[0] + """mov.b32 $0, e0;
mov.b32 $1, e1;
xor.b32 $2, e0, pat;
xor.b32 $3, e1, idx;
}"""
_SHIFT_AND_PTX = """{
.reg .b32 t1, t2, t3;
and.b32 $0, $4, 0x8E008E00;
shr.u32 t1, $4, 1;
and.b32 $1, t1, 0x8E008E00;
shr.u32 t2, $4, 2;
and.b32 $2, t2, 0x8E008E00;
shr.u32 t3, $4, 3;
and.b32 $3, t3, 0x8E008E00;
}"""
_NO_DECODE_PTX = """{
shf.l.wrap.b32 $0, $4, $4, 1;
shf.l.wrap.b32 $1, $4, $4, 2;
shf.l.wrap.b32 $2, $4, $4, 3;
shf.l.wrap.b32 $3, $4, $4, 4;
}"""


def _unscaled(vals, scales_ref, g, dtype, interpret):
  del scales_ref, g, dtype, interpret
  return [vals[:, 16 * j:16 * (j + 1)] for j in range(fm.TILE_K // 16)]


def _no_wgmma(acc_ref, slices, at_smem, m_major):
  del acc_ref, slices, at_smem, m_major


# The module attributes each variant replaces while the kernel is traced and lowered.
_SHIPPED = {"_E2M1_TO_F16X2_PTX": fm._E2M1_TO_F16X2_PTX, "_scaled_slices": fm._scaled_slices,
            "_register_wgmma": fm._register_wgmma, "_NO_AUTO_BARRIERS": fm._NO_AUTO_BARRIERS}
VARIANTS = {
    "shipped": {},
    "no_cvt": {"_E2M1_TO_F16X2_PTX": _NO_CVT_PTX},
    "shift_and": {"_E2M1_TO_F16X2_PTX": _SHIFT_AND_PTX},
    "no_scale": {"_scaled_slices": _unscaled},
    "no_decode": {"_E2M1_TO_F16X2_PTX": _NO_DECODE_PTX, "_scaled_slices": _unscaled},
    # no wgmma either: the decode's results go unused, so the pipeline alone is left (the
    # weight tiles' TMA copies, barrier waits, the accumulator stores)
    "no_wgmma": {"_E2M1_TO_F16X2_PTX": _NO_DECODE_PTX, "_scaled_slices": _unscaled,
                 "_register_wgmma": _no_wgmma},
    # the same with Pallas's automatic warpgroup barriers (the kernel before version 22)
    "shipped_auto_barriers": {"_NO_AUTO_BARRIERS": False},
    "no_decode_auto_barriers": {"_E2M1_TO_F16X2_PTX": _NO_DECODE_PTX,
                                "_scaled_slices": _unscaled, "_NO_AUTO_BARRIERS": False},
}


@contextlib.contextmanager
def stand_ins(variant: str):
  """The kernel traced, lowered and compiled with ``variant``'s stand-ins (module attributes
  read while tracing and, for the PTX, while lowering), restored after."""
  saved = {name: getattr(fm, name) for name in _SHIPPED}
  for name, value in {**_SHIPPED, **VARIANTS[variant]}.items():
    setattr(fm, name, value)
  try:
    yield
  finally:
    for name, value in saved.items():
      setattr(fm, name, value)


def kernel_fn(cfg):
  """A fresh jitted ``_kernel_call`` over the weight buffers (fresh: traced again)."""
  m_major = cfg.m_major and fm._REGISTER_CONCAT  # as fp4_matmul decides
  return jax.jit(lambda am, pws: [
      fm._kernel_call(am if m_major else am.T, p, cfg, False, m_major) for p in pws])


def run_shape(m: int, k: int, n: int, timer, tilings=(), variants=tuple(VARIANTS)) -> dict:
  key = jax.random.key(m * 7 + k + n)
  reps = bk._reps(fm.weight_bytes(n, k))
  qs = [bk._rand_weights(jax.random.fold_in(key, i), n, k) for i in range(reps)]
  pws = [fm.prepare_weights(*q) for q in qs]
  qa = gn.quantize_nvfp4(bk._rand_act(jax.random.fold_in(key, 99), m, k))
  cfg = fm.default_config(m, n, k)
  mp = -(-m // cfg.tile_m) * cfg.tile_m
  am = jnp.pad(gn.nvfp4_values(qa).values, ((0, mp - m), (0, 0)))
  row = {"m": m, "k": k, "n": n, "reps": reps, "config": str(cfg)}
  ref = bk._w4a4_reference(qa, fm.dequantize(*qs[0], "nvfp4"))
  for name in variants:
    with stand_ins(name):  # the timer's first call compiles
      kern, wall, out = timer(kernel_fn(cfg), (am, pws), reps)
    row[name + "_us"], row[name + "_wall_us"] = kern, wall
    if name == "shipped":  # the partials summed and scaled as fp4_matmul does
      y = np.asarray(out[0], np.float64).sum(0).T[:m] * float(qa.tensor_scale)
      y *= float(qs[0][2])
      row["shipped_rel_err"] = float(np.linalg.norm(y - ref) / np.linalg.norm(ref))
    print(f"{m}x{k}x{n} {name:12s} {kern:7.2f} us", flush=True)
  kern, _, _ = timer(jax.jit(lambda at, pws: [bk._stream_only(p, at, cfg) for p in pws]),
                     (am.T, pws), reps)
  row["stream_only_us"] = kern
  print(f"{m}x{k}x{n} {'stream_only':12s} {kern:7.2f} us", flush=True)
  for t in tilings:  # other tilings, for the body's parts: does the structure move?
    splits, tiles, depth = map(int, t.split(":"))
    c = dataclasses.replace(cfg, k_splits=splits, tiles_per_cta=tiles,
                            max_concurrent_steps=depth)
    ctas = fm._ctas(m, n, c.tile_m, tiles, splits)
    row[f"tiling_{t}"] = {"ctas": ctas, "smem": fm.smem_bytes(c, k)}
    for name in ("shipped", "shift_and", "no_decode"):
      with stand_ins(name):
        kern, _, _ = timer(kernel_fn(c), (am, pws), reps)
      row[f"tiling_{t}"][name + "_us"] = kern
      print(f"{m}x{k}x{n} splits {splits} tiles {tiles} depth {depth} ({ctas} CTAs) {name:10s} "
            f"{kern:7.2f} us", flush=True)
  return row


def plot(result: dict, path: str) -> None:
  """Grouped bars: each shape's kernel time per variant (the ones the run timed)."""
  import matplotlib  # noqa: PLC0415 (only for the plot)
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415
  rows = result["rows"]
  names = [v for v in [*VARIANTS, "stream_only"] if all(v + "_us" in r for r in rows)]
  fig, ax = plt.subplots(figsize=(7.0, 3.8))
  width = 0.8 / len(names)
  for i, name in enumerate(names):
    xs = np.arange(len(rows)) + (i - (len(names) - 1) / 2) * width
    ax.bar(xs, [r[name + "_us"] for r in rows], width, label=name.replace("_", " "))
  ax.set_xticks(np.arange(len(rows)), [f"{r['m']}x{r['k']}x{r['n']}" for r in rows])
  ax.set_ylabel("small-M kernel alone, us (CUPTI median)")
  ax.set_title(f"W4A4 small-M kernel, parts of its body replaced (wrong results but the "
               f"shipped one)\n{result['device']}, JAX {result['jax']}, {result['date']}",
               fontsize=8)
  ax.legend(fontsize=7, ncol=3)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", default=".")
  p.add_argument("--shapes", default="16x3072x12288,16x12288x3072,64x3072x12288,1x3072x12288")
  p.add_argument("--tilings", default="",
                 help="also time k_splits:tiles_per_cta:depth tilings at the first shape")
  p.add_argument("--variants", default=",".join(VARIANTS))
  p.add_argument("--profile", default=None, choices=list(VARIANTS),
                 help="only run this variant's kernel twice at the first shape (for ncu)")
  p.add_argument("--plot", default=None, help="only plot this results JSON (PNG beside it)")
  args = p.parse_args()
  if bk.replot(args.plot, plot):
    return
  if args.profile:
    m, k, n = map(int, args.shapes.split(",")[0].split("x"))
    pw = fm.prepare_weights(*bk._rand_weights(jax.random.key(0), n, k))
    cfg = fm.default_config(m, n, k)
    am = jnp.ones((-(-m // cfg.tile_m) * cfg.tile_m, k), jnp.float16)
    with stand_ins(args.profile):
      fn = kernel_fn(cfg)
      for _ in range(2):
        jax.block_until_ready(fn(am, [pw]))
    return
  dev = jax.devices()[0]
  timer = bk.Timer(tiny=dev.platform != "gpu")
  result = {"device": dev.device_kind, "jax": jax.__version__,
            "date": datetime.date.today().isoformat(), "rows": []}
  path = os.path.join(args.out, "diag_decode_{}_{}.json".format(
      dev.device_kind.replace(" ", "_"), result["date"]))
  for i, s in enumerate(args.shapes.split(",")):
    m, k, n = map(int, s.split("x"))
    tilings = [t for t in args.tilings.split(",") if t] if i == 0 else []
    result["rows"].append(run_shape(m, k, n, timer, tilings, args.variants.split(",")))
    with open(path, "w") as f:
      json.dump(result, f, indent=1)
  plot(result, os.path.splitext(path)[0] + ".png")
  cols = [*args.variants.split(","), "stream_only"]
  print("M x K x N        " + " ".join(f"{c:>11s}" for c in cols))
  for r in result["rows"]:
    print(f"{r['m']}x{r['k']}x{r['n']:<8d} " + " ".join(f"{r[c + '_us']:11.2f}" for c in cols))


if __name__ == "__main__":
  main()

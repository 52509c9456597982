"""Where the large-M W4A4 time goes: per-kernel CUPTI breakdown of the decode + XLA dot path.

    python benchmarks/diag_large_m.py --out DIR
    python benchmarks/diag_large_m.py --plot RESULTS.json  # the PNG again

Times (median of 10 calls, per weight buffer) XLA bf16 in both weight layouts, our "xla"
method for W4A4 and W4A16, the weight decode alone, the activation decode alone, and lists
each kernel of our call by name, and the whole W4A4 linear from bf16 activations (in order,
gathered, gathered + block Hadamard) as ``pqjax.dispatch.linear`` runs it, from XLA's
float16 values, and from NVFP4 codes as it ran before; writes ``diag_large_m.json``, a bar
plot of the whole linears (``diag_large_m.png``) and the optimized HLO.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import statistics
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from benchmarks.bench_kernels import _rand_act, _rand_weights, replot  # noqa: E402
from pqjax import dispatch  # noqa: E402
from pqjax.formats import QTensor  # noqa: E402
from pqjax_kernels import matmul_fp4 as fm  # noqa: E402
from pqjax_kernels import norm as gn  # noqa: E402
from pqjax_kernels import norm_kernel as nk  # noqa: E402

REPS = 2


def _measure(fn, args):
  from jax.experimental.mosaic.gpu import profiler
  _, per = profiler.measure(fn, aggregate=False, iterations=10)(*args)
  totals = [sum(t for _, t in it) * 1e3 / REPS for it in per]
  kernels = {}
  for it in per:  # sum each kernel name within a call (one launch per weight buffer)
    sums = {}
    for name, t in it:
      sums[name[:120]] = sums.get(name[:120], 0.0) + t * 1e3 / REPS
    for name, t in sums.items():
      kernels.setdefault(name, []).append(t)
  return statistics.median(totals), {k: statistics.median(v) for k, v in kernels.items()}


# The whole-linear candidates, by activation path: (label, key prefix).
E2E_PATHS = (("NVFP4 codes, then fp4_matmul's decode (before version 20)", "e2e_codes_"),
             ("float16 values from XLA's fusion", "e2e_xla_values_"),
             ("dispatch.linear as run", "e2e_"))
E2E_SITES = (("in order", "quantize"), ("gathered", "gathered"),
             ("gathered + Hadamard", "gathered_hadamard"))


def plot_e2e(res: dict, path: str) -> None:
  """Bars of the whole W4A4 linear's time per activation path and site, one panel per
  shape, XLA bf16 (``bf16_kn``) as a line."""
  import matplotlib  # noqa: PLC0415 (only for the plot)
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415
  rows = [r for r in res["rows"] if any(k.startswith("e2e_") for k in r)]
  fig, axes = plt.subplots(1, len(rows), figsize=(3.6 * len(rows), 3.6), squeeze=False)
  for ax, r in zip(axes[0], rows):
    for i, (label, prefix) in enumerate(E2E_PATHS):
      ys = [r.get(prefix + site, {}).get("us", float("nan")) for _, site in E2E_SITES]
      ax.bar([j + 0.27 * (i - 1) for j in range(len(E2E_SITES))], ys, width=0.27, label=label)
    ax.axhline(r["bf16_kn"]["us"], color="k", lw=0.8, ls="--", label="XLA bf16 matmul")
    ax.set_xticks(range(len(E2E_SITES)), [s for s, _ in E2E_SITES], fontsize=7)
    ax.set_title(f"{r['m']} x {r['k']} x {r['n']}", fontsize=9)
  axes[0][0].set_ylabel("us per linear (CUPTI, all kernels)")
  axes[0][-1].legend(fontsize=6)
  fig.suptitle(f"Whole W4A4 linear from bf16 activations, {res['device']}, JAX {res['jax']}, "
               f"{res['date']}")
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--out", default=os.environ.get("OUT", "."))
  p.add_argument("--shapes", default="4608x3072x12288,4608x12288x3072,4608x3072x3072")
  p.add_argument("--tag", default="")
  p.add_argument("--plot", default=None, help="only plot this results JSON (PNG beside it)")
  args = p.parse_args()
  if replot(args.plot, plot_e2e):
    return
  res = dict(date=datetime.date.today().isoformat(), jax=jax.__version__,
             device=jax.devices()[0].device_kind,
             xla_flags=os.environ.get("XLA_FLAGS", ""), rows=[])
  key = jax.random.key(0)
  for shape in args.shapes.split(","):
    m, k, n = (int(v) for v in shape.split("x"))
    q = [_rand_weights(jax.random.fold_in(key, i), n, k) for i in range(REPS)]
    pws = [fm.prepare_weights(*qi) for qi in q]
    wkn = [jax.random.normal(jax.random.fold_in(key, 10 + i), (k, n), jnp.bfloat16)
           for i in range(REPS)]
    wnk = [w.T.copy() for w in wkn]
    a = _rand_act(jax.random.fold_in(key, 99), m, k)
    qa = gn.quantize_nvfp4(a)
    cands = {
        "bf16_kn": (jax.jit(lambda a, ws: [a @ w for w in ws]), (a, wkn)),
        "bf16_nk": (jax.jit(lambda a, ws: [jax.lax.dot_general(
            a, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32).astype(
                jnp.bfloat16) for w in ws]), (a, wnk)),
        "w4a4_xla": (jax.jit(lambda c, s, t, ps: [fm.fp4_matmul(
            c, p, a_scales=s, a_tensor_scale=t, method="xla") for p in ps]),
            (qa.codes, qa.scales, qa.tensor_scale, pws)),
        "w4a16_xla": (jax.jit(lambda a, ps: [fm.fp4_matmul(a, p, method="xla") for p in ps]),
                      (a, pws)),
        "decode_w": (jax.jit(lambda ps: [fm.decode_weights_bf16(p) for p in ps]), (pws,)),
        "decode_a": (jax.jit(lambda c, s: [fm._decode_pairs_bf16(
            c, s, 16, "nvfp4", scale=1.0) for _ in range(REPS)]), (qa.codes, qa.scales)),
    }
    ts = qa.tensor_scale
    # The whole W4A4 linear from bf16 activations (in order, gathered, gathered + block
    # Hadamard): as the pipeline runs it (dispatch.linear: the activations quantized to
    # float16 values by the norm kernel), and as it ran before version 20 (codes from XLA's
    # fusion, or from the norm kernel where it rotates, then fp4_matmul's own decode).
    perm = jax.random.permutation(jax.random.fold_in(key, 7), k).astype(jnp.int32)
    qts = [QTensor(c, sc, t, "nvfp4", 16, 1, (n, k), jnp.float32) for c, sc, t in q]
    for site, p, rot in (("quantize", None, False), ("gathered", perm, False),
                         ("gathered_hadamard", perm, True)):
      quant = functools.partial(nk.norm_quantize, kind="none") if rot else gn.gathered_quantize
      cands[f"e2e_codes_{site}"] = (jax.jit(
          lambda a, p, ps, quant=quant, rot=rot: [fm.fp4_matmul(
              q.codes, w, a_scales=q.scales, a_tensor_scale=q.tensor_scale)
              for w in ps for q in [quant(a, p, tensor_scale=ts, hadamard=rot)]]),
          (a, p, pws))
      cands[f"e2e_xla_values_{site}"] = (jax.jit(
          lambda a, p, ps, rot=rot: [fm.fp4_matmul(q.values, w, a_tensor_scale=q.tensor_scale)
                                     for w in ps for q in [gn.gathered_quantize(
                                         a, p, tensor_scale=ts, hadamard=rot,
                                         out="nvfp4_f16")]]),
          (a, p, pws))
      cands[f"e2e_{site}"] = (jax.jit(
          lambda a, p, qts, ps, rot=rot: [dispatch.linear(
              a, w, act_format="nvfp4", act_tensor_scale=ts, in_perm=p, rotate=rot,
              backend="mosaic", prepared=pw) for w, pw in zip(qts, ps)]),
          (a, p, qts, pws))
    if m <= 256:
      cands["w4a4_kernel"] = (jax.jit(lambda c, s, t, ps: [fm.fp4_matmul(
          c, p, a_scales=s, a_tensor_scale=t, method="kernel") for p in ps]),
          (qa.codes, qa.scales, qa.tensor_scale, pws))
    row = dict(m=m, k=k, n=n)
    for name, (fn, fargs) in cands.items():
      try:
        total, kernels = _measure(fn, fargs)
        row[name] = dict(us=total, kernels=kernels)
        if name == "w4a4_xla":
          with open(os.path.join(args.out, f"hlo_{m}x{k}x{n}{args.tag}.txt"), "w") as f:
            f.write(fn.lower(*fargs).compile().as_text())
      except Exception as e:  # noqa: BLE001 (report and go on)
        row[name] = dict(error=f"{type(e).__name__}: {str(e)[:300]}")
    res["rows"].append(row)
    print(f"{m}x{k}x{n}{args.tag}: " + " ".join(
        f"{c}={row[c]['us']:.1f}" if "us" in row[c] else f"{c}=ERR" for c in cands),
        flush=True)
    for name in ("w4a4_xla", "e2e_codes_gathered", "e2e_gathered", "w4a4_kernel"):
      for kname, t in row.get(name, {}).get("kernels", {}).items():
        print(f"   {name}: {t:8.1f} us  {kname}", flush=True)
  with open(os.path.join(args.out, f"diag_large_m{args.tag}.json"), "w") as f:
    json.dump(res, f, indent=1)
  plot_e2e(res, os.path.join(args.out, f"diag_large_m{args.tag}.png"))


if __name__ == "__main__":
  main()

"""The small-M kernel on a persistent stream-K grid (``MatmulConfig.persistent_ctas``) against
its shipped tiling and XLA's bf16 GEMV, W4A4 NVFP4 from float16 activation values.

``benchmarks/diag_copy.py`` (NOTES_kernels.md version 24) measured the weight stream's copy
ceiling as 6.51 us at 3072 x 12288 for one CTA per SM with 32 KB copies, against 8.82 us for
the shipped kernel's copies alone (several short-lived CTAs per SM, each loading its
activation slice and filling its own pipeline). This times the kernel itself with its work
cut evenly over a grid of 1-3 CTAs per SM, 1-3 warpgroups per CTA, 1-4 K tiles per copy,
each variant checked against a float32 reference first (relative error <= 2**-8).

    python benchmarks/diag_persistent.py --out $OUT [--shapes 16x3072x12288,...]
        [--grid 3:1:1:4,...] [--variants 384:1:1:4:2,...]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import bench_kernels as bk  # noqa: E402
from pqjax_kernels import matmul_fp4 as fm  # noqa: E402
from pqjax_kernels import norm as gn  # noqa: E402

# (CTAs per SM, warpgroups per CTA, K tiles per copy, pipeline depth)
GRID = [(1, 2, 2, 4), (1, 3, 2, 3), (1, 3, 1, 4), (1, 2, 4, 2), (1, 2, 1, 4), (2, 1, 1, 4),
        (2, 1, 2, 4), (3, 1, 1, 4)]


def variants(m: int, n: int, k: int, num_sms: int, grid=GRID) -> dict[str, fm.MatmulConfig]:
  """Persistent tilings for one shape: for each ``GRID`` entry, the fewest K splits whose
  CTAs fit shared memory that many per SM."""
  tm = 16 if m <= 16 else 32 if m <= 32 else 64
  out = {}
  for cps, wgs, kt, depth in grid:
    ctas = num_sms * cps
    for s in range(1, k // fm.TILE_K + 1):
      if ctas % s or (k // fm.TILE_K) % (s * kt):
        continue
      cfg = fm.MatmulConfig(tile_m=tm, k_splits=s, k_tiles=kt, warpgroups=wgs,
                            max_concurrent_steps=depth, m_major=True, persistent_ctas=ctas)
      try:
        fm._check_config(cfg, n, k)  # noqa: SLF001
      except ValueError:
        continue
      if fm.smem_bytes(cfg, k) * cps <= fm.SMEM_BYTES:
        out[f"p{cps}x{wgs}_kt{kt}_d{depth}_s{s}"] = cfg
        break
  return out


def parse_variants(spec: str, m: int) -> dict[str, fm.MatmulConfig]:
  """``--variants``: ``ctas:warpgroups:k_tiles:depth:splits`` entries, comma separated."""
  out = {}
  for v in spec.split(","):
    ctas, wgs, kt, depth, s = (int(x) for x in v.split(":"))
    out[f"c{ctas}x{wgs}_kt{kt}_d{depth}_s{s}"] = fm.MatmulConfig(
        tile_m=16 if m <= 16 else 32 if m <= 32 else 64, k_splits=s, k_tiles=kt,
        warpgroups=wgs, max_concurrent_steps=depth, m_major=True, persistent_ctas=ctas)
  return out


def run_shape(m: int, k: int, n: int, timer, num_sms: int, spec: str = "",
              grid: list | None = None) -> dict:
  key = jax.random.key(m * 7 + k + n)
  r4 = bk._reps(fm.weight_bytes(n, k))  # noqa: SLF001
  r16 = bk._reps(n * k * 2)  # noqa: SLF001
  q = [bk._rand_weights(jax.random.fold_in(key, i), n, k) for i in range(r4)]  # noqa: SLF001
  pws = [fm.prepare_weights(*qi) for qi in q]
  qa = gn.quantize_nvfp4(bk._rand_act(jax.random.fold_in(key, 99), m, k))  # noqa: SLF001
  vals = gn.nvfp4_values(qa)
  ref = bk._w4a4_reference(qa, fm.dequantize(*q[0], "nvfp4"))  # noqa: SLF001
  row = dict(m=m, k=k, n=n, reps=r4, candidates={})
  ws = [jax.random.normal(jax.random.fold_in(key, 100 + i), (k, n), jnp.bfloat16)
        for i in range(r16)]
  a16 = vals.values.astype(jnp.bfloat16)
  kern, wall, _ = timer(jax.jit(lambda a, ws: [a @ w for w in ws]), (a16, ws), r16)
  row["xla_bf16"] = dict(us=kern, wall_us=wall)
  print(f"{m} x {k} x {n}: xla_bf16 {kern:.2f} us", flush=True)
  cands = {"shipped": None} | (parse_variants(spec, m) if spec else
                               variants(m, n, k, num_sms, grid or GRID))
  for name, cfg in cands.items():
    fn = jax.jit(lambda av, avt, pws, cfg=cfg: [
        fm.fp4_matmul(av, p, a_tensor_scale=avt, config=cfg, method="kernel") for p in pws])
    try:
      kern, wall, out = timer(fn, (vals.values, vals.tensor_scale, pws), r4)
      rel, ok = bk._check(out[0], ref)  # noqa: SLF001
    except Exception as e:  # noqa: BLE001 (a variant that fails to compile is recorded)
      row["candidates"][name] = dict(error=f"{type(e).__name__}: {str(e)[:300]}")
      print(f"  {name}: {type(e).__name__}", flush=True)
      continue
    row["candidates"][name] = dict(us=kern, wall_us=wall, rel_err=rel, ok=ok,
                                   config=None if cfg is None else dataclasses.asdict(cfg))
    speed = row["xla_bf16"]["us"] / kern
    print(f"  {name:22s} {kern:7.2f} us ({speed:.2f}x bf16){'' if ok else ' WRONG'}",
          flush=True)
  return row


def plot(result: dict, path: str) -> None:
  """Speed-up over XLA bf16 per shape: the shipped tiling and each persistent variant."""
  import matplotlib  # noqa: PLC0415
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415
  rows = result["rows"]
  names = sorted({c for r in rows for c in r["candidates"]})
  fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(rows) + 3), 4))
  width = 0.8 / max(1, len(names))
  for i, name in enumerate(names):
    ys = [r["xla_bf16"]["us"] / r["candidates"][name]["us"]
          if "us" in r["candidates"].get(name, {}) else 0 for r in rows]
    ax.bar([j + i * width for j in range(len(rows))], ys, width, label=name)
  ax.axhline(1.0, c="k", lw=0.8)
  ax.set_xticks([j + 0.4 - width / 2 for j in range(len(rows))])
  ax.set_xticklabels([f"{r['m']}x{r['k']}x{r['n']}" for r in rows], fontsize=8)
  ax.set_ylabel("x XLA bf16 (kernel time)")
  ax.legend(fontsize=6, ncol=2)
  ax.set_title(f"Small-M persistent grid: {result['device']}, JAX {result['jax']}, "
               f"{result['date']}", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", default=".")
  p.add_argument("--shapes", default="16x3072x12288,16x12288x3072,16x3072x3072,64x3072x12288",
                 help="M x K x N, comma separated")
  p.add_argument("--variants", default="",
                 help="ctas:warpgroups:k_tiles:depth:splits,... instead of the grid")
  p.add_argument("--grid", default="", help="cps:wgs:kt:depth,... (default: GRID)")
  p.add_argument("--plot", default=None, help="only plot this results JSON (PNG beside it)")
  args = p.parse_args()
  if bk.replot(args.plot, plot):
    return
  dev = jax.devices()[0]
  num_sms = getattr(dev, "core_count", 132)
  result = dict(device=dev.device_kind, jax=jax.__version__,
                date=datetime.date.today().isoformat(), num_sms=num_sms, rows=[])
  name = f"persistent_{dev.device_kind.replace(' ', '_')}_{result['date']}"
  path = os.path.join(args.out, name + ".json")
  timer = bk.Timer(False)
  for shape in args.shapes.split(","):
    m, k, n = (int(v) for v in shape.split("x"))
    grid = [tuple(int(x) for x in g.split(":")) for g in args.grid.split(",")] if args.grid \
        else None
    result["rows"].append(run_shape(m, k, n, timer, num_sms, args.variants, grid))
    with open(path, "w") as f:
      json.dump(result, f, indent=1)
  plot(result, os.path.join(args.out, name + ".png"))
  print("\nshape | bf16 us | shipped | best persistent")
  for r in result["rows"]:
    ok = {c: v for c, v in r["candidates"].items() if v.get("ok") and c != "shipped"}
    best = min(ok, key=lambda c: ok[c]["us"]) if ok else None
    sh = r["candidates"]["shipped"].get("us", float("nan"))
    print(f"{r['m']}x{r['k']}x{r['n']} | {r['xla_bf16']['us']:.2f} | {sh:.2f} | "
          + (f"{best} {ok[best]['us']:.2f}" if best else "none"))


if __name__ == "__main__":
  main()

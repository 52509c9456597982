"""The copy ceiling of a small-M matmul's weight stream under Mosaic GPU: nothing computed.

NOTES_kernels.md version 23 found the small-M kernel's TMA pipeline, with no decode and no
``wgmma``, taking 8.82 us for the 23.6 MB of a 3072 x 12288 NVFP4 weight (~2.2 us fixed
plus 3.5 TB/s for 23.6 MB), where XLA's bf16 GEMV runs at ~1.4 us fixed plus 3.65 TB/s:
the issue's 2.5x floor at M <= 64 is that skeleton's time. Its copies are 4 KB of codes and 1 KB of
scales per step, several CTAs per SM, each paying its own start. This times the other
structure before anyone builds it: ``ctas_per_sm`` persistent CTAs per SM, each streaming
one contiguous share of the bytes through a ring of ``depth`` slots of ``rows x 256``
bytes (one TMA copy each), the next copy into a slot issued as soon as the previous one
lands. If some copy size and depth gets near XLA's rate and fixed cost, a persistent
small-M kernel with that ring is worth writing; if none does, the floor is out of reach
for Mosaic GPU's TMA pipelines on this GPU, and the reason is measured.

Beside it, in the same run: XLA's bf16 ``(16, K) x (K, N)`` product over a weight of the
same bytes (the competitor's rate) and over 3.2x the bytes (the bf16 weight whose kernel
layout, 4-bit codes and float16 scales, is those bytes: what the floor compares with).

    python benchmarks/diag_copy.py --out $OUT [--mb 23.6,5.9] [--rows 16,64,128]
        [--depths 2,4,8] [--ctas-per-sm 1,2,3]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import bench_kernels as bk  # noqa: E402

ROW_BYTES = 256  # a TMA box's widest row of bytes
SMEM_BYTES = 200 * 1024  # the ring's share of an SM's 227 KB, per SM


def ring_call(w: jax.Array, ctas: int, rows: int, depth: int, n_rows: int | None = None):
  """Streams the first ``n_rows`` rows of ``w`` (``(R, 256)`` uint8; ``n_rows``, all of
  them by default, a multiple of ``ctas * rows``) through ``ctas`` CTAs, each its contiguous
  ``n_rows / ctas`` rows in copies of ``rows x 256`` bytes through a ring of ``depth``
  shared-memory slots; returns ``(ctas, 256)`` uint8: each CTA's last row as it landed in
  the ring (stored from shared memory by TMA, no registers), so a test can check that the
  copies read what they should."""
  import jax.experimental.pallas as pl  # noqa: PLC0415
  import jax.experimental.pallas.mosaic_gpu as plgpu  # noqa: PLC0415
  n_rows = w.shape[0] if n_rows is None else n_rows
  if (w.dtype != jnp.uint8 or w.shape[1] != ROW_BYTES or n_rows % (ctas * rows)
      or not 0 < n_rows <= w.shape[0]):
    raise ValueError(f"w must be uint8 (R, {ROW_BYTES}) with n_rows = {n_rows} <= R a "
                     f"multiple of ctas * rows = {ctas * rows}, got {w.dtype} {w.shape}")
  per_cta = n_rows // ctas // rows  # copies per CTA
  depth = min(depth, per_cta)

  def kernel(w_gmem, out_gmem, ring, barriers):
    c = lax.axis_index("c")
    base = c * per_cta

    def fetch(i, slot):
      plgpu.copy_gmem_to_smem(w_gmem.at[pl.ds((base + i) * rows, rows)], ring.at[slot],
                              barriers.at[slot])

    for s in range(depth):
      fetch(s, s)

    def step(i, carry):
      slot = lax.rem(i, depth)
      plgpu.barrier_wait(barriers.at[slot])

      @pl.when(i + depth < per_cta)
      def _refill():
        fetch(i + depth, slot)
      return carry

    lax.fori_loop(0, per_cta, step, None)
    plgpu.copy_smem_to_gmem(ring.at[(per_cta - 1) % depth, pl.ds(rows - 1, 1)],
                            out_gmem.at[pl.ds(c, 1)])
    plgpu.wait_smem_to_gmem(0)

  call = plgpu.kernel(
      kernel, out_type=jax.ShapeDtypeStruct((ctas, ROW_BYTES), jnp.uint8), grid=(ctas,),
      grid_names=("c",),
      scratch_types=[plgpu.SMEM((depth, rows, ROW_BYTES), jnp.uint8),
                     plgpu.Barrier(num_arrivals=1, num_barriers=depth)])
  return call(w)


def last_rows(w: np.ndarray, ctas: int, n_rows: int | None = None) -> np.ndarray:
  """What ``ring_call(w, ctas, ..., n_rows)`` returns: the last row of each CTA's share."""
  share = (w.shape[0] if n_rows is None else n_rows) // ctas
  return w[share - 1:share * ctas:share]


def ring_configs(rows_list, depths, ctas_per_sm_list, num_sms: int):
  """The (rows, depth, ctas per SM) whose rings fit ``SMEM_BYTES`` per SM."""
  return [(r, d, c) for r in rows_list for d in depths for c in ctas_per_sm_list
          if r * ROW_BYTES * d * c <= SMEM_BYTES]


def run_size(mb: float, configs, timer, num_sms: int) -> dict:
  """One weight size (each ring streams the nearest multiple of its CTAs' copies): every
  ring config, then XLA's bf16 GEMVs beside it."""
  target = mb * 1e6 / ROW_BYTES  # rows of 256 bytes
  quanta = {cfg: num_sms * cfg[2] * cfg[0] for cfg in configs}
  n_rows = {cfg: max(q, round(target / q) * q) for cfg, q in quanta.items()}
  reps = bk._reps(int(target * ROW_BYTES))  # noqa: SLF001 (buffers enough to defeat the L2)
  key = jax.random.key(int(target))
  ws = [jax.random.randint(jax.random.fold_in(key, i), (max(n_rows.values()), ROW_BYTES), 0,
                           256, jnp.int32).astype(jnp.uint8) for i in range(reps)]
  row = {"mbytes": target * ROW_BYTES / 1e6, "reps": reps, "rings": []}
  for (rows, depth, cps), n in n_rows.items():
    ctas = num_sms * cps
    fn = jax.jit(lambda ws, rows=rows, depth=depth, ctas=ctas, n=n: [
        ring_call(w, ctas, rows, depth, n) for w in ws])
    kern, wall, out = timer(fn, (ws,), reps)
    ok = bool(np.array_equal(np.asarray(out[0]), last_rows(np.asarray(ws[0]), ctas, n)))
    nbytes = n * ROW_BYTES
    rate = nbytes / (kern * 1e-6) / 1e12 if kern == kern else float("nan")
    row["rings"].append(dict(rows=rows, copy_kb=rows * ROW_BYTES / 1024, depth=depth,
                             ctas_per_sm=cps, mbytes=nbytes / 1e6, us=kern, wall_us=wall,
                             tb_s=rate, ok=ok))
    print(f"{nbytes / 1e6:6.1f} MB ring copy {rows * ROW_BYTES // 1024:3d} KB depth {depth} "
          f"ctas/SM {cps}: {kern:7.2f} us ({rate:.2f} TB/s){'' if ok else ' WRONG OUTPUT'}",
          flush=True)
  nbytes = target * ROW_BYTES
  # the bf16 weight of as many elements as the kernel's layout (4-bit codes and a float16
  # scale per 16: 5 bits per element) holds in these bytes: what the floor compares with
  for name, scale in (("xla_bf16_same_bytes", 1.0), ("xla_bf16_same_weight", 16 / 5)):
    k = 3072
    n = max(128, int(nbytes * scale / 2 / k) // 128 * 128)
    wb = [jax.random.normal(jax.random.fold_in(key, 100 + i), (k, n), jnp.bfloat16)
          for i in range(bk._reps(k * n * 2))]  # noqa: SLF001
    a = jax.random.normal(key, (16, k), jnp.bfloat16)
    kern, wall, _ = timer(jax.jit(lambda a, wb: [a @ w for w in wb]), (a, wb), len(wb))
    row[name] = dict(k=k, n=n, mbytes=k * n * 2 / 1e6, us=kern, wall_us=wall)
    print(f"{name} (16 x {k} x {n}, {k * n * 2 / 1e6:.1f} MB): "
          f"{kern:7.2f} us", flush=True)
  return row


def plot(result: dict, path: str) -> None:
  """Each size's ring time by copy size, one line per depth and CTAs per SM, with XLA's
  bf16 GEMV over the same bytes as a dashed line."""
  import matplotlib  # noqa: PLC0415 (only for the plot)
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415
  sizes = result["sizes"]
  t = lambda r: r["us"] if r["us"] == r["us"] else r["wall_us"]  # noqa: E731 (--tiny: wall)
  fig, axes = plt.subplots(1, len(sizes), figsize=(5.0 * len(sizes), 3.8), squeeze=False)
  for ax, size in zip(axes[0], sizes):
    for d, c in sorted({(r["depth"], r["ctas_per_sm"]) for r in size["rings"]}):
      pts = sorted((r["copy_kb"], t(r)) for r in size["rings"]
                   if (r["depth"], r["ctas_per_sm"]) == (d, c))
      ax.plot(*zip(*pts), marker="o", label=f"depth {d}, {c} CTA/SM")
    ax.axhline(t(size["xla_bf16_same_bytes"]), ls="--", c="k", label="XLA bf16, same bytes")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("bytes per TMA copy (KB)")
    ax.set_ylabel("us (CUPTI median)")
    ax.set_title(f"{size['mbytes']:.1f} MB", fontsize=9)
    ax.legend(fontsize=6)
  fig.suptitle(f"Weight stream, nothing computed: {result['device']}, JAX {result['jax']}, "
               f"{result['date']}", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", default=".")
  p.add_argument("--mb", default="23.6,5.9",
                 help="weight sizes, MB (the kernel's NVFP4 3072x12288 and 3072x3072)")
  p.add_argument("--rows", default="16,64,128", help="rows of 256 bytes per copy")
  p.add_argument("--depths", default="2,4,8")
  p.add_argument("--ctas-per-sm", default="1,2,3",
                 help="3 with 4 KB copies at depth 4: the small-M kernel's own pattern")
  p.add_argument("--tiny", action="store_true", help="CPU: the GPU interpreter, 2 'SMs'")
  p.add_argument("--plot", default=None, help="only plot this results JSON (PNG beside it)")
  args = p.parse_args()
  if bk.replot(args.plot, plot):
    return
  ints = lambda s: [int(v) for v in s.split(",")]  # noqa: E731
  num_sms = 2 if args.tiny else jax.devices()[0].core_count
  configs = ring_configs(ints(args.rows), ints(args.depths), ints(args.ctas_per_sm), num_sms)
  timer = bk.Timer(args.tiny)
  dev = jax.devices()[0]
  result = dict(device=dev.device_kind, jax=jax.__version__,
                date=datetime.date.today().isoformat(), num_sms=num_sms, sizes=[])
  name = f"diag_copy_{dev.device_kind.replace(' ', '_')}_{result['date']}"
  path = os.path.join(args.out, name + ".json")
  mbs = [0.25] if args.tiny else [float(v) for v in args.mb.split(",")]
  for mb in mbs:
    with bk._interp_ctx(args.tiny)():  # noqa: SLF001 (--tiny: the GPU interpreter)
      result["sizes"].append(run_size(mb, configs, timer, num_sms))
    with open(path, "w") as f:
      json.dump(result, f, indent=1)
  plot(result, os.path.join(args.out, name + ".png"))
  for size in result["sizes"]:
    best = min(size["rings"], key=lambda r: r["us"])
    print(f"{size['mbytes']:6.1f} MB: best ring {best['us']:.2f} us ({best['copy_kb']:.0f} KB "
          f"copies, depth {best['depth']}, {best['ctas_per_sm']} CTA/SM); XLA bf16 same bytes "
          f"{size['xla_bf16_same_bytes']['us']:.2f} us, bf16 of the same weight "
          f"{size['xla_bf16_same_weight']['us']:.2f} us")


if __name__ == "__main__":
  main()

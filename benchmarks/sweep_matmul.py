"""Tiling sweep of the FP4 matmul kernels on one GPU (what ``default_config`` and
``stream_config`` are tuned from).

    python benchmarks/sweep_matmul.py --out DIR [--shapes 16x3072x12288,...] [--limit 40]
        [--stream]

For each ``MxKxN``: ``default_config``'s tiling and the others of ``candidates`` (with
``--stream``: ``stream_config``'s and ``stream_candidates``; at most ``--limit``), timed as
the whole ``fp4_matmul`` W4A4 call (activation decode, kernel, split-K sum: what a user
runs) with ``bench_kernels``' timer (CUPTI kernel time, median, R weight buffers per call
beyond L2, memory poisoned first) and checked against the float32 reference like there.
Writes ``sweep_<device>_<date>.json`` after every config; prints the five fastest per shape.
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
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(__file__))
import bench_kernels as bk  # noqa: E402
from bench_kernels import fm, gn  # noqa: E402

DEFAULT_SHAPES = "16x3072x12288,16x12288x3072,64x3072x12288"


def candidates(m: int, n: int, k: int, limit: int, num_sms: int = 132):
  """Tilings for one shape: ``default_config``'s first, then every (split-K, tiles per CTA)
  whose CTAs fill at least 90% of their waves (1-3 per SM, all resident at once), each with
  pipeline depth 4 and 8, two K tiles per step, two warpgroups, and ``overlap_wgmma`` off,
  where they differ."""
  base = fm.default_config(m, n, k)
  nt, kt = n // fm.TILE_N, k // fm.TILE_K
  mt = -(-m // base.tile_m)
  out = [base]
  for splits in fm._divisors(kt):
    for tiles in fm._divisors(nt):
      ctas = nt // tiles * mt * splits
      per_sm = -(-ctas // num_sms)
      if per_sm > 3 or ctas < 0.9 * per_sm * num_sms:
        continue
      ks = kt // splits
      for k_tiles, depth, wgs, ovl in ((1, 4, 1, True), (1, 8, 1, True), (2, 4, 1, True),
                                       (1, 4, 2, True), (1, 4, 1, False)):
        if ks % k_tiles or tiles % wgs or depth > tiles // wgs * ks // k_tiles:
          continue
        cfg = dataclasses.replace(base, k_splits=splits, tiles_per_cta=tiles, k_tiles=k_tiles,
                                  max_concurrent_steps=depth, warpgroups=wgs,
                                  overlap_wgmma=ovl)
        if cfg not in out and fm.SMEM_BYTES // fm.smem_bytes(cfg, k) >= per_sm:
          out.append(cfg)
  return out[:limit]


def stream_candidates(m: int, n: int, k: int, limit: int, num_sms: int = 132):
  """Tilings of the streaming kernel: ``auto_config``'s (what ``fp4_matmul`` runs) first;
  then ``stream_config``'s unsplit and with K split in 2, 3 and 4, each in both CTA orders
  (``n_inner``); tile_m 256 with the output tiles in the pipeline's memory (two,
  then one consumer warpgroups; ``overlap_wgmma`` off, then on); two weight tiles per
  warpgroup and step (``wg_tiles`` 2) and tile_m 256, each with the output tiles in the
  pipeline's memory and in their own, with and without ``overlap_wgmma``; then every tile_m
  (128, 256, 64; up to M rounded up to 64) x warpgroups (1, 2) x output tiles per warpgroup
  (1, 2, 4), each at the deepest pipeline that fits; then the first with ``overlap_wgmma``
  flipped and with pipeline depth 2. Only tilings with at least one wave of CTAs (split K
  excepted: there the splits add CTAs). Where ``auto_config`` fits its tile (version 19),
  its variants come second: ``overlap_wgmma``, ``n_inner`` and ``alias_out`` flipped, and
  one consumer warpgroup."""
  base = fm.stream_config(m, n, k)
  out = [fm.auto_config(m, n, k)]

  def keep(cfg):
    if cfg not in out:
      out.append(cfg)

  def add(tm, wgs, per_wg, wt=1, overlap=True, alias=False, min_ctas=num_sms, ni=False):
    cols = fm.TILE_N * wgs * per_wg * wt
    if n % cols or n // cols * -(-m // tm) < min_ctas:
      return
    try:
      cfg = fm.stream_config(m, n, k, tile_m=tm, warpgroups=wgs, tiles_per_wg=per_wg,
                             wg_tiles=wt, alias_out=alias)
    except ValueError:  # does not fit shared memory
      return
    keep(dataclasses.replace(cfg, overlap_wgmma=overlap, n_inner=ni))

  fit = out[0]
  if fit.stream and fit.k_splits == 1 and fit.tile_m not in (128, 256):
    # version 19's fitted tile with overlap_wgmma, the CTA order and the output tiles'
    # place flipped, then with one consumer (64 columns a CTA)
    keep(dataclasses.replace(fit, overlap_wgmma=not fit.overlap_wgmma))
    keep(dataclasses.replace(fit, n_inner=not fit.n_inner))
    add(fit.tile_m, 2, 1, overlap=fit.overlap_wgmma, alias=not fit.alias_out, min_ctas=0,
        ni=fit.n_inner)
    add(fit.tile_m, 1, 1, alias=fit.alias_out, min_ctas=0, ni=fit.n_inner)

  steps = k // fm.TILE_K
  for splits in (1, 2, 3, 4):  # split K: more CTAs where N is narrow (version 14)
    if steps % splits == 0:
      cfg = fm.stream_config(m, n, k, k_splits=splits)
      for ni in (out[0].n_inner, not out[0].n_inner):  # CTA order (version 15)
        keep(dataclasses.replace(cfg, n_inner=ni))
  if m > 128:  # tile_m 256: the best at 1024 and 4608 rows (NOTES version 13)
    for wgs in (2, 1):
      for overlap in (False, True):
        add(256, wgs, 1, overlap=overlap, alias=True)
  for wgs in (2, 1):
    for alias in (True, False):
      for overlap in (True, False):
        # two accumulators of tile_m <= 128 columns: 128 registers a thread, as tile_m 256
        add(min(base.tile_m, 128), wgs, 1, wt=2, overlap=overlap, alias=alias)
        if m > 128 and wgs == 2 and not alias:  # aliased: above
          add(256, 2, 1, overlap=overlap, alias=False)
  for tm in (128, 256, 64):
    if tm <= max(64, -(-m // 64) * 64):
      for wgs in (1, 2):
        for per_wg in (1, 2, 4):
          add(tm, wgs, per_wg)
  keep(dataclasses.replace(base, overlap_wgmma=not base.overlap_wgmma))
  keep(dataclasses.replace(base, max_concurrent_steps=2))
  return out[:limit]


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--out", default=os.environ.get("OUT", "."))
  p.add_argument("--shapes", default=DEFAULT_SHAPES, help="comma-separated MxKxN")
  p.add_argument("--limit", type=int, default=40, help="configs per shape")
  p.add_argument("--stream", action="store_true", help="sweep the streaming kernel")
  args = p.parse_args()
  dev = jax.devices()[0]
  date = datetime.date.today().isoformat()
  path = os.path.join(args.out, f"sweep_{dev.device_kind.replace(' ', '_')}_{date}.json")
  res = dict(device=dev.device_kind, jax_version=jax.__version__, date=date, rows=[])
  timer = bk.Timer(False)
  key = jax.random.key(3)
  for shape in args.shapes.split(","):
    m, k, n = (int(v) for v in shape.split("x"))
    reps = bk._reps(fm.weight_bytes(n, k))
    q = [bk._rand_weights(jax.random.fold_in(key, i), n, k) for i in range(reps)]
    pws = [fm.prepare_weights(*qi) for qi in q]
    qa = gn.quantize_nvfp4(bk._rand_act(jax.random.fold_in(key, 99), m, k))
    ref = bk._w4a4_reference(qa, fm.dequantize(*q[0], "nvfp4"))
    args_ = (qa.codes, qa.scales, qa.tensor_scale, pws)
    bf16 = [jax.random.normal(jax.random.fold_in(key, 50 + i), (k, n), jnp.bfloat16)
            for i in range(bk._reps(n * k * 2))]
    a16 = bk._rand_act(key, m, k)
    t_bf16 = timer(jax.jit(lambda a, ws: [a @ w for w in ws]), (a16, bf16), len(bf16))[0]
    rows = []
    cands = (stream_candidates if args.stream else candidates)(m, n, k, args.limit)
    for i, cfg in enumerate(tqdm(cands, desc=shape)):
      row = dict(m=m, k=k, n=n, config=dataclasses.asdict(cfg), default=i == 0,
                 xla_bf16_kernel_us=t_bf16)
      try:
        kern, wall, out = timer(bk._ours("kernel", cfg), args_, reps)
        rel, ok = bk._check(out[0], ref)
        row.update(kernel_us=kern, wall_us=wall, rel_err=rel, ok=ok)
      except Exception as e:  # keep going: a config may fail to compile
        row.update(kernel_us=float("nan"), ok=False, error=f"{type(e).__name__}: {e}"[:300])
      rows.append(row)
      res["rows"].append(row)
      with open(path, "w") as f:
        json.dump(res, f, indent=1)
    good = sorted((r for r in rows if r["ok"]), key=lambda r: r["kernel_us"])
    print(f"{m}x{k}x{n}: bf16 {t_bf16:.1f} us, default {rows[0]['kernel_us']:.1f} us, "
          f"{len(rows)} configs ({sum(not r['ok'] for r in rows)} failed)")
    for r in good[:5]:
      c = r["config"]
      print(f"  {r['kernel_us']:6.1f} us  tm {c['tile_m']:3d} splits {c['k_splits']:3d} tiles "
            f"{c['tiles_per_cta']:3d} kt {c['k_tiles']} depth {c['max_concurrent_steps']} wg "
            f"{c['warpgroups']} x {c['wg_tiles']} overlap {c['overlap_wgmma']}")


if __name__ == "__main__":
  main()

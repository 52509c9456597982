"""One W4A4 NVFP4 ``fp4_matmul`` launch, or with ``--norm`` one ``norm_quantize`` launch, for
Nsight Compute or a PTX / ptxas dump.

    ncu -k regex:mosaic --launch-count 1 --section SpeedOfLight \\
        python benchmarks/profile_one.py 4608x3072x12288 --stream --warpgroups 2
    mkdir -p ptx && MOSAIC_GPU_DUMP_PTX=1 MOSAIC_GPU_DUMP_PTXAS=1 MOSAIC_GPU_DUMP_TO=ptx \\
        python benchmarks/profile_one.py 2x4608x3072 --norm --gathered

Random weights and activations as in ``bench_kernels.py``; the call is run twice (the
first compiles) and checked to be finite, so a profile never shows a broken kernel.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from benchmarks.bench_kernels import _rand_act, _rand_weights  # noqa: E402
from pqjax_kernels import matmul_fp4 as fm  # noqa: E402
from pqjax_kernels import norm as gn  # noqa: E402
from pqjax_kernels import norm_kernel as nk  # noqa: E402


def run_norm(args) -> None:
  """The gathered norm + NVFP4 quantize as ``bench_kernels.py`` times it: per-sample adaLN,
  static tensor scale (``--dynamic``: two launches)."""
  b, t, d = (int(v) for v in args.shape.split("x"))
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(k1, (b, t, d), jnp.bfloat16)
  perm = jax.random.permutation(k2, d).astype(jnp.int32) if args.gathered else None
  shift, scale = jax.random.normal(k3, (2, b, d), jnp.float32) * 0.1
  vecs = {} if args.kind == "none" else dict(shift=shift, scale=scale)
  ts = None if args.dynamic else jnp.float32(0.01)
  f = jax.jit(lambda x, p: nk.norm_quantize(x, p, kind=args.kind, tensor_scale=ts,
                                            rows=args.rows, chunk=args.chunk, **vecs))
  for _ in range(2):
    out = jax.block_until_ready(f(x, perm))
  if not np.isfinite(np.asarray(out.scales, np.float32)).all():
    raise SystemExit(f"non-finite block scales for {args.shape}")
  print("done", args.shape, args.kind, "gathered" if args.gathered else "in order")


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("shape", help="MxKxN, or BxTxD with --norm")
  p.add_argument("--norm", action="store_true", help="norm_quantize instead of fp4_matmul")
  p.add_argument("--kind", default="layer", help="norm: layer, rms or none")
  p.add_argument("--gathered", action="store_true", help="norm: a random perm")
  p.add_argument("--dynamic", action="store_true", help="norm: dynamic tensor scale")
  p.add_argument("--rows", type=int, default=None, help="norm: rows per CTA")
  p.add_argument("--chunk", type=int, default=None, help="norm: columns per chunk")
  p.add_argument("--stream", action="store_true", help="stream_config, else default_config")
  p.add_argument("--warpgroups", type=int, default=None)
  p.add_argument("--tile-m", type=int, default=None)
  p.add_argument("--wg-tiles", type=int, default=1, help="streaming: tiles per warpgroup")
  p.add_argument("--alias-out", action="store_true",
                 help="streaming: MatmulConfig.alias_out (else stream_config's choice)")
  p.add_argument("--k-splits", type=int, default=1, help="streaming: MatmulConfig.k_splits")
  p.add_argument("--n-inner", action="store_true", help="streaming: MatmulConfig.n_inner")
  p.add_argument("--act-codes", action="store_true",
                 help="streaming: MatmulConfig.act_codes (the kernel decodes the activations)")
  args = p.parse_args()
  if args.norm:
    run_norm(args)
    return
  m, k, n = (int(v) for v in args.shape.split("x"))
  kw = {} if args.warpgroups is None else dict(warpgroups=args.warpgroups)
  if args.stream:
    cfg = dataclasses.replace(
        fm.stream_config(m, n, k, tile_m=args.tile_m, wg_tiles=args.wg_tiles,
                         alias_out=True if args.alias_out else None, k_splits=args.k_splits,
                         act_codes=args.act_codes, **kw), n_inner=args.n_inner)
  else:
    cfg = fm.default_config(m, n, k, **kw)
  key = jax.random.key(0)
  pw = fm.prepare_weights(*_rand_weights(key, n, k))
  qa = gn.quantize_nvfp4(_rand_act(jax.random.fold_in(key, 1), m, k))
  f = jax.jit(lambda a, s, t, w: fm.fp4_matmul(a, w, a_scales=s, a_tensor_scale=t,
                                                method="kernel", config=cfg))
  for _ in range(2):
    out = jax.block_until_ready(f(qa.codes, qa.scales, qa.tensor_scale, pw))
  if not np.isfinite(np.asarray(out, np.float32)).all():
    raise SystemExit(f"non-finite output for {args.shape} {cfg}")
  print("done", args.shape, cfg)


if __name__ == "__main__":
  main()

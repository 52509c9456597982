"""The gathered norm + NVFP4 quantize kernel at fixed work, with unused shared memory added
per CTA: how its time depends on the CTAs (warps) resident per SM.

    python benchmarks/diag_norm_smem.py --out DIR [--shape 2x4608x3072]

The kernel as shipped (per-sample adaLN shift and scale: float32 vectors, 24 KiB of its
~64 KiB) and without the adaLN vectors (~40 KiB), each padded so that 2 to 5 CTAs fit on an
SM (227 KiB), gathered with a random permutation and in order, static tensor scale. The
padding is a scratch buffer the kernel never touches, so only residency changes (NOTES
version 31). ``ctas_per_sm`` is nominal: the padding is sized from ``_smem_bytes``'
estimate, and the compiled kernel allocates more (64 KiB against the estimate's 61 for the
shipped case at D = 3072: Mosaic GPU's dump, ``MOSAIC_GPU_DUMP_TO``, ``*.resources.txt``),
so a row may hold one CTA per SM fewer than it says. CUPTI kernel time, median of 20; JSON under DIR. ``--tiny`` runs the padded
kernels under the GPU interpreter on the CPU (wall time only), to test this script.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from benchmarks.bench_kernels import Timer  # noqa: E402
from benchmarks.diag_parts import write_json  # noqa: E402
from pqjax_kernels import norm_kernel as nk  # noqa: E402

SMEM_PER_SM = 227 * 1024


@contextlib.contextmanager
def padded(pad_bytes: int):
  """``nk.norm_quantize``'s kernels get an unused ``pad_bytes`` scratch buffer each."""
  real = nk.plgpu

  def kernel(body, *, scratch_types=(), **kw):
    extra = [real.SMEM((pad_bytes,), jnp.uint8)] if pad_bytes else []
    return real.kernel(body, scratch_types=[*scratch_types, *extra], **kw)

  proxy = types.SimpleNamespace(**{n: getattr(real, n) for n in dir(real)
                                   if not n.startswith("__")})
  proxy.kernel = kernel
  nk.plgpu = proxy
  try:
    yield
  finally:
    nk.plgpu = real


def kernel_smem(x, perm, n_vec: int) -> int:
  """Bytes of shared memory the kernel itself takes per CTA (4-row blocks, NVFP4 out)."""
  return int(nk._smem_bytes(x, perm, "nvfp4", n_vec, 4))  # noqa: SLF001


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default=".")
  ap.add_argument("--shape", default="2x4608x3072")
  ap.add_argument("--tiny", action="store_true")
  args = ap.parse_args()
  b, t, d = (2, 8, 128) if args.tiny else (int(v) for v in args.shape.split("x"))
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((b, t, d)), jnp.bfloat16)
  shift, scale = (jnp.asarray(rng.standard_normal((b, d)) * 0.1, jnp.float32) for _ in "ab")
  timer = Timer(args.tiny)
  results = []
  ctx = contextlib.nullcontext()
  if args.tiny:
    from tests import interpret  # noqa: PLC0415 (the interpreter: only for --tiny)
    ctx = interpret.gpu_interpreter()
  cases = [(g, v) for g in (True, False) for v in (True, False)]
  with ctx:
    for gathered, vecs in tqdm(cases, desc="cases"):
      perm = jnp.asarray(rng.permutation(d), jnp.int32) if gathered else None
      kw = dict(shift=shift, scale=scale) if vecs else {}
      base = kernel_smem(x, perm, 2 if vecs else 0)
      for ctas in range(2, 6):
        pad = SMEM_PER_SM // ctas - base - 1024  # barriers and alignment: 1 KiB spare
        if pad < 0:
          continue
        with padded(pad):
          f = jax.jit(lambda x, p, kw: nk.norm_quantize(  # noqa: B023 (traced right here)
              x, p, tensor_scale=jnp.float32(0.01), rows=4, interpret=args.tiny, **kw).codes)
          kern, wall, _ = timer(f, (x, perm, kw), 1)
        results.append(dict(gathered=gathered, adaln=vecs, ctas_per_sm=ctas, smem=base + pad,
                            kernel_us=kern, wall_us=wall))
        print(f"gathered={gathered} adaln={vecs} ctas/SM={ctas} smem={base + pad} "
              f"kernel={kern:.1f} us wall={wall:.1f} us", flush=True)
  write_json(args.out, "diag_norm_smem", shape=[b, t, d], results=results)


if __name__ == "__main__":
  main()

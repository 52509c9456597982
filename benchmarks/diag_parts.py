"""The activation quantize of a concatenation (FLUX single blocks' ``proj_out`` input:
attention output and MLP activations), read from its parts in place against concatenated
first.

    python benchmarks/diag_parts.py --out DIR [--rows 4608] [--widths 3072,12288]

Times, side by side in one run (CUPTI kernel time, median of 20; wall time per call):
``parts`` (``norm_quantize`` of the parts: each CTA copies its rows from the part holding
them), ``concat + quantize`` (XLA's concatenation, then the norm kernel on rows of 3072, as
``pqjax.dispatch`` quantizes a whole input in order), ``quantize`` (the latter's kernel
alone) and ``concat`` (XLA's concatenation alone). Inputs are larger than the L2 cache at
the default sizes. Writes ``diag_parts_<device>_<date>.json``; ``--tiny`` runs small shapes
on the CPU under the GPU interpreter (wall time only), to test this script.
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
from tqdm import tqdm

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from benchmarks.bench_kernels import Timer  # noqa: E402
from pqjax_kernels import norm  # noqa: E402
from pqjax_kernels import norm_kernel as nk  # noqa: E402


def variants(interpret: bool):
  """name -> jitted function of the parts."""
  kw = dict(kind="none", out="nvfp4_f16", tensor_scale=jnp.float32(0.004),
            interpret=interpret)
  row = lambda c: c.reshape(-1, nk.PART_ROW if not interpret else 64)  # noqa: E731
  return {
      "parts": jax.jit(lambda ps: nk.norm_quantize(ps, **kw).values),
      "concat + quantize": jax.jit(lambda ps: nk.norm_quantize(
          row(jnp.concatenate(ps, axis=-1)), **kw).values),
      "quantize": jax.jit(lambda ps, c: nk.norm_quantize(row(c), **kw).values),
      "concat": jax.jit(lambda ps: jnp.concatenate(ps, axis=-1)),
  }


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default=".")
  ap.add_argument("--rows", default="4608,1024", help="comma-separated row counts")
  ap.add_argument("--widths", default="3072,12288", help="the parts' widths")
  ap.add_argument("--tiny", action="store_true")
  args = ap.parse_args()
  widths = (64, 128) if args.tiny else tuple(int(w) for w in args.widths.split(","))
  row_counts = (40,) if args.tiny else tuple(int(r) for r in args.rows.split(","))
  timer = Timer(args.tiny, breakdown=True)
  fns = variants(args.tiny)
  results = []
  if args.tiny:
    from tests import interpret  # noqa: PLC0415 (the interpreter: only for --tiny)
    ctx = interpret.gpu_interpreter()
  else:
    import contextlib  # noqa: PLC0415
    ctx = contextlib.nullcontext()
  with ctx:
    for m in tqdm(row_counts, desc="rows"):
      rng = np.random.default_rng(m)
      parts = tuple(jnp.asarray(rng.standard_normal((m, w)) * 3, jnp.bfloat16)
                    for w in widths)
      cat = jnp.concatenate(parts, axis=-1)
      ref = norm.gathered_quantize(cat, None, out="nvfp4_f16",
                                   tensor_scale=jnp.float32(0.004)).values
      row = {"rows": m, "widths": list(widths)}
      for name, fn in fns.items():
        fargs = (parts, cat) if name == "quantize" else (parts,)
        kern, wall, out = timer(fn, fargs, 1)
        if name != "concat":
          row[f"{name}_ok"] = bool(np.array_equal(np.asarray(out.reshape(cat.shape)),
                                                  np.asarray(ref)))
        row[f"{name}_kernel_us"], row[f"{name}_wall_us"] = kern, wall
        row[f"{name}_kernels"] = timer.kernels
      results.append(row)
      print(f"rows={m} widths={widths} " + " ".join(
          f"{n}={row[n + '_kernel_us']:.1f}/{row[n + '_wall_us']:.1f}" for n in fns)
            + " ok=" + str(all(v for k, v in row.items() if k.endswith("_ok"))))
  write_json(args.out, "diag_parts", results=results)


def write_json(out_dir: str, benchmark: str, **fields) -> str:
  """Writes ``fields`` with the benchmark's name, the device, JAX version and date as
  ``<benchmark>_<device>_<date>.json`` under ``out_dir``; returns the path."""
  dev = jax.devices()[0]
  out = dict(benchmark=benchmark, device=dev.device_kind, platform=dev.platform,
             jax=jax.__version__, date=datetime.date.today().isoformat(), **fields)
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, f"{benchmark}_{dev.device_kind.replace(' ', '_')}_"
                               f"{out['date']}.json")
  with open(path, "w") as f:
    json.dump(out, f, indent=1)
  print("wrote", path)
  return path


if __name__ == "__main__":
  main()

"""Inference speed: a FLUX.1-dev-width model's forward pass in bf16 and quantized, one GPU.

``converters.from_config`` builds FLUX.1-dev's real config with random bf16 weights and
``--double`` / ``--single`` transformer blocks (the full model has 19 and 38; the blocks
carry nearly all the time, so per-block ratios carry over; the default 1 + 2 runs in about
4 device-minutes on an H200, 2 + 4 did not finish in 230 s). The model is quantized with
``pqjax.quantize`` (PermuQuant NVFP4, W4A4 and W4A16, static activation scales) on a small
calibration set, then one forward pass of ``--batch`` samples of image + text tokens is
timed per model: kernel time from CUPTI (every kernel of the jitted call, median of 20) and
wall time, beside the output's relative error against bf16; the W4A4 model also with its
fusions off (``dispatch.fusion(False)``: the norm sites' norm and quantize in two passes, the
MLPs' GELU in a pass of its own) and with its
linears re-laying their weights out per call (no stored kernel layout). Writes
``inference_<device>_<date>.json`` and a bar plot beside it.

  python benchmarks/bench_inference.py --out $OUT          # FLUX.1-dev width, GPU
  python benchmarks/bench_inference.py --tiny --out /tmp   # smoke run on the CPU
  python benchmarks/bench_inference.py --plot RESULTS.json  # the PNG again
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import converters  # noqa: E402
import pqjax  # noqa: E402
from pqjax import dispatch  # noqa: E402
from pqjax.qmodules import QuantLinear  # noqa: E402
from pqjax.report import rel_error  # noqa: E402
from benchmarks.bench_kernels import Timer, replot  # noqa: E402
from benchmarks.bench_pipeline import FLUX1_DEV, TINY, batches  # noqa: E402

MODES = ("w4a4", "w4a16")


def forward_fn(model: nnx.Module):
  """The jitted forward pass of ``model`` and its state (weights are arguments, as a
  serving loop holds them)."""
  graphdef, state = nnx.split(model)
  return jax.jit(lambda st, inputs: nnx.merge(graphdef, st)(**inputs)), state


def without_kernel_layout(model: nnx.Module) -> nnx.Module:
  """A copy of a quantized model whose linears re-lay their weights out on every call (as
  before ``prepare_kernel_weights``): what storing the layout saves."""
  model = nnx.clone(model)
  for _, node in nnx.iter_graph(model):
    if isinstance(node, QuantLinear):
      node.kernel_codes = node.kernel_scales = nnx.data(None)
  return model


def kernel_breakdown(fn, args, top: int = 30) -> list[tuple[str, float]] | None:
  """The forward pass's kernels by total time (CUPTI, median of 3 passes): [(name, us)],
  the ``top`` longest; None where this JAX's profiler gives no per-kernel times."""
  from jax.experimental.mosaic.gpu import profiler  # noqa: PLC0415 (GPU only)
  try:
    _, per = profiler.measure(fn, aggregate=False, iterations=3)(*args)
  except (TypeError, ValueError, RuntimeError) as e:
    print(f"no per-kernel times: {e!r}", flush=True)
    return None
  passes = per if per and isinstance(per[0], list) else [per]
  totals: dict[str, list[float]] = {}
  for p in passes:
    sums: dict[str, float] = {}
    for name, ms in p:
      sums[name] = sums.get(name, 0.0) + ms * 1e3
    for name, us in sums.items():
      totals.setdefault(name, []).append(us)
  rows = sorted(((n, float(np.median(v))) for n, v in totals.items()), key=lambda r: -r[1])
  return rows[:top]


# Kernel-name patterns for the plot's breakdown, first match wins (CUPTI names: Mosaic GPU
# kernels, cuBLAS's nvjet GEMMs and XLA's Triton GEMM fusions, XLA's other fusions).
_KINDS = (("our kernels (Mosaic GPU)", ("mosaic",)), ("GEMMs (cuBLAS, XLA)", ("nvjet", "gemm")),
          ("other XLA kernels", ("",)))


def breakdown(run: dict) -> dict[str, float]:
  """A run's forward-pass kernel time (ms) by kind (``_KINDS``); the kernels past the
  recorded longest ones count as "other XLA kernels"."""
  out = {name: 0.0 for name, _ in _KINDS}
  for kname, us in run.get("kernels_us") or []:
    kind = next(name for name, pats in _KINDS if any(p in kname for p in pats))
    out[kind] += us / 1e3
  out[_KINDS[-1][0]] += run["kernel_ms"] - sum(out.values())
  return out


def plot(result: dict, path: str) -> None:
  """Forward-pass kernel time per model, split by kind of kernel where the per-kernel times
  were recorded, with the speed-up over bf16 on each bar."""
  import matplotlib  # noqa: PLC0415 (only for the plot)
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415
  runs = result["runs"]
  names = list(runs)
  key = "kernel_ms" if all(np.isfinite(r["kernel_ms"]) for r in runs.values()) else "wall_ms"
  ys = [runs[n][key] for n in names]
  fig, ax = plt.subplots(figsize=(6.0, 3.8))
  xs = np.arange(len(names))
  if key == "kernel_ms" and all(r.get("kernels_us") for r in runs.values()):
    parts = [breakdown(runs[n]) for n in names]
    bottom = np.zeros(len(names))
    for i, (kind, _) in enumerate(_KINDS):
      h = np.array([p[kind] for p in parts])
      ax.bar(xs, h, bottom=bottom, color=f"C{i}", label=kind)
      bottom += h
    ax.set_ylim(top=max(ys) * 1.25)
    ax.legend(fontsize=7, loc="upper center", ncol=3)
  else:
    ax.bar(xs, ys, color=[f"C{i}" for i in range(len(names))])
  ax.set_xticks(xs, names, rotation=15, ha="right", fontsize=7)
  for x, y in zip(xs, ys):
    ax.text(x, y, f"{ys[0] / y:.2f}x", ha="center", va="bottom", fontsize=8)
  ax.set_ylabel(f"forward pass, {key.replace('_', ' ')}")
  ax.set_title(f"{result['model']}\n{result['device']}, JAX {result['jax']}, {result['date']}",
               fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def time_model(model: nnx.Module, name: str, inputs, timer, args, device) -> dict:
  """One model's forward pass timed (and its kernels listed, its HLO written if asked)."""
  fn, state = forward_fn(model)
  if args.hlo:
    slug = name.replace(" ", "_").replace(",", "").replace("+", "and")
    with open(os.path.join(args.out, f"hlo_{slug}.txt"), "w") as f:
      f.write(fn.lower(state, inputs).compile().as_text())
  kern, wall, out = timer(fn, (state, inputs), 1)
  run = {"kernel_ms": kern / 1e3, "wall_ms": wall / 1e3, "out": out}
  print(f"timed {name}: {kern / 1e3:.2f} ms kernel", flush=True)
  if device.platform == "gpu":
    run["kernels_us"] = kernel_breakdown(fn, (state, inputs))
    for kname, us in (run["kernels_us"] or [])[:12]:
      print(f"  {us:9.1f} us  {kname[:90]}", flush=True)
  return run


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--out", default=".")
  ap.add_argument("--tiny", action="store_true", help="tiny FLUX config (CPU smoke run)")
  ap.add_argument("--double", type=int, default=1, help="double-stream blocks")
  ap.add_argument("--single", type=int, default=2, help="single-stream blocks")
  ap.add_argument("--batch", type=int, default=1)
  ap.add_argument("--img-tokens", type=int, default=4096)
  ap.add_argument("--txt-tokens", type=int, default=512)
  ap.add_argument("--calib-samples", type=int, default=2)
  ap.add_argument("--modes", default=",".join(MODES))
  ap.add_argument("--skip-relaid", action="store_true",
                  help="leave out the W4A4 model that re-lays its weights out per call")
  ap.add_argument("--hlo", action="store_true",
                  help="also write each model's optimized HLO (names the profiled kernels)")
  ap.add_argument("--plot", default=None, help="only plot this results JSON (PNG beside it)")
  args = ap.parse_args()
  if replot(args.plot, plot):
    return
  if args.tiny:
    config = dict(TINY)
    args.img_tokens, args.txt_tokens, args.calib_samples = 16, 8, 2
  else:
    config = dict(FLUX1_DEV, num_layers=args.double, num_single_layers=args.single)
  device = jax.devices()[0]
  timer = Timer(tiny=device.platform != "gpu")
  model = converters.from_config(config, dtype=jnp.bfloat16)
  data = dict(img_tokens=args.img_tokens, txt_tokens=args.txt_tokens, dtype=jnp.bfloat16)
  calib = list(batches(config, samples=args.calib_samples, batch=min(2, args.calib_samples),
                       **data))
  (inputs,) = batches(config, samples=args.batch, batch=args.batch, **data)
  models = {"bf16": model}
  for mode in args.modes.split(","):
    cfg = pqjax.QuantConfig(format="nvfp4", mode=mode, method="permuquant")
    models[f"nvfp4 {mode}"] = pqjax.quantize(model, calib, cfg, progress=True)
  contexts = {}  # traced and run inside: the W4A4 model with its fusions off
  if "nvfp4 w4a4" in models:
    contexts["nvfp4 w4a4, fusions off"] = dispatch.fusion(False)
    models["nvfp4 w4a4, fusions off"] = models["nvfp4 w4a4"]
  if "nvfp4 w4a4" in models and not args.skip_relaid:
    models["nvfp4 w4a4, re-laid per call"] = without_kernel_layout(models["nvfp4 w4a4"])
  runs = {}
  os.makedirs(args.out, exist_ok=True)
  for name, m in models.items():
    with contexts.get(name, contextlib.nullcontext()):
      runs[name] = time_model(m, name, inputs, timer, args, device)
  ref = runs["bf16"]["out"]
  for r in runs.values():
    r["rel_error_vs_bf16"] = rel_error(r.pop("out"), ref)
  result = {
      "benchmark": "inference",
      "model": (f"FLUX.1-dev width, {config['num_layers']} double + "
                f"{config['num_single_layers']} single blocks, random bf16 weights")
      if not args.tiny else "tiny FLUX",
      "device": device.device_kind, "platform": device.platform, "jax": jax.__version__,
      "date": datetime.date.today().isoformat(), "batch": args.batch,
      "img_tokens": args.img_tokens, "txt_tokens": args.txt_tokens,
      "calib_samples": args.calib_samples, "backend": dispatch.current_backend(),
      "runs": runs,
  }
  print(f"{'model':<30} {'kernel ms':>10} {'wall ms':>9} {'vs bf16':>8} {'rel err':>9}")
  base = runs["bf16"]["kernel_ms" if device.platform == "gpu" else "wall_ms"]
  for name, r in runs.items():
    t = r["kernel_ms" if device.platform == "gpu" else "wall_ms"]
    print(f"{name:<30} {r['kernel_ms']:10.2f} {r['wall_ms']:9.2f} {base / t:7.2f}x "
          f"{r['rel_error_vs_bf16']:9.4f}")
  stem = os.path.join(args.out, f"inference_{device.device_kind.replace(' ', '_')}_"
                      f"{result['date']}")
  with open(stem + ".json", "w") as f:
    json.dump(result, f, indent=1)
  plot(result, stem + ".png")


if __name__ == "__main__":
  main()

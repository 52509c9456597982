"""Renders a `bench_kernels.py` results JSON as a Markdown table and a speed plot (PNG).

Usage: python benchmarks/report_kernels.py NEW.json [OLDER.json ...] [scaled:OTHER.json ...]
Writes the PNG beside NEW.json (the default kernel, the XLA path and ``scaled_matmul`` against
XLA bf16) and prints the Markdown table (kernel time, CUPTI median; "auto" is the candidate
``fp4_matmul`` runs by default at that M, "best" the fastest tiling variant timed);
a run with gathered-norm rows also gets ``NEW_norm.png`` (XLA vs kernel per variant).
Shapes NEW did not time, and ``scaled_matmul`` times it skipped (``bench_kernels.py
--prev``), are taken from the OLDER runs (same device), newest first; the table names the
file each row comes from. ``scaled:`` files contribute only their ``scaled_matmul`` times.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

BASELINE = "xla_bf16"
PLOTTED = ("auto", "ours_w4a4_values", "ours_w4a4_xla", "scaled_matmul_nvfp4")  # others: table
LABELS = {"auto": "auto (fp4_matmul's default)",
          "ours_w4a4_values": "auto on float16 NVFP4 values (what dispatch runs)"}


def auto_method(m: int, n: int, k: int, row: dict | None = None) -> str:
  """The candidate ``fp4_matmul(method="auto")`` runs for ``(M, K) x (K, N)`` on the GPU
  machines' JAX (>= 0.11), whatever JAX renders the report: where it streams, the candidate
  of ``row`` timed with ``auto_config``'s tiling, else (a run before that tiling) the run's
  default, ``ours_w4a4_stream`` (``ours_w4a4_stream_cl2`` below ``STREAM_MIN_M`` rows)."""
  from pqjax_kernels import matmul_fp4 as fm  # noqa: PLC0415 (imports jax)
  small = m < fm.STREAM_MIN_M
  if small and not fm.auto_config(m, n, k).stream:
    return "ours_w4a4_kernel"
  if not small and not fm.prefers_stream(m, n, k):
    return "ours_w4a4_xla"
  # from packed codes (decode_ctas where SMs idle); runs before version 29 timed without
  for want in (fm.auto_config(m, n, k, codes=True), fm.auto_config(m, n, k)):
    for key, cfg in (row or {}).items():
      if key.startswith("ours_w4a4_stream") and key.endswith("_config") and \
          fm.MatmulConfig(**cfg) == want:
        return key[:-len("_config")]
  return "ours_w4a4_stream_cl2" if small else "ours_w4a4_stream"


def best_ours(row: dict) -> tuple[str, float] | None:
  """The fastest of our W4A4 methods in a row that also passed its correctness check."""
  ours = [(k[:-len("_kernel_us")], v) for k, v in row.items()
          if k.startswith("ours_w4a4_") and k.endswith("_kernel_us")
          and row.get(k[:-len("_kernel_us")] + "_ok", True)]
  return min(ours, key=lambda kv: kv[1]) if ours else None


def markdown(rows: list[dict]) -> str:
  lines = ["| M x K x N | XLA bf16 us | scaled_matmul us | auto us (vs bf16) "
           "| on f16 values us (vs bf16) | best ours (method) us | vs bf16 | vs scaled_matmul "
           "| run |", "|---|---|---|---|---|---|---|---|---|"]
  for r in sorted(rows, key=lambda r: (r["k"], r["n"], r["m"])):
    bf16 = r[f"{BASELINE}_kernel_us"]
    sm = r.get("scaled_matmul_nvfp4_kernel_us")
    best = best_ours(r)
    if best is None:
      continue
    name, us = best
    sm_txt = f"{sm:.1f}" if sm else "-"
    vs_sm = f"{sm / us:.2f}x" if sm else "-"
    auto = r.get(auto_method(r["m"], r["n"], r["k"], r) + "_kernel_us")
    auto_txt = f"{auto:.1f} ({bf16 / auto:.2f}x)" if auto else "-"
    vals = r.get("ours_w4a4_values_kernel_us")
    vals_txt = f"{vals:.1f} ({bf16 / vals:.2f}x)" if vals else "-"
    lines.append(f"| {r['m']} x {r['k']} x {r['n']} | {bf16:.1f} | {sm_txt} | {auto_txt} | "
                 f"{vals_txt} | "
                 f"{us:.1f} ({name[len('ours_'):]}) | {bf16 / us:.2f}x | {vs_sm} | "
                 f"{r['run']} |")
  return "\n".join(lines)


def plot(rows: list[dict], title: str, path: Path) -> None:
  shapes = sorted({(r["k"], r["n"]) for r in rows})
  fig, axes = plt.subplots(1, len(shapes), figsize=(4.2 * len(shapes), 3.6), squeeze=False)
  for ax, (k, n) in zip(axes[0], shapes):
    sub = sorted((r for r in rows if (r["k"], r["n"]) == (k, n)), key=lambda r: r["m"])
    for i, name in enumerate(PLOTTED):  # one colour per series in every panel
      keys = [(r, (auto_method(r["m"], r["n"], r["k"], r) if name == "auto" else name)
               + "_kernel_us") for r in sub]
      pts = [(r["m"], r[f"{BASELINE}_kernel_us"] / r[key]) for r, key in keys if key in r]
      if pts:
        ax.plot(*zip(*pts), marker="o", color=f"C{i}", label=LABELS.get(name, name))
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_title(f"K={k} N={n}")
    ax.set_xlabel("M (tokens)")
    ax.legend(fontsize=6)
  axes[0][0].set_ylabel("speed vs XLA bf16 (>1 faster)")
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


# (label, XLA candidate, kernel candidate) of the gathered-norm benchmark.
NORM_PAIRS = (
    ("norm static", "gathered_norm_nvfp4_static", "kernel_gathered_nvfp4_static"),
    ("norm dynamic", "gathered_norm_nvfp4_dynamic", "kernel_gathered_nvfp4_dynamic"),
    ("norm + Hadamard", "gathered_norm_hadamard_static", "kernel_gathered_hadamard_static"),
    ("norm bf16 out", "gathered_norm_bf16", "kernel_gathered_bf16"),
    ("quantize", "gathered_quantize_static", "kernel_gathered_quantize_static"),
    ("quantize + Hadamard", "gathered_quantize_hadamard_static",
     "kernel_gathered_quantize_hadamard_static"),
    ("quantize, f16 values", "gathered_quantize_values_static",
     "kernel_gathered_quantize_values_static"))


def plot_norm(rows: list[dict], title: str, path: Path) -> None:
  """Kernel time of XLA's fusion and of the Mosaic kernel per gathered-norm variant, with
  the device copy of the same activations as a floor line, one panel per shape."""
  fig, axes = plt.subplots(1, len(rows), figsize=(6.0 * len(rows), 3.8), squeeze=False)
  for ax, r in zip(axes[0], rows):
    pairs = [p for p in NORM_PAIRS if f"{p[2]}_kernel_us" in r]
    xs = range(len(pairs))
    for shift, idx, label in ((-0.2, 1, "XLA fusion"), (0.2, 2, "Mosaic kernel")):
      ax.bar([x + shift for x in xs], [r[f"{p[idx]}_kernel_us"] for p in pairs], width=0.4,
             label=label)
    ax.axhline(r["copy_kernel_us"], color="k", lw=0.8, ls="--", label="copy (read + write)")
    ax.set_xticks(list(xs), [p[0] for p in pairs], rotation=30, ha="right", fontsize=8)
    ax.set_title(f"{r['b']} x {r['t']} x {r['d']}, gathered")
    ax.set_ylabel("kernel time (us)")
  axes[0][-1].legend(fontsize=7)
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def merge(paths: list[Path], scaled_only: list[Path]) -> dict:
  """NEW's results with the rows and scaled_matmul times it lacks from OLDER runs."""
  data = json.loads(paths[0].read_text())
  for r in data["matmul"]:
    r["run"] = paths[0].name
  key = "scaled_matmul_nvfp4_kernel_us"
  rows = {(r["m"], r["k"], r["n"]): r for r in data["matmul"]}
  for path in paths[1:] + scaled_only:
    for old in json.loads(path.read_text())["matmul"]:
      mkn = (old["m"], old["k"], old["n"])
      if mkn not in rows and path not in scaled_only:
        rows[mkn] = dict(old, run=path.name)
      elif mkn in rows and key not in rows[mkn] and old.get(key) == old.get(key) \
          and key in old:
        rows[mkn][key] = old[key]
  data["matmul"] = list(rows.values())
  return data


def main(argv: list[str]) -> None:
  paths = [Path(a) for a in argv if not a.startswith("scaled:")]
  data = merge(paths, [Path(a[len("scaled:"):]) for a in argv if a.startswith("scaled:")])
  run = f"{data['device']}, JAX {data['jax_version']}, {data['date']}"
  if data["matmul"]:
    plot(data["matmul"], f"W4A4 NVFP4 matmul, {run}", paths[0].with_suffix(".png"))
    print(markdown(data["matmul"]))
  if data.get("norm"):
    plot_norm(data["norm"], f"Gathered norm + NVFP4 quantize, {run}",
              paths[0].with_name(paths[0].stem + "_norm.png"))


if __name__ == "__main__":
  main(sys.argv[1:])

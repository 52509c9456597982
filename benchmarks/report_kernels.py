"""Renders a `bench_kernels.py` results JSON as a Markdown table and a speed plot (PNG).

Usage: python benchmarks/report_kernels.py NEW.json [PREV.json]
Writes the PNG beside NEW.json and prints the Markdown table (kernel time, CUPTI median).
``scaled_matmul`` rows that NEW skipped (``bench_kernels.py --prev``) are taken from PREV, a
run on the same device.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

BASELINE = "xla_bf16"


def methods(rows: list[dict]) -> list[str]:
  """Every timed method in the rows, the bf16 baseline first."""
  names = {k[:-len("_kernel_us")] for r in rows for k in r if k.endswith("_kernel_us")}
  return [BASELINE] + sorted(names - {BASELINE})


def best_ours(row: dict) -> tuple[str, float] | None:
  """The fastest of our methods in a row that also passed its correctness check."""
  ours = [(k[:-len("_kernel_us")], v) for k, v in row.items()
          if k.startswith("ours_") and k.endswith("_kernel_us")
          and row.get(k[:-len("_kernel_us")] + "_ok", True)]
  return min(ours, key=lambda kv: kv[1]) if ours else None


def markdown(rows: list[dict]) -> str:
  lines = ["| M x K x N | XLA bf16 us | scaled_matmul us | best ours (method) us | vs bf16 |"
           " vs scaled_matmul |", "|---|---|---|---|---|---|"]
  for r in sorted(rows, key=lambda r: (r["k"], r["n"], r["m"])):
    bf16 = r[f"{BASELINE}_kernel_us"]
    sm = r.get("scaled_matmul_nvfp4_kernel_us")
    best = best_ours(r)
    if best is None:
      continue
    name, us = best
    sm_txt = f"{sm:.1f}" if sm else "-"
    vs_sm = f"{sm / us:.2f}x" if sm else "-"
    lines.append(f"| {r['m']} x {r['k']} x {r['n']} | {bf16:.1f} | {sm_txt} | {us:.1f} "
                 f"({name[len('ours_'):]}) | {bf16 / us:.2f}x | {vs_sm} |")
  return "\n".join(lines)


def plot(rows: list[dict], title: str, path: Path) -> None:
  shapes = sorted({(r["k"], r["n"]) for r in rows})
  fig, axes = plt.subplots(1, len(shapes), figsize=(4.2 * len(shapes), 3.6), squeeze=False)
  for ax, (k, n) in zip(axes[0], shapes):
    sub = sorted((r for r in rows if (r["k"], r["n"]) == (k, n)), key=lambda r: r["m"])
    for name in methods(sub)[1:]:
      pts = [(r["m"], r[f"{BASELINE}_kernel_us"] / r[f"{name}_kernel_us"]) for r in sub
             if f"{name}_kernel_us" in r]
      if pts:
        ax.plot(*zip(*pts), marker="o", label=name)
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_title(f"K={k} N={n}")
    ax.set_xlabel("M (tokens)")
  axes[0][0].set_ylabel("speed vs XLA bf16 (>1 faster)")
  axes[0][-1].legend(fontsize=7)
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main(argv: list[str]) -> None:
  src = Path(argv[0])
  data = json.loads(src.read_text())
  if len(argv) > 1:
    key = "scaled_matmul_nvfp4_kernel_us"
    prev = {(r["m"], r["k"], r["n"]): r for r in json.loads(Path(argv[1]).read_text())["matmul"]}
    for r in data["matmul"]:
      old = prev.get((r["m"], r["k"], r["n"]), {})
      if key not in r and key in old:
        r[key] = old[key]
  title = f"W4A4 NVFP4 matmul, {data['device']}, JAX {data['jax_version']}, {data['date']}"
  plot(data["matmul"], title, src.with_suffix(".png"))
  print(markdown(data["matmul"]))


if __name__ == "__main__":
  main(sys.argv[1:])

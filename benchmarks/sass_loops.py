"""SASS of dumped Mosaic GPU kernels, loop by loop: what a kernel's hot loops execute.

Mosaic GPU dumps each kernel's PTX with ``MOSAIC_GPU_DUMP_PTX=1 MOSAIC_GPU_DUMP_TO=DIR``
(its own SASS dump needs an ``nvdisasm`` it could not find on the lent machines). This
compiles every ``DIR/*.ptx`` with ``ptxas -arch=sm_90a``, disassembles it with
``nvdisasm``, writes the SASS beside it, and prints each loop (a backward branch and the
code between its target and it) with its length and instructions by opcode, innermost
first: the SASS count per pipeline step that NOTES_kernels.md version 22 could only infer
from Nsight Compute (~160 warp instructions per step of the small-M kernel's skeleton).

    MOSAIC_GPU_DUMP_PTX=1 MOSAIC_GPU_DUMP_TO=ptx \\
        python benchmarks/diag_decode.py --profile no_decode --shapes 16x3072x12288
    python benchmarks/sass_loops.py ptx [--arch sm_90a]

Needs the CUDA toolkit's ``ptxas`` and ``nvdisasm`` (``/usr/local/cuda/bin`` on the GPU
machines); ``loops`` itself is plain text processing.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import shutil
import subprocess

_LABEL = re.compile(r"^\s*(\.L_x_\d+|\$?[\w.$]+):\s*$")
_INSTR = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(?:\{\s*)?(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)"
                    r"([^;]*);")
_TARGET = re.compile(r"`\(([^)]+)\)")


def parse(sass: str) -> tuple[list[tuple[int, str, str]], dict[str, int]]:
  """``nvdisasm`` text -> (instructions as (address, opcode, operands), label -> address of
  the instruction after it)."""
  instrs, labels, pending = [], {}, []
  for line in sass.splitlines():
    if m := _LABEL.match(line):
      pending.append(m.group(1))
    elif m := _INSTR.match(line):
      addr = int(m.group(1), 16)
      for name in pending:
        labels[name] = addr
      pending = []
      instrs.append((addr, m.group(3), m.group(4)))
  return instrs, labels


def loops(sass: str) -> list[dict]:
  """The loops of a SASS listing, innermost (shortest) first: each backward branch with its
  target's address, the instruction count from the target to the branch (inclusive) and the
  count by base opcode (``HGMMA.64x16x16.F32`` counts as ``HGMMA``)."""
  instrs, labels = parse(sass)
  out = []
  for i, (addr, op, operands) in enumerate(instrs):
    if not op.startswith("BRA"):
      continue
    t = _TARGET.search(operands)
    if not t or t.group(1) not in labels or labels[t.group(1)] > addr:
      continue
    body = [o for a, o, _ in instrs[:i + 1] if a >= labels[t.group(1)]]
    hist = collections.Counter(o.split(".")[0] for o in body)
    out.append({"start": labels[t.group(1)], "branch": addr, "length": len(body),
                "opcodes": dict(hist.most_common())})
  return sorted(out, key=lambda lp: lp["length"])


def disassemble(ptx_path: str, arch: str) -> str:
  """SASS text of one PTX file (``ptxas`` then ``nvdisasm``), also written beside it."""
  cubin = os.path.splitext(ptx_path)[0] + ".cubin"
  subprocess.run(["ptxas", f"-arch={arch}", ptx_path, "-o", cubin], check=True)
  sass = subprocess.run(["nvdisasm", "-c", cubin], check=True, capture_output=True,
                        text=True).stdout
  with open(os.path.splitext(ptx_path)[0] + ".sass", "w") as f:
    f.write(sass)
  return sass


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("dir", help="a MOSAIC_GPU_DUMP_TO folder (its *.ptx), or one .sass file")
  p.add_argument("--arch", default="sm_90a")
  p.add_argument("--top", type=int, default=12, help="opcodes listed per loop")
  args = p.parse_args()
  if args.dir.endswith(".sass"):
    listings = {args.dir: open(args.dir).read()}
  else:
    missing = [t for t in ("ptxas", "nvdisasm") if shutil.which(t) is None]
    if missing:
      raise SystemExit(f"{', '.join(missing)} not on PATH (try /usr/local/cuda/bin)")
    listings = {p: disassemble(p, args.arch)
                for p in sorted(glob.glob(os.path.join(args.dir, "*.ptx")))}
  for path, sass in listings.items():
    print(f"== {path}: {len(parse(sass)[0])} instructions")
    for lp in loops(sass):
      ops = ", ".join(f"{o} {n}" for o, n in list(lp["opcodes"].items())[:args.top])
      print(f"  loop {lp['start']:#06x}-{lp['branch']:#06x}: {lp['length']} instructions: {ops}")


if __name__ == "__main__":
  main()

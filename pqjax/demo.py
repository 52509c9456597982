"""End-to-end demo on an embedded default: a small DiT built in code (``make demo``).

Builds a diffusers ``DiTTransformer2DModel`` with random weights whose input channels differ in
scale (the SmoothQuant pattern: a few large-activation channels feeding small weights), saves it
as a diffusers folder, converts it to Flax and checks parity, quantizes it with RTN and with
PermuQuant in several formats, compares each against the full-precision output on calibration
and held-out inputs, round-trips the PermuQuant model through Orbax, and writes an error report
(table + PNG) under ``out/demo/``.
"""

from __future__ import annotations

import argparse
import math
import shutil
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import converters
import pqjax
from pqjax.report import rel_error

DIT_CONFIG = dict(num_attention_heads=4, attention_head_dim=32, in_channels=4, out_channels=8,
                  num_layers=4, sample_size=16, patch_size=2, num_embeds_ada_norm=10)
RUNS = (  # (method, format, mode)
    ("rtn", "nvfp4", "w4a4"),
    ("permuquant", "nvfp4", "w4a4"),
    ("rtn", "int4", "w4a4"),
    ("permuquant", "int4", "w4a4"),
    ("permuquant-h", "int4", "w4a4"),
    ("rtn", "mxfp4", "w4a4"),
    ("auto", "mxfp4", "w4a4"),
    ("rtn", "int4", "w4a16"),
    ("permuquant", "int4", "w4a16"),
)


def build_dit(folder: Path, seed: int = 0) -> None:
  """Saves a random diffusers DiT with outlier input channels in every block to ``folder``."""
  import diffusers
  import torch

  gen = torch.Generator().manual_seed(seed)
  model = diffusers.DiTTransformer2DModel(**DIT_CONFIG).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      fan_in = math.prod(p.shape[1:]) if p.ndim >= 2 else 1
      p.copy_(noise / math.sqrt(fan_in) if p.ndim >= 2 else 0.1 * noise)
    dim = DIT_CONFIG["num_attention_heads"] * DIT_CONFIG["attention_head_dim"]
    for block in model.transformer_blocks:
      # adaLN chunks: shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp. A large
      # (1 + scale) on a few channels makes outlier activations; dividing the consumers' input
      # rows by the same factor keeps the function (SmoothQuant-style scale migration).
      for chunk, consumers in ((1, (block.attn1.to_q, block.attn1.to_k, block.attn1.to_v)),
                               (4, (block.ff.net[0].proj,))):
        idx = torch.randperm(dim, generator=gen)[: dim // 16]
        factor = torch.exp(2.5 * torch.rand(idx.shape[0], generator=gen)) * 4
        block.norm1.linear.bias[chunk * dim + idx] = factor - 1
        for lin in consumers:
          lin.weight[:, idx] /= factor
  model.save_pretrained(folder, safe_serialization=True)


def torch_forward(folder: Path, inputs: dict) -> np.ndarray:
  import diffusers
  import torch

  model = diffusers.DiTTransformer2DModel.from_pretrained(folder, low_cpu_mem_usage=False).eval()
  with torch.no_grad():
    out = model(**{k: torch.from_numpy(np.array(v)) for k, v in inputs.items()})
  return out.sample.numpy()


def make_inputs(key: jax.Array, batch: int, t_lo: int, t_hi: int) -> dict:
  k1, k2, k3 = jax.random.split(key, 3)
  c, s = DIT_CONFIG["in_channels"], DIT_CONFIG["sample_size"]
  return {
      "hidden_states": jax.random.normal(k1, (batch, c, s, s), jnp.float32),
      "timestep": jax.random.randint(k2, (batch,), t_lo, t_hi),
      "class_labels": jax.random.randint(k3, (batch,), 0, DIT_CONFIG["num_embeds_ada_norm"]),
  }


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="out/demo", help="output folder")
  args = parser.parse_args(argv)
  out = Path(args.out)
  shutil.rmtree(out, ignore_errors=True)
  out.mkdir(parents=True)

  print("1. building a small diffusers DiT with outlier channels")
  folder = out / "dit_diffusers"
  build_dit(folder)
  calib = make_inputs(jax.random.key(0), 16, 0, 1000)      # spans the sampler's timesteps
  held_out = make_inputs(jax.random.key(1), 8, 0, 1000)    # other noise, timesteps, labels

  print("2. converting to Flax and checking parity with diffusers (fp32)")
  model = converters.from_diffusers(folder, dtype=jnp.float32)
  y_ref = model(**held_out)
  parity = rel_error(y_ref, torch_forward(folder, held_out))
  print(f"   relative error vs diffusers: {parity:.2e}")
  if parity > 1e-5:
    raise SystemExit(f"parity check failed: {parity:.2e} > 1e-5")

  print("3. quantizing (relative output error vs the full-precision model)")
  y_cal = model(**calib)
  rows = []
  qmodels = {}
  for method, fmt, mode in RUNS:
    t0 = time.perf_counter()
    cfg = pqjax.QuantConfig(format=fmt, mode=mode, method=method)
    qmodel = pqjax.quantize(model, calib, cfg, progress=False)
    dt = time.perf_counter() - t0
    decisions = qmodel.pqjax_info.decisions
    rows.append((method, fmt, mode, rel_error(qmodel(**calib), y_cal),
                 rel_error(qmodel(**held_out), y_ref),
                 f"{sum(d.accepted for d in decisions)}/{len(decisions)}", dt))
    qmodels[(method, fmt, mode)] = qmodel
  print(f"   {'method':<13}{'format':<7}{'mode':<7}{'calib err':>10}{'held-out':>10}"
        f"{'accepted':>10}{'time s':>8}")
  for method, fmt, mode, e_cal, e_held, acc, dt in rows:
    print(f"   {method:<13}{fmt:<7}{mode:<7}{e_cal:>10.4f}{e_held:>10.4f}{acc:>10}{dt:>8.1f}")

  print("4. saving and reloading the PermuQuant NVFP4 W4A4 model (Orbax)")
  qmodel = qmodels[("permuquant", "nvfp4", "w4a4")]
  pqjax.save(qmodel, out / "dit_nvfp4")
  restored = pqjax.load(out / "dit_nvfp4")
  same = bool(np.array_equal(np.asarray(restored(**held_out)), np.asarray(qmodel(**held_out))))
  print(f"   reloaded output bit-identical: {same}")
  if not same:
    raise SystemExit("save/load round trip changed the output")

  print("5. per-layer error report")
  report = pqjax.error_report(model, qmodel, held_out, path=out / "error_report.png")
  print(report)
  print(f"wrote {out / 'error_report.png'}")


if __name__ == "__main__":
  main()

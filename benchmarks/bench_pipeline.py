"""Pipeline speed: calibration + search + quantization of a FLUX.1-sized model on one GPU.

``converters.from_config`` with FLUX.1-dev's real config builds the model with random bf16
weights; 64 calibration samples of 4096 image + 512 text tokens are streamed in batches.
Prints the stage times and writes ``pipeline_<device>_<date>.json`` into ``--out``.

  python benchmarks/bench_pipeline.py --out $OUT            # FLUX.1-dev size, GPU
  python benchmarks/bench_pipeline.py --tiny --out /tmp     # smoke run on the CPU
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import time

import jax
import jax.numpy as jnp

import converters
import pqjax

FLUX1_DEV = dict(_class_name="FluxTransformer2DModel", patch_size=1, in_channels=64,
                 out_channels=None, num_layers=19, num_single_layers=38, attention_head_dim=128,
                 num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                 guidance_embeds=True, axes_dims_rope=[16, 56, 56])
TINY = dict(FLUX1_DEV, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16,
            axes_dims_rope=[4, 6, 6])


def batches(config: dict, *, samples: int, batch: int, img_tokens: int, txt_tokens: int,
            dtype):
  """Random FLUX inputs, generated on the device one batch at a time."""
  side = int(round(img_tokens ** 0.5))
  rows, cols = jnp.divmod(jnp.arange(img_tokens), side)
  img_ids = jnp.stack([jnp.zeros(img_tokens), rows, cols], axis=-1).astype(jnp.float32)
  txt_ids = jnp.zeros((txt_tokens, 3), jnp.float32)
  for i in range(samples // batch):
    k = jax.random.split(jax.random.key(i), 4)
    yield {
        "hidden_states": jax.random.normal(k[0], (batch, img_tokens, config["in_channels"]),
                                           dtype),
        "encoder_hidden_states": jax.random.normal(
            k[1], (batch, txt_tokens, config["joint_attention_dim"]), dtype),
        "pooled_projections": jax.random.normal(k[2], (batch, config["pooled_projection_dim"]),
                                                dtype),
        "timestep": jax.random.uniform(k[3], (batch,), jnp.float32),
        "img_ids": img_ids, "txt_ids": txt_ids,
        "guidance": jnp.full((batch,), 3.5, jnp.float32),
    }


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--out", default=".")
  ap.add_argument("--tiny", action="store_true", help="tiny FLUX config (CPU smoke run)")
  ap.add_argument("--samples", type=int, default=64)
  ap.add_argument("--batch", type=int, default=2)
  ap.add_argument("--img-tokens", type=int, default=4096)
  ap.add_argument("--txt-tokens", type=int, default=512)
  ap.add_argument("--error-tokens", type=int, default=1024)
  ap.add_argument("--method", default="permuquant")
  args = ap.parse_args()
  config = TINY if args.tiny else FLUX1_DEV
  if args.tiny:
    args.samples, args.batch, args.img_tokens, args.txt_tokens = 4, 2, 16, 8
  device = jax.devices()[0]
  t0 = time.perf_counter()
  model = converters.from_config(config, dtype=jnp.bfloat16)
  jax.block_until_ready(jax.tree.leaves(model))
  t_init = time.perf_counter() - t0
  n_params = sum(x.size for x in jax.tree.leaves(model))
  cfg = pqjax.QuantConfig(method=args.method, error_tokens=args.error_tokens)
  timings: dict[str, float] = {}
  t0 = time.perf_counter()
  qmodel = pqjax.quantize(model, batches(config, samples=args.samples, batch=args.batch,
                                         img_tokens=args.img_tokens, txt_tokens=args.txt_tokens,
                                         dtype=jnp.bfloat16), cfg, timings=timings,
                          progress=True)
  total = time.perf_counter() - t0
  decisions = qmodel.pqjax_info.decisions
  mem = device.memory_stats() or {}
  result = {
      "benchmark": "pipeline", "model": "FLUX.1-dev config, random bf16 weights"
      if not args.tiny else "tiny FLUX", "params": int(n_params),
      "device": device.device_kind, "platform": device.platform,
      "jax": jax.__version__, "date": datetime.date.today().isoformat(),
      "samples": args.samples, "batch": args.batch, "img_tokens": args.img_tokens,
      "txt_tokens": args.txt_tokens, "error_tokens": args.error_tokens,
      "config": cfg.to_dict(), "sites": len(decisions),
      "accepted": sum(d.accepted for d in decisions),
      "seconds": {"model_init": t_init, **timings, "total_quantize": total},
      "peak_bytes_in_use": mem.get("peak_bytes_in_use"),
  }
  print(f"{'stage':<16} {'seconds':>9}")
  for k, v in result["seconds"].items():
    print(f"{k:<16} {v:9.1f}")
  print(f"sites {len(decisions)}, accepted {result['accepted']}, peak memory "
        f"{(result['peak_bytes_in_use'] or 0) / 2**30:.1f} GiB on {device.device_kind}")
  name = f"pipeline_{device.device_kind.replace(' ', '_')}_{result['date']}.json"
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, name), "w") as f:
    json.dump(result, f, indent=1)


if __name__ == "__main__":
  main()

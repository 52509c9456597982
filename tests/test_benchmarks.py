"""The benchmark scripts' tiling candidates, report labels and a tiny CPU run (no GPU
needed)."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import report_kernels  # noqa: E402
import sweep_matmul  # noqa: E402

from pqjax_kernels import matmul_fp4 as fm  # noqa: E402
from tests import interpret  # noqa: E402


@pytest.mark.parametrize("m,k,n", [(4608, 3072, 12288), (1024, 12288, 3072), (256, 3072, 3072),
                                   (65, 1152, 4608)])
def test_stream_candidates_are_valid(m, k, n):
  """Every streaming tiling the sweep times passes the kernel's checks for a bf16 output
  (what it times; split K writes float32 partials), is distinct, and ``auto_config``'s
  comes first, then the unsplit and split tilings in both CTA orders."""
  cands = sweep_matmul.stream_candidates(m, n, k, limit=40)
  assert cands[0] == fm.auto_config(m, n, k) and len(set(cands)) == len(cands)
  orders = {(c.k_splits, c.n_inner) for c in cands}
  assert {(1, False), (1, True)} <= orders and any(s > 1 for s, _ in orders)
  for cfg in cands:
    assert cfg.stream and cfg.tile_m * cfg.wg_tiles <= 256  # accumulators that fit registers
    fm._check_config(cfg, n, k, out_itemsize=2 if cfg.k_splits == 1 else 4)  # noqa: SLF001
  assert len(sweep_matmul.stream_candidates(m, n, k, limit=2)) == 2


@pytest.mark.parametrize("m,k,n", [(16, 3072, 12288), (64, 12288, 3072)])
def test_small_m_candidates_are_valid(m, k, n):
  cands = sweep_matmul.candidates(m, n, k, limit=40)
  assert cands[0] == fm.default_config(m, n, k) and len(set(cands)) == len(cands)
  for cfg in cands:
    fm._check_config(cfg, n, k)  # noqa: SLF001


def test_report_names_the_auto_candidate():
  """The report's "auto" column follows the thresholds ``fp4_matmul`` uses on the GPU."""
  for m, k, n, want in [(16, 3072, 12288, "kernel"),
                        (64, 3072, 12288, "stream_cl2"),  # K split in the cluster
                        (fm.CLUSTER_MIN_M, 12288, 3072, "stream_cl2"),
                        (fm.CLUSTER_MIN_M - 1, 12288, 3072, "kernel"),
                        (64, 1152, 4608, "kernel"),  # short K
                        (fm.STREAM_MIN_M, 3072, 12288, "stream"),
                        (fm.XLA_MIN_M, 3072, 12288, "stream"),  # 97% wave fill
                        (4608, 12288, 3072, "stream"),  # 100%: tile_m 216, 4 waves
                        (fm.XLA_MIN_M, 3072, 128, "xla"),  # 12%: one column block
                        (fm.XLA_MIN_M, 1152, 4608, "xla")]:  # short K
    assert report_kernels.auto_method(m, n, k) == "ours_w4a4_" + want, (m, k, n)
  # where a run timed auto_config's tiling under another name, that candidate
  m, k, n = 1024, 12288, 3072
  row = {"ours_w4a4_stream_config": dataclasses.asdict(fm.stream_config(m, n, k)),
         "ours_w4a4_stream_tm208_ni_config": dataclasses.asdict(fm.auto_config(m, n, k))}
  assert report_kernels.auto_method(m, n, k, row) == "ours_w4a4_stream_tm208_ni"
  assert report_kernels.auto_method(m, n, k, {}) == "ours_w4a4_stream"


def test_bench_kernels_tiny_runs_and_checks(tmp_path):
  """``bench_kernels.py --tiny`` (CPU, small shapes) runs end to end: every candidate it can
  run there is checked against the float32 reference, W4A16 from M = 65 included."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  subprocess.run([sys.executable, os.path.join(root, "benchmarks", "bench_kernels.py"),
                  "--tiny", "--skip-norm", "--out", str(tmp_path)], check=True, cwd=root,
                 env={**os.environ, "PYTHONPATH": root}, capture_output=True)
  (path,) = tmp_path.glob("kernels_*.json")
  res = json.loads(path.read_text())
  assert res["check_ok"] and {r["m"] for r in res["matmul"]} == {5, 80}
  modes = {(c["mode"], c["m"]) for c in res["check"]}
  assert {("ours_w4a4_xla", 5), ("ours_w4a4_xla", 80), ("ours_w4a16_xla", 80)} <= modes


def test_bench_inference_tiny_runs(tmp_path):
  """``bench_inference.py --tiny`` (CPU) quantizes a tiny FLUX both ways, times the forward
  passes, and writes the JSON and plot; the quantized outputs are near bf16's."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  subprocess.run([sys.executable, os.path.join(root, "benchmarks", "bench_inference.py"),
                  "--tiny", "--out", str(tmp_path)], check=True, cwd=root,
                 env={**os.environ, "PYTHONPATH": root}, capture_output=True)
  (path,) = tmp_path.glob("inference_*.json")
  assert path.with_suffix(".png").exists()
  runs = json.loads(path.read_text())["runs"]
  assert list(runs) == ["bf16", "nvfp4 w4a4", "nvfp4 w4a16", "nvfp4 w4a4, fusions off",
                        "nvfp4 w4a4, re-laid per call"]
  assert all(r["wall_ms"] > 0 for r in runs.values())
  assert runs["bf16"]["rel_error_vs_bf16"] == 0.0
  assert all(0 < r["rel_error_vs_bf16"] < 0.5 for k, r in runs.items() if k != "bf16")
  # the same model each way (on the CPU no kernel layout and no norm kernel)
  for variant in ("nvfp4 w4a4, fusions off", "nvfp4 w4a4, re-laid per call"):
    assert runs["nvfp4 w4a4"]["rel_error_vs_bf16"] == runs[variant]["rel_error_vs_bf16"]


@pytest.mark.skipif(not interpret.AVAILABLE, reason="JAX GPU interpreter not available")
def test_diag_parts_tiny_runs_and_checks(tmp_path):
  """``diag_parts.py --tiny`` (CPU, the GPU interpreter) runs every variant and checks each
  quantize against the plain-jnp quantize of the concatenation."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  subprocess.run([sys.executable, os.path.join(root, "benchmarks", "diag_parts.py"),
                  "--tiny", "--out", str(tmp_path)], check=True, cwd=root,
                 env={**os.environ, "PYTHONPATH": root}, capture_output=True)
  (path,) = tmp_path.glob("diag_parts_*.json")
  (row,) = json.loads(path.read_text())["results"]
  assert row["parts_ok"] and row["concat + quantize_ok"] and row["quantize_ok"]
  assert row["parts_wall_us"] > 0


@pytest.mark.skipif(not interpret.AVAILABLE, reason="JAX GPU interpreter not available")
def test_diag_norm_smem_pads_without_changing_the_result(monkeypatch):
  """``diag_norm_smem.padded`` hands the norm kernel one more scratch buffer of the given
  size, last (the kernel never reads it), and puts ``plgpu`` back after; under the GPU
  interpreter the codes are those of the unpadded kernel."""
  import types
  import jax.numpy as jnp
  import numpy as np
  import diag_norm_smem as dns  # noqa: PLC0415
  from pqjax_kernels import norm_kernel as nk  # noqa: PLC0415
  real, seen = nk.plgpu, []
  def kernel(body, *, scratch_types=(), **kw):
    seen.append(list(scratch_types))
    return real.kernel(body, scratch_types=scratch_types, **kw)
  spy = types.SimpleNamespace(**{n: getattr(real, n) for n in dir(real)
                                 if not n.startswith("__")})
  spy.kernel = kernel
  monkeypatch.setattr(nk, "plgpu", spy)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((16, 128)), jnp.bfloat16)
  f = lambda x: nk.norm_quantize(x, tensor_scale=jnp.float32(0.01), rows=4,  # noqa: E731
                                 interpret=True).codes
  with interpret.gpu_interpreter():
    want = f(x)
    with dns.padded(4096):
      got = f(x)
  assert nk.plgpu is spy and len(seen) == 2 and len(seen[1]) == len(seen[0]) + 1
  assert seen[1][-1].shape == (4096,)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_diag_decode_stand_ins_reach_the_lowered_kernel():
  """``diag_decode``'s stand-ins change the kernel it lowers (the PTX is read while lowering,
  after tracing) and are undone after; the auto-barrier variants put the barriers back (more
  code: the serialized module stores each inline-PTX string once, so it is not counted)."""
  import jax
  import jax.numpy as jnp
  import diag_decode as dd  # noqa: PLC0415
  from benchmarks.bench_kernels import _rand_weights  # noqa: PLC0415
  m, k, n = 16, 256, 128
  pw = fm.prepare_weights(*_rand_weights(jax.random.key(0), n, k))
  cfg = fm.default_config(m, n, k)
  am = jnp.zeros((cfg.tile_m, k), jnp.float16)

  def lowered(variant):
    with dd.stand_ins(variant):
      return dd.kernel_fn(cfg).trace(am, [pw]).lower(lowering_platforms=("cuda",)).as_text()
  shipped, no_decode = lowered("shipped"), lowered("no_decode")
  assert "cvt.rn.f16x2.e4m3x2" in shipped and "shf.l.wrap" not in shipped
  assert "cvt.rn.f16x2.e4m3x2" not in no_decode and "shf.l.wrap" in no_decode
  assert len(shipped) < len(lowered("shipped_auto_barriers"))  # the barriers' code
  assert fm._E2M1_TO_F16X2_PTX is dd._SHIPPED_PTX and fm._NO_AUTO_BARRIERS
  assert "wgmma.mma_async" in shipped and "wgmma.mma_async" not in lowered("no_wgmma")


_SASS = """
        .section        .text.kernel_mosaic_gpu_kernel,"ax",@progbits
.text.kernel_mosaic_gpu_kernel:
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/                   S2R R0, SR_TID.X ;
.L_x_1:
        /*0020*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR4+0x10], R3 ;
.L_x_0:
        /*0030*/              @!P0 BRA `(.L_x_0) ;
        /*0040*/                   LDSM.16.M88.4 R4, [R2+UR5] ;
        /*0050*/                   SHF.L.W.U32.HI R8, R4, 0x1, R4 ;
        /*0060*/                   SHF.L.W.U32.HI R9, R4, 0x2, R4 ;
        /*0070*/                   HGMMA.64x16x16.F32 R24, R8, gdesc[UR8], R24 ;
        /*0080*/                   ISETP.NE.AND P1, PT, R5, 0xc, PT ;
        /*0090*/               @P1 BRA `(.L_x_1) ;
        /*00a0*/                   BRA `(.L_x_2) ;
.L_x_2:
        /*00b0*/                   EXIT ;
"""


def test_sass_loops_finds_the_loops_innermost_first():
  """``sass_loops.loops``: each backward branch is a loop (the spin wait inside the pipeline
  step, then the step), counted by base opcode; forward branches are not loops."""
  import sass_loops  # noqa: PLC0415
  spin, step = sass_loops.loops(_SASS)
  assert (spin["start"], spin["branch"], spin["length"]) == (0x30, 0x30, 1)
  assert (step["start"], step["branch"], step["length"]) == (0x20, 0x90, 8)
  assert step["opcodes"] == {"SHF": 2, "BRA": 2, "SYNCS": 1, "LDSM": 1, "HGMMA": 1,
                             "ISETP": 1}


def test_diag_copy_ring_reads_its_share_and_lowers():
  """``diag_copy.ring_call`` under the GPU interpreter: every CTA's last copy lands with the
  bytes of its share's last row (a CTA reading the wrong rows, or a slot refilled before
  its copy landed, returns other bytes), at ring depths below, equal to and above its
  copies, over all of ``w`` or a prefix; the kernel lowers for CUDA; a misshapen weight is
  refused, naming the shape."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import diag_copy as dc  # noqa: PLC0415
  from tests import interpret  # noqa: PLC0415
  w = np.random.default_rng(0).integers(0, 256, (3 * 4 * 16, dc.ROW_BYTES), np.uint8)
  with interpret.gpu_interpreter():
    for ctas, rows, depth, n in [(3, 16, 2, None), (3, 16, 4, None), (4, 8, 8, None),
                                 (1, 16, 3, None), (3, 16, 2, 96)]:  # 96: a prefix of w
      got = np.asarray(dc.ring_call(jnp.asarray(w), ctas, rows, depth, n))
      np.testing.assert_array_equal(got, dc.last_rows(w, ctas, n), err_msg=f"{ctas} {rows} {n}")
  text = jax.jit(lambda w: dc.ring_call(w, 4, 16, 2)).trace(jnp.asarray(w)).lower(
      lowering_platforms=("cuda",)).as_text()
  assert "mosaic_gpu" in text
  with pytest.raises(ValueError, match=r"n_rows = 192 <= R a multiple of ctas \* rows = 80"):
    dc.ring_call(jnp.asarray(w), 5, 16, 2)
  assert all(r * dc.ROW_BYTES * d * c <= dc.SMEM_BYTES
             for r, d, c in dc.ring_configs([16, 64, 128], [2, 4, 8], [1, 2], 132))

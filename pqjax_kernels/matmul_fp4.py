"""Group-quantized 4-bit matmul on Hopper (Pallas Mosaic GPU): W4A16 and W4A4 NVFP4.

``fp4_matmul(a, w_codes, w_scales, w_tensor_scale, ...)`` computes ``a @ W.T`` where ``W``
``(N, K)`` is stored like ``pqjax.formats.QTensor`` of ``W.T`` quantized along K: codes
``(N, K/2)`` uint8 (element ``2i`` in the low nibble), block scales ``(N, K/G)`` (nvfp4:
float8_e4m3fn, G=16; mxfp4: uint8 E8M0 biased exponents, G=32; int4: float32) and a float32
tensor scale.

How the kernel computes (swap-AB, ``warpgroups`` warpgroups per CTA, grid ``(N/(TILE_N
tiles_per_cta), M/tile_m, k_splits)``): each CTA first loads its ``(tile_m, K/k_splits)``
slice of the activations into shared memory (TMA, once); each warpgroup then streams its share
of the CTA's ``tiles_per_cta`` weight tiles of ``TILE_N`` rows against it through its own TMA
pipeline, whose steps each bring ``k_tiles`` ``(TILE_N, TILE_K)`` tiles of the codes (int4;
``prepare_weights`` stores each tile contiguously, its bytes in the order the decode wants
them: ``_swap_byte_blocks``) and their ``(TILE_K/G, TILE_N)`` block scales. The codes are
decoded in registers and multiplied by the block scale of each 16-wide column slice; the
scaled tile is the register A operand of an asynchronous ``wgmma`` with the activation slice
as B (one ``wgmma`` group per K tile on JAX >= 0.11, one per slice before), so nothing
round-trips through shared memory. The accumulator is ``(TILE_N, tile_m)`` float32; it is
stored (TMA) and zeroed after the last K step of each weight tile. Operand types: NVFP4
weights with NVFP4 activations (W4A4) run in float16: the E2M1 decode is an inline-PTX byte
permute into E4M3 (``prmt`` table look-up, sign by a second table) and one
``cvt.rn.f16x2.e4m3x2`` per pair, and E2M1 x E4M3 block-scale products (|v| <= 2688, >=
2**-10) are exact in float16. Everything else (W4A16 with bf16 activations, MXFP4, INT4) runs
in bf16 with the arithmetic decode (int4 -> bf16, then the piecewise-linear E2M1 map). Either
way every product is exact, so only the float32 accumulation order differs from the float32
reference. The kernel writes float32 partial sums ``(k_splits, N, M)``; one XLA fusion sums
the splits, transposes, applies the tensor scales, the bias and the epilogue (tanh-GELU, gated
residual) and casts.

W4A4 on Hopper: there are no FP4 tensor cores, so packed NVFP4 activations are decoded to
float16 (``q * s_b``, exact) before the kernel and their tensor scale is folded into the
output scale; the result equals the NVFP4 x NVFP4 product up to accumulation order.

Under JAX's GPU interpreter (CPU tests) the same kernel (copies, pipeline, per-tile stores)
runs with the decode written in jnp and the product as a float32 ``jnp.dot`` into a
shared-memory accumulator (the interpreter has no inline PTX, no register A operand and no
accumulator stores); the GPU tests and the CUDA lowering test cover the register path.

For larger M, ``MatmulConfig.stream`` (``stream_config``) selects a second kernel,
``_stream_call``: the same decode and register-A ``wgmma``, but no resident activation
slice: each pipeline step also brings one ``(tile_m, TILE_K)`` activation tile, shared by
the CTA's consumer warpgroups (each with its own weight tile, so a CTA computes a
``(tile_m, TILE_N * warpgroups)`` output tile over all of K, or over its split of K with
``k_splits``) and brought by a producer warpgroup, and unsplit bf16/f16 outputs leave it
finished: scaled, bias added, tanh-GELU applied, stored ``(M, N)`` through a transposed
shared-memory tile. Split outputs are summed in order in the kernel (``fixup_splits``,
"auto" with two splits: through a float32 workspace behind a global semaphore, the last split
finishing the tile), or are float32 partials that XLA sums, or (opt-in, ``cluster_splits``)
are summed by the splits' CTA cluster in distributed shared memory; ``n_inner`` orders the
CTAs to share activation rows rather than weights. From ``FIT_MIN_M`` rows "auto" sizes
``tile_m`` so that the CTAs fill whole waves (``fitted_tile_m``) and leaves K unsplit.

Two ways to run it (``method``), picked per M by ``pick_method`` unless given:
``"xla"`` (large M, compute-bound): one elementwise XLA pass decodes the weights to exact
bf16 (~4.5 + 16 bits per weight moved), another the activations times both tensor scales
(one bf16 rounding each, relative <= 2**-8), then XLA's bf16 GEMM (cuBLAS, float32
accumulation) writes the output dtype itself: no float32 product and no scaling pass.
``"kernel"``: the fused kernels above, tiled by ``auto_config`` unless given: the small-M
kernel up to M = 64 (from ``CLUSTER_MIN_M`` rows, W4A4 NVFP4 with K >= ``STREAM_MIN_K``,
the streaming kernel with K split in its cluster), the streaming kernel (W4A4 NVFP4) from
``STREAM_MIN_M`` (see ``pick_method`` for the largest M).

``prepare_weights`` does the one-time re-layout (int4 view of the codes and the scales, cut
into contiguous tiles); call it once at quantize time and pass the result as ``w_codes``
(then ``w_scales`` and ``w_tensor_scale`` come from it).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu

Fmt = Literal["nvfp4", "mxfp4", "int4"]
Epilogue = Literal["gelu_tanh"] | None
Method = Literal["auto", "xla", "kernel"]
METHODS = ("auto", "xla", "kernel")
# "auto" (H200, NOTES_kernels.md versions 13 and 19; pick_method, prefers_stream): W4A4 NVFP4
# runs the small-M kernel up to M = 64, the streaming kernel from STREAM_MIN_M, and from
# XLA_MIN_M to STREAM_MAX_M (an estimate: the XLA path's one weight decode amortizes over M)
# only where its CTAs fill their waves, else the XLA path (as from SHORT_K_XLA_M where K is
# short). W4A16 and the other formats, whose streaming kernel is slower or not measured, take
# the XLA path from STREAM_MIN_M.
STREAM_MIN_M = 65
XLA_MIN_M = 2048
STREAM_MAX_M = 8192
STREAM_MIN_FILL = 0.9
STREAM_MIN_K = 3072  # the measured range: shorter K leaves less to hide a tile's fixed costs
SHORT_K_XLA_M = 512  # from here K < STREAM_MIN_K takes the XLA path (1152 x 4608, H200)
SPLIT_MIN_M = 512  # split K by default from here (measured at 512, 1024 and 2048 rows) ...
FIT_MIN_M = 768  # ... up to here; from here one split, fitted_tile_m's tile (768-4608 rows)
# From 33 rows to 64 (K >= STREAM_MIN_K, 2-byte outputs; both kernels on a 64-row tile) the
# streaming kernel with K split in two and summed in its cluster beats the small-M kernel,
# whose float32 partials cost an XLA pass: at 3072 x 3072 / 12288 x 3072 / 3072 x 12288,
# 9.1 / 22.7 / 21.5 us against 10.1 / 25.3 / 22.2 at 64 rows, 9.1 / 22.7 / 22.5 against
# 12.2 / 25.0 / 24.3 at 48 (H200, NOTES_kernels.md versions 30, 31). At 32 rows the small-M
# kernel's 32-row tile (7.4 / 16.9 / 16.2) is below the cluster's shape rule (tile_m >= 64).
CLUSTER_MIN_M = 33
N_INNER_BYTES = 2**24  # f16 activations larger than this: CTAs sweep N (measured from 24 MiB)
# decode_ctas x N at which the decoding CTAs keep pace with the products (a K tile's products
# take time in proportion to N): 12 did at N = 3072, 8 fell behind (H200, version 29)
DEC_CTAS_N = 12 * 3072

GROUP_SIZES = {"nvfp4": 16, "mxfp4": 32}
TILE_N = 64    # weight rows per CTA: one wgmma M block
TILE_K = 128   # reduction depth per pipeline step
SCALE_DTYPES = {"nvfp4": jnp.dtype(jnp.float8_e4m3fn), "mxfp4": jnp.dtype(jnp.uint8),
                "int4": jnp.dtype(jnp.float32)}
_E2M1_GRID = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], np.float32)
# JAX >= 0.11 lowers concatenate in kernels: then one wgmma group per K step; before, one per
# 16-column slice.
_REGISTER_CONCAT = tuple(int(v) for v in jax.__version_info__[:2]) >= (0, 11)
# The small-M kernel without Pallas's automatic warpgroup barriers (``bar.sync`` before every
# TMA load, two per pipeline step): its refills are ordered by the wgmma waits instead (a
# slot is refilled once the group that read it completed, which every warp had to issue,
# past its loads of the slot), and its output tile by the store wait's and
# ``commit_smem``'s own barriers.
_NO_AUTO_BARRIERS = True
_SWIZZLE = 32  # bytes: 16 bf16 per swizzle row, so each 16-wide column slice is tile aligned
_FIX_CHUNK = 64  # fixup_splits: output-tile columns (rows of M) handed on at a time
# decode_ctas: rows a decoding warpgroup decodes at a time (the register layouts' height),
# its slots, and their bytes (codes, float16 scales, the float16 tile stored from)
_DEC_ROWS, _DEC_SLOTS = 64, 2
_DEC_BYTES = _DEC_SLOTS * _DEC_ROWS * (TILE_K // 2 + TILE_K // 16 * 2 + TILE_K * 2)


@dataclasses.dataclass(frozen=True)
class MatmulConfig:
  """Tiling of the kernel.

  The weight tile is fixed by the prepared layout: ``TILE_N`` rows by ``TILE_K`` columns.

  Attributes:
    tile_m: activation rows per CTA (wgmma N side), a multiple of 8 (at most 256).
    k_splits: number of CTAs sharing one output tile along K (split-K, partials in float32).
    tiles_per_cta: weight tiles (of ``TILE_N`` rows) one CTA streams against its
      activation slice, which it loads into shared memory once.
    k_tiles: ``TILE_K`` tiles of a weight tile row per pipeline step (one TMA copy of
      ``k_tiles`` consecutive tiles): fewer, larger copies and less per-step overhead.
    warpgroups: warpgroups per CTA, each streaming ``tiles_per_cta / warpgroups`` of the
      CTA's weight tiles through its own pipeline against the one activation slice (more
      warps per SM for the same shared memory).
    max_concurrent_steps: TMA pipeline depth (per warpgroup).
    overlap_wgmma: keep each step's ``wgmma`` group in flight while the next step waits for
      its weights and decodes them (``wgmma_wait(1)``), refilling a slot once the group that
      read it has completed, one step later; False waits for every group before the refill.
      On by default: 2-6% faster at M <= 64 on the FLUX shapes (H200, NOTES_kernels.md
      version 10).
    m_major: keep the activations ``(M, K)`` (TMA rows of ``2 * TILE_K`` bytes) and let the
      ``wgmma`` read B transposed, instead of transposing them to ``(K, M)`` in XLA first
      (rows of ``2 * tile_m`` bytes). GPU only (JAX >= 0.11); ignored under the interpreter.
    stream: the kernel for larger M (``_stream_call``): no resident activation slice; each
      pipeline step brings one activation tile, which the CTA's ``warpgroups`` consumer
      warpgroups share, beside each one's weight tile (an extra producer warpgroup issues
      the copies). A CTA computes ``tiles_per_cta / warpgroups`` output tiles of
      ``(tile_m, TILE_N * warpgroups)`` in turn, and with ``k_splits`` 1 writes bf16/f16
      outputs finished (scaled, bias added, tanh-GELU, ``(M, N)``; a gated residual is left
      to XLA); split, it writes float32 partials like the small-M kernel. GPU: JAX >= 0.11
      only. See ``stream_config``.
    wg_tiles: streaming kernel only: weight tiles each consumer warpgroup multiplies per
      pipeline step (1 or 2), each into its own accumulator; 2 makes a CTA's output tile
      ``(tile_m, 2 * TILE_N * warpgroups)``, halving the activation traffic per product
      (version 13: slower than ``tile_m`` 256, which halves the decode per product).
    alias_out: streaming kernel with one round of output tiles per CTA (``tiles_per_cta ==
      warpgroups * wg_tiles``) only: the output tiles reuse the pipeline's shared memory,
      free once every consumer's last ``wgmma`` group has completed, so a deeper pipeline
      fits (``tile_m`` 256 at depth 3 instead of 2, ``wg_tiles`` 2 at 4 instead of 3).
    cluster_splits: streaming kernel with ``k_splits`` > 1 and ``alias_out`` (GPU only): the
      ``k_splits`` CTAs of an output tile run as one cluster and sum their accumulators
      through distributed shared memory, each finishing ``tile_m / k_splits`` of the tile's
      rows (scale, bias, tanh-GELU, bf16/f16), instead of writing float32 partials for XLA
      to sum (version 15). (The small-M kernel's version of it measured 1.4-1.6x slower
      than its XLA sum: version 23.)
    n_inner: streaming kernel only: CTAs launch sweeping the weight tiles (N) for each block
      of activation rows instead of the rows for each weight block, so the CTAs resident
      together share activation rows rather than weights (for activations larger than the L2
      cache, as at the MLP down projection's K = 12288).
    act_codes: streaming kernel, W4A4 NVFP4 only: the activations enter the kernel as their
      NVFP4 codes and float16 block scales, a quarter of the float16 values' bytes, and the
      producer warpgroup decodes each step's tile into one of two float16 tiles the
      consumers' ``wgmma`` read (the issue's "decode in the kernel"), instead of XLA decoding
      them to float16 before the kernel. ``max_concurrent_steps`` is then the depth of the
      rings of codes and of weights; ``tile_m`` a multiple of 64, ``k_tiles`` 1. Measured
      1.3-1.7x slower than XLA's decode on an H200 (the producer cannot keep up: each
      activation tile is decoded once per CTA column; version 16), so "auto" does not use it.
    fixup_splits: streaming kernel with ``k_splits`` > 1, one round of output tiles per CTA
      and bf16/f16 outputs: the splits of an output tile sum in order through a float32
      workspace in global memory (split ``s`` waits on a global semaphore until split
      ``s - 1`` has stored the running sum, adds it to its accumulators and stores the new
      sum; the last split finishes the tile: scale, bias, tanh-GELU, cast), as serial
      split-K and stream-K kernels do, instead of writing every split's partials for an XLA
      pass to sum; in 64-column chunks, each handed on as its store completes. It relies on
      the GPU launching CTAs in order (the split index varies fastest, so split ``s - 1`` of
      a tile is resident or done when split ``s`` waits). H200 (version 17): 4% faster
      than the partials with two splits at 2048 x 12288 x 3072, 7% slower with four.
    decode_ctas: streaming kernel, W4A4 NVFP4 codes only (no ``act_codes`` or
      ``cluster_splits``, ``tile_m`` >= 64): this many extra CTAs, launched first, decode the
      activation codes into a float16 workspace (a second output, dropped) while the others
      multiply; each K tile is copied once a global semaphore says every row of it is
      decoded (each split's first ``max_concurrent_steps`` K tiles, copied at launch, are
      decoded by XLA). For SMs the output tiles leave idle: the decode then costs no pass of
      its own before the kernel. H200 (version 29), 1024 x 12288 x 3072 from codes (120
      CTAs, 12 decoding): 107.5 us against 111.6; 8 decoding fall behind (118.8).
  """

  tile_m: int = 16
  k_splits: int = 1
  tiles_per_cta: int = 1
  k_tiles: int = 1
  warpgroups: int = 1
  max_concurrent_steps: int = 4
  m_major: bool = False
  overlap_wgmma: bool = True
  stream: bool = False
  wg_tiles: int = 1
  alias_out: bool = False
  cluster_splits: bool = False
  n_inner: bool = False
  act_codes: bool = False
  fixup_splits: bool = False
  decode_ctas: int = 0


@dataclasses.dataclass(frozen=True)
class PreparedWeights:
  """Weights re-laid out for the kernel (see ``prepare_weights``).

  Every ``(TILE_N, TILE_K)`` weight tile is contiguous in memory, so one K step of a CTA is
  one contiguous 4 KiB TMA read instead of 64 rows of 64 bytes strided by ``K/2`` (measured
  no faster on an H200 at M=16, NOTES_kernels.md v3c, but no slower either; larger TMA boxes
  over several tiles need this layout).

  Attributes:
    codes: int4 ``(N/TILE_N, K/TILE_K, TILE_N, TILE_K)``, the uint8 codes' nibbles tiled,
      the bytes of each tile row in register order (``_swap_byte_blocks``).
    scales_t: ``(N/TILE_N, K/TILE_K, TILE_K/G, TILE_N)`` block scales, tiled alike: float16
      for nvfp4 (exact: E4M3 is a subset), bf16 otherwise (exact for mxfp4's powers of two,
      rounded for int4).
    tensor_scale: float32 scalar.
    fmt: format name.
    group_size: elements per block scale along K.
  """

  codes: jax.Array
  scales_t: jax.Array
  tensor_scale: jax.Array
  fmt: str
  group_size: int

  @property
  def shape(self) -> tuple[int, int]:
    """``(N, K)`` of the weight matrix."""
    nt, kt, tn, tk = self.codes.shape
    return nt * tn, kt * tk

  def untiled(self) -> tuple[jax.Array, jax.Array]:
    """``(N, K/2)`` uint8 codes (element ``2i`` in the low nibble) and ``(N, K/G)`` scales.

    Bytes first, then untiled: XLA materializes a transpose of int4 on its own (46 us of an
    86 us decode at 3072 x 12288, H200) but fuses a uint8 one into the consumer. The storage
    order is undone on 32-bit words with shifts (``_unswap_words``): as a byte transpose XLA
    materialized it too (104 us instead of 43 for the whole decode, H200).
    """
    n, k = self.shape
    nt, kt, tn, tk = self.codes.shape
    words = lax.bitcast_convert_type(self.codes.reshape(nt, kt, tn, tk // 8, 8), jnp.uint32)
    u8 = lax.bitcast_convert_type(_unswap_words(words), jnp.uint8)
    codes = u8.reshape(nt, kt, tn, tk // 2).transpose(0, 2, 1, 3).reshape(n, k // 2)
    scales = self.scales_t.transpose(0, 3, 1, 2).reshape(n, k // self.group_size)
    return codes, scales


jax.tree_util.register_dataclass(
    PreparedWeights, data_fields=["codes", "scales_t", "tensor_scale"],
    meta_fields=["fmt", "group_size"])


def _check_fmt(fmt: str) -> None:
  if fmt not in SCALE_DTYPES:
    raise ValueError(f"fmt must be one of {sorted(SCALE_DTYPES)}, got {fmt!r}")


def _check_weights(w_codes, w_scales, fmt: str) -> tuple[int, int, int]:
  """Validates raw weights; returns (N, K, group size)."""
  _check_fmt(fmt)
  if w_codes.dtype != jnp.uint8 or w_codes.ndim != 2:
    raise ValueError(f"w_codes must be a 2-D uint8 array (N, K/2), got {w_codes.dtype} "
                     f"{w_codes.shape}")
  n, k = w_codes.shape[0], 2 * w_codes.shape[1]
  if w_scales.ndim != 2 or w_scales.shape[0] != n or w_scales.shape[1] == 0 or \
     k % w_scales.shape[1]:
    raise ValueError(f"w_scales shape {w_scales.shape} does not match w_codes {w_codes.shape}")
  if jnp.dtype(w_scales.dtype) != SCALE_DTYPES[fmt]:
    raise ValueError(f"w_scales must be {SCALE_DTYPES[fmt]} for fmt={fmt!r}, got "
                     f"{w_scales.dtype}")
  g = k // w_scales.shape[1]
  if fmt in GROUP_SIZES and g != GROUP_SIZES[fmt]:
    raise ValueError(f"fmt={fmt!r} needs group size {GROUP_SIZES[fmt]}, w_scales imply {g}")
  return n, k, g


def _scales_to_f32(scales, fmt: str):
  if fmt == "mxfp4":
    b = scales.astype(jnp.int32)
    # 2**(b-127) from its float32 bits; byte 0 (2**-127) is a subnormal, built as 2**-126/2.
    pow2 = lax.bitcast_convert_type(jnp.maximum(b, 1) << 23, jnp.float32)
    return jnp.where(b == 0, pow2 * 0.5, pow2)
  return scales.astype(jnp.float32)


def prepare_weights(w_codes: jax.Array, w_scales: jax.Array, w_tensor_scale, *,
                    fmt: Fmt = "nvfp4") -> PreparedWeights:
  """One-time re-layout of ``QTensor``-style weights for the kernel.

  Args:
    w_codes: uint8 ``(N, K/2)``.
    w_scales: ``(N, K/G)`` block scales in the format's dtype.
    w_tensor_scale: float32 scalar (1.0 for formats without one).
    fmt: ``"nvfp4"``, ``"mxfp4"`` or ``"int4"``.

  Returns:
    ``PreparedWeights``.
  """
  n, k, g = _check_weights(w_codes, w_scales, fmt)
  if n % TILE_N or k % TILE_K or TILE_K % g:
    raise ValueError(f"weights (N={n}, K={k}, group {g}) must tile by ({TILE_N}, {TILE_K})")
  nt, kt = n // TILE_N, k // TILE_K
  codes = lax.bitcast_convert_type(_swap_byte_blocks(w_codes), jnp.int4).reshape(
      nt, TILE_N, kt, TILE_K)
  scales = _scales_to_f32(w_scales, fmt).astype(
      jnp.float16 if fmt == "nvfp4" else jnp.bfloat16)
  scales = scales.reshape(nt, TILE_N, kt, TILE_K // g)
  return PreparedWeights(codes.transpose(0, 2, 1, 3), scales.transpose(0, 2, 3, 1),
                         jnp.asarray(w_tensor_scale, jnp.float32), fmt, g)


def _swap_byte_blocks(u8):
  """Transposes each 16-byte block of ``(..., K/2)`` uint8 codes as a 4 x 4 array (byte
  ``4a + i`` <-> byte ``4i + a``); its own inverse.

  The kernel's weight tiles are stored so: a thread's 32-bit word of a ``WGMMA_UPCAST_4X``
  load (lane ``a`` of its row gets bytes ``4a .. 4a + 3`` of each 16-byte block) then holds
  columns ``(8i + 2a, 8i + 2a + 1)`` of that block in its byte ``i``, which are exactly the
  columns of its WGMMA-layout register of column tile ``i``: the decode writes WGMMA
  registers directly, with no cross-lane relayout (``test_register_order_*``).
  """
  shape = u8.shape
  return u8.reshape(*shape[:-1], shape[-1] // 16, 4, 4).swapaxes(-1, -2).reshape(shape)


def _unswap_words(words):
  """``_swap_byte_blocks`` on ``(..., W)`` uint32 words (4 per 16-byte block), elementwise:
  byte ``i`` of word ``a`` becomes byte ``a`` of word ``i``."""
  w = words.reshape(*words.shape[:-1], words.shape[-1] // 4, 4)
  out = []
  for i in range(4):
    o = (w[..., 0] >> (8 * i)) & 0xFF
    for a in range(1, 4):
      o = o | (((w[..., a] >> (8 * i)) & 0xFF) << (8 * a))
    out.append(o)
  return jnp.stack(out, axis=-1).reshape(words.shape)


def _decode_values(codes_u8, fmt: str):
  """Float32 element values of packed nibbles ``(..., K/2)`` -> ``(..., K)``."""
  nib = jnp.stack([codes_u8 & 15, codes_u8 >> 4], axis=-1).reshape(
      *codes_u8.shape[:-1], 2 * codes_u8.shape[-1])
  if fmt == "int4":
    return jnp.where(nib >= 8, nib.astype(jnp.int32) - 16, nib.astype(jnp.int32)).astype(
        jnp.float32)
  mag = jnp.asarray(_E2M1_GRID)[nib & 7]
  return jnp.where(nib >= 8, -mag, mag)


def dequantize(codes_u8, scales, tensor_scale, fmt: str):
  """Plain-jnp float32 dequantization of ``(R, K/2)`` codes with ``(R, K/G)`` scales."""
  vals = _decode_values(codes_u8, fmt)
  g = vals.shape[-1] // scales.shape[-1]
  s = jnp.repeat(_scales_to_f32(scales, fmt), g, axis=-1)
  return vals * s * jnp.asarray(tensor_scale, jnp.float32)


def _e2m1_from_signed(v):
  """E2M1 values of nibbles given as their signed int4 value ``v`` (any float dtype).

  Nibble s|e|m read as int4 is ``v``; the magnitude index is ``u = v`` (v >= 0) or
  ``-8 - v`` (v < 0, sign carried), and the E2M1 value is the piecewise-linear
  ``2u - clip(u, -4, 4)/2 - clip(u, -6, 6)`` through the grid (exact in bf16).
  """
  u = jnp.where(v < 0, -8.0 - v, v).astype(v.dtype)
  return (2.0 * u - 0.5 * jnp.clip(u, -4.0, 4.0) - jnp.clip(u, -6.0, 6.0)).astype(v.dtype)


def _pairs_bf16(lo, hi):
  """bf16 ``(..., 2n)`` interleaving float32 ``lo`` (even elements) and ``hi`` (odd), both
  ``(..., n)``: the two bf16 halves of one 32-bit word (low half first, as the nibbles), so
  XLA writes the interleave as one vectorized store, not a concatenate."""
  bits = lambda v: lax.bitcast_convert_type(  # noqa: E731
      v.astype(jnp.bfloat16), jnp.uint16).astype(jnp.uint32)
  words = bits(lo) | (bits(hi) << 16)
  return lax.bitcast_convert_type(words, jnp.bfloat16).reshape(*lo.shape[:-1], -1)


def _nibble_values(nib, fmt: str):
  """Float32 values of nibbles ``nib`` (int32 0..15): int4, or E2M1."""
  v = jnp.where(nib >= 8, nib - 16, nib).astype(jnp.float32)
  return v if fmt == "int4" else _e2m1_from_signed(v)


def _decode_pairs_bf16(codes, scales, g: int, fmt: str, scale=None):
  """bf16 ``(R, K)`` of uint8 codes ``(R, K/2)`` times float32 block scales ``(R, K/g)``
  (times an optional scalar ``scale``, one rounding) in one elementwise XLA pass."""
  s = scales.astype(jnp.float32)
  if scale is not None:
    s = s * jnp.asarray(scale, jnp.float32)
  s = jnp.repeat(s, g // 2, axis=-1)  # one scale per byte
  c = codes.astype(jnp.int32)
  return _pairs_bf16(_nibble_values(c & 15, fmt) * s, _nibble_values(c >> 4, fmt) * s)


def decode_weights_bf16(w: PreparedWeights) -> jax.Array:
  """Exact bf16 ``(N, K)`` weights ``q * s_b`` (no tensor scale) from ``PreparedWeights``.

  Plain jnp, one elementwise pass that XLA fuses. E2M1 x E4M3 and E2M1 x 2**e products are
  exact in bf16; int4 uses the bf16 scales.
  """
  codes, scales = w.untiled()
  return _decode_pairs_bf16(codes, scales, w.group_size, w.fmt)


def _xla_product(x, w: PreparedWeights, out_scale, out_dtype):
  """``x @ W.T * out_scale`` through XLA's GEMM, which writes ``out_dtype`` itself.

  ``out_scale`` is folded into the activations (one bf16 rounding of each, relative <=
  2**-8) rather than applied to the float32 product: a separate scaling pass over a
  float32 ``(M, N)`` product cost 81 us of 585 at 4608 x 3072 x 12288 (H200).
  ``x``: float32 ``(M, K)`` activation values, or the packed ``(codes, scales)`` of NVFP4.
  """
  if isinstance(x, tuple):
    xs = _decode_pairs_bf16(*x, 16, "nvfp4", scale=out_scale)
  else:
    xs = (x * out_scale).astype(jnp.bfloat16)
  acc = out_dtype if jnp.dtype(out_dtype).itemsize == 2 else jnp.float32
  return lax.dot_general(xs, decode_weights_bf16(w), (((1,), (1,)), ((), ())),
                         preferred_element_type=acc)


def _ctas(m: int, n: int, tile_m: int, tiles_per_cta: int, k_splits: int = 1) -> int:
  """CTAs in the grid of a tiling: column blocks x row blocks x splits."""
  return n // (TILE_N * tiles_per_cta) * -(-m // tile_m) * k_splits


def wave_fill(config: MatmulConfig, m: int, n: int, num_sms: int = 132) -> float:
  """The fraction of the SMs' CTA slots a grid of ``config``'s CTAs fills over its waves
  (one CTA per SM; the streaming kernel's tilings run one)."""
  ctas = _ctas(m, n, config.tile_m, config.tiles_per_cta, config.k_splits)
  return ctas / (-(-ctas // num_sms) * num_sms)


FIT_TILE_ROWS = 112  # a CTA's fixed cost in rows of tile_m (fitted to H200 timings, below)


def fitted_tile_m(m: int, n: int, tiles_per_cta: int = 2, k_splits: int = 1,
                  num_sms: int = 132, lo: int = 128) -> int:
  """The ``tile_m`` in ``[lo, 256]`` (a multiple of 8) that gives the busiest SM the least
  work: ``waves x (tile_m + FIT_TILE_ROWS)`` smallest (one CTA per SM; each CTA also pays
  for decoding its weight tiles, whatever its rows), ties to the wider tile. Where 256 leaves
  its last wave part-empty this trims the tile to fill whole waves. ``FIT_TILE_ROWS`` fits
  the streaming kernel's times at 4608 x 12288 x 3072 (H200, JAX 0.11.2, two consumers,
  unsplit: tile_m 208 / 216 / 224 / 232 / 240 / 256 in 5 / 4 / 4 / 4 / 4 / 4 waves took
  549 / 460 / 466 / 477 / 487 / 511 us: a straight line in ``waves x (tile_m + 112)``
  meets all six within 0.6%)."""
  def cost(t):
    return -(-_ctas(m, n, t, tiles_per_cta, k_splits) // num_sms) * (t + FIT_TILE_ROWS)
  return min(range(256, lo - 1, -8), key=cost)


def stream_splits(m: int, n: int, k: int, num_sms: int = 132) -> int:
  """``auto_config``'s ``k_splits`` below ``FIT_MIN_M``: from ``SPLIT_MIN_M`` rows, the
  fewest of 1, 2 and 4 with which ``stream_config`` picks ``tile_m`` 256 (two consumers
  making two waves of CTAs) while each split keeps ``STREAM_MIN_K`` of K; where none does
  (too few rows), the most that keep it; else 1. Measured on an H200 at 12288 x 3072
  (NOTES_kernels.md versions 15 and 17): 4 at M = 512 (18% faster than unsplit, 2 splits
  13%) and 1024 (13%; version 19's fitted tile, unsplit, is faster there), 2 at M = 2048."""
  if m < SPLIT_MIN_M:
    return 1
  fits = [s for s in (1, 2, 4) if k // s >= STREAM_MIN_K and (k // TILE_K) % s == 0]
  for s in fits:
    if stream_config(m, n, k, num_sms=num_sms, k_splits=s).tile_m == 256:
      return s
  return max(fits, default=1)


def prefers_stream(m: int, n: int, k: int) -> bool:
  """Whether W4A4 NVFP4 at M >= ``STREAM_MIN_M`` runs the streaming kernel rather than the
  XLA path (measured on an H200): below ``XLA_MIN_M`` unless K < ``STREAM_MIN_K`` from
  ``SHORT_K_XLA_M`` rows (at 1152 x 4608 the XLA path was faster at M = 512, 1024, 2048, 4096
  and 4608: 23.7 / 27.7 / 42.4 / 70.3 / 76.6 us against 29.1 / 36.5 / 48.5 / 80.9 / 83.8, and
  tied at 256: 20.4 vs 19.8); from ``XLA_MIN_M`` to ``STREAM_MAX_M``
  only where its tiling (``auto_config``'s) fills at least ``STREAM_MIN_FILL`` of its waves
  and K >= ``STREAM_MIN_K`` (it beat the XLA path by 3-16% at such rows, and lost by 2-8% at
  82% fill).
  """
  if k < STREAM_MIN_K and m >= SHORT_K_XLA_M:
    return False
  return m < XLA_MIN_M or (m < STREAM_MAX_M and
                           wave_fill(auto_config(m, n, k), m, n) >= STREAM_MIN_FILL)


def pick_method(m: int, n: int, k: int, w4a4_nvfp4: bool = True) -> str:
  """The method ``"auto"`` uses for ``(M, K) x (K, N)``: the kernels up to M = 64 (the
  small-M one, or from ``CLUSTER_MIN_M`` rows ``auto_config``'s streaming tiling); then, for
  W4A4 NVFP4 (``w4a4_nvfp4``: NVFP4 weights, activations as packed codes or float16 values) on
  JAX >= 0.11, the streaming kernel where ``prefers_stream``; else the XLA path (W4A16 and
  the other formats, whose streaming kernel is not measured, from ``STREAM_MIN_M``)."""
  if m < STREAM_MIN_M:
    return "kernel"
  streams = w4a4_nvfp4 and _REGISTER_CONCAT and prefers_stream(m, n, k)
  return "kernel" if streams else "xla"


def auto_config(m: int, n: int, k: int, w4a4_nvfp4: bool = True,
                out_itemsize: int = 2, codes: bool = False,
                num_sms: int = 132) -> MatmulConfig:
  """The kernel tiling ``fp4_matmul`` uses when none is given: ``default_config`` below
  ``STREAM_MIN_M`` (and for W4A16 and the other formats), else the streaming kernel for
  outputs of ``out_itemsize`` bytes (2: bf16/f16 written by the kernel): from ``FIT_MIN_M``
  rows two consumers on ``fitted_tile_m``'s tile, K unsplit; below, ``stream_config``'s
  tile with ``stream_splits``' K splits (two sum in order in the kernel, ``fixup_splits``;
  four write float32 partials, the in-order chain of three hand-offs measured 1.5-7%
  slower). The CTAs sweep N for each block of rows where the f16 activations exceed
  ``N_INNER_BYTES`` (faster in all 13 tilings and rows measured, by 1.5-21%).

  The fitted tile against the split K it replaces at 12288 x 3072 (H200, NOTES_kernels.md
  version 19): 93.6 / 112.4 / 210.4 / 460.3 us at M = 768 / 1024 / 2048 / 4608 (tile_m
  160 / 208 / 192 / 216) against 122.9 / 129.6 (four splits) / 212.3 (two) / 503.9 (the
  XLA path; tile_m 256 unsplit 511.0).

  With ``codes`` (packed NVFP4 activations), where the fitted tile's CTAs leave at least
  ``DEC_CTAS_N / N`` SMs idle, those SMs decode the codes (``decode_ctas``) instead of an
  XLA pass before the kernel: 1024 x 12288 x 3072 107.5 us against 111.6, 1024 x 3072 x
  3072 33.1 against 33.0 (H200, version 29).

  From ``CLUSTER_MIN_M`` rows to 64 (W4A4 NVFP4, K >= ``STREAM_MIN_K``, 2-byte outputs) the
  streaming kernel with K split in two, summed in the cluster (``fp4_matmul`` takes
  ``default_config`` instead where clusters or the streaming kernel are missing: the
  interpreter, JAX < 0.11)."""
  if (w4a4_nvfp4 and CLUSTER_MIN_M <= m < STREAM_MIN_M and k >= STREAM_MIN_K
      and out_itemsize == 2 and (k // TILE_K) % 2 == 0):
    return stream_config(m, n, k, k_splits=2, cluster_splits=True)
  if w4a4_nvfp4 and m >= STREAM_MIN_M:
    if m >= FIT_MIN_M:
      cfg = stream_config(m, n, k, tile_m=fitted_tile_m(m, n), warpgroups=2,
                          out_itemsize=out_itemsize)
      idle = num_sms - _ctas(m, n, cfg.tile_m, cfg.tiles_per_cta)
      if codes and idle * n >= DEC_CTAS_N:
        cfg = dataclasses.replace(cfg, decode_ctas=idle)
    else:
      splits = stream_splits(m, n, k)
      cfg = stream_config(m, n, k, out_itemsize=out_itemsize, k_splits=splits,
                          fixup_splits=splits == 2)
    return dataclasses.replace(cfg, n_inner=m * k * 2 > N_INNER_BYTES)
  return default_config(m, n, k)


def _out_scales(w_tensor_scale, a_tensor_scale) -> tuple[jax.Array, ...]:
  """The output scale's factors as float32 ``(1,)`` arrays (reshapes: no XLA kernel), which
  the streaming kernel multiplies itself (``fl(s_w * s_a)``, as XLA would)."""
  return tuple(jnp.asarray(s, jnp.float32).reshape(1)
               for s in (w_tensor_scale, a_tensor_scale) if s is not None)


def _apply_epilogue(y, bias, epilogue, residual, gate, out_dtype):
  if bias is not None:
    y = y + bias.astype(jnp.float32)[None, :]
  if epilogue == "gelu_tanh":
    y = jax.nn.gelu(y, approximate=True)
  if gate is not None:
    y = y * _rows(gate, y)
  if residual is not None:
    y = y + residual.astype(jnp.float32)
  return y.astype(out_dtype)


def _rows(gate, y):
  """``gate`` (N,), (M, N) or per-sample (B, N) with M = B * T, as an (M, N) broadcast."""
  gate = gate.astype(jnp.float32)
  if gate.ndim == 1:
    return gate[None, :]
  if gate.ndim == 2 and gate.shape[0] != y.shape[0]:
    gate = jnp.repeat(gate, y.shape[0] // gate.shape[0], axis=0)
  return gate


def _check_common(a, k, n, a_scales, a_tensor_scale, bias, epilogue, residual, gate):
  if a.ndim != 2:
    raise ValueError(f"a must be 2-D (M, K), got shape {a.shape}")
  m = a.shape[0]
  if a.dtype == jnp.uint8:
    if a.shape[1] * 2 != k:
      raise ValueError(f"packed a {a.shape} does not match K={k}")
    if a_scales is None or a_scales.dtype != jnp.float8_e4m3fn or a_scales.shape != (m, k // 16):
      raise ValueError(f"packed (W4A4 NVFP4) a needs a_scales float8_e4m3fn of shape "
                       f"{(m, k // 16)}, got {None if a_scales is None else (a_scales.dtype, a_scales.shape)}")
    if a_tensor_scale is None:
      raise ValueError("packed (W4A4 NVFP4) a needs a_tensor_scale")
  elif a.dtype in (jnp.bfloat16, jnp.float32, jnp.float16):
    if a.shape[1] != k:
      raise ValueError(f"a {a.shape} does not match K={k}")
    if a_scales is not None:
      raise ValueError("a_scales given with unpacked (float) a")
    if a_tensor_scale is not None and jnp.shape(a_tensor_scale) != ():
      raise ValueError(f"a_tensor_scale must be a scalar, got shape {jnp.shape(a_tensor_scale)}")
  else:
    raise ValueError(f"a must be bf16/f16/f32 (W4A16) or packed uint8 (W4A4), got {a.dtype}")
  if bias is not None and bias.shape != (n,):
    raise ValueError(f"bias must have shape ({n},), got {bias.shape}")
  if epilogue not in (None, "gelu_tanh"):
    raise ValueError(f"epilogue must be None or 'gelu_tanh', got {epilogue!r}")
  if residual is not None and residual.shape != (m, n):
    raise ValueError(f"residual must have shape {(m, n)}, got {residual.shape}")
  if gate is not None:
    ok = gate.shape == (n,) or (gate.ndim == 2 and gate.shape[1] == n and gate.shape[0] > 0
                                 and m % gate.shape[0] == 0)
    if not ok:
      raise ValueError(f"gate must be (N,), (M, N) or per-sample (B, N) with M % B == 0; "
                       f"got {gate.shape} for M={m}, N={n}")
  return m


def reference(a, w_codes, w_scales, w_tensor_scale, *, a_scales=None, a_tensor_scale=None,
              fmt: Fmt = "nvfp4", bias=None, epilogue: Epilogue = None, residual=None,
              gate=None, out_dtype=jnp.bfloat16) -> jax.Array:
  """Plain-jnp definition of ``fp4_matmul`` (float32 dequantize, HIGHEST-precision product).

  Same arguments as ``fp4_matmul`` with raw (unprepared) weights.
  """
  n, k, _ = _check_weights(w_codes, w_scales, fmt)
  _check_common(a, k, n, a_scales, a_tensor_scale, bias, epilogue, residual, gate)
  w = dequantize(w_codes, w_scales, w_tensor_scale, fmt)
  if a.dtype == jnp.uint8:
    x = dequantize(a, a_scales, a_tensor_scale, "nvfp4")
  else:
    x = a.astype(jnp.float32)
    if a_tensor_scale is not None:
      x = x * jnp.asarray(a_tensor_scale, jnp.float32)
  y = jnp.dot(x, w.T, precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
  return _apply_epilogue(y, bias, epilogue, residual, gate, out_dtype)


SMEM_BYTES = 227 * 1024  # shared memory per SM (and per CTA) on Hopper
_STEP_BYTES = TILE_N * TILE_K // 2 + (TILE_K // 16) * TILE_N * 2  # codes + f16 scales


def smem_bytes(config: MatmulConfig, k: int, out_itemsize: int = 4) -> int:
  """Shared memory one CTA of the kernel allocates for ``K = k``; ``out_itemsize``: bytes per
  element of the streaming kernel's output tile (2 when it writes bf16/f16 itself, else 4).
  """
  k_steps = k // TILE_K // config.k_splits
  wgs = config.warpgroups
  wts = wgs * config.wg_tiles  # weight tiles per pipeline step (per CTA when streaming)
  steps = min(config.max_concurrent_steps,
              config.tiles_per_cta // wts * k_steps // config.k_tiles)
  if config.stream:  # activation tiles in the pipeline; output tiles; scale, bias
    act = config.tile_m * TILE_K * 2  # one float16 activation tile
    if config.act_codes:  # two decoded tiles; a ring of codes, scales and weight tiles
      pipeline = min(2, steps) * act
      ring = steps * (act // 4 + act // 16 + wts * _STEP_BYTES)
    else:  # the activation tiles (which alias_out shares) and the weight tiles
      pipeline = steps * config.k_tiles * act
      ring = steps * config.k_tiles * wts * _STEP_BYTES
    out = wts * TILE_N * config.tile_m * out_itemsize
    if config.cluster_splits:  # float32 tiles the cluster sums, one finished slice each
      out = wts * TILE_N * (config.tile_m * 4 + config.tile_m // config.k_splits * out_itemsize)
    if config.fixup_splits:  # the running sum's float32 tiles beside the finished ones
      out = wts * TILE_N * config.tile_m * (4 + out_itemsize)
    buffers = max(pipeline, out) if config.alias_out else pipeline + out
    if config.decode_ctas:  # the decoding CTAs' buffers share the memory
      buffers = max(buffers, _DEC_BYTES * (config.warpgroups + 1))
    # + scale and bias; + 1 KiB of alignment and the barriers (two per slot, a few more)
    barriers = 8 * (2 * steps + 4)
    return buffers + ring + config.tiles_per_cta * 2 * TILE_N * 4 + 1024 + barriers
  act = k_steps * config.tile_m * TILE_K * 2
  return act + wgs * (steps * config.k_tiles * _STEP_BYTES + TILE_N * config.tile_m * 4) + 1024


def _divisors(v: int) -> list[int]:
  return [d for d in range(1, v + 1) if v % d == 0]


def default_config(m: int, n: int, k: int, num_sms: int = 132,
                   ctas_per_sm: int | None = None, k_tiles: int = 1,
                   warpgroups: int = 1) -> MatmulConfig:
  """A tiling for ``(M, K) x (K, N)``: the split-K and tiles per CTA that minimize the bytes
  the busiest SM moves (weight tiles, plus its CTAs' activation slices from L2 at a third of
  the cost and their float32 partial tiles), preferring tilings whose CTAs all fit on the SMs
  at once, then ``ctas_per_sm`` on the busiest where the work allows (one CTA's decode and
  ``wgmma`` waits hide behind another's loads); ties go to fewer splits. ``ctas_per_sm``
  None: 3 for ``tile_m`` 16, else 2 (each measured best or tied on an H200 at the FLUX
  shapes, NOTES_kernels.md version 7). ``k_tiles`` is used where it divides a split;
  ``warpgroups`` (per CTA) restricts ``tiles_per_cta`` to its multiples."""
  tile_m = 16 if m <= 16 else 32 if m <= 32 else 64 if m <= 64 else 128
  if ctas_per_sm is None:
    ctas_per_sm = 3 if tile_m <= 16 else 2
  nt, kt, mt = n // TILE_N, k // TILE_K, -(-m // tile_m)
  target = min(ctas_per_sm, nt * kt * mt // num_sms)  # CTAs per SM, where the work allows
  best, best_cost = None, None
  for splits in _divisors(kt):
    for tiles in _divisors(nt):
      if tiles % warpgroups:
        continue
      cfg = MatmulConfig(tile_m=tile_m, k_splits=splits, tiles_per_cta=tiles,
                         k_tiles=k_tiles if (kt // splits) % k_tiles == 0 else 1,
                         warpgroups=warpgroups, m_major=tile_m <= 64)
      resident = SMEM_BYTES // smem_bytes(cfg, k)
      if resident < 1:
        continue
      ctas = nt // tiles * mt * splits
      per_sm = -(-ctas // num_sms)
      ks = kt // splits
      cta_bytes = (tiles * ks * _STEP_BYTES + tile_m * ks * TILE_K * 2 / 3
                   + tiles * TILE_N * tile_m * 4 * 2)
      cost = (per_sm > resident, per_sm < target, per_sm * cta_bytes, splits)
      if best_cost is None or cost < best_cost:
        best, best_cost = cfg, cost
  if best is None:
    raise ValueError(f"no kernel tiling fits shared memory for M={m}, K={k}, N={n}")
  if m <= 8 and _REGISTER_CONCAT:
    # An 8-row activation tile (wgmma N = 8; activations kept (M, K), so JAX >= 0.11 on the
    # GPU, which fp4_matmul falls back from): half the activation traffic and products of
    # 16 rows, 0.5-0.7 us of ~13.8 at M = 1 on the FLUX MLP shapes (H200, version 28).
    best = dataclasses.replace(best, tile_m=8)
  return best


def stream_config(m: int, n: int, k: int, tile_m: int | None = None,
                  warpgroups: int | None = None, tiles_per_wg: int = 1,
                  out_itemsize: int = 2, num_sms: int = 132,
                  wg_tiles: int = 1, alias_out: bool | None = None,
                  k_splits: int = 1, cluster_splits: bool = False,
                  act_codes: bool = False, fixup_splits: bool = False) -> MatmulConfig:
  """A tiling of the streaming kernel (``MatmulConfig.stream``) for M rows.

  Defaults measured on an H200 (NOTES_kernels.md version 13): ``tile_m`` 256 with two
  consumer warpgroups where that gives two waves of CTAs (each decoded weight tile then
  serves 256 rows: 7-18% faster than 128 at 1024-4608 rows of the FLUX shapes), else the
  smallest of 16, 32, 64 covering M up to 128, else 128; ``warpgroups`` consumers: two where
  that still gives two waves of CTAs, else one. ``overlap_wgmma`` is off where two consumers
  hold 128 accumulator registers each (4-7% faster: the other consumer covers the wait).

  Args:
    m, n, k: the problem, ``(M, K) x (K, N)``.
    tile_m: activation rows per CTA (None: as above).
    warpgroups: consumer warpgroups (None: as above).
    tiles_per_wg: rounds of output tiles each consumer computes in turn.
    out_itemsize: bytes per element of the output tile (2: bf16/f16 written by the kernel).
    num_sms: streaming multiprocessors, for the wave count.
    wg_tiles: weight tiles (accumulators) per consumer and step (``MatmulConfig.wg_tiles``).
    alias_out: output tiles in the pipeline's shared memory (one round only); None: where
      that gives a deeper pipeline.
    k_splits: CTAs per output tile along K, each writing float32 partials that XLA sums
      (more CTAs where N is narrow; version 14): output tiles of 4 bytes.
    cluster_splits: the splits sum in their cluster's shared memory instead
      (``MatmulConfig.cluster_splits``; output tiles in the pipeline's memory).
    act_codes: the kernel decodes the NVFP4 activation codes (``MatmulConfig.act_codes``);
      ``tile_m`` is then at least 64.
    fixup_splits: the splits sum in order through a float32 workspace and the last finishes
      the output (``MatmulConfig.fixup_splits``; one round of output tiles, 2-byte outputs):
      output tiles of ``4 + out_itemsize`` bytes.

  Returns:
    The tiling at the deepest pipeline (<= 4) that fits shared memory.

  Raises:
    ValueError: if no pipeline depth fits.
  """
  waves = lambda tm, wgs: (  # noqa: E731
      _ctas(m, n, tm, wgs * wg_tiles * tiles_per_wg, k_splits) / num_sms)
  cluster_splits = cluster_splits and k_splits > 1
  # float32 outputs are the partials (fp4_matmul sums them in XLA)
  fixup_splits = fixup_splits and k_splits > 1 and not cluster_splits and out_itemsize == 2
  if k_splits > 1 and not (cluster_splits or fixup_splits):
    out_itemsize = 4
  if tile_m is None:
    tile_m = (64 if m <= 128 and act_codes else
              16 if m <= 16 else 32 if m <= 32 else 64 if m <= 128 else
              256 if warpgroups in (None, 2) and wg_tiles * tiles_per_wg == 1
              and waves(256, 2) >= 2 else 128)
  if warpgroups is None:
    warpgroups = 2 if waves(tile_m, 2) >= 2 else 1
  wide = warpgroups == 2 and (wg_tiles > 1 or tile_m > 128)
  if cluster_splits:
    aliases = (True,)
  elif alias_out is None:
    aliases = (True, False) if tiles_per_wg == 1 else (False,)
  else:
    aliases = (alias_out,)
  fits = []
  for alias in aliases:
    for depth in (4, 3, 2):
      cfg = MatmulConfig(tile_m=tile_m, tiles_per_cta=warpgroups * wg_tiles * tiles_per_wg,
                         warpgroups=warpgroups, max_concurrent_steps=depth, m_major=True,
                         overlap_wgmma=not wide, stream=True, wg_tiles=wg_tiles,
                         alias_out=alias, k_splits=k_splits,
                         cluster_splits=cluster_splits, act_codes=act_codes,
                         fixup_splits=fixup_splits)
      if smem_bytes(cfg, k, out_itemsize) <= SMEM_BYTES:
        fits.append(cfg)
        break
  if not fits:
    raise ValueError(f"no streaming tiling fits shared memory for tile_m={tile_m}")
  # deepest first; at equal depth, output tiles of their own
  return max(fits, key=lambda c: (c.max_concurrent_steps, not c.alias_out))


def _layout_cast(interpret: bool):
  # The 0.10.2 GPU interpreter has no layout_cast; layouts do not matter there.
  return (lambda x, _: x) if interpret else plgpu.layout_cast


def _swz(bytes_):
  return (plgpu.TilingTransform((8, bytes_ // 2)), plgpu.SwizzleTransform(bytes_))


_CODES_TRANSFORMS = (plgpu.TilingTransform((8, 128)), plgpu.SwizzleTransform(64))
# activation codes (uint8, TILE_K / 2 bytes a row) as `_decode_act_tile` loads them
_ACT_CODES_TRANSFORMS = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(64))


def _out_smem(*shape: int):
  """Float32 output tiles ``(..., rows, tm)``, swizzled."""
  sw = min(128, shape[-1] * 4)
  return plgpu.SMEM(shape, jnp.float32,
                    transforms=(plgpu.TilingTransform((8, sw // 4)), plgpu.SwizzleTransform(sw)))


# E2M1 -> E4M3 by byte permute: `prmt` picks byte i of the output from the 8-byte table
# (lo, hi) with the 3-bit magnitude index, once from the positive and once from the negative
# table; a third `prmt` takes the negative byte where the nibble's sign bit is set. E4M3 bytes
# of the E2M1 grid 0, .5, 1, 1.5, 2, 3, 4, 6: 00 30 38 3C 40 44 48 4C (negative: | 0x80).
# Then `cvt.rn.f16x2.e4m3x2` widens two bytes at a time (exact). One 32-bit word of 8 nibbles
# (element 2i in the low nibble of byte i) gives four f16x2 words: elements (0,1) .. (6,7).
_E2M1_TO_F16X2_PTX = """{
.reg .b32 idx, pat, pos, neg, e0, e1;
.reg .b16 h0, h1, h2, h3;
and.b32 idx, $4, 0x77777777;
and.b32 pat, $4, 0x88888888;
shr.u32 pat, pat, 1;
or.b32 pat, pat, 0x32103210;
prmt.b32 pos, 0x3C383000, 0x4C484440, idx;
prmt.b32 neg, 0xBCB8B080, 0xCCC8C4C0, idx;
prmt.b32 e0, pos, neg, pat;
shr.u32 idx, idx, 16;
shr.u32 pat, pat, 16;
prmt.b32 pos, 0x3C383000, 0x4C484440, idx;
prmt.b32 neg, 0xBCB8B080, 0xCCC8C4C0, idx;
prmt.b32 e1, pos, neg, pat;
mov.b32 {h0, h1}, e0;
mov.b32 {h2, h3}, e1;
cvt.rn.f16x2.e4m3x2 $0, h0;
cvt.rn.f16x2.e4m3x2 $1, h1;
cvt.rn.f16x2.e4m3x2 $2, h2;
cvt.rn.f16x2.e4m3x2 $3, h3;
}"""


def _wgmma_index(idx, i):
  """WGMMA-layout register index of pair ``i`` of the ``WGMMA_UPCAST_4X`` register ``idx``
  (tile storage order of ``_swap_byte_blocks``): column tile ``4 idx[1] + i``, same rows."""
  return (idx[0], 4 * idx[1] + i, *idx[2:])


def _to_wgmma_registers(vals):
  """Mosaic GPU: 16-bit ``WGMMA_UPCAST_4X`` ``FragmentedArray`` (8 values per register) of a
  tile stored in register order -> the WGMMA layout, by renaming register slices."""
  from jax.experimental.mosaic import gpu as mgpu  # noqa: PLC0415 (only while lowering)
  from jax.experimental.mosaic.gpu import fragmented_array as fa  # noqa: PLC0415
  regs = vals.registers
  out = np.empty((regs.shape[0], 4 * regs.shape[1], *regs.shape[2:]), dtype=object)
  for idx, reg in np.ndenumerate(regs):
    for i in range(4):
      out[_wgmma_index(idx, i)] = mgpu.utils.vector_slice(reg, slice(2 * i, 2 * i + 2))
  return type(vals)(_registers=out, _layout=fa.WGMMA_LAYOUT, _is_signed=None)


def _e2m1_to_f16_registers(codes):
  """Mosaic GPU: int4 ``WGMMA_UPCAST_4X`` ``FragmentedArray`` of E2M1 nibbles (a tile stored
  in register order) -> float16 values in the WGMMA layout.

  Each register is one 32-bit word of 8 nibbles; the inline PTX decodes it into four f16x2
  words, which are the WGMMA registers of four column tiles (``_wgmma_index``). Decoding
  after Mosaic's relayout instead cost 16 shuffles and 16 byte permutes per K tile and
  thread, and register by register it ran the 8-nibble decode on 2 nibbles (version 7).
  """
  from jax._src.lib.mlir import ir  # noqa: PLC0415 (MLIR only exists while lowering)
  from jax._src.lib.mlir.dialects import llvm  # noqa: PLC0415
  from jax.experimental.mosaic import gpu as mgpu  # noqa: PLC0415
  from jax.experimental.mosaic.gpu import fragmented_array as fa  # noqa: PLC0415
  i32 = ir.IntegerType.get_signless(32)
  pair_ty = ir.VectorType.get((2,), ir.F16Type.get())
  regs = codes.registers
  out = np.empty((regs.shape[0], 4 * regs.shape[1], *regs.shape[2:]), dtype=object)
  for idx, reg in np.ndenumerate(regs):
    res = llvm.inline_asm(llvm.StructType.get_literal([i32] * 4),
                          [mgpu.utils.bitcast(reg, i32)], _E2M1_TO_F16X2_PTX,
                          "=r,=r,=r,=r,r")
    for i in range(4):
      out[_wgmma_index(idx, i)] = mgpu.utils.bitcast(llvm.extractvalue(i32, res, [i]), pair_ty)
  return type(codes)(_registers=out, _layout=fa.WGMMA_LAYOUT, _is_signed=None)


def _act_to_f16_registers(codes, scales_ref):
  """Mosaic GPU: uint8 ``WGMMA_8BIT`` ``FragmentedArray`` ``(64, TILE_K/2)`` of activation
  codes (NVFP4, element ``2i`` in the low nibble of byte ``i``) and their float16 block
  scales ``scales_ref (64, TILE_K/16)`` -> float16 values ``(64, TILE_K)`` in the
  ``WGMMA_UPCAST_4X`` layout.

  Both layouts give a thread the same row and the same 8 consecutive elements per register
  (4 code bytes: one 32-bit word; 8 float16: one 16-byte vector), so each word decodes in
  place: ``_E2M1_TO_F16X2_PTX``, then one ``f16x2`` multiply per pair by the word's scale
  (a word lies in one group of 16; the product is exact in float16).
  """
  from jax._src.lib.mlir import ir  # noqa: PLC0415 (MLIR only exists while lowering)
  from jax._src.lib.mlir.dialects import arith, llvm, memref, vector  # noqa: PLC0415
  from jax.experimental.mosaic import gpu as mgpu  # noqa: PLC0415
  from jax.experimental.mosaic.gpu import fragmented_array as fa  # noqa: PLC0415
  i32 = ir.IntegerType.get_signless(32)
  pair_ty = ir.VectorType.get((2,), ir.F16Type.get())
  group_bytes = arith.constant(ir.IndexType.get(), ir.IntegerAttr.get(ir.IndexType.get(), 8))
  regs = codes.registers
  out = np.empty(regs.shape, dtype=object)
  for (idx, reg), (row, col) in zip(np.ndenumerate(regs),
                                    codes.layout.thread_idxs(codes.shape)):
    scale = vector.broadcast(pair_ty, memref.load(scales_ref,
                                                  [row, arith.divui(col, group_bytes)]))
    res = llvm.inline_asm(llvm.StructType.get_literal([i32] * 4),
                          [mgpu.utils.bitcast(reg, i32)], _E2M1_TO_F16X2_PTX,
                          "=r,=r,=r,=r,r")
    out[idx] = mgpu.utils.vector_concat([
        arith.mulf(mgpu.utils.bitcast(llvm.extractvalue(i32, res, [i]), pair_ty), scale)
        for i in range(4)])
  return type(codes)(_registers=out, _layout=fa.WGMMA_LAYOUT_UPCAST_4X, _is_signed=None)


def _decode_act_tile(codes_ref, scales_ref, out_ref, rows: int, interpret: bool) -> None:
  """The producer's decode (``MatmulConfig.act_codes``): ``out_ref`` ``(rows, TILE_K)``
  float16 activation tile = E2M1 values of ``codes_ref`` ``(rows, TILE_K/2)`` uint8 times
  the float16 block scales of ``scales_ref`` ``(rows, TILE_K/16)``, 64 rows at a time (the
  register layouts' height). The interpreter runs the same arithmetic in jnp."""
  if interpret:  # the XLA path's decode (exact in bf16, so in float16 too)
    out_ref[...] = _decode_pairs_bf16(codes_ref[...], scales_ref[...], 16,
                                      "nvfp4").astype(jnp.float16)
    return
  for r0 in range(0, rows, 64):
    sl = pl.ds(r0, 64)
    codes = plgpu.load(codes_ref.at[sl], layout=plgpu.Layout.WGMMA_8BIT)
    out_ref.at[sl][...] = plgpu.inline_mgpu(
        arg_types=(plgpu.Layout.WGMMA_8BIT, plgpu.RefType()),
        return_type=plgpu.ShapeDtypeStruct((64, TILE_K), jnp.float16,
                                           plgpu.Layout.WGMMA_UPCAST_4X))(
            lambda _, c, s: _act_to_f16_registers(c, s))(codes, scales_ref.at[sl])


def _decode(codes_ref, rows: int, tk: int, fmt: str, dtype, interpret: bool):
  """Unscaled element values of a ``(rows, tk)`` int4 SMEM tile stored in register order
  (``_swap_byte_blocks``), in ``dtype``, WGMMA layout, logical column order."""
  if interpret:  # plain jnp: undo the storage order
    v = codes_ref[...].astype(jnp.bfloat16).reshape(rows, tk // 32, 4, 4, 2)
    v = v.swapaxes(2, 3).reshape(rows, tk)
  else:
    codes = plgpu.layout_cast(codes_ref[...], plgpu.Layout.WGMMA_UPCAST_4X)
    if fmt == "nvfp4" and dtype == jnp.float16:
      return plgpu.inline_mgpu(
          arg_types=(plgpu.Layout.WGMMA_UPCAST_4X,),
          return_type=plgpu.ShapeDtypeStruct((rows, tk), jnp.float16, plgpu.Layout.WGMMA))(
              lambda _, c: _e2m1_to_f16_registers(c))(codes)
    v = plgpu.inline_mgpu(
        arg_types=(plgpu.Layout.WGMMA_UPCAST_4X,),
        return_type=plgpu.ShapeDtypeStruct((rows, tk), jnp.bfloat16, plgpu.Layout.WGMMA))(
            lambda _, c: _to_wgmma_registers(c))(codes.astype(jnp.bfloat16))
  if fmt != "int4":
    v = _e2m1_from_signed(v)
  return v if dtype == jnp.bfloat16 else v.astype(dtype)


def _scaled_slices(vals, scales_ref, g: int, dtype, interpret: bool):
  """The decoded ``(TILE_N, TILE_K)`` tile times its block scales (``scales_ref``
  ``(TILE_K/g, TILE_N)``), as ``TILE_K/16`` column slices of 16 (one scale each)."""
  lc = _layout_cast(interpret)
  slices = []
  for j in range(TILE_K // 16):
    s = lc(scales_ref[(16 * j) // g], plgpu.Layout.WGMMA.reduce(1))
    if s.dtype != dtype:
      s = s.astype(dtype)
    slices.append(vals[:, 16 * j:16 * (j + 1)] * lax.broadcast_in_dim(s, (TILE_N, 16), (0,)))
  return slices


def _register_wgmma(acc_ref, slices, at_smem, m_major: bool):
  """``acc += concat(slices) @ activation tile``, A from registers (asynchronous)."""
  if _REGISTER_CONCAT:  # one wgmma group over the whole K step
    b = plgpu.transpose_ref(at_smem, (1, 0)) if m_major else at_smem
    plgpu.wgmma(acc_ref, jnp.concatenate(slices, axis=1), b)
  else:  # JAX < 0.11 lowers no concatenate: one group per 16-column slice, (K, M) only
    for j, wj in enumerate(slices):
      plgpu.wgmma(acc_ref, wj, at_smem.at[pl.ds(16 * j, 16)])


def _step_products(acc_ref, wq_ref, ws_ref, act_tile, w: PreparedWeights, dtype,
                   m_major: bool, wait_each: bool, interpret: bool) -> None:
  """One pipeline step of either kernel: for each of its K tiles ``j``, the weight tile
  ``wq_ref.at[j]`` decoded and scaled by ``ws_ref.at[j]`` times the activation tile
  ``act_tile(j)`` (``(tile_m, TILE_K)`` if ``m_major`` else ``(TILE_K, tile_m)``) into the
  accumulator, one ``wgmma`` group per K tile: each waited for if ``wait_each``, else left in
  flight for the caller to wait for. The interpreter has no register A operand and no
  accumulator stores: there a float32 ``jnp.dot`` into a shared-memory accumulator."""
  for j in range(wq_ref.shape[0]):
    vals = _decode(wq_ref.at[j], TILE_N, TILE_K, w.fmt, dtype, interpret)
    slices = _scaled_slices(vals, ws_ref.at[j], w.group_size, dtype, interpret)
    if interpret:
      b = act_tile(j)[...]
      acc_ref[...] += jnp.dot(jnp.concatenate(slices, axis=1), b.T if m_major else b,
                              preferred_element_type=jnp.float32)
    else:
      _register_wgmma(acc_ref, slices, act_tile(j), m_major)
      if wait_each:
        plgpu.wgmma_wait(0)


def _k_loop(step, t, tile_steps: int, overlap: bool) -> None:
  """``step(i, kk)`` for the K steps ``kk`` of tile ``t`` (pipeline step ``i``), in a loop of
  its own per tile, so that the accumulator is stored and zeroed only between these loops:
  zeroing it inside the loop that keeps a ``wgmma`` in flight makes ptxas serialize every
  ``wgmma`` (C7515). With ``overlap`` the loop is unrolled by two: a step's decode must not
  write the registers that the previous step's ``wgmma`` (still in flight) reads, which one
  loop body's step would (PTX leaves that undefined; on an H200 it gave wrong sums)."""
  unroll = 2 if overlap and tile_steps > 1 else 1

  def body(kp, carry):
    for u in range(unroll):
      step(t * tile_steps + kp * unroll + u, kp * unroll + u)
    return carry

  lax.fori_loop(0, tile_steps // unroll, body, None)
  if tile_steps % unroll:  # the odd last step: its own code, so its own registers
    step(t * tile_steps + tile_steps - 1, tile_steps - 1)


def _finish_tile(y, out_scale, bias_smem, tile, lc, gelu: bool, out_dtype):
  """A ``(TILE_N, rows)`` float32 accumulator tile finished: times the scalar ``out_scale``,
  plus the bias (None, or ``bias_smem.at[tile]``: its ``TILE_N`` values, widened to float32
  here), tanh-GELU if ``gelu``, cast to ``out_dtype``."""
  y = y * out_scale
  if bias_smem is not None:
    b = lc(bias_smem.at[tile][...], plgpu.Layout.WGMMA.reduce(1)).astype(jnp.float32)
    y = y + lax.broadcast_in_dim(b, y.shape, (0,))
  return (jax.nn.gelu(y, approximate=True) if gelu else y).astype(out_dtype)


def _kernel_call(x, w: PreparedWeights, config: MatmulConfig, interpret: bool, m_major: bool):
  """Runs the Mosaic GPU kernel: activations ``(Mp, K)`` if ``m_major`` else ``(K, Mp)``,
  f16/bf16 -> float32 partials ``(splits, N, Mp)``.

  Each CTA loads its ``(tile_m, K/splits)`` activation slice into shared memory once; each of
  its ``warpgroups`` warpgroups then streams ``tiles_per_cta / warpgroups`` weight tiles of
  ``TILE_N`` rows against that slice through its own TMA pipeline (``k_tiles`` K tiles per
  step, ``max_concurrent_steps`` deep), storing each tile's accumulator as it completes.
  The operand type is ``x.dtype`` (float16 only for NVFP4 weights)."""
  mp, k = x.shape if m_major else x.shape[::-1]
  n = w.shape[0]
  g = w.group_size
  dtype = x.dtype
  tn, tk = TILE_N, TILE_K
  tm, splits, tiles, kt = config.tile_m, config.k_splits, config.tiles_per_cta, config.k_tiles
  nwg = config.warpgroups
  k_steps = k // tk // splits        # K tiles per CTA
  tile_steps = k_steps // kt         # pipeline steps per weight tile
  n_steps = tiles // nwg * tile_steps  # pipeline steps per warpgroup
  depth = min(config.max_concurrent_steps, n_steps)
  # With overlap, a slot is refilled one step after it was read (its wgmma group completes
  # then), so the pipeline needs two slots to overlap anything.
  overlap = config.overlap_wgmma and depth > 1
  lc = _layout_cast(interpret)

  def kernel(at_gmem, wq_gmem, ws_gmem, out_gmem, act_smem, wq_smem, ws_smem, out_smem,
             acc_smem, act_barrier, w_barrier):
    ni, mi, si = lax.axis_index("n"), lax.axis_index("m"), lax.axis_index("s")
    wg = lax.axis_index("wg") if nwg > 1 else 0
    m_sl = pl.ds(mi * tm, tm)
    first_tile = ni * tiles + wg * (tiles // nwg)

    @pl.when(wg == 0)
    def _load_activations():  # one TMA copy per K tile, all on one barrier
      for j in range(k_steps):
        k_sl = pl.ds((si * k_steps + j) * tk, tk)
        plgpu.copy_gmem_to_smem(at_gmem.at[m_sl, k_sl] if m_major else at_gmem.at[k_sl, m_sl],
                                act_smem.at[j], act_barrier.at[0])

    def fetch(step, slot):
      tile, kk = first_tile + step // tile_steps, step % tile_steps
      k_sl = pl.ds(si * k_steps + kk * kt, kt)
      bar = w_barrier.at[wg * depth + slot]
      plgpu.copy_gmem_to_smem(wq_gmem.at[tile, k_sl], wq_smem.at[wg, slot], bar)
      plgpu.copy_gmem_to_smem(ws_gmem.at[tile, k_sl], ws_smem.at[wg, slot], bar)

    for s in range(depth):
      fetch(s, s)
    plgpu.barrier_wait(act_barrier.at[0])  # after the first weight loads are in flight
    zeros = lambda: lc(jnp.zeros((tn, tm), jnp.float32), plgpu.Layout.WGMMA)  # noqa: E731

    def scoped(acc_ref):
      if interpret:
        acc_ref[...] = zeros()

      def step(i, kk):
        """Pipeline step ``i``: K step ``kk`` of its weight tile."""
        slot = lax.rem(i, depth)
        plgpu.barrier_wait(w_barrier.at[wg * depth + slot])
        _step_products(acc_ref, wq_smem.at[wg, slot], ws_smem.at[wg, slot],
                       lambda j: act_smem.at[kk * kt + j], w, dtype, m_major, not overlap,
                       interpret)
        if overlap and not interpret:
          plgpu.wgmma_wait(1)  # the step's last group stays in flight
        # Refill a slot once the wgmma group that read it has completed (every warp of the
        # warpgroup is then past its decode): this step's, or with overlap the previous one's.
        done = i - 1 if overlap else i

        @pl.when((done >= 0) & (done + depth < n_steps))
        def _refill():
          fetch(done + depth, lax.rem(done, depth))

      def weight_tile(t, carry):
        _k_loop(step, t, tile_steps, overlap)
        if overlap and not interpret:
          plgpu.wgmma_wait(0)
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous tile's store
        out_smem.at[wg][...] = acc_ref[...]
        acc_ref[...] = zeros()
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(out_smem.at[wg],
                                out_gmem.at[si, pl.ds((first_tile + t) * tn, tn), m_sl])
        return carry

      lax.fori_loop(0, tiles // nwg, weight_tile, None)

    # The interpreter accumulates in shared memory (it cannot store to a wgmma accumulator).
    if interpret:
      scoped(acc_smem.at[wg])
    else:
      pl.run_scoped(scoped, plgpu.ACC((tn, tm), jnp.float32))
    plgpu.wait_smem_to_gmem(0)

  act = (plgpu.SMEM((k_steps, tm, tk), dtype, transforms=_swz(128)) if m_major else
         plgpu.SMEM((k_steps, tk, tm), dtype, transforms=_swz(_SWIZZLE)))
  scratch = [
      act,
      plgpu.SMEM((nwg, depth, kt, tn, tk), w.codes.dtype, transforms=_CODES_TRANSFORMS),
      plgpu.SMEM((nwg, depth, kt, tk // g, tn), w.scales_t.dtype),
      _out_smem(nwg, tn, tm),
      plgpu.SMEM((nwg, tn, tm) if interpret else (1,), jnp.float32),
      plgpu.Barrier(num_arrivals=k_steps, num_barriers=1),
      plgpu.Barrier(num_arrivals=2, num_barriers=nwg * depth),
  ]
  wg_kw = dict(num_threads=nwg, thread_name="wg") if nwg > 1 else {}
  params = plgpu.CompilerParams(unsafe_no_auto_barriers=_NO_AUTO_BARRIERS)
  call = plgpu.kernel(
      kernel, out_type=jax.ShapeDtypeStruct((splits, n, mp), jnp.float32),
      grid=(n // tn // tiles, mp // tm, splits), grid_names=("n", "m", "s"),
      scratch_types=scratch, **wg_kw, compiler_params=params)
  return call(x, w.codes, w.scales_t)


def _cluster_sync() -> None:
  """``barrier.cluster``: every thread of every CTA in the cluster must reach it; releases the
  shared-memory writes before it and acquires the peers' (cluster scope)."""
  from jax.experimental.mosaic import gpu as mgpu  # noqa: PLC0415 (only while lowering)

  @plgpu.inline_mgpu()
  def sync(_):
    mgpu.utils.inline_ptx("barrier.cluster.arrive.release.aligned;\n"
                          "\tbarrier.cluster.wait.acquire.aligned;", has_side_effects=True)

  sync()


def _fence_async_global() -> None:
  """``fence.proxy.async.global``: orders this thread's global-memory accesses through the
  generic proxy (the semaphore) with those through the async proxy (TMA copies)."""
  from jax.experimental.mosaic import gpu as mgpu  # noqa: PLC0415 (only while lowering)

  @plgpu.inline_mgpu()
  def fence(_):
    mgpu.utils.inline_ptx("fence.proxy.async.global;", has_side_effects=True)

  fence()


def _dec_head_tiles(config: MatmulConfig, k: int) -> int:
  """``decode_ctas``: K tiles at the start of each split that XLA decodes, the streaming
  kernel's prologue (its first ``max_concurrent_steps`` steps, copied at launch, before a
  decoding CTA could have stored any)."""
  steps = k // TILE_K // config.k_tiles // config.k_splits
  return min(config.max_concurrent_steps, steps) * config.k_tiles


def _decoder_smem(warpgroups: int):
  """``decode_ctas``: each decoding warpgroup's ``_DEC_SLOTS`` slots of codes, float16 scales
  and the float16 tile stored from (swizzled like the activation tiles the TMA copies)."""
  rows, tk = _DEC_ROWS, TILE_K
  return (plgpu.SMEM((warpgroups, _DEC_SLOTS, rows, tk // 2), jnp.uint8,
                     transforms=_ACT_CODES_TRANSFORMS),
          plgpu.SMEM((warpgroups, _DEC_SLOTS, rows, tk // 16), jnp.float16),
          plgpu.SMEM((warpgroups, _DEC_SLOTS, rows, tk), jnp.float16, transforms=_swz(128)))


def _decoder(codes_gmem, xs_gmem, ws_gmem, bufs, full, sems, c, wg, config: MatmulConfig,
             head: int) -> None:
  """A decoding CTA of the streaming kernel (``MatmulConfig.decode_ctas``), every warpgroup.

  The units, 64 activation rows of one K tile, cover the K tiles of every split but its
  first ``head`` (which XLA decodes: they are needed before a decoder could have stored
  them), in the order the splits consume them (a split's first such tile, in split order,
  then the second...; the rows inside), and are dealt round robin to the decoding
  warpgroups. Each brings a unit's codes ``(64, TILE_K/2)`` and float16 block scales into
  one of its two slots (the next unit's copy in flight while it decodes), decodes it
  (``_decode_act_tile``) into the slot's float16 tile and stores that into ``ws_gmem (M,
  K)``; once a unit's store has landed it signals its K tile's global semaphore ``sems``
  (None under the interpreter, which runs the decoding CTAs first), which the multiplying
  CTAs' producers wait on until every piece of the tile has signalled.
  """
  rows, tk, slots = _DEC_ROWS, TILE_K, _DEC_SLOTS
  m, k = ws_gmem.shape
  pieces = -(-m // rows)
  interpret = sems is None
  splits = config.k_splits
  split_tiles = k // tk // splits  # K tiles per split, the first `head` decoded by XLA
  n_wg = config.decode_ctas * (config.warpgroups + 1)
  me = c * (config.warpgroups + 1) + wg
  units = (split_tiles - head) * splits * pieces
  mine = lax.div(units - me + n_wg - 1, n_wg)  # units of this warpgroup
  codes, scales, tiles = bufs

  def unit(j):  # this warpgroup's j-th unit: (K tile, rows)
    u = me + j * n_wg
    t = lax.div(u, pieces * splits)
    kk = lax.rem(lax.div(u, pieces), splits) * split_tiles + head + t
    return kk, pl.ds(lax.rem(u, pieces) * rows, rows)

  def load(j, slot):
    kk, r = unit(j)
    bar = full.at[wg * slots + slot]
    plgpu.copy_gmem_to_smem(codes_gmem.at[r, pl.ds(kk * (tk // 2), tk // 2)],
                            codes.at[wg, slot], bar)
    plgpu.copy_gmem_to_smem(xs_gmem.at[r, pl.ds(kk * (tk // 16), tk // 16)],
                            scales.at[wg, slot], bar)

  def signal(j):  # unit j's store has landed (written, not only read)
    if not interpret:
      _fence_async_global()
      plgpu.semaphore_signal(sems.at[unit(j)[0]], 1, memory_scope="gpu")

  for j in range(slots):
    pl.when(j < mine)(functools.partial(load, j, j))

  def body(j, carry):
    slot = lax.rem(j, slots)
    plgpu.barrier_wait(full.at[wg * slots + slot])
    # the slot's tile was last stored from by unit j - 2, whose store iteration j - 1 (or, for
    # unit 0, iteration 0) waited for
    _decode_act_tile(codes.at[wg, slot], scales.at[wg, slot], tiles.at[wg, slot], rows,
                     interpret)
    plgpu.commit_smem()  # the tile's stores, visible to the TMA store; the codes read
    pl.when(j + slots < mine)(functools.partial(load, j + slots, slot))
    kk, r = unit(j)
    plgpu.copy_smem_to_gmem(tiles.at[wg, slot], ws_gmem.at[r, pl.ds(kk * tk, tk)])

    @pl.when(j == 0)
    def _first():  # at once: the multiplying CTAs start on the first K steps
      plgpu.wait_smem_to_gmem(0)
      signal(0)

    @pl.when(j > 1)
    def _previous():  # the one before, while this unit's store is in flight
      plgpu.wait_smem_to_gmem(1)
      signal(j - 1)
    return carry

  lax.fori_loop(0, mine, body, None)

  @pl.when(mine > 1)
  def _last():
    plgpu.wait_smem_to_gmem(0)
    signal(mine - 1)


def _stream_call(x, w: PreparedWeights, config: MatmulConfig, scales, out_dtype,
                 interpret: bool, gelu: bool = False, bias=None):
  """Runs the streaming kernel (``MatmulConfig.stream``) on activations ``x (M, K)``
  (M a multiple of 8, not necessarily of ``tile_m``: Mp is M rounded up to one).

  ``scales``: None, or ``_out_scales``' float32 ``(1,)`` factors of the output scale, which
  the kernel multiplies (each consumer reads them from global memory at its start: no XLA
  kernel before this one) and applies with the ``bias`` ``(N,)`` if any (its own dtype,
  widened in the kernel), then tanh-GELU if ``gelu``, before writing ``out_dtype`` ``(M, N)``
  itself ("direct"; ``k_splits`` 1, ``cluster_splits`` or ``fixup_splits``); else it writes the
  float32 accumulators ``(k_splits, N, Mp)`` like ``_kernel_call`` (left to XLA: the sum
  over the splits, scale, epilogue, transpose). Split ``s`` of a CTA's output tiles reads K
  steps ``s * K/k_splits`` onwards. With ``cluster_splits`` the splits of an output tile form
  a cluster: after its last K step each CTA puts its accumulators in its shared memory, and
  CTA ``s`` sums rows ``s * tile_m/k_splits`` onwards of every peer's (distributed shared
  memory, in split order) and finishes them, between two cluster barriers. With
  ``fixup_splits`` split ``s`` adds the running sum of the splits before it, read back from
  a float32 ``(N, Mp)`` workspace (a second output, dropped) chunk by chunk as split
  ``s - 1`` signals a global semaphore, and stores the new sum likewise, or (the last split)
  finishes the tile (``_fixup``).

  Pipeline (per CTA; warp-specialized): a producer warpgroup (index ``warpgroups``) issues
  every copy; a step's copies (the ``k_tiles`` activation tiles ``(tile_m, TILE_K)`` and each
  consumer warpgroup's ``wg_tiles`` weight tiles) arrive on one barrier per slot. Each
  consumer warpgroup decodes its weight tiles into registers (the A operands) and runs their
  ``wgmma`` groups against the shared activation tile, one accumulator ``(TILE_N, tile_m)``
  per weight tile, then arrives on the slot's "consumed" barrier once the groups that read
  the slot have completed (with ``overlap_wgmma`` one step later); the producer waits for all
  arrivals before it refills the slot, so no consumer waits for another. Each accumulator is
  written after its output tile's last K step, through shared memory of its own or, with
  ``alias_out``, the pipeline's (once every consumer has passed the "drained" barrier after
  its last ``wgmma``). With two consumers holding two accumulators or ``tile_m`` 256, the
  consumers raise their register limit (``setmaxnreg``) to 232 and the producer lowers its
  own to 40 (224 and 56 with ``act_codes``).

  With ``act_codes`` ``x`` is a pair: uint8 NVFP4 codes ``(M, K/2)`` and float16 block
  scales ``(M, K/16)``, copied into a ring of their own (``max_concurrent_steps`` slots
  beside the weight tiles'). Once a step's codes have arrived and the consumers are done
  with the step two before, the producer decodes them into the float16 tile of that step
  (two, alternating; ``_decode_act_tile``), arrives on its "decoded" barrier, which the
  consumers wait for besides the weights', and refills the codes' slot at once; the
  consumers' "consumed" arrivals free both the float16 tile and the weights' slot.

  With ``decode_ctas`` ``x`` is the same pair and a third member, the float16 values of
  each split's first ``_dec_head_tiles`` K tiles (the pipeline's prologue; decoded by XLA),
  and the grid is one-dimensional: its first ``decode_ctas`` CTAs decode the other K tiles
  (``_decoder``), the rest multiply as above, their producer waiting on a K tile's global
  semaphore before copying its activation tile from the decoded workspace (a second output,
  dropped).
  """
  ac = config.act_codes
  dec = config.decode_ctas
  x, xs, xh = x if dec else (*x, None) if ac else (x, None, None)
  m, k = x.shape[0], x.shape[1] * (2 if ac or dec else 1)
  n = w.shape[0]
  g = w.group_size
  dtype = jnp.float16 if ac or dec else x.dtype
  tn, tk = TILE_N, TILE_K
  tm, tiles, kt, nwg = config.tile_m, config.tiles_per_cta, config.k_tiles, config.warpgroups
  splits = config.k_splits
  wt = config.wg_tiles           # weight tiles (accumulators) per consumer warpgroup
  step_tiles = nwg * wt          # weight tiles the CTA multiplies per step
  tile_steps = k // tk // kt // splits  # pipeline steps per output tile (and split)
  groups = tiles // step_tiles   # rounds of output tiles, in turn
  n_steps = groups * tile_steps
  depth = min(config.max_concurrent_steps, n_steps)
  head = _dec_head_tiles(config, k) // kt  # decode_ctas: steps of each split XLA decodes
  overlap = config.overlap_wgmma and depth > 1
  # the activation tiles the consumers read: the pipeline's slots, or two decoded ones
  act_slots = min(2, n_steps) if ac else depth
  direct = scales is not None
  has_bias = direct and bias is not None
  cl = config.cluster_splits
  fx = config.fixup_splits
  # x may end inside its last row block (M a multiple of 8): TMA reads rows past it as zeros
  # and drops stores past the output's rows (float32 partials and workspaces keep whole
  # blocks).
  n_blocks, m_blocks = n // tn // tiles, -(-m // tm)
  mp = m_blocks * tm
  tm_s = tm // splits if cl else tm  # rows of each output tile a CTA finishes
  # Registers rebalanced where two consumers hold 128 accumulator registers each: 384
  # threads get 168 each at launch, and `setmaxnreg` only moves registers between the
  # warpgroups of a CTA (asking for more than the 3 x 168 waits forever). A decoding
  # producer keeps 56, leaving each consumer 224 (else 40 and 232).
  regs = nwg == 2 and (wt > 1 or tm > 128) and not interpret
  producer_regs = 56 if ac else 40
  consumer_regs = (3 * 168 - producer_regs) // 2 // 8 * 8
  # The output tiles in the pipeline's memory (the JAX 0.10.2 interpreter has no RefUnion:
  # there they get their own).
  union = config.alias_out and (_REGISTER_CONCAT or not interpret)
  lc = _layout_cast(interpret)
  zeros = lambda: lc(jnp.zeros((tn, tm), jnp.float32), plgpu.Layout.WGMMA)  # noqa: E731

  def kernel(*refs):
    x_gmem, *refs = refs
    if ac or dec:
      xs_gmem, *refs = refs
    if dec:
      xh_gmem, *refs = refs
    if ac:
      *refs, codes_smem, xs_smem, codes_full, decoded = refs
    if dec:
      codes_gmem, (*refs, dec_full) = x_gmem, refs
    wq_gmem, ws_gmem, *rest = refs
    if direct:
      scale_gmems, rest = rest[:len(scales)], rest[len(scales):]
    if has_bias:
      bias_gmem, *rest = rest
    out_gmem, *rest = rest
    if fx:
      part_gmem, *rest = rest
    if dec:  # the decoded workspace: the activations the producer copies
      x_gmem, *rest = rest
    bufs, wq_smem, ws_smem, acc_smem, *rest = rest
    bias_smem = None
    if has_bias:
      bias_smem, *rest = rest
    full, consumed, drained, *rest = rest
    if has_bias:
      bias_bar, *rest = rest
    if fx:
      fix_bar, = rest
    if dec:  # RefUnion members (or, JAX 0.10.2's interpreter, a tuple)
      *bufs, dec_bufs = bufs
      bufs = bufs if union else bufs[0]
    act_smem, out_smem = bufs  # a RefUnion (alias_out) or a tuple
    wg = lax.axis_index("wg")
    if dec:  # a one-dimensional grid: the decoding CTAs, then (n, m, s) as below
      # one semaphore per K step, counting its decoded pieces (zeroed at every launch)
      dec_sems = None if interpret else pl.get_global(
          plgpu.SemaphoreType.REGULAR((k // tk,)))
      c = lax.axis_index("c")
      is_mm = c >= dec
      lin = jnp.maximum(c - dec, 0)
      rest_, si = lax.div(lin, splits), lax.rem(lin, splits)
      inner = n_blocks if config.n_inner else m_blocks  # the block index varying faster
      outer, fast = lax.div(rest_, inner), lax.rem(rest_, inner)
      mi, ni = (outer, fast) if config.n_inner else (fast, outer)
      pl.when(jnp.logical_not(is_mm))(functools.partial(
          _decoder, codes_gmem, xs_gmem, x_gmem, dec_bufs, dec_full, dec_sems, c, wg, config,
          head * kt))
    else:
      ni, mi, si = lax.axis_index("n"), lax.axis_index("m"), lax.axis_index("s")
      is_mm = True
    m_sl = pl.ds(mi * tm, tm)
    if fx and not interpret:  # one per output tile and consumer, zeroed at every launch
      sems = pl.get_global(plgpu.SemaphoreType.REGULAR((n_blocks * m_blocks * nwg,)))

    def fetch_codes(step, slot):  # act_codes (k_tiles 1): the ring of codes and scales
      kk = si * tile_steps + step % tile_steps
      bar = codes_full.at[slot]
      plgpu.copy_gmem_to_smem(x_gmem.at[m_sl, pl.ds(pl.multiple_of(kk * tk // 2, tk // 2),
                                                    tk // 2)], codes_smem.at[slot], bar)
      plgpu.copy_gmem_to_smem(xs_gmem.at[m_sl, pl.ds(kk * tk // 16, tk // 16)],
                              xs_smem.at[slot], bar)

    def await_decoded(step):  # decode_ctas: until the step's activation tiles are decoded
      if interpret:  # the interpreter runs the decoding CTAs first
        return
      t = step % tile_steps
      kk = si * tile_steps + t

      @pl.when(t >= head)  # the head is XLA's
      def _wait():
        for j in range(kt):
          plgpu.semaphore_wait(dec_sems.at[kk * kt + j], -(-m // _DEC_ROWS), decrement=False,
                               memory_scope="gpu")
        _fence_async_global()  # the TMA reads of the workspace see the decoders' TMA stores

    def fetch(step, slot, wait_decoded=True):
      grp, kk = step // tile_steps, si * tile_steps + step % tile_steps
      bar = full.at[slot]

      def acts(src=x_gmem, first=kk * kt):  # the step's activation tiles, from K tile first
        for j in range(0 if ac else kt):
          plgpu.copy_gmem_to_smem(src.at[m_sl, pl.ds((first + j) * tk, tk)],
                                  act_smem.at[slot, j], bar)

      if not dec:
        acts()
      for v in range(step_tiles):
        tile = ni * tiles + grp * step_tiles + v
        k_sl = pl.ds(kk * kt, kt)
        plgpu.copy_gmem_to_smem(wq_gmem.at[tile, k_sl], wq_smem.at[v, slot], bar)
        plgpu.copy_gmem_to_smem(ws_gmem.at[tile, k_sl], ws_smem.at[v, slot], bar)
      if dec:  # the weights in flight while waiting for the decoders
        in_head = step % tile_steps < head  # the split's first K steps, decoded by XLA
        pl.when(in_head)(lambda: acts(xh_gmem, (si * head + step % tile_steps) * kt))

        @pl.when(jnp.logical_not(in_head))
        def _decoded_acts():
          if wait_decoded:
            await_decoded(step)
          acts()

    @pl.when((wg == nwg) & is_mm)
    def _producer():
      if regs:
        plgpu.set_max_registers(producer_regs, action="decrease")
      if has_bias:
        for t in range(tiles):
          cols = pl.ds((ni * tiles + t) * tn, tn)
          plgpu.copy_gmem_to_smem(bias_gmem.at[cols], bias_smem.at[t], bias_bar)
      for st in range(depth):
        fetch(st, st)
        if ac:
          fetch_codes(st, st)

      def refill(st, carry):  # once every consumer is done with the slot's previous step
        slot = lax.rem(st, depth)
        if dec:  # polled before the slot frees (its latency hidden behind the products)
          await_decoded(st)
        plgpu.barrier_wait(consumed.at[slot])
        fetch(st, slot, wait_decoded=False)
        return carry

      def decode(st, carry):  # act_codes: step st's float16 tile, and the refills
        a_slot = lax.rem(st, act_slots)

        @pl.when(st >= act_slots)
        def _reuse():  # the consumers are done with step st - act_slots: its tile and slot
          plgpu.barrier_wait(consumed.at[a_slot])

          @pl.when(st - act_slots + depth < n_steps)
          def _refill():
            fetch(st - act_slots + depth, lax.rem(st - act_slots, depth))

        slot = lax.rem(st, depth)
        plgpu.barrier_wait(codes_full.at[slot])
        _decode_act_tile(codes_smem.at[slot], xs_smem.at[slot], act_smem.at[a_slot, 0], tm,
                         interpret)
        plgpu.commit_smem()  # the stores, visible to the consumers' wgmma (and the reads
        plgpu.barrier_arrive(decoded.at[a_slot])  # done before the TMA overwrites the slot)

        @pl.when(st + depth < n_steps)
        def _next_codes():  # the codes' slot is free once decoded: `depth` steps ahead
          fetch_codes(st + depth, slot)

        return carry

      if ac:
        lax.fori_loop(0, n_steps, decode, None)
      else:
        lax.fori_loop(depth, n_steps, refill, None)
      if cl:  # the consumers' two cluster barriers count every thread
        _cluster_sync()
        _cluster_sync()

    def scoped(*accs):
      if interpret:
        for acc in accs:
          acc[...] = zeros()
      if direct:  # read before the K loop: a global load's latency off the tail
        out_scale = scale_gmems[0][0]
        for f in scale_gmems[1:]:
          out_scale = out_scale * f[0]

      def step(i, kk):
        slot = lax.rem(i, depth)
        plgpu.barrier_wait(full.at[slot])
        a_slot = slot
        if ac:
          a_slot = lax.rem(i, act_slots)
          plgpu.barrier_wait(decoded.at[a_slot])
        for p, acc in enumerate(accs):
          _step_products(acc, wq_smem.at[wg * wt + p, slot], ws_smem.at[wg * wt + p, slot],
                         lambda j: act_smem.at[a_slot, j], w, dtype, True, not overlap,
                         interpret)
        if overlap and not interpret:
          plgpu.wgmma_wait(wt * kt)  # this step's groups stay in flight; the previous done
        done = i - 1 if overlap else i  # its wgmma groups have completed: its slot is free

        @pl.when((done >= 0) & (done + act_slots < n_steps))  # only where the producer waits
        def _release():
          plgpu.barrier_arrive(consumed.at[lax.rem(done, act_slots)])

      def _fixup(accs, local, put_finished):
        """``fixup_splits`` (one round: output tiles ``local(p)``), in ``tm / ch`` column
        chunks, pipelined: split 0 stores its accumulators' chunks into the float32
        workspace, signalling the global semaphore as each store completes; split s > 0
        waits for chunk c of split s - 1 (count >= (s - 1) * chunks + c + 1: the splits
        before s - 1 signal at most (s - 1) * chunks), adds it, and stores the sum for split
        s + 1 likewise, or the last finishes the output's chunk. Chunks also keep the sum's
        registers to ``_FIX_CHUNK`` columns."""
        o32, o16 = out_smem
        mine = [wg * wt + p for p in range(wt)]
        cols = [pl.ds((ni * tiles + local(p)) * tn, tn) for p in range(wt)]
        sem = None if interpret else sems.at[(ni * m_blocks + mi) * nwg + wg]
        ch = _FIX_CHUNK
        n_ch = tm // ch
        rows = lambda c: pl.ds(c * ch, ch)  # noqa: E731 (of a tile)
        m_rows = lambda c: pl.ds(mi * tm + c * ch, ch)  # noqa: E731 (of the output)

        def fetch(c):  # chunk c of the running sum, once split si - 1 has stored it
          if not interpret:  # the interpreter runs the grid in order, the split fastest
            plgpu.semaphore_wait(sem, (si - 1) * n_ch + c + 1, decrement=False,
                                 memory_scope="gpu")
            _fence_async_global()  # the TMA reads below see the peer's TMA stores
          for p in range(wt):
            plgpu.copy_gmem_to_smem(part_gmem.at[cols[p], m_rows(c)], o32.at[mine[p], c],
                                    fix_bar.at[wg * n_ch + c])

        def stored(pending: int):  # the stores before the last `pending` are written: tell
          plgpu.wait_smem_to_gmem(pending)  # split si + 1 (written, not only read)
          if not interpret:
            _fence_async_global()
            plgpu.semaphore_signal(sem, 1, memory_scope="gpu")

        def fix(add: bool, last: bool):
          if add:
            fetch(0)
          ys = [acc[...] for acc in accs]
          for c in range(n_ch):
            if add:
              if c + 1 < n_ch:
                fetch(c + 1)
              plgpu.barrier_wait(fix_bar.at[wg * n_ch + c])
            for p in range(wt):
              y = ys[p][:, c * ch:(c + 1) * ch]
              part = o32.at[mine[p], c]
              if add:
                y = y + lc(part[...], plgpu.Layout.WGMMA)
              if last:
                put_finished(o16.at[mine[p], rows(c)], y, local(p))
              else:
                part[...] = y
            plgpu.commit_smem()
            for p in range(wt):
              if last:
                plgpu.copy_smem_to_gmem(o16.at[mine[p], rows(c)], out_gmem.at[m_rows(c),
                                                                              cols[p]])
              else:
                plgpu.copy_smem_to_gmem(o32.at[mine[p], c], part_gmem.at[cols[p], m_rows(c)])
            if not last and c > 0:
              stored(wt)  # chunk c - 1 (this chunk's wt stores may be in flight)
          if not last:
            stored(0)

        pl.when(si == 0)(lambda: fix(False, False))
        if splits > 2:
          pl.when((si > 0) & (si < splits - 1))(lambda: fix(True, False))
        pl.when(si == splits - 1)(lambda: fix(True, True))

      def output_tiles(t, carry):
        _k_loop(step, t, tile_steps, overlap)
        if overlap and not interpret:
          plgpu.wgmma_wait(0)
        if config.alias_out:  # every consumer is done reading the pipeline's memory
          plgpu.barrier_arrive(drained)
          plgpu.barrier_wait(drained)
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous tiles' stores
        local = lambda p: t * step_tiles + wg * wt + p  # noqa: E731 (tile among the CTA's)

        def put_finished(o_ref, y, tile):  # y finished into the (rows, TILE_N) tile o_ref
          y = _finish_tile(y, out_scale, bias_smem, tile, lc, gelu, out_dtype)
          if interpret:  # the interpreter has no transposed refs
            o_ref[...] = y.T
          else:
            plgpu.transpose_ref(o_ref, (1, 0))[...] = y

        if fx:  # split si adds the running sum of the splits before it
          _fixup(accs, local, put_finished)
          return carry
        if cl:  # one accumulator (wg_tiles 1): the cluster sums it, this CTA rows si
          # Peers' memory is read through refs of their own (JAX 0.11.2 cannot offset a
          # cluster ref), so consumer and slice are picked by static branches.
          o32, stage = out_smem
          acc = accs[0][...]
          for w in range(nwg):
            @pl.when(wg == w)
            def _put():
              for j in range(splits):
                o32[w][j][...] = acc[:, j * tm_s:(j + 1) * tm_s]

          _cluster_sync()  # every split's accumulators are in its CTA's shared memory
          for w in range(nwg):
            for j in range(splits):
              @pl.when((wg == w) & (si == j))
              def _sum():
                parts = [plgpu.load(plgpu.cluster_ref(o32[w][j], {"s": p}),
                                    layout=plgpu.Layout.WGMMA) for p in range(splits)]
                y = parts[0]
                for part in parts[1:]:
                  y = y + part
                put_finished(stage.at[w], y, local(0))

          _cluster_sync()  # no peer exits while its shared memory is read
          plgpu.commit_smem()
          cols = pl.ds((ni * tiles + local(0)) * tn, tn)
          plgpu.copy_smem_to_gmem(stage.at[wg], out_gmem.at[pl.ds(mi * tm + si * tm_s, tm_s),
                                                            cols])
          return carry
        for p, acc in enumerate(accs):
          o_smem = out_smem.at[wg * wt + p]
          if direct:
            put_finished(o_smem, acc[...], local(p))
          else:
            o_smem[...] = acc[...]
          acc[...] = zeros()
        plgpu.commit_smem()
        for p in range(wt):
          cols = pl.ds((ni * tiles + local(p)) * tn, tn)
          if direct:
            plgpu.copy_smem_to_gmem(out_smem.at[wg * wt + p], out_gmem.at[m_sl, cols])
          else:
            plgpu.copy_smem_to_gmem(out_smem.at[wg * wt + p], out_gmem.at[si, cols, m_sl])
        return carry

      lax.fori_loop(0, groups, output_tiles, None)

    @pl.when((wg < nwg) & is_mm)
    def _consumer():
      if regs:
        plgpu.set_max_registers(consumer_regs, action="increase")
      if has_bias:
        plgpu.barrier_wait(bias_bar)
      if interpret:
        scoped(*[acc_smem.at[wg * wt + p] for p in range(wt)])
      else:
        pl.run_scoped(scoped, *[plgpu.ACC((tn, tm), jnp.float32)] * wt)
      plgpu.wait_smem_to_gmem(0)

  if fx:  # the finished output, and the running sum's workspace; its float32 tiles in
    # column chunks (a TMA copy needs each one dense in shared memory)
    out_type = (jax.ShapeDtypeStruct((m, n), out_dtype),
                jax.ShapeDtypeStruct((n, mp), jnp.float32))
    out_smem = (_out_smem(step_tiles, tm // _FIX_CHUNK, tn, _FIX_CHUNK),
                plgpu.SMEM((step_tiles, tm, tn), out_dtype, transforms=_swz(128)))
  elif cl:
    out_type = jax.ShapeDtypeStruct((m, n), out_dtype)
    out_smem = ([[_out_smem(tn, tm_s) for _ in range(splits)] for _ in range(nwg)],
                plgpu.SMEM((step_tiles, tm_s, tn), out_dtype, transforms=_swz(128)))
  elif direct:
    out_type = jax.ShapeDtypeStruct((m, n), out_dtype)
    out_smem = plgpu.SMEM((step_tiles, tm, tn), out_dtype, transforms=_swz(128))
  else:
    out_type = jax.ShapeDtypeStruct((splits, n, mp), jnp.float32)
    out_smem = _out_smem(step_tiles, tn, tm)
  act_smem = plgpu.SMEM((act_slots, kt, tm, tk), dtype, transforms=_swz(128))
  bufs = (act_smem, out_smem)
  if dec:
    bufs = (*bufs, _decoder_smem(nwg + 1)) if union else (bufs, _decoder_smem(nwg + 1))
  scratch = [
      plgpu.RefUnion(*bufs) if union or (dec and _REGISTER_CONCAT) else bufs,
      plgpu.SMEM((step_tiles, depth, kt, tn, tk), w.codes.dtype, transforms=_CODES_TRANSFORMS),
      plgpu.SMEM((step_tiles, depth, kt, tk // g, tn), w.scales_t.dtype),
      plgpu.SMEM((step_tiles, tn, tm) if interpret else (1,), jnp.float32),
  ]
  if has_bias:
    scratch.append(plgpu.SMEM((tiles, tn), bias.dtype))
  scratch += [plgpu.Barrier(num_arrivals=(0 if ac else kt) + 2 * step_tiles,
                            num_barriers=depth),  # "full"
              plgpu.Barrier(num_arrivals=nwg, num_barriers=act_slots),  # "consumed"
              plgpu.Barrier(num_arrivals=nwg)]  # "drained" (alias_out)
  if has_bias:
    scratch.append(plgpu.Barrier(num_arrivals=tiles))
  if fx:  # each consumer's copies of the running sum's column chunks
    scratch.append(plgpu.Barrier(num_arrivals=wt, num_barriers=nwg * (tm // _FIX_CHUNK)))
  if ac:  # the ring of codes and scales, its "full" barriers; "decoded"
    scratch += [plgpu.SMEM((depth, tm, tk // 2), jnp.uint8,
                           transforms=_ACT_CODES_TRANSFORMS),
                plgpu.SMEM((depth, tm, tk // 16), jnp.float16),
                plgpu.Barrier(num_arrivals=2, num_barriers=depth),
                plgpu.Barrier(num_arrivals=1, num_barriers=act_slots)]
  if dec:  # each decoding warpgroup's slots: codes and scales arrived
    scratch.append(plgpu.Barrier(num_arrivals=2, num_barriers=(nwg + 1) * _DEC_SLOTS))
    out_type = (*(out_type if fx else (out_type,)), jax.ShapeDtypeStruct((m, k), jnp.float16))
  wg_kw = dict(num_threads=nwg + 1, thread_name="wg")  # + the producer
  blocks = {"n": n_blocks, "m": m_blocks}
  names = ("m", "n") if config.n_inner else ("n", "m")  # the last varies fastest
  grid_kw = dict(grid=tuple(blocks[a] for a in names), grid_names=names)
  if cl:  # the splits of an output tile: one cluster
    grid_kw.update(cluster=(splits,), cluster_names=("s",))
  elif dec:
    grid_kw = dict(grid=(dec + n_blocks * m_blocks * splits,), grid_names=("c",))
  else:
    grid_kw.update(grid=(*grid_kw["grid"], splits), grid_names=(*names, "s"))
  call = plgpu.kernel(kernel, out_type=out_type, scratch_types=scratch, **grid_kw, **wg_kw)
  acts = [x, xs, xh] if dec else [x, xs] if ac else [x]
  out = call(*acts, w.codes, w.scales_t, *(scales if direct else ()),
             *([bias] if has_bias else []))
  return out[0] if fx or dec else out


def _check_config(config: MatmulConfig, n: int, k: int, out_itemsize: int = 4) -> None:
  tm, s = config.tile_m, config.k_splits
  if tm % 8 or not 8 <= tm <= 256:
    raise ValueError(f"tile_m={tm} must be a multiple of 8 in [8, 256]")
  if s < 1 or (k // TILE_K) % s:
    raise ValueError(f"k_splits={s} must divide the {k // TILE_K} K steps")
  if config.max_concurrent_steps < 1:
    raise ValueError(f"max_concurrent_steps={config.max_concurrent_steps} must be >= 1")
  if config.k_tiles < 1 or (k // TILE_K // s) % config.k_tiles:
    raise ValueError(f"k_tiles={config.k_tiles} must divide the {k // TILE_K // s} K tiles "
                     f"of a split")
  if config.warpgroups not in (1, 2) or config.tiles_per_cta % config.warpgroups:
    raise ValueError(f"warpgroups={config.warpgroups} must be 1 or 2 and divide "
                     f"tiles_per_cta={config.tiles_per_cta}")
  if config.wg_tiles not in (1, 2) or (config.wg_tiles > 1 and not config.stream) or \
      config.tiles_per_cta % (config.warpgroups * config.wg_tiles):
    raise ValueError(f"wg_tiles={config.wg_tiles} must be 1, or 2 with stream=True, and "
                     f"warpgroups * wg_tiles must divide tiles_per_cta={config.tiles_per_cta}")
  if config.alias_out and not (
      config.stream and config.tiles_per_cta == config.warpgroups * config.wg_tiles):
    raise ValueError(f"alias_out=True needs stream=True and one round of output tiles: "
                     f"tiles_per_cta={config.tiles_per_cta} must equal warpgroups * wg_tiles "
                     f"= {config.warpgroups * config.wg_tiles}")
  if config.cluster_splits and not (config.stream and config.alias_out and
                                    config.wg_tiles == 1 and 2 <= s <= 8 and tm % (32 * s) == 0):
    raise ValueError(f"cluster_splits=True needs stream=True, alias_out=True, wg_tiles=1, "
                     f"k_splits={s} in [2, 8] and tile_m={tm} a multiple of 32 * k_splits")
  if config.act_codes and not (config.stream and tm % 64 == 0 and config.k_tiles == 1 and
                               config.max_concurrent_steps >= 2 and not config.cluster_splits):
    raise ValueError(f"act_codes=True needs stream=True, tile_m={tm} a multiple of 64, "
                     f"k_tiles={config.k_tiles} 1, max_concurrent_steps="
                     f"{config.max_concurrent_steps} >= 2 and cluster_splits=False")
  if config.fixup_splits and not (
      config.stream and s > 1 and tm % _FIX_CHUNK == 0 and not config.cluster_splits and
      config.tiles_per_cta == config.warpgroups * config.wg_tiles):
    raise ValueError(f"fixup_splits=True needs stream=True, k_splits={s} > 1, tile_m={tm} a "
                     f"multiple of {_FIX_CHUNK}, cluster_splits=False and one round of output "
                     f"tiles (tiles_per_cta={config.tiles_per_cta} equal to warpgroups * wg_tiles)")
  if config.decode_ctas < 0 or config.decode_ctas and not (
      config.stream and tm >= _DEC_ROWS and not (config.act_codes or config.cluster_splits)):
    raise ValueError(f"decode_ctas={config.decode_ctas} must be >= 0, and > 0 needs "
                     f"stream=True, tile_m={tm} >= {_DEC_ROWS} and neither act_codes nor "
                     f"cluster_splits")
  if config.tiles_per_cta < 1 or (n // TILE_N) % config.tiles_per_cta:
    raise ValueError(f"tiles_per_cta={config.tiles_per_cta} must divide the {n // TILE_N} "
                     f"weight tiles of {TILE_N} rows")
  if (need := smem_bytes(config, k, out_itemsize)) > SMEM_BYTES:
    fix = ("lower max_concurrent_steps or tile_m (stream_config(out_itemsize=4) for float32 "
           "outputs)" if config.stream else "raise k_splits")
    raise ValueError(f"{config} needs {need} bytes of shared memory for K={k} and "
                     f"{out_itemsize}-byte outputs, more than {SMEM_BYTES}: {fix}")


def fp4_matmul(a, w_codes, w_scales=None, w_tensor_scale=None, *, a_scales=None,
               a_tensor_scale=None, fmt: Fmt = "nvfp4", bias=None,
               epilogue: Epilogue = None, residual=None, gate=None,
               out_dtype=jnp.bfloat16, config: MatmulConfig | None = None,
               method: Method = "auto", interpret: bool = False) -> jax.Array:
  """``epilogue(a @ W.T * scales + bias)`` with 4-bit weights, on a Hopper GPU.

  Args:
    a: ``(M, K)`` bf16/f16/f32 activations (W4A16), or packed NVFP4 uint8 ``(M, K/2)`` (W4A4),
      or W4A4 NVFP4 activations already decoded but for their tensor scale (float16: the
      ``values`` of ``pqjax_kernels.norm.NVFP4Values``, with ``a_tensor_scale``). float16
      activations with NVFP4 weights run the W4A4 kernels (float16 products, exact) and
      pick the method as W4A4 does; bf16/f32 ones are rounded to bf16 for the kernels.
    w_codes: uint8 ``(N, K/2)`` weight codes, or a ``PreparedWeights`` (then ``w_scales``,
      ``w_tensor_scale`` and ``fmt`` are taken from it and must be None / match).
    w_scales: ``(N, K/G)`` block scales (float8_e4m3fn / uint8 E8M0 / float32).
    w_tensor_scale: float32 scalar weight tensor scale.
    a_scales: W4A4: float8_e4m3fn ``(M, K/16)`` activation block scales.
    a_tensor_scale: float32 scalar activation tensor scale (W4A4; optional for float ``a``:
      the output is multiplied by it).
    fmt: weight format, ``"nvfp4"``, ``"mxfp4"`` or ``"int4"``.
    bias: optional ``(N,)``.
    epilogue: None or ``"gelu_tanh"`` (applied after the bias).
    residual: optional ``(M, N)``: ``out = residual + gate * f(a @ W.T + bias)``.
    gate: optional ``(N,)``, ``(M, N)`` or per-sample ``(B, N)`` (rows ``b*T .. b*T+T-1``).
    out_dtype: output dtype.
    config: ``MatmulConfig`` of the kernels; None picks ``auto_config``.
    method: ``"xla"`` (decode + XLA bf16 dot), ``"kernel"`` or ``"auto"``
      (``pick_method``).
    interpret: True when run under JAX's GPU interpreter (it lacks ``layout_cast``).

  Returns:
    ``(M, N)`` array of ``out_dtype``.

  Raises:
    ValueError: shapes off the tiling (K, N multiples of 128), wrong dtypes, bad epilogue
      arguments; raised before anything is launched.
  """
  if isinstance(w_codes, PreparedWeights):
    if w_scales is not None or w_tensor_scale is not None or fmt != w_codes.fmt:
      raise ValueError("with PreparedWeights pass neither w_scales nor w_tensor_scale, and "
                       f"fmt must equal its fmt {w_codes.fmt!r} (got {fmt!r})")
    w = w_codes
  else:
    if w_scales is None or w_tensor_scale is None:
      raise ValueError("w_scales and w_tensor_scale are required with raw w_codes")
    w = prepare_weights(w_codes, w_scales, w_tensor_scale, fmt=fmt)
  n, k = w.shape
  if k % 128 or n % 128:
    raise ValueError(f"K={k} and N={n} must be multiples of 128")
  m = _check_common(a, k, n, a_scales, a_tensor_scale, bias, epilogue, residual, gate)
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")
  packed = a.dtype == jnp.uint8
  # NVFP4 activation values (codes or float16) times NVFP4 weights: the f16 kernels
  w4a4_nvfp4 = w.fmt == "nvfp4" and (packed or a.dtype == jnp.float16)
  method = pick_method(m, n, k, w4a4_nvfp4) if method == "auto" else method
  # The streaming kernel writes bf16/f16 outputs with no gated residual finished itself (its
  # output tile is then 2 bytes per element; the small-M kernel's is float32 regardless).
  # Split K sums float32 partials in XLA first.
  direct = jnp.dtype(out_dtype).itemsize == 2 and residual is None and gate is None
  if method != "xla":
    if config is None:
      config = auto_config(m, n, k, w4a4_nvfp4, 2 if direct else 4,
                           codes=packed and w.fmt == "nvfp4")
      if config.cluster_splits and (interpret or not _REGISTER_CONCAT):
        config = default_config(m, n, k)  # (33-64 rows) no clusters or no streaming
      if config.tile_m == 8 and interpret:  # the interpreter lays activations out (K, M)
        config = dataclasses.replace(config, tile_m=16)
    if not direct:  # float32 or gated outputs: float32 partials for XLA
      config = dataclasses.replace(config, cluster_splits=False, fixup_splits=False)
    direct = direct and (config.k_splits == 1 or config.cluster_splits or config.fixup_splits)
    _check_config(config, n, k, 2 if direct else 4)
    if config.cluster_splits and interpret:
      raise ValueError("cluster_splits=True needs a GPU: the interpreter has no clusters")
    m_major = config.m_major and _REGISTER_CONCAT and not interpret
    if not (config.stream or m_major) and config.tile_m % 16:  # (K, M): 16-element tile rows
      raise ValueError(f"tile_m={config.tile_m} needs m_major=True on a GPU with JAX >= 0.11; "
                       f"activations laid out (K, M) take multiples of 16")
    for name in ("act_codes", "decode_ctas"):
      if getattr(config, name) and not (packed and w.fmt == "nvfp4"):
        raise ValueError(f"{name}={getattr(config, name)} needs W4A4 NVFP4: packed uint8 "
                         f"activations and nvfp4 weights, got a {a.dtype} and fmt={w.fmt!r}")
  out_scale = w.tensor_scale  # (the streaming kernel's direct path multiplies them itself)
  if a_tensor_scale is not None:
    out_scale = out_scale * jnp.asarray(a_tensor_scale, jnp.float32)
  if method == "xla":
    x = (a, a_scales) if a.dtype == jnp.uint8 else a.astype(jnp.float32)
    y = _xla_product(x, w, out_scale, out_dtype)
  else:
    mp = -(-m // config.tile_m) * config.tile_m
    # The streaming kernel on the GPU takes M rows as they are where M is a multiple of 8
    # (its TMA copies read zeros past them; its copies' 8-row tiling misplaces rows of a
    # ragged 8): a pad would be one more pass over float16 activations (18 / 70 us at
    # 4608 x 3072 / 12288, H200). The interpreter's copies clamp instead, and the small-M
    # kernel's address whole tiles.
    pad_rows = interpret or not config.stream or m % 8 != 0
    pad = (lambda v: jnp.pad(v, ((0, mp - m), (0, 0)))) if pad_rows else (lambda v: v)
    if config.act_codes or config.decode_ctas:  # decoded in the kernel (the scales widened
      # here: a 16th the size)
      xp = (pad(a), pad(a_scales.astype(jnp.float16)))
      if config.decode_ctas:  # and each split's first K tiles decoded here
        h, per = _dec_head_tiles(config, k), k // TILE_K // config.k_splits
        xp += (pad(jnp.concatenate([
            dequantize(a[:, lo * TILE_K // 2:(lo + h) * TILE_K // 2],
                       a_scales[:, lo * TILE_K // 16:(lo + h) * TILE_K // 16], 1.0, "nvfp4")
            for lo in range(0, k // TILE_K, per)], axis=1).astype(jnp.float16)),)
    elif packed:
      # q * s_b is exact in f16 (|v| <= 2688, >= 2**-10) and in bf16; the activation
      # tensor scale goes to the output. NVFP4 x NVFP4 runs in f16 (cheaper decode).
      xp = pad(dequantize(a, a_scales, 1.0, "nvfp4").astype(
          jnp.float16 if w.fmt == "nvfp4" else jnp.bfloat16))
    else:
      xp = pad(a if w4a4_nvfp4 else a.astype(jnp.bfloat16))
    if config.stream:
      if not (_REGISTER_CONCAT or interpret):
        raise ValueError("stream=True needs JAX >= 0.11 on the GPU (register concatenate)")
      if direct:
        return _stream_call(xp, w, config, _out_scales(w.tensor_scale, a_tensor_scale),
                            jnp.dtype(out_dtype), interpret, gelu=epilogue == "gelu_tanh",
                            bias=bias)[:m]
      partials = _stream_call(xp, w, config, None, None, interpret)
    else:
      partials = _kernel_call(xp if m_major else xp.T, w, config, interpret, m_major)
    y = jnp.sum(partials, axis=0)[:, :m].T * out_scale
  return _apply_epilogue(y, bias, epilogue, residual, gate, out_dtype)


def weight_bytes(n: int, k: int, fmt: str = "nvfp4") -> int:
  """Bytes the kernel reads for the weights: 4-bit codes plus 16-bit scales."""
  g = GROUP_SIZES.get(fmt, 64)
  return n * k // 2 + 2 * n * k // g


__all__ = ["METHODS", "MatmulConfig", "PreparedWeights", "auto_config", "decode_weights_bf16",
           "default_config", "dequantize", "fitted_tile_m", "fp4_matmul", "pick_method",
           "prefers_stream", "prepare_weights", "reference", "stream_config", "stream_splits",
           "wave_fill", "weight_bytes"]

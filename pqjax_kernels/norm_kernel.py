"""LayerNorm / RMSNorm + adaLN + NVFP4 quantize as one Pallas Mosaic GPU kernel (Hopper).

``norm_quantize(x, perm, kind=..., weight=..., ...)`` computes the same values as
``pqjax_kernels.norm.reference(x, perm, ..., out=..., tensor_scale=ts)`` (``out`` "nvfp4",
"nvfp4_f16" or "bf16"), and with ``kind="none"`` those of ``norm.gathered_quantize``. With
a static tensor scale it makes one pass over HBM: each CTA (one warpgroup) copies a block of
``rows`` full rows into shared memory with one bulk copy, then makes up to three passes over
it in column chunks: the row sums (mean), the centred sums of squares (variance, the same
two-pass formula as the reference), and the output pass (normalize, affine, adaLN, optional
block Hadamard, quantize, pack or decode). A dynamic tensor scale takes two launches: the
first writes the amax of the result per row and chunk and the row statistics, the second
reuses those statistics and quantizes with the scale XLA reduces from the amax.

Parts: ``x`` may be a tuple of arrays, the parts of one along its last axis (FLUX single
blocks' attention output and MLP activations, which ``proj_out`` reads concatenated), for the
plain quantize in order. The kernel then quantizes the rows of at most ``PART_ROW`` that the
parts' rows cut into, each CTA copying its rows one by one from the part holding them, so that
no pass writes the concatenation (H200, 4608 x (3072 + 12288): 114.9 us against 73.1 for
XLA's concatenation and 108.2 for the quantize after it; NOTES_kernels.md version 31).

Register layout: the ``(rows, D)`` block is viewed as ``(rows, D/16, 8, 2)`` (row, 16-wide
group, pair, element), each thread holding one pair (a 2-vector) of a group per register, a
warp 64 consecutive columns of one row (see ``_LAYOUT``). The two 4-bit codes of an output
byte thus lie in one register: packing is ``sum(code << 4 * element, axis=3)``, a reduction
along the vector dimension, and the byte array ``(rows, D/16, 8)`` is the packed
``(rows, D/2)`` codes in row-major order. Row sums accumulate elementwise over the chunks
and reduce across lanes (shuffles) once; a group's amax reduces across its 8 lanes and then
sits in the same register of each of them. The E4M3 block scale (some 40 instructions) is
computed once per group: lane p of the 8 takes register p (``_pick_groups``) and index
shuffles bring the results back (``_join_groups``).

Gather (``perm``): the statistics are permutation-invariant, so only the output pass
gathers; the affine/adaLN vectors are gathered outside (they are small). On the GPU each
thread loads its elements from the shared-memory row block at the column indices read from
``perm`` (also in shared memory), in inline Mosaic GPU (``_gather_registers``): Pallas has no
lane gather. Under the interpreter the same step is a ``jnp.take``. A two-byte output
(bf16, float16 values) of a two-byte x is staged in place over x, except with a gather;
``perm`` is staged as int16 where D allows.

Arithmetic: every elementwise operation is the reference's, in the same order and precision
(float32; the E4M3 block scale and E2M1 codes by ``norm``'s own comparisons with rounded
products, which ``pqjax.formats`` makes too; the block Hadamard as ``norm.walsh_hadamard``'s
butterfly: the first stage inside a thread's register pair, the other three across lanes by
``shfl.bfly``), with the multiply-adds of the affine/adaLN contracted into FMAs as XLA (CPU
and GPU) and Mosaic GPU both do, so codes and scales equal those of ``jax.jit(norm.reference)``
bit for bit whenever the row statistics do. The statistics are float32 sums in another order
than XLA's (and the GPU's ``rsqrt`` may differ from the CPU's), so on general data a value
within rounding of an E2M1/E4M3 boundary, or of a bf16 rounding midpoint, can differ; the
tests check exact equality on data whose sums are exact, and a tolerance otherwise.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu

from pqjax_kernels import norm
from pqjax_kernels.matmul_fp4 import _layout_cast  # noqa: PLC2701 (one helper for both kernels)

ROW_CHOICES = (4, 8, 16)  # rows per CTA (one row of each 4 per warp)
CHUNK = 64  # columns per register chunk: 4 groups of 16 across the lanes of a warp
CHUNK_CHOICES = (64, 128, 256, 512)  # wider chunks: more independent registers per thread
# Mosaic GPU's layout inference (JAX 0.11.2) raises IndexError on the (rows, 32)-group scale
# store of a 512-column chunk with more than 4 rows.
_CHUNK_512_MAX_ROWS = 4
SMEM_BYTES = 220 * 1024  # shared memory the kernel may use (H100/H200: 227 KiB per CTA)
# perm is staged as int16 where D allows it (half the shared memory of int32: at D = 12288
# a gathered 4-row block with float16 values out fits, 216 KiB)
_PERM16_MAX_D = 2**15

# (rows, groups, 8, 2) = (row, 16-wide group, pair, element): warp w holds rows w, w + 4, ...;
# lane 8g + p holds pair p of group g (of every 4 consecutive groups); a pair is one
# 2-vector. A warp's 32 lanes thus read 64 consecutive columns of one row (no bank conflicts,
# which Mosaic GPU refuses to emit), the two codes of a byte share a register, and a group's
# amax is a 3-step shuffle across 8 lanes.
_LAYOUT = plgpu.Layout.TILED(plgpu.Tiling(((4, 4, 8, 2),)), warp_dims=(-4,),
                             lane_dims=(-3, -2), vector_dim=-1)
_VEC_LAYOUT = _LAYOUT.reduce(0)  # (groups, 8, 2): a per-column vector, shared by all rows
_OutKind = Literal["bf16", "nvfp4", "nvfp4_f16"]
_TWO_BYTE_OUTS = {"bf16": jnp.bfloat16, "nvfp4_f16": jnp.float16}  # out -> its dtype
KernelKind = Literal["layer", "rms", "none"]


# Fastest first (H200, benchmarks/NOTES_kernels.md, version 6): at D = 3072 blocks of 4 rows
# (98.8 us against 106.7 for 8), at D = 1152 blocks of 8 (18.6 against 19.8).
_ROW_PREFERENCE = {True: (4, 8, 16), False: (8, 4, 16)}  # key: D >= _WIDE
_WIDE = 2048


def _chunk_allows_rows(chunk: int, rows: int) -> bool:
  """Whether a ``chunk``-column chunk lowers with ``rows``-row blocks (``_CHUNK_512_MAX_ROWS``)."""
  return chunk < 512 or rows <= _CHUNK_512_MAX_ROWS


def default_chunk(d: int, rows: int = min(ROW_CHOICES)) -> int:
  """The widest chunk dividing ``d`` (that ``rows`` allows): wider chunks give each thread
  more independent loads and arithmetic, and with 512 columns each lane computes one group's
  block scale instead of two lanes the same one (H200, 2 x 4608 x 3072 gathered, 4-row
  blocks: 76.6 / 65.5 us at 256 / 512; version 6: 151 / 116 / 94 us at 64 / 128 / 256)."""
  fits = [c for c in CHUNK_CHOICES if d % c == 0 and _chunk_allows_rows(c, rows)]
  return max(fits, default=CHUNK)


def _perm_dtype(d: int):
  return jnp.int16 if d <= _PERM16_MAX_D else jnp.int32


def _smem_bytes(x, perm, out: str, n_vec: int, rows: int) -> float:
  d = x.shape[-1]
  in_place = _in_place(x.dtype, out, perm)
  out_bytes = 0 if in_place else 2 if out in _TWO_BYTE_OUTS else 9 / 16
  perm_bytes = 0 if perm is None else d * jnp.dtype(_perm_dtype(d)).itemsize
  return rows * d * (x.dtype.itemsize + out_bytes) + n_vec * d * 4 + perm_bytes


def default_rows(x, perm=None, *, out: str = "nvfp4", n_vec: int = 0) -> int:
  """Rows per CTA: the fastest block height whose shared memory fits (else the smallest).

  Small blocks let several CTAs share an SM, so that one's copy overlaps another's
  arithmetic; per-sample adaLN vectors also need T to be a multiple of it.
  """
  for rows in _ROW_PREFERENCE[x.shape[-1] >= _WIDE]:
    if _smem_bytes(x, perm, out, n_vec, rows) <= SMEM_BYTES:
      return rows
  return min(ROW_CHOICES)


def accepts(x, perm=None, *, kind: str = "layer", weight=None, bias=None, shift=None,
            scale=None, out: str = "nvfp4", hadamard: bool = False, rows: int | None = None,
            chunk: int | None = None) -> bool:
  """Whether ``norm_quantize`` takes these arguments (the checks it raises from, as a test)."""
  try:
    if isinstance(x, (tuple, list)):
      x = _as_rows(x, perm, kind)[0]
    _check(x, perm, kind, weight, bias, shift, scale, out,
           *_resolve(x, perm, out, (weight, bias, shift, scale), rows, chunk), hadamard)
  except ValueError:
    return False
  return True


def _resolve(x, perm, out: str, vecs, rows: int | None, chunk: int | None):
  """``rows`` and ``chunk``, with None replaced by the defaults (left None for a non-array
  ``x``: ``_check`` then names it)."""
  if hasattr(x, "shape") and hasattr(x, "dtype"):
    rows = default_rows(x, perm, out=out, n_vec=_n_vec(*vecs)) if rows is None else rows
    chunk = default_chunk(x.shape[-1], rows) if chunk is None else chunk
  return rows, chunk


def _n_vec(*vs) -> int:
  return sum(v is not None for v in vs)


def _check(x, perm, kind, weight, bias, shift, scale, out, rows, chunk,
           hadamard=False) -> None:
  if kind == "none":  # plain quantize: nothing to normalize or fold
    if any(v is not None for v in (weight, bias, shift, scale)) or out not in norm.QUANTIZED:
      raise ValueError("kind='none' (plain quantize) takes no weight/bias/shift/scale and "
                       "needs out='nvfp4' or 'nvfp4_f16'")
  norm.check_inputs(x, perm, kind="rms" if kind == "none" else kind, weight=weight, bias=bias,
                    shift=shift, scale=scale, out=out, hadamard=hadamard)
  d = x.shape[-1]
  if chunk not in CHUNK_CHOICES:
    raise ValueError(f"chunk must be one of {CHUNK_CHOICES}, got {chunk}")
  if d % chunk:
    raise ValueError(f"the last axis of x ({d}) must be a multiple of {chunk} (chunk)")
  if rows not in ROW_CHOICES:
    raise ValueError(f"rows must be one of {ROW_CHOICES}, got {rows}")
  if not _chunk_allows_rows(chunk, rows):
    raise ValueError(f"chunk=512 needs rows <= {_CHUNK_512_MAX_ROWS}, got rows={rows}")
  for name, v in (("shift", shift), ("scale", scale)):
    if v is None or v.size == d:
      continue
    if not _per_sample(v, x):
      raise ValueError(f"{name} must be (D,) or per-sample (B, D) for the kernel, got shape "
                       f"{v.shape} for x of shape {x.shape}")
    if x.shape[1] % rows:
      raise ValueError(f"per-sample {name} needs T={x.shape[1]} to be a multiple of "
                       f"rows={rows}")
  smem = _smem_bytes(x, perm, out, _n_vec(weight, bias, shift, scale), rows)
  if smem > SMEM_BYTES:
    raise ValueError(f"x of shape {x.shape} and dtype {x.dtype} needs {smem:.0f} bytes of "
                     f"shared memory per CTA with rows={rows}, more than {SMEM_BYTES}")


def _as_rows(parts, perm, kind: str):
  """Checks a concatenation ``x = (x_1, x_2, ...)``; returns the shape and dtype of the rows
  the kernel quantizes (``_sub_rows``') and of the concatenation."""
  if kind != "none" or perm is not None:
    raise ValueError(f"x as parts (a concatenation) needs kind='none' and perm=None, got "
                     f"kind={kind!r}, perm {'given' if perm is not None else None}")
  if not parts or not all(hasattr(p, "shape") and hasattr(p, "dtype") for p in parts):
    raise ValueError(f"x as parts must be a non-empty sequence of arrays, got {parts!r}")
  shapes = [tuple(p.shape) for p in parts]
  if len({(s[:-1], jnp.dtype(p.dtype)) for s, p in zip(shapes, parts)}) != 1:
    raise ValueError(f"the parts of x must share their leading shape and dtype, got shapes "
                     f"{shapes} and dtypes {[str(p.dtype) for p in parts]}")
  d_row = _parts_row(parts)
  if not d_row:
    raise ValueError(f"the parts' last axes {[s[-1] for s in shapes]} must all be multiples "
                     f"of {CHUNK}")
  width = sum(s[-1] for s in shapes)
  rows = jax.ShapeDtypeStruct((math.prod(shapes[0][:-1]) * width // d_row, d_row),
                              parts[0].dtype)
  return rows, (*shapes[0][:-1], width)


def _in_place(dtype, out: str, perm) -> bool:
  """A two-byte output of a two-byte input overwrites the shared-memory copy of x (saves its
  size; stored bitcast to x's dtype), except with a gather, which reads all of x to the
  end."""
  return out in _TWO_BYTE_OUTS and jnp.dtype(dtype).itemsize == 2 and perm is None


def _per_sample(v, x) -> bool:
  return v is not None and x.ndim == 3 and tuple(v.shape) == (x.shape[0], x.shape[-1])


def _vectors(x, weight, bias, shift, scale):
  """Stacks the present vectors as float32 ``(B, n, D)`` (B = 1 unless one is per-sample) in
  the order the kernel applies them (weight, bias, 1 + scale, shift); returns it (or None)
  and which are present."""
  b = x.shape[0] if _per_sample(shift, x) or _per_sample(scale, x) else 1
  d = x.shape[-1]
  rows = []
  for v, per_sample_op in ((weight, None), (bias, None), (scale, lambda s: 1.0 + s),
                           (shift, None)):
    if v is None:
      continue
    v = v.astype(jnp.float32)
    if per_sample_op is not None:  # the reference adds 1 in float32, so does this
      v = per_sample_op(v)
    rows.append(jnp.broadcast_to(v.reshape(-1, d), (b, d)))
  flags = tuple(v is not None for v in (weight, bias, scale, shift))
  return (jnp.stack(rows, axis=1) if rows else None), flags


def _bcast(v, shape, dims, interpret):
  return _layout_cast(interpret)(lax.broadcast_in_dim(v, shape, dims), _LAYOUT)


def _row_sum(v):
  return jnp.sum(jnp.sum(jnp.sum(v, axis=3), axis=2), axis=1)


def _quantize_chunk(y, params, interpret: bool, values: bool = False):
  """NVFP4 of a ``(ROWS, g, 8, 2)`` float32 chunk: packed int32 bytes ``(ROWS, g, 8)`` and
  E4M3 scales ``(ROWS, g)``, with ``norm.quantize_nvfp4``'s arithmetic (its functions,
  run on the chunk); with ``values``, instead the float16 ``(ROWS, g, 8, 2)`` values they
  decode to (as ``norm.nvfp4_values`` decodes them). ``params`` holds ``(s_t, fl(6 s_t),
  fl(1 / fl(6 s_t)))``."""
  shape = y.shape
  s_t, d, inv_d = params[0], params[1], params[2]
  amax = _group_amax(jnp.abs(y), interpret)  # the same |y| as e2m1_codes': computed once
  if interpret:
    s_b = norm.e4m3_block_scale(amax, d, inv_d)
  else:  # once per group instead of on each of the 8 lanes holding it (see _split_groups)
    layout = _split_groups(amax.shape)
    s_b = _join_groups(amax.shape, layout)(
        norm.e4m3_block_scale(_pick_groups(layout)(amax), d, inv_d))
  # Per-group thresholds broadcast to the elements: |y| is compared with them directly.
  thresholds = [(_bcast(t, shape, (0, 1), interpret), up)
                for t, up in norm.e2m1_thresholds(s_b * s_t)]
  codes = norm.e2m1_codes(y, thresholds)
  if values:  # exact products: the E2M1 value (<= 2 bits) times the E4M3 scale (<= 4)
    return (norm.e2m1_values(codes) * _bcast(s_b, shape, (0, 1), interpret)).astype(
        jnp.float16)
  # Element 2i in the low nibble: shift each pair's second code by 4 and add the pair.
  shift = _layout_cast(interpret)(lax.broadcasted_iota(jnp.int32, shape, 3), _LAYOUT) * 4
  packed = jnp.sum(codes << shift, axis=3)
  return packed, s_b.astype(jnp.float8_e4m3fn)  # exact: s_b is an E4M3 value


# The group amax of a chunk, reduced over (pair, element), lies in this layout: every value
# on the 8 lanes 8g + p (p = 0..7) that held the group's pairs, in the same registers.
_GROUP_LAYOUT = _LAYOUT.reduce(3).reduce(2)
_ROW_LAYOUT = _GROUP_LAYOUT.reduce(1)  # a per-row value (row statistics)


def _group_amax(a, interpret: bool):
  """The maximum over each 16-group of a ``(ROWS, g, 8, 2)`` float32 chunk ``a = |y|``, in
  ``_GROUP_LAYOUT``. On the GPU (inline Mosaic GPU): the pair's maximum, then ``shfl.bfly``
  1, 2, 4 across the group's 8 lanes, the same NaN-propagating maximum as ``jnp.max``, whose
  lowering also starts each reduction from -inf (one more maximum per register and level)."""
  if interpret:
    return jnp.max(jnp.max(a, axis=3), axis=2)

  def body(_, v):
    from jax._src.lib.mlir import ir  # noqa: PLC0415 (MLIR only exists while lowering)
    from jax._src.lib.mlir.dialects import arith, vector  # noqa: PLC0415
    from jax.experimental.mosaic import gpu as mgpu  # noqa: PLC0415
    group_layout = _GROUP_LAYOUT.to_mgpu()
    out = np.empty(group_layout.registers_shape(v.shape[:2]), dtype=object)
    for idx, reg in np.ndenumerate(v.registers):  # register dims: (row, group, 1, ...)
      m = arith.maximumf(*(vector.extract(reg, dynamic_position=[],
                                          static_position=ir.DenseI64ArrayAttr.get([i]))
                           for i in (0, 1)))
      for dist in (1, 2, 4):
        m = arith.maximumf(m, mgpu.utils.shfl_bfly(m, dist))
      out[idx[:2] + (0,) * (out.ndim - 2)] = _like_group_register(m)
    return mgpu.FragmentedArray(_registers=out, _layout=group_layout, _is_signed=None)
  return plgpu.inline_mgpu(arg_types=(_LAYOUT,), return_type=plgpu.ShapeDtypeStruct(
      a.shape[:2], jnp.float32, _GROUP_LAYOUT))(body)(a)


def _split_groups(group_shape):
  """The layout of a chunk's per-group work spread over the lanes: lane p of each 8 takes
  the registers p, p + 8, ... of the (identical) group registers, as a ``(128 * n,)`` array
  of n per lane (only elementwise operations touch it, so which group lands where does not
  matter)."""
  per_lane = max(1, int(np.prod(group_shape)) // 128)
  return plgpu.Layout.WG_STRIDED((128 * per_lane,), vec_size=per_lane)


def _pick_groups(layout):
  """Mosaic GPU (inline): group registers in ``_GROUP_LAYOUT`` -> this lane's share."""
  def pick(_, amax):
    from jax._src.lib.mlir import ir  # noqa: PLC0415 (MLIR only exists while lowering)
    from jax._src.lib.mlir.dialects import arith, gpu, vector  # noqa: PLC0415
    from jax.experimental.mosaic import gpu as mgpu  # noqa: PLC0415
    i32 = ir.IntegerType.get_signless(32)
    p = arith.andi(arith.index_cast(i32, gpu.thread_id(gpu.Dimension.x)), mgpu.c(7, i32))
    regs = [_scalar(r) for r in amax.registers.flat]
    is_p = [arith.cmpi(arith.CmpIPredicate.eq, p, mgpu.c(j, i32)) for j in range(8)]
    mine = []
    for i in range(layout.to_mgpu().vec_size):
      v = regs[(8 * i) % len(regs)]
      for j in range(1, 8):
        v = arith.select(is_p[j], regs[(8 * i + j) % len(regs)], v)
      mine.append(v)
    reg = vector.from_elements(ir.VectorType.get((len(mine),), mine[0].type), mine)
    return mgpu.FragmentedArray(_registers=np.array([reg], dtype=object),
                                _layout=layout.to_mgpu(), _is_signed=None)
  return plgpu.inline_mgpu(arg_types=(_GROUP_LAYOUT,), return_type=plgpu.ShapeDtypeStruct(
      (128 * layout.to_mgpu().vec_size,), jnp.float32, layout))(pick)


def _join_groups(group_shape, layout):
  """Mosaic GPU (inline): the inverse of ``_pick_groups``: group register j from lane
  ``j % 8`` of the same 8 (``shfl.sync.idx``), its share's element ``j // 8``."""
  def join(_, mine):
    from jax._src.lib.mlir import ir  # noqa: PLC0415
    from jax._src.lib.mlir.dialects import arith, gpu, nvvm, vector  # noqa: PLC0415
    from jax.experimental.mosaic import gpu as mgpu  # noqa: PLC0415
    i32, f32 = ir.IntegerType.get_signless(32), ir.F32Type.get()
    lane = arith.index_cast(i32, gpu.thread_id(gpu.Dimension.x))
    base = arith.andi(lane, mgpu.c(24, i32))  # the first of this lane's 8, within the warp
    # The builder takes the result type first before jaxlib 0.11, infers it after.
    infers_type = next(iter(inspect.signature(nvvm.shfl_sync).parameters)) == "thread_mask"
    group_layout = _GROUP_LAYOUT.to_mgpu()
    [reg] = mine.registers.flat
    out = np.empty(group_layout.registers_shape(group_shape), dtype=object)
    for j, idx in enumerate(np.ndindex(out.shape)):
      v = vector.extract(reg, dynamic_position=[], static_position=ir.DenseI64ArrayAttr.get(
          [j // 8]))
      src = arith.ori(base, mgpu.c(j % 8, i32))
      args = (mgpu.c(0xFFFFFFFF, i32), arith.bitcast(i32, v), src, mgpu.c(0x1F, i32),
              nvvm.ShflKind.idx)
      got = nvvm.shfl_sync(*args) if infers_type else nvvm.shfl_sync(i32, *args)
      out[idx] = _like_group_register(arith.bitcast(f32, got))
    return mgpu.FragmentedArray(_registers=out, _layout=group_layout, _is_signed=None)
  return plgpu.inline_mgpu(arg_types=(layout,), return_type=plgpu.ShapeDtypeStruct(
      group_shape, jnp.float32, _GROUP_LAYOUT))(join)


def _scalar(reg):
  """A float32 register of a group array (a scalar or a 1-vector) as a scalar."""
  from jax._src.lib.mlir import ir  # noqa: PLC0415
  from jax._src.lib.mlir.dialects import vector  # noqa: PLC0415
  if isinstance(reg.type, ir.VectorType):
    return vector.extract(reg, dynamic_position=[], static_position=ir.DenseI64ArrayAttr.get(
        [0] * reg.type.rank))
  return reg


def _like_group_register(v):
  """A float32 scalar as a register of ``_GROUP_LAYOUT`` (a 1-vector)."""
  from jax._src.lib.mlir import ir  # noqa: PLC0415
  from jax._src.lib.mlir.dialects import vector  # noqa: PLC0415
  return vector.from_elements(ir.VectorType.get((1,), v.type), [v])


def _hadamard_registers(y):
  """Mosaic GPU: ``norm.walsh_hadamard(., 16)`` of a float32 ``(ROWS, g, 8, 2)``
  ``FragmentedArray`` in ``_LAYOUT``: bit 0 of the in-group index is the element of a
  register pair, bits 1-3 the lane bits 0-2 (lane 8g + p holds pair p), so the first stage
  stays in the register and the others exchange with ``shfl.bfly`` 1, 2, 4 (the lane whose
  bit is set keeps the difference ``partner - own``, the other the sum)."""
  from jax._src.lib.mlir import ir  # noqa: PLC0415 (MLIR only exists while lowering)
  from jax._src.lib.mlir.dialects import arith, gpu, vector  # noqa: PLC0415
  from jax.experimental.mosaic import gpu as mgpu  # noqa: PLC0415
  i32 = ir.IntegerType.get_signless(32)
  lane = arith.index_cast(i32, gpu.thread_id(gpu.Dimension.x))
  at = lambda i: ir.DenseI64ArrayAttr.get([i])  # noqa: E731
  # Per stage, whether this lane holds the upper element (its lane bit is set).
  upper = {dist: arith.cmpi(arith.CmpIPredicate.ne, arith.andi(lane, mgpu.c(dist, i32)),
                            mgpu.c(0, i32)) for dist in (1, 2, 4)}
  out = np.empty_like(y.registers)
  for idx, reg in np.ndenumerate(y.registers):
    a, b = (vector.extract(reg, dynamic_position=[], static_position=at(i)) for i in (0, 1))
    pair = vector.from_elements(reg.type, [arith.addf(a, b), arith.subf(a, b)])
    for dist, is_upper in upper.items():
      other = mgpu.utils.shfl_bfly(pair, dist)
      pair = arith.select(is_upper, arith.subf(other, pair), arith.addf(pair, other))
    out[idx] = pair
  return mgpu.FragmentedArray(_registers=out, _layout=y.layout, _is_signed=None)


def _hadamard_chunk(y, interpret: bool):
  """``norm.block_hadamard`` of a ``(ROWS, g, 8, 2)`` float32 chunk (16-groups along g)."""
  if interpret:  # the interpreter runs jnp
    return norm.block_hadamard(y.reshape(y.shape[0], -1)).reshape(y.shape)
  butterfly = plgpu.inline_mgpu(
      arg_types=(_LAYOUT,),
      return_type=plgpu.ShapeDtypeStruct(y.shape, jnp.float32, _LAYOUT))(
          lambda _, v: _hadamard_registers(v))
  return butterfly(y) * jnp.float32(0.25)


def _gather_registers(x_ref, perm_ref, rows: int, gc: int):
  """Mosaic GPU: ``x_ref[:, perm_ref]`` (SMEM ``(ROWS, D)`` and ``(gc * 16,)`` int16 or
  int32) as a ``(ROWS, gc, 8, 2)`` ``FragmentedArray`` in ``_LAYOUT``: per element one
  shared-memory load of its column index (shared by a thread's rows) and one of the
  value."""
  from jax._src.lib.mlir import ir  # noqa: PLC0415 (MLIR only exists while lowering)
  from jax._src.lib.mlir.dialects import arith, memref, vector  # noqa: PLC0415
  from jax.experimental.mosaic import gpu as mgpu  # noqa: PLC0415
  index = ir.IndexType.get()
  layout = _LAYOUT.to_mgpu()
  shape = (rows, gc, 8, 2)
  elem_ty = ir.MemRefType(x_ref.type).element_type
  vec_ty = ir.VectorType.get((2,), elem_ty)
  regs = np.empty(layout.registers_shape(shape), dtype=object)
  cols: dict = {}
  for reg_idx, (row, g, p, _) in zip(np.ndindex(regs.shape), layout.thread_idxs(shape)):
    key = reg_idx[1:]  # register dim 0 walks the rows: the column indices repeat
    if key not in cols:
      first = arith.addi(arith.muli(g, mgpu.c(16, index)), arith.muli(p, mgpu.c(2, index)))
      cols[key] = [arith.index_cast(index, memref.load(
          perm_ref, [arith.addi(first, mgpu.c(k, index))])) for k in range(2)]
    regs[reg_idx] = vector.from_elements(
        vec_ty, [memref.load(x_ref, [row, col]) for col in cols[key]])
  return mgpu.FragmentedArray(_registers=regs, _layout=layout, _is_signed=None)


# The gather's shared-memory loads (``_gather_registers``, ``_LAYOUT``): one warp instruction
# per 64-column slab s and element e reads output columns 64 s + 16 g + 2 p + e (g = 0..3,
# p = 0..7: lane 8 g + p) of one row; a two-byte source column c lies in bank (c // 2) % 32
# (rows start on 128-byte lines), and each bank serves one 32-bit word per wavefront.
_SLAB, _BANKS = 64, 32


def gather_wavefronts(perm) -> np.ndarray:
  """Shared-memory wavefronts of each of the gather's load instructions for ``perm`` (two-byte
  ``x``): ``(D / 64, 2)`` per slab and element, the most distinct 32-bit words any one bank
  serves (1: conflict-free; a random ``perm`` averages ~3.5)."""
  words = np.asarray(perm).reshape(-1, 4, 8, 2) // 2  # slab, group, pair, element
  out = np.zeros((words.shape[0], 2), np.int64)
  for s, e in np.ndindex(out.shape):
    distinct = np.unique(words[s, :, :, e])
    out[s, e] = np.bincount(distinct % _BANKS, minlength=_BANKS).max()
  return out


def bank_friendly_perm(perm, *, seed: int = 0, steps_per_group: int = 1500) -> np.ndarray:
  """``perm`` with its 16-groups (as sets) reordered, and the columns inside each, so that
  the gather's loads hit fewer bank conflicts (``gather_wavefronts``).

  A site quantized in groups of 16 (NVFP4) may reorder its groups and the channels inside
  each freely: the groups, hence every code and scale, stay the same, and the consumers'
  weight rows follow the same order (larger groups would be split: not for them). Groups
  are dealt to 64-column slabs by simulated annealing of group swaps (cost: the squared
  columns per bank beyond two, what a slab's two load instructions can take conflict-free),
  then each slab's columns are split between its two instructions, eight per group each, by
  swaps inside a group while they lower the squared distinct words per bank beyond one. A
  random ``perm`` at D = 3072 goes from 3.46 to 2.01 wavefronts per load (few slabs can hold
  every bank at most twice). Deterministic for a ``seed``; ~3 s at D = 3072 (pure NumPy /
  Python).
  """
  perm = np.asarray(perm)
  d = perm.shape[0]
  if d % _SLAB:
    raise ValueError(f"perm length {d} must be a multiple of {_SLAB}")
  groups = perm.reshape(-1, norm.GROUP)
  slots = _deal_groups(groups, np.random.default_rng(seed), steps_per_group)
  return np.concatenate([_split_slab(groups[slab]) for slab in slots]).astype(perm.dtype)


def _deal_groups(groups: np.ndarray, rng, steps_per_group: int) -> np.ndarray:
  """Simulated annealing of 16-groups over 64-column slabs: ``(slabs, 4)`` group indices."""
  hist = np.stack([np.bincount(g // 2 % _BANKS, minlength=_BANKS) for g in groups])
  slots = np.arange(groups.shape[0]).reshape(-1, 4)
  n_slabs = slots.shape[0]
  if n_slabs == 1:
    return slots
  cost = lambda h: int((np.maximum(h - 2, 0) ** 2).sum())  # noqa: E731
  slab_hist = hist[slots].sum(axis=1)
  slab_cost = [cost(h) for h in slab_hist]
  steps = steps_per_group * groups.shape[0]
  a_s, b_s = rng.integers(n_slabs, size=(2, steps))
  i_s, j_s = rng.integers(4, size=(2, steps))
  accept = rng.random(steps)
  for t in range(steps):
    a, b = a_s[t], b_s[t]
    if a == b:
      continue
    ga, gb = slots[a, i_s[t]], slots[b, j_s[t]]
    new_a, new_b = slab_hist[a] - hist[ga] + hist[gb], slab_hist[b] - hist[gb] + hist[ga]
    ca, cb = cost(new_a), cost(new_b)
    delta = ca + cb - slab_cost[a] - slab_cost[b]
    temperature = 2.0 * (1 - t / steps) + 1e-3
    if delta <= 0 or accept[t] < math.exp(-delta / temperature):
      slots[a, i_s[t]], slots[b, j_s[t]] = gb, ga
      slab_hist[a], slab_hist[b] = new_a, new_b
      slab_cost[a], slab_cost[b] = ca, cb
  return slots


def _split_slab(cols: np.ndarray) -> np.ndarray:
  """A slab's ``(4, 16)`` group columns laid out as its output columns (group, pair,
  element): element e of the pairs is load instruction e; eight columns of each group per
  instruction, swapped between them while the squared distinct words per bank beyond one
  (per instruction) go down."""
  words = cols // 2
  elem = np.tile(np.repeat([0, 1], 8), (4, 1))  # the instruction of each column: 8 + 8

  def cost(el):
    total = 0
    for e in (0, 1):
      h = np.bincount(np.unique(words[el == e]) % _BANKS, minlength=_BANKS)
      total += int((np.maximum(h - 1, 0) ** 2).sum())
    return total

  best, improved = cost(elem), True
  while improved:
    improved = False
    for g, k0, k1 in itertools.product(range(4), range(16), range(16)):
      if elem[g, k0] == 0 and elem[g, k1] == 1:
        elem[g, k0], elem[g, k1] = 1, 0
        c = cost(elem)
        if c < best:
          best, improved = c, True
        else:
          elem[g, k0], elem[g, k1] = 0, 1
  return np.stack([np.stack([cols[g][elem[g] == 0], cols[g][elem[g] == 1]], axis=-1)
                   for g in range(4)]).reshape(-1)


# Parts (``norm_quantize`` of a concatenation): each part's rows are cut into sub-rows of at
# most this width, the shared memory of a D = 3072 row block (several CTAs per SM).
PART_ROW = 3072


def _sub_rows(parts, d_row: int):
  """The parts ``(..., d_p)`` as ``(M * d_p / d_row, d_row)`` arrays and each one's sub-rows
  per row: row ``i`` of the concatenation is sub-rows ``i * S .. i * S + S - 1`` of the
  ``(M * S, d_row)`` array they make (``S`` the sum)."""
  return ([p.reshape(-1, d_row) for p in parts],
          tuple(p.shape[-1] // d_row for p in parts))


def _parts_row(parts) -> int:
  """The sub-row width of ``parts``: the largest multiple of ``CHUNK`` dividing every part's
  width, at most ``PART_ROW`` (0 where none does)."""
  g = math.gcd(*(p.shape[-1] for p in parts))
  return max((w for w in range(CHUNK, min(g, PART_ROW) + 1, CHUNK) if g % w == 0), default=0)


def _copy_sub_rows(x_gmems, subs, blk, rows: int, m_true: int, x_smem, bar, copy) -> None:
  """Copies the CTA's ``rows`` sub-rows of the parts' concatenation (``_sub_rows``) into
  ``x_smem``, one copy each from the part holding it; rows past ``m_true`` (padding) copy
  the last one instead, so that every CTA's barrier sees ``rows`` copies."""
  s = sum(subs)
  starts = tuple(itertools.accumulate((0, *subs[:-1])))
  for b in range(rows):
    r = jnp.minimum(blk * rows + b, m_true - 1)
    i, j = r // s, r % s
    for gmem, start, n in zip(x_gmems, starts, subs):
      @pl.when((j >= start) & (j < start + n))
      def _(gmem=gmem, start=start, n=n, b=b):
        plgpu.copy_gmem_to_smem(gmem.at[i * n + j - start], x_smem.at[b], bar, **copy)


def _kernel_call(x2, vecs, params, stats=None, *, perm, kind: str, flags, eps: float, out: str,
                 t: int, rows: int, chunk: int, hadamard: bool, round_to, interpret: bool,
                 parts=None):
  """Runs the kernel on ``x2 (M, D)`` (M a multiple of ``rows``); returns its outputs
  (row-major, in the kernel's array shapes). ``out="amax"``: instead of codes and scales
  (dynamic scale), one float32 row per CTA holding the amax of the result per row and chunk
  (chunk-major, ``D/chunk * rows``), then the row means and reciprocal standard deviations
  (``rows`` each), which a later call takes as ``stats`` instead of computing them again.
  With ``parts`` (``_sub_rows``' arrays and sub-rows per row), ``x2`` only gives the shape
  and dtype of the rows they make (``_copy_sub_rows``)."""
  m, d = x2.shape
  groups, gc = d // 16, chunk // 16
  n_chunks = d // chunk
  n_vec = 0 if vecs is None else vecs.shape[1]
  lc = _layout_cast(interpret)
  rows_shape = (rows, gc, 8, 2)
  # Each operand has a flat shape (GMEM copies need 16-byte aligned pitches and contiguous
  # rows: the kernel reshapes its shared-memory copy) and a grouped view
  # (row, group, pair, element). The interpreter cannot reshape refs, so there the arrays
  # arrive grouped.
  grouped = lambda flat, view: view if interpret else flat  # noqa: E731
  view = (lambda ref, _: ref) if interpret else (lambda ref, shape: ref.reshape(*shape))
  copy = dict(oob_mode=plgpu.OOBFillMode.PROMISE_IN_BOUNDS)
  in_place = _in_place(x2.dtype, out, perm)
  # two-byte outputs staged (and written) in x's dtype when in place, bitcast back by XLA
  stage_dtype = x2.dtype if in_place else _TWO_BYTE_OUTS.get(out)

  x_arrays, subs = ([x2], None) if parts is None else parts

  def kernel(*refs):
    it = iter(refs)
    x_gmems = [next(it) for _ in x_arrays]
    vec_gmem = next(it) if n_vec else None
    par_gmem = next(it) if out in norm.QUANTIZED else None  # (s_t, 6 s_t, 1 / (6 s_t))
    stats_gmem = next(it) if stats is not None else None
    perm_gmem = next(it) if perm is not None else None
    out_gmems = [next(it) for _ in range(2 if out == "nvfp4" else 1)]
    x_smem = next(it)
    vec_smem = next(it) if n_vec else None
    par_smem = next(it) if out in norm.QUANTIZED else None
    stats_smem = next(it) if stats is not None else None
    perm_smem = next(it) if perm is not None else None
    out_smems = [x_smem] if in_place else [next(it) for _ in out_gmems]
    bar = next(it)

    blk = lax.axis_index("rows")
    # One bulk copy per operand: whole rows are contiguous, so no TMA box limits apply.
    if subs is None:
      plgpu.copy_gmem_to_smem(x_gmems[0].at[pl.ds(blk * rows, rows)], x_smem, bar, **copy)
    else:
      _copy_sub_rows(x_gmems, subs, blk, rows, m_true, x_smem, bar, copy)
    if n_vec:
      plgpu.copy_gmem_to_smem(vec_gmem.at[blk * rows // t], vec_smem, bar, **copy)
    if par_gmem is not None:
      plgpu.copy_gmem_to_smem(par_gmem, par_smem, bar, **copy)
    if stats_gmem is not None:
      plgpu.copy_gmem_to_smem(stats_gmem.at[blk], stats_smem, bar, **copy)
    if perm_gmem is not None:
      plgpu.copy_gmem_to_smem(perm_gmem, perm_smem, bar, **copy)
    plgpu.barrier_wait(bar)
    xs = view(x_smem, (rows, groups, 8, 2))

    def load(c):
      return lc(xs.at[:, pl.ds(c * gc, gc)][...], _LAYOUT).astype(jnp.float32)

    def load_gathered(c):
      """Chunk c of ``x[:, perm]`` (the statistics need no gather: they are
      permutation-invariant)."""
      perm_chunk = perm_smem.at[pl.ds(c * chunk, chunk)]
      if interpret:  # the interpreter runs jnp: gather the whole row block
        v = jnp.take(x_smem[...].reshape(rows, d), perm_chunk[...], axis=1)
        return v.reshape(rows_shape).astype(jnp.float32)
      gather = plgpu.inline_mgpu(
          arg_types=(plgpu.RefType(), plgpu.RefType()),
          return_type=plgpu.ShapeDtypeStruct(rows_shape, x2.dtype, _LAYOUT))(
              lambda _, x_ref, p_ref: _gather_registers(x_ref, p_ref, rows, gc))
      return gather(x_smem, perm_chunk).astype(jnp.float32)

    def accumulate(fn):
      # Elementwise over the chunks, across lanes once at the end: a per-chunk row sum
      # spent 5 shuffles and adds per register (~60% of these passes' instructions).
      return _row_sum(lax.fori_loop(1, n_chunks, lambda c, acc: acc + fn(load(c)),
                                    fn(load(0))))

    # Row statistics: computed (two passes), or those an amax call computed.
    at_stats = n_chunks * rows  # where they follow the amax in the "amax" output row
    saved = lambda j: lc(stats_smem.at[pl.ds(at_stats + j * rows, rows)][...],  # noqa: E731
                         _ROW_LAYOUT)
    if kind == "layer":
      mean = saved(0) if stats is not None else accumulate(lambda v: v) / jnp.float32(d)
      centred = lambda v: v - _bcast(mean, rows_shape, (0,), interpret)  # noqa: E731
    else:
      centred = lambda v: v  # noqa: E731
    if kind != "none" and stats is not None:
      rstd = saved(1)
    elif kind != "none":
      var = accumulate(lambda v: centred(v) * centred(v)) / jnp.float32(d)
      rstd = lax.rsqrt(var + jnp.float32(eps))

    def vec(j, c):
      v = view(vec_smem, (n_vec, groups, 8, 2)).at[j, pl.ds(c * gc, gc)][...]
      return _bcast(lc(v, _VEC_LAYOUT), rows_shape, (1, 2, 3), interpret)

    @pl.loop(0, n_chunks)
    def _(c):
      y = centred(load(c) if perm is None else load_gathered(c))
      if kind != "none":
        y = y * _bcast(rstd, rows_shape, (0,), interpret)
      j = 0
      for present, op in zip(flags, (jnp.multiply, jnp.add, jnp.multiply, jnp.add)):
        if present:
          y = op(y, vec(j, c))
          j += 1
      if round_to is not None:  # what quantizing a stored round_to result would see
        y = y.astype(round_to).astype(jnp.float32)
      if hadamard:  # rotates what is quantized (and what the dynamic amax sees)
        y = _hadamard_chunk(y, interpret)
      cols = pl.ds(c * gc, gc)
      if out in _TWO_BYTE_OUTS:  # in place where it can: this chunk of x is not read again
        v = (y.astype(jnp.bfloat16) if out == "bf16"
             else _quantize_chunk(y, par_smem, interpret, values=True))
        if v.dtype != stage_dtype:
          v = lax.bitcast_convert_type(v, stage_dtype)
        view(out_smems[0], (rows, groups, 8, 2)).at[:, cols][...] = v
      elif out == "amax":  # per row and chunk: a 2-D (rows, >= 8 groups) store trips
        # Mosaic GPU's layout inference on JAX 0.11.2 (IndexError), a 1-D one does not
        out_smems[0].at[pl.ds(c * rows, rows)][...] = jnp.max(
            _group_amax(jnp.abs(y), interpret), axis=1)
      else:
        packed, s_b = _quantize_chunk(y, par_smem, interpret)
        view(out_smems[0], (rows, groups, 8)).at[:, cols][...] = packed.astype(jnp.uint8)
        view(out_smems[1], (rows, groups)).at[:, cols][...] = s_b

    if out == "amax" and kind != "none":
      if kind == "layer":
        out_smems[0].at[pl.ds(at_stats, rows)][...] = mean
      out_smems[0].at[pl.ds(at_stats + rows, rows)][...] = rstd
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(out_smems[0], out_gmems[0].at[
        blk if out == "amax" else pl.ds(blk * rows, rows)])
    if out == "nvfp4":
      plgpu.copy_smem_to_gmem(out_smems[1], out_gmems[1].at[blk])
    plgpu.wait_smem_to_gmem(0)

  if out in _TWO_BYTE_OUTS:
    outs = [(grouped((rows, d), (rows, groups, 8, 2)), stage_dtype)]
  elif out == "amax":  # one row per CTA, padded to whole 128-byte copies
    outs = [(((-(-(n_chunks + 2) * rows // 32) * 32),), jnp.float32)]
  else:
    # Scales as one row per CTA: the (M, D/16) array's row pitch need not be the multiple
    # of 16 bytes that copies require.
    outs = [(grouped((rows, d // 2), (rows, groups, 8)), jnp.uint8),
            (grouped((rows * groups,), (rows, groups)), jnp.float8_e4m3fn)]
  out_type = [jax.ShapeDtypeStruct((m // rows, *outs[0][0]) if out == "amax" else
                                   (m, *outs[0][0][1:]), outs[0][1])]
  if out == "nvfp4":
    out_type.append(jax.ShapeDtypeStruct((m // rows, *outs[1][0]), outs[1][1]))
  args = [xp.reshape(xp.shape[0], *grouped((d,), (groups, 8, 2))) for xp in x_arrays]
  scratch = [plgpu.SMEM((rows, *args[0].shape[1:]), x2.dtype)]
  m_true = None if subs is None else sum(xp.shape[0] for xp in x_arrays)  # before padding
  if n_vec:
    args.append(vecs.reshape(*vecs.shape[:2], *grouped((d,), (groups, 8, 2))))
    scratch.append(plgpu.SMEM(args[-1].shape[1:], jnp.float32))
  if out in norm.QUANTIZED:
    args.append(params)
    scratch.append(plgpu.SMEM(params.shape, jnp.float32))
  if stats is not None:
    args.append(stats)
    scratch.append(plgpu.SMEM(stats.shape[1:], jnp.float32))
  if perm is not None:
    args.append(perm.astype(_perm_dtype(d)))
    scratch.append(plgpu.SMEM(perm.shape, args[-1].dtype))
  if not in_place:
    scratch += [plgpu.SMEM(shape, dtype) for shape, dtype in outs]
  # one arrival per copy: the parts' rows are copied one by one
  scratch.append(plgpu.Barrier(num_arrivals=len(args) + (0 if subs is None else
                                                          rows - len(x_arrays))))
  # No automatic warpgroup barriers around the shared-memory stores (four per chunk): each
  # warp reads and writes only its own rows, and commit_smem still synchronizes the
  # warpgroup before the output copies.
  call = plgpu.kernel(kernel, out_type=out_type, grid=(m // rows,), grid_names=("rows",),
                      scratch_types=scratch,
                      compiler_params=plgpu.CompilerParams(unsafe_no_auto_barriers=True))
  res = call(*args)
  if out in _TWO_BYTE_OUTS and stage_dtype != _TWO_BYTE_OUTS[out]:
    res = [lax.bitcast_convert_type(res[0], _TWO_BYTE_OUTS[out])]
  return res


def norm_quantize(x: jax.Array, perm: jax.Array | None = None, *,
                  kind: KernelKind = "layer", weight=None, bias=None, shift=None,
                  scale=None, eps: float = 1e-6, out: _OutKind = "nvfp4", tensor_scale=None,
                  hadamard: bool = False, round_to=None, rows: int | None = None,
                  chunk: int | None = None, interpret: bool = False):
  """Fused LayerNorm/RMSNorm + adaLN (+ NVFP4 quantize) of ``x``, optionally gathered.

  ``out[..., j] = f(x)[..., perm[j]]`` as in ``norm.reference``; ``kind="none"`` is
  ``norm.gathered_quantize`` (no norm).

  Args:
    x: ``(M, D)`` or ``(B, T, D)`` float32/bfloat16/float16, D a multiple of ``CHUNK``; or
      (``kind="none"``, no ``perm``) a tuple of such arrays with the same leading shape and
      dtype, each part's D a multiple of ``CHUNK``: the quantize of their concatenation
      along the last axis, read in place.
    perm: int32 ``(D,)`` output channel order, or None (in order). The gather reads x from
      shared memory at per-thread indices (inline Mosaic GPU; a ``jnp.take`` under the
      interpreter).
    kind: ``"layer"`` (mean and variance), ``"rms"``, or ``"none"`` (plain quantize).
    weight, bias: optional ``(D,)`` norm affine parameters.
    shift, scale: optional adaLN vectors ``(D,)``, or per-sample ``(B, D)`` for 3-D x (then
      T must be a multiple of ``rows``).
    eps: variance epsilon.
    out: ``"nvfp4"`` (``norm.NVFP4Activation``), ``"nvfp4_f16"`` (``norm.NVFP4Values``: the
      same decoded, float16 values written instead of codes and scales, which a W4A4 matmul
      then reads without a decode pass) or ``"bf16"`` (bfloat16 array).
    tensor_scale: NVFP4 static tensor scale (float32 scalar): one pass over x. None: dynamic,
      a first pass of the same kernel writes the group amax of the result, XLA reduces it to
      the tensor scale, and a second pass quantizes.
    hadamard: rotate each 16-group by ``norm.block_hadamard`` before quantizing (needs a
      quantized ``out``; a dynamic tensor scale is the amax of the rotated values).
    round_to: None, or ``jnp.bfloat16`` / ``jnp.float16``: round the normalized values to it
      first, so that the result is the quantize of the norm's output stored in that dtype
      (``norm.reference``'s ``round_to``) in one pass.
    rows: rows per CTA (``ROW_CHOICES``); None picks ``default_rows``.
    chunk: columns per register chunk (``CHUNK_CHOICES``; D must be a multiple); None picks
      ``default_chunk``.
    interpret: True when run under JAX's GPU interpreter (it lacks ``layout_cast``).

  Returns:
    ``norm.NVFP4Activation`` (codes ``(..., D/2)`` uint8, scales ``(..., D/16)``
    float8_e4m3fn, tensor scale), ``norm.NVFP4Values`` (float16 ``(..., D)``, tensor scale)
    or the bfloat16 ``(..., D)`` array, with ``x``'s leading shape (parts: D their sum).

  Raises:
    ValueError: bad shapes, dtypes or options (naming the argument), D not a multiple of
      ``CHUNK``, per-sample vectors with T not a multiple of ``rows``, a row block that
      does not fit in shared memory, or parts that differ in leading shape or dtype, or
      come with a norm or a ``perm``.
  """
  parts, shape = None, getattr(x, "shape", None)
  if isinstance(x, (tuple, list)):  # a concatenation: quantized as rows of PART_ROW or less
    (x, shape), parts = _as_rows(x, perm, kind), _sub_rows(x, _parts_row(x))
  rows, chunk = _resolve(x, perm, out, (weight, bias, shift, scale), rows, chunk)
  _check(x, perm, kind, weight, bias, shift, scale, out, rows, chunk, hadamard)
  norm.check_round_to(round_to)
  lead, d = shape[:-1], x.shape[-1]
  t = x.shape[1] if x.ndim == 3 else x.shape[0]  # rows per sample
  m = math.prod(x.shape[:-1])
  mp = -(-m // rows) * rows
  if parts is not None:  # the kernel copies the parts' rows itself: no pad
    x2 = jax.ShapeDtypeStruct((mp, d), x.dtype)
  else:
    x2 = x.reshape(-1, d)
    if mp != m:  # only 2-D x can be ragged (3-D per-sample needs T % rows == 0)
      x2 = jnp.pad(x2, ((0, mp - m), (0, 0)))
  t = t if _per_sample(shift, x) or _per_sample(scale, x) else mp
  vecs, flags = _vectors(x, weight, bias, shift, scale)
  if vecs is not None and perm is not None:  # the affine / adaLN act on gathered columns
    vecs = jnp.take(vecs, perm, axis=-1)
  call = functools.partial(_kernel_call, x2, vecs, perm=perm, kind=kind, flags=flags, eps=eps,
                           t=t, rows=rows, hadamard=hadamard, round_to=round_to,
                           interpret=interpret, parts=parts)
  if out == "bf16":
    return call(None, out="bf16", chunk=chunk)[0].reshape(mp, d)[:m].reshape(shape)
  if tensor_scale is None:  # dynamic: amax of the result, then the static pass
    n_chunks = d // chunk
    stats = call(None, out="amax", chunk=chunk)[0]
    amax = stats[:, :n_chunks * rows].reshape(-1, n_chunks, rows).transpose(0, 2, 1)
    s_t = norm.nvfp4_tensor_scale(amax.reshape(mp, n_chunks)[:m])  # padded rows left out
    stats = None if kind == "none" else stats  # the quantize pass reuses the row statistics
  else:
    s_t, stats = norm.static_tensor_scale(tensor_scale), None
  d6 = jnp.float32(norm._E2M1_MAX) * s_t  # noqa: SLF001
  # Copies move whole multiples of 128 bytes (one per thread of the warpgroup): pad.
  params = jnp.zeros((32,), jnp.float32).at[:3].set(jnp.stack([s_t, d6, 1.0 / d6]))
  if out == "nvfp4_f16":
    values = call(params, stats, out=out, chunk=chunk)[0].reshape(mp, d)[:m]
    return norm.NVFP4Values(values.reshape(shape), s_t)
  codes, scales = (o.reshape(mp, -1)[:m].reshape(*lead, -1)
                   for o in call(params, stats, out="nvfp4", chunk=chunk))
  return norm.NVFP4Activation(codes, scales, s_t)


__all__ = ["CHUNK", "CHUNK_CHOICES", "ROW_CHOICES", "accepts", "bank_friendly_perm",
           "default_chunk", "default_rows", "gather_wavefronts",
           "norm_quantize"]

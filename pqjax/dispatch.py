"""The one place the quantized model calls a matmul or a gathered norm.

Backends:
* ``"reference"``: plain jnp (``pqjax.qmatmul.reference_matmul``, ``pqjax_kernels.norm``);
  the CPU default and the oracle.
* ``"mosaic"``: Hopper (compute capability 9.x): the Pallas Mosaic GPU kernel
  ``pqjax_kernels.fp4_matmul`` (W4A16; W4A4 with NVFP4 activations). Shapes or formats it
  does not take (K or N not a multiple of 128, activation formats other than NVFP4) fall
  back to the reference.
* ``"scaled_matmul"``: Blackwell (10.x and later): ``jax.nn.scaled_matmul`` for NVFP4 x
  NVFP4; everything else falls back to the reference.

On ``"mosaic"`` the kernel reads weights re-laid out once by ``prepare(w)``
(``PreparedWeights``: the codes tiled in register order, the block scales as float16/bf16
tiles); store that beside the ``QTensor`` and pass it as ``linear(..., prepared=...)``,
otherwise every call re-lays the weights out (a pass over codes and scales per call).
``QuantLinear`` stores it (``pqjax.qmodules.prepare_kernel_weights``, which
``pqjax.quantize`` and ``pqjax.load`` run where this backend is the default).

On ``"mosaic"`` running on a GPU, the gathered norm (bf16 in and out) and, from
``NORM_KERNEL_MIN_ROWS`` rows, the NVFP4 activation quantize of every W4A4 linear (the input
permutation and block Hadamard rotation fused; written as the float16 values the matmul
reads) run the Pallas kernel ``pqjax_kernels.norm_kernel.norm_quantize``;
shapes it does not take (D not a multiple of 64, rows that do not fit in shared memory) and
every other backend use the plain-jnp ``pqjax_kernels.norm`` (XLA fuses it).

Inside a jitted function on ``"mosaic"``, a W4A4 linear whose input is the very array that
``gathered_norm`` returned (a norm site's consumers: Q, K, V, ...) quantizes it in the norm
kernel's one pass from the norm's input (``_norm_source``): the norm rounded to its output
dtype, then quantized, which is what quantizing the stored output computes; XLA then drops
the bf16 output no one reads. A linear called with ``epilogue="gelu_tanh"`` (an MLP's first
projection) applies the GELU in the matmul's epilogue on ``"mosaic"`` (to the float32 result,
before the cast; the streaming kernel writes it finished), so no pass of its own reads and
writes the activations again; elsewhere after the matmul, as the unquantized model does.
A W4A4 linear given its input as parts of a concatenation (``converters.layers.linear_concat``:
FLUX single blocks' ``proj_out`` reads attention output and MLP activations) has the norm
kernel quantize them where they are, from ``NORM_KERNEL_MIN_ROWS`` rows and without an input
gather, instead of a pass writing the concatenation first.
``fusion(False)`` (a context manager) turns these off: two passes each, as before.

The backend is picked from ``jax.devices()[0]``; ``use_backend(name)`` (a context manager)
or the ``backend=`` argument overrides it.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any, Literal
import weakref

import jax
import jax.numpy as jnp

from pqjax import hadamard, qmatmul
from pqjax.formats import QTensor
import pqjax_kernels
from pqjax_kernels import matmul_fp4, norm, norm_kernel

Backend = Literal["reference", "mosaic", "scaled_matmul"]
BACKENDS = ("reference", "mosaic", "scaled_matmul")
_OVERRIDE: contextvars.ContextVar[str | None] = contextvars.ContextVar("pqjax_backend",
                                                                      default=None)
_KERNEL_FORMATS = {"nvfp4": "nvfp4", "mxfp4": "mxfp4", "int4": "int4", "int3": "int4"}


def _check_backend(name: str) -> str:
  if name not in BACKENDS:
    raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
  return name


def device_backend(device: jax.Device | None = None) -> str:
  """The backend for ``device`` (default ``jax.devices()[0]``) from its compute capability."""
  device = device or jax.devices()[0]
  if device.platform != "gpu":
    return "reference"
  cc = str(getattr(device, "compute_capability", "") or "")
  try:
    major = int(cc.split(".")[0])
  except ValueError:
    return "reference"
  if major == 9:
    return "mosaic"
  return "scaled_matmul" if major >= 10 else "reference"


def current_backend() -> str:
  """The backend in force: the innermost ``use_backend`` or else ``device_backend()``."""
  return _OVERRIDE.get() or device_backend()


@contextlib.contextmanager
def use_backend(name: Backend):
  """Context manager forcing a backend for the calls traced inside it."""
  token = _OVERRIDE.set(_check_backend(name))
  try:
    yield
  finally:
    _OVERRIDE.reset(token)


_FUSION: contextvars.ContextVar[bool] = contextvars.ContextVar("pqjax_fusion", default=True)
EPILOGUES = (None, "gelu_tanh")


@contextlib.contextmanager
def fusion(enabled: bool):
  """Context manager: whether the calls traced inside it on ``"mosaic"`` fuse a norm site's
  norm and its consumers' activation quantize into one kernel pass, and a linear's
  ``epilogue`` into its matmul (default True; False keeps the separate passes, e.g. to time
  what the fusions save)."""
  token = _FUSION.set(bool(enabled))
  try:
    yield
  finally:
    _FUSION.reset(token)


def _act_group(act_format: str | None, w: QTensor) -> int:
  if act_format is None or act_format == w.fmt:
    return w.group_size
  return {"nvfp4": 16, "mxfp4": 32}.get(act_format, 64)


def _prepare_input(x, w: QTensor, act_format, in_perm, rotate, gather: bool = True):
  if in_perm is not None:
    if jnp.dtype(in_perm.dtype) != jnp.int32 or in_perm.shape != (w.shape[1],):
      raise ValueError(f"in_perm must be int32 of shape ({w.shape[1]},), got "
                       f"{in_perm.dtype} {in_perm.shape}")
    if gather:
      x = jnp.take(x, in_perm, axis=-1)
  if rotate:
    # W4A4 quantizes the rotation in float32 (as the kernel does); W4A16 multiplies it.
    x = hadamard.block_hadamard(x if act_format is None else x.astype(jnp.float32),
                                _act_group(act_format, w))
  return x


def _kernel_takes(w: QTensor) -> bool:
  n, k = w.shape
  g = w.group_size
  return (w.fmt in _KERNEL_FORMATS and w.axis == 1 and k % 128 == 0 and n % 128 == 0
          and g % 16 == 0 and 128 % g == 0)


def _mosaic_ok(w: QTensor, act_format) -> bool:
  return (_kernel_takes(w) and act_format in (None, "nvfp4")
          and (act_format is None or _act_group(act_format, w) == 16))


def prepare(w: QTensor) -> matmul_fp4.PreparedWeights | None:
  """The kernel layout of ``w`` for ``linear(..., prepared=)``; None where no kernel takes it.

  Call once at quantize/load time (a jnp re-layout: int4 view of the codes, bf16 scales
  transposed); the result is a pytree of arrays, storable beside ``w``.
  """
  if len(w.shape) != 2 or not _kernel_takes(w):
    return None
  return matmul_fp4.prepare_weights(w.codes, w.scales, w.tensor_scale,
                                    fmt=_KERNEL_FORMATS[w.fmt])


def prepared_weights(w: QTensor, codes: jax.Array, scales_t: jax.Array
                     ) -> matmul_fp4.PreparedWeights:
  """``prepare(w)`` rebuilt from its stored arrays (``codes``, ``scales_t``)."""
  return matmul_fp4.PreparedWeights(codes, scales_t, w.tensor_scale, _KERNEL_FORMATS[w.fmt],
                                    w.group_size)


def _check_prepared(prepared, w: QTensor) -> None:
  if prepared is None:
    return
  if not isinstance(prepared, matmul_fp4.PreparedWeights) or prepared.shape != tuple(w.shape) \
     or prepared.fmt != _KERNEL_FORMATS.get(w.fmt) or prepared.group_size != w.group_size:
    raise ValueError(f"prepared must be dispatch.prepare(w) for w {w.fmt} {w.shape} "
                     f"(group {w.group_size}), got {type(prepared).__name__} "
                     f"{getattr(prepared, 'fmt', None)} {getattr(prepared, 'shape', None)}")


def _norm_kernel_runs() -> bool:
  """The Mosaic norm kernel compiles only for a GPU (``use_backend("mosaic")`` on the CPU
  keeps the reference)."""
  return jax.devices()[0].platform == "gpu"


# Rows from which W4A4 activations are quantized by the norm kernel: at 16 rows its few CTAs
# lost to XLA's fusion by 3-12 us, at 1024 it won by 4-44 us gathered (H200,
# ``results/diag_large_m_NVIDIA_H200_2026-12-01_v20a.json``, ``_v20b``; 256-1023 untimed).
NORM_KERNEL_MIN_ROWS = 512


# In order, the quantize needs no whole row (its groups are 16 columns, its tensor scale is
# global), so the norm kernel takes rows wider than this cut into rows of this width: its
# row blocks then need the shared memory of D = 3072, where several CTAs share an SM (at
# 4608 x 12288 its 4-row blocks of whole rows ran one CTA per SM, 107 us against 89 for
# XLA's fusion alone; NOTES_kernels.md, version 20). Not yet timed (version 21).
QUANTIZE_ROW = 3072


# Arrays ``gathered_norm`` returned from the norm kernel while tracing, by id: a weak
# reference to each (which removes its entry when the array is freed, so an id is never
# matched to a later array) and how it was computed (``_norm_source``), arrays held weakly
# too: a tracer reaches its whole trace, which the registry must not keep alive.
_NORM_OUTPUTS: dict[int, tuple[weakref.ref, dict[str, Any]]] = {}


def _remember_norm(y: jax.Array, **source) -> None:
  """Records ``y`` as the norm kernel's output of ``source`` (x, perm and the kernel's other
  arguments: kind, weight, bias, shift, scale, eps)."""
  # only while tracing (eager arrays keep the two passes), unless fusion(False)
  if isinstance(y, jax.core.Tracer) and _FUSION.get():
    key = id(y)
    _NORM_OUTPUTS[key] = (weakref.ref(y, lambda _: _NORM_OUTPUTS.pop(key, None)),
                          {k: weakref.ref(v) if isinstance(v, jax.Array) else v
                           for k, v in source.items()})


def _norm_source(x) -> dict[str, Any] | None:
  """How the norm kernel computed ``x`` (``_remember_norm``'s ``source``), if
  ``gathered_norm`` returned this very array and its inputs are still alive."""
  entry = _NORM_OUTPUTS.get(id(x))
  if entry is None or entry[0]() is not x:
    return None
  source = {}
  for k, v in entry[1].items():
    if isinstance(v, weakref.ref):
      v = v()
      if v is None:
        return None  # one of its inputs was freed
    source[k] = v
  return source


def _quantize_normed(src: dict[str, Any], act_tensor_scale, rotate: bool):
  """``_quantize_activations`` of the norm kernel's output ``src`` describes, in the norm
  kernel's one pass (None where it does not take it)."""
  kw = dict(src, out="nvfp4_f16", hadamard=rotate)
  x, perm, eps = kw.pop("x"), kw.pop("perm"), kw.pop("eps")
  if not norm_kernel.accepts(x, perm, **kw):
    return None
  q = norm_kernel.norm_quantize(x, perm, eps=eps, tensor_scale=act_tensor_scale,
                                round_to=x.dtype, **kw)
  return norm.NVFP4Values(q.values.reshape(-1, q.values.shape[-1]), q.tensor_scale)


def _quantize_activations(x2, act_tensor_scale, perm, rotate: bool,
                          src: dict[str, Any] | None = None) -> norm.NVFP4Values:
  """NVFP4 of ``x2[:, perm]`` (block-Hadamard rotated if ``rotate``) for a W4A4 kernel call,
  as the float16 values the kernels read (``norm.NVFP4Values``): no decode pass in the call.

  From ``NORM_KERNEL_MIN_ROWS`` rows on a GPU: the norm kernel, one pass. Where a row block
  with float16 values does not fit its shared memory, the kernel writes codes and XLA
  decodes them (rotated, 2 x 4608 x 3072: 121.3 us against 396.7 for XLA's whole fusion).
  In order too: alone, XLA's fusion of quantize + decode beat the kernel at 4608 x 12288
  (whole linear 518.1 us against 536.2), but inside a model XLA splits it into three or
  four passes (the scaled input and the group boundaries written as float32), and the
  quantizes took ~1.5 ms of a 12.0 ms FLUX-width forward pass (H200,
  ``results/inference_NVIDIA_H200_2026-12-01_a.json``). Where ``src`` says how the norm
  kernel computed ``x2`` (in order), the norm and the quantize run as one kernel pass.
  Below ``NORM_KERNEL_MIN_ROWS`` or off the GPU: XLA's fusion. ``x2`` may be a tuple of the
  ``(M, K_i)`` parts of a concatenation that ``_quantizes_parts`` accepted: the norm kernel
  reads them in place.
  """
  kw = dict(tensor_scale=act_tensor_scale, hadamard=rotate)
  if isinstance(x2, tuple):  # parts of a concatenation (``_quantizes_parts``): read in place
    return norm_kernel.norm_quantize(x2, kind="none", out="nvfp4_f16", **kw)
  if _norm_kernel_runs() and x2.shape[0] >= NORM_KERNEL_MIN_ROWS:
    q = _quantize_normed(src, act_tensor_scale, rotate) if src and perm is None else None
    if q is not None:
      return q
    xk = x2
    if perm is None and x2.shape[1] % QUANTIZE_ROW == 0:
      xk = x2.reshape(-1, QUANTIZE_ROW)
    for out in ("nvfp4_f16", "nvfp4"):
      if norm_kernel.accepts(xk, perm, kind="none", hadamard=rotate, out=out):
        q = norm_kernel.norm_quantize(xk, perm, kind="none", out=out, **kw)
        q = q if out == "nvfp4_f16" else norm.nvfp4_values(q)
        return norm.NVFP4Values(q.values.reshape(x2.shape), q.tensor_scale)
  return norm.gathered_quantize(x2, perm, out="nvfp4_f16", **kw)


def _linear_mosaic(x2, w: QTensor, bias, act_format, act_tensor_scale, out_dtype, prepared,
                   perm, rotate: bool, src: dict[str, Any] | None, epilogue):
  fmt = _KERNEL_FORMATS[w.fmt]
  pw = prepared if prepared is not None else prepare(w)
  kw = dict(fmt=fmt, bias=bias, out_dtype=out_dtype, epilogue=epilogue)
  if act_format is None:
    return pqjax_kernels.fp4_matmul(x2, pw, **kw)
  qa = _quantize_activations(x2, act_tensor_scale, perm, rotate, src)
  return pqjax_kernels.fp4_matmul(qa.values, pw, a_tensor_scale=qa.tensor_scale, **kw)


def _linear_scaled_matmul(x2, w: QTensor, bias, act_tensor_scale, out_dtype):
  n, k = w.shape
  qa = norm.quantize_nvfp4(x2, act_tensor_scale)
  lhs = matmul_fp4._decode_values(qa.codes, "nvfp4").astype(jnp.float4_e2m1fn)
  rhs = matmul_fp4._decode_values(w.codes, "nvfp4").astype(jnp.float4_e2m1fn)
  y = jax.nn.scaled_matmul(lhs[None], rhs[None], qa.scales[None], w.scales[None],
                           preferred_element_type=jnp.float32)[0]
  y = y * (qa.tensor_scale * w.tensor_scale)
  if bias is not None:
    y = y + bias.astype(jnp.float32)[None, :]
  return y.astype(out_dtype)


def _quantizes_parts(parts, w: QTensor, act_format, in_perm, rotate: bool, backend) -> bool:
  """Whether a W4A4 linear on ``"mosaic"`` quantizes the parts of its input in place (the
  norm kernel copies each CTA's rows from the part holding them; no pass writes their
  concatenation): no input gather, ``NORM_KERNEL_MIN_ROWS`` rows or more, parts the kernel
  takes, ``fusion()`` on."""
  rows = math.prod(parts[0].shape[:-1])
  return (backend == "mosaic" and _FUSION.get() and _norm_kernel_runs()
          and act_format is not None and _mosaic_ok(w, act_format) and in_perm is None
          and rows >= NORM_KERNEL_MIN_ROWS and len(w.shape) == 2
          and sum(p.shape[-1] for p in parts) == w.shape[1]
          and norm_kernel.accepts(parts, kind="none", out="nvfp4_f16", hadamard=rotate))


def linear(x: jax.Array, w: QTensor, bias: jax.Array | None = None, *,
           act_format: str | None, act_tensor_scale=None, in_perm=None, rotate: bool = False,
           out_dtype=None, backend: Backend | None = None,
           prepared: matmul_fp4.PreparedWeights | None = None,
           epilogue: str | None = None) -> jax.Array:
  """``epilogue(Q(x[..., in_perm] H) @ W + bias)`` with ``w`` the quantized ``W.T`` ``(N, K)``.

  Args:
    x: ``(..., K)`` activations, or a tuple of parts ``(..., K_i)`` concatenated along the
      last axis (``converters.layers.linear_concat``): a W4A4 linear on ``"mosaic"``
      quantizes them where they are (``_quantizes_parts``), anything else concatenates.
    w: ``QTensor`` of ``W.T`` quantized along axis 1 (``pqjax.qmatmul.quantize_weight``).
    bias: optional ``(N,)``.
    act_format: activation format (None: W4A16).
    act_tensor_scale: NVFP4 static activation tensor scale; None: dynamic per call.
    in_perm: int32 ``(K,)`` gather of the input channels before quantizing, or None.
    rotate: block Hadamard inside each activation quantization group (the weight rows were
      rotated at quantize time).
    out_dtype: output dtype; None keeps ``x.dtype``.
    backend: overrides ``current_backend()``.
    prepared: ``prepare(w)``, computed once; used by the ``"mosaic"`` backend (None: it
      re-lays ``w`` out inside this call).
    epilogue: None or ``"gelu_tanh"``: tanh-GELU of the result; on ``"mosaic"`` in the
      matmul's epilogue (float32, before the cast) unless ``fusion(False)``, elsewhere of
      the ``out_dtype`` result (what ``jax.nn.gelu(linear(...))`` computes).

  Returns:
    ``(..., N)`` array.

  Raises:
    ValueError: ``x`` does not match ``w``, or an ``epilogue`` not in ``EPILOGUES``.
  """
  if epilogue not in EPILOGUES:
    raise ValueError(f"epilogue must be one of {EPILOGUES}, got {epilogue!r}")
  backend = _check_backend(backend) if backend is not None else current_backend()
  parts = None
  if isinstance(x, (tuple, list)):  # the parts of x along its last axis
    parts = tuple(jnp.asarray(p) for p in x)
    x = jax.ShapeDtypeStruct((*parts[0].shape[:-1], sum(p.shape[-1] for p in parts)),
                             parts[0].dtype)
    if not _quantizes_parts(parts, w, act_format, in_perm, rotate, backend):
      x, parts = jnp.concatenate(parts, axis=-1), None
  src = None if parts else _norm_source(x)
  x = x if parts else jnp.asarray(x)
  out_dtype = x.dtype if out_dtype is None else out_dtype
  if len(w.shape) != 2 or w.axis != 1 or x.shape[-1] != w.shape[1]:
    raise ValueError(f"x of shape {x.shape} does not match w of shape (N, K) = {w.shape} "
                     f"(axis {w.axis})")
  _check_prepared(prepared, w)
  mosaic = backend == "mosaic" and _mosaic_ok(w, act_format)
  # W4A4 on the mosaic path gathers and rotates inside the activation quantize.
  fused = mosaic and act_format is not None
  n, k = w.shape
  if parts:
    x2 = tuple(p.reshape(-1, p.shape[-1]) for p in parts)
  else:
    x = _prepare_input(x, w, act_format, in_perm, rotate and not fused, gather=not fused)
    x2 = x.reshape(-1, k)
  in_kernel = mosaic and epilogue is not None and _FUSION.get()
  if mosaic:
    y = _linear_mosaic(x2, w, bias, act_format, act_tensor_scale, out_dtype, prepared,
                       in_perm if fused else None, rotate and fused, src,
                       epilogue if in_kernel else None)
  elif (backend == "scaled_matmul" and w.fmt == "nvfp4" and act_format == "nvfp4"
        and w.group_size == 16):
    y = _linear_scaled_matmul(x2, w, bias, act_tensor_scale, out_dtype)
  else:
    y = qmatmul.reference_matmul(x2, w, act_format=act_format,
                                 act_tensor_scale=act_tensor_scale, bias=bias,
                                 out_dtype=out_dtype)
  if epilogue == "gelu_tanh" and not in_kernel:
    y = jax.nn.gelu(y, approximate=True)
  return y.reshape(*x.shape[:-1], n)


def gathered_norm(x: jax.Array, perm: jax.Array | None, *, kind: str, weight=None,
                  bias=None, shift=None, scale=None, eps: float,
                  backend: Backend | None = None) -> jax.Array:
  """``norm(x) * (1 + scale) + shift`` gathered with ``perm`` on the last axis.

  Args:
    x: ``(M, D)`` or ``(B, T, D)``.
    perm: int32 ``(D,)`` or None (plain norm).
    kind: ``"layer"`` or ``"rms"``.
    weight, bias: optional ``(D,)`` norm affine parameters (input channel order).
    shift, scale: optional adaLN vectors ending in D, broadcastable against ``x`` (e.g.
      ``(B, 1, D)``) or per-sample ``(B, D)`` (input channel order).
    eps: variance epsilon.
    backend: overrides ``current_backend()``; ``"mosaic"`` on a GPU runs the Pallas kernel
      for bfloat16 ``x`` where it takes the shapes (see the module docstring).

  Returns:
    Array shaped like ``x`` in ``x.dtype``.
  """
  backend = _check_backend(backend) if backend is not None else current_backend()
  if backend == "mosaic" and _norm_kernel_runs() and x.dtype == jnp.bfloat16:
    kw = dict(kind=kind, weight=weight, bias=bias, shift=_kernel_vec(shift, x),
              scale=_kernel_vec(scale, x), out="bf16")
    if norm_kernel.accepts(x, perm, **kw):
      y = norm_kernel.norm_quantize(x, perm, eps=eps, **kw)
      kw.pop("out")
      _remember_norm(y, x=x, perm=perm, eps=eps, **kw)
      return y
  return norm.reference(x, perm, kind=kind, weight=weight, bias=bias, shift=shift,
                        scale=scale, eps=eps, out="bf16", out_dtype=x.dtype)


def _kernel_vec(v, x):
  """An adaLN vector as the kernel takes it: ``(D,)``, or ``(B, D)`` from ``(B, 1, D)``."""
  if v is None or v.ndim <= 1:
    return v
  if v.size == x.shape[-1]:
    return v.reshape(-1)
  if x.ndim == 3 and v.ndim == 3 and v.shape[1] == 1:
    return v[:, 0, :]
  return v  # the kernel's checks decline other shapes

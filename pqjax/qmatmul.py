"""The reference (oracle) quantized matmul: dequantize both operands, multiply in float32."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike, DTypeLike

from pqjax import formats
from pqjax.formats import QTensor


def quantize_weight(kernel: ArrayLike, fmt: formats.FormatName, group_size: int | None = None,
                    *, tensor_scale: ArrayLike | None = None) -> QTensor:
  """Quantizes a Flax kernel ``W: (K, N)`` as ``W.T`` along K, the layout of ``reference_matmul``.

  Args:
    kernel: ``(K, N)`` weight of ``y = x @ W``.
    fmt: format name.
    group_size: elements per scale along K; None uses the format default.
    tensor_scale: NVFP4 static tensor scale; None computes it from the kernel.

  Returns:
    ``QTensor`` with ``shape == (N, K)``, ``axis == 1``.
  """
  kernel = jnp.asarray(kernel)
  if kernel.ndim != 2:
    raise ValueError(f"quantize_weight expects a (K, N) kernel, got shape {kernel.shape}")
  return formats.quantize(kernel.T, fmt, axis=-1, group_size=group_size,
                          tensor_scale=tensor_scale)


def quantize_activation(x: ArrayLike, act_format: formats.FormatName, *,
                        group_size: int | None = None,
                        tensor_scale: ArrayLike | None = None) -> jax.Array:
  """Fake-quantizes activations ``(..., K)`` along K and returns them dequantized in float32.

  Args:
    x: activations.
    act_format: format name.
    group_size: elements per scale; None uses the format default.
    tensor_scale: NVFP4 static (calibrated) tensor scale; None: dynamic, from ``x``.

  Returns:
    float32 array shaped like ``x``.
  """
  qx = formats.quantize(x, act_format, axis=-1, group_size=group_size,
                        tensor_scale=tensor_scale)
  return formats.dequantize(qx, jnp.float32)


def reference_matmul(x: ArrayLike, w: QTensor, *, act_format: formats.FormatName | None = None,
                     act_tensor_scale: ArrayLike | None = None, bias: ArrayLike | None = None,
                     out_dtype: DTypeLike | None = None,
                     act_group_size: int | None = None) -> jax.Array:
  """``x @ W + bias`` with ``w`` the quantized ``W.T`` (see ``quantize_weight``).

  W4A16 when ``act_format`` is None; W4A4 otherwise, with ``x`` quantized per call along its
  last axis. Both operands are dequantized to float32 and multiplied at HIGHEST precision.

  Args:
    x: activations ``(..., K)`` (float32/bfloat16/float16).
    w: ``QTensor`` of shape ``(N, K)`` quantized along axis 1.
    act_format: activation format, or None to keep ``x`` in float.
    act_tensor_scale: NVFP4 static activation tensor scale; None: dynamic per call.
    bias: optional ``(N,)`` bias, added in float32.
    out_dtype: output dtype; None uses the dtype of ``x``.
    act_group_size: activation group size; None uses ``w.group_size`` when the activation
      format equals the weight format, otherwise the activation format's default.

  Returns:
    ``(..., N)`` array.
  """
  x = jnp.asarray(x)
  if len(w.shape) != 2 or w.axis != 1:
    raise ValueError(f"w must be a 2-D QTensor of W.T quantized along axis 1, got shape "
                     f"{w.shape} axis {w.axis}")
  n, k = w.shape
  if x.ndim < 1 or x.shape[-1] != k:
    raise ValueError(f"x of shape {x.shape} does not match w of shape (N, K) = {w.shape}")
  if act_format is None:
    if act_tensor_scale is not None:
      raise ValueError("act_tensor_scale given without act_format")
    xd = x.astype(jnp.float32)
  else:
    if act_group_size is None and act_format == w.fmt:
      act_group_size = w.group_size
    xd = quantize_activation(x, act_format, group_size=act_group_size,
                             tensor_scale=act_tensor_scale)
  wd = formats.dequantize(w, jnp.float32)
  y = jnp.einsum("...k,nk->...n", xd, wd, precision=jax.lax.Precision.HIGHEST,
                 preferred_element_type=jnp.float32)
  if bias is not None:
    bias = jnp.asarray(bias)
    if bias.shape != (n,):
      raise ValueError(f"bias shape {bias.shape} does not match N = {n}")
    y = y + bias.astype(jnp.float32).reshape((1,) * (y.ndim - 1) + (n,))
  return y.astype(x.dtype if out_dtype is None else out_dtype)

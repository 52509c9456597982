"""Block Hadamard rotation inside each quantization group.

Rotating activations ``x -> x H`` and the matching weight rows ``W -> H^T W`` with the
orthonormal block-diagonal ``H`` leaves ``x @ W`` unchanged while spreading outliers over a
group. The orthonormal Sylvester matrix is symmetric and its own inverse, so the same
function rotates and un-rotates.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike


@functools.lru_cache(maxsize=None)
def _sylvester(n: int) -> np.ndarray:
  h = np.ones((1, 1), np.float64)
  while h.shape[0] < n:
    h = np.block([[h, h], [h, -h]])
  return h


def _check_size(n) -> None:
  if not isinstance(n, (int, np.integer)) or n < 1 or n & (n - 1):
    raise ValueError(f"Hadamard size must be a power of two, got {n!r}")


def hadamard_matrix(n: int) -> np.ndarray:
  """Returns the orthonormal ``(n, n)`` Sylvester Hadamard matrix (float32, symmetric).

  Args:
    n: size, a power of two.

  Returns:
    ``H`` with ``H @ H == I``.
  """
  _check_size(n)
  return (_sylvester(int(n)) / np.sqrt(n)).astype(np.float32)


def block_hadamard(x: ArrayLike, group_size: int, axis: int = -1) -> jax.Array:
  """Multiplies every contiguous group of ``group_size`` elements along ``axis`` by ``H``.

  Computed in float32 as the fast Walsh-Hadamard butterfly over the index bits 0, 1, ...,
  scaled by ``1 / sqrt(group_size)`` (exact for 16 and 64), and returned in the dtype of
  ``x``.

  Args:
    x: floating-point array.
    group_size: group length, a power of two dividing ``x.shape[axis]``.
    axis: rotated axis.

  Returns:
    The rotated array, shaped like ``x``.
  """
  x = jnp.asarray(x)
  _check_size(group_size)
  if x.ndim == 0 or not -x.ndim <= axis < x.ndim:
    raise ValueError(f"axis {axis} out of range for shape {x.shape}")
  length = x.shape[axis]
  if length % group_size:
    raise ValueError(f"axis {axis} of shape {x.shape} has length {length}, not divisible by "
                     f"group_size {group_size}")
  y = jnp.moveaxis(x, axis, -1).astype(jnp.float32)
  # The butterfly (log2 G passes of a + b, a - b) rather than a product with the matrix:
  # float32 additions in a fixed order, which the Pallas kernel repeats bit for bit
  # (``pqjax_kernels.norm.walsh_hadamard``, whose order this matches), and fewer flops.
  shape, half = y.shape, 1
  while half < group_size:
    v = y.reshape(*shape[:-1], shape[-1] // (2 * half), 2, half)
    y = jnp.stack([v[..., 0, :] + v[..., 1, :], v[..., 0, :] - v[..., 1, :]], axis=-2)
    y = y.reshape(shape)
    half *= 2
  y = y * jnp.float32(1.0 / np.sqrt(group_size))
  return jnp.moveaxis(y, -1, axis).astype(x.dtype)


def rotate_kernel_rows(kernel: ArrayLike, group_size: int) -> jax.Array:
  """Rotates the input rows of a Flax kernel ``W: (K, N)`` to match ``block_hadamard(x)``.

  ``block_hadamard(x, G) @ rotate_kernel_rows(W, G) == x @ W`` up to float rounding. The
  quantized layout ``W.T`` of the rotated kernel is ``block_hadamard(W.T, G)``.

  Args:
    kernel: ``(K, N)`` weight.
    group_size: the activation quantization group size along K.

  Returns:
    The rotated ``(K, N)`` kernel.
  """
  kernel = jnp.asarray(kernel)
  if kernel.ndim != 2:
    raise ValueError(f"rotate_kernel_rows expects a (K, N) kernel, got shape {kernel.shape}")
  return block_hadamard(kernel, group_size, axis=0)

"""Block Hadamard rotation: orthonormality, self-inverse, and invariance of x @ W."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pqjax import hadamard
from tests.bounds import U32, gamma



pytestmark = pytest.mark.usefixtures("strict_promotion")




def sylvester(n):
  """Independent construction: H[i, j] = (-1)**popcount(i & j) / sqrt(n)."""
  i = np.arange(n)
  parity = np.vectorize(lambda v: bin(v).count("1") % 2)(i[:, None] & i[None, :])
  return (1.0 - 2.0 * parity) / np.sqrt(n)


def block_matrix(k, g):
  return np.kron(np.eye(k // g), sylvester(g))


@pytest.mark.parametrize("n", [1, 2, 8, 32, 128])
def test_matrix_is_orthonormal_sylvester(n):
  h = hadamard.hadamard_matrix(n)
  assert h.dtype == np.float32
  # Entries are float32(+-1/sqrt(n)): relative error <= u each, so (H H)_ij is within
  # n * (1/n) * (2u + u^2) of the identity.
  np.testing.assert_allclose(h, sylvester(n), rtol=U32, atol=0)
  hh = h.astype(np.float64) @ h.astype(np.float64)
  assert np.all(np.abs(hh - np.eye(n)) <= 2 * U32 + U32**2)
  np.testing.assert_array_equal(h, h.T)


@pytest.mark.parametrize("shape,axis,g", [((3, 64), -1, 16), ((2, 32, 5), 1, 32),
                                          ((128,), 0, 128)])
def test_block_hadamard_equals_block_diagonal_product(shape, axis, g):
  x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
  y = np.asarray(hadamard.block_hadamard(x, g, axis=axis), np.float64)
  xl = np.moveaxis(x.astype(np.float64), axis, -1)
  k = xl.shape[-1]
  exact = np.moveaxis(xl @ block_matrix(k, g), -1, axis)
  # Each output is a g-term float32 dot with a matrix entry rounded once: gamma(g + 1).
  mag = np.moveaxis(np.abs(xl) @ np.abs(block_matrix(k, g)), -1, axis)
  assert np.all(np.abs(y - exact) <= gamma(g + 1) * mag)


def test_block_hadamard_is_its_own_inverse():
  x = np.random.default_rng(1).normal(size=(4, 256)).astype(np.float32)
  twice = np.asarray(hadamard.block_hadamard(hadamard.block_hadamard(x, 64), 64), np.float64)
  # Two g-term passes, each within gamma(g + 1) of |.| @ |H|; |H| @ |H| has entries 1.
  mag = np.abs(x.astype(np.float64)) @ np.abs(block_matrix(256, 64)) @ np.abs(block_matrix(256, 64))
  assert np.all(np.abs(twice - x) <= (2 * gamma(64 + 1) + gamma(64 + 1)**2) * mag)
  assert not np.allclose(np.asarray(hadamard.block_hadamard(x, 64)), x)


def test_rotation_preserves_the_product():
  rng = np.random.default_rng(2)
  k, n, g = 128, 24, 32
  x = rng.normal(size=(3, 5, k)).astype(np.float32)
  kernel = rng.normal(size=(k, n)).astype(np.float32)
  xr = hadamard.block_hadamard(x, g)
  wr = hadamard.rotate_kernel_rows(kernel, g)
  y = jnp.einsum("...k,kn->...n", xr, wr, precision=jax.lax.Precision.HIGHEST)
  exact = x.astype(np.float64) @ kernel.astype(np.float64)
  hb = np.abs(block_matrix(k, g))
  # Rotating x (gamma(g + 1)), rotating W (gamma(g + 1)), then a K-term dot (gamma(K)).
  mag = (np.abs(x.astype(np.float64)) @ hb) @ (hb @ np.abs(kernel.astype(np.float64)))
  assert np.all(np.abs(np.asarray(y, np.float64) - exact) <= gamma(2 * g + 2 + k) * mag)
  # The quantized layout W.T of the rotated kernel is block_hadamard(W.T).
  wt = np.asarray(hadamard.block_hadamard(kernel.T, g), np.float64)
  bound = gamma(g + 1) * (np.abs(kernel.T.astype(np.float64)) @ hb)
  assert np.all(np.abs(wt - np.asarray(wr, np.float64).T) <= 2 * bound)


def test_dtype_is_kept_and_jit():
  x = jnp.ones((2, 32), jnp.bfloat16)
  y = jax.jit(hadamard.block_hadamard, static_argnums=1)(x, 16)
  assert y.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(y[:, 1:16], np.float32), 0)
  np.testing.assert_array_equal(np.asarray(y[:, 0], np.float32), 4)


def test_bad_input():
  with pytest.raises(ValueError, match=r"power of two, got 12"):
    hadamard.block_hadamard(np.ones((2, 48), np.float32), 12)
  with pytest.raises(ValueError, match=r"\(2, 40\).*group_size 16"):
    hadamard.block_hadamard(np.ones((2, 40), np.float32), 16)
  with pytest.raises(ValueError, match=r"axis 2 out of range"):
    hadamard.block_hadamard(np.ones((2, 32), np.float32), 16, axis=2)
  with pytest.raises(ValueError, match=r"\(32,\)"):
    hadamard.rotate_kernel_rows(np.ones(32, np.float32), 16)

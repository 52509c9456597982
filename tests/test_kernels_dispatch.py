"""pqjax.dispatch: backend choice and the reference paths (CPU)."""

import jax.numpy as jnp
import numpy as np
import pytest

from pqjax import dispatch, hadamard, qmatmul


def test_cpu_picks_reference_and_override():
  assert dispatch.device_backend() in dispatch.BACKENDS
  with dispatch.use_backend("mosaic"):
    assert dispatch.current_backend() == "mosaic"
  with pytest.raises(ValueError, match="backend"):
    with dispatch.use_backend("cuda"):
      pass


def test_linear_reference_with_perm_and_rotation():
  rng = np.random.default_rng(0)
  w = qmatmul.quantize_weight(rng.standard_normal((64, 32)).astype(np.float32), "nvfp4")
  x = jnp.asarray(rng.standard_normal((2, 3, 64)), jnp.float32)
  perm = jnp.asarray(rng.permutation(64), jnp.int32)
  y = dispatch.linear(x, w, act_format="nvfp4", in_perm=perm, rotate=True,
                      backend="reference")
  xr = hadamard.block_hadamard(x[..., perm], 16)
  np.testing.assert_array_equal(np.asarray(y),
                                np.asarray(qmatmul.reference_matmul(xr, w, act_format="nvfp4")))


def test_mosaic_falls_back_off_tiling():
  rng = np.random.default_rng(1)
  w = qmatmul.quantize_weight(rng.standard_normal((64, 32)).astype(np.float32), "nvfp4")
  x = jnp.asarray(rng.standard_normal((3, 64)), jnp.float32)
  y = dispatch.linear(x, w, act_format=None, backend="mosaic")  # K=64: not a kernel shape
  np.testing.assert_array_equal(np.asarray(y), np.asarray(qmatmul.reference_matmul(x, w)))


def test_bad_in_perm_raises():
  w = qmatmul.quantize_weight(np.ones((64, 32), np.float32), "nvfp4")
  with pytest.raises(ValueError, match="in_perm"):
    dispatch.linear(jnp.ones((2, 64)), w, act_format=None,
                    in_perm=jnp.arange(64, dtype=jnp.int16))

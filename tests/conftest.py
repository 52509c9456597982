"""Test-wide JAX configuration: no silent rank promotion, 32-bit defaults."""

import jax
import pytest

jax.config.update("jax_enable_x64", False)
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def strict_promotion():
  """JAX's strict dtype promotion: finds silent upcasts in the numeric code under test."""
  with jax.numpy_dtype_promotion("strict"):
    yield

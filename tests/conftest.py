"""Test-wide JAX configuration: no silent rank promotion, 32-bit defaults."""

import jax

jax.config.update("jax_enable_x64", False)
jax.config.update("jax_numpy_rank_promotion", "raise")

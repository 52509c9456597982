"""Runs Pallas Mosaic GPU kernels on the CPU under JAX's GPU interpreter (private API).

The one place that imports it, so a JAX upgrade touches one file.
"""

from __future__ import annotations

import contextlib

import jax

try:
  from jax._src.pallas.mosaic_gpu.interpret.params import (InterpretGPUParams,
                                                           force_gpu_interpret_mode)
  AVAILABLE = True
except ImportError:  # a JAX without the interpreter: the interpreter tests skip
  AVAILABLE = False


def has_gpu() -> bool:
  """Whether the default backend is a CUDA GPU."""
  return jax.default_backend() == "gpu"


@contextlib.contextmanager
def gpu_interpreter():
  """Context in which ``plgpu.kernel`` calls run under the GPU interpreter on the CPU."""
  with force_gpu_interpret_mode(InterpretGPUParams()):
    yield

"""Pallas Mosaic GPU kernels for pqjax (raw arrays in, raw arrays out; no pqjax imports)."""

from pqjax_kernels.matmul_fp4 import (MatmulConfig, PreparedWeights, default_config,
                                      fp4_matmul, prepare_weights)
from pqjax_kernels.norm import (NVFP4Activation, gathered_norm, gathered_quantize)

__all__ = ["MatmulConfig", "NVFP4Activation", "PreparedWeights", "default_config",
           "fp4_matmul", "gathered_norm", "gathered_quantize", "prepare_weights"]

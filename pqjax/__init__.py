"""pqjax: PermuQuant 4-bit post-training quantization for diffusion transformers.

Public API: ``quantize``, ``QuantConfig``, ``save``, ``load``, ``error_report`` and the
``formats`` module. The pipeline entry points import lazily, so ``import pqjax.formats`` stays
light.
"""

from pqjax import formats

_LAZY = {
    "quantize": ("pqjax.pipeline", "quantize"),
    "UnsupportedModelError": ("pqjax.pipeline", "UnsupportedModelError"),
    "QuantConfig": ("pqjax.config", "QuantConfig"),
    "ConfigError": ("pqjax.config", "ConfigError"),
    "CalibrationError": ("pqjax.calibrate", "CalibrationError"),
    "save": ("pqjax.io", "save"),
    "load": ("pqjax.io", "load"),
    "QuantCheckpointError": ("pqjax.io", "QuantCheckpointError"),
    "error_report": ("pqjax.report", "error_report"),
}


def __getattr__(name: str):
  if name in _LAZY:
    import importlib
    module, attr = _LAZY[name]
    return getattr(importlib.import_module(module), attr)
  raise AttributeError(f"module 'pqjax' has no attribute {name!r}")


def __dir__():
  return sorted([*globals(), *_LAZY])


__all__ = ["formats", *_LAZY]

"""``QuantConfig``: every choice of the PermuQuant pipeline, validated once."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from pqjax import formats

METHODS = ("permuquant", "permuquant-h", "auto", "rtn", "absmax", "random")
MODES = ("w4a4", "w4a16")
ACT_SCALES = ("static", "dynamic")
CALIBRATIONS = ("fp", "sequential")


class ConfigError(ValueError):
  """A ``QuantConfig`` field has an unsupported value, or does not fit the model."""


@dataclasses.dataclass(frozen=True)
class QuantConfig:
  """How to quantize a model.

  Attributes:
    format: weight (and, in W4A4, activation) format: "nvfp4", "mxfp4", "int4" or "int3".
    group_size: elements per scale along the input axis; None uses the format default.
    mode: "w4a4" (activations quantized at run time) or "w4a16" (weights only).
    method: "permuquant" (sorted permutation + acceptance rule), "permuquant-h" (permutation,
      then a block Hadamard rotation inside each group), "auto" (per site the lowest
      calibration error among identity, permutation, Hadamard, both), "rtn" (no transform),
      "absmax" / "random" (orderings kept unconditionally, for comparison).
    alpha: fixed exponent of the score ``m_a**alpha * m_w**(1 - alpha)``; None searches
      ``alpha_grid`` per site and lets the calibration error choose.
    alpha_grid: exponents searched when ``alpha`` is None.
    tau: a transform is kept only if it lowers the site's calibration error by more than this
      fraction of the identity's error.
    act_scale: "static" (NVFP4 activation tensor scale from calibration) or "dynamic".
    calibration: "fp" (full-precision forward) or "sequential" (each block sees the outputs of
      the already-quantized blocks before it).
    keep_float: ``fnmatch`` patterns of layer paths that stay in float.
    error_tokens: tokens sampled per quantized layer for the acceptance error.
    seed: seed of the token sample and of the "random" ordering.
  """

  format: str = "nvfp4"
  group_size: int | None = None
  mode: str = "w4a4"
  method: str = "permuquant"
  alpha: float | None = None
  alpha_grid: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
  tau: float = 0.0
  act_scale: str = "static"
  calibration: str = "fp"
  keep_float: tuple[str, ...] = ()
  error_tokens: int = 1024
  seed: int = 0

  def __post_init__(self):
    for name, allowed in (("format", tuple(formats.FORMATS)), ("mode", MODES), ("method", METHODS), ("act_scale", ACT_SCALES),
                          ("calibration", CALIBRATIONS)):
      if getattr(self, name) not in allowed:
        _bad(name, getattr(self, name), allowed)
    g = self.group_size
    if g is not None and (not isinstance(g, int) or isinstance(g, bool) or g <= 0 or g % 2):
      raise ConfigError(f"group_size must be a positive even int or None, got {g!r}")
    if self.alpha is not None and not 0.0 <= self.alpha <= 1.0:
      raise ConfigError(f"alpha must lie in [0, 1] or be None, got {self.alpha!r}")
    object.__setattr__(self, "alpha_grid", tuple(float(a) for a in self.alpha_grid))
    if not self.alpha_grid or any(not 0.0 <= a <= 1.0 for a in self.alpha_grid):
      raise ConfigError(f"alpha_grid must be non-empty values in [0, 1], got {self.alpha_grid}")
    if not 0.0 <= self.tau < 1.0:
      raise ConfigError(f"tau must lie in [0, 1), got {self.tau!r}")
    if isinstance(self.keep_float, str):
      object.__setattr__(self, "keep_float", (self.keep_float,))
    object.__setattr__(self, "keep_float", tuple(self.keep_float))
    if not isinstance(self.error_tokens, int) or self.error_tokens < 1:
      raise ConfigError(f"error_tokens must be a positive int, got {self.error_tokens!r}")

  @property
  def resolved_group_size(self) -> int:
    """The group size used: ``group_size`` or the format's default."""
    return self.group_size or formats.FORMATS[self.format].group_size

  @property
  def act_format(self) -> str | None:
    """Activation format (None in W4A16)."""
    return self.format if self.mode == "w4a4" else None

  @property
  def static_act_scale(self) -> bool:
    """Whether activations get a calibrated tensor scale (only NVFP4 W4A4 has one)."""
    return (self.act_scale == "static" and self.act_format is not None
            and formats.FORMATS[self.format].has_tensor_scale)

  def to_dict(self) -> dict[str, Any]:
    """JSON-friendly dict of the fields."""
    d = dataclasses.asdict(self)
    d["alpha_grid"] = list(self.alpha_grid)
    d["keep_float"] = list(self.keep_float)
    return d

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> QuantConfig:
    """Inverse of ``to_dict``; unknown keys raise ``ConfigError``."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ConfigError(f"unknown QuantConfig field(s): {unknown}")
    d = dict(d)
    for key in ("alpha_grid", "keep_float"):
      if key in d:
        d[key] = tuple(d[key])
    return cls(**d)

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), sort_keys=True)


def _bad(name: str, value: Any, allowed) -> None:
  raise ConfigError(f"unsupported {name}={value!r}; expected one of {list(allowed)}")

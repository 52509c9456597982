"""Diffusers DiT checkpoints to Flax NNX modules and back.

``from_diffusers(path)`` reads ``config.json``'s ``_class_name`` and builds the matching
family's module; ``from_config(config)`` builds one with random weights (real dimensions, for
benchmarks); ``to_diffusers(model, path)`` writes a folder diffusers loads.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import jax.numpy as jnp
from flax import nnx

from converters.checkpoint import (CheckpointError, CheckpointMismatchError, load_into,
                                   read_config, save_folder)

MODELS: dict[str, type] = {}


class UnsupportedModelError(CheckpointError):
  """``_class_name`` names a model no converter handles."""


def register(class_name: str) -> Callable[[type], type]:
  """Class decorator: the family module for diffusers' ``class_name``."""
  def deco(cls: type) -> type:
    MODELS[class_name] = cls
    return cls
  return deco


# diffusers loads legacy ``Transformer2DModel`` DiT/PixArt checkpoints (DiT-XL-2, PixArt-alpha)
# as the class their ``norm_type`` names; the state-dict keys are the same.
_LEGACY_CLASSES = {("Transformer2DModel", "ada_norm_zero"): "DiTTransformer2DModel",
                   ("Transformer2DModel", "ada_norm_single"): "PixArtTransformer2DModel"}


def _model_class(config: dict[str, Any]) -> type:
  _import_families()
  name = config.get("_class_name")
  name = _LEGACY_CLASSES.get((name, config.get("norm_type")), name)
  if name not in MODELS:
    raise UnsupportedModelError(
        f"unsupported model _class_name={name!r}; supported: {sorted(MODELS)}")
  return MODELS[name]


def from_config(config: dict[str, Any], *, dtype=jnp.bfloat16, seed: int = 0) -> nnx.Module:
  """Builds a model with random weights from a diffusers config dict (needs ``_class_name``)."""
  return _model_class(config)(config, dtype=dtype, rngs=nnx.Rngs(seed))


def from_diffusers(path: str | os.PathLike, *, dtype=jnp.bfloat16,
                   progress: bool | None = None) -> nnx.Module:
  """Loads a diffusers transformer folder (``save_pretrained`` layout) as a Flax NNX module.

  Args:
    path: folder with ``config.json`` and ``diffusion_pytorch_model*.safetensors``.
    dtype: parameter dtype of the returned model.
    progress: show a progress bar (default: for large checkpoints).

  Raises:
    CheckpointError: missing folder/file, corrupt or truncated file.
    UnsupportedModelError: unknown ``_class_name``.
    CheckpointMismatchError: missing, unexpected or misshapen keys (all listed).
  """
  config = read_config(path)
  cls = _model_class(config)
  abstract = nnx.eval_shape(lambda: cls(config, dtype=dtype, rngs=nnx.Rngs(0)))
  return load_into(abstract, path, dtype=dtype, progress=progress)


def to_diffusers(model: nnx.Module, path: str | os.PathLike, *, dtype=None,
                 max_shard_bytes: int = 10 * 2**30) -> None:
  """Writes ``model`` as a folder ``diffusers.<Class>.from_pretrained`` loads (atomically).

  Args:
    model: a converted model (its ``config`` is written as ``config.json``).
    path: a new or empty folder.
    dtype: cast float tensors to this NumPy/JAX dtype (default: keep the model's).
    max_shard_bytes: above this size the weights are sharded with an index, as diffusers does.

  Raises:
    CheckpointError: ``path`` exists and is not empty.
  """
  save_folder(model, model.config, path, dtype=dtype, max_shard_bytes=max_shard_bytes)


def _import_families() -> None:
  # Importing a family module registers it; done lazily so `import converters` stays light.
  import importlib
  for name in ("dit", "pixart", "flux", "sana", "zimage"):
    importlib.import_module(f"converters.{name}")


__all__ = ["MODELS", "CheckpointError", "CheckpointMismatchError", "UnsupportedModelError",
           "from_config", "from_diffusers", "register", "to_diffusers"]

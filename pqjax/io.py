"""Saving and loading quantized models with Orbax.

Layout of a checkpoint folder::

  arrays/        Orbax (codes uint8, scales float8/uint8/float32, perms int32, float params)
  pqjax.json     format tag, model config and dtype, QuantConfig, site decisions, the swapped
                 modules' specs and every array's shape and dtype
  COMMITTED      sha256 of pqjax.json, written last

A save writes everything into a temporary sibling folder and renames it into place, so a
crash leaves either the old checkpoint or none; ``load`` refuses a folder without a matching
``COMMITTED``. ``load`` rebuilds the model with ``converters.from_config`` under
``nnx.eval_shape``, re-applies the module swaps, checks every key and shape against the
manifest, then restores the arrays: outputs are bit-identical to the saved model's.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from pqjax import dispatch
from pqjax.config import QuantConfig
from pqjax.fold import dotted_path, set_module
from pqjax.qmodules import SWAP_TYPES, KernelLayout, QuantInfo, prepare_kernel_weights
from pqjax.search import SiteDecision

FORMAT_TAG = "pqjax-quantized/1"
META_NAME = "pqjax.json"
COMMIT_NAME = "COMMITTED"
ARRAYS_NAME = "arrays"


class QuantCheckpointError(ValueError):
  """A quantized checkpoint that cannot be saved or loaded; the message says why."""


class IncompleteCheckpointError(QuantCheckpointError):
  """The folder was never committed (a crashed or interrupted save)."""


class CorruptCheckpointError(QuantCheckpointError):
  """Metadata or array data that cannot be read or fails its checksum."""


class CheckpointMismatchError(QuantCheckpointError):
  """Stored arrays whose keys or shapes differ from the model their metadata describes."""


def _flat(model: nnx.Module) -> dict[str, Any]:
  """The arrays a checkpoint holds: the model's state but the kernels' derived layouts."""
  state = nnx.state(model, nnx.Not(KernelLayout))
  return {dotted_path(p): v[...] for p, v in nnx.to_flat_state(state)}


def _param_dtype(model: nnx.Module) -> str:
  dtypes = [v.dtype for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
            if jnp.issubdtype(v.dtype, jnp.floating)]
  return jnp.dtype(max(set(dtypes), key=dtypes.count)).name if dtypes else "float32"


def _swaps(model: nnx.Module) -> dict[str, dict[str, Any]]:
  return {dotted_path(p): node.spec() for p, node in nnx.iter_graph(model)
          if isinstance(node, tuple(SWAP_TYPES.values()))}


def save(qmodel: nnx.Module, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
  """Writes a quantized model to the folder ``path`` atomically.

  Args:
    qmodel: a model returned by ``pqjax.quantize`` (or ``pqjax.load``).
    path: destination folder.
    overwrite: replace an existing folder (else ``FileExistsError``).

  Returns:
    The folder path.

  Raises:
    QuantCheckpointError: not a quantized model, or a model config JSON cannot hold.
    FileExistsError: ``path`` exists and ``overwrite`` is False.
  """
  info = getattr(qmodel, "pqjax_info", None)
  if not isinstance(info, QuantInfo):
    raise QuantCheckpointError(f"pqjax.save needs a model returned by pqjax.quantize, got a "
                               f"{type(qmodel).__name__} without pqjax_info")
  path = Path(path)
  if path.exists() and not overwrite:
    raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
  arrays = _flat(qmodel)
  meta = {
      "format": FORMAT_TAG,
      "model_config": getattr(qmodel, "config", None),
      "param_dtype": _param_dtype(qmodel),
      "quant_config": info.config.to_dict(),
      "decisions": [_decision_json(d) for d in info.decisions],
      "modules": _swaps(qmodel),
      "arrays": {k: [list(v.shape), jnp.dtype(v.dtype).name] for k, v in arrays.items()},
  }
  try:
    text = json.dumps(meta, indent=1, sort_keys=True, allow_nan=True)
  except TypeError as e:
    raise QuantCheckpointError(f"model config is not JSON-serializable: {e}") from None
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex}"
  tmp.mkdir()
  try:
    with ocp.StandardCheckpointer() as ckpt:
      ckpt.save((tmp / ARRAYS_NAME).absolute(), arrays)
      ckpt.wait_until_finished()
    (tmp / META_NAME).write_text(text)
    _write_synced(tmp / COMMIT_NAME, hashlib.sha256(text.encode()).hexdigest())
    if path.exists():
      trash = path.parent / f".{path.name}.old-{uuid.uuid4().hex}"
      os.rename(path, trash)
      os.rename(tmp, path)
      shutil.rmtree(trash, ignore_errors=True)
    else:
      os.rename(tmp, path)
  finally:
    if tmp.exists():
      shutil.rmtree(tmp, ignore_errors=True)
  return path


def _write_synced(path: Path, text: str) -> None:
  with open(path, "w") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())


def _decision_json(d: SiteDecision) -> dict[str, Any]:
  return {k: getattr(d, k) for k in SiteDecision.__dataclass_fields__}


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
  """The checked ``pqjax.json`` of a committed checkpoint folder.

  Raises:
    QuantCheckpointError: no such folder.
    IncompleteCheckpointError: no ``COMMITTED`` marker.
    CorruptCheckpointError: unreadable or tampered metadata, or an unknown format tag.
  """
  path = Path(path)
  if not path.is_dir():
    raise QuantCheckpointError(f"{path}: no such checkpoint folder")
  if not (path / COMMIT_NAME).is_file():
    raise IncompleteCheckpointError(f"{path}: no {COMMIT_NAME} marker: the save did not finish")
  try:
    text = (path / META_NAME).read_text()
  except OSError as e:
    raise CorruptCheckpointError(f"{path}: cannot read {META_NAME}: {e}") from None
  if hashlib.sha256(text.encode()).hexdigest() != (path / COMMIT_NAME).read_text().strip():
    raise CorruptCheckpointError(f"{path}: {META_NAME} does not match its {COMMIT_NAME} checksum")
  try:
    meta = json.loads(text)
  except json.JSONDecodeError as e:
    raise CorruptCheckpointError(f"{path}: corrupt {META_NAME}: {e}") from None
  if meta.get("format") != FORMAT_TAG:
    raise CorruptCheckpointError(f"{path}: format {meta.get('format')!r}, expected "
                                 f"{FORMAT_TAG!r}")
  return meta


def _build(meta: dict[str, Any]) -> nnx.Module:
  """The quantized model's structure with zero arrays (call under ``nnx.eval_shape``)."""
  import converters  # lazily: only loading needs the model definitions

  model = converters.from_config(meta["model_config"], dtype=jnp.dtype(meta["param_dtype"]))
  sites = tuple(model.permutation_sites())
  for path, spec in sorted(meta["modules"].items(), key=lambda kv: kv[0].count(".")):
    cls = SWAP_TYPES.get(spec.get("type"))
    if cls is None:
      raise CorruptCheckpointError(f"module {path!r} has unknown type {spec.get('type')!r}")
    set_module(model, path, cls.from_spec(spec))
  decisions = tuple(SiteDecision(**d) for d in meta["decisions"])
  width = sum(d.width for d in decisions)
  model.pqjax_info = QuantInfo(QuantConfig.from_dict(meta["quant_config"]), sites, decisions,
                               jnp.zeros((width,), jnp.int32))
  return model


def load(path: str | os.PathLike) -> nnx.Module:
  """Loads a model written by ``save``.

  Args:
    path: checkpoint folder.

  Returns:
    The quantized model (same class, same outputs bit for bit), with the GPU kernels' weight
    layout rebuilt (``pqjax.qmodules.prepare_kernel_weights``) where the ``"mosaic"``
    backend is the default.

  Raises:
    IncompleteCheckpointError: an unfinished save.
    CorruptCheckpointError: unreadable metadata or array data (names the array when known).
    CheckpointMismatchError: missing/unexpected arrays or shapes/dtypes that differ from the
      model the metadata describes (names each key and shape).
    converters.UnsupportedModelError: a model config no converter builds.
  """
  path = Path(path)
  meta = read_metadata(path)
  try:
    abstract = nnx.eval_shape(lambda: _build(meta))
  except (KeyError, TypeError) as e:
    raise CorruptCheckpointError(f"{path}: metadata does not describe a model: "
                                 f"{type(e).__name__}: {e}") from None
  graphdef, state = nnx.split(abstract)
  flat = nnx.to_flat_state(state)
  want = {dotted_path(p): (tuple(v.shape), jnp.dtype(v.dtype).name) for p, v in flat}
  stored = {k: (tuple(s), d) for k, (s, d) in meta["arrays"].items()}
  _check_manifest(path, want, stored)
  target = {k: jax.ShapeDtypeStruct(s, jnp.dtype(d)) for k, (s, d) in want.items()}
  try:
    with ocp.StandardCheckpointer() as ckpt:
      restored = ckpt.restore((path / ARRAYS_NAME).absolute(), target)
  except Exception as e:  # Orbax/TensorStore raise many types for unreadable data
    raise CorruptCheckpointError(f"{path}: cannot restore arrays: {type(e).__name__}: "
                                 f"{str(e)[:500]}") from None
  for p, var in flat:
    key = dotted_path(p)
    arr = restored[key]
    if tuple(arr.shape) != want[key][0] or jnp.dtype(arr.dtype).name != want[key][1]:
      raise CorruptCheckpointError(f"{path}: array {key} restored as {arr.shape} "
                                   f"{arr.dtype}, expected {want[key]}")
    var.set_value(jnp.asarray(arr))
  model = nnx.merge(graphdef, nnx.from_flat_state(flat))
  return prepare_kernel_weights(model) if dispatch.current_backend() == "mosaic" else model


def _check_manifest(path: Path, want: dict, stored: dict) -> None:
  missing = sorted(set(want) - set(stored))
  unexpected = sorted(set(stored) - set(want))
  bad = [f"{k}: stored {stored[k][0]} {stored[k][1]}, model expects {want[k][0]} {want[k][1]}"
         for k in sorted(set(want) & set(stored)) if stored[k] != want[k]]
  if missing or unexpected or bad:
    lines = ([f"missing array(s): {', '.join(missing)}"] if missing else []) + (
        [f"unexpected array(s): {', '.join(unexpected)}"] if unexpected else []) + bad
    raise CheckpointMismatchError(f"{path}: checkpoint does not match its model:\n  "
                                  + "\n  ".join(lines))

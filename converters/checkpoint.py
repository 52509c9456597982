"""Reading and writing diffusers checkpoints (safetensors + config.json) without torch.

Tensors are read one at a time from memory-mapped files, so at most one copy of the weights
(the Flax model's) plus one tensor is ever held on the host. Every key and shape is checked
against the model's expected layout from the file headers alone, before any tensor is read,
so a bad checkpoint raises with the full list of offending keys and loads nothing.
"""

from __future__ import annotations

import json
import mmap
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"

_ST_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


class CheckpointError(ValueError):
  """A diffusers checkpoint folder that cannot be loaded as asked; the message says why."""


class CheckpointMismatchError(CheckpointError):
  """Keys or shapes in the checkpoint do not match the model built from its config.

  Attributes:
    missing: keys the model needs that no file holds.
    unexpected: keys the files hold that the model does not use.
    mismatched: ``(key, file_shape, expected_shape)`` for each shape disagreement.
  """

  def __init__(self, missing: list[str], unexpected: list[str],
               mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]]):
    self.missing, self.unexpected, self.mismatched = missing, unexpected, mismatched
    lines = []
    if missing:
      lines.append(f"{len(missing)} missing key(s): " + ", ".join(missing))
    if unexpected:
      lines.append(f"{len(unexpected)} unexpected key(s): " + ", ".join(unexpected))
    for key, got, want in mismatched:
      lines.append(f"shape mismatch for {key}: checkpoint has {got}, model expects {want}")
    super().__init__("checkpoint does not match the model:\n  " + "\n  ".join(lines))


# ----------------------------------------------------------------------------- safetensors


class SafetensorsFile:
  """A memory-mapped safetensors file: header parsed and validated, tensors read on demand."""

  def __init__(self, path: Path):
    self.path = path
    size = path.stat().st_size
    with open(path, "rb") as f:
      head = f.read(8)
      if len(head) < 8:
        raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
      (n,) = struct.unpack("<Q", head)
      if 8 + n > size:
        raise CheckpointError(f"{path}: truncated safetensors header ({n} bytes announced, "
                              f"{size - 8} present)")
      try:
        header = json.loads(f.read(n))
      except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: corrupt safetensors header: {e}") from None
    header.pop("__metadata__", None)
    self.data_start = 8 + n
    self.entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
    truncated = []
    for key, e in header.items():
      if e["dtype"] not in _ST_DTYPES:
        raise CheckpointError(f"{path}: tensor {key} has unsupported dtype {e['dtype']}")
      begin, end = e["data_offsets"]
      if self.data_start + end > size:
        truncated.append(key)
      self.entries[key] = (_ST_DTYPES[e["dtype"]], tuple(e["shape"]), begin, end)
    if truncated:
      raise CheckpointError(f"{path}: truncated file ({size} bytes); tensors past its end: "
                            + ", ".join(sorted(truncated)))
    self._mmap: mmap.mmap | None = None

  def shape(self, key: str) -> tuple[int, ...]:
    return self.entries[key][1]

  def read(self, key: str) -> np.ndarray:
    """Returns one tensor as a NumPy array (a copy, so the map can close)."""
    if self._mmap is None:
      with open(self.path, "rb") as f:
        self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    dtype, shape, begin, end = self.entries[key]
    buf = self._mmap[self.data_start + begin:self.data_start + end]
    return np.frombuffer(buf, dtype=dtype).reshape(shape)

  def close(self) -> None:
    if self._mmap is not None:
      self._mmap.close()
      self._mmap = None


def open_weights(folder: Path) -> dict[str, SafetensorsFile]:
  """Maps every tensor key to its (single or sharded) safetensors file in ``folder``."""
  index = folder / INDEX_NAME
  if index.exists():
    try:
      weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError) as e:
      raise CheckpointError(f"{index}: corrupt index: {e!r}") from None
    files: dict[str, SafetensorsFile] = {}
    for name in sorted(set(weight_map.values())):
      if not (folder / name).exists():
        raise CheckpointError(f"{index} names shard {name}, which is missing")
      files[name] = SafetensorsFile(folder / name)
    out = {}
    for key, name in weight_map.items():
      if key not in files[name].entries:
        raise CheckpointError(f"{index} places {key} in {name}, which does not hold it")
      out[key] = files[name]
    return out
  single = folder / WEIGHTS_NAME
  if not single.exists():
    found = sorted(p.name for p in folder.glob("*.safetensors"))
    raise CheckpointError(f"{folder}: no {WEIGHTS_NAME} or {INDEX_NAME}"
                          + (f" (found {found})" if found else ""))
  f = SafetensorsFile(single)
  return {key: f for key in f.entries}


def write_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
  """Writes ``tensors`` as one safetensors file (keys sorted, data 8-byte aligned)."""
  header: dict[str, Any] = {}
  offset = 0
  for key in sorted(tensors):
    t = tensors[key]
    header[key] = {"dtype": _ST_NAMES[t.dtype], "shape": list(t.shape),
                   "data_offsets": [offset, offset + t.nbytes]}
    offset += t.nbytes
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for key in sorted(tensors):
      f.write(np.ascontiguousarray(tensors[key]).tobytes())


# ----------------------------------------------------------------------------- key mapping


def _module_at(root: nnx.Module, path: tuple) -> Any:
  node = root
  for p in path:
    node = node[p] if isinstance(p, int) else getattr(node, p)
  return node


def torch_layout(model: nnx.Module) -> dict[str, tuple[tuple, Any, Any]]:
  """Maps each torch state-dict key to ``(flax path, to_flax, to_torch)`` for ``model``.

  A param owned by a layer with ``TORCH_PARAMS`` takes that layer's torch name and layout;
  any other ``nnx.Param`` keeps its own name and layout.
  """
  _, state = nnx.split(model, nnx.Param)
  out = {}
  for path, _ in nnx.to_flat_state(state):
    owner = _module_at(model, path[:-1])
    spec = getattr(type(owner), "TORCH_PARAMS", {}).get(path[-1])
    name, to_flax, to_torch = spec if spec else (path[-1], None, None)
    key = ".".join(str(p) for p in path[:-1] + (name,))
    out[key] = (path, to_flax, to_torch)
  return out


def _expected_torch_shape(flax_shape: tuple[int, ...], to_torch) -> tuple[int, ...]:
  if to_torch is None:
    return flax_shape
  return to_torch(np.empty(flax_shape, np.bool_)).shape


def read_config(folder: str | os.PathLike) -> dict[str, Any]:
  folder = Path(folder)
  if not folder.is_dir():
    raise CheckpointError(f"{folder}: no such checkpoint folder")
  cfg = folder / CONFIG_NAME
  if not cfg.exists():
    raise CheckpointError(f"{folder}: missing {CONFIG_NAME}")
  try:
    config = json.loads(cfg.read_text())
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{cfg}: corrupt JSON: {e}") from None
  if "_class_name" not in config:
    raise CheckpointError(f"{cfg}: no _class_name")
  return config


def load_into(abstract: nnx.Module, folder: str | os.PathLike, *, dtype,
              progress: bool | None = None) -> nnx.Module:
  """Fills ``abstract`` (from ``nnx.eval_shape``) with the checkpoint's tensors.

  Raises:
    CheckpointMismatchError: listing every missing, unexpected and misshapen key; raised from the
      headers alone, before any tensor is read.
  """
  folder = Path(folder)
  files = open_weights(folder)
  layout = torch_layout(abstract)
  graphdef, state = nnx.split(abstract)
  flat = dict(nnx.to_flat_state(state))
  missing = sorted(k for k in layout if k not in files)
  unexpected = sorted(k for k in files if k not in layout)
  mismatched = []
  for key, (path, _, to_torch) in layout.items():
    if key in files:
      want = _expected_torch_shape(tuple(flat[path].value.shape), to_torch)
      got = files[key].shape(key)
      if got != want:
        mismatched.append((key, got, want))
  if missing or unexpected or mismatched:
    raise CheckpointMismatchError(missing, unexpected, sorted(mismatched))
  if progress is None:
    progress = len(layout) > 200
  for key in tqdm(sorted(layout), desc=f"loading {folder.name}", disable=not progress):
    path, to_flax, _ = layout[key]
    t = files[key].read(key)
    if to_flax is not None:
      t = to_flax(t)
    var = flat[path]
    var.value = jnp.asarray(t, dtype=dtype if jnp.issubdtype(t.dtype, jnp.floating) else t.dtype)
  for f in set(files.values()):
    f.close()
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _shards(tensors: dict[str, np.ndarray], max_bytes: int) -> Iterator[dict[str, np.ndarray]]:
  shard: dict[str, np.ndarray] = {}
  size = 0
  for key in sorted(tensors):
    if shard and size + tensors[key].nbytes > max_bytes:
      yield shard
      shard, size = {}, 0
    shard[key] = tensors[key]
    size += tensors[key].nbytes
  if shard:
    yield shard


def save_folder(model: nnx.Module, config: dict[str, Any], folder: str | os.PathLike, *,
                dtype=None, max_shard_bytes: int = 10 * 2**30) -> None:
  """Writes ``model`` as a diffusers folder (config.json + safetensors), atomically.

  Everything is written into a temporary sibling folder that is renamed into place last, so a
  crash never leaves a half-written checkpoint at ``folder``.
  """
  folder = Path(folder)
  if folder.exists() and any(folder.iterdir()):
    raise CheckpointError(f"{folder}: exists and is not empty")
  folder.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
  try:
    _, state = nnx.split(model, nnx.Param)
    flat = dict(nnx.to_flat_state(state))
    tensors = {}
    for key, (path, _, to_torch) in torch_layout(model).items():
      t = np.asarray(jax.device_get(flat[path].value))
      if dtype is not None and jnp.issubdtype(t.dtype, jnp.floating):
        t = t.astype(dtype)
      tensors[key] = to_torch(t) if to_torch is not None else t
    shards = list(_shards(tensors, max_shard_bytes))
    if len(shards) == 1:
      write_safetensors(tmp / WEIGHTS_NAME, shards[0])
    else:
      weight_map = {}
      for i, shard in enumerate(shards):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(tmp / name, shard)
        weight_map.update({k: name for k in shard})
      total = sum(t.nbytes for t in tensors.values())
      (tmp / INDEX_NAME).write_text(json.dumps(
          {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True))
    if folder.exists():
      folder.rmdir()
    os.replace(tmp, folder)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise

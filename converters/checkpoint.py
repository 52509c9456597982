"""Reading and writing diffusers checkpoints (safetensors + config.json) without torch.

Tensors are read one at a time from memory-mapped files, so at most one copy of the weights
(the Flax model's) plus one tensor is ever held on the host. Every key and shape is checked
against the model's expected layout from the file headers alone, before any tensor is read,
so a bad checkpoint raises with the full list of offending keys and loads nothing.
"""

from __future__ import annotations

import functools
import json
import mmap
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Callable

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


def _parse_entry(path: Path, key: str, e: Any) -> tuple[np.dtype, tuple[int, ...], int, int]:
  """Validates one header entry: known dtype, and byte range = dtype size x shape."""
  try:
    dtype_name, shape, (begin, end) = e["dtype"], tuple(e["shape"]), e["data_offsets"]
  except (KeyError, TypeError, ValueError):
    raise CheckpointError(f"{path}: corrupt header entry for tensor {key}: {e!r}") from None
  if dtype_name not in _ST_DTYPES:
    raise CheckpointError(f"{path}: tensor {key} has unsupported dtype {dtype_name}")
  dtype = _ST_DTYPES[dtype_name]
  if end - begin != dtype.itemsize * int(np.prod(shape)) or begin < 0:
    raise CheckpointError(f"{path}: tensor {key} ({dtype_name}, shape {shape}) has byte range "
                          f"[{begin}, {end})")
  return dtype, shape, begin, end


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
      except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header: {e}") from None
    if not isinstance(header, dict):
      raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    header.pop("__metadata__", None)
    self.data_start = 8 + n
    self.entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
    truncated = []
    for key, e in header.items():
      self.entries[key] = _parse_entry(path, key, e)
      if self.data_start + self.entries[key][3] > size:
        truncated.append(key)
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
  """Maps every tensor key to its (single or sharded) safetensors file in ``folder``.

  With an index, every shard it names is opened and every tensor they hold is mapped (a tensor
  the index omits is still data, so it surfaces as an unexpected key, as in diffusers).

  Raises:
    CheckpointError: no weights file, a corrupt index, a missing shard, a tensor the index
      misplaces or one held by two shards, or a corrupt/truncated file.
  """
  index = folder / INDEX_NAME
  if not index.exists():
    single = folder / WEIGHTS_NAME
    if not single.exists():
      found = sorted(p.name for p in folder.glob("*.safetensors"))
      raise CheckpointError(f"{folder}: no {WEIGHTS_NAME} or {INDEX_NAME}"
                            + (f" (found {found})" if found else ""))
    f = SafetensorsFile(single)
    return {key: f for key in f.entries}
  try:
    weight_map = json.loads(index.read_text())["weight_map"]
  except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
    raise CheckpointError(f"{index}: corrupt index: {e!r}") from None
  if not isinstance(weight_map, dict) or not all(
      isinstance(v, str) for v in weight_map.values()):
    raise CheckpointError(f"{index}: corrupt index: weight_map is not a key -> file mapping")
  missing = sorted(name for name in set(weight_map.values()) if not (folder / name).is_file())
  if missing:
    raise CheckpointError(f"{index} names missing shard(s): " + ", ".join(missing))
  files = {name: SafetensorsFile(folder / name) for name in sorted(set(weight_map.values()))}
  misplaced = sorted(f"{k} (in {n})" for k, n in weight_map.items() if k not in files[n].entries)
  if misplaced:
    raise CheckpointError(f"{index} places tensors in shards that do not hold them: "
                          + ", ".join(misplaced))
  out: dict[str, SafetensorsFile] = {}
  duplicated = []
  for f in files.values():
    for key in f.entries:
      if key in out:
        duplicated.append(f"{key} ({out[key].path.name}, {f.path.name})")
      out[key] = f
  if duplicated:
    raise CheckpointError(f"{folder}: tensors held by two shards: " + ", ".join(duplicated))
  return out


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


def module_at(root: nnx.Module, path: str | tuple) -> Any:
  """Returns the submodule or param at ``path``.

  ``path`` is dotted (``"transformer_blocks.0.attn1.to_q"``) or an NNX state-path tuple;
  integer parts index ``nnx.List``s.
  """
  parts = path.split(".") if isinstance(path, str) else path
  node = root
  for p in parts:
    if isinstance(p, int) or (isinstance(p, str) and p.isdigit()):
      node = node[int(p)]
    else:
      node = getattr(node, p)
  return node


def torch_layout(model: nnx.Module) -> dict[str, tuple[tuple, Any, Any]]:
  """Maps each torch state-dict key to ``(flax path, to_flax, to_torch)`` for ``model``.

  A param owned by a layer with ``TORCH_PARAMS`` takes that layer's torch name and layout;
  any other ``nnx.Param`` keeps its own name and layout.
  """
  _, state = nnx.split(model, nnx.Param)
  out = {}
  for path, _ in nnx.to_flat_state(state):
    owner = module_at(model, path[:-1])
    spec = getattr(type(owner), "TORCH_PARAMS", {}).get(path[-1])
    name, to_flax, to_torch = spec if spec else (path[-1], None, None)
    key = ".".join(str(p) for p in path[:-1] + (name,))
    out[key] = (path, to_flax, to_torch)
  return out


@functools.lru_cache(maxsize=None)
def _expected_torch_shape(flax_shape: tuple[int, ...], to_torch) -> tuple[int, ...]:
  # Cached: blocks repeat a handful of shapes, and each probe allocates a (bool) tensor.
  if to_torch is None:
    return flax_shape
  return to_torch(np.empty(flax_shape, np.bool_)).shape


def read_config(folder: str | os.PathLike) -> dict[str, Any]:
  """Reads ``folder/config.json``.

  Raises:
    CheckpointError: no such folder, no or corrupt ``config.json``, or no ``_class_name``.
  """
  folder = Path(folder)
  if not folder.is_dir():
    raise CheckpointError(f"{folder}: no such checkpoint folder")
  cfg = folder / CONFIG_NAME
  if not cfg.is_file():
    raise CheckpointError(f"{folder}: missing {CONFIG_NAME}")
  try:
    config = json.loads(cfg.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CheckpointError(f"{cfg}: corrupt JSON: {e}") from None
  if not isinstance(config, dict) or "_class_name" not in config:
    raise CheckpointError(f"{cfg}: no _class_name")
  return config


def check_shapes(layout: dict[str, tuple[tuple, Any, Any]], flat: dict[tuple, Any],
                 shapes: dict[str, tuple[int, ...]]) -> None:
  """Compares the torch keys/shapes ``layout`` expects with ``shapes`` (key -> torch shape).

  Raises:
    CheckpointMismatchError: listing every missing, unexpected and misshapen key.
  """
  missing = sorted(k for k in layout if k not in shapes)
  unexpected = sorted(k for k in shapes if k not in layout)
  mismatched = []
  for key, (path, _, to_torch) in layout.items():
    if key in shapes:
      want = _expected_torch_shape(tuple(flat[path].get_value().shape), to_torch)
      if tuple(shapes[key]) != want:
        mismatched.append((key, tuple(shapes[key]), want))
  if missing or unexpected or mismatched:
    raise CheckpointMismatchError(missing, unexpected, sorted(mismatched))


def _fill(model: nnx.Module, shapes: dict[str, tuple[int, ...]], read: Callable[[str], Any], *,
          dtype, progress: bool, desc: str) -> nnx.Module:
  """Checks every key and shape first, then sets each param from ``read(key)``, one at a time.

  Float tensors become ``dtype`` (``None``: keep the tensor's dtype); others keep theirs.
  """
  layout = torch_layout(model)
  graphdef, state = nnx.split(model)
  flat = dict(nnx.to_flat_state(state))
  check_shapes(layout, flat, shapes)
  for key in tqdm(sorted(layout), desc=desc, disable=not progress):
    path, to_flax, _ = layout[key]
    t = np.asarray(read(key))
    if to_flax is not None:
      t = to_flax(t)
    to = dtype if dtype is not None and jnp.issubdtype(t.dtype, jnp.floating) else t.dtype
    flat[path].set_value(jnp.asarray(t, dtype=to))
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


def load_into(abstract: nnx.Module, folder: str | os.PathLike, *, dtype,
              progress: bool | None = None) -> nnx.Module:
  """Fills ``abstract`` (from ``nnx.eval_shape``) with the checkpoint's tensors.

  At most one tensor is held on the host besides the model's own arrays.

  Raises:
    CheckpointError: missing/corrupt/truncated weights files or index.
    CheckpointMismatchError: listing every missing, unexpected and misshapen key; raised from the
      headers alone, before any tensor is read.
  """
  folder = Path(folder)
  files = open_weights(folder)
  try:
    shapes = {k: f.shape(k) for k, f in files.items()}
    if progress is None:
      progress = len(shapes) > 200
    return _fill(abstract, shapes, lambda k: files[k].read(k), dtype=dtype, progress=progress,
                 desc=f"loading {folder.name}")
  finally:
    for f in set(files.values()):
      f.close()


def load_state_dict(model: nnx.Module, state_dict: Mapping[str, Any], *, dtype=None
                    ) -> nnx.Module:
  """Returns ``model`` (concrete or from ``nnx.eval_shape``) filled from a torch-named mapping.

  ``state_dict`` maps torch keys to arrays (NumPy, or anything ``np.asarray`` reads, e.g. a
  CPU float32 torch tensor); ``dtype=None`` keeps each tensor's dtype.

  Raises:
    CheckpointMismatchError: listing every missing, unexpected and misshapen key.
  """
  shapes = {k: tuple(v.shape) for k, v in state_dict.items()}
  return _fill(model, shapes, state_dict.__getitem__, dtype=dtype, progress=False,
               desc="loading")


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
      t = np.asarray(jax.device_get(flat[path].get_value()))
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

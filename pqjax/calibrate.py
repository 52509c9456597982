"""Calibration (PermuQuant step 1): per-input-channel statistics of every quantized linear.

Each tapped linear is wrapped in a ``Tap`` that accumulates, per input channel, ``sum x**2``,
``max |x|`` and the token count, and keeps a fixed-size uniform sample of input tokens
(bottom-k sampling with priorities from a fixed key) for the acceptance error. Memory is
independent of the number of batches; the forward is one jitted function per input shape.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from pqjax.fold import get_module, set_module

Array = jax.Array


class CalibrationError(ValueError):
  """Calibration inputs the model cannot use (the message names the input and batch)."""


class NonFiniteInputError(CalibrationError):
  """A calibration batch holds NaN or Inf."""


class BatchShapeError(CalibrationError):
  """A calibration batch whose keys or shapes do not fit the model's forward."""


class CalibStat(nnx.Variable):
  """A calibration statistic (state, not a parameter)."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerStats:
  """Statistics of one linear's input ``x (..., K)`` over all calibration tokens.

  Attributes:
    sumsq: ``(K,)`` float32 sum of ``x**2``.
    amax: ``(K,)`` float32 max of ``|x|``.
    count: float32 number of tokens.
    sample: ``(error_tokens, K)`` uniformly sampled tokens (zero rows if fewer were seen).
  """

  sumsq: Array
  amax: Array
  count: Array
  sample: Array


class Tap(nnx.Module):
  """Wraps a linear: records input statistics, then calls it unchanged."""

  def __init__(self, inner: nnx.Module, *, width: int, dtype, error_tokens: int, index: int,
               seed: int):
    self.inner = inner
    self.index = index
    self.seed = seed
    self.sumsq = CalibStat(jnp.zeros((width,), jnp.float32))
    self.amax = CalibStat(jnp.zeros((width,), jnp.float32))
    self.count = CalibStat(jnp.zeros((), jnp.float32))
    self.sample = CalibStat(jnp.zeros((error_tokens, width), dtype))
    self.priority = CalibStat(jnp.full((error_tokens,), -1.0, jnp.float32))
    self.step = CalibStat(jnp.zeros((), jnp.uint32))

  def __call__(self, x: Array) -> Array:
    x2 = x.reshape(-1, x.shape[-1])
    xf = x2.astype(jnp.float32)
    self.sumsq.set_value(self.sumsq[...] + jnp.sum(jnp.square(xf), axis=0))
    self.amax.set_value(jnp.maximum(self.amax[...], jnp.max(jnp.abs(xf), axis=0)))
    self.count.set_value(self.count[...] + x2.shape[0])
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(self.seed), self.index),
                             self.step[...])
    sample, priority = _reservoir(self.sample[...], self.priority[...], x2, key)
    self.sample.set_value(sample)
    self.priority.set_value(priority)
    self.step.set_value(self.step[...] + 1)
    return self.inner(x)

  def stats(self) -> LayerStats:
    return LayerStats(self.sumsq[...], self.amax[...], self.count[...], self.sample[...])


def _reservoir(sample: Array, priority: Array, x: Array, key: Array) -> tuple[Array, Array]:
  """Keeps the rows of ``sample`` and ``x`` with the largest random priorities.

  Priorities are i.i.d. uniform per token, so the kept rows are a uniform sample without
  replacement of every token seen so far, whatever the batching.
  """
  k, n = sample.shape[0], x.shape[0]
  p = jax.random.uniform(key, (n,), jnp.float32)
  top_p, idx = jax.lax.top_k(p, min(k, n))
  rows = jnp.concatenate([sample, jnp.take(x, idx, axis=0).astype(sample.dtype)])
  best, keep = jax.lax.top_k(jnp.concatenate([priority, top_p]), k)
  return jnp.take(rows, keep, axis=0), best


# ----------------------------------------------------------------------------- batches


def as_batches(calib_batch: Mapping[str, Any] | Iterable[Mapping[str, Any]]
               ) -> Iterable[Mapping[str, Any]]:
  """One dict of forward inputs, or an iterable of them, as an iterable of dicts."""
  if isinstance(calib_batch, Mapping):
    return [calib_batch]
  if isinstance(calib_batch, (str, bytes)) or not isinstance(calib_batch, Iterable):
    raise CalibrationError(f"calib_batch must be a dict of forward inputs or an iterable of "
                           f"dicts, got {type(calib_batch).__name__}")
  return calib_batch


def _is_array(v: Any) -> bool:
  return isinstance(v, (jax.Array, np.ndarray))


def split_batch(batch: Any, index: int) -> tuple[dict[str, Any], tuple[tuple[str, Any], ...]]:
  """Validates one batch; returns (array inputs, hashable static inputs).

  Raises:
    BatchShapeError: not a dict.
    NonFiniteInputError: NaN/Inf in a floating input (names the key and batch index).
  """
  if not isinstance(batch, Mapping):
    raise BatchShapeError(f"calibration batch {index} is a {type(batch).__name__}, expected a "
                          f"dict of forward keyword inputs")
  arrays, static = {}, []
  for key, v in batch.items():
    leaves = jax.tree.leaves(v)
    if leaves and all(_is_array(leaf) for leaf in leaves):  # an array or a pytree of arrays
      for leaf in leaves:
        if jnp.issubdtype(leaf.dtype, jnp.inexact) and not bool(jnp.all(jnp.isfinite(leaf))):
          bad = int(jnp.sum(~jnp.isfinite(leaf)))
          raise NonFiniteInputError(f"calibration input {key!r} of batch {index} (shape "
                                    f"{tuple(leaf.shape)}) holds {bad} NaN/Inf value(s)")
      arrays[key] = v
    else:
      try:
        hash(v)
      except TypeError:
        raise BatchShapeError(f"calibration input {key!r} of batch {index} is a "
                              f"{type(v).__name__}: pass arrays or hashable values") from None
      static.append((key, v))
  return arrays, tuple(sorted(static))


def check_signature(model: nnx.Module, batch: Mapping[str, Any], index: int) -> None:
  """Raises ``BatchShapeError`` for keys the forward does not take, or missing required ones."""
  sig = inspect.signature(type(model).__call__)
  params = list(sig.parameters.values())[1:]
  if any(p.kind == p.VAR_KEYWORD for p in params):
    return
  names = {p.name for p in params}
  unknown = sorted(set(batch) - names)
  if unknown:
    raise BatchShapeError(f"calibration batch {index}: input(s) {unknown} are not arguments of "
                          f"{type(model).__name__}.__call__ {sorted(names)}")
  missing = [p.name for p in params if p.default is p.empty and p.name not in batch
             and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
  if missing:
    raise BatchShapeError(f"calibration batch {index}: missing required input(s) {missing} of "
                          f"{type(model).__name__}.__call__")


def _shapes(arrays: Mapping[str, Any]) -> dict[str, Any]:
  return {k: jax.tree.map(lambda a: (tuple(a.shape), jnp.dtype(a.dtype).name), v)
          for k, v in arrays.items()}


def check_fits(model: nnx.Module, arrays: dict[str, Any], static, index: int) -> None:
  """Traces the forward abstractly; a failure becomes ``BatchShapeError`` naming the shapes."""
  graphdef, state = nnx.split(model)

  def fwd(state, arrays):
    return nnx.merge(graphdef, state)(**arrays, **dict(static))

  try:
    jax.eval_shape(fwd, state, arrays)
  except Exception as e:  # any trace failure here is the inputs' fault: name them
    raise BatchShapeError(f"calibration batch {index} does not fit {type(model).__name__}: "
                          f"inputs {_shapes(arrays)}: {type(e).__name__}: {e}") from e


# ----------------------------------------------------------------------------- calibration


def _forward_step(graphdef, stats, rest, arrays, static):
  model = nnx.merge(graphdef, stats, rest)
  model(**arrays, **dict(static))
  return nnx.state(model, CalibStat)


def calibrate(model: nnx.Module, paths: Sequence[str], batches: Iterable[Mapping[str, Any]], *,
              error_tokens: int, seed: int, progress: bool | None = None
              ) -> dict[str, LayerStats]:
  """Runs the model over ``batches`` and returns the input statistics of each linear in ``paths``.

  Args:
    model: the model (not modified: taps go into a clone sharing its arrays).
    paths: dotted paths of the linears to tap.
    batches: dicts of forward keyword inputs.
    error_tokens: tokens kept per linear for the acceptance error.
    seed: seed of the token sample.
    progress: tqdm progress bar (None: only on a terminal).

  Returns:
    ``{path: LayerStats}``.

  Raises:
    CalibrationError: bad batches (see ``split_batch``, ``check_fits``), no batch at all, a
      tapped layer never reached, or non-finite activations (names the layer).
  """
  tapped = nnx.clone(model)
  for i, path in enumerate(paths):
    lin = get_module(tapped, path)
    kernel = lin.kernel[...]
    set_module(tapped, path, Tap(lin, width=kernel.shape[0], dtype=kernel.dtype,
                                 error_tokens=error_tokens, index=i, seed=seed))
  graphdef, stats, rest = nnx.split(tapped, CalibStat, ...)
  # a closure, not a static argument: model configs (dicts) make graphdefs unhashable
  step = jax.jit(functools.partial(_forward_step, graphdef), static_argnums=(3,),
                 donate_argnums=(0,))
  seen: set = set()
  n = 0
  total = len(batches) if hasattr(batches, "__len__") else None
  for index, batch in enumerate(tqdm(batches, total=total, desc="calibration",
                                     disable=tqdm_disable(progress), leave=False)):
    arrays, static = split_batch(batch, index)
    signature = (repr(sorted(_shapes(arrays).items())), static)
    if signature not in seen:  # the signature fixes the batch's keys, so both checks hold
      check_signature(model, batch, index)
      check_fits(model, arrays, static, index)
      seen.add(signature)
    stats = step(stats, rest, arrays, static)
    n += 1
  if n == 0:
    raise CalibrationError("calib_batch holds no batch")
  nnx.update(tapped, stats)
  out = {}
  for path in paths:
    s = get_module(tapped, path).stats()
    if float(s.count) == 0:
      raise CalibrationError(f"layer {path!r} was never called by the calibration forward")
    if not bool(jnp.all(jnp.isfinite(s.sumsq))):
      raise CalibrationError(f"layer {path!r}: calibration activations overflowed (non-finite "
                             f"second moments); check the model dtype and inputs")
    out[path] = s
  return out


def tqdm_disable(progress: bool | None) -> bool | None:
  """tqdm's ``disable`` for a ``progress`` flag (None: tqdm shows bars only on a terminal)."""
  return None if progress is None else not progress

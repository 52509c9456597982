"""Folding channel permutations into a model's parameters (PermuQuant step 4).

A permutation ``p`` of a site's activation ``a`` is absorbed so that the consumers compute
``a[..., p] @ W[p, :] == a @ W``: consumers' input rows are permuted, and whatever makes ``a``
(a norm, producer output columns, channel-wise params) is permuted alike. The array functions
are pure; ``fold_site`` applies them to a model in place (call it on an ``nnx.clone``).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.typing import ArrayLike

from pqjax.sites import Site

Array = jax.Array


class FoldError(ValueError):
  """A site names a module that is missing or of a kind that cannot absorb a permutation."""


def embed_permutation(perm: ArrayLike, offset: int, length: int) -> Array:
  """A length-``length`` index vector: identity outside ``[offset, offset + len(perm))``."""
  perm = jnp.asarray(perm, jnp.int32)
  width = perm.shape[0]
  if offset < 0 or offset + width > length:
    raise FoldError(f"permutation of width {width} at offset {offset} exceeds axis length "
                    f"{length}")
  idx = jnp.arange(length, dtype=jnp.int32)
  return idx.at[offset:offset + width].set(perm + offset)


def permute_axis(x: ArrayLike, perm: ArrayLike, axis: int, offset: int = 0) -> Array:
  """Returns ``x`` with entries ``[offset, offset + len(perm))`` on ``axis`` gathered by ``perm``.

  Args:
    x: array.
    perm: int permutation of ``range(width)``.
    axis: permuted axis.
    offset: first index of the permuted window on ``axis``.

  Returns:
    Array shaped like ``x``: ``out[offset + i] = x[offset + perm[i]]`` along ``axis``.
  """
  x = jnp.asarray(x)
  return jnp.take(x, embed_permutation(perm, offset, x.shape[axis]), axis=axis)


def is_bijection(perm: ArrayLike, width: int) -> bool:
  """Whether ``perm`` is an int32 vector holding each of ``0..width-1`` exactly once."""
  p = np.asarray(perm)
  return (p.dtype == np.int32 and p.shape == (width,)
          and bool(np.array_equal(np.sort(p), np.arange(width))))


# ----------------------------------------------------------------------------- module paths


def dotted_path(path: tuple) -> str:
  """The dotted form (``"transformer_blocks.0.attn1"``) of an NNX graph or state path."""
  return ".".join(str(p) for p in path)


def get_module(model: nnx.Module, path: str):
  """The submodule (or attribute) at dotted ``path``; integer parts index lists."""
  node = model
  for part in path.split("."):
    try:
      node = node[int(part)] if part.isdigit() else getattr(node, part)
    except (AttributeError, IndexError, KeyError, TypeError):
      raise FoldError(f"model has no module at {path!r} (failed at {part!r})") from None
  return node


def set_module(model: nnx.Module, path: str, module) -> None:
  """Replaces the submodule at dotted ``path`` by ``module``."""
  parent_path, _, last = path.rpartition(".")
  parent = get_module(model, parent_path) if parent_path else model
  if last.isdigit():
    parent[int(last)] = module
  else:
    setattr(parent, last, module)


def _param(module, name: str, path: str) -> nnx.Variable:
  var = getattr(module, name, None)
  if not isinstance(var, nnx.Variable):
    raise FoldError(f"{path}: expected a parameter {name!r}, found {type(var).__name__}")
  return var


def _permute_param(var: nnx.Variable, perm: Array, axis: int, offset: int) -> None:
  var.set_value(permute_axis(var[...], perm, axis, offset))


# ----------------------------------------------------------------------------- folding


def fold_site(model: nnx.Module, site: Site, perm: ArrayLike,
              consumers: Sequence[str] | None = None) -> None:
  """Folds ``perm`` at ``site`` into ``model`` in place; the output is unchanged in real math.

  Consumers' kernel rows are permuted. Then by kind: ``"norm"`` swaps the Norm for a
  ``GatheredNorm``; ``"producer"`` permutes producer kernel columns, biases and the
  channel-wise params; ``"input"`` makes each consumer gather its input (``GatheredLinear``,
  which the quantizer turns into a ``QuantLinear`` with ``in_perm``).

  Args:
    model: the model to edit (a clone: it is mutated).
    site: the site.
    perm: int32 permutation of ``range(site.width)``.
    consumers: for ``"input"`` sites, the consumer paths to gather (default: all); other
      consumers of an input site keep their rows and read the unpermuted activation.

  Raises:
    FoldError: a path that does not name a linear/norm/param, or a bad permutation.
  """
  from pqjax.qmodules import GatheredLinear, GatheredNorm  # qmodules imports this module

  perm = jnp.asarray(perm, jnp.int32)
  if perm.shape != (site.width,):
    raise FoldError(f"site {site.name}: permutation of shape {perm.shape}, expected "
                    f"({site.width},)")
  chosen = [c for c in site.consumers if consumers is None or c.path in consumers]
  for c in chosen:
    lin = get_module(model, c.path)
    _permute_param(_param(lin, "kernel", c.path), perm, 0, c.offset)
    if site.kind == "input":
      k = lin.kernel.shape[0]
      if isinstance(lin, GatheredLinear):
        lin.in_perm.set_value(jnp.take(lin.in_perm[...], embed_permutation(perm, c.offset, k)))
      else:
        set_module(model, c.path,
                   GatheredLinear.from_linear(lin, embed_permutation(perm, c.offset, k)))
  if site.kind == "norm":
    norm = get_module(model, site.norm)
    if not hasattr(norm, "kind") or not hasattr(norm, "eps"):
      raise FoldError(f"site {site.name}: {site.norm!r} is a {type(norm).__name__}, not a Norm")
    set_module(model, site.norm, GatheredNorm.from_norm(norm, perm))
  elif site.kind == "producer":
    for p in site.producers:
      lin = get_module(model, p.path)
      _permute_param(_param(lin, "kernel", p.path), perm, 1, p.offset)
      if getattr(lin, "bias", None) is not None:
        _permute_param(lin.bias, perm, 0, p.offset)
    for cp in site.channelwise:
      _permute_param(_param(get_module(model, cp.module), cp.name, cp.module), perm, cp.axis,
                     cp.offset)

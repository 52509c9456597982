"""``pqjax.quantize``: calibrate, search, accept, fold, quantize a converted DiT.

The pipeline is generic: it reads the model's ``permutation_sites()`` and touches only the
modules they name. ``calibration="fp"`` calibrates all sites in one pass of the float model;
``"sequential"`` does one pass per transformer block, each with the blocks before it already
quantized (so it sees their errors), which costs one pass over the data per block.
"""

from __future__ import annotations

import fnmatch
import functools
import re
import time
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from pqjax import calibrate as calib
from pqjax import dispatch, search
from pqjax.config import ConfigError, QuantConfig
from pqjax.fold import FoldError, embed_permutation, fold_site, get_module, set_module
from pqjax.hadamard import rotate_kernel_rows
from pqjax.qmatmul import quantize_weight
from pqjax.qmodules import GatheredLinear, QuantInfo, QuantLinear, prepare_kernel_weights
from pqjax.search import SiteData, SiteDecision
from pqjax.sites import Site

Array = jax.Array


class UnsupportedModelError(ValueError):
  """``quantize`` got something that is not a converted model listing permutation sites."""


def as_model(params: Any) -> nnx.Module:
  """The model to quantize; raises ``UnsupportedModelError`` for anything else."""
  if not isinstance(params, nnx.Module):
    raise UnsupportedModelError(
        f"pqjax.quantize needs a converted model (an nnx.Module from converters."
        f"from_diffusers/from_config), got {type(params).__name__}")
  if not callable(getattr(params, "permutation_sites", None)):
    raise UnsupportedModelError(f"{type(params).__name__} has no permutation_sites(): not a "
                                f"model pqjax knows how to quantize")
  if hasattr(params, "pqjax_info"):
    raise UnsupportedModelError(f"this {type(params).__name__} is already quantized")
  return params


def _kernel(model: nnx.Module, path: str) -> Array:
  mod = get_module(model, path)
  var = getattr(mod, "kernel", None)
  kernel = var[...] if isinstance(var, nnx.Variable) else None
  if kernel is None or kernel.ndim != 2:
    raise UnsupportedModelError(f"{path!r} is a {type(mod).__name__}, not a linear with a "
                                f"(in, out) kernel")
  return kernel


def validate(model: nnx.Module, sites: tuple[Site, ...], cfg: QuantConfig,
             quantized: set[str]) -> None:
  """Checks the sites against the model and the config before any work.

  Raises:
    UnsupportedModelError: a site names a missing or non-linear module, overlapping sites.
    ConfigError: a group size that does not divide a quantized layer's input width (names
      the layer), or a Hadamard method with a group size that is not a power of two.
  """
  g = cfg.resolved_group_size
  if cfg.method in ("permuquant-h", "auto") and g & (g - 1):
    raise ConfigError(f"method {cfg.method!r} rotates groups with a Hadamard matrix and needs a "
                      f"power-of-two group_size, got {g}")
  names = set()
  windows: dict[str, list[tuple[int, int, str]]] = {}
  for site in sites:
    if site.name in names:
      raise UnsupportedModelError(f"duplicate site name {site.name!r}")
    names.add(site.name)
    for c in site.consumers:
      k = _kernel(model, c.path).shape[0]
      if c.offset + site.width > k:
        raise UnsupportedModelError(f"site {site.name}: consumer {c.path} has {k} inputs, fewer "
                                    f"than offset {c.offset} + width {site.width}")
      for lo, hi, other in windows.get(c.path, []):
        if c.offset < hi and lo < c.offset + site.width:
          raise UnsupportedModelError(f"sites {other} and {site.name} overlap on {c.path}")
      windows.setdefault(c.path, []).append((c.offset, c.offset + site.width, site.name))
    for p in site.producers:
      n = _kernel(model, p.path).shape[1]
      if p.offset + site.width > n:
        raise UnsupportedModelError(f"site {site.name}: producer {p.path} has {n} outputs, fewer "
                                    f"than offset {p.offset} + width {site.width}")
    if site.kind == "norm":
      norm = get_module(model, site.norm)
      if not all(hasattr(norm, a) for a in ("kind", "eps", "weight", "bias", "dim")):
        raise UnsupportedModelError(f"site {site.name}: {site.norm!r} is a "
                                    f"{type(norm).__name__}, not a Norm")
  for path in sorted(quantized):
    k = _kernel(model, path).shape[0]
    if k % g or k % 2:
      raise ConfigError(f"group_size {g} does not divide the input width {k} of layer {path!r}"
                        f" ({cfg.format}); choose another group_size or keep the layer in "
                        f"float (keep_float)")


def quantized_paths(sites: tuple[Site, ...], cfg: QuantConfig) -> list[str]:
  """Consumer paths that get quantized (all but ``keep_float`` matches), in site order."""
  out = []
  for site in sites:
    for c in site.consumers:
      if c.path not in out and not any(fnmatch.fnmatchcase(c.path, pat)
                                       for pat in cfg.keep_float):
        out.append(c.path)
  return out


def block_groups(sites: tuple[Site, ...]) -> list[tuple[Site, ...]]:
  """Sites grouped by transformer block (the first consumer's path up to its first index)."""
  groups: dict[str, list[Site]] = {}
  for site in sites:
    m = re.match(r"^(.*?\.\d+)(\.|$)", site.consumers[0].path)
    groups.setdefault(m.group(1) if m else "", []).append(site)
  return [tuple(v) for v in groups.values()]


def site_data(model: nnx.Module, site: Site, stats: Mapping[str, calib.LayerStats],
              paths: list[str]) -> SiteData:
  """Slices the calibration statistics and float kernels of ``site``'s quantized consumers."""
  w = site.width
  xs, ws, rest, amax = [], [], [], []
  sumsq = jnp.zeros((w,), jnp.float32)
  count = jnp.zeros((), jnp.float32)
  for c in site.consumers:
    if c.path not in paths:
      continue
    s = stats[c.path]
    sl = slice(c.offset, c.offset + w)
    xs.append(s.sample[:, sl].astype(jnp.float32))
    ws.append(_kernel(model, c.path)[sl].astype(jnp.float32))
    amax.append(s.amax[sl])
    outside = jnp.concatenate([s.amax[:c.offset], s.amax[c.offset + w:], jnp.zeros((1,))])
    rest.append(jnp.max(outside))
    sumsq = sumsq + s.sumsq[sl]
    count = count + s.count
  return SiteData(xs, ws, jnp.max(jnp.stack(amax), axis=0), rest,
                  sumsq / jnp.maximum(count, 1.0))


def _skip_reason(site: Site, cfg: QuantConfig, paths: list[str]) -> str:
  g = cfg.resolved_group_size
  if not any(c.path in paths for c in site.consumers):
    return "all consumers stay in float"
  if cfg.method == "rtn":
    return "method rtn"
  if site.width < g or site.width % g:
    return f"width {site.width} is not a multiple of group_size {g}"
  offsets = [c.offset for c in site.consumers if c.offset % g]
  if offsets:
    return f"consumer offset {offsets[0]} is not a multiple of group_size {g}"
  return ""


@functools.partial(jax.jit, static_argnames=("fmt", "group_size", "rotate"))
def _quantize_kernel(kernel: Array, *, fmt: str, group_size: int, rotate: bool):
  k = kernel.astype(jnp.float32)
  if rotate:
    k = rotate_kernel_rows(k, group_size)
  return quantize_weight(k, fmt, group_size)


def _quantize_layer(model: nnx.Module, path: str, stats: calib.LayerStats, row_perm: Array,
                    rotate: bool, cfg: QuantConfig) -> None:
  lin = get_module(model, path)
  kernel = lin.kernel[...]
  g = cfg.resolved_group_size
  qt = _quantize_kernel(kernel, fmt=cfg.format, group_size=g, rotate=rotate)
  ts = (search.static_act_tensor_scale(jnp.take(stats.amax, row_perm), g, rotate)
        if cfg.static_act_scale else None)
  in_perm = lin.in_perm[...] if isinstance(lin, GatheredLinear) else None
  bias = None if lin.bias is None else lin.bias[...]
  set_module(model, path, QuantLinear(qt, bias, act_format=cfg.act_format, act_tensor_scale=ts,
                                      in_perm=in_perm, rotate=rotate, out_dtype=kernel.dtype))


def quantize(params: nnx.Module, calib_batch: Mapping[str, Any] | Iterable[Mapping[str, Any]],
             config: QuantConfig = QuantConfig(), *, progress: bool | None = None,
             timings: dict[str, float] | None = None) -> nnx.Module:
  """Quantizes a converted DiT with PermuQuant.

  Args:
    params: a converted model (``converters.from_diffusers``/``from_config``); not modified.
    calib_batch: a dict of the model's forward keyword inputs with a leading batch axis, or an
      iterable of such dicts (streamed once; kept in memory for ``"sequential"``).
    config: the ``QuantConfig``.
    progress: tqdm progress bars (None: only on a terminal).
    timings: if given, filled with seconds spent per stage ("calibration", "search",
      "fold_quantize"), summed over blocks.

  Returns:
    A model of the same class and call signature whose block linears are ``QuantLinear`` and
    whose permuted norms are ``GatheredNorm``; ``model.pqjax_info`` holds the decisions.
    Where the ``"mosaic"`` backend (Hopper) is the default, the linears also hold the GPU
    kernels' weight layout (``pqjax.qmodules.prepare_kernel_weights``).

  Raises:
    UnsupportedModelError: not a converted model with permutation sites.
    ConfigError: a config that does not fit the model (e.g. a group size, naming the layer).
    CalibrationError: bad calibration batches (names the input and the batch index).
  """
  model = as_model(params)
  sites = tuple(model.permutation_sites())
  if not sites:
    raise UnsupportedModelError(f"{type(model).__name__} lists no permutation sites")
  paths = quantized_paths(sites, config)
  validate(model, sites, config, set(paths))
  batches = calib.as_batches(calib_batch)
  groups = [sites]
  if config.calibration == "sequential":
    groups = block_groups(sites)
    batches = list(batches)
  qmodel = nnx.clone(model)
  clock = _Clock(timings)
  index = {site.name: i for i, site in enumerate(sites)}
  decisions: dict[str, tuple[SiteDecision, np.ndarray]] = {}
  rotate: dict[str, bool] = {}
  disable = calib.tqdm_disable(progress)
  for group in tqdm(groups, desc="blocks", disable=True if len(groups) == 1 else disable,
                    leave=False):
    gpaths = quantized_paths(group, config)
    _check_producers(qmodel, group)
    stats = calib.calibrate(qmodel, gpaths, batches, error_tokens=config.error_tokens,
                            seed=config.seed, progress=progress)
    clock.lap("calibration")
    for site in tqdm(group, desc="sites", disable=disable, leave=False):
      decisions[site.name] = _decide(model, site, stats, gpaths, config, index[site.name],
                                     rotate)
    clock.lap("search")
    for site in group:
      dec, perm = decisions[site.name]
      if dec.permuted:
        fold_site(qmodel, site, perm,
                  consumers=gpaths if site.kind == "input" else None)
    for path in gpaths:
      row_perm = jnp.arange(_kernel(model, path).shape[0], dtype=jnp.int32)
      for site in group:
        dec, perm = decisions[site.name]
        for c in site.consumers:
          if c.path == path and dec.permuted:
            row_perm = jnp.take(row_perm, embed_permutation(perm, c.offset, row_perm.shape[0]))
      _quantize_layer(qmodel, path, stats[path], row_perm, rotate.get(path, False), config)
    jax.block_until_ready(nnx.state(qmodel))
    clock.lap("fold_quantize")
  ordered = [decisions[s.name] for s in sites]
  qmodel.pqjax_info = QuantInfo(config, sites, tuple(d for d, _ in ordered),
                                np.concatenate([p for _, p in ordered]))
  if dispatch.current_backend() == "mosaic":  # the kernels' weight layout, once
    prepare_kernel_weights(qmodel)
  return qmodel


def _decide(model, site: Site, stats, gpaths: list[str], cfg: QuantConfig, index: int,
            rotate: dict[str, bool]) -> tuple[SiteDecision, np.ndarray]:
  identity = np.arange(site.width, dtype=np.int32)
  reason = _skip_reason(site, cfg, gpaths)
  qcons = [c.path for c in site.consumers if c.path in gpaths]
  if reason:
    for p in qcons:
      rotate.setdefault(p, False)
    return SiteDecision(site.name, site.kind, site.width, reason=reason), identity
  fixed = {rotate[p] for p in qcons if p in rotate}
  data = site_data(model, site, stats, gpaths)
  dec, perm = search.decide(site.name, site.kind, data, cfg, head_dim=site.head_dim,
                            index=index, rotate_options=tuple(sorted(fixed))[:1] or None)
  for p in qcons:
    rotate.setdefault(p, dec.rotate)
  return dec, perm


def _check_producers(model: nnx.Module, group: tuple[Site, ...]) -> None:
  for site in group:
    for p in site.producers:
      if isinstance(get_module(model, p.path), QuantLinear):
        raise FoldError(f"site {site.name}: producer {p.path} was quantized with an earlier "
                        f"block; sequential calibration needs producers inside the block")


class _Clock:
  """Accumulates wall time per stage into ``timings`` (no-op when it is None)."""

  def __init__(self, timings: dict[str, float] | None):
    self.timings = timings
    self.last = time.perf_counter()

  def lap(self, stage: str) -> None:
    now = time.perf_counter()
    if self.timings is not None:
      self.timings[stage] = self.timings.get(stage, 0.0) + now - self.last
    self.last = now

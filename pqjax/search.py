"""Per-site search (PermuQuant steps 2-3): scores, sorting, candidate errors, acceptance.

For a site with activation second moments ``m_a`` and weight second moments ``m_w`` (rows of
all consumers, output columns concatenated), the score is ``m_a**alpha * m_w**(1 - alpha)``
(computed in the log domain) and the permutation sorts it in descending order with
``jax.lax.sort`` (stable, so equal inputs give equal permutations). A head-aligned site sorts
inside each head. Every candidate transform (permutation and/or block Hadamard) is scored by
the layer output error ``sum_c ||x W_c - Q(x') Q(W_c')||^2`` on the site's token sample, with
the quantizers the model will use; the candidates are evaluated together with ``vmap``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pqjax import formats
from pqjax.config import QuantConfig
from pqjax.hadamard import block_hadamard, rotate_kernel_rows

Array = jax.Array
_TINY = 1e-30


@dataclasses.dataclass(frozen=True)
class SiteDecision:
  """What the search chose for one site (hashable: kept as static model metadata).

  Attributes:
    name: site name.
    kind: site kind.
    width: channels.
    transform: "identity", "perm", "hadamard" or "perm+hadamard".
    alpha: score exponent of the chosen permutation (None: no sorted permutation).
    accepted: whether a transform other than the method's baseline was kept.
    err_identity: calibration error with no transform (nan when not measured).
    err_chosen: calibration error of the chosen transform.
    reason: why identity was kept, or "" .
  """

  name: str
  kind: str
  width: int
  transform: str = "identity"
  alpha: float | None = None
  accepted: bool = False
  err_identity: float = float("nan")
  err_chosen: float = float("nan")
  reason: str = ""

  @property
  def permuted(self) -> bool:
    return self.transform in ("perm", "perm+hadamard")

  @property
  def rotate(self) -> bool:
    return self.transform in ("hadamard", "perm+hadamard")


@dataclasses.dataclass
class SiteData:
  """A site's calibration data, sliced to its channels, for each quantized consumer.

  Attributes:
    xs: ``(T, width)`` float32 token samples.
    ws: ``(width, N_c)`` float32 kernel rows.
    amax: ``(width,)`` per-channel activation amax (max over consumers).
    rest_amax: per consumer, the activation amax outside the site's channels.
    m_a: ``(width,)`` activation second moment.
  """

  xs: list[Array]
  ws: list[Array]
  amax: Array
  rest_amax: list[Array]
  m_a: Array

  @property
  def m_w(self) -> Array:
    return jnp.mean(jnp.square(jnp.concatenate(self.ws, axis=1)), axis=1)


# ----------------------------------------------------------------------------- orderings


def score(m_a: Array, m_w: Array, alpha: float | Array) -> Array:
  """``log(m_a**alpha * m_w**(1 - alpha))``: same order as the score, no under/overflow."""
  la = jnp.log(jnp.maximum(m_a.astype(jnp.float32), _TINY))
  lw = jnp.log(jnp.maximum(m_w.astype(jnp.float32), _TINY))
  return alpha * la + (1.0 - alpha) * lw


def sort_descending(v: Array, head_dim: int | None = None) -> Array:
  """int32 permutation sorting ``v`` in descending order (stable); per head if ``head_dim``."""
  w = v.shape[-1]
  hd = head_dim or w
  vh = v.reshape(w // hd, hd)
  iota = jax.lax.broadcasted_iota(jnp.int32, vh.shape, 1)
  _, idx = jax.lax.sort((-vh, iota), dimension=1, num_keys=1, is_stable=True)
  return (idx + jnp.arange(0, w, hd, dtype=jnp.int32)[:, None]).reshape(w)


@functools.partial(jax.jit, static_argnames=("head_dim",))
def sorted_permutations(m_a: Array, m_w: Array, alphas: Array,
                        head_dim: int | None = None) -> Array:
  """``(len(alphas), width)`` permutations sorting the score for each alpha."""
  return jax.vmap(lambda a: sort_descending(score(m_a, m_w, a), head_dim))(alphas)


def random_permutation(key: Array, width: int, head_dim: int | None = None) -> Array:
  """A uniformly random int32 permutation (inside each head if ``head_dim``)."""
  return sort_descending(jax.random.uniform(key, (width,)), head_dim)


# ----------------------------------------------------------------------------- errors


def act_amax(amax: Array, group_size: int, rotate: bool) -> Array:
  """Upper bound of ``max |x'|`` for the transformed activation, from per-channel ``amax``.

  Without rotation it is exact; after an orthonormal Hadamard inside a group every element is
  at most ``sum_group |x_c| / sqrt(g)``, bounded by the channels' amax.
  """
  if not rotate:
    return jnp.max(amax)
  g = amax.reshape(-1, group_size)
  return jnp.max(jnp.sum(g, axis=-1)) / math.sqrt(group_size)


def static_act_tensor_scale(amax: Array, group_size: int, rotate: bool) -> Array:
  """The calibrated NVFP4 activation tensor scale for a (transformed) activation."""
  return formats.nvfp4_tensor_scale(act_amax(amax, group_size, rotate))


@functools.partial(jax.jit, static_argnames=("fmt", "group_size", "act_format", "rotate",
                                             "static_scale"))
def candidate_errors(x: Array, w: Array, amax: Array, rest_amax: Array, perms: Array, *,
                     fmt: str, group_size: int, act_format: str | None, rotate: bool,
                     static_scale: bool) -> Array:
  """Output error ``||x W - Q(x[:, p] H) Q(H W[p])||^2`` for each permutation in ``perms``.

  Args:
    x: ``(T, width)`` activation sample.
    w: ``(width, N)`` kernel rows.
    amax: ``(width,)`` per-channel activation amax (static NVFP4 scale).
    rest_amax: amax of the consumer's other input channels (scalar).
    perms: ``(C, width)`` candidate permutations.
    fmt: weight format; act_format: activation format or None (W4A16).
    group_size: group size (also the Hadamard block).
    rotate: apply the block Hadamard after permuting.
    static_scale: use the calibrated activation tensor scale (else dynamic).

  Returns:
    ``(C,)`` float32 squared errors.
  """
  x = x.astype(jnp.float32)
  w = w.astype(jnp.float32)
  hi = jax.lax.Precision.HIGHEST
  ref = jnp.dot(x, w, precision=hi)

  def one(p):
    xp, wp = jnp.take(x, p, axis=1), jnp.take(w, p, axis=0)
    if rotate:
      xp, wp = block_hadamard(xp, group_size), rotate_kernel_rows(wp, group_size)
    wq = formats.dequantize(formats.quantize(wp.T, fmt, group_size=group_size)).T
    if act_format is not None:
      ts = None
      if static_scale:
        a = jnp.maximum(rest_amax, act_amax(jnp.take(amax, p), group_size, rotate))
        ts = formats.nvfp4_tensor_scale(a)
      xp = formats.dequantize(formats.quantize(xp, act_format, group_size=group_size,
                                               tensor_scale=ts))
    return jnp.sum(jnp.square(ref - jnp.dot(xp, wq, precision=hi)))

  return jax.vmap(one)(perms)


def site_errors(data: SiteData, perms: Array, cfg: QuantConfig, rotate: bool) -> np.ndarray:
  """Candidate errors summed over the site's consumers, as float64 NumPy."""
  total = np.zeros(perms.shape[0], np.float64)
  for x, w, rest in zip(data.xs, data.ws, data.rest_amax):
    e = candidate_errors(x, w, data.amax, rest, perms, fmt=cfg.format,
                         group_size=cfg.resolved_group_size, act_format=cfg.act_format,
                         rotate=rotate, static_scale=cfg.static_act_scale)
    total += np.asarray(e, np.float64)
  return total


# ----------------------------------------------------------------------------- decisions


def _transform(permuted: bool, rotate: bool) -> str:
  """The ``SiteDecision.transform`` name of a (permutation, Hadamard) choice."""
  return {(False, False): "identity", (True, False): "perm",
          (False, True): "hadamard", (True, True): "perm+hadamard"}[(permuted, rotate)]


def _rel_gain(err_base: float, err: float) -> float:
  return (err_base - err) / err_base if err_base > 0 else 0.0


def decide(name: str, kind: str, data: SiteData, cfg: QuantConfig, *, head_dim: int | None,
           index: int, rotate_options: Sequence[bool] | None = None
           ) -> tuple[SiteDecision, np.ndarray]:
  """Chooses the transform of one site; returns the decision and its int32 permutation.

  Args:
    name, kind: the site's name and kind.
    data: its calibration data.
    cfg: the config (method, alpha, tau, formats).
    head_dim: keep channels inside heads.
    index: the site's index (seeds the "random" ordering).
    rotate_options: restrict the Hadamard choice (a consumer shared with an earlier site
      already fixed it); None: what the method allows.
  """
  width = int(data.amax.shape[0])
  identity = np.arange(width, dtype=np.int32)
  method = cfg.method
  if rotate_options is None:
    rotate_options = {"permuquant-h": (True,), "auto": (False, True)}.get(method, (False,))
  rotate_options = tuple(rotate_options)

  if method in ("rtn", "absmax", "random"):
    rot = rotate_options[0]
    if method == "rtn":
      perm = jnp.asarray(identity)
    elif method == "absmax":
      perm = sort_descending(data.amax, head_dim)
    else:
      key = jax.random.fold_in(jax.random.key(cfg.seed), index)
      perm = random_permutation(key, width, head_dim)
    errs = site_errors(data, jnp.stack([jnp.asarray(identity), perm]), cfg, rot)
    return (SiteDecision(name, kind, width, _transform(method != "rtn", rot), None,
                         method != "rtn", float(errs[0]), float(errs[1])),
            np.asarray(perm, np.int32))

  alphas = (cfg.alpha,) if cfg.alpha is not None else cfg.alpha_grid
  sorted_p = sorted_permutations(data.m_a, data.m_w, jnp.asarray(alphas, jnp.float32),
                                 head_dim=head_dim)
  perms = jnp.concatenate([jnp.asarray(identity)[None], sorted_p])
  # rows: rotate option; columns: identity, then one per alpha
  errs = np.stack([site_errors(data, perms, cfg, r) for r in rotate_options])
  err_identity = (float(errs[0, 0]) if not rotate_options[0] else
                  float(site_errors(data, perms[:1], cfg, False)[0]))
  r_best, c_best = np.unravel_index(int(np.argmin(errs)), errs.shape)
  base_r = 0  # the method's baseline: identity order, first rotate option
  gain = _rel_gain(float(errs[base_r, 0]), float(errs[r_best, c_best]))
  if (r_best, c_best) == (base_r, 0) or gain <= cfg.tau:
    r_best, c_best = base_r, 0
  rot = rotate_options[r_best]
  permuted = c_best > 0
  transform = _transform(permuted, rot)
  accepted = (r_best, c_best) != (base_r, 0)
  reason = "" if accepted else f"no candidate lowered the error by more than tau={cfg.tau}"
  perm = np.asarray(perms[c_best], np.int32)
  return (SiteDecision(name, kind, width, transform,
                       float(alphas[c_best - 1]) if permuted else None, accepted,
                       err_identity, float(errs[r_best, c_best]), reason), perm)

"""Attention and feed-forward blocks mirroring diffusers' ``Attention`` and ``FeedForward``.

Param names follow diffusers (``to_q``, ``to_k``, ``to_v``, ``to_out.0``, ``norm_q``,
``norm_k``; ``ff.net.0.proj``, ``ff.net.2``), so module paths equal state-dict prefixes.

Public API (stable; other families import it):
- ``scaled_dot_product_attention(q, k, v, mask=None, *, scale=None)`` over ``(B, H, T, D)``.
- ``split_heads(x, heads)`` ``(B, T, H*D) -> (B, H, T, D)``, ``merge_heads`` the inverse.
- ``mask_to_bias(mask, dtype)``: a ``(B, S)`` keep-mask (1 keep, 0 drop) to the additive
  ``(B, 1, S)`` bias ``(1 - mask) * -10000`` that diffusers' models build.
- ``prepare_attention_mask(mask, batch, heads, kv_len)``: what diffusers'
  ``Attention.prepare_attention_mask`` + the processor's ``view`` make of a mask, as a
  ``(B, 1|H, 1|T, S)`` array broadcasting against the logits.
- ``Attention``: ``attn(hidden_states, encoder_hidden_states=None, attention_mask=None)``,
  the computation of diffusers' default ``AttnProcessor2_0``.
- ``FeedForward``: ``net = [act-with-proj, Identity (dropout), Linear]``.
- ``Attention.out_site(name, path)`` (P2: ``to_v`` -> ``to_out.0`` within heads) and
  ``FeedForward.hidden_site(name, path)`` (P4: ``net.0.proj`` -> ``net.2``): the two
  producer sites of these modules, ``path`` being the module's own dotted path.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from converters.layers import Identity, Linear, Norm, linear_act
from pqjax.sites import Consumer, Producer, Site

Array = jax.Array


def split_heads(x: Array, heads: int) -> Array:
  """``(B, T, H * D) -> (B, H, T, D)``."""
  b, t, c = x.shape
  return x.reshape(b, t, heads, c // heads).transpose(0, 2, 1, 3)


def merge_heads(x: Array) -> Array:
  """``(B, H, T, D) -> (B, T, H * D)``."""
  b, h, t, d = x.shape
  return x.transpose(0, 2, 1, 3).reshape(b, t, h * d)


def scaled_dot_product_attention(q: Array, k: Array, v: Array, mask: Array | None = None, *,
                                 scale: float | None = None) -> Array:
  """Softmax attention over ``(B, H, T, D)`` inputs, like ``torch.nn.functional.sdpa``.

  Logits and softmax are computed in float32; the output has ``q``'s dtype.

  Args:
    q: ``(B, H, T, D)`` queries.
    k: ``(B, H, S, D)`` keys.
    v: ``(B, H, S, Dv)`` values.
    mask: broadcastable to ``(B, H, T, S)``; boolean (True = attend) or an additive bias.
    scale: logit scale, default ``D ** -0.5``.

  Returns:
    ``(B, H, T, Dv)``.
  """
  if scale is None:
    scale = q.shape[-1] ** -0.5
  logits = jnp.einsum("bhtd,bhsd->bhts", q, k, preferred_element_type=jnp.float32) * scale
  if mask is not None:
    if mask.dtype == jnp.bool_:
      logits = jnp.where(mask, logits, -jnp.inf)
    else:
      logits = logits + mask.astype(jnp.float32)
  probs = jax.nn.softmax(logits, axis=-1)
  out = jnp.einsum("bhts,bhsd->bhtd", probs.astype(v.dtype), v,
                   preferred_element_type=jnp.float32)
  return out.astype(q.dtype)


def mask_to_bias(mask: Array, dtype) -> Array:
  """``(B, S)`` keep-mask -> ``(B, 1, S)`` additive bias ``(1 - mask) * -10000`` in ``dtype``."""
  return ((1 - mask.astype(dtype)) * -10000.0)[:, None, :]


def prepare_attention_mask(mask: Array, batch: int, heads: int, kv_len: int) -> Array:
  """Reshapes a diffusers attention mask to broadcast against ``(B, H, T, S)`` logits.

  Accepts what diffusers' processor accepts: ``(B, S)``, ``(B, 1|T, S)`` or
  ``(B * H, 1|T, S)``; a mask shared by all heads keeps a head axis of 1. A 4-D mask is
  taken to be ``(B, 1|H, 1|T, S)`` already.

  Raises:
    ValueError: the last axis is not ``kv_len`` (diffusers would silently pad it) or the
      leading axis is neither ``batch`` nor ``batch * heads``.
  """
  if mask.shape[-1] != kv_len:
    raise ValueError(f"attention mask of shape {mask.shape} does not cover {kv_len} keys")
  if mask.ndim == 4:
    return mask
  if mask.ndim == 2:
    mask = mask[:, None, :]
  lead = mask.shape[0]
  if lead == batch:
    return mask[:, None]
  if lead == batch * heads:
    return mask.reshape(batch, heads, mask.shape[1], kv_len)
  raise ValueError(f"attention mask of shape {mask.shape} fits neither batch {batch} nor "
                   f"batch*heads {batch * heads}")


def _qk_norm(kind: str | None, dim_head: int, width: int, eps: float, affine: bool, dtype
             ) -> tuple[Norm | None, bool]:
  """The ``norm_q``/``norm_k`` diffusers builds for ``qk_norm=kind``; True if across heads."""
  if kind is None:
    return None, False
  table = {
      "layer_norm": ("layer", dim_head, affine, False),
      "fp32_layer_norm": ("layer", dim_head, False, False),
      "rms_norm": ("rms", dim_head, affine, False),
      "layer_norm_across_heads": ("layer", width, True, True),
      "rms_norm_across_heads": ("rms", width, True, True),
  }
  if kind not in table:
    raise ValueError(f"unsupported qk_norm {kind!r}; supported: {sorted(table)}")
  norm_kind, dim, aff, across = table[kind]
  return Norm(dim, kind=norm_kind, eps=eps, elementwise_affine=aff, dtype=dtype), across


class Attention(nnx.Module):
  """diffusers ``Attention`` with the default processor: self- or cross-attention.

  ``to_q: query_dim -> heads*dim_head``; ``to_k``/``to_v: cross_attention_dim (default
  query_dim) -> kv_heads*dim_head``; ``to_out = [Linear(inner, out_dim), Identity]``
  (index 1 is diffusers' Dropout). Per-head ``qk_norm`` kinds normalise each head's ``D``
  channels after the head split; ``*_across_heads`` kinds normalise the whole projection.
  """

  def __init__(self, query_dim: int, cross_attention_dim: int | None = None, heads: int = 8,
               kv_heads: int | None = None, dim_head: int = 64, bias: bool = False,
               qk_norm: str | None = None, out_bias: bool = True, eps: float = 1e-5,
               out_dim: int | None = None, pre_only: bool = False,
               elementwise_affine: bool = True, *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.inner_dim = out_dim if out_dim is not None else dim_head * heads
    self.heads = out_dim // dim_head if out_dim is not None else heads
    self.kv_heads = kv_heads if kv_heads is not None else self.heads
    self.dim_head = dim_head
    self.query_dim = query_dim
    self.cross_attention_dim = cross_attention_dim or query_dim
    self.out_dim = out_dim if out_dim is not None else query_dim
    kv_inner = dim_head * self.kv_heads
    self.norm_q, self.qk_norm_across_heads = _qk_norm(
        qk_norm, dim_head, self.inner_dim, eps, elementwise_affine, dtype)
    self.norm_k, _ = _qk_norm(qk_norm, dim_head, kv_inner, eps, elementwise_affine, dtype)
    self.to_q = Linear(query_dim, self.inner_dim, bias=bias, dtype=dtype, rngs=rngs)
    self.to_k = Linear(self.cross_attention_dim, kv_inner, bias=bias, dtype=dtype, rngs=rngs)
    self.to_v = Linear(self.cross_attention_dim, kv_inner, bias=bias, dtype=dtype, rngs=rngs)
    self.to_out = None if pre_only else nnx.List(
        [Linear(self.inner_dim, self.out_dim, bias=out_bias, dtype=dtype, rngs=rngs),
         Identity()])

  def out_site(self, name: str, path: str) -> Site:
    """P2: attention output -> ``to_out.0``, folded into ``to_v``'s output columns per head.

    Raises:
      ValueError: grouped K/V heads (one V head feeds several output heads: no single
        permutation of ``to_out.0`` rows mirrors a permutation of ``to_v`` columns).
    """
    if self.kv_heads != self.heads or self.to_out is None:
      raise ValueError(f"{path}: no P2 site with kv_heads={self.kv_heads}, heads={self.heads}"
                       f", to_out={'absent' if self.to_out is None else 'present'}")
    return Site(name=name, kind="producer", width=self.inner_dim,
                consumers=(Consumer(f"{path}.to_out.0"),), producers=(Producer(f"{path}.to_v"),),
                head_dim=self.dim_head)

  def qkv(self, hidden_states: Array, encoder_hidden_states: Array | None = None
          ) -> tuple[Array, Array, Array]:
    """Projected, head-split and normalised ``(q, k, v)``, each ``(B, H, T, D)``."""
    context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
    q, k, v = self.to_q(hidden_states), self.to_k(context), self.to_v(context)
    if self.qk_norm_across_heads:
      q, k = self.norm_q(q), self.norm_k(k)
    q, k, v = split_heads(q, self.heads), split_heads(k, self.kv_heads), split_heads(
        v, self.kv_heads)
    if self.norm_q is not None and not self.qk_norm_across_heads:
      q, k = self.norm_q(q), self.norm_k(k)
    if self.kv_heads != self.heads:
      rep = self.heads // self.kv_heads
      k, v = jnp.repeat(k, rep, axis=1), jnp.repeat(v, rep, axis=1)
    return q, k, v

  def __call__(self, hidden_states: Array, encoder_hidden_states: Array | None = None,
               attention_mask: Array | None = None) -> Array:
    """``(B, T, query_dim)`` [, ``(B, S, cross_dim)``] -> ``(B, T, out_dim)``.

    ``attention_mask``: as diffusers' processor receives it (see ``prepare_attention_mask``),
    boolean or additive.
    """
    q, k, v = self.qkv(hidden_states, encoder_hidden_states)
    if attention_mask is not None:
      attention_mask = prepare_attention_mask(attention_mask, q.shape[0], self.heads,
                                              k.shape[2])
    out = merge_heads(scaled_dot_product_attention(q, k, v, attention_mask))
    if self.to_out is None:
      return out
    return self.to_out[0](out)


class GELU(nnx.Module):
  """``gelu(proj(x))``; ``approximate="tanh"`` for diffusers' ``gelu-approximate``."""

  def __init__(self, dim_in: int, dim_out: int, approximate: str = "none", bias: bool = True, *,
               dtype=jnp.float32, rngs: nnx.Rngs):
    self.proj = Linear(dim_in, dim_out, bias=bias, dtype=dtype, rngs=rngs)
    self.approximate = approximate == "tanh"

  def __call__(self, x: Array) -> Array:
    if self.approximate:
      return linear_act(self.proj, x, "gelu_tanh")
    return jax.nn.gelu(self.proj(x), approximate=False)


class GEGLU(nnx.Module):
  """``h * gelu(gate)`` with ``[h, gate] = proj(x)`` (proj out ``2 * dim_out``)."""

  def __init__(self, dim_in: int, dim_out: int, bias: bool = True, *, dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.proj = Linear(dim_in, 2 * dim_out, bias=bias, dtype=dtype, rngs=rngs)

  def __call__(self, x: Array) -> Array:
    h, gate = jnp.split(self.proj(x), 2, axis=-1)
    return h * jax.nn.gelu(gate, approximate=False)


class ApproximateGELU(nnx.Module):
  """``y * sigmoid(1.702 y)`` with ``y = proj(x)`` (diffusers' ``geglu-approximate``)."""

  def __init__(self, dim_in: int, dim_out: int, bias: bool = True, *, dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.proj = Linear(dim_in, dim_out, bias=bias, dtype=dtype, rngs=rngs)

  def __call__(self, x: Array) -> Array:
    y = self.proj(x)
    return y * jax.nn.sigmoid(1.702 * y)


class SwiGLU(nnx.Module):
  """``h * silu(gate)`` with ``[h, gate] = proj(x)``."""

  def __init__(self, dim_in: int, dim_out: int, bias: bool = True, *, dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.proj = Linear(dim_in, 2 * dim_out, bias=bias, dtype=dtype, rngs=rngs)

  def __call__(self, x: Array) -> Array:
    h, gate = jnp.split(self.proj(x), 2, axis=-1)
    return h * jax.nn.silu(gate)


class LinearActivation(nnx.Module):
  """``silu(proj(x))`` (diffusers' ``linear-silu``)."""

  def __init__(self, dim_in: int, dim_out: int, bias: bool = True, *, dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.proj = Linear(dim_in, dim_out, bias=bias, dtype=dtype, rngs=rngs)

  def __call__(self, x: Array) -> Array:
    return jax.nn.silu(self.proj(x))


# activation_fn -> (class, kwargs, gated): gated projections hold [h, gate] halves.
_FF_ACTS = {
    "gelu": (GELU, {}, False),
    "gelu-approximate": (GELU, {"approximate": "tanh"}, False),
    "geglu": (GEGLU, {}, True),
    "geglu-approximate": (ApproximateGELU, {}, False),
    "swiglu": (SwiGLU, {}, True),
    "linear-silu": (LinearActivation, {}, False),
}


class FeedForward(nnx.Module):
  """diffusers ``FeedForward``: ``net.2(net.0(x))``; ``net.0.proj`` is the first linear.

  ``gated`` is True when ``net.0.proj`` outputs ``[h, gate]`` halves of ``inner_dim`` each
  (GEGLU/SwiGLU): a P4 permutation must then permute both halves alike.
  """

  def __init__(self, dim: int, dim_out: int | None = None, mult: float = 4,
               activation_fn: str = "geglu", inner_dim: int | None = None, bias: bool = True, *,
               dtype=jnp.float32, rngs: nnx.Rngs):
    if activation_fn not in _FF_ACTS:
      raise ValueError(f"unsupported activation_fn {activation_fn!r}; "
                       f"supported: {sorted(_FF_ACTS)}")
    cls, kwargs, self.gated = _FF_ACTS[activation_fn]
    self.inner_dim = inner_dim if inner_dim is not None else int(dim * mult)
    self.net = nnx.List([
        cls(dim, self.inner_dim, bias=bias, dtype=dtype, rngs=rngs, **kwargs),
        Identity(),
        Linear(self.inner_dim, dim_out or dim, bias=bias, dtype=dtype, rngs=rngs),
    ])

  def hidden_site(self, name: str, path: str) -> Site:
    """P4: ``net.0.proj`` output -> ``net.2`` (gated: both halves permuted alike)."""
    proj = f"{path}.net.0.proj"
    producers = ((Producer(proj, 0), Producer(proj, self.inner_dim)) if self.gated
                 else (Producer(proj),))
    return Site(name=name, kind="producer", width=self.inner_dim,
                consumers=(Consumer(f"{path}.net.2"),), producers=producers)

  def __call__(self, x: Array) -> Array:
    for layer in self.net:
      x = layer(x)
    return x

"""Building blocks shared by the converted models, each knowing its torch parameter layout.

Module trees mirror diffusers' names, so a module's dotted path is also its state-dict prefix.
Each layer class maps its Flax params to torch tensors through ``TORCH_PARAMS``:
``{flax_attr: (torch_name, to_flax, to_torch)}``; raw ``nnx.Param`` attributes on other modules
map by name, unchanged. The loader (``converters/checkpoint.py``) walks these generically.
"""

from __future__ import annotations

from typing import Callable, Literal, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Array = jax.Array
Layout = tuple[str, Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray]]


def _same(t: np.ndarray) -> np.ndarray:
  return t


def _transpose(t: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(t.T)


def _conv_to_flax(t: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(t.transpose(2, 3, 1, 0))  # (O, I, kh, kw) -> (kh, kw, I, O)


def _conv_to_torch(t: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(t.transpose(3, 2, 0, 1))


def _lead(v: Array, ndim: int) -> Array:
  """``v`` with leading unit axes up to ``ndim`` (explicit broadcasting, rank-promotion safe)."""
  return v.reshape((1,) * (ndim - v.ndim) + v.shape)


def _init(rngs: nnx.Rngs, shape: tuple[int, ...], fan_in: int, dtype) -> nnx.Param:
  std = 1.0 / np.sqrt(max(fan_in, 1))
  return nnx.Param((jax.random.normal(rngs.params(), shape, jnp.float32) * std).astype(dtype))


class Linear(nnx.Module):
  """``y = x @ kernel + bias`` with a Flax kernel ``(in, out)`` (torch ``weight.T``)."""

  TORCH_PARAMS: dict[str, Layout] = {
      "kernel": ("weight", _transpose, _transpose),
      "bias": ("bias", _same, _same),
  }

  def __init__(self, in_features: int, out_features: int, *, bias: bool = True,
               dtype=jnp.float32, rngs: nnx.Rngs):
    self.in_features = in_features
    self.out_features = out_features
    self.kernel = _init(rngs, (in_features, out_features), in_features, dtype)
    self.bias = nnx.Param(jnp.zeros((out_features,), dtype)) if bias else None

  def __call__(self, x: Array) -> Array:
    kernel = self.kernel[...]
    y = jnp.dot(x.astype(kernel.dtype), kernel)
    if self.bias is not None:
      y = y + _lead(self.bias[...], y.ndim)
    return y


class Norm(nnx.Module):
  """LayerNorm or RMSNorm over the last axis, with optional adaLN modulation.

  ``norm(x, shift, scale) = normed(x) * (1 + scale) + shift``; the pipeline swaps a Norm that
  feeds quantized linears for a gathered norm computing the same thing in permuted order.
  """

  TORCH_PARAMS: dict[str, Layout] = {
      "weight": ("weight", _same, _same),
      "bias": ("bias", _same, _same),
  }

  def __init__(self, dim: int, *, kind: Literal["layer", "rms"] = "layer", eps: float = 1e-6,
               elementwise_affine: bool = True, bias: bool = True, dtype=jnp.float32,
               rngs: nnx.Rngs | None = None):
    del rngs  # affine params start at identity, as in torch
    self.dim = dim
    self.kind = kind
    self.eps = eps
    self.weight = nnx.Param(jnp.ones((dim,), dtype)) if elementwise_affine else None
    has_bias = elementwise_affine and bias and kind == "layer"
    self.bias = nnx.Param(jnp.zeros((dim,), dtype)) if has_bias else None

  def __call__(self, x: Array, shift: Array | None = None, scale: Array | None = None) -> Array:
    weight = None if self.weight is None else self.weight[...]
    bias = None if self.bias is None else self.bias[...]
    return norm_reference(x, kind=self.kind, eps=self.eps, weight=weight, bias=bias,
                          shift=shift, scale=scale)


def norm_reference(x: Array, *, kind: str, eps: float, weight: Array | None = None,
                   bias: Array | None = None, shift: Array | None = None,
                   scale: Array | None = None) -> Array:
  """Plain-jnp (modulated) LayerNorm/RMSNorm over the last axis, computed in fp32."""
  xf = x.astype(jnp.float32)
  if kind == "layer":
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    xf = xf - mean
  var = jnp.mean(jnp.square(xf), axis=-1, keepdims=True)
  y = xf * jax.lax.rsqrt(var + eps)
  n = y.ndim
  if weight is not None:
    y = y * _lead(weight.astype(jnp.float32), n)
  if bias is not None:
    y = y + _lead(bias.astype(jnp.float32), n)
  if scale is not None:
    y = y * (1.0 + _lead(scale.astype(jnp.float32), n))
  if shift is not None:
    y = y + _lead(shift.astype(jnp.float32), n)
  return y.astype(x.dtype)


class Conv2d(nnx.Module):
  """NHWC 2-D convolution with a Flax kernel ``(kh, kw, in/groups, out)``; torch is NCHW/OIHW."""

  TORCH_PARAMS: dict[str, Layout] = {
      "kernel": ("weight", _conv_to_flax, _conv_to_torch),
      "bias": ("bias", _same, _same),
  }

  def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, stride: int = 1,
               padding: int = 0, groups: int = 1, bias: bool = True, dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.stride = stride
    self.padding = padding
    self.groups = groups
    fan_in = in_channels // groups * kernel_size * kernel_size
    self.kernel = _init(rngs, (kernel_size, kernel_size, in_channels // groups, out_channels),
                        fan_in, dtype)
    self.bias = nnx.Param(jnp.zeros((out_channels,), dtype)) if bias else None

  def __call__(self, x: Array) -> Array:
    kernel = self.kernel[...]
    y = jax.lax.conv_general_dilated(
        x.astype(kernel.dtype), kernel, window_strides=(self.stride, self.stride),
        padding=[(self.padding, self.padding)] * 2, dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=self.groups)
    if self.bias is not None:
      y = y + _lead(self.bias[...], y.ndim)
    return y


class Embedding(nnx.Module):
  """Lookup table ``(num, dim)``, same layout as torch."""

  TORCH_PARAMS: dict[str, Layout] = {"embedding": ("weight", _same, _same)}

  def __init__(self, num_embeddings: int, dim: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.embedding = nnx.Param(
        jax.random.normal(rngs.params(), (num_embeddings, dim), jnp.float32).astype(dtype))

  def __call__(self, ids: Array) -> Array:
    return jnp.take(self.embedding[...], ids, axis=0)


class Identity(nnx.Module):
  """A param-less placeholder keeping diffusers' ``ModuleList`` indices (e.g. Dropout at eval)."""

  def __call__(self, x: Array) -> Array:
    return x


def param(rngs: nnx.Rngs | None, shape: tuple[int, ...], dtype, std: float = 0.02) -> nnx.Param:
  """A raw parameter (e.g. PixArt's ``scale_shift_table``), mapped to torch by its name."""
  if rngs is None:
    return nnx.Param(jnp.zeros(shape, dtype))
  return nnx.Param((jax.random.normal(rngs.params(), shape, jnp.float32) * std).astype(dtype))


def gelu_tanh(x: Array) -> Array:
  return jax.nn.gelu(x, approximate=True)


_FUSABLE = {"gelu_tanh": gelu_tanh}


def linear_act(linear: Callable[..., Array], x: Array, act: str) -> Array:
  """``act(linear(x))`` for ``act`` in ``_FUSABLE``; a linear listing ``act`` in its
  ``fused_epilogues`` (a quantized one: ``pqjax.qmodules.QuantLinear``) applies it in its
  matmul's epilogue instead, saving a pass over the activations."""
  if act in getattr(linear, "fused_epilogues", ()):
    return linear(x, epilogue=act)
  return _FUSABLE[act](linear(x))


def linear_concat(linear: Callable[..., Array], parts: Sequence[Array]) -> Array:
  """``linear(concatenate(parts, axis=-1))``; a linear with ``takes_parts`` (a quantized one:
  ``pqjax.qmodules.QuantLinear``) is given the parts themselves, and where its activation
  quantize reads them in place no pass writes the concatenation."""
  if getattr(linear, "takes_parts", False):
    return linear(tuple(parts))
  return linear(jnp.concatenate(parts, axis=-1))


def gelu_exact(x: Array) -> Array:
  return jax.nn.gelu(x, approximate=False)

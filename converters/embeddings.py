"""Conditioning embeddings shared by the DiT families, mirroring ``diffusers.models.embeddings``.

Every class keeps diffusers' attribute names (``linear_1``, ``timestep_embedder``, ``proj``,
...), so module paths equal state-dict prefixes, and computes what diffusers computes in
eval mode (no label dropout). Fixed tables (sinusoidal position embeddings) are computed
with NumPy in float64 like diffusers, at call time from the static input shape.

Public API (stable; other families import it):
- ``get_timestep_embedding(timesteps, dim, flip_sin_to_cos, downscale_freq_shift, scale,
  max_period)``, ``Timesteps``
- ``get_activation(name)`` (diffusers' ``silu``/``swish``/``gelu``/``relu``/``mish``)
- ``TimestepEmbedding`` (``linear_1``, ``act``, ``linear_2``; optional ``cond_proj``)
- ``get_1d_sincos_pos_embed_from_grid``, ``get_2d_sincos_pos_embed``, ``PatchEmbed``
- ``LabelEmbedding``, ``CombinedTimestepLabelEmbeddings`` (DiT)
- ``CombinedTimestepTextProjEmbeddings``, ``CombinedTimestepGuidanceTextProjEmbeddings``
- ``PixArtAlphaCombinedTimestepSizeEmbeddings``, ``PixArtAlphaTextProjection``
- ``AdaLayerNormSingle`` (PixArt/SANA ``adaln_single``), ``AdaLayerNormZero`` (DiT/FLUX
  ``norm1``: its ``.norm`` is a ``layers.Norm`` called with ``shift=``/``scale=``)
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from converters.layers import Conv2d, Embedding, Linear, Norm

Array = jax.Array

_ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x)),
}


def get_activation(name: str) -> Callable[[Array], Array]:
  """Returns the elementwise activation diffusers' ``get_activation(name)`` builds.

  Raises:
    ValueError: unknown ``name``.
  """
  key = name.lower()
  if key not in _ACTIVATIONS:
    raise ValueError(f"unknown activation {name!r}; known: {sorted(_ACTIVATIONS)}")
  return _ACTIVATIONS[key]


def silu_fp32(x: Array) -> Array:
  """diffusers' ``FP32SiLU``: SiLU computed in float32, cast back."""
  return jax.nn.silu(x.astype(jnp.float32)).astype(x.dtype)


# ----------------------------------------------------------------------------- timesteps


def _frequencies(half: int, downscale_freq_shift: float, max_period: int) -> np.ndarray:
  """``exp(-log(max_period) * i / (half - shift))`` as torch's float32 steps make it.

  Host NumPy, so XLA cannot turn the division into a reciprocal multiply; ``exp`` is taken in
  float64 and rounded once, which matches torch's float32 ``exp`` in all but a few entries.
  """
  exponent = np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32)
  exponent = exponent / np.float32(half - downscale_freq_shift)
  return np.exp(exponent.astype(np.float64)).astype(np.float32)


def get_timestep_embedding(timesteps: Array, embedding_dim: int, flip_sin_to_cos: bool = False,
                           downscale_freq_shift: float = 1, scale: float = 1,
                           max_period: int = 10000) -> Array:
  """Sinusoidal timestep embedding, as diffusers' ``get_timestep_embedding`` (float32).

  Args:
    timesteps: ``(N,)`` possibly fractional timesteps.
    embedding_dim: output width; odd widths are zero-padded by one column.
    flip_sin_to_cos: order ``[cos, sin]`` instead of ``[sin, cos]``.
    downscale_freq_shift: frequencies are ``exp(-log(max_period) * i / (half - shift))``.
    scale: multiplies the arguments of sin/cos.
    max_period: the lowest frequency's period.

  Returns:
    ``(N, embedding_dim)`` float32.

  Raises:
    ValueError: ``timesteps`` is not one-dimensional.
  """
  if timesteps.ndim != 1:
    raise ValueError(f"timesteps must be 1-D, got shape {timesteps.shape}")
  half = embedding_dim // 2
  args = timesteps[:, None].astype(jnp.float32) * _frequencies(half, downscale_freq_shift,
                                                               max_period)[None, :]
  args = scale * args
  emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
  if flip_sin_to_cos:
    emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
  if embedding_dim % 2 == 1:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


class Timesteps(nnx.Module):
  """Param-less module wrapping ``get_timestep_embedding`` (diffusers' ``Timesteps``)."""

  def __init__(self, num_channels: int, flip_sin_to_cos: bool, downscale_freq_shift: float,
               scale: float = 1):
    self.num_channels = num_channels
    self.flip_sin_to_cos = flip_sin_to_cos
    self.downscale_freq_shift = downscale_freq_shift
    self.scale = scale

  def __call__(self, timesteps: Array) -> Array:
    return get_timestep_embedding(timesteps, self.num_channels, self.flip_sin_to_cos,
                                  self.downscale_freq_shift, self.scale)


class TimestepEmbedding(nnx.Module):
  """``linear_2(act(linear_1(sample [+ cond_proj(condition)])))`` [+ ``post_act``]."""

  def __init__(self, in_channels: int, time_embed_dim: int, act_fn: str = "silu",
               out_dim: int | None = None, post_act_fn: str | None = None,
               cond_proj_dim: int | None = None, sample_proj_bias: bool = True, *,
               dtype=jnp.float32, rngs: nnx.Rngs):
    self.linear_1 = Linear(in_channels, time_embed_dim, bias=sample_proj_bias, dtype=dtype,
                           rngs=rngs)
    self.cond_proj = (Linear(cond_proj_dim, in_channels, bias=False, dtype=dtype, rngs=rngs)
                      if cond_proj_dim is not None else None)
    self.act = get_activation(act_fn)
    self.linear_2 = Linear(time_embed_dim, out_dim or time_embed_dim, bias=sample_proj_bias,
                           dtype=dtype, rngs=rngs)
    self.post_act = get_activation(post_act_fn) if post_act_fn is not None else None

  def __call__(self, sample: Array, condition: Array | None = None) -> Array:
    if condition is not None:
      sample = sample + self.cond_proj(condition)
    sample = self.linear_2(self.act(self.linear_1(sample)))
    if self.post_act is not None:
      sample = self.post_act(sample)
    return sample


# ----------------------------------------------------------------------------- patches


def get_1d_sincos_pos_embed_from_grid(embed_dim: int, pos: np.ndarray,
                                      flip_sin_to_cos: bool = False) -> np.ndarray:
  """``(M, embed_dim)`` float64 ``[sin, cos]`` embedding of the positions ``pos`` (any shape).

  Raises:
    ValueError: odd ``embed_dim``.
  """
  if embed_dim % 2:
    raise ValueError(f"embed_dim must be even, got {embed_dim}")
  omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
  omega = 1.0 / 10000**omega
  out = np.outer(np.asarray(pos, np.float64).reshape(-1), omega)
  emb = np.concatenate([np.sin(out), np.cos(out)], axis=1)
  if flip_sin_to_cos:
    emb = np.concatenate([emb[:, embed_dim // 2:], emb[:, :embed_dim // 2]], axis=1)
  return emb


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int | tuple[int, int],
                            interpolation_scale: float = 1.0, base_size: int = 16) -> np.ndarray:
  """diffusers' 2-D sincos table, ``(h * w, embed_dim)`` float32, row-major over ``(h, w)``.

  Positions are ``arange(n) / (n / base_size) / interpolation_scale`` in float32 (as torch
  computes them); the first half of the channels encodes the column (w) coordinate, the
  second half the row (h) coordinate, as diffusers does.

  Raises:
    ValueError: odd ``embed_dim``.
  """
  if embed_dim % 2:
    raise ValueError(f"embed_dim must be even, got {embed_dim}")
  h, w = (grid_size, grid_size) if isinstance(grid_size, int) else grid_size
  grid_h = np.arange(h, dtype=np.float32) / np.float32(h / base_size) / np.float32(
      interpolation_scale)
  grid_w = np.arange(w, dtype=np.float32) / np.float32(w / base_size) / np.float32(
      interpolation_scale)
  ww, hh = np.meshgrid(grid_w, grid_h, indexing="xy")  # both (h, w)
  emb = np.concatenate([get_1d_sincos_pos_embed_from_grid(embed_dim // 2, ww),
                        get_1d_sincos_pos_embed_from_grid(embed_dim // 2, hh)], axis=1)
  return emb.astype(np.float32)


class PatchEmbed(nnx.Module):
  """Conv patchify (``proj``) + optional LayerNorm + 2-D sincos position embedding.

  Input NCHW (diffusers' layout), output ``(B, h * w, embed_dim)``. Without
  ``pos_embed_max_size`` the table is not a parameter (a non-persistent buffer in diffusers)
  and is computed for the input's patch grid, with ``base_size = height // patch_size``; with
  it, the table is the ``pos_embed`` parameter (``(1, max*max, D)``, persistent in diffusers)
  and is center-cropped to the input's grid.
  """

  def __init__(self, height: int = 224, width: int = 224, patch_size: int = 16,
               in_channels: int = 3, embed_dim: int = 768, layer_norm: bool = False,
               bias: bool = True, interpolation_scale: float = 1,
               pos_embed_type: str | None = "sincos", pos_embed_max_size: int | None = None, *,
               dtype=jnp.float32, rngs: nnx.Rngs):
    if pos_embed_type not in ("sincos", None):
      raise ValueError(f"unsupported pos_embed_type {pos_embed_type!r}")
    del width  # diffusers derives base_size from height only
    self.patch_size = patch_size
    self.embed_dim = embed_dim
    self.base_size = height // patch_size
    self.interpolation_scale = interpolation_scale
    self.use_pos_embed = pos_embed_type is not None
    self.pos_embed_max_size = pos_embed_max_size
    self.proj = Conv2d(in_channels, embed_dim, patch_size, stride=patch_size, bias=bias,
                       dtype=dtype, rngs=rngs)
    self.norm = Norm(embed_dim, eps=1e-6, elementwise_affine=False) if layer_norm else None
    if self.use_pos_embed and pos_embed_max_size:
      table = get_2d_sincos_pos_embed(embed_dim, pos_embed_max_size, interpolation_scale,
                                      self.base_size)
      self.pos_embed = nnx.Param(jnp.asarray(table[None], dtype))
    else:
      self.pos_embed = None

  def position_table(self, h: int, w: int) -> Array:
    """``(1, h * w, D)`` float32 position embedding for an ``h x w`` patch grid.

    Raises:
      ValueError: the grid exceeds ``pos_embed_max_size``.
    """
    m = self.pos_embed_max_size
    if self.pos_embed is None:
      table = get_2d_sincos_pos_embed(self.embed_dim, (h, w), self.interpolation_scale,
                                      self.base_size)
      return jnp.asarray(table[None])
    if h > m or w > m:
      raise ValueError(f"patch grid {h}x{w} exceeds pos_embed_max_size={m}")
    top, left = (m - h) // 2, (m - w) // 2
    table = self.pos_embed[...].astype(jnp.float32).reshape(1, m, m, -1)
    return table[:, top:top + h, left:left + w, :].reshape(1, h * w, -1)

  def __call__(self, latent: Array) -> Array:
    b, _, hp, wp = latent.shape
    h, w = hp // self.patch_size, wp // self.patch_size
    x = self.proj(jnp.transpose(latent, (0, 2, 3, 1)))  # NHWC
    x = x.reshape(b, h * w, self.embed_dim)
    if self.norm is not None:
      x = self.norm(x)
    if not self.use_pos_embed:
      return x
    return (x.astype(jnp.float32) + self.position_table(h, w)).astype(x.dtype)


# ----------------------------------------------------------------------------- labels, text


class LabelEmbedding(nnx.Module):
  """Class-label table with one extra (null) row when ``dropout_prob > 0``."""

  def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float, *,
               dtype=jnp.float32, rngs: nnx.Rngs):
    self.num_classes = num_classes
    self.embedding_table = Embedding(num_classes + int(dropout_prob > 0), hidden_size,
                                     dtype=dtype, rngs=rngs)

  def __call__(self, labels: Array) -> Array:
    return self.embedding_table(labels)


class CombinedTimestepLabelEmbeddings(nnx.Module):
  """DiT: ``timestep_embedder(time_proj(t)) + class_embedder(labels)``."""

  def __init__(self, num_classes: int, embedding_dim: int, class_dropout_prob: float = 0.1, *,
               dtype=jnp.float32, rngs: nnx.Rngs):
    self.time_proj = Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=1)
    self.timestep_embedder = TimestepEmbedding(256, embedding_dim, dtype=dtype, rngs=rngs)
    self.class_embedder = LabelEmbedding(num_classes, embedding_dim, class_dropout_prob,
                                         dtype=dtype, rngs=rngs)

  def __call__(self, timestep: Array, class_labels: Array, hidden_dtype=None) -> Array:
    t = self.time_proj(timestep)
    if hidden_dtype is not None:
      t = t.astype(hidden_dtype)
    return self.timestep_embedder(t) + self.class_embedder(class_labels)


class PixArtAlphaTextProjection(nnx.Module):
  """``linear_2(act_1(linear_1(caption)))``; ``act_fn`` in gelu_tanh / silu / silu_fp32."""

  def __init__(self, in_features: int, hidden_size: int, out_features: int | None = None,
               act_fn: str = "gelu_tanh", *, dtype=jnp.float32, rngs: nnx.Rngs):
    acts = {"gelu_tanh": _ACTIVATIONS["gelu_tanh"], "silu": jax.nn.silu, "silu_fp32": silu_fp32}
    if act_fn not in acts:
      raise ValueError(f"unknown act_fn {act_fn!r}; known: {sorted(acts)}")
    self.linear_1 = Linear(in_features, hidden_size, dtype=dtype, rngs=rngs)
    self.act_1 = acts[act_fn]
    self.linear_2 = Linear(hidden_size, out_features or hidden_size, dtype=dtype, rngs=rngs)

  def __call__(self, caption: Array) -> Array:
    return self.linear_2(self.act_1(self.linear_1(caption)))


class CombinedTimestepTextProjEmbeddings(nnx.Module):
  """SD3 / FLUX-schnell: ``timestep_embedder(t) + text_embedder(pooled)``."""

  def __init__(self, embedding_dim: int, pooled_projection_dim: int, *, dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.time_proj = Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)
    self.timestep_embedder = TimestepEmbedding(256, embedding_dim, dtype=dtype, rngs=rngs)
    self.text_embedder = PixArtAlphaTextProjection(pooled_projection_dim, embedding_dim,
                                                   act_fn="silu", dtype=dtype, rngs=rngs)

  def __call__(self, timestep: Array, pooled_projection: Array) -> Array:
    t = self.time_proj(timestep).astype(pooled_projection.dtype)
    return self.timestep_embedder(t) + self.text_embedder(pooled_projection)


class CombinedTimestepGuidanceTextProjEmbeddings(nnx.Module):
  """FLUX-dev: ``timestep_embedder(t) + guidance_embedder(g) + text_embedder(pooled)``."""

  def __init__(self, embedding_dim: int, pooled_projection_dim: int, *, dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.time_proj = Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)
    self.timestep_embedder = TimestepEmbedding(256, embedding_dim, dtype=dtype, rngs=rngs)
    self.guidance_embedder = TimestepEmbedding(256, embedding_dim, dtype=dtype, rngs=rngs)
    self.text_embedder = PixArtAlphaTextProjection(pooled_projection_dim, embedding_dim,
                                                   act_fn="silu", dtype=dtype, rngs=rngs)

  def __call__(self, timestep: Array, guidance: Array, pooled_projection: Array) -> Array:
    dt = pooled_projection.dtype
    t = self.timestep_embedder(self.time_proj(timestep).astype(dt))
    g = self.guidance_embedder(self.time_proj(guidance).astype(dt))
    return t + g + self.text_embedder(pooled_projection)


class PixArtAlphaCombinedTimestepSizeEmbeddings(nnx.Module):
  """PixArt timestep embedding, plus resolution / aspect-ratio embeddings when enabled."""

  def __init__(self, embedding_dim: int, size_emb_dim: int,
               use_additional_conditions: bool = False, *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.outdim = size_emb_dim
    self.time_proj = Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)
    self.timestep_embedder = TimestepEmbedding(256, embedding_dim, dtype=dtype, rngs=rngs)
    self.use_additional_conditions = use_additional_conditions
    if use_additional_conditions:
      self.additional_condition_proj = Timesteps(256, flip_sin_to_cos=True,
                                                 downscale_freq_shift=0)
      self.resolution_embedder = TimestepEmbedding(256, size_emb_dim, dtype=dtype, rngs=rngs)
      self.aspect_ratio_embedder = TimestepEmbedding(256, size_emb_dim, dtype=dtype, rngs=rngs)

  def __call__(self, timestep: Array, resolution: Array | None, aspect_ratio: Array | None,
               batch_size: int, hidden_dtype) -> Array:
    """Returns ``(B, embedding_dim)``.

    Raises:
      ValueError: additional conditions are enabled and ``resolution``/``aspect_ratio`` missing.
    """
    emb = self.timestep_embedder(self.time_proj(timestep).astype(hidden_dtype))
    if not self.use_additional_conditions:
      return emb
    if resolution is None or aspect_ratio is None:
      raise ValueError("use_additional_conditions needs added_cond_kwargs['resolution'] and "
                       "['aspect_ratio']")
    res = self.additional_condition_proj(resolution.reshape(-1)).astype(hidden_dtype)
    res = self.resolution_embedder(res).reshape(batch_size, -1)
    ar = self.additional_condition_proj(aspect_ratio.reshape(-1)).astype(hidden_dtype)
    ar = self.aspect_ratio_embedder(ar).reshape(batch_size, -1)
    return emb + jnp.concatenate([res, ar], axis=1)


# ----------------------------------------------------------------------------- adaLN


class AdaLayerNormSingle(nnx.Module):
  """PixArt/SANA ``adaln_single``: returns ``(linear(silu(emb)) (B, 6D), emb (B, D))``."""

  def __init__(self, embedding_dim: int, use_additional_conditions: bool = False, *,
               dtype=jnp.float32, rngs: nnx.Rngs):
    self.emb = PixArtAlphaCombinedTimestepSizeEmbeddings(
        embedding_dim, embedding_dim // 3, use_additional_conditions, dtype=dtype, rngs=rngs)
    self.linear = Linear(embedding_dim, 6 * embedding_dim, dtype=dtype, rngs=rngs)

  def __call__(self, timestep: Array, added_cond_kwargs: dict[str, Array] | None = None, *,
               batch_size: int, hidden_dtype) -> tuple[Array, Array]:
    kw = added_cond_kwargs or {}
    emb = self.emb(timestep, kw.get("resolution"), kw.get("aspect_ratio"), batch_size,
                   hidden_dtype)
    return self.linear(jax.nn.silu(emb)), emb


class AdaLayerNormZero(nnx.Module):
  """adaLN-Zero (DiT, FLUX ``norm1``): ``linear(silu(emb))`` -> 6 chunks; modulated ``norm``.

  ``emb`` is a ``CombinedTimestepLabelEmbeddings`` when ``num_embeddings`` is given (DiT),
  else the caller passes ``emb=``. ``norm`` is a ``layers.Norm`` (LayerNorm, no affine,
  eps 1e-6) called with ``shift``/``scale`` so the pipeline can swap it for a gathered norm.
  """

  def __init__(self, embedding_dim: int, num_embeddings: int | None = None,
               norm_type: str = "layer_norm", bias: bool = True, *, dtype=jnp.float32,
               rngs: nnx.Rngs):
    if norm_type not in ("layer_norm", "fp32_layer_norm"):
      raise ValueError(f"unsupported norm_type {norm_type!r}")
    self.emb = (CombinedTimestepLabelEmbeddings(num_embeddings, embedding_dim, dtype=dtype,
                                                rngs=rngs)
                if num_embeddings is not None else None)
    self.linear = Linear(embedding_dim, 6 * embedding_dim, bias=bias, dtype=dtype, rngs=rngs)
    # fp32_layer_norm uses torch's default eps 1e-5
    eps = 1e-6 if norm_type == "layer_norm" else 1e-5
    self.norm = Norm(embedding_dim, eps=eps, elementwise_affine=False)

  def __call__(self, x: Array, timestep: Array | None = None, class_labels: Array | None = None,
               hidden_dtype=None, emb: Array | None = None
               ) -> tuple[Array, Array, Array, Array, Array]:
    """Returns ``(norm_x, gate_msa, shift_mlp, scale_mlp, gate_mlp)``, gates/mods ``(B, D)``."""
    if self.emb is not None:
      emb = self.emb(timestep, class_labels, hidden_dtype=hidden_dtype)
    mods = self.linear(jax.nn.silu(emb))
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mods, 6, axis=1)
    x = self.norm(x, shift=shift_msa[:, None], scale=scale_msa[:, None])
    return x, gate_msa, shift_mlp, scale_mlp, gate_mlp

"""FLUX.1 (dev with guidance embedding, schnell without) as diffusers' FluxTransformer2DModel.

Module paths equal diffusers' state-dict prefixes (``transformer_blocks.0.attn.to_q``,
``single_transformer_blocks.3.proj_mlp``, ``time_text_embed.guidance_embedder.linear_1``, ...).
Every norm that feeds block linears is a ``layers.Norm`` called with ``shift=``/``scale=``:
the adaLN-Zero norms (``norm1.norm``, ``norm1_context.norm``, single blocks' ``norm.norm``) and
the pre-FFN ``norm2``/``norm2_context``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from converters import register
from converters.attention import FeedForward, merge_heads, scaled_dot_product_attention, split_heads
from converters.embeddings import (AdaLayerNormZero, CombinedTimestepGuidanceTextProjEmbeddings,
                                   CombinedTimestepTextProjEmbeddings)
from converters.layers import Identity, Linear, Norm, linear_act, linear_concat
from pqjax.sites import Consumer, Producer, Site

Array = jax.Array
RotaryEmb = tuple[Array, Array]

DEFAULT_CONFIG: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 64,
    "out_channels": None,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": False,
    "axes_dims_rope": (16, 56, 56),
}

# Significant bits kept in the high part of each RoPE frequency: an integer position below
# 2**12 times such a float32 is exact, so only the tiny low part's product rounds.
_FREQ_HI_BITS = 11


# ----------------------------------------------------------------------------- RoPE


def _split_hi_lo(freqs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """``freqs`` (float64) as ``hi + lo`` float32, ``hi`` with ``_FREQ_HI_BITS`` significant bits."""
  mantissa, exponent = np.frexp(freqs)
  hi = np.ldexp(np.round(mantissa * 2.0**_FREQ_HI_BITS), exponent - _FREQ_HI_BITS)
  return hi.astype(np.float32), (freqs - hi).astype(np.float32)


def rope_cos_sin(ids: Array, axes_dim: tuple[int, ...], theta: float = 10000.0) -> RotaryEmb:
  """FLUX RoPE tables for positions ``ids`` ``(S, n_axes)``, as diffusers' ``FluxPosEmbed``.

  diffusers computes the angles ``pos * freq`` in float64; float32 products would be off by
  up to ``|angle| * 2**-24`` (4e-6 rad at position 64). Splitting each frequency into an exact
  high part and a small low part and combining ``cos(a + b)`` by the angle-sum identity keeps
  float32 results within a few ulps of diffusers' for integer positions below 4096.

  Args:
    ids: ``(S, len(axes_dim))`` positions, any real dtype.
    axes_dim: rotary width of each position axis (each even).
    theta: RoPE base.

  Returns:
    ``(cos, sin)``, each ``(S, sum(axes_dim))`` float32, every frequency repeated twice
    (interleaved pairs).

  Raises:
    ValueError: ``ids`` is not 2-D with one column per axis.
  """
  if ids.ndim != 2 or ids.shape[1] != len(axes_dim):
    raise ValueError(f"ids must have shape (S, {len(axes_dim)}) for axes_dims_rope={axes_dim}, "
                     f"got {ids.shape}")
  pos = ids.astype(jnp.float32)
  cos_out, sin_out = [], []
  for i, dim in enumerate(axes_dim):
    freqs = 1.0 / theta**(np.arange(0, dim, 2, dtype=np.float64) / dim)
    hi, lo = _split_hi_lo(freqs)
    a_hi = pos[:, i:i + 1] * jnp.asarray(hi)[None, :]
    a_lo = pos[:, i:i + 1] * jnp.asarray(lo)[None, :]
    cos_hi, sin_hi, cos_lo, sin_lo = jnp.cos(a_hi), jnp.sin(a_hi), jnp.cos(a_lo), jnp.sin(a_lo)
    cos_out.append(jnp.repeat(cos_hi * cos_lo - sin_hi * sin_lo, 2, axis=1))
    sin_out.append(jnp.repeat(sin_hi * cos_lo + cos_hi * sin_lo, 2, axis=1))
  return jnp.concatenate(cos_out, axis=1), jnp.concatenate(sin_out, axis=1)


def apply_rotary_emb(x: Array, rotary_emb: RotaryEmb) -> Array:
  """Rotates interleaved channel pairs of ``x`` ``(B, H, S, D)`` by ``(cos, sin)`` ``(S, D)``."""
  cos, sin = (t[None, None, :, :] for t in rotary_emb)
  pairs = x.reshape(*x.shape[:-1], -1, 2)
  rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
  out = x.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin
  return out.astype(x.dtype)


class FluxPosEmbed(nnx.Module):
  """Param-less: ``ids (S, n_axes) -> (cos, sin)`` (diffusers' ``pos_embed``)."""

  def __init__(self, theta: float, axes_dim: tuple[int, ...]):
    self.theta = theta
    self.axes_dim = tuple(axes_dim)

  def __call__(self, ids: Array) -> RotaryEmb:
    return rope_cos_sin(ids, self.axes_dim, self.theta)


# ----------------------------------------------------------------------------- attention


class FluxAttention(nnx.Module):
  """Joint (double block) or self (single block, ``pre_only``) attention with RMS QK-norm.

  Double blocks add a text stream: ``add_{q,k,v}_proj`` and ``norm_added_{q,k}``, text tokens
  first in the joint sequence, and separate output projections ``to_out.0`` / ``to_add_out``.
  """

  def __init__(self, query_dim: int, heads: int, dim_head: int, *,
               added_kv_proj_dim: int | None = None, pre_only: bool = False, eps: float = 1e-6,
               dtype, rngs: nnx.Rngs):
    inner = heads * dim_head
    self.heads = heads
    self.head_dim = dim_head
    self.norm_q = Norm(dim_head, kind="rms", eps=eps, dtype=dtype)
    self.norm_k = Norm(dim_head, kind="rms", eps=eps, dtype=dtype)
    self.to_q = Linear(query_dim, inner, dtype=dtype, rngs=rngs)
    self.to_k = Linear(query_dim, inner, dtype=dtype, rngs=rngs)
    self.to_v = Linear(query_dim, inner, dtype=dtype, rngs=rngs)
    self.to_out = None if pre_only else nnx.List(
        [Linear(inner, query_dim, dtype=dtype, rngs=rngs), Identity()])
    if added_kv_proj_dim is None:
      self.norm_added_q = self.norm_added_k = None
      self.add_q_proj = self.add_k_proj = self.add_v_proj = self.to_add_out = None
    else:
      self.norm_added_q = Norm(dim_head, kind="rms", eps=eps, dtype=dtype)
      self.norm_added_k = Norm(dim_head, kind="rms", eps=eps, dtype=dtype)
      self.add_q_proj = Linear(added_kv_proj_dim, inner, dtype=dtype, rngs=rngs)
      self.add_k_proj = Linear(added_kv_proj_dim, inner, dtype=dtype, rngs=rngs)
      self.add_v_proj = Linear(added_kv_proj_dim, inner, dtype=dtype, rngs=rngs)
      self.to_add_out = Linear(inner, query_dim, dtype=dtype, rngs=rngs)

  def _project(self, proj: Linear, norm: Norm | None, x: Array) -> Array:
    """``(B, S, C) -> (B, H, S, D)``, RMS-normalised per head when ``norm`` is given."""
    y = split_heads(proj(x), self.heads)
    return y if norm is None else norm(y)

  def __call__(self, hidden_states: Array, encoder_hidden_states: Array | None = None,
               image_rotary_emb: RotaryEmb | None = None) -> Array | tuple[Array, Array]:
    """Returns the attention output, or ``(image_out, text_out)`` when given text states."""
    q = self._project(self.to_q, self.norm_q, hidden_states)
    k = self._project(self.to_k, self.norm_k, hidden_states)
    v = self._project(self.to_v, None, hidden_states)
    joint = encoder_hidden_states is not None and self.add_q_proj is not None
    if joint:
      # Text tokens come first in the joint sequence.
      eq = self._project(self.add_q_proj, self.norm_added_q, encoder_hidden_states)
      ek = self._project(self.add_k_proj, self.norm_added_k, encoder_hidden_states)
      ev = self._project(self.add_v_proj, None, encoder_hidden_states)
      q, k, v = (jnp.concatenate(p, axis=2) for p in ((eq, q), (ek, k), (ev, v)))
    if image_rotary_emb is not None:
      q = apply_rotary_emb(q, image_rotary_emb)
      k = apply_rotary_emb(k, image_rotary_emb)
    out = merge_heads(scaled_dot_product_attention(q, k, v))
    if not joint:
      return out
    n_txt = encoder_hidden_states.shape[1]
    return self.to_out[0](out[:, n_txt:]), self.to_add_out(out[:, :n_txt])


# ----------------------------------------------------------------------------- adaLN norms


class AdaLayerNormZeroSingle(nnx.Module):
  """``linear(silu(emb))`` -> (shift, scale, gate); ``norm`` is a modulated LayerNorm."""

  def __init__(self, embedding_dim: int, *, dtype, rngs: nnx.Rngs):
    self.linear = Linear(embedding_dim, 3 * embedding_dim, dtype=dtype, rngs=rngs)
    self.norm = Norm(embedding_dim, eps=1e-6, elementwise_affine=False)

  def __call__(self, x: Array, emb: Array) -> tuple[Array, Array]:
    """Returns ``(norm_x, gate)``, gate ``(B, D)``."""
    shift, scale, gate = jnp.split(self.linear(jax.nn.silu(emb)), 3, axis=1)
    return self.norm(x, shift=shift[:, None], scale=scale[:, None]), gate


class AdaLayerNormContinuous(nnx.Module):
  """``norm(x) * (1 + scale) + shift`` with ``(scale, shift) = linear(silu(cond))``."""

  def __init__(self, embedding_dim: int, conditioning_embedding_dim: int, *, eps: float,
               dtype, rngs: nnx.Rngs):
    self.linear = Linear(conditioning_embedding_dim, 2 * embedding_dim, dtype=dtype, rngs=rngs)
    self.norm = Norm(embedding_dim, eps=eps, elementwise_affine=False)

  def __call__(self, x: Array, conditioning_embedding: Array) -> Array:
    emb = self.linear(jax.nn.silu(conditioning_embedding).astype(x.dtype))
    scale, shift = jnp.split(emb, 2, axis=1)
    return self.norm(x, shift=shift[:, None], scale=scale[:, None])


def _clip_fp16(x: Array) -> Array:
  # diffusers clips the residual stream only in float16, to keep it finite.
  return jnp.clip(x, -65504, 65504) if x.dtype == jnp.float16 else x


# ----------------------------------------------------------------------------- blocks


class FluxTransformerBlock(nnx.Module):
  """Double-stream (MMDiT) block: image and text streams with joint attention."""

  def __init__(self, dim: int, num_attention_heads: int, attention_head_dim: int, *,
               eps: float = 1e-6, dtype, rngs: nnx.Rngs):
    self.dim = dim
    self.head_dim = attention_head_dim
    self.norm1 = AdaLayerNormZero(dim, dtype=dtype, rngs=rngs)
    self.norm1_context = AdaLayerNormZero(dim, dtype=dtype, rngs=rngs)
    self.attn = FluxAttention(dim, num_attention_heads, attention_head_dim, added_kv_proj_dim=dim,
                              eps=eps, dtype=dtype, rngs=rngs)
    self.norm2 = Norm(dim, eps=1e-6, elementwise_affine=False)
    self.ff = FeedForward(dim, dim, activation_fn="gelu-approximate", dtype=dtype, rngs=rngs)
    self.norm2_context = Norm(dim, eps=1e-6, elementwise_affine=False)
    self.ff_context = FeedForward(dim, dim, activation_fn="gelu-approximate", dtype=dtype,
                                  rngs=rngs)

  def __call__(self, hidden_states: Array, encoder_hidden_states: Array, temb: Array,
               image_rotary_emb: RotaryEmb | None = None) -> tuple[Array, Array]:
    """Returns ``(encoder_hidden_states, hidden_states)``, as diffusers."""
    norm_h, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(hidden_states, emb=temb)
    norm_e, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(
        encoder_hidden_states, emb=temb)
    attn_out, ctx_attn_out = self.attn(norm_h, norm_e, image_rotary_emb)

    h = hidden_states + gate_msa[:, None] * attn_out
    ff_in = self.norm2(h, shift=shift_mlp[:, None], scale=scale_mlp[:, None])
    h = h + gate_mlp[:, None] * self.ff(ff_in)

    e = encoder_hidden_states + c_gate_msa[:, None] * ctx_attn_out
    ff_in = self.norm2_context(e, shift=c_shift_mlp[:, None], scale=c_scale_mlp[:, None])
    e = _clip_fp16(e + c_gate_mlp[:, None] * self.ff_context(ff_in))
    return e, h

  def permutation_sites(self, prefix: str) -> tuple[Site, ...]:
    """P1/P2/P3/P4 of both streams, plus input sites for the adaLN linears."""
    d, p = self.dim, prefix

    def consumers(*names: str) -> tuple[Consumer, ...]:
      return tuple(Consumer(f"{p}.{n}") for n in names)

    return (
        Site(f"{p}.norm1.P1", "norm", d, consumers("attn.to_q", "attn.to_k", "attn.to_v"),
             norm=f"{p}.norm1.norm"),
        Site(f"{p}.norm1_context.P1", "norm", d,
             consumers("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
             norm=f"{p}.norm1_context.norm"),
        # Image and text values are concatenated along the sequence before attention, so both
        # V projections must share the one within-head permutation of the attention output.
        Site(f"{p}.attn.P2", "producer", d, consumers("attn.to_out.0", "attn.to_add_out"),
             producers=(Producer(f"{p}.attn.to_v"), Producer(f"{p}.attn.add_v_proj")),
             head_dim=self.head_dim),
        Site(f"{p}.norm2.P3", "norm", d, consumers("ff.net.0.proj"), norm=f"{p}.norm2"),
        Site(f"{p}.norm2_context.P3", "norm", d, consumers("ff_context.net.0.proj"),
             norm=f"{p}.norm2_context"),
        self.ff.hidden_site(f"{p}.ff.P4", f"{p}.ff"),
        self.ff_context.hidden_site(f"{p}.ff_context.P4", f"{p}.ff_context"),
        Site(f"{p}.norm1.linear.in", "input", d, consumers("norm1.linear")),
        Site(f"{p}.norm1_context.linear.in", "input", d, consumers("norm1_context.linear")),
    )


class FluxSingleTransformerBlock(nnx.Module):
  """Single-stream block: attention and MLP in parallel on the joint (text, image) sequence."""

  def __init__(self, dim: int, num_attention_heads: int, attention_head_dim: int, *,
               mlp_ratio: float = 4.0, dtype, rngs: nnx.Rngs):
    self.dim = dim
    self.head_dim = attention_head_dim
    self.mlp_hidden_dim = int(dim * mlp_ratio)
    self.norm = AdaLayerNormZeroSingle(dim, dtype=dtype, rngs=rngs)
    self.proj_mlp = Linear(dim, self.mlp_hidden_dim, dtype=dtype, rngs=rngs)
    self.proj_out = Linear(dim + self.mlp_hidden_dim, dim, dtype=dtype, rngs=rngs)
    self.attn = FluxAttention(dim, num_attention_heads, attention_head_dim, pre_only=True,
                              eps=1e-6, dtype=dtype, rngs=rngs)

  def __call__(self, hidden_states: Array, encoder_hidden_states: Array, temb: Array,
               image_rotary_emb: RotaryEmb | None = None) -> tuple[Array, Array]:
    """Returns ``(encoder_hidden_states, hidden_states)``, as diffusers."""
    n_txt = encoder_hidden_states.shape[1]
    residual = jnp.concatenate([encoder_hidden_states, hidden_states], axis=1)
    norm_x, gate = self.norm(residual, emb=temb)
    mlp = linear_act(self.proj_mlp, norm_x, "gelu_tanh")
    attn_out = self.attn(norm_x, image_rotary_emb=image_rotary_emb)
    out = gate[:, None] * linear_concat(self.proj_out, (attn_out, mlp))
    x = _clip_fp16(residual + out)
    return x[:, :n_txt], x[:, n_txt:]

  def permutation_sites(self, prefix: str) -> tuple[Site, ...]:
    """P1 (shared by Q, K, V, proj_mlp), P2 and P4 into the two row ranges of ``proj_out``."""
    d, p = self.dim, prefix
    return (
        Site(f"{p}.norm.P1", "norm", d,
             tuple(Consumer(f"{p}.{n}")
                   for n in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")),
             norm=f"{p}.norm.norm"),
        Site(f"{p}.attn.P2", "producer", d, (Consumer(f"{p}.proj_out"),),
             producers=(Producer(f"{p}.attn.to_v"),), head_dim=self.head_dim),
        Site(f"{p}.proj_mlp.P4", "producer", self.mlp_hidden_dim,
             (Consumer(f"{p}.proj_out", offset=d),), producers=(Producer(f"{p}.proj_mlp"),)),
        Site(f"{p}.norm.linear.in", "input", d, (Consumer(f"{p}.norm.linear"),)),
    )


# ----------------------------------------------------------------------------- model


@register("FluxTransformer2DModel")
class FluxTransformer2DModel(nnx.Module):
  """FLUX.1 transformer; ``__call__`` takes diffusers' forward keywords, returns ``.sample``."""

  def __init__(self, config: dict[str, Any], *, dtype=jnp.bfloat16, rngs: nnx.Rngs):
    cfg = {**DEFAULT_CONFIG, "_class_name": "FluxTransformer2DModel", **config}
    heads, head_dim = cfg["num_attention_heads"], cfg["attention_head_dim"]
    axes = tuple(cfg["axes_dims_rope"])
    if sum(axes) != head_dim or any(a % 2 for a in axes):
      raise ValueError(f"axes_dims_rope={list(axes)} must be even and sum to "
                       f"attention_head_dim={head_dim}")
    self.config = cfg
    self.guidance_embeds = bool(cfg["guidance_embeds"])
    inner = heads * head_dim
    out_channels = cfg["out_channels"] or cfg["in_channels"]

    self.pos_embed = FluxPosEmbed(10000.0, axes)
    embed_cls = (CombinedTimestepGuidanceTextProjEmbeddings if self.guidance_embeds
                 else CombinedTimestepTextProjEmbeddings)
    self.time_text_embed = embed_cls(inner, cfg["pooled_projection_dim"], dtype=dtype, rngs=rngs)
    self.context_embedder = Linear(cfg["joint_attention_dim"], inner, dtype=dtype, rngs=rngs)
    self.x_embedder = Linear(cfg["in_channels"], inner, dtype=dtype, rngs=rngs)
    self.transformer_blocks = nnx.List([
        FluxTransformerBlock(inner, heads, head_dim, dtype=dtype, rngs=rngs)
        for _ in range(cfg["num_layers"])])
    self.single_transformer_blocks = nnx.List([
        FluxSingleTransformerBlock(inner, heads, head_dim, dtype=dtype, rngs=rngs)
        for _ in range(cfg["num_single_layers"])])
    self.norm_out = AdaLayerNormContinuous(inner, inner, eps=1e-6, dtype=dtype, rngs=rngs)
    self.proj_out = Linear(inner, cfg["patch_size"]**2 * out_channels, dtype=dtype, rngs=rngs)

  def embed(self, hidden_states: Array, encoder_hidden_states: Array, pooled_projections: Array,
            timestep: Array, img_ids: Array, txt_ids: Array, guidance: Array | None = None
            ) -> tuple[Array, Array, Array, RotaryEmb]:
    """Everything before the blocks: ``(hidden_states, encoder_hidden_states, temb, rope)``.

    Raises:
      ValueError: ``guidance`` given to a model without guidance embedding or missing for one
        with it; ids that are not 2-D/3-D with one column per RoPE axis.
    """
    if self.guidance_embeds and guidance is None:
      raise ValueError("guidance is required: this model has guidance_embeds=True (FLUX.1-dev)")
    if not self.guidance_embeds and guidance is not None:
      raise ValueError("guidance was given but this model has guidance_embeds=False "
                       "(FLUX.1-schnell)")
    n_axes = len(self.pos_embed.axes_dim)
    ids = jnp.concatenate(
        [_ids_2d(txt_ids, "txt_ids", n_axes), _ids_2d(img_ids, "img_ids", n_axes)], axis=0)
    hidden_states = self.x_embedder(hidden_states)
    dtype = hidden_states.dtype
    # diffusers scales in the activation dtype: timesteps in [0, 1] become [0, 1000].
    timestep = timestep.astype(dtype) * 1000
    if guidance is None:
      temb = self.time_text_embed(timestep, pooled_projections)
    else:
      temb = self.time_text_embed(timestep, guidance.astype(dtype) * 1000, pooled_projections)
    encoder_hidden_states = self.context_embedder(encoder_hidden_states)
    return hidden_states, encoder_hidden_states, temb, self.pos_embed(ids)

  def __call__(self, hidden_states: Array, encoder_hidden_states: Array,
               pooled_projections: Array, timestep: Array, img_ids: Array, txt_ids: Array,
               guidance: Array | None = None) -> Array:
    """Denoiser output, packed tokens ``(B, S_img, patch_size**2 * out_channels)``.

    Args:
      hidden_states: ``(B, S_img, in_channels)`` packed latents.
      encoder_hidden_states: ``(B, S_txt, joint_attention_dim)`` T5 states.
      pooled_projections: ``(B, pooled_projection_dim)`` CLIP pooled embedding.
      timestep: ``(B,)`` in ``[0, 1]`` (scaled by 1000 inside, as diffusers).
      img_ids: ``(S_img, n_axes)`` positions (``(B, S_img, n_axes)``: batch 0 is used).
      txt_ids: ``(S_txt, n_axes)`` positions (likewise).
      guidance: ``(B,)`` guidance scale; required iff ``guidance_embeds``.
    """
    h, e, temb, rope = self.embed(hidden_states, encoder_hidden_states, pooled_projections,
                                  timestep, img_ids, txt_ids, guidance)
    for block in self.transformer_blocks:
      e, h = block(h, e, temb, rope)
    for block in self.single_transformer_blocks:
      e, h = block(h, e, temb, rope)
    return self.proj_out(self.norm_out(h, temb))

  def permutation_sites(self) -> tuple[Site, ...]:
    """Sites of every double and single block; embedders and the output head stay float."""
    sites: list[Site] = []
    for i, block in enumerate(self.transformer_blocks):
      sites.extend(block.permutation_sites(f"transformer_blocks.{i}"))
    for i, block in enumerate(self.single_transformer_blocks):
      sites.extend(block.permutation_sites(f"single_transformer_blocks.{i}"))
    return tuple(sites)


def _ids_2d(ids: Array, name: str, n_axes: int) -> Array:
  if ids.ndim not in (2, 3) or ids.shape[-1] != n_axes:
    raise ValueError(f"{name} must be (S, {n_axes}) or (B, S, {n_axes}) (one column per "
                     f"axes_dims_rope entry), got {ids.shape}")
  # diffusers deprecated batched (3-D) ids and uses the first batch entry.
  return ids[0] if ids.ndim == 3 else ids

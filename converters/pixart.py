"""``PixArtTransformer2DModel`` (PixArt-alpha and -Sigma, adaLN-single) as a Flax NNX module.

Module tree = diffusers' (``pos_embed.proj``, ``adaln_single.{emb, linear}``,
``caption_projection``, ``transformer_blocks.N.{norm1, attn1, norm2, attn2, ff,
scale_shift_table}``, ``scale_shift_table``, ``proj_out``).

In diffusers' ``ada_norm_single`` block, ``norm1`` (modulated by shift/scale_msa) feeds
self-attention, cross-attention reads the *un-normalised* residual stream, and ``norm2``
(modulated by shift/scale_mlp) feeds the FFN. Permutation sites per block:
- ``P1``  ``norm1`` -> ``attn1.to_q/to_k/to_v``
- ``P2``  ``attn1.to_v`` -> ``attn1.to_out.0`` (within heads)
- ``attn2.q``   ``kind="input"``: residual stream -> ``attn2.to_q`` (no norm to fold into)
- ``attn2.kv``  ``kind="input"``: caption states -> ``attn2.to_k/to_v``
- ``attn2.P2``  ``attn2.to_v`` -> ``attn2.to_out.0`` (within heads)
- ``P3``  ``norm2`` -> ``ff.net.0.proj``
- ``P4``  ``ff.net.0.proj`` -> ``ff.net.2``
``adaln_single``, ``caption_projection``, ``pos_embed`` and ``proj_out`` are nobody's
consumer.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from converters import register
from converters.attention import Attention, FeedForward, mask_to_bias
from converters.dit import unpatchify
from converters.embeddings import AdaLayerNormSingle, PatchEmbed, PixArtAlphaTextProjection
from converters.layers import Linear, Norm, param
from pqjax.sites import Consumer, Site

Array = jax.Array

DEFAULTS: dict[str, Any] = {
    "num_attention_heads": 16, "attention_head_dim": 72, "in_channels": 4, "out_channels": 8,
    "num_layers": 28, "dropout": 0.0, "norm_num_groups": 32, "cross_attention_dim": 1152,
    "attention_bias": True, "sample_size": 128, "patch_size": 2,
    "activation_fn": "gelu-approximate", "num_embeds_ada_norm": 1000,
    "upcast_attention": False, "norm_type": "ada_norm_single",
    "norm_elementwise_affine": False, "norm_eps": 1e-6, "interpolation_scale": None,
    "use_additional_conditions": None, "caption_channels": None, "attention_type": "default",
}


class PixArtBlock(nnx.Module):
  """diffusers ``BasicTransformerBlock`` with ``norm_type="ada_norm_single"``."""

  def __init__(self, dim: int, heads: int, head_dim: int, *, cross_attention_dim: int | None,
               activation_fn: str, attention_bias: bool, norm_elementwise_affine: bool,
               norm_eps: float, dtype, rngs: nnx.Rngs):
    self.dim = dim
    self.norm1 = Norm(dim, eps=norm_eps, elementwise_affine=norm_elementwise_affine,
                      dtype=dtype)
    self.attn1 = Attention(dim, heads=heads, dim_head=head_dim, bias=attention_bias,
                           dtype=dtype, rngs=rngs)
    self.norm2 = Norm(dim, eps=norm_eps, elementwise_affine=norm_elementwise_affine,
                      dtype=dtype)
    self.attn2 = (Attention(dim, cross_attention_dim, heads=heads, dim_head=head_dim,
                            bias=attention_bias, dtype=dtype, rngs=rngs)
                  if cross_attention_dim is not None else None)
    self.ff = FeedForward(dim, activation_fn=activation_fn, dtype=dtype, rngs=rngs)
    self.scale_shift_table = param(rngs, (6, dim), dtype, std=dim**-0.5)

  def __call__(self, hidden_states: Array, attention_mask: Array | None = None,
               encoder_hidden_states: Array | None = None,
               encoder_attention_mask: Array | None = None, timestep: Array | None = None
               ) -> Array:
    """diffusers' block kwargs; ``timestep`` is ``adaln_single``'s ``(B, 6D)`` output."""
    b = hidden_states.shape[0]
    mods = self.scale_shift_table[...][None] + timestep.reshape(b, 6, -1)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mods, 6, axis=1)
    x = self.norm1(hidden_states, shift=shift_msa, scale=scale_msa)
    hidden_states = gate_msa * self.attn1(x, attention_mask=attention_mask) + hidden_states
    if self.attn2 is not None:
      hidden_states = self.attn2(hidden_states, encoder_hidden_states,
                                 attention_mask=encoder_attention_mask) + hidden_states
    x = self.norm2(hidden_states, shift=shift_mlp, scale=scale_mlp)
    return gate_mlp * self.ff(x) + hidden_states

  def permutation_sites(self, prefix: str) -> tuple[Site, ...]:
    """This block's sites; ``prefix`` is its dotted path (``transformer_blocks.N``)."""
    a1, a2, dim = f"{prefix}.attn1", f"{prefix}.attn2", self.dim
    sites = [
        Site(f"{prefix}.P1", "norm", dim,
             tuple(Consumer(f"{a1}.{n}") for n in ("to_q", "to_k", "to_v")),
             norm=f"{prefix}.norm1"),
        self.attn1.out_site(f"{prefix}.P2", a1),
    ]
    if self.attn2 is not None:
      sites += [
          Site(f"{a2}.q", "input", dim, (Consumer(f"{a2}.to_q"),)),
          Site(f"{a2}.kv", "input", self.attn2.cross_attention_dim,
               (Consumer(f"{a2}.to_k"), Consumer(f"{a2}.to_v"))),
          self.attn2.out_site(f"{a2}.P2", a2),
      ]
    sites += [
        Site(f"{prefix}.P3", "norm", dim, (Consumer(f"{prefix}.ff.net.0.proj"),),
             norm=f"{prefix}.norm2"),
        self.ff.hidden_site(f"{prefix}.P4", f"{prefix}.ff"),
    ]
    return tuple(sites)


@register("PixArtTransformer2DModel")
class PixArtTransformer2DModel(nnx.Module):
  """PixArt-alpha/-Sigma; ``model(hidden_states, encoder_hidden_states, timestep, ...)``."""

  def __init__(self, config: dict[str, Any], *, dtype=jnp.float32, rngs: nnx.Rngs):
    cfg = {**DEFAULTS, **config}
    if cfg["norm_type"] != "ada_norm_single" or cfg["num_embeds_ada_norm"] is None:
      raise ValueError(f"PixArtTransformer2DModel needs norm_type='ada_norm_single' and "
                       f"num_embeds_ada_norm; got {cfg['norm_type']!r}, "
                       f"{cfg['num_embeds_ada_norm']!r}")
    if cfg["attention_type"] != "default":
      raise ValueError(f"unsupported attention_type {cfg['attention_type']!r}")
    self.config = {**cfg, "_class_name": "PixArtTransformer2DModel"}
    dim = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    self.inner_dim = dim
    self.patch_size = cfg["patch_size"]
    self.out_channels = cfg["out_channels"] or cfg["in_channels"]
    self.use_additional_conditions = (cfg["use_additional_conditions"]
                                      if cfg["use_additional_conditions"] is not None
                                      else cfg["sample_size"] == 128)
    interpolation_scale = (cfg["interpolation_scale"] if cfg["interpolation_scale"] is not None
                           else max(cfg["sample_size"] // 64, 1))
    self.pos_embed = PatchEmbed(cfg["sample_size"], cfg["sample_size"], cfg["patch_size"],
                                cfg["in_channels"], dim,
                                interpolation_scale=interpolation_scale, dtype=dtype, rngs=rngs)
    self.transformer_blocks = nnx.List([
        PixArtBlock(dim, cfg["num_attention_heads"], cfg["attention_head_dim"],
                    cross_attention_dim=cfg["cross_attention_dim"],
                    activation_fn=cfg["activation_fn"], attention_bias=cfg["attention_bias"],
                    norm_elementwise_affine=cfg["norm_elementwise_affine"],
                    norm_eps=cfg["norm_eps"], dtype=dtype, rngs=rngs)
        for _ in range(cfg["num_layers"])])
    self.norm_out = Norm(dim, eps=1e-6, elementwise_affine=False)
    self.scale_shift_table = param(rngs, (2, dim), dtype, std=dim**-0.5)
    self.proj_out = Linear(dim, self.patch_size**2 * self.out_channels, dtype=dtype, rngs=rngs)
    self.adaln_single = AdaLayerNormSingle(dim, self.use_additional_conditions, dtype=dtype,
                                           rngs=rngs)
    self.caption_projection = (
        PixArtAlphaTextProjection(cfg["caption_channels"], dim, dtype=dtype, rngs=rngs)
        if cfg["caption_channels"] is not None else None)

  def __call__(self, hidden_states: Array, encoder_hidden_states: Array | None = None,
               timestep: Array | None = None, added_cond_kwargs: dict[str, Array] | None = None,
               attention_mask: Array | None = None, encoder_attention_mask: Array | None = None
               ) -> Array:
    """diffusers' forward: NCHW latents in, NCHW sample out.

    ``attention_mask``/``encoder_attention_mask``: ``(B, N)`` keep-masks (1 keep, 0 drop),
    turned into ``-10000`` biases as diffusers does, or ready ``(B, 1, N)`` biases.
    ``added_cond_kwargs``: ``{"resolution": (B, 2), "aspect_ratio": (B, 1)}`` when the
    model uses additional conditions.

    Raises:
      ValueError: additional conditions are enabled and ``added_cond_kwargs`` is missing.
    """
    if self.use_additional_conditions and added_cond_kwargs is None:
      raise ValueError("added_cond_kwargs is required: this model uses additional conditions")
    dtype = hidden_states.dtype
    if attention_mask is not None and attention_mask.ndim == 2:
      attention_mask = mask_to_bias(attention_mask, dtype)
    if encoder_attention_mask is not None and encoder_attention_mask.ndim == 2:
      encoder_attention_mask = mask_to_bias(encoder_attention_mask, dtype)
    b, _, hp, wp = hidden_states.shape
    h, w = hp // self.patch_size, wp // self.patch_size
    x = self.pos_embed(hidden_states)
    timestep, embedded_timestep = self.adaln_single(timestep, added_cond_kwargs, batch_size=b,
                                                    hidden_dtype=x.dtype)
    if self.caption_projection is not None:
      encoder_hidden_states = self.caption_projection(encoder_hidden_states)
      encoder_hidden_states = encoder_hidden_states.reshape(b, -1, x.shape[-1])
    for block in self.transformer_blocks:
      x = block(x, attention_mask, encoder_hidden_states, encoder_attention_mask, timestep)
    shift, scale = jnp.split(self.scale_shift_table[...][None] + embedded_timestep[:, None],
                             2, axis=1)
    x = self.norm_out(x, shift=shift, scale=scale)
    x = self.proj_out(x)
    return unpatchify(x, h, w, self.patch_size, self.out_channels)

  def permutation_sites(self) -> tuple[Site, ...]:
    """Every block linear as the consumer of exactly one site (see the module docstring)."""
    return tuple(s for i, blk in enumerate(self.transformer_blocks)
                 for s in blk.permutation_sites(f"transformer_blocks.{i}"))

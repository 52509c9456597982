"""``DiTTransformer2DModel`` (class-conditional DiT, adaLN-Zero) as a Flax NNX module.

Module tree = diffusers' (``pos_embed.proj``, ``transformer_blocks.N.{norm1.emb, norm1.linear,
norm1.norm, attn1, norm3, ff}``, ``proj_out_1``, ``proj_out_2``). Each block owns its own
``norm1.emb`` timestep/label embedder; the final layer reuses block 0's, as diffusers does.

Permutation sites per block (``permutation_sites``):
- ``P1``  ``norm1.norm`` (adaLN shift/scale_msa) -> ``attn1.to_q/to_k/to_v``
- ``P2``  ``attn1.to_v`` -> ``attn1.to_out.0`` (within heads)
- ``P3``  ``norm3`` (adaLN shift/scale_mlp; ``norm2`` is absent in DiT) -> ``ff.net.0.proj``
- ``P4``  ``ff.net.0.proj`` -> ``ff.net.2``
- ``adaln``  ``kind="input"``: ``silu(emb)`` -> ``norm1.linear``. It is a block linear in
  diffusers' tree (``D x 6D``, a third of DiT-XL's weights), and its input is made by an
  elementwise SiLU of an embedding sum that no linear alone produces, so the permutation is
  read at quantization time. ``norm1.emb``'s timestep MLP and label table are embeddings:
  nobody's consumer, like ``pos_embed`` and ``proj_out_*``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from converters import register
from converters.attention import Attention, FeedForward
from converters.embeddings import AdaLayerNormZero, PatchEmbed
from converters.layers import Linear, Norm
from pqjax.sites import Consumer, Site

Array = jax.Array

DEFAULTS: dict[str, Any] = {
    "num_attention_heads": 16, "attention_head_dim": 72, "in_channels": 4,
    "out_channels": None, "num_layers": 28, "dropout": 0.0, "norm_num_groups": 32,
    "attention_bias": True, "sample_size": 32, "patch_size": 2,
    "activation_fn": "gelu-approximate", "num_embeds_ada_norm": 1000,
    "upcast_attention": False, "norm_type": "ada_norm_zero", "norm_elementwise_affine": False,
    "norm_eps": 1e-5,
}


class DiTBlock(nnx.Module):
  """diffusers ``BasicTransformerBlock`` with ``norm_type="ada_norm_zero"``, self-attn only."""

  def __init__(self, dim: int, heads: int, head_dim: int, *, num_embeds_ada_norm: int,
               activation_fn: str, attention_bias: bool, norm_elementwise_affine: bool,
               norm_eps: float, dtype, rngs: nnx.Rngs):
    self.norm1 = AdaLayerNormZero(dim, num_embeds_ada_norm, dtype=dtype, rngs=rngs)
    self.attn1 = Attention(dim, heads=heads, dim_head=head_dim, bias=attention_bias,
                           dtype=dtype, rngs=rngs)
    self.norm3 = Norm(dim, eps=norm_eps, elementwise_affine=norm_elementwise_affine,
                      dtype=dtype)
    self.ff = FeedForward(dim, activation_fn=activation_fn, dtype=dtype, rngs=rngs)

  def __call__(self, hidden_states: Array, timestep: Array, class_labels: Array) -> Array:
    x, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(
        hidden_states, timestep, class_labels, hidden_dtype=hidden_states.dtype)
    hidden_states = gate_msa[:, None] * self.attn1(x) + hidden_states
    x = self.norm3(hidden_states, shift=shift_mlp[:, None], scale=scale_mlp[:, None])
    return gate_mlp[:, None] * self.ff(x) + hidden_states

  def permutation_sites(self, prefix: str) -> tuple[Site, ...]:
    """This block's sites; ``prefix`` is its dotted path (``transformer_blocks.N``)."""
    attn, dim = f"{prefix}.attn1", self.norm3.dim
    return (
        Site(f"{prefix}.adaln", "input", dim, (Consumer(f"{prefix}.norm1.linear"),)),
        Site(f"{prefix}.P1", "norm", dim,
             tuple(Consumer(f"{attn}.{n}") for n in ("to_q", "to_k", "to_v")),
             norm=f"{prefix}.norm1.norm"),
        self.attn1.out_site(f"{prefix}.P2", attn),
        Site(f"{prefix}.P3", "norm", dim, (Consumer(f"{prefix}.ff.net.0.proj"),),
             norm=f"{prefix}.norm3"),
        self.ff.hidden_site(f"{prefix}.P4", f"{prefix}.ff"),
    )


@register("DiTTransformer2DModel")
class DiTTransformer2DModel(nnx.Module):
  """Class-conditional DiT; ``model(hidden_states, timestep, class_labels)`` -> NCHW sample."""

  def __init__(self, config: dict[str, Any], *, dtype=jnp.float32, rngs: nnx.Rngs):
    cfg = {**DEFAULTS, **config}
    if cfg["norm_type"] != "ada_norm_zero" or cfg["num_embeds_ada_norm"] is None:
      raise ValueError(f"DiTTransformer2DModel needs norm_type='ada_norm_zero' and "
                       f"num_embeds_ada_norm; got {cfg['norm_type']!r}, "
                       f"{cfg['num_embeds_ada_norm']!r}")
    self.config = {**cfg, "_class_name": "DiTTransformer2DModel"}
    self.inner_dim = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    self.patch_size = cfg["patch_size"]
    self.out_channels = cfg["out_channels"] or cfg["in_channels"]
    self.pos_embed = PatchEmbed(cfg["sample_size"], cfg["sample_size"], cfg["patch_size"],
                                cfg["in_channels"], self.inner_dim, dtype=dtype, rngs=rngs)
    self.transformer_blocks = nnx.List([
        DiTBlock(self.inner_dim, cfg["num_attention_heads"], cfg["attention_head_dim"],
                 num_embeds_ada_norm=cfg["num_embeds_ada_norm"],
                 activation_fn=cfg["activation_fn"], attention_bias=cfg["attention_bias"],
                 norm_elementwise_affine=cfg["norm_elementwise_affine"],
                 norm_eps=cfg["norm_eps"], dtype=dtype, rngs=rngs)
        for _ in range(cfg["num_layers"])])
    self.norm_out = Norm(self.inner_dim, eps=1e-6, elementwise_affine=False)
    self.proj_out_1 = Linear(self.inner_dim, 2 * self.inner_dim, dtype=dtype, rngs=rngs)
    self.proj_out_2 = Linear(self.inner_dim, self.patch_size**2 * self.out_channels,
                             dtype=dtype, rngs=rngs)

  def __call__(self, hidden_states: Array, timestep: Array, class_labels: Array) -> Array:
    """``(B, C, H, W)`` latents, ``(B,)`` timesteps, ``(B,)`` int labels -> ``(B, C_out, H, W)``.

    Raises:
      ValueError: a non-square patch grid (diffusers' DiT unpatchify assumes a square one).
    """
    b, _, hp, wp = hidden_states.shape
    p = self.patch_size
    if hp // p != wp // p:
      raise ValueError(f"DiT needs a square patch grid, got {hp // p}x{wp // p}")
    x = self.pos_embed(hidden_states)
    for block in self.transformer_blocks:
      x = block(x, timestep, class_labels)
    cond = self.transformer_blocks[0].norm1.emb(timestep, class_labels, hidden_dtype=x.dtype)
    shift, scale = jnp.split(self.proj_out_1(jax.nn.silu(cond)), 2, axis=1)
    x = self.norm_out(x, shift=shift[:, None], scale=scale[:, None])
    x = self.proj_out_2(x)
    return unpatchify(x, hp // p, wp // p, p, self.out_channels)

  def permutation_sites(self) -> tuple[Site, ...]:
    """Every block linear as the consumer of exactly one site (see the module docstring)."""
    return tuple(s for i, blk in enumerate(self.transformer_blocks)
                 for s in blk.permutation_sites(f"transformer_blocks.{i}"))


def unpatchify(x: Array, h: int, w: int, p: int, c: int) -> Array:
  """``(B, h*w, p*p*c)`` tokens -> ``(B, c, h*p, w*p)``, as diffusers' ``nhwpqc->nchpwq``."""
  b = x.shape[0]
  x = x.reshape(b, h, w, p, p, c).transpose(0, 5, 1, 3, 2, 4)
  return x.reshape(b, c, h * p, w * p)

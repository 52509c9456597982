"""SANA (``SanaTransformer2DModel``): a DiT with ReLU linear self-attention and GLUMBConv.

Mirrors ``diffusers.models.transformers.sana_transformer`` module for module, so each dotted
module path is also the diffusers state-dict prefix. Each block is

  adaLN(norm1) -> linear attention (attn1) -> gated residual
  -> softmax cross-attention on the raw residual stream (attn2) -> residual
  -> adaLN(norm2) -> GLUMBConv (1x1 conv, SiLU, 3x3 depthwise conv, GLU, 1x1 conv) -> gated
     residual.

The 1x1 convs of GLUMBConv are ``PointwiseConv``: a ``layers.Linear`` over channels whose
torch layout is the conv's OIHW ``(O, I, 1, 1)`` weight, so the quantization pipeline treats
them as the linears they are.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from converters import register
from converters import layers
from converters.attention import Attention, mask_to_bias, merge_heads
from converters.embeddings import (AdaLayerNormSingle, PatchEmbed, PixArtAlphaTextProjection,
                                   TimestepEmbedding, Timesteps)
from pqjax.sites import ChannelParam, Consumer, Producer, Site

Array = jax.Array

# diffusers' SanaTransformer2DModel.__init__ defaults (0.42), for keys a config.json omits.
DEFAULTS: dict[str, Any] = {
    "in_channels": 32, "out_channels": 32, "num_attention_heads": 70,
    "attention_head_dim": 32, "num_layers": 20, "num_cross_attention_heads": 20,
    "cross_attention_head_dim": 112, "cross_attention_dim": 2240, "caption_channels": 2304,
    "mlp_ratio": 2.5, "dropout": 0.0, "attention_bias": False, "sample_size": 32,
    "patch_size": 1, "norm_elementwise_affine": False, "norm_eps": 1e-6,
    "interpolation_scale": None, "guidance_embeds": False, "guidance_embeds_scale": 0.1,
    "qk_norm": None, "timestep_scale": 1.0,
}

# diffusers' Sana processors apply norm_q/norm_k to the flat (B, N, heads * head_dim)
# projection, so only the across-heads norms run for every head count.
_QK_NORMS = (None, "rms_norm_across_heads", "layer_norm_across_heads")


def _oihw_to_kernel(t: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(t[:, :, 0, 0].T)  # (O, I, 1, 1) -> (I, O)


def _kernel_to_oihw(t: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(t.T[:, :, None, None])  # (I, O) -> (O, I, 1, 1)


class PointwiseConv(layers.Linear):
  """A 1x1 convolution on NHWC input: a linear over the channel axis.

  Params are a ``layers.Linear``'s (``kernel (in, out)``, ``bias``); the torch weight is the
  conv's ``(out, in, 1, 1)``.
  """

  TORCH_PARAMS: dict[str, layers.Layout] = {
      "kernel": ("weight", _oihw_to_kernel, _kernel_to_oihw),
      "bias": layers.Linear.TORCH_PARAMS["bias"],
  }


# ----------------------------------------------------------------------------- attention


def linear_attention(q: Array, k: Array, v: Array) -> Array:
  """SANA's ReLU-kernel linear attention over ``(B, H, T, D)`` inputs, computed in float32.

  Per head, ``out_n = sum_m v_m (k_m . q_n) / (sum_m k_m . q_n + 1e-15)`` with ``q, k``
  passed through ReLU: ``O(T D^2)`` instead of ``O(T^2 D)``. Output channel ``c`` of a head
  depends on ``v[..., c]`` alone (and that head's q, k), so the op is equivariant under
  permutations of V's channels within a head.

  Args:
    q: ``(B, H, T, D)`` queries.
    k: ``(B, H, S, D)`` keys.
    v: ``(B, H, S, D)`` values.

  Returns:
    ``(B, H, T, D)`` in ``v``'s dtype.
  """
  q = jax.nn.relu(q.astype(jnp.float32))
  k = jax.nn.relu(k.astype(jnp.float32))
  # A ones channel appended to V makes the last output channel the normaliser sum_m k_m . q_n,
  # so one pair of matmuls yields numerator and denominator (diffusers' padding trick).
  vp = jnp.pad(v.astype(jnp.float32), ((0, 0), (0, 0), (0, 0), (0, 1)), constant_values=1.0)
  # Full fp32 products, as torch computes them: the ratio is sensitive to TF32 rounding.
  hi = jax.lax.Precision.HIGHEST
  kv = jnp.einsum("bhsc,bhsj->bhcj", vp, k, precision=hi)
  out = jnp.einsum("bhcj,bhtj->bhtc", kv, q, precision=hi)
  return (out[..., :-1] / (out[..., -1:] + 1e-15)).astype(v.dtype)


class SanaLinearAttention(Attention):
  """``attn1``: diffusers' ``Attention`` run by ``SanaLinearAttnProcessor2_0``.

  Same params as ``converters.attention.Attention`` (``to_q/k/v``, ``norm_q/k``,
  ``to_out.0``); softmax attention is replaced by ``linear_attention`` and the mask is
  ignored, as diffusers ignores it.
  """

  def __call__(self, hidden_states: Array, encoder_hidden_states: Array | None = None,
               attention_mask: Array | None = None) -> Array:
    del attention_mask
    q, k, v = self.qkv(hidden_states, encoder_hidden_states)
    out = self.to_out[0](merge_heads(linear_attention(q, k, v)))
    if out.dtype == jnp.float16:
      out = jnp.clip(out, -65504, 65504)
    return out


# ----------------------------------------------------------------------------- feed-forward


class GLUMBConv(nnx.Module):
  """SANA's feed-forward on an NHWC image: inverted 1x1 conv, SiLU, 3x3 depthwise conv, GLU,
  1x1 conv.

  ``conv_inverted`` makes ``2 * hidden`` channels, ``[value | gate]``; the output is
  ``conv_point(value * silu(gate))`` after the depthwise conv. (diffusers' optional output
  RMSNorm and residual are off in SANA's blocks.)
  """

  def __init__(self, in_channels: int, out_channels: int, expand_ratio: float, *,
               dtype=jnp.float32, rngs: nnx.Rngs):
    hidden = int(expand_ratio * in_channels)
    self.hidden_channels = hidden
    self.conv_inverted = PointwiseConv(in_channels, 2 * hidden, dtype=dtype, rngs=rngs)
    self.conv_depth = layers.Conv2d(2 * hidden, 2 * hidden, 3, padding=1, groups=2 * hidden,
                                    dtype=dtype, rngs=rngs)
    self.conv_point = PointwiseConv(hidden, out_channels, bias=False, dtype=dtype, rngs=rngs)

  def __call__(self, x: Array) -> Array:
    h = self.conv_depth(jax.nn.silu(self.conv_inverted(x)))
    value, gate = jnp.split(h, 2, axis=-1)
    return self.conv_point(value * jax.nn.silu(gate))


# ----------------------------------------------------------------------------- norms, embeddings


class SanaModulatedNorm(nnx.Module):
  """Final adaLN: LayerNorm (no affine) modulated by ``scale_shift_table + temb``."""

  def __init__(self, dim: int, *, eps: float = 1e-6, dtype=jnp.float32):
    self.norm = layers.Norm(dim, kind="layer", eps=eps, elementwise_affine=False, dtype=dtype)

  def __call__(self, hidden_states: Array, temb: Array, scale_shift_table: Array) -> Array:
    mod = scale_shift_table[None] + temb[:, None]  # (B, 2, D): [shift, scale]
    return self.norm(hidden_states, shift=mod[:, 0:1], scale=mod[:, 1:2])


class SanaCombinedTimestepGuidanceEmbeddings(nnx.Module):
  """SANA-Sprint conditioning: ``linear(silu(t_emb + g_emb))`` and ``t_emb + g_emb``."""

  def __init__(self, embedding_dim: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.time_proj = Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)
    self.timestep_embedder = TimestepEmbedding(256, embedding_dim, dtype=dtype, rngs=rngs)
    self.guidance_condition_proj = Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)
    self.guidance_embedder = TimestepEmbedding(256, embedding_dim, dtype=dtype, rngs=rngs)
    self.linear = layers.Linear(embedding_dim, 6 * embedding_dim, dtype=dtype, rngs=rngs)

  def __call__(self, timestep: Array, guidance: Array, hidden_dtype) -> tuple[Array, Array]:
    t = self.timestep_embedder(self.time_proj(timestep).astype(hidden_dtype))
    g = self.guidance_embedder(self.guidance_condition_proj(guidance).astype(hidden_dtype))
    cond = t + g
    return self.linear(jax.nn.silu(cond)), cond


# ----------------------------------------------------------------------------- block


class SanaTransformerBlock(nnx.Module):
  """One SANA block; ``__call__`` takes diffusers' positional block arguments."""

  def __init__(self, dim: int, num_attention_heads: int, attention_head_dim: int, *,
               num_cross_attention_heads: int, cross_attention_head_dim: int,
               cross_attention_dim: int, attention_bias: bool, norm_elementwise_affine: bool,
               norm_eps: float, mlp_ratio: float, qk_norm: str | None, dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.norm1 = layers.Norm(dim, kind="layer", eps=norm_eps, elementwise_affine=False,
                             dtype=dtype)
    self.attn1 = SanaLinearAttention(dim, heads=num_attention_heads,
                                     dim_head=attention_head_dim, bias=attention_bias,
                                     qk_norm=qk_norm, dtype=dtype, rngs=rngs)
    self.norm2 = layers.Norm(dim, kind="layer", eps=norm_eps,
                             elementwise_affine=norm_elementwise_affine, dtype=dtype)
    self.attn2 = Attention(dim, cross_attention_dim, heads=num_cross_attention_heads,
                           dim_head=cross_attention_head_dim, bias=True, qk_norm=qk_norm,
                           dtype=dtype, rngs=rngs)
    self.ff = GLUMBConv(dim, dim, mlp_ratio, dtype=dtype, rngs=rngs)
    self.scale_shift_table = layers.param(rngs, (6, dim), dtype, std=dim**-0.5)

  def __call__(self, hidden_states: Array, attention_mask: Array | None = None,
               encoder_hidden_states: Array | None = None,
               encoder_attention_mask: Array | None = None, timestep: Array | None = None,
               height: int | None = None, width: int | None = None) -> Array:
    """Returns the block output ``(B, height * width, dim)``.

    Args:
      hidden_states: ``(B, height * width, dim)``.
      attention_mask: ignored, as in diffusers (linear self-attention takes no mask).
      encoder_hidden_states: ``(B, L, cross_attention_dim)``.
      encoder_attention_mask: ``(B, 1, L)`` additive bias, or None.
      timestep: ``(B, 6 * dim)`` adaLN-single modulation.
      height: patch-grid height.
      width: patch-grid width.
    """
    del attention_mask
    b = hidden_states.shape[0]
    mods = self.scale_shift_table[...][None] + timestep.reshape(b, 6, -1)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
        mods[:, i:i + 1] for i in range(6))

    x = self.norm1(hidden_states, shift=shift_msa, scale=scale_msa)
    hidden_states = hidden_states + gate_msa * self.attn1(x)

    hidden_states = hidden_states + self.attn2(
        hidden_states, encoder_hidden_states=encoder_hidden_states,
        attention_mask=encoder_attention_mask)

    x = self.norm2(hidden_states, shift=shift_mlp, scale=scale_mlp)
    ff = self.ff(x.reshape(b, height, width, -1)).reshape(b, height * width, -1)
    return hidden_states + gate_mlp * ff


# ----------------------------------------------------------------------------- model


@register("SanaTransformer2DModel")
class SanaTransformer2DModel(nnx.Module):
  """diffusers' ``SanaTransformer2DModel`` (SANA, SANA-1.5, SANA-Sprint) in Flax NNX.

  Args:
    config: the diffusers ``config.json`` dict; missing keys take diffusers' defaults.
    dtype: parameter dtype.
    rngs: random init (real weights come from ``converters.from_diffusers``).

  Raises:
    ValueError: a config diffusers cannot run (no cross-attention, cross-attention width
      different from the hidden width) or an unsupported ``qk_norm``.
  """

  def __init__(self, config: dict[str, Any], *, dtype=jnp.float32, rngs: nnx.Rngs):
    cfg = {**DEFAULTS, **config}
    cfg["out_channels"] = cfg["out_channels"] or cfg["in_channels"]
    self.config = cfg
    if cfg["qk_norm"] not in _QK_NORMS:
      raise ValueError(f"qk_norm={cfg['qk_norm']!r} is not supported for SANA; supported: "
                       f"{_QK_NORMS}")
    inner = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    if cfg["cross_attention_dim"] != inner:
      # diffusers' blocks need norm2/attn2 (built only with cross_attention_dim) and feed them
      # the caption projection, whose width is the hidden width.
      raise ValueError(f"cross_attention_dim={cfg['cross_attention_dim']} must equal "
                       f"num_attention_heads * attention_head_dim = {inner}")
    self.inner_dim = inner
    self.patch_size = p = cfg["patch_size"]
    self.out_channels = cfg["out_channels"]
    self.patch_embed = PatchEmbed(
        height=cfg["sample_size"], width=cfg["sample_size"], patch_size=p,
        in_channels=cfg["in_channels"], embed_dim=inner,
        interpolation_scale=cfg["interpolation_scale"],
        pos_embed_type="sincos" if cfg["interpolation_scale"] is not None else None,
        dtype=dtype, rngs=rngs)
    if cfg["guidance_embeds"]:
      self.time_embed = SanaCombinedTimestepGuidanceEmbeddings(inner, dtype=dtype, rngs=rngs)
    else:
      self.time_embed = AdaLayerNormSingle(inner, dtype=dtype, rngs=rngs)
    self.caption_projection = PixArtAlphaTextProjection(cfg["caption_channels"], inner,
                                                        dtype=dtype, rngs=rngs)
    self.caption_norm = layers.Norm(inner, kind="rms", eps=1e-5, dtype=dtype)
    self.transformer_blocks = nnx.List([
        SanaTransformerBlock(
            inner, cfg["num_attention_heads"], cfg["attention_head_dim"],
            num_cross_attention_heads=cfg["num_cross_attention_heads"],
            cross_attention_head_dim=cfg["cross_attention_head_dim"],
            cross_attention_dim=cfg["cross_attention_dim"],
            attention_bias=cfg["attention_bias"],
            norm_elementwise_affine=cfg["norm_elementwise_affine"], norm_eps=cfg["norm_eps"],
            mlp_ratio=cfg["mlp_ratio"], qk_norm=cfg["qk_norm"], dtype=dtype, rngs=rngs)
        for _ in range(cfg["num_layers"])])
    self.scale_shift_table = layers.param(rngs, (2, inner), dtype, std=inner**-0.5)
    self.norm_out = SanaModulatedNorm(inner, eps=1e-6, dtype=dtype)
    self.proj_out = layers.Linear(inner, p * p * self.out_channels, dtype=dtype, rngs=rngs)

  def __call__(self, hidden_states: Array, encoder_hidden_states: Array, timestep: Array,
               guidance: Array | None = None, encoder_attention_mask: Array | None = None,
               attention_mask: Array | None = None) -> Array:
    """diffusers' forward; returns ``.sample``, ``(B, out_channels, H, W)``.

    Args:
      hidden_states: latents ``(B, in_channels, H, W)``.
      encoder_hidden_states: caption features ``(B, L, caption_channels)``.
      timestep: ``(B,)`` (a scalar is broadcast over the batch).
      guidance: ``(B,)`` guidance scales; required iff the config has ``guidance_embeds``.
      encoder_attention_mask: ``(B, L)`` keep-mask (1 keep, 0 drop) or ``(B, 1, L)`` bias.
      attention_mask: accepted and ignored, as in diffusers (linear self-attention).

    Raises:
      ValueError: ``guidance`` given without ``guidance_embeds`` or missing with it; a mask of
        the wrong rank.
    """
    del attention_mask
    b, _, height, width = hidden_states.shape
    p = self.patch_size
    if height % p or width % p:
      raise ValueError(f"hidden_states of shape {hidden_states.shape}: height and width must be "
                       f"multiples of patch_size={p}")
    if bool(self.config["guidance_embeds"]) != (guidance is not None):
      raise ValueError(f"guidance is {'missing' if guidance is None else 'given'} but the "
                       f"config has guidance_embeds={self.config['guidance_embeds']}")
    enc_bias = encoder_attention_mask
    if enc_bias is not None and enc_bias.ndim not in (2, 3):
      raise ValueError(f"encoder_attention_mask must be (batch, tokens) or a (batch, 1, tokens) "
                       f"bias, got shape {enc_bias.shape}")
    h, w = height // p, width // p
    dtype = self.patch_embed.proj.kernel[...].dtype
    if enc_bias is not None and enc_bias.ndim == 2:
      enc_bias = mask_to_bias(enc_bias, dtype)
    timestep = jnp.broadcast_to(jnp.asarray(timestep), (b,))

    x = self.patch_embed(hidden_states.astype(dtype))
    if guidance is not None:
      guidance = jnp.broadcast_to(jnp.asarray(guidance), (b,))
      temb, embedded_timestep = self.time_embed(timestep, guidance, hidden_dtype=x.dtype)
    else:
      temb, embedded_timestep = self.time_embed(timestep, batch_size=b, hidden_dtype=x.dtype)

    context = self.caption_projection(encoder_hidden_states.astype(dtype))
    context = self.caption_norm(context.reshape(b, -1, self.inner_dim))

    for block in self.transformer_blocks:
      x = block(x, None, context, enc_bias, temb, h, w)

    x = self.norm_out(x, embedded_timestep, self.scale_shift_table[...])
    x = self.proj_out(x)
    x = x.reshape(b, h, w, p, p, self.out_channels)
    x = jnp.transpose(x, (0, 5, 1, 3, 2, 4))
    return x.reshape(b, self.out_channels, h * p, w * p)

  def permutation_sites(self) -> tuple[Site, ...]:
    """Sites P1-P4 of every block; see ``pqjax.sites`` and DESIGN.md.

    Per block ``transformer_blocks.i``:
      - ``P1``: ``norm1`` -> ``attn1.to_q/k/v``.
      - ``attn1.P2``: ``attn1.to_v`` -> ``attn1.to_out.0``, within heads (linear attention is
        channel-equivariant in V within a head).
      - ``attn2.query``: the raw residual stream -> ``attn2.to_q`` (no norm: ``input``).
      - ``attn2.kv``: the normed caption -> ``attn2.to_k/v`` (shared by all blocks: ``input``).
      - ``attn2.P2``: ``attn2.to_v`` -> ``attn2.to_out.0``, within heads.
      - ``P3``: ``norm2`` -> ``ff.conv_inverted``.
      - ``P4``: ``ff.conv_inverted`` -> SiLU -> depthwise ``ff.conv_depth`` -> GLU ->
        ``ff.conv_point``: both GLU halves (value at 0, gate at ``hidden``) and the depthwise
        kernel/bias at both offsets take the same permutation.
    """
    cfg = self.config
    dim = self.inner_dim
    sites = []
    for i, block in enumerate(self.transformer_blocks):
      pre = f"transformer_blocks.{i}"
      hidden = block.ff.hidden_channels
      ff = f"{pre}.ff"
      sites += [
          Site(f"{pre}.P1", "norm", dim, norm=f"{pre}.norm1",
               consumers=tuple(Consumer(f"{pre}.attn1.{n}") for n in ("to_q", "to_k", "to_v"))),
          block.attn1.out_site(f"{pre}.attn1.P2", f"{pre}.attn1"),
          Site(f"{pre}.attn2.query", "input", dim, consumers=(Consumer(f"{pre}.attn2.to_q"),)),
          Site(f"{pre}.attn2.kv", "input", cfg["cross_attention_dim"],
               consumers=(Consumer(f"{pre}.attn2.to_k"), Consumer(f"{pre}.attn2.to_v"))),
          block.attn2.out_site(f"{pre}.attn2.P2", f"{pre}.attn2"),
          Site(f"{pre}.P3", "norm", dim, norm=f"{pre}.norm2",
               consumers=(Consumer(f"{ff}.conv_inverted"),)),
          Site(f"{pre}.P4", "producer", hidden, consumers=(Consumer(f"{ff}.conv_point"),),
               producers=(Producer(f"{ff}.conv_inverted", 0),
                          Producer(f"{ff}.conv_inverted", hidden)),
               channelwise=(ChannelParam(f"{ff}.conv_depth", "kernel", 3, 0),
                            ChannelParam(f"{ff}.conv_depth", "kernel", 3, hidden),
                            ChannelParam(f"{ff}.conv_depth", "bias", 0, 0),
                            ChannelParam(f"{ff}.conv_depth", "bias", 0, hidden))),
      ]
    return tuple(sites)

"""Z-Image (``ZImageTransformer2DModel``): a single-stream DiT with refiner blocks.

Mirrors diffusers' ``transformer_z_image.py``: image patches go through ``noise_refiner``
blocks (timestep-modulated), caption features through ``context_refiner`` blocks (no
modulation); both are concatenated per item ``[image, caption]`` and run through the main
``layers``, then the final layer and unpatchify. Attention uses 3-axis RoPE (complex
rotation of adjacent channel pairs), per-head RMS qk-norm and a SwiGLU feed-forward
(``w2(silu(w1 x) * w3 x)``). Blocks are modulated as
``x + tanh(g) * post_norm(f(pre_norm(x) * (1 + s)))``: ``pre_norm`` is a ``layers.Norm``
called with ``scale=s``, so the pipeline can swap it for a gathered norm.

Inputs, as diffusers takes them (basic mode): ``x`` a list of per-image latents
``(C, F, H, W)`` and ``cap_feats`` a list of per-image caption features ``(L, cap_feat_dim)``;
images and captions may differ in size from item to item. Every item is padded to a multiple
of 32 tokens with a learned pad token and the batch is padded to its longest item with an
attention mask, exactly as diffusers does; the output is a list of ``(C, F, H, W)`` arrays.
All padding and RoPE positions are computed on the host from the static shapes, so the call
traces under ``jit`` (one trace per set of shapes). Omni mode (nested lists, SigLIP features,
per-token noise masks at the model level) is not supported by ``__call__``; its parameters
(``siglip_embedder``, ``siglip_refiner``) are built and load, and the blocks accept per-token
modulation (``noise_mask``) as diffusers' blocks do.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from converters import register
from converters.attention import Attention, merge_heads, scaled_dot_product_attention
from converters.embeddings import get_timestep_embedding
from converters.layers import Linear, Norm, param
from pqjax.sites import Consumer, Producer, Site

Array = jax.Array

ADALN_EMBED_DIM = 256
SEQ_MULTI_OF = 32
FREQUENCY_EMBEDDING_SIZE = 256

# diffusers' ZImageTransformer2DModel.__init__ defaults (those of Z-Image-Turbo, except
# axes_lens, which the released config sets to [1536, 512, 512]).
DEFAULTS: dict[str, Any] = {
    "all_patch_size": (2,),
    "all_f_patch_size": (1,),
    "in_channels": 16,
    "dim": 3840,
    "n_layers": 30,
    "n_refiner_layers": 2,
    "n_heads": 30,
    "n_kv_heads": 30,
    "norm_eps": 1e-5,
    "qk_norm": True,
    "cap_feat_dim": 2560,
    "siglip_feat_dim": None,
    "rope_theta": 256.0,
    "t_scale": 1000.0,
    "axes_dims": (32, 48, 48),
    "axes_lens": (1024, 512, 512),
}


# ----------------------------------------------------------------------------- RoPE


def rope_frequencies(ids: np.ndarray, axes_dims: Sequence[int], axes_lens: Sequence[int],
                     theta: float) -> np.ndarray:
  """Z-Image's 3-axis RoPE table for integer positions ``ids`` ``(N, 3)``, on the host.

  Axis ``a`` rotates ``axes_dims[a] / 2`` channel pairs by ``pos * theta ** (-2i / d)``; the
  angles are computed in float64 and rounded to float32 as diffusers does.

  Returns:
    ``(N, sum(axes_dims) // 2)`` complex64 ``exp(i * angle)``.

  Raises:
    ValueError: a position is negative or not below its axis' ``axes_lens`` (diffusers'
      table lookup would fail there).
  """
  ids = np.asarray(ids)
  tables = []
  for a, (d, n) in enumerate(zip(axes_dims, axes_lens)):
    pos = ids[:, a]
    bad = pos[(pos < 0) | (pos >= n)]
    if bad.size:
      raise ValueError(f"RoPE axis {a} position {int(bad[np.abs(bad).argmax()])} is outside "
                       f"[0, axes_lens[{a}]={n}) (caption or latent too long for this config)")
    freqs = 1.0 / theta ** (np.arange(0, d, 2, dtype=np.float64) / d)
    angles = np.outer(pos.astype(np.float64), freqs).astype(np.float32)
    tables.append((np.cos(angles) + 1j * np.sin(angles)).astype(np.complex64))
  return np.concatenate(tables, axis=-1)


def apply_rotary_emb(x: Array, freqs_cis: Array) -> Array:
  """Rotates adjacent channel pairs ``(x[2i], x[2i+1])`` of ``x`` by ``freqs_cis[i]``.

  Args:
    x: ``(..., T, D)``; computed in float32, returned in ``x``'s dtype.
    freqs_cis: complex, broadcastable to ``(..., T, D // 2)``.
  """
  xf = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
  re, im = xf[..., 0], xf[..., 1]
  c, s = jnp.real(freqs_cis), jnp.imag(freqs_cis)
  out = jnp.stack([re * c - im * s, re * s + im * c], axis=-1)
  return out.reshape(x.shape).astype(x.dtype)


# ----------------------------------------------------------------------------- modules


class TimestepEmbedder(nnx.Module):
  """``mlp = [Linear(256, mid), SiLU, Linear(mid, out)]`` over a [cos, sin] embedding."""

  def __init__(self, out_size: int, mid_size: int, *, dtype, rngs: nnx.Rngs):
    self.mlp = nnx.List([
        Linear(FREQUENCY_EMBEDDING_SIZE, mid_size, dtype=dtype, rngs=rngs),
        jax.nn.silu,
        Linear(mid_size, out_size, dtype=dtype, rngs=rngs),
    ])

  def __call__(self, t: Array) -> Array:
    h = get_timestep_embedding(t, FREQUENCY_EMBEDDING_SIZE, flip_sin_to_cos=True,
                               downscale_freq_shift=0)
    h = h.astype(self.mlp[0].kernel.dtype)
    for layer in self.mlp:
      h = layer(h)
    return h


class FeedForward(nnx.Module):
  """SwiGLU ``w2(silu(w1 x) * w3 x)``, all linears without bias."""

  def __init__(self, dim: int, hidden_dim: int, *, dtype, rngs: nnx.Rngs):
    self.w1 = Linear(dim, hidden_dim, bias=False, dtype=dtype, rngs=rngs)
    self.w2 = Linear(hidden_dim, dim, bias=False, dtype=dtype, rngs=rngs)
    self.w3 = Linear(dim, hidden_dim, bias=False, dtype=dtype, rngs=rngs)

  def __call__(self, x: Array) -> Array:
    return self.w2(jax.nn.silu(self.w1(x)) * self.w3(x))


def _attention(attn: Attention, x: Array, attention_mask: Array | None,
               freqs_cis: Array | None) -> Array:
  """diffusers' ``ZSingleStreamAttnProcessor``: self-attention with RoPE after qk-norm.

  ``attention_mask``: ``(B, T)`` boolean, True for keys to attend.
  """
  q, k, v = attn.qkv(x)  # (B, H, T, D), qk-normed
  if freqs_cis is not None:
    q = apply_rotary_emb(q, freqs_cis[:, None])
    k = apply_rotary_emb(k, freqs_cis[:, None])
  mask = None if attention_mask is None else attention_mask[:, None, None, :]
  return attn.to_out[0](merge_heads(scaled_dot_product_attention(q, k, v, mask)))


class ZImageTransformerBlock(nnx.Module):
  """Pre- and post-normed attention + SwiGLU FFN; tanh-gated adaLN when ``modulation``.

  Names follow diffusers: ``attention`` (``to_q/k/v``, ``norm_q/k``, ``to_out.0``),
  ``feed_forward`` (``w1/w2/w3``), ``attention_norm1/2``, ``ffn_norm1/2`` (RMSNorm) and
  ``adaLN_modulation.0`` (``Linear(min(dim, 256), 4 * dim)``, applied without activation).
  Like diffusers, every head has its own K/V (the config's ``n_kv_heads`` is unused).
  """

  def __init__(self, dim: int, n_heads: int, norm_eps: float, qk_norm: bool,
               modulation: bool = True, *, dtype, rngs: nnx.Rngs):
    self.dim = dim
    self.head_dim = dim // n_heads
    self.hidden_dim = int(dim / 3 * 8)
    self.attention = Attention(query_dim=dim, heads=n_heads, dim_head=dim // n_heads,
                               bias=False, qk_norm="rms_norm" if qk_norm else None,
                               out_bias=False, eps=1e-5, dtype=dtype, rngs=rngs)
    self.feed_forward = FeedForward(dim, self.hidden_dim, dtype=dtype, rngs=rngs)
    self.attention_norm1 = Norm(dim, kind="rms", eps=norm_eps, dtype=dtype)
    self.ffn_norm1 = Norm(dim, kind="rms", eps=norm_eps, dtype=dtype)
    self.attention_norm2 = Norm(dim, kind="rms", eps=norm_eps, dtype=dtype)
    self.ffn_norm2 = Norm(dim, kind="rms", eps=norm_eps, dtype=dtype)
    self.modulation = modulation
    self.adaLN_modulation = nnx.List(
        [Linear(min(dim, ADALN_EMBED_DIM), 4 * dim, dtype=dtype, rngs=rngs)]
    ) if modulation else None

  def _modulations(self, adaln_input: Array | None, noise_mask: Array | None,
                   adaln_noisy: Array | None, adaln_clean: Array | None
                   ) -> tuple[Array, Array, Array, Array]:
    """``(scale_msa, tanh(gate_msa), scale_mlp, tanh(gate_mlp))``, ``(B, 1|T, D)`` each."""
    linear = self.adaLN_modulation[0]
    if noise_mask is None:
      if adaln_input is None:
        raise ValueError("a modulated block needs adaln_input (or noise_mask with "
                         "adaln_noisy and adaln_clean)")
      mod = linear(adaln_input)[:, None]
    else:
      # Per-token modulation: noisy tokens (mask 1) take the noisy timestep's modulation.
      mod = jnp.where(noise_mask[..., None] == 1, linear(adaln_noisy)[:, None],
                      linear(adaln_clean)[:, None])
    scale_msa, gate_msa, scale_mlp, gate_mlp = jnp.split(mod, 4, axis=-1)
    return scale_msa, jnp.tanh(gate_msa), scale_mlp, jnp.tanh(gate_mlp)

  def __call__(self, x: Array, attn_mask: Array | None, freqs_cis: Array | None,
               adaln_input: Array | None = None, noise_mask: Array | None = None,
               adaln_noisy: Array | None = None, adaln_clean: Array | None = None) -> Array:
    """Same positional signature as diffusers' block.

    Args:
      x: ``(B, T, dim)``.
      attn_mask: ``(B, T)`` boolean keys to attend, or None (all).
      freqs_cis: ``(B, T, head_dim // 2)`` complex RoPE rotations.
      adaln_input: ``(B, min(dim, 256))`` timestep embedding (modulated blocks).
      noise_mask: ``(B, T)`` int, 1 for noisy tokens: selects per token between the
        modulations of ``adaln_noisy`` and ``adaln_clean`` (omni mode).
    """
    if not self.modulation:
      h = self.attention_norm1(x)
      x = x + self.attention_norm2(_attention(self.attention, h, attn_mask, freqs_cis))
      return x + self.ffn_norm2(self.feed_forward(self.ffn_norm1(x)))
    scale_msa, gate_msa, scale_mlp, gate_mlp = self._modulations(
        adaln_input, noise_mask, adaln_noisy, adaln_clean)
    h = self.attention_norm1(x, scale=scale_msa)
    x = x + gate_msa * self.attention_norm2(_attention(self.attention, h, attn_mask, freqs_cis))
    h = self.ffn_norm1(x, scale=scale_mlp)
    return x + gate_mlp * self.ffn_norm2(self.feed_forward(h))

  def permutation_sites(self, prefix: str) -> tuple[Site, ...]:
    """P1 (attention_norm1 -> q, k, v), P2 (v -> to_out.0), P3 (ffn_norm1 -> w1, w3),
    P4 (w1, w3 -> w2), and the adaLN linear's input (``kind="input"``: the timestep
    embedding, shared by all blocks, has no norm or producer inside the block to fold into).

    RoPE and qk-norm act on Q and K only, so a within-head permutation of V folds (P2).
    """
    a, f = f"{prefix}.attention", f"{prefix}.feed_forward"
    inner = self.head_dim * self.attention.heads
    hidden = self.hidden_dim
    sites = [
        Site(f"{prefix}.P1", "norm", self.dim,
             tuple(Consumer(f"{a}.{n}") for n in ("to_q", "to_k", "to_v")),
             norm=f"{prefix}.attention_norm1"),
        Site(f"{prefix}.P2", "producer", inner, (Consumer(f"{a}.to_out.0"),),
             producers=(Producer(f"{a}.to_v"),), head_dim=self.head_dim),
        Site(f"{prefix}.P3", "norm", self.dim, (Consumer(f"{f}.w1"), Consumer(f"{f}.w3")),
             norm=f"{prefix}.ffn_norm1"),
        Site(f"{prefix}.P4", "producer", hidden, (Consumer(f"{f}.w2"),),
             producers=(Producer(f"{f}.w1"), Producer(f"{f}.w3"))),
    ]
    if self.modulation:
      sites.append(Site(f"{prefix}.adaLN", "input", min(self.dim, ADALN_EMBED_DIM),
                        (Consumer(f"{prefix}.adaLN_modulation.0"),)))
    return tuple(sites)


class FinalLayer(nnx.Module):
  """``linear(layer_norm(x) * (1 + adaLN_modulation(c)))``; ``adaLN_modulation = [SiLU,
  Linear]`` (index 1 is the linear, as in diffusers)."""

  def __init__(self, hidden_size: int, out_channels: int, *, dtype, rngs: nnx.Rngs):
    self.norm_final = Norm(hidden_size, kind="layer", eps=1e-6, elementwise_affine=False,
                           dtype=dtype)
    self.linear = Linear(hidden_size, out_channels, dtype=dtype, rngs=rngs)
    self.adaLN_modulation = nnx.List([
        jax.nn.silu,
        Linear(min(hidden_size, ADALN_EMBED_DIM), hidden_size, dtype=dtype, rngs=rngs),
    ])

  def _scale(self, c: Array) -> Array:
    for layer in self.adaLN_modulation:
      c = layer(c)
    return c[:, None]

  def __call__(self, x: Array, c: Array | None = None, noise_mask: Array | None = None,
               c_noisy: Array | None = None, c_clean: Array | None = None) -> Array:
    if noise_mask is None:
      scale = self._scale(c)
    else:
      scale = jnp.where(noise_mask[..., None] == 1, self._scale(c_noisy), self._scale(c_clean))
    return self.linear(self.norm_final(x, scale=scale))


# ----------------------------------------------------------------------------- sequences


def _patchify(image: Array, p: int, pf: int) -> tuple[Array, tuple[int, int, int]]:
  """``(C, F, H, W)`` -> ``(F/pf * H/p * W/p, pf*p*p*C)`` tokens and the token grid."""
  c, f, h, w = image.shape
  ft, ht, wt = f // pf, h // p, w // p
  x = image.reshape(c, ft, pf, ht, p, wt, p).transpose(1, 3, 5, 2, 4, 6, 0)
  return x.reshape(ft * ht * wt, pf * p * p * c), (ft, ht, wt)


def _unpatchify(tokens: Array, size: tuple[int, int, int], p: int, pf: int, c: int) -> Array:
  """Inverse of ``_patchify`` for the first ``F/pf * H/p * W/p`` tokens."""
  f, h, w = size
  ft, ht, wt = f // pf, h // p, w // p
  x = tokens[:ft * ht * wt].reshape(ft, ht, wt, pf, p, p, c)
  return x.transpose(6, 0, 3, 1, 4, 2, 5).reshape(c, f, h, w)


def _grid_ids(size: tuple[int, int, int], start: tuple[int, int, int]) -> np.ndarray:
  """Row-major ``(prod(size), 3)`` integer coordinates of a grid starting at ``start``."""
  axes = [np.arange(s0, s0 + n) for s0, n in zip(start, size)]
  return np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)


def _padded_len(n: int) -> int:
  return n + (-n) % SEQ_MULTI_OF


def _with_pad_tokens(tokens: Array, pad_token: Array) -> Array:
  """Appends ``pad_token`` rows up to a multiple of ``SEQ_MULTI_OF`` tokens."""
  n = tokens.shape[0]
  pad = jnp.broadcast_to(pad_token.astype(tokens.dtype), (_padded_len(n) - n, tokens.shape[1]))
  return jnp.concatenate([tokens, pad], axis=0)


def _batch(seqs: Sequence[Array], freqs: Sequence[np.ndarray]
           ) -> tuple[Array, Array, Array | None]:
  """Zero-pads items to the longest; the ``(B, T)`` key mask is None when all are equal."""
  lens = [s.shape[0] for s in seqs]
  t = max(lens)
  x = jnp.stack([jnp.pad(s, ((0, t - n), (0, 0))) for s, n in zip(seqs, lens)])
  f = np.stack([np.pad(fr, ((0, t - n), (0, 0))) for fr, n in zip(freqs, lens)])
  mask = None if min(lens) == t else jnp.asarray(np.arange(t)[None] < np.array(lens)[:, None])
  return x, jnp.asarray(f), mask


# ----------------------------------------------------------------------------- model


@register("ZImageTransformer2DModel")
class ZImageTransformer2DModel(nnx.Module):
  """Flax NNX port of diffusers' ``ZImageTransformer2DModel`` (same module names)."""

  def __init__(self, config: dict[str, Any], *, dtype=jnp.bfloat16, rngs: nnx.Rngs):
    cfg = {**DEFAULTS, "_class_name": "ZImageTransformer2DModel", **config}
    self.config = cfg
    patches = tuple(zip(cfg["all_patch_size"], cfg["all_f_patch_size"]))
    if len(cfg["all_patch_size"]) != len(cfg["all_f_patch_size"]):
      raise ValueError(f"all_patch_size {cfg['all_patch_size']} and all_f_patch_size "
                       f"{cfg['all_f_patch_size']} differ in length")
    dim, heads = cfg["dim"], cfg["n_heads"]
    if dim // heads != sum(cfg["axes_dims"]):
      raise ValueError(f"head_dim dim // n_heads = {dim // heads} must equal "
                       f"sum(axes_dims) = {sum(cfg['axes_dims'])}")
    if len(cfg["axes_dims"]) != len(cfg["axes_lens"]):
      raise ValueError(f"axes_dims {cfg['axes_dims']} and axes_lens {cfg['axes_lens']} "
                       f"differ in length")
    self.in_channels = self.out_channels = cfg["in_channels"]
    self.dim = dim
    self.t_scale = float(cfg["t_scale"])
    self.rope_theta = float(cfg["rope_theta"])
    self.axes_dims = tuple(cfg["axes_dims"])
    self.axes_lens = tuple(cfg["axes_lens"])
    self.cap_feat_dim = cfg["cap_feat_dim"]
    c = self.in_channels
    block = lambda modulation: ZImageTransformerBlock(  # noqa: E731
        dim, heads, cfg["norm_eps"], cfg["qk_norm"], modulation, dtype=dtype, rngs=rngs)
    n_ref = cfg["n_refiner_layers"]

    self.all_x_embedder = nnx.Dict({
        f"{p}-{pf}": Linear(pf * p * p * c, dim, dtype=dtype, rngs=rngs) for p, pf in patches})
    self.all_final_layer = nnx.Dict({
        f"{p}-{pf}": FinalLayer(dim, p * p * pf * c, dtype=dtype, rngs=rngs)
        for p, pf in patches})
    self.noise_refiner = nnx.List([block(True) for _ in range(n_ref)])
    self.context_refiner = nnx.List([block(False) for _ in range(n_ref)])
    self.t_embedder = TimestepEmbedder(min(dim, ADALN_EMBED_DIM), 1024, dtype=dtype, rngs=rngs)
    self.cap_embedder = nnx.List([
        Norm(cfg["cap_feat_dim"], kind="rms", eps=cfg["norm_eps"], dtype=dtype),
        Linear(cfg["cap_feat_dim"], dim, dtype=dtype, rngs=rngs),
    ])
    sig = cfg["siglip_feat_dim"]
    if sig is not None:
      self.siglip_embedder = nnx.List([
          Norm(sig, kind="rms", eps=cfg["norm_eps"], dtype=dtype),
          Linear(sig, dim, dtype=dtype, rngs=rngs),
      ])
      self.siglip_refiner = nnx.List([block(False) for _ in range(n_ref)])
      self.siglip_pad_token = param(rngs, (1, dim), dtype)
    else:
      self.siglip_embedder = self.siglip_refiner = self.siglip_pad_token = None
    self.x_pad_token = param(rngs, (1, dim), dtype)
    self.cap_pad_token = param(rngs, (1, dim), dtype)
    self.layers = nnx.List([block(True) for _ in range(cfg["n_layers"])])

  # --------------------------------------------------------------------------- forward

  def _check_inputs(self, x: Sequence[Array], t: Array, cap_feats: Sequence[Array],
                    patch_size: int, f_patch_size: int) -> None:
    if len(x) and isinstance(x[0], (list, tuple)):
      raise NotImplementedError("omni mode (x as a nested list of images per item) is not "
                                "supported; pass one latent (C, F, H, W) per item")
    key = f"{patch_size}-{f_patch_size}"
    if key not in self.all_x_embedder:
      raise ValueError(f"(patch_size, f_patch_size) = ({patch_size}, {f_patch_size}) not in "
                       f"this config's {sorted(self.all_x_embedder)}")
    if not len(x) or len(cap_feats) != len(x):
      raise ValueError(f"x has {len(x)} items and cap_feats {len(cap_feats)}: need the same "
                       f"number, at least one")
    if t.shape != (len(x),):
      raise ValueError(f"t has shape {t.shape}, expected ({len(x)},) for {len(x)} items")
    for i, img in enumerate(x):
      grid = (f_patch_size, patch_size, patch_size)
      if (img.ndim != 4 or img.shape[0] != self.in_channels
          or any(n % g for n, g in zip(img.shape[1:], grid))):
        raise ValueError(f"x[{i}] has shape {img.shape}; expected (C={self.in_channels}, F, H, "
                         f"W) with F, H, W divisible by {grid}")
    for i, cap in enumerate(cap_feats):
      if cap.ndim != 2 or cap.shape[0] < 1 or cap.shape[1] != self.cap_feat_dim:
        raise ValueError(f"cap_feats[{i}] has shape {cap.shape}; expected (L >= 1, "
                         f"{self.cap_feat_dim})")

  def _rope(self, ids: np.ndarray) -> np.ndarray:
    return rope_frequencies(ids, self.axes_dims, self.axes_lens, self.rope_theta)

  def __call__(self, x: Sequence[Array], t: Array, cap_feats: Sequence[Array],
               controlnet_block_samples: dict[int, Array] | None = None,
               siglip_feats: Any = None, image_noise_mask: Any = None, patch_size: int = 2,
               f_patch_size: int = 1) -> list[Array]:
    """diffusers' forward in basic mode; returns its ``.sample``.

    Args:
      x: per-item latents ``(C, F, H, W)`` (sizes may differ between items).
      t: ``(B,)`` timesteps in [0, 1] (scaled by ``t_scale`` inside).
      cap_feats: per-item caption features ``(L_i, cap_feat_dim)``.
      controlnet_block_samples: ``{layer index: (B, T, dim)}`` residuals added after layers.
      siglip_feats, image_noise_mask: omni-mode inputs; must be None.
      patch_size, f_patch_size: which of the config's patchifiers to use.

    Returns:
      A list of ``(C, F, H, W)`` arrays, one per item.

    Raises:
      ValueError: mismatched item counts or shapes, an unknown patch size, a sequence past
        the RoPE table, or controlnet samples for missing layers.
      NotImplementedError: omni-mode inputs.
    """
    t = jnp.asarray(t)
    self._check_inputs(x, t, cap_feats, patch_size, f_patch_size)
    if siglip_feats is not None or image_noise_mask is not None:
      raise NotImplementedError("siglip_feats / image_noise_mask (omni mode) are not supported")
    if controlnet_block_samples:
      bad = sorted(k for k in controlnet_block_samples if not 0 <= k < len(self.layers))
      if bad:
        raise ValueError(f"controlnet_block_samples keys {bad} are not layer indices "
                         f"[0, {len(self.layers)})")
    key = f"{patch_size}-{f_patch_size}"

    # Host-side layout: caption i takes RoPE positions (1 + j, 0, 0) for all its padded
    # tokens; image i's grid starts at (padded caption length + 1, 0, 0); image pad tokens
    # sit at (0, 0, 0).
    cap_lens = [_padded_len(c.shape[0]) for c in cap_feats]
    patches = [_patchify(img, patch_size, f_patch_size) for img in x]
    img_ids, cap_ids = [], []
    for (tokens, grid), cl in zip(patches, cap_lens):
      n = tokens.shape[0]
      ids = _grid_ids(grid, (cl + 1, 0, 0))
      img_ids.append(np.concatenate([ids, np.zeros((_padded_len(n) - n, 3), ids.dtype)]))
      cap_ids.append(_grid_ids((cl, 1, 1), (1, 0, 0)))
    img_freqs = [self._rope(ids) for ids in img_ids]
    cap_freqs = [self._rope(ids) for ids in cap_ids]
    adaln_input = self.t_embedder(t * self.t_scale).astype(x[0].dtype)

    embed = self.all_x_embedder[key]
    img_lens = [tokens.shape[0] for tokens, _ in patches]
    emb = jnp.split(embed(jnp.concatenate([tk for tk, _ in patches])), np.cumsum(img_lens)[:-1])
    img_seqs = [_with_pad_tokens(e, self.x_pad_token[...]) for e in emb]
    h, freqs, mask = _batch(img_seqs, img_freqs)
    for layer in self.noise_refiner:
      h = layer(h, mask, freqs, adaln_input)
    img_seqs = [h[i, :s.shape[0]] for i, s in enumerate(img_seqs)]

    cap = jnp.concatenate(list(cap_feats))
    for layer in self.cap_embedder:
      cap = layer(cap)
    emb = jnp.split(cap, np.cumsum([c.shape[0] for c in cap_feats])[:-1])
    cap_seqs = [_with_pad_tokens(e, self.cap_pad_token[...]) for e in emb]
    h, freqs, mask = _batch(cap_seqs, cap_freqs)
    for layer in self.context_refiner:
      h = layer(h, mask, freqs)
    cap_seqs = [h[i, :s.shape[0]] for i, s in enumerate(cap_seqs)]

    h, freqs, mask = _batch(
        [jnp.concatenate([a, b]) for a, b in zip(img_seqs, cap_seqs)],
        [np.concatenate([a, b]) for a, b in zip(img_freqs, cap_freqs)])
    for i, layer in enumerate(self.layers):
      h = layer(h, mask, freqs, adaln_input)
      if controlnet_block_samples is not None and i in controlnet_block_samples:
        h = h + controlnet_block_samples[i]
    h = self.all_final_layer[key](h, c=adaln_input)
    return [_unpatchify(h[i], img.shape[1:], patch_size, f_patch_size, self.out_channels)
            for i, img in enumerate(x)]

  # --------------------------------------------------------------------------- sites

  def blocks(self) -> list[tuple[str, ZImageTransformerBlock]]:
    """Every transformer block with its dotted path, in execution order."""
    lists = [("noise_refiner", self.noise_refiner), ("context_refiner", self.context_refiner)]
    if self.siglip_refiner is not None:
      lists.append(("siglip_refiner", self.siglip_refiner))
    lists.append(("layers", self.layers))
    return [(f"{name}.{i}", b) for name, blocks in lists for i, b in enumerate(blocks)]

  def permutation_sites(self) -> tuple[Site, ...]:
    """P1-P4 and the adaLN input site of every block (refiners and main layers).

    Embedders (``all_x_embedder``, ``cap_embedder``, ``siglip_embedder``, ``t_embedder``)
    and ``all_final_layer`` are nobody's consumer and stay in float.
    """
    return tuple(s for path, b in self.blocks() for s in b.permutation_sites(path))


__all__ = ["DEFAULTS", "FeedForward", "FinalLayer", "TimestepEmbedder",
           "ZImageTransformer2DModel", "ZImageTransformerBlock", "apply_rotary_emb",
           "rope_frequencies"]

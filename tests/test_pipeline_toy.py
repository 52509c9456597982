"""The pipeline on a small NNX model with every kind of permutation site.

``Toy`` (also used by test_io and test_report) has, per block: a LayerNorm with adaLN
shift/scale feeding Q, K, V and a GLU projection (norm site); context K/V read from an
un-normalized input (input site); V -> output projection inside heads from two producers
(head_dim site); GLU hidden with a channel-wise scale (producer site with two producer
offsets and a channel-wise param) read at an offset of the same output projection (consumer
offsets); an RMSNorm -> fc1 -> fc2 MLP (norm and producer sites).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import pqjax
from converters.layers import Linear, Norm
from pqjax import fold, search
from pqjax.sites import ChannelParam, Consumer, Producer, Site

CONFIG = {"_class_name": "Toy", "in_channels": 16, "cond_dim": 8, "ctx_dim": 32, "dim": 64,
          "ff_dim": 128, "heads": 4, "num_layers": 2}


class ToyBlock(nnx.Module):

  def __init__(self, d: int, f: int, heads: int, ctx_dim: int, *, dtype, rngs: nnx.Rngs):
    self.heads = heads
    self.ada = Linear(d, 3 * d, dtype=dtype, rngs=rngs)
    self.norm1 = Norm(d, kind="layer", eps=1e-6, dtype=dtype)
    self.to_q = Linear(d, d, dtype=dtype, rngs=rngs)
    self.to_k = Linear(d, d, dtype=dtype, rngs=rngs)
    self.to_v = Linear(d, d, dtype=dtype, rngs=rngs)
    self.ctx_k = Linear(ctx_dim, d, dtype=dtype, rngs=rngs)
    self.ctx_v = Linear(ctx_dim, d, dtype=dtype, rngs=rngs)
    self.proj_mlp = Linear(d, 2 * f, dtype=dtype, rngs=rngs)
    self.mlp_scale = nnx.Param(
        (1.0 + 0.5 * jax.random.normal(rngs.params(), (f,))).astype(dtype))
    self.proj_out = Linear(d + f, d, dtype=dtype, rngs=rngs)
    self.norm2 = Norm(d, kind="rms", eps=1e-6, dtype=dtype)
    self.ff1 = Linear(d, f, dtype=dtype, rngs=rngs)
    self.ff2 = Linear(f, d, dtype=dtype, rngs=rngs)

  def __call__(self, x, ctx, c):
    shift, scale, gate = jnp.split(self.ada(jax.nn.silu(c))[:, None], 3, axis=-1)
    h = self.norm1(x, shift=shift, scale=scale)
    b, t, d = h.shape
    hd = d // self.heads
    heads = lambda a: a.reshape(b, -1, self.heads, hd)
    q = heads(self.to_q(h))
    k = heads(jnp.concatenate([self.to_k(h), self.ctx_k(ctx)], axis=1))
    v = heads(jnp.concatenate([self.to_v(h), self.ctx_v(ctx)], axis=1))
    w = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(hd), axis=-1)
    a = jnp.einsum("bhqk,bkhd->bqhd", w, v).reshape(b, t, d)
    g, u = jnp.split(self.proj_mlp(h), 2, axis=-1)
    m = jax.nn.silu(g) * u * self.mlp_scale[...][None, None]
    x = x + gate * self.proj_out(jnp.concatenate([a, m], axis=-1))
    return x + self.ff2(jax.nn.gelu(self.ff1(self.norm2(x))))

  def sites(self, p: str) -> tuple[Site, ...]:
    d, f = self.to_q.in_features, self.ff1.out_features
    return (
        Site(f"{p}.P1", "norm", d, tuple(Consumer(f"{p}.{n}") for n in
                                         ("to_q", "to_k", "to_v", "proj_mlp")),
             norm=f"{p}.norm1"),
        Site(f"{p}.ctx", "input", self.ctx_k.in_features,
             (Consumer(f"{p}.ctx_k"), Consumer(f"{p}.ctx_v"))),
        Site(f"{p}.P2", "producer", d, (Consumer(f"{p}.proj_out"),),
             producers=(Producer(f"{p}.to_v"), Producer(f"{p}.ctx_v")), head_dim=d // self.heads),
        Site(f"{p}.P4a", "producer", f, (Consumer(f"{p}.proj_out", d),),
             producers=(Producer(f"{p}.proj_mlp"), Producer(f"{p}.proj_mlp", f)),
             channelwise=(ChannelParam(p, "mlp_scale", 0),)),
        Site(f"{p}.P3", "norm", d, (Consumer(f"{p}.ff1"),), norm=f"{p}.norm2"),
        Site(f"{p}.P4b", "producer", f, (Consumer(f"{p}.ff2"),), producers=(Producer(f"{p}.ff1"),)),
    )


class Toy(nnx.Module):
  """``model(hidden_states (B,T,C), context (B,S,Cc), cond (B,Cd)) -> (B,T,C)``."""

  def __init__(self, config: dict[str, Any], *, dtype=jnp.float32, rngs: nnx.Rngs):
    c = {**CONFIG, **config}
    self.config = c
    d = c["dim"]
    self.x_embed = Linear(c["in_channels"], d, dtype=dtype, rngs=rngs)
    self.c_embed = Linear(c["cond_dim"], d, dtype=dtype, rngs=rngs)
    self.blocks = nnx.List([ToyBlock(d, c["ff_dim"], c["heads"], c["ctx_dim"], dtype=dtype,
                                     rngs=rngs) for _ in range(c["num_layers"])])
    self.norm_out = Norm(d, elementwise_affine=False, dtype=dtype)
    self.proj_final = Linear(d, c["in_channels"], dtype=dtype, rngs=rngs)

  def __call__(self, hidden_states, context, cond):
    x = self.x_embed(hidden_states)
    c = self.c_embed(cond)
    for blk in self.blocks:
      x = blk(x, context, c)
    return self.proj_final(self.norm_out(x))

  def permutation_sites(self) -> tuple[Site, ...]:
    return tuple(s for i, b in enumerate(self.blocks) for s in b.sites(f"blocks.{i}"))


def make_toy(seed: int = 0, dtype=jnp.float32, outliers: float = 0.0, **config) -> Toy:
  """A random Toy; ``outliers > 0`` moves a scale of up to ``outliers`` from weights to norms.

  The SmoothQuant pattern: a few norm channels grow by ``s`` and their consumers' rows shrink
  by ``s``, so the float model is unchanged while those activation channels are large and
  their weights small.
  """
  model = Toy(config, dtype=dtype, rngs=nnx.Rngs(seed))
  if outliers:
    rng = np.random.default_rng(seed)
    for blk in model.blocks:
      for norm, consumers in ((blk.norm1, (blk.to_q, blk.to_k, blk.to_v, blk.proj_mlp)),
                              (blk.norm2, (blk.ff1,))):
        d = norm.dim
        s = np.ones(d, np.float32)
        idx = rng.choice(d, d // 8, replace=False)
        s[idx] = np.exp(rng.uniform(np.log(4.0), np.log(outliers), idx.size))
        norm.weight.value = (norm.weight.value * s).astype(dtype)
        if norm.bias is not None:
          norm.bias.value = (norm.bias.value * s).astype(dtype)
        for lin in consumers:
          lin.kernel.value = (lin.kernel.value / s[:, None]).astype(dtype)
  return model


def toy_batch(seed: int, batch: int = 4, tokens: int = 32, ctx_tokens: int = 8,
              dtype=jnp.float32) -> dict[str, jax.Array]:
  """Random inputs; context channels differ in scale (an input-site outlier pattern)."""
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  ctx_scale = jnp.exp(jnp.linspace(0.0, 3.0, CONFIG["ctx_dim"]))[::-1]
  return {
      "hidden_states": jax.random.normal(k1, (batch, tokens, CONFIG["in_channels"]), dtype),
      "context": (jax.random.normal(k2, (batch, ctx_tokens, CONFIG["ctx_dim"])) * ctx_scale[None, None]
                  ).astype(dtype),
      "cond": jax.random.normal(k3, (batch, CONFIG["cond_dim"]), dtype),
  }


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# ----------------------------------------------------------------------------- tests


def fold_tolerance(model: nnx.Module, y: jax.Array) -> float:
  """Bound on the fp32 change from reordering sums: depth * K_max * eps * max|y|.

  Folding is exact in real arithmetic; only the order of float32 summations changes (in
  matmuls and norm reductions). Each length-K sum is off by at most ``K * eps`` relative to
  the sum of magnitudes; the blocks compound it once per block.
  """
  k_max = max(v.shape[0] for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
              if len(v.shape) == 2)
  depth = len(model.permutation_sites())
  return depth * k_max * float(jnp.finfo(jnp.float32).eps) * float(jnp.max(jnp.abs(y)))


def random_perms(model, seed=0) -> dict[str, jax.Array]:
  out = {}
  for i, s in enumerate(model.permutation_sites()):
    key = jax.random.fold_in(jax.random.key(seed), i)
    out[s.name] = search.random_permutation(key, s.width, s.head_dim)
  return out


def test_fold_random_permutations_keeps_output():
  model = make_toy(outliers=30.0)
  batch = toy_batch(1)
  y = model(**batch)
  folded = nnx.clone(model)
  for s in model.permutation_sites():
    fold.fold_site(folded, s, random_perms(model)[s.name])
  y_fold = folded(**batch)
  err = float(jnp.max(jnp.abs(y_fold - y)))
  tol = fold_tolerance(model, y)
  assert err <= tol, (err, tol)
  # permuting a consumer's rows without its producer must be caught by the same tolerance
  broken = nnx.clone(model)
  ff2 = broken.blocks[0].ff2
  ff2.kernel.value = fold.permute_axis(ff2.kernel.value, random_perms(model)["blocks.0.P4b"], 0)
  assert float(jnp.max(jnp.abs(broken(**batch) - y))) > tol


@pytest.mark.parametrize("method", ["rtn", "permuquant"])
def test_quantize_w4a4_nvfp4(method):
  model = make_toy(outliers=30.0)
  cfg = pqjax.QuantConfig(method=method, error_tokens=128)
  qmodel = pqjax.quantize(model, [toy_batch(1), toy_batch(2)], cfg)
  info = qmodel.pqjax_info
  assert type(qmodel) is type(model)
  for d, s in zip(info.decisions, model.permutation_sites()):
    assert fold.is_bijection(np.asarray(info.perm(s.name)), s.width), s.name
  y = qmodel(**toy_batch(3))
  assert y.shape == model(**toy_batch(3)).shape
  assert bool(jnp.all(jnp.isfinite(y)))

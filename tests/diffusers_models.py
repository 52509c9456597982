"""Tiny random diffusers models for converter tests: build, randomize, save, compare; checks
shared by every family (full-size layout, ``to_diffusers`` round trip, bf16 checkpoints); and
checks that a model's permutation sites are complete and fold without changing its output.

Every parameter is redrawn (including diffusers' zero-initialised adaLN linears, gates and
``scale_shift_table``), so a converter that drops or transposes any of them fails parity.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import diffusers
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

import converters
from converters.checkpoint import module_at, torch_layout
from converters.layers import Linear, Norm
from pqjax.sites import Site


def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
  """Redraws every parameter in place: matrices ~ N(0, 1/fan_in), vectors around their role.

  Norm weights (1-D ``weight``) are drawn around 1, every other 1-D or 0-D parameter around
  0 with std 0.5, so each one visibly changes the output.
  """
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
      if p.ndim >= 2:
        fan_in = math.prod(p.shape[1:])
        if name.endswith("scale_shift_table"):
          fan_in = p.shape[-1]
        value = noise / math.sqrt(fan_in)
      elif name.endswith("weight"):
        value = 1.0 + 0.2 * noise
      else:
        value = 0.5 * noise
      p.copy_(value.to(p.dtype))
  return model


def build(class_name: str, config: dict[str, Any], seed: int = 0) -> torch.nn.Module:
  """A diffusers model of ``class_name`` from ``config``, randomized with ``seed``, fp32, eval."""
  torch.manual_seed(seed)
  model = getattr(diffusers, class_name)(**config)
  return randomize_(model, seed).eval()


def save(model: torch.nn.Module, folder: Path, **kwargs) -> Path:
  """``save_pretrained`` (safetensors) into ``folder``; returns it."""
  model.save_pretrained(folder, safe_serialization=True, **kwargs)
  return folder


def build_and_convert(class_name: str, config: dict[str, Any], folder: Path, seed: int = 0
                      ) -> tuple[torch.nn.Module, nnx.Module]:
  """``build`` a torch model, ``save`` it into ``folder`` and load it back as our fp32 model."""
  torch_model = build(class_name, config, seed)
  return torch_model, converters.from_diffusers(save(torch_model, folder), dtype=jnp.float32)


def torch_sample(model: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
  """``model(**inputs).sample`` without autograd."""
  with torch.no_grad():
    return model(**inputs).sample


def to_torch(x: Any) -> Any:
  """JAX/NumPy array -> torch tensor (dicts mapped); other values unchanged."""
  if isinstance(x, dict):
    return {k: to_torch(v) for k, v in x.items()}
  if hasattr(x, "shape"):
    return torch.from_numpy(np.array(x))
  return x


def to_jax(x: Any) -> Any:
  """torch tensor -> JAX array (dicts mapped); other values unchanged."""
  if isinstance(x, dict):
    return {k: to_jax(v) for k, v in x.items()}
  if isinstance(x, torch.Tensor):
    t = x.detach()
    if t.dtype == torch.bfloat16:
      return jnp.asarray(t.float().numpy()).astype(jnp.bfloat16)
    return jnp.asarray(t.numpy())
  return x


def as_numpy(x: Any) -> np.ndarray:
  """A torch tensor or JAX array as float64 NumPy."""
  if isinstance(x, torch.Tensor):
    return x.detach().double().numpy()
  return np.asarray(jnp.asarray(x, jnp.float32), np.float64)


def rel_err(got: Any, want: Any) -> float:
  """``||got - want|| / ||want||`` (Frobenius), in float64; shapes must agree."""
  g, w = as_numpy(got), as_numpy(want)
  if g.shape != w.shape:
    raise ValueError(f"shape {g.shape} != {w.shape}")
  return float(np.linalg.norm(g - w) / np.linalg.norm(w))


def capture_blocks(model: torch.nn.Module, blocks: torch.nn.ModuleList, inputs: dict[str, Any]
                   ) -> list[tuple[tuple, dict[str, Any], torch.Tensor]]:
  """Runs ``model(**inputs)``, returning each block's ``(args, kwargs, output)``."""
  calls: list[tuple[tuple, dict[str, Any], torch.Tensor]] = []

  def hook(_, args, kwargs, out):
    calls.append((args, dict(kwargs), out))

  handles = [b.register_forward_hook(hook, with_kwargs=True) for b in blocks]
  try:
    with torch.no_grad():
      model(**inputs)
  finally:
    for h in handles:
      h.remove()
  return calls


def param_count(class_name: str, config: dict[str, Any]) -> int:
  """Parameters of a full-size diffusers model, built on the meta device (no allocation)."""
  with torch.device("meta"):
    model = getattr(diffusers, class_name).from_config(config)
  return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- family checks


def _torch_shape(shape: tuple[int, ...], to_torch: Any) -> tuple[int, ...]:
  return shape if to_torch is None else tuple(to_torch(np.empty(shape, np.bool_)).shape)


def assert_full_size_layout(class_name: str, config: dict[str, Any]) -> int:
  """Builds ``class_name`` at real size, abstract (no allocation), in both libraries: the
  torch state-dict keys, their torch-layout shapes and the parameter count must agree.

  Returns:
    The parameter count.
  """
  abstract = nnx.eval_shape(
      lambda: converters.from_config({"_class_name": class_name, **config}, dtype=jnp.bfloat16))
  assert abstract.config["_class_name"] == class_name
  _, state = nnx.split(abstract, nnx.Param)
  flat = dict(nnx.to_flat_state(state))
  got = {key: _torch_shape(tuple(flat[path].value.shape), to_torch)
         for key, (path, _, to_torch) in torch_layout(abstract).items()}
  with torch.device("meta"):
    torch_model = getattr(diffusers, class_name)(**config)
  want = {k: tuple(v.shape) for k, v in torch_model.state_dict().items()}
  assert sorted(got) == sorted(want)
  for key, shape in got.items():
    assert shape == want[key], (key, shape, want[key])
  count = sum(math.prod(v.value.shape) for v in flat.values())
  assert count == param_count(class_name, config)
  return count


def assert_round_trip(torch_model: torch.nn.Module, model: nnx.Module, folder: Path
                      ) -> torch.nn.Module:
  """``to_diffusers(model, folder)`` read back by diffusers holds ``torch_model``'s state dict
  bit for bit (same keys, dtypes and values); returns the model read back, in eval mode."""
  converters.to_diffusers(model, folder)
  back = type(torch_model).from_pretrained(folder).eval()
  want, got = torch_model.state_dict(), back.state_dict()
  assert sorted(got) == sorted(want)
  for key, value in want.items():
    assert got[key].dtype == value.dtype and torch.equal(got[key], value), key
  return back


def assert_bf16_checkpoint(class_name: str, config: dict[str, Any], folder: Path,
                           inputs: dict[str, Any], bf16_inputs: tuple[str, ...], rtol: float
                           ) -> nnx.Module:
  """Saves a bf16 ``class_name`` model and checks what we load from it against diffusers.

  Read into fp32, the stored bf16 values load exactly, so we compute the fp32 function of
  them within the parity bound ``rtol``. Read in bf16 (with the ``bf16_inputs`` cast), our
  error against that fp32 result is nonzero and no worse than diffusers' own bf16 error, up
  to a factor 2 for rounding at different op boundaries.

  Returns:
    Our bf16 model.
  """
  path = save(build(class_name, config).to(torch.bfloat16), folder)
  cls = getattr(diffusers, class_name)
  ref = torch_sample(cls.from_pretrained(path, torch_dtype=torch.float32).eval(), inputs)
  j32 = converters.from_diffusers(path, dtype=jnp.float32)
  assert rel_err(j32(**to_jax(inputs)), ref) <= rtol
  jbf = converters.from_diffusers(path)
  tb_inputs = {**inputs, **{k: inputs[k].bfloat16() for k in bf16_inputs}}
  torch_err = rel_err(torch_sample(cls.from_pretrained(path, torch_dtype=torch.bfloat16).eval(),
                                   tb_inputs), ref)
  ours = jbf(**to_jax(tb_inputs))
  assert ours.dtype == jnp.bfloat16
  assert 0 < rel_err(ours, ref) <= 2 * torch_err
  return jbf


def assert_sharded_checkpoint(class_name: str, config: dict[str, Any], folder: Path,
                              max_shard_size: str, inputs: dict[str, Any], rtol: float) -> None:
  """A ``class_name`` model saved in several safetensors shards (and their index) loads to
  fp32 parity (``rtol``) with the torch model on ``inputs``."""
  torch_model = build(class_name, config)
  path = save(torch_model, folder, max_shard_size=max_shard_size)
  assert len(list(path.glob("*.safetensors"))) > 1
  assert (path / "diffusion_pytorch_model.safetensors.index.json").exists()
  model = converters.from_diffusers(path, dtype=jnp.float32)
  assert rel_err(model(**to_jax(inputs)), torch_sample(torch_model, inputs)) <= rtol


# ----------------------------------------------------------------------------- sites


class _GatheredOutput(nnx.Module):
  """Stands in for a ``Norm``: the same call, output channels gathered with ``perm``."""

  def __init__(self, inner: nnx.Module, perm: np.ndarray):
    self.inner = inner
    self.perm = nnx.Variable(jnp.asarray(perm))

  def __call__(self, x, *args, **kwargs):
    return self.inner(x, *args, **kwargs)[..., self.perm[...]]


class _GatheredInput(nnx.Module):
  """Stands in for a consumer ``Linear`` of an ``input`` site: gathers its input first."""

  def __init__(self, inner: nnx.Module, index: np.ndarray):
    self.inner = inner
    self.index = nnx.Variable(jnp.asarray(index))

  def __call__(self, x):
    return self.inner(x[..., self.index[...]])


def _replace(root: nnx.Module, path: str, new: nnx.Module) -> None:
  parent_path, _, name = path.rpartition(".")
  parent = module_at(root, parent_path)
  if name.isdigit():
    parent[int(name)] = new
  else:
    setattr(parent, name, new)


def _permute_param(var: nnx.Variable, axis: int, offset: int, perm: np.ndarray) -> None:
  value = np.array(var[...])
  index = [slice(None)] * value.ndim
  index[axis] = slice(offset, offset + len(perm))
  value[tuple(index)] = np.take(value[tuple(index)], perm, axis=axis)
  var[...] = jnp.asarray(value)


def random_site_permutation(site: Site, rng: np.random.Generator) -> np.ndarray:
  """A random permutation of ``site.width`` channels, kept inside heads if ``head_dim``."""
  if site.head_dim is None:
    return rng.permutation(site.width)
  d = site.head_dim
  return np.concatenate([h * d + rng.permutation(d) for h in range(site.width // d)])


def permute_site_params(model: nnx.Module, site: Site, perm: np.ndarray) -> None:
  """Applies ``perm`` to the params of ``site`` in place: consumers' input rows, producers'
  output columns and biases, channel-wise params (norm and input sites need wrappers too:
  see ``fold_permutations``)."""
  for c in site.consumers:
    _permute_param(module_at(model, c.path).kernel, 0, c.offset, perm)
  for pr in site.producers:
    lin = module_at(model, pr.path)
    _permute_param(lin.kernel, 1, pr.offset, perm)
    if lin.bias is not None:
      _permute_param(lin.bias, 0, pr.offset, perm)
  for cp in site.channelwise:
    _permute_param(getattr(module_at(model, cp.module), cp.name), cp.axis, cp.offset, perm)


def fold_permutations(model: nnx.Module, perms: dict[str, np.ndarray]) -> nnx.Module:
  """A copy of ``model`` with each site's permutation applied as ``pqjax/sites.py`` defines it.

  Consumers' input rows ``[offset, offset + width)`` become ``W[offset + p]``; a ``norm`` site's
  norm output is gathered with ``p``; a ``producer`` site's output columns (and bias, and
  ``channelwise`` params) are gathered with ``p``; an ``input`` site's consumers gather their
  input. If the sites are right, the copy computes the same function as ``model``.
  """
  model = nnx.clone(model)
  sites = {s.name: s for s in model.permutation_sites()}
  # Params first, wrappers last: one linear may be a consumer of one site and a producer of
  # another (cross-attention ``to_v``).
  for name, perm in perms.items():
    permute_site_params(model, sites[name], perm)
  for name, perm in perms.items():
    site = sites[name]
    if site.kind == "norm":
      _replace(model, site.norm, _GatheredOutput(module_at(model, site.norm), perm))
    elif site.kind == "input":
      for c in site.consumers:
        lin = module_at(model, c.path)
        index = np.arange(lin.in_features)
        index[c.offset:c.offset + site.width] = c.offset + perm
        _replace(model, c.path, _GatheredInput(lin, index))
  return model


def linear_paths(model: nnx.Module) -> list[str]:
  """Dotted paths of every ``layers.Linear`` in ``model``."""
  return sorted(".".join(str(p) for p in path) for path, node in nnx.iter_graph(model)
                if isinstance(node, Linear))


def check_site_coverage(model: nnx.Module, block_linears: list[str], *,
                        split_consumers: bool = False) -> dict[str, list[tuple[int, int]]]:
  """Asserts the sites describe exactly the linears in ``block_linears``.

  Site names are unique; the consumers are exactly ``block_linears``, each consuming one site
  (or, with ``split_consumers``, several) whose row ranges tile its ``[0, in_features)``
  without gaps or overlaps; producers' columns and channel-wise params fit the site's width;
  a norm site names a ``Norm`` of the site's width.

  Returns:
    Consumer path -> its sorted ``(first, end)`` row ranges.
  """
  sites = model.permutation_sites()
  assert len({s.name for s in sites}) == len(sites)
  rows: dict[str, list[tuple[int, int]]] = {}
  for s in sites:
    for c in s.consumers:
      rows.setdefault(c.path, []).append((c.offset, c.offset + s.width))
    for p in s.producers:
      assert p.offset + s.width <= module_at(model, p.path).out_features, (s.name, p.path)
    for cp in s.channelwise:
      shape = getattr(module_at(model, cp.module), cp.name).shape
      assert cp.offset + s.width <= shape[cp.axis], (s.name, cp)
    if s.kind == "norm":
      norm = module_at(model, s.norm)
      assert isinstance(norm, Norm) and norm.dim == s.width, s.name
  assert sorted(rows) == sorted(block_linears), sorted(set(block_linears) ^ set(rows))
  for path, ranges in rows.items():
    ranges.sort()
    assert split_consumers or len(ranges) == 1, (path, ranges)
    assert [a for a, _ in ranges] == [0] + [b for _, b in ranges[:-1]], (path, ranges)
    assert ranges[-1][1] == module_at(model, path).in_features, (path, ranges)
  return rows

"""NNX modules a quantized model is made of; each calls ``pqjax.dispatch`` to compute.

``QuantLinear`` replaces a consumer ``Linear`` (packed 4-bit weight, optional input gather and
block Hadamard); ``GatheredNorm`` replaces a ``Norm`` whose output channels are permuted;
``GatheredLinear`` is a float linear reading a gathered input (an ``"input"`` site folded
without quantization). Each has ``spec()`` (JSON metadata) and ``from_spec`` (zeros of the
right shapes, for ``nnx.eval_shape``) so a checkpoint can rebuild the structure.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pqjax import dispatch
from pqjax.formats import FORMATS, QTensor

Array = jax.Array


class QuantArray(nnx.Variable):
  """Quantized weight data, static scales and permutations: state, but not trainable."""


class KernelLayout(nnx.Variable):
  """What a ``QuantLinear`` keeps for the GPU kernels: its weights re-laid out
  (``dispatch.prepare``) and its static activation scale shared with the linears that have
  the same one. Derived, so ``pqjax.save`` leaves it out and ``pqjax.load`` rebuilds it."""


def _opt(var: nnx.Variable | None) -> Array | None:
  return None if var is None else var[...]


def _dtype_name(var: nnx.Variable | None) -> str | None:
  return None if var is None else jnp.dtype(var.dtype).name


class QuantLinear(nnx.Module):
  """``y = Q(x[..., in_perm] H) @ Q(H W) + b`` through ``dispatch.linear``.

  Attributes:
    codes, scales, tensor_scale: the ``QTensor`` of ``W.T`` (``(N, K)``, quantized along K).
    bias: float bias ``(N,)`` or None.
    act_format: activation format (None: W4A16).
    act_tensor_scale: static NVFP4 activation tensor scale, or None (dynamic).
    in_perm: int32 ``(K,)`` input gather, or None.
    rotate: block Hadamard inside each group (weights were rotated at quantize time).
    fused_epilogues: the activations a call can apply in the matmul's epilogue
      (``quant_linear(x, epilogue="gelu_tanh")``; ``converters.layers.linear_act``).
    takes_parts: a call takes ``x`` as the parts of a concatenation along the last axis
      (``converters.layers.linear_concat``), which ``dispatch.linear`` may quantize in place.
  """

  fused_epilogues = ("gelu_tanh",)
  takes_parts = True

  def __init__(self, qweight: QTensor, bias: Array | None = None, *,
               act_format: str | None = None, act_tensor_scale: Array | None = None,
               in_perm: Array | None = None, rotate: bool = False, out_dtype=jnp.float32):
    if len(qweight.shape) != 2 or qweight.axis != 1:
      raise ValueError(f"QuantLinear needs a (N, K) QTensor quantized along axis 1, got shape "
                       f"{qweight.shape} axis {qweight.axis}")
    self.out_features, self.in_features = qweight.shape
    self.fmt = qweight.fmt
    self.group_size = qweight.group_size
    self.weight_dtype = jnp.dtype(qweight.dtype).name
    self.out_dtype = jnp.dtype(out_dtype).name
    self.codes = QuantArray(qweight.codes)
    self.scales = QuantArray(qweight.scales)
    self.tensor_scale = QuantArray(qweight.tensor_scale)
    self.bias = None if bias is None else nnx.Param(bias)
    self.act_format = act_format
    self.act_tensor_scale = (None if act_tensor_scale is None
                             else QuantArray(jnp.asarray(act_tensor_scale, jnp.float32)))
    self.in_perm = None if in_perm is None else QuantArray(jnp.asarray(in_perm, jnp.int32))
    self.rotate = bool(rotate)
    # prepare_kernel_weights() fills them
    self.kernel_codes = self.kernel_scales = self.kernel_act_scale = None

  def prepare_kernel_weights(self) -> bool:
    """Stores the GPU kernels' layout of the weights (``dispatch.prepare``) beside them, so
    that calls on the ``"mosaic"`` backend do not re-lay them out: a pass over the codes
    and scales per call otherwise, ~25 MB each way for a 3072 x 12288 layer. Costs as much
    device memory again as the codes and scales. Returns whether the kernels take them."""
    pw = dispatch.prepare(self.qweight)
    if pw is None:
      return False
    # nnx.data: the attributes were None (static) until now
    self.kernel_codes = nnx.data(KernelLayout(pw.codes))
    self.kernel_scales = nnx.data(KernelLayout(pw.scales_t))
    return True

  @property
  def qweight(self) -> QTensor:
    """The quantized ``W.T``."""
    return QTensor(codes=self.codes[...], scales=self.scales[...],
                   tensor_scale=self.tensor_scale[...], fmt=self.fmt,
                   group_size=self.group_size, axis=1,
                   shape=(self.out_features, self.in_features),
                   dtype=jnp.dtype(self.weight_dtype))

  def __call__(self, x: Array | tuple[Array, ...], epilogue: str | None = None) -> Array:
    """``epilogue(linear(x))``; ``epilogue`` in ``fused_epilogues``, ``x`` an array or the
    parts of one along its last axis (``dispatch.linear``)."""
    w = self.qweight
    prepared = (None if self.kernel_codes is None else
                dispatch.prepared_weights(w, self.kernel_codes[...], self.kernel_scales[...]))
    act_scale = self.act_tensor_scale if self.kernel_act_scale is None else self.kernel_act_scale
    return dispatch.linear(x, w, _opt(self.bias), act_format=self.act_format,
                           act_tensor_scale=_opt(act_scale),
                           in_perm=_opt(self.in_perm), rotate=self.rotate,
                           out_dtype=jnp.dtype(self.out_dtype), prepared=prepared,
                           epilogue=epilogue)

  def spec(self) -> dict[str, Any]:
    return {"type": "QuantLinear", "in_features": self.in_features,
            "out_features": self.out_features, "fmt": self.fmt, "group_size": self.group_size,
            "weight_dtype": self.weight_dtype, "out_dtype": self.out_dtype,
            "bias_dtype": _dtype_name(self.bias),
            "act_format": self.act_format, "static_act_scale": self.act_tensor_scale is not None,
            "in_perm": self.in_perm is not None, "rotate": self.rotate}

  @classmethod
  def from_spec(cls, s: dict[str, Any]) -> QuantLinear:
    n, k, g = s["out_features"], s["in_features"], s["group_size"]
    qt = QTensor(codes=jnp.zeros((n, k // 2), jnp.uint8),
                 scales=jnp.zeros((n, k // g), FORMATS[s["fmt"]].scale_dtype),
                 tensor_scale=jnp.ones((), jnp.float32), fmt=s["fmt"], group_size=g, axis=1,
                 shape=(n, k), dtype=jnp.dtype(s["weight_dtype"]))
    bias = None if s["bias_dtype"] is None else jnp.zeros((n,), s["bias_dtype"])
    return cls(qt, bias, act_format=s["act_format"],
               act_tensor_scale=jnp.ones((), jnp.float32) if s["static_act_scale"] else None,
               in_perm=jnp.arange(k, dtype=jnp.int32) if s["in_perm"] else None,
               rotate=s["rotate"], out_dtype=s["out_dtype"])


class GatheredNorm(nnx.Module):
  """A ``Norm`` whose output reads channels in the order ``perm``.

  ``out[..., j] = norm(x, shift, scale)[..., perm[j]]``; ``weight``/``bias`` are kept in the
  input channel order and gathered by ``dispatch.gathered_norm`` with shift and scale.
  """

  def __init__(self, perm: Array, *, dim: int, kind: str, eps: float,
               weight: Array | None = None, bias: Array | None = None):
    self.dim = dim
    self.kind = kind
    self.eps = float(eps)
    self.perm = QuantArray(jnp.asarray(perm, jnp.int32))
    self.weight = None if weight is None else nnx.Param(weight)
    self.bias = None if bias is None else nnx.Param(bias)

  @classmethod
  def from_norm(cls, norm, perm: Array) -> GatheredNorm:
    """Wraps a ``converters.layers.Norm`` (or another GatheredNorm: permutations compose)."""
    perm = jnp.asarray(perm, jnp.int32)
    if isinstance(norm, GatheredNorm):
      perm = jnp.take(norm.perm[...], perm)
    return cls(perm, dim=norm.dim, kind=norm.kind, eps=norm.eps, weight=_opt(norm.weight),
               bias=_opt(norm.bias))

  def __call__(self, x: Array, shift: Array | None = None, scale: Array | None = None) -> Array:
    return dispatch.gathered_norm(x, self.perm[...], kind=self.kind, weight=_opt(self.weight),
                                  bias=_opt(self.bias), shift=shift, scale=scale, eps=self.eps)

  def spec(self) -> dict[str, Any]:
    return {"type": "GatheredNorm", "dim": self.dim, "kind": self.kind, "eps": self.eps,
            "weight_dtype": _dtype_name(self.weight), "bias_dtype": _dtype_name(self.bias)}

  @classmethod
  def from_spec(cls, s: dict[str, Any]) -> GatheredNorm:
    d = s["dim"]
    return cls(jnp.arange(d, dtype=jnp.int32), dim=d, kind=s["kind"], eps=s["eps"],
               weight=None if s["weight_dtype"] is None else jnp.zeros((d,), s["weight_dtype"]),
               bias=None if s["bias_dtype"] is None else jnp.zeros((d,), s["bias_dtype"]))


class GatheredLinear(nnx.Module):
  """Float ``y = x[..., in_perm] @ kernel + bias`` (kernel rows already permuted)."""

  def __init__(self, kernel: Array, bias: Array | None, in_perm: Array):
    self.in_features, self.out_features = kernel.shape
    self.kernel = nnx.Param(kernel)
    self.bias = None if bias is None else nnx.Param(bias)
    self.in_perm = QuantArray(jnp.asarray(in_perm, jnp.int32))

  @classmethod
  def from_linear(cls, linear, in_perm: Array) -> GatheredLinear:
    """Wraps a ``converters.layers.Linear`` (its kernel rows must already be permuted)."""
    return cls(linear.kernel[...], _opt(linear.bias), in_perm)

  def __call__(self, x: Array) -> Array:
    kernel = self.kernel[...]
    y = jnp.dot(jnp.take(x, self.in_perm[...], axis=-1).astype(kernel.dtype), kernel)
    if self.bias is not None:
      y = y + self.bias[...].reshape((1,) * (y.ndim - 1) + (-1,))
    return y

  def spec(self) -> dict[str, Any]:
    return {"type": "GatheredLinear", "in_features": self.in_features,
            "out_features": self.out_features, "dtype": _dtype_name(self.kernel),
            "bias_dtype": _dtype_name(self.bias)}

  @classmethod
  def from_spec(cls, s: dict[str, Any]) -> GatheredLinear:
    k, n = s["in_features"], s["out_features"]
    bias = None if s["bias_dtype"] is None else jnp.zeros((n,), s["bias_dtype"])
    return cls(jnp.zeros((k, n), s["dtype"]), bias, jnp.arange(k, dtype=jnp.int32))


def prepare_kernel_weights(model: nnx.Module) -> nnx.Module:
  """Stores the GPU kernels' weight layout in every ``QuantLinear`` of ``model`` that the
  kernels take (``QuantLinear.prepare_kernel_weights``), in place; returns ``model``.

  Linears with the same static activation scale (bit for bit: the consumers of one site,
  such as Q, K and V, calibrated on the same input) get one shared ``kernel_act_scale``, so
  that their activation quantizes of one input are the same computation on the same
  operands, which XLA then runs once.

  ``pqjax.quantize`` and ``pqjax.load`` call it where the ``"mosaic"`` backend (Hopper) is
  the default; call it after ``dispatch.use_backend("mosaic")`` elsewhere.
  """
  shared: dict[bytes, KernelLayout] = {}
  for _, node in nnx.iter_graph(model):
    if isinstance(node, QuantLinear) and node.prepare_kernel_weights() \
       and node.act_tensor_scale is not None:
      scale = node.act_tensor_scale[...]
      var = shared.setdefault(np.asarray(scale).tobytes(), KernelLayout(scale))
      node.kernel_act_scale = nnx.data(var)
  return model


class QuantInfo(nnx.Module):
  """What ``pqjax.quantize`` did, attached to the quantized model as ``pqjax_info``.

  Attributes:
    config: the ``QuantConfig``.
    sites: the model's permutation sites.
    decisions: one ``SiteDecision`` per site, in the same order.
    perms: the sites' int32 permutations, concatenated (widths from ``decisions``).
  """

  def __init__(self, config, sites: tuple, decisions: tuple, perms: Array):
    self.config = config
    self.sites = tuple(sites)
    self.decisions = tuple(decisions)
    self.perms = QuantArray(jnp.asarray(perms, jnp.int32))

  def perm(self, name: str) -> Array:
    """The permutation of site ``name``."""
    offset = 0
    for d in self.decisions:
      if d.name == name:
        return self.perms[offset:offset + d.width]
      offset += d.width
    raise KeyError(f"no site named {name!r}")


SWAP_TYPES = {"QuantLinear": QuantLinear, "GatheredNorm": GatheredNorm,
              "GatheredLinear": GatheredLinear}

"""Permutation sites: where a channel permutation can be applied and how it is absorbed.

A model lists its sites (``model.permutation_sites()``); the pipeline walks them generically.
Paths are dotted NNX attribute/index paths (``"transformer_blocks.0.attn.to_q"``), equal to
the diffusers module names.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

SiteKind = Literal["norm", "producer", "input"]


@dataclasses.dataclass(frozen=True)
class Consumer:
  """A linear that reads the site's activation on input rows ``[offset, offset + width)``."""

  path: str
  offset: int = 0


@dataclasses.dataclass(frozen=True)
class Producer:
  """A linear whose output columns ``[offset, offset + width)`` make the site's activation."""

  path: str
  offset: int = 0


@dataclasses.dataclass(frozen=True)
class ChannelParam:
  """A parameter of a channel-equivariant op between producer and consumers.

  ``module`` is the module path, ``name`` the parameter attribute, ``axis`` the channel axis;
  channels ``[offset, offset + width)`` on that axis are permuted with the site.
  """

  module: str
  name: str
  axis: int
  offset: int = 0


@dataclasses.dataclass(frozen=True)
class Site:
  """One activation feeding quantized linears, and how a permutation of it is folded.

  Attributes:
    name: unique, e.g. ``"transformer_blocks.0.P1"``.
    kind: ``"norm"`` (P1/P3), ``"producer"`` (P2/P4) or ``"input"`` (gathered quantize).
    width: number of channels permuted.
    consumers: linears reading the activation (they share one permutation).
    norm: for ``kind="norm"``, path of the ``Norm`` module producing the activation.
    producers: for ``kind="producer"``, linears whose output columns are permuted (GLU: both
      gate and up, each at its own offset).
    channelwise: params between producers and consumers permuted alike.
    head_dim: if set, the permutation must keep every channel inside its head (P2).
  """

  name: str
  kind: SiteKind
  width: int
  consumers: tuple[Consumer, ...]
  norm: str | None = None
  producers: tuple[Producer, ...] = ()
  channelwise: tuple[ChannelParam, ...] = ()
  head_dim: int | None = None

  def __post_init__(self):
    if not self.consumers:
      raise ValueError(f"site {self.name!r} has no consumers")
    if self.kind == "norm" and self.norm is None:
      raise ValueError(f"site {self.name!r}: kind='norm' needs a norm path")
    if self.kind == "producer" and not self.producers:
      raise ValueError(f"site {self.name!r}: kind='producer' needs producers")
    if self.head_dim is not None and self.width % self.head_dim:
      raise ValueError(
          f"site {self.name!r}: width {self.width} is not a multiple of head_dim {self.head_dim}"
      )

"""``pqjax.error_report``: per-layer relative output error of a quantized model, and its sites.

Both models run on the same batch; every quantized linear's output is captured in each (the
quantized model's inputs carry the errors of the layers before it, so the error accumulates
as it does at inference). Output columns of a layer that produces a permuted site are put
back in the original order before comparing.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pqjax.fold import dotted_path, get_module, set_module
from pqjax.qmodules import QuantInfo, QuantLinear


class ReportError(ValueError):
  """The two models do not form an (original, quantized) pair."""


class _Capture(nnx.Variable):
  pass


class _OutTap(nnx.Module):
  """Calls the wrapped layer and keeps its output (eager use only)."""

  def __init__(self, inner):
    self.inner = inner
    self.out = _Capture(jnp.zeros(()))

  def __call__(self, x):
    y = self.inner(x)
    self.out.set_value(y)
    return y


@dataclasses.dataclass
class ErrorReport:
  """Rows per quantized layer and the whole-model error.

  Attributes:
    rows: dicts with ``layer``, ``sites``, ``transform``, ``alpha``, ``accepted`` and
      ``rel_err`` (``||y_q - y|| / ||y||`` of the layer output).
    output_rel_err: relative error of the model output.
  """

  rows: list[dict[str, Any]]
  output_rel_err: float

  def __str__(self) -> str:
    head = f"{'layer':<44} {'transform':<16} {'alpha':>5} {'acc':>3} {'rel_err':>9}"
    lines = [head, "-" * len(head)]
    for r in self.rows:
      alpha = "-" if r["alpha"] is None else f"{r['alpha']:.2f}"
      lines.append(f"{r['layer']:<44} {r['transform']:<16} {alpha:>5} "
                   f"{'y' if r['accepted'] else 'n':>3} {r['rel_err']:9.4f}")
    lines.append(f"{'model output':<44} {'':<16} {'':>5} {'':>3} {self.output_rel_err:9.4f}")
    return "\n".join(lines)

  def save_png(self, path: str | os.PathLike) -> None:
    """A bar plot of the per-layer errors, coloured by transform."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"identity": "tab:gray", "perm": "tab:blue", "hadamard": "tab:orange",
               "perm+hadamard": "tab:green"}
    n = len(self.rows)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.25 * n + 2), 4.5))
    for i, r in enumerate(self.rows):
      ax.bar(i, r["rel_err"], color=colours.get(r["transform"].split(",")[0], "tab:red"))
    ax.axhline(self.output_rel_err, color="black", linestyle="--", linewidth=1,
               label=f"model output {self.output_rel_err:.3f}")
    ax.set_xticks(range(n))
    ax.set_xticklabels([r["layer"] for r in self.rows], rotation=90, fontsize=6)
    ax.set_ylabel("relative output error")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colours.values()]
    ax.legend(handles + ax.get_legend_handles_labels()[0],
              list(colours) + ax.get_legend_handles_labels()[1], fontsize=7,
              loc="upper left", bbox_to_anchor=(1.0, 1.0))  # outside: bars stay visible
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def rel_error(a: jax.Array, b: jax.Array) -> float:
  """``||a - b|| / ||b||`` in float64; ``||a||`` when ``b`` is all zeros."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  den = np.linalg.norm(b)
  return float(np.linalg.norm(a - b) / den) if den > 0 else float(np.linalg.norm(a))


def error_report(model: nnx.Module, qmodel: nnx.Module, batch: Mapping[str, Any],
                 path: str | os.PathLike | None = None) -> ErrorReport:
  """Per-layer relative output errors of ``qmodel`` against ``model`` on ``batch``.

  Args:
    model: the original model.
    qmodel: ``pqjax.quantize(model, ...)`` (or a loaded one).
    batch: forward keyword inputs.
    path: if given, a PNG bar plot is written there.

  Returns:
    The ``ErrorReport`` (``print`` it for a table).

  Raises:
    ReportError: ``qmodel`` is not a quantized version of ``model``.
  """
  info = getattr(qmodel, "pqjax_info", None)
  if not isinstance(info, QuantInfo):
    raise ReportError(f"qmodel must come from pqjax.quantize, got a {type(qmodel).__name__}")
  quantized = {dotted_path(p) for p, node in nnx.iter_graph(qmodel)
               if isinstance(node, QuantLinear)}
  layers = list(dict.fromkeys(c.path for s in info.sites for c in s.consumers
                              if c.path in quantized))
  ref, quant = nnx.clone(model), nnx.clone(qmodel)
  for p in layers:
    for m in (ref, quant):
      set_module(m, p, _OutTap(get_module(m, p)))
  y_ref, y_q = ref(**batch), quant(**batch)
  unpermute = _producer_windows(info)
  by_layer: dict[str, list] = {}
  for site, dec in zip(info.sites, info.decisions):
    for c in site.consumers:
      by_layer.setdefault(c.path, []).append(dec)
  rows = []
  for p in layers:
    out_q = get_module(quant, p).out[...]
    for offset, perm in unpermute.get(p, []):
      w = perm.shape[0]
      out_q = out_q.at[..., offset + perm].set(out_q[..., offset:offset + w])
    decs = by_layer.get(p, [])
    rows.append({
        "layer": p,
        "sites": ",".join(d.name for d in decs),
        "transform": ",".join(d.transform for d in decs) or "identity",
        "alpha": next((d.alpha for d in decs if d.alpha is not None), None),
        "accepted": any(d.accepted for d in decs),
        "rel_err": rel_error(out_q, get_module(ref, p).out[...]),
    })
  report = ErrorReport(rows, rel_error(y_q, y_ref))
  if path is not None:
    report.save_png(path)
  return report


def _producer_windows(info: QuantInfo) -> dict[str, list[tuple[int, jax.Array]]]:
  out: dict[str, list[tuple[int, jax.Array]]] = {}
  for site, dec in zip(info.sites, info.decisions):
    if site.kind == "producer" and dec.permuted:
      perm = info.perm(site.name)
      for p in site.producers:
        out.setdefault(p.path, []).append((p.offset, perm))
  return out

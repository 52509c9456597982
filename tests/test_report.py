"""``pqjax.error_report``: per-layer errors, site decisions, PNG output."""

from __future__ import annotations

import numpy as np
import pytest

import pqjax
from pqjax import fold, report
from tests.test_pipeline_toy import make_toy, rel_err, toy_batch


@pytest.fixture(scope="module")
def pair():
  model = make_toy(outliers=30.0)
  q = pqjax.quantize(model, [toy_batch(1)], pqjax.QuantConfig(method="permuquant",
                                                              error_tokens=64))
  return model, q


def test_rows_and_png(pair, tmp_path):
  model, q = pair
  batch = toy_batch(4)
  rep = pqjax.error_report(model, q, batch, path=tmp_path / "err.png")
  layers = [r["layer"] for r in rep.rows]
  consumers = list(dict.fromkeys(c.path for s in model.permutation_sites() for c in s.consumers))
  assert layers == consumers
  assert rep.output_rel_err == pytest.approx(rel_err(q(**batch), model(**batch)), rel=1e-6)
  accepted = {d.name for d in q.pqjax_info.decisions if d.accepted}
  for r in rep.rows:
    assert 0 < r["rel_err"] < 1.5, r
    assert r["accepted"] == any(s in accepted for s in r["sites"].split(","))
  # un-permuted producer outputs: a wrong order would give errors near sqrt(2)
  ff1 = next(r for r in rep.rows if r["layer"] == "blocks.0.ff1")
  assert ff1["rel_err"] < 0.9
  assert (tmp_path / "err.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  text = str(rep)
  assert "blocks.0.to_q" in text and "model output" in text


def test_needs_quantized_model(pair):
  model, _ = pair
  with pytest.raises(report.ReportError, match="pqjax.quantize"):
    pqjax.error_report(model, model, toy_batch(4))

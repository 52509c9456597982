"""``pqjax.save`` / ``pqjax.load``: bit-identical round trip, atomic writes, bad checkpoints."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from flax import nnx

import converters
import pqjax
from pqjax import io
from pqjax.qmodules import GatheredNorm, QuantLinear
from tests.test_pipeline_toy import Toy, make_toy, toy_batch

converters.register("Toy")(Toy)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  model = make_toy(outliers=30.0)
  q = pqjax.quantize(model, [toy_batch(1), toy_batch(2)],
                     pqjax.QuantConfig(method="permuquant", error_tokens=64))
  path = pqjax.save(q, tmp_path_factory.mktemp("ckpt") / "q")
  return q, path


def test_round_trip_bit_identical(saved):
  q, path = saved
  r = pqjax.load(path)
  assert type(r) is type(q)
  assert isinstance(r.blocks[0].to_q, QuantLinear) and isinstance(r.blocks[0].norm1, GatheredNorm)
  assert r.blocks[0].to_q.codes.value.dtype == np.uint8
  assert r.blocks[0].to_q.scales.value.dtype == q.blocks[0].to_q.scales.value.dtype
  assert r.blocks[0].norm1.perm.value.dtype == np.int32
  assert repr(r.pqjax_info.decisions) == repr(q.pqjax_info.decisions)
  assert r.pqjax_info.config == q.pqjax_info.config
  a = jax_state(q)
  b = jax_state(r)
  assert a.keys() == b.keys()
  for k in a:
    assert a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes(), k
  batch = toy_batch(9)
  np.testing.assert_array_equal(np.asarray(q(**batch)), np.asarray(r(**batch)))


def jax_state(m):
  return {".".join(map(str, p)): np.asarray(v.value) for p, v in nnx.to_flat_state(nnx.state(m))}


def test_refuses_existing_and_overwrites(saved, tmp_path):
  q, _ = saved
  path = pqjax.save(q, tmp_path / "x")
  with pytest.raises(FileExistsError):
    pqjax.save(q, path)
  pqjax.save(q, path, overwrite=True)
  assert sorted(os.listdir(tmp_path)) == ["x"]  # no temporary folders left behind
  pqjax.load(path)


def test_half_written_never_loads(saved, tmp_path):
  _, path = saved
  half = tmp_path / "half"
  shutil.copytree(path, half)
  os.remove(half / io.COMMIT_NAME)
  with pytest.raises(io.IncompleteCheckpointError, match="COMMITTED"):
    pqjax.load(half)
  with pytest.raises(io.QuantCheckpointError, match="no such checkpoint"):
    pqjax.load(tmp_path / "missing")


def test_corrupt_metadata(saved, tmp_path):
  _, path = saved
  bad = tmp_path / "bad"
  shutil.copytree(path, bad)
  with open(bad / io.META_NAME, "a") as f:
    f.write(" ")
  with pytest.raises(io.CorruptCheckpointError, match="checksum"):
    pqjax.load(bad)


def _rewrite_meta(folder, edit):
  meta = json.loads((folder / io.META_NAME).read_text())
  edit(meta)
  text = json.dumps(meta)
  (folder / io.META_NAME).write_text(text)
  import hashlib
  (folder / io.COMMIT_NAME).write_text(hashlib.sha256(text.encode()).hexdigest())


def test_mismatched_checkpoint_names_key_and_shape(saved, tmp_path):
  _, path = saved
  bad = tmp_path / "mismatch"
  shutil.copytree(path, bad)
  _rewrite_meta(bad, lambda m: m["model_config"].update(ff_dim=64))
  with pytest.raises(io.CheckpointMismatchError, match=r"blocks\.0\.mlp_scale: stored \(128,\) float32, model expects \(64,\)"):
    pqjax.load(bad)
  other = tmp_path / "unsupported"
  shutil.copytree(path, other)
  _rewrite_meta(other, lambda m: m["model_config"].update(_class_name="NoSuchModel"))
  with pytest.raises(converters.UnsupportedModelError, match="NoSuchModel"):
    pqjax.load(other)


def test_corrupt_array_data(saved, tmp_path):
  _, path = saved
  bad = tmp_path / "data"
  shutil.copytree(path, bad)
  for root, _, files in os.walk(bad / io.ARRAYS_NAME / "d"):
    for name in files:
      with open(os.path.join(root, name), "r+b") as f:
        f.truncate(3)
  with pytest.raises(io.CorruptCheckpointError, match="cannot restore"):
    pqjax.load(bad)


def test_save_needs_quantized_model(tmp_path):
  with pytest.raises(io.QuantCheckpointError, match="pqjax.quantize"):
    pqjax.save(make_toy(), tmp_path / "f")


def test_kernel_layout_attached_not_saved(tmp_path):
  """Where the mosaic backend is the default, ``quantize`` and ``load`` attach the GPU
  kernels' weight layout to every QuantLinear the kernels take (K, N multiples of 128);
  ``save`` leaves it out (the checkpoint is the same either way) and the reference
  outputs do not change."""
  from pqjax import dispatch
  from pqjax.qmodules import KernelLayout
  model = make_toy(dim=128, ff_dim=256, outliers=30.0)
  batches = [toy_batch(1, tokens=16), toy_batch(2, tokens=16)]
  cfg = pqjax.QuantConfig(method="permuquant", error_tokens=64)
  with dispatch.use_backend("mosaic"):
    q = pqjax.quantize(model, batches, cfg)
  lin = q.blocks[0].to_q
  assert (lin.in_features, lin.out_features) == (128, 128)
  pw = dispatch.prepare(lin.qweight)
  np.testing.assert_array_equal(np.asarray(lin.kernel_codes.value), np.asarray(pw.codes))
  np.testing.assert_array_equal(np.asarray(lin.kernel_scales.value), np.asarray(pw.scales_t))
  linears = [node for _, node in nnx.iter_graph(q) if isinstance(node, QuantLinear)]
  for node in linears:  # the kernels take K and N multiples of 128 (not the context's 32)
    takes = node.in_features % 128 == 0 and node.out_features % 128 == 0
    assert (node.kernel_codes is not None) == takes, (node.in_features, node.out_features)
  assert any(n.kernel_codes is None for n in linears)
  # one site's consumers (one input, one calibrated scale) share their activation scale by
  # identity, so that their quantizes of that input are one computation; equal bit for bit
  b = q.blocks[1]
  assert b.to_q.kernel_act_scale is b.to_k.kernel_act_scale is b.proj_mlp.kernel_act_scale
  assert b.ff1.kernel_act_scale is not b.ff2.kernel_act_scale
  for node in linears:
    if node.kernel_act_scale is not None:
      assert node.kernel_act_scale[...].tobytes() == node.act_tensor_scale[...].tobytes()
  path = pqjax.save(q, tmp_path / "q")
  assert not [k for k in io.read_metadata(path)["arrays"] if "kernel_" in k]
  with dispatch.use_backend("reference"):  # the CPU's default (a GPU's is "mosaic")
    plain = pqjax.load(path)
  assert not nnx.state(plain, KernelLayout)
  with dispatch.use_backend("mosaic"):
    again = pqjax.load(path)
  assert jax_state(again).keys() == jax_state(q).keys()
  for k, v in jax_state(q).items():
    assert v.tobytes() == jax_state(again)[k].tobytes(), k
  batch = toy_batch(9, tokens=16)
  np.testing.assert_array_equal(np.asarray(q(**batch)), np.asarray(plain(**batch)))

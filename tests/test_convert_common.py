"""Converter machinery shared by all families: bad checkpoints, the shared embedding and
attention modules against diffusers', and full-size models from a config alone."""

from __future__ import annotations

import json
import math
import shutil

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
from diffusers.models import attention as d_attention
from diffusers.models import attention_processor as d_attn_proc
from diffusers.models import embeddings as d_emb
from diffusers.models import normalization as d_norm
from flax import nnx

import converters
from tests import diffusers_models as dm
from converters import attention, checkpoint, embeddings
from converters.checkpoint import CheckpointError, CheckpointMismatchError
from converters.layers import Linear

RTOL = 1e-5  # fp32 parity bound of issue 3
WEIGHTS = checkpoint.WEIGHTS_NAME
INDEX = checkpoint.INDEX_NAME
TINY_DIT = dict(num_attention_heads=2, attention_head_dim=4, in_channels=4, num_layers=1,
                sample_size=4, patch_size=2, num_embeds_ada_norm=4)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """A tiny DiT checkpoint, single-file and sharded."""
  model = dm.build("DiTTransformer2DModel", TINY_DIT)
  root = tmp_path_factory.mktemp("tiny")
  return dm.save(model, root / "single"), dm.save(model, root / "sharded", max_shard_size="2KB")


@pytest.fixture
def ckpt(tiny, tmp_path):
  """A private copy of the single-file checkpoint, free to corrupt."""
  return shutil.copytree(tiny[0], tmp_path / "ckpt")


@pytest.fixture
def sharded(tiny, tmp_path):
  return shutil.copytree(tiny[1], tmp_path / "sharded")


@pytest.fixture
def reads(monkeypatch):
  """Counts tensors read from safetensors files (to show failures happen before any read)."""
  count = []
  original = checkpoint.SafetensorsFile.read
  monkeypatch.setattr(checkpoint.SafetensorsFile, "read",
                      lambda self, key: count.append(key) or original(self, key))
  return count


def rewrite_weights(folder, edit) -> None:
  """Rewrites ``folder``'s weights through the real safetensors library after ``edit(dict)``."""
  tensors = safetensors.numpy.load_file(folder / WEIGHTS)
  edit(tensors)
  safetensors.numpy.save_file(tensors, folder / WEIGHTS)


# ----------------------------------------------------------------------------- bad input


def test_missing_folder(tmp_path):
  with pytest.raises(CheckpointError, match="no such checkpoint folder"):
    converters.from_diffusers(tmp_path / "nope")


def test_missing_config(ckpt):
  (ckpt / "config.json").unlink()
  with pytest.raises(CheckpointError, match="missing config.json"):
    converters.from_diffusers(ckpt)


def test_corrupt_config(ckpt):
  (ckpt / "config.json").write_text("{not json")
  with pytest.raises(CheckpointError, match="corrupt JSON"):
    converters.from_diffusers(ckpt)


def test_missing_weights(ckpt):
  (ckpt / WEIGHTS).unlink()
  with pytest.raises(CheckpointError, match=WEIGHTS.replace(".", r"\.")):
    converters.from_diffusers(ckpt)


def test_unknown_class_name(ckpt):
  cfg = json.loads((ckpt / "config.json").read_text())
  cfg["_class_name"] = "NoSuchTransformer"
  (ckpt / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(converters.UnsupportedModelError, match="NoSuchTransformer"):
    converters.from_diffusers(ckpt)


@pytest.mark.parametrize("norm_type,loads", [("ada_norm_zero", True), ("layer_norm", False)])
def test_legacy_transformer2d_class_name(ckpt, norm_type, loads):
  cfg = json.loads((ckpt / "config.json").read_text())
  cfg.update(_class_name="Transformer2DModel", norm_type=norm_type)
  (ckpt / "config.json").write_text(json.dumps(cfg))
  if loads:
    model = converters.from_diffusers(ckpt, dtype=jnp.float32)
    assert model.config["_class_name"] == "DiTTransformer2DModel"
  else:
    with pytest.raises(converters.UnsupportedModelError, match="Transformer2DModel"):
      converters.from_diffusers(ckpt)


def test_mismatches_all_listed_before_any_read(ckpt, reads):
  missing = ["pos_embed.proj.bias", "transformer_blocks.0.attn1.to_q.weight"]
  unexpected = ["extra.weight", "transformer_blocks.0.attn1.to_x.bias"]
  shapes = {"proj_out_2.weight": (7, 8), "transformer_blocks.0.ff.net.2.bias": (3,)}
  want_shapes = {}

  def edit(t):
    for k in missing:
      del t[k]
    for k in unexpected:
      t[k] = np.zeros((2,), np.float32)
    for k, shape in shapes.items():
      want_shapes[k] = t[k].shape
      t[k] = np.zeros(shape, np.float32)

  rewrite_weights(ckpt, edit)
  with pytest.raises(CheckpointMismatchError) as info:
    converters.from_diffusers(ckpt)
  err = info.value
  assert err.missing == sorted(missing) and err.unexpected == sorted(unexpected)
  assert err.mismatched == sorted((k, s, want_shapes[k]) for k, s in shapes.items())
  for name in missing + unexpected + [str(s) for s in shapes.values()] + list(shapes) + [
      str(s) for s in want_shapes.values()]:
    assert name in str(err)
  assert reads == []


@pytest.mark.parametrize("kind", ["missing", "unexpected", "shape"])
def test_single_mismatch(ckpt, kind):
  key = "transformer_blocks.0.norm1.linear.weight"

  def edit(t):
    if kind == "missing":
      del t[key]
    elif kind == "unexpected":
      t["transformer_blocks.0.norm1.linear.extra"] = t[key]
    else:
      t[key] = t[key].T.copy()

  rewrite_weights(ckpt, edit)
  with pytest.raises(CheckpointMismatchError, match=r"norm1\.linear") as info:
    converters.from_diffusers(ckpt)
  got = {"missing": info.value.missing, "unexpected": info.value.unexpected,
         "shape": [m[0] for m in info.value.mismatched]}
  assert {k: bool(v) for k, v in got.items()} == {k: k == kind for k in got}


@pytest.mark.parametrize("keep", [4, 100, -8])
def test_truncated_safetensors(ckpt, reads, keep):
  data = (ckpt / WEIGHTS).read_bytes()
  (ckpt / WEIGHTS).write_bytes(data[:keep])
  with pytest.raises(CheckpointError, match="truncated") as info:
    converters.from_diffusers(ckpt)
  if keep < 0:
    # the tensor that reached past the new end is named
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + header_len])
    header.pop("__metadata__", None)
    last = max(header, key=lambda k: header[k]["data_offsets"][1])
    assert last in str(info.value)
  assert reads == []


def test_corrupt_safetensors_header(ckpt):
  data = bytearray((ckpt / WEIGHTS).read_bytes())
  data[8:12] = b"\xff\xfe{]"
  (ckpt / WEIGHTS).write_bytes(bytes(data))
  with pytest.raises(CheckpointError, match="corrupt safetensors header"):
    converters.from_diffusers(ckpt)


@pytest.mark.parametrize("torch_dtype", [torch.float16, torch.bfloat16])
def test_half_checkpoint_loads_exactly(tmp_path, torch_dtype):
  model = dm.build("DiTTransformer2DModel", TINY_DIT).to(torch_dtype)
  path = dm.save(model, tmp_path / "half")
  loaded = converters.from_diffusers(path, dtype=jnp.float32)
  _, state = nnx.split(loaded, nnx.Param)
  flat = dict(nnx.to_flat_state(state))
  want = model.state_dict()
  layout = checkpoint.torch_layout(loaded)
  assert sorted(layout) == sorted(want)
  for key, (p, _, to_torch) in layout.items():
    got = np.asarray(flat[p].get_value())
    np.testing.assert_array_equal(to_torch(got) if to_torch else got, want[key].float().numpy())


def test_sharded_loads(sharded):
  assert len(list(sharded.glob("*.safetensors"))) > 1
  model = converters.from_diffusers(sharded, dtype=jnp.float32)
  assert model.proj_out_2.kernel[...].dtype == jnp.float32


@pytest.mark.parametrize("corruption,match", [
    ("garbage", "corrupt index"),
    ("no_weight_map", "corrupt index"),
    ("missing_shard", "missing shard"),
    ("misplaced", "do not hold"),
])
def test_corrupt_index(sharded, corruption, match):
  index = sharded / INDEX
  content = json.loads(index.read_text())
  wm = content["weight_map"]
  if corruption == "garbage":
    index.write_text(index.read_text()[:-20])
  elif corruption == "no_weight_map":
    index.write_text(json.dumps({"metadata": {}}))
  elif corruption == "missing_shard":
    (sharded / wm["proj_out_2.weight"]).unlink()
  else:
    shards = sorted(set(wm.values()))
    wm["proj_out_2.weight"] = next(s for s in shards if s != wm["proj_out_2.weight"])
    index.write_text(json.dumps(content))
  with pytest.raises(CheckpointError, match=match) as info:
    converters.from_diffusers(sharded)
  if corruption in ("missing_shard", "misplaced"):
    assert ("proj_out_2.weight" in str(info.value)) == (corruption == "misplaced")


def test_to_diffusers_refuses_non_empty_folder(tiny, tmp_path):
  model = converters.from_diffusers(tiny[0], dtype=jnp.float32)
  (tmp_path / "out").mkdir()
  (tmp_path / "out" / "keep.txt").write_text("x")
  with pytest.raises(CheckpointError, match="not empty"):
    converters.to_diffusers(model, tmp_path / "out")
  converters.to_diffusers(model, tmp_path / "new", max_shard_bytes=4096)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["new", "out"]  # no temp folder left
  assert (tmp_path / "new" / INDEX).exists()
  back = converters.from_diffusers(tmp_path / "new", dtype=jnp.float32)
  _, a = nnx.split(model, nnx.Param)
  _, b = nnx.split(back, nnx.Param)
  assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_load_state_dict_lists_mismatches():
  lin = Linear(3, 4, rngs=nnx.Rngs(0))
  with pytest.raises(CheckpointMismatchError, match=r"weight: checkpoint has \(3, 4\)"):
    checkpoint.load_state_dict(lin, {"weight": np.zeros((3, 4)), "bias": np.zeros(4)})


# ----------------------------------------------------------------------------- shared modules


def load(module: nnx.Module, torch_module: torch.nn.Module) -> nnx.Module:
  return checkpoint.load_state_dict(module, {k: v.numpy()
                                             for k, v in torch_module.state_dict().items()})


def torch_run(module: torch.nn.Module, *args, **kwargs):
  with torch.no_grad():
    return module(*args, **kwargs)


@pytest.mark.parametrize("dim,flip,shift,scale", [(256, True, 1, 1), (256, True, 0, 1),
                                                  (33, False, 1, 1000), (8, False, 0.5, 2)])
def test_timestep_embedding(dim, flip, shift, scale):
  t = torch.tensor([0.0, 3.0, 500.5, 999.0])
  want = d_emb.get_timestep_embedding(t, dim, flip, shift, scale)
  got = embeddings.get_timestep_embedding(jnp.asarray(t.numpy()), dim, flip, shift, scale)
  assert dm.rel_err(got, want) <= RTOL


@pytest.mark.parametrize("grid,interp,base", [(4, 1, 4), ((4, 6), 2, 64), ((8, 3), 0.5, 16)])
def test_2d_sincos_pos_embed(grid, interp, base):
  want = d_emb.get_2d_sincos_pos_embed(24, grid, interpolation_scale=interp, base_size=base)
  np.testing.assert_array_equal(embeddings.get_2d_sincos_pos_embed(24, grid, interp, base),
                                want.float().numpy())


@pytest.mark.parametrize("kwargs,hw", [
    (dict(height=8, width=8, patch_size=2, in_channels=3, embed_dim=8), (8, 12)),
    (dict(height=16, width=16, patch_size=4, in_channels=2, embed_dim=12,
          interpolation_scale=2, layer_norm=True, bias=False), (16, 8)),
    (dict(height=8, width=8, patch_size=2, in_channels=3, embed_dim=8,
          pos_embed_max_size=6), (8, 12)),
    (dict(height=8, width=8, patch_size=2, in_channels=3, embed_dim=8, pos_embed_type=None),
     (4, 4)),
])
def test_patch_embed(kwargs, hw):
  ref = dm.randomize_(d_emb.PatchEmbed(**kwargs), 0)
  mod = load(embeddings.PatchEmbed(**kwargs, rngs=nnx.Rngs(0)), ref)
  x = torch.randn(2, kwargs["in_channels"], *hw)
  assert dm.rel_err(mod(jnp.asarray(x.numpy())), torch_run(ref, x)) <= RTOL


def test_patch_embed_rejects_oversized_grid():
  mod = embeddings.PatchEmbed(8, 8, 2, 3, 8, pos_embed_max_size=4, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="5x4 exceeds pos_embed_max_size=4"):
    mod(jnp.zeros((1, 3, 10, 8)))


@pytest.mark.parametrize("qk_norm", [None, "layer_norm", "rms_norm", "fp32_layer_norm"])
@pytest.mark.parametrize("cross,mask", [(None, None), (6, None), (6, "keep"), (6, "bool"),
                                        (None, "heads")])
def test_attention(qk_norm, cross, mask):
  kw = dict(query_dim=8, cross_attention_dim=cross, heads=2, dim_head=4, bias=True,
            qk_norm=qk_norm)
  ref = dm.randomize_(d_attn_proc.Attention(**kw), 0)
  mod = load(attention.Attention(**kw, rngs=nnx.Rngs(0)), ref)
  g = torch.Generator().manual_seed(0)
  x = torch.randn(2, 5, 8, generator=g)
  ctx = torch.randn(2, 3, cross, generator=g) if cross else None
  s = 3 if cross else 5
  m = None
  if mask == "keep":
    m = ((1 - torch.tensor([[1.0, 1, 0], [1, 1, 1]])) * -10000.0)[:, None]
  elif mask == "bool":
    m = torch.tensor([[True, False, True], [True, True, True]])[:, None]
  elif mask == "heads":
    m = torch.randn(2 * 2, 5, s, generator=g)
  want = torch_run(ref, x, encoder_hidden_states=ctx, attention_mask=m)
  got = mod(jnp.asarray(x.numpy()), None if ctx is None else jnp.asarray(ctx.numpy()),
            None if m is None else jnp.asarray(m.numpy()))
  assert dm.rel_err(got, want) <= RTOL


def test_attention_mask_length_checked():
  mod = attention.Attention(8, heads=2, dim_head=4, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"\(2, 1, 4\) does not cover 5 keys"):
    mod(jnp.zeros((2, 5, 8)), attention_mask=jnp.zeros((2, 1, 4)))


@pytest.mark.parametrize("act", ["gelu", "gelu-approximate", "geglu", "geglu-approximate",
                                 "swiglu", "linear-silu"])
def test_feed_forward(act):
  ref = dm.randomize_(d_attention.FeedForward(6, dim_out=5, mult=2, activation_fn=act), 0)
  mod = load(attention.FeedForward(6, dim_out=5, mult=2, activation_fn=act,
                                   rngs=nnx.Rngs(0)), ref)
  x = torch.randn(2, 3, 6)
  assert dm.rel_err(mod(jnp.asarray(x.numpy())), torch_run(ref, x)) <= RTOL


def test_timestep_embedding_module_with_condition():
  kw = dict(in_channels=6, time_embed_dim=8, act_fn="mish", out_dim=5, post_act_fn="silu",
            cond_proj_dim=4)
  ref = dm.randomize_(d_emb.TimestepEmbedding(**kw), 0)
  mod = load(embeddings.TimestepEmbedding(**kw, rngs=nnx.Rngs(0)), ref)
  x, c = torch.randn(3, 6), torch.randn(3, 4)
  got = mod(jnp.asarray(x.numpy()), jnp.asarray(c.numpy()))
  assert dm.rel_err(got, torch_run(ref, x, c)) <= RTOL


@pytest.mark.parametrize("act", ["gelu_tanh", "silu", "silu_fp32"])
def test_text_projection(act):
  ref = dm.randomize_(d_emb.PixArtAlphaTextProjection(6, 8, out_features=4, act_fn=act), 0)
  mod = load(embeddings.PixArtAlphaTextProjection(6, 8, 4, act, rngs=nnx.Rngs(0)), ref)
  x = torch.randn(2, 3, 6)
  assert dm.rel_err(mod(jnp.asarray(x.numpy())), torch_run(ref, x)) <= RTOL


def test_combined_timestep_embeddings():
  t, g, pooled = torch.tensor([1.0, 750.0]), torch.tensor([3.5, 1.0]), torch.randn(2, 6)
  ref = dm.randomize_(d_emb.CombinedTimestepGuidanceTextProjEmbeddings(8, 6), 0)
  mod = load(embeddings.CombinedTimestepGuidanceTextProjEmbeddings(8, 6, rngs=nnx.Rngs(0)), ref)
  got = mod(*(jnp.asarray(a.numpy()) for a in (t, g, pooled)))
  assert dm.rel_err(got, torch_run(ref, t, g, pooled)) <= RTOL
  ref = dm.randomize_(d_emb.CombinedTimestepTextProjEmbeddings(8, 6), 1)
  mod = load(embeddings.CombinedTimestepTextProjEmbeddings(8, 6, rngs=nnx.Rngs(0)), ref)
  got = mod(jnp.asarray(t.numpy()), jnp.asarray(pooled.numpy()))
  assert dm.rel_err(got, torch_run(ref, t, pooled)) <= RTOL


def test_ada_layer_norm_zero_with_given_embedding():
  ref = dm.randomize_(d_norm.AdaLayerNormZero(8), 0)
  mod = load(embeddings.AdaLayerNormZero(8, rngs=nnx.Rngs(0)), ref)
  x, emb = torch.randn(2, 5, 8), torch.randn(2, 8)
  want = torch_run(ref, x, emb=emb)
  got = mod(jnp.asarray(x.numpy()), emb=jnp.asarray(emb.numpy()))
  assert all(dm.rel_err(a, b) <= RTOL for a, b in zip(got, want, strict=True))


def test_ada_layer_norm_single():
  ref = dm.randomize_(d_norm.AdaLayerNormSingle(12, use_additional_conditions=True), 0)
  mod = load(embeddings.AdaLayerNormSingle(12, True, rngs=nnx.Rngs(0)), ref)
  t = torch.tensor([10.0, 400.0])
  cond = {"resolution": torch.tensor([[256.0, 512.0], [64, 64]]),
          "aspect_ratio": torch.tensor([[2.0], [1.0]])}
  want = torch_run(ref, t, cond, batch_size=2, hidden_dtype=torch.float32)
  got = mod(jnp.asarray(t.numpy()), dm.to_jax(cond), batch_size=2, hidden_dtype=jnp.float32)
  assert all(dm.rel_err(a, b) <= RTOL for a, b in zip(got, want, strict=True))


# ----------------------------------------------------------------------------- full size

FULL_SIZE = {
    "DiT-XL-2-256": {"_class_name": "DiTTransformer2DModel", "in_channels": 4,
                     "out_channels": 8, "sample_size": 32, "num_layers": 28,
                     "num_attention_heads": 16, "attention_head_dim": 72, "patch_size": 2,
                     "num_embeds_ada_norm": 1000},
    "PixArt-Sigma-XL-2-1024-MS": {
        "_class_name": "PixArtTransformer2DModel", "activation_fn": "gelu-approximate",
        "attention_bias": True, "attention_head_dim": 72, "caption_channels": 4096,
        "cross_attention_dim": 1152, "in_channels": 4, "interpolation_scale": 2,
        "norm_elementwise_affine": False, "norm_eps": 1e-6, "norm_type": "ada_norm_single",
        "num_attention_heads": 16, "num_embeds_ada_norm": 1000, "num_layers": 28,
        "out_channels": 8, "patch_size": 2, "sample_size": 128,
        "use_additional_conditions": False},
}


@pytest.mark.parametrize("name", sorted(FULL_SIZE))
def test_full_size_from_config(name):
  config = FULL_SIZE[name]
  abstract = nnx.eval_shape(lambda: converters.from_config(config))
  _, params = nnx.split(abstract, nnx.Param)
  leaves = jax.tree.leaves(params)
  assert all(isinstance(x, jax.ShapeDtypeStruct) and x.dtype == jnp.bfloat16 for x in leaves)
  with torch.device("meta"):
    ref = getattr(diffusers, config["_class_name"]).from_config(config)
  assert sum(math.prod(x.shape) for x in leaves) == sum(p.numel() for p in ref.parameters())
  layout = checkpoint.torch_layout(abstract)
  assert sorted(layout) == sorted(ref.state_dict())

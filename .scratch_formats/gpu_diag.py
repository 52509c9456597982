import sys; sys.path.insert(0, "tests"); sys.path.insert(0, ".")
import jax, jax.numpy as jnp, numpy as np, ml_dtypes
from pqjax import formats
import test_formats as T
rng = np.random.default_rng(1)
x = T.structured_input(rng, (4, 128), -1, 16)
qt = formats.quantize(x, "nvfp4")
codes, sb, st = T.reference(x, "nvfp4", -1, 16)
print("s_t", float(qt.tensor_scale), st, float(qt.tensor_scale) == np.float32(st))
ours_sb = np.asarray(qt.scales).astype(np.float32); ref_sb = sb.astype(np.float32)
bad = ours_sb != ref_sb
print("s_b mismatches", bad.sum(), "of", bad.size)
amax_b = np.max(np.abs(T.np_groups(x, -1, 16)), -1)
inv = T.f32(1 / T.f32(6 * st)); pre = T.f32(amax_b * inv)
for i in zip(*np.nonzero(bad)):
  print(" ", i, "ours", ours_sb[i], "ref", ref_sb[i], "pre-cast f32", np.float32(pre[i]), "amax_b", amax_b[i])
  if bad.sum() > 6: break
oc = T.np_groups(T.np_unpack(qt.codes, 1), 1, 16).astype(np.uint8)
print("code mismatches", (oc != codes).sum())
v = np.array([0.5, 1.0, 3.0, 7.5, 100.0, 300.0, 447.9, 448.0, 449.0, 1e-3, 2**-9, 2**-10, 0.0017, 0.00195], np.float32)
g = np.asarray(jnp.asarray(v).astype(jnp.float8_e4m3fn).astype(jnp.float32))
n = v.astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
print("e4m3 cast gpu vs ml_dtypes", list(zip(v, g, n)))
jv = jax.jit(lambda a: jnp.clip(a, 2.0**-9, 448.0).astype(jnp.float8_e4m3fn).astype(jnp.float32))(v)
print("jit clip+cast", np.asarray(jv), np.clip(v, 2**-9, 448).astype(ml_dtypes.float8_e4m3fn).astype(np.float32))
r = rng.uniform(1e-3, 448, 100000).astype(np.float32)
gr = np.asarray(jax.jit(lambda a: a.astype(jnp.float8_e4m3fn).astype(jnp.float32))(r))
nr = r.astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
print("random e4m3 mismatches", (gr != nr).sum(), r[gr != nr][:5], gr[gr != nr][:5], nr[gr != nr][:5])
d = rng.uniform(1e-3, 448, 100000).astype(np.float32)
print("recip mismatches", (np.asarray(jax.jit(lambda a: 1.0 / a)(d)) != (np.float32(1) / d)).sum())

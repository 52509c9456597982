"""Rounding-error bounds the numeric tests derive their tolerances from."""

U32 = 2.0**-24  # float32 unit roundoff


def gamma(n):
  """Higham's gamma_n = n u / (1 - n u): the relative bound of n float32 roundings."""
  return n * U32 / (1 - n * U32)


def norm_bf16_tolerance(x, r, *, kind, weight=None, bias=None, shift=None, scale=None,
                        perm=None):
  """Allowed ``|got - r|`` for a bf16 gathered norm ``got`` against the bf16 reference ``r``.

  The row statistics are float32 sums in another order (relative error <= D u) and ``rsqrt``
  may differ by ulps, so the float32 values before rounding differ by at most
  ``delta = (D + 8) u * m`` with ``m`` the sum of the magnitudes of the terms; each side then
  rounds to bf16 (half an ulp, <= 2**-8 of the value), so the outputs differ by at most
  ``2**-7 |r| (1 + 2**-8) + delta (1 + 2**-8)``: one bf16 ulp, plus ``delta`` where the
  affine/adaLN terms cancel. Vectors broadcast against ``x``; per-sample ``(B, D)`` for 3-D
  ``x`` are taken per sample.
  """
  import numpy as np  # noqa: PLC0415

  def rows(v, default):
    if v is None:
      return default
    v = np.asarray(v, np.float64)
    return v[:, None, :] if v.ndim == 2 and x.ndim == 3 else v

  d = x.shape[-1]
  xf = np.asarray(x, np.float64)
  xc = xf - xf.mean(-1, keepdims=True) if kind == "layer" else xf
  xn = np.abs(xc) / np.sqrt((xc * xc).mean(-1, keepdims=True) + 1e-6)
  mag = ((xn * np.abs(rows(weight, 1.0)) + np.abs(rows(bias, 0.0)))
         * np.abs(1 + rows(scale, 0.0)) + np.abs(rows(shift, 0.0)))
  if perm is not None:
    mag = np.take(mag, np.asarray(perm), axis=-1)
  r = np.asarray(r, np.float64)
  return (2.0**-7 * np.abs(r) + (d + 8) * U32 * mag) * (1 + 2.0**-8)

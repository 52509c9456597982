"""Rounding-error bounds the numeric tests derive their tolerances from."""

U32 = 2.0**-24  # float32 unit roundoff


def gamma(n):
  """Higham's gamma_n = n u / (1 - n u): the relative bound of n float32 roundings."""
  return n * U32 / (1 - n * U32)

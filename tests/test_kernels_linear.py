"""kernels.linear against the plain product x @ w: the output and both gradients, relative RMS error below 1e-4 in float32.
Shapes cover a 3-d input, a token count that splits the weight gradient into slices (4096 and 3000 tokens) and one that does not,
and widths that are no multiple of a tensor-core tile."""
import numpy as np
import pytest
from tinygrad import Tensor
import kernels

def _grads(fn, xa, wa, ga) -> list[np.ndarray]:
  x, w = Tensor(xa), Tensor(wa)
  y = fn(x, w)
  return [t.float().numpy() for t in (y, *(y.float() * Tensor(ga)).sum().gradient(x, w))]

@pytest.mark.parametrize("shape, N", [((3, 37, 24), 40), ((2, 1100), 12), ((4096, 64), 48), ((3000, 20), 36)])
def test_linear(shape, N):
  rng = np.random.default_rng(sum(shape) + N)
  xa, wa = rng.standard_normal(shape).astype(np.float32), rng.standard_normal((shape[-1], N)).astype(np.float32)
  ga = rng.standard_normal((*shape[:-1], N)).astype(np.float32)
  ref, got = _grads(lambda x, w: x @ w, xa, wa, ga), _grads(kernels.linear, xa, wa, ga)
  for name, r, g in zip(("y", "dx", "dw"), ref, got):
    assert g.shape == r.shape, name
    assert np.sqrt(np.mean((g - r) ** 2)) <= 1e-4 * np.sqrt(np.mean(r ** 2)), name

def test_slices():
  # slices of at least 512 tokens, at most 16, each the same length
  assert [kernels._slices(K) for K in (1, 1000, 1024, 3000, 4096, 8192, 16384, 1 << 20)] == [1, 1, 2, 4, 8, 16, 16, 16]

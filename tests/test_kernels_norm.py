"""kernels.norm (rowdot and mul_rows) against the same norms in plain tinygrad: RMSNorm and L2 normalisation over the last axis,
the output and the gradient, relative RMS error below 1e-4 in float32; rows of n features not a multiple of a lane count, one row,
a 3-d input; and the GPU's schedule (several lanes a row, partial sums in shared memory) on tinygrad's emulator of a CUDA GPU."""
import numpy as np
import pytest
from tinygrad import Tensor
from tinygrad.helpers import Context
import kernels

def _ref(x:Tensor, eps:float, rms:bool) -> Tensor:
  return x.float() * (x.float().square().mean(-1, keepdim=True) + eps).rsqrt() if rms else x.float().normalize(dim=-1, eps=eps)

def _check(shape, rms:bool, seed:int=0):
  rng = np.random.default_rng(seed)
  xa, ga = rng.standard_normal(shape).astype(np.float32), rng.standard_normal(shape).astype(np.float32)
  out = []
  for fn in (_ref, kernels.norm):
    x = Tensor(xa)
    y = fn(x, 1e-6, rms)
    out.append([t.numpy() for t in (y, (y * Tensor(ga)).sum().gradient(x)[0])])
  for name, r, g in zip(("y", "dx"), *out):
    assert g.shape == r.shape and g.dtype == np.float32, name
    assert np.sqrt(np.mean((g - r) ** 2)) <= 1e-4 * np.sqrt(np.mean(r ** 2)), name

@pytest.mark.parametrize("shape, rms", [((3, 37, 24), True), ((3, 37, 24), False), ((1, 1, 7), True), ((5, 64), False), ((200, 512), True)])
def test_norm(shape, rms): _check(shape, rms)

def test_norm_lanes_emulated():
  # the GPU's schedule: 32 lanes a row of 512 (16 features each), 4 lanes a row of 24, on tinygrad's Python emulator of CUDA
  assert kernels._row_lanes(512) == 32 and kernels._row_lanes(24) == 4 and kernels._row_lanes(7) == 1
  with Context(DEV="PYTHON::sm_80"):
    for shape, rms in (((8, 512), True), ((2, 3, 24), False)): _check(shape, rms, seed=1)

@pytest.mark.parametrize("shape, rms", [((2, 5, 3, 24), True), ((3, 4, 7, 16), False), ((1, 1, 2, 8), True)])
def test_norm_swap(shape, rms):
  # swap: the result stored as (B, A2, A1, n), the reference's .transpose(1, 2); the gradient reaches x in x's own layout
  rng = np.random.default_rng(sum(shape))
  xa, ga = rng.standard_normal(shape).astype(np.float32), rng.standard_normal((shape[0], shape[2], shape[1], shape[3])).astype(np.float32)
  out = []
  for fn in (lambda x: _ref(x, 1e-6, rms).transpose(1, 2), lambda x: kernels.norm(x, 1e-6, rms, swap=True)):
    x = Tensor(xa)
    y = fn(x)
    out.append([t.numpy() for t in (y, (y * Tensor(ga)).sum().gradient(x)[0])])
  for name, r, g in zip(("y", "dx"), *out):
    assert g.shape == r.shape, name
    assert np.sqrt(np.mean((g - r) ** 2)) <= 1e-4 * np.sqrt(np.mean(r ** 2)), name

def test_rowdot_swap():
  # rowdot with a's rows stored swapped, and both its gradients, against the transpose written out
  rng = np.random.default_rng(3)
  aa, ba, ga = (rng.standard_normal(s).astype(np.float32) for s in ((2, 7, 5, 12), (2, 5, 7, 12), (2, 5, 7)))
  out = []
  for fn in (lambda a, b: (a.transpose(1, 2) * b).sum(-1), lambda a, b: kernels.rowdot(a, b, swap=(5, 7))):
    a, b = Tensor(aa), Tensor(ba)
    s = fn(a, b)
    out.append([t.numpy() for t in (s, *(s * Tensor(ga)).sum().gradient(a, b))])
  for name, r, g in zip(("s", "da", "db"), *out):
    assert g.shape == r.shape and np.sqrt(np.mean((g - r) ** 2)) <= 1e-4 * np.sqrt(np.mean(r ** 2)), name

"""kernels.causal_conv against mc.causal_conv_ref and kernels.segment_mean against mc.online_pool: the output and every gradient
(dx, dw; dk), relative RMS error below 1e-4 in float32. Awkward shapes on purpose: L = 1, 8, 63, 100, 257, batch 3, channels that
are no multiple of 4, conv widths 1, 3 and 4, L no multiple of the segment, segment 1; L = 8 and 20 with 16-token segments are
where tinygrad 0.14 dropped a gate that pinned an outer range (kernels._gated). Then the GPU's schedule: on tinygrad's emulator of
a CUDA device (lanes as LOCAL axes), and the launches it plans at the gpu preset's shapes."""
import re
import numpy as np
import pytest
from tinygrad import Tensor, dtypes
import kernels, mc

def rel_rms(a, b) -> float: return float(np.sqrt(np.mean((a - b) ** 2)) / (np.sqrt(np.mean(b ** 2)) + 1e-30))

def _conv(f, xa, wa, ga) -> list[np.ndarray]:
  x, w = Tensor(xa), Tensor(wa)
  y = f(x, w)
  return [t.numpy() for t in (y, *(y * Tensor(ga)).sum().gradient(x, w))]

def _pool(f, ka, ga, C) -> list[np.ndarray]:
  k = Tensor(ka)
  p = f(k, C)
  return [t.numpy() for t in (p, *(p * Tensor(ga)).sum().gradient(k))]

def _check(names, ref, got, tol=1e-4):
  for name, r, g in zip(names, ref, got):
    assert g.shape == r.shape, f"{name}: shape {g.shape} != {r.shape}"
    assert rel_rms(g, r) < tol, f"{name}: rel rms err {rel_rms(g, r):.2e} (max abs {np.abs(g - r).max():.2e})"

def _conv_inputs(B, L, C, W, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.standard_normal(s).astype(np.float32) for s in ((B, L, C), (W, C), (B, L, C))]

@pytest.mark.parametrize("B, L, C, W", [(3, 63, 6, 4), (2, 257, 20, 1), (1, 1, 5, 4), (3, 100, 15, 3), (2, 8, 3, 4)])
def test_causal_conv(B, L, C, W):
  xa, wa, ga = _conv_inputs(B, L, C, W, B + L + C + W)
  _check(("y", "dx", "dw"), _conv(mc.causal_conv_ref, xa, wa, ga), _conv(kernels.causal_conv, xa, wa, ga))

@pytest.mark.parametrize("B, H, L, D, C", [(3, 2, 63, 8, 16), (2, 1, 100, 5, 32), (1, 2, 1, 4, 16), (2, 2, 257, 3, 1), (1, 2, 20, 4, 16)])
def test_segment_mean(B, H, L, D, C):
  rng = np.random.default_rng(B + H + L + D + C)
  ka, ga = (rng.standard_normal((B, H, L, D)).astype(np.float32) for _ in range(2))
  _check(("p", "dk"), _pool(mc.online_pool, ka, ga, C), _pool(kernels.segment_mean, ka, ga, C))

def test_tokens_emulated():
  # both kernels with their lanes as LOCAL axes (blocks of 32 channels, of 64 along d), on tinygrad's Python emulator of a CUDA GPU
  from tinygrad.helpers import Context
  from tinygrad.uop.ops import AxisType
  xa, wa, ga = _conv_inputs(2, 37, 160, 4)
  rng = np.random.default_rng(1)
  ka, gpa = (rng.standard_normal((1, 2, 50, 64)).astype(np.float32) for _ in range(2))
  with Context(DEV="PYTHON::sm_80"):
    assert kernels._grid(Tensor(xa).device).lanes is AxisType.LOCAL
    got = _conv(kernels.causal_conv, xa, wa, ga) + _pool(kernels.segment_mean, ka, gpa, 16)
  ref = _conv(mc.causal_conv_ref, xa, wa, ga) + _pool(mc.online_pool, ka, gpa, 16)
  _check(("y", "dx", "dw", "p", "dk"), ref, got)

def test_tokens_cuda_launches(monkeypatch):
  # the launches planned for an H200 at the gpu preset's shapes (qkv (16, 1024, 1536) bfloat16, keys (16, 8, 1024, 64) float32):
  # (blocks, threads per block), and every per-thread array indexed by constants only (registers, not local memory)
  from tinygrad.uop.ops import Ops, KernelInfo
  from tinygrad.codegen import full_rewrite_to_sink, line_rewrite, pm_linearize_cleanups
  from tinygrad.codegen.late.linearizer import linearize
  from test_kernels_linear import _cuda_renderer
  ren = _cuda_renderer()
  monkeypatch.setattr(kernels, "_renderer", lambda dev: ren)
  x, w, gy = (Tensor.empty(*s, dtype=dtypes.bfloat16) for s in ((16, 1024, 1536), (4, 1536), (16, 1024, 1536)))
  y = kernels.causal_conv(x, w)
  k, gp = Tensor.empty(16, 8, 1024, 64), Tensor.empty(16, 8, 1024, 64)
  p = kernels.segment_mean(k, 256)
  outs = [y, *y.gradient(x, w, gradient=gy), p, *p.gradient(k, gradient=gp)]
  asts = {u.arg.name: u for t in outs for u in t.linear_with_vars()[0].toposort() if u.op is Ops.SINK and isinstance(u.arg, KernelInfo)
          and u.arg.opts_to_apply == ()}
  want = {"conv": (12 * 256 * 16, 128), "conv_dx": (12 * 256 * 16, 128), "conv_dw": (12 * 8 * 16, 128), "segment_mean": (512, 64),
          "segment_mean_bwd": (512, 64)}
  assert set(asts) == set(want)
  for name, a in asts.items():
    sink = full_rewrite_to_sink(a, ren)
    dims = {u.arg: int(u.vmax) + 1 for u in sink.toposort() if u.op is Ops.SPECIAL}
    blocks, threads = (int(np.prod([n for s, n in dims.items() if s.startswith(p)])) for p in ("gidx", "lidx"))
    assert (blocks, threads) == want[name], name
    src = ren.render(line_rewrite(linearize(sink), pm_linearize_cleanups))
    assert not re.search(r"buf\d+\+[^0-9]", src), f"{name}: a per-thread array indexed by a variable"

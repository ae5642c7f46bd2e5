"""kernels.cache_read against mc.cache_read_ref: the output and every gradient (q, o, M and, for grm/ssc, the logits z, z_on),
relative RMS error below 1e-4 in float32. Shapes are few on purpose (each new one compiles its kernels): batch 3 with one
head, L not a multiple of the segment, L = 1, 100, 257, const and log reads, ssc with topk 1, 2 and >= the entries, ties."""
import numpy as np
import pytest
from tinygrad import Tensor, Device, dtypes
import mc, kernels

def _inputs(B:int, H:int, L:int, D:int, C:int, seg:str, ties:bool, seed:int=0):
  rng = np.random.default_rng(seed)
  blocks, reads = mc.cache_plan(-(-L // C), seg)
  N = len(blocks)
  f = lambda *s: rng.standard_normal(s).astype(np.float32)
  # ties: logits on a coarse grid, so many tokens see equal logits among the entries they may read
  z = np.round(f(B, H, L, N)) if ties else f(B, H, L, N)
  return [f(B, H, L, D), f(B, H, L, D), f(B, H, N, D, D) * np.float32(D ** -0.5), z, f(B, H, L)], reads, f(B, H, L, D)

def _run(fn, arrs, reads, gy, C:int, agg:str, topk:int) -> list[Tensor]:
  q, o, M, z, z_on = (Tensor(a) for a in arrs)
  y = fn(q, o, M, z, z_on, reads, C, agg, topk)
  # residual and mean do not read the logits: no gradient reaches them
  wrt = [q, o, M] + ([z, z_on] if agg in ("grm", "ssc") else [])
  return [x.float() for x in [y, *(y * Tensor(gy)).sum().gradient(*wrt)]]

def _check(B, H, L, D, C, agg, topk, seg="const", ties=False, half=False):
  arrs, reads, gy = _inputs(B, H, L, D, C, seg, ties)
  # a half q is computed with in float32, so the reference gets the same values as float32 q (dq comes back in q's dtype:
  # its tolerance is half's rounding)
  if half: arrs[0] = arrs[0].astype(np.float16)
  ref = _run(mc.cache_read_ref, [arrs[0].astype(np.float32)] + arrs[1:], reads, gy, C, agg, topk)
  got = _run(kernels.cache_read, arrs, reads, gy, C, agg, topk)
  Tensor.realize(*ref, *got)   # one schedule: its kernels compile together
  for name, a, b in zip(("y", "dq", "do", "dM", "dz", "dz_on"), ref, got):
    assert a.shape == b.shape, name
    if a.numel() == 0: continue
    a, b = a.numpy(), b.numpy()
    rel = np.sqrt(((a - b) ** 2).mean() / max((a ** 2).mean(), 1e-30))
    tol = 2e-3 if name == "dq" and half else 1e-4
    assert rel < tol, f"{agg} {seg} top{topk} L={L}: {name} rel err {rel:.2e}, max abs {np.abs(a - b).max():.2e}"

# batch 3, one head, L = 257 with segment 32: 9 segments, the last one a single token; const and log both give 8 entries
# here, and log tokens read up to 3 Fenwick blocks
@pytest.mark.parametrize("agg,topk,seg,ties", [
  ("grm", 2, "const", False), ("residual", 2, "const", False), ("mean", 2, "const", False),
  ("ssc", 2, "const", True), ("ssc", 8, "const", True),                                # topk 8 >= the 8 entries: ssc is grm
  ("grm", 2, "log", False), ("ssc", 1, "log", True), ("mean", 2, "log", False)])
def test_cache_read(agg, topk, seg, ties): _check(3, 1, 257, 8, 32, agg, topk, seg, ties)

# L = 100 with segment 16 (4 tokens into the 7th segment), two heads; 1 token has nothing cached to read
def test_cache_read_L100(): _check(2, 2, 100, 8, 16, "ssc", 2, "log", ties=True)
def test_cache_read_L1(): _check(2, 2, 1, 8, 16, "grm", 2)

@pytest.mark.skipif(dtypes.float16 not in Device[Device.DEFAULT].renderer.supported_dtypes(), reason="no float16 on this device")
def test_cache_read_half_q(): _check(3, 1, 257, 8, 32, "ssc", 2, "const", ties=True, half=True)

@pytest.mark.parametrize("agg", ["grm", "ssc", "residual"])
def test_cache_read_tiled(agg, monkeypatch):
  # the GPU's tiling (4 x 8 outputs per thread) run on the CPU: its index arithmetic, L on no segment boundary
  monkeypatch.setattr(kernels, "_REGS_NOLOCAL", kernels._REGS)
  _check(2, 2, 100, 16, 32, agg, 2)

def _logits_check(B:int, H:int, L:int, N:int, D:int, seed:int=0):
  # kernels.logits (u . p of every token against every entry) and both its gradients against the product in plain tinygrad
  rng = np.random.default_rng(seed)
  ua, pa, ga = (rng.standard_normal(s).astype(np.float32) for s in ((B, H, L, D), (B, H, N, D), (B, H, L, N)))
  out = []
  for fn in (lambda u, p: u @ p.transpose(-1, -2), kernels.logits):
    u, p = Tensor(ua), Tensor(pa)
    z = fn(u, p)
    out.append([t.numpy() for t in (z, *(z * Tensor(ga)).sum().gradient(u, p))])
  for name, r, g in zip(("z", "du", "dp"), *out):
    assert g.shape == r.shape and np.sqrt(np.mean((g - r) ** 2)) <= 1e-5 * np.sqrt(np.mean(r ** 2)), (B, H, L, N, D, name)

@pytest.mark.parametrize("shape", [(3, 1, 100, 3, 16), (2, 2, 257, 5, 24), (1, 2, 1, 2, 64), (1, 1, 128, 1, 8)])
def test_logits(shape): _logits_check(*shape)

def test_logits_lanes_emulated():
  # the GPU's schedules (lanes along D, token groups of 64 for dp) on tinygrad's Python emulator of CUDA
  from tinygrad.helpers import Context
  with Context(DEV="PYTHON::sm_80"): _logits_check(1, 2, 128, 3, 64, seed=1)

"""kernels.chunk_scan against its plain-tinygrad reference mc.linear_scan: forward (o, S) and the gradient of every input.

Awkward shapes on purpose: L = 1, 63, 100, 257 (never a multiple of both chunk and segment), batch 3, one head, D = 12, both
initialisations, with and without M0, la and swla gates. The loss reads both outputs, so gradients flow in from o and from the
cache states S. Each case compiles its own kernels (~0.3 s each on CPU), so the list stays short, and the reference runs with
NOOPT=1 (what it computes does not change; its compile time halves). On CPU the kernels' tiles are plain loops; the first case
builds them with the GPU's register tiles instead, so that their index arithmetic is checked here too.
"""
import numpy as np
import pytest
from tinygrad import Context, Device, Tensor, dtypes
import kernels, mc

RTOL = 1e-4

#        core    B  H    L   D  chunk segment independent M0     GPU tiles
CASES = [("la",   3, 1,  63,  8,   16,   32,    False,     True,  True),
         ("la",   2, 2,   1, 16,   16,   16,    True,      False, False),
         ("swla", 1, 2, 100, 12,    8,   32,    True,      False, False),
         ("swla", 2, 2, 257,  4,   16,   64,    False,     True,  False)]

def rel_rms(a, b) -> float: return float(np.sqrt(np.mean((a - b) ** 2)) / (np.sqrt(np.mean(b ** 2)) + 1e-30))

def run(fn, core, B, H, L, D, chunk, segment, independent, m0, seed=0):
  rng = np.random.default_rng(seed)
  t = lambda *s: Tensor(rng.standard_normal(s).astype(np.float32))
  q, k, v, go = t(B, H, L, D), t(B, H, L, D), t(B, H, L, D), t(B, H, L, D)
  gS = t(B, H, L // segment, D, D)
  logits = [t(B, H, L) for _ in range(3)] if core == "swla" else []
  M0 = [t(H, D, D)] if m0 else []
  # gates from sigmoids of random logits, as the model makes them; la = log a
  la, b, l = (logits[0].sigmoid().log(), logits[1].sigmoid(), logits[2].sigmoid()) if logits else (None, None, None)
  o, S = fn(q, k, v, la, b, l, M0[0] if m0 else None, chunk, segment, independent)
  loss = (o * go).sum() + (S * gS).sum()
  ins = [q, k, v, *logits, *M0]
  names = ["o", "S", "dq", "dk", "dv"] + ["da", "db", "dl"][:len(logits)] + ["dM0"] * m0
  return names, [x.numpy() for x in (o, S, *loss.gradient(*ins))]

@pytest.mark.parametrize("case", CASES, ids=["-".join(map(str, c)) for c in CASES])
def test_chunk_scan_matches_reference(case, monkeypatch):
  *case, tiles = case
  if tiles: monkeypatch.setattr(kernels, "_REGS_NOLOCAL", kernels._REGS)
  with Context(NOOPT=1):
    names, ref = run(mc.linear_scan, *case)
    _, got = run(kernels.chunk_scan, *case)
  for name, r, g in zip(names, ref, got):
    assert r.shape == g.shape, f"{name}: shape {g.shape} != {r.shape}"
    if r.size == 0: continue
    err = rel_rms(g, r)
    assert err < RTOL, f"{name}: rel rms err {err:.2e} (max abs {np.abs(g - r).max():.2e})"

def runs(dt) -> bool:
  # a capability probe: some CPUs' clang lacks bfloat16 even where the renderer lists it
  try:
    Tensor.ones(2).cast(dt).realize()
    return True
  except Exception:
    return False

@pytest.mark.parametrize("dt", [dtypes.bfloat16, dtypes.float16], ids=["bf16", "f16"])
def test_chunk_scan_half_inputs(dt):
  # half inputs are read as float32 (and accumulated in float32); o comes back in the input dtype, S in float32
  if dt not in Device[Device.DEFAULT].renderer.supported_dtypes() or not runs(dt): pytest.skip(f"no {dt} on {Device.DEFAULT}")
  rng = np.random.default_rng(1)
  q, k, v = (Tensor(rng.standard_normal((2, 2, 40, 8)).astype(np.float32)).cast(dt).realize() for _ in range(3))
  o, S = kernels.chunk_scan(q, k, v, None, None, None, None, 8, 16, False)
  ro, rS = mc.linear_scan(q.float(), k.float(), v.float(), None, None, None, None, 8, 16, False)
  assert o.dtype == dt and S.dtype == dtypes.float
  tol = 1e-2 if dt == dtypes.bfloat16 else 1e-3   # the rounding of o to the input dtype
  assert rel_rms(o.float().numpy(), ro.numpy()) < tol
  assert rel_rms(S.numpy(), rS.numpy()) < 1e-6

def test_chunk_scan_rejects_bad_segment():
  q = Tensor.randn(1, 1, 8, 4)
  with pytest.raises(ValueError, match="multiple of chunk"):
    kernels.chunk_scan(q, q, q, None, None, None, None, 8, 12, False)

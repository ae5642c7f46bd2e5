"""
tinymc's measurements: every timing, profile and comparison with a peer, kept apart from the library files (as nanoGPT keeps
bench.py beside model.py). Each subcommand prints a table; --json=PATH writes its results.

  python bench.py check                          # every fused kernel against its reference (exit 1 if a row is over tolerance)
  python bench.py kernels                        # the kernels' speed targets, against fla's chunk_linear_attn where it imports
  python bench.py profile                        # per-kernel device ms of one forward+backward (tinygrad's DEBUG=2 lines)
  python bench.py layers --configs=none,grm      # one MC layer (Block.mix) forward+backward against the length
  python bench.py package                        # the same layer against the memory-caching package
  python bench.py model                          # model forward+backward, each core with grm and without caching
  python bench.py train --shapes=default,long    # the whole jitted training step against a PyTorch Transformer of the same blocks
  python bench.py decode --batches=1,16          # Model.step and prefill tokens/s against a PyTorch Transformer with a KV cache

Sizes are a GPU's; on the CPU every subcommand runs tiny ones (a smoke test: its times mean little). layers, package, model, train
and decode also take MCConfig fields as overrides (--dtype=bfloat16 --dim=512). Peers (PyTorch, fla, the memory-caching package)
are imported here only, inside try, and run in a process of their own, so that each framework keeps its own CUDA context; a
missing peer prints one line and the rows without it. Every time is the median of synchronised runs after a warm-up (TinyJit
captures on its second call), under train.py's device defaults (NOOPT=1 PARALLEL=0 on the CPU).
"""
import contextlib, dataclasses, functools, gc, inspect, io, json, math, os, re, statistics, sys, time, typing
from pathlib import Path
from dataclasses import dataclass
import numpy as np
from tinygrad import Context, Device, Tensor, TinyJit, dtypes
from tinygrad.nn.state import get_parameters, get_state_dict
import mc, train
from kernels import cache_read, causal_conv, chunk_scan, linear, segment_mean, supported
from mc import CORES, Block, MCConfig, Model

@dataclass
class BenchConfig:
  reps: int = 0                            # timed repetitions per row; 0 = the subcommand's default (fewer on the CPU)
  only: tuple[str, ...] = ()               # check: only the cases whose label contains one of these ("chunk_scan la indep", "cache_read ssc")
  configs: tuple[str, ...] = ()            # layers, package, model, train, decode: only these rows (names below in --help)
  contexts: tuple[int, ...] = ()           # decode: context lengths in tokens; () = 512, 8192, 32768 (tiny ones on the CPU)
  batches: tuple[int, ...] = (1, 16)       # decode: batch sizes of Model.step (prefill is timed at the first)
  lengths: tuple[int, ...] = ()            # layers: these lengths instead of the default ones
  shapes: tuple[str, ...] = ("default",)   # train: shapes of TRAIN_SHAPES (default, gpu, long), each a group of rows
  dtypes: tuple[str, ...] = ("float32", "bfloat16")   # train: activation dtypes (bfloat16 skipped where unsupported)
  profile: int = 0                         # train: also each tinymc row's N slowest kernels in one step (DEBUG=2), and ms by kind
  json: str = ""                           # write the results to this file as JSON

# **** measuring ****

# relative RMS error allowed; a half row's reference gets the same rounded inputs in float32, so what is left is its rounding
TOL = {"float32": 1e-4, "float16": 5e-3, "bfloat16": 2e-2}

def time_ms(fn, *xs, reps:int, warm:int=2, sync=None) -> float:
  # median ms of fn(*xs), synchronized (default: tinygrad's device; a PyTorch peer passes its own), after warm-up calls
  # (a TinyJit captures on its second)
  sync = sync or Device[Device.DEFAULT].synchronize
  for _ in range(warm): fn(*xs)
  sync()
  ts = []
  for _ in range(reps):
    st = time.perf_counter()
    fn(*xs)
    sync()
    ts.append(time.perf_counter() - st)
  return statistics.median(ts) * 1e3

def isolated(fn, *args):
  # fn(*args) in a fresh process: PyTorch there and tinygrad here each keep their own CUDA context and memory
  import concurrent.futures, multiprocessing
  try:
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as ex: return ex.submit(fn, *args).result()
  except Exception as e: return f"{fn.__name__} failed in its process ({type(e).__name__}: {e})"

def why(e:Exception) -> str: return f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"

def _numpy(xs:list[Tensor]) -> list[np.ndarray]:
  Tensor.realize(*xs)   # one schedule
  return [x.float().numpy() for x in xs]

def _errors(ref:list[np.ndarray], got:list[np.ndarray]) -> tuple[float, float]:
  # (max abs error, worst relative RMS error) over the paired arrays; a NaN anywhere makes both NaN (and fails)
  pairs = [(a, b) for a, b in zip(ref, got) if a.size]
  rms = lambda x: float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))
  return float(np.max([np.abs(a - b).max() for a, b in pairs])), float(np.max([rms(a - b) / (rms(a) + 1e-30) for a, b in pairs]))

def kernel_times(fn) -> dict[str, tuple[float, int]]:
  """Where the time goes: {kernel name: (device ms, launches)} of one fn() (which returns the Tensors to realize). Two calls
  compile and warm up; the third runs with DEBUG=2, where tinygrad synchronizes after each kernel and prints its time."""
  with Context(JIT=0):   # no TinyJit graph: every kernel gets its own line
    for _ in range(2): Tensor.realize(*fn())
    Device[Device.DEFAULT].synchronize()
    with contextlib.redirect_stdout(buf := io.StringIO()), Context(DEBUG=2):
      Tensor.realize(*fn())
      Device[Device.DEFAULT].synchronize()
  if log := os.environ.get("PROFILE_LOG"): Path(log).write_text(buf.getvalue())   # every launch's line in order, for a closer look
  res: dict[str, tuple[float, int]] = {}
  for line in buf.getvalue().splitlines():
    if m := re.match(r"\*\*\* \S+\s+\d+ (.*?) arg .* tm\s+([\d.]+)(us|ms|s)\s*/", re.sub(r"\x1b\[[0-9;]*m", "", line)):
      ms, n = res.get(name := " ".join(m.group(1).split()), (0.0, 0))
      res[name] = (ms + float(m.group(2)) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[m.group(3)], n + 1)
  return res

def table(header:list[str], rows:list[list]) -> str:
  cell = lambda v: "-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)
  w = [max(len(h), *(len(cell(r[i])) for r in rows)) for i, h in enumerate(header)]
  return "\n".join("  ".join(cell(v).rjust(n) for v, n in zip(r, w)) for r in [header, *rows])

# **** the kernels: check, kernels, profile ****
# check: every kernel against its reference on fresh random inputs, forward and forward+backward (every output, every input),
# both timed (linear also against PyTorch's x @ w on CUDA); a row whose relative RMS error passes its dtype's tolerance fails.
# kernels: the speed targets against fla.
# Shapes: small on the CPU (a minute or two), BIG elsewhere.

SHAPE = {"CPU": dict(B=1, H=2, L=200, D=16, chunk=16, segment=32)}   # L on no chunk or segment boundary
BIG = dict(B=4, H=16, L=8192, D=64, chunk=64, segment=256)           # the GPU's: a long batch of the kernels' own sizes
# chunk_scan (core, independent, dtype), each with a random M0 and the cache states S as an output; cache_read (agg, q dtype,
# segmentation, topk); topk 64 is at least every entry (ssc reads as grm)
SCAN_CASES = (("la", False, "float32"), ("la", True, "float32"), ("swla", False, "float32"), ("swla", True, "float32"),
              ("la", False, "bfloat16"))
READ_CASES = (("residual", "float32", "const", 2), ("mean", "float32", "const", 2), ("grm", "float32", "const", 2),
              ("grm", "float32", "log", 2), ("ssc", "float32", "const", 1), ("ssc", "float32", "const", 2), ("ssc", "float32", "log", 2),
              ("ssc", "float32", "const", 64), ("grm", "bfloat16", "const", 2))

def bench_chunk_scan(B:int=4, H:int=16, L:int=8192, D:int=64, chunk:int=64, segment:int=256, dtype=dtypes.float,
                     cores:tuple=("la", "swla"), reps:int=20, independent:bool=False, m0:bool=False, cache:bool=False) -> list[tuple]:
  """Validate chunk_scan against mc.linear_scan on fresh random inputs, then time both (TinyJit, synchronized, median of reps):
  forward, and forward+backward. Rows (name, shape, max abs err, rel err, reference ms, kernel ms); the errors are the worst
  relative RMS over the forward outputs (o, and S with cache) and, for fwd+bwd, also over the gradients of q, k, v, the gates
  and M0. m0: start from a random M0 (H,D,D); cache: S is an output too, with its own random gradient. A half dtype's
  reference is fed the same rounded inputs in float32."""
  rows = []
  for core in cores:
    Tensor.manual_seed(0)
    ins = [Tensor.randn(B, H, L, D).cast(dtype).realize() for _ in range(3)] + [Tensor.randn(B, H, L).realize() for _ in range(3 * (core == "swla"))]
    ins += [(Tensor.randn(H, D, D) * D ** -0.5).realize()] * m0
    go, gS = Tensor.randn(B, H, L, D).cast(dtype).realize(), Tensor.randn(B, H, L // segment, D, D).realize()
    def fwd(f, q, k, v, *g):
      M0, g = (g[-1], g[:-1]) if m0 else (None, g)
      gates = (g[0].sigmoid().log(), g[1].sigmoid(), g[2].sigmoid()) if g else (None, None, None)
      o, S = f(q, k, v, *gates, M0, chunk, segment, independent)
      return [o, S] if cache else [o]
    def step(f, *xs):
      outs = fwd(f, *xs)
      gz = go.cast(outs[0].dtype)
      loss = (outs[0] * gz).sum() + (outs[1] * gS).sum() if cache else None
      return [*outs, *(loss.gradient(*xs) if cache else outs[0].gradient(*xs, gradient=gz))]
    err, rel = {}, {}
    for name, fn in (("fwd", fwd), ("fwd+bwd", step)):
      # one schedule per side (the timed JITs below reuse its compiled kernels)
      res = [_numpy(fn(f, *xs)) for f, xs in ((mc.linear_scan, [x.float() for x in ins]), (chunk_scan, ins))]
      err[name], rel[name] = _errors(*res)
    shape = f"B={B} H={H} L={L} D={D} chunk={chunk} segment={segment} {repr(dtype).removeprefix('dtypes.')}" + " M0" * m0 + " +S" * cache
    for name, fn in (("fwd", fwd), ("fwd+bwd", step)):
      t = [time_ms(TinyJit(functools.partial(fn, f)), *ins, reps=reps, warm=3) for f in (mc.linear_scan, chunk_scan)]
      rows.append((f"chunk_scan {core}{' indep' * independent} {name}", shape, err[name], rel[name], *t))
  return rows

def bench_linear(tokens:int, din:int, dout:int, dtype=dtypes.float, reps:int=20) -> list[tuple]:
  """Validate kernels.linear against x @ w on fresh random inputs, then time both: forward, and forward+backward (dx, dw).
  Rows as bench_chunk_scan's; a half x's reference gets the same rounded x and w in float32."""
  Tensor.manual_seed(0)
  x, w, gy = Tensor.randn(tokens, din).cast(dtype).realize(), (Tensor.randn(din, dout) * din ** -0.5).realize(), Tensor.randn(tokens, dout).realize()
  plain = lambda x, w: x @ w.cast(x.dtype)
  def fwd(f, x, w): return [f(x, w)]
  def step(f, x, w): return [(y := f(x, w)), *(y.float() * gy).sum().gradient(x, w)]
  rows = []
  for name, fn in (("fwd", fwd), ("fwd+bwd", step)):
    ref = _numpy(fn(plain, x.float(), w.cast(dtype).float()))
    err, rel = _errors(ref, _numpy(fn(linear, x, w)))
    t = [time_ms(TinyJit(functools.partial(fn, f)), x, w, reps=reps, warm=3) for f in (plain, linear)]
    rows.append((f"linear {name}", f"tokens={tokens} {din}x{dout} {repr(dtype).removeprefix('dtypes.')}", err, rel, *t))
  return rows

def bench_tokens(name:str, shape:str, ref, ker, ins:list[Tensor], reps:int=20) -> list[tuple]:
  """Validate ker against ref, each f(*ins) -> one Tensor (causal_conv, segment_mean), on the inputs given, then time both: forward,
  and forward+backward to every input. Rows as bench_chunk_scan's; a half input's reference gets it in float32."""
  Tensor.manual_seed(1)
  gy = Tensor.randn(*ins[0].shape).realize()   # the output has the first input's shape
  def fwd(f, *xs): return [f(*xs)]
  def step(f, *xs): return [(y := f(*xs)), *(y.float() * gy).sum().gradient(*xs)]
  rows = []
  for nm, fn in (("fwd", fwd), ("fwd+bwd", step)):
    err, rel = _errors(_numpy(fn(ref, *[x.float() for x in ins])), _numpy(fn(ker, *ins)))
    t = [time_ms(TinyJit(functools.partial(fn, f)), *ins, reps=reps, warm=3) for f in (ref, ker)]
    rows.append((f"{name} {nm}", shape, err, rel, *t))
  return rows

def bench_cache_read(B:int=4, H:int=16, D:int=64, segment:int=256, cases:tuple|None=None, topk:int=2, ref_max_L:int=8192,
                     reps:int=10) -> list[tuple]:
  """Validate cache_read against mc.cache_read_ref on fresh random inputs, then time both (TinyJit, synchronized, median of reps):
  forward, and forward+backward to q, o, M and (grm, ssc) z, z_on. Rows (name, shape, max abs err, rel err, reference ms,
  kernel ms); the errors are the worst relative RMS over y (fwd) and also the gradients (fwd+bwd). Above ref_max_L the reference
  (whose backward builds (B,H,L,N*D)) is not run: nan. cases (agg, L, q dtype[, segmentation[, topk]]) default to BIG's sizes
  (grm at 8192, ssc and grm at 32768 with 128 segments), or small ones on the CPU. A half q's reference gets it in float32."""
  if cases is None and Device.DEFAULT == "CPU": B, H, D, segment, cases = 1, 2, 16, 16, (("grm", 256, "float32"), ("ssc", 256, "float32"))
  if cases is None: cases = (("grm", 8192, "float32"), ("grm", 8192, "bfloat16"), ("ssc", 8192, "float32"), ("ssc", 32768, "float32"),
                             ("grm", 32768, "float32"))
  cases = [c for c in cases if supported(c[2])]
  rows = []
  for agg, L, dt, *more in cases:
    seg, k = (*more, "const", topk)[:2] if len(more) < 2 else more
    Tensor.manual_seed(0)
    blocks, reads = mc.cache_plan(-(-L // segment), seg)
    N = len(blocks)
    ins = [Tensor.randn(B, H, L, D).cast(dt), Tensor.randn(B, H, L, D), Tensor.randn(B, H, N, D, D) * D ** -0.5, Tensor.randn(B, H, L, N),
           Tensor.randn(B, H, L)]
    ins, gy = [x.contiguous().realize() for x in ins], Tensor.randn(B, H, L, D).realize()
    # residual and mean do not read the logits: no gradient reaches z, z_on
    nwrt = 5 if agg in ("grm", "ssc") else 3
    def fwd(f, q, o, M, z, z_on): return [f(q, o, M, z, z_on, reads, segment, agg, k)]
    def step(f, *xs): return [(y := fwd(f, *xs)[0]), *y.gradient(*xs[:nwrt], gradient=gy)]
    fs = (mc.cache_read_ref, cache_read) if L <= ref_max_L else (cache_read,)
    err, rel = {"fwd": math.nan, "fwd+bwd": math.nan}, {"fwd": math.nan, "fwd+bwd": math.nan}
    for name, fn in (("fwd", fwd), ("fwd+bwd", step)) if len(fs) == 2 else ():
      res = [_numpy(fn(f, *xs)) for f, xs in zip(fs, ([ins[0].float(), *ins[1:]], ins))]
      err[name], rel[name] = _errors(*res)
    shape = f"B={B} H={H} L={L} D={D} N={N} C={segment} {seg} q {dt}" + (f" top{k}" if agg == "ssc" else "")
    for name, fn in (("fwd", fwd), ("fwd+bwd", step)):
      t = [time_ms(TinyJit(functools.partial(fn, f)), *ins, reps=reps) for f in fs]
      rows.append((f"cache_read {agg} {name}", shape, err[name], rel[name], *([math.nan] * (2 - len(t))), *t))
  return rows

def _fla_ms(B:int, H:int, L:int, D:int, dts:tuple, reps:int) -> dict|str:
  # fla's chunk_linear_attn on (B, L, H, D) tensors, M = sum v k^T read by q unscaled: {dtype: {"fwd": ms, "fwd+bwd": ms}},
  # or why not. One process for every dtype: importing PyTorch and fla takes a while
  try:
    import torch
    from fla.ops.linear_attn import chunk_linear_attn
    if not torch.cuda.is_available(): return "fla: no CUDA device for torch"
    res = {}
    for dt in dts:
      q, k, v = (torch.randn(B, L, H, D, device="cuda", dtype=getattr(torch, dt), requires_grad=True) for _ in range(3))
      go = torch.randn_like(q)
      fwd = lambda: chunk_linear_attn(q, k, v, scale=1.0, normalize=False)[0]
      def nograd():
        with torch.no_grad(): fwd()
      sync = dict(reps=reps, warm=3, sync=torch.cuda.synchronize)
      res[dt] = {"fwd": time_ms(nograd, **sync), "fwd+bwd": time_ms(lambda: torch.autograd.grad(fwd(), (q, k, v), go), **sync)}
    return res
  except Exception as e: return f"fla unavailable ({why(e)})"

def _torch_linear_ms(jobs:list[tuple], reps:int) -> list[dict]|str:
  # PyTorch's x @ w at bench_linear's jobs (tokens, din, dout, dtype), w float32 cast to x's dtype as there: {"fwd": ms,
  # "fwd+bwd": ms (dx and dw)} per job, or why not. One process for every job: importing PyTorch takes a while
  try:
    import torch
    if not torch.cuda.is_available(): return "torch: no CUDA device"
    torch.backends.cuda.matmul.allow_tf32 = False   # float32 rows are float32
    res = []
    for T, K, N, dt in jobs:
      x = torch.randn(T, K, device="cuda", dtype=getattr(torch, dt), requires_grad=True)
      w, gy = (torch.randn(K, N, device="cuda") * K ** -0.5).requires_grad_(), torch.randn(T, N, device="cuda", dtype=x.dtype)
      fwd = lambda: x @ w.to(x.dtype)
      def nograd():
        with torch.no_grad(): fwd()
      sync = dict(reps=reps, warm=3, sync=torch.cuda.synchronize)
      res.append({"fwd": time_ms(nograd, **sync), "fwd+bwd": time_ms(lambda: torch.autograd.grad(fwd(), (x, w), gy), **sync)})
    return res
  except Exception as e: return f"PyTorch unavailable ({why(e)})"

def _record(r:tuple, dt:str, **peer) -> dict:
  # a bench_* tuple as a dict; a row without a reference (nan ms) is timed, not checked
  name, shape, err, rel, ref, ker = r
  ok = math.isnan(ref) or rel <= TOL[dt]
  return {"name": name, "shape": shape, "dtype": dt, "max_abs": err, "rel": rel, "tol": TOL[dt], "ref_ms": ref, "kernel_ms": ker,
          "speedup": ref / ker, "ok": ok, **peer}

HEAD = f"{'name':<30} {'shape':<66} {'max abs':>9} {'rel err':>9} {'ref ms':>9} {'kernel ms':>9} {'speed-up':>8}"
def _line(r:dict) -> str:
  s = f"{r['name']:<30} {r['shape']:<66} {r['max_abs']:9.2e} {r['rel']:9.2e} {r['ref_ms']:9.3f} {r['kernel_ms']:9.3f} {r['speedup']:7.2f}x"
  if r.get("peer"): s += f"  {r['peer']}: " + (f"{r['peer_ms']:.3f} ms, {r['ratio']:.2f}x" if r.get("peer_ms") is not None else "n/a")
  return s + ("" if r["ok"] else f"  FAIL (rel err > {r['tol']:g})")

def validate(only:tuple=(), reps:int=0, emit=print) -> list[dict]:
  """Every kernel against its reference (the cases above, at SHAPE for this device or BIG); only: run the cases whose label
  ("chunk_scan la indep float32", "cache_read ssc const float32 top2") contains one of these strings."""
  sh = SHAPE.get(Device.DEFAULT, BIG)
  reps, rows = reps or (3 if Device.DEFAULT == "CPU" else 20), []
  def add(new:list, dt:str, peer:dict|str|None=None):
    # peer: PyTorch's {"fwd": ms, "fwd+bwd": ms} for these rows, or why there is none (their peer column reads n/a)
    for r in new:
      ms = peer[r[0].split()[-1]] if isinstance(peer, dict) else None
      rows.append(_record(r, dt, **({} if peer is None else dict(peer="torch", peer_ms=ms, ratio=None if ms is None else r[5] / ms))))
      emit(_line(rows[-1]))
  if not all(supported(c[-1]) for c in SCAN_CASES): emit(f"  skipping bfloat16 cases: not supported on {Device.DEFAULT} here")
  for core, indep, dt in SCAN_CASES:
    if supported(dt) and (not only or any(o in f"chunk_scan {core}{' indep' * indep} {dt}" for o in only)):
      add(bench_chunk_scan(**sh, dtype=getattr(dtypes, dt), cores=(core,), reps=reps, independent=indep, m0=True, cache=True), dt)
  for agg, dt, seg, k in READ_CASES:
    if supported(dt) and (not only or any(o in f"cache_read {agg} {seg} {dt} top{k}" for o in only)):
      add(bench_cache_read(sh["B"], sh["H"], sh["D"], sh["segment"], ((agg, sh["L"], dt, seg, k),), reps=reps), dt)
  # the conv on q, k, v at the gpu preset's qkv (16, 1024, 1536), and its keys' online segment means (B,H,L,D) = (16, 8, 1024, 64)
  B, L, C, H, D = (2, sh["L"], 48, sh["H"], sh["D"]) if Device.DEFAULT == "CPU" else (16, 1024, 1536, 8, 64)
  for dt in ("float32", "bfloat16"):
    if supported(dt) and (not only or any(o in f"causal_conv {dt}" for o in only)):
      Tensor.manual_seed(0)
      x, w = Tensor.randn(B, L, C).cast(dt).realize(), (Tensor.randn(4, C) / 2).cast(dt).realize()
      add(bench_tokens("causal_conv", f"B={B} L={L} C={C} W=4 {dt}", mc.causal_conv_ref, causal_conv, [x, w], reps), dt)
  if not only or any(o in "segment_mean float32" for o in only):
    k, seg = Tensor.randn(B, H, L, D).realize(), sh["segment"] if Device.DEFAULT == "CPU" else 256
    add(bench_tokens("segment_mean", f"B={B} H={H} L={L} D={D} C={seg} float32", lambda k: mc.online_pool(k, seg), lambda k: segment_mean(k, seg),
                     [k], reps), "float32")
  # norm: a token's features (RMSNorm) and a head's (L2 of q and k), at the gpu preset's rows on a GPU
  for dt in ("float32", "bfloat16"):
    for n, rms in ((512, True), (64, False)):
      if supported(dt) and (not only or any(o in f"norm {dt}" for o in only)):
        rows_n, kind = 64 if Device.DEFAULT == "CPU" else 16384 * 512 // n, "rms" if rms else "l2"
        x = Tensor.randn(rows_n, n).cast(dt).realize()
        ref, ker = (functools.partial(mc._norm, fused=f, eps=1e-6, rms=rms) for f in (False, True))
        add(bench_tokens(f"norm {kind}", f"rows={rows_n} n={n} {dt}", ref, ker, [x], reps), dt)
  # linear: the projections' products at token counts that split their weight gradient (on a GPU the default preset's qkv, the
  # gpu preset's MLP, whose 1376 columns take the hand-written product's narrowest tiles, and its gates' 24 columns, padded to 32
  # for it), each also against PyTorch's x @ w
  jobs = [(*shape, dt) for dt in ("float32", "bfloat16") for shape in ([(3000, 48, 80)] if Device.DEFAULT == "CPU" else
          [(8192, 256, 768), (16384, 512, 1376), (16384, 512, 24)]) if supported(dt) and (not only or any(o in f"linear {dt}" for o in only))]
  peer = isolated(_torch_linear_ms, jobs, reps) if jobs else []
  if isinstance(peer, str): emit(f"  {peer}: linear timed alone")
  for i, (*shape, dt) in enumerate(jobs):
    add(bench_linear(*shape, dtype=getattr(dtypes, dt), reps=reps), dt, peer if isinstance(peer, str) else peer[i])
  return rows

def bench(reps:int=0, emit=print) -> tuple[list[dict], list[dict]]:
  """The kernels' speed targets on this device: rows (as validate's, with the peer, its ms and kernel/peer) and the targets."""
  cpu = Device.DEFAULT == "CPU"
  sh, long_L = (dict(B=1, H=2, L=256, D=16, chunk=16, segment=32), 1024) if cpu else (BIG, 32768)
  reps, rows, targets = reps or (3 if cpu else 20), [], []
  def add(r:tuple, dt:str, peer:str, peer_ms:float|None):
    rows.append(_record(r, dt, peer=peer, peer_ms=peer_ms, ratio=None if peer_ms is None else r[5] / peer_ms))
    emit(_line(rows[-1]))
    return rows[-1]
  def target(what:str, r:dict, limit:float, why:str=""):
    ok = None if r["ratio"] is None else r["ratio"] <= limit
    targets.append({"target": f"{what} <= {limit:g}x {r['peer']}", "ratio": r["ratio"], "pass": ok, "why": why})
  # chunk_scan la against fla, float32 and bfloat16 inputs
  scan, dts = {}, tuple(dt for dt in ("float32", "bfloat16") if supported(dt))
  fla_all = isolated(_fla_ms, sh["B"], sh["H"], sh["L"], sh["D"], dts, reps)
  if isinstance(fla_all, str): emit(f"  {fla_all}: chunk_scan timed alone")
  for dt in dts:
    ours = bench_chunk_scan(**sh, dtype=getattr(dtypes, dt), cores=("la",), reps=reps)
    fla = fla_all if isinstance(fla_all, str) else fla_all[dt]
    for r, limit in zip(ours, (1.5, 2.0)):
      row = add(r, dt, "fla", None if isinstance(fla, str) else fla[r[0].split()[-1]])
      target(f"{r[0]} {dt}", row, limit, fla if isinstance(fla, str) else "")
      scan[r[0].split()[-1], dt] = r
  # cache_read grm at the same shape against chunk_scan; ssc top-2 against grm at a long length (ref not run there)
  for r in bench_cache_read(sh["B"], sh["H"], sh["D"], sh["segment"], (("grm", sh["L"], "float32", "const", 2),), reps=reps):
    row = add(r, "float32", "chunk_scan la", scan["fwd+bwd" if "bwd" in r[0] else "fwd", "float32"][5])
    if "bwd" in r[0]: target(r[0], row, 1.0)
  ssc, grm = (bench_cache_read(sh["B"], sh["H"], sh["D"], sh["segment"], ((agg, long_L, "float32", "const", 2),), reps=reps)
              for agg in ("ssc", "grm"))
  for r, g in zip(ssc, grm):
    add(g, "float32", "", None)
    row = add(r, "float32", f"grm L={long_L}", g[5])
    if "bwd" in r[0]: target(r[0] + " top2", row, 0.25)
  return rows, targets

def _kernel_rows(what:str, run) -> dict:
  # the table of check and kernels: a header, the rows as they come, the targets, a summary; ok is False if a row failed
  print(f"device {Device.DEFAULT} | {what} | float32 tol {TOL['float32']:g}, bfloat16 tol {TOL['bfloat16']:g}")
  print(HEAD)
  st = time.perf_counter()
  rows, targets = run()
  for t in targets:
    print(f"target {t['target']:<52} " + ("n/a" if t["ratio"] is None else f"{t['ratio']:6.2f}x {'PASS' if t['pass'] else 'MISS'}")
          + (f"  ({t['why']})" if t["why"] else ""))
  bad = [r["name"] + " " + r["shape"] for r in rows if not r["ok"]]
  print(f"{len(rows)} rows in {time.perf_counter() - st:.0f} s: " + (f"{len(bad)} over tolerance" if bad else "all within tolerance"))
  return {"rows": rows, "targets": targets, "ok": not bad}

def check(bc:BenchConfig, overrides:dict) -> dict:
  """every fused kernel against its reference, forward and forward+backward, both timed; exit 1 if a row is over tolerance"""
  return _kernel_rows("check", lambda: (validate(bc.only, bc.reps), []))

def kernels(bc:BenchConfig, overrides:dict) -> dict:
  """the kernels' speed targets: chunk_scan against fla's chunk_linear_attn, cache_read grm against chunk_scan, ssc against grm"""
  return _kernel_rows("kernels", lambda: bench(bc.reps))

def profile(bc:BenchConfig, overrides:dict, top:int=12) -> dict:
  """per-kernel device ms (DEBUG=2) of one forward+backward of chunk_scan la, cache_read grm and an MC layer (Block.mix swla+grm)"""
  # the kernels at check's shape (float32); the layer without MLP at d=1024, 16 heads, B=4, L=2048 as package's; small on the CPU
  print(f"device {Device.DEFAULT} | profile")
  cpu = Device.DEFAULT == "CPU"
  sh = SHAPE["CPU"] if cpu else BIG
  B, H, L, D, C = (sh[x] for x in ("B", "H", "L", "D", "segment"))
  Tensor.manual_seed(0)
  q, k, v, gy = (Tensor.randn(B, H, L, D).realize() for _ in range(4))
  blocks, reads = mc.cache_plan(-(-L // C), "const")
  N = len(blocks)
  M, z, z_on = (Tensor.randn(B, H, N, D, D) * D ** -0.5).realize(), Tensor.randn(B, H, L, N).realize(), Tensor.randn(B, H, L).realize()
  def scan():
    o = chunk_scan(q, k, v, None, None, None, None, sh["chunk"], C, False)[0]
    return [o, *o.gradient(q, k, v, gradient=gy)]
  def read():
    y = cache_read(q, v, M, z, z_on, reads, C, "grm", 2)
    return [y, *y.gradient(q, v, M, z, z_on, gradient=gy)]
  Bl, Ll, cfg = (1, 256, dict(dim=64, n_heads=4, segment=64, chunk=16)) if cpu else (4, 2048, dict(dim=1024, n_heads=16, segment=256, chunk=64))
  blk = Block(MCConfig(**cfg, core="swla", agg="grm"))
  params = blk.mix_params()
  x, gx = Tensor.randn(Bl, Ll, cfg["dim"]).realize(), Tensor.randn(Bl, Ll, cfg["dim"]).realize()
  Tensor.realize(*params)
  def layer():
    y = blk.mix(x)
    return [y, *(y * gx).sum().gradient(x, *params)]
  shape = f"B={B} H={H} L={L} D={D} chunk={sh['chunk']} segment={C}"
  res = {}
  for what, fn in ((f"chunk_scan la fwd+bwd {shape}", scan), (f"cache_read grm fwd+bwd {shape} N={N}", read),
                   (f"Block.mix swla+grm fwd+bwd B={Bl} L={Ll} dim={cfg['dim']} heads={cfg['n_heads']}", layer)):
    res[what] = kt = kernel_times(fn)
    print(f"profile {what}: {sum(n for _, n in kt.values())} kernels, {sum(ms for ms, _ in kt.values()):.2f} ms summed "
          "(DEBUG=2: each kernel synchronized)")
    for name, (ms, n) in sorted(kt.items(), key=lambda x: -x[1][0])[:top]: print(f"  {ms:9.3f} ms {n:4d}x  {name}")
  return {"kernels": res}

# **** layers, package, model: forward+backward ms of fresh layers and models ****

# per subcommand: batch, lengths and the MCConfig fields under the overrides; a row's own fields (LAYERS, MODELS) go over both
SPEED = {"layers": (1, (1024, 2048, 4096, 8192, 16384, 32768), dict(dim=1024, n_heads=16, segment=256, chunk=64, core="swla")),
         "package": (4, (2048,), dict(dim=1024, n_heads=16, segment=256, chunk=64, agg="grm")),
         "model": (4, (2048,), dict(dim=256, n_heads=4, n_layers=4, segment=256, chunk=64))}
# the CPU's: a smoke test (5-8 min on 2 cores for all three, nearly all of it compiling); its times mean little
SPEED_CPU = {"layers": (1, (256, 512), dict(dim=64, n_heads=4, segment=64, chunk=16, core="swla")),
             "package": (1, (256,), dict(dim=64, n_heads=4, segment=64, chunk=16, agg="grm")),
             "model": (1, (256,), dict(dim=32, n_heads=2, n_layers=2, segment=64, chunk=16))}
LAYERS = {"none": dict(agg="none"), "grm": dict(agg="grm"), "grm-log": dict(agg="grm", segmentation="log"), "ssc": dict(agg="ssc"),
          "ssc-log": dict(agg="ssc", segmentation="log"), "attn": dict(mixer="attn", agg="none")}
MODELS = {**{f"{c}-{a}": dict(core=c, agg=a) for c in CORES for a in ("grm", "none")}, "attn": dict(mixer="attn", agg="none")}
PACKAGE = {"swla": dict(core="swla"), "la": dict(core="la")}   # the tinymc cores timed against the package's linear memory
ATTN_MAX_BYTES = 16 << 30   # attn is skipped where its float32 (B,H,L,L) scores would pass this (layers, B=1, H=16: L > 16K)

def step_ms(loss, params:list[Tensor], ins:list[Tensor], reps:int) -> float:
  # median ms of one TinyJit step, loss(*ins) and its gradient to every parameter, synchronized, after warm-up
  @TinyJit
  def step(*xs:Tensor) -> list[Tensor]:
    grads = loss(*xs).gradient(*params)
    Tensor.realize(*grads)
    return grads
  Tensor.realize(*params, *ins)
  return time_ms(step, *ins, reps=reps)

def layer_ms(cfg:MCConfig, B:int, L:int, reps:int) -> float:
  # one MC layer: a Block's token mixer with its residual, no MLP (what the memory-caching package's layer is)
  blk = Block(cfg)
  params = blk.mix_params()
  x, gy = Tensor.randn(B, L, cfg.dim).cast(cfg.dtype), Tensor.randn(B, L, cfg.dim).cast(cfg.dtype)
  return step_ms(lambda x, gy: (blk.mix(x) * gy).float().sum(), [x, *params], [x, gy], reps)

def model_ms(cfg:MCConfig, B:int, L:int, reps:int) -> float:
  model = Model(cfg)
  x, y = Tensor.randint(B, L, high=cfg.vocab), Tensor.randint(B, L, high=cfg.vocab)
  return step_ms(lambda x, y: model(x).sparse_categorical_crossentropy(y), get_parameters(model), [x, y], reps)

def package_ms(cfg:MCConfig, B:int, L:int, reps:int) -> float|str:
  # the memory-caching 0.1.0 layer (linear memory, grm: a token-by-token loop) forward+backward; or why it did not run
  try:
    import torch
    from memory_caching import MemoryCachingLayer, MCConfig as PMC, LinearMemoryBackend
    dev, dt = "cuda" if torch.cuda.is_available() else "cpu", getattr(torch, cfg.dtype)
    pcfg = PMC(d_model=cfg.dim, num_heads=cfg.n_heads, backend="linear", aggregation="grm", segment_size=cfg.segment)
    layer = MemoryCachingLayer(config=pcfg, backend=LinearMemoryBackend()).to(dev, dt)
    x = torch.randn(B, L, cfg.dim, device=dev, dtype=dt, requires_grad=True)
    gy, wrt = torch.randn_like(x), [x, *layer.parameters()]
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    return time_ms(lambda: torch.autograd.grad(layer(x), wrt, gy), reps=reps, warm=1, sync=sync)
  except Exception as e: return f"memory-caching unavailable ({why(e)})"

def cell(what:str, fn) -> dict:
  # one measurement; out of memory or a failed compile leaves it empty ("-") and the run goes on
  try: ms, err = fn(), None
  except Exception as e: ms, err = None, why(e)
  finally: gc.collect()
  print(f"{what}: " + (f"{ms:.2f} ms" if err is None else f"failed, {err}"), flush=True)
  return {"ms": ms, "error": err}

def fmt(ms:float|None) -> str: return "-" if ms is None else f"{ms:.2f}"

def _speed(what:str, bc:BenchConfig, overrides:dict):
  # the batch, lengths, config maker (a row's fields over the overrides over the sizes), reps and row picker of one subcommand
  B, Ls, base = (SPEED_CPU if Device.DEFAULT == "CPU" else SPEED)[what]
  names = {"layers": LAYERS, "package": PACKAGE, "model": MODELS}[what]
  if bad := set(bc.configs) - set(names): raise ValueError(f"--configs: unknown {sorted(bad)}, allowed values for {what} are {tuple(names)}")
  mk = lambda row: MCConfig(**{**base, **overrides, **row})
  reps, pick = bc.reps or (3 if Device.DEFAULT == "CPU" else 10), lambda names: [n for n in names if not bc.configs or n in bc.configs]
  train.check_dtype(mk({}).dtype)
  print(f"{what} | device {Device.DEFAULT} | dtype {mk({}).dtype} | reps {reps} | overrides {overrides or 'none'}")
  return B, Ls, mk, reps, pick

def layers(bc:BenchConfig, overrides:dict) -> dict:
  """one MC layer (Block.mix: projections, conv, gates, memory, output gate and projection, residual) forward+backward vs length"""
  B, Ls, mk, reps, pick = _speed("layers", bc, overrides)
  c, Ls = mk({}), bc.lengths or Ls
  print(f"layers: one MC layer forward+backward, B={B} dim={c.dim} heads={c.n_heads} core={c.core} segment={c.segment} chunk={c.chunk}")
  def one(n:str, L:int) -> dict:
    # tinygrad's attention builds the whole (B,H,L,L) score matrix: past ATTN_MAX_BYTES of it in float32 it is not tried
    if n == "attn" and (nbytes := B * c.n_heads * L * L * 4) > ATTN_MAX_BYTES:
      print(f"layers attn L={L}: skipped, its score matrix alone is {nbytes / 2**30:.0f} GiB", flush=True)
      return {"ms": None, "error": "skipped: score matrix too large"}
    return cell(f"layers {n} L={L}", lambda: layer_ms(mk(LAYERS[n]), B, L, reps))
  rows = [{"config": n, "L": L, **one(n, L)} for n in pick(LAYERS) for L in Ls]
  ms = {(r["config"], r["L"]): r["ms"] for r in rows}
  print(table(["ms", *[f"L={L}" for L in Ls]], [[n, *[fmt(ms[n, L]) for L in Ls]] for n in pick(LAYERS)]))
  return {"B": B, "config": dataclasses.asdict(c), "rows": rows}

def package(bc:BenchConfig, overrides:dict) -> dict:
  """the same MC layer with grm against the memory-caching 0.1.0 package's (linear memory), forward+backward"""
  B, (L,), mk, reps, pick = _speed("package", bc, overrides)
  rows = [{"core": k, **cell(f"package tinymc {k}+grm B={B} L={L}", lambda: layer_ms(mk(PACKAGE[k]), B, L, reps))} for k in pick(PACKAGE)]
  # in its own process (its own CUDA context), 1 warm-up and 2 timed runs: it takes seconds
  c, pkg = mk({}), isolated(package_ms, mk({}), B, L, min(reps, 2))
  print(f"package: an MC layer (grm, segment {c.segment}) forward+backward, B={B} L={L} dim={c.dim} heads={c.n_heads}, {c.dtype}; "
        + (f"{pkg}: tinymc timed alone" if isinstance(pkg, str) else f"memory-caching 0.1.0 (linear memory) {pkg:.1f} ms"))
  for r in rows: r["speedup"] = None if isinstance(pkg, str) or r["ms"] is None else pkg / r["ms"]
  up = lambda r: ("-", "-") if r["speedup"] is None else (f"{r['speedup']:.0f}x", "PASS" if r["speedup"] >= 200 else "MISS")
  print(table(["layer", "ms", "speed-up", "target >= 200x"], [[f"tinymc Block.mix {r['core']}+grm", fmt(r["ms"]), *up(r)] for r in rows]))
  return {"B": B, "L": L, "config": dataclasses.asdict(c), "package_ms": None if isinstance(pkg, str) else pkg,
          "package_error": pkg if isinstance(pkg, str) else None, "rows": rows}

def model(bc:BenchConfig, overrides:dict) -> dict:
  """model forward+backward (no optimizer), each core with grm and without caching, and the attention baseline"""
  B, (L,), mk, reps, pick = _speed("model", bc, overrides)
  c = mk({})
  print(f"model: forward+backward, B={B} L={L} dim={c.dim} heads={c.n_heads} layers={c.n_layers} segment={c.segment} chunk={c.chunk}")
  ms = {n: cell(f"model {n} B={B} L={L}", lambda: model_ms(mk(MODELS[n]), B, L, reps))["ms"] for n in pick(MODELS)}
  ratio = lambda a, b: "-" if a is None or b is None else f"{a / b:.2f}"
  cores = [[k, fmt(g := ms.get(f"{k}-grm")), fmt(n := ms.get(f"{k}-none")), ratio(g, n)] for k in CORES if {f"{k}-grm", f"{k}-none"} & set(ms)]
  print(table(["core", "grm ms", "none ms", "grm/none"], cores + ([["attn", "-", fmt(ms["attn"]), "-"]] if "attn" in ms else [])))
  return {"B": B, "L": L, "config": dataclasses.asdict(c), "rows": [{"config": n, "ms": v} for n, v in ms.items()]}

# **** train: the whole training step, tinymc against a PyTorch Transformer of the same blocks ****
# Both sides run on random tokens: forward, cross-entropy, backward, global-norm clipping and AdamW with train.py's lr, betas and
# weight decay (matrices only), the lr held fixed. tinymc: train.make_step, one TinyJit. PyTorch (_torch_lm): fused AdamW,
# float32 with TF32 off, bfloat16 by autocast over float32 weights, eager and torch.compile, all its rows in one process.
# A row's ratio is its tok/s over the PyTorch eager row's of the same shape and dtype.

# width, blocks, heads, batch, length, and the segment and chunk of the tinymc rows
TRAIN_SHAPES = {"default": dict(dim=256, n_layers=4, n_heads=4, B=16, L=512, segment=128, chunk=64),   # the default preset's
                "gpu": dict(dim=512, n_layers=6, n_heads=8, B=16, L=1024, segment=256, chunk=64),      # the gpu preset's
                "long": dict(dim=512, n_layers=4, n_heads=8, B=1, L=16384, segment=256, chunk=64)}     # where caching should pay off
# the CPU's: a smoke test of the same rows (1-2 minutes a shape on 2 cores, nearly all of it compiling); its times mean little
TRAIN_SHAPES_CPU = {"default": dict(dim=32, n_layers=2, n_heads=2, B=2, L=64, segment=32, chunk=16),
                    "gpu": dict(dim=64, n_layers=2, n_heads=2, B=2, L=128, segment=32, chunk=16),
                    "long": dict(dim=32, n_layers=2, n_heads=2, B=1, L=512, segment=64, chunk=16)}
TORCH_ROWS = ("torch-eager", "torch-compile")
TRAIN_ROWS = {"swla+grm": dict(core="swla", agg="grm"), "la+none": dict(core="la", agg="none"), "swla+none": dict(core="swla", agg="none"),
              "attn": dict(mixer="attn", agg="none"), "swla+ssc": dict(core="swla", agg="ssc"),
              "swla+grm-log": dict(core="swla", agg="grm", segmentation="log"), "dla+grm": dict(core="dla", agg="grm"),
              "titans+grm": dict(core="titans", agg="grm")}
LONG_ROWS = ("swla+ssc", "swla+grm-log")   # among the default rows of the long shape only
DEEP_ROWS = ("dla+grm", "titans+grm")      # only when named (--configs): each compiles for minutes

def _torch_lm(torch, dim:int, n_layers:int, n_heads:int, L:int, vocab:int=256, theta:float=10000.0):
  # tinymc's blocks (mc.Block with mixer="attn", less its per-head RMSNorm, and mc.Model) as a PyTorch user would write them;
  # forward(x, y) returns the mean cross-entropy; logits(x, kv, pos) the logits of tokens x (B,T) at positions pos.. with a
  # key/value cache kv (per block a pair (B,H,L,D)) that it writes in place, as a KV-cache decoder does
  nn, F = torch.nn, torch.nn.functional
  D, hidden = dim // n_heads, -(-int(8 / 3 * dim) // 32) * 32
  ang = torch.outer(torch.arange(L, dtype=torch.float64), theta ** (-torch.arange(0, D // 2, dtype=torch.float64) * 2 / D))
  def rope(x, cos, sin):
    x1, x2, cos, sin = *x.chunk(2, -1), cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), -1)
  class Block(nn.Module):
    def __init__(self):
      super().__init__()
      self.norm1, self.norm2 = nn.RMSNorm(dim, eps=1e-6), nn.RMSNorm(dim, eps=1e-6)
      self.wqkv, self.wgate, self.wo = (nn.Linear(dim, n * dim, bias=False) for n in (3, 1, 1))
      self.w1, self.w3, self.w2 = nn.Linear(dim, hidden, bias=False), nn.Linear(dim, hidden, bias=False), nn.Linear(hidden, dim, bias=False)
    def forward(self, x, cos, sin, kv=None, pos=0):
      h, T = self.norm1(x), x.shape[1]
      q, k, v = self.wqkv(h).view(*x.shape[:2], 3, n_heads, D).permute(2, 0, 3, 1, 4)   # (B,H,L,D) each
      q, k = rope(q, cos, sin), rope(k, cos, sin)
      if kv is not None:
        kv[0][:, :, pos:pos + T], kv[1][:, :, pos:pos + T] = k, v
        k, v = kv[0][:, :, :pos + T], kv[1][:, :, :pos + T]
      y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1)   # one query reads every cached key
      x = x + self.wo(y.transpose(1, 2).reshape(x.shape) * F.silu(self.wgate(h)))
      h = self.norm2(x)
      return x + self.w2(F.silu(self.w1(h)) * self.w3(h))
  class LM(nn.Module):
    def __init__(self):
      super().__init__()
      self.emb, self.norm = nn.Embedding(vocab, dim), nn.RMSNorm(dim, eps=1e-6)
      self.blocks = nn.ModuleList(Block() for _ in range(n_layers))
      nn.init.normal_(self.emb.weight, std=0.02)
      self.register_buffer("cos", ang.cos().float(), persistent=False)
      self.register_buffer("sin", ang.sin().float(), persistent=False)
    def forward(self, x, y):
      h = self.emb(x)
      for blk in self.blocks: h = blk(h, self.cos, self.sin)
      return F.cross_entropy(F.linear(self.norm(h), self.emb.weight).flatten(0, 1).float(), y.flatten())   # head tied to the embedding
    def logits(self, x, kv, pos):
      h, cs = self.emb(x), slice(pos, pos + x.shape[1])
      for blk, c in zip(self.blocks, kv): h = blk(h, self.cos[cs], self.sin[cs], c, pos)
      return F.linear(self.norm(h), self.emb.weight)
  return LM()

def torch_train(jobs:list[tuple], reps:int, hp:dict) -> dict|str:
  # the PyTorch rows, in a process of their own: jobs (shape, sizes, dtype, row) -> {"rows": [{"ms", "first_s", "error"}], ...},
  # or why PyTorch did not import. On a machine without CUDA it runs on the CPU (a smoke test)
  try: import torch
  except Exception as e: return f"PyTorch unavailable ({why(e)})"
  cuda = torch.cuda.is_available()
  dev, sync = ("cuda", torch.cuda.synchronize) if cuda else ("cpu", lambda: None)
  torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = False, False   # float32 rows are float32
  rows = []
  for _, sh, dt, row in jobs:
    try:
      torch.manual_seed(0)
      lm = _torch_lm(torch, sh["dim"], sh["n_layers"], sh["n_heads"], sh["L"]).to(dev)
      params = list(lm.parameters())
      groups = [{"params": [p for p in params if (p.ndim > 1) == d], "weight_decay": hp["weight_decay"] if d else 0.0} for d in (True, False)]
      opt = torch.optim.AdamW(groups, lr=hp["lr"], betas=(hp["b1"], hp["b2"]), fused=True)
      fwd = torch.compile(lm) if row == "torch-compile" else lm
      x, y = (torch.randint(0, 256, (sh["B"], sh["L"]), device=dev) for _ in range(2))
      def step():
        with torch.autocast(device_type=dev, dtype=torch.bfloat16, enabled=dt == "bfloat16"): loss = fwd(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, hp["grad_clip"])
        opt.step()
        opt.zero_grad(set_to_none=True)
      st = time.perf_counter()
      step()
      sync()
      first = time.perf_counter() - st
      rows.append({"ms": time_ms(step, reps=reps, warm=3, sync=sync), "first_s": first, "error": None})
    except Exception as e: rows.append({"ms": None, "first_s": None, "error": why(e)})
    finally:
      lm = opt = fwd = None
      if row == "torch-compile": torch._dynamo.reset()
      gc.collect()
      if cuda: torch.cuda.empty_cache()
  return {"rows": rows, "torch": torch.__version__, "device": torch.cuda.get_device_name() if cuda else "cpu"}

def kind(name:str) -> str:
  # a kernel's kind, for a profile's sums: ours by their names' first word (mma, gemm, chunk, cache, ssc, norm, conv, segment), tinygrad's elementwise
  # (E_...) and reduce (r_...) kernels
  return {"E": "elementwise", "r": "reduce"}.get(w := name.split()[0].split("_")[0], w)

def tinymc_train(cfg:MCConfig, B:int, L:int, reps:int, profile:int=0) -> tuple[float, float, dict]:
  # (median ms, first step s, {kernel: (ms, launches)} of one step when profiling) of train.py's jitted step (train.make_step)
  # on random tokens
  Tensor.manual_seed(0)
  lm, tc = Model(cfg), train.TrainConfig(model=cfg)
  opt = train.make_optimizer(lm, tc)
  step = train.make_step(lm, opt, tc.grad_clip)
  # realized buffers before the first step, as in train.py: the first call compiles the graph the jit captures
  Tensor.realize(*get_state_dict(lm).values(), *train.optim_state(opt).values())
  rng = np.random.default_rng(0)
  x, y = (Tensor(rng.integers(0, cfg.vocab, (B, L), dtype=np.int32)).realize() for _ in range(2))
  lr = Tensor([tc.lr], dtype=dtypes.float32).realize()
  st = time.perf_counter()
  step(x, y, lr, train.slot(0))
  Device[Device.DEFAULT].synchronize()
  first = time.perf_counter() - st
  ms = time_ms(step, x, y, lr, train.slot(0), reps=reps, warm=3)
  return ms, first, kernel_times(lambda: step(x, y, lr, train.slot(0))) if profile else {}

def print_profile(kt:dict, top:int):
  # kernel_times of one step: the total, the sums by kind, the top slowest kernels
  by: dict[str, tuple[float, int]] = {}
  for name, (t, n) in kt.items():
    t0, n0 = by.get(k := kind(name), (0.0, 0))
    by[k] = (t0 + t, n0 + n)
  print(f"  one step, each kernel synchronised: {sum(t for t, _ in kt.values()):.2f} ms in {sum(n for _, n in kt.values())} launches; "
        "by kind: " + ", ".join(f"{k} {t:.2f} ms ({n})" for k, (t, n) in sorted(by.items(), key=lambda kv: -kv[1][0])))
  print(table(["kernel", "ms", "launches"], [[k, t, n] for k, (t, n) in sorted(kt.items(), key=lambda kv: -kv[1][0])[:top]]))

def _tinymc_row(cfg:MCConfig, sh:dict, reps:int, profile:int=0) -> dict:
  # one tinymc row; out of memory or a failed compile leaves it empty and the run goes on
  if cfg.mixer == "attn" and (nbytes := cfg.n_layers * sh["B"] * cfg.n_heads * sh["L"] ** 2 * 4) > ATTN_MAX_BYTES:
    return {"ms": None, "first_s": None, "error": f"skipped: its float32 score matrices alone are {nbytes / 2**30:.0f} GiB"}
  try:
    ms, first, kt = tinymc_train(cfg, sh["B"], sh["L"], reps, profile)
    return {"ms": ms, "first_s": first, "error": None, **({"kernels": kt} if kt else {})}
  except Exception as e: return {"ms": None, "first_s": None, "error": why(e)}
  finally: gc.collect()

def train_step(bc:BenchConfig, overrides:dict) -> dict:
  """the whole jitted training step (forward, loss, backward, clipping, AdamW) of tinymc and of a PyTorch Transformer, tok/s"""
  cpu = Device.DEFAULT == "CPU"
  shapes, reps = TRAIN_SHAPES_CPU if cpu else TRAIN_SHAPES, bc.reps or (2 if cpu else 10)
  for k, allowed in (("shapes", tuple(shapes)), ("dtypes", ("float32", "bfloat16")), ("configs", (*TORCH_ROWS, *TRAIN_ROWS))):
    if bad := set(getattr(bc, k)) - set(allowed): raise ValueError(f"--{k}: unknown {sorted(bad)}, allowed values are {allowed}")
  if bad := sorted(set(overrides) & {"vocab", "dim", "n_layers", "n_heads", "dtype"}):
    raise ValueError(f"train: {', '.join('--' + k for k in bad)} come from --shapes and --dtypes")
  print(f"train | device {Device.DEFAULT} | reps {reps} | shapes {','.join(bc.shapes)} | dtypes {','.join(bc.dtypes)} | "
        f"overrides {overrides or 'none'}")
  if cpu: print("train: on the CPU every shape is a tiny one (TRAIN_SHAPES_CPU), a smoke test whose times mean little")
  groups = []
  for s in bc.shapes:
    for dt in bc.dtypes:
      if not supported(dt): print(f"train {s} {dt}: skipped, {dt} is not supported on {Device.DEFAULT} here")
      else: groups.append((s, dt, list(bc.configs) or [*TORCH_ROWS, *(n for n in TRAIN_ROWS if n not in DEEP_ROWS + LONG_ROWS or
                                                                      n in LONG_ROWS and s == "long")]))
  # PyTorch first, every row of the call in one process (importing it takes a while), gone before tinygrad's rows start
  jobs, peer, info = [(s, shapes[s], dt, n) for s, dt, names in groups for n in names if n in TORCH_ROWS], {}, {}
  if jobs:
    print(f"train: {len(jobs)} PyTorch rows in a process of their own", flush=True)
    tc = train.TrainConfig()
    got = isolated(torch_train, jobs, reps, {k: getattr(tc, k) for k in ("lr", "b1", "b2", "weight_decay", "grad_clip")})
    if isinstance(got, str): print(f"train: {got}: tinymc rows only")
    else: peer, info = {(s, dt, n): r for (s, _, dt, n), r in zip(jobs, got["rows"])}, {k: got[k] for k in ("torch", "device")}
  rows = []
  for s, dt, names in groups:
    sh, eager = shapes[s], (peer.get((s, dt, "torch-eager")) or {}).get("ms")
    for n in names:
      if n in TORCH_ROWS and (s, dt, n) not in peer: continue
      fields = {**{k: sh[k] for k in ("dim", "n_layers", "n_heads", "segment", "chunk")}, **overrides, **TRAIN_ROWS.get(n, {}), "dtype": dt}
      r = peer[s, dt, n] if n in TORCH_ROWS else _tinymc_row(MCConfig(**fields), sh, reps, bc.profile)
      tok_s = None if r["ms"] is None else sh["B"] * sh["L"] / r["ms"] * 1e3
      rows.append({"shape": s, "dtype": dt, "config": n, **r, "tok_s": tok_s, "ratio": None if eager is None or r["ms"] is None else eager / r["ms"]})
      print(f"train {s} {dt} {n}: " + (f"failed, {r['error']}" if r["ms"] is None else f"{r['ms']:.2f} ms/step, {tok_s:,.0f} tok/s, "
            f"vs eager {'-' if rows[-1]['ratio'] is None else format(rows[-1]['ratio'], '.3f') + 'x'}, first step {r['first_s']:.1f} s"), flush=True)
      if r.get("kernels"): print_profile(r["kernels"], bc.profile)
  print("train: tok/s of the whole step; vs eager = tok/s / the PyTorch eager row's (same shape and dtype); first step = compile + run"
        + (f"; PyTorch {info['torch']} on {info['device']}" if info else ""))
  if rows: print(table(["shape", "dtype", "config", "ms/step", "tok/s", "vs eager", "first step s"],
                       [[r["shape"], r["dtype"], r["config"], fmt(r["ms"]), "-" if r["tok_s"] is None else f"{r['tok_s']:,.0f}",
                         "-" if r["ratio"] is None else f"{r['ratio']:.3f}", "-" if r["first_s"] is None else f"{r['first_s']:.1f}"] for r in rows]))
  return {"shapes": {s: shapes[s] for s in bc.shapes}, "reps": reps, **info, "rows": rows}

# **** decode: Model.step and prefill against a PyTorch Transformer with a KV cache ****
# Step rows: ms per token of Model.step (the state's TinyJit, the position a Variable) at a position of `context` tokens,
# after 3 warm-up steps, median of --reps. The state's shapes, and with them every step's work, do not depend on what it holds,
# so the step rows start from init_state with the position set to the context (attention reads the first pos+1 cache entries).
# Prefill rows (at the first batch size): Model.prefill of a context-long prompt against one forward (model(tokens), no state),
# both after a warm-up call. PyTorch: _torch_lm with its KV cache, eager, float32 (TF32 off), every row in one process.

DECODE_SHAPE = dict(dim=256, n_layers=4, n_heads=4, segment=128, chunk=64)    # the default preset's model
DECODE_SHAPE_CPU = dict(dim=32, n_layers=1, n_heads=2, segment=16, chunk=8)   # the CPU's smoke test; its times mean little
DECODE_ROWS = {"torch": {}, "attn": dict(mixer="attn", agg="none"), "none": dict(core="swla", agg="none"),
               "grm": dict(core="swla", agg="grm"), "grm-log": dict(core="swla", agg="grm", segmentation="log"),
               "ssc": dict(core="swla", agg="ssc")}

def torch_decode(jobs:list[tuple], sh:dict, reps:int, prefill_B:int) -> dict|str:
  # the PyTorch rows in a process of their own: jobs (context, B) -> {"rows": [{"step_ms", "prefill_ms", "error"}], ...}
  try: import torch
  except Exception as e: return f"PyTorch unavailable ({why(e)})"
  cuda = torch.cuda.is_available()
  dev, sync = ("cuda", torch.cuda.synchronize) if cuda else ("cpu", lambda: None)
  torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = False, False
  rows = []
  for ctx, B in jobs:
    try:
      torch.manual_seed(0)
      L, H, D = ctx + reps + 3, sh["n_heads"], sh["dim"] // sh["n_heads"]
      lm = _torch_lm(torch, sh["dim"], sh["n_layers"], H, L).to(dev).eval()
      kv = [[torch.zeros(B, H, L, D, device=dev) for _ in range(2)] for _ in range(sh["n_layers"])]
      tok, pos = torch.zeros(B, 1, dtype=torch.long, device=dev), [ctx]
      def step():
        lm.logits(tok, kv, pos[0])
        pos[0] += 1
      prompt, pre = torch.zeros(B, ctx, dtype=torch.long, device=dev), None
      with torch.no_grad():
        if B == prefill_B: pre = time_ms(lambda: lm.logits(prompt, kv, 0), reps=max(1, reps // 4), warm=1, sync=sync)
        rows.append({"step_ms": time_ms(step, reps=reps, warm=3, sync=sync), "prefill_ms": pre, "fwd_ms": None, "error": None})
    except Exception as e: rows.append({"step_ms": None, "prefill_ms": None, "fwd_ms": None, "error": why(e)})
    finally:
      lm = kv = None
      gc.collect()
      if cuda: torch.cuda.empty_cache()
  return {"rows": rows, "torch": torch.__version__, "device": torch.cuda.get_device_name() if cuda else "cpu"}

def tinymc_decode(cfg:MCConfig, ctx:int, B:int, reps:int, prefill:bool) -> dict:
  # one tinymc row: ms per Model.step at position ctx, and (prefill) Model.prefill and model(tokens) of a ctx-long prompt; a
  # failure (out of memory, a failed compile) leaves its cells empty and names itself in "error"
  Tensor.manual_seed(0)
  model, out = Model(cfg), {"step_ms": None, "prefill_ms": None, "fwd_ms": None, "error": None}
  Tensor.realize(*get_parameters(model))
  try:
    # tinygrad's attention builds the whole (B,H,L,L) score matrix: past ATTN_MAX_BYTES of it in float32 it is not tried
    if prefill and cfg.mixer == "attn" and B * cfg.n_heads * ctx * ctx * 4 > ATTN_MAX_BYTES: out["error"] = "prefill skipped: score matrix"
    elif prefill:
      prompt = np.random.default_rng(0).integers(0, cfg.vocab, (B, ctx)).astype(np.int32)
      out["prefill_ms"] = time_ms(lambda: model.prefill(prompt, ctx + 1)[0].realize(), reps=max(1, reps // 4), warm=1)
      out["fwd_ms"] = time_ms(lambda: model(Tensor(prompt)).realize(), reps=max(1, reps // 4), warm=1)
  except Exception as e: out["error"] = f"prefill: {why(e)}"
  try:
    state, tok = model.init_state(B, ctx + reps + 3), Tensor.zeros(B, dtype=dtypes.int32).contiguous().realize()
    state["t"] = ctx
    out["step_ms"] = time_ms(lambda: model.step(tok, state), reps=reps, warm=3)
  except Exception as e: out["error"] = f"step: {why(e)}"
  finally: gc.collect()
  return out

def decode(bc:BenchConfig, overrides:dict) -> dict:
  """tokens/s of Model.step at each batch size and of Model.prefill, against a PyTorch Transformer with a KV cache, vs context"""
  cpu = Device.DEFAULT == "CPU"
  sh, reps = {**(DECODE_SHAPE_CPU if cpu else DECODE_SHAPE), **overrides}, bc.reps or (3 if cpu else 20)
  ctxs, names = bc.contexts or ((32, 64) if cpu else (512, 8192, 32768)), list(bc.configs) or list(DECODE_ROWS)
  if bad := set(names) - set(DECODE_ROWS): raise ValueError(f"--configs: unknown {sorted(bad)}, allowed values for decode are {tuple(DECODE_ROWS)}")
  if not bc.batches or min(bc.batches) < 1 or min(ctxs) < 1: raise ValueError("decode: --batches and --contexts must be positive")
  print(f"decode | device {Device.DEFAULT} | reps {reps} | " + " ".join(f"{k}={v}" for k, v in sh.items()))
  jobs, peer, info = [(c, B) for c in ctxs for B in bc.batches], {}, {}
  if "torch" in names:
    print(f"decode: {len(jobs)} PyTorch rows in a process of their own", flush=True)
    got = isolated(torch_decode, jobs, {k: sh[k] for k in ("dim", "n_layers", "n_heads")}, reps, bc.batches[0])
    if isinstance(got, str): print(f"decode: {got}: tinymc rows only")
    else: peer, info = dict(zip(jobs, got["rows"])), {k: got[k] for k in ("torch", "device")}
  rows = []
  for n in names:
    for c, B in jobs:
      if n == "torch" and not peer: continue
      r = peer[c, B] if n == "torch" else tinymc_decode(MCConfig(**{**sh, **DECODE_ROWS[n]}), c, B, reps, B == bc.batches[0])
      ref = (peer.get((c, B)) or {}).get("step_ms")
      rows.append({"config": n, "context": c, "B": B, **r, "tok_s": None if r["step_ms"] is None else B / r["step_ms"] * 1e3,
                   "vs_torch": None if ref is None or r["step_ms"] is None else ref / r["step_ms"],
                   "prefill_tok_s": None if r["prefill_ms"] is None else B * c / r["prefill_ms"] * 1e3})
      print(f"decode {n} context={c} B={B}: " + ("step failed" if r["step_ms"] is None else f"{r['step_ms']:.3f} ms/token, "
            f"{rows[-1]['tok_s']:,.0f} tok/s") + (f", prefill {r['prefill_ms']:.1f} ms" if r["prefill_ms"] is not None else "")
            + (f" ({r['error']})" if r["error"] else ""), flush=True)
  num = lambda x, f="{:,.0f}": "-" if x is None else f.format(x)
  print("decode: vs torch = PyTorch's ms per token / this row's (same context and batch); prefill/fwd = Model.prefill over model(tokens)"
        + (f"; PyTorch {info['torch']} on {info['device']}" if info else ""))
  if rows: print(table(["config", "context", "B", "ms/token", "tok/s", "vs torch", "prefill tok/s", "prefill/fwd"],
                       [[r["config"], r["context"], r["B"], num(r["step_ms"], "{:.3f}"), num(r["tok_s"]), num(r["vs_torch"], "{:.2f}"),
                         num(r["prefill_tok_s"]), num(r["fwd_ms"] and r["prefill_ms"] / r["fwd_ms"], "{:.2f}")] for r in rows]))
  return {"shape": sh, "reps": reps, **info, "rows": rows}

# **** command line ****

# subcommand: (function, its options beside --json, whether it takes MCConfig overrides). A new one is a function and a line
COMMANDS: dict[str, tuple[typing.Callable[[BenchConfig, dict], dict], tuple[str, ...], bool]] = {
  "check": (check, ("only", "reps"), False), "kernels": (kernels, ("reps",), False), "profile": (profile, (), False),
  "layers": (layers, ("reps", "configs", "lengths"), True), "package": (package, ("reps", "configs"), True),
  "model": (model, ("reps", "configs"), True), "train": (train_step, ("reps", "configs", "shapes", "dtypes", "profile"), True),
  "decode": (decode, ("reps", "configs", "contexts", "batches"), True)}

def _clean(x):
  # NaN (a row without a reference) as JSON null
  if isinstance(x, float) and math.isnan(x): return None
  if isinstance(x, dict): return {k: _clean(v) for k, v in x.items()}
  return [_clean(v) for v in x] if isinstance(x, (list, tuple)) else x

def run(cmd:str, argv:list[str]) -> dict:
  """One subcommand with --key=value arguments (its BenchConfig fields and, where it takes them, MCConfig fields); its results."""
  if cmd not in COMMANDS: raise ValueError(f"unknown subcommand {cmd!r}: allowed values are {tuple(COMMANDS)}")
  fn, opts, takes_mc = COMMANDS[cmd]
  bh = train._hints(BenchConfig)
  kv = train.parse_kv(argv, {**{k: bh[k] for k in (*opts, "json")}, **(train._hints(MCConfig) if takes_mc else {})})
  bc, overrides = BenchConfig(**{k: v for k, v in kv.items() if k in bh}), {k: v for k, v in kv.items() if k not in bh}
  with Context(**train.device_defaults()):
    res = {"command": cmd, "device": Device.DEFAULT, "bench": dataclasses.asdict(bc), "overrides": overrides, **fn(bc, overrides)}
  if bc.json:
    with open(bc.json, "w") as f: json.dump(_clean(res), f, indent=1)
    print(f"wrote {bc.json}")
  return res

def usage() -> str:
  cmds = [f"  {n:<8} {fn.__doc__}\n{'':11}options: {' '.join(f'--{o}' for o in (*opts, 'json'))}" + (", MCConfig fields" if mc else "")
          for n, (fn, opts, mc) in COMMANDS.items()]
  fields = ["  --" + line.strip() for line in inspect.getsource(BenchConfig).splitlines()[1:] if "#" in line]
  rows = {"layers": LAYERS, "package": PACKAGE, "model": MODELS, "train": (*TORCH_ROWS, *TRAIN_ROWS), "decode": DECODE_ROWS}
  return "\n".join([__doc__.strip(), "", "subcommands:", *cmds, "", "options (--key=value; field: type = default  # meaning):", *fields,
                    "", "rows (--configs=a,b):", *(f"  {n}: {', '.join(r)}" for n, r in rows.items()),
                    "", "train shapes (--shapes=a,b; the CPU runs TRAIN_SHAPES_CPU's tiny ones):",
                    *(f"  {k}: " + " ".join(f"{f}={v}" for f, v in sh.items()) for k, sh in TRAIN_SHAPES.items())])

def main(argv:list[str]|None=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  if not argv or argv[0] in ("-h", "--help"):
    print(usage())
    return 0 if argv else 2
  try: res = run(argv[0], argv[1:])
  except ValueError as e:
    print(f"bench.py: error: {e}", file=sys.stderr)
    return 2
  return 1 if res.get("ok") is False else 0

if __name__ == "__main__": sys.exit(main())

"""
tinymc fused kernels, written as tinygrad UOp kernels (Tensor.custom_kernel) so one source runs on CUDA, Metal, OpenCL and CPU.

Their plain-tinygrad references live beside their caller in mc.py (mc.linear_scan, mc.cache_read_ref, a plain x @ w for
linear, mc.causal_conv_ref, mc.online_pool); cfg.kernels switches the model between the two. The last section is plain tinygrad:
the weights that every token uses (norm weights, gate biases, the embedding), each its plain form with the gradient reduced per
group of tokens.
`python bench.py check` validates every kernel against its reference on fresh random inputs and prints a table; `python
bench.py kernels` times them on the default device.

One rule when using them: take gradients before realizing the forward. In tinygrad 0.14 realizing a custom kernel's output
(loss.item(), print(loss.numpy())) replaces its graph with the buffer, and a later .backward() finds no path through the
kernel: the gradients upstream of it come back as zeros, without an error. train.py realizes loss and gradients together.

Importing it also widens the thread blocks of tinygrad's own elementwise kernels on a GPU (the last section, "wide blocks").
"""
from __future__ import annotations
import functools, itertools, math, operator, os, re, types, weakref
from typing import NamedTuple
import numpy as np
from tinygrad import Tensor, UOp, Device, dtypes
from tinygrad.uop.ops import KernelInfo, AxisType, Ops
from tinygrad.codegen.opt import Opt, OptOps, KernelOptError
from tinygrad.dtype import AddrSpace
import tinygrad.codegen.opt.heuristic as _heuristic, tinygrad.engine.worker as _worker
import tinygrad.schedule.rangeify as _rangeify, tinygrad.schedule.indexing as _indexing
import tinygrad.codegen as _codegen, tinygrad.codegen.late.coalesce as _coalesce
from tinygrad.renderer.cstyle import CUDARenderer as _CUDARenderer

def applies(x:Tensor) -> bool:
  # the kernels take (B,H,L,D) inputs of any float dtype on any device; anything else runs mc.py's references
  return x.ndim == 4 and x.is_floating_point()

@functools.cache
def supported(dt:str) -> bool:
  # the renderer's list, then a kernel that stores the type: a compiler may still lack it (clang < 17: no x86 __bf16)
  if dt == "float32": return True
  if getattr(dtypes, dt) not in Device[Device.DEFAULT].renderer.supported_dtypes(): return False
  null, err = os.open(os.devnull, os.O_WRONLY), os.dup(2)
  os.dup2(null, 2)   # where the probe fails, the compiler's complaint is expected: keep it off the table
  try: return (Tensor([1.5, 2.5]).cast(dt).contiguous().realize() * 2).float().tolist() == [3.0, 5.0]
  except Exception: return False
  finally: os.dup2(err, 2); os.close(err); os.close(null)  # noqa: E702

_CONSTS: dict = {}
def const(x:np.ndarray, device) -> Tensor:
  """A static table (entry indices, masks, pooling weights) as a realized device buffer, made once per content and device: a Tensor
  made from a numpy array inside a jitted step is copied from the host at every replay of the step."""
  key = (x.tobytes(), x.shape, x.dtype.str, device)
  if key not in _CONSTS: _CONSTS[key] = Tensor(np.ascontiguousarray(x), device=device).realize()
  return _CONSTS[key]

# **** chunk_scan ****
# The chunkwise-parallel scan of the linear cores la and swla (Eqs. 12, 28-29), forward and backward, as UOp kernels.
# A row n = (batch, head) of Lp = Nc*T tokens is cut into chunks of T tokens; G = log a summed from the chunk start (inclusive).
# swla is gated linear attention with two sources per token, l_t v_t k_t^T and b_t v_{t-1} k_{t-1}^T, both decaying from t:
#   M_t = exp(G_t) Mp_c + sum_{j<=t in chunk c} exp(G_t - G_j) (l_j v_j k_j^T + b_j v_{j-1} k_{j-1}^T),   o_t = M_t q_t
# where Mp_c is the state chunk c starts from; la is G = 0, l = 1 and no b source (no exps at all).
# forward:  U (each chunk's own state) -> scan over the chunks (Mp, and S: the state after each segment) -> A (decayed causal
#           scores, per source) -> o.   backward: dMp -> reverse scan (H = dL/dM at chunk ends) -> A2 (dO.v scores) -> dq, dv, dk.
# The matmul-shaped kernels are tiled by hand (tinygrad's heuristics reached 7 TFLOP/s on them, these 19-20 on the H100): a
# block per chunk, a thread per 4x8 outputs with its lanes along the output's contiguous axis, reductions unrolled by 4, and
# every operand read either along the lanes (coalesced) or alike by all lanes (broadcast); that is why k, v, Mp and H get
# transposed copies. The scans run a thread per state entry and a loop over the chunks. All gradients come from the o kernel's
# grad_fxn; the gate gradients use the decay identity dL/dG_t = q_t.dq_t + <dS,S>[t ends a segment] - l_t dl_t - b_t db_t.

class _Scan(NamedTuple):
  N: int; Nc: int; T: int; D: int; H: int     # rows (B*H), chunks, chunk, head dim, heads  # noqa: E702
  step: int; nS: int; nsrc: int; gated: bool  # chunks per segment, segments in Lp, sources per token (2: swla), gates  # noqa: E702
  indep: bool                                 # restart at each segment
  lanes: AxisType; regs: tuple                # the tile's thread axes and outputs per thread along (cols, rows): _grid  # noqa: E702
  @property
  def ngates(self) -> int: return (2 + (self.nsrc == 2)) if self.gated else 0
  @property
  def period(self) -> int: return self.step * self.T if self.indep else self.Nc * self.T   # no b source at a multiple of this

# outputs per thread along a tile's (cols, rows) where there are locals: 128 threads for T = D = 64 (the best of 4x4, 8x4, 4x8,
# 8x8 on the H100); without locals (CPU) plain loops, which compile several times faster
_REGS, _REGS_NOLOCAL = (4, 8), (1, 1)

class _Grid(NamedTuple):
  lanes: AxisType; regs: tuple   # a tile's thread axes (LOCAL, or plain loops without locals) and outputs per thread  # noqa: E702

def _renderer(dev): return Device[dev if isinstance(dev, str) else dev[0]].renderer   # a device's (a sharded tensor's first)

def _grid(dev) -> _Grid:
  local = _renderer(dev).has_local
  return _Grid(AxisType.LOCAL if local else AxisType.WEAK, _REGS if local else _REGS_NOLOCAL)

def _split(size:int, rid:int, kind:AxisType, u:int=4) -> tuple[UOp, tuple[UOp, ...]]:
  # an axis as outer*u + inner: outer over threads or a loop, inner u registers (UPCAST) or an unrolled reduce step (UNROLL)
  u = math.gcd(size, u)
  outer, inner = UOp.range(size // u, rid, kind), UOp.range(u, rid + 20, AxisType.UNROLL if kind is AxisType.REDUCE else AxisType.UPCAST)
  return outer * u + inner, (outer, inner)

def _tile(cfg:_Scan, cols:int, rows:int) -> tuple[UOp, UOp, tuple[UOp, ...]]:
  # one block's outputs: lanes along cols (threadIdx.x: the lower range id), threadIdx.y along rows, cfg.regs of them per thread
  (col, cr), (row, rr) = _split(cols, 10, cfg.lanes, cfg.regs[0]), _split(rows, 11, cfg.lanes, cfg.regs[1])
  return col, row, cr + rr

def _row(x:UOp, n:UOp, t:UOp, d:UOp|None=None) -> UOp:
  # x[n, t(, d)] as float32; the token before t = 0 (the b source's predecessor) reads 0
  t = t.valid(t >= 0)
  return (x[n, t] if d is None else x[n, t, d]).cast(dtypes.float)

def _col(xT:UOp, n:UOp, d:UOp, t:UOp) -> UOp: return xT[n, d, t.valid(t >= 0)].cast(dtypes.float)   # the same from a (N, D, Lp) copy

def _beta(g:tuple, s:int, n:UOp, t:UOp, cfg:_Scan) -> UOp|float:
  # the weight of source s at token t: l_t, or b_t where no row (or, independent, no segment) starts at t
  if not cfg.gated: return 1.0
  return g[1][n, t] if s == 0 else (t % cfg.period).ne(0).where(g[2][n, t], 0.0)

def _to_end(G:UOp, n:UOp, c:UOp, t:UOp, T:int) -> UOp: return (G[n, c * T + T - 1] - G[n, t]).exp()   # decay from t to the chunk end

def _sink(st:UOp, name:str) -> UOp: return st.sink(arg=KernelInfo(name=name, opts_to_apply=()))   # scheduled by hand: no optimizer

@functools.cache
def _transpose_fxn(cfg:_Scan, states:bool):
  # keys (N, Lp, D) -> (N, D, Lp), so that the score kernels read them along their lanes; states (N, Nc, D, D) -> each one
  # transposed (Mp^T for o, H^T for dv). A pass of its own: transposed stores from inside the scans were 6x slower on the H100
  def fxn(xT:UOp, x:UOp) -> UOp:
    n, c = UOp.range(cfg.N, 0), UOp.range(cfg.Nc, 1)
    i, d, thread = _tile(cfg, cfg.D if states else cfg.T, cfg.D)
    st = xT[n, c, d, i].store(x[n, c, i, d]) if states else xT[n, d, c * cfg.T + i].store(x[n, c * cfg.T + i, d])
    return _sink(st.end(n, c, *thread), "chunk_transpose")
  return fxn

@functools.cache
def _state_fxn(cfg:_Scan, grad:bool):
  # U[n,c] = sum_i exp(G_end - G_i) (l_i v_i k_i^T + b_i v_{i-1} k_{i-1}^T): a chunk's own state (Eq. 28 summed over the chunk);
  # grad: dL/dMp_c = sum_i exp(G_i) dO_i q_i^T
  def fxn(U:UOp, x:UOp, y:UOp, *g:UOp) -> UOp:
    n, c = UOp.range(cfg.N, 0), UOp.range(cfg.Nc, 1)
    d, e, thread = _tile(cfg, cfg.D, cfg.D)
    i, red = _split(cfg.T, 4, AxisType.REDUCE)
    t = c * cfg.T + i
    acc = _row(x, n, t, e) * _row(y, n, t, d)
    if not grad: acc = acc * _beta(g, 0, n, t, cfg)
    if not grad and cfg.nsrc == 2: acc = acc + _beta(g, 1, n, t, cfg) * _row(x, n, t - 1, e) * _row(y, n, t - 1, d)
    if cfg.gated: acc = acc * (g[0][n, t].exp() if grad else _to_end(g[0], n, c, t, cfg.T))
    return _sink(U[n, c, e, d].store(acc.reduce(*red, arg=Ops.ADD)).end(n, c, *thread), "chunk_dstate" if grad else "chunk_state")
  return fxn

def _entries(cfg:_Scan) -> tuple[UOp, UOp, UOp, tuple]:
  # the scans' threads: one per state entry (e, d) of row n, in blocks of up to 128 entries of one row
  blk = math.gcd(cfg.D ** 2, 128)
  n, eo, ei = UOp.range(cfg.N, 0), UOp.range(cfg.D ** 2 // blk, 1), UOp.range(blk, 3, cfg.lanes)
  return n, (eo * blk + ei) // cfg.D, (eo * blk + ei) % cfg.D, (n, eo, ei)

@functools.cache
def _scan_fxn(cfg:_Scan, has_m0:bool):
  # M_c = exp(G_end,c) M_{c-1} + U_c over the chunks: Mp[c] = the state chunk c starts from (M0 at a restart), S = the state
  # after each segment
  def fxn(Mp:UOp, S:UOp, U:UOp, *rest:UOp) -> UOp:
    (n, e, d, thread), c = _entries(cfg), UOp.range(cfg.Nc, 2, AxisType.LOOP)
    m0 = rest[-1][n % cfg.H, e, d] if has_m0 else UOp.const(0.0, dtypes.float)
    acc = UOp.placeholder((1,), dtypes.float, 0, addrspace=AddrSpace.REG)
    acc = acc.after(*thread)[0].set(m0)
    cur = (c % cfg.step).eq(0).where(m0, acc.after(c)[0]) if cfg.indep else acc.after(c)[0]
    new = (cur * rest[0][n, c * cfg.T + cfg.T - 1].exp() if cfg.gated else cur) + U[n, c, e, d]
    si = ((c + 1) // cfg.step - 1).valid(((c + 1) % cfg.step).eq(0) & (c < cfg.nS * cfg.step))
    loop = UOp.group(Mp[n, c, e, d].store(cur), S[n, si, e, d].store(new), acc[0].store(new)).end(c)
    return _sink(loop.end(*thread), "chunk_scan")
  return fxn

@functools.cache
def _rscan_fxn(cfg:_Scan, has_dS:bool):
  # the adjoint of the scan, backwards over the chunks: Hc[c] = dL/dM_c, the state after chunk c; dM0[n, r] = what
  # reaches M0 at restart r (the row start, or each segment start when independent)
  def fxn(Hc:UOp, dM0:UOp, dMp:UOp, *rest:UOp) -> UOp:
    (n, e, d, thread), cc = _entries(cfg), UOp.range(cfg.Nc, 2, AxisType.LOOP)
    c = cfg.Nc - 1 - cc
    acc = UOp.placeholder((1,), dtypes.float, 0, addrspace=AddrSpace.REG)
    acc = acc.after(*thread)[0].set(0.0)
    seg_end = ((c + 1) % cfg.step).eq(0)
    h = seg_end.where(0.0, acc.after(cc)[0]) if cfg.indep else acc.after(cc)[0]
    if has_dS: h = h + rest[-1][n, ((c + 1) // cfg.step - 1).valid(seg_end & (c < cfg.nS * cfg.step)), e, d]
    g = dMp[n, c, e, d] + (h * rest[0][n, c * cfg.T + cfg.T - 1].exp() if cfg.gated else h)
    ri = (c // cfg.step).valid((c % cfg.step).eq(0)) if cfg.indep else (c * 0).valid(c.eq(0))
    loop = UOp.group(Hc[n, c, e, d].store(h), dM0[n, ri, e, d].store(g), acc[0].store(g)).end(cc)
    return _sink(loop.end(*thread), "chunk_scan_bwd")
  return fxn

@functools.cache
def _scores_fxn(cfg:_Scan):
  # A[n,c,s,i,j] = [j<=i] exp(G_i - G_j) a_i.b_{j-s}: the causal decayed scores of source s in one chunk (Eq. 28 read by q_i);
  # b comes transposed (N, D, Lp) so that the lanes (along j) read it coalesced
  def fxn(A:UOp, a:UOp, bT:UOp, *g:UOp) -> UOp:
    n, c, s = UOp.range(cfg.N, 0), UOp.range(cfg.Nc, 1), UOp.range(cfg.nsrc, 2)
    j, i, thread = _tile(cfg, cfg.T, cfg.T)
    d, red = _split(cfg.D, 4, AxisType.REDUCE)
    ti, tj = c * cfg.T + i, c * cfg.T + j
    acc = (_row(a, n, ti, d) * _col(bT, n, d, tj - s)).reduce(*red, arg=Ops.ADD)
    if cfg.gated: acc = acc * (g[0][n, ti] - g[0][n, tj]).exp()
    return _sink(A[n, c, s, i, j].store((j <= i).where(acc, 0.0)).end(n, c, s, *thread), "chunk_scores")
  return fxn

@functools.cache
def _mix_fxn(cfg:_Scan, key_side:bool, name:str):
  # query side (o, dq): out_t = sum_s sum_j A[s,t,j] beta_s,j x_{j-s} + exp(G_t) Mat^T y_t                  (Eq. 28, read out)
  # key side (dv, dk):  out[s]_t = sum_i A[s,i,t] x_i + exp(G_end - G_t) Mat^T y_{t-s}, one output per source (its adjoint)
  # Mat (D, D) is read as Mat[reduced, output] by the lanes: Mp^T for o, Mp for dq, H^T for dv, H for dk. Extra srcs after the
  # gates ride along for the o kernel's grad_fxn; the last of them holds a 0 that each thread multiplies one element of every
  # other by, so that the kernel's signature names them all (a CUDA graph refuses a launch with unused trailing arguments).
  def fxn(out:UOp, A:UOp, x:UOp, Mat:UOp, y:UOp, *g:UOp) -> UOp:
    n, c = UOp.range(cfg.N, 0), UOp.range(cfg.Nc, 1)
    s = UOp.range(cfg.nsrc, 2) if key_side else UOp.const(0, dtypes.weakint)
    e, r, thread = _tile(cfg, cfg.D, cfg.T)
    (j, jred), (dd, dred), t = _split(cfg.T, 4, AxisType.REDUCE), _split(cfg.D, 5, AxisType.REDUCE), c * cfg.T + r
    if key_side: acc = A[n, c, s, j, r] * _row(x, n, c * cfg.T + j, e)
    else: acc = sum(A[n, c, k, r, j] * _beta(g, k, n, c * cfg.T + j, cfg) * _row(x, n, c * cfg.T + j - k, e) for k in range(cfg.nsrc))
    st = (Mat[n, c, dd, e] * _row(y, n, t - s, dd)).reduce(*dred, arg=Ops.ADD)
    if cfg.gated: st = st * (_to_end(g[0], n, c, t, cfg.T) if key_side else g[0][n, t].exp())
    val = acc.reduce(*jred, arg=Ops.ADD) + st
    if len(g) > cfg.ngates: val = val + g[-1][0] * sum(x[(0,) * len(x.shape)].cast(dtypes.float) for x in g[cfg.ngates:-1])
    val = val.cast(out.dtype)
    return _sink((out[n, s, t, e] if key_side else out[n, t, e]).store(val).end(n, c, *([s] if key_side else []), *thread), name)
  return fxn

def _run(fxn, outs:list[Tensor], ins:list[Tensor], grad_fxn=None) -> list[Tensor]:
  # the inner kernels stop autograd (their gradients are all computed by the o kernel's grad_fxn)
  stop = lambda *a, call=None: (None,) * (len((call if call is not None else a[-1]).src) - 1)
  return Tensor.custom_kernel(*outs, *ins, fxn=fxn, grad_fxn=grad_fxn or stop)[:len(outs)]

def chunk_scan(q:Tensor, k:Tensor, v:Tensor, la:Tensor|None, b:Tensor|None, l:Tensor|None, M0:Tensor|None,
               chunk:int, segment:int, independent:bool) -> tuple[Tensor, Tensor]:
  """mc.linear_scan as fused kernels (same signature and results): o (B,H,L,D) in q's dtype, S (B,H,L//segment,D,D) float32."""
  B, H, L, D = q.shape
  if segment % chunk: raise ValueError(f"chunk_scan: segment={segment} must be a multiple of chunk={chunk}")
  if la is None and (b is not None or l is not None): raise ValueError("chunk_scan: the gates b and l need la (log a)")
  T, dev, Nc = chunk, q.device, -(-L // chunk)
  cfg = _Scan(B * H, Nc, T, D, H, segment // T, Nc // (segment // T), 1 + (b is not None), la is not None, independent, *_grid(dev))
  # rows (B*H, Lp, ...); zero tokens pad the last chunk: causal, they never reach an earlier output (and la = 0 keeps the state)
  rows = lambda x: x.pad(tuple((0, Nc * T - L) if i == 2 else None for i in range(x.ndim))).reshape(cfg.N, Nc * T, *x.shape[3:])
  q, k, v = rows(q), rows(k), rows(v)
  g = ()
  if cfg.gated: g = (rows(la.float()).reshape(cfg.N, Nc, T).cumsum(-1).reshape(cfg.N, Nc * T), rows(l.float() if l is not None else la.ones_like()))
  if cfg.nsrc == 2: g = g + (rows(b.float()),)
  m0 = [M0.float()] if M0 is not None else []
  empty = lambda *s: Tensor.empty(*s, device=dev)
  U = _run(_state_fxn(cfg, False), [empty(cfg.N, Nc, D, D)], [v, k, *g])[0]
  Mp, S = _run(_scan_fxn(cfg, M0 is not None), [empty(cfg.N, Nc, D, D), empty(cfg.N, max(cfg.nS, 1), D, D)], [U, *g[:1], *m0])
  MpT = _run(_transpose_fxn(cfg, True), [empty(cfg.N, Nc, D, D)], [Mp])[0]
  kT = _run(_transpose_fxn(cfg, False), [Tensor.empty(cfg.N, D, Nc * T, dtype=k.dtype, device=dev)], [k])[0]
  A = _run(_scores_fxn(cfg), [empty(cfg.N, Nc, cfg.nsrc, T, T)], [q, kT, *g[:1]])[0]
  zero = Tensor.zeros(1, device=dev).contiguous()
  outs = Tensor.custom_kernel(Tensor.empty(cfg.N, Nc * T, D, dtype=q.dtype, device=dev), A, v, MpT, q, *g, k, S, Mp, *m0, zero,
                              fxn=_mix_fxn(cfg, False, "chunk_scan_o"), grad_fxn=functools.partial(_chunk_scan_bwd, cfg=cfg))
  o, S = outs[0], outs[6 + cfg.ngates]
  return o.reshape(B, H, Nc * T, D)[:, :, :L], S.reshape(B, H, -1, D, D)[:, :, :L // segment]

def _chunk_scan_bwd(*args, cfg:_Scan, call=None) -> tuple:
  # the grad_fxn of the o kernel: gradients for every input of chunk_scan, from dO and (when S is used) dS
  grads, call = (args[:-1], args[-1]) if call is None else (args, call)
  _, A, v, _, q, *rest = [Tensor(u) for u in call.src[1:]]
  g, (k, S, Mp), m0 = tuple(rest[:cfg.ngates]), rest[cfg.ngates:cfg.ngates + 3], rest[cfg.ngates + 3:-1]
  N, Nc, T, D, Lp = cfg.N, cfg.Nc, cfg.T, cfg.D, cfg.Nc * cfg.T
  # which of o (3 axes) and S (4 axes) got a gradient; contiguous: a gradient can arrive as an unrealized constant
  dO = next((Tensor(x).contiguous() for x in grads if len(x.shape) == 3), None)
  dS = next((Tensor(x).contiguous() for x in grads if len(x.shape) == 4), None)
  if dO is None: dO = Tensor.zeros(N, Lp, D, device=q.device).contiguous()
  empty = lambda *s, dtype=dtypes.float: Tensor.empty(*s, dtype=dtype, device=q.device)
  dMp = _run(_state_fxn(cfg, True), [empty(N, Nc, D, D)], [dO, q, *g[:1]])[0]
  nR = -(-Nc // cfg.step) if cfg.indep else 1
  Hc, dM0 = _run(_rscan_fxn(cfg, dS is not None), [empty(N, Nc, D, D), empty(N, nR, D, D)], [dMp, *g[:1], *([dS] if dS is not None else [])])
  HT = _run(_transpose_fxn(cfg, True), [empty(N, Nc, D, D)], [Hc])[0]
  vT = _run(_transpose_fxn(cfg, False), [empty(N, D, Lp, dtype=v.dtype)], [v])[0]
  A2 = _run(_scores_fxn(cfg), [empty(N, Nc, cfg.nsrc, T, T)], [dO, vT, *g[:1]])[0]
  # gated: the gate gradients below need dq, dv, dk in float32; la writes them in the inputs' dtype
  gdt = dtypes.float if cfg.gated else q.dtype
  dq = _run(_mix_fxn(cfg, False, "chunk_scan_dq"), [empty(N, Lp, D, dtype=gdt)], [A2, k, Mp, dO, *g])[0]
  X = _run(_mix_fxn(cfg, True, "chunk_scan_dv"), [empty(N, cfg.nsrc, Lp, D, dtype=gdt)], [A, dO, HT, k, *g[:1]])[0]
  Y = _run(_mix_fxn(cfg, True, "chunk_scan_dk"), [empty(N, cfg.nsrc, Lp, D, dtype=gdt)], [A2, q, Hc, v, *g[:1]])[0]
  dg = [None] * cfg.ngates
  if not cfg.gated: dv, dk = X[:, 0], Y[:, 0]
  else:
    # X[:, s] = dL/d(source value) and Y[:, s] = dL/d(source key) before the source weight: dl, db and the decay identity
    l, on = g[1], (Tensor.arange(Lp) % cfg.period != 0).float()
    dl = (v.float() * X[:, 0]).sum(-1)
    dv, dk, dG = l.unsqueeze(-1) * X[:, 0], l.unsqueeze(-1) * Y[:, 0], (q.float() * dq).sum(-1) - l * dl
    if cfg.nsrc == 2:
      bm, nxt = g[2] * on, lambda x: x.pad((None, (0, 1), None))[:, 1:]        # nxt: the b source at t+1 reads token t
      db = (v.float().pad((None, (1, 0), None))[:, :Lp] * X[:, 1]).sum(-1) * on
      dv, dk, dG = dv + nxt(bm.unsqueeze(-1) * X[:, 1]), dk + nxt(bm.unsqueeze(-1) * Y[:, 1]), dG - bm * db
      dg[2] = db
    dG = dG.reshape(N, Nc, T)
    if dS is not None and cfg.nS:
      # a segment's state is an output read at its last token, like o (contiguous: else every token's dG recomputes <dS,S>),
      # summed in two steps: a thread per row of each state first (one thread per state walked its D*D entries)
      seg = (dS * S).sum(-1).contiguous().sum(-1).contiguous().reshape(N, cfg.nS, 1)
      seg = seg.pad((None, None, (cfg.step - 1, 0))).reshape(N, cfg.nS * cfg.step)
      dG = dG + seg.pad((None, (0, Nc - cfg.nS * cfg.step))).reshape(N, Nc, 1).pad((None, None, (T - 1, 0)))
    # G is summed from its chunk start, so its last entry also carries the decay seen by every later chunk (of the segment)
    cs = dG.sum(-1)
    if cfg.indep: cs = cs.pad((None, (0, -Nc % cfg.step))).reshape(N, -1, cfg.step)
    later = (cs.flip(-1).cumsum(-1).flip(-1) - cs).reshape(N, -1)[:, :Nc]
    dg[0], dg[1] = (dG + later.reshape(N, Nc, 1).pad((None, None, (T - 1, 0)))).reshape(N, Lp), dl
  dm0 = [dM0.reshape(-1, cfg.H, dM0.shape[1], D, D).sum((0, 2))] if m0 else []
  ret = [None, None, dv, None, dq, *dg, dk, None, None, *dm0, None]
  return tuple(None if x is None else x.cast(s.dtype).uop for x, s in zip(ret, call.src[1:]))

# **** cache_read ****
# y_t = g_t^on o_t + sum_i g_t^(i) M^(i) q_t over the entries token t reads (Eqs. 7, 9-10, 16-17), forward and backward.
# A slot r of token t names an entry it reads: a static table per segment (grm, residual, mean: all tokens of a segment read
# the same entries) or, for ssc, the top-k entries _select_fxn picks per token. The four matmul-shaped kernels are tiled by
# hand as chunk_scan's are (_tile: lanes along a contiguous axis, 4x8 outputs per thread where there are locals):
#   read   y_t = w_on o_t + sum_r w_tr M_e q_t    dq_t = sum_r w_tr M_e^T dy_t    dw_tr = dy_t . M_e q_t    (all over (r, D))
#   dM     static: per entry, over the (segment, slot) pairs that read it; ssc: over its selected (token, slot) pairs, sorted
# The read takes M^T (the lanes, along the output, then load it coalesced); dw puts its lanes along the tokens so that they all
# load the same state; ssc's selection and sorting kernels keep tinygrad's own scheduling. On the H100 (B=4 H=16 L=8192, 31
# entries, grm) this took the fwd+bwd from 92 ms with tinygrad's own scheduling to 19 ms: 13-26 TFLOP/s in each kernel.
# residual and mean read one summed state per segment; const grm runs in groups of segments (half the token x entry square).
# The weights are cheap glue (B,H,L,slots) and autograd carries dw, dw_on back to z, z_on; nothing (B,H,L,N,D) is ever built.

def _tokens(B:int, H:int, L:int, C:int):
  # output ranges (b, h, segment, token in segment); t is clamped for the loads and ok gates the stores (L % C may be nonzero)
  b, h, s, c = UOp.range(B, 0), UOp.range(H, 1), UOp.range(-(-L // C), 2), UOp.range(C, 3)
  t = s * C + c
  return b, h, s, c, (t < L).where(t, L - 1), t < L

def _red(n:int, axis:int) -> UOp:
  # a reduce range; one of size 1 is the constant 0 (tinygrad folds size-1 ranges, and a REDUCE over none is its source)
  return UOp.range(n, axis, AxisType.REDUCE) if n > 1 else UOp.const(0, dtypes.weakint)

def _reduce(x:UOp, *rngs:UOp, op=Ops.ADD) -> UOp:
  return x.reduce(*rr, arg=op) if (rr := [r for r in rngs if r.op is Ops.RANGE]) else x

def _gated(buf:UOp, shape:tuple, idx:tuple, ok:UOp) -> UOp:
  # buf, a flat kernel input, at idx of shape where ok (a load reads 0 elsewhere, a store writes nothing). Flat: indexing a shaped
  # buffer, tinygrad 0.14 drops a gate that it has simplified to a bound on a range the index no longer uses (t < L pinning s = 0)
  lin = UOp.const(0, dtypes.weakint)
  for i, n in zip(idx, shape): lin = lin * n + i
  return buf[lin.valid(ok)]

def _store(buf:UOp, idx:tuple, val:UOp, ok:UOp) -> UOp: return _gated(buf.flatten(), buf.shape, idx, ok).store(val)   # where ok

def _entry(ent:UOp, N:int, b:UOp, h:UOp, s:UOp, t:UOp, r:UOp) -> UOp:
  # the entry slot r of token t reads: a static table per segment (n_seg, K) or a per-token one (B, H, L, K); clipped so that
  # the index arithmetic knows its bounds
  return (ent[s, r] if len(ent.shape) == 2 else ent[b, h, t, r]).clip(0, N - 1).cast(dtypes.weakint)

@functools.cache
def _read_fxn(L:int, C:int, with_o:bool, g:_Grid, name:str):
  # y_t = w_on_t o_t + sum_r w_tr Mat_e(t,r)^T x_t with Mat read as [entry, reduced, output], so that the lanes (along the output)
  # load it coalesced: Mat = M^T for the read y_t = sum_r w_tr M_e q_t (Eqs. 7, 10, 17), Mat = M for dq_t = sum_r w_tr M_e^T dy_t.
  # Tiled by hand like chunk_scan's kernels: a block per (row, segment, RT tokens), a thread per g.regs outputs
  def fxn(y:UOp, x:UOp, Mat:UOp, w:UOp, ent:UOp, *on:UOp) -> UOp:
    B, H, _, D = x.shape
    RT = math.gcd(C, 64)
    b, h, s, rt = UOp.range(B, 0), UOp.range(H, 1), UOp.range(-(-L // C), 2), UOp.range(C // RT, 3)
    d, row, thread = _tile(g, D, RT)
    t = s * C + rt * RT + row
    ok, t = t < L, (t < L).where(t, L - 1)
    r, (j, jred) = _red(w.shape[-1], 5), _split(D, 6, AxisType.REDUCE)
    mx = _reduce(x[b, h, t, j] * Mat[b, h, _entry(ent, Mat.shape[2], b, h, s, t, r), j, d], *jred)   # (Mat_e^T x_t)[d]
    acc = _reduce(w[b, h, t, r] * mx, r)
    if with_o: acc = acc + on[0][b, h, t] * on[1][b, h, t, d]
    return _store(y, (b, h, t, d), acc, ok).end(b, h, s, rt, *thread).sink(arg=KernelInfo(name=name, opts_to_apply=()))
  return fxn

@functools.cache
def _score_fxn(L:int, C:int, g:_Grid):
  # a_tr = dy_t . M_e(t,r) q_t, the gradient of the slot weight w_tr: one D x D bilinear form per (token, slot). Tiled with the
  # lanes along the tokens and the slots along the rows, so that the lanes of a block load the same M_e (a broadcast; lanes along
  # the slots would each load another entry). q and dy are read in their own (B,H,L,D) layout: a lane walks its token's row, which
  # the L1 cache holds after its first load (transposed copies, which made every load coalesced, cost tinygrad two transposing
  # passes over 33 MB each a layer at the gpu shape). Stored transposed, aT (B,H,Kp,L); the Kp - K spare slots read the last one
  # and are sliced off
  def fxn(aT:UOp, dy:UOp, M:UOp, q:UOp, ent:UOp) -> UOp:
    B, H, _, D = q.shape
    Kp, RT = aT.shape[2], math.gcd(C, 128)
    b, h, s, rt = UOp.range(B, 0), UOp.range(H, 1), UOp.range(-(-L // C), 2), UOp.range(C // RT, 3)
    col, r, thread = _tile(g, RT, Kp)
    t = s * C + rt * RT + col
    ok, t = t < L, (t < L).where(t, L - 1)
    d, (j, jred) = _red(D, 5), _split(D, 6, AxisType.REDUCE)
    rr = r.minimum(ent.shape[-1] - 1) if Kp > ent.shape[-1] else r
    mq = _reduce(q[b, h, t, j] * M[b, h, _entry(ent, M.shape[2], b, h, s, t, rr), d, j], *jred)   # (M_e q_t)[d]
    acc = _reduce(dy[b, h, t, d] * mq, d)
    return _store(aT, (b, h, r, t), acc, ok).end(b, h, s, rt, *thread).sink(arg=KernelInfo(name="cache_read_dw", opts_to_apply=()))
  return fxn

@functools.cache
def _dm_fxn(L:int, C:int, g:_Grid):
  # dM_e = sum over the (segment, slot) pairs that read e of sum_{t in segment} w_tr dy_t q_t^T; inv (3, N, R) lists them as
  # (segment, slot, is a pair): padding points at segment 0 with weight 0, so the token index stays plain arithmetic.
  # A block per (row, entry, part): part u sums pairs u*P .. u*P+P-1 into its own partial dM, which the caller adds up (up to
  # 4x the blocks of one per entry, for the launches that have few entries), its D x D outputs tiled as chunk_scan's chunk states
  def fxn(dMp:UOp, dy:UOp, q:UOp, w:UOp, inv:UOp) -> UOp:
    B, H, N, U, D, _ = dMp.shape
    ns, K, P = -(-L // C), w.shape[-1], inv.shape[-1] // U
    b, h, e, u = UOp.range(B, 0), UOp.range(H, 1), UOp.range(N, 2), UOp.range(U, 3)
    j, d, thread = _tile(g, D, D)
    p, (c, cred) = _red(P, 5), _split(C, 6, AxisType.REDUCE)
    pp = u * P + p if P > 1 else u
    t = inv[0, e, pp].clip(0, ns - 1).cast(dtypes.weakint) * C + c
    ok = inv[2, e, pp].ne(0) & (t < L) if ns * C > L else inv[2, e, pp].ne(0)
    if ns * C > L: t = t.clip(0, L - 1)
    wt = ok.where(w[b, h, t, inv[1, e, pp].clip(0, K - 1).cast(dtypes.weakint)], 0.0)
    acc = _reduce(wt * dy[b, h, t, d] * q[b, h, t, j], p, *cred)
    return dMp[b, h, e, u, d, j].store(acc).end(b, h, e, u, *thread).sink(arg=KernelInfo(name="cache_read_dM", opts_to_apply=()))
  return fxn

# ssc's dM without a dense (token, entry) sweep: the (token, slot) pairs are counting-sorted by entry into chunks of P pairs
# that each belong to one entry, every chunk is one (D x P) @ (P x D) product, and an entry sums its chunks. Work ~ L*topk.
_P = 256

@functools.cache
def _rank_fxn(L:int, C:int):
  # pos of pair (t, k) in the sorted list: its entry's first chunk * P + pairs of that entry in earlier segments (segoff) +
  # pairs of that entry earlier in this segment (a REDUCE over the segment's C * K pairs)
  def fxn(pos:UOp, idx:UOp, w:UOp, segoff:UOp, base:UOp) -> UOp:
    B, H, _, K = idx.shape
    N = base.shape[-1]
    b, h, s, c, t, ok = _tokens(B, H, L, C)
    k, c2, k2 = UOp.range(K, 4), _red(C, 5), _red(K, 6)
    t2 = (s * C + c2).clip(0, L - 1)
    e = idx[b, h, t, k].clip(0, N - 1)
    same = (c2 < c) & (s * C + c2 < L) & idx[b, h, t2, k2].eq(e) & w[b, h, t2, k2].ne(0)
    before = _reduce(same.where(1, 0).cast(dtypes.int32), c2, k2)
    e = e.cast(dtypes.weakint)
    return _store(pos, (b, h, t, k), base[b, h, e] + segoff[b, h, s, e] + before, ok).end(b, h, s, c, k).sink(arg=KernelInfo(name="ssc_rank"))
  return fxn

@functools.cache
def _scatter_fxn(L:int, C:int):
  # the sorted list: token and weight of every selected pair at its pos (slots no pair fills are masked by the chunk kernel)
  def fxn(tok:UOp, wl:UOp, pos:UOp, w:UOp) -> UOp:
    B, H, _, K = pos.shape
    b, h, s, c, t, ok = _tokens(B, H, L, C)
    k = UOp.range(K, 4)
    at, live = (b, h, pos[b, h, t, k].clip(0, tok.shape[-1] - 1).cast(dtypes.weakint)), ok & w[b, h, t, k].ne(0)
    return UOp.group(_store(tok, at, t.cast(dtypes.int32), live), _store(wl, at, w[b, h, t, k], live)).end(b, h, s, c, k).sink(
      arg=KernelInfo(name="ssc_scatter"))
  return fxn

@functools.cache
def _chunk_fxn(L:int):
  # G_c = sum_{i < n_c} w_i dy_{t_i} q_{t_i}^T over the n_c filled slots of chunk c (all of one entry)
  def fxn(G:UOp, tok:UOp, wl:UOp, n:UOp, dy:UOp, q:UOp) -> UOp:
    B, H, NC, D, _ = G.shape
    b, h, c, d, j, i = UOp.range(B, 0), UOp.range(H, 1), UOp.range(NC, 2), UOp.range(D, 3), UOp.range(D, 4), _red(_P, 5)
    tt = tok[b, h, c * _P + i].clip(0, L - 1).cast(dtypes.weakint)
    wt = (i < n[b, h, c]).where(wl[b, h, c * _P + i], 0.0)
    acc = _reduce(wt * dy[b, h, tt, d] * q[b, h, tt, j], i)
    return G[b, h, c, d, j].store(acc).end(b, h, c, d, j).sink(arg=KernelInfo(name="ssc_chunks"))
  return fxn

@functools.cache
def _entry_sum_fxn(L:int):
  # dM_e = the sum of entry e's chunks, first[e] .. first[e] + count[e] - 1 (at most ceil(L / P): a token picks e once)
  def fxn(dM:UOp, G:UOp, first:UOp, count:UOp) -> UOp:
    B, H, N, D, _ = dM.shape
    b, h, e, d, j, m = UOp.range(B, 0), UOp.range(H, 1), UOp.range(N, 2), UOp.range(D, 3), UOp.range(D, 4), _red(-(-L // _P), 5)
    cc = (first[b, h, e] + m).clip(0, G.shape[2] - 1).cast(dtypes.weakint)
    acc = _reduce((m < count[b, h, e]).where(G[b, h, cc, d, j], 0.0), m)
    return dM[b, h, e, d, j].store(acc).end(b, h, e, d, j).sink(arg=KernelInfo(name="ssc_dM"))
  return fxn

def _ssc_dm(gy:Tensor, q:Tensor, w:Tensor, idx:Tensor, N:int, C:int) -> Tensor:
  # counts of pairs per (segment, entry) give every pair its place; a pair of weight 0 (no entry to select) takes none
  B, H, L, K = w.shape
  ns, dev, i32 = -(-L // C), w.device, dtypes.int32
  hit = (idx.unsqueeze(-1) == const(np.arange(N, dtype=np.int32), dev)) & (w != 0).unsqueeze(-1)           # (B,H,L,K,N)
  per_seg = hit.pad((None, None, (0, ns * C - L), None, None)).reshape(B, H, ns, C * K, N).cast(i32).sum(3)        # (B,H,ns,N)
  cnt = per_seg.sum(2)
  nch = (cnt + _P - 1) // _P
  first = nch.cumsum(-1) - nch
  NC = -(-L * K // _P) + N
  c = const(np.arange(NC, dtype=np.int32), dev).reshape(1, 1, NC, 1)
  filled = ((cnt.unsqueeze(2) - (c - first.unsqueeze(2)) * _P).clip(0, _P) * (c >= first.unsqueeze(2))).sum(-1)  # (B,H,NC)
  segoff = per_seg.cumsum(2) - per_seg
  pos = Tensor.empty(B, H, L, K, dtype=i32, device=dev).custom_kernel(*_c(idx, w, segoff, first * _P), fxn=_rank_fxn(L, C))[0]
  tok, wl = Tensor.empty(B, H, NC * _P, dtype=i32, device=dev), Tensor.empty(B, H, NC * _P, device=dev)
  tok, wl = tok.custom_kernel(wl, *_c(pos, w), fxn=_scatter_fxn(L, C))[:2]
  G = Tensor.empty(B, H, NC, *q.shape[-1:] * 2, device=dev).custom_kernel(tok, wl, *_c(filled.cast(i32), gy, q), fxn=_chunk_fxn(L))[0]
  return Tensor.empty(B, H, N, *q.shape[-1:] * 2, device=dev).custom_kernel(G, *_c(first.cast(i32), nch.cast(i32)), fxn=_entry_sum_fxn(L))[0]

@functools.cache
def _select_fxn(L:int, C:int, K:int):
  # Eq. 16 in the kernel: per token the K readable entries with the largest logits, a tie to the larger (more recent) index.
  # K rounds of (max logit, then the largest index holding it) over the entries not yet taken; stores the index and its logit.
  # zt is z transposed (B,H,N,L): neighbouring threads hold neighbouring tokens, so every round's loads are coalesced
  def fxn(idx:UOp, zs:UOp, zt:UOp, rd:UOp) -> UOp:
    B, H, N, _ = zt.shape
    b, h, s, c, t, ok = _tokens(B, H, L, C)
    taken, stores = [], []
    for k in range(K):
      def avail(e:UOp) -> UOp:
        cond = rd[s, e].ne(0)
        for i in taken: cond = cond & e.cast(dtypes.int32).ne(i)
        return cond
      e1, e2 = _red(N, 4 + 2 * k), _red(N, 5 + 2 * k)
      m = _reduce(avail(e1).where(zt[b, h, e1, t], -math.inf), e1, op=Ops.MAX)
      i = _reduce((avail(e2) & zt[b, h, e2, t].eq(m)).where(e2.cast(dtypes.int32), -1), e2, op=Ops.MAX)
      taken.append(i)
      # a token with fewer than K readable entries gets logit -inf (weight 0) and index 0 in the spare slots
      stores += [_store(idx, (b, h, t, k), i.maximum(0), ok), _store(zs, (b, h, t, k), m, ok)]
    return UOp.group(*stores).end(b, h, s, c).sink(arg=KernelInfo(name=f"cache_select_top{K}"))
  return fxn

def _slots(reads:np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  # the entries each segment reads, in index order: tbl (n_seg, K) int32 and its validity (n_seg, K), K = the most any segment reads
  K = max(1, int(reads.sum(1).max()))
  tbl, ok = np.zeros((reads.shape[0], K), np.int32), np.zeros((reads.shape[0], K), bool)
  for s, row in enumerate(reads):
    ii = np.flatnonzero(row)
    tbl[s, :len(ii)], ok[s, :len(ii)] = ii, True
  return tbl, ok

def _inverse(tbl:np.ndarray, ok:np.ndarray, N:int, parts:int=4) -> tuple[np.ndarray, int]:
  # for each entry the (segment, slot) pairs that read it: (3, N, R) int32 of segment, slot and 1, padded with (0, 0, 0) to
  # U * P, and U: up to `parts` parts of P pairs each (_dm_fxn's blocks)
  pairs = [[(s, r, 1) for s, r in zip(*np.nonzero(ok)) if tbl[s, r] == e] for e in range(N)]
  R = max(1, max(map(len, pairs)))
  P = -(-R // parts)
  inv = np.zeros((3, N, -(-R // P) * P), np.int32)
  for e, p in enumerate(pairs):
    if p: inv[:, e, :len(p)] = np.array(p, np.int32).T
  return inv, -(-R // P)

def _groups(ns:int) -> list[tuple[int, int]]:
  # up to 8 groups of consecutive segments (one when there are few), the first with at least two so it reads an entry
  G = 1 if ns < 8 else min(8, ns // 4)
  edges = sorted({0, ns, *(int(round(ns * i / G)) for i in range(1, G))} - {1})
  return list(zip(edges[:-1], edges[1:]))

def _c(*xs:Tensor) -> list[Tensor]:
  # kernel inputs as plain buffers, never views; a reshape of a buffer or of a kernel's output is one already (a contiguous after it
  # would copy it: the qkv projection's 50 MB into the conv, once a layer at the gpu shape)
  def plain(u:UOp) -> bool:
    while u.op is Ops.RESHAPE: u = u.src[0]
    return u.op in (Ops.BUFFER, Ops.CONTIGUOUS) or (u.op is Ops.AFTER and plain(u.src[0]))   # (AFTER: a kernel's output buffer)
  return [x if plain(x.uop) else x.contiguous() for x in xs]

def _softmax(z_on:Tensor, zs:Tensor) -> tuple[Tensor, Tensor]:
  # one softmax over the online logit and the slots' logits (-inf for slots not read): Eq. 10 and Eq. 17's weights
  g = z_on.unsqueeze(-1).cat(zs, dim=-1).softmax(-1)
  return g[..., 0], g[..., 1:]

def _read(q:Tensor, o:Tensor, M:Tensor, w:Tensor, w_on:Tensor, ent:Tensor, C:int, dw:bool, slots:tuple|None=None) -> Tensor:
  # the fused read and its backward: dq, dM and dw by kernels, do and dw_on by cheap glue; autograd takes dw, dw_on on to the logits.
  # ent is the static table of `slots` (tbl, ok) or ssc's per-token selection
  L, dev = q.shape[2], q.device
  # a static table's dM covers the entries it names (a prefix for const); the rest of M gets zeros
  n_ent = M.shape[2] if slots is None else int(slots[0][slots[1]].max(initial=0)) + 1
  inv, parts = (None, 0) if slots is None else _inverse(*slots, n_ent)
  if inv is not None: inv = const(inv, dev)
  g = _grid(dev)
  def bwd(gy:UOp, call:UOp) -> tuple:
    # the forward kernel read M^T (MT): its gradient goes to MT, and autograd carries it through the transpose
    _, q, MT, w, ent, w_on, o = (Tensor(u) for u in call.src[1:])
    gy, M = Tensor(gy), MT.transpose(-1, -2)
    gq = Tensor.empty(*q.shape, device=dev).custom_kernel(*_c(gy, M, w, ent), fxn=_read_fxn(L, C, False, g, "cache_read_dq"))[0]
    gw = None
    if dw:
      # the slots padded to a multiple of the rows a thread holds (or of the power of two that covers them, when fewer)
      K = w.shape[3]
      Kp = -(-K // (u := min(g.regs[1], 1 << (K - 1).bit_length()))) * u
      aT = Tensor.empty(*w.shape[:2], Kp, L, device=dev).custom_kernel(*_c(gy, M, q, ent), fxn=_score_fxn(L, C, g))[0]
      gw = aT[:, :, :K].transpose(-1, -2)
    # dM: a static table sums over the (segment, slot) pairs of each entry, ssc over its sorted selected pairs
    if inv is not None:
      gM = Tensor.empty(*M.shape[:2], n_ent, parts, *M.shape[3:], device=dev).custom_kernel(*_c(gy, q, w, inv), fxn=_dm_fxn(L, C, g))[0]
      gM = gM.sum(3).pad((None, None, (0, M.shape[2] - n_ent), None, None))
    else: gM = _ssc_dm(gy, q, w, ent, M.shape[2], C)
    return (None, gq.uop, gM.transpose(-1, -2).uop, None if gw is None else gw.uop, None, (gy * o).sum(-1).uop, (w_on.unsqueeze(-1) * gy).uop)
  y = Tensor.empty(*o.shape, device=dev).custom_kernel(*_c(q, M.transpose(-1, -2), w, ent, w_on, o), fxn=_read_fxn(L, C, True, g, "cache_read"),
                                                       grad_fxn=bwd)[0]
  return y

def _per_token(x:np.ndarray, C:int, L:int) -> np.ndarray: return np.repeat(x, C, axis=0)[:L]   # per segment -> per token

def cache_read(q:Tensor, o:Tensor, M:Tensor, z:Tensor, z_on:Tensor, reads:np.ndarray, segment:int, agg:str, topk:int) -> Tensor:
  """The fused kernels of mc.cache_read_ref, same signature and results: y_t = g_t^on o_t + sum_i g_t^(i) M^(i) q_t (B,H,L,D).
  q, o (B,H,L,D) (q may be bfloat16/float16), M (B,H,N,D,D), z (B,H,L,N), z_on (B,H,L), reads (n_seg, N) bool."""
  B, H, L, D = q.shape
  C, dev, reads = segment, q.device, np.asarray(reads, bool)
  if reads.shape[0] != -(-L // C): raise ValueError(f"cache_read: reads has {reads.shape[0]} segments, L={L} with segment={C} needs {-(-L // C)}")
  if M.shape[2] == 0 or not reads.any(): return o.float() * 1   # nothing is cached yet: every weight goes to the online memory
  # a half q is converted once here (the kernels would convert it at every one of its D*N loads); dq flows back through the cast
  q, o = q.float(), o.float()
  if agg in ("residual", "mean"):
    # every token of a segment reads the same sum with the same weight: one state per segment, sum_i M_i (Eqs. 6-7)
    n = reads.sum(1, keepdims=True)
    Ms = (const(reads.astype(np.float32), dev) @ M.flatten(-2)).reshape(B, H, -1, D, D)
    c = _per_token(1 / (1 + n) if agg == "mean" else np.ones_like(n, np.float32), C, L).astype(np.float32)   # (L, 1)
    w = const(c, dev).reshape(1, 1, L, 1).expand(B, H, L, 1)
    seg = np.arange(reads.shape[0], dtype=np.int32).reshape(-1, 1)
    return _read(q, o, Ms, w, w[..., 0], const(seg, dev), C, False, (seg, np.ones_like(seg, bool)))
  tbl, ok = _slots(reads)
  if agg == "grm" or topk >= tbl.shape[1]:
    # grm, or ssc with every readable entry selected: the softmax over the static slots (Eqs. 9-10)
    if tbl.shape[1] != z.shape[-1] or not (tbl == np.arange(tbl.shape[1]))[ok].all():
      ent = const(np.arange(z.shape[-1], dtype=np.int32), dev)
      zs = (const(_per_token(tbl, C, L), dev).unsqueeze(-1) == ent).where(z.unsqueeze(-2), 0.0).sum(-1)   # z at each slot
      w_on, w = _softmax(z_on, const(_per_token(ok, C, L), dev).where(zs, -math.inf))
      return _read(q, o, M, w, w_on, const(tbl, dev), C, True, (tbl, ok))
    # const (slot r is entry r): segment s reads entries 0..s-1, so groups of segments each run on the entries their last segment
    # reads, about half the (token, entry) square that one launch over every entry computes; autograd joins the groups
    ys = []
    for s0, s1 in _groups(len(tbl)):
      a, b, K = s0 * C, min(s1 * C, L), max(1, int(ok[s0:s1].sum(1).max()))
      g = (tbl[s0:s1, :K], ok[s0:s1, :K])
      w_on, w = _softmax(z_on[:, :, a:b], const(_per_token(g[1], C, b - a), dev).where(z[:, :, a:b, :K], -math.inf))
      ys.append(_read(q[:, :, a:b], o[:, :, a:b], M, w, w_on, const(g[0], dev), C, True, g))
    return ys[0].cat(*ys[1:], dim=2)
  # ssc (Eqs. 16-17): the top-k selection in a kernel; the backward sends a selected logit's gradient back to its entry
  def bwd_select(gzs:UOp, call:UOp) -> tuple:
    idx = Tensor(call.src[1].after(call))
    gz = (idx.unsqueeze(-1) == const(np.arange(z.shape[-1], dtype=np.int32), dev)).where(Tensor(gzs).unsqueeze(-1), 0.0).sum(-2)
    return (None, None, gz.transpose(-1, -2).uop, None)   # the kernel read z transposed
  idx, zs = Tensor.empty(B, H, L, topk, dtype=dtypes.int32, device=dev), Tensor.empty(B, H, L, topk, device=dev)
  rd = const(reads.astype(np.int32), dev)
  idx, zs = idx.custom_kernel(zs, *_c(z.transpose(-1, -2), rd), fxn=_select_fxn(L, C, topk), grad_fxn=bwd_select)[:2]
  w_on, w = _softmax(z_on, zs)
  return _read(q, o, M, w, w_on, idx, C, True)

# **** linear ****
# y = x W for the model's projections, and its gradients dx = dy W^T and dW = x^T dy. dW reduces over every token of the batch (B*L
# of them), where one thread per output walking all of them leaves most of the chip idle: it runs as S products over slices of the
# tokens (split-K), summed after. On a GPU the products take hand-picked schedules (TILES): tensor-core tiles for half inputs on
# CUDA (the hand-written _mma_fxn where the shapes tile by 32, else TC opts), 4 x 8 outputs per thread for float32, and for a few
# rows (decoding) a thread per output column and slice of k.
_TC = (8, 16, 16)   # CUDA's m16n8k16 tile (tinygrad's dims: N, M, K), for half and bfloat16 inputs with float32 accumulators

def _tc_opts(S:int, M:int, N:int, K:int) -> tuple|None:
  # tensor-core tiles bigger than tinygrad's default for large products: per warp 4 x 12-16 tiles of 16 x 16, two warps per block
  # (on the H100 at the model's shapes, 1.3-1.8x over the default where the whole tile fits, worse where it does not: those keep
  # the default). S > 1: the split products (dW), whose slice axis comes first
  o, pick = int(S > 1), lambda x, c: next((u for u in c if x % u == 0), 1)
  if M % 16 or N % 16 or K < 256: return None
  n1 = pick(N // 16, (4,))
  n2 = pick(N // 16 // n1, (3, 4))
  m1 = pick(M // 16, (4, 2))
  if n1 * n2 < 12 or M * N < (1 << 19 if S > 1 else 6 << 20): return None
  ops = [Opt(OptOps.TC, 0, (-1, 2, 1)), Opt(OptOps.UPCAST, 1 + o, n1), Opt(OptOps.UPCAST, o, m1), Opt(OptOps.UPCAST, 1 + o, n2)]
  if M // 16 // m1 % 2 == 0: ops.append(Opt(OptOps.LOCAL, o, 2))
  return tuple(ops + [Opt(OptOps.LOCAL, 0, 2)] * (S > 1 and S % 2 == 0))

def _simt_opts(S:int, M:int, N:int, K:int) -> tuple|None:
  # float32 on a GPU (no tensor cores): 128 threads, lanes along the output's columns, each thread 4 columns x 8 rows, k unrolled
  # by 4: 3-4x tinygrad's own choice for the forward and dx products at the model's shapes on the H100 (146 against 649 us for
  # 8192 x 256 x 768); the split dW products keep tinygrad's, which were as fast
  if S > 1 or M % 64 or N % 64 or K % 4: return None
  return (Opt(OptOps.LOCAL, 1, 16), Opt(OptOps.LOCAL, 0, 8), Opt(OptOps.UPCAST, 1, 4), Opt(OptOps.UPCAST, 0, 8), Opt(OptOps.UNROLL, 0, 4))

def _rows_opts(S:int, M:int, N:int, K:int) -> tuple:
  # a few rows (a decode step's batch): a thread per (output column, slice of k) holding every row, 16 lanes along the columns (w
  # loads coalesced) and 16 slices of k summed in shared memory, so that a 256 x 768 product has 48 blocks of 256 threads
  lanes, group = next(u for u in (16, 8, 4, 2, 1) if N % u == 0), next(u for u in (16, 8, 4, 2, 1) if K % u == 0)
  # (all M rows upcast: the row axis goes, and the columns become axis 0)
  return tuple([Opt(OptOps.UPCAST, 0, M)] * (M > 1) + [Opt(OptOps.LOCAL, 0, lanes)] * (lanes > 1) + [Opt(OptOps.GROUP, 0, group)] * (group > 1))

TILES = {"tc": _tc_opts, "simt": _simt_opts, "rows": _rows_opts}   # a product's hand-picked schedules, by kind (_tiles picks one)

@functools.cache
def _gemm_fxn(S:int, a_t:bool, b_t:bool, half:bool, tiles:str):
  # C[s, m, n] = sum over the s-th of S slices of k of A[m, k] B[k, n], accumulated in float32; A stored (K, M) when a_t, B stored
  # (N, K) when b_t. Half inputs multiply in their dtype and accumulate in float32, the form tinygrad maps to tensor cores.
  # tiles: a key of TILES (whose function may still leave a product to tinygrad, returning None), or "" for tinygrad's own
  def fxn(C:UOp, A:UOp, B:UOp) -> UOp:
    _, M, N = C.shape
    Ks = (A.shape[0] if a_t else A.shape[1]) // S
    s, m, n, k = UOp.range(S, 0), UOp.range(M, 1), UOp.range(N, 2), _red(Ks, 3)
    a, b = (A[s * Ks + k, m] if a_t else A[m, s * Ks + k]), (B[n, s * Ks + k] if b_t else B[s * Ks + k, n])
    prod = (a * b).cast(dtypes.float) if half else a.cast(dtypes.float) * b.cast(dtypes.float)
    opts = TILES[tiles](S, M, N, Ks) if tiles else None
    st = C[s, m, n].store(_reduce(prod, k).cast(C.dtype)).end(s, m, n)
    return st.sink(arg=KernelInfo(name=f"gemm{'_tn' * a_t}{'_nt' * b_t}", opts_to_apply=opts))
  return fxn

# The tensor-core product by hand (CUDA, half and bfloat16): tinygrad's TC opts load every mma fragment straight from global
# memory, two bytes at a time. Here a block stages tiles of A and B through shared memory with 16-byte loads, and each warp
# builds its m16n8k16 fragments from there (PTX's layout: a thread holds A's rows g and g+8 at k = 2t, 2t+1, 2t+8, 2t+9, and
# B's column g at the same k, where g = lane / 4 and t = lane % 4). Both operands are read as uint32 words, two values each: a
# pair along k is one word of a tile stored row-major (k contiguous), two half words of one stored k-major. On the H100 it ran
# the gpu shape's 16384 x 512 x 1536 product in 165 us against 390 us for TC opts (cuBLAS: 45 us).
MMA_PAD = 4   # words of padding per shared row: a warp's fragment reads then hit 32 different banks (or share a word)

def _words(x:UOp) -> UOp:
  # a half or bfloat16 kernel input (..., K) as uint32 words (..., K/2): the same buffer, a new view of its slot
  base = x.src[0]
  return UOp.param(base.arg.slot, dtypes.uint32, (base.shape[0] // 2,), base.arg.device).reshape(*x.shape[:-1], x.shape[-1] // 2)

def _value(w:UOp, hi, dt) -> UOp: return (w >> (hi * 16)).cast(dtypes.uint16).bitcast(dt)   # the low or high half of a word

def _mma_smem(BM:int, BN:int, BK:int, bufs:int, pad:int=MMA_PAD) -> int:
  # bytes of shared memory for bufs buffers of both tiles, in the larger of their two layouts, pad words a row included
  return 4 * bufs * sum(max(r * (BK // 2 + pad), BK * (r // 2 + pad)) for r in (BM, BN))

def _rot(r:UOp, n:int) -> UOp|int:
  # the swizzled layout (no padding): row r of a shared tile of n 16-byte chunks a row holds its chunk c at (c + _rot(r, n)) % n, so
  # that the 8 rows an ldmatrix phase reads at one chunk column (rows 8i .. 8i+7) fall in 8 different groups of 4 banks
  return r % 8 if n >= 8 else (r // (8 // n)) % n if n > 1 else 0

def _mma_tiles(M:int, N:int, K:int, bufs:int=1, bks:tuple=(64, 32), pad:int=MMA_PAD) -> tuple[int, int, int]|None:
  # block tile (BM, BN, BK): the largest of 128, 64, 32 that divide M and N, the first BK of bks that divides K and whose bufs
  # shared buffers fit in CUDA's 48 KB of static shared memory; None: shapes it cannot tile
  BM, BN = (next((b for b in (128, 64, 32) if x % b == 0), None) for x in (M, N))
  if BM is None or BN is None: return None
  threads = 32 * max(1, BM // 64) * max(1, BN // 32)   # as _mma_fxn's warps; each stages whole 16-byte chunks (8 values) of both tiles
  fits = lambda bk: K % bk == 0 and _mma_smem(BM, BN, bk, bufs, pad) <= 48 * 1024 and all(r * bk // 8 % threads == 0 for r in (BM, BN))
  return next(((BM, BN, bk) for bk in bks if fits(bk)), None)

# cp.async: a 16-byte global-to-shared copy that bypasses the registers, completing in the background (PTX ISA 7.0+, sm_80+); the
# source size operand copies that many bytes and fills the rest of the 16 with zeros
_CP_ASYNC = 'asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" :: "r"((unsigned)__cvta_generic_to_shared({0})), "l"({1}), "r"({2}));'
_CP_COMMIT = 'asm volatile("cp.async.commit_group;" ::: "memory");'
_CP_WAIT = 'asm volatile("cp.async.commit_group;\\n\\tcp.async.wait_group {};" ::: "memory");'   # close the open group, then wait

def _mma_step(TM:int, TN:int, ta:bool, tb:bool, dt) -> str:
  # CUDA for one k16 step of a warp's TM x TN mma tiles, as a CUSTOM's format ({0}: the float32 accumulators, {1} .. {TM}: this
  # lane's ldmatrix row address in A's shared tile for each of its 16-row tiles, {TM+1} .. {TM+TN} in B's for each 8-column tile)
  ty = {dtypes.half: "f16", dtypes.bfloat16: "bf16"}[dt]
  ld = lambda n, t, out, addr: (f'asm volatile("ldmatrix.sync.aligned.m8n8.x{n}{".trans" * t}.shared.b16 {{' + ", ".join(f"%{i}" for i in range(n)) +
                                f'}}, [%{n}];" : ' + ", ".join(f'"=r"({out}[{i}])' for i in range(n)) + f' : "r"({addr}));')
  c = lambda i, j: ", ".join(f'"+f"(c[{(i * TN + j) * 4 + e}])' for e in range(4))
  mma = f"mma.sync.aligned.m16n8k16.row.col.f32.{ty}.{ty}.f32 {{%0, %1, %2, %3}}, {{%4, %5, %6, %7}}, {{%8, %9}}, {{%0, %1, %2, %3}};"
  sh = lambda i: f"(unsigned)__cvta_generic_to_shared(@{i}@)"
  code = ["{ unsigned a[%d][4], b[%d][2]; float *c = @0@;" % (TM, TN),
          *[ld(4, ta, f"a[{i}]", sh(1 + i)) for i in range(TM)], *[ld(2, tb, f"b[{j}]", sh(1 + TM + j)) for j in range(TN)],
          *[f'asm volatile("{mma}" : {c(i, j)} : "r"(a[{i}][0]), "r"(a[{i}][1]), "r"(a[{i}][2]), "r"(a[{i}][3]), "r"(b[{j}][0]), "r"(b[{j}][1]));'
            for i in range(TM) for j in range(TN)], "}"]
  return re.sub(r"@(\d+)@", r"{\1}", "\n".join(code).replace("{", "{{").replace("}", "}}"))

# _gemm's choice of _mma_fxn's variant (prefetch 0, 1, 2 through registers, 3 and 4 async copies), settable so that all can be
# timed in one process (the env: in bench.py's runs); for 3 and 4, the shared buffers (stages) and the k tiles to try, the first
# whose buffers fit (else prefetch 2)
MMA_PREFETCH, MMA_STAGES = int(os.environ.get("MMA_PREFETCH", 2)), int(os.environ.get("MMA_STAGES", 4))
MMA_SWIZZLE = int(os.environ.get("MMA_SWIZZLE", 0))   # 1: prefetch 4's tiles in the swizzled layout (_rot), without padding
MMA_BK = (32, 16)

@functools.cache
def _mma_fxn(S:int, a_t:bool, b_t:bool, dt, BM:int, BN:int, BK:int, prefetch:int=0, stages:int=2, swizzle:bool=False):
  # C[s] = A @ B over the s-th of S slices of k, as _gemm_fxn's; warps of 64 x 32 outputs (TM x TN tiles of 16 x 8).
  # prefetch: software pipelining through registers. Tile 0 is staged before the k loop; iteration kt issues the global loads of
  # tile kt+1 into registers first (gated off in the last iteration), runs the mma on tile kt from shared memory, and only then
  # stores the registers into shared memory: the loads' latency hides behind the mma instead of stalling it. 1: one shared buffer,
  # a barrier before the stores and one after; 2: two shared buffers (tile kt+1 goes to the one not read), only the barrier after.
  # Not for one k tile, nor where the next tiles take more than 32 registers a thread (tiles of 128 x 32 have 64 threads): there
  # the registers cost more warps than the latency they hide. 3: `stages` shared buffers filled by asynchronous copies (cp.async,
  # no registers), stages-2 tiles ahead; 4: as 3, and each k step's fragments loaded by ldmatrix and multiplied in one asm block
  # (_mma_step): tinygrad's fragments are built from 2-byte values, about 6 instructions an mma in the SASS against 1.5 there.
  # 3 and 4 are CUDA only (inline PTX, sm_80+); `MMA_PREFETCH=4 python bench.py check` validates them (exact on the H100, but no
  # faster in the training step, where 4 stages of 128 x 128 tiles fit 48 KB only with k tiles of 16: a barrier every k step).
  # swizzle (4 only): the shared tiles without padding, each row's 16-byte chunks rotated (_rot) so that ldmatrix stays free of
  # bank conflicts: 3 stages of 128 x 128 tiles with k tiles of 32 then fit 48 KB
  WM, WN = max(1, BM // 64), max(1, BN // 32)
  TM, TN, threads = BM // WM // 16, BN // WN // 8, 32 * WM * WN
  def fxn(C:UOp, A:UOp, B:UOp) -> UOp:
    _, M, N = C.shape
    A, B = _words(A), _words(B)
    K = (A.shape[0] if a_t else 2 * A.shape[1]) // S
    s, bm, bn = (UOp.range(n, i, AxisType.GLOBAL) for i, n in enumerate((S, M // BM, N // BN)))
    # the lane a WARP axis (threadIdx.x), which tinygrad never splits: mma.sync needs a warp's 32 threads in lane order
    lane, w = UOp.range(32, 3, AxisType.WARP), UOp.range(WM * WN, 4, AxisType.LOCAL)
    tid, wm, wn, g, t = lane + 32 * w, w // WN, w % WN, lane // 4, lane % 4
    kt = UOp.range(K // BK, 6, AxisType.REDUCE)
    pipe = prefetch if K // BK > 1 and (BM + BN) * BK // 2 <= 32 * threads else 0   # the next tiles' words a thread: at most 32
    if prefetch >= 3: pipe = 3 if K // BK >= stages - 2 and stages >= 3 else 0        # (async copies hold no registers)
    # the block's k-th tiles of words in their global layout, staged in shared memory as they are: k-major (BK, rows/2) for A
    # stored (K, M) and B stored (K, N), row-major (rows, BK/2) for A stored (M, K) and B stored (N, K)
    tile = lambda X, R, r, blk, km, k: (X.reshape(S, K // BK, BK, R // r, r // 2)[s, k, :, blk, :] if km else
                                        X.reshape(R // r, r, S, K // BK, BK // 2)[blk, :, s, k, :])
    tiles = lambda k: (tile(A, M, BM, bm, a_t, k), tile(B, N, BN, bn, not b_t, k))
    nbuf = {0: 1, 1: 1, 2: 2, 3: stages}[pipe]
    swz = swizzle and pipe == 3 and prefetch == 4
    sh = [UOp.placeholder((nbuf, x.shape[0], x.shape[1] + MMA_PAD * (not swz)), dtypes.uint32, slot=i, addrspace=AddrSpace.LOCAL)
          .shrink_to((nbuf, *x.shape)) for i, x in enumerate(tiles(kt))]
    def chunk(X:UOp, row:UOp, c:UOp) -> UOp:
      # the first word of 16-byte chunk c of a row of shared tile X (rows, words), where the layout puts it
      n = X.shape[-1] // 4
      return X[row, ((c + _rot(row, n)) % n * 4) if swz else c * 4]
    def copy(dst:UOp, src:UOp, rid:int, loop:bool=True) -> UOp:
      # a thread's 16-byte chunks of a tile (4 words, one load each), or its (n, 4) registers; loop=False unrolls the chunks, so that
      # every load is issued before the first store. rid, rid + 1: range ids of their own (the expander tells upcast ranges by id)
      n = math.prod((dst if dst.addrspace is not AddrSpace.REG else src).shape) // (threads * 4)
      i, e = UOp.range(n, rid, AxisType.LOOP if loop else AxisType.UPCAST), UOp.range(4, rid + 1, AxisType.UPCAST)
      at = lambda x: x[i, e] if x.addrspace is AddrSpace.REG else x.reshape(n, threads, 4)[i, tid, e]
      return at(dst).store(at(src)).end(i, e)
    if pipe == 3:
      # copies that bypass the registers (cp.async), in groups of one k tile each: tiles 0 .. stages-3 are in flight before the loop.
      # Iteration kt issues tile kt+stages-2 into the buffer of tile kt-2 (every warp passed iteration kt-1's barrier, so is done
      # reading it), closes its group and waits until at most stages-2 groups are pending: tile kt has landed; then a barrier, and
      # the mma on tile kt with tiles kt+1 .. kt+stages-2 in flight. Past the last tile the copies copy nothing (a source size of 0
      # fills zeros) into buffers no later tile uses. The copies hang on the wait (a statement of its own would be dropped:
      # tinygrad keeps only stores, ends and barriers as dependencies)
      def issue(k:UOp|int, rid:int, after:tuple=()) -> list[UOp]:
        # a thread's 16-byte chunks of tile k (one copy each, unrolled) into buffer k % stages
        ok = k < K // BK
        src = ok.where(k, K // BK - 1) if isinstance(k, UOp) else k   # (the last tile's address for a copy of nothing)
        size = ok.where(UOp.const(16, dtypes.uint32), UOp.const(0, dtypes.uint32)) if isinstance(ok, UOp) else UOp.const(16, dtypes.uint32)
        cps = []
        for i, (d, x) in enumerate(zip(sh, tiles(src))):
          n = math.prod(x.shape) // (threads * 4)
          c = UOp.range(n, rid + i, AxisType.LOOP)   # (a loop: an unrolled one gives vector indices that tinygrad cannot fold)
          q, per = c * threads + tid, x.shape[1] // 4  # the chunk's number in the tile, chunks a row
          dst = chunk(d[k % nbuf, :, :], q // per, q % per)
          cps.append(UOp(Ops.CUSTOM, dtypes.void, (dst, x.reshape(n, threads, 4)[c, tid, 0], size, *after), _CP_ASYNC).end(c))
        return cps
      closed: tuple = ()   # the commit of the group before (copies of one tile come after the previous tile's commit)
      for j in range(stages - 2): closed = (UOp(Ops.CUSTOM, dtypes.void, tuple(issue(j, 30 + 2 * j, closed)), _CP_COMMIT),)
      wait = UOp(Ops.CUSTOM, dtypes.void, tuple(issue(kt + stages - 2, 26, closed)), _CP_WAIT.format(stages - 2)).barrier()
      As, Bs = (x.after(wait)[kt % nbuf, :, :] for x in sh)
    elif pipe:
      # barriers placed by hand: tinygrad's own (after the stores that a read follows, at the end of a loop that stores and reads
      # shared memory) would add one at the top of every iteration. Tile 0 goes to shared memory before the loop
      first = UOp.group(*[copy(d[0, :, :], x, 10 + 2 * i) for i, (d, x) in enumerate(zip(sh, tiles(0)))]).barrier()
      nxt = tiles((kt + 1).valid(kt < K // BK - 1))
      regs = [UOp.placeholder((math.prod(x.shape) // (threads * 4), 4), dtypes.uint32, slot=3 + i, addrspace=AddrSpace.REG)
              for i, x in enumerate(nxt)]
      # the fill of the registers a dependency of the fragment reads: the linearizer then places the global loads before the mma
      fill = [copy(r, x, 14 + 2 * i, loop=False) for i, (r, x) in enumerate(zip(regs, nxt))]
      As, Bs = (x.after(first, kt, *fill)[kt % nbuf, :, :] for x in sh)
    else: As, Bs = (x.after(*[copy(d[0, :, :], x, 10 + 2 * i) for i, (d, x) in enumerate(zip(sh, tiles(kt)))])[0, :, :] for x in sh)
    acc = UOp.placeholder((TM, TN, 4), dtypes.float, slot=2, addrspace=AddrSpace.REG)
    z = UOp.range(TM * TN * 4, 20, AxisType.UPCAST)
    acc = acc.after(acc.reshape(TM * TN * 4)[z].store(0.0).end(z))
    ks = UOp.range(BK // 16, 7, AxisType.REDUCE)
    def pair(X:UOp, row:UOp, kp:UOp, km:bool) -> list[UOp]:
      # the values k = 2 kp, 2 kp + 1 of one row of a row-major tile (one word), or of a k-major one (two half words)
      if not km: return [_value(X[row, kp], h, dt) for h in (0, 1)]
      return [_value(X[2 * kp + i, row // 2], row % 2, dt) for i in (0, 1)]
    if pipe == 3 and prefetch == 4:
      # a warp's k step as one asm block: fragments by ldmatrix, lane 8q + r giving the address of row r of 8 x 8 matrix q (A, m16 x
      # k16: q = 2 kh + rh, rows 8 rh and k 8 kh on; B, k16 x n8: q = kh), a k-major tile read transposed; then the TM x TN mma
      # (a tile's 16-row (8-column) piece i starts 16 i rows (2 i chunks) on in a row-major (k-major) tile: a chunk of 8 values)
      r, q = lane % 8, lane // 8
      pa = [chunk(As, ks * 16 + r + 8 * (q // 2), wm * TM * 2 + 2 * i + q % 2) if a_t else
            chunk(As, wm * TM * 16 + 16 * i + r + 8 * (q % 2), ks * 2 + q // 2) for i in range(TM)]
      pb = [chunk(Bs, ks * 16 + r + 8 * (q % 2), wn * TN + j) if not b_t else chunk(Bs, wn * TN * 8 + 8 * j + r, ks * 2 + q % 2)
            for j in range(TN)]
      body = UOp(Ops.CUSTOM, dtypes.void, (acc.reshape(TM * TN * 4).after(ks)[0], *pa, *pb), _mma_step(TM, TN, a_t, not b_t, dt)).end(ks)
    else:
      kp = ks * 8 + t
      a = [UOp.stack(*[v for kh in (0, 1) for rh in (0, 1) for v in pair(As, (wm * TM + i) * 16 + 8 * rh + g, kp + 4 * kh, a_t)])
           for i in range(TM)]
      b = [UOp.stack(*[v for kh in (0, 1) for v in pair(Bs, (wn * TN + j) * 8 + g, kp + 4 * kh, not b_t)]) for j in range(TN)]
      mma = [acc[i, j].store(UOp.wmma(a[i], b[j], acc[i, j].after(ks), _TC, "CUDA", 32)) for i in range(TM) for j in range(TN)]
      body = UOp.group(*mma).end(ks)
    if pipe in (1, 2):
      # one buffer: every warp's fragment reads of tile kt come before it takes tile kt+1. Two: no barrier there, but the stores still
      # after the mma (placed before it, they would wait for the loads). Both: the stores come before the next iteration's reads
      done = body.barrier() if pipe == 1 else body
      body = UOp.group(*[copy(d.after(done)[(kt + 1) % nbuf, :, :], r.after(*fill), 22 + 2 * i, loop=False)
                         for i, (d, r) in enumerate(zip(sh, regs))]).barrier()
    loop = body.end(kt)
    acc = acc.after(loop)
    # a thread's outputs: rows g and g + 8 of each tile, columns 2t and 2t + 1 (float32: one 8-byte store; half: one word)
    val = acc.reshape(TM, TN, 2, 2).cast(C.dtype)
    if C.dtype != dtypes.float:
      C, val = _words(C), val.bitcast(dtypes.uint16).cast(dtypes.uint32)
      val = val[:, :, :, 0] | (val[:, :, :, 1] << 16)
    # (copies of nothing may still be in flight past the last tile: wait for them before the block can exit)
    if pipe == 3: C = C.after(UOp(Ops.CUSTOM, dtypes.void, (loop,), 'asm volatile("cp.async.wait_all;" ::: "memory");').barrier())
    out = C.reshape(S, M // BM, WM, TM, 2, 8, N // BN, WN, TN, 4, -1)[s, bm, wm, :, :, g, bn, wn, :, t, :].permute((0, 2, 1, 3))
    st = out.store(val.reshape(out.shape)).end(lane, w, s, bm, bn)
    return st.sink(arg=KernelInfo(name=f"mma{'_tn' * a_t}{'_nt' * b_t}", opts_to_apply=()))
  return fxn

SPLIT_BLOCKS = int(os.environ.get("SPLIT_BLOCKS", 0))   # > 0: split k only until the product has this many 128 x 128 tiles

def _slices(K:int, MN:int=0) -> int:
  # split-K: slices of at least 512 along k, at most 16 of them (SPLIT_BLOCKS: no more than an M x N product of MN outputs needs)
  S = 1
  while S < 16 and K % (2 * S) == 0 and K // (2 * S) >= 512 and not (SPLIT_BLOCKS and MN * S >= SPLIT_BLOCKS * 128 * 128): S *= 2
  return S

ROWS = 16   # up to this many rows a product is a decode step's: _rows_opts where the device has locals

def _tiles(A:Tensor, M:int) -> str:
  ren = _renderer(A.device)
  if not ren.has_local: return ""   # the CPU: tinygrad's own loops
  if M <= ROWS: return "rows"
  return "tc" if any(tc.dims == _TC and tc.dtype_in == A.dtype for tc in ren.tensor_cores) else "simt" if A.dtype == dtypes.float else ""

def _gemm(A:Tensor, B:Tensor, a_t:bool=False, b_t:bool=False, grad_fxn=None) -> Tensor:
  # (M, N) = A @ B in A's dtype with A (M, K) or, a_t, (K, M); B (K, N) or, b_t, (N, K)
  (K, M), N = (A.shape if a_t else A.shape[::-1]), (B.shape[0] if b_t else B.shape[1])
  S = _slices(K, M * N) if a_t else 1
  C = Tensor.empty(S, M, N, dtype=dtypes.float if S > 1 else A.dtype, device=A.device)
  half, tiles = A.dtype in (dtypes.half, dtypes.bfloat16), _tiles(A, M)
  # the hand-written product where its tiles fit: MMA_PREFETCH's variant, else (async copies whose stages do not fit) prefetch 2
  swz = bool(MMA_SWIZZLE) and MMA_PREFETCH == 4
  variants = ([(MMA_PREFETCH, MMA_STAGES, MMA_BK, swz)] * (MMA_PREFETCH >= 3) +
              [(min(MMA_PREFETCH, 2), 2 if MMA_PREFETCH >= 2 else 1, (64, 32), False)])
  mma = next(((pf, st, tl, sw) for pf, st, bks, sw in variants if (tl := _mma_tiles(M, N, K // S, st, bks, 0 if sw else MMA_PAD))),
             None) if tiles == "tc" else None
  fxn = _mma_fxn(S, a_t, b_t, A.dtype, *mma[2], mma[0], mma[1], mma[3]) if mma else _gemm_fxn(S, a_t, b_t, half, tiles)
  C = C.custom_kernel(*_c(A, B), fxn=fxn, grad_fxn=grad_fxn)[0]
  return C[0] if S == 1 else C.sum(0).cast(A.dtype)

def linear_applies(x:Tensor) -> bool:
  # what linear adds over x @ w: the split of dW over many tokens, or a decode step's few rows on a device with locals
  rows = math.prod(x.shape[:-1])
  return _slices(rows) > 1 or (rows <= ROWS and _renderer(x.device).has_local)

def linear(x:Tensor, w:Tensor) -> Tensor:
  """x (..., K) @ w (K, N) in x's dtype, w cast to it (its gradient flows back through the cast). Its reference is x @ w."""
  (K, N), up = w.shape, lambda n: -(-n // 32) * 32
  if (K % 32 or N % 32) and _tiles(x, math.prod(x.shape[:-1])) == "tc":
    # the hand-written tensor-core product tiles by 32: zero rows and columns of w (and columns of x) bring a narrow projection (the
    # gates' 3 H outputs) to it, and the extra outputs are sliced off. tinygrad's own tensor-core schedule had taken 0.3 ms for the
    # gates' 16384 x 512 x 24 weight gradient at the gpu shape (H100), a product of 0.4 GFLOP
    y = linear(x.pad(((0, 0),) * (x.ndim - 1) + ((0, up(K) - K),)), w.pad(((0, up(K) - K), (0, up(N) - N))))
    return y[..., :N]
  def bwd(gy:UOp, call:UOp) -> tuple:
    _, x2, wc = (Tensor(u) for u in call.src[1:])
    gy = _c(Tensor(gy).reshape(gy.shape[1:]))[0]
    return (None, _gemm(gy, wc, b_t=True).uop, _gemm(x2, gy, a_t=True).uop)
  return _gemm(x.reshape(-1, x.shape[-1]), w.cast(x.dtype), grad_fxn=bwd).reshape(*x.shape[:-1], w.shape[1])

# **** norms ****
# y_t = x_t * r(s_t) with s_t = x_t . x_t over a row's n features (RMSNorm's r = (s/n + eps)^-1/2; L2's 1 / max(sqrt(s), eps)). A row
# reduction that tinygrad schedules itself gets a thread per row, or per few rows, walking all n features: its loads are strided
# by n across the threads and too few threads run (RMSNorm forward and backward took 0.19 ms a launch for 16 MB at the gpu shape,
# DEBUG=2 on an H200, where the memory allows ~5 us). Here `rowdot` reduces a row with several lanes whose loads are adjacent
# (GROUP: partial sums meet in shared memory), and `mul_rows` scales the rows in a kernel of its own, whose gradient to r is a
# rowdot again: a broadcast in plain tinygrad would have made that gradient one of tinygrad's row reductions.

def _row_lanes(n:int) -> int: return next(u for u in (32, 16, 8, 4, 2, 1) if n % u == 0 and n // u >= min(n, 4))   # 4+ features a lane

# swap: rows of a (B, A1, A2, n) tensor, numbered in that order, that one operand holds as (B, A2, A1, n): the move between a model's
# (B,L,H,D) and the memory's (B,H,L,D) done by a norm's own loads or stores instead of a transposing pass of its own
def _swapped(t:UOp, swap:tuple[int, int]|None) -> UOp:
  if swap is None: return t
  A1, A2 = swap
  return (t // (A1 * A2) * A2 + t % A2) * A1 + t // A2 % A1

@functools.cache
def _rowdot_fxn(T:int, n:int, local:bool, swap:tuple|None=None):
  # s[t] = sum_k a[t, k] b[t, k] in float32, a's row t at _swapped(t, swap); with locals, _row_lanes(n) threads a row and 128 a block
  def fxn(s:UOp, a:UOp, b:UOp) -> UOp:
    t, k = UOp.range(T, 0), UOp.range(n, 1, AxisType.REDUCE)
    acc = (a[_swapped(t, swap), k].cast(dtypes.float) * b[t, k].cast(dtypes.float)).reduce(k, arg=Ops.ADD)
    lanes = _row_lanes(n)
    rows = math.gcd(T, 128 // lanes)
    opts = tuple([Opt(OptOps.GROUP, 0, lanes)] * (lanes > 1) + [Opt(OptOps.LOCAL, 0, rows)] * (rows > 1)) if local else ()
    return s[t].store(acc).end(t).sink(arg=KernelInfo(name="norm_rowdot", opts_to_apply=opts))
  return fxn

def rowdot(a:Tensor, b:Tensor, swap:tuple[int, int]|None=None) -> Tensor:
  """(..., n) . (..., n) -> (...) float32, the sum over the last axis of a * b; its gradient is (g a, g b) by plain broadcasts.
  swap (A1, A2): a holds its rows as (B, A2, A1, n) where b and the result are (B, A1, A2) (a's gradient then in a's layout)."""
  n = b.shape[-1]
  T, local = math.prod(b.shape[:-1]), _renderer(b.device).has_local
  def bwd(g:UOp, call:UOp) -> tuple:
    _, a2, b2 = (Tensor(u) for u in call.src[1:])
    g = Tensor(g).unsqueeze(-1)
    if swap is None: return (None, (g * b2.float()).cast(a2.dtype).uop, (g * a2.float()).cast(b2.dtype).uop)
    return (None, _unswap(g * b2.float(), swap).cast(a2.dtype).uop, (g * _unswap(a2.float(), swap[::-1])).cast(b2.dtype).uop)
  s = Tensor.empty(T, device=b.device).custom_kernel(*_c(a.reshape(T, n), b.reshape(T, n)), fxn=_rowdot_fxn(T, n, local, swap), grad_fxn=bwd)[0]
  return s.reshape(b.shape[:-1])

def _unswap(x:Tensor, swap:tuple[int, int]) -> Tensor:
  # rows (T, n) of a (B, A1, A2) numbering -> the same rows as (B, A2, A1) numbers them
  A1, A2 = swap
  return x.reshape(-1, A1, A2, x.shape[-1]).transpose(1, 2).reshape(x.shape)

@functools.cache
def _mul_rows_fxn(T:int, n:int, swap_in:tuple|None=None, swap_out:tuple|None=None):
  # y[t, k] = x[t, k] r[t] in float32 (tinygrad's own elementwise schedule); x's row t at _swapped(t, swap_in), y's at _swapped(t, swap_out)
  def fxn(y:UOp, x:UOp, r:UOp) -> UOp:
    t, k = UOp.range(T, 0), UOp.range(n, 1)
    val = x[_swapped(t, swap_in), k].cast(dtypes.float) * r[t]
    return y[_swapped(t, swap_out), k].store(val).end(t, k).sink(arg=KernelInfo(name="norm_scale"))
  return fxn

def mul_rows(x:Tensor, r:Tensor, swap:tuple[int, int]|None=None) -> Tensor:
  """x (..., n) times r (...), one factor per row -> float32; the gradient to r is rowdot(dy, x). swap (A1, A2): x (B, A1, A2, n)
  gives y as (B, A2, A1, n), its rows stored where that layout has them."""
  T, n = math.prod(x.shape[:-1]), x.shape[-1]
  def bwd(g:UOp, call:UOp) -> tuple:
    _, x2, r2 = (Tensor(u) for u in call.src[1:])
    g = Tensor(g)
    if swap is None: return (None, (g * r2.unsqueeze(-1)).cast(x2.dtype).uop, rowdot(g, x2).uop)
    # g holds the rows as y does: read through the swap, dx in x's layout
    dx = Tensor.empty(T, n, device=g.device).custom_kernel(*_c(g, r2), fxn=_mul_rows_fxn(T, n, swap, None))[0]
    return (None, dx.cast(x2.dtype).uop, rowdot(g, x2, swap).uop)
  y = Tensor.empty(T, n, device=x.device).custom_kernel(*_c(x.reshape(T, n), r.float().reshape(T)), fxn=_mul_rows_fxn(T, n, None, swap),
                                                        grad_fxn=bwd)[0]
  return y.reshape(x.shape[0], *x.shape[1:-1][::-1], n) if swap else y.reshape(x.shape)

def norm(x:Tensor, eps:float, rms:bool=True, swap:bool=False) -> Tensor:
  """x (..., n) -> float32 x * r over its last axis: RMSNorm without its weight (r = (mean x^2 + eps)^-1/2) or, rms=False,
  L2 normalisation (r = 1 / max(|x|, eps), as Tensor.normalize). Its reference is the same expression in plain tinygrad.
  swap: x (B, A1, A2, n) -> the result as (B, A2, A1, n), i.e. the norm's .transpose(1, 2) in the norm's own stores."""
  s = rowdot(x, x)
  r = (s / x.shape[-1] + eps).rsqrt() if rms else s.sqrt().maximum(eps).reciprocal()
  return mul_rows(x, r, tuple(x.shape[1:3]) if swap else None)

# **** causal_conv ****
# The causal depthwise conv on q, k, v, y_t = sum_i w_i x_{t-W+1+i} per channel (zeros before the first token), and both its
# gradients. tinygrad's own schedules gave these few threads and strided loads (7.9 ms of the gpu preset's step on an H200,
# 5.3 ms of it the weight gradient): here every thread's lanes run along the channels, which are contiguous.

def _lanes(n:int, rid:int, g:_Grid, most:int=128) -> tuple[UOp, tuple[UOp, ...]]:
  # an axis of n as blocks of up to `most` lanes (LOCAL; plain loops without locals)
  u = math.gcd(n, most)
  outer, inner = UOp.range(n // u, rid), UOp.range(u, rid + 1, g.lanes)
  return outer * u + inner, (outer, inner)

@functools.cache
def _conv_fxn(flip:bool, g:_Grid):
  # y_t = sum_i w_i x_{t-W+1+i}, or flip (the input gradient) dx_t = sum_i w_i dy_{t+W-1-i}, both zero outside the sequence: a
  # thread per R tokens of one channel, which loads each of the R + W - 1 inputs it reads once; x comes flat (_gated)
  def fxn(y:UOp, x:UOp, w:UOp) -> UOp:
    (B, L, C), W = y.shape, w.shape[0]
    R = math.gcd(L, 4)
    b, tr = UOp.range(B, 0), UOp.range(L // R, 1)
    c, thread = _lanes(C, 2, g)
    def inp(o:int) -> UOp:
      t = tr * R + o
      return _gated(x, y.shape, (b, t, c), t < L if flip else t >= 0).cast(dtypes.float)
    ws = [w[i, c].cast(dtypes.float) for i in range(W)]
    ys = [sum(ws[i] * inp(r + (W - 1 - i if flip else i - W + 1)) for i in range(W)) for r in range(R)]
    st = UOp.group(*[y[b, tr * R + r, c].store(v.cast(y.dtype)) for r, v in enumerate(ys)])
    return _sink(st.end(b, tr, *thread), "conv_dx" if flip else "conv")
  return fxn

_CONV_GROUP = 128   # tokens per thread of the weight gradient: the gpu preset's (16, 1024, 1536) gets 196K threads

@functools.cache
def _conv_dw_fxn(L:int, T:int, g:_Grid):
  # dwp[b, j, i, c] = sum over the T tokens t of group j of sequence b of dy_t x_{t-W+1+i}: a thread per (group, channel), lanes
  # along the channels, walking its tokens (unrolled by 4) with W float32 accumulators; dy and x come flat, the caller sums the groups
  def fxn(dwp:UOp, dy:UOp, x:UOp) -> UOp:
    B, ng, W, C = dwp.shape
    b, j = UOp.range(B, 0), UOp.range(ng, 1)
    c, thread = _lanes(C, 2, g)
    i, u = UOp.range(W, 4, AxisType.UPCAST), math.gcd(T, 4)
    to, tu = _red(T // u, 5), (UOp.range(u, 6, AxisType.UNROLL) if u > 1 else UOp.const(0, dtypes.weakint))
    t = j * T + to * u + tu
    ts = t - W + 1 + i
    val = _gated(dy, (B, L, C), (b, t, c), t < L).cast(dtypes.float) * _gated(x, (B, L, C), (b, ts, c), (ts >= 0) & (t < L)).cast(dtypes.float)
    return _sink(dwp[b, j, i, c].store(_reduce(val, to, tu)).end(b, j, *thread, i), "conv_dw")
  return fxn

def causal_conv(x:Tensor, w:Tensor) -> Tensor:
  """mc.causal_conv_ref as kernels: x (B,L,C) of any float dtype and w (W,C) -> y_t = sum_i w_i x_{t-W+1+i} (B,L,C) in x's dtype,
  accumulated in float32. Its gradients: dx by the same kernel run backwards, dw from partial sums over groups of tokens."""
  (B, L, C), W, g = x.shape, w.shape[0], _grid(x.device)
  def bwd(gy:UOp, call:UOp) -> tuple:
    _, xf, w = (Tensor(u) for u in call.src[1:])
    gy, T = Tensor(gy).contiguous().flatten(), min(L, _CONV_GROUP)
    dx = _run(_conv_fxn(True, g), [Tensor.empty(B, L, C, dtype=x.dtype, device=x.device)], [gy, w])[0]
    dwp = _run(_conv_dw_fxn(L, T, g), [Tensor.empty(B, -(-L // T), W, C, device=x.device)], [gy, xf])[0]
    return (None, dx.flatten().uop, dwp.sum(1).contiguous().sum(0).cast(w.dtype).uop)
  y = Tensor.empty(B, L, C, dtype=x.dtype, device=x.device)
  return y.custom_kernel(*_c(x.flatten(), w.cast(x.dtype)), fxn=_conv_fxn(False, g), grad_fxn=bwd)[0]

# **** segment_mean ****
# The online summary p_t = mean of k_j over j in [sC, t] for the segment s containing t (mc.online_pool), and its gradient
# dk_j = sum_{t >= j in j's segment} dp_t / (t - sC + 1), as running sums: O(L D) where the reference's (C, C) averaging matmul
# is O(L C D) (5.2 ms of the gpu preset's step on an H200).

@functools.cache
def _segment_mean_fxn(shape:tuple, C:int, rev:bool, g:_Grid):
  # a thread per (row, segment, d), lanes along d, keeping a float32 sum over the segment's tokens: forward, p_t = sum / count;
  # rev (the gradient), backwards from the segment's end, dk_t = sum of dp / count. U tokens a step, whose loads are independent:
  # the gpu preset has only 32K such threads, and 32 loads of each in flight (4 MB) are about what HBM needs to stream. Both
  # buffers, (N, L, D), come flat (_gated): the last segment may end early
  U = math.gcd(C, 32)
  N, L, D = shape
  def fxn(out:UOp, x:UOp) -> UOp:
    n, s = UOp.range(N, 0), UOp.range(-(-L // C), 1)
    d, thread = _lanes(D, 2, g)
    step = UOp.range(C // U, 4, AxisType.LOOP)
    acc = UOp.placeholder((1,), dtypes.float, 0, addrspace=AddrSpace.REG)
    acc = acc.after(n, s, *thread)[0].set(0.0)
    run, stores = acc.after(step)[0], []
    for u in range(U):
      i = C - 1 - (step * U + u) if rev else step * U + u    # the token's place in its segment
      t, inv = s * C + i, (i + 1).cast(dtypes.float).reciprocal()
      xt = _gated(x, (N, L, D), (n, t, d), t < L).cast(dtypes.float)
      run = run + (xt * inv if rev else xt)
      stores.append(_gated(out, (N, L, D), (n, t, d), t < L).store(run if rev else run * inv))
    loop = UOp.group(*stores, acc[0].store(run)).end(step)
    return _sink(loop.end(n, s, *thread), "segment_mean_bwd" if rev else "segment_mean")
  return fxn

def segment_mean(k:Tensor, C:int) -> Tensor:
  """mc.online_pool as a kernel: p_t = mean of k_j over j in [sC, t], s = t // C, for k (B,H,L,D) of any float dtype -> float32."""
  B, H, L, D = k.shape
  sh, g = (B * H, L, D), _grid(k.device)
  def bwd(gp:UOp, call:UOp) -> tuple:
    dk = _run(_segment_mean_fxn(sh, C, True, g), [Tensor.empty(B * H * L * D, device=k.device)], [Tensor(gp).contiguous()])[0]
    return (None, dk.cast(call.src[2].dtype).uop)
  p = Tensor.empty(B * H * L * D, device=k.device).custom_kernel(k.flatten().contiguous(), fxn=_segment_mean_fxn(sh, C, False, g), grad_fxn=bwd)[0]
  return p.reshape(B, H, L, D)

# **** weights that every token uses ****
# A weight applied to every token gets its gradient by a reduce over all B*L of them, one thread per weight walking them all: the
# GPU idles. These apply it to groups of rows instead, its gradient buffered per group (one reduce per group, then a sum over
# groups). Each is its plain form (x * w, emb[tokens], u @ p^T) with only the gradient's schedule changed.

def _token_groups(T:int) -> int:
  # groups of at least 256 rows: the largest power of two that divides T and leaves that many
  G = 1
  while T % (2 * G) == 0 and T // (2 * G) >= 256: G *= 2
  return G

def scale(x:Tensor, w:Tensor, add:bool=False) -> Tensor:
  """x (..., n) times (or plus) w (n,): a norm's weight, a gate's bias."""
  T, n = math.prod(x.shape[:-1]), x.shape[-1]
  wg = w.reshape(1, 1, n).expand(G := _token_groups(T), 1, n).contiguous_backward()
  xg = x.reshape(G, T // G, n)
  return (xg + wg if add else xg * wg).reshape(x.shape)

def embed(emb:Tensor, tokens:Tensor) -> Tensor:
  """emb (V, D) [tokens] (..., D) as a one-hot reduce over the vocabulary, as tinygrad's own indexing computes it (one thread walking
  all B*L tokens per weight took 2.3 ms of the long shape's step, DEBUG=2 on an H100)."""
  T, (V, D) = math.prod(tokens.shape), emb.shape
  eg = emb.reshape(1, V, D).expand(G := _token_groups(T), V, D).contiguous_backward()
  hot = tokens.reshape(G, T // G, 1) == Tensor.arange(V)                   # (G, T/G, V)
  return (hot.unsqueeze(-1).where(eg.unsqueeze(1), 0.0)).sum(2).reshape(*tokens.shape, D)

# The cache logits z_tn = u_t . p_n of every token against every entry's summary, and their gradients, as kernels of their own:
# tinygrad fused them with the online logit and the softmax into a reduce of 64 blocks whose lanes read rows 2048 values apart
# (1.57 ms of the gpu step on an H100), and reduced dp over each token group in 2048 threads (1.29 ms). Here the lanes run along D.

@functools.cache
def _logits_fxn(T:int, L:int, N:int, D:int, local:bool):
  # z[t, n] = sum_d u[t, d] p[t // L, n, d] in float32 (t: a (batch, head, token) row), lanes along d as rowdot's
  def fxn(z:UOp, u:UOp, p:UOp) -> UOp:
    t, n, k = UOp.range(T, 0), UOp.range(N, 1), UOp.range(D, 2, AxisType.REDUCE)
    acc = (u[t, k].cast(dtypes.float) * p[t // L, n, k].cast(dtypes.float)).reduce(k, arg=Ops.ADD)
    lanes = _row_lanes(D)
    rows = math.gcd(T, 128 // lanes)
    opts = tuple([Opt(OptOps.GROUP, 0, lanes)] * (lanes > 1) + [Opt(OptOps.LOCAL, 0, rows)] * (rows > 1)) if local else ()
    return z[t, n].store(acc).end(t, n).sink(arg=KernelInfo(name="cache_logits", opts_to_apply=opts))
  return fxn

@functools.cache
def _logits_du_fxn(T:int, L:int, N:int, D:int, g:_Grid):
  # du[t, d] = sum_n gz[t, n] p[t // L, n, d]: a thread per (t, d), lanes along d
  def fxn(du:UOp, gz:UOp, p:UOp) -> UOp:
    t, (d, thread) = UOp.range(T, 0), _lanes(D, 1, g)
    n = _red(N, 3)
    acc = _reduce(gz[t, n] * p[t // L, n, d].cast(dtypes.float), n)
    return _sink(du[t, d].store(acc.cast(du.dtype)).end(t, *thread), "cache_logits_du")
  return fxn

@functools.cache
def _logits_dp_fxn(R:int, L:int, N:int, D:int, TG:int, g:_Grid):
  # dpp[r, j, n, d] = sum over the TG tokens t of group j of row r of gz[t, n] u[t, d]: a thread per (r, j, n, d), lanes along d;
  # the caller sums the groups
  def fxn(dpp:UOp, gz:UOp, u:UOp) -> UOp:
    r, j, n = UOp.range(R, 0), UOp.range(L // TG, 1), UOp.range(N, 2)
    d, thread = _lanes(D, 3, g)
    i = _red(TG, 5)
    t = r * L + j * TG + i
    acc = _reduce(gz[t, n] * u[t, d].cast(dtypes.float), i)
    return _sink(dpp[r, j, n, d].store(acc).end(r, j, n, *thread), "cache_logits_dp")
  return fxn

def logits(u:Tensor, p:Tensor) -> Tensor:
  """u (B,H,L,D) @ p (B,H,N,D)^T -> (B,H,L,N) float32: every token against every cache entry's summary. Its reference is
  u.float() @ p.float().transpose(-1, -2)."""
  (B, H, L, D), N = u.shape, p.shape[2]
  if N == 0: return Tensor.zeros(B, H, L, 0, device=u.device)
  R, T, grid = B * H, B * H * L, _grid(u.device)
  def bwd(gz:UOp, call:UOp) -> tuple:
    _, u2, p2 = (Tensor(x) for x in call.src[1:])
    gz, TG = Tensor(gz).contiguous(), math.gcd(L, 64)
    du = Tensor.empty(T, D, dtype=u2.dtype, device=u2.device).custom_kernel(gz, p2, fxn=_logits_du_fxn(T, L, N, D, grid))[0]
    dpp = Tensor.empty(R, L // TG, N, D, device=u2.device).custom_kernel(gz, u2, fxn=_logits_dp_fxn(R, L, N, D, TG, grid))[0]
    return (None, du.uop, dpp.sum(1).cast(p2.dtype).uop)
  fxn = _logits_fxn(T, L, N, D, grid.lanes is AxisType.LOCAL)
  z = Tensor.empty(T, N, device=u.device).custom_kernel(*_c(u.reshape(T, D), p.reshape(R, N, D)), fxn=fxn, grad_fxn=bwd)[0]
  return z.reshape(B, H, L, N)

# **** AdamW ****
# One parameter's AdamW step as one kernel that updates p, m and v in place, the gradient's clipping factor applied inside. Through
# tinygrad's optimizer each parameter took four kernels (m, v, the new p into a buffer of its own, its copy into p), the clipping
# factor applied in two of them. Same arithmetic as tinygrad's AdamW (LAMB with adam=True), op for op. The kernel is given the
# buffers themselves (uop.base): given the parameter tensors, the tied embedding's step was lost at dim 64 (tinygrad had the kernel
# write a copy of it that nothing read afterwards; tests/test_train.py::test_adamw_kernel_matches_tinygrad).

@functools.cache
def _adamw_fxn(n:int, b1:float, b2:float, eps:float, wd:float):
  # c: (1 - b1^t, 1 - b2^t, the gradient's clipping factor, lr)
  def fxn(P:UOp, M:UOp, V:UOp, G:UOp, c:UOp) -> UOp:
    i = UOp.range(n, 0)
    p, g = P[i], G.reshape(n)[i] * c[2]
    m = b1 * M[i] + (1.0 - b1) * g
    v = b2 * V[i] + (1.0 - b2) * (g * g)
    new = p - c[3] * ((m / c[0]) / ((v / c[1]).sqrt() + eps) + wd * p)
    return UOp.group(P[i].store(new), M[i].store(m), V[i].store(v)).end(i).sink(arg=KernelInfo(name="adamw"))
  return fxn

def adamw(p:Tensor, m:Tensor, v:Tensor, g:Tensor, c:Tensor, b1:float, b2:float, eps:float, wd:float) -> list[Tensor]:
  """AdamW on float32 p with moments m, v (realized buffers, all three updated in place) from gradient g; c (4,) float32:
  1 - b1^t, 1 - b2^t, a factor on g (gradient clipping) and the learning rate. Returns the buffers after the step, to realize."""
  for name, t in (("p", p), ("m", m), ("v", v)):
    if not t.uop.is_realized: raise ValueError(f"kernels.adamw: {name} {t.shape} must be a realized buffer (it is updated in place)")
  flat = [Tensor(t.uop.base) for t in (p, m, v)]   # the buffers themselves, not views of them
  return Tensor.custom_kernel(*flat, *_c(g, c), fxn=_adamw_fxn(p.numel(), b1, b2, eps, wd))[:3]

# **** wide blocks ****
# tinygrad 0.14's heuristic gives an elementwise kernel over one flat axis blocks of 32 threads. A GPU then holds half the threads
# it could (32 blocks per multiprocessor) and its memory-bound elementwise kernels run at 0.5-1.3 TB/s: an H200 step at the gpu shape
# went from 55.6 to 50.9 ms with WIDE_BLOCKS threads a block. Only kernels without a reduction change, and only their launch shape:
# the same threads gain more neighbours along the same axes (results are identical). The heuristic also runs in tinygrad's compile
# workers (spawned processes), so their initializer installs it there too. WIDE_BLOCKS=0 in the environment keeps tinygrad's own.
WIDE_BLOCKS = int(os.environ.get("WIDE_BLOCKS", 128))
_hand_coded = _heuristic.hand_coded_optimizations   # tinygrad's own
LANES_LAST = int(os.environ.get("LANES_LAST", 1))

class _NoLocals:
  # a renderer as tinygrad's heuristic sees it when _wide places the lanes itself: the same in all but has_local
  has_local = False
  def __init__(self, ren): self.ren = ren
  def __getattr__(self, name): return getattr(self.ren, name)

def _wide(k):
  if not k.ren.has_local or k.axes_of(AxisType.REDUCE, AxisType.GROUP_REDUCE, AxisType.UNROLL): return _hand_coded(k)
  if LANES_LAST:
    # tinygrad's upcasts, then lanes along the last axis first: it is the output's contiguous one, where the heuristic would put a
    # warp's 32 lanes along an axis that some input is broadcast over (a norm's weight over the tokens), each lane a row apart
    ren, k.ren = k.ren, _NoLocals(k.ren)
    try: k = _hand_coded(k)   # the Scheduler it returns (a copy or k) carries the stand-in until the line below
    finally: k.ren = ren
    threads = 1
    while (fit := next(((a, x) for a in reversed(k.axes_of(AxisType.GLOBAL)) if isinstance(n := k.full_shape[a], int)
                        for x in (32, 16, 8, 4, 2) if threads * x <= WIDE_BLOCKS and n % x == 0), None)) is not None:
      try: k.apply_opt(Opt(OptOps.LOCAL, *fit))
      except KernelOptError: break
      threads *= fit[1]
    return k
  k = _hand_coded(k)
  threads = math.prod(int(k.full_shape[a]) for a in k.axes_of(AxisType.LOCAL))
  for axis in k.axes_of(AxisType.GLOBAL):
    if not isinstance(n := k.full_shape[axis], int): continue
    for x in (8, 4, 2):
      if threads * x > WIDE_BLOCKS or n % x or n // x < 64: continue
      try: k.apply_opt(Opt(OptOps.LOCAL, axis, x))
      except KernelOptError: continue
      threads *= x
      break
  return k

def _init_worker(init=_worker._init_worker):
  _heuristic.hand_coded_optimizations = _wide   # importing this module in the worker to unpickle this function did the rest
  init()

if WIDE_BLOCKS and _heuristic.hand_coded_optimizations.__name__ != "_wide":
  _heuristic.hand_coded_optimizations, _worker._init_worker = _wide, _init_worker

# **** bfloat16 vectors ****
# tinygrad 0.14's memory coalescing folds a thread's adjacent loads and stores into 8- or 16-byte vectors for float, half and the
# integer types, but never for bfloat16: every bfloat16 value of an elementwise kernel moved alone, 2 bytes an instruction. On CUDA
# bfloat16 joins them here: the coalescing pass runs with a view of dtypes that counts bfloat16 among the types it folds (its
# code untouched), and the CUDA source names CUDA's own constructor for a pair (make_bfloat162; the renderer writes the 4- and
# 8-wide structs itself). Alignment is the pass's own: a vector starts at a multiple of its width. BF16_VECTORS=0 keeps tinygrad's.
BF16_VECTORS = int(os.environ.get("BF16_VECTORS", 1))

class _FoldBF16:
  fp8s = (*dtypes.fp8s, dtypes.bfloat16)   # the pass's list of types it folds ends with dtypes.fp8s
  def __getattr__(self, name): return getattr(dtypes, name)

_coalesce_bf16 = types.FunctionType(_coalesce.memory_coalescing.__code__, {**vars(_coalesce), "dtypes": _FoldBF16()})

def _memory_coalescing(sink:UOp, ctx) -> UOp:
  return (_coalesce_bf16 if isinstance(ctx, _CUDARenderer) else _coalesce.memory_coalescing)(sink, ctx)

def _render_kernel(self, *args, **kwargs) -> str:
  src = _cuda_render_kernel(self, *args, **kwargs)
  return src.replace("#include <cuda_bf16.h>", "#include <cuda_bf16.h>\n#define make_nv_bfloat162 make_bfloat162", 1)

_cuda_render_kernel = _CUDARenderer.render_kernel
if BF16_VECTORS and _codegen.memory_coalescing is _coalesce.memory_coalescing:
  _codegen.memory_coalescing, _CUDARenderer.render_kernel = _memory_coalescing, _render_kernel

# **** store hazards, answered once per node ****
# tinygrad 0.14's scheduler asks two questions of every store (an optimizer's assign, a buffer that a kernel writes): does its
# source read the stored buffer at all (rangeify.fix_store_hazard, indexing.realize_store_after_src), and if so, does it reach the
# buffer through a PERMUTE, FLIP or SHRINK outside a CONTIGUOUS, where a kernel would overwrite what it still reads. Each question
# walks the whole source graph: a deep-memory training step has ~2400 stores, and the walks took 20 of the 65 s that scheduling a
# titans step took on this project's 2-core CPU. Here each node's answers are computed once, as bitsets of the buffers it reaches,
# and the second question walks only the nodes whose bits put such a path below them. The scheduled kernels are the same
# (tests/test_kernels_linear.py::test_store_hazards_memoized). FAST_HAZARDS=0 in the environment keeps tinygrad's. tinygrad copies
# a matcher function's globals when it first compiles it, so this takes effect where kernels.py is imported before the first
# schedule (as mc.py, train.py, bench.py do); imported later, tinygrad's walks stay (slower, the same kernels).
FAST_HAZARDS = int(os.environ.get("FAST_HAZARDS", 1))
_LEAVES, _ids = (Ops.BUFFER, Ops.PARAM, Ops.AFTER), itertools.count()   # what a store's base is: a buffer, or one after an assign
_bits, _reads, _walks = weakref.WeakKeyDictionary(), weakref.WeakKeyDictionary(), weakref.WeakKeyDictionary()

def _bit(u:UOp) -> int:
  # a leaf's bit; indices are never reused, so a live node's bits never name a buffer that died
  if u not in _bits: _bits[u] = next(_ids)
  return 1 << _bits[u]

def _memo(u:UOp, memo, srcs, val):
  # memo[n] = val(n, [memo[c] for c in srcs(n)]) for u and everything below it, each node once (iteratively: graphs are deep)
  stack = [u]
  while stack:
    n = stack[-1]
    if n in memo: stack.pop(); continue
    if todo := [c for c in srcs(n) if c not in memo]: stack.extend(todo); continue
    memo[n] = val(n, [memo[c] for c in srcs(n)])
    stack.pop()
  return memo[u]

def _reads_bits(u:UOp) -> int:
  # the leaves u reads, as src.toposort(enter_calls=False) would find them (a CALL's function body not entered)
  srcs = lambda n: n.src[1:] if n.op in (Ops.CALL, Ops.FUNCTION) else n.src
  return _memo(u, _reads, srcs, lambda n, vs: functools.reduce(operator.or_, vs, _bit(n) if n.op in _LEAVES else 0))

def _walk_bits(u:UOp) -> tuple[int, int, int]:
  # below u, never inside a CONTIGUOUS (as fix_store_hazard's gated walk): the leaves reached, those reached from some PERMUTE or FLIP,
  # and those reached from some SHRINK
  def val(n, vs):
    r = functools.reduce(operator.or_, (v[0] for v in vs), _bit(n) if n.op in _LEAVES else 0)
    pf = functools.reduce(operator.or_, (v[1] for v in vs), r if n.op in (Ops.PERMUTE, Ops.FLIP) else 0)
    return r, pf, functools.reduce(operator.or_, (v[2] for v in vs), r if n.op is Ops.SHRINK else 0)
  return _memo(u, _walks, lambda n: [c for c in n.src if c.op is not Ops.CONTIGUOUS], val)

def _src_reads(src:UOp, base:UOp) -> bool:
  return bool(_reads_bits(src) & _bit(base)) if base.op in _LEAVES else base in src.toposort(enter_calls=False)

def _unsafe_path(src:UOp, base:UOp, target:UOp, shrink:bool) -> bool:
  # fix_store_hazard's question, exactly: is there a PERMUTE or FLIP (or, shrink, a SHRINK other than target itself) below src,
  # outside CONTIGUOUS, that reaches base? Walks only the nodes whose bits say such a node lies below them
  b, seen, stack = _bit(base), set(), [src]
  _walk_bits(src)
  below = lambda n: (_walks[n][1] | (_walks[n][2] if shrink else 0)) & b
  while stack:
    n = stack.pop()
    if n in seen: continue
    seen.add(n)
    if (n.op in (Ops.PERMUTE, Ops.FLIP) or (shrink and n.op is Ops.SHRINK and n is not target)) and _walks[n][0] & b: return True
    stack.extend(c for c in n.src if c.op is not Ops.CONTIGUOUS and c not in seen and below(c))
  return False

def _fix_store_hazard(target:UOp, src:UOp, tinygrads):
  base = target.base
  if not _src_reads(src, base): return None
  if base.op not in _LEAVES or src.op is Ops.CONTIGUOUS: return tinygrads(target, src)
  return target.store(src.contiguous()) if _unsafe_path(src, base, target, target.op_in_backward_slice_with_self(Ops.SHRINK)) else None

def _realize_store_after_src(ctx, dest:UOp, src:UOp):
  if _src_reads(src, dest.base): ctx.realize_map[src] = None

def _hazard_trampolines():
  # tinygrad's pattern matchers hold the two functions themselves: their code is swapped for calls of the ones above, which the
  # modules find as globals; fix_store_hazard's own code stays callable for the stores that need its walk
  f = _rangeify.fix_store_hazard
  _rangeify._tinymc_hazard = functools.partial(_fix_store_hazard, tinygrads=types.FunctionType(f.__code__, f.__globals__, f.__name__))
  _indexing._tinymc_realize = _realize_store_after_src
  def fix_store_hazard(target, src): return _tinymc_hazard(target, src)   # noqa: F821 (a global of rangeify)
  def realize_store_after_src(ctx, dest, src): return _tinymc_realize(ctx, dest, src)   # noqa: F821 (a global of indexing)
  f.__code__, _indexing.realize_store_after_src.__code__ = fix_store_hazard.__code__, realize_store_after_src.__code__

if FAST_HAZARDS and not hasattr(_rangeify, "_tinymc_hazard"): _hazard_trampolines()

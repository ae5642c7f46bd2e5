"""
tinymc: Memory Caching in tinygrad.

"Memory Caching: RNNs with Growing Memory", Behrouz et al., arXiv 2602.24281 (equation numbers below are the paper's).
A recurrent memory compresses the past into a fixed-size state and forgets. Memory caching splits the sequence into
segments, caches the memory state at the end of each segment, and lets every token read its online memory plus the
cached ones, so memory grows with the context at O(N L) cost.

Choices the paper leaves open, made here:
- a segment's summary p is the mean of its keys (the paper writes a mean for grm and a sum for ssc);
- logits z = <u_t, p> / sqrt(D), and one softmax over the entries a token reads plus its online memory;
- gates per head and per token, sigmoid(x W + b);
- Titans' update signed so that it descends (Eqs. 34-35 as printed ascend);
- a deep memory takes every inner gradient of a chunk at the chunk-start weights (Titans' parallel form);
- independent compressors start each segment from M0, and the online memory restarts with them;
- post-training caching (agg="mean") is the plain average of the online output and every cached read;
- ssc's top-k runs over past entries only (the online memory is always read), a tie going to the more recent entry.
"""
from __future__ import annotations
import math
from dataclasses import dataclass
from typing import Callable, NamedTuple
import numpy as np
from tinygrad import Device, Tensor, TinyJit, Variable, dtypes
from tinygrad.nn.state import get_state_dict
import kernels

CORES, DEEP, AGGS = ("la", "swla", "dla", "titans"), ("dla", "titans"), ("none", "residual", "grm", "soup", "ssc", "mean")
GATES = {"la": (), "swla": ("a", "b", "l"), "dla": ("e",), "titans": ("a", "b", "e")}
CHOICES = {"mixer": ("mc", "attn"), "core": CORES, "agg": AGGS, "segmentation": ("const", "log"),
           "state_init": ("checkpoint", "independent"), "ssc_mix": ("grm", "soup"), "dtype": ("float32", "float16", "bfloat16")}

@dataclass(frozen=True)
class MCConfig:
  vocab: int = 256                # byte-level tokens
  dim: int = 256                  # model width
  n_layers: int = 4               # blocks
  n_heads: int = 4                # head dim D = dim // n_heads (keys, values, queries and the connector u)
  mixer: str = "mc"               # "mc" memory caching, "attn" causal softmax attention with RoPE (the Transformer baseline)
  core: str = "swla"              # memory core: "la", "swla" (window 2), "dla" (deep linear attention), "titans"
  agg: str = "grm"                # how a token reads the cache: "none", "residual", "grm", "soup", "ssc", "mean"
  segmentation: str = "const"     # "const" segments of `segment` tokens, "log" Fenwick blocks (GRM + log = Log-Linear++)
  segment: int = 256              # segment length C in tokens, a multiple of `chunk`
  state_init: str = "checkpoint"  # "checkpoint" snapshots of one recurrence, "independent" compressors from M0
  topk: int = 2                   # ssc: cached entries each token selects
  ssc_mix: str = "grm"            # ssc: mix the selected entries as grm (outputs) or as soup (weights)
  share_uq: bool = False          # connector u_t = q_t instead of its own projection x_t W_u
  chunk: int = 64                 # block size of the parallel scan; deep cores take their gradients per chunk
  mem_expand: int = 4             # deep memory hidden width E = mem_expand * D
  conv: int = 4                   # causal depthwise conv width on q, k, v (0 = off)
  mlp_mult: float = 8 / 3         # SwiGLU hidden width = mlp_mult * dim, rounded up to a multiple of 32
  rope_theta: float = 10000.0     # attn mixer only
  dtype: str = "float32"          # activation dtype; states, gates, accumulators stay float32 (train.py: bfloat16 on a GPU)
  kernels: bool = True            # use the fused kernels of kernels.py where they apply (same results)

  def __post_init__(self):
    for field, allowed in CHOICES.items():
      if getattr(self, field) not in allowed: raise ValueError(f"MCConfig.{field}={getattr(self, field)!r}: allowed values are {allowed}")
    for field in ("vocab", "dim", "n_layers", "n_heads", "segment", "chunk", "mem_expand", "topk", "conv"):
      x, lo = getattr(self, field), int(field != "conv")
      if type(x) is not int or x < lo: raise ValueError(f"MCConfig.{field}={x!r}: must be an integer >= {lo}")
    for field in ("share_uq", "kernels"):
      if not isinstance(getattr(self, field), bool): raise ValueError(f"MCConfig.{field}={getattr(self, field)!r}: allowed values are (True, False)")
    if self.dim % self.n_heads: raise ValueError(f"MCConfig.dim={self.dim} must be divisible by n_heads={self.n_heads}")
    if self.segment % self.chunk: raise ValueError(f"MCConfig.segment={self.segment} must be a multiple of chunk={self.chunk}")
    if self.mixer == "attn" and self.agg != "none":
      raise ValueError(f"MCConfig.agg={self.agg!r} with mixer='attn': attention caches nothing, allowed values are ('none',)")
    if self.segmentation == "log" and self.state_init == "independent" and self.core in DEEP:
      raise ValueError(f"MCConfig.state_init='independent' with segmentation='log' is defined for the linear cores only: "
                       f"core={self.core!r}, allowed values are ('la', 'swla'), or use state_init='checkpoint'")

# ***** memory cores, chunkwise-parallel *****

def _pad_time(x:Tensor, n:int, axis:int, value:float=0.0) -> Tensor:
  # extra tokens at the end: causal cores never let them reach earlier outputs
  return x if n == 0 else x.pad(tuple((0, n) if i == axis % x.ndim else None for i in range(x.ndim)), value=value)

def decay(lg:Tensor) -> Tensor:
  # lg (..., T) log decays -> P (..., T, T) with P[t, j] = prod_{j<i<=t} exp(lg_i) for j <= t, else 0
  cs, T = lg.cumsum(-1), lg.shape[-1]
  mask = Tensor.ones(T, T, dtype=dtypes.bool, device=lg.device).tril()
  return mask.where(cs.unsqueeze(-1) - cs.unsqueeze(-2), -math.inf).exp()

def linear_scan(q:Tensor, k:Tensor, v:Tensor, la:Tensor|None, b:Tensor|None, l:Tensor|None, M0:Tensor|None,
                chunk:int, segment:int, independent:bool) -> tuple[Tensor, Tensor]:
  """la / swla (Eqs. 12, 28): M_t = a_t M_{t-1} + b_t v_{t-1} k_{t-1}^T + l_t v_t k_t^T, o_t = M_t q_t.
  q, k, v (B,H,L,D); la = log a, b, l (B,H,L) or None for plain la; M0 (H,D,D) or None (zeros).
  Returns o (B,H,L,D) and the state after every complete segment (B,H,L//segment,D,D), as the cache needs them.
  independent: every segment restarts from M0 and its first token's b-term is cut."""
  B, H, L, D = q.shape
  if independent:
    # fold the segments into the batch: each is its own sequence of `segment` tokens
    ns, pad = -(-L // segment), -L % segment
    fold = lambda x: None if x is None else _pad_time(x, pad, 2).reshape(B, H, ns, segment, *x.shape[3:])
    M0 = None if M0 is None else M0.reshape(H, 1, D, D)
    o, S = _linear_chunks(*(fold(x) for x in (q, k, v, la, b, l)), M0, chunk)
    return o.reshape(B, H, ns * segment, D)[:, :, :L], S[:, :, :L // segment, -1]
  o, S = _linear_chunks(q, k, v, la, b, l, M0, chunk)
  return o, S[:, :, segment // chunk - 1::segment // chunk][:, :, :L // segment]

def _linear_chunks(q, k, v, la, b, l, M0, T:int) -> tuple[Tensor, Tensor]:
  # q, k, v (*bs, L, D): one recurrence per leading index. Returns o (*bs, L, D) and the state after each chunk (*bs, Nc, D, D).
  *bs, L, D = q.shape
  Nc, pad = -(-L // T), -L % T
  if la is None: la, l = q.zeros_like()[..., 0], q.ones_like()[..., 0]
  # the b-term pairs token t with the previous token's key and value (Eq. 28); none before the first token
  shift = lambda x: x.pad(tuple([None] * (x.ndim - 2) + [(1, 0), None]))[..., :L, :]
  chunks = lambda x: _pad_time(x, pad, -2 if x.ndim == len(bs) + 2 else -1).reshape(*bs, Nc, T, *x.shape[len(bs) + 1:])
  qc, kc, vc, lac, lc = (chunks(x) for x in (q, k, v, la, l))
  P = decay(lac)                                                             # (*bs, Nc, T, T)
  G = lac.cumsum(-1)                                                         # log decay from the chunk start to t
  o = ((qc @ kc.transpose(-1, -2)) * P * lc.unsqueeze(-2)) @ vc
  wend = (G[..., -1:] - G).exp()                                             # decay from t to the chunk end
  U = (vc * (wend * lc).unsqueeze(-1)).transpose(-1, -2) @ kc                # chunk-local state (*bs, Nc, D, D)
  if b is not None:
    bc, kpc, vpc = chunks(b), chunks(shift(k)), chunks(shift(v))
    o = o + ((qc @ kpc.transpose(-1, -2)) * P * bc.unsqueeze(-2)) @ vpc
    U = U + (vpc * (wend * bc).unsqueeze(-1)).transpose(-1, -2) @ kpc
  # states between chunks: M_end[c] = exp(Gc[c]) M_end[c-1] + U[c], one masked matmul over chunk pairs
  Gc = G[..., -1]                                                            # (*bs, Nc)
  W = decay(Gc)                                                              # (*bs, Nc, Nc)
  Mend = (W @ U.flatten(-2)).reshape(*bs, Nc, D, D)
  M0 = q.zeros_like()[..., :1, :1].expand(*bs, D, D) if M0 is None else M0.expand(*bs, D, D)
  Mend = Mend + Gc.cumsum(-1).exp().unsqueeze(-1).unsqueeze(-1) * M0.unsqueeze(-3)
  Mstart = M0.unsqueeze(-3).cat(Mend[..., :-1, :, :], dim=-3)                # the state carried into each chunk
  o = o + G.exp().unsqueeze(-1) * (qc @ Mstart.transpose(-1, -2))
  return o.reshape(*bs, Nc * T, D)[..., :L, :], Mend

def gelu_grad(h:Tensor) -> Tensor:
  # derivative of the tanh-approximate gelu
  c = math.sqrt(2 / math.pi)
  th = (c * (h + 0.044715 * h ** 3)).tanh()
  return 0.5 * (1 + th) + 0.5 * h * (1 - th * th) * c * (1 + 3 * 0.044715 * h * h)

def deep_grads(core:str, k:Tensor, v:Tensor, W1:Tensor, W2:Tensor) -> tuple[Tensor, Tensor, Tensor]:
  # inner-loss gradient factors at weights (W1 (*,D,E), W2 (*,E,D)) for keys/values (*, T, D), f_W(x) = x + W1 gelu(W2 x)
  # grad_W1 l_t = r_t z_t^T, grad_W2 l_t = d_t k_t^T; returns r (*,T,D), z (*,T,E), d (*,T,E)
  h = k @ W2.transpose(-1, -2)
  z = h.gelu()
  # dla: l = -<f(k), v> (Eq. 31); titans: l = ||f(k) - v||^2 (Eq. 36)
  r = -v if core == "dla" else 2 * (k + z @ W1.transpose(-1, -2) - v)
  return r, z, gelu_grad(h) * (r @ W1)

def deep_scan(core:str, k:Tensor, v:Tensor, gates:dict, W1:Tensor, W2:Tensor, T:int) -> dict:
  """dla (Eqs. 30-33): W_t = W_{t-1} - e_t g_t. titans (Eqs. 34-36, sign fixed): S_t = b_t S_{t-1} - e_t g_t, W_t = a_t W_{t-1} + S_t.
  Within a chunk every g_t is taken at the chunk-start weights, so W_t = alpha_t W_s + beta_t S_s - sum_{j<=t} K[t,j] g_j
  and a read W_t x_t is a masked matmul. k, v (*bs, L, D) with L a multiple of T; W1 (*,D,E), W2 (*,E,D) broadcast to bs.
  Returns the per-chunk factors that deep_read needs and the weights after each chunk."""
  *bs, L, D = k.shape
  Nc, E = L // T, W1.shape[-1]
  kc, vc = k.reshape(*bs, Nc, T, D), v.reshape(*bs, Nc, T, D)
  e = gates["e"].reshape(*bs, Nc, T)
  # cb: a tensor in a buffer of its own, and its gradient too: read by many kernels (the chunks' in a buffer per chunk, so no offsets in
  # their kernels: every chunk runs the same ones), never recomputed in them, nor its gradient for every token
  cb = lambda x: x.contiguous().contiguous_backward()
  if core == "titans":
    la, lb = gates["a"].log().reshape(*bs, Nc, T), gates["b"].log().reshape(*bs, Nc, T)
    Pa, Pb = decay(la), decay(lb)
    K = cb((Pa @ Pb) * e.unsqueeze(-2))                                      # K[t,j] = e_j sum_{m=j..t} Pa[t,m] Pb[m,j]
    alpha, beta = cb(la.cumsum(-1).exp()), cb((Pa @ lb.cumsum(-1).exp().unsqueeze(-1))[..., 0])
    # the weights of g_j in the chunk-end weights and momentum; the chunk-end state [W; S] <- [a W + b S; prod(b) S]
    wts = K[..., -1, :].stack(Pb[..., -1, :] * e, dim=-1)                    # (*bs, Nc, T, 2)
    a_end, b_end, bp = alpha[..., -1:], beta[..., -1:], lb.sum(-1, keepdim=True).exp()
    keep, cross = a_end.cat(a_end, bp, bp, dim=-1), b_end.cat(b_end, b_end.zeros_like(), b_end.zeros_like(), dim=-1)
    coef = keep.cat(cross, dim=-1).unsqueeze(-2).expand(*bs, Nc, T, 8)     # per chunk, repeated over its tokens
  else:
    K = Tensor.ones(T, T, device=k.device).tril() * e.unsqueeze(-2)
    wts, coef = K[..., -1, :].unsqueeze(-1), None
  # every chunk's inputs side by side, so that a chunk copies one buffer: k, v, the weights of its gradients, its state coefficients
  packed = kc.cat(vc, wts, *([] if coef is None else [coef]), dim=-1)      # (*bs, Nc, T, 2D+1 | 2D+10)
  nw = wts.shape[-1]
  # the state X (*bs, 2|4, D, E): [W1, W2^T] and titans' momentum [S1, S2^T], so a chunk updates it in one product and one sum
  X = W1.expand(*bs, D, E).stack(W2.transpose(-1, -2).expand(*bs, D, E), dim=len(bs))
  if core == "titans": X = X.cat(X.zeros_like(), dim=len(bs))
  Xs, rs, zs, ds, Xe = ([] for _ in range(5))
  for c in range(Nc):
    # each slice's gradient in its own buffer: one over the whole packed row would compute every slice's reductions for every column
    inp = packed[..., c, :, :].contiguous()
    kk, vv, w = (inp[..., a:b].contiguous_backward() for a, b in ((0, D), (D, 2 * D), (2 * D, 2 * D + nw)))
    Xs.append(X.contiguous_backward())
    r, z, d = (cb(x) for x in deep_grads(core, kk, vv, X[..., 0, :, :], X[..., 1, :, :].transpose(-1, -2)))
    rs.append(r); zs.append(z); ds.append(d)
    # sum_j w[j] g_j for each weight column w (*bs, nw, D, E): grad_W1 = r z^T, grad_W2^T = k d^T
    wT = w.transpose(-1, -2).unsqueeze(-1)                                   # (*bs, nw, T, 1)
    G1, G2 = (r.unsqueeze(-3) * wT).transpose(-1, -2) @ z.unsqueeze(-3), (kk.unsqueeze(-3) * wT).transpose(-1, -2) @ d.unsqueeze(-3)
    G = G1.stack(G2, dim=-3).flatten(-4, -3)                                 # the rows of X: [W1, W2^T(, S1, S2^T)]
    if core == "titans":
      # a gate's gradient reduced per row first (a buffer of (D, 1)), not by a few threads over the whole state
      cf = inp[..., 0, 2 * D + nw:].reshape(*bs, 2, 4, 1, 1).expand(*bs, 2, 4, D, 1).contiguous_backward()
      X = cf[..., 0, :, :, :] * X + cf[..., 1, :, :, :] * X.reshape(*bs, 2, 2, D, E).flip(-4).reshape(*bs, 4, D, E) - G
    else: X = X - G
    Xe.append(X.contiguous_backward())
  st = lambda xs: Tensor.stack(*xs, dim=len(bs)).contiguous()   # materialise: fused into the reads, Nc-way selects compile slowly
  Xs, Xe = st(Xs), st(Xe)                                        # (*bs, Nc, 2|4, D, E)
  W = lambda X, i: X[..., i, :, :] if i % 2 == 0 else X[..., i, :, :].transpose(-1, -2)
  out = dict(k=kc, K=K, W1=W(Xs, 0), W2=W(Xs, 1), r=st(rs), z=st(zs), d=st(ds), W1e=W(Xe, 0), W2e=W(Xe, 1))
  if core == "titans": out.update(S1=W(Xs, 2), S2=W(Xs, 3), alpha=alpha, beta=beta, S1e=W(X, 2), S2e=W(X, 3))   # S*e: after the last chunk
  return out

def deep_read(m:dict, x:Tensor, W:str) -> Tensor:
  # W_t x_t for W2 (x (*bs, Nc, T, D)) or W1 (x (*bs, Nc, T, E)): the chunk's start weights and momentum, then the masked sum over
  # its gradients, grad_W2 l_j = d_j k_j^T and grad_W1 l_j = r_j z_j^T
  keys, fac = (m["k"], m["d"]) if W == "W2" else (m["z"], m["r"])
  y = x @ m[W].transpose(-1, -2)
  if "alpha" in m: y = m["alpha"].unsqueeze(-1) * y + m["beta"].unsqueeze(-1) * (x @ m["S" + W[1]].transpose(-1, -2))
  # the masked scores (*bs, Nc, T, T) and their gradient in buffers: fused, every output column would recompute its row of them
  return y - (m["K"] * (x @ keys.transpose(-1, -2))).contiguous().contiguous_backward() @ fac

# ***** segments and the cache *****

def fenwick(s:int) -> list[tuple[int, int]]:
  # blocks of the binary decomposition of [0, s) in segment units, largest (oldest) first: 5 -> [(0, 4), (4, 5)]
  ends = [s >> bit << bit for bit in reversed(range(s.bit_length())) if s >> bit & 1]   # s with the bits below each set bit cleared
  return list(zip([0] + ends[:-1], ends))

def cache_plan(n_seg:int, segmentation:str) -> tuple[list[tuple[int, int]], np.ndarray]:
  """The cache entries a sequence of n_seg segments (the last may be partial) needs, as blocks [start, end) in segment units
  ordered by start (so among the entries a token reads, a larger index is more recent), and reads (n_seg, N) bool:
  reads[s, i] says tokens of segment s read entry i. const: P = {0..s-1}; log: the Fenwick blocks of s."""
  per_seg = [[(i, i + 1) for i in range(s)] if segmentation == "const" else fenwick(s) for s in range(n_seg)]
  blocks = sorted({blk for p in per_seg for blk in p})
  reads = np.array([[blk in p for blk in blocks] for p in per_seg], dtype=bool).reshape(n_seg, len(blocks))
  return blocks, reads

def pooled(k:Tensor, blocks:list, C:int) -> Tensor:
  # p^(i) = mean of k_j over the tokens of entry i (B,H,N,D), from per-segment key sums
  ns = max(b for _, b in blocks)
  ksum = k[:, :, :ns * C].reshape(*k.shape[:2], ns, C, k.shape[-1]).sum(-2)
  sel = np.array([[1 / ((b - a) * C) if a <= s < b else 0 for s in range(ns)] for a, b in blocks], dtype=np.float32)
  return kernels.const(sel, k.device) @ ksum

def online_pool(k:Tensor, C:int) -> Tensor:
  # p_t^on = mean of k_j over j in [sC, t], causal inside the token's segment (B,H,L,D): the reference of kernels.segment_mean
  B, H, L, D = k.shape
  ns = -(-L // C)
  # the running mean as a (C, C) lower-triangular averaging matmul: tinygrad's cumsum of a C-long axis is a windowed reduce
  avg = Tensor.ones(C, C).tril() / Tensor.arange(1, C + 1).reshape(C, 1)
  cs = avg.cast(k.dtype) @ _pad_time(k, ns * C - L, 2).reshape(B, H, ns, C, D)
  return cs.reshape(B, H, ns * C, D)[:, :, :L]

# the entries each token reads (L,N): from reads (n_seg,N), or a decode step's (1,N) Tensor of the live entries
def _mask(reads, C:int, L:int, dev) -> Tensor: return reads if isinstance(reads, Tensor) else kernels.const(np.repeat(reads, C, axis=0)[:L], dev)

# ***** aggregation: what a token reads from its online memory and the cache *****

# each aggregation's weights of the online output (B,H,L) and of every entry (B,H,L,N), from the logits and readable entries (L,N)
def _residual(z, z_on, mask, topk): return z_on.ones_like(), mask.float().expand(z.shape)                  # Eq. 7: all ones

def _mean(z, z_on, mask, topk):
  # post-training caching: a uniform average over the online output and every readable entry
  n = 1 + mask.float().sum(-1, keepdim=True)
  return n[..., 0].reciprocal().expand(z_on.shape), mask.float().expand(z.shape) / n

def _softmax(z, z_on, mask, topk):
  # Eq. 10 normalised: one softmax over the online logit and the readable entries
  g = z_on.unsqueeze(-1).cat(mask.where(z, -math.inf), dim=-1).softmax(-1)
  return g[..., 0], g[..., 1:]

def _ssc(z, z_on, mask, topk):
  # Eq. 16: the topk readable entries with the largest logits, a tie going to the more recent (larger index); Eq. 17: grm over them
  N = z.shape[-1]
  idx, sel, avail = Tensor.arange(N), mask.zeros_like(), mask
  for _ in range(min(topk, N)):
    zz = avail.where(z, -math.inf)
    cand = avail & (zz == zz.max(-1, keepdim=True))
    best = cand & (idx == cand.where(idx, -1).max(-1, keepdim=True))
    sel, avail = sel | best, avail & best.logical_not()
  return _softmax(z, z_on, sel, topk)

class Agg(NamedTuple):
  weights: Callable|None  # as above; None reads nothing (the base RNN)
  mix: str|None           # what a deep memory mixes: "grm" its outputs (Eq. 9), "soup" its weights (Eq. 15), None as cfg.ssc_mix
  linear: str             # the read of a linear memory as cache_read names it: mixing its weights is mixing its outputs
  routed: bool            # reads the logits <u_t, p>, so the layer makes the connector u

AGG = {"none": Agg(None, None, "none", False), "residual": Agg(_residual, "grm", "residual", False), "mean": Agg(_mean, "grm", "mean", False),
       "grm": Agg(_softmax, "grm", "grm", True), "soup": Agg(_softmax, "soup", "grm", True), "ssc": Agg(_ssc, None, "ssc", True)}

def cache_read_ref(q:Tensor, o:Tensor, M:Tensor, z:Tensor, z_on:Tensor, reads:np.ndarray, segment:int, agg:str, topk:int) -> Tensor:
  """y_t = g_t^on o_t + sum_i g_t^(i) M^(i) q_t for linear cores (agg: residual, mean, grm or ssc). q, o (B,H,L,D), M (B,H,N,D,D),
  z (B,H,L,N), z_on (B,H,L), reads (n_seg, N) bool. The reference of kernels.cache_read."""
  w_on, w = AGG[agg].weights(z, z_on, _mask(reads, segment, q.shape[2], q.device), topk)
  # sum_i w_i M_i q = [w_0 q, w_1 q, ...] @ [M_0^T; M_1^T; ...]: one matmul over (entry, key dim)
  y = (w.unsqueeze(-1) * q.unsqueeze(-2)).flatten(-2) @ M.transpose(-1, -2).flatten(-3, -2)
  return w_on.unsqueeze(-1) * o + y

def read_cache(cfg:MCConfig, q:Tensor, o:Tensor, u:Tensor, cache:dict, p_on:Tensor, reads:np.ndarray, C:int, fused:bool=False,
               online:tuple|None=None) -> Tensor:
  """Eq. 5 for a block of tokens: y_t = g_t^on o_t + sum_i g_t^(i) M^(i)(q_t) over the entries i it reads, g as cfg.agg says. q, o
  (the online outputs), u, p_on (the online summaries) (B,H,L,D); cache: the entries' "M" (B,H,N,D,D) or "W1", "W2", and summaries
  "p" (B,H,N,D); reads[s, i]: segment s (C tokens) reads entry i (or a Tensor mask (L,N)); fused: kernels.cache_read; online: (read2,
  read1) of the online W_t."""
  agg, D = AGG[cfg.agg], q.shape[-1]
  if agg.weights is None: return o
  z, z_on = kernels.logits(u, cache["p"]) / math.sqrt(D), kernels.rowdot(u, p_on) / math.sqrt(D)    # Eqs. 10, 16
  if "M" in cache: return (kernels.cache_read if fused else cache_read_ref)(q, o, cache["M"], z, z_on, reads, C, agg.linear, cfg.topk)
  g_on, g = agg.weights(z, z_on, _mask(reads, C, q.shape[2], q.device), cfg.topk)
  W1, W2, g_on, g = cache["W1"], cache["W2"], g_on.unsqueeze(-1), g.permute(0, 1, 3, 2).unsqueeze(-1)   # W (B,H,N,...), g (B,H,N,L,1)
  if (agg.mix or cfg.ssc_mix) == "soup":
    # Eq. 15: y_t = f_{W*_t}(q_t) with W*_t = g^on W_t + sum_i g^(i) W^(i), for both weight matrices
    read2, read1 = online
    h = (g_on * read2(q) + (g * (q.unsqueeze(2) @ W2.transpose(-1, -2))).sum(2)).gelu()
    return q + g_on * read1(h) + (g * (h.unsqueeze(2) @ W1.transpose(-1, -2))).sum(2)
  c = q.unsqueeze(2) + (q.unsqueeze(2) @ W2.transpose(-1, -2)).gelu() @ W1.transpose(-1, -2)       # f_{W^(i)}(q_t) (B,H,N,L,D)
  return g_on * o + (g * c).sum(2)                                                                  # Eq. 9

# ***** memory_mix: one layer's memory, chunkwise *****

def _check(q, k, v, u, gates, cfg, init):
  for name, x in (("k", k), ("v", v), ("u", u)):
    if x.shape != q.shape: raise ValueError(f"memory_mix: {name}.shape={x.shape} must equal q.shape={q.shape} (B,H,L,D)")
  for g in GATES[cfg.core]:
    if g not in gates: raise ValueError(f"memory_mix: core={cfg.core!r} needs gates {GATES[cfg.core]}, missing {g!r}")
    if gates[g].shape != q.shape[:3]: raise ValueError(f"memory_mix: gates[{g!r}].shape={gates[g].shape} must be (B,H,L)={q.shape[:3]}")
  if cfg.core in DEEP and (init is None or "W1" not in init or "W2" not in init):
    raise ValueError(f"memory_mix: core={cfg.core!r} needs init={{'W1': (H,D,E), 'W2': (H,E,D)}}, the learned initial weights")

def _entries(S:Tensor, blocks:list, indep:bool) -> Tensor|None:
  # the cached states (B,H,N,...) from the states at segment ends S (B,H,ns,...): for checkpoints the snapshot at each block's end,
  # for independent const segments each segment's own compressor
  if not blocks: return None
  return S[:, :, :len(blocks)] if indep else Tensor.stack(*[S[:, :, e - 1] for _, e in blocks], dim=2)

def scan_linear(q, k, v, gates, init, blocks, cfg, fused) -> tuple[Tensor, dict, None]:
  # la / swla: the online outputs and the cached states M from the chunkwise scan (Eqs. 4, 12, 28), fused or the reference
  scan = kernels.chunk_scan if fused else linear_scan
  la, b, l = (gates["a"].log(), gates["b"], gates["l"]) if gates else (None, None, None)
  M0, indep = None if init is None else init["M"].float(), cfg.state_init == "independent"
  o, S = scan(q, k, v, la, b, l, M0, cfg.chunk, cfg.segment, indep)
  if not blocks or not (indep and cfg.segmentation == "log"): return o, {"M": _entries(S, blocks, indep)}, None
  # log + independent: each Fenwick block is compressed on its own; a block of 2^j segments is one scan's aligned segment
  lvl = {j: scan(q, k, v, la, b, l, M0, cfg.chunk, cfg.segment << j, True)[1] for j in {(e - a).bit_length() - 1 for a, e in blocks}}
  return o, {"M": Tensor.stack(*[lvl[(e - a).bit_length() - 1][:, :, a // (e - a)] for a, e in blocks], dim=2)}, None

def scan_deep(q, k, v, gates, init, blocks, cfg, fused) -> tuple[Tensor, dict, tuple]:
  # dla / titans: the online outputs, the cached weights and the readers of the per-token online weights from the chunked scan
  # (Eqs. 30-36), over the whole sequence (checkpoint) or over every segment folded into the batch as its own sequence (independent)
  B, H, L, D = q.shape
  C, T, indep = cfg.segment, cfg.chunk, cfg.state_init == "independent"
  Lp, bs = (-(-L // C) * C, (B, H, -(-L // C))) if indep else (-(-L // T) * T, (B, H))
  # padded tokens write nothing (e = 0) and keep decays finite (a = b = 1: log 0 would turn the decay matrices into NaN)
  fold = lambda x, pad=0.0: _pad_time(x, Lp - L, 2, pad).reshape(*bs, -1, *x.shape[3:])
  W1, W2 = (init[w].float().unsqueeze(1) if indep else init[w].float() for w in ("W1", "W2"))              # (H,[1,]...)
  m = deep_scan(cfg.core, fold(k), fold(v), {g: fold(x, 0.0 if g == "e" else 1.0) for g, x in gates.items()}, W1, W2, T)
  read = lambda W, x: deep_read(m, fold(x).reshape(*bs, -1, T, x.shape[-1]), W).reshape(B, H, Lp, -1)[:, :, :L]
  read2, read1 = (lambda x: read("W2", x)), (lambda h: read("W1", h))
  ends = lambda W: W[:, :, :, -1] if indep else W[:, :, C // T - 1::C // T]                # the weights at each segment's end
  # the hidden layer and its gelu in buffers: the gradients' kernels would recompute them for every column
  o = q + read1(read2(q).contiguous().gelu().contiguous())                                 # Eq. 33: o_t = f_{W_t}(q_t)
  cache = {"W1": _entries(ends(m["W1e"]), blocks, indep), "W2": _entries(ends(m["W2e"]), blocks, indep)}
  if "S1e" in m and not indep: cache.update(S1=m["S1e"], S2=m["S2e"])                     # titans' momentum after the last token
  return o, cache, (read2, read1)

# each core's chunkwise pass: (q, k, v, gates, init, blocks, cfg, fused) -> o (B,H,L,D), the cached states, the online readers
SCANS = {"la": scan_linear, "swla": scan_linear, "dla": scan_deep, "titans": scan_deep}

def memory_mix(q:Tensor, k:Tensor, v:Tensor, u:Tensor, gates:dict, cfg:MCConfig, init:dict|None=None, state:dict|None=None) -> Tensor:
  """Memory caching for one layer. q, k, v, u (B,H,L,D) used as given; gates dict of (B,H,L) in (0,1); init None or
  {"M": (H,D,D)} for linear cores, {"W1": (H,D,E), "W2": (H,E,D)} for deep cores. Returns y (B,H,L,D).
  state: a decode state (mem_init's) that receives the memory after the last token, which must end a segment (assigned lazily)."""
  _check(q, k, v, u, gates, cfg, init)
  dt, L = q.dtype, q.shape[2]
  q, k, v, u = (x.float() for x in (q, k, v, u))
  gates = {g: gates[g].float() for g in GATES[cfg.core]}
  C, fused = cfg.segment, cfg.kernels and kernels.applies(q)
  # with a state, also the entries that the token after the last one reads
  blocks, reads = cache_plan(-(-L // C) + (state is not None), cfg.segmentation)
  o, cache, online = SCANS[cfg.core](q, k, v, gates, init, blocks, cfg, fused)
  if not blocks: return o.cast(dt)                                           # no segment is complete: nothing is cached yet
  cache["p"] = pooled(k, blocks, C).contiguous()                           # read by every token: made once
  if state is not None: _fill(state, cfg, blocks, reads[-1], cache, k, v, gates, init, L)
  p_on = (kernels.segment_mean if fused else online_pool)(k, C)                # Eq. 10's online summary (B,H,L,D)
  return read_cache(cfg, q, o, u, cache, p_on, reads[:-(-L // C)], C, fused, online).cast(dt)

# ***** the recurrence token by token: decoding, and the obviously-right reference of memory_mix *****

def _fresh(cfg:MCConfig, B:int, H:int, D:int, init:dict|None) -> dict:
  # the online memory at the start (and at every independent segment's start): M0, or W0 and no momentum
  if cfg.core not in DEEP: return {"M": (Tensor.zeros(H, D, D) if init is None else init["M"].float()).expand(B, H, D, D)}
  W = {x: init[x].float().expand(B, *init[x].shape) for x in ("W1", "W2")}
  return {**W, "S1": W["W1"].zeros_like(), "S2": W["W2"].zeros_like()}

# 2^j of log slot N-1-j, the largest first
def _levels(N:int) -> Tensor: return kernels.const(2 ** (N - 1 - np.arange(N, dtype=np.int32)), Device.DEFAULT)

def mem_init(cfg:MCConfig, B:int, H:int, D:int, init:dict|None, max_len:int) -> dict:
  """A decode state of fixed shape, realized: the online memory ("M", the previous token's "pk", "pv"; or "W1", "W2", titans' momentum
  "S1", "S2", the chunk-start "Ws1", "Ws2"), the online key sum "ksum", and the cache in N slots, "E" + an entry's field (state, "ksum",
  count "n", 0 where empty). const: slot i holds segment i; log: slot N-1-j the Fenwick block of 2^j segments, and for independent
  compressors "R" each level's compressor since its block started. The layer's conv keeps its last inputs in "conv"."""
  st = {**_fresh(cfg, B, H, D, init), "ksum": Tensor.zeros(B, H, D)}
  if cfg.conv: st["conv"] = Tensor.zeros(B, max(cfg.conv - 1, 1), 3 * H * D)
  st.update({f"Ws{i}": _fresh(cfg, B, H, D, init)[f"W{i}"] for i in (1, 2)} if cfg.core in DEEP else {x: Tensor.zeros(B, H, D) for x in ("pk", "pv")})
  if AGG[cfg.agg].weights is not None:
    N = max(1, -(-max_len // cfg.segment) if cfg.segmentation == "const" else (max_len // cfg.segment).bit_length())   # const: s < N
    st.update({"E" + x: Tensor.zeros(B, H, N, *st[x].shape[2:]) for x in ("M", "W1", "W2", "ksum") if x in st}, En=Tensor.zeros(N))
    if cfg.segmentation == "log" and cfg.state_init == "independent": st["R"] = Tensor.zeros(B, H, N, D, D)
  return {x: t.contiguous().realize() for x, t in st.items()}

def _fill(st:dict, cfg:MCConfig, blocks:list, mine:np.ndarray, cache:dict, k:Tensor, v:Tensor, gates:dict, init:dict|None, L:int):
  # assigns the decode state after token L-1, the end of segment s: the online memory (an independent one restarts at the next token)
  # and the entries that a token of segment s reads (mine[i]: block i), in their slots
  C, s, last = cfg.segment, L // cfg.segment, [e for _, e in blocks].index(L // cfg.segment)   # last: the block that ends at s
  new = {x: cache[x][:, :, last] for x in ("M", "W1", "W2") if x in cache} | {x: cache[x] for x in ("S1", "S2") if x in cache}
  if "M" in cache: new.update(pk=k[:, :, L - 1], pv=v[:, :, L - 1])
  if "En" in st:
    N, n = st["En"].shape[0], np.array([(e - a) * C for a, e in blocks], np.float32)
    slot = [a if cfg.segmentation == "const" else N - (e - a).bit_length() for a, e in blocks]
    onehot = np.array([[m and i == j for i, m in zip(slot, mine)] for j in range(N)], np.float32)   # (N, entries): block -> its slot
    ent = {x: cache[x] for x in ("M", "W1", "W2") if x in cache} | {"ksum": cache["p"] * Tensor(n).reshape(-1, 1)}
    put = lambda x: (Tensor(onehot) @ x.flatten(3)).reshape(*x.shape[:2], N, *x.shape[3:])
    new.update({"E" + x: put(val) for x, val in ent.items()}, En=Tensor(onehot @ n))
  if "R" in st:
    # level j's compressor of its block so far, segments s - s % 2^j .. s-1 (none where its next block starts at s)
    la, b, l = (gates["a"].log(), gates["b"], gates["l"]) if gates else (None, None, None)
    M0, span = None if init is None else init["M"].float(), lambda x, a: None if x is None else x[:, :, a * C:L]
    R = [linear_scan(*(span(x, s - s % 2 ** j) for x in (k, k, v, la, b, l)), M0, cfg.chunk, s % 2 ** j * C, True)[1][:, :, 0]
         if s % 2 ** j else Tensor.zeros(*k.shape[:2], k.shape[-1], k.shape[-1]) for j in reversed(range(st["R"].shape[2]))]
    new["R"] = Tensor.stack(*R, dim=2)
  for x, val in new.items(): st[x].assign(val)

def _outer(x:Tensor, y:Tensor) -> Tensor: return x.unsqueeze(-1) * y.unsqueeze(-2)
def _mat(x:Tensor) -> Tensor: return x.unsqueeze(-1).unsqueeze(-1)   # a per-(batch, head) scalar (B,H) that scales matrices (B,H,1,1)

def step_linear(st:dict, q:Tensor, k:Tensor, v:Tensor, g:dict, cfg:MCConfig, pos:Tensor, fresh:dict) -> tuple[Tensor, None]:
  # la / swla, one token: update M (and log + independent's level compressors R) in st, return o_t = M_t q_t
  first = pos % cfg.segment == 0
  def upd(M:Tensor, restart:Tensor) -> Tensor:
    # M (B,H,n,D,D): Eq. 28 (12); a compressor that restarts here starts from M0 without b-term (nor has token 0: pk, pv are 0)
    M, vk = restart.where(fresh["M"].unsqueeze(2), M), _outer(v, k).unsqueeze(2)
    if not g: return M + vk
    a, l, b = (g[x].reshape(*g[x].shape, 1, 1, 1) for x in ("a", "l", "b"))
    return a * M + l * vk + b * restart.where(0, _outer(st["pv"], st["pk"]).unsqueeze(2))
  # log + independent: level j restarts at the start of every 2^j-th segment
  if "R" in st: st["R"] = upd(st["R"], ((pos // cfg.segment % _levels(st["R"].shape[2]) == 0) & first).reshape(-1, 1, 1))
  st.update(M=upd(st["M"].unsqueeze(2), (first & (cfg.state_init == "independent")).reshape(1, 1, 1))[:, :, 0], pk=k, pv=v)
  return (st["M"] @ q.unsqueeze(-1))[..., 0], None

def step_deep(st:dict, q:Tensor, k:Tensor, v:Tensor, g:dict, cfg:MCConfig, pos:Tensor, fresh:dict) -> tuple[Tensor, tuple]:
  # dla / titans, one token with its gradient at the chunk-start weights Ws: update st, return o_t = f_{W_t}(q_t) and W_t's readers
  if cfg.state_init == "independent": st.update({x: (pos % cfg.segment == 0).where(val, st[x]) for x, val in fresh.items()})
  st.update({f"Ws{i}": (pos % cfg.chunk == 0).where(st[f"W{i}"], st[f"Ws{i}"]) for i in (1, 2)})
  r, z, d = deep_grads(cfg.core, k.unsqueeze(-2), v.unsqueeze(-2), st["Ws1"], st["Ws2"])
  g1, g2 = _outer(r[..., 0, :], z[..., 0, :]), _outer(d[..., 0, :], k)
  e = _mat(g["e"])
  if cfg.core == "dla": st.update(W1=st["W1"] - e * g1, W2=st["W2"] - e * g2)                     # Eq. 32
  else:
    ga, gb = _mat(g["a"]), _mat(g["b"])
    st.update(S1=gb * st["S1"] - e * g1, S2=gb * st["S2"] - e * g2)                                 # Eq. 35, signed to descend
    st.update(W1=ga * st["W1"] + st["S1"], W2=ga * st["W2"] + st["S2"])                             # Eq. 34
  W1, W2 = st["W1"], st["W2"]
  read2, read1 = (lambda x: x @ W2.transpose(-1, -2)), (lambda h: h @ W1.transpose(-1, -2))
  return q + read1(read2(q.unsqueeze(-2)).gelu())[..., 0, :], (read2, read1)

# each core's token step: (state, q, k, v, gates, cfg, position, the fresh memory) -> o (B,H,D) and the online readers, st updated
STEPS = {"la": step_linear, "swla": step_linear, "dla": step_deep, "titans": step_deep}

def mem_step(st:dict, q:Tensor, k:Tensor, v:Tensor, u:Tensor, g:dict, cfg:MCConfig, init:dict|None, var:Variable) -> tuple[Tensor, dict]:
  """One token at position var (a bound Variable): update the online memory, read it and the live cache slots, and at a segment's
  last token write its state into a slot. q, k, v, u (B,H,D); g dict of (B,H) gates; st mem_init's state. Returns y (B,H,D) and
  the new state (const's slot is written in place). Work grows with the cache's slots, not with the tokens seen."""
  C, pos, st = cfg.segment, Tensor(var), dict(st)
  st["ksum"] = (pos % C == 0).where(0, st["ksum"]) + k                      # the online segment's key sum
  o, online = STEPS[cfg.core](st, q, k, v, g, cfg, pos, _fresh(cfg, *q.shape, init))
  if "En" not in st: return o, st
  E = {x[1:]: val for x, val in st.items() if x[0] == "E"}
  cache = {x: E[x] for x in ("M", "W1", "W2") if x in E} | {"p": E["ksum"] / E["n"].maximum(1).reshape(-1, 1)}
  p_on = (st["ksum"] / (pos % C + 1).float()).unsqueeze(-2)
  # memory_mix's read for a block of one token over the live slots
  y = read_cache(cfg, *(x.unsqueeze(-2) for x in (q, o, u)), cache, p_on, (E["n"] > 0).reshape(1, -1), 1, online=online)[..., 0, :]
  # at a segment's last token its state and key sum become an entry (Eq. 4): const, in slot s, in place (one slot, a Variable slice;
  # the read above masks it); log, in level j = the lowest set bit of s+1, with the key sums of the levels below j, which empty
  last, s1, Y = pos % C == C - 1, pos // C + 1, {x: st[x].unsqueeze(2) for x in ("M", "W1", "W2", "ksum") if x in E}
  if cfg.segmentation == "const":
    sl = slice(var // C, var // C + 1)
    for x, val in Y.items(): st["E" + x][:, :, sl].assign(last.where(val, st["E" + x][:, :, sl]))
    return y, {**st, "En": ((Tensor.arange(E["n"].shape[0]) == s1 - 1) & last).where(C, st["En"])}
  unit = _levels(E["n"].shape[0])
  land, carry = (s1 % unit == 0) & (s1 % (2 * unit) != 0) & last, (s1 % (2 * unit) == 0) & last
  Y.update(n=carry.where(E["n"], 0).sum() + C, ksum=Y["ksum"] + carry.reshape(-1, 1).where(E["ksum"], 0).sum(2, keepdim=True))
  if "R" in st: Y["M"] = st["R"]
  st.update({"E" + x: land.reshape(-1, *[1] * (E[x].ndim - 3)).where(Y[x], E[x]) for x in E})   # land (N,) against (B,H,N,...)
  return y, {**st, "En": carry.where(0, st["En"])}

# ***** the token mixers, the block and the model *****

# a projection in the activation dtype: kernels.linear where its weight gradient splits over the tokens, else x @ w, its gradient buffered
def _lin(x:Tensor, w:Tensor, fused:bool) -> Tensor:
  return kernels.linear(x, w) if fused and kernels.linear_applies(x) else (x @ w.cast(x.dtype)).contiguous_backward()
def _init(fan_in:int, *shape:int, scale:float=1.0) -> Tensor: return Tensor.uniform(*shape, low=-(b := scale / math.sqrt(fan_in)), high=b)
def _norm(x:Tensor, fused:bool, eps:float, rms:bool=True, swap:bool=False) -> Tensor:
  # over the last axis in float32: RMSNorm without its weight, or L2 normalisation (rms=False); fused: kernels.norm, same results.
  # swap: x (B, A1, A2, n) -> the result as (B, A2, A1, n), the move between (B,L,H,D) and (B,H,L,D) made by the norm's stores
  if fused: return kernels.norm(x, eps, rms, swap)
  y = x.float() * (x.float().square().mean(-1, keepdim=True) + eps).rsqrt() if rms else x.float().normalize(dim=-1, eps=eps)
  return y.transpose(1, 2) if swap else y
def _rms(x:Tensor, w:Tensor, fused:bool, swap:bool=False) -> Tensor: return kernels.scale(_norm(x, fused, 1e-6, swap=swap), w).cast(x.dtype)
def _heads(x:Tensor, H:int) -> Tensor: return x.reshape(*x.shape[:2], H, -1).transpose(1, 2)      # (B,L,H*D) -> (B,H,L,D)
# the causal depthwise conv on q, k, v (B,L,C): y_t = sum_i w_i x_{t-W+1+i} per channel, zeros before the first token. Made once, its
# gradient too: else every reduction that reads it (the q and k norms) recomputes it. The reference of kernels.causal_conv
def causal_conv_ref(x:Tensor, w:Tensor) -> Tensor:
  return sum(x.pad((None, (w.shape[0] - 1, 0), None))[:, i:i + x.shape[1]] * w[i] for i in range(w.shape[0])).contiguous().contiguous_backward()

# gate biases at init: sigmoid(4.6) ~ 0.99 for retention a, sigmoid(-2.2) ~ 0.1 for the inner learning rate e
GATE_BIAS = {"a": 4.6, "b": 0.0, "l": 0.0, "e": -2.2}

class Memory:
  """Memory caching on the projections x Wqkv: causal depthwise conv -> SiLU -> heads, L2-normalised q, k -> the connector u and the
  per-head gates -> memory_mix (B,H,L,D)."""
  def __init__(self, cfg:MCConfig):
    self.cfg, dim, H = cfg, cfg.dim, cfg.n_heads
    if cfg.conv: self.conv = _init(cfg.conv, cfg.conv, 3 * dim)
    if not cfg.share_uq and AGG[cfg.agg].routed: self.wu = _init(dim, dim, dim)
    self.gate_names = GATES[cfg.core]
    if self.gate_names:
      self.wg = _init(dim, dim, len(self.gate_names) * H, scale=0.1)
      self.bg = Tensor(np.repeat([GATE_BIAS[g] for g in self.gate_names], H).astype(np.float32))
    # a deep memory's learned initial weights W0, its state at the start of the sequence (and of every independent segment)
    D, E = dim // H, cfg.mem_expand * (dim // H)
    self.W0 = {"W1": _init(E, H, D, E), "W2": _init(D, H, E, D)} if cfg.core in DEEP else None

  def _inputs(self, h:Tensor, qkv:Tensor):
    # post-conv q,k,v (B,L,3dim) -> heads, L2-normalised q,k, the connector u and the gates, all (B,H,L,...)
    H = self.cfg.n_heads
    q, k, v = qkv.silu().chunk(3, dim=-1)
    # q, k L2-normalised per head, read as (B,L,H,D) rows (each row's D features adjacent in memory), stored as heads (B,H,L,D)
    q, k = (_norm(x.reshape(*x.shape[:2], H, -1), self.cfg.kernels, 1e-12, rms=False, swap=True).cast(h.dtype) for x in (q, k))
    v = _heads(v, H)
    u = _heads(_lin(h, self.wu, self.cfg.kernels), H) if hasattr(self, "wu") else q   # Eq. 10: u_t = x_t W_u, or q_t
    if not self.gate_names: return q, k, v, u, {}
    g = kernels.scale(_lin(h, self.wg, self.cfg.kernels).float(), self.bg, add=True).sigmoid().reshape(*h.shape[:2], len(self.gate_names), H)
    return q, k, v, u, {n: g[:, :, i].transpose(1, 2) for i, n in enumerate(self.gate_names)}   # gates (B,H,L)

  def __call__(self, h:Tensor, qkv:Tensor, st:dict|None=None) -> Tensor:
    # st: a decode state to fill with the memory after the last token (prefill)
    w, L = self.cfg.conv, qkv.shape[1]
    if st is not None and w: st["conv"].assign(qkv.pad((None, (st["conv"].shape[1], 0), None))[:, L:].float())
    if w: qkv = (kernels.causal_conv if self.cfg.kernels else causal_conv_ref)(qkv, self.conv.cast(qkv.dtype))
    return memory_mix(*self._inputs(h, qkv), self.cfg, self.W0, st)

  def init_state(self, B:int, max_len:int) -> dict: return mem_init(self.cfg, B, self.cfg.n_heads, self.cfg.dim // self.cfg.n_heads, self.W0, max_len)

  def step(self, h:Tensor, qkv:Tensor, st:dict, pos:Variable) -> Tensor:
    # one token (B,1,...) at position pos -> y (B,H,1,D); the state's new values are assigned to it
    new = dict(st)
    if self.cfg.conv:
      window = st["conv"].cast(qkv.dtype).cat(qkv, dim=1)                 # the last inputs, this one included
      new["conv"], qkv = window[:, 1:].float(), (window[:, -self.cfg.conv:] * self.conv.cast(qkv.dtype)).sum(1, keepdim=True)
    q, k, v, u, gates = self._inputs(h, qkv)
    y, new = mem_step(new, *(x[:, :, 0].float() for x in (q, k, v, u)), {n: g[:, :, 0] for n, g in gates.items()}, self.cfg, self.W0, pos)
    for x in [x for x, val in new.items() if val is not st[x]]: st[x].assign(new[x])
    return y.unsqueeze(2).cast(h.dtype)

def rope_table(L:int, D:int, theta:float, device:str|None=None) -> tuple[Tensor, Tensor]:
  # cos and sin (L, D/2) of the rotary angles of positions 0..L-1, computed in float64 (device buffers made once)
  ang = np.arange(L, dtype=np.float64)[:, None] * theta ** (-np.arange(0, D // 2, dtype=np.float64) * 2 / D)[None]
  return tuple(kernels.const(f(ang).astype(np.float32), device or Device.DEFAULT) for f in (np.cos, np.sin))

def rope(x:Tensor, cos:Tensor, sin:Tensor) -> Tensor:
  # rotary position embedding on (B,H,L,D), rotating the two halves of D by the angles of cos, sin (L, D/2)
  x1, x2, cos, sin = *x.chunk(2, dim=-1), cos.cast(x.dtype), sin.cast(x.dtype)
  return (x1 * cos - x2 * sin).cat(x2 * cos + x1 * sin, dim=-1)

class Attention:
  """Causal softmax attention with RoPE on the plain projections x Wqkv (no conv, no L2 norm): the Transformer baseline. Decoding keeps
  a key/value cache (B,H,max_len,D) written in place at the position, a Variable, and reads its first pos+1 entries."""
  def __init__(self, cfg:MCConfig): self.cfg = cfg

  def init_state(self, B:int, max_len:int) -> dict:
    H, D = self.cfg.n_heads, self.cfg.dim // self.cfg.n_heads
    k, v = (Tensor.zeros(B, H, max_len, D, dtype=self.cfg.dtype).contiguous().realize() for _ in range(2))
    return dict(zip(("k", "v", "cos", "sin"), (k, v, *rope_table(max_len, D, self.cfg.rope_theta))))

  def _qkv(self, qkv:Tensor, cos:Tensor, sin:Tensor) -> list[Tensor]:
    q, k, v = (_heads(x, self.cfg.n_heads) for x in qkv.chunk(3, dim=-1))
    # q and k materialized after the rotation (their gradients too): the score products then run alone, on tensor cores where they can
    return [rope(q, cos, sin).contiguous().contiguous_backward(), rope(k, cos, sin).contiguous().contiguous_backward(), v]

  def __call__(self, h:Tensor, qkv:Tensor, st:dict|None=None) -> Tensor:
    q, k, v = self._qkv(qkv, *rope_table(qkv.shape[1], self.cfg.dim // self.cfg.n_heads, self.cfg.rope_theta, qkv.device))
    if st is not None:
      for x, val in (("k", k), ("v", v)): st[x].assign(val.pad((None, None, (0, st[x].shape[2] - val.shape[2]), None)))
    return q.scaled_dot_product_attention(k, v, is_causal=True)

  def step(self, h:Tensor, qkv:Tensor, st:dict, pos:Variable) -> Tensor:
    q, k, v = self._qkv(qkv, st["cos"][pos:pos + 1], st["sin"][pos:pos + 1])
    for x, val in (("k", k), ("v", v)): st[x][:, :, pos:pos + 1].assign(val)   # the reads below come after the write
    return q.scaled_dot_product_attention(st["k"][:, :, :pos + 1], st["v"][:, :, :pos + 1])

MIXERS = {"mc": Memory, "attn": Attention}

class Block:
  """x -> RMSNorm -> x Wqkv -> the token mixer -> per-head RMSNorm -> times SiLU(x Wgate) -> Wo -> residual; then a SwiGLU MLP with
  pre-RMSNorm and a residual. The mixer is memory caching, or attention for the Transformer baseline (the same block otherwise)."""
  def __init__(self, cfg:MCConfig):
    dim, hidden, out_scale = cfg.dim, -(-int(cfg.mlp_mult * cfg.dim) // 32) * 32, 1 / math.sqrt(2 * cfg.n_layers)
    self.norm1, self.norm2, self.onorm = Tensor.ones(dim), Tensor.ones(dim), Tensor.ones(dim // cfg.n_heads)
    self.wqkv, self.wgate, self.wo = _init(dim, dim, 3 * dim), _init(dim, dim, dim), _init(dim, dim, dim, scale=out_scale)
    self.w1, self.w3, self.w2 = _init(dim, dim, hidden), _init(dim, dim, hidden), _init(hidden, hidden, dim, scale=out_scale)
    # last, after the block's own weights: seeded random weights depend on the order they are drawn in
    self.mixer, self.fused = MIXERS[cfg.mixer](cfg), cfg.kernels   # fused: projections through kernels.linear

  def _out(self, x:Tensor, h:Tensor, y:Tensor) -> Tensor:
    # y (B,H,L,D) -> per-head RMSNorm, stored as (B,L,H,D) -> gate -> Wo -> residual
    y = _rms(y, self.onorm, self.fused, swap=True).reshape(*h.shape)
    return x + _lin(y * _lin(h, self.wgate, self.fused).silu(), self.wo, self.fused)

  def mix(self, x:Tensor, st:dict|None=None, pos:Variable|None=None) -> Tensor:
    # the token mixer with its residual, no MLP (the layer that the memory-caching package's MemoryCachingLayer is); st: a decode
    # state to fill (prefill), or with the position pos, to step one token x (B,1,dim) through
    h = _rms(x, self.norm1, self.fused)
    qkv = _lin(h, self.wqkv, self.fused)                                      # q, k, v = x W (Eq. 4)
    return self._out(x, h, self.mixer(h, qkv, st) if pos is None else self.mixer.step(h, qkv, st, pos))

  def mlp(self, x:Tensor) -> Tensor:
    # the SwiGLU MLP with pre-RMSNorm and a residual
    # h W1 and h W3 as one product (h read once; one kernel makes both halves' gradients, and one product takes them back to h)
    h = _rms(x, self.norm2, self.fused)
    a, b = _lin(h, self.w1.cat(self.w3, dim=1), self.fused).chunk(2, dim=-1)
    return x + _lin(a.silu() * b, self.w2, self.fused)

  def __call__(self, x:Tensor, st:dict|None=None, pos:Variable|None=None) -> Tensor: return self.mlp(self.mix(x, st, pos))
  # the parameters mix uses: all but the MLP's
  def mix_params(self) -> list[Tensor]: return [p for n, p in get_state_dict(self).items() if n not in ("norm2", "w1", "w2", "w3")]

DECODE_LEN = 4096   # init_state's default max_len, and prefill's beyond the prompt: 8x the default preset's training context
def _tensors(blocks:list[dict]) -> list[Tensor]: return [x for st in blocks for x in st.values()]   # a decode state's buffers

class Model:
  """Byte embedding -> n_layers blocks -> RMSNorm -> head tied to the embedding."""
  def __init__(self, cfg:MCConfig):
    self.cfg = cfg
    self.emb = Tensor.normal(cfg.vocab, cfg.dim, std=0.02)
    self.blocks = [Block(cfg) for _ in range(cfg.n_layers)]
    self.norm = Tensor.ones(cfg.dim)

  # logits (B,L,vocab) as float32 from a product in the activation dtype (float32 accumulators, rounded to it), as under PyTorch's autocast
  def head(self, x:Tensor) -> Tensor: return _lin(_rms(x, self.norm, self.cfg.kernels), self.emb.T, self.cfg.kernels).float()

  def __call__(self, tokens:Tensor, state:dict|None=None) -> Tensor:
    # tokens (B,L) int -> logits (B,L,vocab) float32; state: a decode state that receives the memory after the last token (prefill)
    x = kernels.embed(self.emb, tokens).cast(self.cfg.dtype)
    for i, blk in enumerate(self.blocks): x = blk(x, None if state is None else state["blocks"][i])
    return self.head(x)

  def init_state(self, B:int, max_len:int|None=None) -> dict:
    """A decode state of fixed shape for B sequences of up to max_len tokens (default DECODE_LEN): each block's (mem_init), "t"
    the next position."""
    max_len = DECODE_LEN if max_len is None else max_len
    return {"t": 0, "max_len": max_len, "B": B, "blocks": [blk.mixer.init_state(B, max_len) for blk in self.blocks]}

  def prefill(self, tokens:Tensor|np.ndarray, max_len:int|None=None) -> tuple[Tensor, dict]:
    """tokens (B,T) -> logits (B,T,vocab) and the decode state after token T-1, room for max_len tokens (default T + DECODE_LEN).
    The parallel forward runs to the last segment end (attention: to T); the tokens after it are stepped."""
    toks, T = np.asarray(tokens.numpy() if isinstance(tokens, Tensor) else tokens, dtype=np.int32), tokens.shape[1]
    state = self.init_state(toks.shape[0], T + DECODE_LEN if max_len is None else max_len)
    if T > state["max_len"]: raise ValueError(f"prefill: {T} tokens are past max_len={state['max_len']}")
    T0, out = T if self.cfg.mixer == "attn" else T // self.cfg.segment * self.cfg.segment, []
    if T0: out, state["t"] = [self(Tensor(toks[:, :T0]), state).realize(*_tensors(state["blocks"]))], T0
    if T0 < T: out.append(Tensor(np.stack([self.step(Tensor(toks[:, t]), state)[0].numpy() for t in range(T0, T)], 1)))
    return out[0].cat(*out[1:], dim=1), state

  def _step(self, blocks:list[dict], tokens:Tensor, pos:Variable) -> Tensor:
    x = kernels.embed(self.emb, tokens.reshape(-1, 1)).cast(self.cfg.dtype)
    for blk, st in zip(self.blocks, blocks): x = blk(x, st, pos)
    return self.head(x)[:, 0].realize(*_tensors(blocks))

  def step(self, tokens:Tensor, state:dict) -> tuple[Tensor, dict]:
    """One token per sequence (B,) at position state["t"] -> logits (B,vocab) (alive until the state's next step) and the state,
    updated in place. The state carries its TinyJit, its buffers baked in and the position a bound Variable: one capture serves
    every token, and a replay rebinds nothing else (rebinding 30 state buffers took 3 ms of host time a token on an H100)."""
    t, max_len, B = state["t"], state["max_len"], state["B"]
    if t >= max_len: raise ValueError(f"step: position {t} is past max_len={max_len}; prefill or init_state with a larger max_len")
    if tokens.shape != (B,): raise ValueError(f"step: tokens of shape {tokens.shape}, the state is for ({B},)")
    if state.get("model") is not self:
      blocks = state["blocks"]
      state["model"], state["jit"] = self, TinyJit(lambda tokens, pos: self._step(blocks, tokens, pos))
    state["t"] = t + 1
    return state["jit"](tokens.contiguous().realize(), Variable("pos", 0, max_len - 1).bind(t)), state

  def generate(self, prompt:Tensor|np.ndarray, n:int, temperature:float=1.0, seed:int=0) -> np.ndarray:
    # prefill the prompt, then sample n tokens (temperature 0 = greedy); returns (B, T+n) int
    toks = np.asarray(prompt.numpy() if isinstance(prompt, Tensor) else prompt, dtype=np.int32)
    logits, state = self.prefill(toks, toks.shape[1] + n)
    rng, out, lg = np.random.default_rng(seed), [toks], logits[:, -1]
    for i in range(n):
      # a sample of softmax(logits / temperature): the argmax after adding Gumbel noise
      lg = lg.numpy().astype(np.float64) / (temperature or 1) + (rng.gumbel(size=lg.shape) if temperature else 0)
      out.append(lg.argmax(-1)[:, None].astype(np.int32))
      if i < n - 1: lg, state = self.step(Tensor(out[-1][:, 0]), state)
    return np.concatenate(out, axis=1)

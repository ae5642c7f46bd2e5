"""
tinymc: Memory Caching in tinygrad.

"Memory Caching: RNNs with Growing Memory", Behrouz et al., arXiv 2602.24281 (equation numbers below are the paper's).
A recurrent memory compresses the past into a fixed-size state and forgets. Memory caching splits the sequence into
segments, caches the memory state at the end of each segment, and lets every token read its online memory plus the
cached ones, so memory grows with the context at O(N L) cost.

The file reads top-down:
1) MCConfig: every knob, validated.
2) memory cores, chunkwise-parallel (what training uses): la / swla as chunked scans, dla / titans as per-chunk
   gradient steps whose per-token weights are read with masked matmuls (the TTT/Titans parallel form).
3) segments and the cache: which cached entries a token reads (const or log segmentation), their states and summaries.
4) aggregation: residual, grm, soup, ssc, mean, picked in one dict by cfg.agg.
5) memory_mix: sections 2-4 for one layer.
6) the token-by-token recurrence (decoding), which doubles as the obviously-right reference of memory_mix.
7) the layer, block and model, with recurrent decoding.
Choices the paper leaves open are fixed in SPEC.md section 9: mean-of-keys summaries, logits scaled by 1/sqrt(D), one
softmax over the read entries plus the online memory, per-head gates, Titans' sign fixed so that it descends, deep
gradients taken at the chunk-start weights, and an independent online memory that restarts at each segment.
"""
from __future__ import annotations
import math
from dataclasses import dataclass
import numpy as np
from tinygrad import Tensor, TinyJit, dtypes
from tinygrad.nn.state import get_state_dict
from tinygrad.uop.ops import Ops
import kernels

CORES, AGGS = ("la", "swla", "dla", "titans"), ("none", "residual", "grm", "soup", "ssc", "mean")
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
  dtype: str = "float32"          # activation dtype; memory states, gates and accumulators stay float32
  kernels: bool = True            # use the fused kernels of kernels.py where they apply (same results)

  def __post_init__(self):
    for field, allowed in CHOICES.items():
      if getattr(self, field) not in allowed: raise ValueError(f"MCConfig.{field}={getattr(self, field)!r}: allowed values are {allowed}")
    for field in ("vocab", "dim", "n_layers", "n_heads", "segment", "chunk", "mem_expand", "topk"):
      if type(getattr(self, field)) is not int or getattr(self, field) < 1:
        raise ValueError(f"MCConfig.{field}={getattr(self, field)!r}: must be an integer >= 1")
    if type(self.conv) is not int or self.conv < 0: raise ValueError(f"MCConfig.conv={self.conv!r}: must be an integer >= 0")
    for field in ("share_uq", "kernels"):
      if not isinstance(getattr(self, field), bool): raise ValueError(f"MCConfig.{field}={getattr(self, field)!r}: allowed values are (True, False)")
    if self.dim % self.n_heads: raise ValueError(f"MCConfig.dim={self.dim} must be divisible by n_heads={self.n_heads}")
    if self.segment % self.chunk: raise ValueError(f"MCConfig.segment={self.segment} must be a multiple of chunk={self.chunk}")
    if self.mixer == "attn" and self.agg != "none":
      raise ValueError(f"MCConfig.agg={self.agg!r} with mixer='attn': attention caches nothing, allowed values are ('none',)")
    if self.segmentation == "log" and self.state_init == "independent" and self.core in ("dla", "titans"):
      raise ValueError(f"MCConfig.state_init='independent' with segmentation='log' is defined for the linear cores only: "
                       f"core={self.core!r}, allowed values are ('la', 'swla'), or use state_init='checkpoint'")

# ***** memory cores, chunkwise-parallel *****

def _pad_time(x:Tensor, n:int, axis:int, value:float=0.0) -> Tensor:
  # extra tokens at the end: causal cores never let them reach earlier outputs
  if n == 0: return x
  return x.pad(tuple((0, n) if i == axis % x.ndim else None for i in range(x.ndim)), value=value)

def _pad_gates(gates:dict, n:int, axis:int) -> dict:
  # padded tokens write nothing (e = 0) and keep decays finite (a = b = 1: log 0 would turn the decay matrices into NaN)
  return {g: _pad_time(x, n, axis, 0.0 if g == "e" else 1.0) for g, x in gates.items()}

def decay(lg:Tensor) -> Tensor:
  # lg (..., T) log decays -> P (..., T, T) with P[t, j] = prod_{j<i<=t} exp(lg_i) for j <= t, else 0
  cs = lg.cumsum(-1)
  T = lg.shape[-1]
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
  step = segment // chunk
  return o, S[:, :, step - 1::step][:, :, :L // segment]

def _linear_chunks(q, k, v, la, b, l, M0, T:int) -> tuple[Tensor, Tensor]:
  # q, k, v (*bs, L, D): one recurrence per leading index. Returns o (*bs, L, D) and the state after each chunk (*bs, Nc, D, D).
  *bs, L, D = q.shape
  Nc, pad = -(-L // T), -L % T
  if la is None: la, l = q.zeros_like()[..., 0], q.ones_like()[..., 0]
  # the b-term pairs token t with the previous token's key and value (Eq. 28); none before the first token
  shift = lambda x: x.pad(tuple([None] * (x.ndim - 2) + [(1, 0), None]))[..., :L, :]
  chunks = lambda x: _pad_time(x, pad, -2 if x.ndim == len(bs) + 2 else -1).reshape(*bs, Nc, T, *x.shape[len(bs) + 1:])
  qc, kc, vc = (chunks(x) for x in (q, k, v))
  lac, lc = chunks(la), chunks(l)
  P = decay(lac)                                                             # (*bs, Nc, T, T)
  G = lac.cumsum(-1)                                                         # log decay from the chunk start to t
  A = (qc @ kc.transpose(-1, -2)) * P * lc.unsqueeze(-2)
  o = A @ vc
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
  Returns the per-chunk factors that deep_read2 / deep_read1 need and the weights after each chunk."""
  *bs, L, D = k.shape
  Nc = L // T
  kc, vc = k.reshape(*bs, Nc, T, D), v.reshape(*bs, Nc, T, D)
  e = gates["e"].reshape(*bs, Nc, T)
  if core == "titans":
    la, lb = gates["a"].log().reshape(*bs, Nc, T), gates["b"].log().reshape(*bs, Nc, T)
    Pa, Pb = decay(la), decay(lb)
    K = (Pa @ Pb) * e.unsqueeze(-2)                                          # K[t,j] = e_j sum_{m=j..t} Pa[t,m] Pb[m,j]
    alpha, beta = la.cumsum(-1).exp(), (Pa @ lb.cumsum(-1).exp().unsqueeze(-1))[..., 0]
    mom, bprod = Pb[..., -1, :] * e, lb.sum(-1).exp()                        # weight of g_j in the chunk-end momentum; prod b
  else:
    K = Tensor.ones(T, T, device=k.device).tril() * e.unsqueeze(-2)
  W1, W2 = W1.expand(*bs, *W1.shape[-2:]), W2.expand(*bs, *W2.shape[-2:])
  S1, S2 = W1.zeros_like(), W2.zeros_like()
  W1s, W2s, S1s, S2s, rs, zs, ds, W1e, W2e = ([] for _ in range(9))
  # cb: a per-chunk factor in a buffer of its own, and its gradient too (else tinygrad fuses each chunk's gradient into the
  # scatter back to (Nc, T) and recomputes it for every token)
  cb = lambda x: x.contiguous().contiguous_backward()
  for c in range(Nc):
    # this chunk's inputs in buffers of their own, so every chunk runs the same kernels (compiled once)
    kk, vv, kl = kc[..., c, :, :].contiguous(), vc[..., c, :, :].contiguous(), cb(K[..., c, -1, :].unsqueeze(-1))
    r, z, d = deep_grads(core, kk, vv, W1, W2)
    W1s.append(W1); W2s.append(W2); S1s.append(S1); S2s.append(S2); rs.append(r); zs.append(z); ds.append(d)
    # sum_j K[T-1, j] g_j: every gradient of the chunk as it stands in the chunk's last weights
    g1, g2 = (r * kl).transpose(-1, -2) @ z, (d * kl).transpose(-1, -2) @ kk
    if core == "titans":
      a_end, b_end, m = cb(alpha[..., c, -1, None, None]), cb(beta[..., c, -1, None, None]), cb(mom[..., c, :].unsqueeze(-1))
      bp = cb(bprod[..., c, None, None])
      W1, W2, S1, S2 = (a_end * W1 + b_end * S1 - g1, a_end * W2 + b_end * S2 - g2,
                        bp * S1 - (r * m).transpose(-1, -2) @ z, bp * S2 - (d * m).transpose(-1, -2) @ kk)
    else: W1, W2 = W1 - g1, W2 - g2
    W1e.append(W1); W2e.append(W2)
  st = lambda xs: Tensor.stack(*xs, dim=len(bs)).contiguous()   # materialise: fused into the reads, Nc-way selects compile slowly
  out = dict(k=kc, K=K, W1=st(W1s), W2=st(W2s), r=st(rs), z=st(zs), d=st(ds), W1e=st(W1e), W2e=st(W2e))
  if core == "titans": out.update(S1=st(S1s), S2=st(S2s), alpha=alpha, beta=beta)
  return out

def _wread(m:dict, x:Tensor, W:str, S:str, keys:Tensor, fac:Tensor) -> Tensor:
  # W_t x_t for x (*bs, Nc, T, in): start weights, momentum, then the masked sum over this chunk's gradients
  y = x @ m[W].transpose(-1, -2)
  if "alpha" in m: y = m["alpha"].unsqueeze(-1) * y + m["beta"].unsqueeze(-1) * (x @ m[S].transpose(-1, -2))
  return y - (m["K"] * (x @ keys.transpose(-1, -2))) @ fac

def deep_read2(m:dict, x:Tensor) -> Tensor: return _wread(m, x, "W2", "S2", m["k"], m["d"])   # W2_t x_t (*bs, Nc, T, E)
def deep_read1(m:dict, h:Tensor) -> Tensor: return _wread(m, h, "W1", "S1", m["z"], m["r"])   # W1_t h_t (*bs, Nc, T, D)

# ***** segments and the cache *****

def fenwick(s:int) -> list[tuple[int, int]]:
  # blocks of the binary decomposition of [0, s) in segment units, largest (oldest) first: 5 -> [(0, 4), (4, 5)]
  out, a = [], 0
  for bit in reversed(range(s.bit_length())):
    if s >> bit & 1: out, a = out + [(a, a + (1 << bit))], a + (1 << bit)
  return out

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
  B, H, L, D = k.shape
  ns = max(b for _, b in blocks)
  ksum = k[:, :, :ns * C].reshape(B, H, ns, C, D).sum(-2)
  sel = np.array([[1 / ((b - a) * C) if a <= s < b else 0 for s in range(ns)] for a, b in blocks], dtype=np.float32)
  return Tensor(sel, device=k.device) @ ksum

def online_pool(k:Tensor, C:int) -> Tensor:
  # p_t^on = mean of k_j over j in [sC, t], causal inside the token's segment (B,H,L,D)
  B, H, L, D = k.shape
  ns = -(-L // C)
  # the running mean as a (C, C) lower-triangular averaging matmul: tinygrad's cumsum of a C-long axis is a windowed reduce
  avg = Tensor.ones(C, C).tril() / Tensor.arange(1, C + 1).reshape(C, 1)
  cs = avg.cast(k.dtype) @ _pad_time(k, ns * C - L, 2).reshape(B, H, ns, C, D)
  return cs.reshape(B, H, ns * C, D)[:, :, :L]

def token_reads(reads:np.ndarray, C:int, L:int) -> np.ndarray: return np.repeat(reads, C, axis=0)[:L]   # (L, N)

# ***** aggregation: the weights each variant gives the online memory and the cached entries *****

def ssc_select(z:Tensor, mask:Tensor, topk:int) -> Tensor:
  # Eq. 16: the topk readable entries with the largest logits; on a tie the more recent (larger index) wins
  N = z.shape[-1]
  idx = Tensor.arange(N)
  sel, avail = mask.zeros_like(), mask
  for _ in range(min(topk, N)):
    zz = avail.where(z, -math.inf)
    cand = avail & (zz == zz.max(-1, keepdim=True))
    best = cand & (idx == cand.where(idx, -1).max(-1, keepdim=True))
    sel, avail = sel | best, avail & best.logical_not()
  return sel

def _softmax_weights(z:Tensor, z_on:Tensor, mask:Tensor) -> tuple[Tensor, Tensor]:
  # one softmax over the online logit and the readable entries (Eq. 10 normalised)
  g = z_on.unsqueeze(-1).cat(mask.where(z, -math.inf), dim=-1).softmax(-1)
  return g[..., 0], g[..., 1:]

AGG_WEIGHTS = {
  "residual": lambda z, z_on, mask, topk: (z_on.ones_like(), mask.float().expand(z.shape)),                                   # Eq. 7
  "mean": lambda z, z_on, mask, topk: ((1 + mask.float().sum(-1)).reciprocal().expand(z_on.shape), mask.float().expand(z.shape) / (1 + mask.float().sum(-1, keepdim=True))),
  "grm": lambda z, z_on, mask, topk: _softmax_weights(z, z_on, mask),                                        # Eqs. 9-10
  "soup": lambda z, z_on, mask, topk: _softmax_weights(z, z_on, mask),                                       # Eq. 15's weights
  "ssc": lambda z, z_on, mask, topk: _softmax_weights(z, z_on, ssc_select(z, mask, topk)),                   # Eq. 17
}

def cache_read_ref(q:Tensor, o:Tensor, M:Tensor, z:Tensor, z_on:Tensor, reads:np.ndarray, segment:int, agg:str, topk:int) -> Tensor:
  """y_t = g_t^on o_t + sum_i g_t^(i) M^(i) q_t for linear cores, soup == grm there. q, o (B,H,L,D), M (B,H,N,D,D),
  z (B,H,L,N), z_on (B,H,L), reads (n_seg, N) bool. The reference of kernels.cache_read."""
  L = q.shape[2]
  mask = Tensor(token_reads(reads, segment, L), device=q.device)
  w_on, w = AGG_WEIGHTS[agg](z, z_on, mask, topk)
  # sum_i w_i M_i q = [w_0 q, w_1 q, ...] @ [M_0^T; M_1^T; ...]: one matmul over (entry, key dim)
  y = (w.unsqueeze(-1) * q.unsqueeze(-2)).flatten(-2) @ M.transpose(-1, -2).flatten(-3, -2)
  return w_on.unsqueeze(-1) * o + y

def deep_entry_read(q:Tensor, W1:Tensor, W2:Tensor, w:Tensor) -> Tensor:
  # sum_i w_i f_{W^(i)}(q_t): q (B,H,L,D), W1 (B,H,N,D,E), W2 (B,H,N,E,D), w (B,H,L,N)
  h = (q.unsqueeze(2) @ W2.transpose(-1, -2)).gelu()                         # (B,H,N,L,E)
  c = q.unsqueeze(2) + h @ W1.transpose(-1, -2)                              # (B,H,N,L,D)
  return (w.permute(0, 1, 3, 2).unsqueeze(-1) * c).sum(2)

def deep_soup_read(q:Tensor, W1:Tensor, W2:Tensor, w_on:Tensor, w:Tensor, read2, read1) -> Tensor:
  # Eq. 15: y_t = f_{W*_t}(q_t), W*_t = g^on W_t + sum_i g^(i) W^(i) for both weight matrices; read2/read1 apply the online W_t
  wt = w.permute(0, 1, 3, 2).unsqueeze(-1)                                   # (B,H,N,L,1)
  h = (w_on.unsqueeze(-1) * read2(q) + (wt * (q.unsqueeze(2) @ W2.transpose(-1, -2))).sum(2)).gelu()
  return q + w_on.unsqueeze(-1) * read1(h) + (wt * (h.unsqueeze(2) @ W1.transpose(-1, -2))).sum(2)

# ***** memory_mix: sections 2-4 for one layer *****

def _check(q, k, v, u, gates, cfg, init):
  for name, x in (("k", k), ("v", v), ("u", u)):
    if x.shape != q.shape: raise ValueError(f"memory_mix: {name}.shape={x.shape} must equal q.shape={q.shape} (B,H,L,D)")
  for g in GATES[cfg.core]:
    if g not in gates: raise ValueError(f"memory_mix: core={cfg.core!r} needs gates {GATES[cfg.core]}, missing {g!r}")
    if gates[g].shape != q.shape[:3]: raise ValueError(f"memory_mix: gates[{g!r}].shape={gates[g].shape} must be (B,H,L)={q.shape[:3]}")
  if cfg.core in ("dla", "titans") and (init is None or "W1" not in init or "W2" not in init):
    raise ValueError(f"memory_mix: core={cfg.core!r} needs init={{'W1': (H,D,E), 'W2': (H,E,D)}}, the learned initial weights")

def memory_mix(q:Tensor, k:Tensor, v:Tensor, u:Tensor, gates:dict, cfg:MCConfig, init:dict|None=None) -> Tensor:
  """Memory caching for one layer (SPEC sections 2-4). q, k, v, u (B,H,L,D) used as given; gates dict of (B,H,L) in (0,1);
  init None or {"M": (H,D,D)} for linear cores, {"W1": (H,D,E), "W2": (H,E,D)} for deep cores. Returns y (B,H,L,D)."""
  _check(q, k, v, u, gates, cfg, init)
  dt = q.dtype
  q, k, v, u = (x.float() for x in (q, k, v, u))
  gates = {g: gates[g].float() for g in GATES[cfg.core]}
  B, H, L, D = q.shape
  C, indep = cfg.segment, cfg.state_init == "independent"
  blocks, reads = cache_plan(-(-L // C), cfg.segmentation)
  if cfg.core in ("la", "swla"):
    scan = kernels.chunk_scan if cfg.kernels and kernels.applies(q) else linear_scan
    la, b, l = (gates["a"].log(), gates["b"], gates["l"]) if cfg.core == "swla" else (None, None, None)
    M0 = None if init is None else init["M"].float()
    o, S = scan(q, k, v, la, b, l, M0, cfg.chunk, C, indep)
    if cfg.agg == "none" or not blocks: return o.cast(dt)
    if not indep: M = Tensor.stack(*[S[:, :, e - 1] for _, e in blocks], dim=2)
    elif cfg.segmentation == "const": M = S[:, :, :len(blocks)]
    else:
      # log + independent: each Fenwick block is compressed on its own; a block of 2^j segments is one scan's aligned segment
      lvl = {j: scan(q, k, v, la, b, l, M0, cfg.chunk, C << j, True)[1] for j in {(e - a).bit_length() - 1 for a, e in blocks}}
      M = Tensor.stack(*[lvl[(e - a).bit_length() - 1][:, :, a // (e - a)] for a, e in blocks], dim=2)
    z, z_on = _logits(u, k, blocks, C)
    read = kernels.cache_read if cfg.kernels and kernels.applies(q) else cache_read_ref
    return read(q, o, M, z, z_on, reads, C, "grm" if cfg.agg == "soup" else cfg.agg, cfg.topk).cast(dt)
  # deep cores: the chunked scan over the whole sequence, or over every segment folded into the batch
  T, ns = cfg.chunk, -(-L // C)
  W1, W2 = init["W1"].float(), init["W2"].float()
  if indep:
    fold = lambda x: _pad_time(x, ns * C - L, 2).reshape(B, H, ns, C, *x.shape[3:])
    m = deep_scan(cfg.core, fold(k), fold(v), {g: x.reshape(B, H, ns, C) for g, x in _pad_gates(gates, ns * C - L, 2).items()}, W1.unsqueeze(1), W2.unsqueeze(1), T)
    chunked = lambda x: fold(x).reshape(B, H, ns, C // T, T, x.shape[-1])
    unchunk = lambda y: y.reshape(B, H, ns * C, y.shape[-1])[:, :, :L]
    ends = lambda W: W[:, :, :, -1]                                          # (B,H,ns,...) weights at each segment's end
  else:
    Lp = -(-L // T) * T
    m = deep_scan(cfg.core, _pad_time(k, Lp - L, 2), _pad_time(v, Lp - L, 2), _pad_gates(gates, Lp - L, 2), W1, W2, T)
    chunked = lambda x: _pad_time(x, Lp - L, 2).reshape(B, H, Lp // T, T, x.shape[-1])
    unchunk = lambda y: y.reshape(B, H, Lp, y.shape[-1])[:, :, :L]
    ends = lambda W: W[:, :, C // T - 1::C // T]
  read2 = lambda x: unchunk(deep_read2(m, chunked(x)))
  read1 = lambda h: unchunk(deep_read1(m, chunked(h)))
  if cfg.agg == "none" or not blocks: return (q + read1(read2(q).gelu())).cast(dt)
  W1c, W2c = ends(m["W1e"]), ends(m["W2e"])
  # checkpoint: the snapshot at the block's end; independent (const only): the segment's own compressor
  pick = (lambda W: Tensor.stack(*[W[:, :, e - 1] for _, e in blocks], dim=2)) if not indep else (lambda W: W[:, :, :len(blocks)])
  W1c, W2c = pick(W1c), pick(W2c)
  z, z_on = _logits(u, k, blocks, C)
  w_on, w = AGG_WEIGHTS[cfg.agg](z, z_on, Tensor(token_reads(reads, C, L), device=q.device), cfg.topk)
  if cfg.agg == "soup" or (cfg.agg == "ssc" and cfg.ssc_mix == "soup"): return deep_soup_read(q, W1c, W2c, w_on, w, read2, read1).cast(dt)
  o = q + read1(read2(q).gelu())
  return (w_on.unsqueeze(-1) * o + deep_entry_read(q, W1c, W2c, w)).cast(dt)

def _logits(u:Tensor, k:Tensor, blocks:list, C:int) -> tuple[Tensor, Tensor]:
  # z^(i) = <u_t, p^(i)> / sqrt(D) (B,H,L,N) and z^on = <u_t, p_t^on> / sqrt(D) (B,H,L)
  D = u.shape[-1]
  return (u @ pooled(k, blocks, C).transpose(-1, -2)) / math.sqrt(D), (u * online_pool(k, C)).sum(-1) / math.sqrt(D)

# ***** the recurrence token by token: decoding, and the obviously-right reference of memory_mix *****

def mem_init(cfg:MCConfig, B:int, H:int, D:int, init:dict|None, device=None) -> dict:
  # the online memory, its running key sum, and the cache; "t" counts the tokens seen
  st = {"t": 0, "ksum": Tensor.zeros(B, H, D, device=device).contiguous(), "n": Tensor.zeros(1, device=device).contiguous(), "entries": []}
  if cfg.core in ("la", "swla"):
    M0 = Tensor.zeros(H, D, D, device=device) if init is None else init["M"].float()
    return {**st, "M": M0.expand(B, H, D, D), "prev": None, "A": Tensor.ones(B, H, device=device), "c": Tensor.zeros(B, H, device=device)}
  W1, W2 = init["W1"].float().expand(B, *init["W1"].shape), init["W2"].float().expand(B, *init["W2"].shape)
  return {**st, "W1": W1, "W2": W2, "Ws": (W1, W2), "S1": W1.zeros_like(), "S2": W2.zeros_like()}

def _outer(x:Tensor, y:Tensor) -> Tensor: return x.unsqueeze(-1) * y.unsqueeze(-2)

def _merge(X:dict, Y:dict, M0:Tensor|None, core:str, indep:bool) -> dict:
  # two adjacent log blocks become one, as a binary counter carries; pooled means merge by count
  out = {**Y, "ksum": X["ksum"] + Y["ksum"], "n": X["n"] + Y["n"]}
  if indep:
    # the union's compressor: X decayed through Y, Y's own tokens, and Y's first b-term that now reaches X's last token (Eq. 28)
    A, c = Y["A"].unsqueeze(-1).unsqueeze(-1), Y["c"].unsqueeze(-1).unsqueeze(-1)
    out.update(M=A * (X["M"] - (0 if M0 is None else M0)) + Y["M"] + c * _outer(X["v"], X["k"]), A=X["A"] * Y["A"], c=X["c"] * Y["A"])
  return out

def mem_step(st:dict, q:Tensor, k:Tensor, v:Tensor, u:Tensor, g:dict, cfg:MCConfig, init:dict|None) -> tuple[Tensor, dict]:
  """One token: update the online memory, read it and the cache, and cache the state when a segment completes.
  q, k, v, u (B,H,D); g dict of (B,H) gates. Work grows with the number of cached entries, not with the tokens seen."""
  C, T, t, D = cfg.segment, cfg.chunk, st["t"], q.shape[-1]
  indep, first = cfg.state_init == "independent", st["t"] % C == 0
  # the online key sum and count as tensors (not Python constants), so the steps of a segment share one schedule
  st = {**st, "t": t + 1, "ksum": st["ksum"] + k, "n": st["n"] + 1}
  if cfg.core in ("la", "swla"):
    ex = lambda x: x.unsqueeze(-1).unsqueeze(-1)
    if cfg.core == "swla":
      a, b = g["a"], g["b"]
      M = ex(a) * st["M"] + ex(g["l"]) * _outer(v, k)                         # Eq. 28
      if st["prev"] is not None: M = M + ex(b) * _outer(*st["prev"])
    else: a, b, M = q.ones_like()[..., 0], q.zeros_like()[..., 0], st["M"] + _outer(v, k)   # Eq. 12
    # for merging independent compressors: A = prod a over the segment, c = its first b-term decayed to now
    A, c = (a, b) if first else (st["A"] * a, st["c"] * a)
    st.update(M=M, prev=(v, k), A=A, c=c)
    o = (M @ q.unsqueeze(-1))[..., 0]
  else:
    if t % T == 0: st["Ws"] = (st["W1"], st["W2"])
    r, z, d = deep_grads(cfg.core, k.unsqueeze(-2), v.unsqueeze(-2), *st["Ws"])
    g1, g2 = _outer(r[..., 0, :], z[..., 0, :]), _outer(d[..., 0, :], k)
    e = g["e"].unsqueeze(-1).unsqueeze(-1)
    if cfg.core == "dla": st.update(W1=st["W1"] - e * g1, W2=st["W2"] - e * g2)
    else:
      ga, gb = g["a"].unsqueeze(-1).unsqueeze(-1), g["b"].unsqueeze(-1).unsqueeze(-1)
      st.update(S1=gb * st["S1"] - e * g1, S2=gb * st["S2"] - e * g2)
      st.update(W1=ga * st["W1"] + st["S1"], W2=ga * st["W2"] + st["S2"])
    read2, read1 = (lambda x: x @ st["W2"].transpose(-1, -2)), (lambda h: h @ st["W1"].transpose(-1, -2))
    o = q + read1(read2(q.unsqueeze(-2)).gelu())[..., 0, :]
  y, E = o, st["entries"]
  if E and cfg.agg != "none":
    # the parallel path's aggregation with L = 1 and every entry readable
    q1, o1, u1 = q.unsqueeze(-2), o.unsqueeze(-2), u.unsqueeze(-2)
    p = Tensor.stack(*[x["ksum"] / x["n"] for x in E], dim=2)
    z, z_on = (u1 @ p.transpose(-1, -2)) / math.sqrt(D), (u * st["ksum"] / st["n"]).sum(-1, keepdim=True) / math.sqrt(D)
    if cfg.core in ("la", "swla"):
      M = Tensor.stack(*[x["M"] for x in E], dim=2)
      y = cache_read_ref(q1, o1, M, z, z_on, np.ones((1, len(E)), dtype=bool), 1, "grm" if cfg.agg == "soup" else cfg.agg, cfg.topk)[..., 0, :]
    else:
      W1c, W2c = Tensor.stack(*[x["W1"] for x in E], dim=2), Tensor.stack(*[x["W2"] for x in E], dim=2)
      w_on, w = AGG_WEIGHTS[cfg.agg](z, z_on, z.ones_like().bool(), cfg.topk)
      if cfg.agg == "soup" or (cfg.agg == "ssc" and cfg.ssc_mix == "soup"): y = deep_soup_read(q1, W1c, W2c, w_on, w, read2, read1)[..., 0, :]
      else: y = (w_on.unsqueeze(-1) * o1 + deep_entry_read(q1, W1c, W2c, w))[..., 0, :]
  if (t + 1) % C == 0:
    # the segment is complete: cache the state with its key sum; log merges equal blocks like a binary counter carries
    keep = ("M", "A", "c") if cfg.core in ("la", "swla") else ("W1", "W2")
    E = E + [{**{x: st[x] for x in keep}, "ksum": st["ksum"], "n": C, "k": k, "v": v}]
    M0 = None if init is None or "M" not in init else init["M"].float()
    while cfg.segmentation == "log" and len(E) > 1 and E[-1]["n"] == E[-2]["n"]: E = E[:-2] + [_merge(E[-2], E[-1], M0, cfg.core, indep)]
    fresh = mem_init(cfg, *q.shape[:2], D, init, q.device)
    st.update(entries=E, ksum=fresh["ksum"], n=fresh["n"], **({k_: fresh[k_] for k_ in fresh if k_ not in ("t", "ksum", "n", "entries")} if indep else {}))
  return y, st

def memory_mix_recurrent(q:Tensor, k:Tensor, v:Tensor, u:Tensor, gates:dict, cfg:MCConfig, init:dict|None=None) -> Tensor:
  # memory_mix computed token by token with mem_step: slow, obviously right, and the same code that decodes
  _check(q, k, v, u, gates, cfg, init)
  B, H, L, D = q.shape
  st, ys = mem_init(cfg, B, H, D, init, q.device), []
  for t in range(L):
    y, st = mem_step(st, q[:, :, t].float(), k[:, :, t].float(), v[:, :, t].float(), u[:, :, t].float(), {n: x[:, :, t].float() for n, x in gates.items()}, cfg, init)
    ys.append(y)
  return Tensor.stack(*ys, dim=2).cast(q.dtype)

# ***** the layer, block and model *****

# a projection: weights stay float32, math in the activation dtype. fused: kernels.linear where its weight gradient splits over
# slices of the tokens. Else its output's gradient gets a buffer of its own: tinygrad would fold the elementwise backward that
# follows (conv, SiLU, L2 norm, gates) into each matmul reading it, once per output element
def _lin(x:Tensor, w:Tensor, fused:bool) -> Tensor:
  return kernels.linear(x, w) if fused and kernels.linear_splits(x) else (x @ w.cast(x.dtype)).contiguous_backward()
def _init(fan_in:int, *shape:int, scale:float=1.0) -> Tensor: return Tensor.uniform(*shape, low=-scale / math.sqrt(fan_in), high=scale / math.sqrt(fan_in))
def _rms(x:Tensor, w:Tensor, eps:float=1e-6) -> Tensor: return (x.float() * (x.float().square().mean(-1, keepdim=True) + eps).rsqrt() * w).cast(x.dtype)

# gate biases at init: sigmoid(4.6) ~ 0.99 for retention a, sigmoid(-2.2) ~ 0.1 for the inner learning rate e
GATE_BIAS = {"a": 4.6, "b": 0.0, "l": 0.0, "e": -2.2}

def rope(x:Tensor, pos:int, theta:float) -> Tensor:
  # rotary position embedding on (B,H,L,D), positions pos..pos+L-1, rotating the two halves of D
  B, H, L, D = x.shape
  freq = theta ** (-np.arange(0, D // 2, dtype=np.float64) * 2 / D)
  ang = np.arange(pos, pos + L, dtype=np.float64)[:, None] * freq[None]
  cos, sin = Tensor(np.cos(ang).astype(np.float32), device=x.device).cast(x.dtype), Tensor(np.sin(ang).astype(np.float32), device=x.device).cast(x.dtype)
  x1, x2 = x[..., :D // 2], x[..., D // 2:]
  return (x1 * cos - x2 * sin).cat(x2 * cos + x1 * sin, dim=-1)

class Block:
  """x -> RMSNorm -> q,k,v -> causal depthwise conv -> SiLU -> heads, L2-normalised q,k -> gates -> memory_mix -> per-head RMSNorm
  -> times SiLU(x Wgate) -> Wo -> residual; then a SwiGLU MLP with pre-RMSNorm and a residual (SPEC section 5).
  mixer="attn" swaps memory_mix for causal softmax attention with RoPE on plain projections (no conv, no L2 norm)."""
  def __init__(self, cfg:MCConfig):
    self.cfg, dim, H = cfg, cfg.dim, cfg.n_heads
    D, hidden = dim // H, -(-int(cfg.mlp_mult * dim) // 32) * 32
    self.norm1, self.norm2, self.onorm = Tensor.ones(dim), Tensor.ones(dim), Tensor.ones(D)
    self.wqkv, self.wgate, self.wo = _init(dim, dim, 3 * dim), _init(dim, dim, dim), _init(dim, dim, dim, scale=1 / math.sqrt(2 * cfg.n_layers))
    self.w1, self.w3, self.w2 = _init(dim, dim, hidden), _init(dim, dim, hidden), _init(hidden, hidden, dim, scale=1 / math.sqrt(2 * cfg.n_layers))
    if cfg.mixer == "attn": return
    if cfg.conv: self.conv = _init(cfg.conv, cfg.conv, 3 * dim)
    if not cfg.share_uq and cfg.agg in ("grm", "soup", "ssc"): self.wu = _init(dim, dim, dim)
    self.gate_names = GATES[cfg.core]
    if self.gate_names:
      self.wg = _init(dim, dim, len(self.gate_names) * H, scale=0.1)
      self.bg = Tensor(np.repeat([GATE_BIAS[g] for g in self.gate_names], H).astype(np.float32))
    if cfg.core in ("dla", "titans"):
      E = cfg.mem_expand * D
      self.W1, self.W2 = _init(E, H, D, E), _init(D, H, E, D)

  def _heads(self, x:Tensor) -> Tensor: return x.reshape(*x.shape[:2], self.cfg.n_heads, -1).transpose(1, 2)   # (B,L,dim) -> (B,H,L,D)

  def _qkvug(self, h:Tensor, qkv:Tensor):
    # post-conv q,k,v (B,L,3dim) -> heads, L2-normalised q,k, the connector u and the gates, all (B,H,L,...)
    q, k, v = (self._heads(x) for x in qkv.silu().chunk(3, dim=-1))
    q, k = q.float().normalize(dim=-1).cast(h.dtype), k.float().normalize(dim=-1).cast(h.dtype)
    u = self._heads(_lin(h, self.wu, self.cfg.kernels)) if hasattr(self, "wu") else q
    gates = {}
    if self.gate_names:
      g = (_lin(h, self.wg, self.cfg.kernels).float() + self.bg).sigmoid().reshape(*h.shape[:2], len(self.gate_names), self.cfg.n_heads)
      gates = {n: g[:, :, i].transpose(1, 2) for i, n in enumerate(self.gate_names)}   # (B,H,L)
    return q, k, v, u, gates

  def _init_mem(self): return {"W1": self.W1, "W2": self.W2} if self.cfg.core in ("dla", "titans") else None

  def _out(self, x:Tensor, h:Tensor, y:Tensor) -> Tensor:
    # y (B,H,L,D) -> per-head RMSNorm -> gate -> Wo -> residual
    y = _rms(y, self.onorm).transpose(1, 2).reshape(*h.shape)
    return x + _lin(y * _lin(h, self.wgate, self.cfg.kernels).silu(), self.wo, self.cfg.kernels)

  def mlp(self, x:Tensor) -> Tensor:
    # the SwiGLU MLP with pre-RMSNorm and a residual
    h = _rms(x, self.norm2)
    return x + _lin(_lin(h, self.w1, self.cfg.kernels).silu() * _lin(h, self.w3, self.cfg.kernels), self.w2, self.cfg.kernels)

  def __call__(self, x:Tensor) -> Tensor: return self.mlp(self.mix(x))

  # the parameters mix uses: all but the MLP's
  def mix_params(self) -> list[Tensor]: return [p for n, p in get_state_dict(self).items() if n not in ("norm2", "w1", "w2", "w3")]

  def mix(self, x:Tensor) -> Tensor:
    # the token mixer with its residual, no MLP (the layer that the memory-caching package's MemoryCachingLayer is)
    h = _rms(x, self.norm1)
    qkv = _lin(h, self.wqkv, self.cfg.kernels)
    if self.cfg.mixer == "attn":
      q, k, v = (self._heads(t) for t in qkv.chunk(3, dim=-1))
      q, k = rope(q, 0, self.cfg.rope_theta), rope(k, 0, self.cfg.rope_theta)
      return self._out(x, h, q.scaled_dot_product_attention(k, v, is_causal=True))
    if self.cfg.conv:
      # causal depthwise conv: y_t = sum_i w_i x_{t-w+1+i}
      w, L = self.cfg.conv, x.shape[1]
      xp = qkv.pad((None, (w - 1, 0), None))
      # the weights per batch row, their gradient in a buffer of its own: one reduce over every token of the batch would run a
      # thread per weight
      wb = self.conv.cast(qkv.dtype).unsqueeze(0).expand(x.shape[0], *self.conv.shape).contiguous_backward()
      qkv = sum(xp[:, i:i + L] * wb[:, i:i + 1] for i in range(w))
    q, k, v, u, gates = self._qkvug(h, qkv)
    return self._out(x, h, memory_mix(q, k, v, u, gates, self.cfg, self._init_mem()))

  def init_state(self, B:int) -> dict:
    dim, H = self.cfg.dim, self.cfg.n_heads
    if self.cfg.mixer == "attn": return {"pos": 0, "k": None, "v": None}
    return {"conv": Tensor.zeros(B, max(self.cfg.conv - 1, 0), 3 * dim), "mem": mem_init(self.cfg, B, H, dim // H, self._init_mem())}

  def step(self, x:Tensor, st:dict) -> tuple[Tensor, dict]:
    # one token x (B,1,dim) with the recurrent state
    h = _rms(x, self.norm1)
    qkv = _lin(h, self.wqkv, self.cfg.kernels)
    if self.cfg.mixer == "attn":
      q, k, v = (self._heads(t) for t in qkv.chunk(3, dim=-1))
      q, k = rope(q, st["pos"], self.cfg.rope_theta), rope(k, st["pos"], self.cfg.rope_theta)
      k, v = (k, v) if st["k"] is None else (st["k"].cat(k, dim=2), st["v"].cat(v, dim=2))
      return self.mlp(self._out(x, h, q.scaled_dot_product_attention(k, v))), {"pos": st["pos"] + 1, "k": k, "v": v}
    conv = st["conv"]
    if self.cfg.conv:
      window = conv.cast(qkv.dtype).cat(qkv, dim=1)                          # (B, w, 3dim): the last w inputs
      conv, qkv = window[:, 1:], (window * self.conv.cast(qkv.dtype)).sum(1, keepdim=True)
    q, k, v, u, gates = self._qkvug(h, qkv)
    y, mem = mem_step(st["mem"], q[:, :, 0].float(), k[:, :, 0].float(), v[:, :, 0].float(), u[:, :, 0].float(),
                      {n: g[:, :, 0] for n, g in gates.items()}, self.cfg, self._init_mem())
    return self.mlp(self._out(x, h, y.unsqueeze(2).cast(x.dtype))), {"conv": conv, "mem": mem}

class Model:
  """Byte embedding -> n_layers blocks -> RMSNorm -> head tied to the embedding."""
  def __init__(self, cfg:MCConfig):
    self.cfg = cfg
    self.emb = Tensor.normal(cfg.vocab, cfg.dim, std=0.02)
    self.blocks = [Block(cfg) for _ in range(cfg.n_layers)]
    self.norm = Tensor.ones(cfg.dim)
    self._jits, self._plans = {}, {}                                       # decode steps captured by TinyJit, by state structure

  def _logits(self, x:Tensor) -> Tensor: return _lin(_rms(x, self.norm).float(), self.emb.T, self.cfg.kernels)

  def __call__(self, tokens:Tensor) -> Tensor:
    # tokens (B,L) int -> logits (B,L,vocab) float32
    x = self.emb[tokens].cast(self.cfg.dtype)
    for blk in self.blocks: x = blk(x)
    return self._logits(x)

  def init_state(self, B:int) -> dict: return {"t": 0, "blocks": [blk.init_state(B) for blk in self.blocks]}

  def _step(self, tokens:Tensor, state:dict) -> tuple[Tensor, dict]:
    x = self.emb[tokens.reshape(-1, 1)].cast(self.cfg.dtype)
    new = []
    for blk, st in zip(self.blocks, state["blocks"]):
      x, st = blk.step(x, st)
      new.append(st)
    logits = self._logits(x)[:, 0]
    Tensor.realize(logits, *_leaves(new))
    return logits, {"t": state["t"] + 1, "blocks": new}

  def step(self, tokens:Tensor, state:dict) -> tuple[Tensor, dict]:
    """One token per sequence (B,) -> logits (B,vocab) and the next state. The state is consumed: reuse only the returned one.
    Inside a segment the step's kernels are the same every token, so they are captured once with TinyJit and replayed;
    the first and last token of a segment, a deep core's chunk start and attention (whose cache grows) run eagerly."""
    t, C, T = state["t"], self.cfg.segment, self.cfg.chunk
    if self.cfg.mixer == "attn" or t % C in (0, C - 1) or (self.cfg.core in ("dla", "titans") and t % T == 0): return self._step(tokens, state)
    # the state's tensors in traversal order (an entry may share one with the online state); the JIT takes distinct buffers
    own = {id(x): _plain(x) for x in _leaves(state)}
    flat = [own[id(x)] for x in _leaves(state)]
    ins = list({x.uop.base: x for x in flat}.values())
    where = [[u.uop.base for u in ins].index(x.uop.base) for x in flat]
    key = (_structure(state), tokens.shape, tuple(where))
    if key not in self._jits:
      def fn(tok:Tensor, ts:list[Tensor], template=state, where=where, key=key):
        logits, new = self._step(tok, _rebuild(template, iter([ts[i] for i in where])))
        # a leaf of the new state either passes an input through (the cache) or is computed: replays return fresh outputs only
        pos = {id(x): i for i, x in enumerate(ts)}
        outs = list({id(x): x for x in _leaves(new) if id(x) not in pos}.values())
        opos = {id(x): i for i, x in enumerate(outs)}
        self._plans[key] = [("in", pos[id(x)]) if id(x) in pos else ("out", opos[id(x)]) for x in _leaves(new)]
        return [logits, *outs]
      self._jits[key] = TinyJit(fn)
    if (cap := self._jits[key].captured) is not None:
      # a state tensor passed straight through may live in a buffer the replay overwrites (the previous replay's output): copy it
      passed = {i for src, i in self._plans[key] if src == "in"}
      copy = {i: ins[i].clone() for i in passed if ins[i].uop.base in cap._written_uops}
      if copy: Tensor.realize(*copy.values())
      ins = [_plain(copy[i]) if i in copy else x for i, x in enumerate(ins)]
    logits, *outs = self._jits[key](tokens.contiguous().realize(), ins)
    # inside a segment the structure does not change: the same state with new tensors, one token later
    return logits, _rebuild(state, iter([ins[i] if src == "in" else outs[i] for src, i in self._plans[key]]), dt=1)

  def generate(self, prompt:Tensor|np.ndarray, n:int, temperature:float=1.0, seed:int=0) -> np.ndarray:
    # feed the prompt token by token, then sample n tokens (temperature 0 = greedy); returns (B, T+n) int
    toks = np.asarray(prompt.numpy() if isinstance(prompt, Tensor) else prompt, dtype=np.int32)
    rng, state, out = np.random.default_rng(seed), self.init_state(toks.shape[0]), [toks]
    for t in range(toks.shape[1] + n - 1):
      cur = toks[:, t] if t < toks.shape[1] else out[-1][:, 0]
      logits, state = self.step(Tensor(cur), state)
      if t < toks.shape[1] - 1: continue
      lg = logits.numpy().astype(np.float64)
      if temperature == 0: nxt = lg.argmax(-1)
      else:
        p = np.exp((lg - lg.max(-1, keepdims=True)) / temperature)
        nxt = np.array([rng.choice(len(pi), p=pi / pi.sum()) for pi in p])
      out.append(nxt[:, None].astype(np.int32))
    return np.concatenate(out, axis=1)

def _plain(x:Tensor) -> Tensor:
  # a realized state tensor in the one form the JIT sees at every call, its own buffer reshaped (no copy); other views are copied
  if x.uop.op is Ops.BUFFER or (x.uop.op is Ops.RESHAPE and x.uop.src[0].op is Ops.BUFFER): return Tensor(x.uop.base).reshape(x.shape)
  return x.clone().realize()

def _structure(x):
  # everything but the tensors and the position: what decides the Python control flow of a step
  if isinstance(x, Tensor): return ("T", x.shape, x.dtype)
  if isinstance(x, dict): return tuple((k, _structure(v)) for k, v in x.items() if k != "t")
  if isinstance(x, (list, tuple)): return (type(x).__name__, *(_structure(v) for v in x))
  return x

def _leaves(x) -> list[Tensor]:
  # the tensors of a nested state in traversal order, repeats included
  if isinstance(x, Tensor): return [x]
  vals = x.values() if isinstance(x, dict) else x if isinstance(x, (list, tuple)) else []
  return [t for v in vals for t in _leaves(v)]

def _rebuild(x, it, dt:int=0):
  # the same nested state with its tensors taken in _leaves order from `it` and every position "t" moved on by dt
  if isinstance(x, Tensor): return next(it)
  if isinstance(x, dict): return {k: v + dt if k == "t" else _rebuild(v, it, dt) for k, v in x.items()}
  if isinstance(x, (list, tuple)): return type(x)(_rebuild(v, it, dt) for v in x)
  return x


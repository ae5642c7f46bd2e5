"""Independent float64 NumPy oracle for mc.memory_mix (the memory cores, segments and cache, and the aggregations), written from
the math alone, and the seeded inputs that the tests feed to both.

Plain token-by-token loops over (b, h, t); only the small per-token linear algebra is vectorised.
Nothing here is shared with mc.py, so agreement between the two is evidence, not tautology.
"""
import math
import numpy as np

CORES = ("la", "swla", "dla", "titans")
AGGS = ("none", "residual", "grm", "soup", "ssc", "mean")
GATES = {"la": (), "swla": ("a", "b", "l"), "dla": ("e",), "titans": ("a", "b", "e")}
DEEP = ("dla", "titans")

_C = math.sqrt(2.0 / math.pi)

def gelu(x): return 0.5 * x * (1.0 + np.tanh(_C * (x + 0.044715 * x ** 3)))

def gelu_prime(x):
  # d/dx of 0.5 x (1 + tanh(c (x + 0.044715 x^3)))
  th = np.tanh(_C * (x + 0.044715 * x ** 3))
  return 0.5 * (1.0 + th) + 0.5 * x * (1.0 - th ** 2) * _C * (1.0 + 3 * 0.044715 * x ** 2)

def deep_f(W1, W2, x):
  """f_W(x) = x + W1 gelu(W2 x); W1 (D,E), W2 (E,D)."""
  return x + W1 @ gelu(W2 @ x)

def deep_loss(core, W1, W2, k, v):
  y = deep_f(W1, W2, k)
  return -float(y @ v) if core == "dla" else float(np.sum((y - v) ** 2))

def deep_grad(core, W1, W2, k, v):
  """Hand-derived (dl/dW1, dl/dW2) of the dla / titans loss at (W1, W2)."""
  h = W2 @ k
  a = gelu(h)
  y = k + W1 @ a
  r = -v if core == "dla" else 2.0 * (y - v)   # dl/dy
  g1 = np.outer(r, a)                          # y depends on W1 through W1 a
  dh = (W1.T @ r) * gelu_prime(h)              # back through W1 and gelu
  g2 = np.outer(dh, k)                         # h = W2 k
  return g1, g2

def _read(core, state, x):
  """M(x) for linear cores (state = M), f_W(x) for deep cores (state = (W1, W2))."""
  return state @ x if core in ("la", "swla") else deep_f(state[0], state[1], x)

def _run_core(core, k, v, g, s0, t0, t1, restarts, chunk):
  """Run one head's core over tokens [t0, t1), resetting to s0 at t0 and at every t in `restarts`.

  Returns the list of states after each token (state after token t is at index t - t0).
  Linear: the D x D matrix M. Deep: a tuple (W1, W2).
  """
  out = []
  for t in range(t0, t1):
    reset = t == t0 or t in restarts
    kt, vt = k[t], v[t]
    if core == "la":
      M = (s0.copy() if reset else M) + np.outer(vt, kt)
      out.append(M)
    elif core == "swla":
      if reset: M, prev = s0.copy(), np.zeros_like(s0)   # v_{-1} k_{-1}^T = 0, and the b-term is cut at a restart
      cur = np.outer(vt, kt)
      M = g["a"][t] * M + g["b"][t] * prev + g["l"][t] * cur
      prev = cur
      out.append(M)
    else:
      if reset:
        W1, W2 = s0[0].copy(), s0[1].copy()
        S1, S2 = np.zeros_like(W1), np.zeros_like(W2)   # titans momentum restarts at 0
      # chunks are aligned at t = 0; every g_t of a chunk is taken at the chunk-start weights
      if reset or t % chunk == 0: Ws1, Ws2 = W1, W2
      g1, g2 = deep_grad(core, Ws1, Ws2, kt, vt)
      if core == "dla": W1, W2 = W1 - g["e"][t] * g1, W2 - g["e"][t] * g2
      else:
        S1, S2 = g["b"][t] * S1 - g["e"][t] * g1, g["b"][t] * S2 - g["e"][t] * g2
        W1, W2 = g["a"][t] * W1 + S1, g["a"][t] * W2 + S2
      out.append((W1, W2))
  return out

def _blocks(s, segmentation):
  """Blocks (start, end) in segment units that a token of segment s reads, oldest first."""
  if segmentation == "const": return [(i, i + 1) for i in range(s)]
  blocks, start = [], 0
  for bit in reversed(range(s.bit_length())):   # binary decomposition of [0, s), largest block first
    if s >> bit & 1:
      blocks.append((start, start + (1 << bit)))
      start += 1 << bit
  return blocks

def _softmax(z):
  z = np.asarray(z, np.float64)
  e = np.exp(z - z.max())
  return e / e.sum()

def oracle_memory_mix(q, k, v, u, gates, core, agg, segmentation="const", segment=16, state_init="checkpoint", topk=2,
                      ssc_mix="grm", chunk=4, init=None, stats=None):
  """Reference memory_mix: returns y (B,H,L,D) float64.

  stats: optional dict; for agg="ssc" it receives "min_margin", the smallest gap z_(topk) - z_(topk+1) between the
  last selected and the first rejected logit over all tokens (inf when selection never rejects anything), so a test
  can tell a float32 near-tie from a real bug.
  """
  if core not in CORES or agg not in AGGS or segmentation not in ("const", "log") or ssc_mix not in ("grm", "soup"):
    raise ValueError("bad core/agg/segmentation/ssc_mix")
  if state_init not in ("checkpoint", "independent"): raise ValueError("bad state_init")
  if core in DEEP and segmentation == "log" and state_init == "independent": raise ValueError("log + independent is defined for linear cores only")
  if core in DEEP and state_init == "independent" and segment % chunk: raise ValueError("segment must be a multiple of chunk")
  f64 = lambda x: np.asarray(x, np.float64)
  q, k, v, u = f64(q), f64(k), f64(v), f64(u)
  B, H, L, D = q.shape
  C = segment
  deep = core in DEEP
  if deep and (init is None or "W1" not in init or "W2" not in init): raise ValueError("deep cores need init W1, W2")
  y = np.zeros((B, H, L, D))
  min_margin = math.inf
  restarts = set(range(0, L, C)) if state_init == "independent" else set()
  for b in range(B):
    for h in range(H):
      g = {n: f64(gates[n])[b, h] for n in GATES[core]}
      if deep: s0 = (f64(init["W1"])[h], f64(init["W2"])[h])
      else: s0 = f64(init["M"])[h] if init is not None and "M" in init else np.zeros((D, D))
      kk, vv = k[b, h], v[b, h]
      online = _run_core(core, kk, vv, g, s0, 0, L, restarts, chunk)
      entries = {}   # (start, end) in segment units -> (state, pooled key, start token)

      def entry(blk):
        if blk not in entries:
          a0, a1 = blk[0] * C, blk[1] * C
          if state_init == "checkpoint" or blk[1] - blk[0] == 1:
            st = online[a1 - 1]   # independent + one segment: the online run restarted at a0, so this is the same run
          else: st = _run_core(core, kk, vv, g, s0, a0, a1, set(), chunk)[-1]
          entries[blk] = (st, kk[a0:a1].mean(0), a0)
        return entries[blk]

      for t in range(L):
        s = t // C
        qt, ut = q[b, h, t], u[b, h, t]
        o = _read(core, online[t], qt)
        ents = [entry(blk) for blk in _blocks(s, segmentation)] if agg != "none" else []
        if not ents:
          y[b, h, t] = o   # nothing cached (or agg none): every aggregation reduces to o_t (softmax over z^on alone is 1)
          continue
        if agg == "residual":
          y[b, h, t] = o + sum(_read(core, e[0], qt) for e in ents)
          continue
        if agg == "mean":
          y[b, h, t] = (o + sum(_read(core, e[0], qt) for e in ents)) / (1 + len(ents))
          continue
        z_on = ut @ kk[s * C:t + 1].mean(0) / math.sqrt(D)
        z = [ut @ e[1] / math.sqrt(D) for e in ents]
        if agg == "ssc":
          # rank by z, ties to the more recent entry (later block start); tuple comparison keeps exact ties exact
          order = sorted(range(len(ents)), key=lambda i: (-z[i], -ents[i][2]))
          if len(order) > topk: min_margin = min(min_margin, z[order[topk - 1]] - z[order[topk]])
          sel = order[:topk]
          ents, z = [ents[i] for i in sel], [z[i] for i in sel]
        w = _softmax([z_on] + z)
        mix = ssc_mix if agg == "ssc" else agg
        if mix == "grm": y[b, h, t] = w[0] * o + sum(wi * _read(core, e[0], qt) for wi, e in zip(w[1:], ents))
        else:
          # soup: mix the parameters (every weight matrix for deep cores), then read once
          if deep:
            W1 = w[0] * online[t][0] + sum(wi * e[0][0] for wi, e in zip(w[1:], ents))
            W2 = w[0] * online[t][1] + sum(wi * e[0][1] for wi, e in zip(w[1:], ents))
            y[b, h, t] = deep_f(W1, W2, qt)
          else:
            M = w[0] * online[t] + sum(wi * e[0] for wi, e in zip(w[1:], ents))
            y[b, h, t] = M @ qt
  if stats is not None: stats["min_margin"] = min_margin
  return y

# ***** seeded inputs in the model's regime *****

B, H, D, MEM_EXPAND = 2, 2, 8, 4
E = MEM_EXPAND * D

def sig(x): return 1.0 / (1.0 + np.exp(-x))

def l2n(x): return x / np.linalg.norm(x, axis=-1, keepdims=True)

def unit_dyadic_keys(rng, n):
  """Unit keys with four entries of +-1/2: exact in float32, so sums and power-of-two means of them are exact too."""
  k = np.zeros((n, D))
  for i in range(n):
    idx = rng.choice(D, 4, replace=False)
    k[i, idx] = rng.choice([-0.5, 0.5], 4)
  return k

def make_inputs(seed, L, core, m0=False, tie=None, segment=16, share_uq=False):
  """Seeded inputs in the model's regime: q, k unit per token, u scaled so the softmax is not flat, gates as the model makes them.

  tie="some": segments 0, 2, 4 share their keys (so their pooled means tie exactly) and u points at that mean.
  tie="all":  every segment has the same keys, so every complete block (any length, log blocks too) ties.
  """
  rng = np.random.default_rng(seed)
  q = l2n(rng.standard_normal((B, H, L, D)))
  k = l2n(rng.standard_normal((B, H, L, D)))
  v = rng.standard_normal((B, H, L, D))
  u = 2.0 * rng.standard_normal((B, H, L, D))
  if tie is not None:
    C = segment
    k = unit_dyadic_keys(rng, B * H * L).reshape(B, H, L, D)
    pat = k[:, :, :C].copy()
    for s in ((2, 4) if tie == "some" else range(1, L // C)):
      if (s + 1) * C <= L: k[:, :, s * C:(s + 1) * C] = pat
    if tie == "some":
      p = pat.mean(2, keepdims=True)
      u = 6.0 * p / np.linalg.norm(p, axis=-1, keepdims=True) + 0.5 * rng.standard_normal((B, H, L, D))
  if share_uq: u = q
  N = lambda: rng.standard_normal((B, H, L))
  # a: retention in (0.8, 1); e: ~0.1 (titans diverges for much larger steps, dla tolerates more)
  gates = {"a": 0.8 + 0.2 * sig(N() + 1.5), "b": sig(N() - (1.0 if core == "titans" else 0.0)), "l": sig(N() + 1.0),
           "e": 0.02 + 0.18 * sig(N()) if core == "titans" else 0.05 + 0.3 * sig(N())}
  gates = {n: gates[n] for n in GATES[core]}
  if core in DEEP: init = {"W1": rng.standard_normal((H, D, E)) / math.sqrt(E), "W2": rng.standard_normal((H, E, D)) / math.sqrt(D)}
  else: init = {"M": 0.3 * rng.standard_normal((H, D, D))} if m0 else None
  # round to float32 once, so the oracle evaluates exactly the inputs the library gets (u stays the same array as q)
  r = lambda x: x.astype(np.float32).astype(np.float64)
  q, k, v = r(q), r(k), r(v)
  u = q if share_uq else r(u)
  gates = {n: r(x) for n, x in gates.items()}
  init = None if init is None else {n: r(x) for n, x in init.items()}
  return q, k, v, u, gates, init

"""Tests of mc.py against independent computations: config validation, properties of memory_mix, gradients against finite
differences of the float64 oracle (tests/oracle.py), recurrent decoding against the parallel forward, training, kernels on/off.

Errors are relative to the reference's largest entry: rel(a, ref) = max|a - ref| / max|ref|.
On this CPU tinygrad's time goes into building kernels, not running them: every test keeps its shapes small, and cases
that share a core sit next to each other so they reuse kernels built earlier in the same process.
Tiers: -m "not grid_full and not slow" is CI (~3 min on a 2-core CPU); `slow` marks the costly cases of a kind CI already
covers (deep cores mostly: their graphs build 3-5x slower), `grid_full` the decode grid beyond CI, `kernels` the kernels=True cases.
"""
import dataclasses
import numpy as np
import pytest
from tinygrad import Context, Tensor, TinyJit
from tinygrad.nn.optim import AdamW
from tinygrad.nn.state import get_parameters, get_state_dict, load_state_dict
from mc import CORES, GATES, MCConfig, Model, memory_mix
from oracle import D, DEEP, H, MEM_EXPAND, make_inputs, oracle_memory_mix

RTOL = 1e-4
SLOW = pytest.mark.slow
KERNELS = [pytest.param(False, id="plain"), pytest.param(True, id="kernels", marks=pytest.mark.kernels)]

def rel(a, ref) -> float: return float(np.abs(np.asarray(a, np.float64) - ref).max() / np.abs(ref).max())
def T(x) -> Tensor: return Tensor(np.ascontiguousarray(x, dtype=np.float32))

def oracle(q, k, v, u, gates, init, core, agg, **kw) -> np.ndarray: return oracle_memory_mix(q, k, v, u, gates, core, agg, init=init, **kw)

# ***** 1. invalid configs and inputs raise ValueError naming the field *****

BAD = [*[(f, {f: x}, True) for f, x in (("mixer", "rnn"), ("core", "lstm"), ("agg", "max"), ("segmentation", "fib"),
                                          ("state_init", "zeros"), ("ssc_mix", "mean"), ("dtype", "float64"))],
       *[(f, {f: x}, False) for f in ("vocab", "dim", "n_layers", "n_heads", "segment", "chunk", "mem_expand", "topk") for x in (0, -2, 4.0)],
       ("conv", {"conv": -1}, False), ("conv", {"conv": 2.0}, False), ("topk", {"topk": True}, False), ("conv", {"conv": False}, False),
       ("kernels", {"kernels": "no"}, True), ("share_uq", {"share_uq": 1}, True),
       ("dim", {"dim": 30, "n_heads": 4}, False), ("segment", {"segment": 24, "chunk": 16}, False),
       ("agg", {"mixer": "attn", "agg": "grm"}, True),
       *[("state_init", {"core": c, "segmentation": "log", "state_init": "independent"}, True) for c in DEEP]]

@pytest.mark.parametrize("field,kw,allowed", BAD, ids=[",".join(f"{k}={v}" for k, v in kw.items()) for _, kw, _ in BAD])
def test_config_rejects(field, kw, allowed):
  with pytest.raises(ValueError, match=rf"\b{field}\b") as e: MCConfig(**kw)
  if allowed: assert "allowed" in str(e.value)

def _mix_inputs(core, L=6, k_len=None, g_len=None, drop=None, init=True):
  # tiny inputs for memory_mix's own checks, which run before any computation
  x = lambda n=L: Tensor.zeros(2, H, n, D)
  gates = {g: Tensor.full((2, H, g_len or L), 0.5) for g in GATES[core] if g != drop}
  E = MEM_EXPAND * D
  mem = {"W1": Tensor.zeros(H, D, E), "W2": Tensor.zeros(H, E, D)} if core in DEEP and init else None
  return x(), x(k_len or L), x(), x(), gates, MCConfig(dim=H * D, n_heads=H, core=core, segment=8, chunk=4), mem

MIX_BAD = {"k-shape": ("la", dict(k_len=5), r"\bk\.shape"), "gate-shape": ("swla", dict(g_len=5), r"gates\['a'\]\.shape"),
           "swla-no-b": ("swla", dict(drop="b"), r"gates.*'b'"), "titans-no-e": ("titans", dict(drop="e"), r"gates.*'e'"),
           "dla-no-init": ("dla", dict(init=False), r"\binit\b"), "titans-no-init": ("titans", dict(init=False), r"\binit\b")}

@pytest.mark.parametrize("core,kw,match", MIX_BAD.values(), ids=MIX_BAD.keys())
def test_memory_mix_rejects(core, kw, match):
  with pytest.raises(ValueError, match=match): memory_mix(*_mix_inputs(core, **kw))

# ***** 2. properties of memory_mix, float32 against NumPy and the float64 oracle *****

SEG_INIT = [("const", "checkpoint"), ("const", "independent"), ("log", "checkpoint"), ("log", "independent")]

@pytest.mark.parametrize("seg,init", SEG_INIT, ids=[f"{s}-{i[:4]}" for s, i in SEG_INIT])
@pytest.mark.parametrize("core", ("la", "swla"))
def test_soup_is_grm_for_linear(core, seg, init, mix):
  # mixing linear states is mixing their outputs: mc's soup matches the oracle's grm and mc's grm the oracle's soup
  inp = make_inputs(20, 45, core, m0=True, segment=8)
  kw = dict(core=core, segmentation=seg, state_init=init, segment=8, chunk=4)
  soup, grm = mix(*inp, agg="soup", **kw), mix(*inp, agg="grm", **kw)
  okw = dict(segmentation=seg, state_init=init, segment=8, chunk=4)
  assert rel(soup, grm) < RTOL
  assert rel(soup, oracle(*inp, core, "grm", **okw)) < RTOL and rel(grm, oracle(*inp, core, "soup", **okw)) < RTOL

@pytest.mark.parametrize("seg", ("const", "log"))
@pytest.mark.parametrize("core", CORES)
def test_ssc_with_every_entry_is_grm(core, seg, mix):
  # at most 5 cached entries (L=45, segment 8) or 4 for the costlier deep cores (L=20, segment 4): topk=5 selects them all
  L, C = (20, 4) if core in DEEP else (45, 8)
  inp = make_inputs(21, L, core, m0=True, segment=C)
  kw = dict(core=core, segmentation=seg, segment=C, chunk=4)
  ssc, grm = mix(*inp, agg="ssc", topk=5, **kw), mix(*inp, agg="grm", **kw)
  assert rel(ssc, grm) < RTOL and rel(ssc, oracle(*inp, core, "grm", segmentation=seg, segment=C, chunk=4)) < RTOL

@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("seg", ("const", "log"))
def test_la_residual_independent_is_linear_attention(seg, kernels, mix):
  # independent la compressors of the past blocks plus the online segment's partition [0, t]: their sum is causal linear attention
  q, k, v, u, gates, _ = make_inputs(22, 45, "la", segment=8)
  y = mix(q, k, v, u, gates, None, core="la", agg="residual", segmentation=seg, state_init="independent", segment=8, chunk=4, kernels=kernels)
  A = np.tril(np.einsum("bhtd,bhsd->bhts", q, k))                            # (B,H,L,L) q_t.k_s for s <= t
  assert rel(y, A @ v) < RTOL

@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("core", ("la", "swla"))
def test_linear_chunk_invariance(core, kernels, mix):
  # the chunk size of the scan does not change a linear core's result; L=37 leaves partial chunks and segments
  inp = make_inputs(23, 37, core, m0=True, segment=16)
  ys = [mix(*inp, core=core, agg="grm", segment=16, chunk=c, kernels=kernels) for c in (1, 4, 16)]
  ref = oracle(*inp, core, "grm", segment=16, chunk=1)
  for c, y in zip((1, 4, 16), ys): assert rel(y, ref) < RTOL, f"chunk {c}"
  assert rel(ys[0], ys[2]) < RTOL and rel(ys[1], ys[2]) < RTOL

# ***** 3. gradients against directional finite differences of the float64 oracle *****

def _flat(q, k, v, u, gates, init) -> dict: return {"q": q, "k": k, "v": v, "u": u, **gates, **(init or {})}

def _oracle_loss(X:dict, R:np.ndarray, core:str, agg:str, stats=None, **kw) -> float:
  init = {n: X[n] for n in ("M", "W1", "W2") if n in X} or None
  return float((oracle_memory_mix(X["q"], X["k"], X["v"], X["u"], {g: X[g] for g in GATES[core]}, core, agg, init=init, stats=stats, **kw) * R).sum())

@pytest.mark.parametrize("core,agg", [(c, a) if c != "titans" else pytest.param(c, a, marks=SLOW) for c in CORES for a in ("grm", "ssc")],
                         ids=[f"{c}-{a}" for c in CORES for a in ("grm", "ssc")])
def test_grad_matches_oracle_fd(core, agg):
  # d/de sum(y(X + eP) * R) at e=0: tinygrad's <dL/dX, P> against the oracle's central difference, for every input X
  L, kw = 20, dict(segment=8, chunk=4, topk=1)
  for seed in range(30, 60):
    # topk=1 with 2 entries in the last segment: the selection must not flip under a 1e-5 perturbation
    X, st = _flat(*make_inputs(seed, L, core, m0=True, segment=8)), {}
    R = np.random.default_rng(seed).standard_normal(X["q"].shape)
    _oracle_loss(X, R, core, agg, st, **kw)
    if agg == "grm" or 1e-2 < st["min_margin"] < np.inf: break
  else: pytest.fail("no seed keeps the top-k selection 1e-2 away from a tie")
  ts = {n: T(x) for n, x in X.items()}
  init = {n: ts[n] for n in ("M", "W1", "W2") if n in ts} or None
  cfg = MCConfig(dim=H * D, n_heads=H, mem_expand=MEM_EXPAND, core=core, agg=agg, kernels=False, **kw)
  y = memory_mix(ts["q"], ts["k"], ts["v"], ts["u"], {g: ts[g] for g in GATES[core]}, cfg, init)
  grads = dict(zip(ts, (y * T(R)).sum().gradient(*ts.values())))
  rng, e, errs = np.random.default_rng(0), 1e-5, {}
  for n, x in X.items():
    P = rng.standard_normal(x.shape)
    Xp, Xm = {**X, n: x + e * P}, {**X, n: x - e * P}
    if n in GATES[core]: assert 0 < min(Xp[n].min(), Xm[n].min()) and max(Xp[n].max(), Xm[n].max()) < 1   # gates stay in (0,1)
    fd = (_oracle_loss(Xp, R, core, agg, **kw) - _oracle_loss(Xm, R, core, agg, **kw)) / (2 * e)
    errs[n] = abs(float((grads[n].numpy().astype(np.float64) * P).sum()) - fd) / abs(fd)
  assert max(errs.values()) < 1e-3, errs

# ***** 4. recurrent decoding equals the parallel forward *****

def _decode(cfg:MCConfig, L:int, P:int, B:int=2, seed:int=0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  # logits (B, L, vocab) of model.step from the start, of model.prefill(tokens[:, :P]) then model.step, and of model(tokens)
  Tensor.manual_seed(seed)
  model = Model(cfg)
  toks = np.random.default_rng(seed).integers(0, cfg.vocab, (B, L)).astype(np.int32)
  ref = model(Tensor(toks)).numpy()
  state = model.init_state(B, max_len=L)
  got = np.stack([model.step(Tensor(toks[:, t]), state)[0].numpy() for t in range(L)], 1)
  logits, state = model.prefill(toks[:, :P], max_len=L)
  pre = np.concatenate([logits.numpy(), *[model.step(Tensor(toks[:, t]), state)[0].numpy()[:, None] for t in range(P, L)]], 1)
  # the state's one TinyJit served every token after the prompt: the position is a Variable, the state's shapes are fixed
  assert state["jit"].cnt == L - (P if cfg.mixer == "attn" else P // cfg.segment * cfg.segment)
  return got, pre, ref

# (core, agg, ssc_mix, segmentation, state_init). CI: every core and every aggregation once, both segmentations and
# initialisations (10-40 s each); slow: one more deep case; grid_full: every other valid combination.
DECODE_CI = [("la", "residual", "grm", "log", "independent"), ("la", "ssc", "soup", "const", "checkpoint"),
             ("swla", "grm", "grm", "log", "independent"), ("swla", "mean", "grm", "const", "checkpoint"),
             ("dla", "soup", "grm", "const", "checkpoint"), ("titans", "none", "grm", "const", "independent")]
DECODE_SLOW = [("titans", "ssc", "grm", "const", "checkpoint")]
DECODE_FULL = [(c, a, m, s, i) for c in CORES for a, m in (("none", "grm"), ("residual", "grm"), ("grm", "grm"), ("soup", "grm"),
                                                           ("ssc", "grm"), ("ssc", "soup"), ("mean", "grm"))
               for s in ("const", "log") for i in ("checkpoint", "independent")
               if not (c in DEEP and s == "log" and i == "independent") and (c, a, m, s, i) not in DECODE_CI + DECODE_SLOW]

@pytest.mark.parametrize("core,agg,ssc_mix,seg,init", [*DECODE_CI, *[pytest.param(*c, marks=SLOW) for c in DECODE_SLOW],
                                                       *[pytest.param(*c, marks=pytest.mark.grid_full) for c in DECODE_FULL]],
                         ids=[f"{c}-{a}{'-' + m if a == 'ssc' else ''}-{s}-{i[:4]}" for c, a, m, s, i in DECODE_CI + DECODE_SLOW + DECODE_FULL])
def test_step_matches_forward(core, agg, ssc_mix, seg, init):
  # L=100 over segments of 16: six cached segments and a partial one, so decoding crosses every cache update; the prefill of 71
  # tokens runs the parallel forward to 64 (four segments: a log carry of two levels) and steps the rest
  cfg = MCConfig(vocab=32, dim=16, n_layers=1, n_heads=2, core=core, agg=agg, ssc_mix=ssc_mix, segmentation=seg, state_init=init,
                 segment=16, chunk=8, kernels=False)
  got, pre, ref = _decode(cfg, 100, 71)
  assert rel(got, ref) < RTOL and rel(pre, ref) < RTOL

def test_step_matches_forward_attn():
  # the key/value cache written at the position: the prefill fills it to 29, the steps go on
  got, pre, ref = _decode(MCConfig(vocab=32, dim=16, n_layers=1, n_heads=2, mixer="attn", agg="none"), 40, 29)
  assert rel(got, ref) < RTOL and rel(pre, ref) < RTOL

@pytest.mark.kernels
@pytest.mark.parametrize("mixer", ("mc", "attn"))
def test_generate_greedy_is_forward_argmax(mixer):
  # greedy decoding after a prefill through the fused kernels: every new token is the argmax of the parallel forward at its place
  cfg = MCConfig(vocab=32, dim=16, n_layers=2, n_heads=2, mixer=mixer, agg="grm" if mixer == "mc" else "none", segment=16, chunk=8)
  Tensor.manual_seed(3)
  model = Model(cfg)
  prompt = np.random.default_rng(3).integers(0, cfg.vocab, (2, 37)).astype(np.int32)
  out = model.generate(prompt, 20, temperature=0)
  assert out.shape == (2, 57) and (out[:, :37] == prompt).all()
  assert (out[:, 37:] == model(Tensor(out)).numpy()[:, 36:-1].argmax(-1)).all()

def test_step_past_max_len():
  model = Model(MCConfig(vocab=32, dim=16, n_layers=1, n_heads=2, segment=8, chunk=4, kernels=False))
  state = model.init_state(1, max_len=3)
  for _ in range(3): model.step(Tensor([1]), state)
  with pytest.raises(ValueError, match=r"max_len=3\b"): model.step(Tensor([1]), state)
  with pytest.raises(ValueError, match=r"max_len=4\b"): model.prefill(np.ones((1, 5), np.int32), max_len=4)
  with pytest.raises(ValueError, match=r"tokens of shape \(2,\)"): model.step(Tensor([1, 2]), model.init_state(1, max_len=3))

# ***** 5. a tiny model learns a fixed batch *****

@pytest.mark.parametrize("core", ["la", "attn", *[pytest.param(c, marks=SLOW) for c in ("swla", "dla", "titans")]])
def test_loss_falls(core):
  # 30 AdamW steps on one batch of a period-8 sequence: the loss ends below 0.7 of where it started
  mixer, agg = ("attn", "none") if core == "attn" else ("mc", "grm")
  cfg = MCConfig(vocab=64, dim=32, n_layers=1, n_heads=2, mixer=mixer, core="la" if core == "attn" else core, agg=agg, segment=8, chunk=4,
                 kernels=False)
  Tensor.manual_seed(0)
  model = Model(cfg)
  rng = np.random.default_rng(0)
  data = np.stack([np.tile(rng.permutation(cfg.vocab)[:8], 5)[:33] for _ in range(2)]).astype(np.int32)
  x, y = Tensor(data[:, :-1]).realize(), Tensor(data[:, 1:]).realize()
  opt = AdamW(get_parameters(model), lr=3e-3)
  @TinyJit
  @Context(TRAINING=1)
  def step(x:Tensor, y:Tensor) -> Tensor:
    opt.zero_grad()
    loss = model(x).sparse_categorical_crossentropy(y).backward()
    Tensor.realize(loss, *opt.schedule_step())
    return loss
  losses = [step(x, y).item() for _ in range(30)]
  assert losses[-1] < 0.7 * losses[0], losses

# ***** 6. the fused kernels change nothing: logits and every parameter gradient *****

@pytest.mark.kernels
@pytest.mark.parametrize("core,agg", [("swla", "ssc"), *[pytest.param(c, a, marks=SLOW) for c, a in
                                      (("la", "grm"), ("la", "ssc"), ("la", "residual"), ("swla", "grm"), ("swla", "residual"))]],
                         ids=["swla-ssc", "la-grm", "la-ssc", "la-residual", "swla-grm", "swla-residual"])
def test_model_kernels_on_off(core, agg):
  # the same weights with kernels on and off: the same logits and the same gradient of every parameter
  cfg = MCConfig(vocab=32, dim=16, n_layers=1, n_heads=2, core=core, agg=agg, segment=16, chunk=8)
  Tensor.manual_seed(1)
  models = [Model(cfg), Model(dataclasses.replace(cfg, kernels=False))]
  load_state_dict(models[1], get_state_dict(models[0]), verbose=False)
  toks = np.random.default_rng(1).integers(0, cfg.vocab, (2, 50)).astype(np.int32)
  R = T(np.random.default_rng(2).standard_normal((2, 50, cfg.vocab)))
  out = []
  for m in models:
    sd = get_state_dict(m)
    logits = m(Tensor(toks))
    # the gradients before anything is realized: tinygrad drops a custom kernel's grad_fxn from a graph realized before .gradient()
    grads = (logits * R).sum().gradient(*sd.values())
    Tensor.realize(logits, *grads)
    out.append((logits.numpy(), {n: g.numpy() for n, g in zip(sd, grads)}))
  (lk, gk), (lr, gr) = out
  assert rel(lk, lr) < RTOL
  errs = {n: rel(gk[n], gr[n]) for n in gr}
  assert max(errs.values()) < RTOL, errs

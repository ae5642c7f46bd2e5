"""
tinymc evaluation of a trained run: language modelling at longer contexts, needle-in-a-haystack, MQAR recall.

  python eval.py ppl  --ckpt=runs/default                          # val bits per byte at 1x, 2x, 4x the training length
  python eval.py ppl  --ckpt=runs/none --agg=mean --segment=512    # post-training memory caching of an agg=none model (4.3)
  python eval.py niah --ckpt=runs/default --limit=4                # NIAH-1/2/3 accuracy over lengths x depths
  python eval.py mqar --ckpt=runs/mqar                             # MQAR accuracy over (seq_len, num_kv_pairs)
  python eval.py speed --parts=layers --out=speed.json             # forward+backward ms of fresh models (no --ckpt)

Any MCConfig field may be overridden (--agg=mean --segment=512): the run's model config with those fields replaced, loading
the same weights. Each command prints a table and writes it as JSON into the run folder, eval_<command>[-<overrides>].json,
or to --out. speed times randomly initialised layers and models at fixed sizes (tiny ones on the CPU, a smoke test):
layers (one MC layer, Block.mix, vs length), package (the same layer against the memory-caching package), model (each core, grm vs none);
MCConfig overrides (--dtype=bfloat16 --dim=512) apply to all of them, --parts and --configs pick what runs.
NIAH is scored by exact match of the answer bytes: teacher-forced argmax at every answer position (which equals greedy
decoding: a wrong byte already fails the example), or with --generate by model.generate at temperature 0.
"""
import dataclasses, gc, json, math, re, sys, typing
from dataclasses import dataclass
from pathlib import Path
import numpy as np
from tqdm import tqdm
from tinygrad import Context, Device, Tensor, TinyJit
from tinygrad.nn.state import get_parameters
import kernels, train
from mc import CORES, Block, MCConfig, Model
from data import load_corpus, mqar_batch, niah_example
from data.tasks import niah_min_length

@dataclass
class EvalConfig:
  ckpt: str = ""                       # the run folder to evaluate, runs/<name>
  limit: int = 0                       # examples per cell (ppl: windows per length; speed: timed runs); 0 = the command's default
  batch: int = 8                       # sequences per forward pass
  mults: tuple[int, ...] = (1, 2, 4)   # ppl, niah, mqar: lengths as multiples of the training length
  lengths: tuple[int, ...] = ()        # niah and mqar: lengths in tokens instead of mults; speed: the layers' lengths
  depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)   # niah: needle depths
  tasks: tuple[int, ...] = (1, 2, 3)   # niah: which S-NIAH tasks
  generate: bool = False               # niah: decode the answer with model.generate (greedy) instead of teacher-forced argmax
  kvs: tuple[int, ...] = (4, 8, 16, 32, 64)   # mqar: key-value pairs per sequence
  data: str = ""                       # ppl: corpus to take the val split of; "" = the run's own
  seed: int = 0                        # example generation
  parts: tuple[str, ...] = ("layers", "package", "model")   # speed: which measurements (each fits one 10-minute GPU call)
  configs: tuple[str, ...] = ()        # speed: only these rows (layers: none,grm,grm-log,ssc,ssc-log,attn; model: la-grm,...,attn)
  out: str = ""                        # write the JSON here instead of the run folder (speed writes none without it)

# the training task each command's run must have: a byte language model or an MQAR recall model
TASKS = {"ppl": "lm", "niah": "lm", "mqar": "mqar"}

def load(ec:EvalConfig, overrides:dict, cmd:str):
  if not ec.ckpt: raise ValueError("--ckpt=runs/<name> is required")
  if (task := train.load_config(Path(ec.ckpt)).task) != TASKS[cmd]:
    how = "python train.py --preset=mqar" if TASKS[cmd] == "mqar" else "e.g. python train.py --preset=smoke"
    raise ValueError(f"{cmd} needs a run trained with --task={TASKS[cmd]} ({how}); {ec.ckpt} was trained with --task={task}")
  cfg, model = train.load_model(Path(ec.ckpt), **overrides)
  step = train.read_state(train.ckpt_dir(Path(ec.ckpt)))["step"]
  print(f"{ec.ckpt} at step {step} | device {Device.DEFAULT} | dtype {cfg.model.dtype} | overrides {overrides or 'none'}")
  return cfg, model

def batched(x:np.ndarray, B:int):
  # (N, ...) in batches of exactly B rows, the last one padded with copies of the last row; yields (batch, real rows)
  for i in range(0, len(x), B):
    b = x[i:i + B]
    yield np.concatenate([b, np.repeat(b[-1:], B - len(b), axis=0)]), len(b)

def run_batches(score, x:np.ndarray, y:np.ndarray, B:int, desc:str) -> tuple[np.ndarray, np.ndarray]:
  # score every row of x, y (N, L) in fixed-size batches: one compiled graph per length
  preds, nlls = [], []
  for (xb, n), (yb, _) in tqdm(zip(batched(x, B), batched(y, B)), total=-(-len(x) // B), desc=desc, leave=False):
    p, l = score(xb, yb)
    preds.append(p[:n]); nlls.append(l[:n])
  return np.concatenate(preds), np.concatenate(nlls)

def lengths(ec:EvalConfig, cfg:train.TrainConfig) -> tuple[int, ...]: return ec.lengths or tuple(m * cfg.seq_len for m in ec.mults)

def table(header:list[str], rows:list[list]) -> str:
  cell = lambda v: "-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)
  w = [max(len(h), *(len(cell(r[i])) for r in rows)) for i, h in enumerate(header)]
  return "\n".join("  ".join(cell(v).rjust(n) for v, n in zip(r, w)) for r in [header, *rows])

# ***** commands: each takes the eval config and the model overrides, prints a table and returns what goes into the JSON *****

def ppl(ec:EvalConfig, overrides:dict) -> dict:
  """Validation bits per byte at each length; bpb_beyond counts only the positions past the training length."""
  cfg, model = load(ec, overrides, "ppl")
  val, score, rows = load_corpus(ec.data or cfg.data or None, "val"), train.scorer(model), []
  for L in lengths(ec, cfg):
    if len(val) < L + 1:
      print(f"skipping length {L}: the val split has only {len(val)} bytes")
      continue
    w = val[np.linspace(0, len(val) - L - 1, ec.limit or 64).astype(np.int64)[:, None] + np.arange(L + 1)].astype(np.int32)
    _, nll = run_batches(score, w[:, :-1], w[:, 1:], ec.batch, f"ppl L={L}")
    beyond = float(nll[:, cfg.seq_len:].mean() / math.log(2)) if L > cfg.seq_len else None
    rows.append({"length": L, "windows": len(w), "bpb": float(nll.mean() / math.log(2)), "bpb_beyond": beyond})
  print(table(["length", "windows", "bpb", "bpb_beyond"], [list(r.values()) for r in rows]))
  return {"rows": rows}

def niah(ec:EvalConfig, overrides:dict) -> dict:
  """Exact-match accuracy of NIAH-1/2/3 (data/tasks.py, evaluation needles) for every length and depth."""
  cfg, model = load(ec, overrides, "niah")
  ok = [L for L in lengths(ec, cfg) if L >= niah_min_length()]
  if not ok: raise ValueError(f"NIAH needs lengths >= {niah_min_length()} bytes, got {lengths(ec, cfg)}; give e.g. --lengths=512,1024")
  if skipped := sorted(set(lengths(ec, cfg)) - set(ok)): print(f"skipping lengths {skipped}: shorter than a NIAH example ({niah_min_length()} bytes)")
  score, rng, rows, n = train.scorer(model), np.random.default_rng(ec.seed), [], ec.limit or 10
  for task in ec.tasks:
    for L in ok:
      ex = [(d, *niah_example(task, L, d, rng, "eval")) for d in ec.depths for _ in range(n)]
      toks, a, k = np.stack([e[1] for e in ex]).astype(np.int32), ex[0][2], ex[0][3]   # one task and length: one answer place
      if ec.generate:
        bar = tqdm(batched(toks, ec.batch), total=-(-len(toks) // ec.batch), desc=f"NIAH-{task} L={L} generate", leave=False)
        out = np.concatenate([model.generate(xb[:, :a], k, temperature=0)[:m, a:] for xb, m in bar])
        hit = (out == toks[:, a:]).all(1)
      else:
        # the prediction at position i is of token i + 1: the answer's bytes are predicted at a-1 .. a+k-2
        pred, _ = run_batches(score, toks, np.zeros_like(toks), ec.batch, f"NIAH-{task} L={L}")
        hit = (pred[:, a - 1:a + k - 1] == toks[:, a:a + k]).all(1)
      depth = np.array([e[0] for e in ex])
      rows += [{"task": task, "length": L, "depth": d, "n": n, "acc": float(hit[depth == d].mean())} for d in ec.depths]
  cells = {(r["task"], r["length"], r["depth"]): r["acc"] for r in rows}
  accs = {(t, L): [cells[t, L, d] for d in ec.depths] for t in ec.tasks for L in ok}
  print(table(["task", "length", *[f"d={d:g}" for d in ec.depths], "mean"], [[f"NIAH-{t}", L, *a, float(np.mean(a))] for (t, L), a in accs.items()]))
  return {"rows": rows, "scoring": "generate" if ec.generate else "teacher-forced argmax"}

def mqar(ec:EvalConfig, overrides:dict) -> dict:
  """Accuracy on the answers of MQAR sequences (data/tasks.py) over a grid of (seq_len, num_kv_pairs)."""
  cfg, model = load(ec, overrides, "mqar")
  score, rng, rows, n, V = train.scorer(model), np.random.default_rng([ec.seed, 2]), [], ec.limit or 256, cfg.model.vocab
  for T in lengths(ec, cfg):
    for kv in ec.kvs:
      # a cell that cannot hold its pairs (4 kv > T, or too few keys in the vocabulary) stays empty
      if 4 * kv > T or V < 2 * (kv + 1):
        rows.append({"seq_len": T, "kv": kv, "n": 0, "acc": None})
        continue
      x, y, mask = mqar_batch(n, T, kv, vocab=V, seed=rng)
      pred, _ = run_batches(score, x, y, ec.batch, f"mqar T={T} kv={kv}")
      rows.append({"seq_len": T, "kv": kv, "n": n, "acc": float((pred == y)[mask].mean())})
  cells = {(r["seq_len"], r["kv"]): r["acc"] for r in rows}
  print(table(["seq_len", *[f"kv={kv}" for kv in ec.kvs]], [[T, *[cells[T, kv] for kv in ec.kvs]] for T in lengths(ec, cfg)]))
  return {"rows": rows}

# ***** speed: forward+backward ms of fresh layers and models (--limit = timed repetitions, --lengths = the layers' lengths) *****

# per part: batch, lengths and the MCConfig fields under the overrides; a row's own fields (LAYERS, MODELS) go over both
SPEED = {"layers": (1, (1024, 2048, 4096, 8192, 16384, 32768), dict(dim=1024, n_heads=16, segment=256, chunk=64, core="swla")),
         "package": (4, (2048,), dict(dim=1024, n_heads=16, segment=256, chunk=64, agg="grm")),
         "model": (4, (2048,), dict(dim=256, n_heads=4, n_layers=4, segment=256, chunk=64))}
# the CPU's: a smoke test (5-8 min on 2 cores, nearly all of it compiling); its times mean little
SPEED_CPU = {"layers": (1, (256, 512), dict(dim=64, n_heads=4, segment=64, chunk=16, core="swla")),
             "package": (1, (256,), dict(dim=64, n_heads=4, segment=64, chunk=16, agg="grm")),
             "model": (1, (256,), dict(dim=32, n_heads=2, n_layers=2, segment=64, chunk=16))}
LAYERS = {"none": dict(agg="none"), "grm": dict(agg="grm"), "grm-log": dict(agg="grm", segmentation="log"), "ssc": dict(agg="ssc"),
          "ssc-log": dict(agg="ssc", segmentation="log"), "attn": dict(mixer="attn", agg="none")}
MODELS = {**{f"{c}-{a}": dict(core=c, agg=a) for c in CORES for a in ("grm", "none")}, "attn": dict(mixer="attn", agg="none")}
PACKAGE = ("swla", "la")   # the tinymc cores timed against the package's linear memory
ATTN_MAX_BYTES = 16 << 30   # layers: attn is skipped where its float32 (B,H,L,L) scores would pass this (B=1, H=16: L > 16K)

def step_ms(loss, params:list[Tensor], ins:list[Tensor], reps:int) -> float:
  # median ms of one TinyJit step, loss(*ins) and its gradient to every parameter, synchronized, after warm-up
  @TinyJit
  def step(*xs:Tensor) -> list[Tensor]:
    grads = loss(*xs).gradient(*params)
    Tensor.realize(*grads)
    return grads
  Tensor.realize(*params, *ins)
  return kernels.time_ms(step, *ins, reps=reps)   # under evaluate()'s train.device_defaults(): JIT=2 on CUDA

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
    return kernels.time_ms(lambda: torch.autograd.grad(layer(x), wrt, gy), reps=reps, warm=1, sync=sync)
  except Exception as e: return f"memory-caching unavailable ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})"

def cell(what:str, fn) -> dict:
  # one measurement; out of memory or a failed compile leaves it empty ("-") and the run goes on
  try: ms, err = fn(), None
  except Exception as e: ms, err = None, f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
  finally: gc.collect()
  print(f"{what}: " + (f"{ms:.2f} ms" if err is None else f"failed, {err}"), flush=True)
  return {"ms": ms, "error": err}

def fmt(ms:float|None) -> str: return "-" if ms is None else f"{ms:.2f}"

def speed_layers(mk, B:int, Ls:tuple, reps:int, pick) -> dict:
  c = mk({})
  print(f"layers: one MC layer (Block.mix: the mixer and its residual) forward+backward, B={B} dim={c.dim} heads={c.n_heads} core={c.core} segment={c.segment} chunk={c.chunk}")
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

def speed_package(mk, B:int, L:int, reps:int, pick) -> dict:
  rows = [{"core": k, **cell(f"package tinymc {k}+grm B={B} L={L}", lambda: layer_ms(mk({"core": k}), B, L, reps))} for k in pick(PACKAGE)]
  # in its own process (its own CUDA context), 1 warm-up and 2 timed runs: it takes seconds
  c, pkg = mk({}), kernels.isolated(package_ms, mk({}), B, L, min(reps, 2))
  print(f"package: an MC layer (grm, segment {c.segment}) forward+backward, B={B} L={L} dim={c.dim} heads={c.n_heads}, {c.dtype}; "
        + (f"{pkg}: tinymc timed alone" if isinstance(pkg, str) else f"memory-caching 0.1.0 (linear memory) {pkg:.1f} ms"))
  for r in rows: r["speedup"] = None if isinstance(pkg, str) or r["ms"] is None else pkg / r["ms"]
  print(table(["layer", "ms", "speed-up", "target >= 200x"], [[f"tinymc Block.mix {r['core']}+grm", fmt(r["ms"]), "-" if r["speedup"] is None else
        f"{r['speedup']:.0f}x", "-" if r["speedup"] is None else "PASS" if r["speedup"] >= 200 else "MISS"] for r in rows]))
  return {"B": B, "L": L, "config": dataclasses.asdict(c), "package_ms": None if isinstance(pkg, str) else pkg,
          "package_error": pkg if isinstance(pkg, str) else None, "rows": rows}

def speed_model(mk, B:int, L:int, reps:int, pick) -> dict:
  c = mk({})
  print(f"model: forward+backward, B={B} L={L} dim={c.dim} heads={c.n_heads} layers={c.n_layers} segment={c.segment} chunk={c.chunk}")
  ms = {n: cell(f"model {n} B={B} L={L}", lambda: model_ms(mk(MODELS[n]), B, L, reps))["ms"] for n in pick(MODELS)}
  ratio = lambda a, b: "-" if a is None or b is None else f"{a / b:.2f}"
  print(table(["core", "grm ms", "none ms", "grm/none"], [[k, fmt(ms.get(f"{k}-grm")), fmt(ms.get(f"{k}-none")), ratio(ms.get(f"{k}-grm"),
        ms.get(f"{k}-none"))] for k in CORES if {f"{k}-grm", f"{k}-none"} & set(ms)] + ([["attn", "-", fmt(ms["attn"]), "-"]] if "attn" in ms else [])))
  return {"B": B, "L": L, "config": dataclasses.asdict(c), "rows": [{"config": n, "ms": v} for n, v in ms.items()]}

def speed(ec:EvalConfig, overrides:dict) -> dict:
  """Forward+backward ms (TinyJit, synchronized, warmed up, median of --limit) of fresh layers and models; needs no --ckpt."""
  sizes = SPEED_CPU if Device.DEFAULT == "CPU" else SPEED
  if bad := set(ec.parts) - set(SPEED): raise ValueError(f"--parts: unknown {sorted(bad)}, allowed values are {tuple(SPEED)}")
  if bad := set(ec.configs) - {*LAYERS, *MODELS, *PACKAGE}:
    raise ValueError(f"--configs: unknown {sorted(bad)}, allowed values are {tuple(LAYERS)}, {tuple(MODELS)} and (package) {PACKAGE}")
  reps, pick = ec.limit or (3 if Device.DEFAULT == "CPU" else 10), lambda names: [n for n in names if not ec.configs or n in ec.configs]
  mk = lambda part: lambda row: MCConfig(**{**sizes[part][2], **overrides, **row})
  dt = mk("layers")({}).dtype
  train.check_dtype(dt)
  print(f"speed | device {Device.DEFAULT} | dtype {dt} | parts {','.join(ec.parts)} | reps {reps} | overrides {overrides or 'none'}")
  res = {"device": Device.DEFAULT}
  if "layers" in ec.parts: res["layers"] = speed_layers(mk("layers"), sizes["layers"][0], ec.lengths or sizes["layers"][1], reps, pick)
  if "package" in ec.parts: res["package"] = speed_package(mk("package"), sizes["package"][0], sizes["package"][1][0], reps, pick)
  if "model" in ec.parts: res["model"] = speed_model(mk("model"), sizes["model"][0], sizes["model"][1][0], reps, pick)
  return res

COMMANDS: dict[str, typing.Callable[[EvalConfig, dict], dict]] = {"ppl": ppl, "niah": niah, "mqar": mqar, "speed": speed}

def evaluate(cmd:str, argv:list[str]) -> dict:
  """Run one command with --key=value arguments (EvalConfig fields, and MCConfig fields as overrides); returns its JSON dict."""
  if cmd not in COMMANDS: raise ValueError(f"unknown command {cmd!r}: allowed values are {tuple(COMMANDS)}")
  eh, mh = train._hints(EvalConfig), train._hints(MCConfig)
  kv = train.parse_kv(argv, {**eh, **mh})
  ec, overrides = EvalConfig(**{k: v for k, v in kv.items() if k in eh}), {k: v for k, v in kv.items() if k not in eh}
  train.check_device()
  with Context(**train.device_defaults()): res = {"command": cmd, "eval": dataclasses.asdict(ec), "overrides": overrides, **COMMANDS[cmd](ec, overrides)}
  if ec.ckpt or ec.out:
    out = Path(ec.out) if ec.out else Path(ec.ckpt) / ("eval_" + "-".join([cmd, *(f"{k}={v}" for k, v in overrides.items())]) + ".json")
    out.write_text(json.dumps(res, indent=1))
    print(f"wrote {out}")
  return res

def for_command(cmd:str|None):
  # an EvalConfig field whose comment starts "ppl:" or "niah and mqar:" belongs to those commands; one without a prefix to all
  def keep(k:str, doc:str) -> bool:
    words = set(re.findall(r"\w+", m[1])) - {"and"} if (m := re.match(r"([a-z, ]+):", doc)) else set()
    return cmd is None or not words or not words <= set(COMMANDS) or cmd in words
  return keep

def usage(cmd:str|None=None) -> str:
  # the docstring (or the command's), then every option with its default and meaning, read from EvalConfig and MCConfig
  head = f"usage: python eval.py {cmd or '{' + ','.join(COMMANDS) + '}'} [--key=value ...]; the device is tinygrad's DEV=CPU|CUDA|METAL|CL\n"
  about = f"\n{cmd}: {COMMANDS[cmd].__doc__}\n" if cmd else __doc__ + "\ncommands: " + ", ".join(COMMANDS) + " (python eval.py COMMAND --help)\n"
  return (f"{head}{about}\noptions (EvalConfig), --key=value:\n{train.options_help(EvalConfig, for_command(cmd))}\n\n"
          f"model overrides (MCConfig in mc.py): the run's config with these fields replaced, the same weights\n"
          f"{train.options_help(MCConfig, default='the run')}")

def main(argv:list[str]|None=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  if not argv or argv[0] in ("-h", "--help"):
    print(usage())
    return 0 if argv else 2
  if {"-h", "--help"} & set(argv[1:]) and argv[0] in COMMANDS:
    print(usage(argv[0]))
    return 0
  try: evaluate(argv[0], argv[1:])
  except ValueError as e:
    print(f"eval.py: error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print("eval.py: interrupted", file=sys.stderr)
    return 130
  return 0

if __name__ == "__main__": sys.exit(main())

"""
tinymc evaluation of a trained run: language modelling at longer contexts, needle-in-a-haystack, MQAR recall, sampling.

  python eval.py ppl  --ckpt=runs/default                          # val bits per byte at 1x, 2x, 4x the training length
  python eval.py ppl  --ckpt=runs/none --agg=mean --segment=512    # post-training memory caching of an agg=none model (4.3)
  python eval.py niah --ckpt=runs/default --limit=4                # NIAH-1/2/3 accuracy over lengths x depths
  python eval.py mqar --ckpt=runs/mqar                             # MQAR accuracy over (seq_len, num_kv_pairs)
  python eval.py sample --ckpt=runs/default --prompt="def "       # 200 bytes after a prompt: a parallel prefill, then decoding
  python eval.py report runs/mqar-* --plot=mqar.png              # markdown tables of runs: mean +- std over their seeds (and a figure)

Any MCConfig field may be overridden (--agg=mean --segment=512): the run's model config with those fields replaced, loading
the same weights. Each command prints a table (sample: the text) and writes it as JSON into the run folder,
eval_<command>[-<overrides>].json, or to --out. Timings and comparisons with peers are bench.py's.
NIAH is scored by exact match of the answer bytes: teacher-forced argmax at every answer position (which equals greedy
decoding: a wrong byte already fails the example), or with --generate by model.generate at temperature 0.
"""
import dataclasses, json, math, re, sys, typing
from dataclasses import dataclass
from pathlib import Path
import numpy as np
from tqdm import tqdm
from tinygrad import Context, Device
import train
from mc import AGG, DEEP, MCConfig, fenwick
from data import load_corpus, mqar_batch, niah_example
from data.tasks import niah_min_length

@dataclass
class EvalConfig:
  ckpt: str = ""                       # the run folder to evaluate, runs/<name>
  limit: int = 0                       # examples per cell (ppl: windows per length); 0 = the command's default
  batch: int = 8                       # sequences per forward pass
  mults: tuple[int, ...] = (1, 2, 4)   # ppl, niah, mqar: lengths as multiples of the training length
  lengths: tuple[int, ...] = ()        # niah and mqar: lengths in tokens instead of mults
  depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)   # niah: needle depths
  tasks: tuple[int, ...] = (1, 2, 3)   # niah: which S-NIAH tasks
  generate: bool = False               # niah: decode the answer with model.generate (greedy) instead of teacher-forced argmax
  kvs: tuple[int, ...] = (4, 8, 16, 32, 64)   # mqar: key-value pairs per sequence
  data: str = ""                       # ppl: corpus to take the val split of; "" = the run's own
  seed: int = 0                        # example generation and sampling
  prompt: str = ""                     # sample: the text to continue, as UTF-8 bytes ("" = a newline)
  n: int = 200                         # sample: bytes to generate
  temperature: float = 0.8             # sample: softmax temperature of the sampling, 0 = greedy
  out: str = ""                        # write the JSON here instead of the run folder

# the training task each command's run must have: a byte language model or an MQAR recall model (sampling one is refused)
TASKS = {"ppl": "lm", "niah": "lm", "mqar": "mqar", "sample": "lm"}

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

def sample(ec:EvalConfig, overrides:dict) -> dict:
  """Continue --prompt with --n bytes sampled at --temperature (Model.generate: a parallel prefill, then one step per byte)."""
  _, model = load(ec, overrides, "sample")
  prompt = (ec.prompt or "\n").encode()
  if ec.n < 1 or ec.temperature < 0: raise ValueError(f"--n={ec.n} must be >= 1 and --temperature={ec.temperature} >= 0")
  out = model.generate(np.frombuffer(prompt, np.uint8).astype(np.int32)[None], ec.n, ec.temperature, ec.seed)[0]
  text = bytes(out.astype(np.uint8).tolist()).decode("utf-8", errors="replace")
  print(text)
  return {"prompt": prompt.decode("utf-8", errors="replace"), "text": text}

COMMANDS: dict[str, typing.Callable[[EvalConfig, dict], dict]] = {"ppl": ppl, "niah": niah, "mqar": mqar, "sample": sample}

# ***** report: run folders gathered into tables, mean +- std over the seeds of each configuration *****

# run config fields that name a run or say how it was run, not what was trained: runs differing only in these are seeds of one row
NOT_CONFIG = ("seed", "out", "name", "resume", "overwrite", "stop_at")

def state_size(cfg:MCConfig, L:int) -> int:
  """Floats of memory one layer holds after L tokens (Zoology's state size): attention's keys and values (2 L H D); a recurrent
  memory's state (H D D, or a deep memory's two weight matrices 2 H D E) times 1 + the entries cached by then (none for agg none)."""
  H, D = cfg.n_heads, cfg.dim // cfg.n_heads
  if cfg.mixer == "attn": return 2 * L * H * D
  one = H * D * D if cfg.core not in DEEP else 2 * H * D * cfg.mem_expand * D
  s = L // cfg.segment                                                       # complete segments: const caches each, log its Fenwick blocks
  return one * (1 + ((s if cfg.segmentation == "const" else len(fenwick(s))) if AGG[cfg.agg].weights is not None else 0))

def _columns(res:dict) -> dict[str, float|None]:
  # one eval JSON's numbers by column: mqar accuracy per (length, pairs), niah accuracy per (task, length) over the depths,
  # ppl bits per byte per length
  rows, cmd = res.get("rows", []), res.get("command")
  if cmd == "mqar": return {f"T={r['seq_len']} kv={r['kv']}": r["acc"] for r in rows}
  if cmd == "ppl": return {f"L={r['length']}": r["bpb"] for r in rows}
  if cmd == "niah":
    cells: dict[str, list] = {}
    for r in rows: cells.setdefault(f"NIAH-{r['task']} L={r['length']}", []).append(r["acc"])
    return {k: float(np.mean(v)) for k, v in cells.items()}
  return {}

def _run(folder:Path) -> tuple[dict, dict[str, dict]]:
  # a run's config (model fields flattened, and the state one layer holds at its training length) and its tables: the last
  # validation of training, one per eval_*.json
  tc = train.load_config(folder)
  cfg = dataclasses.asdict(tc)
  cfg = {**{k: v for k, v in cfg.items() if k != "model"}, **cfg["model"], "state": state_size(tc.model, tc.seq_len)}
  tables = {}
  try:
    last = train.read_state(train.ckpt_dir(folder))["val"][-1]
    tables["final validation"] = {k: last[k] for k in ("loss", "bpb", "acc") if k in last}
  except (ValueError, IndexError): pass
  for p in sorted(folder.glob("eval_*.json")): tables[p.stem[5:]] = _columns(train.read_json(p))
  return cfg, tables

def _mean_std(xs:list) -> str:
  xs = [x for x in xs if x is not None]
  if not xs: return "-"
  return f"{np.mean(xs):.4f}" if len(xs) == 1 else f"{np.mean(xs):.4f} +- {np.std(xs, ddof=1):.4f}"

def _gather(folders:list[str]) -> tuple[list, dict, typing.Callable]:
  # the runs, grouped by configuration (runs differing only in NOT_CONFIG are seeds of one group), and a group's short name:
  # the config fields that differ between groups
  if not folders: raise ValueError("report: give run folders, e.g. python eval.py report runs/mqar-*")
  runs = [(f, *_run(Path(f))) for f in folders]
  key = lambda cfg: tuple(sorted((k, str(v)) for k, v in cfg.items() if k not in NOT_CONFIG))
  groups: dict[tuple, list] = {}
  for f, cfg, tables in runs: groups.setdefault(key(cfg), []).append((f, cfg, tables))
  varying = sorted({k for g in groups for k, v in g} - {k for k, v in set.intersection(*[set(g) for g in groups])})
  return runs, groups, lambda g: " ".join(f"{k}={v}" for k, v in g if k in varying and k != "state") or "all runs"

def _kinds(runs:list) -> list[tuple[str, list[str]]]:
  # each kind of result (the final validation first, then each eval) with its columns in first-seen order
  kinds = sorted({t for _, _, tables in runs for t in tables}, key=lambda t: (t != "final validation", t))
  return [(kind, list(dict.fromkeys(c for _, _, tables in runs for c in tables.get(kind, {})))) for kind in kinds]

def report(folders:list[str]) -> str:
  """Markdown tables of run folders: one per kind of result (the final validation, each eval_*.json), a row per configuration,
  its cells the mean +- sample standard deviation over the runs (seeds) that share it. A row is named by the config fields
  that differ between rows; state/layer is the memory one layer holds at the training length (state_size: Zoology's axis)."""
  runs, groups, name = _gather(folders)
  out = []
  for kind, cols in _kinds(runs):
    head = ["config", "runs", "state/layer", *cols]
    rows = [[name(g), str(sum(kind in t for _, _, t in rs)), f"{rs[0][1]['state']:,}",
             *[_mean_std([t.get(kind, {}).get(c) for _, _, t in rs]) for c in cols]] for g, rs in groups.items()]
    out.append(f"### {kind}\n\n| " + " | ".join(head) + " |\n|" + "---|" * len(head) + "\n" + "\n".join("| " + " | ".join(r) + " |" for r in rows))
  return "\n\n".join(out) + "\n"

def plot(folders:list[str], path:str):
  """Zoology's figure: for each MQAR eval, the accuracy of its last column (the longest, most pairs) against the state one layer
  holds, a point per configuration (mean over its runs, the bar one standard deviation), into a PNG. Needs matplotlib."""
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError: raise ValueError("report --plot needs matplotlib (pip install matplotlib); the tables print without it") from None
  runs, groups, name = _gather(folders)
  kinds = [(k, cols) for k, cols in _kinds(runs) if k.startswith("mqar") and cols]
  if not kinds: raise ValueError("report --plot: none of these runs has an eval_mqar*.json to plot (python eval.py mqar --ckpt=RUN)")
  fig, axes = plt.subplots(1, len(kinds), figsize=(6 * len(kinds), 4.5), squeeze=False)
  for ax, (kind, cols) in zip(axes[0], kinds):
    for g, rs in groups.items():
      accs = [a for _, _, t in rs if (a := t.get(kind, {}).get(cols[-1])) is not None]
      if not accs: continue
      ax.errorbar(rs[0][1]["state"], np.mean(accs), yerr=np.std(accs, ddof=1) if len(accs) > 1 else 0, fmt="o", capsize=3,
                   label=f"{name(g)} ({len(accs)})")
    ax.set(xscale="log", xlabel="state per layer (floats)", ylabel=f"accuracy, {cols[-1]}", title=kind, ylim=(-0.02, 1.02))
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)

def report_main(argv:list[str]) -> int:
  # python eval.py report RUN [RUN ...] [--out=FILE] [--plot=FILE.png]: the tables on stdout, into FILE when given, the figure
  opts = {k: v for a in argv if a.startswith("--") for k, _, v in [a[2:].partition("=")]}
  folders = [a for a in argv if not a.startswith("--")]
  if bad := sorted(set(opts) - {"out", "plot"}):
    raise ValueError(f"report: unknown option --{bad[0]}: it takes run folders, --out=FILE and --plot=FILE.png")
  text = report(folders)
  print(text, end="")
  if opts.get("out"):
    Path(opts["out"]).write_text(text)
    print(f"wrote {opts['out']}")
  if opts.get("plot"):
    plot(folders, opts["plot"])
    print(f"wrote {opts['plot']}")
  return 0

def evaluate(cmd:str, argv:list[str]) -> dict:
  """Run one command with --key=value arguments (EvalConfig fields, and MCConfig fields as overrides); returns its JSON dict."""
  if cmd not in COMMANDS: raise ValueError(f"unknown command {cmd!r}: allowed values are {tuple(COMMANDS)}")
  eh, mh = train._hints(EvalConfig), train._hints(MCConfig)
  kv = train.parse_kv(argv, {**eh, **mh})
  ec, overrides = EvalConfig(**{k: v for k, v in kv.items() if k in eh}), {k: v for k, v in kv.items() if k not in eh}
  train.check_device()
  with Context(**train.device_defaults()):
    res = {"command": cmd, "eval": dataclasses.asdict(ec), "overrides": overrides, **COMMANDS[cmd](ec, overrides)}
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
  names = ", ".join([*COMMANDS, "report"])
  about = f"\n{cmd}: {COMMANDS[cmd].__doc__}\n" if cmd else __doc__ + f"\ncommands: {names} (python eval.py COMMAND --help)\n"
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
  if argv[0] == "report" and {"-h", "--help"} & set(argv[1:]):
    print(f"usage: python eval.py report RUN [RUN ...] [--out=FILE] [--plot=FILE.png]\n\n{report.__doc__}\n\n--plot: {plot.__doc__}")
    return 0
  try:
    if argv[0] == "report": return report_main(argv[1:])
    evaluate(argv[0], argv[1:])
  except ValueError as e:
    print(f"eval.py: error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print("eval.py: interrupted", file=sys.stderr)
    return 130
  return 0

if __name__ == "__main__": sys.exit(main())

"""
tinymc training: a memory-caching language model on bytes (or an MQAR recall model), AdamW with warm-up and cosine decay.

  python train.py                              # the default preset: swla + grm on the stdlib's source, a few minutes on a GPU
                                               # (on a 2-core CPU: 17 min to the first step, then ~5 min a step)
  python train.py --preset=smoke               # a tiny run that finishes within a minute on a laptop CPU
  python train.py --core=titans --segment=128  # any TrainConfig or MCConfig field, as --key=value
  python train.py --resume=runs/default        # continue a run exactly where its last checkpoint left it
  DEV=CUDA BEAM=2 python train.py --preset=gpu # tinygrad's own knobs (DEV, BEAM, DEBUG, JIT, NOOPT) are read as usual

A new run trains in bfloat16 on a GPU that supports it (states, gates and accumulators stay float32) and in float32 on the CPU;
--dtype=float32 keeps the exact path. One @TinyJit step does the forward, cross-entropy, backward, global-norm gradient clipping
and the AdamW update; the lr is an input of the jitted step, so it follows the schedule, and the losses are read ten steps at a
time. A run lives in <out>/<name>/: log.txt (the resolved config, versions and device, then one line per step), config.json, and
ckpt/ with model.safetensors, optim.safetensors and state.json (step, data generator state, validation history). A checkpoint is
written to ckpt.tmp/ and renamed into place, the old one moved aside first, so a kill at any moment leaves a complete checkpoint
in ckpt/ (or, between the two renames, in ckpt.old/, which loading falls back to).
"""
import dataclasses, difflib, importlib.metadata, inspect, io, json, math, os, platform, re, shlex, shutil, signal, sys, threading, time
import tokenize, typing
from dataclasses import dataclass, field
from pathlib import Path
import numpy as np
from tqdm import tqdm
from tinygrad import Context, Device, Tensor, TinyJit, Variable, dtypes
from tinygrad.helpers import BEAM, JIT, NOOPT, PARALLEL
from tinygrad.nn.optim import LAMB, OptimizerGroup
from tinygrad.nn.state import get_state_dict
import kernels
from mc import MCConfig, Model
from data import IGNORE, Batches, load_corpus, mqar_batch, niah_batches

@dataclass
class TrainConfig:
  model: MCConfig = field(default_factory=MCConfig)   # the model; its fields are set with --key=value like these
  preset: str = "default"     # the preset these values start from (--preset=...); names the run unless --name is given
  task: str = "lm"            # "lm" next-byte prediction on a corpus, "mqar" multi-query associative recall (vocab >= 2 kv + 2)
  data: str = ""              # lm: a text file or folder of them; "" = the Python standard library's own .py source
  niah_mix: float = 0.0       # lm: share of training windows that carry a needle and its question (training needles only)
  mqar_kv: int = 16           # mqar: key-value pairs in every training and validation sequence (without mqar_mix)
  mqar_mix: tuple[int, ...] = ()   # mqar: a mixture as length,pairs,length,pairs,... (Zoology: 64,4,128,8,256,16,256,32,256,64)
  seq_len: int = 512          # tokens per training window
  batch_size: int = 16        # windows per step
  steps: int = 1500           # optimizer steps; the lr schedule spans them
  stop_at: int = 0            # stop (and checkpoint) after this step, 0 = run to `steps`; the schedule still spans `steps`
  lr: float = 2e-3            # peak learning rate
  min_lr: float = 0.1         # the cosine decays to this fraction of lr at `steps`
  warmup: int = 100           # linear warm-up steps
  weight_decay: float = 0.1   # AdamW's decoupled weight decay, on matrices only (not on norms and biases)
  b1: float = 0.9             # AdamW first-moment decay
  b2: float = 0.95            # AdamW second-moment decay
  grad_clip: float = 1.0      # the global gradient norm is clipped to this
  eval_every: int = 250       # validate every this many steps, and at the start and the end
  eval_batches: int = 8       # validation set: this many batches of fixed windows, the same at every validation
  ckpt_every: int = 500       # checkpoint every this many steps, and at the end
  seed: int = 0               # model initialisation and data order
  out: str = "runs"           # parent folder of the run folders
  name: str = ""              # run folder <out>/<name>; "" = the preset's name
  resume: str = ""            # a run folder to continue exactly; its config is the base that --key=value changes
  overwrite: bool = False     # 1 = start afresh in an existing run folder, deleting its checkpoint, log and eval results

  def __post_init__(self):
    if self.task not in ("lm", "mqar"): raise ValueError(f"--task={self.task!r}: allowed values are ('lm', 'mqar')")
    for k in ("seq_len", "batch_size", "steps", "eval_every", "eval_batches", "ckpt_every", "mqar_kv"):
      if getattr(self, k) < 1: raise ValueError(f"--{k}={getattr(self, k)}: must be >= 1")
    if not 0 <= self.stop_at <= self.steps: raise ValueError(f"--stop_at={self.stop_at}: must be in [0, steps={self.steps}]")
    if self.lr <= 0 or self.warmup < 0 or self.grad_clip <= 0 or not 0 <= self.min_lr <= 1:
      raise ValueError(f"need lr > 0, warmup >= 0, grad_clip > 0 and 0 <= min_lr <= 1, got {self.lr}, {self.warmup}, {self.grad_clip}, {self.min_lr}")
    if self.task == "lm" and self.model.vocab < 256: raise ValueError(f"--vocab={self.model.vocab}: task 'lm' reads bytes, needs vocab >= 256")
    if self.resume and self.overwrite: raise ValueError(f"--resume={self.resume} continues a run; --overwrite=1 would delete it: give one of them")

# Every preset's comment: measured time and final validation result, on named hardware, with the command.
PRESETS: dict[str, dict] = {
  # 2-core x86 CPU, clang 14 (DEV=CPU): 21.7 s wall, 1,475 tok/s once compiled, val bpb 7.965 -> 4.601 (`python train.py --preset=smoke`)
  "smoke": dict(dim=64, n_layers=2, n_heads=2, segment=32, chunk=16, seq_len=128, batch_size=4, steps=20, warmup=2, lr=4e-3,
                eval_every=10, eval_batches=2, ckpt_every=10),
  # H200 (DEV=CUDA, bfloat16 by default): 72.6 s wall (58.0 s training, first step 23.5 s), 607,803 tok/s, val bpb
  # 7.761 -> 1.661 (`DEV=CUDA python train.py`)
  "default": dict(dim=256, n_layers=4, n_heads=4, core="swla", agg="grm", segment=128, chunk=64, seq_len=512, batch_size=16),
  # H100 80GB (DEV=CUDA, JIT=2): 305 s wall (279 s training), 37,021 tok/s, val bpb 7.575 -> 1.628, 22.4 M params
  # (`DEV=CUDA python train.py --preset=gpu`; before kernels.linear and CUDA graphs, not re-timed since)
  "gpu": dict(dim=512, n_layers=6, n_heads=8, core="swla", agg="grm", segment=256, chunk=64, seq_len=1024, batch_size=16, steps=500,
              lr=1e-3, warmup=100, eval_every=100, ckpt_every=250, dtype="bfloat16"),
  # H100 80GB: 6.4 steps/s (120,000 tok/s), so about 5.5 min; val answer accuracy 0.9994 at step 1000 (run stopped at 1128)
  "mqar": dict(task="mqar", vocab=8192, dim=128, n_layers=2, n_heads=2, core="swla", agg="grm", segment=64, chunk=32, seq_len=256,
               mqar_kv=16, batch_size=64, steps=2000, lr=1e-3, eval_every=250, ckpt_every=1000),
}

# ***** config from the command line *****

def _hints(cls) -> dict[str, type]: return {k: v for k, v in typing.get_type_hints(cls).items() if k != "model"}

def typed(key:str, text:str, hint:type):
  # "--key=text" as the field's type: int, float, bool, str, or tuple[int|float, ...] written "a,b,c"
  if text == "": raise ValueError(f"--{key}= needs a value")
  if typing.get_origin(hint) is tuple: return tuple(typed(key, t, typing.get_args(hint)[0]) for t in text.split(","))
  try:
    if hint is bool:
      if text.lower() not in ("1", "0", "true", "false"): raise ValueError
      return text.lower() in ("1", "true")
    return hint(text)
  except ValueError: raise ValueError(f"--{key}={text!r}: expected {getattr(hint, '__name__', hint)}") from None

def parse_kv(argv:list[str], known:dict[str, type]) -> dict[str, typing.Any]:
  # ["--key=value", ...] -> {key: typed value}; unknown keys are refused with the closest known names
  out = {}
  for a in argv:
    if not a.startswith("--") or "=" not in a: raise ValueError(f"arguments are --key=value, got {a!r}")
    k, v = a[2:].split("=", 1)
    if k not in known and k.lower() in ("device", "dev", "gpu", "cuda", "metal", "cpu", "backend"):
      raise ValueError(f"unknown option --{k}: the device is tinygrad's environment variable, e.g. DEV={v.upper() or 'CPU'} python {sys.argv[0]} ...")
    if k not in known:
      close = difflib.get_close_matches(k, known, n=3)
      raise ValueError(f"unknown option --{k}" + (f" (did you mean {', '.join('--' + c for c in close)}?)" if close else ""))
    out[k] = typed(k, v, known[k])
  return out

def field_docs(cls) -> dict[str, tuple[str, str]]:
  # {field: (default as written in the source, its comment)}: --help reads the one place each option is explained
  lines, docs = inspect.getsource(cls).splitlines(keepends=True), {}
  for t in tokenize.generate_tokens(io.StringIO("".join(lines)).readline):
    if t.type == tokenize.NAME and t.string == "def": break
    if t.type == tokenize.COMMENT and (m := re.match(r"\s*(\w+)\s*:[^=]*=(.*)", lines[t.start[0] - 1][:t.start[1]])):
      docs[m[1]] = (m[2].strip(), t.string.lstrip("# "))
  return {f.name: docs.get(f.name, (repr(f.default), "")) for f in dataclasses.fields(cls) if f.name != "model"}

def options_help(cls, keep=lambda k, doc: True, default:str|None=None) -> str:
  # one line per option: --name, its default (or `default` for all), its meaning
  shown = lambda d: d if d == '""' else d.strip('"') if d[:1] != "(" else d[1:-1].replace(" ", "").rstrip(",") or '""'
  docs = {k: (default or shown(d), doc) for k, (d, doc) in field_docs(cls).items() if keep(k, doc)}
  w, v = max(len(k) for k in docs) + 2, max(len(d) for d, _ in docs.values())
  return "\n".join(f"  {'--' + k:<{w}}  {d:<{v}}  {doc}" for k, (d, doc) in docs.items())

def usage() -> str:
  # the docstring, the presets with their comments and values, then every option with its default and meaning
  src = Path(__file__).read_text()
  notes = dict((k, c) for c, k in re.findall(r'^  # (.*)\n  "(\w+)": dict\(', src[src.index("PRESETS: dict"):], re.M))
  presets = "\n".join(f"  {k:<8} {notes.get(k, '')}\n  {'':<8} " + " ".join(f"{a}={b}" for a, b in v.items()) for k, v in PRESETS.items())
  return (f"usage: python train.py [--preset=NAME] [--key=value ...]; the device is tinygrad's DEV=CPU|CUDA|METAL|CL\n{__doc__}\n"
          f"presets (--preset=NAME, default \"default\"): their values go over the defaults below, --key=value over both\n{presets}\n\n"
          f"training options (TrainConfig), --key=value:   default   meaning\n{options_help(TrainConfig)}\n\n"
          f"model options (MCConfig in mc.py), --key=value:   default   meaning\n{options_help(MCConfig)}")

def configure(base:TrainConfig, overrides:dict) -> TrainConfig:
  # set TrainConfig and MCConfig fields by name (both validate themselves)
  mk = {k: v for k, v in overrides.items() if k in _hints(MCConfig)}
  tk = {k: v for k, v in overrides.items() if k not in mk}
  return dataclasses.replace(base, **tk, model=dataclasses.replace(base.model, **mk))

def parse_args(argv:list[str]) -> TrainConfig:
  """--preset=NAME then --key=value overrides of TrainConfig and MCConfig fields; --resume=RUN starts from that run's config."""
  kv = parse_kv(argv, {**_hints(TrainConfig), **_hints(MCConfig)})
  preset = kv.get("preset", "default")
  if preset not in PRESETS: raise ValueError(f"unknown preset --preset={preset!r}: allowed values are {tuple(PRESETS)}")
  if kv.get("resume"):
    # a resumed run keeps its config; a preset given again must agree with it on the model (train() checks)
    return configure(load_config(Path(kv["resume"])), {"stop_at": 0, "overwrite": False, **(PRESETS[preset] if "preset" in kv else {}), **kv})
  return configure(TrainConfig(), {"dtype": default_dtype(), **PRESETS[preset], **kv})

def read_json(p:Path) -> typing.Any:
  try: return json.loads(p.read_bytes())
  except (ValueError, UnicodeDecodeError) as e: raise ValueError(f"{p}: not valid JSON ({e})") from None

def from_json(cls, d:dict, p:Path):
  # a dataclass from a JSON object whose keys and value types must match its fields
  hints = _hints(cls)
  if unknown := sorted(set(d) - set(hints) - {"model"}): raise ValueError(f"{p}: unknown fields {unknown} (not a tinymc run config?)")
  for k, v in d.items():
    h = hints.get(k)
    ok = {bool: lambda: type(v) is bool, int: lambda: type(v) is int, float: lambda: type(v) in (int, float), str: lambda: type(v) is str}
    if h in ok and not ok[h](): raise ValueError(f"{p}: {k}={v!r} is not of type {h.__name__}")
  try: return cls(**d)
  except (TypeError, ValueError) as e: raise ValueError(f"{p}: {e}") from None

def load_config(run:Path) -> TrainConfig:
  p = Path(run) / "config.json"
  if not p.is_file(): raise ValueError(f"{run}: no run there ({p} is missing)")
  d = read_json(p)
  if not isinstance(d, dict) or not isinstance(d.get("model"), dict): raise ValueError(f"{p}: not a tinymc run config (no \"model\" object)")
  return from_json(TrainConfig, {**d, "model": from_json(MCConfig, d["model"], p)}, p)

# ***** device and data *****

def check_device():
  # tinygrad opens a device on first use: probe it before anything is written, so a missing one is one line, not a traceback
  try: Device[Device.DEFAULT]
  except Exception as e:
    why = str(e).splitlines()[0] if str(e) else type(e).__name__
    other = ", ".join(f"DEV={d}" for d in ("CUDA", "METAL", "CL") if d != Device.DEFAULT)
    raise ValueError(f"DEV={os.environ.get('DEV', Device.DEFAULT)}: the {Device.DEFAULT} device is not available here ({why}); "
                     f"try DEV=CPU (it needs clang), or {other} where this machine has one") from None

def default_dtype() -> str:
  # a new run's activation dtype where neither the preset nor --dtype names one: bfloat16 on a GPU that supports it, as the peers
  # train (states, gates and accumulators stay float32); float32 on the CPU, whose clang may lack bfloat16 and gains nothing by it
  try: return "bfloat16" if Device.DEFAULT != "CPU" and kernels.supported("bfloat16") else "float32"
  except Exception: return "float32"   # the device does not open: check_device says so, in one line

def check_dtype(dtype:str):
  if not kernels.supported(dtype): raise ValueError(f"--dtype={dtype}: the {Device.DEFAULT} device does not support it here; use --dtype=float32")

def device_defaults() -> dict:
  # On the CPU, tinygrad's kernel optimiser spends minutes generating code for a training graph (upcast, unrolled kernels) and
  # its compile pool respawns worker processes every 16 kernels: for the small models trained on a CPU, plain kernels built in
  # this process start 20x sooner (smoke: 15 s to the first step instead of 5 min on 2 cores) and run 2-3x slower.
  # Defaults only: NOOPT= or PARALLEL= set in the environment win.
  want = {"CPU": (("NOOPT", 1), ("PARALLEL", 0))}.get(Device.DEFAULT, ())
  return {k: v for k, v in want if k not in os.environ}

def mqar_mixture(cfg:TrainConfig) -> list[tuple[int, int]]:
  # (length, pairs) of the MQAR training mixture: --mqar_mix's pairs, or every sequence at seq_len with mqar_kv pairs
  m = cfg.mqar_mix
  if not m: return [(cfg.seq_len, cfg.mqar_kv)]
  if len(m) % 2 or any(T > cfg.seq_len for T in m[::2]):
    raise ValueError(f"--mqar_mix={','.join(map(str, m))}: give length,pairs,length,pairs,... with every length <= seq_len={cfg.seq_len}")
  return list(zip(m[::2], m[1::2]))

class MQAR:
  """MQAR training batches from a seeded generator, with the state()/load_state() of data.Batches. With a mixture, row i of a
  batch is drawn from entry i % len(mixture), its rows gathered per entry; a sequence shorter than seq_len is padded at its end
  with token 0 and ignored targets (causal models never see the padding from earlier positions)."""
  def __init__(self, cfg:TrainConfig, seed):
    self.cfg, self.rng, self.mix = cfg, np.random.default_rng(seed), mqar_mixture(cfg)
    for T, kv in self.mix: mqar_batch(1, T, kv, cfg.model.vocab, seed=0)   # raises on an impossible (length, kv, vocab)
  def next(self) -> tuple[np.ndarray, np.ndarray]:
    B, L, m = self.cfg.batch_size, self.cfg.seq_len, len(self.mix)
    xs, ys = [], []
    for j, (T, kv) in enumerate(self.mix):
      if n := len(range(j, B, m)):
        x, y, _ = mqar_batch(n, T, kv, self.cfg.model.vocab, seed=self.rng)
        xs.append(np.pad(x, ((0, 0), (0, L - T))))
        ys.append(np.pad(y, ((0, 0), (0, L - T)), constant_values=IGNORE))
    return np.concatenate(xs), np.concatenate(ys)
  def state(self) -> dict: return {"rng": self.rng.bit_generator.state}
  def load_state(self, state:dict): self.rng.bit_generator.state = state["rng"]

def make_data(cfg:TrainConfig) -> tuple[Batches|MQAR, list[tuple[np.ndarray, np.ndarray]]]:
  """The training batches and the fixed validation batches."""
  B, L, n = cfg.batch_size, cfg.seq_len, cfg.eval_batches
  if cfg.task == "mqar":
    val = MQAR(cfg, [cfg.seed, 1])
    return MQAR(cfg, cfg.seed), [val.next() for _ in range(n)]
  where = f"--data={cfg.data}" if cfg.data else "the stdlib corpus"
  try: train = niah_batches(load_corpus(cfg.data or None, "train"), B, L, seed=cfg.seed, niah_mix=cfg.niah_mix)
  except ValueError as e: raise ValueError(f"{where}, train split: {e}") from None
  v = load_corpus(cfg.data or None, "val")
  if len(v) < L + 1: raise ValueError(f"{where}: the val split has {len(v)} bytes, shorter than one window of seq_len + 1 = {L + 1}")
  # evenly spaced windows over the val split: the same set at every validation and in every run
  w = v[np.linspace(0, len(v) - L - 1, n * B).astype(np.int64)[:, None] + np.arange(L + 1)].astype(np.int32)
  return train, [(w[i * B:(i + 1) * B, :-1], w[i * B:(i + 1) * B, 1:]) for i in range(n)]

# ***** scoring, checkpoints *****

def scorer(model:Model):
  """(x, y) int arrays (B,L) -> argmax prediction and negative log-likelihood of y per token, as arrays. One TinyJit per shape.
  y may hold IGNORE (scored as y=0; mask it out)."""
  jits = {}
  def fwd(x:Tensor, y:Tensor) -> tuple[Tensor, Tensor]:
    logp = model(x).log_softmax(-1)
    pred, nll = logp.argmax(-1).cast(dtypes.int32), -logp.gather(-1, y.maximum(0).unsqueeze(-1))[..., 0]
    Tensor.realize(pred, nll)
    return pred, nll
  def score(x:np.ndarray, y:np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    jit = jits.setdefault(x.shape, TinyJit(fwd))
    pred, nll = jit(Tensor(np.ascontiguousarray(x, dtype=np.int32)), Tensor(np.ascontiguousarray(y, dtype=np.int32)))
    return pred.numpy(), nll.numpy()
  return score

def validate(score, val:list) -> dict:
  # mean loss (nats) over the scored tokens, bits per byte (= per token), next-token accuracy
  nll, hit, n = 0.0, 0, 0
  for x, y in val:
    pred, l = score(x, y)
    m = y != IGNORE
    nll, hit, n = nll + float(l[m].sum()), hit + int((pred[m] == y[m]).sum()), n + int(m.sum())
  return {"loss": nll / n, "bpb": nll / n / math.log(2), "acc": hit / n}

def optim_state(opt:OptimizerGroup) -> dict[str, Tensor]:
  # Adam's moments, step decays and lr: the optimizer's own tensors, without the parameters it points at
  return {k: t for k, t in get_state_dict(opt).items() if not {"params", "buffers"} & set(k.split("."))}

# safetensors written and read through NumPy: tinygrad's safe_save/safe_load run small kernels on the CPU device, which needs a
# C compiler that a GPU machine may lack. The format: 8-byte little-endian header size, a JSON header, the raw tensors.
ST_DTYPES = {dtypes.float32: "F32", dtypes.float16: "F16", dtypes.bfloat16: "BF16", dtypes.float64: "F64", dtypes.int32: "I32",
             dtypes.int64: "I64", dtypes.uint8: "U8", dtypes.bool: "BOOL"}

def save_tensors(tensors:dict[str, Tensor], path:Path, metadata:dict[str, str]):
  # bfloat16 has no NumPy dtype: its bits travel as uint16
  arrs = {k: (t.bitcast(dtypes.uint16) if t.dtype == dtypes.bfloat16 else t).numpy() for k, t in tensors.items()}
  header, off = {"__metadata__": metadata}, 0
  for k, a in arrs.items():
    header[k] = {"dtype": ST_DTYPES[tensors[k].dtype], "shape": list(a.shape), "data_offsets": [off, off + a.nbytes]}
    off += a.nbytes
  head = json.dumps(header).encode()
  with open(path, "wb") as f:
    f.write(len(head).to_bytes(8, "little") + head)
    for a in arrs.values(): f.write(np.ascontiguousarray(a).tobytes())

def read_tensors(path:Path) -> dict[str, tuple[np.ndarray, typing.Any]]:
  # {name: (array, tinygrad dtype)}; bfloat16 arrays come back as their uint16 bits. A truncated or foreign file is named.
  if not path.is_file(): raise ValueError(f"{path}: missing (an incomplete checkpoint?)")
  raw, names = path.read_bytes(), {v: k for k, v in ST_DTYPES.items()}
  n, out = int.from_bytes(raw[:8], "little"), {}
  try:
    if len(raw) < 8 or 8 + n > len(raw): raise ValueError(f"its header needs {8 + n} bytes, the file has {len(raw)}")
    for k, h in json.loads(raw[8:8 + n]).items():
      if k == "__metadata__": continue
      if h["dtype"] not in names: raise ValueError(f"{k} has dtype {h['dtype']!r}, not one of {sorted(names)}")
      dt = names[h["dtype"]]
      np_dt = np.dtype(np.uint16 if dt == dtypes.bfloat16 else np.bool_ if dt == dtypes.bool else dt.fmt)
      a, b = h["data_offsets"]
      if b - a != math.prod(h["shape"]) * np_dt.itemsize or 8 + n + b > len(raw):
        raise ValueError(f"{k} needs bytes {8 + n + a}..{8 + n + b} of {len(raw)} for shape {h['shape']}")
      out[k] = (np.frombuffer(raw, np_dt, (b - a) // np_dt.itemsize, 8 + n + a).reshape(h["shape"]), dt)
  except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
    raise ValueError(f"{path}: not a complete safetensors file ({type(e).__name__}: {e}); truncated or foreign?") from None
  return out

def ckpt_dir(run:Path) -> Path:
  # ckpt/ holds the last checkpoint; only a kill between save()'s two renames leaves it in ckpt.old/ alone
  for d in (run / "ckpt", run / "ckpt.old"):
    if (d / "state.json").is_file(): return d
  raise ValueError(f"{run}: no checkpoint there (no ckpt/state.json)")

STATE_KEYS = ("step", "data", "val", "best_val", "train_time_s", "tokens")

def read_state(ck:Path) -> dict:
  # a checkpoint's state.json: the step, the data generator's state, the validation history, the clock
  state = read_json(p := ck / "state.json")
  if not isinstance(state, dict) or (missing := [k for k in STATE_KEYS if k not in state]):
    raise ValueError(f"{p}: lacks {missing if isinstance(state, dict) else list(STATE_KEYS)} (not a tinymc checkpoint?)")
  if type(state["step"]) is not int or state["step"] < 0: raise ValueError(f"{p}: step={state['step']!r} is not a step number")
  return state

def save_ckpt(run:Path, model:Model, opt:OptimizerGroup, state:dict):
  tmp, cur, old = run / "ckpt.tmp", run / "ckpt", run / "ckpt.old"
  shutil.rmtree(tmp, ignore_errors=True)
  tmp.mkdir(parents=True)
  save_tensors(get_state_dict(model), tmp / "model.safetensors", {"step": str(state["step"])})
  save_tensors(optim_state(opt), tmp / "optim.safetensors", {"step": str(state["step"])})
  (tmp / "state.json").write_text(json.dumps(state))
  if cur.exists():
    shutil.rmtree(old, ignore_errors=True)
    os.replace(cur, old)
  os.replace(tmp, cur)
  shutil.rmtree(old, ignore_errors=True)

def load_tensors(obj, path:Path, strict:bool=True):
  # every tensor of obj (a model or optim_state dict) from a safetensors file; missing or misshapen ones are a clear error, and
  # so are extra ones if strict (a model read with other MCConfig fields, e.g. agg=mean of a grm model, may use fewer)
  sd, want = read_tensors(path), obj if isinstance(obj, dict) else get_state_dict(obj)
  if missing := sorted(set(want) - set(sd)): raise ValueError(f"{path}: lacks {missing[:5]} (saved from a different config?)")
  if strict and (extra := sorted(set(sd) - set(want))):
    raise ValueError(f"{path}: has {extra[:5]} that this model lacks (saved from a different config?)")
  for k, t in want.items():
    if t.shape != sd[k][0].shape:
      raise ValueError(f"{path}: {k} has shape {sd[k][0].shape}, the model needs {t.shape} (saved from a different config?)")
  for k, t in want.items():
    a, dt = sd[k]
    x = Tensor(a.copy(), device=t.device)
    t.replace((x.bitcast(dt) if dt == dtypes.bfloat16 else x).cast(t.dtype)).realize()

def load_model(run:Path, **overrides) -> tuple[TrainConfig, Model]:
  """The model of a run folder with its last checkpoint's weights; overrides replace MCConfig fields (e.g. agg="mean")."""
  cfg = load_config(run)
  cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **overrides))
  check_device()
  check_dtype(cfg.model.dtype)
  model = Model(cfg.model)
  load_tensors(model, ckpt_dir(Path(run)) / "model.safetensors", strict=not overrides)
  return cfg, model

def lr_at(cfg:TrainConfig, step:int) -> float:
  # linear warm-up to lr over `warmup` steps, then cosine decay to min_lr * lr at `steps`; step counts from 0
  if step < cfg.warmup: return cfg.lr * (step + 1) / cfg.warmup
  frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
  return cfg.lr * (cfg.min_lr + (1 - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * frac)))

# ***** training *****

class AdamW(LAMB):
  """tinygrad's AdamW, its state (m, v, b1_t, b2_t, lr) and arithmetic, stepped by kernels.adamw: one kernel a parameter that
  updates p, m and v in place, with the gradient's clipping factor applied inside it."""
  def __init__(self, params:list[Tensor], lr:float, b1:float, b2:float, weight_decay:float):
    super().__init__(params, lr, b1, b2, 1e-8, weight_decay, adam=True)
    self.m, self.v = ([t.contiguous().realize() for t in ts] for ts in (self.m, self.v))   # buffers, for the kernel to update

  def schedule_clipped(self, scale:Tensor) -> list[Tensor]:
    # the tensors to realize for one step on the gradients times scale (a (1,) float32 tensor)
    self.b1_t.assign(self.b1_t * self.b1)
    self.b2_t.assign(self.b2_t * self.b2)
    c = (1.0 - self.b1_t).cat(1.0 - self.b2_t, scale.reshape(1), self.lr).contiguous()
    return [self.b1_t, self.b2_t, *(x for p, m, v in zip(self.params, self.m, self.v)
                                    for x in kernels.adamw(p, m, v, p.grad, c, self.b1, self.b2, self.eps, self.wd))]

def make_optimizer(model:Model, cfg:TrainConfig) -> OptimizerGroup:
  # AdamW with weight decay on matrices only: norms, gate biases and other vectors keep their scale
  params = get_state_dict(model).values()
  return OptimizerGroup(*(AdamW([p for p in params if (p.ndim > 1) == decay], lr=cfg.lr, b1=cfg.b1, b2=cfg.b2,
                                weight_decay=cfg.weight_decay if decay else 0.0) for decay in (True, False)))

SYNC_EVERY = 10   # train() reads the losses of this many queued steps at once

def make_step(model:Model, opt:OptimizerGroup, grad_clip:float):
  """The jitted training step: forward, cross-entropy, backward, global-norm gradient clipping, the AdamW update.
  step(x, y, lr, i) with (B, L) int tensors, the learning rate (a (1,) float tensor) and i (a bound Variable below SYNC_EVERY)
  returns (loss, gradient norm) as realized tensors and also writes them into row i of step.history (SYNC_EVERY, 2): the jit's
  outputs are overwritten by its next call, so a caller that reads several steps at once reads them there. The lr is an input of
  the jitted graph: writing it from outside would schedule and run kernels of its own every step."""
  history = Tensor.zeros(SYNC_EVERY, 2).contiguous().realize()
  @TinyJit
  @Context(TRAINING=1)
  def step(x:Tensor, y:Tensor, lr:Tensor, i:Variable) -> tuple[Tensor, Tensor]:
    for o in opt.optimizers: o.lr.assign(lr.cast(o.lr.dtype))
    opt.zero_grad()
    loss = model(x).sparse_categorical_crossentropy(y, ignore_index=IGNORE).backward()
    # each parameter's sum of squares by rows (kernels.rowdot: lanes along a row), then the few row sums: tinygrad fuses the sums of
    # all parameters into one kernel that walks every one (0.67 ms of the default step on an H100, 1.9 ms at the gpu preset's
    # shape), and a sum of its own per parameter got 512 threads walking 1376 values each (the MLP's, 12 launches at the gpu shape)
    gnorm = Tensor.stack(*[kernels.rowdot(g := p.grad.reshape(-1, p.shape[-1]), g).sum() for p in opt.params]).sum().sqrt()
    scale = (grad_clip / (gnorm + 1e-6)).minimum(1.0)
    row = history[i:i + 1].assign(Tensor.stack(loss.float(), gnorm).reshape(1, 2))
    Tensor.realize(loss, gnorm, row, *(x for o in opt.optimizers for x in o.schedule_clipped(scale)))
    return loss, gnorm
  step.history = history
  return step

def slot(i:int) -> Variable: return Variable("i", 0, SYNC_EVERY - 1).bind(i)   # step's history row i

class Interrupted(Exception):
  """SIGINT or SIGTERM stopped a run: a checkpoint of the step reached was written, or the step under way was abandoned."""
  def __init__(self, signum:int, line:str):
    super().__init__(line)
    self.signum = signum

def check_new_run(run:Path, overwrite:bool):
  # a new run never replaces a run folder that holds a checkpoint or a log unless --overwrite=1 asks it to
  ckpt = any((run / d).is_dir() for d in ("ckpt", "ckpt.old"))
  if (ckpt or (run / "log.txt").is_file() and (run / "log.txt").stat().st_size) and not overwrite:
    cont = f"continue it with --resume={run}, " if ckpt else ""
    raise ValueError(f"{run} already holds a run ({'a checkpoint' if ckpt else 'a log, no checkpoint'}): {cont}"
                     "replace it with --overwrite=1, or give another --name")

def clear_run(run:Path):
  # a new run's folder: the old run's checkpoints, log and eval results (which describe another model) go
  run.mkdir(parents=True, exist_ok=True)
  for d in ("ckpt", "ckpt.old", "ckpt.tmp"): shutil.rmtree(run / d, ignore_errors=True)
  for f in run.glob("eval_*.json"): f.unlink()
  (run / "log.txt").write_text("")

def trim_log(log:Path, step:int):
  # a run killed after its last checkpoint logged steps that the resumed run replays: drop them, so each step is logged once
  lines = log.read_text().splitlines(keepends=True) if log.is_file() else []
  keep = [ln for ln in lines if not ((m := re.match(r"(?:step|val) +(\d+)/", ln)) and int(m[1]) > step)]
  if len(keep) < len(lines):
    log.with_suffix(".tmp").write_text("".join(keep))
    os.replace(log.with_suffix(".tmp"), log)

def train(cfg:TrainConfig) -> dict:
  """Train (or resume) the run cfg describes. Returns its run folder, the losses of the steps run here, the validations, speed.
  SIGINT or SIGTERM (in the main thread) checkpoints the step reached and raises Interrupted."""
  with Context(**device_defaults()): return _train(cfg)

def _train(cfg:TrainConfig) -> dict:
  # everything is checked before the run folder is touched: device, dtype, folder, config, data, and a resumed checkpoint's files
  check_device()
  check_dtype(cfg.model.dtype)
  run = Path(cfg.resume) if cfg.resume else Path(cfg.out) / (cfg.name or cfg.preset)
  if cfg.resume and (saved := load_config(run).model) != cfg.model:
    diff = [f.name for f in dataclasses.fields(MCConfig) if getattr(saved, f.name) != getattr(cfg.model, f.name)]
    raise ValueError(f"--resume={run}: the checkpoint's model has " + ", ".join(f"{k}={getattr(saved, k)!r}" for k in diff) +
                     "; this run asks for " + ", ".join(f"{k}={getattr(cfg.model, k)!r}" for k in diff))
  if not cfg.resume: check_new_run(run, cfg.overwrite)
  data, val = make_data(cfg)
  Tensor.manual_seed(cfg.seed)
  model = Model(cfg.model)
  params, opt = get_state_dict(model), make_optimizer(model, cfg)
  state = {"step": 0, "data": None, "val": [], "best_val": None, "train_time_s": 0.0, "tokens": 0}
  if cfg.resume:
    state = read_state(ck := ckpt_dir(run))
    load_tensors(model, ck / "model.safetensors")
    load_tensors(optim_state(opt), ck / "optim.safetensors")
    try: data.load_state(state["data"])
    except Exception as e: raise ValueError(f"{ck / 'state.json'}: its data position does not fit this run ({type(e).__name__}: {e})") from None
  # realized buffers from the first step on, so the first call compiles the same graph that the jit captures and replays
  Tensor.realize(*params.values(), *optim_state(opt).values())
  if cfg.resume: trim_log(run / "log.txt", state["step"])
  else: clear_run(run)
  conf = dataclasses.asdict(cfg)
  (run / "config.json").write_text(json.dumps(conf, indent=1))
  def say(line:str, echo:bool=True):
    with open(run / "log.txt", "a") as f: f.write(line + "\n")
    if echo: tqdm.write(line)
  versions = f"python {platform.python_version()} | tinygrad {importlib.metadata.version('tinygrad')} | numpy {np.__version__}"
  knobs = f"NOOPT={NOOPT.value} PARALLEL={PARALLEL.value} BEAM={BEAM.value} JIT={JIT.value}"
  say(f"{'resumed at step ' + str(state['step']) if cfg.resume else 'run'} {run} | {versions}")
  say(f"device {Device.DEFAULT} | dtype {cfg.model.dtype} | {knobs} | params {sum(p.numel() for p in params.values()):,}")
  say("train " + " ".join(f"{k}={v}" for k, v in conf.items() if k != "model"))
  say("model " + " ".join(f"{k}={v}" for k, v in conf["model"].items()))

  step = make_step(model, opt, cfg.grad_clip)
  score, end, B, L = scorer(model), cfg.stop_at or cfg.steps, cfg.batch_size, cfg.seq_len
  resume = f"python train.py --resume={shlex.quote(str(run))}"
  def evaluate(s:int):
    v = validate(score, val)
    state["val"].append({"step": s, **v})
    if state["best_val"] is None or v["loss"] < state["best_val"]: state["best_val"] = v["loss"]
    say(f"val  {s:05d}/{cfg.steps:05d} | loss {v['loss']:.4f} | bpb {v['bpb']:.4f} | acc {v['acc']:.4f}")
  def checkpoint(s:int):
    state.update(step=s, data=data.state())
    save_ckpt(run, model, opt, state)
  def last_ckpt() -> str:
    try: return f"the last good checkpoint is {(ck := ckpt_dir(run))} (step {read_state(ck)['step']})"
    except ValueError: return "no checkpoint was written yet"

  # SIGINT or SIGTERM: the step under way finishes, its checkpoint is written, and the run stops; a second signal abandons the step
  stop: list[int] = []
  def on_signal(signum, frame):
    stop.append(signum)
    if len(stop) > 1: raise KeyboardInterrupt
    sys.stderr.write(f"\n{signal.Signals(signum).name}: stopping after this step to checkpoint it (send it again to abandon the step)\n")
  main = threading.current_thread() is threading.main_thread()   # only the main thread may take signals
  handlers = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)} if main else {}
  losses, dts, s, saved = [], [], state["step"], state["step"] if cfg.resume else None
  # the steps are queued SYNC_EVERY at a time and their losses read together: reading a loss waits for the device to finish
  # everything queued, so reading it every step would leave the GPU idle while Python prepares the next one
  pending, t0 = [], time.perf_counter()
  def flush():
    nonlocal t0
    if not pending: return
    vals, dt = step.history.numpy()[:len(pending)].tolist(), (time.perf_counter() - t0) / len(pending)
    for (s1, lr), (loss, gnorm) in zip(pending, vals):
      if not (math.isfinite(loss) and math.isfinite(gnorm)):
        bar.close()
        say(f"stopped: loss {loss} and gradient norm {gnorm} at step {s1}; {last_ckpt()}. Try a lower --lr or --dtype=float32.")
        raise FloatingPointError(f"non-finite loss {loss} (gradient norm {gnorm}) at step {s1} of {run}; {last_ckpt()}")
      losses.append(loss)
      dts.append(dt)
      state["train_time_s"] += dt
      state["tokens"] += B * L
      say(f"step {s1:05d}/{cfg.steps:05d} | loss {loss:.4f} | lr {lr:.1e} | dt {dt * 1000:.1f}ms | tok/s {B * L / dt:,.0f}", echo=False)
    bar.set_postfix_str(f"loss {loss:.4f} bpb {loss / math.log(2):.3f} tok/s {B * L / dt:,.0f}")
    bar.update(len(pending))
    pending.clear()
  try:
    if not cfg.resume: evaluate(0)
    bar = tqdm(total=end, initial=s, desc=run.name, dynamic_ncols=True)
    while s < end and not stop:
      x, y = data.next()
      if not pending: t0 = time.perf_counter()
      lr = lr_at(cfg, s)
      s += 1
      step(Tensor(x), Tensor(y), Tensor([lr], dtype=dtypes.float32), slot(len(pending)))
      pending.append((s, lr))
      # the first steps compile: they are read at once, so that their time is their own
      if len(pending) == SYNC_EVERY or s <= 2 or s % cfg.eval_every == 0 or s % cfg.ckpt_every == 0 or s == end or stop: flush()
      # validation and checkpoints are off the clock: train_time_s only counts steps
      if s % cfg.eval_every == 0 or s == end: evaluate(s)
      if s % cfg.ckpt_every == 0 or s == end: checkpoint(saved := s)
    bar.close()
    if stop:
      if saved != s: checkpoint(saved := s)
      say(f"{signal.Signals(stop[0]).name} at step {s} of {cfg.steps}: checkpoint written; continue with: {resume}")
      raise Interrupted(stop[0], f"stopped by {signal.Signals(stop[0]).name} at step {s}")
  except (Exception, KeyboardInterrupt) as e:
    # a second signal, or an error caused by the first (a Ctrl-C also reaches the compiler's process), abandons the step under
    # way: the last complete checkpoint stays
    if not stop or isinstance(e, Interrupted): raise
    nxt = f"continue with: {resume}" if "no checkpoint" not in (last := last_ckpt()) else "start the run again with --overwrite=1"
    say(f"{signal.Signals(stop[0]).name} during step {s + 1}: abandoned it; {last}; {nxt}")
    raise Interrupted(stop[0], f"stopped by {signal.Signals(stop[0]).name} during step {s + 1}") from None
  finally:
    for sig, h in handlers.items(): signal.signal(sig, h)
  # speed once compiled: the jit's first two calls build and capture the graph
  tps = B * L * len(dts[2:]) / sum(dts[2:]) if len(dts) > 2 else None
  speed = f"tok/s {tps:,.0f} after compiling" if tps else "tok/s n/a (under 3 steps: the first two compile)"
  bpb = f"{state['val'][0]['bpb']:.4f} -> {state['val'][-1]['bpb']:.4f}"
  say(f"done {run} | step {s} | train time {state['train_time_s']:.1f}s | {speed} | val bpb {bpb}")
  return {"run": str(run), "step": s, "losses": losses, "val": state["val"], "train_time_s": state["train_time_s"], "tok_s": tps}

def main(argv:list[str]|None=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  if {"-h", "--help"} & set(argv):
    print(usage())
    return 0
  try:
    cfg = parse_args(argv)
    t0 = time.perf_counter()
    train(cfg)
  except ValueError as e:
    print(f"train.py: error: {e}", file=sys.stderr)
    return 2
  except FloatingPointError as e:
    print(f"train.py: {e}", file=sys.stderr)
    return 1
  except Interrupted as e:
    return 128 + e.signum
  except KeyboardInterrupt:
    print("train.py: interrupted before the first step; no checkpoint was written", file=sys.stderr)
    return 130
  print(f"wall time {time.perf_counter() - t0:.1f}s (with compilation and validation)")
  return 0

if __name__ == "__main__": sys.exit(main())

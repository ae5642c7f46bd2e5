"""Tests of eval.py on the CPU, on the smoke run (conftest.py's `smoke_run`, one per pytest session, shared with test_train.py),
and of the README's "Use it from Python" example on the same run."""
import json, re, shlex, shutil, sys
from pathlib import Path
import numpy as np
import pytest
from tinygrad import Tensor
import eval as ev
import train
from data import IGNORE
from mc import MCConfig, Model

ROOT = Path(__file__).resolve().parents[1]

# the smoke run's validation batch shape (batch 4 at its training length, 128), and 2x / 4x that length, so the graphs repeat
B = train.PRESETS["smoke"]["batch_size"]

@pytest.fixture(scope="module")
def run(smoke_run) -> str: return smoke_run["run"]

@pytest.fixture(scope="module")
def mqar_run(run, tmp_path_factory) -> str:
  # the smoke run's weights under task=mqar: an MQAR run of the same shapes (keys from [1, 128), values from [128, 256))
  out = tmp_path_factory.mktemp("mqar") / "mqar"
  shutil.copytree(run, out)
  cfg = json.loads((out / "config.json").read_text())
  (out / "config.json").write_text(json.dumps({**cfg, "task": "mqar"}))
  return str(out)

def test_ppl(run):
  res = ev.evaluate("ppl", [f"--ckpt={run}", "--limit=4", f"--batch={B}"])
  rows = res["rows"]
  assert [r["length"] for r in rows] == [128, 256, 512] and all(r["windows"] == 4 for r in rows)
  assert all(3.0 < r["bpb"] < 7.0 for r in rows) and rows[0]["bpb_beyond"] is None and rows[2]["bpb_beyond"] is not None
  assert json.loads((Path(run) / "eval_ppl.json").read_text())["rows"] == rows
  # post-training memory caching: the same weights read through agg=mean, results beside the plain ones
  res = ev.evaluate("ppl", [f"--ckpt={run}", "--limit=4", f"--batch={B}", "--mults=2", "--agg=mean", "--segment=128"])
  assert res["overrides"] == {"agg": "mean", "segment": 128} and (Path(run) / "eval_ppl-agg=mean-segment=128.json").is_file()
  assert 3.0 < res["rows"][0]["bpb"] < 7.0

def test_niah(run):
  res = ev.evaluate("niah", [f"--ckpt={run}", "--limit=1", f"--batch={B}", "--lengths=512", "--depths=0,0.5,1"])
  assert len(res["rows"]) == 9 and all(0.0 <= r["acc"] <= 1.0 for r in res["rows"])
  assert (Path(run) / "eval_niah.json").is_file()

def test_niah_and_mqar_scoring(run, mqar_run, monkeypatch):
  # with an oracle in place of the model, every answer is right: the scored positions are exactly the answers
  oracle = lambda x, y: (np.where(y != IGNORE, y, 0) if (y != 0).any() else np.roll(x, -1, axis=1), np.zeros(x.shape, np.float32))
  monkeypatch.setattr(train, "scorer", lambda model: oracle)
  res = ev.evaluate("niah", [f"--ckpt={run}", "--limit=3", "--lengths=300,400", "--depths=0,0.3,1"])
  assert all(r["acc"] == 1.0 for r in res["rows"]) and len(res["rows"]) == 3 * 2 * 3
  res = ev.evaluate("mqar", [f"--ckpt={mqar_run}", "--limit=8", "--lengths=64,128", "--kvs=4,8,20"])
  assert [r["acc"] for r in res["rows"]] == [1.0, 1.0, None, 1.0, 1.0, 1.0]
  # --generate: a decoder that knows every answer it was asked for scores 1, one that answers zeros scores 0
  made, real = {}, ev.niah_example
  def record(*args, **kw):
    toks, a, k = real(*args, **kw)
    made[toks[:a].tobytes()] = toks[a:]
    return toks, a, k
  monkeypatch.setattr(ev, "niah_example", record)
  answer = lambda p: made[p.astype(np.uint8).tobytes()]
  monkeypatch.setattr(Model, "generate", lambda self, prompt, n, temperature=1.0, seed=0: np.stack([np.concatenate([p, answer(p)]) for p in prompt]))
  assert all(r["acc"] == 1.0 for r in ev.evaluate("niah", [f"--ckpt={run}", "--limit=3", "--lengths=300", "--generate=1", "--batch=2"])["rows"])
  monkeypatch.setattr(Model, "generate", lambda self, prompt, n, temperature=1.0, seed=0: np.pad(prompt, ((0, 0), (0, n))))
  assert all(r["acc"] == 0.0 for r in ev.evaluate("niah", [f"--ckpt={run}", "--limit=3", "--lengths=300", "--generate=1", "--batch=2"])["rows"])
  # an off-by-one oracle (predicting the current token) gets nothing right
  monkeypatch.setattr(train, "scorer", lambda model: lambda x, y: (x, np.zeros(x.shape, np.float32)))
  assert all(r["acc"] == 0.0 for r in ev.evaluate("niah", [f"--ckpt={run}", "--limit=2", "--lengths=300", "--tasks=1"])["rows"])

def test_mqar(mqar_run):
  res = ev.evaluate("mqar", [f"--ckpt={mqar_run}", "--limit=8", f"--batch={B}", "--mults=1", "--kvs=4,8"])
  assert [(r["seq_len"], r["kv"]) for r in res["rows"]] == [(128, 4), (128, 8)] and all(0.0 <= r["acc"] <= 1.0 for r in res["rows"])

def test_sample(run, capsys):
  # the text after the prompt, printed and in the JSON: greedy is the forward's argmax byte by byte, a seed repeats a sample
  res = ev.evaluate("sample", [f"--ckpt={run}", "--prompt=def ", "--n=12", "--temperature=0"])
  assert res["text"].startswith("def ") and res["text"] in capsys.readouterr().out
  _, model = train.load_model(Path(run))
  toks = np.frombuffer(res["text"].encode(), np.uint8)
  if len(toks) == 16: assert (model(Tensor(toks[None].astype(np.int32))).numpy()[0, 3:-1].argmax(-1) == toks[4:]).all()
  a, b = (ev.evaluate("sample", [f"--ckpt={run}", "--n=12", "--seed=1", "--out=/dev/null"])["text"] for _ in range(2))
  assert a == b and a.startswith("\n")
  assert ev.main(["sample", f"--ckpt={run}", "--n=0"]) == 2 and "--n=0" in capsys.readouterr().err

def test_bad_input(run, capsys, tmp_path):
  assert ev.main(["ppl", "--limit=2"]) == 2 and "--ckpt" in capsys.readouterr().err
  assert ev.main(["bleu", f"--ckpt={run}"]) == 2 and "unknown command" in capsys.readouterr().err
  assert ev.main(["ppl", f"--ckpt={run}", "--limt=2"]) == 2 and "--limit" in capsys.readouterr().err
  assert ev.main(["ppl", f"--ckpt={tmp_path}"]) == 2 and "no run there" in capsys.readouterr().err
  # weights of another shape: refused with the tensor's name
  assert ev.main(["ppl", f"--ckpt={run}", "--dim=32"]) == 2 and "shape" in capsys.readouterr().err

def test_task_mismatch(run, mqar_run, capsys):
  # mqar scores a recall model, ppl and niah a language model: the other kind of run is refused, naming both tasks
  assert ev.main(["mqar", f"--ckpt={run}"]) == 2
  assert "mqar needs a run trained with --task=mqar" in (err := capsys.readouterr().err) and "--task=lm" in err and err.count("\n") == 1
  for cmd in ("ppl", "niah", "sample"):
    assert ev.main([cmd, f"--ckpt={mqar_run}"]) == 2
    assert f"{cmd} needs a run trained with --task=lm" in (err := capsys.readouterr().err) and "--task=mqar" in err

def test_corrupt_run(run, tmp_path, capsys):
  bad = tmp_path / "bad"
  shutil.copytree(run, bad)
  (bad / "ckpt/model.safetensors").write_bytes((bad / "ckpt/model.safetensors").read_bytes()[:1000])
  assert ev.main(["ppl", f"--ckpt={bad}"]) == 2 and "model.safetensors: not a complete safetensors file" in capsys.readouterr().err
  (bad / "config.json").write_text("garbage")
  assert ev.main(["ppl", f"--ckpt={bad}"]) == 2 and "config.json: not valid JSON" in capsys.readouterr().err

def test_help(capsys):
  # eval.py --help and each command's --help: every option that applies, with its default and its EvalConfig comment
  assert ev.main(["--help"]) == 0 and "issue" not in (out := capsys.readouterr().out) and "SPEC" not in out
  for k, (_, doc) in train.field_docs(ev.EvalConfig).items(): assert re.search(rf"^  --{k} +\S+ +{re.escape(doc)}$", out, re.M), k
  for cmd in ("ppl", "niah", "mqar"):
    assert ev.main([cmd, "--ckpt=runs/x", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: python eval.py {cmd} ") and ev.COMMANDS[cmd].__doc__ in out and "--agg" in out
    assert re.search(r"^  --limit +0 +examples per cell", out, re.M) and re.search(r"^  --batch +8 +sequences per forward pass$", out, re.M)
  assert re.search(r"^  --mults +1,2,4 +ppl, niah, mqar: lengths", out, re.M) and "--depths" not in out and "--kvs" in out

def test_readme_python(run, monkeypatch):
  # the README's "Use it from Python" example, run as written on the smoke run
  code = re.search(r"## Use it from Python\n.*?```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)[1]
  assert '"runs/smoke"' in code
  out = {}
  exec(code.replace('"runs/smoke"', repr(run)), out)
  assert 1.0 < out["bpb"] < 8.0 and out["y"].shape == out["q"].shape and np.isfinite(out["y"].numpy()).all()

def test_readme_commands():
  # the Quick start's commands in order on a fresh clone: every option parses, every --ckpt=runs/<name> was trained by a command
  # above it with the task its command needs, no name is trained twice; CPU commands carry their time, GPU ones say GPU
  text = (ROOT / "README.md").read_text()
  made, n = {}, 0
  for block in re.findall(r"```bash\n(.*?)```", text[text.index("## Quick start"):text.index("## Use it from Python")], re.S):
    for line in block.splitlines():
      for cmd in line.split("#")[0].split("&&"):
        words = [w for w in shlex.split(cmd) if not re.fullmatch(r"[A-Z]+=\S*", w)]
        if words[:1] != ["python"]: continue
        n += 1
        assert re.search(r"# (GPU\b|CPU: \d)", line) and ("DEV=CUDA" in line) == ("# GPU" in line), line
        if words[1] == "train.py":
          cfg = train.parse_args(words[2:])
          assert not cfg.resume and (run := str(Path(cfg.out) / (cfg.name or cfg.preset))) not in made, line
          made[run] = cfg.task
        else:
          assert words[1] == "eval.py" and words[2] in ev.TASKS, line
          kv = train.parse_kv(words[3:], {**train._hints(ev.EvalConfig), **train._hints(train.MCConfig)})
          assert made.get(kv["ckpt"]) == ev.TASKS[words[2]], line
  assert n >= 10 and {"runs/smoke", "runs/none", "runs/default", "runs/mqar"} <= set(made)

def _fake_run(root:Path, name:str, seed:int, agg:str, acc:dict, val:float|None) -> Path:
  # a run folder as train.py and eval.py leave it: config.json, ckpt/state.json with its validation history, eval_mqar.json
  import dataclasses
  from mc import MCConfig
  d = root / name
  (d / "ckpt").mkdir(parents=True)
  cfg = train.TrainConfig(task="mqar", seed=seed, name=name, model=MCConfig(agg=agg, vocab=8192))
  (d / "config.json").write_text(json.dumps(dataclasses.asdict(cfg)))
  hist = [] if val is None else [{"step": 5, "loss": 9.0, "bpb": 9.0, "acc": 0.0}, {"step": 10, "loss": val, "bpb": val / np.log(2), "acc": 1 - val}]
  state = {"step": 10, "data": {}, "val": hist, "best_val": val, "train_time_s": 1.0, "tokens": 1}
  (d / "ckpt" / "state.json").write_text(json.dumps(state))
  rows = [{"seq_len": T, "kv": kv, "n": 8, "acc": a} for (T, kv), a in acc.items()]
  (d / "eval_mqar.json").write_text(json.dumps({"command": "mqar", "rows": rows}))
  return d

def test_state_size():
  # floats one layer holds after L tokens: H D D per memory (deep: W1 and W2, 2 H D E) times 1 + cached entries; attention 2 L H D
  H, D, C = 4, 16, 32
  cfg = lambda **kw: MCConfig(dim=H * D, n_heads=H, segment=C, chunk=16, **kw)
  for L in (1, 31, 32, 33, 7 * 32, 7 * 32 + 5, 1000):
    s = L // C
    assert ev.state_size(cfg(agg="none"), L) == H * D * D
    assert ev.state_size(cfg(agg="grm"), L) == ev.state_size(cfg(agg="ssc"), L) == (1 + s) * H * D * D
    assert ev.state_size(cfg(agg="grm", segmentation="log"), L) == (1 + bin(s).count("1")) * H * D * D
    assert ev.state_size(cfg(core="titans", agg="grm"), L) == (1 + s) * 2 * H * D * 4 * D
    assert ev.state_size(cfg(mixer="attn", agg="none"), L) == 2 * L * H * D

def test_report(tmp_path, capsys):
  # two configurations x three seeds: each cell is the mean +- sample std of its seeds, a row is named by the field that differs
  rng, runs, want = np.random.default_rng(0), [], {}
  for agg in ("grm", "none"):
    for seed in range(3):
      acc = {(256, 4): float(rng.uniform()), (256, 8): None if agg == "none" else float(rng.uniform())}
      val = float(rng.uniform(1, 2))
      runs.append(str(_fake_run(tmp_path, f"mqar-{agg}-{seed}", seed, agg, acc, val)))
      for k, v in {**acc, "loss": val}.items(): want.setdefault((agg, k), []).append(v)
  assert ev.main(["report", *runs, f"--out={tmp_path / 'r.md'}"]) == 0
  text = (tmp_path / "r.md").read_text()
  assert text in capsys.readouterr().out
  tables = {t.split("\n", 1)[0]: t for t in text.split("### ")[1:]}
  assert set(tables) == {"final validation", "mqar"}
  cells = lambda table, agg: next(line for line in table.splitlines() if line.startswith(f"| agg={agg} |")).strip("| ").split(" | ")
  fmt = lambda xs: f"{np.mean(xs):.4f} +- {np.std(xs, ddof=1):.4f}"
  for agg in ("grm", "none"):
    row = cells(tables["mqar"], agg)
    # the state: H D D (4 heads of 64) times 1 + the segments of 256 cached at seq_len 512 (grm: 2)
    assert row[1] == "3" and row[2] == f"{4 * 64 * 64 * (3 if agg == 'grm' else 1):,}" and row[3] == fmt(want[agg, (256, 4)])
    assert row[4] == ("-" if agg == "none" else fmt(want[agg, (256, 8)]))   # a cell no run has stays empty
    assert cells(tables["final validation"], agg)[3] == fmt(want[agg, "loss"])

def test_report_rejects(tmp_path, capsys):
  # a folder that holds no run, and no folder at all: one line each, exit 2
  for argv in (["report", str(tmp_path)], ["report"], ["report", str(tmp_path), "--limit=3"]):
    assert ev.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and ("report" in err or str(tmp_path) in err), err

def _fake_mqar_runs(tmp_path) -> list[str]:
  rng = np.random.default_rng(1)
  return [str(_fake_run(tmp_path, f"mqar-{agg}-{seed}", seed, agg, {(256, 4): float(rng.uniform()), (256, 8): float(rng.uniform())}, 1.5))
          for agg in ("grm", "none") for seed in range(2)]

def test_report_plot_without_matplotlib(tmp_path, capsys, monkeypatch):
  # matplotlib is no dependency: --plot without it is one line naming it, exit 2, after the tables
  monkeypatch.setitem(sys.modules, "matplotlib", None)
  assert ev.main(["report", *_fake_mqar_runs(tmp_path), f"--plot={tmp_path / 'f.png'}"]) == 2
  out, err = capsys.readouterr()
  assert "### mqar" in out and err.count("\n") == 1 and "matplotlib" in err and not (tmp_path / "f.png").exists()

def test_report_plot(tmp_path):
  pytest.importorskip("matplotlib")
  assert ev.main(["report", *_fake_mqar_runs(tmp_path), f"--plot={tmp_path / 'f.png'}"]) == 0
  assert (tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

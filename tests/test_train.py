"""Tests of train.py on the CPU: the smoke preset's golden trajectory, exact resume after SIGINT and SIGTERM, atomic checkpoints,
run folders that are never replaced implicitly, clear errors for bad input, corrupt files and missing devices, --help, NaN stop.

Every run uses the smoke preset's model and window shape, so tinygrad compiles its kernels once per pytest process; the full
smoke run is conftest.py's session fixture `smoke_run`. `PYTHONPATH=. python tests/test_train.py --record` rewrites tests/golden_smoke.json
from a fresh run (only when the model or training math changes on purpose).
"""
import dataclasses, inspect, json, os, re, shutil, signal, subprocess, sys, time
from pathlib import Path
import numpy as np
import pytest
import train
from tinygrad import Device, dtypes
from tinygrad.nn.optim import AdamW, OptimizerGroup
from tinygrad.nn.state import get_state_dict, safe_load

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).with_name("golden_smoke.json")

def smoke(out:Path, *args:str) -> dict: return train.train(train.parse_args(["--preset=smoke", f"--out={out}", *args]))

def weights(run:str) -> dict[str, np.ndarray]:
  return {k: v.numpy() for k, v in safe_load(str(train.ckpt_dir(Path(run)) / "model.safetensors")).items()}

def logged_steps(run:Path) -> list[tuple[int, float]]:
  return [(int(m[1]), float(m[2])) for m in re.finditer(r"^step (\d+)/\d+ \| loss ([\d.]+)", (run / "log.txt").read_text(), re.M)]

def files(run:Path) -> dict[str, bytes]: return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}

def test_golden_trajectory(smoke_run):
  golden = json.loads(GOLDEN.read_text())
  np.testing.assert_allclose(smoke_run["losses"][:10], golden["losses"], atol=1e-4, rtol=0)
  # training works: the loss falls, and the smoke run ends with a lower validation bits per byte than it started with
  assert np.mean(smoke_run["losses"][7:10]) < smoke_run["losses"][0] - 0.5
  assert smoke_run["val"][-1]["bpb"] < smoke_run["val"][0]["bpb"] - 1.0
  log = (Path(smoke_run["run"]) / "log.txt").read_text().splitlines()
  assert log[0].startswith("run ") and "tinygrad" in log[0] and "numpy" in log[0] and log[1].startswith("device ")
  assert log[2].startswith("train ") and log[3].startswith("model ")
  assert "step 00001/00020 | loss " in (Path(smoke_run["run"]) / "log.txt").read_text()
  assert re.search(r"tok/s [\d,]+ after compiling", log[-1]) and smoke_run["tok_s"] > 0
  cfg = json.loads((Path(smoke_run["run"]) / "config.json").read_text())
  assert cfg["preset"] == "smoke" and cfg["model"]["dim"] == train.PRESETS["smoke"]["dim"]

def signalled(tmp_path:Path, run:Path, sig:int, after:int, *args:str) -> tuple[int, str, str]:
  # train.py in a subprocess, sent `sig` once its log shows step `after`; returns its exit status, stdout and stderr
  out, err = tmp_path / f"{run.name}.{sig}.out", tmp_path / f"{run.name}.{sig}.err"
  with open(out, "w") as o, open(err, "w") as e:
    p = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], stdout=o, stderr=e, cwd=tmp_path)
  t0 = time.time()
  while not ((run / "log.txt").is_file() and f"step {after:05d}/" in (run / "log.txt").read_text()):
    assert p.poll() is None and time.time() - t0 < 300, err.read_text()
    time.sleep(0.05)
  p.send_signal(sig)
  return p.wait(timeout=300), out.read_text(), err.read_text()

def test_signal_checkpoints_and_resume_is_exact(smoke_run, tmp_path):
  # SIGINT and SIGTERM, each in a run of its own (the two run side by side), then the SIGINT run resumed to the end here
  a, t = tmp_path / "a", tmp_path / "t"
  with open(tmp_path / "t.out", "w") as o, open(tmp_path / "t.err", "w") as e:
    pt = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "--preset=smoke", f"--out={tmp_path}", "--name=t"], stdout=o, stderr=e)
  rc, out, err = signalled(tmp_path, a, signal.SIGINT, 4, "--preset=smoke", f"--out={tmp_path}", "--name=a")
  step = train.read_state(train.ckpt_dir(a))["step"]
  assert rc == 130 and "Traceback" not in err and 4 <= step < 20 and (a / "ckpt").is_dir() and not (a / "ckpt.tmp").exists()
  assert f"SIGINT at step {step} of 20: checkpoint written; continue with: python train.py --resume={a}" in out
  while not ((t / "log.txt").is_file() and "step 00003/" in (t / "log.txt").read_text()): time.sleep(0.05)
  pt.send_signal(signal.SIGTERM)
  assert pt.wait(timeout=300) == 143 and "Traceback" not in (tmp_path / "t.err").read_text()
  step_t = train.read_state(train.ckpt_dir(t))["step"]
  assert f"SIGTERM at step {step_t} of 20: checkpoint written; continue with: python train.py --resume={t}" in (tmp_path / "t.out").read_text()
  # a run killed after its checkpoint logged steps that the resume replays: the resumed log has each step once
  with open(a / "log.txt", "a") as f: f.write(f"step {step + 1:05d}/00020 | loss 9.9999 | lr 1.0e-03\nval  {step + 1:05d}/00020 | loss 9.9999\n")
  rest = train.train(train.parse_args([f"--resume={a}"]))
  assert rest["step"] == 20 and len(rest["losses"]) == 20 - step
  np.testing.assert_allclose(rest["losses"], smoke_run["losses"][step:], atol=1e-6, rtol=0)
  logged = logged_steps(a)
  assert [s for s, _ in logged] == list(range(1, 21)) and "9.9999" not in (a / "log.txt").read_text()
  np.testing.assert_allclose([loss for _, loss in logged], smoke_run["losses"], atol=1e-4, rtol=0)
  ref, got = weights(smoke_run["run"]), weights(rest["run"])
  assert ref.keys() == got.keys()
  for k in ref: np.testing.assert_allclose(ref[k], got[k], atol=1e-6, rtol=0, err_msg=k)

def test_existing_run_is_kept(smoke_run, tmp_path, capsys):
  run = tmp_path / "smoke_run"
  shutil.copytree(smoke_run["run"], run)
  (run / "eval_ppl.json").write_text("{}")
  before = files(run)
  # a new run of the same name stops before touching anything, naming both ways on
  assert train.main(["--preset=smoke", f"--out={tmp_path}", "--name=smoke_run"]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and f"--resume={run}" in err and "--overwrite=1" in err and files(run) == before
  (run / "ckpt").rename(run / "ckpt.old")
  assert train.main(["--preset=smoke", f"--out={tmp_path}", "--name=smoke_run"]) == 2 and "--overwrite=1" in capsys.readouterr().err
  shutil.rmtree(run / "ckpt.old")
  assert train.main(["--preset=smoke", f"--out={tmp_path}", "--name=smoke_run"]) == 2 and "a log, no checkpoint" in capsys.readouterr().err
  # --overwrite=1 starts afresh: the old log, checkpoint and eval results go; a run of two steps has no tok/s to report
  assert train.main(["--preset=smoke", f"--out={tmp_path}", "--name=smoke_run", "--overwrite=1", "--steps=2", "--eval_every=100"]) == 0
  assert not list(run.glob("eval_*.json")) and [s for s, _ in logged_steps(run)] == [1, 2]
  assert train.read_state(train.ckpt_dir(run))["step"] == 2
  done = (run / "log.txt").read_text().splitlines()[-1]
  assert "tok/s n/a" in done and "nan" not in done and json.loads((run / "config.json").read_text())["steps"] == 2

def test_killed_checkpoint_write(smoke_run, tmp_path, monkeypatch):
  run = tmp_path / "k"
  shutil.copytree(smoke_run["run"], run)
  _, model = train.load_model(run)
  before = weights(run)
  params = get_state_dict(model)
  opt = OptimizerGroup(AdamW(list(params.values())))
  model.emb.assign(model.emb + 1).realize()
  real_replace, calls = os.replace, []
  def die_at(n):
    def replace(a, b):
      calls.append((a, b))
      if len(calls) == n: raise KeyboardInterrupt("killed")
      real_replace(a, b)
    return replace
  # killed before the first rename, then between the two: either way the previous checkpoint loads, intact
  for n in (1, 2):
    calls.clear()
    monkeypatch.setattr(os, "replace", die_at(n))
    with pytest.raises(KeyboardInterrupt): train.save_ckpt(run, model, opt, {"step": 99})
    monkeypatch.setattr(os, "replace", real_replace)
    assert json.loads((train.ckpt_dir(run) / "state.json").read_text())["step"] == 20
    after = weights(run)
    for k in before: np.testing.assert_array_equal(before[k], after[k], err_msg=k)
    train.load_model(run)
  # an uninterrupted save replaces it and cleans up
  train.save_ckpt(run, model, opt, {"step": 99})
  assert train.ckpt_dir(run) == run / "ckpt" and not (run / "ckpt.old").exists() and not (run / "ckpt.tmp").exists()
  np.testing.assert_allclose(weights(run)["emb"], before["emb"] + 1)

def bad(capsys, *args) -> str:
  assert train.main(list(args)) == 2
  return capsys.readouterr().err

def test_bad_input(tmp_path, capsys, smoke_run):
  assert "no such file or folder" in bad(capsys, "--preset=smoke", f"--data={tmp_path / 'missing.txt'}", f"--out={tmp_path}")
  (tmp_path / "empty.txt").write_bytes(b"")
  assert "empty" in bad(capsys, "--preset=smoke", f"--data={tmp_path / 'empty.txt'}", f"--out={tmp_path}")
  (tmp_path / "short.txt").write_text("print('hello')\n" * 5)
  assert "shorter than one window" in bad(capsys, "--preset=smoke", f"--data={tmp_path / 'short.txt'}", f"--out={tmp_path}")
  assert not (tmp_path / "smoke").exists()   # nothing written for a run whose data was refused
  assert "--data= needs a value" in bad(capsys, "--data=")
  assert "unknown preset" in bad(capsys, "--preset=huge")
  assert "unknown option --setps" in (err := bad(capsys, "--setps=10")) and "--steps" in err
  assert "DEV=CPU python" in bad(capsys, "--device=cpu")
  assert "expected int" in bad(capsys, "--steps=ten")
  assert "expected float" in bad(capsys, "--lr=fast")
  assert "expected int" in bad(capsys, "--dim=64.5")
  assert "MCConfig.core" in bad(capsys, "--core=lstm")
  assert "arguments are --key=value" in bad(capsys, "steps=10")
  assert "--overwrite=1" in bad(capsys, f"--resume={smoke_run['run']}", "--overwrite=1")
  # a checkpoint of another model: refused from the command line and from train()
  assert "dim=64" in (err := bad(capsys, f"--resume={smoke_run['run']}", "--dim=32")) and "dim=32" in err
  cfg = train.configure(train.parse_args(["--preset=smoke"]), {"resume": smoke_run["run"], "n_layers": 3})
  with pytest.raises(ValueError, match="n_layers=2"): train.train(cfg)
  assert "no run there" in bad(capsys, f"--resume={tmp_path / 'nothing'}")

def test_corrupt_files(smoke_run, tmp_path, capsys):
  # every broken or foreign file of a run is named with what is wrong, exit 2, and the run folder is left as it was
  def broken(name:str, fix) -> str:
    run = tmp_path / name
    shutil.copytree(smoke_run["run"], run)
    fix(run)
    before = files(run)
    err = bad(capsys, f"--resume={run}")
    assert files(run) == before and err.count("\n") == 1, err
    return err
  model, state, config = "ckpt/model.safetensors", "ckpt/state.json", "config.json"
  cut = lambda f, n: lambda run: (run / f).write_bytes((run / f).read_bytes()[:n])
  assert f"{model}: not a complete safetensors file" in broken("trunc", cut(model, 5000))
  assert f"{model}: not a complete safetensors file" in broken("head", cut(model, 100))
  assert "optim.safetensors: not a complete safetensors file" in broken("optim", cut("ckpt/optim.safetensors", 3000))
  assert f"{config}: not valid JSON" in broken("garbage", lambda run: (run / config).write_text("garbage"))
  drop = lambda f, k: lambda run: (run / f).write_text(json.dumps({a: b for a, b in json.loads((run / f).read_text()).items() if a != k}))
  assert f"{config}: not a tinymc run config" in broken("nomodel", drop(config, "model"))
  assert f"{state}: lacks ['data']" in broken("nodata", drop(state, "data"))
  assert f"{state}: not valid JSON" in broken("state", lambda run: (run / state).write_text("{"))
  edit = lambda f, **kw: lambda run: (run / f).write_text(json.dumps({**json.loads((run / f).read_text()), **kw}))
  assert f"{config}: steps='20' is not of type int" in broken("type", edit(config, steps="20"))
  assert f"{config}: unknown fields ['colour']" in broken("field", edit(config, colour=1))
  assert f"{state}: its data position does not fit" in broken("data", edit(state, data={"rng": 5}))
  # the checkpoint of another config (3 layers) under this run's config (2): its tensors do not fit
  other = tmp_path / "other"
  shutil.copytree(smoke_run["run"], other)
  cfg = json.loads((other / config).read_text())
  cfg["model"]["n_layers"] = 1
  (other / config).write_text(json.dumps(cfg))
  assert f"{other / model}: has ['blocks.1." in bad(capsys, f"--resume={other}")
  with pytest.raises(ValueError, match=f"{model}: has"): train.load_model(other)

def test_missing_device(smoke_run, tmp_path):
  # DEV= naming a device this machine lacks: one line naming it and what to try, exit 2, the run folder untouched
  run = tmp_path / "smoke_run"
  shutil.copytree(smoke_run["run"], run)
  before = files(run)
  for dev, args in (("CUDA", ["--preset=smoke", f"--out={tmp_path}", "--name=smoke_run", "--overwrite=1"]), ("METAL", [f"--resume={run}"])):
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], capture_output=True, text=True, env={**os.environ, "DEV": dev})
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and f"DEV={dev}" in r.stderr and "DEV=CPU" in r.stderr, r.stderr
  env = {**os.environ, "DEV": "CUDA"}
  r = subprocess.run([sys.executable, str(ROOT / "eval.py"), "ppl", f"--ckpt={run}"], capture_output=True, text=True, env=env)
  assert r.returncode == 2 and r.stderr.count("\n") == 1 and "DEV=CUDA" in r.stderr, r.stderr
  assert files(run) == before

def test_help(capsys):
  # every option with its default and the comment of its dataclass field, the presets with theirs
  assert train.main(["--help"]) == 0
  out = capsys.readouterr().out
  for cls in (train.TrainConfig, train.MCConfig):
    for k, (default, doc) in train.field_docs(cls).items():
      # a tuple is shown as --key=value takes it, a,b,c; an empty one as ""
      shown = default[1:-1].replace(" ", "").rstrip(",") if default.startswith("(") else default.strip(chr(34))
      assert doc and re.search(rf"^  --{k} +{re.escape(shown or chr(34) * 2)} +{re.escape(doc)}$", out, re.M), k
  assert re.search(r"^  --steps +1500 +optimizer steps; the lr schedule spans them$", out, re.M)
  for name in train.PRESETS: assert re.search(rf"^  {name} +\S.*\n {{11}}\S+=", out, re.M), name
  assert "H100 80GB" in out and "overwrite" in out and "SPEC" not in out

def test_cli_exit_code(tmp_path):
  r = subprocess.run([sys.executable, str(ROOT / "train.py"), "--preset=smoke", f"--data={tmp_path / 'nope'}"], capture_output=True, text=True)
  assert r.returncode == 2 and "no such file or folder" in r.stderr and "Traceback" not in r.stderr

def test_import_from_elsewhere(tmp_path):
  # the README's one step for scripts outside the repository: PYTHONPATH names the repository root
  readme = (ROOT / "README.md").read_text()
  assert "export PYTHONPATH=/path/to/tinymc" in readme
  env = {**os.environ, "PYTHONPATH": str(ROOT)}
  code = "import mc, train, eval, data; print(train.__file__)"
  r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
  assert r.returncode == 0 and r.stdout.strip() == str(ROOT / "train.py"), r.stderr

def test_no_outside_files_cited():
  # no source file, test or the README names a file or issue outside the repository
  parts = [(ROOT / "README.md").read_text()]
  for f in sorted({*ROOT.glob("*.py"), *ROOT.glob("data/*.py"), *ROOT.glob("tests/*.py")}):
    # less the lines that check for such names (this test, the help tests)
    parts.append(f.read_text().replace(inspect.getsource(test_no_outside_files_cited), "").replace('"SPEC" not in out', ""))
  for text in parts: assert not (m := re.search(r".*(\bSPEC\b|issue \d).*", text)), m[0]   # a word: tinygrad's Ops.SPECIAL is no citation

def test_unsupported_dtype(monkeypatch):
  ren = Device[Device.DEFAULT].renderer
  monkeypatch.setattr(type(ren), "supported_dtypes", lambda self: {dtypes.float32, dtypes.int32, dtypes.bool})
  with pytest.raises(ValueError, match="does not support"): train.check_dtype("bfloat16")
  train.check_dtype("float32")

def test_nan_stops_and_keeps_checkpoint(tmp_path, capsys):
  # an absurd learning rate overflows the weights within a few steps
  assert train.main(["--preset=smoke", f"--out={tmp_path}", "--name=nan", "--lr=1e30", "--ckpt_every=1", "--eval_every=100"]) == 1
  err = capsys.readouterr().err
  assert "non-finite loss" in err and "last good checkpoint" in err
  step = json.loads((train.ckpt_dir(tmp_path / "nan") / "state.json").read_text())["step"]
  assert 1 <= step < 20 and f"at step {step + 1} " in err
  _, model = train.load_model(tmp_path / "nan")
  assert all(np.isfinite(t.numpy()).all() for t in get_state_dict(model).values())

def test_lr_schedule():
  cfg = train.parse_args(["--preset=smoke", "--steps=100", "--warmup=10", "--lr=1.0", "--min_lr=0.1"])
  lrs = [train.lr_at(cfg, s) for s in range(100)]
  assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0) and max(lrs) == pytest.approx(1.0)
  assert all(a >= b for a, b in zip(lrs[9:], lrs[10:])) and lrs[-1] == pytest.approx(0.1, abs=1e-3)

if __name__ == "__main__" and sys.argv[1:] == ["--record"]:
  import tempfile
  with tempfile.TemporaryDirectory() as d: res = smoke(Path(d), "--stop_at=10")
  GOLDEN.write_text(json.dumps({"command": "PYTHONPATH=. python tests/test_train.py --record", "device": Device.DEFAULT,
                                "note": "first 10 losses of the smoke preset (train.py --preset=smoke)", "losses": res["losses"]}, indent=1) + "\n")
  print(f"wrote {GOLDEN}: {res['losses']}")

def test_mqar_mixture():
  # --mqar_mix: row i of a batch from entry i % 3; each row a complete MQAR sequence of its entry's length and pairs, padded
  # with token 0 and ignored targets to seq_len; without a mixture, the batches of mqar_batch at seq_len and mqar_kv
  from data import IGNORE, mqar_batch
  from mc import MCConfig
  cfg = train.TrainConfig(task="mqar", seq_len=256, batch_size=10, mqar_mix=(64, 4, 128, 8, 256, 16), model=MCConfig(vocab=8192))
  x, y = train.MQAR(cfg, 0).next()
  assert x.shape == y.shape == (10, 256) and x.dtype == y.dtype == np.int32
  for rows, (T, k) in zip(((0, 4), (4, 7), (7, 10)), ((64, 4), (128, 8), (256, 16))):
    xs, ys = x[rows[0]:rows[1]], y[rows[0]:rows[1]]
    assert (xs[:, T:] == 0).all() and (ys[:, T:] == IGNORE).all()
    for xr, yr in zip(xs, ys):
      keys, vals, pos = xr[0:2 * k:2], xr[1:2 * k:2], np.flatnonzero(yr != IGNORE)
      assert len(pos) == k and sorted(xr[pos]) == sorted(keys) and len(set(keys)) == k
      assert all(vals[np.flatnonzero(keys == xr[p])[0]] == yr[p] for p in pos)
  plain = dataclasses.replace(cfg, mqar_mix=(), mqar_kv=16)
  x2, y2 = train.MQAR(plain, 3).next()
  x3, y3, _ = mqar_batch(10, 256, 16, vocab=8192, seed=np.random.default_rng(3))
  assert np.array_equal(x2, x3) and np.array_equal(y2, y3)
  for bad in ((64, 4, 128), (512, 4)):
    with pytest.raises(ValueError, match="--mqar_mix"): train.MQAR(dataclasses.replace(cfg, mqar_mix=bad), 0)

@pytest.mark.parametrize("fields", [dict(), dict(core="titans", agg="soup"), dict(mixer="attn", agg="none")])
def test_adamw_kernel_matches_tinygrad(fields):
  # train.AdamW (kernels.adamw: one kernel a parameter, p, m and v updated in place, the clipping factor inside) against tinygrad's
  # AdamW with the gradients scaled beforehand: three steps of a small model with the clipping active, every parameter and every
  # optimizer state equal (same arithmetic, op for op), and the same state names (checkpoints of either load into the other)
  import kernels
  from tinygrad import Context, Tensor
  from mc import MCConfig, Model
  # (dim 64 and 4 x 128 tokens: given the parameter tensors rather than their buffers, the embedding's step was lost here)
  cfg = MCConfig(dim=64, n_layers=1, n_heads=2, segment=32, chunk=16, **fields)
  tc = train.TrainConfig(model=cfg)
  rng = np.random.default_rng(0)
  x, y = (Tensor(rng.integers(0, 256, (4, 128), dtype=np.int32)).realize() for _ in range(2))
  def run(ours:bool) -> dict:
    Tensor.manual_seed(0)
    lm = Model(cfg)
    ps = list(get_state_dict(lm).values())
    opt = train.make_optimizer(lm, tc) if ours else OptimizerGroup(*(AdamW([p for p in ps if (p.ndim > 1) == d], lr=tc.lr, b1=tc.b1,
                                                                          b2=tc.b2, weight_decay=tc.weight_decay * d) for d in (True, False)))
    Tensor.realize(*ps, *train.optim_state(opt).values())
    step, lr = train.make_step(lm, opt, 0.05), Tensor([tc.lr]).realize()   # (a norm of 0.05: the clipping acts)
    for i in range(3):
      if ours: step(x, y, lr, train.slot(i))   # the jitted step as train.py runs it (captured at the second call)
      else:
        with Context(TRAINING=1):
          opt.zero_grad()
          loss = lm(x).sparse_categorical_crossentropy(y, ignore_index=-100).backward()
          gnorm = Tensor.stack(*[kernels.rowdot(g := p.grad.reshape(-1, p.shape[-1]), g).sum() for p in opt.params]).sum().sqrt()
          for p in opt.params: p.grad = p.grad * (0.05 / (gnorm + 1e-6)).minimum(1.0)
          Tensor.realize(loss, *opt.schedule_step())
    return {k: v.numpy() for k, v in {**get_state_dict(lm), **train.optim_state(opt)}.items()}
  ours, ref = run(True), run(False)
  assert ours.keys() == ref.keys()
  for k in ref: np.testing.assert_allclose(ours[k], ref[k], rtol=1e-6, atol=1e-7, err_msg=k)
  lazy = [Tensor.ones(4) + 1 for _ in range(5)]
  with pytest.raises(ValueError, match="realized buffer"): kernels.adamw(*lazy, 0.9, 0.95, 1e-8, 0.1)

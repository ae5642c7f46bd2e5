"""Tests of train.py on the CPU: the smoke preset's golden trajectory, exact resume, atomic checkpoints, bad input, NaN stop.

Every run uses the smoke preset's model and window shape, so tinygrad compiles its kernels once per pytest process.
`python tests/test_train.py --record` rewrites tests/golden_smoke.json from a fresh run (only when the model or training
math changes on purpose).
"""
import json, os, subprocess, sys
from pathlib import Path
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the repo root, however pytest was started
import train
from tinygrad import Device, dtypes
from tinygrad.nn.optim import AdamW, OptimizerGroup
from tinygrad.nn.state import get_state_dict, safe_load

GOLDEN = Path(__file__).with_name("golden_smoke.json")

def smoke(out:Path, *args:str) -> dict: return train.train(train.parse_args(["--preset=smoke", f"--out={out}", *args]))

def smoke_run(tmp_path_factory) -> dict:
  # one full smoke run per pytest process, shared by the tests of this file and of test_eval.py
  run = tmp_path_factory.getbasetemp() / "smoke_run"
  if not (run / "result.json").is_file():
    res = smoke(run.parent, "--name=smoke_run")
    (run / "result.json").write_text(json.dumps(res))
  return json.loads((run / "result.json").read_text())

@pytest.fixture(scope="module")
def ref(tmp_path_factory) -> dict: return smoke_run(tmp_path_factory)

def weights(run:str) -> dict[str, np.ndarray]:
  return {k: v.numpy() for k, v in safe_load(str(train.ckpt_dir(Path(run)) / "model.safetensors")).items()}

def test_golden_trajectory(ref):
  golden = json.loads(GOLDEN.read_text())
  np.testing.assert_allclose(ref["losses"][:10], golden["losses"], atol=1e-4, rtol=0)
  # training works: the loss falls, and the smoke run ends with a lower validation bits per byte than it started with
  assert np.mean(ref["losses"][7:10]) < ref["losses"][0] - 0.5
  assert ref["val"][-1]["bpb"] < ref["val"][0]["bpb"] - 1.0
  log = (Path(ref["run"]) / "log.txt").read_text().splitlines()
  assert log[0].startswith("run ") and "tinygrad" in log[0] and "numpy" in log[0] and log[1].startswith("device ")
  assert log[2].startswith("train ") and log[3].startswith("model ")
  assert "step 00001/00020 | loss " in (Path(ref["run"]) / "log.txt").read_text()
  cfg = json.loads((Path(ref["run"]) / "config.json").read_text())
  assert cfg["preset"] == "smoke" and cfg["model"]["dim"] == train.PRESETS["smoke"]["dim"]

def test_resume_is_exact(ref, tmp_path):
  first = smoke(tmp_path, "--name=r", "--stop_at=10")
  assert first["step"] == 10 and json.loads((tmp_path / "r/ckpt/state.json").read_text())["step"] == 10
  rest = train.train(train.parse_args([f"--resume={tmp_path / 'r'}"]))
  assert rest["step"] == 20 and len(rest["losses"]) == 10
  np.testing.assert_allclose(first["losses"] + rest["losses"], ref["losses"], atol=1e-6, rtol=0)
  a, b = weights(ref["run"]), weights(rest["run"])
  assert a.keys() == b.keys()
  for k in a: np.testing.assert_allclose(a[k], b[k], atol=1e-6, rtol=0, err_msg=k)

def test_killed_checkpoint_write(ref, tmp_path, monkeypatch):
  import shutil
  run = tmp_path / "k"
  shutil.copytree(ref["run"], run)
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

def test_bad_input(tmp_path, capsys, ref):
  assert "no such file or folder" in bad(capsys, "--preset=smoke", f"--data={tmp_path / 'missing.txt'}", f"--out={tmp_path}")
  (tmp_path / "empty.txt").write_bytes(b"")
  assert "empty" in bad(capsys, "--preset=smoke", f"--data={tmp_path / 'empty.txt'}", f"--out={tmp_path}")
  (tmp_path / "short.txt").write_text("print('hello')\n" * 5)
  assert "shorter than one window" in bad(capsys, "--preset=smoke", f"--data={tmp_path / 'short.txt'}", f"--out={tmp_path}")
  assert "--data= needs a value" in bad(capsys, "--data=")
  assert "unknown preset" in bad(capsys, "--preset=huge")
  assert "unknown option --setps" in (err := bad(capsys, "--setps=10")) and "--steps" in err
  assert "expected int" in bad(capsys, "--steps=ten")
  assert "expected float" in bad(capsys, "--lr=fast")
  assert "expected int" in bad(capsys, "--dim=64.5")
  assert "MCConfig.core" in bad(capsys, "--core=lstm")
  assert "arguments are --key=value" in bad(capsys, "steps=10")
  # a checkpoint of another model: refused from the command line and from train()
  assert "dim=64" in (err := bad(capsys, f"--resume={ref['run']}", "--dim=32")) and "dim=32" in err
  cfg = train.configure(train.parse_args(["--preset=smoke"]), {"resume": ref["run"], "n_layers": 3})
  with pytest.raises(ValueError, match="n_layers=2"): train.train(cfg)
  assert "no run there" in bad(capsys, f"--resume={tmp_path / 'nothing'}")

def test_cli_exit_code(tmp_path):
  r = subprocess.run([sys.executable, str(ROOT / "train.py"), "--preset=smoke", f"--data={tmp_path / 'nope'}"], capture_output=True, text=True)
  assert r.returncode == 2 and "no such file or folder" in r.stderr and "Traceback" not in r.stderr

def test_unsupported_dtype(monkeypatch):
  ren = Device[Device.DEFAULT].renderer
  monkeypatch.setattr(type(ren), "supported_dtypes", lambda self: {dtypes.float32, dtypes.int32, dtypes.bool})
  with pytest.raises(ValueError, match="does not support"): train.check_dtype("bfloat16")
  train.check_dtype("float32")

def test_nan_stops_and_keeps_checkpoint(ref, tmp_path, capsys):
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
  GOLDEN.write_text(json.dumps({"command": "python tests/test_train.py --record", "device": Device.DEFAULT,
                                "note": "first 10 losses of the smoke preset (train.py --preset=smoke)", "losses": res["losses"]}, indent=1) + "\n")
  print(f"wrote {GOLDEN}: {res['losses']}")

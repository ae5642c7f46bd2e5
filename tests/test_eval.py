"""Tests of eval.py on the CPU, on the smoke run that test_train.py trains (one per pytest process, shared)."""
import json, sys
from pathlib import Path
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, however pytest was started
sys.path.insert(0, str(Path(__file__).resolve().parent))
import eval as ev
import train
from data import IGNORE
from mc import Model
from test_train import smoke_run

# the smoke run's validation batch shape (batch 4 at its training length, 128), and 2x / 4x that length, so the graphs repeat
B = train.PRESETS["smoke"]["batch_size"]

@pytest.fixture(scope="module")
def run(tmp_path_factory) -> str: return smoke_run(tmp_path_factory)["run"]

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

def test_niah_and_mqar_scoring(run, monkeypatch):
  # with an oracle in place of the model, every answer is right: the scored positions are exactly the answers
  oracle = lambda x, y: (np.where(y != IGNORE, y, 0) if (y != 0).any() else np.roll(x, -1, axis=1), np.zeros(x.shape, np.float32))
  monkeypatch.setattr(train, "scorer", lambda model: oracle)
  res = ev.evaluate("niah", [f"--ckpt={run}", "--limit=3", "--lengths=300,400", "--depths=0,0.3,1"])
  assert all(r["acc"] == 1.0 for r in res["rows"]) and len(res["rows"]) == 3 * 2 * 3
  res = ev.evaluate("mqar", [f"--ckpt={run}", "--limit=8", "--lengths=64,128", "--kvs=4,8,20"])
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

def test_mqar(run):
  # the byte model has vocab 256: keys from [1, 128), values from [128, 256)
  res = ev.evaluate("mqar", [f"--ckpt={run}", "--limit=8", f"--batch={B}", "--mults=1", "--kvs=4,8"])
  assert [(r["seq_len"], r["kv"]) for r in res["rows"]] == [(128, 4), (128, 8)] and all(0.0 <= r["acc"] <= 1.0 for r in res["rows"])

def test_bad_input(run, capsys, tmp_path):
  assert ev.main(["ppl", "--limit=2"]) == 2 and "--ckpt" in capsys.readouterr().err
  assert ev.main(["bleu", f"--ckpt={run}"]) == 2 and "unknown command" in capsys.readouterr().err
  assert ev.main(["ppl", f"--ckpt={run}", "--limt=2"]) == 2 and "--limit" in capsys.readouterr().err
  assert ev.main(["ppl", f"--ckpt={tmp_path}"]) == 2 and "no run there" in capsys.readouterr().err
  # weights of another shape: refused with the tensor's name
  assert ev.main(["ppl", f"--ckpt={run}", "--dim=32"]) == 2 and "shape" in capsys.readouterr().err

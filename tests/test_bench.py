"""The measurement harnesses stay runnable: kernels.py's validation (its table, JSON and exit status) and eval.py speed, at the
tiniest sizes on the CPU. Their real runs are on a GPU (kernels.py and eval.py say how); here one case of each kind."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, however pytest was started
import eval as ev  # noqa: E402
import kernels  # noqa: E402

def test_kernels_validate(tmp_path, monkeypatch, capsys):
  # a chunk_scan case (M0 and the cache states included) and a cache_read one: rows, JSON, exit 0; at zero tolerance, exit 1
  out = tmp_path / "validate.json"
  assert kernels.main(["--only=chunk_scan la float32,cache_read residual", "--reps=1", f"--json={out}"]) == 0
  rows = json.loads(out.read_text())["rows"]
  assert [r["name"] for r in rows] == ["chunk_scan la fwd", "chunk_scan la fwd+bwd", "cache_read residual fwd", "cache_read residual fwd+bwd"]
  assert all(r["ok"] and r["rel"] < 1e-4 and r["kernel_ms"] > 0 and r["ref_ms"] > 0 for r in rows)
  assert "M0 +S" in rows[0]["shape"] and "all within tolerance" in capsys.readouterr().out
  monkeypatch.setitem(kernels.TOL, "float32", 0.0)
  assert kernels.main(["--only=cache_read residual", "--reps=1"]) == 1
  assert kernels.main(["--bogus"]) == 2

def test_eval_speed(tmp_path):
  out = tmp_path / "speed.json"
  args = ["--parts=layers", "--configs=none", "--lengths=64", "--dim=32", "--n_heads=2", "--segment=32", "--chunk=16", "--core=la", "--limit=1"]
  res = ev.evaluate("speed", [*args, f"--out={out}"])
  assert json.loads(out.read_text()) == json.loads(json.dumps(res))
  (row,) = res["layers"]["rows"]
  assert row["config"] == "none" and row["L"] == 64 and row["ms"] > 0 and row["error"] is None
  assert res["layers"]["config"]["dim"] == 32 and "model" not in res
  assert ev.main(["speed", "--parts=bogus"]) == 2

def test_eval_speed_model_rows():
  # the model table with a subset of rows (no attn among them), at a tiny size
  mk = lambda row: ev.MCConfig(**{**dict(dim=32, n_heads=2, n_layers=1, segment=16, chunk=8), **row})
  res = ev.speed_model(mk, 1, 32, 1, lambda names: [n for n in names if n == "la-none"])
  assert [r["config"] for r in res["rows"]] == ["la-none"] and res["rows"][0]["ms"] > 0

def test_kernel_times():
  # kernels.py --profile's parser: chunk_scan's forward launches its five named kernels once each and its transpose twice
  from tinygrad import Tensor
  q, k, v = (Tensor.randn(1, 2, 40, 8).realize() for _ in range(3))
  kt = kernels.kernel_times(lambda: [kernels.chunk_scan(q, k, v, None, None, None, None, 8, 16, False)[0]])
  assert {n: kt[n][1] for n in ("chunk_state", "chunk_scan", "chunk_transpose", "chunk_scores", "chunk_scan_o")} == \
    {"chunk_state": 1, "chunk_scan": 1, "chunk_transpose": 2, "chunk_scores": 1, "chunk_scan_o": 1}
  assert all(ms > 0 for ms, _ in kt.values())

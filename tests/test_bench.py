"""bench.py stays runnable: check's table, JSON and exit status, the profile's parser, layers, model and train at the tiniest sizes
on the CPU. Their real runs are on a GPU (python bench.py --help says how); here one case of each kind."""
import json
from tinygrad import Tensor
import bench, kernels

def test_check(tmp_path, monkeypatch, capsys):
  # a chunk_scan case (M0 and the cache states included) and a cache_read one: rows, JSON, exit 0; at zero tolerance, exit 1
  out = tmp_path / "check.json"
  assert bench.main(["check", "--only=chunk_scan la float32,cache_read residual", "--reps=1", f"--json={out}"]) == 0
  rows = json.loads(out.read_text())["rows"]
  assert [r["name"] for r in rows] == ["chunk_scan la fwd", "chunk_scan la fwd+bwd", "cache_read residual fwd", "cache_read residual fwd+bwd"]
  assert all(r["ok"] and r["rel"] < 1e-4 and r["kernel_ms"] > 0 and r["ref_ms"] > 0 for r in rows)
  assert "M0 +S" in rows[0]["shape"] and "all within tolerance" in capsys.readouterr().out
  monkeypatch.setitem(bench.TOL, "float32", 0.0)
  assert bench.main(["check", "--only=cache_read residual", "--reps=1"]) == 1
  assert bench.main(["check", "--bogus"]) == 2
  assert bench.main(["check", "--lengths=64"]) == 2   # another subcommand's option
  assert bench.main(["nope"]) == 2 and bench.main(["--help"]) == 0

def test_linear_peer(capsys):
  # the linear rows carry PyTorch's x @ w as their peer; without torch or CUDA (the CPU here) it is n/a, with one line saying why
  rows = bench.validate(("linear float32",), reps=1)
  assert [r["name"] for r in rows] == ["linear fwd", "linear fwd+bwd"] and all(r["ok"] and r["peer"] == "torch" for r in rows)
  out = capsys.readouterr().out
  if rows[0]["peer_ms"] is None: assert "linear timed alone" in out and "torch: n/a" in out
  else: assert all(r["ratio"] > 0 for r in rows)

def test_kernel_times():
  # the profile's parser: chunk_scan's forward launches its five named kernels once each and its transpose twice
  q, k, v = (Tensor.randn(1, 2, 40, 8).realize() for _ in range(3))
  kt = bench.kernel_times(lambda: [kernels.chunk_scan(q, k, v, None, None, None, None, 8, 16, False)[0]])
  assert {n: kt[n][1] for n in ("chunk_state", "chunk_scan", "chunk_transpose", "chunk_scores", "chunk_scan_o")} == \
    {"chunk_state": 1, "chunk_scan": 1, "chunk_transpose": 2, "chunk_scores": 1, "chunk_scan_o": 1}
  assert all(ms > 0 for ms, _ in kt.values())

def test_layers(tmp_path):
  out = tmp_path / "layers.json"
  args = ["--configs=none", "--lengths=64", "--dim=32", "--n_heads=2", "--segment=32", "--chunk=16", "--core=la", "--reps=1"]
  res = bench.run("layers", [*args, f"--json={out}"])
  assert json.loads(out.read_text()) == json.loads(json.dumps(res))
  (row,) = res["rows"]
  assert row["config"] == "none" and row["L"] == 64 and row["ms"] > 0 and row["error"] is None
  assert res["config"]["dim"] == 32 and res["command"] == "layers"
  assert bench.main(["layers", "--configs=bogus"]) == 2

def test_model_rows(monkeypatch):
  # the model table with a subset of rows (no attn among them), at a tiny size
  monkeypatch.setitem(bench.SPEED_CPU, "model", (1, (32,), dict(dim=32, n_heads=2, n_layers=1, segment=16, chunk=8)))
  res = bench.run("model", ["--configs=la-none", "--reps=1"])
  assert [r["config"] for r in res["rows"]] == ["la-none"] and res["rows"][0]["ms"] > 0

def test_train(tmp_path, monkeypatch, capsys):
  # one tinymc row, no PyTorch row: tok/s, no ratio ("-"), the first step's time, the JSON; shapes and dtypes are checked
  tiny = dict(dim=16, n_layers=1, n_heads=1, B=1, L=32, segment=16, chunk=8)
  for shapes in (bench.TRAIN_SHAPES, bench.TRAIN_SHAPES_CPU): monkeypatch.setitem(shapes, "default", tiny)
  out = tmp_path / "train.json"
  assert bench.main(["train", "--configs=la+none", "--dtypes=float32", "--reps=1", "--profile=3", f"--json={out}"]) == 0
  (row,) = json.loads(out.read_text())["rows"]
  assert row["config"] == "la+none" and row["tok_s"] > 0 and row["ratio"] is None and row["first_s"] > 0 and row["error"] is None
  printed = capsys.readouterr().out
  assert "vs eager -" in printed
  # --profile: every kernel of one step with its time and launches, printed as sums by kind and the 3 slowest
  assert row["kernels"] and all(t >= 0 and n >= 1 for t, n in row["kernels"].values())
  assert "by kind: " in printed and max(row["kernels"].items(), key=lambda kv: kv[1][0])[0] in printed
  assert [bench.kind(n) for n in ("mma_tn", "gemm_nt", "chunk_scan", "cache_read_dw", "E_8_16_4", "r_4_16")] == \
         ["mma", "gemm", "chunk", "cache", "elementwise", "reduce"]
  assert bench.main(["train", "--shapes=huge"]) == 2 and bench.main(["train", "--dim=64"]) == 2

def test_decode(tmp_path):
  # one tinymc row and the PyTorch KV-cache row (where PyTorch imports) at the tiniest size: step and prefill tok/s, the JSON
  out = tmp_path / "decode.json"
  tiny = ["--contexts=16", "--batches=1", "--reps=1", "--dim=16", "--n_heads=1", "--segment=8", "--chunk=4"]
  assert bench.main(["decode", "--configs=torch,grm", *tiny, f"--json={out}"]) == 0
  rows = {r["config"]: r for r in json.loads(out.read_text())["rows"]}
  grm = rows["grm"]
  assert grm["context"] == 16 and grm["B"] == 1 and grm["tok_s"] > 0 and grm["prefill_tok_s"] > 0 and grm["fwd_ms"] > 0 and grm["error"] is None
  if "torch" in rows: assert rows["torch"]["tok_s"] > 0 and rows["torch"]["prefill_tok_s"] > 0 and grm["vs_torch"] > 0
  assert bench.main(["decode", "--configs=bogus"]) == 2 and bench.main(["decode", "--batches=0"]) == 2

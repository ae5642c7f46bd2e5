# pytest from the repository root: mc.py, kernels.py, train.py and eval.py import as top-level modules, tests/oracle.py as `oracle`
import gc, os, sys
import numpy as np
import pytest
ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [p for p in (ROOT, os.path.join(ROOT, "tests")) if p not in sys.path]

def pytest_configure(config):
  config.addinivalue_line("markers", "kernels: runs memory_mix with cfg.kernels=True (custom UOp kernels)")
  config.addinivalue_line("markers", "grid_full: oracle grid cases beyond the CI tier")
  config.addinivalue_line("markers", "slow: long tests left out of the CI tier")

@pytest.fixture(autouse=True)
def cpu_context():
  # every test under train.py's CPU defaults (NOOPT=1 PARALLEL=0 unless set): plain kernels compile 2-3x sooner, same results
  from tinygrad import Context
  from train import device_defaults
  with Context(**device_defaults()): yield

@pytest.fixture(autouse=True, scope="session")
def lazy_gc():
  # tinygrad's caches fill the heap with UOps that the default collector thresholds rescan again and again (~20% of test time)
  threshold = gc.get_threshold()
  gc.set_threshold(50000, 20, 100)
  yield
  gc.set_threshold(*threshold)

# ***** the shared smoke run *****

@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory) -> dict:
  # one full run of the smoke preset per pytest session, trained in this process and read by test_train.py and test_eval.py
  import train
  return train.train(train.parse_args(["--preset=smoke", f"--out={tmp_path_factory.mktemp('smoke')}", "--name=smoke_run"]))

@pytest.fixture
def mix():
  # mc.memory_mix on oracle.make_inputs' NumPy arrays (float32 inside; u the same Tensor as q where it is the same array), as float64
  from tinygrad import Tensor
  from mc import MCConfig, memory_mix
  from oracle import H, D, MEM_EXPAND
  T = lambda x: Tensor(np.ascontiguousarray(x, dtype=np.float32))
  def run(q, k, v, u, gates, init, **kw) -> np.ndarray:
    cfg = MCConfig(dim=H * D, n_heads=H, mem_expand=MEM_EXPAND, **{"kernels": False, **kw})
    tq, ti = T(q), None if init is None else {n: T(x) for n, x in init.items()}
    y = memory_mix(tq, T(k), T(v), tq if u is q else T(u), {n: T(x) for n, x in gates.items()}, cfg, ti)
    return y.numpy().astype(np.float64)
  return run

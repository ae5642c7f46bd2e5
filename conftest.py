# pytest from the repository root: mc.py, kernels.py, train.py and eval.py import as top-level modules
import gc, os, sys
import pytest
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

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

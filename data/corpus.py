"""Byte-level text corpora for tinymc, and the random windows that training reads.

The default corpus is the Python standard library's own .py source (found through `sysconfig`, so it is on every machine and
`python train.py` runs offline); `--data=PATH` takes any text file or folder instead. Every byte is a token (vocab 256).

Choices:
- Documents are joined with the separator byte SEP = 0x00. Files holding a 0x00 byte are treated as binary and skipped, so in
  the stream a 0x00 always means "a new document starts here".
- Split of a folder (the stdlib included): by file, a file goes to "val" when the first 8 bytes of sha256(its path relative to
  the folder, posix form) read as a little-endian integer are < 5 mod 100 (about 5% of files). Stable across runs and machines,
  unlike hash(). A folder too small to put a file on each side falls back to the single-file rule on its joined text.
- Split of a single file: the first 95% of its bytes are "train", the last 5% "val".
- Nothing is cached on disk; the stdlib files are read once per process (about 10 MB) and kept in memory.
"""
import functools, hashlib, os, sysconfig
from pathlib import Path
import numpy as np

SEP = 0x00                 # document separator byte
VAL_PERCENT = 5            # share of files (or of a single file's bytes) that is validation
SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})  # not the stdlib's own code

def stdlib_root() -> Path: return Path(sysconfig.get_paths()["stdlib"])

def _read(path:Path) -> bytes|None:
  # None for anything that is not usable text: unreadable, empty, or binary (holds the separator byte)
  try: b = path.read_bytes()
  except OSError: return None
  return b if b and SEP not in b else None

def _walk(root:Path, suffix:str="", skip:frozenset[str]=frozenset()) -> list[Path]:
  # os.walk so that skipped folders (site-packages can hold thousands of files) are never entered; hidden files never count
  out = []
  for d, dirs, files in os.walk(root):
    dirs[:] = [x for x in dirs if x not in skip and not x.startswith(".")]
    out += [Path(d) / f for f in files if f.endswith(suffix) and not f.startswith(".")]
  return sorted(out)

@functools.cache
def _stdlib_docs() -> tuple[tuple[Path, bytes], ...]:
  docs = tuple((p, b) for p in _walk(stdlib_root(), ".py", SKIP_DIRS) if (b := _read(p)) is not None)
  if not docs: raise ValueError(f"found no readable .py files under the standard library at {stdlib_root()}")
  return docs

def stdlib_files() -> list[Path]:
  """The standard library's own readable .py files, sorted (no site-packages, no test folders)."""
  return [p for p, _ in _stdlib_docs()]

def split_of(path:str|Path, root:str|Path|None=None) -> str:
  """"train" or "val" for a file, from a stable hash of its path relative to `root` (default: the stdlib root)."""
  rel = Path(path).relative_to(root if root is not None else stdlib_root()).as_posix()
  h = int.from_bytes(hashlib.sha256(rel.encode()).digest()[:8], "little")
  return "val" if h % 100 < VAL_PERCENT else "train"

def _by_bytes(text:bytes, split:str) -> bytes:
  cut = len(text) * (100 - VAL_PERCENT) // 100
  return text[:cut] if split == "train" else text[cut:]

def _load_bytes(path:str|None, split:str) -> bytes:
  if path is None: docs, root = _stdlib_docs(), stdlib_root()
  else:
    p = Path(path)
    if not p.exists(): raise ValueError(f"--data={path}: no such file or folder")
    if p.is_file():
      try: b = p.read_bytes()
      except OSError as e: raise ValueError(f"--data={path}: cannot read the file ({e})") from None
      if not b: raise ValueError(f"--data={path}: the file is empty")
      if SEP in b: raise ValueError(f"--data={path}: not a text file (it holds 0x00 bytes)")
      return _by_bytes(b, split)
    files = _walk(p)
    if not files: raise ValueError(f"--data={path}: the folder is empty (no files under it)")
    docs, root = tuple((f, b) for f in files if (b := _read(f)) is not None), p
    if not docs: raise ValueError(f"--data={path}: no readable text in the folder ({len(files)} files, all empty, unreadable or binary)")
  sides = {s: [b for f, b in docs if split_of(f, root) == s] for s in ("train", "val")}
  # a small folder may hash every file to one side: then split its joined text like a single file
  if not sides["train"] or not sides["val"]: return _by_bytes(bytes([SEP]).join(b for _, b in docs), split)
  return bytes([SEP]).join(sides[split])

def load_corpus(path:str|None=None, split:str="train") -> np.ndarray:
  """The bytes of one split as a read-only uint8 array. path None = the stdlib corpus; else a text file or a folder of them."""
  if split not in ("train", "val"): raise ValueError(f"split must be 'train' or 'val', got {split!r}")
  b = _load_bytes(path, split)
  if not b: raise ValueError(f"--data={path}: the {split} split is empty (too little text to split off {VAL_PERCENT}%)")
  return np.frombuffer(b, dtype=np.uint8)

class Batches:
  """Random windows of seq_len + 1 bytes from a seeded generator: x = window[:-1], y = window[1:], both int32 (B, T).

  inject (a function (window, rng) -> window of the same length) replaces that `share` of windows; data/tasks.py's
  niah_batches uses it to hide needles in the text. state()/load_state() capture the generator exactly, so a resumed run
  reads the same batches; the state is a plain dict of ints and strings (JSON-serialisable).
  """
  def __init__(self, data:np.ndarray, batch_size:int, seq_len:int, seed:int=0, inject=None, share:float=0.0):
    self.data, self.B, self.T, self.inject, self.share = np.asarray(data, dtype=np.uint8), batch_size, seq_len, inject, share
    if batch_size < 1 or seq_len < 1: raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size} and {seq_len}")
    if len(self.data) < seq_len + 1:
      raise ValueError(f"corpus has {len(self.data)} bytes, shorter than one window of seq_len + 1 = {seq_len + 1} bytes")
    if not 0.0 <= share <= 1.0: raise ValueError(f"share must be in [0, 1], got {share}")
    self.rng = np.random.default_rng(seed)

  def next(self) -> tuple[np.ndarray, np.ndarray]:
    starts = self.rng.integers(0, len(self.data) - self.T, size=self.B)
    w = self.data[starts[:, None] + np.arange(self.T + 1)]                   # (B, T+1) uint8, a copy
    if self.inject is not None and self.share > 0:
      for i in np.flatnonzero(self.rng.random(self.B) < self.share): w[i] = self.inject(w[i], self.rng)
    w = w.astype(np.int32)
    return w[:, :-1], w[:, 1:]

  __next__ = next
  def __iter__(self): return self
  def state(self) -> dict: return {"rng": self.rng.bit_generator.state}
  def load_state(self, state:dict): self.rng.bit_generator.state = state["rng"]

"""Tests of data/: the byte corpora, the random windows, MQAR and NIAH. Pure numpy, a couple of seconds on CPU."""
import hashlib, json, re, uuid
import numpy as np
import pytest

from data.corpus import SEP, Batches, load_corpus, split_of, stdlib_files, stdlib_root
from data.tasks import IGNORE, NOISE, mqar_batch, niah_batches, niah_example, niah_min_length

# **** corpus ****

def test_stdlib_corpus():
  files = stdlib_files()
  assert len(files) > 100 and files == sorted(files)
  for f in files:
    parts = f.relative_to(stdlib_root()).parts
    assert f.suffix == ".py" and not {"site-packages", "test", "tests", "idle_test"} & set(parts), f
  val = [f for f in files if split_of(f) == "val"]
  assert 0.02 < len(val) / len(files) < 0.09
  # disjoint by file: each split is exactly its files joined by SEP, so no file's bytes land in both
  for split in ("train", "val"):
    mine = [f.read_bytes() for f in files if split_of(f) == split]
    data = load_corpus(None, split)
    assert data.dtype == np.uint8 and data.tobytes() == bytes([SEP]).join(mine)
    assert np.array_equal(data, load_corpus(None, split))
  assert split_of(files[0]) == split_of(str(files[0]))

def test_data_file(tmp_path):
  text = "".join(f"line {i}: some text\n" for i in range(200)).encode()
  (p := tmp_path / "a.txt").write_bytes(text)
  tr, va = load_corpus(str(p), "train"), load_corpus(str(p), "val")
  assert tr.tobytes() + va.tobytes() == text and len(va) == len(text) - len(text) * 95 // 100

def test_data_folder(tmp_path):
  for i in range(80):
    (tmp_path / f"sub{i % 3}").mkdir(exist_ok=True)
    (tmp_path / f"sub{i % 3}" / f"f{i}.txt").write_text(f"doc {i}\n" * 5)
  (tmp_path / "blob.bin").write_bytes(b"\x00\x01\x02")                     # binary: skipped
  (tmp_path / ".hidden").write_text("never read")
  files = sorted(tmp_path.rglob("f*.txt"))
  for split in ("train", "val"):
    docs = load_corpus(str(tmp_path), split).tobytes().split(bytes([SEP]))
    assert sorted(docs) == sorted(f.read_bytes() for f in files if split_of(f, tmp_path) == split)
  # a folder too small to hash a file to each side splits its text like a single file
  (one := tmp_path / "one").mkdir()
  (one / "x.txt").write_text("hello world\n" * 50)
  assert load_corpus(str(one), "train").tobytes() + load_corpus(str(one), "val").tobytes() == (one / "x.txt").read_bytes()

def test_bad_data(tmp_path):
  with pytest.raises(ValueError, match="no such file or folder"): load_corpus(str(tmp_path / "missing"))
  (empty := tmp_path / "empty.txt").write_bytes(b"")
  with pytest.raises(ValueError, match="empty.txt: the file is empty"): load_corpus(str(empty))
  (folder := tmp_path / "dir").mkdir()
  with pytest.raises(ValueError, match="the folder is empty"): load_corpus(str(folder))
  (folder / "a.bin").write_bytes(b"\x00\xff")
  (folder / "b.txt").write_bytes(b"")
  with pytest.raises(ValueError, match="no readable text"): load_corpus(str(folder))
  with pytest.raises(ValueError, match="not a text file"): load_corpus(str(folder / "a.bin"))
  with pytest.raises(ValueError, match="split must be"): load_corpus(None, "test")

def test_short_corpus():
  with pytest.raises(ValueError, match="corpus has 10 bytes.*65 bytes"): Batches(np.zeros(10, np.uint8), 2, 64)
  Batches(np.zeros(65, np.uint8), 2, 64).next()     # exactly one window is enough

# **** Batches ****

DATA = (np.arange(5000) % 251).astype(np.uint8)    # windows identify their start: data[s + t] = (s + t) % 251

def test_batches():
  x, y = Batches(DATA, 4, 100, seed=1).next()
  assert x.shape == y.shape == (4, 100) and x.dtype == y.dtype == np.int32
  assert np.array_equal(x[:, 1:], y[:, :-1])
  assert np.array_equal((x[:, :1] + np.arange(101)) % 251, np.concatenate([x, y[:, -1:]], 1))
  a, b, c = Batches(DATA, 4, 100, seed=1), Batches(DATA, 4, 100, seed=1), Batches(DATA, 4, 100, seed=2)
  for _ in range(3):
    (xa, ya), (xb, yb), (xc, _) = a.next(), b.next(), c.next()
    assert np.array_equal(xa, xb) and np.array_equal(ya, yb) and not np.array_equal(xa, xc)

@pytest.mark.parametrize("mix", [0.0, 0.5])
def test_batches_resume(mix):
  data = load_corpus(None, "val")
  a = niah_batches(data, 4, 400, seed=3, niah_mix=mix)
  for _ in range(3): a.next()
  state = json.loads(json.dumps(a.state()))      # what a checkpoint stores
  want = [a.next() for _ in range(3)]
  b = niah_batches(data, 4, 400, seed=123, niah_mix=mix)
  b.load_state(state)
  for (xa, ya), (xb, yb) in zip(want, [b.next() for _ in range(3)]): assert np.array_equal(xa, xb) and np.array_equal(ya, yb)

def test_batches_niah_mix():
  x, y = niah_batches(load_corpus(None, "train"), 16, 512, seed=0, niah_mix=1.0).next()
  rows = [bytes(np.concatenate([r, s[-1:]]).astype(np.uint8)) for r, s in zip(x, y)]
  assert all(b"One of the special magic" in r and b"mentioned in the provided text is: " in r for r in rows)
  n = sum(b"special magic" in bytes(r.astype(np.uint8)) for r in niah_batches(DATA, 200, 400, seed=0, niah_mix=0.25).next()[0])
  assert 25 < n < 75
  with pytest.raises(ValueError, match="niah_mix needs"): niah_batches(DATA, 2, 100, niah_mix=0.1)

# **** MQAR ****

def test_mqar():
  n, T, k, V = 64, 256, 16, 8192
  x, y, mask = mqar_batch(n, T, k, vocab=V, seed=0)
  assert x.shape == y.shape == mask.shape == (n, T) and x.dtype == y.dtype == np.int32 and mask.dtype == bool
  assert x.min() >= 0 and x.max() < V
  keys, vals = x[:, 0:2 * k:2], x[:, 1:2 * k:2]
  assert keys.min() >= 1 and keys.max() < V // 2 and vals.min() >= V // 2 and vals.max() < V
  assert all(len(set(r)) == k for r in keys)
  assert np.array_equal(mask, y != IGNORE) and (mask.sum(1) == k).all() and not mask[:, :2 * k].any()
  for i in range(n):
    pos = np.flatnonzero(mask[i])
    assert sorted(x[i, pos]) == sorted(keys[i])                              # every key queried once
    for p in pos:
      j = int(np.flatnonzero(keys[i] == x[i, p])[0])
      assert vals[i, j] == y[i, p]                                           # its target is the value paired with it earlier
  # power-law gaps: most queries come soon after the pairs
  slots = (np.flatnonzero(mask.ravel()) % T - 2 * k) // 2
  assert np.median(slots) < (T - 2 * k) // 2 / 4
  x2, y2, _ = mqar_batch(n, T, k, vocab=V, seed=0)
  assert np.array_equal(x, x2) and np.array_equal(y, y2) and not np.array_equal(x, mqar_batch(n, T, k, vocab=V, seed=1)[0])

def test_mqar_bad():
  with pytest.raises(ValueError, match="seq_len >= 4"): mqar_batch(2, 60, 16)
  with pytest.raises(ValueError, match="vocab=16 is too small"): mqar_batch(2, 256, 8, vocab=16)
  with pytest.raises(ValueError, match="num_kv_pairs"): mqar_batch(2, 64, 0)
  mqar_batch(2, 64, 16, vocab=34)                                            # the tightest legal settings

# **** NIAH ****

Q = re.compile(rb"\nWhat is the special magic (number|uuid) for ([a-z]+-[a-z]+) mentioned in the provided text\? "
               rb"The special magic \1 for \2 mentioned in the provided text is: ([0-9a-f-]+)$")

def parse(tokens, start, n):
  """The word, answer and needle position of an example, checking the layout on the way."""
  b = tokens.tobytes()
  m = Q.search(b)
  assert m and m.start(3) == start and len(m.group(3)) == n and b[start:] == m.group(3)
  kind, word, answer = m.group(1).decode(), m.group(2), m.group(3)
  needle = b"One of the special magic %ss for %s is: %s." % (kind.encode(), word, answer)
  assert b.count(needle) == 1
  hay = b[:b.index(needle)] + b[b.index(needle) + len(needle) + 1:m.start()]   # the text around the needle
  return word.decode(), answer.decode(), b.index(needle), hay

@pytest.mark.parametrize("task", [1, 2, 3])
def test_niah(task):
  rng = np.random.default_rng(0)
  for length in (niah_min_length(), 512, 2000, 8192):
    for depth in (0.0, 0.1, 0.5, 0.9, 1.0):
      tokens, start, n = niah_example(task, length, depth, rng)
      assert tokens.shape == (length,) and start + n == length
      word, answer, pos, hay = parse(tokens, start, n)
      assert abs(pos - depth * len(hay)) <= 64                                 # snapped to a line or sentence within 64 bytes
      if task == 1: assert hay == (NOISE * (len(hay) // len(NOISE) + 1))[:len(hay)]
      if task == 3: assert uuid.UUID(answer).version == 4
      else: assert len(answer) == 7 and answer.isdigit()
  a = [niah_example(task, 1000, 0.3, np.random.default_rng(5)) for _ in range(2)]
  assert np.array_equal(a[0][0], a[1][0]) and a[0][1:] == a[1][1:]

def test_niah_haystack():
  text = b"".join(b"sentence number %d of the held out text. " % i for i in range(400))
  tokens, start, n = niah_example(2, 1500, 0.5, np.random.default_rng(0), haystack=text)
  _, _, pos, hay = parse(tokens, start, n)
  assert hay in text and tokens[pos - 2:pos].tobytes() == b". "               # a stretch of the given text, cut at a sentence
  tokens, start, n = niah_example(3, 1500, 0.5, np.random.default_rng(0), haystack=text[:100])   # short: repeated
  assert parse(tokens, start, n)[3] in text[:100] * 20

def test_niah_disjoint():
  seen = {}
  for split in ("train", "eval"):
    rng = np.random.default_rng(7)
    out = [parse(*niah_example(task, 400, 0.5, rng, split=split, haystack=NOISE))[:2] for task in (1, 3) for _ in range(300)]
    words, numbers, uuids = {w for w, _ in out}, [int(a) for w, a in out if len(a) == 7], [a for w, a in out if len(a) == 36]
    # a value's split is a hash of its text (sha256's first byte, low bit), nothing a model could read off it: every last digit
    # occurs in both splits
    assert {"eval" if hashlib.sha256(str(a).encode()).digest()[0] & 1 else "train" for a in numbers + uuids} == {split}
    assert {str(a)[-1] for a in numbers} == set("0123456789") and len({u[-1] for u in uuids}) == 16
    seen[split] = words, set(numbers), set(uuids)
  for a, b in zip(seen["train"], seen["eval"]): assert a and b and not a & b

def test_niah_bad():
  rng = np.random.default_rng(0)
  with pytest.raises(ValueError, match="NIAH-3 needs length >= "): niah_example(3, 100, 0.5, rng)
  with pytest.raises(ValueError, match="task must be"): niah_example(4, 1000, 0.5, rng)
  with pytest.raises(ValueError, match="depth must be"): niah_example(1, 1000, 1.5, rng)

"""Synthetic recall tasks for tinymc, generated on the fly from a seed (nothing is stored).

- MQAR, multi-query associative recall, after Zoology (Arora et al. 2023, "Zoology: Measuring and Improving Recall in
  Efficient Language Models", HazyResearch/zoology multiquery_ar): key-value pairs at the start, then each key queried once
  at a power-law distributed gap later; only the answers are scored. Token ids, not bytes (vocab default 8192).
- S-NIAH, single needle in a haystack, after RULER (Hsieh et al. 2024, NVIDIA/RULER scripts/data/synthetic/niah.py), in bytes:
    NIAH-1  a 7-digit number in RULER's repeated noise ("The grass is green. The sky is blue. ...")
    NIAH-2  a 7-digit number in held-out corpus text
    NIAH-3  a uuid in held-out corpus text
  Layout: haystack with "One of the special magic numbers for <word> is: <value>." inserted at the chosen depth, then "\\n",
  the question "What is the special magic number for <word> mentioned in the provided text? The special magic number for
  <word> mentioned in the provided text is: " and the answer bytes, which end the sequence and are the bytes scored. RULER's
  opening instruction line is left out: at byte level it would cost ~150 bytes of every short context.
  Train/eval needles are disjoint: a key word (adjective-noun, as RULER's) is an eval word when the low bit of the first byte
  of sha256(word) is 1, and a value (number or uuid) is an eval value by the same rule on its text. A hash, not a visible mark:
  with train numbers even and eval numbers odd (as before), a model learned that the last digit is even and missed every eval
  answer's last byte.
"""
import functools, hashlib, uuid
import numpy as np
from .corpus import Batches, load_corpus

IGNORE = -100   # target of the positions MQAR does not score

# **** MQAR ****

def mqar_batch(n:int, seq_len:int, num_kv_pairs:int, vocab:int=8192, power_a:float=0.01,
               seed:int|np.random.Generator=0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """n MQAR sequences: x (n, T) int32 inputs; y (n, T) int32 targets, IGNORE except where x holds a query key, where y is that
  key's value (the prediction made at that position); mask (n, T) bool = y != IGNORE.
  Keys come from [1, vocab//2), values from [vocab//2, vocab), all positions that are neither pairs nor queries hold random
  tokens (Zoology's random_non_queries). seed may be an int or a np.random.Generator (then it is advanced)."""
  T, k, half = seq_len, num_kv_pairs, vocab // 2
  if k < 1: raise ValueError(f"mqar: num_kv_pairs must be >= 1, got {k}")
  if 4 * k > T: raise ValueError(f"mqar: {k} kv pairs need seq_len >= 4 * num_kv_pairs = {4 * k} (the pairs and a query slot per key), got {T}")
  if half - 1 < k: raise ValueError(f"mqar: vocab={vocab} is too small for {k} distinct keys in [1, vocab//2); need vocab >= {2 * (k + 1)}")
  if power_a <= 0: raise ValueError(f"mqar: power_a must be > 0, got {power_a}")
  rng = np.random.default_rng(seed)
  ctx = 2 * k
  # queries sit on every other position after the pairs: slot g is position ctx + 2g
  space = (T - ctx) // 2
  # p(g) ~ a * g^(a-1): short gaps are far more likely, like the distance between repeated bigrams in text (Zoology)
  p = power_a * np.arange(1, space + 1, dtype=np.float64) ** (power_a - 1)
  p /= p.sum()
  x = rng.integers(0, vocab, size=(n, T))
  y = np.full((n, T), IGNORE)
  for i in range(n):
    keys = rng.choice(half - 1, size=k, replace=False) + 1
    vals = rng.choice(vocab - half, size=k, replace=False) + half
    pos = ctx + 2 * rng.choice(space, size=k, replace=False, p=p)
    x[i, 0:ctx:2], x[i, 1:ctx:2] = keys, vals
    x[i, pos], y[i, pos] = keys, vals
  return x.astype(np.int32), y.astype(np.int32), y != IGNORE

# **** NIAH ****

NOISE = b"The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n"   # RULER's repeat haystack
NEEDLE = "One of the special magic {kind}s for {word} is: {value}."
QUESTION = ("What is the special magic {kind} for {word} mentioned in the provided text? "
            "The special magic {kind} for {word} mentioned in the provided text is: ")
ADJS = ("ancient amber bitter brave calm clever crimson curious damp eager early fancy fierce fragile gentle golden hollow humble "
        "icy jolly lazy loud lucky mellow misty noble odd pale proud quiet rapid rough rusty silent sleepy smooth steep sticky "
        "sunny swift tall tender tiny velvet vivid wary wild witty young zealous").split()
NOUNS = ("anchor apple badger barrel beacon bottle canyon castle cello comet cricket desert dragon engine falcon feather garden "
         "glacier harbor helmet island jacket kettle ladder lantern magnet meadow mirror needle orchard otter parrot pebble "
         "pepper pillow planet quartz rabbit ribbon saddle signal spider tablet thistle tunnel violin walnut window yacht").split()
WORDS = [f"{a}-{n}" for a in ADJS for n in NOUNS]

def needle_split(text:str) -> str: return "eval" if hashlib.sha256(text.encode()).digest()[0] & 1 else "train"   # a key word's or value's
@functools.cache
def _words(split:str) -> list[str]: return [w for w in WORDS if needle_split(w) == split]

def _value(draw, split:str) -> str:
  # draws until the value falls in the split (two draws on average)
  while needle_split(v := draw()) != split: pass
  return v

def _number(rng:np.random.Generator, split:str) -> str: return _value(lambda: str(int(rng.integers(10**6, 10**7))), split)   # 7 digits

def _uuid(rng:np.random.Generator, split:str) -> str:   # uuid4 from 128 random bits
  return _value(lambda: str(uuid.UUID(int=int.from_bytes(rng.bytes(16), "little"), version=4)), split)

@functools.cache
def _default_haystack(split:str) -> np.ndarray: return load_corpus(None, "val" if split == "eval" else "train")

def _snap(h:np.ndarray, pos:int, window:int=64) -> int:
  # move to the nearest line or sentence start within `window` bytes, so the needle does not cut a word in two
  start = np.zeros(len(h) + 1, dtype=bool)
  start[[0, -1]] = True
  start[1:] |= h == ord("\n")
  start[2:] |= (h[:-1] == ord(".")) & (h[1:] == ord(" "))
  cand = np.flatnonzero(start)
  best = int(cand[np.abs(cand - pos).argmin()])
  return best if abs(best - pos) <= window else pos

def _parts(task:int, word:str, value:str) -> tuple[bytes, bytes, bytes]:
  kind = "uuid" if task == 3 else "number"
  return NEEDLE.format(kind=kind, word=word, value=value).encode(), ("\n" + QUESTION.format(kind=kind, word=word)).encode(), value.encode()

@functools.cache
def niah_min_length() -> int:
  """The shortest length any NIAH example fits in (longest word, a uuid, an empty haystack)."""
  return max(sum(map(len, _parts(3, w, str(uuid.UUID(int=0))))) for w in WORDS) + 1

def niah_example(task:int, length:int, depth:float, rng:np.random.Generator, split:str="eval",
                 haystack:bytes|np.ndarray|None=None) -> tuple[np.ndarray, int, int]:
  """One S-NIAH sequence of exactly `length` bytes: (tokens uint8 (length,), answer_start, answer_len); the answer is
  tokens[answer_start:answer_start + answer_len], the last bytes. depth in [0, 1] places the needle that far into the
  haystack (snapped to a line or sentence start within 64 bytes). split "train"|"eval" picks the needle pool. haystack is
  the text for NIAH-2/3 (default: the stdlib corpus, its val split for eval and train split for train); a random stretch
  of it is used, repeated if short. NIAH-1 ignores it."""
  if task not in (1, 2, 3): raise ValueError(f"niah: task must be 1, 2 or 3, got {task}")
  if split not in ("train", "eval"): raise ValueError(f"niah: split must be 'train' or 'eval', got {split!r}")
  if not 0.0 <= depth <= 1.0: raise ValueError(f"niah: depth must be in [0, 1], got {depth}")
  pool = _words(split)
  word = pool[int(rng.integers(len(pool)))]
  needle, question, answer = _parts(task, word, _uuid(rng, split) if task == 3 else _number(rng, split))
  n = length - len(needle) - 1 - len(question) - len(answer)      # haystack bytes; 1 for the byte that ends the needle
  if n < 0: raise ValueError(f"niah: NIAH-{task} needs length >= {length - n} bytes for the needle and question, got {length}")
  if task == 1: src = np.frombuffer(NOISE, dtype=np.uint8)
  elif haystack is None: src = _default_haystack(split)
  else: src = np.frombuffer(haystack, dtype=np.uint8) if isinstance(haystack, bytes) else np.asarray(haystack, dtype=np.uint8)
  if len(src) == 0: raise ValueError("niah: the haystack is empty")
  # noise always starts at its first sentence; text starts at a random place
  off = 0 if task == 1 or len(src) <= n else int(rng.integers(0, len(src) - n + 1))
  h = np.resize(src[off:], n) if len(src) - off < n else src[off:off + n]
  pos = _snap(h, round(depth * n))
  # end the needle like the text it interrupts: a space inside a line of sentences, else a newline
  end = b" " if pos > 0 and h[pos - 1] == ord(" ") else b"\n"
  out = np.concatenate([h[:pos], np.frombuffer(needle + end, dtype=np.uint8), h[pos:], np.frombuffer(question + answer, dtype=np.uint8)])
  return out, length - len(answer), len(answer)

def niah_mix_window(window:np.ndarray, rng:np.random.Generator) -> np.ndarray:
  """A training window of the same length carrying a needle and its question (random task and depth, training needles);
  NIAH-2/3 hide it in the window's own text. Used by niah_batches."""
  task, depth = int(rng.integers(1, 4)), float(rng.random())
  return niah_example(task, len(window), depth, rng, split="train", haystack=window)[0]

def niah_batches(data:np.ndarray, batch_size:int, seq_len:int, seed:int=0, niah_mix:float=0.0) -> Batches:
  """Training windows of `data` (corpus.Batches) where a share niah_mix of them carry a needle and its question."""
  if not 0.0 <= niah_mix <= 1.0: raise ValueError(f"niah_mix must be in [0, 1], got {niah_mix}")
  if niah_mix > 0 and seq_len + 1 < niah_min_length():
    raise ValueError(f"niah_mix needs seq_len + 1 >= {niah_min_length()} bytes to hold a needle and its question, got {seq_len + 1}")
  return Batches(data, batch_size, seq_len, seed, inject=niah_mix_window if niah_mix > 0 else None, share=niah_mix)

"""tinymc data: byte corpora (corpus.py) and synthetic recall tasks (tasks.py)."""
from .corpus import SEP, Batches, load_corpus, split_of, stdlib_files
from .tasks import IGNORE, mqar_batch, niah_batches, niah_example, niah_mix_window

__all__ = ["SEP", "Batches", "load_corpus", "split_of", "stdlib_files", "IGNORE", "mqar_batch", "niah_batches", "niah_example", "niah_mix_window"]

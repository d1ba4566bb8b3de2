"""Text sources: the embedded default corpus and a user's own files.

The default corpus is the Python standard library's own ``.py`` sources of the running
interpreter (found with ``sysconfig``; ``site-packages`` excluded): present wherever Python
is, nothing to download. Files are ordered by relative path and split into train and
validation *by file*, with a hash of the path, so the split is stable across runs and
machines with the same Python version.
"""

from __future__ import annotations

import glob as glob_lib
import os
import sysconfig
import zlib
from collections.abc import Sequence

import numpy as np

from sparsity_jax.data import tokenizer as tok


def stdlib_files() -> tuple[str, list[str]]:
  """(root, sorted relative paths) of the interpreter's standard-library sources."""
  root = sysconfig.get_paths()["stdlib"]
  files = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "__pycache__"))
    for name in filenames:
      if name.endswith(".py"):
        files.append(os.path.relpath(os.path.join(dirpath, name), root))
  if not files:
    raise FileNotFoundError(f"no .py files under the standard library at {root}")
  return root, sorted(files)


def text_files(pattern: str) -> tuple[str, list[str]]:
  """(root, sorted relative paths) of the files matching a glob (``**`` allowed)."""
  matches = sorted(p for p in glob_lib.glob(os.path.expanduser(pattern), recursive=True)
                   if os.path.isfile(p))
  if not matches:
    raise ValueError(f"config.data.glob={pattern!r} matches no files; check the path "
                     "(use ** with a recursive pattern, e.g. '/data/**/*.txt')")
  root = os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in matches])
  return root, [os.path.relpath(os.path.abspath(p), root) for p in matches]


def split_files(files: Sequence[str], val_fraction: float) -> tuple[list[str], list[str]]:
  """Deterministic train/validation split by a hash of each relative path."""
  if not 0.0 < val_fraction < 1.0:
    raise ValueError(f"config.data.val_fraction must be in (0, 1), got {val_fraction}")
  cut = int(round(val_fraction * 10_000))
  train, val = [], []
  for path in files:
    (val if zlib.crc32(path.encode()) % 10_000 < cut else train).append(path)
  if not train or not val:
    # Tiny corpora (a handful of files): fall back to a split by position, keeping both sides.
    if len(files) < 2:
      raise ValueError(f"need at least 2 files to split train/validation, got {len(files)}")
    n_val = max(1, int(round(len(files) * val_fraction)))
    return list(files[:-n_val]), list(files[-n_val:])
  return train, val


def load_tokens(root: str, files: Sequence[str]) -> np.ndarray:
  """Concatenated byte tokens of ``files``, each document followed by EOS (uint16)."""
  parts = []
  eos = np.array([tok.EOS_ID], np.uint16)
  for rel in files:
    with open(os.path.join(root, rel), "rb") as f:
      parts.append(np.frombuffer(f.read(), np.uint8).astype(np.uint16))
    parts.append(eos)
  return np.concatenate(parts) if parts else np.zeros((0,), np.uint16)


def load_split(data_config) -> dict[str, np.ndarray]:
  """{'train': tokens, 'validation': tokens} for ``config.data``."""
  source = data_config.source
  if source == "stdlib":
    root, files = stdlib_files()
  elif source == "text_files":
    root, files = text_files(data_config.glob)
  else:
    raise ValueError(f"config.data.source={source!r}; use 'stdlib' or 'text_files'")
  train, val = split_files(files, data_config.val_fraction)
  splits = {"train": load_tokens(root, train), "validation": load_tokens(root, val)}
  fraction = float(data_config.get("retrieval_fraction", 0.0))
  if fraction:
    for i, name in enumerate(("train", "validation")):
      splits[name] = mix_retrieval(splits[name], fraction, data_config.seq_len, seed=i)
  return splits


MAX_RETRIEVAL_BLOCKS = 32_768


def mix_retrieval(tokens: np.ndarray, fraction: float, seq_len: int, *, seed: int) -> np.ndarray:
  """Interleaves ``tokens`` with LongEval-style retrieval documents, ``seq_len`` at a time.

  Both streams are cut into blocks of ``seq_len`` tokens, so every training window is one
  block (plus one target token: the first of the next, unrelated block) and a retrieval
  window holds whole documents. Blocks are shuffled with ``seed``, so the first validation
  batches already hold both kinds.
  """
  from sparsity_jax.data import retrieval
  if not 0.0 <= fraction < 1.0:
    raise ValueError(f"config.data.retrieval_fraction must be in [0, 1), got {fraction}")
  text = tokens[:len(tokens) // seq_len * seq_len].reshape(-1, seq_len)
  num_retrieval = int(round(len(text) * fraction / (1.0 - fraction)))
  # Generating costs ~0.4 ms a block: at most MAX_RETRIEVAL_BLOCKS distinct ones, tiled.
  distinct = retrieval.token_blocks(seed, min(num_retrieval, MAX_RETRIEVAL_BLOCKS), seq_len)
  docs = np.resize(distinct.reshape(-1, seq_len), (num_retrieval, seq_len))
  blocks = np.concatenate([text, docs])
  order = np.random.default_rng([seed, seq_len, 1]).permutation(len(blocks))
  return blocks[order].reshape(-1)

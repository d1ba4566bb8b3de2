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


def load_tokens(root: str, files: Sequence[str], tokenizer=None) -> np.ndarray:
  """Concatenated tokens of ``files``, each document followed by EOS.

  Byte tokens (uint16) by default; with ``tokenizer`` (an HFTokenizer) each file's UTF-8
  text (invalid bytes replaced) is encoded without special tokens and followed by the
  tokenizer's EOS id (uint16, or uint32 for vocabularies past 65535).
  """
  if tokenizer is None:
    parts = []
    eos = np.array([tok.EOS_ID], np.uint16)
    for rel in files:
      with open(os.path.join(root, rel), "rb") as f:
        parts.append(np.frombuffer(f.read(), np.uint8).astype(np.uint16))
      parts.append(eos)
    return np.concatenate(parts) if parts else np.zeros((0,), np.uint16)
  if tokenizer.eos_id is None:
    raise ValueError("config.data.tokenizer='pretrained' needs a tokenizer with an EOS token to "
                     "separate documents")
  dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
  texts = []
  for rel in files:
    with open(os.path.join(root, rel), "rb") as f:
      texts.append(f.read().decode("utf-8", errors="replace"))
  encoded = tokenizer.tokenizer.encode_batch(texts, add_special_tokens=False)
  eos = np.array([tokenizer.eos_id], dtype)
  parts = [p for e in encoded for p in (np.asarray(e.ids, dtype), eos)]
  return np.concatenate(parts) if parts else np.zeros((0,), dtype)


def text_bytes(root: str, files: Sequence[str]) -> int:
  """UTF-8 bytes of ``files`` plus one per document (its EOS), the byte tokenizer's count."""
  return sum(os.path.getsize(os.path.join(root, rel)) + 1 for rel in files)


def load_split(data_config, tokenizer=None, splits=("train", "validation")) -> dict[str, np.ndarray]:
  """{split: tokens} for ``config.data`` (both splits by default).

  ``tokenizer`` (an HFTokenizer) replaces the byte tokenizer; see :func:`load_tokens`.
  """
  root, files = _source_files(data_config)
  train, val = split_files(files, data_config.val_fraction)
  by_name = {"train": train, "validation": val}
  out = {name: load_tokens(root, by_name[name], tokenizer) for name in splits}
  fraction = float(data_config.get("retrieval_fraction", 0.0))
  if fraction:
    if tokenizer is not None:
      raise ValueError("config.data.retrieval_fraction > 0 generates byte-level documents; it "
                       "cannot be mixed with config.data.tokenizer='pretrained'")
    for name in splits:
      out[name] = mix_retrieval(out[name], fraction, data_config.seq_len,
                                seed=("train", "validation").index(name))
  return out


def bytes_per_token(data_config, split: str, tokens: np.ndarray) -> float:
  """UTF-8 bytes per token of a split (1.0 for byte tokens): converts nats per token to
  bits per byte for any tokenizer (each document's EOS counts as one byte)."""
  root, files = _source_files(data_config)
  train, val = split_files(files, data_config.val_fraction)
  return text_bytes(root, train if split == "train" else val) / max(len(tokens), 1)


def _source_files(data_config) -> tuple[str, list[str]]:
  source = data_config.source
  if source == "stdlib":
    return stdlib_files()
  if source == "text_files":
    return text_files(data_config.glob)
  raise ValueError(f"config.data.source={source!r}; use 'stdlib' or 'text_files'")


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

"""Calibration data for MoA profiling: the dense model's own greedy responses.

Per length level N: long prompts (retrieval records and corpus text, middle
truncated to N + 1 - response_len tokens), each answered greedily by the dense
model for ``response_len`` tokens. A sample is the prompt + response (N + 1
tokens) with a loss mask on the response only: the paper's best calibration
(dense-model summaries, response-only loss).

Legend: s samples, t tokens.
"""

from __future__ import annotations

import os

import numpy as np

from sparsity_jax.data import retrieval
from sparsity_jax.data.tokenizer import ByteTokenizer
from sparsity_jax.models import generation


def middle_truncate(tokens: np.ndarray, length: int) -> np.ndarray:
  """Keeps the first and last halves of ``tokens`` when it is longer than ``length``."""
  if len(tokens) <= length:
    return tokens
  head = length // 2
  return np.concatenate([tokens[:head], tokens[len(tokens) - (length - head):]])


def default_prompts(length: int, num_samples: int, *, seed: int = 0,
                    corpus_tokens: np.ndarray | None = None,
                    tokenizer=None) -> list[np.ndarray]:
  """Prompts of exactly ``length`` tokens: retrieval records, and corpus text if given.

  ``tokenizer`` (anything with ``encode(text) -> ids``; default the byte tokenizer) must be
  the model's: an imported Hugging Face model passes its HFTokenizer, and ``corpus_tokens``
  in the same vocabulary.
  """
  tok = ByteTokenizer() if tokenizer is None else tokenizer
  rng = np.random.default_rng([seed, length])
  prompts = []
  for i in range(num_samples):
    if corpus_tokens is not None and i % 2 == 1 and len(corpus_tokens) > length:
      start = int(rng.integers(0, len(corpus_tokens) - length))
      prompts.append(np.asarray(corpus_tokens[start:start + length], np.int32))
      continue
    n = retrieval.lines_at_least(length + 64)  # A little longer: middle-truncated to fit.
    encoded = tok.encode(retrieval.make_sample(rng, n).prompt)
    while len(encoded) < length:  # Tokenizers with long tokens: add lines until it fits.
      if n == retrieval.NUM_KEYS ** retrieval.MAX_KEY_WIDTH:
        raise ValueError(f"the longest retrieval prompt is {len(encoded)} < {length} tokens "
                         "with this tokenizer: profile shorter lengths")
      n = min(2 * n, retrieval.NUM_KEYS ** retrieval.MAX_KEY_WIDTH)
      encoded = tok.encode(retrieval.make_sample(rng, n).prompt)
    prompts.append(middle_truncate(np.asarray(encoded, np.int32), length))
  for p in prompts:
    if len(p) < length:
      raise ValueError(f"a calibration prompt has {len(p)} < {length} tokens")
  return prompts


def calibration_set(model, prompts: list[np.ndarray], *, length: int, response_len: int = 32,
                    batch_size: int = 4) -> tuple[np.ndarray, np.ndarray]:
  """(tokens [s, length + 1], response mask [s, length + 1]) from the dense model's greedy
  continuations of ``prompts`` (each middle-truncated to length + 1 - response_len)."""
  if not prompts:
    raise ValueError(f"empty calibration set for length {length}: give at least one prompt")
  if response_len < 1 or response_len >= length:
    raise ValueError(f"response_len={response_len} must be in [1, length={length})")
  context = length + 1 - response_len
  if length + 1 > model.cfg.max_len + 1:
    raise ValueError(f"calibration length {length} exceeds the model's max_len="
                     f"{model.cfg.max_len}")
  tokens = []
  for start in range(0, len(prompts), batch_size):
    batch = np.stack([middle_truncate(np.asarray(p, np.int32), context)
                      for p in prompts[start:start + batch_size]])
    if batch.shape[1] != context:
      raise ValueError(f"calibration prompts must have at least {context} tokens")
    tokens.append(generation.generate(model, batch, response_len, max_len=length + 1))
  tokens = np.concatenate(tokens)
  mask = np.zeros_like(tokens)
  mask[:, context:] = 1
  return tokens.astype(np.int32), mask.astype(np.int32)


def save(path: str, tokens: np.ndarray, mask: np.ndarray) -> None:
  tmp = path + ".tmp.npz"
  np.savez(tmp, tokens=tokens, mask=mask)
  os.replace(tmp, path)


def load(path: str) -> list[tuple[np.ndarray, np.ndarray]]:
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: run `launch/moa.py calibrate` first")
  with np.load(path) as z:
    samples = list(zip(z["tokens"], z["mask"]))
  if not samples:
    raise ValueError(f"{path} holds an empty calibration set: re-run calibrate with "
                     "--num_samples >= 1")
  return samples

"""Packed fixed-length sequences and a deterministic, resumable batch iterator.

A token stream is cut into chunks of ``seq_len + 1`` tokens at stride ``seq_len`` (inputs
are the first ``seq_len`` tokens, targets the last). Global example ``g`` of the training
stream is chunk ``perm_e[g mod N]`` where ``e = g // N`` is the epoch and ``perm_e`` a
permutation seeded by ``(seed, e)``. Batch ``s`` holds examples ``s*B .. s*B + B - 1``, so a
batch depends only on ``(seed, step)``: the iterator's whole state is the next step.
In a multi-process run each process materialises only the rows its devices hold.
"""

from __future__ import annotations

import functools

import jax
import numpy as np


class PackedSequences:
  """Fixed-length training examples over one token stream."""

  def __init__(self, tokens: np.ndarray, seq_len: int, *, name: str = "train"):
    if seq_len <= 0:
      raise ValueError(f"config.data.seq_len must be positive, got {seq_len}")
    self.tokens = tokens
    self.seq_len = seq_len
    self.num_examples = (len(tokens) - 1) // seq_len
    if self.num_examples < 1:
      raise ValueError(f"the {name} split has {len(tokens)} tokens, fewer than one sequence of "
                       f"seq_len + 1 = {seq_len + 1}; add text or lower config.data.seq_len")

  def example(self, index: int) -> np.ndarray:
    start = index * self.seq_len
    return self.tokens[start:start + self.seq_len + 1].astype(np.int32)

  @functools.lru_cache(maxsize=2)
  def permutation(self, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(self.num_examples)


def local_rows(sharding: jax.sharding.Sharding, global_batch: int) -> range:
  """The contiguous global batch rows held by this process's devices."""
  index_map = sharding.addressable_devices_indices_map((global_batch, 1))
  starts = [idx[0].start or 0 for idx in index_map.values()]
  stops = [global_batch if idx[0].stop is None else idx[0].stop for idx in index_map.values()]
  lo, hi = min(starts), max(stops)
  return range(lo, hi)


class TrainIterator:
  """Deterministic shuffled batches: ``batch(step)`` depends only on (seed, step)."""

  def __init__(self, data: PackedSequences, global_batch: int, seed: int, rows: range | None = None):
    self.data = data
    self.global_batch = global_batch
    self.seed = seed
    self.rows = range(global_batch) if rows is None else rows
    self.step = 0

  def batch(self, step: int) -> dict[str, np.ndarray]:
    n = self.data.num_examples
    examples = []
    for row in self.rows:
      g = step * self.global_batch + row
      examples.append(self.data.example(int(self.data.permutation(self.seed, g // n)[g % n])))
    seqs = np.stack(examples)
    return {"inputs": seqs[:, :-1], "targets": seqs[:, 1:]}

  def __next__(self) -> dict[str, np.ndarray]:
    out = self.batch(self.step)
    self.step += 1
    return out

  def __iter__(self):
    return self

  def get_state(self) -> dict[str, int]:
    return {"step": int(self.step), "seed": int(self.seed)}

  def set_state(self, state: dict[str, int]) -> None:
    if int(state["seed"]) != self.seed:
      raise ValueError(f"checkpointed data seed {state['seed']} differs from config.seed "
                       f"{self.seed}; use the original config to resume this workdir")
    self.step = int(state["step"])


def eval_batches(data: PackedSequences, global_batch: int, num_batches: int,
                 rows: range | None = None):
  """The first ``num_batches`` validation batches, in order (no shuffling)."""
  available = data.num_examples // global_batch
  if available < 1:
    raise ValueError(f"the validation split has {data.num_examples} sequences, fewer than one "
                     f"batch of {global_batch}; lower config.eval.batch_size or seq_len")
  rows = range(global_batch) if rows is None else rows
  for b in range(min(num_batches, available) if num_batches > 0 else available):
    seqs = np.stack([data.example(b * global_batch + r) for r in rows])
    yield {"inputs": seqs[:, :-1], "targets": seqs[:, 1:]}

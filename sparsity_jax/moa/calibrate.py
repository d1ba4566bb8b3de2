"""Calibration data for MoA profiling: the dense model's own greedy responses.

The paper's protocol (MoA section 4 and its calibration ablation; official
``generate_calibration_dataset.py``): long inputs with long-range dependencies, answered
greedily by the *dense* model for up to ``response_len`` = 128 tokens, the response as the
only loss target, the model's chat template around the input for instruct models.

Per length level N a sample is a prompt of exactly N + 1 - response_len tokens
(``evals.long_context`` builds it to that length, so the evidence a question needs is
always inside it), followed by the response; a response that stops at EOS is right-padded
to N + 1 tokens and the padding is masked out of the loss, as the official profiler
right-pads to N + 1. Tasks (``evals.long_context.TASKS``) are mixed round-robin:
passkey and key-value retrieval (long-range lookups with a checkable answer) and
corpus documents (summaries, or continuations without a chat template: the analogue of
the paper's MultiNews summaries). For tasks with an answer the set records whether the
dense model answered correctly: a calibration set the model fails carries no retrieval
signal (``check``).

Legend: s samples, t tokens.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np

from sparsity_jax.data.tokenizer import ByteTokenizer
from sparsity_jax.evals import long_context as lc
from sparsity_jax.models import generation

DEFAULT_TASKS = ("passkey", "kv_retrieval", "document")
MIN_CORRECT = 0.5  # Below this fraction of correct answers, ``check`` warns.


def default_prompts(length: int, num_samples: int, *, response_len: int,
                    tasks: Sequence[str] = DEFAULT_TASKS, seed: int = 0, tokenizer=None,
                    chat: bool = False, documents: Sequence[np.ndarray] | None = None,
                    spread_depths: bool = False) -> list[lc.Prompt]:
  """``num_samples`` prompts of exactly ``length + 1 - response_len`` tokens, tasks mixed
  round-robin, each with its evidence inside (kv_retrieval: 4 needles, one asked).

  ``tokenizer`` (default bytes) must be the model's; ``documents`` (token arrays in its
  vocabulary) feed the 'document' task. The evidence sits at a uniformly random depth, or
  with ``spread_depths`` the j-th of a task's m samples at a random depth in [j/m, (j+1)/m)
  (stratified: a few samples still cover near and far evidence).
  """
  tok = ByteTokenizer() if tokenizer is None else tokenizer
  context = length + 1 - response_len
  if not tasks:
    raise ValueError("no calibration tasks given")
  unknown = [t for t in tasks if t not in lc.TASKS]
  if unknown:
    raise ValueError(f"unknown calibration tasks {unknown}; tasks: {', '.join(lc.TASKS)}")
  rng = np.random.default_rng([seed, length])
  order = [tasks[i % len(tasks)] for i in range(num_samples)]

  def stratum(i, task):  # Sample i's depth (its task's j-th of m), or None: random.
    if not spread_depths:
      return None
    return (order[:i].count(task) + float(rng.random())) / order.count(task)

  prompts = []
  for i in range(num_samples):
    task = tasks[i % len(tasks)]
    if task == "passkey":
      p = lc.passkey(tok, context, rng, depth=stratum(i, task), chat=chat, context_id=i)
    elif task == "kv_retrieval":
      depth = stratum(i, task)
      if depth is None:
        p = lc.kv_retrieval(tok, context, rng, num_needles=4, chat=chat, context_id=i)[
            int(rng.integers(4))]
      else:  # The asked needle at its stratum, the 3 distractors anywhere.
        depths = [depth] + list(rng.random(3))
        p = lc.kv_retrieval(tok, context, rng, depths=depths, chat=chat, context_id=i)[0]
    elif task == "lines":
      p = lc.lines(tok, context, rng, depth=stratum(i, task), chat=chat, context_id=i)
    else:
      if not documents:
        raise ValueError("the 'document' calibration task needs corpus documents")
      p = lc.document(tok, context, documents, rng, chat=chat, context_id=i)
    prompts.append(p)
  return prompts


def calibration_set(model, prompts: Sequence[lc.Prompt | np.ndarray], *, length: int,
                    response_len: int = 128, eos_id: int | None = None,
                    batch_size: int = 4) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(tokens [s, length + 1], response mask [s, length + 1], responses [s, response_len])
  from ``model``'s greedy continuations of ``prompts`` (each exactly length + 1 -
  response_len tokens; pass the dense model). A response stops at ``eos_id`` (kept in the
  loss); the positions after it hold ``eos_id`` and are masked out."""
  if not prompts:
    raise ValueError(f"empty calibration set for length {length}: give at least one prompt")
  if response_len < 1 or response_len >= length:
    raise ValueError(f"response_len={response_len} must be in [1, length={length})")
  if length > model.cfg.max_len:
    raise ValueError(f"calibration length {length} exceeds the model's max_len="
                     f"{model.cfg.max_len}")
  context = length + 1 - response_len
  rows = [np.asarray(p.tokens if isinstance(p, lc.Prompt) else p, np.int32) for p in prompts]
  for r in rows:
    if len(r) != context:
      raise ValueError(f"calibration prompts for length {length} must have exactly {context} "
                       f"tokens (length + 1 - response_len), got {len(r)}: build them to "
                       "length (calibrate.default_prompts), never truncate them")
  tokens, mask = [], []
  fill = 0 if eos_id is None else eos_id
  for start in range(0, len(rows), batch_size):
    batch = np.stack(rows[start:start + batch_size])
    out = generation.generate(model, batch, response_len, max_len=length + 1, eos_id=eos_id)
    response = np.full((len(batch), response_len), fill, np.int32)
    response[:, :out.shape[1] - context] = out[:, context:]
    keep = np.ones_like(response)
    if eos_id is not None:
      ended = np.cumsum(response == eos_id, axis=1)
      keep = (ended == 0) | ((ended == 1) & (response == eos_id))  # Up to the first EOS.
    tokens.append(np.concatenate([batch, response], axis=1))
    mask.append(np.concatenate([np.zeros_like(batch), keep.astype(np.int32)], axis=1))
  tokens, mask = np.concatenate(tokens), np.concatenate(mask)
  return tokens.astype(np.int32), mask.astype(np.int32), tokens[:, context:]


def grade(prompts: Sequence[lc.Prompt], responses: np.ndarray, tokenizer=None) -> list[dict]:
  """Per sample: task, answer, response text and (for answered tasks) correctness."""
  tok = ByteTokenizer() if tokenizer is None else tokenizer
  out = []
  for p, r in zip(prompts, responses, strict=True):
    text = lc.decode(tok, r)
    row = {"task": p.task, "depth": float(p.depth), "response": text}
    if p.task in lc.ANSWERED:
      row.update(answer=p.answer, correct=lc.first_integer(text) == p.answer)
    out.append(row)
  return out


def check(graded: Sequence[dict], length: int) -> str | None:
  """A warning when the dense model fails most answered calibration prompts, else None."""
  answered = [g for g in graded if "correct" in g]
  if not answered:
    return None
  right = sum(g["correct"] for g in answered)
  if right < MIN_CORRECT * len(answered):
    return (f"the dense model answers only {right}/{len(answered)} calibration prompts with an "
            f"answer correctly at length {length}: a calibration set the model fails carries "
            "no retrieval signal (try other --tasks, --chat=false, or a shorter length)")
  return None


def save(path: str, tokens: np.ndarray, mask: np.ndarray, graded: Sequence[dict] = ()) -> None:
  """Writes ``path`` (and its graded .json first), each whole or not at all: an existing
  .npz is a finished length (``complete``), even after a Ctrl-C in the middle of a save."""
  if graded:
    tmp = path[:-len(".npz")] + ".json.partial"
    with open(tmp, "w") as f:
      json.dump(list(graded), f, indent=1)
    os.replace(tmp, path[:-len(".npz")] + ".json")
  tmp = path + ".partial"  # Not *.npz: globs for calib_*.npz never see a half-written file.
  with open(tmp, "wb") as f:
    np.savez(f, tokens=tokens, mask=mask)
  os.replace(tmp, path)


def complete(path: str, num_samples: int, length: int) -> bool:
  """Whether ``path`` holds a finished calibration set of ``num_samples`` samples of
  ``length`` (and its graded .json): a rerun keeps such a length instead of redoing it."""
  if not (os.path.exists(path) and os.path.exists(path[:-len(".npz")] + ".json")):
    return False
  try:
    with np.load(path) as z:
      return z["tokens"].shape == z["mask"].shape == (num_samples, length + 1)
  except (OSError, ValueError, KeyError):  # Unreadable: computed again.
    return False


def first_tokens(mask: np.ndarray, k: int) -> np.ndarray:
  """The loss mask restricted to the first ``k`` response tokens of each row (0: all)."""
  if k <= 0:
    return mask
  return (mask * (np.cumsum(mask, axis=-1) <= k)).astype(mask.dtype)


def load(path: str, loss_tokens: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
  """(tokens, mask) samples; ``loss_tokens`` > 0 keeps only the first k response tokens
  in the loss (e.g. the answer of a retrieval prompt, not the repetitions after it)."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: run `launch/moa.py calibrate` first")
  with np.load(path) as z:
    samples = list(zip(z["tokens"], first_tokens(z["mask"], loss_tokens)))
  if not samples:
    raise ValueError(f"{path} holds an empty calibration set: re-run calibrate with "
                     "--num_samples >= 1")
  return samples

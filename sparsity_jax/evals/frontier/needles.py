"""Two retrieval tasks that are not in the paper, for models too small for its suite.

SmolLM2-135M-Instruct scores 0 on every Sparse Frontier task at 1k-2k tokens (it copies the
answer-format placeholders; docs/results/frontier.md), so a grid of those tasks alone cannot
tell a sparse method from dense on it. These two are the project's passkey and multi-key
retrieval prompts (``evals/long_context.py``: exact token length, the needle at a random
depth, the prompt ending with the answer's lead-in, e.g. "The pass key is"), which that
model answers, registered as frontier tasks:

  passkey       a 5-digit key in repeated filler; exact match of the first integer.
  kv_retrieval  ``num_needles`` (4) "special magic number for <word>" needles, one asked;
                exact match of the first integer.

Chat templates as for the other tasks (``chat``); ``explain`` has no effect on the prompt
(the answer follows the lead-in) but sets the official 1024-token output budget.
"""

from __future__ import annotations

import hashlib

import numpy as np

from sparsity_jax.evals import long_context
from sparsity_jax.evals.frontier.base import Draft, TaskSpec, register


def _rng(key: str) -> np.random.Generator:
  return np.random.default_rng(int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little"))


def _draft(prompt: long_context.Prompt, gold: str) -> Draft:
  tokens = prompt.tokens
  start, end = prompt.evidence
  return Draft(pre=tokens[:0], pieces=[tokens[:prompt.context_len]],
               post=tokens[prompt.context_len:], gold=gold,
               meta={"evidence": [prompt.evidence_text], "depths": [float(prompt.depth)],
                     "evidence_span": (int(start), int(end))})


def _build_passkey(writer, length, key, options):
  del options
  prompt = long_context.passkey(writer.tokenizer, length, _rng(key), chat=writer.chat)
  return _draft(prompt, prompt.answer)


def _build_kv(writer, length, key, options):
  rng = _rng(key)
  prompts = long_context.kv_retrieval(writer.tokenizer, length, rng,
                                      num_needles=options["num_needles"], chat=writer.chat)
  prompt = prompts[int(rng.integers(len(prompts)))]
  return _draft(prompt, prompt.answer)


def _answer(sample) -> str:
  return sample.gold


def _score(sample, section, output) -> float:
  del section  # The answer follows the prompt's lead-in, not an <answer> tag.
  return float(long_context.first_integer(output) == sample.gold)


register(TaskSpec("passkey", {}, _build_passkey, _answer, _score,
                  "ours: evals/long_context.py passkey (Mohtashami & Jaggi 2023)"))
register(TaskSpec("kv_retrieval", {"num_needles": 4}, _build_kv, _answer, _score,
                  "ours: evals/long_context.py kv_retrieval (RULER multi-key NIAH)"))

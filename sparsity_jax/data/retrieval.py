"""LongEval-style key-value line retrieval (the MoA paper's retrieval task).

A sample is a list of lines ``line <key>: REGISTER_CONTENT is <n>`` followed by a
question about one line; the answer is that line's number. Keys and numbers have
fixed widths, so every prompt with the same number of lines has the same length
(prompts batch without padding). Scoring: the last integer of the model's output
must equal the number (exact match), reported by length and by the key's position
(decile of the line index).
"""

from __future__ import annotations

import dataclasses
import re
from collections import defaultdict

import numpy as np

HEADER = "Remember the lines.\n"
LINE = "line {key}: REGISTER_CONTENT is <{value}>\n"
QUESTION = "What is the <REGISTER_CONTENT> in line {key}? Answer: <"
KEY_DIGITS, VALUE_DIGITS = 4, 5


@dataclasses.dataclass(frozen=True)
class Sample:
  prompt: str
  answer: str  # The number, as text.
  num_lines: int
  key_index: int  # Which line is asked about.

  @property
  def text(self) -> str:
    """Prompt + answer + closing bracket: a training document."""
    return f"{self.prompt}{self.answer}>\n"

  @property
  def position_decile(self) -> int:
    return min(9, 10 * self.key_index // self.num_lines)


def make_sample(rng: np.random.Generator, num_lines: int, key_index: int | None = None) -> Sample:
  if num_lines < 1 or num_lines > 10 ** KEY_DIGITS:
    raise ValueError(f"num_lines must be in [1, {10 ** KEY_DIGITS}], got {num_lines}")
  keys = rng.choice(10 ** KEY_DIGITS, num_lines, replace=False)
  values = rng.integers(10 ** (VALUE_DIGITS - 1), 10 ** VALUE_DIGITS, num_lines)
  key_index = int(rng.integers(num_lines)) if key_index is None else key_index
  lines = "".join(LINE.format(key=f"{k:0{KEY_DIGITS}d}", value=v) for k, v in zip(keys, values))
  prompt = HEADER + lines + QUESTION.format(key=f"{keys[key_index]:0{KEY_DIGITS}d}")
  return Sample(prompt, str(values[key_index]), num_lines, key_index)


def prompt_bytes(num_lines: int) -> int:
  return len(make_sample(np.random.default_rng(0), num_lines).prompt.encode())


def lines_for_length(length: int, reserve: int = 8) -> int:
  """The most lines whose prompt fits in ``length - reserve`` bytes."""
  per_line = len(LINE.format(key="0" * KEY_DIGITS, value="0" * VALUE_DIGITS))
  fixed = prompt_bytes(1) - per_line
  lines = (length - reserve - fixed) // per_line
  if lines < 1:
    raise ValueError(f"length {length} is too short for one retrieval line ({fixed + per_line} "
                     "bytes)")
  return int(lines)


def lines_at_least(length: int) -> int:
  """The fewest lines whose prompt has at least ``length`` bytes."""
  per_line = len(LINE.format(key="0" * KEY_DIGITS, value="0" * VALUE_DIGITS))
  fixed = prompt_bytes(1) - per_line
  return max(1, -(-(length - fixed) // per_line))


def dataset(seed: int, length: int, num_samples: int) -> list[Sample]:
  """Samples whose prompts fit ``length`` bytes, key positions spread over the deciles."""
  rng = np.random.default_rng(seed)
  n = lines_for_length(length)
  samples = []
  for i in range(num_samples):
    decile = i % 10  # Keys in [decile * n / 10, (decile + 1) * n / 10); empty if n < 10.
    lo, hi = -(-decile * n // 10), -(-(decile + 1) * n // 10)
    lo = min(lo, n - 1)  # With fewer than 10 lines some deciles are empty: use the nearest.
    key_index = int(rng.integers(lo, max(min(hi, n), lo + 1)))
    samples.append(make_sample(rng, n, key_index=key_index))
  return samples


def parse_answer(output: str) -> str | None:
  numbers = re.findall(r"\d+", output)
  return numbers[-1] if numbers else None


def score(samples, outputs) -> dict:
  """Accuracy overall, by prompt length (lines) and by key-position decile."""
  return score_correct(samples, [parse_answer(out) == s.answer
                                 for s, out in zip(samples, outputs, strict=True)])


def score_correct(samples, correct) -> dict:
  """``score`` from per-sample booleans."""
  by_len, by_pos = defaultdict(list), defaultdict(list)
  for s, ok in zip(samples, correct, strict=True):
    by_len[s.num_lines].append(bool(ok))
    by_pos[s.position_decile].append(bool(ok))
  mean = lambda xs: float(np.mean(xs)) if xs else float("nan")
  return {"accuracy": mean([x for v in by_len.values() for x in v]),
          "by_lines": {k: mean(v) for k, v in sorted(by_len.items())},
          "by_decile": {k: mean(v) for k, v in sorted(by_pos.items())}}


def evaluate(model, samples, *, max_new_tokens: int = 8, batch_size: int = 8) -> dict:
  """Greedy generation with the model's KV caches; exact match of the last integer."""
  from sparsity_jax.data.tokenizer import ByteTokenizer
  from sparsity_jax.models import generation
  tok = ByteTokenizer()
  outputs = []
  for start in range(0, len(samples), batch_size):
    chunk = samples[start:start + batch_size]
    prompts = np.stack([tok.encode(s.prompt) for s in chunk])  # Equal lengths by design.
    out = generation.generate(model, prompts, max_new_tokens,
                              max_len=prompts.shape[1] + max_new_tokens)
    for row in out[:, prompts.shape[1]:]:
      text = tok.decode([int(x) for x in row if x < 256])
      outputs.append(text.split(">")[0])
  return score(samples, outputs)


ANSWER = "{value}>\n"


def training_document(rng: np.random.Generator, num_lines: int, num_questions: int) -> str:
  """Lines, then ``num_questions`` answered questions about random lines.

  The first question and answer are exactly an evaluation ``Sample.text``; the extra
  questions multiply the retrieval signal per document (the lines themselves are random
  and carry no learnable signal).
  """
  sample = make_sample(rng, num_lines)
  keys = re.findall(r"^line (\d+):", sample.prompt, flags=re.M)
  values = re.findall(r"is <(\d+)>", sample.prompt)
  text = sample.text
  for i in rng.integers(num_lines, size=num_questions - 1):
    text += QUESTION.format(key=keys[i]) + ANSWER.format(value=values[i])
  return text


def document_bytes(num_lines: int, num_questions: int) -> int:
  per_question = len(QUESTION.format(key="0" * KEY_DIGITS) + ANSWER.format(value="0" * VALUE_DIGITS))
  return prompt_bytes(num_lines) + len(ANSWER.format(value="0" * VALUE_DIGITS)) + (
      num_questions - 1) * per_question


def token_blocks(seed: int, num_blocks: int, block_len: int, *,
                 max_questions: int = 4) -> np.ndarray:
  """[num_blocks * block_len] byte tokens of training documents, packed block by block.

  Each block holds whole documents only (no document crosses a block boundary, so a
  training window of ``block_len`` tokens always sees the lines its questions ask about).
  Half the blocks are one document as long as fits (the long-range retrieval cases);
  the others pack documents of random sizes. Leftover bytes are newlines.
  """
  if block_len < document_bytes(1, 1):
    raise ValueError(f"retrieval documents need blocks of at least {document_bytes(1, 1)} "
                     f"tokens, got {block_len}: raise config.data.seq_len or set "
                     "config.data.retrieval_fraction=0")
  rng = np.random.default_rng([seed, block_len])
  per_line = len(LINE.format(key="0" * KEY_DIGITS, value="0" * VALUE_DIGITS))
  blocks = np.full((num_blocks, block_len), ord("\n"), np.uint16)
  for b in range(num_blocks):
    pos, single = 0, rng.random() < 0.5
    while True:
      questions = int(rng.integers(1, max_questions + 1))
      while questions > 1 and document_bytes(1, questions) > block_len - pos:
        questions -= 1  # Short blocks: fewer questions rather than no document.
      room = block_len - pos - document_bytes(1, questions)
      if room < 0:
        break
      most = 1 + room // per_line
      lines = most if single else int(rng.integers(1, most + 1))
      doc = np.frombuffer(training_document(rng, lines, questions).encode(), np.uint8)
      blocks[b, pos:pos + len(doc)] = doc
      pos += len(doc)
      if single:
        break
  return blocks.reshape(-1)


def forced_match(model, prompt_bt, target_ba) -> np.ndarray:
  """bool [b]: is every target token the argmax given the prompt and the targets before it?

  Exactly when greedy decoding would emit ``target`` after ``prompt`` (up to float ties),
  computed in one forward pass of length prompt + target - 1 through the model's
  full-sequence path (no KV cache). For MoA that path uses the spans at that length N,
  while cached generation uses those at its cache length: equal rules, N differs slightly.
  """
  import jax.numpy as jnp
  prompt_bt, target_ba = np.asarray(prompt_bt), np.asarray(target_ba)
  seqs = np.concatenate([prompt_bt, target_ba], axis=1)
  predicted = np.asarray(_argmax_forward(model, jnp.asarray(seqs[:, :-1], jnp.int32)))
  p = prompt_bt.shape[1]
  return (predicted[:, p - 1:] == target_ba).all(axis=1)


def _argmax_forward(model, tokens_bt):
  import jax.numpy as jnp
  from flax import nnx
  global _ARGMAX
  if _ARGMAX is None:
    _ARGMAX = nnx.jit(lambda m, x: jnp.argmax(m(x), axis=-1))
  return _ARGMAX(model, tokens_bt)


_ARGMAX = None


def evaluate_forced(model, samples, *, batch_size: int = 8) -> dict:
  """Exact match of ``answer + '>'`` by ``forced_match``: one forward pass per batch.

  The verdict of greedy decoding with a stop at '>' (stricter than ``evaluate``'s
  last-integer parse). For MoA the spans are those at N = prompt + answer tokens.
  """
  from sparsity_jax.data.tokenizer import ByteTokenizer
  tok = ByteTokenizer()
  correct = []
  for start in range(0, len(samples), batch_size):
    chunk = samples[start:start + batch_size]
    prompts = np.stack([tok.encode(s.prompt) for s in chunk])  # Equal lengths by design.
    targets = np.stack([tok.encode(s.answer + ">") for s in chunk])
    correct.extend(forced_match(model, prompts, targets).tolist())
  return score_correct(samples, correct)


def write_corpus(directory: str, seed: int, lengths, num_files: int) -> list[str]:
  """Writes retrieval documents (for mixing into LM training through data.source='text_files')."""
  import os
  os.makedirs(directory, exist_ok=True)
  rng = np.random.default_rng(seed)
  paths = []
  for i in range(num_files):
    n = lines_for_length(int(lengths[i % len(lengths)]))
    path = os.path.join(directory, f"retrieval_{i:05d}.txt")
    with open(path, "w") as f:
      f.write(make_sample(rng, int(rng.integers(1, n + 1))).text)
    paths.append(path)
  return paths

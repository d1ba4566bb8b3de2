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
# Keys are as short as the number of lines allows: one character up to 62 lines, then
# two (3844), three. Byte-level models this small did not learn to match 4-digit keys
# within a CPU budget (chance after 500 steps), while one-byte keys make the task the
# associative recall that MoA must keep in range. Longer prompts (real models) get longer
# keys automatically.
KEY_ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
NUM_KEYS = len(KEY_ALPHABET)  # One-character keys.
MAX_KEY_WIDTH = 3
VALUE_DIGITS = 5
_KEY0 = KEY_ALPHABET[0]


def key_width(num_lines: int) -> int:
  """Characters per key for a prompt of ``num_lines`` distinct keys."""
  width = 1
  while NUM_KEYS ** width < num_lines:
    width += 1
  return width


def key_text(index: int, width: int) -> str:
  chars = []
  for _ in range(width):
    index, digit = divmod(index, NUM_KEYS)
    chars.append(KEY_ALPHABET[digit])
  return "".join(reversed(chars))


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
  if num_lines < 1 or num_lines > NUM_KEYS ** MAX_KEY_WIDTH:
    raise ValueError(f"num_lines must be in [1, {NUM_KEYS ** MAX_KEY_WIDTH}], got {num_lines}")
  width = key_width(num_lines)
  keys = [key_text(int(i), width) for i in rng.choice(NUM_KEYS ** width, num_lines,
                                                      replace=False)]
  values = rng.integers(10 ** (VALUE_DIGITS - 1), 10 ** VALUE_DIGITS, num_lines)
  key_index = int(rng.integers(num_lines)) if key_index is None else key_index
  lines = "".join(LINE.format(key=k, value=v) for k, v in zip(keys, values))
  prompt = HEADER + lines + QUESTION.format(key=keys[key_index])
  return Sample(prompt, str(values[key_index]), num_lines, key_index)


def prompt_bytes(num_lines: int) -> int:
  return len(make_sample(np.random.default_rng(0), num_lines).prompt.encode())


def _line_bytes(width: int) -> int:
  return len(LINE.format(key=_KEY0 * width, value="0" * VALUE_DIGITS))


def lines_for_length(length: int, reserve: int = 8) -> int:
  """The most lines whose prompt fits in ``length - reserve`` bytes."""
  best = 0
  for width in range(1, MAX_KEY_WIDTH + 1):
    per_line = _line_bytes(width)
    fixed = len(HEADER + QUESTION.format(key=_KEY0 * width))
    lines = min((length - reserve - fixed) // per_line, NUM_KEYS ** width)
    lowest = NUM_KEYS ** (width - 1) + 1 if width > 1 else 1  # Fewer use narrower keys.
    if lines >= lowest:
      best = max(best, lines)
  if best < 1:
    raise ValueError(f"length {length} is too short for one retrieval line "
                     f"({prompt_bytes(1)} bytes)")
  return int(best)


def lines_at_least(length: int) -> int:
  """The fewest lines whose prompt has at least ``length`` bytes."""
  for width in range(1, MAX_KEY_WIDTH + 1):
    fixed = len(HEADER + QUESTION.format(key=_KEY0 * width))
    lines = max(1, -(-(length - fixed) // _line_bytes(width)))
    if lines <= NUM_KEYS ** width:
      return max(lines, NUM_KEYS ** (width - 1) + 1 if width > 1 else 1)  # Key width fits.
  raise ValueError(f"no retrieval prompt reaches {length} bytes (at most "
                   f"{NUM_KEYS ** MAX_KEY_WIDTH} lines)")


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
  keys = re.findall(r"^line (\w+):", sample.prompt, flags=re.M)
  values = re.findall(r"is <(\d+)>", sample.prompt)
  text = sample.text
  for i in rng.integers(num_lines, size=num_questions - 1):
    text += QUESTION.format(key=keys[i]) + ANSWER.format(value=values[i])
  return text


def interleaved_document(rng: np.random.Generator, max_bytes: int) -> str:
  """Lines with answered questions about earlier lines between them, up to ``max_bytes``.

  About one question per line, each about a uniformly random earlier line: the densest
  retrieval signal, at every distance the document spans (a training-only format; the
  evaluation asks one question after all the lines).
  """
  keys = rng.permutation(NUM_KEYS)
  text, lines = HEADER, []
  while True:
    if lines and rng.random() < 0.5:
      key, value = lines[int(rng.integers(len(lines)))]
      item = QUESTION.format(key=key) + ANSWER.format(value=value)
    else:
      if len(lines) == NUM_KEYS:
        return text
      key = KEY_ALPHABET[keys[len(lines)]]
      value = int(rng.integers(10 ** (VALUE_DIGITS - 1), 10 ** VALUE_DIGITS))
      item = LINE.format(key=key, value=value)
      if len(text) + len(item) <= max_bytes:
        lines.append((key, value))
    if len(text) + len(item) > max_bytes:
      return text
    text += item


def document_bytes(num_lines: int, num_questions: int) -> int:
  per_question = len(QUESTION.format(key=_KEY0) + ANSWER.format(value="0" * VALUE_DIGITS))
  return prompt_bytes(num_lines) + len(ANSWER.format(value="0" * VALUE_DIGITS)) + (
      num_questions - 1) * per_question


def token_blocks(seed: int, num_blocks: int, block_len: int, *, max_questions: int = 4,
                 interleaved: float = 0.5) -> np.ndarray:
  """[num_blocks * block_len] byte tokens of training documents, packed block by block.

  Each block holds whole documents only (no document crosses a block boundary, so a
  training window of ``block_len`` tokens always sees the lines its questions ask about).
  Of the blocks, ``interleaved`` are one ``interleaved_document`` (dense retrieval signal
  at every distance); the rest are split evenly between one evaluation-format document as
  long as fits (the long-range cases) and packed documents of random sizes. Leftover bytes
  are newlines.
  """
  if block_len < document_bytes(1, 1):
    raise ValueError(f"retrieval documents need blocks of at least {document_bytes(1, 1)} "
                     f"tokens, got {block_len}: raise config.data.seq_len or set "
                     "config.data.retrieval_fraction=0")
  rng = np.random.default_rng([seed, block_len])
  per_line = len(LINE.format(key=_KEY0, value="0" * VALUE_DIGITS))
  blocks = np.full((num_blocks, block_len), ord("\n"), np.uint16)
  for b in range(num_blocks):
    kind = rng.random()
    if kind < interleaved:
      doc = np.frombuffer(interleaved_document(rng, block_len).encode(), np.uint8)
      blocks[b, :len(doc)] = doc
      continue
    pos, single = 0, kind < interleaved + (1.0 - interleaved) / 2
    while True:
      questions = int(rng.integers(1, max_questions + 1))
      while questions > 1 and document_bytes(1, questions) > block_len - pos:
        questions -= 1  # Short blocks: fewer questions rather than no document.
      room = block_len - pos - document_bytes(1, questions)
      if room < 0:
        break
      most = min(1 + room // per_line, NUM_KEYS)  # One-character keys (fixed sizes).
      lines = most if single else int(rng.integers(1, most + 1))
      doc = np.frombuffer(training_document(rng, lines, questions).encode(), np.uint8)
      blocks[b, pos:pos + len(doc)] = doc
      pos += len(doc)
      if single:
        break
  return blocks.reshape(-1)


def forced_scores(model, prompt_bt, target_ba) -> tuple[np.ndarray, np.ndarray]:
  """(match bool [b], nll float [b]) of ``target`` after ``prompt``, teacher-forced.

  match: is every target token the argmax given the prompt and the targets before it?
  Exactly when greedy decoding would emit ``target`` (up to float ties), computed in one
  forward pass of length prompt + target - 1 through the model's full-sequence path (no
  KV cache). For MoA that path uses the spans at that length N, while cached generation
  uses those at its cache length: the same rules at a slightly different N.
  nll: mean negative log-likelihood (nats) of the target tokens, a graded score.
  """
  import jax.numpy as jnp
  prompt_bt, target_ba = np.asarray(prompt_bt), np.asarray(target_ba)
  seqs = np.concatenate([prompt_bt, target_ba], axis=1)
  p = prompt_bt.shape[1]
  predicted, nll = _scored_forward(model, jnp.asarray(seqs[:, :-1], jnp.int32),
                                   jnp.asarray(target_ba, jnp.int32), p - 1)
  return (np.asarray(predicted) == target_ba).all(axis=1), np.asarray(nll)


def forced_match(model, prompt_bt, target_ba) -> np.ndarray:
  """bool [b]: would greedy decoding emit ``target`` after ``prompt``? (``forced_scores``)"""
  return forced_scores(model, prompt_bt, target_ba)[0]


def _scored_forward(model, tokens_bt, target_ba, first):
  import functools
  import jax
  import jax.numpy as jnp
  from flax import nnx
  global _SCORED
  if _SCORED is None:
    @functools.partial(nnx.jit, static_argnums=3)
    def scored(m, x, target, first):
      logits = m(x)[:, first:]
      logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
      nll = -jnp.take_along_axis(logp, target[..., None], axis=-1)[..., 0]
      return jnp.argmax(logits, axis=-1), nll.mean(axis=1)
    _SCORED = scored
  return _SCORED(model, tokens_bt, target_ba, first)


_SCORED = None


def evaluate_forced(model, samples, *, batch_size: int = 8) -> dict:
  """Exact match of ``answer + '>'`` by ``forced_scores``: one forward pass per batch.

  The verdict of greedy decoding with a stop at '>' (stricter than ``evaluate``'s
  last-integer parse). For MoA the spans are those at N = prompt + answer tokens. Adds
  'answer_nll': the mean per-token NLL (nats) of the answers (log 10 = 2.30 for a digit
  guessed at chance).
  """
  from sparsity_jax.data.tokenizer import ByteTokenizer
  tok = ByteTokenizer()
  correct, nll = [], []
  for start in range(0, len(samples), batch_size):
    chunk = samples[start:start + batch_size]
    prompts = np.stack([tok.encode(s.prompt) for s in chunk])  # Equal lengths by design.
    targets = np.stack([tok.encode(s.answer + ">") for s in chunk])
    match, chunk_nll = forced_scores(model, prompts, targets)
    correct.extend(match.tolist())
    nll.extend(chunk_nll.tolist())
  return {**score_correct(samples, correct), "answer_nll": float(np.mean(nll))}


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

"""Shared machinery of the Sparse Frontier tasks: samples, prompt assembly, answer parsing.

Follows ``sparse_frontier/tasks/abstract_{prompt,task,sample}.py`` of the official code
(github.com/PiotrNawrot/sparse-frontier; Nawrot et al. 2025, "The Sparse Frontier",
arXiv 2504.17768); our own code.

Prompt layout (``abstract_prompt.py``): the task introduction; the question(s), stated
*before* the context (``<question>`` or ``<questions>``); the context inside
``<context>...</context>``; the question(s) again (``<question_repeated>``); then the
instructions and the answer format inside ``<answer>...</answer>``. The user message is
wrapped in the chat template (``chat``) and the assistant turn starts with
:attr:`Sample.answer_prefix`.

``explain`` (a deviation, default False here, official True): the official instructions
ask for an ``<explanation>`` section before the ``<answer>`` section (up to 1024 new
tokens). A 135M model decoding on CPU cannot afford that, so by default the prompt asks
for the answer section only and the assistant turn already starts with ``<answer>``: the
model writes the answer directly. ``explain=True`` gives the official instructions, no
answer prefix and ``max_new_tokens = 1024`` (the official ``max_output_tokens``).

Every prompt is assembled at the token level from separately tokenised pieces (frame,
instructions, context units), so its length is counted exactly; only filler units
(distractor needles, noise sentences, rare words, whole story chapters and neutral story
sentences) are added or left out to fit, never the evidence. A prompt has between
0.9 * length and length tokens (``abstract_task.check_sample_length``).

Legend: t prompt length in tokens.
"""

from __future__ import annotations

import dataclasses
import random
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from sparsity_jax.evals.long_context import PromptTooShortError, encode, frame, resolve_chat

MIN_FILL = 0.9  # The official check: a prompt has at least 90% of max_input_tokens.
OFFICIAL_MAX_OUTPUT = 1024  # configs/default.yaml: max_output_tokens.
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"

# abstract_prompt.py, the template the official code uses (explain=True).
_EXPLAIN_INSTRUCTIONS = """Instructions:
1. First, provide a brief explanation of your reasoning process. Explain how you identified 
   the relevant information from the context and how you determined your answer.
2. Then, provide your final answer following this exact format:
<answer>
{answer_format}
</answer>

Your response must follow this structure exactly:
<explanation>
Your explanation here...
</explanation>
<answer>
Your answer here...
</answer>

Important:
{extra_instructions}
- Keep your explanations clear, coherent, concise, and to the point.
- Do not include any additional text, explanations, or reasoning in the answer section. Follow the answer format exactly.
"""
# Ours (explain=False): the answer section only; the assistant turn starts with <answer>.
_ANSWER_INSTRUCTIONS = """Instructions:
Give only your final answer, with no explanation, following this exact format:
<answer>
{answer_format}
</answer>

Important:
{extra_instructions}
- Do not include any additional text, explanations, or reasoning in the answer section. Follow the answer format exactly.
"""
_QUESTION_INTRO = {
    False: "Below is your question. I will state it both before and after the context.",
    True: "Below are your questions. I will state them both before and after the context."}


@dataclasses.dataclass(frozen=True)
class Sample:
  """One prompt of a Sparse Frontier task.

  tokens: int32 [t], the full prompt (chat template and ``answer_prefix`` included), with
    0.9 * length <= t <= length.
  gold: the reference answer: a str (story_multihop) or a list of str, one per query or
    per set member (the other tasks).
  max_new_tokens: the tokens of :func:`reference_output` plus a small margin (1024, the
    official budget, with ``explain=True``).
  answer_prefix: the text the assistant turn already starts with ('<answer>' or '').
  meta: index, options, evidence (texts that hold the answer, all inside the prompt),
    depths (relative positions of the evidence in the context), context_span ([start, end)
    token span of the context), and task-specific fields.
  """

  task: str
  tokens: np.ndarray
  gold: Any
  max_new_tokens: int
  answer_prefix: str
  meta: dict


@dataclasses.dataclass(frozen=True)
class Draft:
  """What a task builder returns: the prompt in token pieces, before :func:`finish`.

  ``pieces`` are the context's token arrays; ``evidence_pieces`` the indices of those
  holding ``meta['evidence']`` (for depths).
  """

  pre: np.ndarray
  pieces: list
  post: np.ndarray
  gold: Any
  meta: dict
  evidence_pieces: Sequence[int] = ()


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  """A registered task: options with official defaults, builder, answer format, scorer.

  build(writer, length, key, options) -> Draft; answer(sample) -> the answer section's body;
  score(sample, section, output) -> float in [0, 1], where section is the text inside the
  answer tags (None when the output has no answer tag) and output the whole output.
  """

  name: str
  defaults: dict
  build: Callable
  answer: Callable
  score: Callable
  source: str


REGISTRY: dict[str, TaskSpec] = {}
COMMON_DEFAULTS = {"explain": False}


def register(spec: TaskSpec) -> TaskSpec:
  REGISTRY[spec.name] = spec
  return spec


class Writer:
  """Encodes text pieces for one tokenizer (cached) and frames prompts around a context.

  ``head`` / ``tail``: the chat template's tokens before / after the user message (or the
  tokenizer's own specials without ``chat``); the tail ends with the answer prefix.
  """

  def __init__(self, tokenizer, chat: bool, explain: bool):
    self.tokenizer = tokenizer
    self.chat = chat
    self.explain = explain
    self.answer_prefix = "" if explain else ANSWER_OPEN
    self._cache: dict[str, np.ndarray] = {}
    self.head, tail = frame(tokenizer, chat)
    self.tail = np.concatenate([tail, self.encode(self.answer_prefix)]).astype(np.int32)

  def encode(self, text: str) -> np.ndarray:
    """Token ids of ``text`` (cached; treat as read-only)."""
    ids = self._cache.get(text)
    if ids is None:
      ids = self._cache[text] = encode(self.tokenizer, text).astype(np.int32)
    return ids

  def size(self, text: str) -> int:
    return len(self.encode(text))

  def around(self, *, intro: str, question: str, multi: bool, answer_format: str,
             extra: str) -> tuple[np.ndarray, np.ndarray]:
    """(pre, post): every token before and after the context, frame included."""
    tag = "questions" if multi else "question"
    before = (f"{intro}\n\n{_QUESTION_INTRO[multi]}\n\n<{tag}>\n{question}\n</{tag}>\n\n"
              "<context>\n")
    template = _EXPLAIN_INSTRUCTIONS if self.explain else _ANSWER_INSTRUCTIONS
    after = (f"\n</context>\n\n<{tag}_repeated>\n{question}\n</{tag}_repeated>\n\n"
             + template.format(answer_format=answer_format, extra_instructions=extra))
    pre = np.concatenate([self.head, self.encode(before)]).astype(np.int32)
    post = np.concatenate([self.encode(after), self.tail]).astype(np.int32)
    return pre, post

  def join(self, texts: Sequence[str], sep: str) -> list[np.ndarray]:
    """Token pieces of sep.join(texts): the first text bare, each other one after sep
    (encoded with it, so a word keeps its leading-space token)."""
    return [self.encode(t if i == 0 else sep + t) for i, t in enumerate(texts)]


def too_short(task: str, length: int, needed: int, samples: int = 1) -> PromptTooShortError:
  of = f" (the most demanding of {samples} samples)" if samples > 1 else ""
  return PromptTooShortError(
      f"{task} prompts need at least {needed} tokens{of} with this tokenizer and these "
      f"options (template, questions and evidence); got length={length}", needed)


def finish(writer: Writer, task: str, length: int, index: int, options: dict,
           draft: Draft) -> Sample:
  """Concatenates a draft into a :class:`Sample`; raises if it is not 90-100% of length."""
  sizes = [len(p) for p in draft.pieces]
  start = len(draft.pre)
  offsets = start + np.cumsum([0] + sizes[:-1]) if sizes else np.zeros(0, int)
  end = start + sum(sizes)
  tokens = np.concatenate([draft.pre, *draft.pieces, draft.post]).astype(np.int32)
  if len(tokens) > length:
    raise AssertionError(f"{task}: built {len(tokens)} tokens for length={length}")
  if len(tokens) < MIN_FILL * length:
    raise ValueError(f"{task}: only {len(tokens)} tokens of length={length} could be filled "
                     f"(the official minimum is {MIN_FILL:.0%}); use a longer length")
  span = max(end - start, 1)
  meta = {"index": index, "options": dict(options), "context_span": (start, end),
          "depths": [float((offsets[i] - start) / span) for i in draft.evidence_pieces],
          **draft.meta}
  sample = Sample(task, tokens, draft.gold, 0, writer.answer_prefix, meta)
  if writer.explain:
    budget = OFFICIAL_MAX_OUTPUT
  else:
    n = writer.size(reference_output(sample))
    budget = n + max(8, n // 8)  # A margin for other tokenisations of the same answer.
  return dataclasses.replace(sample, max_new_tokens=budget)


# ---- options -------------------------------------------------------------------------


def resolve_options(task: str, options: dict) -> dict:
  """The task's defaults updated with ``options``; raises on unknown or ill-typed ones."""
  spec = REGISTRY[task]
  valid = {**COMMON_DEFAULTS, **spec.defaults}
  unknown = sorted(set(options) - set(valid))
  if unknown:
    raise ValueError(f"unknown option(s) {', '.join(unknown)} for {task}; valid options: "
                     f"{', '.join(f'{k}={v!r}' for k, v in valid.items())}")
  out = {**valid, **options}
  for key, value in out.items():
    default = valid[key]
    if isinstance(default, bool):
      if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{task}: option {key} must be a bool, got {value!r}")
      out[key] = bool(value)
    elif isinstance(default, int):
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{task}: option {key} must be an integer >= 1, got {value!r}")
      out[key] = int(value)
    elif isinstance(default, str) and (not isinstance(value, str) or not value.strip()):
      raise ValueError(f"{task}: option {key} must be a non-empty string, got {value!r}")
  return out


def rng_for(key: str, purpose: str) -> random.Random:
  """A stream of its own per sample and purpose (string seeds hash with SHA-512: stable
  across runs and platforms)."""
  return random.Random(f"{key}/{purpose}")


# ---- answers -------------------------------------------------------------------------


def answer_section(text: str, prefix: str = "") -> str | None:
  """The text inside the first ``<answer>`` ... ``</answer>``, or up to the end when the
  closing tag is missing (cut by the token budget); None without an opening tag.

  When the prompt's assistant turn already started with ``<answer>`` (``prefix``), the
  output is read as following it, unless the model wrote the tag again itself.
  """
  if prefix.rstrip().endswith(ANSWER_OPEN) and not text.lstrip().lower().startswith(
      ANSWER_OPEN):
    text = ANSWER_OPEN + text
  match = re.search(r"<answer>(.*?)(?:</answer>|$)", text, re.DOTALL | re.IGNORECASE)
  return None if match is None else match.group(1)


def normalize(text: str) -> str:
  """Lower case, single spaces, no leading article (story tasks' ``normalize_answer``)."""
  text = re.sub(r"\s+", " ", text.lower().strip())
  return re.sub(r"^(the|a|an)\s+", "", text)


def numbered_lines(text: str) -> dict[int, str]:
  """{n: answer} from lines ``n. answer`` (also ``n:`` / ``n)``), first occurrence wins."""
  out: dict[int, str] = {}
  for line in text.split("\n"):
    match = re.match(r"^(\d+)[.:)]\s*(.+?)\s*$", line.strip())
    if match:
      out.setdefault(int(match.group(1)), match.group(2))
  return out


def iou(pred: set, gold: set, empty: float = 1.0) -> float:
  union = pred | gold
  return len(pred & gold) / len(union) if union else empty


def reference_output(sample: Sample) -> str:
  """An output that scores 1.0: the answer section in the expected format, after the
  answer prefix (explain=False) or after a short explanation (explain=True)."""
  body = REGISTRY[sample.task].answer(sample)
  answer = f"\n{body}\n{ANSWER_CLOSE}"
  if sample.answer_prefix:
    return answer
  return ("<explanation>\nThe answer follows from the relevant part of the context.\n"
          f"</explanation>\n{ANSWER_OPEN}{answer}")


def score(sample: Sample, output_text: str) -> float:
  """The official per-sample metric (exact match, fraction of queries, or IoU) of an output
  (the text generated after the prompt); see the package docstring."""
  spec = REGISTRY[sample.task]
  value = spec.score(sample, answer_section(output_text, sample.answer_prefix), output_text)
  return float(min(max(value, 0.0), 1.0))


def make_samples(task: str, tokenizer, length: int, *, num_samples: int, seed: int = 43,
                 chat="auto", **options) -> list[Sample]:
  """``num_samples`` prompts of ``task`` with 0.9 * length..length tokens each.

  Deterministic given (task, tokenizer, length, num_samples, seed, options): sample i
  draws from streams seeded by (task, seed, i), as the official ``random_seed + sample_id``
  (default seed 43, ``configs/default.yaml``).

  Args:
    task: one of ``TASKS``.
    tokenizer: a ByteTokenizer or an HFTokenizer.
    length: the token budget of a prompt (the official max_input_tokens).
    chat: the chat template around the user message ('auto': when the tokenizer has one).
    **options: task options (see ``defaults(task)``); ``explain`` for every task.

  Raises:
    ValueError: unknown task or option, an ill-typed option, or a length too short for the
      task (the message names the minimum).
  """
  if task not in REGISTRY:
    raise ValueError(f"unknown task {task!r}; tasks: {', '.join(REGISTRY)}")
  if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)) or (
      num_samples < 0):
    raise ValueError(f"num_samples must be an integer >= 0, got {num_samples!r}")
  opts = resolve_options(task, options)
  writer = Writer(tokenizer, resolve_chat(tokenizer, chat), opts["explain"])
  spec = REGISTRY[task]
  samples, needs = [], []
  for i in range(int(num_samples)):
    try:
      draft = spec.build(writer, int(length), f"{task}/{seed}/{i}", opts)
    except PromptTooShortError as e:  # Go on: the error names the length that fits all.
      needs.append(e.needed)
      continue
    if not needs:
      samples.append(finish(writer, task, int(length), i, opts, draft))
  if needs:
    raise too_short(task, int(length), max(needs), samples=int(num_samples))
  return samples


def defaults(task: str) -> dict:
  """The options of ``task`` and their defaults (the official ones; explain: ours)."""
  if task not in REGISTRY:
    raise ValueError(f"unknown task {task!r}; tasks: {', '.join(REGISTRY)}")
  return {**COMMON_DEFAULTS, **REGISTRY[task].defaults}

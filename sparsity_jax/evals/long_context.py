"""Long-context tasks generated locally, built to exact token lengths, and their scorers.

Tasks (``TASKS``), each a generator of :class:`Prompt` s:

  passkey       a 5-digit key hidden at a chosen depth in repeated filler text
                ("The grass is green. ..."), then "What is the pass key?" (Mohtashami &
                Jaggi 2023, the passkey test of LongLoRA / StreamingLLM).
  kv_retrieval  several "The special magic number for <word> is: <n>." needles at chosen
                depths in the same filler; one prompt per needle asks for its number (the
                others are distractors; RULER's multi-key needle-in-a-haystack).
  document      the start of a long embedded-corpus document (the Python standard library's
                sources, ``data.corpus``), then a request to summarise it (chat models) or
                nothing (plain continuation). No reference answer: calibration uses the
                dense model's own response, perplexity the document itself.
  lines         LongEval lines ``line <key>: REGISTER_CONTENT is <n>`` (``data.retrieval``),
                for the byte-level models trained on them.

Every prompt is assembled at the token level from separately tokenised pieces (template,
instruction, filler, needles, question, answer prefix) and has exactly the requested
number of tokens; only filler is cut to fit, so the evidence a question needs is always
inside the prompt (``Prompt.evidence``; a generator raises when even the evidence does not
fit). Chat models get their chat template around the user message, and the assistant turn
starts with an answer prefix ("The pass key is"), so the answer is the next few tokens.

Scoring (``score_prompts``): greedy decoding with the model's KV caches, exact match of the
first integer of the output, and the mean NLL of the reference answer tokens (teacher-forced).
Prompts that share a context (the questions about one kv haystack) are scored from one
prefill of that context, forked per question. ``document_nll`` gives per-token NLL of
corpus documents for perplexity.

Legend: b batch (questions), t length, v vocab.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparsity_jax.data import retrieval
from sparsity_jax.data.tokenizer import ByteTokenizer

TASKS = ("passkey", "kv_retrieval", "document", "lines")
ANSWERED = ("passkey", "kv_retrieval", "lines")  # Tasks with a reference answer.

FILLER = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
          "There and back again.")
PASSKEY_INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it "
                 "and memorize it. I will quiz you about the important information there.\n")
PASSKEY_NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = "\nWhat is the pass key?"
PASSKEY_PREFIX = "The pass key is"
KV_INTRO = ("Some special magic numbers are hidden inside a lot of irrelevant text. Find them "
            "and memorize them. I will quiz you about one of them.\n")
KV_NEEDLE = " The special magic number for {key} is: {value}."
KV_QUESTION = "\nWhat is the special magic number for {key}?"
KV_PREFIX = "The special magic number for {key} is:"
DOC_INTRO = "Read the following document.\n\n"
DOC_QUESTION = "\n\nSummarize the document above in a few sentences."
KEY_DIGITS = 5
# Needle keys: common words; a prompt uses only words of one token count (so every
# question about a haystack has the same length and the questions batch).
KV_WORDS = (
    "apple", "river", "garden", "window", "candle", "mountain", "violin", "pencil", "tiger",
    "rocket", "basket", "island", "mirror", "hammer", "castle", "forest", "planet", "bottle",
    "jacket", "kitten", "ladder", "magnet", "needle", "orange", "parrot", "rabbit", "saddle",
    "tomato", "wallet", "yellow", "anchor", "bridge", "carpet", "dragon", "engine", "feather",
    "guitar", "harbor", "iceberg", "jungle", "kettle", "lemon", "marble", "napkin", "ocean",
    "pepper", "quartz", "ribbon", "silver", "tunnel", "umbrella", "valley", "whistle", "zebra",
    "coffee", "desert", "falcon", "glacier", "helmet", "lantern", "meadow", "puzzle", "rocket",
    "sunset", "teapot", "velvet", "walnut", "cactus", "dolphin", "emerald", "fossil", "goblet",
)


# ---- tokens ------------------------------------------------------------------------


def encode(tokenizer, text: str) -> np.ndarray:
  """Token ids of ``text`` without special tokens (byte tokenizer or HFTokenizer)."""
  if isinstance(tokenizer, ByteTokenizer):
    return tokenizer.encode(text)
  return np.asarray(tokenizer.encode(text, add_special_tokens=False), np.int32)


def decode(tokenizer, ids) -> str:
  if isinstance(tokenizer, ByteTokenizer):
    return tokenizer.decode(ids)
  return tokenizer.decode(ids, skip_special_tokens=True)


def has_chat_template(tokenizer) -> bool:
  return bool(getattr(tokenizer, "chat_template", None))


def frame(tokenizer, chat: bool) -> tuple[np.ndarray, np.ndarray]:
  """(head, tail) token ids around a user message: the chat template's with ``chat``
  (tail ends with the assistant header), else the tokenizer's own specials (e.g. BOS)."""
  if chat:
    mark = "\x00USER\x00"
    text = tokenizer.apply_chat_template([{"role": "user", "content": mark}])
    head, tail = text.split(mark)
    return encode(tokenizer, head), encode(tokenizer, tail)
  if isinstance(tokenizer, ByteTokenizer):
    return np.zeros((0,), np.int32), np.zeros((0,), np.int32)
  specials = np.asarray(tokenizer.encode("", add_special_tokens=True), np.int32)
  return specials, np.zeros((0,), np.int32)


def resolve_chat(tokenizer, chat) -> bool:
  """``chat='auto'``: the chat template when the tokenizer has one."""
  if chat == "auto":
    return has_chat_template(tokenizer)
  if chat and not has_chat_template(tokenizer):
    raise ValueError("chat=True needs a tokenizer with a chat template")
  return bool(chat)


@dataclasses.dataclass(frozen=True)
class Prompt:
  """One prompt of exactly ``len(tokens)`` tokens.

  tokens[:context_len] is shared with the other prompts of the same ``context_id`` (the
  questions about one haystack); ``evidence`` is the [start, end) token span holding what
  the answer needs; ``depth`` its relative position in the haystack (0 start, 1 end).
  """

  task: str
  tokens: np.ndarray
  context_len: int
  answer: str = ""
  answer_tokens: np.ndarray = dataclasses.field(
      default_factory=lambda: np.zeros((0,), np.int32))
  evidence: tuple[int, int] = (0, 0)
  evidence_text: str = ""
  depth: float = 0.0
  context_id: int = 0

  @property
  def length(self) -> int:
    return len(self.tokens)


def _filler(tokenizer, n: int) -> tuple[np.ndarray, np.ndarray]:
  """(n filler tokens, token offsets in [0, n] where a sentence starts)."""
  sentences = [encode(tokenizer, " " + s) for s in FILLER]
  unit = np.concatenate(sentences)
  starts = np.cumsum([0] + [len(s) for s in sentences[:-1]])
  reps = n // len(unit) + 1
  tokens = np.tile(unit, reps)[:n]
  bounds = (np.arange(reps)[:, None] * len(unit) + starts[None, :]).ravel()
  bounds = np.append(bounds[bounds < n], n)
  return tokens.astype(np.int32), bounds


class PromptTooShortError(ValueError):
  """A prompt length below what a task's template, evidence and question need; ``needed``
  is the smallest length that fits (of every sample asked for, where a caller knows)."""

  def __init__(self, message: str, needed: int):
    super().__init__(message)
    self.needed = int(needed)


def _too_short(task, length, needed):
  return PromptTooShortError(
      f"{task} prompts need at least {needed} tokens with this tokenizer (template, "
      f"instruction, evidence and question); got length={length}", needed)


def _haystack(task, tokenizer, length, head, tail_len, needles, depths):
  """head + filler with ``needles`` inserted at sentence starts nearest ``depths``.

  Returns (context tokens of length - tail_len, [(start, end)] needle spans, actual depths).
  """
  n_fill = length - tail_len - len(head) - sum(len(x) for x in needles)
  if n_fill < 0:
    raise _too_short(task, length, length - n_fill)
  filler, bounds = _filler(tokenizer, n_fill)
  cuts = []
  for d in depths:
    cut = int(bounds[np.argmin(np.abs(bounds - float(d) * n_fill))])
    cuts.append(cut)
  order = np.argsort(cuts, kind="stable")
  pieces, spans, pos, prev = [head], [None] * len(needles), len(head), 0
  for i in order:
    pieces.append(filler[prev:cuts[i]])
    pos += cuts[i] - prev
    pieces.append(needles[i])
    spans[i] = (pos, pos + len(needles[i]))
    pos += len(needles[i])
    prev = cuts[i]
  pieces.append(filler[prev:])
  context = np.concatenate(pieces).astype(np.int32)
  actual = [c / max(n_fill, 1) for c in cuts]
  return context, spans, actual


def _digits(rng, n=KEY_DIGITS) -> str:
  return str(int(rng.integers(10 ** (n - 1), 10 ** n)))


def passkey(tokenizer, length: int, rng: np.random.Generator, *, depth: float | None = None,
            chat: bool = False, context_id: int = 0) -> Prompt:
  """A passkey prompt of exactly ``length`` tokens, the key at ``depth`` of the filler."""
  depth = float(rng.random()) if depth is None else depth
  key = _digits(rng)
  head, tail = frame(tokenizer, chat)
  head = np.concatenate([head, encode(tokenizer, PASSKEY_INTRO)])
  needle = encode(tokenizer, PASSKEY_NEEDLE.format(key=key))
  question = np.concatenate([encode(tokenizer, PASSKEY_QUESTION), tail,
                             encode(tokenizer, PASSKEY_PREFIX if chat else " " + PASSKEY_PREFIX)])
  context, spans, depths = _haystack("passkey", tokenizer, length, head, len(question),
                                     [needle], [depth])
  tokens = np.concatenate([context, question]).astype(np.int32)
  return Prompt("passkey", tokens, len(context), key, encode(tokenizer, " " + key), spans[0],
                PASSKEY_NEEDLE.format(key=key), depths[0], context_id)


def _kv_keys(tokenizer, num: int, rng) -> list[str]:
  words = sorted(set(KV_WORDS))
  counts = {w: len(encode(tokenizer, " " + w)) for w in words}
  common = max(set(counts.values()), key=lambda c: (sum(v == c for v in counts.values()), -c))
  pool = [w for w in words if counts[w] == common]
  if num > len(pool):
    raise ValueError(f"kv_retrieval: at most {len(pool)} needles per prompt with this "
                     f"tokenizer, asked for {num}")
  return [pool[i] for i in rng.choice(len(pool), num, replace=False)]


def kv_retrieval(tokenizer, length: int, rng: np.random.Generator, *,
                 depths: Sequence[float] | None = None, num_needles: int = 4,
                 chat: bool = False, context_id: int = 0) -> list[Prompt]:
  """One haystack of exactly ``length`` tokens with a needle per depth; a prompt per needle.

  The prompts share tokens[:context_len] (everything before the question) and have equal
  question lengths.
  """
  depths = list(rng.random(num_needles)) if depths is None else list(depths)
  keys = _kv_keys(tokenizer, len(depths), rng)
  values = [_digits(rng) for _ in keys]
  head, tail = frame(tokenizer, chat)
  head = np.concatenate([head, encode(tokenizer, KV_INTRO)])
  needles = [encode(tokenizer, KV_NEEDLE.format(key=k, value=v)) for k, v in zip(keys, values)]
  prefix = KV_PREFIX if chat else " " + KV_PREFIX
  questions = [np.concatenate([encode(tokenizer, KV_QUESTION.format(key=k)), tail,
                               encode(tokenizer, prefix.format(key=k))]) for k in keys]
  if len({len(q) for q in questions}) != 1:
    raise AssertionError("kv_retrieval questions must have equal token counts")
  context, spans, actual = _haystack("kv_retrieval", tokenizer, length, head, len(questions[0]),
                                     needles, depths)
  return [Prompt("kv_retrieval", np.concatenate([context, q]).astype(np.int32), len(context),
                 v, encode(tokenizer, " " + v), span, KV_NEEDLE.format(key=k, value=v), d,
                 context_id)
          for k, v, q, span, d in zip(keys, values, questions, spans, actual)]


def document(tokenizer, length: int, documents: Sequence[np.ndarray], rng: np.random.Generator,
             *, chat: bool = False, context_id: int = 0) -> Prompt:
  """The start of a corpus document, exactly ``length`` tokens with the frame and request.

  Chooses a document with enough tokens (whole documents from their start, never a window
  into the middle); raises if none is long enough.
  """
  head, tail = frame(tokenizer, chat)
  if chat:
    head = np.concatenate([head, encode(tokenizer, DOC_INTRO)])
    tail = np.concatenate([encode(tokenizer, DOC_QUESTION), tail])
  need = length - len(head) - len(tail)
  if need < 1:
    raise _too_short("document", length, len(head) + len(tail) + 1)
  long_enough = [d for d in documents if len(d) >= need]
  if not long_enough:
    longest = max((len(d) for d in documents), default=0)
    raise ValueError(f"document prompts of {length} tokens need a corpus document of {need} "
                     f"tokens; the longest has {longest}")
  doc = np.asarray(long_enough[int(rng.integers(len(long_enough)))][:need], np.int32)
  tokens = np.concatenate([head, doc, tail]).astype(np.int32)
  return Prompt("document", tokens, len(head) + need, evidence=(len(head), len(head) + need),
                context_id=context_id)


def lines(tokenizer, length: int, rng: np.random.Generator, *, depth: float | None = None,
          chat: bool = False, context_id: int = 0) -> Prompt:
  """LongEval lines (``data.retrieval`` format), as many as fit, padded to ``length`` with
  blank lines after the header; the asked line at ``depth`` of the lines."""
  head, tail = frame(tokenizer, chat)
  head = np.concatenate([head, encode(tokenizer, retrieval.HEADER)])
  newline = encode(tokenizer, "\n")
  if len(newline) != 1:
    raise ValueError("lines prompts need a tokenizer with a one-token newline")
  per_line = len(encode(tokenizer, retrieval.LINE.format(key="zz", value="0" * 5)))
  fixed = len(head) + len(tail) + len(encode(tokenizer, retrieval.QUESTION.format(key="zz")))
  n = int(np.clip((length - fixed) // max(per_line, 1), 1, retrieval.NUM_KEYS ** 2))
  while True:
    key_index = None if depth is None else min(n - 1, int(depth * n))
    sample = retrieval.make_sample(rng, n, key_index=key_index)
    texts = sample.prompt[len(retrieval.HEADER):].split("\n")
    body = [encode(tokenizer, line + "\n") for line in texts[:-1]]
    question = np.concatenate([encode(tokenizer, texts[-1]), tail])
    pad = length - len(head) - sum(len(b) for b in body) - len(question)
    if pad >= 0 or n == 1:
      break
    n = max(1, n - max(1, -pad // max(per_line, 1)))
  if pad < 0:
    raise _too_short("lines", length, length - pad)
  starts = np.cumsum([len(head) + pad] + [len(b) for b in body])
  tokens = np.concatenate([head, np.repeat(newline, pad)] + body + [question]).astype(np.int32)
  k = sample.key_index
  return Prompt("lines", tokens, length - len(question), sample.answer,
                encode(tokenizer, sample.answer), (int(starts[k]), int(starts[k + 1])),
                texts[k], k / max(n - 1, 1), context_id)


def make_prompts(task: str, tokenizer, length: int, num: int, *, seed: int = 0,
                 chat: bool = False, documents: Sequence[np.ndarray] | None = None,
                 needles: int = 4) -> list[Prompt]:
  """``num`` prompts of one task, each exactly ``length`` tokens (depths spread evenly)."""
  if task not in TASKS:
    raise ValueError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")
  rng = np.random.default_rng([seed, length, TASKS.index(task)])
  depths = (np.arange(num) + 0.5) / max(num, 1)
  out: list[Prompt] = []
  if task == "passkey":
    out = [passkey(tokenizer, length, rng, depth=d, chat=chat, context_id=i)
           for i, d in enumerate(depths)]
  elif task == "lines":
    out = [lines(tokenizer, length, rng, depth=d, chat=chat, context_id=i)
           for i, d in enumerate(depths)]
  elif task == "document":
    if not documents:
      raise ValueError("document prompts need corpus documents")
    out = [document(tokenizer, length, documents, rng, chat=chat, context_id=i)
           for i in range(num)]
  else:
    i = 0
    while len(out) < num:
      k = min(needles, num - len(out))
      out += kv_retrieval(tokenizer, length, rng, depths=(np.arange(k) + rng.random(k)) / k,
                          chat=chat, context_id=i)
      i += 1
  return out


def check_prompt(prompt: Prompt, tokenizer, length: int) -> None:
  """Raises if a prompt does not have ``length`` tokens or lacks its evidence."""
  if prompt.length != length:
    raise AssertionError(f"{prompt.task} prompt has {prompt.length} tokens, not {length}")
  start, end = prompt.evidence
  if not 0 <= start < end <= prompt.context_len:
    raise AssertionError(f"{prompt.task} evidence {prompt.evidence} is outside the context")
  if prompt.evidence_text:
    got = decode(tokenizer, prompt.tokens[start:end])
    if prompt.evidence_text.strip() not in got:
      raise AssertionError(f"{prompt.task} evidence {prompt.evidence_text!r} not found: {got!r}")
  if prompt.answer and prompt.answer not in prompt.evidence_text:
    raise AssertionError(f"{prompt.task} answer {prompt.answer} is not in its evidence")


def corpus_documents(tokenizer=None, data_config=None, split: str = "validation",
                     min_tokens: int = 0, total_tokens: int | None = None) -> list[np.ndarray]:
  """Token arrays of the embedded corpus's files (``data.corpus``; the stdlib by default),
  one per file, in path order, keeping files of at least ``min_tokens`` tokens; with
  ``total_tokens``, stops once the kept files hold that many (tokenizing every file takes
  ~30 s with a BPE tokenizer)."""
  from sparsity_jax import config_lib
  from sparsity_jax.data import corpus
  data_config = config_lib.base_config().data if data_config is None else data_config
  root, files = corpus._source_files(data_config)
  train, val = corpus.split_files(files, data_config.val_fraction)
  tok = ByteTokenizer() if tokenizer is None else tokenizer
  docs = []
  for rel in (val if split == "validation" else train):
    with open(f"{root}/{rel}", "rb") as f:
      text = f.read().decode("utf-8", errors="replace")
    ids = encode(tok, text)
    if len(ids) >= min_tokens:
      docs.append(ids.astype(np.int32))
      if total_tokens is not None and sum(map(len, docs)) >= total_tokens:
        break
  return docs


# ---- scoring ------------------------------------------------------------------------


def first_integer(text: str) -> str | None:
  match = re.search(r"\d+", text)
  return match.group(0) if match else None


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("last_only",))
def _decode(graphdef, state, tokens_bt, cache, last_only=True):
  model = nnx.merge(graphdef, state)
  logits, cache = model.decode(tokens_bt, cache, last_only=last_only)
  return logits, cache


@functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(3,))
def _greedy_step(graphdef, state, tokens_bt, cache):
  model = nnx.merge(graphdef, state)
  logits, cache = model.decode(tokens_bt, cache, last_only=True)
  return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), cache


@functools.partial(jax.jit, static_argnums=(0,))
def _forced(graphdef, state, tokens_bt, cache, answer_ba):
  model = nnx.merge(graphdef, state)
  logits, _ = model.decode(tokens_bt, cache)
  logits = logits[:, -answer_ba.shape[1]:].astype(jnp.float32)
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, answer_ba[..., None], axis=-1)[..., 0]
  return (jnp.argmax(logits, axis=-1) == answer_ba).all(axis=1), nll.mean(axis=1)


def _tile(cache, b: int):
  """A batch-1 model cache repeated to batch b (arrays of rank >= 3 carry the batch)."""
  def tile(x):
    if x.ndim >= 3:
      assert x.shape[0] == 1, x.shape
      return jnp.repeat(x, b, axis=0)
    return x
  return jax.tree.map(tile, cache)


def score_prompts(model, tokenizer, prompts: Sequence[Prompt], *, new_tokens: int = 12,
                  suffix_len: int | None = None, batch_size: int = 5,
                  log=None) -> list[dict]:
  """Greedy answers and answer NLL for each prompt; one prefill per shared context.

  For a group of prompts with the same ``context_id`` (same length), the context
  tokens[:fork] run once through ``model.decode`` (batch 1) into caches sized for
  length + new_tokens (so a MoA plan's spans are those at N = length + new_tokens, as in
  ``generation.generate``); the caches are then repeated per question, and per batch of
  questions (1) the question + answer tokens are teacher-forced (answer NLL and
  ``forced``: would greedy decoding emit exactly the answer tokens) and (2) the question
  is decoded greedily for ``new_tokens`` tokens. ``fork`` is the shortest context_len of
  the group, or length - ``suffix_len`` (equal shapes across tasks: fewer compilations).

  Returns per prompt: correct (first integer of the greedy output == answer), forced,
  answer_nll, output (text) and output_tokens, depth, prefill_s and tokens, decode_s and tokens (per group,
  on the first prompt of each group; 0 elsewhere).
  """
  if new_tokens < 1:
    raise ValueError(f"new_tokens must be >= 1, got {new_tokens}")
  from sparsity_jax.layers.decode_methods import SnapKVAttention, decode_cores
  if any(isinstance(c, SnapKVAttention) for c in decode_cores(model)):
    # The context's prefill would compress the cache before the question arrives, so
    # SnapKV's observation window would not hold the question it is meant to read.
    raise ValueError("score_prompts forks one context prefill per question, which changes "
                     "what SnapKV keeps; run whole prompts through generation.generate "
                     "(evals/frontier does)")
  graphdef, state = nnx.split(model)
  groups: dict[tuple, list[int]] = {}
  for i, p in enumerate(prompts):
    groups.setdefault((p.context_id, p.task, p.length), []).append(i)
  results: list[dict] = [{} for _ in prompts]
  for (_, task, length), idx in groups.items():
    group = [prompts[i] for i in idx]
    fork = min(p.context_len for p in group)
    if suffix_len is not None:
      if length - suffix_len > fork:
        raise ValueError(f"suffix_len={suffix_len} does not reach the {task} questions "
                         f"({length - fork} tokens)")
      fork = length - suffix_len
    context = group[0].tokens[:fork]
    for p in group:
      if not np.array_equal(p.tokens[:fork], context):
        raise ValueError(f"{task} prompts with context_id {p.context_id} differ before "
                         "their questions")
    answers = np.stack([p.answer_tokens for p in group])
    cache = model.init_cache(1, length + max(new_tokens, answers.shape[1]))
    start = time.perf_counter()
    _, cache = _decode(graphdef, state, jnp.asarray(context[None]), cache)
    jax.block_until_ready(cache)
    prefill_s, decode_s, decode_tokens = time.perf_counter() - start, 0.0, 0
    for b0 in range(0, len(group), batch_size):
      rows = list(range(b0, min(b0 + batch_size, len(group))))
      pad = rows + [rows[-1]] * (min(batch_size, len(group)) - len(rows))
      suffix = np.stack([group[r].tokens[fork:] for r in pad])
      ans = answers[pad]
      forked = _tile(cache, len(pad))
      forced, nll = _forced(graphdef, state, jnp.asarray(np.concatenate(
          [suffix, ans[:, :-1]], axis=1)), forked, jnp.asarray(ans))
      logits, forked = _decode(graphdef, state, jnp.asarray(suffix), forked)
      token = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
      out = [token]
      start = time.perf_counter()
      for _ in range(new_tokens - 1):
        token, forked = _greedy_step(graphdef, state, token[:, None], forked)
        out.append(token)
      out = np.asarray(jnp.stack(out, axis=1))
      decode_s += time.perf_counter() - start
      decode_tokens += (new_tokens - 1) * len(pad)
      forced, nll = np.asarray(forced), np.asarray(nll)
      for j, r in enumerate(rows):
        p = group[r]
        text = decode(tokenizer, out[j])
        results[idx[r]] = {
            "task": task, "length": length, "depth": float(p.depth), "answer": p.answer,
            "output": text, "output_tokens": [int(x) for x in out[j]],
            "correct": first_integer(text) == p.answer,
            "forced": bool(forced[j]), "answer_nll": float(nll[j]),
            "prefill_s": 0.0, "prefill_tokens": 0, "decode_s": 0.0, "decode_tokens": 0}
    first = results[idx[0]]
    first.update(prefill_s=prefill_s, prefill_tokens=int(fork), decode_s=decode_s,
                 decode_tokens=decode_tokens, batch=min(batch_size, len(group)))
    if log is not None:
      ok = sum(results[i]["correct"] for i in idx)
      log(f"{task} @{length} context {group[0].context_id}: {ok}/{len(idx)} correct, "
          f"prefill {prefill_s:.1f}s")
  return results


@functools.partial(jax.jit, static_argnums=(0,))
def _token_nll(graphdef, state, tokens_bt):
  model = nnx.merge(graphdef, state)
  logits = model(tokens_bt[:, :-1]).astype(jnp.float32)
  logp = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.take_along_axis(logp, tokens_bt[:, 1:, None], axis=-1)[..., 0]


def document_nll(model, documents: Sequence[np.ndarray]) -> np.ndarray:
  """[d, t] per-token NLL (nats) of documents of t + 1 tokens each (full-sequence path)."""
  graphdef, state = nnx.split(model)
  return np.stack([np.asarray(_token_nll(graphdef, state, jnp.asarray(d[None], jnp.int32)))[0]
                   for d in documents])


def summarize(results: Sequence[dict], num_bins: int = 5) -> dict:
  """Accuracy, forced accuracy, mean answer NLL, and accuracy by depth bin."""
  if not results:
    return {}
  correct = np.array([r["correct"] for r in results], float)
  depth = np.array([r["depth"] for r in results])
  bins = np.minimum((depth * num_bins).astype(int), num_bins - 1)
  return {"n": len(results), "accuracy": float(correct.mean()),
          "forced": float(np.mean([r["forced"] for r in results])),
          "answer_nll": float(np.mean([r["answer_nll"] for r in results])),
          "by_depth": {f"{b / num_bins:.1f}-{(b + 1) / num_bins:.1f}":
                       float(correct[bins == b].mean()) if (bins == b).any() else None
                       for b in range(num_bins)}}

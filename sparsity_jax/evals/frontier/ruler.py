"""The RULER tasks of the Sparse Frontier: NIAH, variable tracking, common words.

Official: ``sparse_frontier/tasks/ruler/{niah,vt,cwe}.py`` and ``configs/task/ruler_*.yaml``
(github.com/PiotrNawrot/sparse-frontier; a re-implementation of NVIDIA/RULER); our own code.

  ruler_niah  ``num_queries`` (4) needles "The value for key K is: V." (K and V: four
              groups of 8 random [a-z0-9] characters joined by '-') among distractor
              needles of the same form that fill the context, all shuffled; the question
              lists the keys, the answer is "i. The answer for K is V." per key, in order.
              Score: the fraction of keys whose (index, key, value) is right.
  ruler_vt    ``num_chains`` (8) chains of ``num_hops`` (4) copies, "VAR AAAAA = 12345",
              "VAR BBBBB = VAR AAAAA", ..., shuffled among repeats of a noise paragraph;
              which variables resolve to the first chain's value? Score: the IoU of the
              predicted and gold variable sets (whitespace-separated, "VAR " dropped).
  ruler_cwe   a numbered list of words: ``num_common_words`` (10) words repeated
              ``common_word_frequency`` (30) times, as many other words repeated
              ``rare_word_frequency`` (3) times as fit, shuffled; name the common words.
              Score: the IoU of the predicted words (numbered lines) and the gold set.

(The yaml configs set the defaults above; ``VariableTrackingTask``'s own default of one
chain is not what the paper runs.) Without answer tags, NIAH and VT read the whole output
and CWE scores 0, as the official code. Deviation: the official code fills to within an
estimate (5 noise paragraphs of margin in VT); we count tokens exactly and fill to within
one filler unit of the length.
"""

from __future__ import annotations

import re
import string

import numpy as np

from sparsity_jax.evals.frontier import base, words

# ---- ruler_niah ------------------------------------------------------------------------

NIAH_INTRO = ("I will provide you with a document containing multiple key-value pairs. "
              "Your task is to extract specific values associated with given keys.")
NIAH_FORMAT = ("1. The answer for <key1> is <value1>.\n2. The answer for <key2> is <value2>.\n"
               "etc.")
NIAH_EXTRA = ("- Provide answers in the exact order of the requested keys\n"
              '- Each answer must follow the format: "<number>. The answer for <key> is '
              '<value>."\n'
              "- Ensure exact key matches - do not modify or paraphrase the keys\n"
              "- Values must match exactly as they appear in the document")
NIAH_NEEDLE = "The value for key {key} is: {value}."
NIAH_QUESTION = "Extract the values for the following keys: {keys}"
_NIAH_ANSWER = re.compile(r"(\d+)\.\s*The answer for\s+([\w-]+)\s+is:?\s+(.+?)(?:\.|$)",
                          re.IGNORECASE | re.MULTILINE)


def _kv(rng, used: set) -> str:
  while True:
    text = "-".join("".join(rng.choices(string.ascii_lowercase + string.digits, k=8))
                    for _ in range(4))
    if text not in used:
      used.add(text)
      return text


def _fit_filler(writer, length, pre, post, units, filler):
  """The filler texts (drawn by ``filler()``) that fit in ``length`` beside the evidence
  ``units`` (all joined by spaces; counted with a leading space each); None when the units
  alone do not fit."""
  fixed = len(pre) + len(post)
  if fixed + sum(len(p) for p in writer.join(units, " ")) > length:
    return None
  used = fixed + sum(writer.size(" " + u) for u in units)
  extra = []
  while True:
    text = filler()
    cost = writer.size(" " + text)
    if used + cost > length:
      break
    extra.append(text)
    used += cost
  return extra


def _shuffle_and_fit(task, writer, length, pre, post, units, extra, rng, is_filler):
  """Shuffles units + extra, then drops filler from the end until the exact total fits
  (the first piece has no leading space, so counts can move by a token)."""
  texts = list(units) + list(extra)
  rng.shuffle(texts)
  while True:
    pieces = writer.join(texts, " ")
    total = len(pre) + len(post) + sum(len(p) for p in pieces)
    if total <= length:
      return texts, pieces
    fill = [i for i, t in enumerate(texts) if is_filler(t)]
    if not fill:
      raise base.too_short(task, length, total)
    del texts[fill[-1]]


def _build_niah(writer, length, key, opts) -> base.Draft:
  rng = base.rng_for(key, "needles")
  used_keys, used_values = set(), set()
  needles = [(_kv(rng, used_keys), _kv(rng, used_values)) for _ in range(opts["num_queries"])]
  queries = [NIAH_NEEDLE.format(key=k, value=v) for k, v in needles]
  rng.shuffle(queries)
  question = NIAH_QUESTION.format(keys=", ".join(k for k, _ in needles))
  pre, post = writer.around(intro=NIAH_INTRO, question=question, multi=True,
                            answer_format=NIAH_FORMAT, extra=NIAH_EXTRA)
  extra = _fit_filler(writer, length, pre, post, queries, lambda: NIAH_NEEDLE.format(
      key=_kv(rng, used_keys), value=_kv(rng, used_values)))
  if extra is None:
    raise base.too_short("ruler_niah", length, len(pre) + len(post) + sum(
        len(p) for p in writer.join(queries, " ")))
  wanted = set(queries)
  texts, pieces = _shuffle_and_fit("ruler_niah", writer, length, pre, post, queries, extra,
                                   rng, lambda t: t not in wanted)
  evidence = [NIAH_NEEDLE.format(key=k, value=v) for k, v in needles]
  meta = {"num_queries": len(needles), "keys": [k for k, _ in needles],
          "num_distractors": len(texts) - len(needles), "evidence": evidence}
  return base.Draft(pre, pieces, post, [v for _, v in needles], meta,
                    [texts.index(e) for e in evidence])


def _niah_value(text: str) -> str:
  text = re.sub(r"\s+", " ", text.lower().strip())
  return re.sub(r"\bis:\s+", "is ", text)


def _score_niah(sample, section, output) -> float:
  pred: dict[int, tuple] = {}
  for m in _NIAH_ANSWER.finditer(output if section is None else section):
    pred.setdefault(int(m.group(1)), (m.group(2).strip(), _niah_value(m.group(3).strip())))
  gold = list(zip(sample.meta["keys"], sample.gold))
  return sum(pred.get(i) == (k, _niah_value(v)) for i, (k, v) in enumerate(gold, 1)) / len(gold)


base.register(base.TaskSpec(
    "ruler_niah", {"num_queries": 4}, _build_niah,
    lambda s: "\n".join(f"{i}. The answer for {k} is {v}."
                        for i, (k, v) in enumerate(zip(s.meta["keys"], s.gold), 1)),
    _score_niah, "sparse_frontier/tasks/ruler/niah.py"))


# ---- ruler_vt --------------------------------------------------------------------------

VT_NOISE = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and "
            "back again.")
VT_INTRO = ("I will provide you with a text containing variable assignments. The text "
            "contains two types of assignments:\n"
            '1. Numeric assignments that set a variable to a number (e.g., "VAR ABC = 12345")\n'
            "2. Copy assignments that set a variable equal to another variable (e.g., "
            '"VAR XYZ = VAR ABC")\n'
            "Variables are sequences of uppercase letters. The assignments can appear in any "
            "order in the text.")
VT_FORMAT = "VARIABLE_ONE VARIABLE_TWO etc."
VT_EXTRA = ("- List ONLY the variable names that resolve to the target value.\n"
            "- Variables can be listed in any order.\n"
            '- Do not include "VAR" prefix in your answer. Do not include punctuation.')
VT_QUESTION = ("Which variables resolve to the value {v}? A variable resolves to {v} if it "
               "is either directly assigned {v}, or assigned to another variable that "
               "resolves to {v}.")


def _build_vt(writer, length, key, opts) -> base.Draft:
  rng = base.rng_for(key, "chains")
  chains, hops = opts["num_chains"], opts["num_hops"]
  names: list[str] = []
  while len(names) < chains * (hops + 1):
    name = "".join(rng.choices(string.ascii_uppercase, k=5))
    if name not in names:
      names.append(name)
  values = rng.sample(range(10000, 99999), chains)
  statements, target = [], []
  for c in range(chains):
    chain = names[c * (hops + 1):(c + 1) * (hops + 1)]
    statements.append(f"VAR {chain[0]} = {values[c]}")
    statements += [f"VAR {b} = VAR {a}" for a, b in zip(chain, chain[1:])]
    if c == 0:
      target = chain
  evidence = statements[:hops + 1]
  pre, post = writer.around(intro=VT_INTRO, question=VT_QUESTION.format(v=values[0]),
                            multi=False, answer_format=VT_FORMAT, extra=VT_EXTRA)
  extra = _fit_filler(writer, length, pre, post, statements, lambda: VT_NOISE)
  if extra is None:
    raise base.too_short("ruler_vt", length, len(pre) + len(post) + sum(
        len(p) for p in writer.join(statements, " ")))
  texts, pieces = _shuffle_and_fit("ruler_vt", writer, length, pre, post, statements, extra,
                                   rng, lambda t: t == VT_NOISE)
  meta = {"target_value": str(values[0]), "num_chains": chains, "num_hops": hops,
          "num_noise": len(texts) - len(statements), "evidence": evidence}
  return base.Draft(pre, pieces, post, list(target), meta, [texts.index(e) for e in evidence])


def _variables(text: str) -> set:
  text = re.sub(r"\s+", " ", text.upper().strip())
  return set(re.sub(r"VAR\s+", "", text).split())


def _score_vt(sample, section, output) -> float:
  return base.iou(_variables(output if section is None else section), set(sample.gold))


base.register(base.TaskSpec(
    "ruler_vt", {"num_chains": 8, "num_hops": 4}, _build_vt, lambda s: " ".join(s.gold),
    _score_vt, "sparse_frontier/tasks/ruler/vt.py"))


# ---- ruler_cwe -------------------------------------------------------------------------

CWE_INTRO = ("You will be given a numbered list of words. Your task is to identify the most "
             "frequently occurring words. You should solve this task by carefully reading "
             "and analyzing the word list. Do not attempt to write code or use programming "
             "tools to count frequencies. This is a test of your ability to track word "
             "frequencies directly.")
CWE_QUESTION = ("The list contains exactly {k} words that appear {common} times each. All "
                "other words appear {rare} times each. The order of words in the list is "
                "randomized.\nYour task is to identify the {k} words that appear {common} "
                "times each.")
CWE_FORMAT = ("1. word_one\n2. word_two\n...\n{k}. word_{k}\n\nNote: List exactly {k} words, "
              "one per line, numbered from 1 to {k}.")


def _build_cwe(writer, length, key, opts) -> base.Draft:
  k, common_freq = opts["num_common_words"], opts["common_word_frequency"]
  rare_freq = opts["rare_word_frequency"]
  if common_freq <= rare_freq:
    raise ValueError("ruler_cwe: common_word_frequency must be greater than "
                     f"rare_word_frequency, got {common_freq} <= {rare_freq}")
  rng = base.rng_for(key, "words")
  pool = list(words.WORDS)
  if k >= len(pool):
    raise ValueError(f"ruler_cwe: num_common_words must be below {len(pool)}, got {k}")
  rng.shuffle(pool)
  common, rare = pool[:k], pool[k:]
  question = CWE_QUESTION.format(k=k, common=common_freq, rare=rare_freq)
  pre, post = writer.around(intro=CWE_INTRO, question=question, multi=False,
                            answer_format=CWE_FORMAT.format(k=k), extra="")

  def number(i):  # Line i's number (after a newline but on the first line).
    return writer.size(f"{i}." if i == 1 else f"\n{i}.")

  lines = k * common_freq
  used = len(pre) + len(post) + sum(number(i) for i in range(1, lines + 1)) + common_freq * sum(
      writer.size(" " + w) for w in common)
  m = 0
  while True:  # Rare words while they fit (the official binary search, counted exactly).
    if m == len(rare):
      rare.append(words.pseudo_words()[m - len(pool) + k])  # Past our list: pseudo-words.
    cost = rare_freq * writer.size(" " + rare[m]) + sum(
        number(i) for i in range(lines + 1, lines + rare_freq + 1))
    if used + cost > length:
      break
    used, lines, m = used + cost, lines + rare_freq, m + 1
  if m == 0:
    raise base.too_short("ruler_cwe", length, used + cost)
  listed = common * common_freq + rare[:m] * rare_freq
  rng.shuffle(listed)
  pieces = [np.concatenate([writer.encode(f"{i}." if i == 1 else f"\n{i}."),
                            writer.encode(" " + w)]) for i, w in enumerate(listed, 1)]
  meta = {"num_total_words": len(listed), "num_rare_words": m, "common_frequency": common_freq,
          "rare_frequency": rare_freq, "evidence": list(common)}
  return base.Draft(pre, pieces, post, list(common), meta)


def _score_cwe(sample, section, output) -> float:
  if section is None:
    return 0.0
  pred = set()
  for line in section.strip().split("\n"):
    match = re.match(r"^\d+[.)\-]?\s*(.+)$", line.strip())
    if match and match.group(1).strip():
      pred.add(match.group(1).strip().lower())
  return base.iou(pred, set(sample.gold), empty=0.0)


base.register(base.TaskSpec(
    "ruler_cwe", {"num_common_words": 10, "common_word_frequency": 30,
                  "rare_word_frequency": 3},
    _build_cwe, lambda s: "\n".join(f"{i}. {w}" for i, w in enumerate(s.gold, 1)),
    _score_cwe, "sparse_frontier/tasks/ruler/cwe.py"))

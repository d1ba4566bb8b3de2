"""Sparse Frontier tasks: lengths, evidence, reference answers, scorers and parsers."""

import dataclasses
import re

import numpy as np
import pytest

from sparsity_jax.data.tokenizer import ByteTokenizer
from sparsity_jax.evals import frontier
from sparsity_jax.evals.frontier import story
from sparsity_jax.evals.long_context import decode, encode

LENGTHS = {"bytes": (4096, 8192), "smollm2": (1024, 2048)}
# Smaller than the official defaults so that every task fits 1024 SmolLM2 tokens.
SMALL = {"story_retrieval": dict(num_queries=2),
         "ruler_cwe": dict(num_common_words=4, common_word_frequency=6, rare_word_frequency=2)}


@pytest.fixture(scope="module")
def smollm2_tokenizer():
  """Only the tokenizer of the embedded SmolLM2 GGUF (no weights are read)."""
  from sparsity_jax.checkpoints import open_pretrained
  from sparsity_jax.checkpoints.arch import CheckpointNotFoundError
  try:
    return open_pretrained("smollm2").tokenizer()
  except CheckpointNotFoundError as e:
    pytest.skip(str(e))


def _tokenizer(name, request):
  if name == "bytes":
    return ByteTokenizer()
  return request.getfixturevalue("smollm2_tokenizer")


def _context(s, tok):
  return decode(tok, s.tokens[slice(*s.meta["context_span"])])


def _wrong(s):
  """A gold answer sharing nothing with the real one."""
  if s.task == "story_multihop":
    return "plain wooden spoon"
  if s.task == "story_filtering":
    return [str(s.meta["num_chapters"] + 5)]
  if s.task == "ruler_vt":
    return ["QQQQQ", "ZZZZZ"]
  return [f"zz{i}" for i in range(len(s.gold))]


def _check_task_logic(s, tok):
  """Per task: the gold answer follows from the decoded context."""
  context = _context(s, tok)
  if s.task == "story_retrieval":
    for gold, chapter in zip(s.gold, s.meta["evidence"]):
      assert gold in chapter
  elif s.task == "story_multihop":
    assert s.gold in s.meta["evidence"][0] and s.meta["target_item"] in s.meta["evidence"][1]
    assert s.meta["target_chapter"] == s.meta["answer_chapter"] + 1  # Every chapter buys.
  elif s.task == "story_filtering":
    buy = [re.compile(re.escape(t).replace(r"\{p\}", ".+").replace(r"\{item\}", ".+")
                      .replace(r"\{character\}", ".+")) for t in story.BUY]
    chapters = re.split(r"Chapter (\d+):\n", context)[1:]
    no_buy = {int(n) for n, text in zip(chapters[::2], chapters[1::2])
              if not any(b.search(text) for b in buy)}
    assert len(chapters) // 2 == s.meta["num_chapters"]
    assert no_buy == {int(g) for g in s.gold}
  elif s.task == "ruler_niah":
    for key, value in zip(s.meta["keys"], s.gold):
      assert context.count(f"key {key} is") == 1
      assert f"The value for key {key} is: {value}." in context
  elif s.task == "ruler_vt":  # Resolve every assignment of the context.
    assign = dict(re.findall(r"VAR ([A-Z]+) = (VAR [A-Z]+|\d+)", context))
    assert len(assign) == s.meta["num_chains"] * (s.meta["num_hops"] + 1)

    def value(v):
      return value(assign[v[4:]]) if v.startswith("VAR ") else v
    resolved = {k for k in assign if value(assign[k]) == s.meta["target_value"]}
    assert resolved == set(s.gold)
  elif s.task == "ruler_cwe":
    counts = {}
    for w in re.findall(r"^\d+\. (\w+)$", context, re.MULTILINE):
      counts[w] = counts.get(w, 0) + 1
    o = s.meta["options"]
    assert {w for w, c in counts.items() if c == o["common_word_frequency"]} == set(s.gold)
    assert set(counts.values()) == {o["common_word_frequency"], o["rare_word_frequency"]}
    assert sum(counts.values()) == s.meta["num_total_words"]


@pytest.mark.parametrize("name", ["bytes", "smollm2"])
@pytest.mark.parametrize("task", frontier.TASKS)
def test_samples_fit_hold_their_evidence_and_score(name, task, request):
  """At two lengths, fresh seeds: 90-100% of the length, evidence inside the decoded
  prompt, the gold answer follows from the context, the reference output scores 1 and a
  wrong one 0; the same seed gives the same samples, another seed others."""
  tok = _tokenizer(name, request)
  seed = int(np.random.randint(1 << 30))
  opts = SMALL.get(task, {})
  for length in LENGTHS[name]:
    samples = frontier.make_samples(task, tok, length, num_samples=2, seed=seed, **opts)
    for s in samples:
      msg = f"{task} {name} length={length} seed={seed}"
      assert s.task == task and s.tokens.dtype == np.int32, msg
      assert 0.9 * length <= len(s.tokens) <= length, (len(s.tokens), msg)
      text = decode(tok, s.tokens)
      assert s.meta["evidence"] and all(e in text for e in s.meta["evidence"]), msg
      assert all(e in _context(s, tok) for e in s.meta["evidence"]), msg
      assert all(0 <= d <= 1 for d in s.meta["depths"]), msg
      _check_task_logic(s, tok)
      assert text.endswith("<answer>") and s.answer_prefix == "<answer>", msg
      ref = frontier.reference_output(s)
      assert frontier.score(s, ref) == 1.0, (ref, msg)
      assert s.max_new_tokens > len(encode(tok, ref)), msg
      wrong = frontier.reference_output(dataclasses.replace(s, gold=_wrong(s)))
      assert frontier.score(s, wrong) == 0.0, (wrong, msg)
      assert frontier.score(s, "") == 0.0, msg
    again = frontier.make_samples(task, tok, length, num_samples=2, seed=seed, **opts)
    other = frontier.make_samples(task, tok, length, num_samples=2, seed=seed + 1, **opts)
    for a, b, c in zip(samples, again, other):
      np.testing.assert_array_equal(a.tokens, b.tokens)
      assert a.gold == b.gold and a.meta == b.meta and a.max_new_tokens == b.max_new_tokens
      assert not np.array_equal(a.tokens, c.tokens)


@pytest.mark.parametrize("task", frontier.TASKS)
def test_explain_and_plain_prompts(task, smollm2_tokenizer):
  """explain=True: the official instructions, no answer prefix, 1024 new tokens; the
  reference (explanation then answer) scores 1. chat=False: no chat template."""
  tok = smollm2_tokenizer
  opts = SMALL.get(task, {})
  s, = frontier.make_samples(task, tok, 1500, num_samples=1, explain=True, **opts)
  text = decode(tok, s.tokens)
  assert s.answer_prefix == "" and s.max_new_tokens == 1024
  assert "<explanation>" in text and text.endswith("assistant\n")
  assert frontier.score(s, frontier.reference_output(s)) == 1.0
  plain, = frontier.make_samples(task, tok, 1500, num_samples=1, chat=False, **opts)
  text = decode(tok, plain.tokens)
  assert "assistant" not in text and text.endswith("exactly.\n<answer>")
  assert 1350 <= len(plain.tokens) <= 1500
  assert frontier.score(plain, frontier.reference_output(plain)) == 1.0


@pytest.mark.parametrize("name", ["bytes", "smollm2"])
@pytest.mark.parametrize("task", frontier.TASKS)
def test_too_short_names_the_minimum_and_the_minimum_fits(name, task, request):
  tok = _tokenizer(name, request)
  opts = SMALL.get(task, {})
  with pytest.raises(ValueError, match=f"{task} prompts need at least") as err:
    frontier.make_samples(task, tok, 100, num_samples=3, **opts)
  need = int(re.search(r"at least (\d+) tokens", str(err.value)).group(1))
  # The minimum is that of every sample asked for, not only of the first.
  samples = frontier.make_samples(task, tok, need, num_samples=3, **opts)
  assert max(len(s.tokens) for s in samples) == need


def test_options_defaults_and_errors():
  assert frontier.defaults("story_retrieval") == {
      "explain": False, "num_queries": 16, "protagonist_name": "Arion"}
  assert frontier.defaults("story_filtering")["chapters_in_question"] == 3
  assert frontier.defaults("ruler_niah") == {"explain": False, "num_queries": 4}
  assert frontier.defaults("ruler_vt") == {"explain": False, "num_chains": 8, "num_hops": 4}
  assert frontier.defaults("ruler_cwe") == {"explain": False, "num_common_words": 10,
                                            "common_word_frequency": 30,
                                            "rare_word_frequency": 3}
  tok = ByteTokenizer()
  with pytest.raises(ValueError, match="valid options: explain=False, num_queries=4"):
    frontier.make_samples("ruler_niah", tok, 4096, num_samples=1, num_chains=2)
  with pytest.raises(ValueError, match="must be an integer >= 1"):
    frontier.make_samples("ruler_niah", tok, 4096, num_samples=1, num_queries=0)
  with pytest.raises(ValueError, match="must be a bool"):
    frontier.make_samples("ruler_vt", tok, 4096, num_samples=1, explain="yes")
  with pytest.raises(ValueError, match="greater than rare_word_frequency"):
    frontier.make_samples("ruler_cwe", tok, 4096, num_samples=1, common_word_frequency=3)
  with pytest.raises(ValueError, match="unknown task"):
    frontier.make_samples("ruler_qa", tok, 4096, num_samples=1)
  assert frontier.make_samples("ruler_vt", tok, 4096, num_samples=0) == []
  s, = frontier.make_samples("story_multihop", tok, 4096, num_samples=1,
                             protagonist_name="Zora")
  assert "Zora" in decode(tok, s.tokens) and "Arion" not in decode(tok, s.tokens)


def test_answer_section_parser():
  parse = frontier.answer_section
  assert parse("\n1. Rhodes\n</answer>", "<answer>") == "\n1. Rhodes\n"
  assert parse("\n1. Rhodes\n2. Ur", "<answer>") == "\n1. Rhodes\n2. Ur"  # Cut off.
  assert parse(" <answer>\nUr\n</answer>", "<answer>") == "\nUr\n"  # Tag written again.
  assert parse("Ur</answer> then <answer>Tyre</answer>", "<answer>") == "Ur"
  assert parse("<explanation>x</explanation>\n<ANSWER>\nUr\n</Answer>junk") == "\nUr\n"
  assert parse("<explanation>x</explanation>\n<answer>\nUr") == "\nUr"
  assert parse("The answer is Ur.") is None


def _sample(task, gold, **meta):
  return frontier.Sample(task, np.zeros(1, np.int32), gold, 8, "<answer>",
                         {"options": {}, **meta})


def test_scores_on_hand_written_outputs():
  score = frontier.score
  retrieval = _sample("story_retrieval", ["Rhodes", "Leptis Magna", "ancient gold ring"])
  assert score(retrieval, "\n1. rhodes\n2) Leptis  Magna\n3: The ancient gold ring") == 1.0
  assert score(retrieval, "\n1. Rhodes\n2. Rome\n</answer>") == pytest.approx(1 / 3)
  assert score(retrieval, "\n2. Rhodes\n1. Rhodes") == pytest.approx(1 / 3)  # By index.
  assert score(retrieval, "Rhodes, Leptis Magna, ancient gold ring") == 0.0  # Not numbered.
  multihop = _sample("story_multihop", "ancient gold ring")
  assert score(multihop, "\nThe Ancient gold ring\n</answer>") == 1.0
  assert score(multihop, "\nancient gold ring, bought in chapter 3") == 0.0
  filtering = _sample("story_filtering", ["3", "7", "12"])
  assert score(filtering, "\n3, 7, 12\n</answer>") == 1.0
  assert score(filtering, "\n3, 7, 5\n</answer>") == pytest.approx(2 / 4)  # IoU.
  assert score(filtering, "\nChapter 3, Chapter 7 (not 9)") == pytest.approx(2 / 3)
  assert score(filtering, "\n1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12") == pytest.approx(3 / 12)
  niah = _sample("ruler_niah", ["aaaa-1111", "bbbb-2222"], keys=["k-1", "k-2"])
  assert score(niah, "\n1. The answer for k-1 is aaaa-1111.\n2. The answer for k-2 is: "
                     "BBBB-2222.") == 1.0
  assert score(niah, "\n1. The answer for k-2 is bbbb-2222.\n2. The answer for k-2 is "
                     "bbbb-2222.") == 0.5  # Key 1 is missing.
  vt = _sample("ruler_vt", ["AAAAA", "BBBBB", "CCCCC", "DDDDD", "EEEEE"])
  assert score(vt, "\nVAR aaaaa bbbbb CCCCC DDDDD\nEEEEE </answer>") == 1.0
  assert score(vt, "\nAAAAA BBBBB CCCCC DDDDD XXXXX") == pytest.approx(4 / 6)
  # Punctuation is not stripped (official): "AAAAA," is no variable of the gold set.
  assert score(vt, "\nAAAAA, BBBBB") == pytest.approx(1 / 6)
  cwe = _sample("ruler_cwe", ["apple", "river", "stone", "wolf"])
  assert score(cwe, "\n1. Apple\n2. river\n3) stone\n4- wolf\n</answer>") == 1.0
  assert score(cwe, "\n1. apple\n2. river\n3. cloud") == pytest.approx(2 / 5)
  no_prefix = dataclasses.replace(cwe, answer_prefix="")
  assert score(no_prefix, "1. apple\n2. river\n3. stone\n4. wolf") == 0.0  # No tag.
  assert score(no_prefix, "<answer>\n1. apple\n2. river\n3. stone\n4. wolf") == 1.0


@pytest.mark.parametrize("name", ["bytes", "smollm2"])
@pytest.mark.parametrize("task", frontier.EXTRA_TASKS)
def test_needle_tasks_fit_hold_their_evidence_and_score(name, task, request):
  """passkey / kv_retrieval (ours, for small models): exact length, the needle inside,
  the reference scores 1 and another number 0, deterministic per seed."""
  tok = _tokenizer(name, request)
  seed = int(np.random.randint(1 << 30))
  length = LENGTHS[name][0]
  samples = frontier.make_samples(task, tok, length, num_samples=3, seed=seed)
  for s in samples:
    msg = f"{task} {name} seed={seed}"
    assert len(s.tokens) == length, msg
    assert s.meta["evidence"][0] in decode(tok, s.tokens) and s.gold in s.meta["evidence"][0], msg
    assert frontier.score(s, frontier.reference_output(s)) == 1.0, msg
    assert frontier.score(s, f" {int(s.gold) + 1}.") == 0.0, msg
    assert frontier.score(s, f" {s.gold}. Remember it.") == 1.0, msg
    assert s.max_new_tokens <= 24, msg
  again = frontier.make_samples(task, tok, length, num_samples=3, seed=seed)
  assert [a.gold for a in again] == [s.gold for s in samples]
  assert len({s.gold for s in samples}) > 1

"""Long-context tasks: exact lengths, evidence always inside, and forked scoring."""

import os

import jax
import numpy as np
import pytest
from flax import nnx

from sparsity_jax.checkpoints.hf_tokenizer import HFTokenizer
from sparsity_jax.data.tokenizer import ByteTokenizer
from sparsity_jax.evals import long_context as lc
from sparsity_jax.models import ModelConfig, TransformerLM
from sparsity_jax.moa import calibrate
from sparsity_jax.moa import plan as plan_lib
from support import ROOT

FIXTURE = os.path.join(ROOT, "tests", "fixtures", "hf", "llama")
BASE = dict(vocab_size=260, num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, head_dim=8,
            mlp_dim=64, max_len=512)


def _tokenizer(name, request):
  if name == "bytes":
    return ByteTokenizer()
  if name == "fixture":
    return HFTokenizer.from_dir(FIXTURE)
  return request.getfixturevalue("smollm2")[1]  # The real model's (loaded once a session).


def _documents(tok, rng):
  words = ["alpha", "beta", "gamma", "delta", "import", "return", "value", "(x)", "\n"]
  return [lc.encode(tok, " ".join(rng.choice(words, n))) for n in (300, 900, 3000)]


@pytest.mark.parametrize("name", ["bytes", "fixture", "smollm2"])
def test_every_generated_prompt_has_its_length_and_its_evidence(name, request):
  """Every task generator, chat and plain, at random lengths: exactly the requested number
  of tokens, and the evidence (needle, line, document) decodes inside the context; the
  calibration prompts likewise at length + 1 - response_len."""
  tok = _tokenizer(name, request)
  rng = np.random.default_rng(np.random.randint(1 << 30))
  documents = _documents(tok, rng)
  for chat in ([False, True] if lc.has_chat_template(tok) else [False]):
    for task in lc.TASKS:
      for length in rng.integers(700, 1400, 2):
        prompts = lc.make_prompts(task, tok, int(length), 5, seed=int(rng.integers(1 << 30)),
                                  chat=chat, documents=documents)
        assert len(prompts) == 5
        for p in prompts:
          lc.check_prompt(p, tok, int(length))
          if p.answer:  # The needle holds the answer the question asks for.
            assert p.answer in lc.decode(tok, p.tokens[slice(*p.evidence)])
      length, response = int(rng.integers(800, 1200)), int(rng.integers(1, 130))
      for p in calibrate.default_prompts(length, 3, response_len=response, tasks=(task,),
                                         seed=int(rng.integers(1 << 30)), tokenizer=tok,
                                         chat=chat, documents=documents,
                                         spread_depths=bool(rng.integers(2))):
        lc.check_prompt(p, tok, length + 1 - response)


def test_depths_are_controlled_and_questions_batch():
  tok = ByteTokenizer()
  prompts = lc.make_prompts("kv_retrieval", tok, 1500, 8, seed=3, needles=4)
  assert len({p.context_id for p in prompts}) == 2  # 4 questions per haystack.
  for cid in (0, 1):
    group = [p for p in prompts if p.context_id == cid]
    assert len({p.length - p.context_len for p in group}) == 1  # Equal question lengths.
    assert len({p.tokens[:p.context_len].tobytes() for p in group}) == 1  # Shared context.
    for i, d in enumerate(sorted(p.depth for p in group)):  # One needle per quarter (snapped
      assert i / 4 - 0.03 <= d <= (i + 1) / 4 + 0.03  # to the nearest sentence start).
  depths = [p.depth for p in lc.make_prompts("passkey", tok, 1500, 5, seed=0)]
  np.testing.assert_allclose(depths, [0.1, 0.3, 0.5, 0.7, 0.9], atol=0.05)
  # Calibration with spread_depths: a task's j-th of m samples has its evidence in [j/m,
  # (j+1)/m) (snapped to a sentence start); the default draws it anywhere.
  prompts = calibrate.default_prompts(1500, 8, response_len=16, seed=1, spread_depths=True,
                                      tasks=("passkey", "kv_retrieval"), tokenizer=tok)
  for task in ("passkey", "kv_retrieval"):
    depths = [p.depth for p in prompts if p.task == task]
    assert len(depths) == 4
    for j, d in enumerate(depths):
      assert j / 4 - 0.03 <= d <= (j + 1) / 4 + 0.03, (task, j, d)


def test_prompts_that_cannot_hold_their_evidence_raise():
  tok = ByteTokenizer()
  with pytest.raises(ValueError, match="passkey prompts need at least"):
    lc.passkey(tok, 200, np.random.default_rng(0))
  with pytest.raises(ValueError, match="kv_retrieval prompts need at least"):
    lc.kv_retrieval(tok, 300, np.random.default_rng(0), num_needles=4)
  with pytest.raises(ValueError, match="need a corpus document of"):
    lc.document(tok, 400, [np.zeros(100, np.int32)], np.random.default_rng(0))
  with pytest.raises(ValueError, match="lines prompts need at least"):
    lc.lines(tok, 40, np.random.default_rng(0))


@pytest.mark.parametrize("kind", ["dense", "moa"])
def test_forked_scoring_equals_a_forward_pass_of_each_whole_prompt(tmp_path, kind):
  """score_prompts (one prefill per haystack, forked per question, greedy with caches)
  emits, for each prompt, the tokens a full forward pass of prompt + output predicts, and
  the answer NLL of a forward pass of prompt + answer."""
  attention = {"kind": "dense"}
  if kind == "moa":
    plan = plan_lib.Plan(alpha=np.array([[0.0, 64.0]]), beta=np.array([[0.25, 0.0]]),
                         sink=np.array([[4, 0]]), num_heads=4, max_length=512)
    plan_lib.save_plan(plan, str(tmp_path / "plan.json"))
    attention = {"kind": "moa", "plan": str(tmp_path / "plan.json"), "block_size": 16}
  model = TransformerLM(ModelConfig(**{**BASE, "num_layers": 1}, attention=attention),
                        rngs=nnx.Rngs(np.random.randint(1 << 30)))
  tok = ByteTokenizer()
  prompts = lc.make_prompts("kv_retrieval", tok, 448, 3, seed=np.random.randint(1 << 30),
                            needles=3)
  got = lc.score_prompts(model, tok, prompts, new_tokens=7, batch_size=2)
  outputs = [np.asarray(r["output_tokens"]) for r in got]
  assert [r["output"] for r in got] == [tok.decode(o) for o in outputs]
  # MoA spans: N = 448 + 6 = 454 in the forward pass, 448 + 7 = 455 in the caches; the
  # windows of this plan are equal there (113 and 64).
  seqs = np.stack([np.concatenate([p.tokens, a]) for p, a in zip(
      prompts + prompts, [p.answer_tokens for p in prompts] + [o[:-1] for o in outputs])])
  logp = np.asarray(nnx.jit(lambda m, x: jax.nn.log_softmax(m(x), axis=-1))(model, seqs))
  for i, (p, r) in enumerate(zip(prompts, got)):
    np.testing.assert_array_equal(logp[3 + i, 447:].argmax(-1), outputs[i])  # Greedy.
    tail = logp[i, 447:453]
    nll = -tail[np.arange(6), p.answer_tokens]
    np.testing.assert_allclose(r["answer_nll"], nll.mean(), rtol=2e-4)
    assert r["forced"] == bool((tail.argmax(-1) == p.answer_tokens).all())
  assert got[0]["prefill_tokens"] > 0 and got[1]["prefill_tokens"] == 0
  nll = lc.document_nll(model, [prompts[0].tokens[:65]])
  assert nll.shape == (1, 64) and np.isfinite(nll).all()

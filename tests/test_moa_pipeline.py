"""The MoA pipeline end to end on a tiny random model, resume, and retrieval data."""

import dataclasses
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparsity_jax.checkpoints.hf_tokenizer import HFTokenizer
from sparsity_jax.data import corpus, retrieval
from sparsity_jax.data.tokenizer import ByteTokenizer
from sparsity_jax.models import ModelConfig, TransformerLM, generation
from sparsity_jax.moa import calibrate, pipeline, plan as plan_lib
from support import ROOT, subprocess_env

BASE = dict(vocab_size=260, num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, head_dim=8,
            mlp_dim=64, max_len=256)


def test_pipeline_end_to_end_and_resume(tmp_path):
  model = TransformerLM(ModelConfig(**BASE), rngs=nnx.Rngs(0))
  opts = pipeline.Options(out=str(tmp_path / "moa"), lengths=(64, 128), extend_length=256,
                          validate_length=192, budget=0.5, sink=4, block_size=16,
                          num_samples=2, response_len=8, num_intervals=2)
  results = pipeline.run(model, opts, log=lambda *_: None)
  assert set(results) == set(pipeline.STAGES)
  out = opts.out
  for name in ("calib_64.npz", "calib_192.npz", "influence_128.npz", "plan.json", "plan.png",
               "validate.json", "apply.json"):
    assert os.path.exists(os.path.join(out, name)), name
  tokens, mask = np.load(os.path.join(out, "calib_64.npz")).values()
  assert tokens.shape == (2, 65) and mask[:, -8:].all() and not mask[:, :-8].any()
  plan = plan_lib.load_plan(os.path.join(out, "plan.json"))
  for n in (64, 128, 256):
    assert plan.density(n) <= 0.5 + 1e-9
  applied = json.load(open(os.path.join(out, "apply.json")))
  assert applied["256"]["ratio"] == pytest.approx(plan.density(256))
  logged = []
  again = pipeline.run(model, opts, log=logged.append)  # Everything is done: all skipped.
  assert again == {} and len(logged) == len(pipeline.STAGES)
  os.remove(os.path.join(out, "stages", "apply.done"))
  assert set(pipeline.run(model, opts, log=lambda *_: None)) == {"apply"}


def test_calibration_bad_input():
  model = TransformerLM(ModelConfig(**BASE), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="empty calibration set"):
    calibrate.calibration_set(model, [], length=64)
  with pytest.raises(ValueError, match="exceeds the model's max_len"):
    calibrate.calibration_set(model, [np.zeros(600, np.int32)], length=512)


def test_search_stage_rejects_unprofiled_length(tmp_path):
  model = TransformerLM(ModelConfig(**BASE), rngs=nnx.Rngs(0))
  opts = pipeline.Options(out=str(tmp_path), lengths=(64,), extend_length=128,
                          validate_length=128)
  with pytest.raises(ValueError, match="length 64 was not profiled"):
    pipeline.run(model, opts, ["search"], log=lambda *_: None)


def test_retrieval_samples_and_scoring():
  samples = retrieval.dataset(np.random.randint(1 << 30), 512, 20)
  assert len({len(s.prompt) for s in samples}) == 1 and len(samples[0].prompt) <= 512
  assert {s.position_decile for s in samples} == set(range(10))
  for s in samples:
    assert f"REGISTER_CONTENT is <{s.answer}>" in s.prompt
  outs = [s.answer if i % 2 else "no idea" for i, s in enumerate(samples)]
  result = retrieval.score(samples, outs)
  assert result["accuracy"] == 0.5 and set(result["by_decile"]) == set(range(10))


def _documents(text):
  return [d for d in text.split(retrieval.HEADER) if d.strip()]


def test_retrieval_training_blocks_hold_whole_consistent_documents():
  seed, block = np.random.randint(1 << 30), 512
  tokens = retrieval.token_blocks(seed, 6, block)
  assert tokens.shape == (6 * block,) and tokens.max() < 256
  for b in range(6):
    text = bytes(tokens[b * block:(b + 1) * block].astype(np.uint8)).decode()
    assert text.startswith(retrieval.HEADER)  # No document crosses a block boundary.
    for doc in _documents(text):
      table = dict(re.findall(r"^line (\w+): REGISTER_CONTENT is <(\d+)>$", doc, flags=re.M))
      asked = re.findall(r"in line (\w+)\? Answer: <(\d+)>$", doc, flags=re.M)
      assert table and asked and all(table[k] == v for k, v in asked)


def test_retrieval_mix_fraction_and_determinism():
  text = np.arange(256 * 40, dtype=np.uint16) % 200
  mixed = corpus.mix_retrieval(text, 0.5, 256, seed=1)
  blocks = mixed.reshape(-1, 256)
  is_doc = np.array([bytes(b[:len(retrieval.HEADER)].astype(np.uint8)) ==
                     retrieval.HEADER.encode() for b in blocks])
  assert len(blocks) == 80 and is_doc.sum() == 40
  assert 0 < is_doc[:20].sum() < 20  # Shuffled: the first (validation) batches mix both.
  np.testing.assert_array_equal(mixed, corpus.mix_retrieval(text, 0.5, 256, seed=1))
  with pytest.raises(ValueError, match="retrieval_fraction"):
    corpus.mix_retrieval(text, 1.0, 256, seed=1)


def test_forced_match_agrees_with_greedy_decoding():
  model = TransformerLM(ModelConfig(**BASE), rngs=nnx.Rngs(np.random.randint(1 << 30)))
  rng = np.random.default_rng(np.random.randint(1 << 30))
  prompts = rng.integers(0, 256, (4, 40))
  greedy = generation.generate(model, prompts, 6)[:, 40:]
  assert retrieval.forced_match(model, prompts, greedy).all()
  wrong = greedy.copy()
  rows, cols = np.arange(4), rng.integers(0, 6, 4)
  wrong[rows, cols] = (wrong[rows, cols] + 1 + rng.integers(0, 250, 4)) % 256
  assert not retrieval.forced_match(model, prompts, wrong).any()


class _Oracle(nnx.Module):
  """Logits one-hot on the true next byte of the reference text the input is a prefix of."""

  def __init__(self, texts):
    self.refs = nnx.Variable(jnp.asarray(np.stack([ByteTokenizer().encode(t) for t in texts])))

  def __call__(self, x_bt):
    refs, t = self.refs.get_value(), x_bt.shape[1]
    row = jnp.argmax((x_bt[:, None, :] == refs[None, :, :t]).all(-1), axis=1)
    return jax.nn.one_hot(refs[row, 1:t + 1], 260)


def test_forced_retrieval_scoring_with_an_oracle():
  samples = retrieval.dataset(np.random.randint(1 << 30), 600, 20)
  oracle = _Oracle([s.text for s in samples])
  result = retrieval.evaluate_forced(oracle, samples, batch_size=8)
  assert result["accuracy"] == 1.0 and set(result["by_decile"]) == set(range(10))
  wrong = np.random.randint(20)
  answer = str((int(samples[wrong].answer) + 1 + np.random.randint(9)) % 10 ** 5).zfill(5)
  corrupted = [dataclasses.replace(s, answer=answer) if i == wrong else s
               for i, s in enumerate(samples)]
  result = retrieval.evaluate_forced(oracle, corrupted, batch_size=8)
  assert result["accuracy"] == 19 / 20
  assert result["by_decile"][corrupted[wrong].position_decile] == 0.5  # 2 samples per decile.
  with pytest.raises(ValueError, match=f"at least {retrieval.document_bytes(1, 1)} tokens"):
    retrieval.token_blocks(0, 1, 64)


def test_launcher_runs_the_pipeline_on_an_imported_hf_model(tmp_path):
  """launch/moa.py all on the tiny Llama fixture (GQA, llama3 RoPE, its own tokenizer)."""
  out = tmp_path / "moa"
  cmd = [sys.executable, "launch/moa.py", "all",
         f"--hf_dir={os.path.join(ROOT, 'tests', 'fixtures', 'hf', 'llama')}", f"--out={out}",
         "--lengths=64,128", "--extend_length=256", "--validate_length=192", "--budget=0.5",
         "--sink=4", "--block_size=16", "--num_samples=2", "--response_len=8",
         "--num_intervals=1"]
  run = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True,
                       timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]
  plan = plan_lib.load_plan(str(out / "plan.json"))
  assert (plan.num_layers, plan.num_kv_heads, plan.num_heads) == (2, 2, 4)  # Per KV head.
  assert all(plan.density(n) <= 0.5 + 1e-9 for n in (64, 128, 256))
  applied = json.load(open(out / "apply.json"))
  assert applied["256"]["ratio"] == pytest.approx(plan.density(256))
  tokens = np.load(out / "calib_64.npz")["tokens"]  # In the Llama tokenizer's ids, not bytes:
  tok = HFTokenizer.from_dir(os.path.join(ROOT, "tests", "fixtures", "hf", "llama"))
  text = tok.decode(tokens[0])
  assert text.count("line ") >= 2 and "Answer: <" in text


@pytest.mark.parametrize("length", [200, 1024, 2300, 4096, 16384])
def test_retrieval_prompt_lengths_and_key_widths(length):
  """Prompts fill the length they are made for, with keys as short as their count allows
  (one character up to 62 lines, then two), all distinct."""
  n = retrieval.lines_for_length(length)
  sample = retrieval.make_sample(np.random.default_rng(np.random.randint(1 << 30)), n)
  keys = re.findall(r"^line (\w+):", sample.prompt, flags=re.M)
  assert len(keys) == len(set(keys)) == n
  assert {len(k) for k in keys} == {retrieval.key_width(n)}
  assert len(sample.prompt) <= length - 8 < retrieval.prompt_bytes(n + 1) or n == 62
  assert retrieval.prompt_bytes(retrieval.lines_at_least(length)) >= length


def test_forced_answer_nll_matches_a_direct_computation():
  model = TransformerLM(ModelConfig(**BASE), rngs=nnx.Rngs(np.random.randint(1 << 30)))
  samples = retrieval.dataset(np.random.randint(1 << 30), 200, 3)
  got = retrieval.evaluate_forced(model, samples)["answer_nll"]
  seqs = np.stack([ByteTokenizer().encode(s.text[:-1]) for s in samples])  # answer + '>'.
  logp = jax.nn.log_softmax(model(jnp.asarray(seqs[:, :-1])), axis=-1)
  p = len(samples[0].prompt)
  nll = -np.take_along_axis(np.asarray(logp[:, p - 1:]), seqs[:, p:, None], -1)[..., 0]
  np.testing.assert_allclose(got, nll.mean(), rtol=1e-5)

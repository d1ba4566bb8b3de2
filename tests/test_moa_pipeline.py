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
            mlp_dim=64, max_len=512)
TINY_OPTIONS = dict(lengths=(128, 256), extend_length=512, validate_length=192, budget=0.5,
                    sink=4, block_size=16, num_samples=2, response_len=8, num_intervals=1,
                    min_cache=16, tasks=("lines", "document"))


def test_pipeline_end_to_end_and_resume(tmp_path):
  model = TransformerLM(ModelConfig(**BASE), rngs=nnx.Rngs(0))
  opts = pipeline.Options(out=str(tmp_path / "moa"), **TINY_OPTIONS)
  results = pipeline.run(model, opts, log=lambda *_: None)
  assert set(results) == set(pipeline.STAGES)
  out = opts.out
  for name in ("calib_128.npz", "calib_192.npz", "calib_128.json", "influence_256.npz",
               "plan.json", "plan.png", "validate.json", "apply.json"):
    assert os.path.exists(os.path.join(out, name)), name
  tokens, mask = np.load(os.path.join(out, "calib_128.npz")).values()
  assert tokens.shape == (2, 129) and not mask[:, :-8].any() and mask[:, -8].all()
  graded = json.load(open(os.path.join(out, "calib_128.json")))
  assert [g["task"] for g in graded] == ["lines", "document"] and "correct" in graded[0]
  plan = plan_lib.load_plan(os.path.join(out, "plan.json"))
  assert plan.min_window == 16 - 4  # The cache floor: sink + window >= min_cache.
  for n in (128, 256, 512):
    assert plan.density(n) <= 0.5 + 1e-9
  applied = json.load(open(os.path.join(out, "apply.json")))
  assert applied["512"]["ratio"] == pytest.approx(plan.density(512))
  text = pipeline.summary(out)
  assert "chosen plan" in text and "vs dense" in text and "KV cache @512" in text
  assert "not the paper's defaults" not in text
  logged = []
  again = pipeline.run(model, opts, log=logged.append)  # Everything is done: all skipped.
  assert again == {} and len(logged) == len(pipeline.STAGES)
  os.remove(os.path.join(out, "stages", "apply.done"))
  assert set(pipeline.run(model, opts, log=lambda *_: None)) == {"apply"}


# (stage, stages finished in --out, streaming_rest, the missing stages it names or None).
@pytest.mark.parametrize("stage,finished,streaming,lacking", [
    ("calibrate", (), False, None),
    ("profile", (), False, "calibrate"),
    ("profile", (), True, None),  # Skipped with streaming_rest: needs nothing.
    ("search", (), False, "calibrate / profile"),
    ("search", ("calibrate",), False, "profile"),
    ("search", (), True, None),  # No profile, no MILP.
    ("validate", (), False, "calibrate / profile / search"),
    ("validate", ("calibrate",), False, "profile / search"),
    ("validate", ("calibrate", "profile"), False, "search"),
    ("validate", ("search",), False, "calibrate"),
    ("validate", ("search",), True, "calibrate"),
    ("validate", ("calibrate", "search"), True, None),
    ("apply", (), False, "calibrate / profile / search / validate"),
    ("apply", ("calibrate", "profile", "search"), False, "validate"),
    ("apply", ("search",), False, "calibrate / validate"),
    ("apply", ("search",), True, "calibrate / validate"),
    ("apply", ("validate",), False, None),
])
def test_a_stage_whose_inputs_are_missing_names_the_stage_to_run_first(
    tmp_path, stage, finished, streaming, lacking):
  opts = pipeline.Options(out=str(tmp_path / "moa"), **TINY_OPTIONS, streaming_rest=streaming,
                          full_span_layers=(0,) if streaming else ())
  for done in finished:
    pipeline._finish(opts.out, done, {})
  if lacking is None:
    pipeline.check_stages(opts, [stage])
    return
  first = lacking.split(" / ")[0]
  with pytest.raises(ValueError) as e:
    pipeline.check_stages(opts, [stage])
  message = str(e.value)
  assert message.startswith(f"{opts.out} has no {lacking} results: run `launch/moa.py {first} "
                            "...`") and message.endswith(" (or `all`) first"), message
  assert "\n" not in message and "config.model" not in message
  # Run in the same command (in pipeline order), the missing stages are not missing.
  pipeline.check_stages(opts, [stage] + lacking.split(" / "))


def test_missing_inputs_are_refused_before_anything_runs_and_in_one_line(tmp_path):
  """pipeline.run refuses before writing anything; launch/moa.py says it in one line,
  before it loads the model (an --out where only search ran, as with streaming_rest)."""
  model = TransformerLM(ModelConfig(**BASE), rngs=nnx.Rngs(0))
  opts = pipeline.Options(out=str(tmp_path / "fresh"), **TINY_OPTIONS)
  with pytest.raises(ValueError, match="has no calibrate / profile / search results"):
    pipeline.run(model, opts, ["validate"], log=lambda *_: None)
  assert not os.path.exists(opts.out)
  out = tmp_path / "moa"
  pipeline._finish(str(out), "search", {})
  fixture = os.path.join(ROOT, "tests", "fixtures", "hf", "llama")
  for stage, line in [
      ("validate", f"error: {out} has no calibrate results: run `launch/moa.py calibrate ...` "
                   "(or `all`) first"),
      ("apply", f"error: {out} has no calibrate / validate results: run `launch/moa.py "
                "calibrate ...` then validate (or `all`) first")]:
    run = subprocess.run([sys.executable, "launch/moa.py", stage, f"--hf_dir={fixture}",
                          f"--out={out}"], cwd=ROOT, env=subprocess_env(), capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 2 and run.stderr.strip() == line, run.stderr[-3000:]
  assert sorted(os.listdir(out)) == ["stages"]  # Nothing written (no options.json either).


def test_another_tools_directory_is_refused_in_one_line(tmp_path):
  """An --out made by launch/duo_gates.py (its own options.json) is refused, --restart or
  not, and none of its files is touched; an old MoA options.json (no "tool") still counts
  as the pipeline's, a new one says "tool": "moa"."""
  model = TransformerLM(ModelConfig(**BASE), rngs=nnx.Rngs(0))
  out = tmp_path / "duo"
  out.mkdir()
  duo = {"model": "smollm2", "lengths": ["1024"], "num_samples": 20, "num_steps": 1000,
         "sink": 64, "recent": 256, "seed": 0}
  (out / "options.json").write_text(json.dumps(duo))
  (out / "gates.json").write_text("{}")
  (out / "plan.json").write_text("{}")  # A name the pipeline's --restart would delete.
  opts = pipeline.Options(out=str(out), **TINY_OPTIONS)
  message = (f"{out} holds another tool's run (options.json is not launch/moa.py's): use "
             "another --out")
  for restart in (False, True):
    with pytest.raises(ValueError) as e:
      pipeline.run(model, opts, ["calibrate"], restart=restart, log=lambda *_: None)
    assert str(e.value) == message
  (other := tmp_path / "tagged").mkdir()
  (other / "options.json").write_text(json.dumps({**opts.to_json(), "tool": "duo_gates"}))
  with pytest.raises(ValueError, match="holds another tool's run"):
    pipeline.check_directory(dataclasses.replace(opts, out=str(other)))
  assert sorted(os.listdir(out)) == ["gates.json", "options.json", "plan.json"]
  assert json.loads((out / "options.json").read_text()) == duo
  fixture = os.path.join(ROOT, "tests", "fixtures", "hf", "llama")
  for restart in ([], ["--restart"]):
    run = subprocess.run([sys.executable, "launch/moa.py", "all", f"--hf_dir={fixture}",
                          f"--out={out}", *restart], cwd=ROOT, env=subprocess_env(),
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and run.stderr.strip() == f"error: {message}", run.stderr[-3000:]
  assert sorted(os.listdir(out)) == ["gates.json", "options.json", "plan.json"]
  legacy = dataclasses.replace(opts, out=str(tmp_path / "legacy"))
  os.makedirs(legacy.out)
  with open(os.path.join(legacy.out, "options.json"), "w") as f:
    json.dump({"out": legacy.out, **legacy.to_json()}, f)  # Written before "tool" existed.
  pipeline.check_directory(legacy)
  pipeline.check_stages(legacy, ["calibrate"])


def test_calibrate_and_profile_resume_at_the_length_they_were_on(tmp_path, monkeypatch):
  """Ctrl-C during calibrate or profile: the rerun keeps every finished length (a file
  half-written when interrupted is not one) and ends equal to an uninterrupted run; the
  stage is marked done only when every length is."""
  from sparsity_jax.moa import profile as profile_lib
  model = TransformerLM(ModelConfig(**BASE), rngs=nnx.Rngs(0))
  opts = pipeline.Options(out=str(tmp_path / "moa"), **TINY_OPTIONS)
  quiet = lambda *_: None
  calls = []
  real_set, real_profile, real_replace = (calibrate.calibration_set,
                                          profile_lib.profile_length, os.replace)

  def counted(real, stop_at=None):
    def call(*args, length, **kw):
      calls.append(length)
      if length == stop_at:
        raise KeyboardInterrupt
      return real(*args, length=length, **kw)
    return call

  def path(name):
    return os.path.join(opts.out, name)

  # Interrupted while generating length 256: 128 was finished.
  monkeypatch.setattr(calibrate, "calibration_set", counted(real_set, stop_at=256))
  with pytest.raises(KeyboardInterrupt):
    pipeline.run(model, opts, ["calibrate", "profile"], log=quiet)
  assert calls == [128, 256] and not pipeline.done(opts.out, "calibrate")
  assert os.path.exists(path("calib_128.npz")) and not os.path.exists(path("calib_256.npz"))
  kept = os.stat(path("calib_128.npz")).st_mtime_ns

  # Interrupted while saving length 256: its half-written file is not a finished length.
  def replace(src, dst):
    if dst.endswith("calib_256.npz"):
      raise KeyboardInterrupt
    real_replace(src, dst)

  monkeypatch.setattr(calibrate, "calibration_set", counted(real_set))
  monkeypatch.setattr(os, "replace", replace)
  calls.clear()
  with pytest.raises(KeyboardInterrupt):
    pipeline.run(model, opts, ["calibrate", "profile"], log=quiet)
  monkeypatch.setattr(os, "replace", real_replace)
  assert calls == [256] and os.path.exists(path("calib_256.npz.partial"))
  assert not os.path.exists(path("calib_256.npz"))

  # Calibrate finishes (128 kept); profile is interrupted on its second length.
  monkeypatch.setattr(profile_lib, "profile_length", counted(real_profile, stop_at=256))
  calls.clear()
  logged = []
  with pytest.raises(KeyboardInterrupt):
    pipeline.run(model, opts, ["calibrate", "profile"], log=logged.append)
  assert calls == [256, 192, 128, 256]  # calibrate 256 and 192, then profile 128 and 256.
  assert any("calibrate 128: 2 samples (kept from an earlier run)" in l for l in logged)
  assert os.stat(path("calib_128.npz")).st_mtime_ns == kept
  assert pipeline.done(opts.out, "calibrate") and not pipeline.done(opts.out, "profile")
  profiled = os.stat(path("influence_128.npz")).st_mtime_ns

  # The rerun profiles only 256.
  monkeypatch.setattr(profile_lib, "profile_length", counted(real_profile))
  calls.clear()
  pipeline.run(model, opts, ["calibrate", "profile"], log=quiet)
  assert calls == [256] and pipeline.done(opts.out, "profile")
  assert os.stat(path("influence_128.npz")).st_mtime_ns == profiled

  # Equal to an uninterrupted run, file by file.
  clean = dataclasses.replace(opts, out=str(tmp_path / "clean"))
  pipeline.run(model, clean, ["calibrate", "profile"], log=quiet)
  names = sorted(n for n in os.listdir(clean.out) if n.endswith((".npz", ".json"))
                 and n != "options.json")
  assert names == sorted(n for n in os.listdir(opts.out) if n.endswith((".npz", ".json"))
                         and n != "options.json")
  assert len(names) == 8  # calib_{128,192,256}.npz / .json, influence_{128,256}.npz.
  for name in names:
    a, b = os.path.join(opts.out, name), os.path.join(clean.out, name)
    if name.endswith(".json"):
      assert json.load(open(a)) == json.load(open(b)), name
    else:
      with np.load(a) as x, np.load(b) as y:
        assert sorted(x) == sorted(y)
        for key in x:
          np.testing.assert_array_equal(x[key], y[key], err_msg=f"{name}: {key}")

  assert json.load(open(path("options.json")))["tool"] == "moa"  # Whose directory it is.
  # --force redoes the stage from scratch, every length.
  calls.clear()
  pipeline.run(model, opts, ["profile"], force=True, log=quiet)
  assert calls == [128, 256] and pipeline.done(opts.out, "profile")


def test_calibration_bad_input():
  model = TransformerLM(ModelConfig(**BASE), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="empty calibration set"):
    calibrate.calibration_set(model, [], length=64)
  with pytest.raises(ValueError, match="exceeds the model's max_len"):
    calibrate.calibration_set(model, [np.zeros(600, np.int32)], length=1024, response_len=8)
  with pytest.raises(ValueError, match="exactly 57 tokens"):  # Never truncated to fit.
    calibrate.calibration_set(model, [np.zeros(80, np.int32)], length=64, response_len=8)


def test_search_stage_rejects_unprofiled_length(tmp_path):
  model = TransformerLM(ModelConfig(**BASE), rngs=nnx.Rngs(0))
  opts = pipeline.Options(out=str(tmp_path), lengths=(64,), extend_length=128,
                          validate_length=128, sink=4, response_len=8, min_cache=16,
                          tasks=("document",))
  with pytest.raises(ValueError, match="has no calibrate / profile results"):
    pipeline.run(model, opts, ["search"], log=lambda *_: None)
  for stage in ("calibrate", "profile"):  # Marked done, but its file is gone.
    pipeline._finish(opts.out, stage, {})
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
  fixture = os.path.join(ROOT, "tests", "fixtures", "hf", "llama")
  cmd = [sys.executable, "launch/moa.py", "all", f"--hf_dir={fixture}", f"--out={out}",
         "--lengths=256,384", "--extend_length=512", "--validate_length=320", "--budget=0.5",
         "--sink=4", "--block_size=16", "--num_samples=2", "--response_len=8",
         "--num_intervals=1", "--min_cache=16", "--tasks=passkey,document"]
  run = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True,
                       timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]
  assert " I" not in run.stderr and "INFO" not in run.stderr  # No absl / JAX INFO lines.
  assert "chosen plan" in run.stdout and "KV cache @512" in run.stdout  # The summary.
  plan = plan_lib.load_plan(str(out / "plan.json"))
  assert (plan.num_layers, plan.num_kv_heads, plan.num_heads) == (2, 2, 4)  # Per KV head.
  assert all(plan.density(n) <= 0.5 + 1e-9 for n in (256, 384, 512))
  applied = json.load(open(out / "apply.json"))
  assert applied["512"]["ratio"] == pytest.approx(plan.density(512))
  tokens = np.load(out / "calib_256.npz")["tokens"]  # In the Llama tokenizer's ids, not bytes:
  tok = HFTokenizer.from_dir(fixture)
  text = tok.decode(tokens[0])
  assert "The pass key is" in text and "What is the pass key?" in text
  # The same --out with other options is refused before any stage runs, with the reason.
  again = subprocess.run([a for a in cmd if not a.startswith("--budget")] + ["--budget=0.25"],
                         cwd=ROOT, env=subprocess_env(), capture_output=True, text=True,
                         timeout=600)
  assert again.returncode != 0 and "was made with other options" in again.stderr
  assert "budget: 0.5 there, 0.25 now" in again.stderr
  assert json.load(open(out / "options.json"))["budget"] == 0.5


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


@pytest.mark.parametrize("change,message", [
    (dict(budget=0.0), "budget=0.0 must be in \\(0, 1\\]"),
    (dict(budget=1.5), "budget=1.5 must be in \\(0, 1\\]"),
    (dict(lengths=(128, 200)), "length 200 is not a multiple of block_size=16"),
    (dict(lengths=(128, 1024), extend_length=1024), "lengths 1024 exceeds the model's context"),
    (dict(validate_length=600), "validate_length 600 exceeds the model's context of 512"),
    (dict(budget=0.02), "budget=0.02 is infeasible at length 128"),
    (dict(min_head_density=0.6), "min_head_density=0.6 must be in \\[0, budget=0.5\\]"),
    (dict(min_head_density=0.45), "infeasible at length 128.*lower --min_head_density"),
    (dict(tasks=("poems",)), "choose from passkey"),
    (dict(tasks=("passkey",)), "passkey prompts need at least"),
])
def test_options_are_checked_against_the_model_before_any_stage(tmp_path, change, message):
  model = TransformerLM(ModelConfig(**BASE), rngs=nnx.Rngs(0))
  opts = pipeline.Options(out=str(tmp_path / "moa"), **{**TINY_OPTIONS, **change})
  with pytest.raises(ValueError, match=message):
    pipeline.run(model, opts, log=lambda *_: None)
  assert not os.path.exists(opts.out)  # Nothing ran, nothing was written.


def test_an_out_made_with_other_options_is_refused_or_restarted(tmp_path):
  model = TransformerLM(ModelConfig(**BASE), rngs=nnx.Rngs(0))
  opts = pipeline.Options(out=str(tmp_path / "moa"), **{
      **TINY_OPTIONS, "lengths": (128,), "validate_length": 128, "tasks": ("lines",)})
  pipeline.run(model, opts, ["calibrate"], log=lambda *_: None)
  other = dataclasses.replace(opts, budget=0.25, num_samples=3)
  with pytest.raises(ValueError, match="budget: 0.5 there, 0.25 now; num_samples: 2 there"):
    pipeline.run(model, other, ["calibrate"], log=lambda *_: None)
  assert json.load(open(os.path.join(opts.out, "options.json")))["budget"] == 0.5
  logged = []
  pipeline.run(model, other, ["calibrate"], restart=True, log=logged.append)
  assert any("restart" in line for line in logged)
  assert json.load(open(os.path.join(opts.out, "options.json")))["budget"] == 0.25
  assert np.load(os.path.join(opts.out, "calib_128.npz"))["tokens"].shape == (3, 129)
  assert pipeline.run(model, other, ["calibrate"], log=lambda *_: None) == {}  # Resumes.


def test_calibration_answers_with_the_dense_model_and_masks_after_eos(tmp_path):
  """A run of a sparse core is calibrated with its dense model; a response ends at EOS
  (kept in the loss) and is right-padded with EOS outside the loss."""
  plan = plan_lib.uniform_plan(2, 2, 4, alpha=2.0, beta=0.0, sink=0, max_length=512)
  plan_lib.save_plan(plan, str(tmp_path / "plan.json"))
  sparse = TransformerLM(ModelConfig(**BASE, scan_layers=False, attention={
      "kind": "moa", "plan": str(tmp_path / "plan.json"), "block_size": 16}), rngs=nnx.Rngs(1))
  dense = pipeline.dense_model(sparse)
  assert dense.cfg.attention["kind"] == "dense" and pipeline.dense_model(dense) is dense
  opts = pipeline.Options(out=str(tmp_path / "moa"), **{
      **TINY_OPTIONS, "lengths": (128,), "validate_length": 128, "tasks": ("lines",)})
  prompts = calibrate.default_prompts(128, 2, response_len=8, tasks=("lines",), seed=0)
  os.makedirs(opts.out)
  pipeline.stage_calibrate(sparse, opts, log=lambda *_: None)
  got = np.load(os.path.join(opts.out, "calib_128.npz"))["tokens"]
  want, _, _ = calibrate.calibration_set(dense, prompts, length=128, response_len=8,
                                         eos_id=ByteTokenizer.eos_id)
  np.testing.assert_array_equal(got, want)  # (The sparse core, window 2, would differ.)
  eos = int(want[0, 122])  # Pretend the dense model's second response token is EOS.
  tokens, mask, responses = calibrate.calibration_set(dense, prompts, length=128,
                                                      response_len=8, eos_id=eos)
  first = int(np.argmax(responses[0] == eos))
  assert first <= 1 and (responses[0, first:] == eos).all()
  assert mask[0, 121:121 + first + 1].all() and not mask[0, 121 + first + 1:].any()
  graded = calibrate.grade(prompts, want[:, 121:])
  assert calibrate.check([dict(g, correct=False) for g in graded], 128) is not None
  assert calibrate.check([dict(g, correct=True) for g in graded], 128) is None


def test_loss_tokens_keep_the_start_of_each_response(tmp_path):
  mask = np.array([[0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1]])
  np.testing.assert_array_equal(calibrate.first_tokens(mask, 2),
                                [[0, 0, 1, 1, 0, 0], [0, 1, 1, 0, 0, 0]])
  assert calibrate.first_tokens(mask, 0) is mask
  path = str(tmp_path / "calib.npz")
  calibrate.save(path, np.zeros_like(mask), mask)
  assert [int(m.sum()) for _, m in calibrate.load(path, loss_tokens=2)] == [2, 2]
  opts = pipeline.Options(out=str(tmp_path / "moa"))
  os.makedirs(opts.out)
  old = opts.to_json()
  del old["loss_tokens"]  # A directory written before the option existed: its default.
  json.dump(old, open(os.path.join(opts.out, "options.json"), "w"))
  pipeline.check_directory(opts)
  with pytest.raises(ValueError, match="loss_tokens: 0 there, 8 now"):
    pipeline.check_directory(dataclasses.replace(opts, loss_tokens=8))


def test_retrieval_heads_variant_holds_the_most_attending_heads(tmp_path, monkeypatch):
  """--retrieval_heads=k: the search stage scores KV heads by the dense model's attention
  on retrieval evidence, holds the top k at full span, and the budget still holds."""
  from sparsity_jax.moa import retrieval
  model = TransformerLM(ModelConfig(**BASE), rngs=nnx.Rngs(0))
  opts = pipeline.Options(out=str(tmp_path / "moa"), **{**TINY_OPTIONS, "lengths": (384,),
                                                         "validate_length": 384},
                          retrieval_heads=1)
  pipeline.run(model, opts, stages=("calibrate", "profile", "search"), log=lambda *_: None)
  heads = json.load(open(os.path.join(opts.out, "retrieval_heads.json")))
  scores = np.array(heads["needle_attention"])
  assert scores.shape == (2, 2) and ((scores > 0) & (scores <= 1)).all()
  assert heads["full_span"] == np.argwhere(retrieval.select(scores, 1)).tolist()
  (l, k), = heads["full_span"]
  for plan in pipeline.load_plans(opts.out):
    assert plan.alpha[l, k] == 0 and plan.beta[l, k] == 1 and plan.density(512) <= 0.5 + 1e-9
  # Scores are attention masses: for one prompt they equal a direct softmax of q k^T.
  tok = ByteTokenizer()
  prompt = retrieval.prompts(tok, 384, 1, seed=3)[0]
  got = retrieval.needle_attention(model, [prompt])
  seq = jnp.asarray(np.concatenate([prompt.tokens, prompt.answer_tokens[:-1]])[None])
  want = _evidence_mass_by_hand(model, seq, prompt, monkeypatch)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
  # Another budget from the same calibration and profile (--calibration_from): copied, not
  # recomputed; a directory calibrated otherwise is refused.
  other = dataclasses.replace(opts, out=str(tmp_path / "moa75"), budget=0.75, retrieval_heads=0,
                              calibration_from=opts.out)
  logged = []
  pipeline.run(model, other, stages=("calibrate", "profile", "search"), log=logged.append)
  assert any("copied from" in line for line in logged)
  assert not any(line.startswith("[moa] profile: done") for line in logged)
  for name in ("calib_384.npz", "influence_384.npz"):
    assert open(os.path.join(other.out, name), "rb").read() == open(
        os.path.join(opts.out, name), "rb").read()
  assert pipeline.load_plans(other.out)[0].density(384) <= 0.75 + 1e-9
  assert "not the paper's defaults: retrieval_heads=1" in pipeline.summary(opts.out)
  # --full_span_layers: every KV head of the named layers at full span, the budget holds.
  layered = dataclasses.replace(other, out=str(tmp_path / "layers"), full_span_layers=(1,))
  pipeline.run(model, layered, stages=("calibrate", "profile", "search"), log=lambda *_: None)
  for plan in pipeline.load_plans(layered.out):
    assert (plan.alpha[1] == 0).all() and (plan.beta[1] == 1).all()
    assert plan.density(512) <= 0.75 + 1e-9
  for bad, message in [((5,), "must be distinct layers in \\[0, 2\\)"),
                       ((0, 1), "alone use 1.000")]:
    with pytest.raises(ValueError, match=message):
      pipeline.check_options(model, dataclasses.replace(layered, full_span_layers=bad))
  # Another --loss_tokens shares the calibration but not the profile: profiled here.
  focused = dataclasses.replace(other, out=str(tmp_path / "lt"), loss_tokens=2)
  logged = []
  pipeline.run(model, focused, stages=("calibrate", "profile"), log=logged.append)
  assert any("copied from" in line and "profiling here" in line for line in logged)
  assert any(line.startswith("[moa] profile: done") for line in logged)
  assert any(line.startswith("[moa] profile 384: 2 samples in") for line in logged)  # Progress.
  assert open(os.path.join(focused.out, "calib_384.npz"), "rb").read() == open(
      os.path.join(opts.out, "calib_384.npz"), "rb").read()
  assert not np.array_equal(np.load(os.path.join(focused.out, "influence_384.npz"))["distance"],
                            np.load(os.path.join(opts.out, "influence_384.npz"))["distance"])
  with pytest.raises(ValueError, match="has no profile results .--calibration_from=.* has no "
                                       "profile to share.*: run `launch/moa.py profile ...`"):
    pipeline.run(model, dataclasses.replace(focused, out=str(tmp_path / "lt3"), loss_tokens=3),
                 stages=("search",), log=lambda *_: None)
  with pytest.raises(ValueError, match="is --out itself"):
    pipeline.check_options(model, dataclasses.replace(focused, calibration_from=focused.out))
  with pytest.raises(ValueError, match="is not a MoA directory with a finished calibrate"):
    pipeline.check_options(model, dataclasses.replace(other, calibration_from=str(tmp_path)))
  with pytest.raises(ValueError, match="calibrated with other options .num_samples"):
    pipeline.run(model, dataclasses.replace(other, out=str(tmp_path / "x"), num_samples=3),
                 stages=("search",), log=lambda *_: None)
  for bad, message in [(4, "retrieval_heads=4 must be in"), (2, "alone use 0.500"),
                       (1, "kv_retrieval prompts need at least")]:
    if bad == 1:
      opts = dataclasses.replace(opts, lengths=(256,), validate_length=256)
    with pytest.raises(ValueError, match=message):
      pipeline.check_options(model, dataclasses.replace(opts, retrieval_heads=bad))


def _evidence_mass_by_hand(model, seq, prompt, monkeypatch):
  """[L, K] attention on the evidence from the answer rows, from the q / k the dense
  model's own attention core receives (an independent path: no profiling model)."""
  from sparsity_jax.layers import attention
  seen = []
  original = attention.DenseAttention.__call__

  def record(self, q, k, v, **kw):
    seen.append((np.asarray(q[0], np.float64), np.asarray(k[0], np.float64)))
    return original(self, q, k, v, **kw)

  monkeypatch.setattr(attention.DenseAttention, "__call__", record)
  model(seq)
  cfg = model.cfg
  group = cfg.num_heads // cfg.num_kv_heads
  rows = np.arange(prompt.length - 1, seq.shape[1])
  start, end = prompt.evidence
  out = np.zeros((cfg.num_layers, cfg.num_heads))
  for layer, (q, k) in enumerate(seen):
    for n in range(cfg.num_heads):
      logits = q[rows, n] @ k[:, n // group].T / np.sqrt(q.shape[-1])
      logits[np.arange(seq.shape[1])[None] > rows[:, None]] = -np.inf
      p = np.exp(logits - logits.max(-1, keepdims=True))
      p /= p.sum(-1, keepdims=True)
      out[layer, n] = p[:, start:end].sum(-1).mean()
  return out.reshape(cfg.num_layers, cfg.num_kv_heads, group).mean(-1)


def test_long_context_benchmark_plots_any_number_of_variants(tmp_path):
  """benchmarks/moa_long_context.py draws and tabulates a grid of many variants (it ran
  out of markers past five)."""
  import importlib.util
  spec = importlib.util.spec_from_file_location(
      "moa_long_context", os.path.join(ROOT, "benchmarks", "moa_long_context.py"))
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)
  rows = [{"depth": d, "answer": "1", "output": "1" if d > 0.5 else "a", "correct": d > 0.5,
           "forced": True, "answer_nll": 0.1} for d in (0.2, 0.8)]
  task = {"accuracy": 0.5, "n": 2, "answer_nll": 0.1, "by_depth": {"0.0-0.5": 0.0, "0.5-1.0": 1.0},
          "rows": rows}
  names = ["dense", "uniform 50%"] + [f"V{i} 50%" for i in range(9)]
  cells = [{"variant": v, "length": 64, "density": 1.0 if v == "dense" else 0.5,
            "passkey": task, "kv_retrieval": task, "cache_bytes": 1, "prefill_tok_s": None,
            "decode_tok_s": None} for v in names]
  bench.plot(cells, str(tmp_path / "grid.png"))
  styles = bench.variant_styles(cells)  # Each variant its own color and marker.
  assert len({(s["color"], s["marker"]) for s in styles.values()}) == len(names) - 1
  assert os.path.getsize(tmp_path / "grid.png") > 1000
  assert bench.table(cells).count("\n") == len(names) + 1
  assert "-0.00" not in bench.answer_kinds(cells)
  # A committed plan file stands for its --out dir (budget from its meta, its sink).
  committed = os.path.join(ROOT, "docs", "results", "moa_smollm2", "plan_25_rh8.json")
  plan, budget, sink, block = bench.moa_entry(committed)
  assert (budget, sink, block) == (0.25, 64, 64) and plan.density(2048) <= 0.25 + 1e-9
  for bad, message in [(str(tmp_path), "has no options.json"),
                       (os.path.join(ROOT, "README.md"), "neither a launch/moa.py --out dir")]:
    with pytest.raises(ValueError, match=message):
      bench.moa_entry(bad)
  row = bench.passkey_table(cells).splitlines()[2].split(" | ")
  assert row[3:8] == ["0.50 (2)", "0.35", "0.50", "0.00 / 1.00", "0.0 1.0"], row
  # Same answers as uniform everywhere: nothing won or lost, for each of the 9 variants.
  assert bench.passkey_table(cells).count("| 0 / 0 (1.000) |") == len(names) - 2
  # A passkey-only run (--kv=0): the empty task is a "-" in the table, left out elsewhere.
  for c in cells:
    c["kv_retrieval"] = {"rows": []}
  bench.plot(cells, str(tmp_path / "passkey_only.png"))
  assert os.path.getsize(tmp_path / "passkey_only.png") > 1000
  assert bench.table(cells).splitlines()[2].split(" | ")[4] == "-"
  assert "kv_retrieval" not in bench.answer_kinds(cells)
  assert bench.passkey_table(cells).count("\n") == len(names) + 1


def test_passkey_table_pairs_each_cell_with_the_uniform_window_prompt_by_prompt():
  """The 'vs uniform' column counts prompts one plan answers and the uniform window of the
  same N and budget misses (and the reverse), with the exact McNemar p (checked against the
  binomial sum by hand); cells with other prompts or no uniform twin get no comparison."""
  import importlib.util
  import math
  spec = importlib.util.spec_from_file_location(
      "moa_long_context", os.path.join(ROOT, "benchmarks", "moa_long_context.py"))
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)
  rng = np.random.default_rng()
  n = 30
  depths = np.sort(rng.uniform(size=n))

  def cell(variant, correct, length=128, density=0.5, answers=None):
    rows = [{"depth": float(d), "answer": a, "output": a if ok else " the", "correct": bool(ok),
             "forced": True, "answer_nll": 0.1}
            for d, ok, a in zip(depths, correct, answers or [str(i) for i in range(n)])]
    task = {"accuracy": float(np.mean(correct)), "n": n, "answer_nll": 0.1,
            "by_depth": {"0.0-1.0": float(np.mean(correct))}, "rows": rows}
    return {"variant": variant, "length": length, "density": density, "passkey": task}

  base, ours = rng.uniform(size=n) < 0.5, rng.uniform(size=n) < 0.5
  cells = [cell("uniform 50%", base), cell("MoA 50%", ours), cell("MoA 25%", ours),
           cell("MoA 50%", ours, length=256),
           cell("other prompts 50%", ours, answers=[str(i + 1) for i in range(n)])]
  paired = bench.paired_vs_uniform(cells)
  assert set(paired) == {("MoA 50%", 128)}
  won, lost = int(np.sum(ours & ~base)), int(np.sum(base & ~ours))
  k, m = min(won, lost), won + lost
  p = min(1.0, 2 * sum(math.comb(m, i) for i in range(k + 1)) / 2 ** m) if m else 1.0
  assert paired["MoA 50%", 128][:2] == (won, lost)
  assert paired["MoA 50%", 128][2] == pytest.approx(p)
  table = bench.passkey_table(cells).splitlines()
  assert any(line.endswith(f"| {won} / {lost} ({p:.3f}) |") for line in table), table
  assert sum(line.endswith("| - |") for line in table) == 4  # uniform and the unmatched.


def test_streaming_rest_variant_skips_the_profile_and_streams_the_other_heads(tmp_path):
  """--streaming_rest (DuoAttention's layout): no profile, one plan; the held layer at full
  span, every other head one sink + window rule, the budget holds at every length."""
  model = TransformerLM(ModelConfig(**BASE), rngs=nnx.Rngs(0))
  opts = pipeline.Options(out=str(tmp_path / "duo"), **{**TINY_OPTIONS, "budget": 0.6},
                          full_span_layers=(0,), streaming_rest=True)
  logged = []
  results = pipeline.run(model, opts, log=logged.append)
  assert "profile" not in results and not os.path.exists(os.path.join(opts.out,
                                                                       "influence_128.npz"))
  assert any("profile: not needed" in line for line in logged)
  plan = plan_lib.load_plan(os.path.join(opts.out, "plan.json"))
  assert (plan.capacities(512)[0] == 512).all()
  assert len({tuple(r) for r in zip(plan.alpha[1], plan.beta[1])}) == 1
  for n in (128, 192, 256, 512):
    assert plan.density(n) <= 0.6 + 1e-9
  assert "streaming_rest=True" in pipeline.summary(opts.out)
  for change, message in [(dict(full_span_layers=()), "give at least one of them"),
                          (dict(min_head_density=0.1), "leave min_head_density at 0")]:
    with pytest.raises(ValueError, match=message):
      pipeline.check_options(model, dataclasses.replace(opts, **change))


def test_streaming_tradeoff_benchmark_plans_and_curves(tmp_path):
  """benchmarks/moa_streaming_tradeoff.py: one budget-matched plan per (budget, k) holding
  the k best-scored heads, k past the budget skipped; curves by k with uniform as k = 0."""
  import importlib.util
  spec = importlib.util.spec_from_file_location(
      "moa_streaming_tradeoff", os.path.join(ROOT, "benchmarks", "moa_streaming_tradeoff.py"))
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)
  scores = np.random.default_rng(np.random.randint(1 << 30)).random((4, 2))
  entries = bench.write_plans(scores, [0.5], [1, 3, 4], 4, str(tmp_path), max_length=1024,
                              min_window=8)
  assert [e.rpartition(":")[2] for e in entries] == ["Duo-k1", "Duo-k3"]  # 4 of 8 = 0.5.
  plan = plan_lib.load_plan(entries[1].rpartition(":")[0])
  top = np.argsort(-scores.ravel())[:3]
  assert (plan.capacities(1024).ravel()[top] == 1024).all()
  assert plan.density(1024) == pytest.approx(0.5, abs=1e-3)
  rows = lambda right: [{"depth": d, "correct": c} for d, c in zip((0.2, 0.4, 0.6, 0.8), right)]
  cells = [{"variant": v, "length": 64, "passkey": {"accuracy": np.mean(r), "rows": rows(r)}}
           for v, r in [("uniform 50%", (0, 0, 1, 1)), ("Duo-k3 50%", (1, 0, 1, 0)),
                        ("MoA 50%", (1, 1, 1, 1))]]
  assert bench.tradeoff(cells) == {"50%": [(0, 0.5, 0.0, 1.0, 4), (3, 0.5, 0.5, 0.5, 4)]}
  bench.plot(bench.tradeoff(cells), 1.0, str(tmp_path / "t.png"))
  assert os.path.getsize(tmp_path / "t.png") > 1000

"""DuoAttention gate training (sparsity_jax.moa.duo, launch/duo_gates.py)."""

import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparsity_jax.data.tokenizer import ByteTokenizer
from sparsity_jax.evals import long_context as lc
from sparsity_jax.models import ModelConfig, TransformerLM
from sparsity_jax.moa import duo, pipeline, plan as plan_lib, validate as validate_lib
from support import ROOT, subprocess_env

FIXTURE = os.path.join(ROOT, "tests", "fixtures", "hf", "llama")
BASE = dict(vocab_size=260, num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, head_dim=8,
            mlp_dim=64, max_len=512)


def _reference(q, k, v, gates, sink, recent):
  """numpy: per KV head, gate * full causal softmax + (1 - gate) * sink + recent softmax."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  b, t, n, h = q.shape
  group = n // k.shape[2]
  i, j = np.arange(t)[:, None], np.arange(t)[None, :]
  full = j <= i
  stream = full & ((j < sink) | (i - j < recent))
  out = np.zeros_like(q)
  for head in range(n):
    kv = head // group
    s = np.einsum("bth,bsh->bts", q[:, :, head], k[:, :, kv]) / np.sqrt(h)
    probs = []
    for mask in (full, stream):
      x = np.where(mask, s, -np.inf)
      x = np.exp(x - x.max(-1, keepdims=True))
      probs.append(x / x.sum(-1, keepdims=True))
    p = gates[kv] * probs[0] + (1 - gates[kv]) * probs[1]
    out[:, :, head] = np.einsum("bts,bsh->bth", p, v[:, :, kv])
  return out


def _core(sink, recent, num_kv_heads=2, recent_fraction=0.0):
  cfg = ModelConfig(**{**BASE, "num_kv_heads": num_kv_heads},
                    attention={"kind": "duo_gate", "sink": sink, "recent": recent,
                               "recent_fraction": recent_fraction})
  return duo.DuoGateAttention(cfg, layer_index=0, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 2e-5), (jnp.bfloat16, 3e-2)])
def test_gate_core_matches_a_numpy_reference_forward_and_gradient(dtype, tol):
  rng = np.random.default_rng(np.random.randint(1 << 30))
  b, t, n, k, h, sink, recent = 2, 37, 4, 2, 8, 3, 7
  q, kk, v = (rng.standard_normal((b, t, heads, h)).astype(np.float32)
              for heads in (n, k, k))
  gates = rng.random(k)
  core = _core(sink, recent)
  core.gate.set_value(jnp.asarray(gates, jnp.float32))
  pos = jnp.broadcast_to(jnp.arange(t), (b, t))
  cast = lambda x: jnp.asarray(x, dtype)
  got = core(cast(q), cast(kk), cast(v), positions_bt=pos, causal=True)
  assert got.dtype == dtype
  want = _reference(np.asarray(cast(q), np.float32), np.asarray(cast(kk), np.float32),
                    np.asarray(cast(v), np.float32), gates, sink, recent)
  np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=tol, rtol=tol)
  # d/d gate_h of <o, w> = <o_full - o_stream, w> over the query heads of KV head h.
  w = rng.standard_normal((b, t, n, h))

  graphdef, gate_state, rest = nnx.split(core, duo.DuoGate, ...)  # As duo._step does.

  def f(gate_state):
    out = nnx.merge(graphdef, gate_state, rest)(cast(q), cast(kk), cast(v), positions_bt=pos,
                                                causal=True)
    return jnp.sum(out.astype(jnp.float32) * w)
  grad = np.asarray(jax.tree.leaves(jax.grad(f)(gate_state))[0])
  q32, k32, v32 = (np.asarray(cast(x), np.float32) for x in (q, kk, v))
  diff = (_reference(q32, k32, v32, np.ones(k), sink, recent)
          - _reference(q32, k32, v32, np.zeros(k), sink, recent))
  want_grad = [np.sum((diff * w)[:, :, h0 * (n // k):(h0 + 1) * (n // k)]) for h0 in range(k)]
  np.testing.assert_allclose(grad, want_grad, rtol=max(tol, 1e-4), atol=tol * 10)


def test_gates_at_one_are_the_dense_model_and_at_zero_the_streaming_plan(tmp_path):
  """Gates at 1 give the dense model's logits; gates at 0 with an elastic window give the
  MoA runtime's logits for the uniform sink + window plan of the same density."""
  model = TransformerLM(ModelConfig(**BASE), rngs=nnx.Rngs(np.random.randint(1 << 30)))
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 260, (2, 64)))
  gated = duo.gated_model(model, sink=4, recent_fraction=0.5, remat=False)
  np.testing.assert_allclose(gated(tokens), model(tokens), atol=2e-5, rtol=2e-5)
  duo.set_gates(gated, np.zeros((2, 2)))
  plan = plan_lib.uniform_plan(2, 2, 4, alpha=-4, beta=0.5, sink=4, max_length=512,
                               min_window=1)
  path = str(tmp_path / "plan.json")
  plan_lib.save_plan(plan, path)
  windowed = validate_lib.with_plan(model, path, block_size=16)
  assert plan.capacities(64)[0, 0] == 32 and gated.layers[0].attn.core.window(64) == 28
  np.testing.assert_allclose(gated(tokens), windowed(tokens), atol=2e-5, rtol=2e-5)
  with pytest.raises(ValueError, match="gates of shape"):
    duo.set_gates(gated, np.zeros((3, 2)))


def test_multi_passkey_prompts_hold_every_needle_and_label_every_answer():
  tok = ByteTokenizer()
  data = duo.samples(tok, [700, 900], 4, seed=np.random.randint(1 << 30), num_passkeys=3,
                     passkey_length=4)
  for s, length in zip(data, [700, 900, 700, 900]):
    assert len(s.tokens) == len(s.labels) == length
    assert len(set(s.depths)) == 3 and list(s.depths) == sorted(s.depths)
    first = int(np.argmax(s.labels))
    assert s.labels[first:].all() and not s.labels[:first].any()
    context, qa = lc.decode(tok, s.tokens[:first]), lc.decode(tok, s.tokens[first:])
    for ordinal, key in zip(duo.ORDINALS, s.passkeys):
      assert len(key.split()) == 4 and set(key.split()) <= set(duo.NATO)
      assert duo.NEEDLE.format(ordinal) + key in context
      assert duo.QUESTION.format(ordinal) + key in qa
  # The book stops tokenizing once it has enough: the same prefix as the whole corpus.
  whole = np.concatenate(lc.corpus_documents(tok, split="train"))
  np.testing.assert_array_equal(duo.haystack(tok, 5000), whole[:5000])
  with pytest.raises(ValueError, match="use fewer or shorter passkeys"):
    duo.samples(tok, [300], 1, num_passkeys=3, passkey_length=8)
  with pytest.raises(ValueError, match="num_passkeys=11"):
    duo.samples(tok, [3000], 1, num_passkeys=11)


def test_schedule_is_the_official_one():
  """A port of duo_attn/train.py's LambdaLR: min(1, max((s+1)/(n//5), 0.1),
  max((n-s)/(n//5), 0.1))."""
  for n in (7, 50, 1000):
    fn = duo.schedule(0.1, n)
    for step in range(n):
      want = 0.1 * min(1, max((step + 1) / (n // 5), 0.1), max((n - step) / (n // 5), 0.1))
      assert float(fn(step)) == pytest.approx(want, rel=1e-6)


def test_gate_training_resumes_where_it_stopped(tmp_path, monkeypatch):
  """A run stopped by SIGTERM saves the step in flight and says so; a kill between the
  writes of state.npz and gates.json resumes from state.npz; either way the final gates
  are those of an uninterrupted run, in [0, 1], with the whole loss history."""
  from sparsity_jax.train.loop import Preempted
  if threading.current_thread() is not threading.main_thread():
    pytest.skip("signal handlers need the main thread (else SIGTERM ends the runner)")
  model = TransformerLM(ModelConfig(**BASE), rngs=nnx.Rngs(np.random.randint(1 << 30)))
  data = duo.samples(ByteTokenizer(), [320], 2, seed=1, num_passkeys=1, passkey_length=3)
  kw = dict(num_steps=4, sink=4, recent=16, save_every=3, log=lambda *_: None)
  whole = duo.optimise(model, data, out=str(tmp_path / "a"), **kw)
  out = str(tmp_path / "b")
  step = lambda name: json.load(open(os.path.join(out, name)))["step"]

  dense_hidden = duo.dense_hidden

  def signal_in_step_one(model, tokens):  # Computed once, in step 1, for data[1].
    if tokens is data[1].tokens:
      os.kill(os.getpid(), signal.SIGTERM)
    return dense_hidden(model, tokens)
  monkeypatch.setattr(duo, "dense_hidden", signal_in_step_one)
  with pytest.raises(Preempted, match="interrupted at step 2 of 4 .*rerun the same command"):
    duo.optimise(model, data, out=out, **kw)  # save_every=3: step 2 saved for the signal.
  monkeypatch.undo()
  assert step("gates.json") == 2 and int(np.load(os.path.join(out, "state.npz"))["step"]) == 2

  write_record = duo._write_record

  def killed_before_gates_json(out, step, *args):
    if step == 3:
      raise KeyboardInterrupt  # After state.npz of step 3 is written.
    write_record(out, step, *args)
  monkeypatch.setattr(duo, "_write_record", killed_before_gates_json)
  logged = []
  with pytest.raises(KeyboardInterrupt):
    duo.optimise(model, data, out=out, **{**kw, "log": logged.append})
  monkeypatch.undo()
  assert logged == ["[duo] resuming at step 2 of 4"] and step("gates.json") == 2
  logged = []
  resumed = duo.optimise(model, data, out=out, **{**kw, "log": logged.append})
  assert logged[0] == "[duo] resuming at step 3 of 4"
  np.testing.assert_allclose(resumed, whole, atol=1e-6)
  assert whole.shape == (2, 2) and (whole >= 0).all() and (whole <= 1).all() and (whole < 1).any()
  record = json.load(open(os.path.join(out, "gates.json")))
  assert record["step"] == 4 and len(record["history"]) == 4
  assert np.isfinite(record["history"]).all()
  assert record["history"][0][1] == pytest.approx(0.0, abs=1e-6)  # Gates at 1: dense.
  logged = []
  again = duo.optimise(model, data, out=out, **{**kw, "log": logged.append})
  assert logged == [f"[duo] already done (4 of 4 steps); gates: {out}/gates.json"]
  np.testing.assert_array_equal(again, resumed)


def test_a_tie_across_the_cut_warns_once(caplog):
  """retrieval.select (behind --retrieval_scores, --scores and duo_gates's summary) picks
  tied heads by index and says so when the tie straddles the cut; distinct scores don't."""
  from sparsity_jax.moa import retrieval
  value = float(np.random.default_rng(np.random.randint(1 << 30)).uniform(0.2, 0.8))
  scores = np.array([[0.95, value], [value, value * (1 + 1e-8)], [0.1, value]])
  with caplog.at_level(logging.WARNING, logger=retrieval.__name__):
    chosen = retrieval.select(scores, 3)
    retrieval.select(scores, 3)  # The same tie again (a plan per budget): no repeat.
  np.testing.assert_array_equal(chosen, [[True, True], [False, True], [False, False]])
  assert [r.getMessage() for r in caplog.records] == [
      f"4 heads tie at score {value:.6g} across the cut of 3: picked by index (the 2 "
      "lowest); scores that separate them (e.g. gates trained longer) would rank them"]
  caplog.clear()
  with caplog.at_level(logging.WARNING, logger=retrieval.__name__):
    for num in (0, 1, 5, 6):  # Cuts outside the tie.
      retrieval.select(scores, num)
    retrieval.select(scores + np.arange(6).reshape(3, 2) * 1e-3, 3)
  assert not caplog.records
  assert retrieval.tie_groups(scores) == [(pytest.approx(value, rel=1e-6), 4)]
  assert retrieval.tie_groups(np.arange(6.0)) == []


def test_scores_files_and_the_pipeline_option(tmp_path):
  """launch/moa.py --retrieval_scores holds the heads with the highest gates."""
  gates = np.random.default_rng(np.random.randint(1 << 30)).random((2, 2))
  path = str(tmp_path / "gates.json")
  json.dump({"gates": gates.tolist()}, open(path, "w"))
  np.testing.assert_array_equal(duo.load_scores(path), gates)
  bad = str(tmp_path / "bad.json")
  json.dump({"something": 1}, open(bad, "w"))
  with pytest.raises(ValueError, match="not a gates.json"):
    duo.load_scores(bad)
  model = TransformerLM(ModelConfig(**BASE), rngs=nnx.Rngs(0))
  opts = pipeline.Options(out=str(tmp_path / "duo"), lengths=(128, 256), extend_length=512,
                          validate_length=192, budget=0.6, sink=4, block_size=16,
                          num_samples=2, response_len=8, min_cache=16,
                          tasks=("lines", "document"), retrieval_heads=1,
                          retrieval_scores=path, streaming_rest=True)
  pipeline.run(model, opts, stages=("search",), log=lambda *_: None)
  plan = plan_lib.load_plan(os.path.join(opts.out, "plans", "plan_0.json"))
  top = np.unravel_index(np.argmax(gates), gates.shape)
  assert plan.capacities(512)[top] == 512 and (plan.capacities(512) == 512).sum() == 1
  assert json.load(open(os.path.join(opts.out, "retrieval_heads.json")))["scores_from"] == path
  for change, message in [(dict(retrieval_heads=0), "give their number too"),
                          (dict(retrieval_scores=bad), "not a gates.json")]:
    with pytest.raises(ValueError, match=message):
      pipeline.check_options(model, dataclasses.replace(opts, **change))
  json.dump({"gates": np.zeros((3, 2)).tolist()}, open(bad, "w"))
  with pytest.raises(ValueError, match="shape \\(3, 2\\)"):
    pipeline.check_options(model, dataclasses.replace(opts, retrieval_scores=bad))


def test_launcher_trains_plots_and_refuses_other_options(tmp_path):
  out = str(tmp_path / "gates")
  cmd = [sys.executable, "launch/duo_gates.py", f"--model={FIXTURE}", f"--out={out}",
         "--lengths=256", "--num_samples=2", "--num_steps=2", "--num_passkeys=1",
         "--passkey_length=2", "--sink=4", "--recent=16", "--save_every=1"]
  run = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True,
                       timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]
  assert "INFO" not in run.stderr and "[duo] step 2/2" in run.stdout
  assert "highest gates" in run.stdout and os.path.getsize(os.path.join(out, "gates.png")) > 1000
  assert np.asarray(json.load(open(os.path.join(out, "gates.json")))["gates"]).shape == (2, 2)
  again = subprocess.run(cmd + ["--lr=0.2"], cwd=ROOT, env=subprocess_env(),
                         capture_output=True, text=True, timeout=600)
  assert again.returncode != 0 and "made with other options (lr)" in again.stderr
  open(os.path.join(out, "notes.txt"), "w").write("mine")
  restarted = subprocess.run(cmd + ["--lr=0.2", "--num_steps=1", "--restart"], cwd=ROOT,
                             env=subprocess_env(), capture_output=True, text=True, timeout=600)
  assert restarted.returncode == 0, restarted.stderr[-3000:]
  assert json.load(open(os.path.join(out, "gates.json")))["step"] == 1  # Not resumed at 2.
  assert open(os.path.join(out, "notes.txt")).read() == "mine"
  short = subprocess.run(cmd[:3] + [f"--out={tmp_path / 'x'}", "--lengths=64"], cwd=ROOT,
                         env=subprocess_env(), capture_output=True, text=True, timeout=600)
  assert short.returncode != 0 and "use fewer or shorter passkeys" in short.stderr


def _launcher_cmd(out, *args):
  return [sys.executable, "launch/duo_gates.py", f"--model={FIXTURE}", f"--out={out}",
          "--lengths=256", "--num_samples=2", "--num_passkeys=1", "--passkey_length=2",
          "--sink=4", "--recent=16", "--save_every=1", *args]


def test_launcher_checks_everything_before_writing(tmp_path):
  """A run that fails a check writes nothing, so the corrected rerun is not refused; bad
  numbers are one-line errors before the model loads (--model=/nowhere is not reached)."""
  out = str(tmp_path / "gates")
  for args, message in [(["--model=/nowhere", "--sink=-1"], "--sink=-1 must be >= 0"),
                        (["--lengths=0"], "--lengths=0 must be positive"),
                        (["--recent_fraction=1"], "--recent_fraction=1.0 must be in"),
                        (["--reg_weight=-1"], "--reg_weight=-1.0 must be >= 0"),
                        (["--num_passkeys=11"], "num_passkeys=11 must be in"),
                        (["--lengths=100000"], "exceed the model's context")]:
    failed = subprocess.run(_launcher_cmd(out, *args), cwd=ROOT, env=subprocess_env(),
                            capture_output=True, text=True, timeout=600)
    assert failed.returncode == 2 and failed.stderr.startswith("error: "), failed.stderr
    assert message in failed.stderr and len(failed.stderr.splitlines()) == 1, failed.stderr
    assert not os.path.exists(out), args
  fixed = subprocess.run(_launcher_cmd(out, "--num_steps=1"), cwd=ROOT, env=subprocess_env(),
                         capture_output=True, text=True, timeout=600)
  assert fixed.returncode == 0 and "[duo] step 1/1" in fixed.stdout, fixed.stderr[-3000:]
  assert "[duo] tied gates: 4 at 0.9;" in fixed.stdout  # One Adam step moves all alike.


def test_launcher_saves_on_sigterm(tmp_path):
  """SIGTERM saves the step in flight and says, in one line, how to resume (the resume
  itself: test_gate_training_resumes_where_it_stopped)."""
  out = str(tmp_path / "gates")
  with open(tmp_path / "stderr", "w") as stderr:
    proc = subprocess.Popen(_launcher_cmd(out, "--num_steps=100"), cwd=ROOT,
                            env=subprocess_env(), stdout=subprocess.PIPE, stderr=stderr,
                            text=True)
    for line in proc.stdout:
      if line.startswith("[duo] step 1/100"):
        proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=600)
  err = open(tmp_path / "stderr").read()
  assert proc.returncode == 3 and "Traceback" not in err, err[-3000:]
  step = json.load(open(os.path.join(out, "gates.json")))["step"]
  assert 1 <= step < 100 and int(np.load(os.path.join(out, "state.npz"))["step"]) == step
  assert err.strip().splitlines()[-1] == (f"[duo] interrupted at step {step} of 100 (saved "
                                          f"in {out}); rerun the same command to resume")

"""The MoA pipeline end to end on a tiny random model, resume, and retrieval data."""

import json
import os

import numpy as np
import pytest
from flax import nnx

from sparsity_jax.data import retrieval
from sparsity_jax.models import ModelConfig, TransformerLM
from sparsity_jax.moa import calibrate, pipeline, plan as plan_lib

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

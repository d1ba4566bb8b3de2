"""The MoA attention core: prefill, decode caches and cache bytes under a plan."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparsity_jax import parallel
from sparsity_jax.layers import attention as attention_lib
from sparsity_jax.layers import moa as moa_layer
from sparsity_jax.models import ModelConfig, TransformerLM, generation
from sparsity_jax.moa import plan as plan_lib
from sparsity_jax.moa import profile

BASE = dict(vocab_size=260, num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, head_dim=8,
            mlp_dim=64, max_len=64)
N = 40

_EXPLICIT = {}


@attention_lib.register_attention("test_explicit_mask")
class ExplicitMask(attention_lib.AttentionCore):
  """Dense attention with a per-layer boolean mask [n, t, s] set by the test."""

  OPTIONS = ()

  def __init__(self, model_config, *, layer_index, rngs):
    del model_config, rngs
    self.layer_index = layer_index

  def __call__(self, q, k, v, *, positions_bt, causal):
    mask = jnp.asarray(_EXPLICIT[self.layer_index])
    return jax.nn.dot_product_attention(q, k, v, mask=mask[None])


def random_plan(seed, layers=2, kv=2, heads=4, max_length=64):
  rng = np.random.default_rng(seed)
  return plan_lib.Plan(alpha=rng.integers(-8, 12, (layers, kv)).astype(float),
                       beta=rng.choice([0.0, 0.125, 0.25, 0.5], (layers, kv)),
                       sink=rng.integers(0, 5, (layers, kv)), num_heads=heads,
                       max_length=max_length)


def moa_model(tmp_path, plan, **overrides):
  path = str(tmp_path / "plan.json")
  plan_lib.save_plan(plan, path)
  cfg = ModelConfig(**{**BASE, **overrides}, attention={"kind": "moa", "plan": path,
                                                        "block_size": 8})
  return TransformerLM(cfg, rngs=nnx.Rngs(3))


def dense_rule_mask(window, sink, length):
  i, j = np.arange(length)[:, None], np.arange(length)[None, :]
  return (j <= i) & ((i - j < window) | (j < sink))


def test_prefill_equals_dense_with_explicit_mask(tmp_path):
  plan = random_plan(np.random.randint(1 << 30))
  model = moa_model(tmp_path, plan)
  for layer in range(2):
    w = plan.windows(N)[layer]
    _EXPLICIT[layer] = np.stack([dense_rule_mask(w[n // 2], plan.sink[layer, n // 2], N)
                                 for n in range(4)])
  ref = TransformerLM(ModelConfig(**BASE, attention={"kind": "test_explicit_mask"}),
                      rngs=nnx.Rngs(3))
  tokens = jax.random.randint(jax.random.key(0), (2, N), 0, 256)
  np.testing.assert_allclose(model(tokens), ref(tokens), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("kind", ["random", "clipped"])
def test_decode_with_plan_caches_equals_prefill(tmp_path, kind):
  plan = random_plan(np.random.randint(1 << 30))
  if kind == "clipped":  # Spans reaching past N: full windows, and sinks beyond the cache.
    plan = dataclasses.replace(plan, alpha=np.array([[0.0, 4.0], [-2.0, 0.0]]),
                               beta=np.array([[1.0, 0.0], [0.5, 0.0]]),
                               sink=np.array([[2, 50], [0, 38]]))
  model = moa_model(tmp_path, plan)
  tokens = jax.random.randint(jax.random.key(1), (2, N), 0, 256)
  full = model(tokens)  # Prefill of the whole sequence: spans at length N.
  cache = model.init_cache(2, N)  # Spans for N = prompt + new tokens, as in generation.
  logits, cache = model.decode(tokens[:, :13], cache)
  pieces = [logits]
  for i in range(13, N - 6):
    logits, cache = model.decode(tokens[:, i:i + 1], cache)
    pieces.append(logits)
  logits, cache = model.decode(tokens[:, N - 6:], cache)  # A few tokens at once, ring wrapped.
  pieces.append(logits)
  np.testing.assert_allclose(jnp.concatenate(pieces, axis=1), full, atol=3e-5, rtol=3e-5)


def test_cache_bytes_fall_with_density(tmp_path):
  plan = random_plan(5)
  model = moa_model(tmp_path, plan)
  dense = TransformerLM(ModelConfig(**BASE), rngs=nnx.Rngs(0))
  for length in (16, 40, 64):
    moa_bytes = moa_layer.cache_bytes(model.init_cache(3, length))
    dense_bytes = moa_layer.cache_bytes(dense.init_cache(3, length))
    assert moa_bytes == pytest.approx(dense_bytes * plan.density(length))
    assert moa_bytes < dense_bytes or plan.density(length) == 1.0


def test_bad_plans_raise_clear_errors(tmp_path):
  with pytest.raises(ValueError, match="3 layers but the model has 2"):
    moa_model(tmp_path, random_plan(0, layers=3))
  with pytest.raises(ValueError, match="1 KV heads per layer but the model has 2"):
    moa_model(tmp_path, random_plan(0, kv=1))
  with pytest.raises(ValueError, match="scan_layers=False"):
    moa_model(tmp_path, random_plan(0), scan_layers=True)
  with pytest.raises(FileNotFoundError, match="plan.json"):
    TransformerLM(ModelConfig(**BASE, attention={"kind": "moa", "plan": "/nope.json"}),
                  rngs=nnx.Rngs(0))
  model = moa_model(tmp_path, random_plan(0, max_length=32))
  with pytest.raises(ValueError, match="beyond the plan's max_length=32"):
    model(jnp.zeros((1, 40), jnp.int32))
  bad = tmp_path / "bad.json"
  bad.write_text('{"version": 1, "layers": []}')
  with pytest.raises(ValueError, match="not a valid MoA plan"):
    plan_lib.load_plan(str(bad))


def test_plan_json_roundtrip(tmp_path):
  plan = random_plan(1)
  plan_lib.save_plan(plan, str(tmp_path / "p.json"))
  again = plan_lib.load_plan(str(tmp_path / "p.json"))
  for name in ("alpha", "beta", "sink"):
    np.testing.assert_array_equal(getattr(plan, name), getattr(again, name))
  assert again.max_length == plan.max_length and again.num_heads == plan.num_heads


def test_moa_on_a_2x2x2_mesh_matches_single_device(tmp_path):
  """Prefill (block-sparse under shard_map), cached generation and influence profiling
  with parameters over data x fsdp x tensor and the batch over data/fsdp."""
  plan = random_plan(np.random.randint(1 << 30))
  single, sharded = moa_model(tmp_path, plan), moa_model(tmp_path, plan)
  tokens = np.asarray(jax.random.randint(jax.random.key(2), (4, 33), 0, 256))
  samples = [(row, (np.arange(33) >= 24).astype(np.int32)) for row in tokens]
  want = (single(jnp.asarray(tokens[:, :N])), generation.generate(single, tokens[:, :20], 6),
          profile.profile_length(single, samples, length=32, block_size=8, sink=2,
                                 batch_size=4))
  mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  with parallel.use_mesh(mesh):
    state = nnx.state(sharded)
    nnx.update(sharded, jax.device_put(state, parallel.state_shardings(state, mesh)))
    assert len(sharded.embed.get_value().sharding.device_set) == 8
    logits = nnx.jit(lambda m, x: m(x))(sharded, jnp.asarray(tokens[:, :N]))
    generated = generation.generate(sharded, tokens[:, :20], 6)
    influence = profile.profile_length(sharded, samples, length=32, block_size=8, sink=2,
                                       batch_size=4)
  np.testing.assert_allclose(logits, want[0], atol=3e-5, rtol=3e-5)
  np.testing.assert_array_equal(generated, want[1])
  np.testing.assert_allclose(influence.blocks, want[2].blocks, rtol=1e-4, atol=1e-7)


def test_a_plan_refuses_lengths_it_was_not_built_for(tmp_path):
  """Past max_length (the longest length its budget was checked at) every use raises with
  the length and the way out: densities, windows, prefill, caches, generation."""
  plan = random_plan(0, max_length=48)
  model = moa_model(tmp_path, plan)
  message = "length 50 is beyond the plan's max_length=48.*--extend_length >= 50"
  for use in (lambda: plan.density(50), lambda: plan.windows(50),
              lambda: plan.capacities(50), lambda: model(jnp.zeros((1, 50), jnp.int32)),
              lambda: model.init_cache(1, 50),
              lambda: generation.generate(model, np.zeros((1, 40), np.int32), 10)):
    with pytest.raises(ValueError, match=message):
      use()
  assert plan.density(48) > 0  # Up to max_length it works.


def test_the_window_floor_holds_in_search_prefill_and_cache(tmp_path):
  """A rule whose span would shrink to a few tokens at short lengths keeps min_window
  (sink + window >= min_cache) in the plan, the prefill mask and the decode caches."""
  from sparsity_jax.moa import pipeline, search
  from sparsity_jax.moa.profile import Influence
  assert pipeline.Options(out="x").min_window == 128 - 64  # The official min cache of 128.
  assert pipeline.Options(out="x", sink=4, min_cache=16).min_window == 12
  rng = np.random.default_rng(np.random.randint(1 << 30))
  influences = [Influence(n, 8, 2, rng.random((2, 2, n // 8, n // 8)),
                          rng.random((2, 2, n)) * np.exp(-np.arange(n) / 4), 1)
                for n in (32, 64)]
  plan = search.search(influences, budget=0.5, extend_length=64, num_heads=4, min_window=10,
                       alpha_interval=8)[0]
  assert plan.min_window == 10
  for n in range(1, 65):
    assert (plan.windows(n) >= min(n, 10)).all()
  sparse = plan_lib.Plan(alpha=np.full((2, 2), -16.0), beta=np.full((2, 2), 0.5),
                         sink=np.full((2, 2), 2), num_heads=4, max_length=64, min_window=10)
  assert (sparse.windows(20) == 10).all() and (sparse.capacities(40) == 12).all()
  model = moa_model(tmp_path, sparse)
  core = moa_layer.moa_cores(model)[0]
  mask = np.asarray(core.block_mask(40).to_dense())[0, 0]  # [t, s] of query head 0.
  assert mask[-1].sum() == 12 and mask[-1, 30:].all() and mask[-1, :2].all()
  assert model.init_cache(1, 40)[0]["k0"].shape[2] == 12

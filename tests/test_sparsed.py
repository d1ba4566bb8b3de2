"""SparseD: pattern scoring and selection, reuse across steps, equivalence to dense."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings, strategies as st

from pallas_kernels import block_sparse
from sparsity_jax import parallel
from sparsity_jax.layers import sparsed
from sparsity_jax.models import ModelConfig, TransformerLM
from sparsity_jax.models.diffusion import SamplerConfig, generate
from sparsity_jax.patterns import sparsed as patterns

MODEL = dict(vocab_size=260, num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, head_dim=8,
             mlp_dim=64, max_len=256, causal=False)


def _brute_force_scores(q, k, block, gen_start):
  """Tile means of softmax probabilities, from the full [b, n, t, s] matrix zero-padded to
  whole tiles and averaged over block^2 entries (the official create_attention_block_mask)."""
  n, kv = q.shape[2], k.shape[2]
  k = np.repeat(k, n // kv, axis=2)
  logits = np.einsum("btnd,bsnd->bnts", q, k) / np.sqrt(q.shape[-1])
  def softmax(x):
    x = x - x.max(-1, keepdims=True)
    return np.exp(x) / np.exp(x).sum(-1, keepdims=True)
  p_all = softmax(logits)
  gen = np.arange(k.shape[1]) >= gen_start * block
  p_gen = softmax(np.where(gen, logits, -1e30))
  t, s = q.shape[1], k.shape[1]
  nq, nk = -(-t // block), -(-s // block)
  out = []
  for p in (p_all, p_gen):
    p = np.pad(p, ((0, 0), (0, 0), (0, nq * block - t), (0, nk * block - s)))
    tiles = np.zeros(p.shape[:2] + (nq, nk))
    for i in range(nq):
      for j in range(nk):
        tiles[..., i, j] = p[..., i * block:(i + 1) * block, j * block:(j + 1) * block].mean((-2, -1))
    out.append(tiles)
  return out


@given(length=st.integers(20, 90), block=st.sampled_from([8, 16, 32]), seed=st.integers(0, 2**30))
@settings(max_examples=8, deadline=None)
def test_block_scores_match_brute_force(length, block, seed):
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(2, length, 4, 8)).astype(np.float32)
  k = rng.normal(size=(2, length, 2, 8)).astype(np.float32)
  gen_start = patterns.generation_start_block(length // 2, length, block)
  got = patterns.block_scores(jnp.asarray(q), jnp.asarray(k), block_size=block, gen_start=gen_start)
  want = _brute_force_scores(q, k, block, gen_start)
  for g, w in zip(got, want):
    np.testing.assert_allclose(np.asarray(g), w, rtol=1e-4, atol=1e-6)


@given(prompt=st.integers(0, 100), gen=st.integers(1, 100), select=st.floats(0.05, 1.0),
       seed=st.integers(0, 2**30))
@settings(max_examples=10, deadline=None)
def test_isolated_selection_counts(prompt, gen, select, seed):
  block, length = 16, prompt + gen
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.normal(size=(1, length, 2, 8)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(1, length, 2, 8)), jnp.float32)
  bits = np.asarray(patterns.select_blocks(q, k, prompt_length=prompt, block_size=block,
                                           select=select))
  nk = -(-length // block)
  gen_start = patterns.generation_start_block(prompt, length, block)
  keep = lambda n: min(n, max(1, int(n * select) + 1))  # The official count (clipped).
  k_gen = keep(nk - gen_start)
  assert (bits[..., gen_start:].sum(-1) == k_gen).all()  # Generation keys: exactly k_gen.
  prompt_kept = bits[..., :gen_start].sum(-1)
  assert (prompt_kept <= min(gen_start, keep(nk))).all()
  assert bits.sum(-1).max() <= patterns.max_blocks_per_row(length, prompt, block, select)
  if select == 1.0:
    assert bits.all()


def _models(select, block=16):
  dense = TransformerLM(ModelConfig(**MODEL), rngs=nnx.Rngs(0))
  sparse = TransformerLM(ModelConfig(**MODEL, attention={"kind": "sparsed", "block_size": block,
                                                         "select": select}), rngs=nnx.Rngs(0))
  return dense, sparse


def test_select_one_equals_dense():
  dense, sparse = _models(select=1.0)
  prompt = np.random.randint(0, 256, (2, 40))
  cfg = SamplerConfig(gen_length=48, steps=12, block_length=16)
  hook = sparsed.sparsed_step_hook(sparse, 40, skip=0.2)
  a = generate(dense, prompt, cfg, keep_history=True)
  b = generate(sparse, prompt, cfg, step_hook=hook, keep_history=True)
  for x, y in zip(a.history, b.history):
    np.testing.assert_array_equal(x, y)
  # The sparse steps really ran the kernel: logits through it equal dense logits.
  tokens = jnp.asarray(b.tokens)
  np.testing.assert_allclose(sparse(tokens), dense(tokens), rtol=1e-4, atol=1e-4)


def test_pattern_computed_once_per_generation_and_reused():
  _, sparse = _models(select=0.3)
  prompt = np.random.randint(0, 256, (1, 48))
  cfg = SamplerConfig(gen_length=32, steps=16, block_length=16)
  for _ in range(2):  # A second generation recomputes its own pattern once.
    generate(sparse, prompt, cfg, step_hook=sparsed.sparsed_step_hook(sparse, 48, skip=0.25))
    cores = sparsed.sparsed_cores(sparse)
    assert [int(c.captures.get_value()) for c in cores] == [1, 1]
  density = float(cores[0].block_mask(80).density())
  assert 0.3 < density < 1.0


@pytest.mark.parametrize("steps, skip", [(128, 0.2), (16, 0.25), (10, 0.0)])
def test_switch_step_follows_the_official_schedule(steps, skip):
  """Dense through step int(steps * skip) + 1 (the official end_time), the pattern
  captured at that step, sparse afterwards (128 steps, skip 0.2: 27 dense, 101 sparse)."""
  _, sparse = _models(select=0.3)
  hook = sparsed.sparsed_step_hook(sparse, 8, skip)
  modes = []
  for step in range(steps):
    hook(step, steps)
    modes.append(sparsed.sparsed_cores(sparse)[0].mode)
  end_time = int(steps * skip) + 1
  assert modes == ["dense"] * end_time + ["capture"] + ["sparse"] * (steps - end_time - 1)


def test_sparse_mode_without_pattern_is_an_error():
  _, sparse = _models(select=0.3)
  sparsed.set_mode(sparse, "sparse", prompt_length=8)
  with pytest.raises(ValueError, match="run a 'capture' step first"):
    sparse(jnp.zeros((1, 32), jnp.int32))


def test_bad_sparsed_settings():
  with pytest.raises(ValueError, match="select"):
    _models(select=1.5)
  with pytest.raises(ValueError, match="block_size must be >= 1"):  # Not a ZeroDivisionError.
    _models(select=0.3, block=0)
  with pytest.raises(ValueError, match="skip"):
    sparsed.switch_step(10, 1.0)
  dense, _ = _models(select=0.3)
  with pytest.raises(ValueError, match="no SparseD attention"):
    sparsed.set_mode(dense, "sparse")


def test_empty_rows_give_zeros_not_nan():
  """A query block whose pattern keeps nothing outputs zeros, never NaN (kernel contract)."""
  rng = np.random.default_rng(np.random.randint(1 << 30))
  q, k, v = (jnp.asarray(rng.normal(size=(1, 64, 2, 8)), jnp.float32) for _ in range(3))
  bits = np.ones((1, 2, 4, 4), bool)
  bits[:, :, 1] = False
  mask = block_sparse.from_block_bits(np.zeros_like(bits), bits, q_len=64, kv_len=64,
                                      block_q=16, block_k=16)
  out = block_sparse.attention(q, k, v, mask)
  grads = jax.grad(lambda q: block_sparse.attention(q, k, v, mask).sum())(q)
  assert np.isfinite(np.asarray(out)).all() and np.isfinite(np.asarray(grads)).all()
  assert np.abs(np.asarray(out[:, 16:32])).max() == 0
  assert np.abs(np.asarray(grads[:, 16:32])).max() == 0


def test_sparsed_generation_on_a_2x2x2_mesh_matches_single_device():
  """Params sharded over data x fsdp x tensor, the batch over data/fsdp: the dense steps,
  the pattern capture and the block-sparse kernel (under shard_map) give the same tokens
  and the same patterns as one device."""
  prompt = np.random.randint(0, 256, (4, 40))
  cfg = SamplerConfig(gen_length=32, steps=8, block_length=16)
  _, single = _models(select=0.3)
  want = generate(single, prompt, cfg, step_hook=sparsed.sparsed_step_hook(single, 40, 0.25))
  _, sharded = _models(select=0.3)
  mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  with parallel.use_mesh(mesh):
    state = nnx.state(sharded)
    nnx.update(sharded, jax.device_put(state, parallel.state_shardings(state, mesh)))
    assert len(sharded.embed.get_value().sharding.device_set) == 8
    got = generate(sharded, prompt, cfg, step_hook=sparsed.sparsed_step_hook(sharded, 40, 0.25))
  np.testing.assert_array_equal(got.tokens, want.tokens)
  assert len(sparsed.sparsed_cores(sharded)) == 2
  for a, b in zip(sparsed.sparsed_cores(sharded), sparsed.sparsed_cores(single)):
    np.testing.assert_array_equal(a.pattern.get_value(), b.pattern.get_value())


def test_sparsed_on_an_imported_llada_checkpoint():
  """SparseD as the attention of an imported Hugging Face LLaDA model: select=1.0 reproduces
  its dense generation, and a sparse pattern is captured once per layer."""
  import os
  from sparsity_jax.checkpoints import hf
  from support import ROOT
  path = os.path.join(ROOT, "tests", "fixtures", "hf", "llada")
  dense = hf.load_model(path)
  sparse = hf.load_model(path, attention={"kind": "sparsed", "block_size": 16, "select": 1.0})
  prompt = np.random.randint(0, 200, (1, 32))
  cfg = SamplerConfig(gen_length=32, steps=8, block_length=16, mask_id=hf.mask_token_id(
      hf.read_config(path)))
  want = generate(dense, prompt, cfg)
  got = generate(sparse, prompt, cfg, step_hook=sparsed.sparsed_step_hook(sparse, 32, 0.25))
  np.testing.assert_array_equal(got.tokens, want.tokens)
  assert [int(c.captures.get_value()) for c in sparsed.sparsed_cores(sparse)] == [1] * len(
      sparsed.sparsed_cores(sparse))

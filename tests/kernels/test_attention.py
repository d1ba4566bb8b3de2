"""attention(): xla backend and API behaviour against the dense reference (CPU)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from pallas_kernels import block_sparse


@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), lq=st.integers(1, 96), lk=st.integers(1, 96),
       bq=st.sampled_from([8, 16, 32]), bk=st.sampled_from([8, 16, 32]),
       heads=st.sampled_from([(2, 2), (4, 2), (4, 1)]), per_head=st.booleans(),
       d=st.sampled_from([8, 16]))
def test_xla_random_tables_and_bits(check, dense_mask, seed, lq, lk, bq, bk, heads, per_head,
                                    d):
  rng = np.random.default_rng(seed)
  hq, hkv = heads
  dense = dense_mask(rng, (2, hq if per_head else 1, lq, lk), bq, bk)
  mask = block_sparse.from_dense(dense, block_q=bq, block_k=bk)
  check(mask, b=2, lq=lq, lk=lk, hq=hq, hkv=hkv, d=d, seed=seed,
        tiles=block_sparse.Tiles(xla_tiles_per_step=int(rng.integers(1, 64))))


@pytest.mark.parametrize('name,dtype', [
    ('causal', jnp.float32), ('causal', jnp.bfloat16), ('window', jnp.float32),
    ('positions', jnp.float32), ('topk', jnp.bfloat16), ('union', jnp.float32)])
def test_xla_constructors(check, name, dtype):
  l = 80
  rng = np.random.default_rng(0)
  if name == 'causal':
    mask = block_sparse.causal(l, block_q=16, block_k=32)
  elif name == 'window':
    mask = block_sparse.sliding_window(l, window=np.array([4, 9, 30, 70]),
                                       sinks=np.array([0, 2, 5, 1]), block_q=16, block_k=16)
  elif name == 'positions':
    pos = np.stack([rng.permutation(l) for _ in range(4)])[None]
    mask = block_sparse.from_positions(pos, block_q=16, block_k=16, window=25)
  elif name == 'topk':
    scores = jax.random.uniform(jax.random.key(1), (2, 4, 5, 5))
    mask = block_sparse.from_block_scores(scores, q_len=l, kv_len=l, block_q=16, block_k=16,
                                          top_k=2, causal=True)
  else:
    mask = (block_sparse.sliding_window(l, window=8, sinks=4, block_q=16, block_k=16)
            | block_sparse.from_dense(rng.random((1, 1, l, l)) < 0.05, block_q=16,
                                      block_k=16))
  check(mask, b=2, lq=l, lk=l, hq=4, hkv=2, d=16, dtype=dtype)


def test_reference_backend_through_custom_vjp(check):
  check(block_sparse.causal(40, block_q=16, block_k=16), b=1, lq=40, lk=40, hq=2, hkv=1,
        d=8, implementation='reference')


@pytest.mark.parametrize('implementation', ['reference', 'xla'])
def test_fully_masked_rows_give_zeros_and_zero_grads(qkv, implementation):
  l = 48
  dense = np.tril(np.ones((l, l), bool))
  dense[5] = False          # one empty row inside a partial block
  dense[32:48] = False      # a whole empty query block
  mask = block_sparse.from_dense(dense[None, None], block_q=16, block_k=16)
  q, k, v, do = qkv(0, 1, l, l, 2, 2, 16, jnp.float32)
  fn = lambda q, k, v: block_sparse.attention(q, k, v, mask, implementation=implementation)
  out, vjp = jax.vjp(fn, q, k, v)
  dq, dk, dv = vjp(do)
  for x in (out, dq, dk, dv):
    assert np.isfinite(np.asarray(x)).all()
  assert (np.asarray(out)[:, [5] + list(range(32, 48))] == 0).all()
  assert (np.asarray(dq)[:, [5] + list(range(32, 48))] == 0).all()
  out_r = block_sparse.attention_ref(q, k, v, mask)
  np.testing.assert_allclose(out, out_r, atol=1e-5)
  # A mask with no tile at all (both work lists empty: zero loop trips).
  empty = block_sparse.from_dense(np.zeros((1, 1, l, l), bool), block_q=16, block_k=16)
  out, vjp = jax.vjp(lambda q, k, v: block_sparse.attention(
      q, k, v, empty, implementation=implementation), q, k, v)
  for x in (out,) + vjp(do):
    assert (np.asarray(x) == 0).all()


def test_no_retrace_when_pattern_changes(qkv):
  traces = []

  @jax.jit
  def f(q, k, v, scores):
    traces.append(1)
    mask = block_sparse.from_block_scores(scores, q_len=64, kv_len=64, block_q=16,
                                          block_k=16, top_k=2, causal=True)
    return block_sparse.attention(q, k, v, mask), mask

  q, k, v, _ = qkv(0, 1, 64, 64, 2, 2, 16, jnp.float32)
  outs = []
  for seed in range(2):
    scores = jax.random.uniform(jax.random.key(seed), (1, 2, 4, 4))
    out, mask = f(q, k, v, scores)
    np.testing.assert_allclose(out, block_sparse.attention_ref(q, k, v, mask), atol=1e-4)
    outs.append(out)
  assert len(traces) == 1
  assert not np.allclose(outs[0], outs[1])

  # A mask built from device arrays outside jit is a traced argument too.
  g_traces = []

  @jax.jit
  def g(q, k, v, mask):
    g_traces.append(1)
    return block_sparse.attention(q, k, v, mask)

  rng = np.random.default_rng(0)
  for _ in range(2):
    mask = block_sparse.from_dense(jnp.asarray(rng.random((1, 1, 64, 64)) < 0.3),
                                   block_q=16, block_k=16)
    np.testing.assert_allclose(g(q, k, v, mask), block_sparse.attention_ref(q, k, v, mask),
                               atol=1e-4)
  assert len(g_traces) == 1


def test_default_scale_and_explicit_scale(qkv):
  mask = block_sparse.causal(32, block_q=16, block_k=16)
  q, k, v, _ = qkv(0, 1, 32, 32, 1, 1, 16, jnp.float32)
  out = block_sparse.attention(q, k, v, mask, scale=0.25)
  np.testing.assert_allclose(out, block_sparse.attention_ref(q, k, v, mask, scale=0.25),
                             atol=1e-5)
  dense = jax.nn.dot_product_attention(q, k, v, is_causal=True)
  np.testing.assert_allclose(block_sparse.attention(q, k, v, mask), dense, atol=1e-5)


def test_bad_inputs_raise_value_errors(qkv):
  q, k, v, _ = qkv(0, 2, 32, 32, 4, 2, 16, jnp.float32)
  mask = block_sparse.causal(32, block_q=16, block_k=16)
  attn = block_sparse.attention
  with pytest.raises(ValueError, match='q must be rank 4'):
    attn(q[0], k, v, mask)
  with pytest.raises(ValueError, match='share a dtype'):
    attn(q.astype(jnp.bfloat16), k, v, mask)
  with pytest.raises(ValueError, match='must be float32'):
    attn(q.astype(jnp.int32), k.astype(jnp.int32), v.astype(jnp.int32), mask)
  with pytest.raises(ValueError, match='multiple of k/v heads'):
    attn(q[:, :, :3], k, v, mask)
  with pytest.raises(ValueError, match='k and v must have the same shape'):
    attn(q, k, v[:, :16], mask)
  with pytest.raises(ValueError, match='head_dim'):
    attn(q, k[..., :8], v[..., :8], mask)
  with pytest.raises(ValueError, match='mask was built for'):
    attn(q, k, v, block_sparse.causal(48, block_q=16, block_k=16))
  with pytest.raises(ValueError, match='mask has 3 heads'):
    attn(q, k, v, block_sparse.sliding_window(32, window=np.array([1, 2, 3]), block_q=16,
                                              block_k=16))
  with pytest.raises(ValueError, match='mask must be a BlockMask'):
    attn(q, k, v, np.ones((32, 32), bool))
  with pytest.raises(ValueError, match='implementation must be'):
    attn(q, k, v, mask, implementation='cuda')
  with pytest.raises(ValueError, match='Tiles.block_q'):
    attn(q, k, v, mask, tiles=block_sparse.Tiles(block_q=12), implementation='xla')


@pytest.mark.skipif(jax.default_backend() != 'cpu', reason='checks CPU dispatch')
def test_dispatch_on_cpu():
  assert block_sparse.resolve_implementation(None) == 'xla'
  for impl in ('triton', 'mosaic_tpu'):
    with pytest.raises(ValueError, match='interpret=True'):
      block_sparse.resolve_implementation(impl)
  assert block_sparse.resolve_implementation('triton', interpret=True) == 'triton'




def test_xla_loop_runs_the_tiles_held_not_the_static_capacity(check):
  """A top-p mask keeps far fewer tiles than its static bound (nq x max_blocks):
  the xla backend's loop trip count follows the tables, and the result is exact."""
  from pallas_kernels.block_sparse import xla
  n, b = 8, 16
  weights = np.zeros((1, 2, n, n), np.float32)
  weights[..., 0] = 1.0  # all mass on the first block: top-p keeps it (+ the diagonal)
  mask = block_sparse.from_block_scores(weights, q_len=n * b, kv_len=n * b, block_q=b,
                                        block_k=b, top_p=0.5, causal=True)
  q = jnp.zeros((1, n * b, 2, 16))
  lay = xla._Layout(q, q, mask)
  work = lay.work(mask.full_kv_num_blocks, mask.full_kv_indices, mask.full_kv_capacity,
                  tiles_per_step=4)
  held = int(np.asarray(mask.full_kv_num_blocks).sum(-1).max())
  assert held == n - 1 and mask.full_kv_capacity == n * (n - 1) // 2  # bound: row i, i blocks
  assert int(work.steps) == -(-held // work.lanes)
  assert work.row.shape[1] // work.lanes > int(work.steps)
  check(mask, b=1, lq=n * b, lk=n * b, hq=2, hkv=2, d=16, implementation='xla',
        tiles=block_sparse.Tiles(xla_tiles_per_step=4))


def test_xla_under_vmap_over_per_example_masks():
  """vmap over examples whose masks (built inside the vmap) hold different tile counts:
  the xla loops' trip counts are then batched; outputs and dq match the reference."""
  l, b = 64, 16
  weights = jax.random.uniform(jax.random.key(0), (3, 1, 2, l // b, l // b)) ** 4
  q = jax.random.normal(jax.random.key(1), (3, 1, l, 2, 16))

  def attend(w, q, implementation):
    m = block_sparse.from_block_scores(w, q_len=l, kv_len=l, block_q=b, block_k=b, top_p=0.5,
                                       causal=True)
    return block_sparse.attention(q, q, q, m, implementation=implementation), m.density()

  @functools.partial(jax.jit, static_argnums=0)
  def run(impl):  # out, density and dq in one compilation per implementation
    def one(w, q):
      (out, dens), vjp = jax.vjp(lambda q: attend(w, q, impl), q)
      return out, dens, vjp((jnp.ones_like(out), jnp.zeros_like(dens)))[0]
    return jax.vmap(one)(weights, q)
  out, dens, dq = run('xla')
  ref, _, dq_ref = run('reference')
  assert len(set(np.asarray(dens).round(4))) > 1  # the examples' patterns differ
  np.testing.assert_allclose(out, ref, atol=1e-5)
  np.testing.assert_allclose(dq, dq_ref, atol=1e-4)


@pytest.mark.parametrize('implementation', ['xla', 'triton', 'mosaic_tpu'])
def test_return_lse_matches_reference_with_gradients_through_lse(qkv, implementation):
  """return_lse: lse [b, n, t] (-inf for empty rows) and gradients that flow through it
  (the cotangent of lse enters the backward as delta - dlse) on every backend."""
  from jax.experimental.pallas import tpu as pltpu
  interpret = {'xla': False, 'triton': True, 'mosaic_tpu': pltpu.InterpretParams()}
  l = 48
  dense = np.tril(np.ones((l, l), bool))
  dense[5] = False
  dense[32:48] = False
  mask = block_sparse.from_dense(dense[None, None], block_q=16, block_k=16)
  q, k, v, do = qkv(int(np.random.randint(1 << 30)), 1, l, l, 2, 1, 16, jnp.float32)
  dlse = jax.random.normal(jax.random.key(1), (1, 2, l))

  @functools.partial(jax.jit, static_argnums=0)
  def grads(impl, q, k, v):
    def loss(q, k, v):
      out, lse = block_sparse.attention(q, k, v, mask, implementation=impl,
                                        interpret=interpret.get(impl, False), return_lse=True)
      finite = jnp.where(jnp.isfinite(lse), lse, 0.0)
      return jnp.sum(out * do) + jnp.sum(finite * dlse), lse
    return jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)

  g, lse = grads(implementation, q, k, v)
  g_r, lse_r = grads('reference', q, k, v)
  assert lse.shape == (1, 2, l) and lse.dtype == jnp.float32
  empty = [5] + list(range(32, 48))
  assert np.isneginf(np.asarray(lse)[..., empty]).all()
  np.testing.assert_allclose(lse, lse_r, atol=1e-4)
  for name, a, b in zip(('dq', 'dk', 'dv'), g, g_r):
    np.testing.assert_allclose(a, b, atol=2e-4, err_msg=name)


@pytest.mark.parametrize('implementation', ['reference', 'xla', 'triton', 'mosaic_tpu'])
def test_masked_values_never_reach_outputs_or_gradients(qkv, implementation):
  """Keys / values no query may read and queries that may read no key (segment padding
  here), holding NaN or inf, give the outputs and gradients of zeros there."""
  from jax.experimental.pallas import tpu as pltpu
  l = 40  # Not a block multiple: partial tiles hold both read and unread entries.
  q_seg = np.array([0] * 20 + [1] * 14 + [3] * 6)  # Queries of segment 3 read nothing.
  kv_seg = np.array([0] * 20 + [1] * 14 + [2] * 6)  # Keys of segment 2: read by nobody.
  mask = block_sparse.from_positions(np.arange(l), block_q=16, block_k=16,
                                     q_segment_ids=q_seg, kv_segment_ids=kv_seg)
  q, k, v, do = qkv(np.random.randint(1 << 30), 1, l, l, 4, 2, 16, jnp.float32)
  interpret = pltpu.InterpretParams() if implementation == 'mosaic_tpu' else True

  @jax.jit
  def fwd_bwd(q, k, v):
    out, vjp = jax.vjp(lambda *a: block_sparse.attention(
        *a, mask, implementation=implementation, interpret=interpret), q, k, v)
    return (out,) + vjp(do)

  unread_k = (kv_seg == 2)[None, :, None, None]
  unread_q = (q_seg == 3)[None, :, None, None]
  clean = fwd_bwd(jnp.where(unread_q, 0.0, q), jnp.where(unread_k, 0.0, k),
                  jnp.where(unread_k, 0.0, v))
  poisoned = fwd_bwd(jnp.where(unread_q, jnp.nan, q), jnp.where(unread_k, jnp.inf, k),
                     jnp.where(unread_k, jnp.nan, v))
  for name, got, want in zip(('out', 'dq', 'dk', 'dv'), poisoned, clean):
    assert np.isfinite(np.asarray(got)).all(), name
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=0,
                               err_msg=name)

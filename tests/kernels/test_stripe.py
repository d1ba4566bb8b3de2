"""pallas_kernels.stripe (gathered-key attention) against its dense oracle, on CPU.

Interpreted Pallas kernels cost seconds to compile, so each backend case keeps
its shapes fixed and hypothesis draws only data (inputs, lists: unsorted,
ragged, empty, with duplicates and out-of-range entries), reusing one
executable per case; that also checks that a new pattern never recompiles.
The xla path additionally draws shapes.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings, strategies as st
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import block_sparse, stripe

# Max abs error against the float32 oracle, by input dtype: (out and lse, grads).
TOLERANCES = {jnp.float32: (1e-4, 2e-4), jnp.bfloat16: (3e-2, 8e-2)}
INTERPRET = {'reference': False, 'xla': False, 'triton': True,
             'mosaic_tpu': pltpu.InterpretParams()}

# No shrinking: a failing example reports its seed.
_settings = settings(max_examples=2, deadline=None, derandomize=False,
                     phases=(Phase.explicit, Phase.reuse, Phase.generate),
                     suppress_health_check=[HealthCheck.too_slow])


def random_inputs(seed, b, lq, lk, hq, hkv, d, dtype):
  ks = jax.random.split(jax.random.key(seed), 5)
  q = jax.random.normal(ks[0], (b, lq, hq, d), jnp.float32).astype(dtype)
  k = jax.random.normal(ks[1], (b, lk, hkv, d), jnp.float32).astype(dtype)
  v = jax.random.normal(ks[2], (b, lk, hkv, d), jnp.float32).astype(dtype)
  do = jax.random.normal(ks[3], (b, lq, hq, d), jnp.float32).astype(dtype)
  dlse = jax.random.normal(ks[4], (b, hq, lq), jnp.float32)
  return q, k, v, do, dlse


def random_lists(rng, shape, lk):
  """int32 (indices [*shape], counts [*shape[:-1]]): unsorted, ragged, some empty lists,
  duplicates and out-of-range entries."""
  idx = rng.integers(0, lk, shape)
  bad = rng.random(shape) < 0.1
  idx[bad] = rng.choice(np.array([-3, -1, lk, lk + 7]), size=int(bad.sum()))
  dup = rng.random(shape) < 0.2
  idx[dup] = np.roll(idx, 1, axis=-1)[dup]
  counts = rng.integers(0, shape[-1] + 1, shape[:-1])
  counts[rng.random(counts.shape) < 0.2] = 0
  return idx.astype(np.int32), counts.astype(np.int32)


@functools.partial(jax.jit, static_argnames=('impl', 'block_q', 'causal', 'tiles', 'grads'))
def _run(q, k, v, do, dlse, idx, counts, *, impl, block_q, causal, tiles=None, grads=True):
  """(out, lse, grads) of one implementation; the loss reads lse too (merging does)."""
  def loss(q, k, v):
    out, lse = stripe.attention(q, k, v, idx, counts, block_q=block_q, causal=causal,
                                implementation=impl, interpret=INTERPRET[impl], tiles=tiles,
                                return_lse=True)
    finite = jnp.where(jnp.isfinite(lse), lse, 0.0)
    return jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32)) + jnp.sum(finite * dlse), (
        out, lse)
  if not grads:
    return loss(q, k, v)[1] + ((),)
  g, (out, lse) = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
  return out, lse, g


def check_against_reference(seed, *, impl, b, lq, lk, hq, hkv, list_heads, d, block_q, cap,
                            causal, dtype=jnp.float32, tiles=None, grads=True, batch_lists=None):
  rng = np.random.default_rng(seed)
  q, k, v, do, dlse = random_inputs(seed, b, lq, lk, hq, hkv, d, dtype)
  nq = -(-lq // block_q)
  idx, counts = random_lists(rng, (batch_lists or b, list_heads, nq, cap), lk)
  kw = dict(block_q=block_q, causal=causal, grads=grads)
  out, lse, g = _run(q, k, v, do, dlse, idx, counts, impl=impl, tiles=tiles, **kw)
  out_r, lse_r, g_r = _run(q, k, v, do, dlse, idx, counts, impl='reference', **kw)
  tol, tol_g = TOLERANCES[dtype]
  assert out.dtype == dtype and out.shape == q.shape
  assert lse.dtype == jnp.float32 and lse.shape == (b, hq, lq)
  out, out_r = np.asarray(out, np.float32), np.asarray(out_r, np.float32)
  np.testing.assert_allclose(out, out_r, atol=tol, rtol=0, err_msg='out')
  lse, lse_r = np.asarray(lse), np.asarray(lse_r)
  np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(lse_r))  # empty rows agree
  empty = np.isneginf(lse_r)
  np.testing.assert_allclose(lse[~empty], lse_r[~empty], atol=tol, rtol=0, err_msg='lse')
  assert (out.transpose(0, 2, 1, 3)[empty] == 0).all()  # no key: zeros, never NaN
  for name, x, x_r in zip(('dq', 'dk', 'dv'), g, g_r):
    x = np.asarray(x, np.float32)
    assert np.isfinite(x).all(), name
    np.testing.assert_allclose(x, np.asarray(x_r, np.float32), atol=tol_g, rtol=0, err_msg=name)
  return empty


# (impl, dtype, heads (hq, hkv, list heads), causal, lq, lk, block_q, capacity, tiles, grads):
# GQA with lists per kv head, per query head and shared; causal with lq < lk, lq > lk and
# lq == lk; several list chunks per tile; tiles smaller than the list block.
CASES = [
    ('xla', jnp.float32, (4, 2, 2), True, 40, 56, 16, 12, stripe.Tiles(block_k=8), True),
    ('xla', jnp.bfloat16, (4, 2, 4), False, 40, 32, 16, 12, None, True),
    ('triton', jnp.float32, (4, 2, 2), True, 24, 40, 8, 40, stripe.Tiles(block_k=16), True),
    ('triton', jnp.bfloat16, (4, 1, 4), True, 40, 24, 16, 12, stripe.Tiles(block_q=8), False),
    ('mosaic_tpu', jnp.float32, (4, 2, 2), True, 24, 40, 8, 20, stripe.Tiles(block_k=8), True),
    ('mosaic_tpu', jnp.bfloat16, (2, 2, 1), False, 40, 40, 16, 12, stripe.Tiles(block_q=8),
     False),
]


@pytest.mark.parametrize('impl,dtype,heads,causal,lq,lk,block_q,cap,tiles,grads', CASES)
@_settings
@given(seed=st.integers(0, 2 ** 31 - 1))
def test_backends_match_reference(impl, dtype, heads, causal, lq, lk, block_q, cap, tiles,
                                  grads, seed):
  hq, hkv, hl = heads
  check_against_reference(seed, impl=impl, b=2, lq=lq, lk=lk, hq=hq, hkv=hkv, list_heads=hl,
                          d=16, block_q=block_q, cap=cap, causal=causal, dtype=dtype,
                          tiles=tiles, grads=grads)


@settings(max_examples=3, deadline=None)
@given(seed=st.integers(0, 2 ** 31 - 1), lq=st.integers(1, 48), lk=st.integers(1, 48),
       block_q=st.sampled_from([4, 8, 16]), heads=st.sampled_from([(2, 2, 1), (4, 2, 2),
                                                                   (4, 2, 4), (4, 1, 1)]),
       cap=st.integers(1, 24), causal=st.booleans(), batch_lists=st.sampled_from([1, 2]))
def test_xla_random_shapes(seed, lq, lk, block_q, heads, cap, causal, batch_lists):
  hq, hkv, hl = heads
  check_against_reference(seed, impl='xla', b=2, lq=lq, lk=lk, hq=hq, hkv=hkv, list_heads=hl,
                          d=8, block_q=block_q, cap=cap, causal=causal,
                          batch_lists=batch_lists)


def test_full_lists_equal_dense_attention():
  """Every key listed: plain dense attention (jax.nn); causal is end-aligned when lq < lk."""
  lq, lk = 24, 40
  q, k, v, *_ = random_inputs(0, 1, lq, lk, 4, 2, 16, jnp.float32)
  idx = np.broadcast_to(np.arange(lk, dtype=np.int32), (1, 1, lq // 8, lk))
  counts = np.full((1, 1, lq // 8), lk, np.int32)

  @jax.jit
  def both(q, k, v):
    end_aligned = np.arange(lk)[None, :] <= np.arange(lq)[:, None] + lk - lq
    return [(stripe.attention(q, k, v, idx, counts, block_q=8, causal=causal),
             jax.nn.dot_product_attention(q, k, v, mask=end_aligned if causal else None))
            for causal in (False, True)]
  for out, dense in both(q, k, v):
    np.testing.assert_allclose(out, dense, atol=1e-5)


def test_duplicates_padding_and_order_never_change_the_result():
  q, k, v, *_ = random_inputs(1, 1, 16, 32, 2, 2, 8, jnp.float32)
  keys = np.array([3, 9, 17, 30], np.int32)
  clean = keys.reshape(1, 1, 1, 4)
  messy = np.array([30, 3, 3, 99, 17, -1, 9, 30, 5, 6], np.int32).reshape(1, 1, 1, 10)
  run = jax.jit(lambda idx, n: stripe.attention(q, k, v, idx, n, block_q=16, return_lse=True))
  out, lse = run(np.pad(clean, [(0, 0)] * 3 + [(0, 6)]), np.array([[[4]]], np.int32))
  out_m, lse_m = run(messy, np.array([[[8]]], np.int32))  # entries 5, 6 past the count: padding
  np.testing.assert_allclose(out_m, out, atol=1e-6)
  np.testing.assert_allclose(lse_m, lse, atol=1e-6)
  idx, count = stripe.normalize(messy, np.array([[[8]]]), kv_len=32, width=12)
  assert int(count[0, 0, 0]) == 4
  np.testing.assert_array_equal(idx[0, 0, 0], [3, 9, 17, 30] + [30] * 8)


@pytest.mark.parametrize('impl', ['xla', 'triton', 'mosaic_tpu'])
def test_empty_lists_give_zeros_and_zero_grads(impl):
  q, k, v, do, _ = random_inputs(2, 1, 16, 16, 2, 1, 8, jnp.float32)
  idx = np.zeros((1, 1, 2, 4), np.int32)
  counts = np.zeros((1, 1, 2), np.int32)

  @jax.jit
  def f(q, k, v):
    (out, lse), vjp = jax.vjp(lambda *a: stripe.attention(
        *a, idx, counts, block_q=8, implementation=impl, interpret=INTERPRET[impl],
        return_lse=True, causal=True), q, k, v)
    return out, lse, vjp((do, jnp.ones_like(lse)))
  out, lse, grads = f(q, k, v)
  assert (np.asarray(out) == 0).all() and np.isneginf(np.asarray(lse)).all()
  for g in grads:
    assert (np.asarray(g) == 0).all()


@pytest.mark.parametrize('impl', ['xla', 'mosaic_tpu'])
def test_merge_with_block_sparse_equals_dense_union(impl):
  """AnchorAttention-style split: initial block + local (diagonal, causal) blocks through
  block_sparse, keys elsewhere through stripe lists; merge_partials of the two equals dense
  attention on the union, gradients included (xla)."""
  b, l, hq, hkv, d, blk = 1, 48, 4, 2, 16, 16
  seed = int(np.random.randint(1 << 30))
  rng = np.random.default_rng(seed)
  q, k, v, do, _ = random_inputs(seed, b, l, l, hq, hkv, d, jnp.float32)
  nb = l // blk
  tile = np.zeros((nb, nb), bool)
  tile[:, 0] = True
  tile[np.arange(nb), np.arange(nb)] = True
  mask = block_sparse.from_dense(
      (np.kron(tile, np.ones((blk, blk), bool)) & np.tril(np.ones((l, l), bool)))[None, None],
      block_q=blk, block_k=blk)
  # Stripes: random keys outside the initial and local blocks (disjoint from block_sparse).
  key_mask = rng.random((b, hkv, nb, l)) < 0.3
  key_blocks = np.arange(l) // blk
  key_mask &= (key_blocks[None, :] != 0) & (key_blocks[None, :] != np.arange(nb)[:, None])
  idx, counts = stripe.from_key_mask(key_mask, capacity=16)
  kept = np.asarray(stripe.dense_mask(idx, counts, q_len=l, kv_len=l, block_q=blk))  # [b,k,t,s]
  union = np.repeat(kept, hq // hkv, axis=1) | np.asarray(mask.to_dense())
  union &= np.tril(np.ones((l, l), bool))

  def merged(q, k, v):
    o_a, lse_a = block_sparse.attention(q, k, v, mask, implementation=impl,
                                        interpret=INTERPRET[impl], return_lse=True)
    o_b, lse_b = stripe.attention(q, k, v, idx, counts, block_q=blk, causal=True,
                                  implementation=impl, interpret=INTERPRET[impl],
                                  return_lse=True)
    return stripe.merge_partials(o_a, lse_a, o_b, lse_b)[0]

  dense = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=union)

  @jax.jit
  def both(q, k, v):
    if impl != 'xla':  # the Pallas forwards (their backward is tested above)
      return merged(q, k, v), dense(q, k, v), (), ()
    out, vjp = jax.vjp(merged, q, k, v)
    out_r, vjp_r = jax.vjp(dense, q, k, v)
    return out, out_r, vjp(do), vjp_r(do)
  out, out_r, grads, grads_r = both(q, k, v)
  np.testing.assert_allclose(out, out_r, atol=1e-4)
  for name, g, g_r in zip(('dq', 'dk', 'dv'), grads, grads_r):
    np.testing.assert_allclose(g, g_r, atol=2e-4, err_msg=name)


def test_merge_partials_with_empty_parts():
  out = jnp.ones((1, 2, 1, 4))
  lse = jnp.array([[[0.5, -jnp.inf]]])
  none = jnp.full((1, 1, 2), -jnp.inf)
  o, l = stripe.merge_partials(out, lse, jnp.zeros_like(out), none)
  np.testing.assert_allclose(o[0, 0], 1.0)
  assert (np.asarray(o[0, 1]) == 0).all() and np.isneginf(l[0, 0, 1]) and l[0, 0, 0] == 0.5
  grads = jax.jit(jax.grad(lambda a, la, lb: stripe.merge_partials(a, la, a, lb)[0].sum(),
                           argnums=(0, 1, 2)))(out, lse, none)
  assert all(np.isfinite(np.asarray(g)).all() for g in grads)


def test_lists_built_in_jit_never_retrace():
  """Lists from activations (top keys of pooled scores) inside jit: new patterns reuse the
  executable and match the reference."""
  traces = []
  q, k, v, *_ = random_inputs(3, 1, 32, 32, 2, 2, 8, jnp.float32)

  @jax.jit
  def f(q, k, v, scores):
    traces.append(1)
    top = jax.lax.top_k(scores, 6)[1].astype(jnp.int32)  # [1, 2, nq, 6]
    counts = jnp.full(top.shape[:3], 6, jnp.int32)
    return (stripe.attention(q, k, v, top, counts, block_q=8, causal=True),
            stripe.attention_ref(q, k, v, top, counts, block_q=8, causal=True))

  for seed in range(2):
    out, ref = f(q, k, v, jax.random.uniform(jax.random.key(seed), (1, 2, 4, 32)))
    np.testing.assert_allclose(out, ref, atol=1e-5)
  assert len(traces) == 1


def test_from_key_mask():
  mask = np.zeros((1, 1, 2, 10), bool)
  mask[0, 0, 0, [7, 2, 5]] = True
  idx, counts = stripe.from_key_mask(mask, capacity=2)
  np.testing.assert_array_equal(counts, [[[2, 0]]])
  np.testing.assert_array_equal(idx[0, 0, 0], [2, 5])


def test_sharded_over_batch_and_heads():
  """stripe (and block_sparse's return_lse, which merging needs) under shard_map."""
  if jax.device_count() < 4:
    pytest.skip('needs 4 devices (tests/conftest.py forces 8 CPU devices)')
  mesh = jax.make_mesh((2, 2), ('data', 'tensor'))
  q, k, v, do, _ = random_inputs(4, 2, 24, 24, 4, 2, 8, jnp.float32)
  idx, counts = random_lists(np.random.default_rng(4), (2, 2, 3, 10), 24)

  @jax.jit
  def f(q, k, v):
    res = []
    for kw in (dict(mesh=mesh), dict(implementation='reference')):
      out, vjp = jax.vjp(lambda *a: stripe.attention(*a, idx, counts, block_q=8, causal=True,
                                                     return_lse=True, **kw), q, k, v)
      res.append((out, vjp((do, jnp.zeros_like(out[1])))))
    mask = block_sparse.causal(24, block_q=8, block_k=8)
    bs = [block_sparse.attention(q, k, v, mask, return_lse=True, **kw)
          for kw in (dict(mesh=mesh), dict(implementation='reference'))]
    return res, bs
  (((out, lse), grads), ((out_r, lse_r), grads_r)), (bs, bs_r) = f(q, k, v)
  for x, x_r in zip(bs, bs_r):
    np.testing.assert_allclose(x, x_r, atol=1e-5)
  np.testing.assert_allclose(out, out_r, atol=1e-5)
  np.testing.assert_allclose(lse, lse_r, atol=1e-5)
  for g, g_r in zip(grads, grads_r):
    np.testing.assert_allclose(g, g_r, atol=1e-4)
  text = f.lower(q, k, v).as_text()
  assert 'shard_map' in text or 'sdy.manual_computation' in text


def test_bad_arguments_raise_one_line_errors():
  q, k, v, *_ = random_inputs(0, 2, 32, 32, 4, 2, 16, jnp.float32)
  idx = np.zeros((1, 2, 4, 8), np.int32)
  counts = np.zeros((1, 2, 4), np.int32)
  attn = functools.partial(stripe.attention, block_q=8)
  cases = [
      (lambda: attn(q[0], k, v, idx, counts), 'q must be rank 4'),
      (lambda: attn(q.astype(jnp.bfloat16), k, v, idx, counts), 'share a dtype'),
      (lambda: attn(q, k, v[:, :16], idx, counts), 'same shape'),
      (lambda: attn(q[:, :, :3], k, v, idx, counts), 'multiple of k/v heads'),
      (lambda: attn(q, k, v, idx[0], counts), 'indices must be int'),
      (lambda: attn(q, k, v, idx.astype(np.float32), counts), 'integer array'),
      (lambda: attn(q, k, v, idx, counts[..., :3]), 'counts must have shape'),
      (lambda: attn(q, k, v, np.zeros((1, 3, 4, 8), np.int32), np.zeros((1, 3, 4), np.int32)),
       'indices has 3 heads'),
      (lambda: attn(q, k, v, np.zeros((3, 2, 4, 8), np.int32), np.zeros((3, 2, 4), np.int32)),
       'indices has batch 3'),
      (lambda: stripe.attention(q, k, v, idx, counts, block_q=16), 'query blocks'),
      (lambda: attn(q, k, v, idx[..., :0], counts), 'capacity'),
      (lambda: stripe.attention(q, k, v, idx, counts, block_q=0), 'block_q must be'),
      (lambda: attn(q, k, v, idx, counts, implementation='cuda'), 'implementation must be'),
      (lambda: attn(q, k, v, idx, counts, implementation='triton'), 'interpret=True'),
      (lambda: attn(q, k, v, idx, counts, tiles=stripe.Tiles(block_q=3)), 'must divide'),
      (lambda: attn(q, k, v, idx, counts, implementation='triton', interpret=True,
                    tiles=stripe.Tiles(block_k=24)), 'power of two'),
  ]
  for fn, match in cases:
    with pytest.raises(ValueError, match=match) as e:
      fn()
    assert '\n' not in str(e.value), str(e.value)

"""BlockMask constructors against their dense equivalents, and table invariants."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from pallas_kernels import block_sparse
from pallas_kernels.block_sparse import block_mask as bm_lib


def dense_of(mask):
  return np.asarray(mask.to_dense())


def check_invariants(mask):
  """The table invariants of block_mask.py's spec."""
  nq, nk = mask.num_q_blocks, mask.num_kv_blocks
  partial, full = (np.asarray(x) for x in mask.block_bits())
  assert not (partial & full).any()
  for prefix, bits in (('', partial), ('full_', full)):
    for side, b, n_cols in (('kv', bits, nk), ('q', np.swapaxes(bits, -1, -2), nq)):
      num = np.asarray(getattr(mask, f'{prefix}{side}_num_blocks'))
      idx = np.asarray(getattr(mask, f'{prefix}{side}_indices'))
      assert num.dtype == np.int32 and idx.dtype == np.int32
      np.testing.assert_array_equal(num, b.sum(-1))
      for row in np.ndindex(num.shape):
        n = num[row]
        ids = idx[row]
        np.testing.assert_array_equal(ids[:n], np.flatnonzero(b[row]))
        assert (ids[n:] == (ids[n - 1] if n else 0)).all()  # padding repeats the last id
  assert mask.kv_capacity >= partial.sum((-2, -1)).max()
  assert mask.full_kv_capacity >= full.sum((-2, -1)).max()
  if mask.kv_len % mask.block_k:
    assert not full[..., -1].any()


def test_causal_matches_tril():
  m = block_sparse.causal(100, block_q=16, block_k=32)
  np.testing.assert_array_equal(dense_of(m)[0, 0], np.tril(np.ones((100, 100), bool)))
  check_invariants(m)
  assert m.kv_capacity == 7  # host masks get exact capacities: one diagonal tile per row


def test_causal_rectangular_is_top_left_aligned():
  m = block_sparse.causal(48, 80, block_q=16, block_k=16)
  np.testing.assert_array_equal(dense_of(m)[0, 0], np.tril(np.ones((48, 80), bool)))


def test_sliding_window_per_head_with_sinks():
  windows, sinks = np.array([1, 5, 33, 200]), np.array([0, 2, 7, 0])
  m = block_sparse.sliding_window(90, window=windows, sinks=sinks, block_q=16, block_k=8)
  i, j = np.arange(90)[:, None], np.arange(90)[None]
  for h in range(4):
    ref = (j <= i) & ((i - j < windows[h]) | (j < sinks[h]))
    np.testing.assert_array_equal(dense_of(m)[0, h], ref, err_msg=f'head {h}')
  check_invariants(m)


def test_bidirectional_window():
  m = block_sparse.sliding_window(64, window=9, causal=False, block_q=16, block_k=16)
  i, j = np.arange(64)[:, None], np.arange(64)[None]
  np.testing.assert_array_equal(dense_of(m)[0, 0], np.abs(i - j) < 9)


def test_positions_per_batch_and_head_permutation():
  rng = np.random.default_rng(0)
  pos = np.stack([np.stack([rng.permutation(64) for _ in range(3)]) for _ in range(2)])
  seg = (pos >= 40).astype(np.int32)
  m = block_sparse.from_positions(pos, block_q=16, block_k=16, window=20, sinks=3,
                                  q_segment_ids=seg)
  qp, kp = pos[..., :, None], pos[..., None, :]
  ref = (kp <= qp) & ((qp - kp < 20) | (kp < 3)) & (seg[..., :, None] == seg[..., None, :])
  np.testing.assert_array_equal(dense_of(m), ref)
  check_invariants(m)


def test_positions_traced_inside_jit_matches_host():
  pos = np.random.default_rng(1).permutation(80)
  host = block_sparse.from_positions(pos, block_q=16, block_k=16)
  traced = jax.jit(lambda p: block_sparse.from_positions(p, block_q=16, block_k=16))(
      jnp.asarray(pos))
  np.testing.assert_array_equal(dense_of(host), dense_of(traced))
  check_invariants(traced)


@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), lq=st.integers(1, 70), lk=st.integers(1, 70),
       bq=st.sampled_from([8, 16]), bk=st.sampled_from([8, 16, 32]))
def test_from_dense_roundtrip(seed, lq, lk, bq, bk):
  rng = np.random.default_rng(seed)
  dense = rng.random((2, 1, lq, lk)) < rng.random()
  for d in (dense, jnp.asarray(dense)):  # host (exact widths) and device (worst case)
    m = block_sparse.BlockMask.from_dense(d, block_q=bq, block_k=bk)
    np.testing.assert_array_equal(dense_of(m), dense)
    check_invariants(m)


@settings(max_examples=3, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), l=st.integers(20, 70))
def test_union_and_intersection_are_exact(seed, l):
  rng = np.random.default_rng(seed)
  a = block_sparse.from_dense(rng.random((1, 2, l, l)) < 0.4, block_q=16, block_k=8)
  b = block_sparse.sliding_window(l, window=np.array([3, 17]), sinks=np.array([1, 0]),
                                  block_q=16, block_k=8)
  c = block_sparse.causal(l, block_q=16, block_k=8)
  da, db, dc = dense_of(a), dense_of(b), dense_of(c)
  np.testing.assert_array_equal(dense_of(a | b), da | db)
  np.testing.assert_array_equal(dense_of(a & b), da & db)
  np.testing.assert_array_equal(dense_of(block_sparse.union(a, b, c)), da | db | dc)
  np.testing.assert_array_equal(dense_of(block_sparse.intersection(a, c)), da & dc)
  for m in (a | b, a & b):
    check_invariants(m)


def test_top_k_keeps_best_blocks_and_diagonal():
  scores = jax.random.uniform(jax.random.key(0), (2, 3, 6, 6))
  m = block_sparse.from_block_scores(scores, q_len=96, kv_len=96, block_q=16, block_k=16,
                                     top_k=2, causal=True)
  check_invariants(m)
  partial, full = (np.asarray(x) for x in m.block_bits())
  bits = partial | full
  s = np.asarray(scores)
  for b, h, i in np.ndindex(2, 3, 6):
    assert bits[b, h, i, i]  # diagonal forced
    assert not bits[b, h, i, i + 1:].any()  # causal
    cand = [j for j in range(i) if not bits[b, h, i, j]]
    chosen = [j for j in range(i) if bits[b, h, i, j]]
    assert len(chosen) == min(1, i)
    if chosen and cand:
      assert s[b, h, i, chosen[0]] >= max(s[b, h, i, c] for c in cand)
  i, j = np.arange(96)[:, None], np.arange(96)[None]
  up = np.repeat(np.repeat(bits, 16, 2), 16, 3)
  np.testing.assert_array_equal(dense_of(m), up & (j <= i))


def numpy_causal_top_k(scores, top_k, bq, bk, length):
  """Independent selection: the diagonal block plus the best k-1 other causal blocks
  (ties to the lower block id, NaN never chosen, +inf ranks like the largest float)."""
  nq, nk = scores.shape[-2:]
  bits = np.zeros(scores.shape, bool)
  for idx in np.ndindex(scores.shape[:2]):
    for i in range(nq):
      q_last = min((i + 1) * bq, length) - 1
      forced = min(q_last, length - 1) // bk
      row = np.minimum(scores[idx][i], np.finfo(np.float32).max)
      others = [j for j in range(nk) if j * bk <= q_last and j != forced and not np.isnan(row[j])]
      others.sort(key=lambda j: (-row[j], j))
      bits[idx][i, [forced] + others[:top_k - 1]] = True
  return bits


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), bq=st.sampled_from([16, 32]),
       bk=st.sampled_from([16, 32]), top_k=st.integers(1, 5), specials=st.booleans())
def test_causal_top_k_selection_and_tight_capacities(seed, bq, bk, top_k, specials):
  """The kept blocks equal an independent numpy top-k (also with +inf / NaN scores, where
  the forced diagonal block must still win), and the static capacities, which size the
  kernels' work lists, are never below the tiles kept and for square blocks exactly them."""
  rng = np.random.default_rng(seed)
  scores = rng.random((1, 2, 128 // bq, 128 // bk)).astype(np.float32)
  if specials:
    scores[rng.random(scores.shape) < 0.5] = np.inf
    scores[rng.random(scores.shape) < 0.15] = np.nan
  m = block_sparse.from_block_scores(scores, q_len=128, kv_len=128, block_q=bq, block_k=bk,
                                     top_k=top_k, causal=True)
  check_invariants(m)
  partial, full = (np.asarray(x) for x in m.block_bits())
  np.testing.assert_array_equal(partial | full, numpy_causal_top_k(scores, top_k, bq, bk, 128))
  if bq == bk and not specials:  # (NaN scores keep fewer tiles than the bound)
    assert m.kv_capacity == max(1, partial.sum((-2, -1)).max())  # tables are never empty
    assert m.full_kv_capacity == max(1, full.sum((-2, -1)).max())


def test_causal_top_k_keeps_the_diagonal_against_infinite_scores():
  scores = np.random.default_rng(0).random((1, 1, 8, 8)).astype(np.float32)
  scores[..., :3] = np.inf  # ties with the forced block's own +inf
  m = block_sparse.from_block_scores(scores, q_len=128, kv_len=128, block_q=16, block_k=16,
                                     top_k=3, causal=True)
  bits = np.asarray(m.block_bits()[0] | m.block_bits()[1])[0, 0]
  np.testing.assert_array_equal(bits, numpy_causal_top_k(scores, 3, 16, 16, 128)[0, 0])
  assert bits[np.arange(8), np.arange(8)].all()


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), bq=st.sampled_from([16, 32]),
       bk=st.sampled_from([16, 32]), max_blocks=st.integers(1, 5), top_p=st.floats(0.1, 1.0))
def test_causal_top_p_capacities_hold_the_tiles(seed, bq, bk, max_blocks, top_p):
  scores = jax.random.uniform(jax.random.key(seed), (1, 2, 128 // bq, 128 // bk))
  m = block_sparse.from_block_scores(scores, q_len=128, kv_len=128, block_q=bq, block_k=bk,
                                     causal=True, top_p=top_p, max_blocks=max_blocks)
  check_invariants(m)
  bits = np.asarray(m.block_bits()[0] | m.block_bits()[1])
  assert bits.sum(-1).max() <= max_blocks and bits.sum(-1).min() >= 1


def test_top_p_selects_fewest_blocks_reaching_mass():
  w = np.array([[[[0.5, 0.3, 0.15, 0.05]]]], np.float32)
  for p, expect in ((0.5, 1), (0.7, 2), (0.8, 2), (0.9, 3), (0.99, 4)):
    m = block_sparse.from_block_scores(w, q_len=16, kv_len=64, block_q=16, block_k=16,
                                       top_p=p)
    assert int(np.asarray(m.full_kv_num_blocks)[0, 0, 0]) == expect, p
    check_invariants(m)


def test_from_tables_normalises_order_and_padding():
  m = block_sparse.from_tables(np.array([[[2, 0]]], np.int32),
                               np.array([[[3, 1, 1], [2, 2, 2]]], np.int32),
                               q_len=32, kv_len=64, block_q=16, block_k=16)
  np.testing.assert_array_equal(np.asarray(m.full_kv_num_blocks), [[[0, 0]]])
  np.testing.assert_array_equal(np.asarray(m.kv_indices)[0, 0, 0, :2], [1, 3])
  check_invariants(m)


def test_density():
  m = block_sparse.full(64, block_q=16, block_k=16)
  assert float(m.density()) == 1.0
  c = block_sparse.causal(64, block_q=16, block_k=16)
  assert float(c.density()) == pytest.approx(10 / 16)
  assert float(c.allowed_fraction()) == pytest.approx((64 * 65 / 2) / 64**2)


def test_constructor_errors():
  with pytest.raises(ValueError, match='dense'):
    block_sparse.from_dense(np.ones((4, 4), bool), block_q=2, block_k=2)
  with pytest.raises(ValueError, match='block_q'):
    block_sparse.causal(16, block_q=0)
  with pytest.raises(ValueError, match='top_k'):
    block_sparse.from_block_scores(np.ones((1, 1, 1, 1)), q_len=16, kv_len=16, block_q=16,
                                   block_k=16)
  with pytest.raises(ValueError, match='scores'):
    block_sparse.from_block_scores(np.ones((1, 1, 2, 2)), q_len=16, kv_len=16, block_q=16,
                                   block_k=16, top_k=1)
  with pytest.raises(ValueError, match='differ'):
    block_sparse.causal(32, block_q=16, block_k=16) | block_sparse.causal(
        32, block_q=8, block_k=16)


def test_mask_is_pytree_with_static_metadata():
  m = block_sparse.causal(64, block_q=16, block_k=16)
  leaves, treedef = jax.tree.flatten(m)
  assert all(isinstance(x, jax.Array) for x in leaves)
  m2 = jax.tree.unflatten(treedef, leaves)
  assert (m2.q_len, m2.block_k, m2.kv_capacity) == (64, 16, m.kv_capacity)


def test_table_to_bits_inverse():
  rng = np.random.default_rng(3)
  bits = rng.random((2, 2, 5, 7)) < 0.5
  count, ids = bm_lib._bits_to_table(bits, 7, np)
  np.testing.assert_array_equal(np.asarray(bm_lib._table_to_bits(count, ids, 7)), bits)


@pytest.mark.parametrize('make', [
    lambda: block_sparse.sliding_window(64, window=-1),  # flash-attn's "-1 = unbounded"
    lambda: block_sparse.sliding_window(64, window=np.array([16, 0, 8, 4])),
    lambda: block_sparse.sliding_window(64, window=8, sinks=-2),
    lambda: block_sparse.from_positions(np.arange(64), window=-1, causal=False),
    lambda: block_sparse.from_positions(jnp.arange(64), window=jnp.array([-1, 4])),
    lambda: block_sparse.from_block_scores(np.ones((1, 1, 4, 4)), q_len=64, kv_len=64,
                                           block_q=16, block_k=16, top_p=0.0),
])
def test_nonsense_arguments_raise_instead_of_masking_everything(make):
  """window <= 0, sinks < 0 or top_p <= 0 used to give a mask with no allowed pair (all-zero
  attention); they raise at the entry point, window=-1 with a hint."""
  with pytest.raises(ValueError, match='window|sinks|top_p'):
    make()

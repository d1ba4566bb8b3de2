"""mosaic_tpu backend (Pallas TPU kernels) against the dense oracle, on CPU.

The kernels run under the TPU interpret mode (`pltpu.InterpretParams()`),
which simulates TPU memory spaces and DMAs on CPU. Compiling an interpreted
kernel costs seconds, so every test keeps its shapes and mask structure fixed
and draws only data (inputs, mask bits, windows, permutations) as jax arrays:
each test compiles once and hypothesis examples reuse the executable. That
also checks that a new pattern never retraces.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings, strategies as st
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import block_sparse
from pallas_kernels.block_sparse import mosaic_tpu, reference
from pallas_kernels.block_sparse.tiles import Tiles

INTERPRET = pltpu.InterpretParams()

# Max abs error against the float32 oracle, by input dtype: (out, grads).
TOLERANCES = {
    jnp.float32: (1e-4, 2e-4),
    jnp.bfloat16: (3e-2, 8e-2),
}

# One fresh example per run and no shrinking: an interpret-mode example costs ~10 s on CPU;
# a failure reports its seed.
_settings = settings(max_examples=1, deadline=None, phases=(Phase.explicit, Phase.reuse,
                                                            Phase.generate),
                     suppress_health_check=[HealthCheck.too_slow])

_TRACES = {}


@functools.partial(jax.jit, static_argnames=('implementation', 'tiles', 'name'))
def _run(q, k, v, do, mask, implementation, tiles=None, name=''):
  """out and (dq, dk, dv) of one implementation; counts traces per `name`."""
  _TRACES[name] = _TRACES.get(name, 0) + 1
  fn = lambda q, k, v: block_sparse.attention(q, k, v, mask, implementation=implementation,
                                              interpret=INTERPRET, tiles=tiles)
  out, vjp = jax.vjp(fn, q, k, v)
  return out, vjp(do)


def _inputs(seed, b, lq, lk, hq, hkv, d, dtype):
  ks = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(ks[0], (b, lq, hq, d), jnp.float32).astype(dtype)
  k = jax.random.normal(ks[1], (b, lk, hkv, d), jnp.float32).astype(dtype)
  v = jax.random.normal(ks[2], (b, lk, hkv, d), jnp.float32).astype(dtype)
  do = jax.random.normal(ks[3], (b, lq, hq, d), jnp.float32).astype(dtype)
  return q, k, v, do


def _check(mask, seed, *, b, lq, lk, hq, hkv, d, dtype, tiles=None, name=''):
  """Compares mosaic_tpu to the reference: out, dq, dk, dv. Returns (out, grads)."""
  q, k, v, do = _inputs(seed, b, lq, lk, hq, hkv, d, dtype)
  out, grads = _run(q, k, v, do, mask, 'mosaic_tpu', tiles, name)
  out_r, grads_r = _run(q, k, v, do, mask, 'reference', None, name + '/ref')
  tol_out, tol_grad = TOLERANCES[dtype]
  assert out.dtype == dtype and out.shape == q.shape
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(out_r, np.float32),
                             atol=tol_out, rtol=0, err_msg='out')
  for label, g, g_r, x in zip(('dq', 'dk', 'dv'), grads, grads_r, (q, k, v)):
    assert g.dtype == x.dtype and g.shape == x.shape, label
    g = np.asarray(g, np.float32)
    assert np.isfinite(g).all(), label
    np.testing.assert_allclose(g, np.asarray(g_r, np.float32), atol=tol_grad, rtol=0,
                               err_msg=label)
  return out, grads


def _random_dense(rng, shape, block_q, block_k):
  """bool [B, H, Lq, Lk]: random empty / partial / full tiles, some empty rows."""
  bm, hm, lq, lk = shape
  nq, nk = -(-lq // block_q), -(-lk // block_k)
  cls = rng.choice(3, size=(bm, hm, nq, nk), p=[0.3, 0.4, 0.3])
  up = np.repeat(np.repeat(cls, block_q, axis=2), block_k, axis=3)[:, :, :lq, :lk]
  dense = (up == 2) | ((up == 1) & (rng.random(shape) < 0.5))
  dense[:, :, rng.integers(lq, size=3)] = False  # fully masked rows
  dense[0, 0, :block_q] = False  # a query block with no key block at all
  return dense


# ---- the slot walk: no DMA for skipped steps ---------------------------------------------


@pytest.mark.parametrize('r', [1, 2])
def test_skipped_steps_stay_on_the_resident_tile(r):
  """Running steps visit exactly the tables' tiles, partial then full, in order;
  a step that computes nothing points at the tile already resident (so the TPU
  pipeline issues no DMA), and a row's leading idle steps at its first tile."""
  rng = np.random.default_rng(r)
  mask = block_sparse.from_dense(_random_dense(rng, (2, 2, 64, 96), 16, 16), block_q=16,
                                 block_k=16)
  partial, full = (np.asarray(x) for x in mask.block_bits())
  for transposed in (False, True):
    tables, walk = mosaic_tpu._walk(mask, transposed, r)
    bits_p, bits_f = (np.swapaxes(x, -1, -2) if transposed else x for x in (partial, full))
    idx = np.indices((walk.batch, walk.heads, walk.rows, walk.steps)).reshape(4, -1)
    lookup = jax.vmap(lambda b, h, row, step: walk.lookup(tables, b, h, row, step))
    tile, run_p, run_f = (np.asarray(x).reshape(walk.batch, walk.heads, walk.rows, -1)
                          for x in lookup(*jnp.asarray(idx, jnp.int32)))
    for key in np.ndindex(walk.batch, walk.heads, walk.rows):
      run = run_p[key] | run_f[key]
      assert not (run_p[key] & run_f[key]).any()
      for got, bits in ((tile[key][run_p[key]], bits_p[key]), (tile[key][run_f[key]],
                                                                bits_f[key])):
        want = [blk * r + sub for blk in np.flatnonzero(bits) for sub in range(r)]
        np.testing.assert_array_equal(got, want, err_msg=f'{transposed=} {key=}')
      for step in range(1, walk.steps):
        if not run[step]:
          assert tile[key][step] == tile[key][step - 1], (transposed, key, step)
      if run.any():
        assert tile[key][0] == tile[key][np.argmax(run)], (transposed, key)


# ---- random tables with random partial bits --------------------------------------------


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
@_settings
@given(seed=st.integers(0, 2**31 - 1))
def test_random_dense_masks_gqa_padding(dtype, seed):
  """from_dense on random masks: per-batch and per-head patterns, GQA, padded
  lengths, fully masked rows and query blocks."""
  b, lq, lk, hq, hkv, d = 2, 64, 72, 2, 1, 32
  rng = np.random.default_rng(seed)
  dense = _random_dense(rng, (b, hq, lq, lk), 32, 32)
  mask = block_sparse.from_dense(jnp.asarray(dense), block_q=32, block_k=32)
  name = f'dense/{jnp.dtype(dtype).name}'
  out, grads = _check(mask, seed, b=b, lq=lq, lk=lk, hq=hq, hkv=hkv, d=d, dtype=dtype,
                      name=name)
  empty = ~dense.any(-1)  # [b, n, t]
  out = np.asarray(out, np.float32).transpose(0, 2, 1, 3)
  dq = np.asarray(grads[0], np.float32).transpose(0, 2, 1, 3)
  assert (out[empty] == 0).all() and (dq[empty] == 0).all()
  assert _TRACES[name] == 1  # traced tables: a new pattern reuses the executable


# ---- position rules: causal, windows + sinks per head, permutations, segments ---------


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
@_settings
@given(seed=st.integers(0, 2**31 - 1), causal=st.booleans(), permute=st.booleans())
def test_position_masks(dtype, seed, causal, permute):
  """from_positions with per-head windows, sinks, segments and permuted positions."""
  b, l, hq, hkv, d = 1, 96, 2, 1, 32
  rng = np.random.default_rng(seed)
  pos = np.stack([rng.permutation(l) if permute else np.arange(l) for _ in range(hq)])
  window = rng.choice([1, 7, 20, 50, 1000], size=hq)
  sinks = rng.choice([0, 0, 3, 16], size=hq)
  segments = np.sort(rng.integers(0, 2, size=l))[None, None]
  mask = block_sparse.from_positions(
      jnp.asarray(pos[None]), block_q=32, block_k=32, causal=causal,
      window=jnp.asarray(window), sinks=jnp.asarray(sinks),
      q_segment_ids=jnp.asarray(segments))
  _check(mask, seed, b=b, lq=l, lk=l, hq=hq, hkv=hkv, d=d, dtype=dtype,
         name=f'positions/{jnp.dtype(dtype).name}')


# ---- host-built constructors -------------------------------------------------------------


def test_union_of_causal_and_per_head_windows():
  """Union / intersection rules (BlockRule, OrRule, AndRule leaves), host tables, and
  compute tiles smaller than the mask blocks on both sides of every kernel."""
  l = 56  # padded to 64: a KvLengthRule is AND-ed in
  window = block_sparse.sliding_window(l, window=np.array([5, 20]), sinks=np.array([2, 0]),
                                       block_q=32, block_k=32)
  causal = block_sparse.causal(l, block_q=32, block_k=32)
  mask = (window | block_sparse.from_dense(np.tril(np.ones((1, 1, l, l), bool), -30),
                                           block_q=32, block_k=32)) & causal
  tiles = Tiles(block_q=16, block_k=16, block_q_bwd=16, block_k_bwd=16)
  _check(mask, 0, b=1, lq=l, lk=l, hq=2, hkv=2, d=32, dtype=jnp.float32, tiles=tiles,
         name='union')


def test_top_k_block_scores_forward_lse():
  """Traced top-k tables (GQA 4:1), and the forward's lse against the oracle's."""
  b, l, hq, hkv, d = 1, 128, 4, 1, 32
  scores = jax.random.uniform(jax.random.key(1), (b, hq, 4, 4))
  mask = block_sparse.from_block_scores(scores, q_len=l, kv_len=l, block_q=32, block_k=32,
                                        top_k=2, causal=True)
  q, k, v, _ = _inputs(3, b, l, l, hq, hkv, d, jnp.float32)
  tiles = Tiles().resolve(32, 32, d)
  out, lse = jax.jit(lambda q, k, v, m: mosaic_tpu.forward(
      q, k, v, m.for_kernel(), d ** -0.5, tiles, INTERPRET))(q, k, v, mask)
  out_r, lse_r = reference.attention_with_lse_ref(q, k, v, mask, d ** -0.5)
  assert lse.shape == (b, hq, l) and lse.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(out), np.asarray(out_r), atol=1e-4, rtol=0)
  np.testing.assert_allclose(np.asarray(lse), np.asarray(lse_r), atol=1e-4, rtol=0)


def test_tiles_must_be_sublane_multiples():
  mask = block_sparse.causal(48, block_q=12, block_k=16)
  q = jnp.zeros((1, 48, 1, 32))
  with pytest.raises(ValueError, match='multiple of 8'):
    block_sparse.attention(q, q, q, mask, implementation='mosaic_tpu', interpret=INTERPRET)


# ---- TPU lowering (no hardware: Pallas -> Mosaic lowering only) -----------------------------


def test_kernels_lower_for_tpu():
  """Forward and backward lower for TPU at TPU-sized tiles, with every rule leaf kind.

  This runs the Pallas TPU lowering (block-shape rules, scalar prefetch, the
  in-kernel rule), not the Mosaic compiler: layout problems need a TPU.
  """
  b, l, hq, hkv, d = 2, 512, 4, 2, 128
  dense = np.random.default_rng(0).random((1, 1, l, l)) < 0.5
  window = block_sparse.sliding_window(l, window=np.array([100, 200, 300, 50]),
                                       sinks=np.array([0, 4, 8, 0]), block_q=128, block_k=128)
  mask = (window | block_sparse.from_dense(dense, block_q=128, block_k=128)).for_kernel()
  tiles = Tiles(block_q=128, block_k=128, block_q_bwd=128, block_k_bwd=128).resolve(128, 128, d)
  q = jax.ShapeDtypeStruct((b, l, hq, d), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((b, l, hkv, d), jnp.bfloat16)

  def fwd_bwd(q, k, v, mask):
    out, lse = mosaic_tpu.forward(q, k, v, mask, 0.1, tiles, False)
    return mosaic_tpu.backward(q, k, v, out, lse, out, mask, 0.1, tiles, False)

  text = jax.jit(fwd_bwd).trace(q, kv, kv, mask).lower(lowering_platforms=('tpu',)).as_text()
  assert text.count('tpu_custom_call') == 3  # forward, dq, dk/dv

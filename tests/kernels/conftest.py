"""Shared helpers for the block-sparse kernel tests (exposed as fixtures)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import block_sparse

# Max abs error allowed against the float32 oracle, by input dtype: (out, grads).
TOLERANCES = {
    jnp.float32: (1e-4, 2e-4),
    jnp.bfloat16: (3e-2, 8e-2),
}


def random_qkv(seed, b, lq, lk, hq, hkv, d, dtype):
  ks = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(ks[0], (b, lq, hq, d), jnp.float32).astype(dtype)
  k = jax.random.normal(ks[1], (b, lk, hkv, d), jnp.float32).astype(dtype)
  v = jax.random.normal(ks[2], (b, lk, hkv, d), jnp.float32).astype(dtype)
  do = jax.random.normal(ks[3], (b, lq, hq, d), jnp.float32).astype(dtype)
  return q, k, v, do


def random_dense_mask(rng, shape, block_q, block_k, p_full=0.3, p_partial=0.4, p_bit=0.5):
  """bool [B, H, Lq, Lk] whose tiles are random mixes of empty / partial / full."""
  bm, hm, lq, lk = shape
  nq, nk = -(-lq // block_q), -(-lk // block_k)
  cls = rng.choice(3, size=(bm, hm, nq, nk), p=[1 - p_full - p_partial, p_partial, p_full])
  up = np.repeat(np.repeat(cls, block_q, axis=2), block_k, axis=3)[:, :, :lq, :lk]
  bits = rng.random(shape) < p_bit
  return (up == 2) | ((up == 1) & bits)


def compare_to_reference(mask, *, b, lq, lk, hq, hkv, d, dtype=jnp.float32,
                         implementation='xla', seed=0, tiles=None, grads=True):
  """Checks out (and dq, dk, dv) of `implementation` against the dense oracle."""
  q, k, v, do = random_qkv(seed, b, lq, lk, hq, hkv, d, dtype)
  fn = lambda q, k, v, m: block_sparse.attention(q, k, v, m, implementation=implementation,
                                                 interpret=True, tiles=tiles)
  ref = lambda q, k, v, m: block_sparse.attention_ref(q, k, v, m)
  tol_out, tol_grad = TOLERANCES[dtype]

  @jax.jit
  def both(q, k, v, do, mask):  # one compilation per case: eager scans are slow
    if not grads:
      return fn(q, k, v, mask), ref(q, k, v, mask), (), ()
    out, vjp = jax.vjp(lambda *a: fn(*a, mask), q, k, v)
    out_r, vjp_r = jax.vjp(lambda *a: ref(*a, mask), q, k, v)
    return out, out_r, vjp(do), vjp_r(do)

  out, out_r, g, g_r = both(q, k, v, do, mask)
  assert out.dtype == dtype and out.shape == q.shape
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(out_r, np.float32),
                             atol=tol_out, rtol=0, err_msg='out')
  for name, g, g_r in zip(('dq', 'dk', 'dv'), g, g_r):
    assert not np.isnan(np.asarray(g, np.float32)).any(), name
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(g_r, np.float32),
                               atol=tol_grad, rtol=0, err_msg=name)
  return out


@pytest.fixture(scope="session")
def check():
  return compare_to_reference


@pytest.fixture(scope="session")
def qkv():
  return random_qkv


@pytest.fixture(scope="session")
def dense_mask():
  return random_dense_mask

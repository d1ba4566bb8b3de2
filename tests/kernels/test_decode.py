"""pallas_kernels.decode against its dense oracle on ragged per-head caches.

Shapes are fixed per test (an interpreted Pallas kernel costs seconds to
compile); hypothesis draws the data: lengths (including empty caches), slot
positions, windows and sinks.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings, strategies as st
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import decode

# Max abs error against the float32 oracle, by input dtype.
TOLERANCES = {jnp.float32: 2e-5, jnp.bfloat16: 3e-2}
INTERPRET = {'xla': False, 'reference': False, 'triton': True,
             'mosaic_tpu': pltpu.InterpretParams()}

_settings = settings(max_examples=3, deadline=None, derandomize=False,
                     phases=(Phase.explicit, Phase.reuse, Phase.generate),
                     suppress_health_check=[HealthCheck.too_slow])

B, T, N, K, C, D = 2, 2, 4, 2, 40, 16  # GQA group 2, c not a multiple of block_k.


@functools.partial(jax.jit, static_argnames=('implementation', 'positions'))
def _both(q, k, v, lengths, qpos, kpos, window, sinks, *, implementation, positions):
  kw = dict(q_positions=qpos, kv_positions=kpos, window=window, sinks=sinks) if positions else {}
  out = decode.decode_attention(q, k, v, lengths, implementation=implementation,
                                interpret=INTERPRET[implementation], block_k=16, **kw)
  ref = decode.decode_attention_ref(q, k, v, lengths, **kw)
  return out, ref


def _inputs(seed, dtype, empty_head, t=T):
  rng = np.random.default_rng(seed)
  ks = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(ks[0], (B, t, N, D), jnp.float32).astype(dtype)
  k = jax.random.normal(ks[1], (B, K, C, D), jnp.float32).astype(dtype)
  v = jax.random.normal(ks[2], (B, K, C, D), jnp.float32).astype(dtype)
  lengths = rng.integers(0, C + 1, (B, K)).astype(np.int32)
  if empty_head:
    lengths[0, 1] = 0
  # Slots hold a shuffled set of past positions (a ring buffer's order is arbitrary).
  kpos = np.stack([np.stack([rng.permutation(60)[:C] for _ in range(K)]) for _ in range(B)])
  qpos = rng.integers(30, 64, (B, t))
  window = rng.integers(1, 40, (K,))
  sinks = rng.integers(0, 8, (K,))
  return q, k, v, lengths, qpos.astype(np.int32), kpos.astype(np.int32), window, sinks


# One compiled variant per case: lengths-only (pure ragged decode) and token-exact positions.
CASES = [(impl, dtype, positions) for impl in ('xla', 'triton', 'mosaic_tpu')
         for dtype, positions in ((jnp.float32, True), (jnp.bfloat16, False))]
CASES += [('xla', jnp.float32, False), ('xla', jnp.bfloat16, True)]


@pytest.mark.parametrize('implementation,dtype,positions', CASES)
@_settings
@given(seed=st.integers(0, 2 ** 31 - 1), empty_head=st.booleans())
def test_decode_matches_reference(implementation, dtype, positions, seed, empty_head):
  q, k, v, lengths, qpos, kpos, window, sinks = _inputs(seed, dtype, empty_head)
  out, ref = _both(q, k, v, lengths, qpos, kpos, window, sinks, implementation=implementation,
                   positions=positions)
  out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
  assert out.shape == q.shape and not np.isnan(out).any()
  np.testing.assert_allclose(out, ref, atol=TOLERANCES[dtype], rtol=0)
  if empty_head:  # Both query heads of the empty kv head read nothing: zeros.
    np.testing.assert_array_equal(out[0, :, 2:4], 0.0)


def test_reference_matches_softmax_over_valid_slots():
  q, k, v, lengths, *_ = _inputs(0, jnp.float32, False)
  lengths = np.array([[5, 40], [1, 17]], np.int32)
  out = decode.decode_attention_ref(q, k, v, lengths)
  for b in range(B):
    for n in range(N):
      kh = n // (N // K)
      s = np.asarray(q[b, :, n]) @ np.asarray(k[b, kh, :lengths[b, kh]]).T / np.sqrt(D)
      p = np.exp(s - s.max(-1, keepdims=True))
      p /= p.sum(-1, keepdims=True)
      np.testing.assert_allclose(out[b, :, n], p @ np.asarray(v[b, kh, :lengths[b, kh]]),
                                 atol=1e-5)


def test_bad_input_raises():
  q, k, v, lengths, qpos, kpos, *_ = _inputs(0, jnp.float32, False)
  with pytest.raises(ValueError, match='needs a GPU'):
    decode.decode_attention(q, k, v, lengths, implementation='triton')
  with pytest.raises(ValueError, match='implementation must be'):
    decode.decode_attention(q, k, v, lengths, implementation='cuda')
  with pytest.raises(ValueError, match='lengths must be'):
    decode.decode_attention(q, k, v, lengths[0])
  with pytest.raises(ValueError, match='together'):
    decode.decode_attention(q, k, v, lengths, q_positions=qpos)
  with pytest.raises(ValueError, match='multiple of cache kv heads'):
    decode.decode_attention(q[:, :, :3], k, v, lengths)
  with pytest.raises(ValueError, match='need q_positions'):
    decode.decode_attention(q, k, v, lengths, window=4)
  # Nonsense values used to mask every slot (all-zero output) instead of failing.
  with pytest.raises(ValueError, match='window=None is unbounded'):
    decode.decode_attention(q, k, v, lengths, q_positions=qpos, kv_positions=kpos, window=-1)
  with pytest.raises(ValueError, match='sinks must be >= 0'):
    decode.decode_attention(q, k, v, lengths, q_positions=qpos, kv_positions=kpos, sinks=-1)
  with pytest.raises(ValueError, match='lengths must be >= 0'):
    decode.decode_attention(q, k, v, lengths - 50)


def test_triton_many_query_rows_use_several_row_blocks():
  """A multi-token append (g * t = 80 rows) runs as several row blocks per kv head."""
  from pallas_kernels.decode import triton as triton_decode
  assert triton_decode.block_rows(80) == (64, 128)
  q, k, v, lengths, qpos, kpos, window, sinks = _inputs(np.random.randint(1 << 30),
                                                        jnp.float32, False, t=40)
  out, ref = _both(q, k, v, lengths, qpos, kpos, window, sinks, implementation='triton',
                   positions=True)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=TOLERANCES[jnp.float32],
                             rtol=0)


@pytest.mark.parametrize('implementation', ['reference', 'xla', 'triton', 'mosaic_tpu'])
def test_unread_slots_never_reach_the_output(implementation):
  """NaN / inf in slots past a head's length, and in slots the position rule hides from
  every query, give the output of the same cache with zeros there (no 0 * NaN)."""
  q, k, v, lengths, qpos, kpos, window, sinks = _inputs(np.random.randint(1 << 30),
                                                        jnp.float32, False)
  ok = ((np.arange(C) < lengths[..., None])[:, :, None, :]
        & (kpos[:, :, None, :] <= qpos[:, None, :, None])
        & ((qpos[:, None, :, None] - kpos[:, :, None, :] < window[None, :, None, None])
           | (kpos[:, :, None, :] < sinks[None, :, None, None])))  # [b, k, t, c]
  unread = ~ok.any(axis=2)[..., None]
  assert unread.any() and not unread.all()
  bad_k, bad_v = jnp.where(unread, jnp.nan, k), jnp.where(unread, jnp.inf, v)
  out, ref = _both(q, k, v, lengths, qpos, kpos, window, sinks, implementation=implementation,
                   positions=True)
  bad_out, bad_ref = _both(q, bad_k, bad_v, lengths, qpos, kpos, window, sinks,
                           implementation=implementation, positions=True)
  for got, want in ((bad_out, out), (bad_ref, ref)):
    assert np.isfinite(np.asarray(got)).all()
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6, rtol=0)

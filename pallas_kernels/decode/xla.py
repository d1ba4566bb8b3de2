"""Split-KV (flash-decoding) decode attention in XLA: the CPU / portable path.

Einsum legend: see reference.py; j cache block, r slot within a block.

The cache is cut into blocks of `block_k` slots; every block computes its own
max, normaliser and partial output in parallel, and the blocks are combined
with the usual log-sum-exp rescaling. Blocks past a head's length contribute
nothing (their scores are masked); the work is the padded capacity, which is
what XLA's static shapes allow.
"""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels.decode.reference import MASK_VALUE, allowed

M_INIT = 0.5 * MASK_VALUE


def forward(q, k, v, lengths, q_positions, kv_positions, window, sinks, scale, block_k,
            interpret=False):
  """Backend contract (see api.py): [b, t, n, d] in q.dtype; c % block_k == 0."""
  del interpret
  b, t, n, d = q.shape
  kh, c = k.shape[1], k.shape[2]
  g, nb = n // kh, c // block_k
  # Plain batched matmuls over (b, k): rows (g t) x slots (j r).
  q_bkrd = jnp.einsum('btkgd->bkgtd', q.reshape(b, t, kh, g, d)).reshape(b, kh, g * t, d)
  s = jnp.einsum('bkrd,bkcd->bkrc', q_bkrd, k, preferred_element_type=jnp.float32) * scale
  s = s.reshape(b, kh, g, t, nb, block_k)
  slot = jnp.arange(c).reshape(nb, block_k)
  length = lengths[:, :, None, None, None, None]
  if q_positions is None:
    ok = allowed(slot, length)
  else:
    ok = allowed(slot, length, q_positions[:, None, None, :, None, None],
                 kv_positions.reshape(b, kh, 1, 1, nb, block_k),
                 window[None, :, None, None, None, None], sinks[None, :, None, None, None, None])
  s = jnp.where(ok, s, MASK_VALUE)
  # Slots no query reads are zeroed (a NaN there would reach p @ v as 0 * NaN).
  read = jnp.any(jnp.broadcast_to(ok, s.shape), axis=(2, 3)).reshape(b, kh, c, 1)
  v = jnp.where(read, v, jnp.zeros((), v.dtype))
  m_j = jnp.maximum(s.max(axis=-1), M_INIT)  # [b, k, g, t, j]
  p = jnp.exp(s - m_j[..., None])
  l_j = p.sum(axis=-1)
  # Per-block partial outputs: batch over (b, k, j), rows (g t), slots r.
  p_bkjrc = jnp.einsum('bkgtjc->bkjgtc', p.astype(v.dtype)).reshape(b, kh, nb, g * t, block_k)
  o_j = jnp.einsum('bkjrc,bkjcd->bkjrd', p_bkjrc, v.reshape(b, kh, nb, block_k, d),
                   preferred_element_type=jnp.float32)
  o_j = jnp.einsum('bkjgtd->bkgtjd', o_j.reshape(b, kh, nb, g, t, d))
  m = m_j.max(axis=-1, keepdims=True)
  w = jnp.exp(m_j - m)
  l = (w * l_j).sum(axis=-1)
  o = (w[..., None] * o_j).sum(axis=-2)
  o = o / jnp.where(l == 0.0, 1.0, l)[..., None]
  return jnp.einsum('bkgtd->btkgd', o).reshape(b, t, n, d).astype(q.dtype)

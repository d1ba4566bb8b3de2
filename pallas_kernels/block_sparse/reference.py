"""Dense masked attention in jnp: the oracle for every backend.

Einsum legend: b batch, t query position, s key position, n query heads,
k kv heads, g query heads per kv head (n = k * g), d head dim.

O(Lq * Lk) memory; float32 accumulation. Differentiable with plain autodiff
(no NaN for fully masked rows), so tests compare custom-VJP gradients to
`jax.grad` of `attention_ref`. Keys and values that no query may read, and queries
that may read no key, never reach the output or the gradients, even when they hold
NaN or inf (every backend zeroes them per tile).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.block_sparse.block_mask import BlockMask

# Large finite negative, never -inf (so masked rows never produce inf - inf).
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def _grouped_mask(mask: BlockMask, num_kv_heads: int) -> jax.Array:
  """Dense mask [Bm, Hm, t, s] -> [Bm, k|1, g|1, t, s] matching grouped logits."""
  dense = mask.to_dense()
  bm, hm, lq, lk = dense.shape
  if hm == 1:
    return dense[:, :, None]
  return dense.reshape(bm, num_kv_heads, hm // num_kv_heads, lq, lk)


def attention_with_lse_ref(q, k, v, mask: BlockMask, scale: float):
  """Masked attention and its log-sum-exp.

  Args:
    q: [b, t, n, d]; k, v: [b, s, k, d]; n % k == 0.
    mask: BlockMask for (t, s), batch 1 or b, heads 1 or n.
    scale: logit scale.

  Returns:
    out [b, t, n, d] in q.dtype (zeros where a row has no allowed key) and
    lse [b, n, t] float32 (-inf for rows with no allowed key).
  """
  b, t, n, d = q.shape
  kh = k.shape[2]
  g = n // kh
  allowed = _grouped_mask(mask, kh)
  # Values no query may read (keys / values of masked columns, queries of empty rows)
  # are zeroed first, so that even a NaN there never reaches the output or a gradient.
  key_read = jnp.any(allowed, axis=-2)[..., None]  # [Bm, k|1, g|1, s, 1]
  query_reads = jnp.any(allowed, axis=-1)  # [Bm, k|1, g|1, t]
  qg = jnp.where(jnp.moveaxis(query_reads, -1, 1)[..., None], q.reshape(b, t, kh, g, d), 0)
  kg = jnp.where(key_read, jnp.swapaxes(k, 1, 2)[:, :, None], 0)  # [b, k, g|1, s, d]
  vg = jnp.where(key_read, jnp.swapaxes(v, 1, 2)[:, :, None], 0)
  logits = jnp.einsum('btkgd,bkgsd->bkgts', qg, jnp.broadcast_to(kg, kg.shape[:2] + (g,) + kg.shape[3:]),
                      preferred_element_type=jnp.float32) * scale
  logits = jnp.where(allowed, logits, MASK_VALUE)
  m = jnp.max(logits, axis=-1, keepdims=True)
  p = jnp.where(allowed, jnp.exp(logits - m), 0.0)
  l = jnp.sum(p, axis=-1, keepdims=True)
  safe_l = jnp.where(l == 0.0, 1.0, l)
  vg = jnp.broadcast_to(vg, vg.shape[:2] + (g,) + vg.shape[3:]).astype(jnp.float32)
  out = jnp.einsum('bkgts,bkgsd->btkgd', p / safe_l, vg)
  lse = jnp.where(l == 0.0, -jnp.inf, m + jnp.log(safe_l))[..., 0]
  return out.reshape(b, t, n, d).astype(q.dtype), lse.reshape(b, n, t)


def attention_ref(q, k, v, mask: BlockMask, scale: float | None = None):
  """Output only; `scale` defaults to 1/sqrt(d)."""
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  return attention_with_lse_ref(q, k, v, mask, scale)[0]


def forward(q, k, v, mask, scale, tiles=None, interpret=False):
  """Backend contract: (out, lse). `mask` here is the caller's (unpadded) mask."""
  del tiles, interpret
  return attention_with_lse_ref(q, k, v, mask, scale)


def backward(q, k, v, out, lse, dout, mask, scale, tiles=None, interpret=False, dlse=None):
  """Backend contract: (dq, dk, dv) by autodiff of the dense oracle."""
  del out, tiles, interpret
  fn = lambda q_, k_, v_: attention_with_lse_ref(q_, k_, v_, mask, scale)
  _, vjp = jax.vjp(fn, q, k, v)
  return vjp((dout, jnp.zeros(lse.shape, jnp.float32) if dlse is None else dlse))

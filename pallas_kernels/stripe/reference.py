"""Dense masked attention over key lists, in jnp: the oracle for every backend.

Einsum legend: b batch, t query position, s key position, n query heads,
d head dim.

O(Lq * Lk) memory, float32 statistics. Differentiable by plain autodiff (no
NaN for rows with no allowed key), so tests compare the custom-VJP gradients
to jax.grad of this function.
"""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels.stripe import lists

# Large finite negative, never -inf (so masked rows never produce inf - inf).
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def query_head_mask(indices, counts, *, q_len: int, kv_len: int, block_q: int, causal: bool,
                    num_q_heads: int, num_kv_heads: int):
  """bool [B|1, n, t, s]: the allowed pairs of every query head.

  List head h serves query heads [h * n / H, (h + 1) * n / H): a list per
  query head (H = n), per KV head (H = k: the query heads of its GQA group)
  or shared (H = 1).
  """
  dense = lists.dense_mask(indices, counts, q_len=q_len, kv_len=kv_len, block_q=block_q,
                           causal=causal)
  hl = dense.shape[1]
  if hl == num_q_heads or hl == 1:
    return dense
  if hl != num_kv_heads:
    raise ValueError(f'lists have {hl} heads; expected 1, {num_kv_heads} or {num_q_heads}.')
  return jnp.repeat(dense, num_q_heads // num_kv_heads, axis=1)


def attention_with_lse_ref(q, k, v, indices, counts, *, block_q: int, causal: bool = False,
                           scale: float | None = None):
  """Attention over key lists and its log-sum-exp.

  Args:
    q: [b, t, n, d]; k, v: [b, s, k, d]; n % k == 0.
    indices, counts: key lists (see lists.py) for query blocks of `block_q`.
    causal: key j allowed for query t only if j <= t + s - t_len (end-aligned).
    scale: logit scale, default 1/sqrt(d).

  Returns:
    out [b, t, n, d] in q.dtype (zeros where a row has no allowed key) and
    lse [b, n, t] float32 (-inf where a row has no allowed key).
  """
  b, t, n, d = q.shape
  s, kh = k.shape[1], k.shape[2]
  scale = d ** -0.5 if scale is None else scale
  allowed = query_head_mask(indices, counts, q_len=t, kv_len=s, block_q=block_q, causal=causal,
                            num_q_heads=n, num_kv_heads=kh)
  k_n = jnp.repeat(k, n // kh, axis=2)
  v_n = jnp.repeat(v, n // kh, axis=2)
  logits = jnp.einsum('btnd,bsnd->bnts', q, k_n, preferred_element_type=jnp.float32) * scale
  logits = jnp.where(allowed, logits, MASK_VALUE)
  m = jnp.max(logits, axis=-1, keepdims=True)
  p = jnp.where(allowed, jnp.exp(logits - m), 0.0)
  l = jnp.sum(p, axis=-1, keepdims=True)
  safe_l = jnp.where(l == 0.0, 1.0, l)
  out = jnp.einsum('bnts,bsnd->btnd', p / safe_l, v_n.astype(jnp.float32))
  lse = jnp.where(l == 0.0, -jnp.inf, m + jnp.log(safe_l))[..., 0]
  return out.astype(q.dtype), lse


def attention_ref(q, k, v, indices, counts, *, block_q: int, causal: bool = False,
                  scale: float | None = None):
  """Output only."""
  return attention_with_lse_ref(q, k, v, indices, counts, block_q=block_q, causal=causal,
                                scale=scale)[0]

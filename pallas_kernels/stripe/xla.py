"""Gathered-key attention in plain XLA: the CPU default, and the backward of mosaic_tpu.

Einsum legend: b batch, h list head, i query tile, r row of a tile (query
heads sharing the list x queries), c gathered key of a step, d head dim.

Forward. All (batch, list head, query tile) programs advance together, one
step per `block_k` list entries: gather those keys' K / V rows (one batched
gather; a list per KV head gathers once for its whole GQA group), score them
against the tile's rows, mask padding slots and (causal) later keys, and
update an online softmax (m, l, acc) in float32. The loop is a fori_loop with
a data-dependent trip count, the longest tile's entries / block_k, so work
follows the lists actually held, not their static capacity; memory per step
is O(rows x block_k), never O(Lq x Lk).

Backward. One pass over the same steps (under the custom VJP, so nothing
differentiates through the loop): recompute p = exp(s - lse), ds = p * (dp -
delta) with delta = rowsum(out * dout) - dlse, accumulate dq in the carry and
scatter-add dk = ds^T q, dv = p^T dout into the listed keys' rows of the KV
head (so a KV head's gradient sums every list head / query head reading it).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.scheduling import after
from pallas_kernels.stripe.reference import MASK_VALUE

# Running max starts above MASK_VALUE: exp(MASK_VALUE - m) underflows to 0.
M_INIT = 0.5 * MASK_VALUE


class _Walk:
  """Per-step gathers shared by forward and backward."""

  def __init__(self, q, k, idx, tcount, qpos, cfg):
    b, hl, nt, _, _ = q.shape
    kh, s, d = k.shape[1], k.shape[2], k.shape[3]
    self.cfg, self.d, self.tk = cfg, d, cfg.block_k
    blk = jnp.minimum(jnp.arange(nt) * cfg.tile_q // cfg.block_q, idx.shape[2] - 1)
    self.idx = idx[:, :, blk]  # [b, h, i, W]: each tile's list
    self.tcount, self.qpos = tcount, qpos
    # Flat row of key j of the list head's KV head: ((b * kh) + kv head) * s + j.
    kv_head = jnp.arange(hl) // cfg.kv_group
    self.base = ((jnp.arange(b)[:, None] * kh + kv_head[None, :]) * s)[:, :, None, None]
    self.steps = jnp.max(-(-tcount // self.tk)).astype(jnp.int32)

  def ids(self, step):
    """(key ids [b, h, i, c], flat K/V rows [b, h, i, c], allowed [b, h, i, r, c])."""
    ids = jax.lax.dynamic_slice_in_dim(self.idx, step * self.tk, self.tk, axis=-1)
    slot = step * self.tk + jnp.arange(self.tk, dtype=jnp.int32)
    ok = (slot < self.tcount[..., None])[..., None, :]
    if self.cfg.causal:
      ok = ok & (ids[..., None, :] <= self.qpos[None, None, :, :, None])
    return ids, self.base + ids, ok

  def gather(self, x_flat, rows):
    return jnp.take(x_flat, rows.reshape(-1), axis=0, mode='clip').reshape(
        rows.shape + (self.d,))


def _scores(q, kg, scale):
  return jnp.einsum('bhird,bhicd->bhirc', q, kg, preferred_element_type=jnp.float32) * scale


def forward(q, k, v, idx, tcount, qpos, cfg, interpret=False):
  """Backend contract (see api.py): (out [b, h, i, r, d] in q.dtype, lse [b, h, i, r] f32)."""
  del interpret
  walk = _Walk(q, k, idx, tcount, qpos, cfg)
  d = walk.d
  k_flat, v_flat = k.reshape(-1, d), v.reshape(-1, d)

  def step(c, carry):
    m, l, acc = carry
    _, rows, ok = walk.ids(c)
    kg, vg = walk.gather(k_flat, rows), walk.gather(v_flat, rows)
    s = jnp.where(ok, _scores(q, kg, cfg.scale), MASK_VALUE)
    m_new = jnp.maximum(m, s.max(-1))
    alpha = jnp.exp(m - m_new)
    p = jnp.exp(s - m_new[..., None])
    l = alpha * l + p.sum(-1)
    acc = alpha[..., None] * acc + jnp.einsum('bhirc,bhicd->bhird', p.astype(vg.dtype), vg,
                                              preferred_element_type=jnp.float32)
    return m_new, l, acc

  shape = q.shape[:-1]
  init = after((jnp.full(shape, M_INIT, jnp.float32), jnp.zeros(shape, jnp.float32),
                jnp.zeros(q.shape, jnp.float32)), q)
  # Custom VJP: the loop is never differentiated, so its trip count may be traced.
  m, l, acc = jax.lax.fori_loop(0, walk.steps, step, init)
  empty = l == 0.0
  safe_l = jnp.where(empty, 1.0, l)
  out = (acc / safe_l[..., None]).astype(q.dtype)
  return out, jnp.where(empty, -jnp.inf, m + jnp.log(safe_l))


def backward(q, k, v, idx, tcount, qpos, out, lse, dout, dlse, cfg, interpret=False):
  """Backend contract: (dq [b, h, i, r, d], dk, dv [b, kh, s, d]) in the input dtypes.

  `lse` has no -inf (api.py passes 0 for empty rows, where every p is 0).
  """
  del interpret
  walk = _Walk(q, k, idx, tcount, qpos, cfg)
  d = walk.d
  k_flat, v_flat = k.reshape(-1, d), v.reshape(-1, d)
  delta = jnp.sum(out.astype(jnp.float32) * dout.astype(jnp.float32), axis=-1)
  if dlse is not None:  # d lse / d s = p: folds into delta
    delta = delta - dlse.astype(jnp.float32)

  def step(c, carry):
    dq, dk, dv = carry
    _, rows, ok = walk.ids(c)
    kg, vg = walk.gather(k_flat, rows), walk.gather(v_flat, rows)
    p = jnp.where(ok, jnp.exp(_scores(q, kg, cfg.scale) - lse[..., None]), 0.0)
    dp = jnp.einsum('bhird,bhicd->bhirc', dout, vg, preferred_element_type=jnp.float32)
    ds = p * (dp - delta[..., None]) * cfg.scale
    dq = dq + jnp.einsum('bhirc,bhicd->bhird', ds.astype(kg.dtype), kg,
                         preferred_element_type=jnp.float32)
    flat = rows.reshape(-1)
    dk = dk.at[flat].add(jnp.einsum('bhirc,bhird->bhicd', ds.astype(q.dtype), q,
                                    preferred_element_type=jnp.float32).reshape(-1, d))
    dv = dv.at[flat].add(jnp.einsum('bhirc,bhird->bhicd', p.astype(dout.dtype), dout,
                                    preferred_element_type=jnp.float32).reshape(-1, d))
    return dq, dk, dv

  init = after((jnp.zeros(q.shape, jnp.float32), jnp.zeros(k_flat.shape, jnp.float32),
                jnp.zeros(v_flat.shape, jnp.float32)), q)
  dq, dk, dv = jax.lax.fori_loop(0, walk.steps, step, init)
  return (dq.astype(q.dtype), dk.reshape(k.shape).astype(k.dtype),
          dv.reshape(v.shape).astype(v.dtype))

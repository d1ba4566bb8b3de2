"""Pallas GPU (Triton) gathered-key attention, forward and backward.

Layout (see api.py): one program per (batch, list head, query tile); its rows
are the query heads sharing the list times the tile's queries (a list per kv
head serves the whole GQA group from one gather). The program reads its
tile's entry count, then walks its list `block_k` entries at a time: it loads
the ids, gathers those K / V rows (`k_ref[ids, :]`, pointer-based loads of
whole head-dim rows), scores them, masks padding slots and (causal) keys
after the row's position, and updates an online softmax in float32. The trip
count is the tile's count / block_k, so ragged lists cost what they hold.

Backward: one program per tile again, walking the same list: it recomputes
p = exp(s - lse) and ds = p * (dp - delta) (delta = rowsum(out * dout) - dlse,
from XLA), keeps dq in registers and adds the chunk's dk = ds^T q and dv =
p^T dout into the gathered rows of float32 dk / dv buffers with atomic adds
(several tiles, and with per-query-head lists several list heads, share a
key; the sums' order is not deterministic).

GPU Pallas has no scalar prefetch: counts, lists and row positions are
ordinary inputs. Rows are padded to a power of two >= 16 and the head dim to
a power of two (Triton shapes).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.stripe.reference import MASK_VALUE

M_INIT = 0.5 * MASK_VALUE  # exp(MASK_VALUE - m) == 0 even before a row sees a key


def _fwd_kernel(tc_ref, qpos_ref, q_ref, k_ref, v_ref, idx_ref, o_ref, lse_ref, *, scale, tk,
                causal):
  n = tc_ref[pl.program_id(2)]
  q = q_ref[...]
  qpos = qpos_ref[...]

  def body(c, carry):
    m, l, acc = carry
    start = pl.multiple_of(c * tk, tk)
    ids = idx_ref[pl.ds(start, tk)]
    kt = k_ref[ids, :]
    vt = v_ref[ids, :]
    s = jnp.dot(q, kt.T, preferred_element_type=jnp.float32) * scale
    ok = (start + jax.lax.broadcasted_iota(jnp.int32, (1, tk), 1)) < n
    if causal:
      ok = ok & (ids[None, :] <= qpos[:, None])
    s = jnp.where(ok, s, MASK_VALUE)
    m_new = jnp.maximum(m, s.max(axis=1))
    alpha = jnp.exp(m - m_new)
    p = jnp.exp(s - m_new[:, None])
    l = alpha * l + p.sum(axis=1)
    acc = alpha[:, None] * acc + jnp.dot(p.astype(vt.dtype), vt,
                                         preferred_element_type=jnp.float32)
    return m_new, l, acc

  rows, dp = q.shape
  carry = (jnp.full((rows,), M_INIT, jnp.float32), jnp.zeros((rows,), jnp.float32),
           jnp.zeros((rows, dp), jnp.float32))
  m, l, acc = jax.lax.fori_loop(0, pl.cdiv(n, tk), body, carry)
  empty = l == 0.0
  safe_l = jnp.where(empty, 1.0, l)
  o_ref[...] = (acc / safe_l[:, None]).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(empty, -jnp.inf, m + jnp.log(safe_l))


def forward(q, k, v, idx, tcount, qpos, cfg, interpret=False):
  """Backend contract (see api.py): (out [b, h, i, r, d], lse [b, h, i, r])."""
  b, hl, nt, rows, d = q.shape
  s = k.shape[2]
  width = idx.shape[-1]
  dp = max(16, pl.next_power_of_2(d))
  pad = lambda x: x if d == dp else jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, dp - d)])
  tq, bq, group = cfg.tile_q, cfg.block_q, cfg.kv_group
  kernel = functools.partial(_fwd_kernel, scale=cfg.scale, tk=cfg.block_k, causal=cfg.causal)
  out, lse = pl.pallas_call(
      kernel,
      grid=(b, hl, nt),
      in_specs=[
          pl.BlockSpec((None, None, nt), lambda b_, h, i: (b_, h, 0)),
          pl.BlockSpec((None, rows), lambda b_, h, i: (i, 0)),
          pl.BlockSpec((None, None, None, rows, dp), lambda b_, h, i: (b_, h, i, 0, 0)),
          pl.BlockSpec((None, None, s, dp), lambda b_, h, i: (b_, h // group, 0, 0)),
          pl.BlockSpec((None, None, s, dp), lambda b_, h, i: (b_, h // group, 0, 0)),
          pl.BlockSpec((None, None, None, width), lambda b_, h, i: (b_, h, i * tq // bq, 0)),
      ],
      out_specs=[
          pl.BlockSpec((None, None, None, rows, dp), lambda b_, h, i: (b_, h, i, 0, 0)),
          pl.BlockSpec((None, None, None, rows), lambda b_, h, i: (b_, h, i, 0)),
      ],
      out_shape=[jax.ShapeDtypeStruct((b, hl, nt, rows, dp), q.dtype),
                 jax.ShapeDtypeStruct((b, hl, nt, rows), jnp.float32)],
      compiler_params=pltriton.CompilerParams(num_warps=cfg.num_warps,
                                              num_stages=cfg.num_stages),
      interpret=interpret,
      name='stripe_fwd',
  )(tcount, qpos, pad(q), pad(k), pad(v), idx)
  return out[..., :d], lse


def _bwd_kernel(tc_ref, qpos_ref, q_ref, do_ref, lse_ref, delta_ref, k_ref, v_ref, idx_ref,
                dk_in, dv_in, dq_ref, dk_ref, dv_ref, *, scale, tk, causal):
  del dk_in, dv_in  # aliased to dk_ref / dv_ref (zeros)
  n = tc_ref[pl.program_id(2)]
  trash, dp_ = dk_ref.shape[0] - 1, dk_ref.shape[1]
  q, do = q_ref[...], do_ref[...]
  lse, delta, qpos = lse_ref[...], delta_ref[...], qpos_ref[...]

  def body(c, dq):
    start = pl.multiple_of(c * tk, tk)
    ids = idx_ref[pl.ds(start, tk)]
    kt = k_ref[ids, :]
    vt = v_ref[ids, :]
    s = jnp.dot(q, kt.T, preferred_element_type=jnp.float32) * scale
    in_list = (start + jax.lax.broadcasted_iota(jnp.int32, (tk,), 0)) < n
    ok = in_list[None, :]
    if causal:
      ok = ok & (ids[None, :] <= qpos[:, None])
    p = jnp.where(ok, jnp.exp(s - lse[:, None]), 0.0)
    dp = jnp.dot(do, vt.T, preferred_element_type=jnp.float32)
    ds = p * (dp - delta[:, None]) * scale
    # Padding slots repeat a listed id: send their (zero) rows to the trash row instead, so
    # every target row of a chunk is distinct.
    rows = jnp.broadcast_to(jnp.where(in_list, ids, trash)[:, None], (tk, dp_))
    cols = jax.lax.broadcasted_iota(jnp.int32, (tk, dp_), 1)
    pltriton.atomic_add(dv_ref, (rows, cols),
                        jnp.dot(p.astype(do.dtype).T, do, preferred_element_type=jnp.float32))
    pltriton.atomic_add(dk_ref, (rows, cols),
                        jnp.dot(ds.astype(q.dtype).T, q, preferred_element_type=jnp.float32))
    return dq + jnp.dot(ds.astype(kt.dtype), kt, preferred_element_type=jnp.float32)

  dq = jax.lax.fori_loop(0, pl.cdiv(n, tk), body, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = dq.astype(dq_ref.dtype)


def backward(q, k, v, idx, tcount, qpos, out, lse, dout, dlse, cfg, interpret=False):
  """Backend contract (see api.py): (dq [b, h, i, r, d], dk, dv [b, kh, s, d])."""
  b, hl, nt, rows, d = q.shape
  kh, s = k.shape[1], k.shape[2]
  width = idx.shape[-1]
  dp = max(16, pl.next_power_of_2(d))
  pad = lambda x: x if d == dp else jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, dp - d)])
  delta = jnp.sum(out.astype(jnp.float32) * dout.astype(jnp.float32), axis=-1)
  if dlse is not None:  # d lse / d s = p: folds into delta
    delta = delta - dlse.astype(jnp.float32)
  tq, bq, group = cfg.tile_q, cfg.block_q, cfg.kv_group
  kernel = functools.partial(_bwd_kernel, scale=cfg.scale, tk=cfg.block_k, causal=cfg.causal)
  row_spec = pl.BlockSpec((None, None, None, rows, dp), lambda b_, h, i: (b_, h, i, 0, 0))
  vec_spec = pl.BlockSpec((None, None, None, rows), lambda b_, h, i: (b_, h, i, 0))
  kv_spec = pl.BlockSpec((None, None, s, dp), lambda b_, h, i: (b_, h // group, 0, 0))
  acc_spec = pl.BlockSpec((None, None, s + 1, dp), lambda b_, h, i: (b_, h // group, 0, 0))
  zeros = jnp.zeros((b, kh, s + 1, dp), jnp.float32)  # row s: trash for padding slots
  dq, dk, dv = pl.pallas_call(
      kernel,
      grid=(b, hl, nt),
      in_specs=[
          pl.BlockSpec((None, None, nt), lambda b_, h, i: (b_, h, 0)),
          pl.BlockSpec((None, rows), lambda b_, h, i: (i, 0)),
          row_spec, row_spec, vec_spec, vec_spec, kv_spec, kv_spec,
          pl.BlockSpec((None, None, None, width), lambda b_, h, i: (b_, h, i * tq // bq, 0)),
          acc_spec, acc_spec,
      ],
      out_specs=[row_spec, acc_spec, acc_spec],
      out_shape=[jax.ShapeDtypeStruct((b, hl, nt, rows, dp), q.dtype),
                 jax.ShapeDtypeStruct((b, kh, s + 1, dp), jnp.float32),
                 jax.ShapeDtypeStruct((b, kh, s + 1, dp), jnp.float32)],
      input_output_aliases={9: 1, 10: 2},
      compiler_params=pltriton.CompilerParams(num_warps=cfg.num_warps,
                                              num_stages=cfg.num_stages),
      interpret=interpret,
      name='stripe_bwd',
  )(tcount, qpos, pad(q), pad(dout), lse, delta, pad(k), pad(v), idx, zeros, zeros)
  return dq[..., :d], dk[:, :, :s, :d].astype(k.dtype), dv[:, :, :s, :d].astype(v.dtype)

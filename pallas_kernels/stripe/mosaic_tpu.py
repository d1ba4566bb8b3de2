"""Pallas TPU (Mosaic) gathered-key attention, forward.

Layout (see api.py): grid (b, list head, query tile), every step independent
("parallel"); a step's rows are the query heads sharing the list times the
tile's queries (a multiple of 8 sublanes), the head dim on lanes.

Data movement. The tiles' entry counts are scalar-prefetch (SMEM) arguments.
Lists, K and V stay in HBM (memory_space ANY): token lists are far too large
for SMEM (capacity x query blocks x heads), so a step walks its list in
chunks of `block_k` entries with manual DMAs, double-buffered:

  ids chunk c    HBM -> SMEM (the scalars that address the row DMAs), issued
                 two chunks ahead;
  K / V rows     one (1, d) row DMA per entry into a (2, block_k, d) VMEM
                 buffer, issued one chunk ahead (all on one semaphore per
                 buffer slot, waited row by row as the paged-attention kernels do);
  ids chunk c    HBM -> VMEM as a (1, block_k) lane row, for the masks.

Padding slots hold a valid id (lists.normalize), so every DMA reads real rows
and the buffers never hold uninitialised values; their scores are masked.
The trip count is the tile's count / block_k, so ragged lists cost what they
hold. Online softmax as in block_sparse: m / l in (rows, 128) lane-broadcast
VMEM scratch, acc (rows, d) float32; lse is written as (rows, 128) lanes
(then sliced). The backward is the xla pass (api.py).

Not compiled on a TPU yet (no TPU in this project's CI): the tests run it in
pltpu interpret mode and check that it lowers to Mosaic. Single-row DMAs at
arbitrary offsets may be slow on hardware; see docs/architecture.md.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.stripe.reference import MASK_VALUE

M_INIT = 0.5 * MASK_VALUE
LANES = 128
_NT = (((1,), (1,)), ((), ()))  # x @ y^T
_NN = (((1,), (0,)), ((), ()))  # x @ y


def _lanes(x, width: int):
  """(rows, 128) lane-broadcast statistic -> (rows, width)."""
  reps = -(-width // LANES)
  if reps > 1:
    x = jnp.tile(x, (1, reps))
  return x if x.shape[1] == width else x[:, :width]


def _div(x, n: int):
  return x if n == 1 else lax.div(x, n)


def _fwd_kernel(tc_ref, qpos_ref, q_ref, ids_hbm, ids_row_hbm, k_hbm, v_hbm, o_ref, lse_ref,
                ids_smem, ids_vmem, kbuf, vbuf, m_scr, l_scr, acc_scr, sem_ids, sem_rows, *,
                hl, nt, tq, bq, tk, group, scale, causal, d):
  b, h, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  n = tc_ref[(b * hl + h) * nt + i]
  chunks = lax.div(n + (tk - 1), tk)
  blk = lax.div(i * tq, bq)
  kvh = _div(h, group)

  def ids_copy(c, slot):
    return pltpu.make_async_copy(ids_hbm.at[b, h, blk, c], ids_smem.at[slot], sem_ids.at[slot])

  def fetch(c, slot):
    """Issues the DMAs of chunk c (its ids must be in ids_smem[slot])."""
    pltpu.make_async_copy(ids_row_hbm.at[b, h, blk, c], ids_vmem.at[slot],
                          sem_rows.at[slot]).start()

    def issue(r, carry):
      j = ids_smem[slot, r]
      pltpu.make_async_copy(k_hbm.at[b, kvh, pl.ds(j, 1)], kbuf.at[slot, pl.ds(r, 1)],
                            sem_rows.at[slot]).start()
      pltpu.make_async_copy(v_hbm.at[b, kvh, pl.ds(j, 1)], vbuf.at[slot, pl.ds(r, 1)],
                            sem_rows.at[slot]).start()
      return carry
    lax.fori_loop(0, tk, issue, 0)

  def wait_rows(slot):
    pltpu.make_async_copy(ids_row_hbm.at[0, 0, 0, 0], ids_vmem.at[slot],
                          sem_rows.at[slot]).wait()

    def wait(r, carry):
      pltpu.make_async_copy(k_hbm.at[0, 0, pl.ds(0, 1)], kbuf.at[slot, pl.ds(0, 1)],
                            sem_rows.at[slot]).wait()
      pltpu.make_async_copy(v_hbm.at[0, 0, pl.ds(0, 1)], vbuf.at[slot, pl.ds(0, 1)],
                            sem_rows.at[slot]).wait()
      return carry
    lax.fori_loop(0, tk, wait, 0)

  def compute(c, slot):
    q = q_ref[...]
    kt, vt = kbuf[slot], vbuf[slot]
    s = lax.dot_general(q, kt, _NT, preferred_element_type=jnp.float32) * scale  # (rows, tk)
    ok = (c * tk + lax.broadcasted_iota(jnp.int32, (1, tk), 1)) < n
    if causal:
      ok = ok & (ids_vmem[slot] <= qpos_ref[...])
    s = jnp.where(ok, s, MASK_VALUE)
    m_prev, l_prev = m_scr[...], l_scr[...]
    m_next = jnp.maximum(m_prev, s.max(axis=-1)[:, None])  # (rows, 128)
    p = jnp.exp(s - _lanes(m_next, tk))
    alpha = jnp.exp(m_prev - m_next)
    l_scr[...] = alpha * l_prev + lax.broadcast_in_dim(p.sum(axis=-1), l_prev.shape, (0,))
    m_scr[...] = m_next
    pv = lax.dot_general(p.astype(vt.dtype), vt, _NN, preferred_element_type=jnp.float32)
    acc_scr[...] = _lanes(alpha, d) * acc_scr[...] + pv

  m_scr[...] = jnp.full_like(m_scr, M_INIT)
  l_scr[...] = jnp.zeros_like(l_scr)
  acc_scr[...] = jnp.zeros_like(acc_scr)

  @pl.when(chunks > 0)
  def _walk():
    first = ids_copy(0, 0)
    first.start()
    first.wait()
    fetch(0, 0)

    @pl.when(chunks > 1)
    def _():
      ids_copy(1, 1).start()

    def body(c, carry):
      slot = lax.rem(c, 2)
      nxt = 1 - slot

      @pl.when(c + 1 < chunks)
      def _():
        ids_copy(c + 1, nxt).wait()
        fetch(c + 1, nxt)

      wait_rows(slot)

      @pl.when(c + 2 < chunks)
      def _():
        ids_copy(c + 2, slot).start()

      compute(c, slot)
      return carry
    lax.fori_loop(0, chunks, body, 0)

  l, m = l_scr[...], m_scr[...]
  empty = l == 0.0
  safe_l = jnp.where(empty, 1.0, l)
  o_ref[...] = (acc_scr[...] * _lanes(1.0 / safe_l, d)).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(empty, -jnp.inf, m + jnp.log(safe_l))


def forward(q, k, v, idx, tcount, qpos, cfg, interpret: Any = False):
  """Backend contract (see api.py): (out [b, h, i, r, d], lse [b, h, i, r])."""
  b, hl, nt, rows, d = q.shape
  nq, width = idx.shape[2], idx.shape[3]
  tk = cfg.block_k
  ids = idx.reshape(b, hl, nq, width // tk, tk)
  ids_row = idx.reshape(b, hl, nq, width // tk, 1, tk)
  kernel = functools.partial(_fwd_kernel, hl=hl, nt=nt, tq=cfg.tile_q, bq=cfg.block_q, tk=tk,
                             group=cfg.kv_group, scale=cfg.scale, causal=cfg.causal, d=d)
  row_spec = pl.BlockSpec((None, None, None, rows, d), lambda b_, h, i, *_: (b_, h, i, 0, 0))
  hbm = pl.BlockSpec(memory_space=pl.ANY)
  out, lse = pl.pallas_call(
      kernel,
      out_shape=(jax.ShapeDtypeStruct((b, hl, nt, rows, d), q.dtype),
                 jax.ShapeDtypeStruct((b, hl, nt, rows, LANES), jnp.float32)),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1,
          grid=(b, hl, nt),
          in_specs=[pl.BlockSpec((None, rows, 1), lambda b_, h, i, *_: (i, 0, 0)), row_spec,
                    hbm, hbm, hbm, hbm],
          out_specs=[row_spec,
                     pl.BlockSpec((None, None, None, rows, LANES),
                                  lambda b_, h, i, *_: (b_, h, i, 0, 0))],
          scratch_shapes=[pltpu.SMEM((2, tk), jnp.int32),
                          pltpu.VMEM((2, 1, tk), jnp.int32),
                          pltpu.VMEM((2, tk, d), k.dtype),
                          pltpu.VMEM((2, tk, d), v.dtype),
                          pltpu.VMEM((rows, LANES), jnp.float32),
                          pltpu.VMEM((rows, LANES), jnp.float32),
                          pltpu.VMEM((rows, d), jnp.float32),
                          pltpu.SemaphoreType.DMA((2,)),
                          pltpu.SemaphoreType.DMA((2,))]),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=('parallel', 'parallel', 'parallel')),
      interpret=interpret,
      name='stripe_fwd',
  )(tcount.reshape(-1), qpos[:, :, None], q, ids, ids_row, k, v)
  return out, lse[..., 0]

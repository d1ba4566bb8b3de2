"""Pallas TPU (Mosaic) decode attention over per-head ragged KV caches.

Grid (b, k, c / block_k); the last axis is the reduction over cache blocks.
The per-(batch, head) lengths, windows and sinks are scalar-prefetch (SMEM)
arguments. A step past the head's last valid block does no work (pl.when)
and its K/V index map re-points at the last valid block, which is already
resident, so the pipeline issues no DMA for it: a short head costs its length,
not the padded capacity. Rows are the group's query heads x query tokens
([R, d], R a multiple of 8); m / l live in lane-broadcast (R, 128) scratch.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.decode.reference import MASK_VALUE, allowed

M_INIT = 0.5 * MASK_VALUE
LANES = 128
_NT = (((1,), (1,)), ((), ()))  # x @ y^T
_NN = (((1,), (0,)), ((), ()))  # x @ y


def _last_block(lengths_ref, b, h, block_k):
  return jnp.maximum(pl.cdiv(lengths_ref[b, h], block_k) - 1, 0)


def _kernel(lengths_ref, window_ref, sink_ref, qpos_ref, q_ref, k_ref, v_ref, kpos_ref, o_ref,
            m_scr, l_scr, acc_scr, *, block_k, scale, use_positions):
  b, h, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  length = lengths_ref[b, h]

  @pl.when(j == 0)
  def _init():
    m_scr[...] = jnp.full_like(m_scr, M_INIT)
    l_scr[...] = jnp.zeros_like(l_scr)
    acc_scr[...] = jnp.zeros_like(acc_scr)

  @pl.when(j * block_k < length)
  def _step():
    q, k, v = q_ref[...], k_ref[...], v_ref[...]
    s = lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32) * scale
    slot = j * block_k + lax.broadcasted_iota(jnp.int32, s.shape, 1)
    if use_positions:
      ok = allowed(slot, length, qpos_ref[...], kpos_ref[...], window_ref[h], sink_ref[h])
    else:
      ok = allowed(slot, length)
    okf = jnp.where(jnp.broadcast_to(ok, s.shape), 1.0, 0.0)
    s = jnp.where(okf > 0.0, s, MASK_VALUE)
    # Slots no row reads are zeroed (a NaN there would reach p @ v as 0 * NaN).
    v = jnp.where(jnp.expand_dims(okf.max(axis=0), -1) > 0.0, v, jnp.zeros((), v.dtype))
    m_prev, l_prev = m_scr[...], l_scr[...]
    m_next = jnp.maximum(m_prev, s.max(axis=-1, keepdims=True))  # (R, 128)
    p = jnp.exp(s - m_next[:, :1])
    alpha = jnp.exp(m_prev - m_next)
    l_scr[...] = alpha * l_prev + p.sum(axis=-1, keepdims=True)
    m_scr[...] = m_next
    pv = lax.dot_general(p.astype(v.dtype), v, _NN, preferred_element_type=jnp.float32)
    acc_scr[...] = alpha[:, :1] * acc_scr[...] + pv

  @pl.when(j == pl.num_programs(2) - 1)
  def _write():
    l = l_scr[...][:, :1]
    o_ref[...] = (acc_scr[...] / jnp.where(l == 0.0, 1.0, l)).astype(o_ref.dtype)


def forward(q_bkrd, k, v, lengths_bk, window_k, sinks_k, qpos_br, kpos_bkc, scale, block_k,
            use_positions, interpret=False):
  """Grouped rows in, grouped rows out (api.py does the layout).

  Args:
    q_bkrd: [b, k, R, d] query rows of each kv head (R a multiple of 8).
    k, v: [b, k, c, d] caches, c % block_k == 0.
    lengths_bk: int32 [b, k]; window_k, sinks_k: int32 [k].
    qpos_br: int32 [b, R] row positions; kpos_bkc: int32 [b, k, c] slot positions.
  """
  b, kh, rows, d = q_bkrd.shape
  c = k.shape[2]

  def kv_map(b_, h, j, lengths_ref, *_):
    return b_, h, jnp.minimum(j, _last_block(lengths_ref, b_, h, block_k)), 0

  def kpos_map(b_, h, j, lengths_ref, *_):
    return b_, h, 0, jnp.minimum(j, _last_block(lengths_ref, b_, h, block_k))

  row_spec = pl.BlockSpec((None, None, rows, d), lambda b_, h, j, *_: (b_, h, 0, 0))
  kernel = functools.partial(_kernel, block_k=block_k, scale=scale, use_positions=use_positions)
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((b, kh, rows, d), q_bkrd.dtype),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=3,
          grid=(b, kh, c // block_k),
          in_specs=[
              pl.BlockSpec((None, rows, 1), lambda b_, h, j, *_: (b_, 0, 0)),
              row_spec,
              pl.BlockSpec((None, None, block_k, d), kv_map),
              pl.BlockSpec((None, None, block_k, d), kv_map),
              pl.BlockSpec((None, None, 1, block_k), kpos_map),
          ],
          out_specs=row_spec,
          scratch_shapes=[pltpu.VMEM((rows, LANES), jnp.float32),
                          pltpu.VMEM((rows, LANES), jnp.float32),
                          pltpu.VMEM((rows, d), jnp.float32)]),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=('parallel', 'parallel', 'arbitrary')),
      interpret=interpret,
      name='moa_decode',
  )(lengths_bk, window_k, sinks_k, qpos_br[:, :, None], q_bkrd, k, v, kpos_bkc[:, :, None, :])

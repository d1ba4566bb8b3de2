"""Pallas GPU (Triton) decode attention over per-head ragged KV caches.

Layout: one program per (batch, kv head, row block). Rows are the group's query heads x
query tokens (R = g * t); a row block holds up to MAX_BLOCK_ROWS of them (a power of two
>= 16 for tl.dot), so one-token decode reads K/V once per kv head (GQA never re-reads the
cache) and a long multi-token append stays within a program's registers.
The program walks only the head's first ceil(length / block_k) cache blocks
(a fori_loop with a data-dependent trip count: ragged lengths cost what they
hold) with an online softmax. Per-(batch, head) scalars (length, window,
sink) travel as one int32 [b, k, 4] input: GPU Pallas has no scalar prefetch.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.decode.reference import MASK_VALUE, allowed

M_INIT = 0.5 * MASK_VALUE
MAX_BLOCK_ROWS = 64


def block_rows(r: int) -> tuple[int, int]:
  """(rows per program, padded total rows) for r query rows per kv head."""
  block = min(MAX_BLOCK_ROWS, max(16, pl.next_power_of_2(r)))
  return block, -(-r // block) * block


def _kernel(meta_ref, qpos_ref, q_ref, k_ref, v_ref, kpos_ref, o_ref, *, block_k, scale,
            use_positions):
  length, window, sink = meta_ref[0], meta_ref[1], meta_ref[2]
  q = q_ref[...]
  rows, dp = q.shape
  qpos = qpos_ref[...][:, None]

  def body(j, carry):
    m, l, acc = carry
    start = pl.multiple_of(j * block_k, block_k)
    kt = k_ref[pl.ds(start, block_k), :]
    vt = v_ref[pl.ds(start, block_k), :]
    s = jnp.dot(q, kt.T, preferred_element_type=jnp.float32) * scale
    slot = start + jax.lax.broadcasted_iota(jnp.int32, (1, block_k), 1)
    if use_positions:
      ok = allowed(slot, length, qpos, kpos_ref[pl.ds(start, block_k)][None, :], window, sink)
    else:
      ok = allowed(slot, length)
    ok = jnp.broadcast_to(ok, s.shape)
    s = jnp.where(ok, s, MASK_VALUE)
    # Slots no row reads are zeroed (a NaN there would reach p @ v as 0 * NaN).
    read = jnp.max(jnp.where(ok, 1.0, 0.0), axis=0) > 0.0
    vt = jnp.where(read[:, None], vt, jnp.zeros((), vt.dtype))
    m_new = jnp.maximum(m, s.max(axis=1))
    alpha = jnp.exp(m - m_new)
    p = jnp.exp(s - m_new[:, None])
    l = alpha * l + p.sum(axis=1)
    acc = alpha[:, None] * acc + jnp.dot(p.astype(vt.dtype), vt,
                                         preferred_element_type=jnp.float32)
    return m_new, l, acc

  carry = (jnp.full((rows,), M_INIT, jnp.float32), jnp.zeros((rows,), jnp.float32),
           jnp.zeros((rows, dp), jnp.float32))
  _, l, acc = jax.lax.fori_loop(0, pl.cdiv(length, block_k), body, carry)
  o_ref[...] = (acc / jnp.where(l == 0.0, 1.0, l)[:, None]).astype(o_ref.dtype)


def forward(q_bkrd, k, v, meta_bk4, qpos_br, kpos_bkc, scale, block_k, use_positions,
            interpret=False, num_warps=4, num_stages=2):
  """Grouped rows in, grouped rows out (api.py does the layout).

  Args:
    q_bkrd: [b, k, R, d] query rows of each kv head (R from ``block_rows``).
    k, v: [b, k, c, d] caches, c % block_k == 0.
    meta_bk4: int32 [b, k, 4] = (length, window, sink, unused).
    qpos_br: int32 [b, R] row positions; kpos_bkc: int32 [b, k, c] slot positions.
  """
  b, kh, total_rows, d = q_bkrd.shape
  rows, padded = block_rows(total_rows)
  if padded != total_rows:
    raise ValueError(f'{total_rows} query rows: pad them to {padded} (block_rows)')
  c = k.shape[2]
  dp = max(16, pl.next_power_of_2(d))
  pad = lambda x: x if d == dp else jnp.pad(x, ((0, 0),) * 3 + ((0, dp - d),))
  kernel = functools.partial(_kernel, block_k=block_k, scale=scale, use_positions=use_positions)
  out = pl.pallas_call(
      kernel,
      grid=(b, kh, total_rows // rows),
      in_specs=[
          pl.BlockSpec((None, None, 4), lambda b_, h, r: (b_, h, 0)),
          pl.BlockSpec((None, rows), lambda b_, h, r: (b_, r)),
          pl.BlockSpec((None, None, rows, dp), lambda b_, h, r: (b_, h, r, 0)),
          pl.BlockSpec((None, None, c, dp), lambda b_, h, r: (b_, h, 0, 0)),
          pl.BlockSpec((None, None, c, dp), lambda b_, h, r: (b_, h, 0, 0)),
          pl.BlockSpec((None, None, c), lambda b_, h, r: (b_, h, 0)),
      ],
      out_specs=pl.BlockSpec((None, None, rows, dp), lambda b_, h, r: (b_, h, r, 0)),
      out_shape=jax.ShapeDtypeStruct((b, kh, total_rows, dp), q_bkrd.dtype),
      compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret,
      name='moa_decode',
  )(meta_bk4, qpos_br, pad(q_bkrd), pad(k), pad(v), kpos_bkc)
  return out[..., :d]

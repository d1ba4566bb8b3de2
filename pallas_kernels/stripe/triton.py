"""Pallas GPU (Triton) gathered-key attention, forward.

Layout (see api.py): one program per (batch, list head, query tile); its rows
are the query heads sharing the list times the tile's queries (a list per kv
head serves the whole GQA group from one gather). The program reads its
tile's entry count, then walks its list `block_k` entries at a time: it loads
the ids, gathers those K / V rows (`k_ref[ids, :]`, pointer-based loads of
whole head-dim rows), scores them, masks padding slots and (causal) keys
after the row's position, and updates an online softmax in float32. The trip
count is the tile's count / block_k, so ragged lists cost what they hold.

GPU Pallas has no scalar prefetch: counts, lists and row positions are
ordinary inputs. Rows are padded to a power of two >= 16 and the head dim to
a power of two (Triton shapes). The backward is the xla pass (api.py).
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

"""Pallas GPU (Triton) block-sparse flash attention, forward and backward.

Einsum legend: q query in tile, k key in tile, d head dim.

GPU Pallas has no scalar prefetch and no dynamic grid, so the grid is static
(one program per (batch, head, tile)) and the block tables are ordinary int32
inputs: each program reads its row's count and walks the listed blocks with
a fori_loop, loading K/V (or Q/dO) tiles with pl.ds at the dynamic offset.
Partial blocks are walked first with the element rule, then full blocks
without it. Kernels:

  forward  grid (b, n, t / tq): online softmax over the kv tables; writes out and lse.
  dq       grid (b, n, t / tq): recomputes p from lse over the kv tables.
  dk/dv    grid (b, k, s / tk): walks the transposed q tables for every query
           head of the GQA group, accumulating dk, dv in registers.

delta = rowsum(out * dout) is computed in XLA. Tiles (tq, tk) are powers of
two dividing the mask blocks; the head dim is zero-padded to a power of two.
Rule leaves are passed whole per (batch, head) and read with dynamic slices;
bool leaves travel as int8.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.block_sparse.block_mask import BlockMask
from pallas_kernels.block_sparse.reference import MASK_VALUE
from pallas_kernels.block_sparse.tiles import Tiles

M_INIT = 0.5 * MASK_VALUE  # exp(MASK_VALUE - m) == 0 even before a row sees a key


def _any(ok, axis):
  """Rows (axis=1) or columns (axis=0) of a tile with at least one allowed entry."""
  return jnp.max(jnp.where(ok, 1.0, 0.0), axis=axis) > 0.0


def _zero_unread(x, read):
  """Zeroes rows of a [rows, d] tile that no entry reads (a masked NaN / inf would
  otherwise reach p @ v as 0 * NaN)."""
  return jnp.where(read[:, None], x, jnp.zeros((), x.dtype))


def _dot(a, b, trans_a=False, trans_b=False):
  """a @ b (optionally transposed operands) with float32 accumulation."""
  if trans_a:
    a = a.T
  if trans_b:
    b = b.T
  return jnp.dot(a, b, preferred_element_type=jnp.float32)


class _Ctx:
  """RuleContext for one [tq, tk] tile inside a kernel.

  Leaves with a head axis arrive as blocks [heads_in_block, ...]; `slot`
  selects the head within the block (0 unless the block holds a GQA group).
  """

  def __init__(self, q_start, k_start, tq, tk, q_blk, k_blk, slot, head):
    self.q_start, self.k_start, self.tq, self.tk = q_start, k_start, tq, tk
    self.q_blk, self.k_blk, self.slot, self.head_id = q_blk, k_blk, slot, head

  def _s(self, ref):
    return self.slot if ref.shape[0] > 1 else 0

  def q(self, ref):
    return ref[self._s(ref), pl.ds(self.q_start, self.tq)][:, None]

  def kv(self, ref):
    return ref[self._s(ref), pl.ds(self.k_start, self.tk)][None, :]

  def head(self, ref):
    return ref[self.head_id if ref.shape[0] > 1 else 0]

  def dense(self, ref):
    return ref[self._s(ref), pl.ds(self.q_start, self.tq), pl.ds(self.k_start, self.tk)] != 0

  def block(self, ref):
    return ref[self._s(ref), self.q_blk, self.k_blk] != 0

  def kv_index(self):
    return self.k_start + jax.lax.broadcasted_iota(jnp.int32, (1, self.tk), 1)


def _leaf_specs(leaves, kinds, group_block: int, heads_axis_of_grid: int):
  """BlockSpecs for mask tables / rule leaves, whole per (batch, head block).

  Args:
    leaves: arrays [Bx, Hx, ...] (or [Hx] for 'head' kind).
    kinds: leaf kinds ('table' for block tables).
    group_block: heads per block when Hx > 1 (1 in fwd/dq, the GQA group in dk/dv).
    heads_axis_of_grid: unused placeholder for clarity of the grid layout (1).
  """
  del heads_axis_of_grid
  specs = []
  for kind, x in zip(kinds, leaves):
    if kind == 'head':
      specs.append(pl.BlockSpec(x.shape, lambda *_, n=x.ndim: (0,) * n))
      continue
    bx, hx = x.shape[:2]
    hb = group_block if hx > 1 else 1
    rest = x.shape[2:]

    def index(b, h, i, bx=bx, hx=hx, nrest=len(rest)):
      return (b if bx > 1 else 0, h if hx > 1 else 0) + (0,) * nrest
    specs.append(pl.BlockSpec((None, hb) + rest, index))
  return specs


def _prep_rule(rule):
  leaves, treedef = jax.tree.flatten(rule)
  leaves = [x.astype(jnp.int8) if x.dtype == jnp.bool_ else x for x in leaves]
  return leaves, treedef, rule.leaf_kinds()


def _pad_d(x, dp):
  d = x.shape[-1]
  return x if d == dp else jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, dp - d)])


def _params(tiles: Tiles):
  return pltriton.CompilerParams(num_warps=tiles.num_warps, num_stages=tiles.num_stages)


# ---- forward -------------------------------------------------------------------


def _fwd_kernel(q_ref, k_ref, v_ref, knum, kidx, fnum, fidx, *refs, treedef, n_rule, scale,
                bq, bk, tq, tk, group):
  rule_refs, (o_ref, lse_ref) = refs[:n_rule], refs[n_rule:]
  h, i = pl.program_id(1), pl.program_id(2)
  q_start = i * tq
  row = q_start // bq
  q = q_ref[...]
  rule = jax.tree.unflatten(treedef, rule_refs)

  def walk(num_ref, idx_ref, masked, carry):
    def block(j, carry):
      kb = idx_ref[0, row, j]

      def sub(c, carry):
        m, l, acc = carry
        k_start = kb * bk + c * tk
        kt = k_ref[pl.ds(k_start, tk), :]
        vt = v_ref[pl.ds(k_start, tk), :]
        s = _dot(q, kt, trans_b=True) * scale
        if masked:
          ctx = _Ctx(q_start, k_start, tq, tk, row, kb, 0, h)
          ok = jnp.broadcast_to(rule.evaluate(ctx), s.shape)
          s = jnp.where(ok, s, MASK_VALUE)
          vt = _zero_unread(vt, _any(ok, 0))
        m_new = jnp.maximum(m, s.max(axis=1))
        alpha = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new[:, None])
        l = alpha * l + p.sum(axis=1)
        acc = alpha[:, None] * acc + _dot(p.astype(vt.dtype), vt)
        return m_new, l, acc
      return jax.lax.fori_loop(0, bk // tk, sub, carry)
    return jax.lax.fori_loop(0, num_ref[0, row], block, carry)

  d = q.shape[-1]
  carry = (jnp.full((tq,), M_INIT, jnp.float32), jnp.zeros((tq,), jnp.float32),
           jnp.zeros((tq, d), jnp.float32))
  carry = walk(knum, kidx, True, carry)
  m, l, acc = walk(fnum, fidx, False, carry)
  empty = l == 0.0
  safe_l = jnp.where(empty, 1.0, l)
  o_ref[...] = (acc / safe_l[:, None]).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(empty, -jnp.inf, m + jnp.log(safe_l))


def forward(q, k, v, mask: BlockMask, scale: float, tiles: Tiles, interpret=False):
  """Backend contract; see api.py. q [b, t, n, d], k/v [b, s, k, d]."""
  b, t, n, d = q.shape
  kh, s = k.shape[2], k.shape[1]
  group = n // kh
  dp = max(16, pl.next_power_of_2(d))
  qt, kt, vt = (_pad_d(jnp.swapaxes(x, 1, 2), dp) for x in (q, k, v))
  tq, tk = tiles.block_q, tiles.block_k
  tables = [mask.kv_num_blocks, mask.kv_indices, mask.full_kv_num_blocks,
            mask.full_kv_indices]
  rule_leaves, treedef, kinds = _prep_rule(mask.rule)
  kernel = functools.partial(_fwd_kernel, treedef=treedef, n_rule=len(rule_leaves),
                             scale=scale, bq=mask.block_q, bk=mask.block_k, tq=tq, tk=tk,
                             group=group)
  in_specs = [
      pl.BlockSpec((None, None, tq, dp), lambda b_, h, i: (b_, h, i, 0)),
      pl.BlockSpec((None, None, s, dp), lambda b_, h, i: (b_, h // group, 0, 0)),
      pl.BlockSpec((None, None, s, dp), lambda b_, h, i: (b_, h // group, 0, 0)),
  ] + _leaf_specs(tables + rule_leaves, ['table'] * 4 + kinds, 1, 1)
  out, lse = pl.pallas_call(
      kernel,
      grid=(b, n, t // tq),
      in_specs=in_specs,
      out_specs=[pl.BlockSpec((None, None, tq, dp), lambda b_, h, i: (b_, h, i, 0)),
                 pl.BlockSpec((None, None, tq), lambda b_, h, i: (b_, h, i))],
      out_shape=[jax.ShapeDtypeStruct((b, n, t, dp), q.dtype),
                 jax.ShapeDtypeStruct((b, n, t), jnp.float32)],
      compiler_params=_params(tiles),
      interpret=interpret,
      name='block_sparse_fwd',
  )(qt, kt, vt, *tables, *rule_leaves)
  return jnp.swapaxes(out[..., :d], 1, 2), lse


# ---- backward ------------------------------------------------------------------


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, knum, kidx, fnum, fidx,
               *refs, treedef, n_rule, scale, bq, bk, tq, tk):
  rule_refs, dq_ref = refs[:n_rule], refs[n_rule]
  h, i = pl.program_id(1), pl.program_id(2)
  q_start = i * tq
  row = q_start // bq
  q, do = q_ref[...], do_ref[...]
  lse, delta = lse_ref[...], delta_ref[...]
  rule = jax.tree.unflatten(treedef, rule_refs)

  def walk(num_ref, idx_ref, masked, dq):
    def block(j, dq):
      kb = idx_ref[0, row, j]

      def sub(c, dq):
        k_start = kb * bk + c * tk
        kt = k_ref[pl.ds(k_start, tk), :]
        vt = v_ref[pl.ds(k_start, tk), :]
        s = _dot(q, kt, trans_b=True) * scale
        if masked:
          ctx = _Ctx(q_start, k_start, tq, tk, row, kb, 0, h)
          ok = jnp.broadcast_to(rule.evaluate(ctx), s.shape)
          s = jnp.where(ok, s, MASK_VALUE)
          kt, vt = _zero_unread(kt, _any(ok, 0)), _zero_unread(vt, _any(ok, 0))
        p = jnp.exp(s - lse[:, None])
        dp = _dot(do, vt, trans_b=True)
        ds = (p * (dp - delta[:, None]) * scale).astype(kt.dtype)
        return dq + _dot(ds, kt)
      return jax.lax.fori_loop(0, bk // tk, sub, dq)
    return jax.lax.fori_loop(0, num_ref[0, row], block, dq)

  dq = jnp.zeros(q.shape, jnp.float32)
  dq = walk(knum, kidx, True, dq)
  dq = walk(fnum, fidx, False, dq)
  dq_ref[...] = dq.astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qnum, qidx, fnum, fidx,
                *refs, treedef, n_rule, scale, bq, bk, tq, tk, group):
  rule_refs, (dk_ref, dv_ref) = refs[:n_rule], refs[n_rule:]
  kvh, j = pl.program_id(1), pl.program_id(2)
  k_start = j * tk
  col = k_start // bk
  kt, vt = k_ref[...], v_ref[...]
  rule = jax.tree.unflatten(treedef, rule_refs)

  def walk(num_ref, idx_ref, masked, g, carry):
    tslot = g if num_ref.shape[0] > 1 else 0

    def block(jj, carry):
      qb = idx_ref[tslot, col, jj]

      def sub(c, carry):
        dk, dv = carry
        q_start = qb * bq + c * tq
        q = q_ref[g, pl.ds(q_start, tq), :]
        do = do_ref[g, pl.ds(q_start, tq), :]
        lse = lse_ref[g, pl.ds(q_start, tq)]
        delta = delta_ref[g, pl.ds(q_start, tq)]
        s = _dot(q, kt, trans_b=True) * scale
        vt_read = vt
        if masked:
          ctx = _Ctx(q_start, k_start, tq, tk, qb, col, g, kvh * group + g)
          ok = jnp.broadcast_to(rule.evaluate(ctx), s.shape)
          s = jnp.where(ok, s, MASK_VALUE)
          q, vt_read = _zero_unread(q, _any(ok, 1)), _zero_unread(vt, _any(ok, 0))
        p = jnp.exp(s - lse[:, None])
        dv = dv + _dot(p.astype(do.dtype), do, trans_a=True)
        dp = _dot(do, vt_read, trans_b=True)
        ds = (p * (dp - delta[:, None]) * scale).astype(q.dtype)
        dk = dk + _dot(ds, q, trans_a=True)
        return dk, dv
      return jax.lax.fori_loop(0, bq // tq, sub, carry)
    return jax.lax.fori_loop(0, num_ref[tslot, col], block, carry)

  def head(g, carry):
    carry = walk(qnum, qidx, True, g, carry)
    return walk(fnum, fidx, False, g, carry)

  zeros = jnp.zeros(kt.shape, jnp.float32)
  dk, dv = jax.lax.fori_loop(0, group, head, (zeros, zeros))
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def backward(q, k, v, out, lse, dout, mask: BlockMask, scale: float, tiles: Tiles,
             interpret=False, dlse=None):
  """Backend contract; see api.py."""
  b, t, n, d = q.shape
  kh, s = k.shape[2], k.shape[1]
  group = n // kh
  dp = max(16, pl.next_power_of_2(d))
  delta = jnp.einsum('btnd,btnd->bnt', out.astype(jnp.float32), dout.astype(jnp.float32))
  if dlse is not None:  # d lse / d s = p: folds into delta
    delta = delta - dlse.astype(jnp.float32)
  qt, kt, vt, dot = (_pad_d(jnp.swapaxes(x, 1, 2), dp) for x in (q, k, v, dout))
  tq, tk = tiles.block_q_bwd, tiles.block_k_bwd
  rule_leaves, treedef, kinds = _prep_rule(mask.rule)
  common = dict(treedef=treedef, n_rule=len(rule_leaves), scale=scale, bq=mask.block_q,
                bk=mask.block_k, tq=tq, tk=tk)

  # dq: one program per (batch, query head, query tile).
  kv_tables = [mask.kv_num_blocks, mask.kv_indices, mask.full_kv_num_blocks,
               mask.full_kv_indices]
  row_spec = lambda w: pl.BlockSpec((None, None, tq, w), lambda b_, h, i: (b_, h, i, 0))
  kv_spec = pl.BlockSpec((None, None, s, dp), lambda b_, h, i: (b_, h // group, 0, 0))
  vec_spec = pl.BlockSpec((None, None, tq), lambda b_, h, i: (b_, h, i))
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, **common),
      grid=(b, n, t // tq),
      in_specs=[row_spec(dp), kv_spec, kv_spec, row_spec(dp), vec_spec, vec_spec]
      + _leaf_specs(kv_tables + rule_leaves, ['table'] * 4 + kinds, 1, 1),
      out_specs=row_spec(dp),
      out_shape=jax.ShapeDtypeStruct((b, n, t, dp), q.dtype),
      compiler_params=_params(tiles),
      interpret=interpret,
      name='block_sparse_dq',
  )(qt, kt, vt, dot, lse, delta, *kv_tables, *rule_leaves)

  # dk, dv: one program per (batch, kv head, key tile), looping over the group.
  q_tables = [mask.q_num_blocks, mask.q_indices, mask.full_q_num_blocks,
              mask.full_q_indices]
  grp_spec = pl.BlockSpec((None, group, t, dp), lambda b_, h, j: (b_, h, 0, 0))
  grp_vec = pl.BlockSpec((None, group, t), lambda b_, h, j: (b_, h, 0))
  tile_spec = pl.BlockSpec((None, None, tk, dp), lambda b_, h, j: (b_, h, j, 0))
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, group=group, **common),
      grid=(b, kh, s // tk),
      in_specs=[grp_spec, tile_spec, tile_spec, grp_spec, grp_vec, grp_vec]
      + _leaf_specs(q_tables + rule_leaves, ['table'] * 4 + kinds, group, 1),
      out_specs=[tile_spec, tile_spec],
      out_shape=[jax.ShapeDtypeStruct((b, kh, s, dp), k.dtype),
                 jax.ShapeDtypeStruct((b, kh, s, dp), v.dtype)],
      compiler_params=_params(tiles),
      interpret=interpret,
      name='block_sparse_dkv',
  )(qt, kt, vt, dot, lse, delta, *q_tables, *rule_leaves)
  back = lambda x: jnp.swapaxes(x[..., :d], 1, 2)
  return back(dq), back(dk), back(dv)

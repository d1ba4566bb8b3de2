"""Gather-based block-sparse attention in plain XLA: the CPU default.

Einsum legend: g program (= batch x query head), c lane, q query in tile,
k key in tile, d head dim.

Work list. For every program (batch b, query head n) the tiles of a table
(partial or full) are laid out as one flat, row-major list of (query block,
key block) pairs: entry e belongs to query block `row` and key block `kb`.
The list has the mask's static capacity (`kv_capacity` / `full_kv_capacity`);
entries past the true count go to a trash row (index nq) and are discarded.

Forward. The list is cut into C contiguous lanes of S entries each, where S
is not the static capacity / C but the tables' actual count / C (the busiest
program's), so the loop is a while loop with a data-dependent trip count: the
work is proportional to the tiles the mask really holds (a causal mask costs
half a dense one; a top-p mask far below its static bound costs what it
keeps), and memory is O(L x blocks per row x block size), never O(L^2).
Each step processes one entry per lane (all programs and lanes at once: one
batched gather of Q/K/V tiles and two batched einsums). Each lane
keeps an online-softmax state (m, l, acc) for its current row and flushes it
to a partials buffer when the row ends, at slot id = row + lane (unique, since
lanes are contiguous pieces of a row-sorted list). Partials of the partial and
full lists are merged per row at the end (max / rescale / sum). The element
rule is evaluated only in the partial-list loop.

Backward. dq, dk, dv are computed in ONE pass over the same work lists (same
data-dependent trip count; both loops sit under the custom VJP, so nothing
differentiates through them) by
scatter-add (no transposed tables needed on this path): per entry, recompute
p = exp(s - lse), ds = p * (do v^T - delta), then dq[row] += ds k, dk[kb] +=
ds^T q, dv[kb] += p^T do. Five einsums per tile, the minimum. GQA: dk/dv are
accumulated per query head and summed over the group afterwards.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.block_sparse.block_mask import BlockMask
from pallas_kernels.block_sparse.reference import MASK_VALUE
from pallas_kernels.block_sparse.tiles import Tiles
from pallas_kernels.scheduling import after

# Running max starts above MASK_VALUE so exp(MASK_VALUE - m) underflows to 0:
# masked scores never contribute, even while a row has no allowed key yet.
M_INIT = 0.5 * MASK_VALUE

_take = functools.partial(jnp.take, axis=0, mode='clip')


def _flat_entries(num_blocks, indices, length):
  """Tables [Bm, Hm, R], [Bm, Hm, R, W] -> (row, kb) int32 [Bm, Hm, length].

  Rows past the tables' total are row = R (trash), kb = 0.
  """
  r, w = indices.shape[-2:]
  ends = jnp.cumsum(num_blocks, axis=-1)
  e = jnp.arange(length, dtype=jnp.int32)
  search = functools.partial(jnp.searchsorted, side='right')
  row = jax.vmap(jax.vmap(search, (0, None)), (0, None))(ends, e).astype(jnp.int32)
  rc = jnp.minimum(row, r - 1)
  start = jnp.take_along_axis(ends - num_blocks, rc, axis=-1)
  slot = jnp.clip(e - start, 0, w - 1)
  flat = indices.reshape(indices.shape[:2] + (r * w,))
  kb = jnp.take_along_axis(flat, rc * w + slot, axis=-1)
  valid = row < r
  return jnp.where(valid, row, r), jnp.where(valid, kb, 0)


def _lanes(capacity: int, programs: int, tiles_per_step: int) -> tuple[int, int]:
  """(lanes C, steps S) with C * S >= capacity and programs * C <~ tiles_per_step."""
  c_max = max(1, min(capacity, tiles_per_step // max(programs, 1)))
  steps = -(-capacity // c_max)
  return -(-capacity // steps), steps


class _WorkList:
  """One table's flat per-program work list, walked in C lanes of `steps` entries.

  row, kb: int32 [g, C * S_max] (S_max: static bound from the capacity);
  steps: int32 scalar, the trip count the actual entries need (<= S_max).
  Lane c owns entries [c * steps, (c + 1) * steps).
  """

  def __init__(self, row, kb, count, lanes: int):
    self.row, self.kb, self.lanes = row, kb, lanes
    # Clamped to the list: a mask breaking count <= capacity drops tiles, never repeats them.
    self.steps = jnp.minimum(jnp.max(-(-count // lanes)), row.shape[1] // lanes).astype(jnp.int32)
    self.lane = jnp.arange(lanes, dtype=jnp.int32)[None, :]

  def at(self, t):
    """(row, kb) [g, C] of step t; entries past a list's end are trash (row = nq)."""
    e = self.lane * self.steps + t
    return (jnp.take_along_axis(self.row, e, axis=1, mode='clip'),
            jnp.take_along_axis(self.kb, e, axis=1, mode='clip'))

  def next_row(self, t):
    """Row of each lane's next entry, -1 after the lane's last step (forces a flush)."""
    nxt = jnp.take_along_axis(self.row, self.lane * self.steps + t + 1, axis=1, mode='clip')
    return jnp.where(t + 1 < self.steps, nxt, -1)


class _Layout:
  """Index bookkeeping shared by forward and backward."""

  def __init__(self, q, k, mask: BlockMask):
    self.b, self.lq, self.nh, self.d = q.shape
    self.lk, self.nkv = k.shape[1], k.shape[2]
    self.group = self.nh // self.nkv
    self.bq, self.bk = mask.block_q, mask.block_k
    self.nq, self.nk = self.lq // self.bq, self.lk // self.bk
    self.programs = self.b * self.nh
    prog = np.arange(self.programs)
    self.batch_of = prog // self.nh
    self.head_of = prog % self.nh
    # Programs of a GQA group read the same K/V blocks.
    self.kv_prog = self.batch_of * self.nkv + self.head_of // self.group

  def leaf_prog(self, bx: int, hx: int) -> np.ndarray:
    """Index into a leaf's flattened (batch, head) dims for every program."""
    bi = self.batch_of if bx > 1 else np.zeros_like(self.batch_of)
    hi = self.head_of if hx > 1 else np.zeros_like(self.head_of)
    return bi * hx + hi

  def q_tiles(self, x):
    """[b, t, n, d] -> [g*nq, bq, d]."""
    x = jnp.swapaxes(x, 1, 2)
    return x.reshape(self.programs * self.nq, self.bq, x.shape[-1])

  def kv_tiles(self, x):
    """[b, s, k, d] -> [(b*k)*nk, bk, d]."""
    x = jnp.swapaxes(x, 1, 2)
    return x.reshape(self.b * self.nkv * self.nk, self.bk, x.shape[-1])

  def work(self, num_blocks, indices, capacity, tiles_per_step) -> _WorkList:
    """Per-program work list of one table (see _WorkList)."""
    lanes, steps = _lanes(capacity, self.programs, tiles_per_step)
    row, kb = _flat_entries(num_blocks, indices, lanes * steps)
    bm, hm = num_blocks.shape[:2]
    idx = jnp.asarray(self.leaf_prog(bm, hm))
    count = num_blocks.sum(-1).reshape(bm * hm)[idx]
    return _WorkList(row.reshape(bm * hm, -1)[idx], kb.reshape(bm * hm, -1)[idx], count, lanes)


class _TileContext:
  """RuleContext for a batch of tiles: entries [g, C] at (row, kb)."""

  def __init__(self, lay: _Layout, row, kb):
    self.lay, self.row, self.kb = lay, jnp.minimum(row, lay.nq - 1), kb
    self.g = jnp.arange(lay.programs)[:, None]

  def _prog(self, x, lead=2):
    bx, hx = (1, x.shape[0]) if lead == 1 else x.shape[:2]
    return jnp.asarray(self.lay.leaf_prog(bx, hx))[:, None]

  def q(self, x):
    lay = self.lay
    tiles = x.reshape(-1, lay.bq)  # [(bx*hx)*nq, bq]
    return _take(tiles, self._prog(x) * lay.nq + self.row)[..., :, None]

  def kv(self, x):
    lay = self.lay
    tiles = x.reshape(-1, lay.bk)
    return _take(tiles, self._prog(x) * lay.nk + self.kb)[..., None, :]

  def head(self, x):
    return _take(x, self._prog(x, lead=1))[..., None, None]

  def dense(self, x):
    lay = self.lay
    bx, hx = x.shape[:2]
    t = x.reshape(bx * hx, lay.nq, lay.bq, lay.nk, lay.bk).transpose(0, 1, 3, 2, 4)
    t = t.reshape(-1, lay.bq, lay.bk)
    return _take(t, (self._prog(x) * lay.nq + self.row) * lay.nk + self.kb)

  def block(self, x):
    lay = self.lay
    flat = x.reshape(-1)
    return _take(flat, (self._prog(x) * lay.nq + self.row) * lay.nk + self.kb)[..., None, None]

  def kv_index(self):
    return (self.kb * self.lay.bk)[..., None, None] + jnp.arange(self.lay.bk)[None, None, None]


def _zero_unread(x, read):
  """Zeroes the rows of a tile [g, c, rows, d] that no entry of the tile reads (read
  [g, c, rows]): a masked NaN / inf would otherwise reach p @ v as 0 * NaN."""
  return jnp.where(read[..., None], x, jnp.zeros((), x.dtype))


def _scores(qt, kt, scale):
  return jnp.einsum('gcqd,gckd->gcqk', qt, kt, preferred_element_type=jnp.float32) * scale


def _forward_pass(lay, qf, kf, vf, work: _WorkList, rule, scale):
  """One online-softmax pass over a work list; returns per-(lane,row) partials."""
  g, bq, d, lanes = lay.programs, lay.bq, lay.d, work.lanes
  n_part = lay.nq + lanes + 1
  trash = n_part - 1
  gidx = jnp.arange(g, dtype=jnp.int32)[:, None]
  kvg = jnp.asarray(lay.kv_prog)[:, None]

  def step(t, carry):
    m, l, acc, pm, pl, pacc, prow = carry
    r, kbl = work.at(t)
    f = jnp.where(r != work.next_row(t), r + work.lane, trash)  # flush slot, or trash
    rq = jnp.minimum(r, lay.nq - 1)
    qt = _take(qf, gidx * lay.nq + rq)
    kt, vt = _take(kf, kvg * lay.nk + kbl), _take(vf, kvg * lay.nk + kbl)
    s = _scores(qt, kt, scale)
    if rule is not None:
      ok = jnp.broadcast_to(rule.evaluate(_TileContext(lay, r, kbl)), s.shape)
      s = jnp.where(ok, s, MASK_VALUE)
      vt = _zero_unread(vt, ok.any(axis=-2))
    m_new = jnp.maximum(m, s.max(-1))
    alpha = jnp.exp(m - m_new)
    p = jnp.exp(s - m_new[..., None])
    l_new = alpha * l + p.sum(-1)
    acc_new = alpha[..., None] * acc + jnp.einsum(
        'gcqk,gckd->gcqd', p.astype(vt.dtype), vt, preferred_element_type=jnp.float32)
    slot = (gidx * n_part + f).reshape(-1)
    pm = pm.at[slot].set(m_new.reshape(-1, bq))
    pl = pl.at[slot].set(l_new.reshape(-1, bq))
    pacc = pacc.at[slot].set(acc_new.reshape(-1, bq, d))
    prow = prow.at[slot].set(r.reshape(-1))
    done = (f != trash)[..., None]
    m = jnp.where(done, M_INIT, m_new)
    l = jnp.where(done, 0.0, l_new)
    acc = jnp.where(done[..., None], 0.0, acc_new)
    return m, l, acc, pm, pl, pacc, prow

  init = (jnp.full((g, lanes, bq), M_INIT, jnp.float32), jnp.zeros((g, lanes, bq), jnp.float32),
          jnp.zeros((g, lanes, bq, d), jnp.float32),
          jnp.full((g * n_part, bq), M_INIT, jnp.float32),
          jnp.zeros((g * n_part, bq), jnp.float32), jnp.zeros((g * n_part, bq, d), jnp.float32),
          jnp.full((g * n_part,), lay.nq, jnp.int32))
  init = after(init, qf)
  # Custom VJP: the loop is never differentiated, so its trip count may be traced.
  _, _, _, pm, pl, pacc, prow = jax.lax.fori_loop(0, work.steps, step, init)
  prow = prow.reshape(g, n_part).at[:, trash].set(lay.nq)
  return (pm.reshape(g, n_part, bq), pl.reshape(g, n_part, bq),
          pacc.reshape(g, n_part, bq, d), prow)


def forward(q, k, v, mask: BlockMask, scale: float, tiles: Tiles, interpret: bool = False):
  """Backend contract. q [b, t, n, d], k/v [b, s, k, d] with t, s block multiples.

  Returns:
    out [b, t, n, d] (q.dtype) and lse [b, n, t] float32 (-inf for empty rows).
  """
  del interpret
  lay = _Layout(q, k, mask)
  qf, kf, vf = lay.q_tiles(q), lay.kv_tiles(k), lay.kv_tiles(v)
  parts = []
  for num, idx, cap, rule in (
      (mask.kv_num_blocks, mask.kv_indices, mask.kv_capacity, mask.rule),
      (mask.full_kv_num_blocks, mask.full_kv_indices, mask.full_kv_capacity, None)):
    work = lay.work(num, idx, cap, tiles.xla_tiles_per_step)
    parts.append(_forward_pass(lay, qf, kf, vf, work, rule, scale))
  pm, pl, pacc, prow = (jnp.concatenate(x, axis=1) for x in zip(*parts))
  g, nq = lay.programs, lay.nq
  flat_row = (jnp.arange(g)[:, None] * (nq + 1) + prow).reshape(-1)
  m0, l0, acc0 = after((jnp.full((g * (nq + 1), lay.bq), M_INIT, jnp.float32),
                         jnp.zeros((g * (nq + 1), lay.bq), jnp.float32),
                         jnp.zeros((g * (nq + 1), lay.bq, lay.d), jnp.float32)), pm)
  m = m0.at[flat_row].max(pm.reshape(-1, lay.bq))
  w = jnp.exp(pm - m[flat_row].reshape(pm.shape))
  l = l0.at[flat_row].add((pl * w).reshape(-1, lay.bq))
  acc = acc0.at[flat_row].add((pacc * w[..., None]).reshape(-1, lay.bq, lay.d))
  m, l, acc = (x.reshape((g, nq + 1) + x.shape[1:])[:, :nq] for x in (m, l, acc))
  empty = l == 0.0
  out = acc / jnp.where(empty, 1.0, l)[..., None]
  lse = jnp.where(empty, -jnp.inf, m + jnp.log(jnp.where(empty, 1.0, l)))
  out = out.reshape(lay.b, lay.nh, lay.lq, lay.d).swapaxes(1, 2).astype(q.dtype)
  return out, lse.reshape(lay.b, lay.nh, lay.lq)


def backward(q, k, v, out, lse, dout, mask: BlockMask, scale: float, tiles: Tiles,
             interpret: bool = False, dlse=None):
  """Backend contract: (dq, dk, dv) in the dtypes of q, k, v."""
  del interpret
  lay = _Layout(q, k, mask)
  g, nq, nk, bq, bk, d = lay.programs, lay.nq, lay.nk, lay.bq, lay.bk, lay.d
  delta = jnp.einsum('btnd,btnd->bnt', out.astype(jnp.float32), dout.astype(jnp.float32))
  if dlse is not None:  # d lse / d s = p: folds into delta
    delta = delta - dlse.astype(jnp.float32)

  def with_trash_row(x_tiles):  # [g*nq, bq, ...] -> [g*(nq+1), bq, ...], trash row = 0
    x = x_tiles.reshape((g, nq) + x_tiles.shape[1:])
    x = jnp.concatenate([x, jnp.zeros_like(x[:, :1])], axis=1)
    return x.reshape((g * (nq + 1),) + x.shape[2:])

  qf, dof = with_trash_row(lay.q_tiles(q)), with_trash_row(lay.q_tiles(dout))
  lsef = with_trash_row(lse.reshape(g * nq, bq))
  deltaf = with_trash_row(delta.reshape(g * nq, bq))
  kf, vf = lay.kv_tiles(k), lay.kv_tiles(v)
  gidx = jnp.arange(g, dtype=jnp.int32)[:, None]
  kvg = jnp.asarray(lay.kv_prog)[:, None]

  def run(carry, work: _WorkList, rule):
    def step(t, carry):
      dq, dk, dv = carry
      r, kbl = work.at(t)
      qi = gidx * (nq + 1) + r
      ki = gidx * nk + kbl
      qt, dot, lse_t, delta_t = (_take(a, qi) for a in (qf, dof, lsef, deltaf))
      kt, vt = _take(kf, kvg * nk + kbl), _take(vf, kvg * nk + kbl)
      s = _scores(qt, kt, scale)
      if rule is not None:
        ok = jnp.broadcast_to(rule.evaluate(_TileContext(lay, r, kbl)), s.shape)
        s = jnp.where(ok, s, MASK_VALUE)
        kt, vt = _zero_unread(kt, ok.any(axis=-2)), _zero_unread(vt, ok.any(axis=-2))
        qt = _zero_unread(qt, ok.any(axis=-1))
      p = jnp.exp(s - lse_t[..., None])
      dv = dv.at[ki.reshape(-1)].add(jnp.einsum(
          'gcqk,gcqd->gckd', p.astype(dot.dtype), dot,
          preferred_element_type=jnp.float32).reshape(-1, bk, d))
      dp = jnp.einsum('gcqd,gckd->gcqk', dot, vt, preferred_element_type=jnp.float32)
      ds = (p * (dp - delta_t[..., None]) * scale).astype(qt.dtype)
      dq = dq.at[qi.reshape(-1)].add(jnp.einsum(
          'gcqk,gckd->gcqd', ds, kt, preferred_element_type=jnp.float32).reshape(-1, bq, d))
      dk = dk.at[ki.reshape(-1)].add(jnp.einsum(
          'gcqk,gcqd->gckd', ds, qt, preferred_element_type=jnp.float32).reshape(-1, bk, d))
      return dq, dk, dv
    return jax.lax.fori_loop(0, work.steps, step, carry)

  carry = after((jnp.zeros((g * (nq + 1), bq, d), jnp.float32),
                  jnp.zeros((g * nk, bk, d), jnp.float32),
                  jnp.zeros((g * nk, bk, d), jnp.float32)), qf)
  for num, idx, cap, rule in (
      (mask.kv_num_blocks, mask.kv_indices, mask.kv_capacity, mask.rule),
      (mask.full_kv_num_blocks, mask.full_kv_indices, mask.full_kv_capacity, None)):
    carry = run(carry, lay.work(num, idx, cap, tiles.xla_tiles_per_step), rule)
  dq, dk, dv = carry
  dq = dq.reshape(g, nq + 1, bq, d)[:, :nq].reshape(lay.b, lay.nh, lay.lq, d).swapaxes(1, 2)

  def kv_grad(x):  # per query head -> summed over the GQA group
    x = x.reshape(lay.b, lay.nkv, lay.group, lay.lk, d).sum(axis=2)
    return x.swapaxes(1, 2)

  return dq.astype(q.dtype), kv_grad(dk).astype(k.dtype), kv_grad(dv).astype(v.dtype)

"""Pallas TPU (Mosaic) kernels for block-sparse flash attention: forward and backward.

Einsum legend: b batch, t query position, s key position, n query heads,
k kv heads, g query heads per kv head (n = k * g), d head dim.

Implements the backend contract of api.py / __init__.py:

    forward(q, k, v, mask, scale, tiles, interpret) -> (out, lse)
    backward(q, k, v, out, lse, dout, mask, scale, tiles, interpret, dlse) -> (dq, dk, dv)

Layout. q, k, v are transposed to head-major [b, n, t, d] / [b, k, s, d] so
every block is (rows, d): rows on sublanes (a multiple of 8), the full head
dim on lanes. Every kernel works on one compute tile per grid step: (tq, tk)
= (tiles.block_q, tiles.block_k) in the forward, (tiles.block_q_bwd,
tiles.block_k_bwd) in the backward. Tiles divide the mask blocks; a mask
block of the streamed side is walked as r = mask_block / tile consecutive
steps.

Slot axis. The partial and the full tables of a row are concatenated into
one reduction axis of (Wp + Wf) * r steps (Wp, Wf the table widths): steps
of the partial part evaluate the element rule, steps of the full part do not.
The tables are scalar-prefetch arguments (SMEM, flattened to 1-D) and the
index maps look the block ids up. A step past a table's count does no work (pl.when) and its index map
re-points at the block already resident (the last one used, or the row's
first block while nothing ran yet), so the pipeline issues no DMA for it; the
table invariants (padding slots repeat the last id) give most of that, the
index map bridges the two tables.

Kernels (accumulators in VMEM scratch, initialised at the first reduction
step, written at the last):
  forward  grid (b, n, t/tq, slots)        online softmax m, l, acc; out, lse.
  dq       grid (b, n, t/tq, slots)        p = exp(s - lse), ds; dq.
  dk/dv    grid (b, k, s/tk, g, slots)     transposed tiles s^T [tk, tq]
           (no in-kernel transposes); the group's query heads are a
           reduction axis, so dk/dv are summed over each GQA group in VMEM.
di = sum(out * dout) is computed in XLA. Only the last one or two grid axes
are reductions ("arbitrary"); the others are "parallel".

Element rule. Evaluated in-kernel on partial tiles only, through
`mask.rule.evaluate(ctx)` with a RuleContext over the tile (positions from
iota + the tile's offsets for padded keys). Rule leaves: 'head' and 'block'
leaves are flat scalar-prefetch (SMEM) arguments; 'q' and 'kv'
leaves are re-laid as [.., L / tile, 8, tile] rows (a row on lanes,
broadcast over 8 sublanes: a legal block for any tile size) and read as a row
or, via expand_dims, as a column; 'dense' leaves (from_dense) are re-laid as
tiles [.., nq_tiles, nk_tiles, tq, tk] (transposed for dk/dv) of int32
(4x the bool mask, per kernel: from_dense is the O(L^2) path anyway).

Statistics. Forward m / l live in (tq, 128) lane-broadcast scratch and lse
is written as [b, n, t, 128] (then sliced), the layout Mosaic handles best;
the backward reads lse / di as [b, n, t/tq, 8, tq] rows. Masked scores are
MASK_VALUE and the running max starts at MASK_VALUE / 2, so masked entries
contribute exp(MASK_VALUE / 2) == 0 and rows with no allowed key give
out = 0, lse = -inf (the backward gets 0 there) and zero gradients, never NaN. In a
partial tile, keys / values that no query of the tile may read (and queries that read
no key, for dk) are zeroed before the matmuls, so a NaN / inf there never reaches p @ v
as 0 * NaN.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.block_sparse.block_mask import BlockMask
from pallas_kernels.block_sparse.reference import MASK_VALUE
from pallas_kernels.block_sparse.rules import AllowAll
from pallas_kernels.block_sparse.tiles import Tiles

# Running max starts above MASK_VALUE: exp(MASK_VALUE - m) underflows to 0.
M_INIT = 0.5 * MASK_VALUE
LANES = 128
SUBLANES = 8
_NN = (((1,), (0,)), ((), ()))  # x @ y
_NT = (((1,), (1,)), ((), ()))  # x @ y^T

_PARALLEL, _ARBITRARY = 'parallel', 'arbitrary'


# ---- small helpers ---------------------------------------------------------------


def _div(x, n: int):
  """x // n for non-negative traced ints (lax.div: no sign fix-up to lower)."""
  return x if n == 1 else lax.div(x, n)


def _lanes(x, width: int):
  """(rows, 128) lane-broadcast statistic -> (rows, width)."""
  reps = -(-width // LANES)
  if reps > 1:
    x = jnp.tile(x, (1, reps))
  return x if x.shape[1] == width else x[:, :width]


def _rows(x, tile: int):
  """[B, H, L] -> [B, H, L / tile, 8, tile]: per-tile rows, broadcast over sublanes."""
  bx, hx, length = x.shape
  x = x.reshape(bx, hx, length // tile, 1, tile)
  return jnp.broadcast_to(x, (bx, hx, length // tile, SUBLANES, tile))


def _column(ref):
  """(8, w) row block -> (w, 1) column."""
  return jnp.expand_dims(ref[0], -1)


def _check_tile(name: str, tile: int, mask_block: int, length: int):
  if mask_block % tile:
    raise ValueError(f'Tiles.{name}={tile} must divide the mask block size {mask_block}.')
  if tile % SUBLANES and tile != length:
    raise ValueError(f"implementation='mosaic_tpu' needs Tiles.{name} to be a multiple of "
                     f'{SUBLANES} (TPU sublanes), got {tile}; use mask blocks / tiles that '
                     f'are multiples of {SUBLANES} (128 or more is fastest).')


# ---- block tables -----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Walk:
  """How the slot axis walks one side's tables (all static).

  The tables are flattened to 1-D for SMEM (multi-dimensional SMEM arrays
  are padded): num [Bm * Hm * R], idx [Bm * Hm * R * W].

  Attributes:
    width_p, width_f: widths of the partial and the full table.
    r: compute tiles per mask block on the streamed side.
    batch, heads, rows: the tables' Bm, Hm and R.
  """

  width_p: int
  width_f: int
  r: int
  batch: int
  heads: int
  rows: int

  @property
  def steps(self) -> int:
    return (self.width_p + self.width_f) * self.r

  def lookup(self, tables, b, h, row, step):
    """(tile id, run partial, run full) of a slot-axis step.

    Args:
      tables: flat (num, idx, full_num, full_idx) refs.
      b, h: batch and query head of the step (mapped to the mask's dims here).
      row: the mask row (query block, or key block for the transposed tables).
      step: position on the slot axis.

    Returns:
      The streamed side's tile id (mask block * r + sub-tile) to load, and
      whether this step computes a partial (rule) or a full tile. Steps that
      compute nothing point at the tile already resident: the last tile used,
      or the first tile the row will use while nothing ran yet.
    """
    num, idx, full_num, full_idx = tables
    bi = b if self.batch > 1 else 0
    hi = h if self.heads > 1 else 0
    wp, wf, r = self.width_p, self.width_f, self.r
    slot, sub = (step, 0) if r == 1 else (lax.div(step, r), lax.rem(step, r))
    base = (bi * self.heads + hi) * self.rows + row
    n_p, n_f = num[base], full_num[base]
    in_p = slot < wp
    pid = idx[base * wp + jnp.minimum(slot, wp - 1)]
    fid = full_idx[base * wf + jnp.clip(slot - wp, 0, wf - 1)]
    run_p = in_p & (slot < n_p)
    run_f = jnp.logical_not(in_p) & (slot - wp < n_f)
    # Tables repeat their last id past the count; bridge an empty table to
    # the neighbouring one so the step stays on a resident block.
    blk = jnp.where(in_p, jnp.where(n_p > 0, pid, full_idx[base * wf]),
                    jnp.where(n_f > 0, fid, idx[base * wp + wp - 1]))
    if r > 1:
      before = jnp.where(in_p, n_p == 0, (n_f == 0) & (n_p == 0))
      sub = jnp.where(run_p | run_f, sub, jnp.where(before, 0, r - 1))
    return blk * r + sub, run_p, run_f


def _walk(mask: BlockMask, transposed: bool, r: int):
  """(flat tables, _Walk) of the kv tables, or of the transposed q tables."""
  if transposed:
    tables = (mask.q_num_blocks, mask.q_indices, mask.full_q_num_blocks, mask.full_q_indices)
  else:
    tables = (mask.kv_num_blocks, mask.kv_indices, mask.full_kv_num_blocks,
              mask.full_kv_indices)
  bm, hm, rows = tables[0].shape
  walk = _Walk(tables[1].shape[-1], tables[3].shape[-1], r, bm, hm, rows)
  return tuple(x.reshape(-1) for x in tables), walk


# ---- element rule inside the kernel ----------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _LeafSpec:
  """Where a rule leaf lives in a kernel call."""

  kind: str  # 'q', 'kv', 'head', 'dense', 'block'
  smem: bool  # scalar prefetch (head, block) or VMEM block (q, kv, dense)
  pos: int  # index among the SMEM or among the VMEM rule operands
  per_batch: bool
  per_head: bool
  shape: tuple[int, ...]  # the leaf's shape before re-layout


class _Leaf:
  """A rule leaf bound to its ref inside the kernel (what rule.evaluate sees)."""

  def __init__(self, spec: _LeafSpec, ref):
    self.spec, self.ref = spec, ref


class _RuleLayout:
  """Where the rule's leaves go in one kernel call (static: safe to close over).

  `operands(rule)` gives the re-laid arrays: SMEM ones (scalar prefetch, after
  the tables) and VMEM ones (inputs after q, k, v...), matching
  `block_specs`; inside the kernel `bind` rebuilds the rule on their refs.
  """

  def __init__(self, rule, tq: int, tk: int, transposed: bool):
    self.tq, self.tk, self.transposed = tq, tk, transposed
    self.masked = not isinstance(rule, AllowAll)
    leaves, self.treedef = jax.tree.flatten(rule)
    self.specs, self.vmem_blocks = [], []
    n_smem = n_vmem = 0
    for kind, x in zip(rule.leaf_kinds(), leaves):
      if kind not in ('q', 'kv', 'head', 'dense', 'block'):
        raise NotImplementedError(f'rule leaf kind {kind!r} is not supported by mosaic_tpu.')
      if kind == 'head':
        per_b, per_h = False, x.shape[0] > 1
      else:
        per_b, per_h = x.shape[0] > 1, x.shape[1] > 1
      smem = kind in ('head', 'block')
      self.specs.append(_LeafSpec(kind, smem, n_smem if smem else n_vmem, per_b, per_h,
                                  tuple(x.shape)))
      if smem:
        n_smem += 1
      else:
        n_vmem += 1
        if kind == 'dense':
          block = (None,) * 4 + ((tk, tq) if transposed else (tq, tk))
        else:
          block = (None, None, None, SUBLANES, tq if kind == 'q' else tk)
        self.vmem_blocks.append(block)
    self.n_smem, self.n_vmem = n_smem, n_vmem

  def operands(self, rule):
    """(SMEM arrays, VMEM arrays) of the rule's leaves, re-laid for this kernel."""
    smem, vmem = [], []
    for spec, x in zip(self.specs, jax.tree.leaves(rule)):
      x = jnp.asarray(x).astype(jnp.int32)
      if spec.smem:  # flat: multi-dimensional SMEM arrays are padded
        smem.append(x.reshape(-1))
      elif spec.kind in ('q', 'kv'):
        vmem.append(_rows(x, self.tq if spec.kind == 'q' else self.tk))
      else:
        bx, hx, lq, lk = x.shape
        tq, tk = self.tq, self.tk
        tiles = x.reshape(bx, hx, lq // tq, tq, lk // tk, tk)
        # [.., s/tk, t/tq, tk, tq] for dk/dv, else [.., t/tq, s/tk, tq, tk].
        perm = (0, 1, 4, 2, 5, 3) if self.transposed else (0, 1, 2, 4, 3, 5)
        vmem.append(tiles.transpose(perm))
    return smem, vmem

  def block_specs(self, locate: Callable):
    """BlockSpecs of the VMEM leaves; locate(*grid, *prefetch) -> (b, h, q tile, k tile)."""
    vmem_specs = [s for s in self.specs if not s.smem]
    out = []
    for spec, block in zip(vmem_specs, self.vmem_blocks):
      def index_map(*args, spec=spec, kind=spec.kind):
        b, h, qi, ki = locate(*args)
        bi, hi = (b if spec.per_batch else 0), (h if spec.per_head else 0)
        if kind == 'q':
          return bi, hi, qi, 0, 0
        if kind == 'kv':
          return bi, hi, ki, 0, 0
        return (bi, hi, ki, qi, 0, 0) if self.transposed else (bi, hi, qi, ki, 0, 0)
      out.append(pl.BlockSpec(block, index_map))
    return out

  def bind(self, smem_refs, vmem_refs):
    """The rule with every leaf replaced by its ref (inside the kernel)."""
    leaves = [_Leaf(s, (smem_refs if s.smem else vmem_refs)[s.pos]) for s in self.specs]
    return jax.tree.unflatten(self.treedef, leaves)


class _TileContext:
  """rules.RuleContext for one compute tile inside a kernel.

  Scores are [tq, tk] (forward, dq) or, with transposed=True, [tk, tq]
  (dk/dv); readers return arrays broadcasting to that shape.
  """

  def __init__(self, shape, transposed, b, h, q_block, k_block, k_start):
    self.shape, self.transposed = shape, transposed
    self.b, self.h = b, h
    self.q_block, self.k_block, self.k_start = q_block, k_block, k_start

  def _bh(self, leaf):
    return (self.b if leaf.spec.per_batch else 0), (self.h if leaf.spec.per_head else 0)

  def q(self, leaf):
    return leaf.ref[0:1, :] if self.transposed else _column(leaf.ref)

  def kv(self, leaf):
    return _column(leaf.ref) if self.transposed else leaf.ref[0:1, :]

  def head(self, leaf):
    return leaf.ref[self._bh(leaf)[1]]

  def dense(self, leaf):
    return leaf.ref[...] != 0

  def block(self, leaf):
    bi, hi = self._bh(leaf)
    _, hx, nq, nk = leaf.spec.shape
    bit = leaf.ref[((bi * hx + hi) * nq + self.q_block) * nk + self.k_block]
    return jnp.full(self.shape, bit, jnp.int32) != 0

  def kv_index(self):
    axis = 0 if self.transposed else 1
    return self.k_start + lax.broadcasted_iota(jnp.int32, self.shape, axis)


def _apply_rule(s, rule, ctx: _TileContext):
  """(masked scores, allowed as 0/1 float32 of the scores' shape)."""
  allowed = jnp.broadcast_to(rule.evaluate(ctx), s.shape)
  return jnp.where(allowed, s, MASK_VALUE), jnp.where(allowed, 1.0, 0.0)


def _zero_unread(x, read):
  """Zeroes rows of a [rows, d] tile whose ``read`` ([rows, 1] float, > 0 when some entry
  of the tile reads the row) is 0: a masked NaN / inf would otherwise reach p @ v."""
  return jnp.where(read > 0.0, x, jnp.zeros((), x.dtype))


def _as_column(x):
  """(w,) lane vector -> (w, 1) column (the relayout `_column` does for rule leaves)."""
  return jnp.expand_dims(x, -1)


def _to_heads(x):
  """[b, L, h, d] -> [b, h, L, d]."""
  return jnp.swapaxes(x, 1, 2)


def _params(semantics):
  return pltpu.CompilerParams(dimension_semantics=semantics)


# ---- forward ------------------------------------------------------------------------


def _fwd_kernel(*refs, walk: _Walk, ops: _RuleLayout, scale: float, rq: int, tq: int,
                tk: int, d: int):
  tables, smem = refs[:4], refs[4:4 + ops.n_smem]
  q_ref, k_ref, v_ref, *rest = refs[4 + ops.n_smem:]
  leaf_refs, rest = rest[:ops.n_vmem], rest[ops.n_vmem:]
  o_ref, lse_ref, m_scr, l_scr, acc_scr = rest
  b, h, i, j = (pl.program_id(a) for a in range(4))
  row = _div(i, rq)

  @pl.when(j == 0)
  def _init():
    m_scr[...] = jnp.full_like(m_scr, M_INIT)
    l_scr[...] = jnp.zeros_like(l_scr)
    acc_scr[...] = jnp.zeros_like(acc_scr)

  tile, run_p, run_f = walk.lookup(tables, b, h, row, j)

  def step(masked: bool):
    q, k, v = q_ref[...], k_ref[...], v_ref[...]
    s = lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32) * scale
    if masked:
      ctx = _TileContext((tq, tk), False, b, h, row, _div(tile, walk.r), tile * tk)
      s, ok = _apply_rule(s, ops.bind(smem, leaf_refs), ctx)
      v = _zero_unread(v, _as_column(ok.max(axis=0)))
    m_prev, l_prev = m_scr[...], l_scr[...]
    m_next = jnp.maximum(m_prev, s.max(axis=-1)[:, None])  # (tq, 128)
    p = jnp.exp(s - _lanes(m_next, tk))
    alpha = jnp.exp(m_prev - m_next)
    l_scr[...] = alpha * l_prev + lax.broadcast_in_dim(p.sum(axis=-1), l_prev.shape, (0,))
    m_scr[...] = m_next
    pv = lax.dot_general(p.astype(v.dtype), v, _NN, preferred_element_type=jnp.float32)
    acc_scr[...] = _lanes(alpha, d) * acc_scr[...] + pv

  if ops.masked:
    pl.when(run_p)(lambda: step(True))
    pl.when(run_f)(lambda: step(False))
  else:
    pl.when(run_p | run_f)(lambda: step(False))

  @pl.when(j == walk.steps - 1)
  def _write():
    l, m = l_scr[...], m_scr[...]
    empty = l == 0.0
    safe_l = jnp.where(empty, 1.0, l)
    o_ref[...] = (acc_scr[...] * _lanes(1.0 / safe_l, d)).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty, -jnp.inf, m + jnp.log(safe_l))


def forward(q, k, v, mask: BlockMask, scale: float, tiles: Tiles, interpret: Any = False):
  """Backend contract: (out [b, t, n, d] in q.dtype, lse [b, n, t] float32).

  Args:
    q: [b, t, n, d]; k, v: [b, s, k, d]; t, s multiples of the mask blocks.
    mask: BlockMask after `for_kernel()`.
    scale: logit scale.
    tiles: resolved Tiles (block_q, block_k used here).
    interpret: False on TPU; True or pltpu.InterpretParams() to interpret.
  """
  b, t, n, d = q.shape
  s, kh = k.shape[1], k.shape[2]
  g = n // kh
  tq, tk = tiles.block_q, tiles.block_k
  _check_tile('block_q', tq, mask.block_q, t)
  _check_tile('block_k', tk, mask.block_k, s)
  rq = mask.block_q // tq
  tables, walk = _walk(mask, False, mask.block_k // tk)
  ops = _RuleLayout(mask.rule, tq, tk, transposed=False)
  smem, vmem = ops.operands(mask.rule)

  def locate(b_, h, i, j, *pre):
    return b_, h, i, walk.lookup(pre[:4], b_, h, _div(i, rq), j)[0]

  q_spec = pl.BlockSpec((None, None, tq, d), lambda b_, h, i, j, *_: (b_, h, i, 0))
  kv_spec = pl.BlockSpec((None, None, tk, d),
                         lambda *a: (a[0], _div(a[1], g), locate(*a)[3], 0))
  stat_spec = pl.BlockSpec((None, None, tq, LANES), lambda b_, h, i, j, *_: (b_, h, i, 0))
  kernel = functools.partial(_fwd_kernel, walk=walk, ops=ops, scale=scale, rq=rq, tq=tq,
                             tk=tk, d=d)
  out, lse = pl.pallas_call(
      kernel,
      out_shape=(jax.ShapeDtypeStruct((b, n, t, d), q.dtype),
                 jax.ShapeDtypeStruct((b, n, t, LANES), jnp.float32)),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=4 + ops.n_smem,
          grid=(b, n, t // tq, walk.steps),
          in_specs=[q_spec, kv_spec, kv_spec] + ops.block_specs(locate),
          out_specs=[q_spec, stat_spec],
          scratch_shapes=[pltpu.VMEM((tq, LANES), jnp.float32),
                          pltpu.VMEM((tq, LANES), jnp.float32),
                          pltpu.VMEM((tq, d), jnp.float32)]),
      compiler_params=_params((_PARALLEL, _PARALLEL, _PARALLEL, _ARBITRARY)),
      interpret=interpret,
      name='block_sparse_fwd',
  )(*tables, *smem, _to_heads(q), _to_heads(k), _to_heads(v), *vmem)
  return _to_heads(out), lse[..., 0]


# ---- backward: dq ---------------------------------------------------------------------


def _dq_kernel(*refs, walk: _Walk, ops: _RuleLayout, scale: float, rq: int, tq: int,
               tk: int):
  tables, smem = refs[:4], refs[4:4 + ops.n_smem]
  q_ref, do_ref, lse_ref, di_ref, k_ref, v_ref, *rest = refs[4 + ops.n_smem:]
  leaf_refs, rest = rest[:ops.n_vmem], rest[ops.n_vmem:]
  dq_ref, dq_scr = rest
  b, h, i, j = (pl.program_id(a) for a in range(4))
  row = _div(i, rq)

  @pl.when(j == 0)
  def _init():
    dq_scr[...] = jnp.zeros_like(dq_scr)

  tile, run_p, run_f = walk.lookup(tables, b, h, row, j)

  def step(masked: bool):
    q, do, k, v = q_ref[...], do_ref[...], k_ref[...], v_ref[...]
    s = lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32) * scale
    if masked:
      ctx = _TileContext((tq, tk), False, b, h, row, _div(tile, walk.r), tile * tk)
      s, ok = _apply_rule(s, ops.bind(smem, leaf_refs), ctx)
      key_read = _as_column(ok.max(axis=0))
      k, v = _zero_unread(k, key_read), _zero_unread(v, key_read)
    p = jnp.exp(s - _column(lse_ref))
    dp = lax.dot_general(do, v, _NT, preferred_element_type=jnp.float32)
    ds = (p * (dp - _column(di_ref)) * scale).astype(k.dtype)
    dq_scr[...] += lax.dot_general(ds, k, _NN, preferred_element_type=jnp.float32)

  if ops.masked:
    pl.when(run_p)(lambda: step(True))
    pl.when(run_f)(lambda: step(False))
  else:
    pl.when(run_p | run_f)(lambda: step(False))

  @pl.when(j == walk.steps - 1)
  def _write():
    dq_ref[...] = dq_scr[...].astype(dq_ref.dtype)


# ---- backward: dk, dv -------------------------------------------------------------------


def _dkv_kernel(*refs, walk: _Walk, ops: _RuleLayout, scale: float, rk: int, tq: int,
                tk: int, g: int):
  tables, smem = refs[:4], refs[4:4 + ops.n_smem]
  q_ref, do_ref, lse_ref, di_ref, k_ref, v_ref, *rest = refs[4 + ops.n_smem:]
  leaf_refs, rest = rest[:ops.n_vmem], rest[ops.n_vmem:]
  dk_ref, dv_ref, dk_scr, dv_scr = rest
  b, kh, j, gi, st = (pl.program_id(a) for a in range(5))
  h = kh * g + gi
  col = _div(j, rk)

  @pl.when((gi == 0) & (st == 0))
  def _init():
    dk_scr[...] = jnp.zeros_like(dk_scr)
    dv_scr[...] = jnp.zeros_like(dv_scr)

  tile, run_p, run_f = walk.lookup(tables, b, h, col, st)

  def step(masked: bool):
    q, do, k, v = q_ref[...], do_ref[...], k_ref[...], v_ref[...]
    s_t = lax.dot_general(k, q, _NT, preferred_element_type=jnp.float32) * scale  # [tk, tq]
    if masked:
      ctx = _TileContext((tk, tq), True, b, h, _div(tile, walk.r), col, j * tk)
      s_t, ok_t = _apply_rule(s_t, ops.bind(smem, leaf_refs), ctx)
      v = _zero_unread(v, ok_t.max(axis=1, keepdims=True))
      q = _zero_unread(q, _as_column(ok_t.max(axis=0)))
    p_t = jnp.exp(s_t - lse_ref[0:1, :])
    dv_scr[...] += lax.dot_general(p_t.astype(do.dtype), do, _NN,
                                   preferred_element_type=jnp.float32)
    dp_t = lax.dot_general(v, do, _NT, preferred_element_type=jnp.float32)
    ds_t = (p_t * (dp_t - di_ref[0:1, :]) * scale).astype(q.dtype)
    dk_scr[...] += lax.dot_general(ds_t, q, _NN, preferred_element_type=jnp.float32)

  if ops.masked:
    pl.when(run_p)(lambda: step(True))
    pl.when(run_f)(lambda: step(False))
  else:
    pl.when(run_p | run_f)(lambda: step(False))

  @pl.when((gi == g - 1) & (st == walk.steps - 1))
  def _write():
    dk_ref[...] = dk_scr[...].astype(dk_ref.dtype)
    dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


def backward(q, k, v, out, lse, dout, mask: BlockMask, scale: float, tiles: Tiles,
             interpret: Any = False, dlse=None):
  """Backend contract: (dq, dk, dv) in the dtypes of q, k, v; dk/dv summed per GQA group.

  Two kernels: dq over the kv tables, dk/dv over the transposed q tables.
  """
  b, t, n, d = q.shape
  s, kh = k.shape[1], k.shape[2]
  g = n // kh
  tq, tk = tiles.block_q_bwd, tiles.block_k_bwd
  _check_tile('block_q_bwd', tq, mask.block_q, t)
  _check_tile('block_k_bwd', tk, mask.block_k, s)
  rq, rk = mask.block_q // tq, mask.block_k // tk
  di = jnp.einsum('btnd,btnd->bnt', out.astype(jnp.float32), dout.astype(jnp.float32))
  if dlse is not None:  # d lse / d s = p: folds into delta
    di = di - dlse.astype(jnp.float32)
  lse_rows, di_rows = _rows(lse, tq), _rows(di, tq)
  qh, doh, kh_, vh = _to_heads(q), _to_heads(dout), _to_heads(k), _to_heads(v)
  row_block = (None, None, None, SUBLANES, tq)
  x_q = (None, None, tq, d)
  x_k = (None, None, tk, d)

  # dq: grid (b, n, t/tq, slots) over the kv tables.
  tables, walk = _walk(mask, False, rk)
  ops = _RuleLayout(mask.rule, tq, tk, transposed=False)
  smem, vmem = ops.operands(mask.rule)

  def locate_dq(b_, h, i, j, *pre):
    return b_, h, i, walk.lookup(pre[:4], b_, h, _div(i, rq), j)[0]

  q_map = lambda b_, h, i, j, *_: (b_, h, i, 0)
  k_map = lambda *a: (a[0], _div(a[1], g), locate_dq(*a)[3], 0)
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, walk=walk, ops=ops, scale=scale, rq=rq, tq=tq, tk=tk),
      out_shape=jax.ShapeDtypeStruct((b, n, t, d), q.dtype),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=4 + ops.n_smem,
          grid=(b, n, t // tq, walk.steps),
          in_specs=[pl.BlockSpec(x_q, q_map), pl.BlockSpec(x_q, q_map),
                    pl.BlockSpec(row_block, lambda b_, h, i, j, *_: (b_, h, i, 0, 0)),
                    pl.BlockSpec(row_block, lambda b_, h, i, j, *_: (b_, h, i, 0, 0)),
                    pl.BlockSpec(x_k, k_map), pl.BlockSpec(x_k, k_map)]
          + ops.block_specs(locate_dq),
          out_specs=pl.BlockSpec(x_q, q_map),
          scratch_shapes=[pltpu.VMEM((tq, d), jnp.float32)]),
      compiler_params=_params((_PARALLEL, _PARALLEL, _PARALLEL, _ARBITRARY)),
      interpret=interpret,
      name='block_sparse_dq',
  )(*tables, *smem, qh, doh, lse_rows, di_rows, kh_, vh, *vmem)

  # dk, dv: grid (b, k, s/tk, g, slots) over the transposed q tables.
  tables_t, walk_t = _walk(mask, True, rq)
  ops_t = _RuleLayout(mask.rule, tq, tk, transposed=True)
  smem_t, vmem_t = ops_t.operands(mask.rule)

  def locate_dkv(b_, kv, j, gi, st, *pre):
    h = kv * g + gi
    return b_, h, walk_t.lookup(pre[:4], b_, h, _div(j, rk), st)[0], j

  def q_side(*a):
    b_, h, qi, _ = locate_dkv(*a)
    return b_, h, qi, 0

  def row_side(*a):
    return q_side(*a) + (0,)

  k_side = lambda b_, kv, j, gi, st, *_: (b_, kv, j, 0)
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, walk=walk_t, ops=ops_t, scale=scale, rk=rk, tq=tq, tk=tk,
                        g=g),
      out_shape=(jax.ShapeDtypeStruct((b, kh, s, d), k.dtype),
                 jax.ShapeDtypeStruct((b, kh, s, d), v.dtype)),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=4 + ops_t.n_smem,
          grid=(b, kh, s // tk, g, walk_t.steps),
          in_specs=[pl.BlockSpec(x_q, q_side), pl.BlockSpec(x_q, q_side),
                    pl.BlockSpec(row_block, row_side), pl.BlockSpec(row_block, row_side),
                    pl.BlockSpec(x_k, k_side), pl.BlockSpec(x_k, k_side)]
          + ops_t.block_specs(locate_dkv),
          out_specs=[pl.BlockSpec(x_k, k_side), pl.BlockSpec(x_k, k_side)],
          scratch_shapes=[pltpu.VMEM((tk, d), jnp.float32), pltpu.VMEM((tk, d), jnp.float32)]),
      compiler_params=_params((_PARALLEL, _PARALLEL, _PARALLEL, _ARBITRARY, _ARBITRARY)),
      interpret=interpret,
      name='block_sparse_dkv',
  )(*tables_t, *smem_t, qh, doh, lse_rows, di_rows, kh_, vh, *vmem_t)
  return _to_heads(dq), _to_heads(dk), _to_heads(dv)

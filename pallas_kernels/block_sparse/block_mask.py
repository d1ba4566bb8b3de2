"""BlockMask: which tiles of Q K^T are computed, plus the rule inside them.

Specification (the contract every backend implements)
=====================================================

Shapes: Lq, Lk are the true sequence lengths; bq, bk the block sizes;
nq = ceil(Lq / bq), nk = ceil(Lk / bk). Bm is 1 or the batch size B and Hm is
1 (pattern shared by all heads) or the number of QUERY heads Hq. Block (i, j)
covers queries [i*bq, (i+1)*bq) and keys [j*bk, (j+1)*bk), clipped to Lq, Lk.

Leaves (pytree data; may be tracers, so tables can be built inside jit):

  field               shape               dtype  meaning
  kv_num_blocks       [Bm, Hm, nq]        int32  number of PARTIAL key blocks of query block i
  kv_indices          [Bm, Hm, nq, Wp]    int32  their key-block ids
  full_kv_num_blocks  [Bm, Hm, nq]        int32  number of FULL key blocks of query block i
  full_kv_indices     [Bm, Hm, nq, Wf]    int32  their key-block ids
  q_num_blocks        [Bm, Hm, nk]        int32  transposed: PARTIAL query blocks of key block j
  q_indices           [Bm, Hm, nk, Vp]    int32
  full_q_num_blocks   [Bm, Hm, nk]        int32  transposed: FULL query blocks of key block j
  full_q_indices      [Bm, Hm, nk, Vf]    int32
  rule                ElementRule pytree (see rules.py), leaves broadcast to Bm, Hm

Static metadata (pytree aux data; changing it retraces): q_len, kv_len,
block_q, block_k, kv_capacity, full_kv_capacity.

Table invariants (every constructor establishes them; kernels rely on them):
  * Within a row, the first `num_blocks` slots hold distinct block ids in
    increasing order. Slots past `num_blocks` repeat the last valid id (0 when
    the row is empty), so a TPU pipeline that "loads" them issues no new DMA.
  * 0 <= num_blocks <= width; widths (Wp, Wf, Vp, Vf) are >= 1 and static.
  * A block is in at most one of the partial and full tables. The q tables are
    the exact transpose of the kv tables (same blocks, same classes).
  * kv_capacity >= max over (b, h) of sum_i kv_num_blocks[b, h, i] (the same
    sum over the q tables); full_kv_capacity likewise for the full tables.
    The xla backend sizes its work list (memory) by these static bounds; its
    loop runs only over the tiles the tables hold. Constructors keep the
    bounds as tight as the structure allows (causal top-k with square blocks
    and Lk a block multiple: exact).
  * A full block never contains padded keys: when Lk % bk != 0 the last key
    block is always partial (a BlockRule keeps it whole in the element rule).

Element semantics: query i may attend key j iff block (i // bq, j // bk) is
  * in the full tables, or
  * in the partial tables and rule(i, j) is True,
and j < Lk. Everything else is masked. The rule is evaluated only on partial
blocks; kernels never read per-element bits for full blocks. A query row with
no allowed key outputs zeros (and gets zero gradients).

Static vs data metadata: widths and capacities are derived only from static
arguments (shapes, block sizes, Python ints such as top_k) and from HOST
values (Python / NumPy) — for host inputs the tables are built with NumPy and
the widths are exact. Arguments given as jax arrays (including tracers) are
data: their tables use worst-case widths, so a new pattern never retraces.

Density: `density()` is the computed area (blocks in the tables, clipped to the
true lengths) over Lq * Lk, averaged over (Bm, Hm): the work a kernel does.
`allowed_fraction()` is the exact fraction of allowed pairs (O(Lq*Lk), debug).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.dispatch import check_at_least
from pallas_kernels.block_sparse import rules as rules_lib
from pallas_kernels.block_sparse.rules import (AllowAll, AndRule, BlockRule, DenseRule,
                                              ElementRule, KvLengthRule, OrRule,
                                              PositionRule, UNBOUNDED)

Array = Any

_TABLE_FIELDS = ('kv_num_blocks', 'kv_indices', 'full_kv_num_blocks', 'full_kv_indices',
                 'q_num_blocks', 'q_indices', 'full_q_num_blocks', 'full_q_indices')


@dataclasses.dataclass(frozen=True)
class BlockMask:
  """Block tables + element rule. See the module docstring for the spec."""

  kv_num_blocks: Array
  kv_indices: Array
  full_kv_num_blocks: Array
  full_kv_indices: Array
  q_num_blocks: Array
  q_indices: Array
  full_q_num_blocks: Array
  full_q_indices: Array
  rule: ElementRule
  q_len: int
  kv_len: int
  block_q: int
  block_k: int
  kv_capacity: int
  full_kv_capacity: int

  # ---- shapes ---------------------------------------------------------------

  @property
  def num_q_blocks(self) -> int:
    return -(-self.q_len // self.block_q)

  @property
  def num_kv_blocks(self) -> int:
    return -(-self.kv_len // self.block_k)

  @property
  def batch_size(self) -> int:
    return self.kv_num_blocks.shape[0]

  @property
  def num_heads(self) -> int:
    return self.kv_num_blocks.shape[1]

  @property
  def shape(self) -> tuple[int, int, int, int]:
    """(Bm, Hm, Lq, Lk), the shape of the equivalent dense mask."""
    return (self.batch_size, self.num_heads, self.q_len, self.kv_len)

  def __repr__(self):
    return (f'BlockMask(shape={self.shape}, block=({self.block_q}, {self.block_k}), '
            f'widths=(kv {self.kv_indices.shape[-1]}, full_kv {self.full_kv_indices.shape[-1]}),'
            f' capacity=({self.kv_capacity}, {self.full_kv_capacity}), '
            f'rule={type(self.rule).__name__})')

  # ---- views ----------------------------------------------------------------

  def block_bits(self) -> tuple[Array, Array]:
    """(partial, full) bool [Bm, Hm, nq, nk] tile classes."""
    nk = self.num_kv_blocks
    return (_table_to_bits(self.kv_num_blocks, self.kv_indices, nk),
            _table_to_bits(self.full_kv_num_blocks, self.full_kv_indices, nk))

  def to_dense(self) -> Array:
    """bool [Bm, Hm, Lq, Lk] of allowed pairs. O(Lq*Lk): tests and debugging only."""
    partial, full = self.block_bits()
    ctx = rules_lib.DenseContext(self.q_len, self.kv_len, self.block_q, self.block_k)
    up_p, up_f = ctx.block(partial), ctx.block(full)
    allowed = up_f | (up_p & self.rule.evaluate(ctx))
    return jnp.broadcast_to(allowed, self.shape)

  def density(self) -> Array:
    """Computed area / (Lq*Lk): the fraction of (query, key) pairs a kernel computes."""
    partial, full = self.block_bits()
    rows = np.minimum(self.block_q, self.q_len - self.block_q * np.arange(self.num_q_blocks))
    cols = np.minimum(self.block_k, self.kv_len - self.block_k * np.arange(self.num_kv_blocks))
    area = jnp.asarray(np.outer(rows, cols), jnp.float32)
    computed = jnp.sum((partial | full) * area, axis=(-2, -1))
    return jnp.mean(computed) / (self.q_len * self.kv_len)

  def allowed_fraction(self) -> Array:
    """Exact fraction of allowed pairs (builds the dense mask: O(Lq*Lk))."""
    return jnp.mean(self.to_dense().astype(jnp.float32))

  def for_kernel(self) -> 'BlockMask':
    """View for kernels: lengths padded to block multiples, padding keys masked.

    The tables do not change; rule leaves are padded and a KvLengthRule is
    AND-ed in when Lk % block_k != 0.
    """
    nq, nk = self.num_q_blocks, self.num_kv_blocks
    q_pad, kv_pad = nq * self.block_q - self.q_len, nk * self.block_k - self.kv_len
    if not (q_pad or kv_pad):
      return self
    rule = self.rule.pad(q_pad, kv_pad, nq, nk)
    if kv_pad:
      rule = AndRule((rule, KvLengthRule(self.kv_len))).simplify()
    return dataclasses.replace(self, rule=rule, q_len=nq * self.block_q,
                               kv_len=nk * self.block_k)

  def validate(self, batch: int, q_heads: int, q_len: int, kv_len: int,
               name: str = 'mask') -> None:
    """Raises ValueError (naming `name`) if the mask cannot serve these shapes."""
    if (self.q_len, self.kv_len) != (q_len, kv_len):
      raise ValueError(
          f'{name} was built for (Lq, Lk) = ({self.q_len}, {self.kv_len}) but the '
          f'inputs have ({q_len}, {kv_len}); build the mask for the input lengths.')
    if self.batch_size not in (1, batch):
      raise ValueError(f'{name} has batch size {self.batch_size}; expected 1 or {batch}.')
    if self.num_heads not in (1, q_heads):
      raise ValueError(f'{name} has {self.num_heads} heads; expected 1 or the number of '
                       f'query heads ({q_heads}).')
    for f in _TABLE_FIELDS:
      x = getattr(self, f)
      if x.dtype != jnp.int32:
        raise ValueError(f'{name}.{f} must be int32, got {x.dtype}.')

  # ---- combination ----------------------------------------------------------

  def __or__(self, other: 'BlockMask') -> 'BlockMask':
    return union(self, other)

  def __and__(self, other: 'BlockMask') -> 'BlockMask':
    return intersection(self, other)

  # ---- constructors (also available as module functions) ---------------------

  @classmethod
  def from_dense(cls, dense, block_q: int = 128, block_k: int = 128) -> 'BlockMask':
    return from_dense(dense, block_q=block_q, block_k=block_k)

  @classmethod
  def from_tables(cls, *args, **kwargs) -> 'BlockMask':
    return from_tables(*args, **kwargs)

  causal = staticmethod(lambda *a, **k: causal(*a, **k))
  sliding_window = staticmethod(lambda *a, **k: sliding_window(*a, **k))
  from_positions = staticmethod(lambda *a, **k: from_positions(*a, **k))
  from_block_scores = staticmethod(lambda *a, **k: from_block_scores(*a, **k))
  full = staticmethod(lambda *a, **k: full(*a, **k))


jax.tree_util.register_dataclass(
    BlockMask, data_fields=list(_TABLE_FIELDS) + ['rule'],
    meta_fields=['q_len', 'kv_len', 'block_q', 'block_k', 'kv_capacity', 'full_kv_capacity'])


# ---- table helpers -------------------------------------------------------------


def _table_to_bits(count, idx, n_cols):
  """Tables [..., R], [..., R, W] -> bool [..., R, n_cols]."""
  valid = jnp.arange(idx.shape[-1]) < count[..., None]
  onehot = (idx[..., None] == jnp.arange(n_cols)) & valid[..., None]
  return jnp.any(onehot, axis=-2)


def _bits_to_table(bits, width: int, xp):
  """bool [..., R, C] -> (count [..., R], ids [..., R, width]) per the invariants."""
  key = (~bits).astype(np.int8)
  order = (np.argsort(key, axis=-1, kind='stable') if xp is np
           else jnp.argsort(key, axis=-1, stable=True))
  if order.shape[-1] < width:  # width may exceed C only when C is tiny
    order = xp.concatenate([order, xp.zeros(order.shape[:-1] + (width - order.shape[-1],),
                                            order.dtype)], axis=-1)
  ids = order[..., :width].astype(np.int32)
  count = xp.minimum(bits.sum(axis=-1), width).astype(np.int32)
  last = xp.take_along_axis(ids, xp.maximum(count - 1, 0)[..., None], axis=-1)
  slots = xp.arange(width)
  ids = xp.where(slots < count[..., None], ids, last)
  return count, ids


def from_block_bits(partial, full_bits, *, q_len: int, kv_len: int, block_q: int,
                    block_k: int, rule: ElementRule | None = None,
                    kv_width: int | None = None, full_kv_width: int | None = None,
                    q_width: int | None = None, full_q_width: int | None = None,
                    kv_capacity: int | None = None,
                    full_kv_capacity: int | None = None) -> BlockMask:
  """Builds a BlockMask from tile classes (the path every constructor takes).

  Args:
    partial: bool [Bm|1, Hm|1, nq, nk], tiles computed with the element rule.
    full_bits: bool [Bm|1, Hm|1, nq, nk], tiles computed without it (wins over
      `partial` where both are set).
    q_len, kv_len, block_q, block_k: lengths and block sizes.
    rule: element rule; default AllowAll.
    kv_width, full_kv_width, q_width, full_q_width: static table widths (upper
      bounds on the per-row counts). Default: exact for host bits, else nk/nq.
    kv_capacity, full_kv_capacity: static bounds on the total number of
      partial / full tiles per (batch, head). Default: exact for host bits,
      else rows x width.

  Returns:
    A BlockMask satisfying the module invariants.
  """
  rule = AllowAll() if rule is None else rule.simplify()
  nq, nk = -(-q_len // block_q), -(-kv_len // block_k)
  for name, b in (('partial', partial), ('full', full_bits)):
    if b.shape[-2:] != (nq, nk) or b.ndim != 4:
      raise ValueError(f'{name} block bits must be [B|1, H|1, {nq}, {nk}], got {b.shape}.')
  host = rules_lib.is_host(partial, full_bits)
  xp = np if host else jnp
  sizes = [partial.shape[:2], full_bits.shape[:2]] + rules_lib.leaf_batch_heads(rule)
  bm, hm = max(s[0] for s in sizes), max(s[1] for s in sizes)
  for b, h in sizes:
    if b not in (1, bm) or h not in (1, hm):
      raise ValueError(f'mask parts have incompatible (batch, heads): {sizes}.')
  full_bits = xp.broadcast_to(xp.asarray(full_bits, bool), (bm, hm, nq, nk))
  partial = xp.broadcast_to(xp.asarray(partial, bool), (bm, hm, nq, nk)) & ~full_bits

  if kv_len % block_k:  # invariant: no full tile holds padded keys
    demoted = xp.zeros_like(full_bits)
    if xp is np:
      demoted = demoted.copy()
      demoted[..., -1] = full_bits[..., -1]
    else:
      demoted = demoted.at[..., -1].set(full_bits[..., -1])
    if not host or demoted.any():
      rule = OrRule((rule, BlockRule(jnp.asarray(demoted)))).simplify()
      partial = partial | demoted
      full_bits = full_bits & ~demoted
      # Demotion moves at most one tile per row into the partial tables.
      kv_width = None if kv_width is None else kv_width + 1
      q_width = None
      kv_capacity = None if kv_capacity is None else kv_capacity + nq

  def width(bits, axis, hint, n):
    if host:
      return max(1, int(bits.sum(axis=axis).max(initial=0)))
    return max(1, min(n, hint if hint is not None else n))

  def capacity(bits, width_, hint):
    if host:
      return max(1, int(bits.sum(axis=(-2, -1)).max(initial=0)))
    return max(1, min(nq * width_, hint if hint is not None else nq * width_))

  wp, wf = width(partial, -1, kv_width, nk), width(full_bits, -1, full_kv_width, nk)
  vp, vf = width(partial, -2, q_width, nq), width(full_bits, -2, full_q_width, nq)
  tables = {}
  for prefix, bits, w, v in (('', partial, wp, vp), ('full_', full_bits, wf, vf)):
    tables[prefix + 'kv_num_blocks'], tables[prefix + 'kv_indices'] = _bits_to_table(
        bits, w, xp)
    tables[prefix + 'q_num_blocks'], tables[prefix + 'q_indices'] = _bits_to_table(
        xp.swapaxes(bits, -1, -2), v, xp)
  tables = {k: jnp.asarray(v, jnp.int32) for k, v in tables.items()}
  return BlockMask(**tables, rule=rule, q_len=q_len, kv_len=kv_len, block_q=block_q,
                   block_k=block_k, kv_capacity=capacity(partial, wp, kv_capacity),
                   full_kv_capacity=capacity(full_bits, wf, full_kv_capacity))


# ---- constructors --------------------------------------------------------------


def _check_blocks(block_q, block_k):
  for name, b in (('block_q', block_q), ('block_k', block_k)):
    if not isinstance(b, (int, np.integer)) or b <= 0:
      raise ValueError(f'{name} must be a positive int, got {b!r}.')


def from_dense(dense, *, block_q: int = 128, block_k: int = 128) -> BlockMask:
  """Mask from explicit bits; exact element semantics (partial blocks keep their bits).

  Args:
    dense: bool [B|1, H|1, Lq, Lk]. The only constructor that stores O(Lq*Lk).
    block_q, block_k: block sizes; lengths need not be multiples.
  """
  _check_blocks(block_q, block_k)
  if getattr(dense, 'ndim', None) != 4:
    raise ValueError(f'dense must be bool [B|1, H|1, Lq, Lk], got shape '
                     f'{getattr(dense, "shape", None)}.')
  host = rules_lib.is_host(dense)
  xp = np if host else jnp
  dense = xp.asarray(dense).astype(bool)
  bm, hm, lq, lk = dense.shape
  nq, nk = -(-lq // block_q), -(-lk // block_k)
  padded = xp.pad(dense, ((0, 0), (0, 0), (0, nq * block_q - lq), (0, nk * block_k - lk)))
  tiles = padded.reshape(bm, hm, nq, block_q, nk, block_k)
  any_, all_ = tiles.any(axis=(3, 5)), tiles.all(axis=(3, 5))
  return from_block_bits(any_ & ~all_, all_, q_len=lq, kv_len=lk, block_q=block_q,
                         block_k=block_k, rule=DenseRule(jnp.asarray(dense)))


def from_tables(kv_num_blocks, kv_indices, full_kv_num_blocks=None, full_kv_indices=None,
                *, q_len: int, kv_len: int, block_q: int = 128, block_k: int = 128,
                rule: ElementRule | None = None) -> BlockMask:
  """Mask from kv-side tables (FlexAttention's from_kv_blocks); builds the rest.

  Args:
    kv_num_blocks: int [B|1, H|1, nq]; kv_indices: int [B|1, H|1, nq, W]
      (order and padding slots are free: they are normalised here).
    full_kv_num_blocks, full_kv_indices: optional tables of full tiles.
    rule: element rule for the partial tiles (default: all pairs allowed).
  """
  _check_blocks(block_q, block_k)
  nk = -(-kv_len // block_k)
  kv_num_blocks, kv_indices = jnp.asarray(kv_num_blocks), jnp.asarray(kv_indices)
  partial = _table_to_bits(kv_num_blocks, kv_indices, nk)
  widths = dict(kv_width=kv_indices.shape[-1])
  if full_kv_num_blocks is None:
    full_bits = jnp.zeros_like(partial)
  else:
    full_kv_indices = jnp.asarray(full_kv_indices)
    full_bits = _table_to_bits(jnp.asarray(full_kv_num_blocks), full_kv_indices, nk)
    widths['full_kv_width'] = full_kv_indices.shape[-1]
  return from_block_bits(partial, full_bits, q_len=q_len, kv_len=kv_len, block_q=block_q,
                         block_k=block_k, rule=rule, **widths)


def _as_bhl(x, name):
  """[L] or [B|1, H|1, L] -> [B|1, H|1, L] (same array module)."""
  if x.ndim == 1:
    return x[None, None, :]
  if x.ndim != 3:
    raise ValueError(f'{name} must be [L] or [B|1, H|1, L], got shape {x.shape}.')
  return x


def _as_heads(x, default, name, xp):
  if x is None:
    x = default
  x = xp.asarray(x, dtype=np.int32)
  if x.ndim == 0:
    x = x[None]
  if x.ndim != 1:
    raise ValueError(f'{name} must be an int or a per-head [H] vector, got shape {x.shape}.')
  return x


def _block_minmax(x, block, xp):
  """[B, H, L] -> ([B, H, n], [B, H, n]) min / max per block (edge padding)."""
  n = -(-x.shape[-1] // block)
  pad = n * block - x.shape[-1]
  if pad:
    x = xp.pad(x, ((0, 0), (0, 0), (0, pad)), mode='edge')
  x = x.reshape(x.shape[:2] + (n, block))
  return x.min(axis=-1), x.max(axis=-1)


def from_positions(q_positions, kv_positions=None, *, block_q: int = 128,
                   block_k: int = 128, causal: bool = True, window=None, sinks=None,
                   q_segment_ids=None, kv_segment_ids=None) -> BlockMask:
  """Mask from token positions, e.g. a sequence permuted or clustered per head.

  Query i (original position q = q_positions[..., i]) may attend key j
  (k = kv_positions[..., j]) iff
    causal:      k <= q                 (non-causal: no upper limit, or the window)
    window w:    q - k < w              (non-causal: |q - k| < w); None = unbounded
    sinks s:     k < s is allowed regardless of the window (not of causality)
    segments:    q_segment_ids[i] == kv_segment_ids[j]
  Tiles are classified from per-block min / max positions (never Lq x Lk), and
  the exact rule is evaluated in-kernel on partial tiles.

  Args:
    q_positions: int [Lq] or [B|1, H|1, Lq] original positions (< 2**30).
    kv_positions: int [Lk] or [B|1, H|1, Lk]; default q_positions.
    block_q, block_k: block sizes.
    causal: causal by original position.
    window: None (unbounded), int >= 1, or per-head int [H]: keys within
      `window` positions (including the query's own position).
    sinks: None, int, or per-head int [H]: the first `sinks` positions are
      always visible.
    q_segment_ids, kv_segment_ids: optional int [L] or [B|1, H|1, L]; pairs in
      different segments are masked.
  """
  _check_blocks(block_q, block_k)
  check_at_least(window, 1, 'window', 'window=None is unbounded (there is no -1 convention)')
  check_at_least(sinks, 0, 'sinks')
  kv_positions = q_positions if kv_positions is None else kv_positions
  if (q_segment_ids is None) != (kv_segment_ids is None) and kv_segment_ids is not None:
    raise ValueError('give q_segment_ids together with kv_segment_ids.')
  if q_segment_ids is not None and kv_segment_ids is None:
    kv_segment_ids = q_segment_ids
  host = rules_lib.is_host(q_positions, kv_positions, window, sinks, q_segment_ids,
                           kv_segment_ids)
  xp = np if host else jnp
  qp = _as_bhl(xp.asarray(q_positions, np.int32), 'q_positions')
  kp = _as_bhl(xp.asarray(kv_positions, np.int32), 'kv_positions')
  left = _as_heads(None if window is None else xp.asarray(window) - 1, UNBOUNDED, 'window', xp)
  if window is not None and not causal:
    right = left
  else:
    right = _as_heads(0 if causal else UNBOUNDED, 0, 'right', xp)
  sink = _as_heads(sinks, 0, 'sinks', xp)
  if left.shape[0] != sink.shape[0] and 1 not in (left.shape[0], sink.shape[0]):
    raise ValueError(f'window and sinks have different head counts: {left.shape}, {sink.shape}.')

  qmin, qmax = _block_minmax(qp, block_q, xp)
  kmin, kmax = _block_minmax(kp, block_k, xp)
  qmin, qmax = qmin[..., :, None], qmax[..., :, None]
  kmin, kmax = kmin[..., None, :], kmax[..., None, :]
  hl, hr, hs = (a[None, :, None, None] for a in (left, right, sink))
  any_ = (kmin <= qmax + hr) & ((kmax >= qmin - hl) | (kmin < hs))
  all_ = (kmax <= qmin + hr) & ((kmin >= qmax - hl) | (kmax < hs))
  segs = {}
  if q_segment_ids is not None:
    qs = _as_bhl(xp.asarray(q_segment_ids, np.int32), 'q_segment_ids')
    ks = _as_bhl(xp.asarray(kv_segment_ids, np.int32), 'kv_segment_ids')
    qsmin, qsmax = _block_minmax(qs, block_q, xp)
    ksmin, ksmax = _block_minmax(ks, block_k, xp)
    qsmin, qsmax = qsmin[..., :, None], qsmax[..., :, None]
    ksmin, ksmax = ksmin[..., None, :], ksmax[..., None, :]
    any_ = any_ & (qsmin <= ksmax) & (ksmin <= qsmax)
    all_ = all_ & (qsmin == qsmax) & (ksmin == ksmax) & (qsmin == ksmin)
    segs = dict(q_segment_ids=jnp.asarray(qs), kv_segment_ids=jnp.asarray(ks))
  rule = PositionRule(jnp.asarray(qp), jnp.asarray(kp), jnp.asarray(left),
                      jnp.asarray(right), jnp.asarray(sink), **segs)
  return from_block_bits(any_ & ~all_, all_, q_len=qp.shape[-1], kv_len=kp.shape[-1],
                         block_q=block_q, block_k=block_k, rule=rule)


def causal(q_len: int, kv_len: int | None = None, *, block_q: int = 128,
           block_k: int = 128) -> BlockMask:
  """Causal mask, top-left aligned like jax.nn.dot_product_attention: key j <= query i."""
  kv_len = q_len if kv_len is None else kv_len
  return from_positions(np.arange(q_len), np.arange(kv_len), block_q=block_q,
                        block_k=block_k, causal=True)


def sliding_window(q_len: int, kv_len: int | None = None, *, window, sinks=0,
                   block_q: int = 128, block_k: int = 128, causal: bool = True) -> BlockMask:
  """Sliding window (+ sink tokens), optionally different per head (MoA).

  Args:
    window: int >= 1 or per-head int [H]: query i sees keys i - window < j <= i
      (|i - j| < window when causal=False). There is no "-1 = unbounded"; use
      causal() or full() (or from_positions(window=None)) for that.
    sinks: int or per-head int [H]: keys j < sinks are always visible (if causal allows).
  """
  kv_len = q_len if kv_len is None else kv_len
  return from_positions(np.arange(q_len), np.arange(kv_len), block_q=block_q,
                        block_k=block_k, causal=causal, window=window, sinks=sinks)


def full(q_len: int, kv_len: int | None = None, *, block_q: int = 128,
         block_k: int = 128) -> BlockMask:
  """Every pair allowed (dense attention as a BlockMask)."""
  kv_len = q_len if kv_len is None else kv_len
  nq, nk = -(-q_len // block_q), -(-kv_len // block_k)
  return from_block_bits(np.zeros((1, 1, nq, nk), bool), np.ones((1, 1, nq, nk), bool),
                         q_len=q_len, kv_len=kv_len, block_q=block_q, block_k=block_k)


def from_block_scores(scores, *, q_len: int, kv_len: int, block_q: int = 128,
                      block_k: int = 128, top_k: int | None = None,
                      top_p: float | None = None, max_blocks: int | None = None,
                      causal: bool = False) -> BlockMask:
  """Keeps, per query block, the key blocks with the highest scores.

  Args:
    scores: float [B|1, H|1, nq, nk] per-block scores (e.g. pooled attention).
      For top_p they must be non-negative weights; they are normalised per row.
    top_k: keep the top_k blocks of each row (static: table width = top_k).
    top_p: keep the fewest blocks whose normalised mass reaches top_p.
    max_blocks: static cap on blocks per row for top_p (default nk).
    causal: only blocks with some causal pair are eligible, the block holding
      the row's last causal key is always kept (a row is never empty), and the
      causal rule applies inside diagonal blocks.
  Exactly one of top_k / top_p must be given. Ties are broken by lax.top_k /
  a stable sort (lower block id first).
  """
  _check_blocks(block_q, block_k)
  if (top_k is None) == (top_p is None):
    raise ValueError('give exactly one of top_k and top_p.')
  if top_p is not None and not 0.0 < float(top_p) <= 1.0:
    raise ValueError(f'top_p must be in (0, 1], got {top_p}.')
  nq, nk = -(-q_len // block_q), -(-kv_len // block_k)
  scores = jnp.asarray(scores, jnp.float32)
  if scores.ndim != 4 or scores.shape[-2:] != (nq, nk):
    raise ValueError(f'scores must be [B|1, H|1, {nq}, {nk}] for these lengths/blocks, '
                     f'got {scores.shape}.')
  rows = np.arange(nq)[:, None]
  cols = np.arange(nk)[None, :]
  q_last = np.minimum((rows + 1) * block_q, q_len) - 1  # last query of the block
  eligible = np.ones((nq, nk), bool)
  forced = np.zeros((nq, nk), bool)
  if causal:
    eligible = cols * block_k <= q_last
    forced = cols == np.minimum(q_last, kv_len - 1) // block_k
  if max_blocks is not None and max_blocks < 1:
    raise ValueError(f'max_blocks must be >= 1, got {max_blocks}.')
  # NaN scores never select a block; +inf ones are capped below the forced
  # block's +inf, so the forced block always wins a tie (the static capacity
  # bounds below count on it).
  scores = jnp.where(jnp.isnan(scores), -jnp.inf, scores)
  if top_k is not None:
    k = int(min(top_k, nk))
    if k <= 0:
      raise ValueError(f'top_k must be positive, got {top_k}.')
    capped = jnp.minimum(scores, jnp.finfo(jnp.float32).max)
    s = jnp.where(jnp.asarray(forced), jnp.inf, jnp.where(jnp.asarray(eligible), capped, -jnp.inf))
    vals, idx = jax.lax.top_k(s, k)
    sel = (idx[..., None] == jnp.arange(nk)) & (vals > -jnp.inf)[..., None]
    bits = jnp.any(sel, axis=-2)
    width = k
  else:
    w = jnp.where(jnp.asarray(eligible), jnp.maximum(scores, 0.0), 0.0)
    w = w / jnp.maximum(w.sum(-1, keepdims=True), 1e-30)
    order = jnp.argsort(-w, axis=-1, stable=True)
    ws = jnp.take_along_axis(w, order, axis=-1)
    keep_sorted = (jnp.cumsum(ws, axis=-1) - ws) < top_p
    keep_sorted &= ws > 0
    width = nk if max_blocks is None else int(min(max_blocks, nk))
    keep_sorted &= jnp.arange(nk) < width - (1 if causal else 0)
    bits = jnp.zeros_like(keep_sorted)
    bits = jnp.put_along_axis(bits, order, keep_sorted, axis=-1, inplace=False)
    bits = (bits & jnp.asarray(eligible)) | jnp.asarray(forced)
  if not causal:
    return from_block_bits(jnp.zeros_like(bits), bits, q_len=q_len, kv_len=kv_len,
                           block_q=block_q, block_k=block_k, kv_width=1, q_width=1,
                           full_kv_width=width, full_kv_capacity=nq * width, kv_capacity=1)
  k_last = np.minimum((cols + 1) * block_k, kv_len) - 1
  q_first = rows * block_q
  all_causal = k_last <= q_first
  # Static bounds from the causal structure alone. Row i keeps at most `width`
  # tiles and always its forced (diagonal) one, so each class gets at most
  # width minus the forced tiles of the other class, and never more than its
  # candidates. The bounds size the kernels' work lists: a loose bound is work.
  forced_full = (forced & all_causal).sum(-1)
  forced_part = (forced & ~all_causal).sum(-1)
  n_full = np.minimum(width - forced_part, (eligible & all_causal).sum(-1))
  n_part = np.minimum(width - forced_full, (eligible & ~all_causal).sum(-1))
  all_causal = jnp.asarray(all_causal)
  rule = PositionRule(jnp.arange(q_len, dtype=jnp.int32)[None, None],
                      jnp.arange(kv_len, dtype=jnp.int32)[None, None],
                      jnp.full((1,), UNBOUNDED, jnp.int32), jnp.zeros((1,), jnp.int32),
                      jnp.zeros((1,), jnp.int32))
  col_full = (eligible & all_causal_np(rows, cols, block_q, block_k, kv_len)).sum(0)
  return from_block_bits(bits & ~all_causal, bits & all_causal, q_len=q_len, kv_len=kv_len,
                         block_q=block_q, block_k=block_k, rule=rule,
                         kv_width=int(max(1, n_part.max())), full_kv_width=int(max(1, n_full.max())),
                         full_q_width=int(max(1, col_full.max())),
                         kv_capacity=int(max(1, n_part.sum())),
                         full_kv_capacity=int(max(1, n_full.sum())))


def all_causal_np(rows, cols, block_q, block_k, kv_len):
  """Host bool [nq, nk]: key block entirely at or before the query block's first row."""
  return np.minimum((cols + 1) * block_k, kv_len) - 1 <= rows * block_q


# ---- combinations --------------------------------------------------------------


def _check_compatible(masks: Sequence[BlockMask]):
  keys = {(m.q_len, m.kv_len, m.block_q, m.block_k) for m in masks}
  if len(keys) != 1:
    raise ValueError(f'masks differ in (q_len, kv_len, block_q, block_k): {sorted(keys)}.')


def _widths(m: BlockMask):
  return (m.kv_indices.shape[-1], m.full_kv_indices.shape[-1], m.q_indices.shape[-1],
          m.full_q_indices.shape[-1], m.kv_capacity, m.full_kv_capacity)


def union(*masks: BlockMask) -> BlockMask:
  """Pairs allowed by any mask (exact). Also `a | b`."""
  _check_compatible(masks)
  if len(masks) == 1:
    return masks[0]
  m0 = masks[0]
  bits = [m.block_bits() for m in masks]
  full_bits = functools_reduce(lambda a, b: a | b, [f for _, f in bits])
  partial = functools_reduce(lambda a, b: a | b, [p for p, _ in bits]) & ~full_bits
  rule = OrRule(tuple(AndRule((BlockRule(p), m.rule)) for (p, _), m in zip(bits, masks)))
  w = np.array([_widths(m) for m in masks])
  nq, nk = m0.num_q_blocks, m0.num_kv_blocks
  return from_block_bits(
      partial, full_bits, q_len=m0.q_len, kv_len=m0.kv_len, block_q=m0.block_q,
      block_k=m0.block_k, rule=rule, kv_width=min(nk, int(w[:, 0].sum())),
      full_kv_width=min(nk, int(w[:, 1].sum())), q_width=min(nq, int(w[:, 2].sum())),
      full_q_width=min(nq, int(w[:, 3].sum())), kv_capacity=int(w[:, 4].sum()),
      full_kv_capacity=int(w[:, 5].sum()))


def intersection(*masks: BlockMask) -> BlockMask:
  """Pairs allowed by every mask (exact). Also `a & b`."""
  _check_compatible(masks)
  if len(masks) == 1:
    return masks[0]
  m0 = masks[0]
  bits = [m.block_bits() for m in masks]
  full_bits = functools_reduce(lambda a, b: a & b, [f for _, f in bits])
  present = functools_reduce(lambda a, b: a & b, [p | f for p, f in bits])
  rule = AndRule(tuple(OrRule((BlockRule(f), m.rule)) for (_, f), m in zip(bits, masks)))
  w = np.array([_widths(m) for m in masks])
  return from_block_bits(
      present & ~full_bits, full_bits, q_len=m0.q_len, kv_len=m0.kv_len,
      block_q=m0.block_q, block_k=m0.block_k, rule=rule,
      kv_width=int((w[:, 0] + w[:, 1]).min()), full_kv_width=int(w[:, 1].min()),
      q_width=int((w[:, 2] + w[:, 3]).min()), full_q_width=int(w[:, 3].min()),
      kv_capacity=int((w[:, 4] + w[:, 5]).min()), full_kv_capacity=int(w[:, 5].min()))


def functools_reduce(fn, xs):
  out = xs[0]
  for x in xs[1:]:
    out = fn(out, x)
  return out

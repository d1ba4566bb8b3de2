"""Key lists: the sparsity data of the stripe kernels, and helpers to build them.

Specification
=============

Shapes: Lq, Lk the query / key lengths; bq the lists' query block size
(`block_q`, static); nQ = ceil(Lq / bq); C the list capacity (static).

  indices  int [B|1, H|1, nQ, C]  key indices of each (batch, list head, query block)
  counts   int [B|1, H|1, nQ]     entries in use; slots >= count are padding

H (the list heads) is 1 (one list shared by every head), Hkv (one list per KV
head, shared by the query heads of its GQA group) or Hq (one list per query
head). Per KV head is the cheap layout: a kernel gathers each listed key once
for the whole group. Per query head is what AnchorAttention and MInference's
vertical indices compute (their GQA models repeat K/V first); it costs one
gather per query head.

Semantics: query t (in block i = t // bq) may attend key j iff j is one of the
first counts[.., i] entries of its list, 0 <= j < Lk, and, with causal, j <= t
+ Lk - Lq (positions aligned at the end: the last query sees the last key, as
in chunked prefill; Lq == Lk is plain causal). Entries may come in any order;
duplicates and out-of-range entries count once / never. Lists can be built
inside jit from activations: a new pattern never recompiles (only C, bq and
the shapes are static).

Kernel form (`normalize`): sorted ascending, distinct, valid entries first;
padding slots repeat the last valid id (0 for an empty list), so every slot
is a legal key index to load; width padded to a multiple of the kernel's key
tile.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def num_query_blocks(q_len: int, block_q: int) -> int:
  return -(-q_len // block_q)


def normalize(indices, counts, *, kv_len: int, width: int):
  """Lists in kernel form.

  Args:
    indices: int [..., C] key indices (any order, duplicates, padding).
    counts: int [...] entries in use (clipped to [0, C]).
    kv_len: keys outside [0, kv_len) are dropped.
    width: output width (>= C).

  Returns:
    (idx int32 [..., width], count int32 [...]): idx[..., :count] sorted,
    distinct, in [0, kv_len); idx[..., count:] repeat the last valid id (0 if
    count == 0).
  """
  indices = jnp.asarray(indices).astype(jnp.int32)
  counts = jnp.asarray(counts).astype(jnp.int32)
  c = indices.shape[-1]
  if width < c:
    raise ValueError(f'width {width} is below the list capacity {c}.')
  slot = jnp.arange(c, dtype=jnp.int32)
  valid = (slot < counts[..., None]) & (indices >= 0) & (indices < kv_len)
  key = jnp.sort(jnp.where(valid, indices, kv_len), axis=-1)
  dup = jnp.concatenate([jnp.zeros_like(key[..., :1], bool), key[..., 1:] == key[..., :-1]],
                        axis=-1)
  keep = (key < kv_len) & ~dup
  key = jnp.sort(jnp.where(keep, key, kv_len), axis=-1)  # compact: kept ids first
  count = keep.sum(-1).astype(jnp.int32)
  if width > c:
    key = jnp.concatenate([key, jnp.full(key.shape[:-1] + (width - c,), kv_len, jnp.int32)],
                          axis=-1)
  last = jnp.take_along_axis(key, jnp.maximum(count - 1, 0)[..., None], axis=-1)
  last = jnp.where(count[..., None] > 0, last, 0)
  idx = jnp.where(jnp.arange(width) < count[..., None], key, last)
  return idx, count


def tile_counts(idx, count, *, q_len: int, kv_len: int, block_q: int, tile: int,
                num_tiles: int, causal: bool):
  """Entries each query tile must walk: int32 [..., num_tiles].

  Tile i (queries [i * tile, (i + 1) * tile), inside list block i * tile //
  block_q) walks the first entries of its block's normalized list; with
  causal, only those at or before its last query's position (the lists are
  sorted, so they are a prefix).
  """
  blk = np.minimum(np.arange(num_tiles) * tile // block_q, idx.shape[-2] - 1)
  n = count[..., blk]
  if not causal:
    return n
  last = np.minimum((np.arange(num_tiles) + 1) * tile, q_len) - 1 + (kv_len - q_len)
  slot = jnp.arange(idx.shape[-1])
  below = (idx[..., blk, :] <= jnp.asarray(last, jnp.int32)[:, None]) & (slot < n[..., None])
  return below.sum(-1).astype(jnp.int32)


def from_key_mask(mask, capacity: int):
  """Lists from a bool key mask [B|1, H|1, nQ, Lk] (e.g. AnchorAttention's stripe selection).

  Keeps the first `capacity` selected keys of each row (lowest indices); a row
  with more selected keys is truncated.

  Returns:
    (indices int32 [B|1, H|1, nQ, capacity], counts int32 [B|1, H|1, nQ]).
  """
  mask = jnp.asarray(mask, bool)
  if mask.ndim != 4:
    raise ValueError(f'mask must be bool [B|1, H|1, nQ, Lk], got shape {mask.shape}.')
  lk = mask.shape[-1]
  order = jnp.argsort(~mask, axis=-1, stable=True)[..., :capacity].astype(jnp.int32)
  if capacity > lk:
    order = jnp.pad(order, [(0, 0)] * 3 + [(0, capacity - lk)])
  counts = jnp.minimum(mask.sum(-1), capacity).astype(jnp.int32)
  return order, counts


def dense_mask(indices, counts, *, q_len: int, kv_len: int, block_q: int,
               causal: bool = False):
  """bool [B|1, H|1, Lq, Lk] of allowed pairs per list head. O(Lq * Lk): tests only.

  Computed straight from the spec (any order, duplicates, out-of-range
  entries), independently of `normalize`.
  """
  indices = jnp.asarray(indices).astype(jnp.int32)
  counts = jnp.asarray(counts).astype(jnp.int32)
  bl, hl, nq, c = indices.shape
  valid = (jnp.arange(c) < counts[..., None]) & (indices >= 0) & (indices < kv_len)
  target = jnp.where(valid, indices, kv_len)  # invalid entries land in a trash column
  bi, hi, qi = np.meshgrid(np.arange(bl), np.arange(hl), np.arange(nq), indexing='ij')
  hits = jnp.zeros((bl, hl, nq, kv_len + 1), bool).at[
      bi[..., None], hi[..., None], qi[..., None], target].set(True)[..., :kv_len]
  rows = jnp.repeat(hits, block_q, axis=2)[:, :, :q_len]
  if causal:
    qpos = jnp.arange(q_len)[:, None] + (kv_len - q_len)
    rows = rows & (jnp.arange(kv_len)[None, :] <= qpos)
  return rows

"""Vertical-Slash (MInference), the Sparse Frontier's prefill baseline: key lists per query block.

As in the Sparse Frontier's copy of the MInference kernels
(``sparse_frontier/modelling/attention/minference/vertical_and_slash.py`` and
``csrc/vertical_slash_index.cu``, PiotrNawrot/sparse-frontier @31d86c17):

  1. softmax of the last ``last_q`` queries over every key (causal inside the last
     ``last_q`` keys), fp32;
  2. verticals: the ``vertical_size`` keys with the largest column sums, the first 4 keys
     forced in; slashes: the ``slash_size`` diagonals with the largest sums, the 64
     diagonals nearest the main one forced in;
  3. per query block of ``block_size`` (64) rows ending at e (exclusive), a slash at
     offset o < e covers the key range [max(e - o, 64) - 64, max(e - o, 64)): the keys its
     diagonal crosses in the block, 64 wide. Walking the slashes from the largest offset,
     a range starting more than 64 keys past the current one's end opens a new range;
     one ending past the current end (by at most 64) extends it by a whole 64 keys (the
     CUDA index builder's rule, kept verbatim: the union can exceed the diagonals' span);
  4. the block attends (ranges U verticals), causally: the MInference kernel loops over
     the ranges as 64-key blocks with a causal mask and over the verticals left of the
     ranges as gathered columns; verticals inside a range are computed once.

Output: per (batch, query head, query block) a list of key indices (stripe kernel format,
pallas_kernels/stripe/lists.py) and counts. Each list is cut at the block's last query
(keys after it can never be attended), so its length is the work a kernel does.

Legend: b batch, t length, n query heads, i query block, c list slot, m slash rank.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import stripe
from sparsity_jax.patterns import prefill

FORCED_VERTICALS = 4  # topk_vertical_inf: the first keys (attention sinks).
FORCED_SLASHES = 64  # topk_slash_inf: the diagonals nearest the main one.


def slash_ranges(offsets_bnm: jax.Array, *, length: int, block: int) -> jax.Array:
  """Key coverage of the slashes per query block, bool [b, n, i, t].

  Args:
    offsets_bnm: int [b, n, m] distinct diagonal offsets (query - key), sorted descending.
    length: t (keys and queries).
    block: query block and range width (64 in MInference).
  """
  nq = prefill.num_blocks(length, block)
  end = (jnp.arange(nq, dtype=jnp.int32) + 1) * block  # Exclusive end row of each block.
  o = offsets_bnm.astype(jnp.int32)[..., None, :]  # [b, n, 1, m]
  e = jnp.maximum(end[:, None] - o, block)  # [b, n, i, m]: end of the slash's range.
  valid = o < end[:, None]  # The diagonal crosses the block.

  def walk(carry, x):
    rs, re, started = carry
    e_m, valid_m = x
    opens = valid_m & (~started | (e_m > re + block))
    extends = valid_m & started & (e_m > re) & ~opens
    saved = jnp.where(opens & started, rs, 0), jnp.where(opens & started, re, 0)
    rs = jnp.where(opens, e_m - block, rs)
    re = jnp.where(opens, e_m, jnp.where(extends, re + block, re))
    return (rs, re, started | valid_m), saved

  zeros = jnp.zeros(e.shape[:-1], jnp.int32)
  (rs, re, started), (starts, ends) = jax.lax.scan(
      walk, (zeros, zeros, jnp.zeros(e.shape[:-1], bool)),
      (jnp.moveaxis(e, -1, 0), jnp.moveaxis(valid, -1, 0)))
  starts = jnp.concatenate([starts, jnp.where(started, rs, 0)[None]], axis=0)
  ends = jnp.concatenate([ends, jnp.where(started, re, 0)[None]], axis=0)
  # Paint the ranges: +1 at each start, -1 at each end (clipped to t), then a running sum.
  b, n = e.shape[:2]
  bi = jnp.arange(b)[None, :, None, None]
  hi = jnp.arange(n)[None, None, :, None]
  qi = jnp.arange(nq)[None, None, None, :]
  diff = jnp.zeros((b, n, nq, length + 1), jnp.int32)
  diff = diff.at[bi, hi, qi, jnp.minimum(starts, length)].add(1)
  diff = diff.at[bi, hi, qi, jnp.minimum(ends, length)].add(-1)
  return jnp.cumsum(diff, axis=-1)[..., :length] > 0


def capacity(length: int, *, vertical_size: int, slash_size: int, block: int) -> int:
  """Static list capacity: each slash adds at most ``block`` keys, each vertical one."""
  return int(max(1, min(length, min(slash_size, length) * block + min(vertical_size, length))))


def select(q_btnd: jax.Array, k_btkd: jax.Array, *, vertical_size: int = 512,
           slash_size: int = 512, last_q: int = 256, block_size: int = 64) -> dict:
  """Vertical-Slash key lists of a prefill.

  Args:
    q_btnd: [b, t, n, d] queries (after RoPE); k_btkd: [b, t, k, d] keys.
    vertical_size, slash_size: verticals / slashes kept (clipped to t).
    last_q: queries of the estimate (clipped to t).
    block_size: query block of the lists and width of the slash ranges.

  Returns:
    {'indices': int32 [b, n, nq, C], 'counts': int32 [b, n, nq]} (stripe lists, sorted),
    nq = ceil(t / block_size).
  """
  prefill.check_prefill(q_btnd, k_btkd, "Vertical-Slash")
  for name, value in (("vertical_size", vertical_size), ("slash_size", slash_size),
                      ("last_q", last_q), ("block_size", block_size)):
    prefill.check_positive(name, value)
  t = q_btnd.shape[1]
  nv, ns = min(vertical_size, t), min(slash_size, t)
  p = prefill.last_query_probs(jax.lax.stop_gradient(q_btnd), jax.lax.stop_gradient(k_btkd),
                               last_q)
  vertical = p.sum(axis=-2).at[..., :FORCED_VERTICALS].set(jnp.inf)
  keep_v = jax.lax.top_k(vertical, nv)[1]
  slash = prefill.diagonal_sums(p).at[..., -FORCED_SLASHES:].set(jnp.inf)
  # Top diagonals by key index j (offset t - 1 - j); ascending j = descending offsets.
  top_j = jnp.sort(jax.lax.top_k(slash, ns)[1], axis=-1)
  keys = slash_ranges(t - 1 - top_j, length=t, block=block_size)
  verticals = jnp.zeros(vertical.shape, bool).at[
      jnp.arange(vertical.shape[0])[:, None, None], jnp.arange(vertical.shape[1])[None, :, None],
      keep_v].set(True)
  nq = prefill.num_blocks(t, block_size)
  last_row = jnp.minimum((jnp.arange(nq) + 1) * block_size, t) - 1
  keys = (keys | verticals[:, :, None, :]) & (jnp.arange(t) <= last_row[:, None])
  cap = capacity(t, vertical_size=vertical_size, slash_size=slash_size, block=block_size)
  indices, counts = stripe.from_key_mask(keys, cap)
  return {"indices": indices, "counts": counts}


def allowed(pattern: dict, length: int, block_size: int) -> jax.Array:
  """bool [b, n, t, t] of computed causal pairs. O(t^2): tests and measurement."""
  return stripe.dense_mask(pattern["indices"], pattern["counts"], q_len=length, kv_len=length,
                           block_q=block_size, causal=True)


def pairs(pattern: dict, length: int, block_size: int) -> jax.Array:
  """Causal pairs computed per (batch, head), float32 [b, n]."""
  return prefill.list_pairs(pattern["indices"], pattern["counts"], length, block_size)

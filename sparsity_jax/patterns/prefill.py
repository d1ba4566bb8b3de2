"""Shared pieces of the training-free sparse-prefill patterns (FlexPrefill, Vertical-Slash,
block top-k, PBS-Attn, AnchorAttention).

All of them are *prefill* methods: one causal pass over a prompt, query i and key i the same
token (q_len == kv_len), per query head patterns (the official code repeats the KV heads
first). What they share lives here:

  * input checks (prefill shapes, thresholds in (0, 1], positive budgets);
  * the "last queries" estimate: softmax of the last queries against every key, and its
    column (vertical) and diagonal (slash) sums;
  * the cumulative-attention cover count (FlexPrefill, Sparse Frontier);
  * block pooling of queries / keys / score vectors;
  * turning kept causal tiles into a block_sparse.BlockMask, and counting the causal
    (query, key) pairs a pattern computes (its density), for tiles and for key lists.

Legend: b batch, t length (queries = keys), n query heads, k kv heads, d head dim,
i query block, j key block, r a row of the estimate (one of the last queries).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import block_sparse
from pallas_kernels.block_sparse import rules as rules_lib

NEG = -1e30  # Masked score before a softmax (finite: no inf - inf).


# ---- checks ----------------------------------------------------------------------------


def check_prefill(q_btnd, k_btkd, method: str) -> None:
  """Raises ValueError unless q [b, t, n, d] and k [b, t, k, d] are one causal prefill."""
  if q_btnd.ndim != 4 or k_btkd.ndim != 4:
    raise ValueError(f"{method}: q and k must be [batch, length, heads, head_dim], got "
                     f"{q_btnd.shape} and {k_btkd.shape}")
  t, s = q_btnd.shape[1], k_btkd.shape[1]
  if t != s:
    raise ValueError(f"{method} selects a pattern for a prefill (query length == key length); "
                     f"got {t} queries and {s} keys. A chunk appended to a filled KV cache runs "
                     "dense attention through the core's cached_call.")
  if q_btnd.shape[2] % k_btkd.shape[2]:
    raise ValueError(f"{method}: query heads ({q_btnd.shape[2]}) must be a multiple of kv heads "
                     f"({k_btkd.shape[2]})")


def check_fraction(name: str, value) -> float:
  """A threshold in (0, 1] as a float, or a ValueError naming it."""
  value = float(value)
  if not 0.0 < value <= 1.0 or math.isnan(value):
    raise ValueError(f"{name} must be in (0, 1], got {value}")
  return value


def check_positive(name: str, value, allow_none: bool = False):
  """A positive int (or None when allowed), or a ValueError naming it."""
  if value is None and allow_none:
    return None
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
    raise ValueError(f"{name} must be a positive int, got {value!r}")
  return int(value)


def num_blocks(length: int, block: int) -> int:
  return -(-length // block)


# ---- the last-queries estimate -----------------------------------------------------------


def repeat_kv(x_btkd: jax.Array, num_heads: int) -> jax.Array:
  """[b, t, k, d] -> [b, t, n, d]: query head h reads kv head h // (n // k)."""
  return jnp.repeat(x_btkd, num_heads // x_btkd.shape[2], axis=2)


def last_query_probs(q_btnd: jax.Array, k_btkd: jax.Array, last: int,
                     causal: bool = True) -> jax.Array:
  """Softmax of the last ``last`` queries over every key, fp32 [b, n, r, t].

  Row r is query t - last + r; with ``causal`` it sees keys <= its own position (the mask
  covers the last ``last`` keys, as in FlexPrefill / MInference). Scores are scaled by
  1/sqrt(d).
  """
  b, t, n, d = q_btnd.shape
  last = min(last, t)
  q_last = q_btnd[:, t - last:].astype(jnp.float32) * (d ** -0.5)
  k = repeat_kv(k_btkd, n).astype(jnp.float32)
  scores = jnp.einsum("brnd,btnd->bnrt", q_last, k)
  if causal:
    row_pos = t - last + jnp.arange(last)
    scores = jnp.where(jnp.arange(t)[None, :] <= row_pos[:, None], scores, -jnp.inf)
  return jax.nn.softmax(scores, axis=-1)


def diagonal_sums(p_bnrt: jax.Array) -> jax.Array:
  """Sums of the estimate along each diagonal, [b, n, t].

  Entry j sums the diagonal that meets the last row at key j (offset t - 1 - j from the
  main diagonal): sum_r p[r, j - (last - 1 - r)], terms with a negative key dropped.
  """
  last, t = p_bnrt.shape[-2:]
  padded = jnp.pad(p_bnrt, ((0, 0), (0, 0), (0, 0), (last - 1, 0)))
  cols = jnp.arange(t)[None, :] + jnp.arange(last)[:, None]  # [r, t]
  picked = jnp.take_along_axis(padded, jnp.broadcast_to(cols, p_bnrt.shape), axis=-1)
  return picked.sum(axis=-2)


def cover_count(x: jax.Array, fraction) -> jax.Array:
  """Entries of ``x`` (last axis, descending) whose running sum stays <= fraction, plus one:
  the smallest count whose mass exceeds ``fraction`` (FlexPrefill's score_cover_topk)."""
  running = jnp.cumsum(-jnp.sort(-x, axis=-1), axis=-1)
  return jnp.sum(running <= fraction, axis=-1) + 1


def rank_descending(x: jax.Array) -> jax.Array:
  """Rank of every entry in a descending order along the last axis (ties: lower index
  first), int32; ``rank < k`` selects a top-k with per-row k."""
  order = jnp.argsort(-x, axis=-1, stable=True)
  ranks = jnp.zeros_like(order)
  idx = jnp.broadcast_to(jnp.arange(x.shape[-1], dtype=order.dtype), order.shape)
  return jnp.put_along_axis(ranks, order, idx, axis=-1, inplace=False).astype(jnp.int32)


# ---- pooling -----------------------------------------------------------------------------


def pool_tokens(x_btkd: jax.Array, block: int, *, mode: str = "mean") -> jax.Array:
  """Per-block pooling of [b, t, h, d] -> [b, nb, h, d], fp32.

  mode 'mean': mean over the block's actual tokens (a short last block is not diluted);
  'mean_padded': sum / block, i.e. the mean over a zero-padded block (MInference, PBS).
  """
  b, t, h, d = x_btkd.shape
  nb = num_blocks(t, block)
  x = jnp.pad(x_btkd.astype(jnp.float32), ((0, 0), (0, nb * block - t), (0, 0), (0, 0)))
  sums = x.reshape(b, nb, block, h, d).sum(axis=2)
  if mode == "mean_padded":
    return sums / block
  if mode != "mean":
    raise ValueError(f"pool mode {mode!r}; use mean or mean_padded")
  counts = np.minimum(block, t - block * np.arange(nb)).astype(np.float32)
  return sums / jnp.asarray(counts)[None, :, None, None]


def sum_pool(x: jax.Array, block: int) -> jax.Array:
  """[..., t] -> [..., ceil(t / block)] block sums (zero padding)."""
  t = x.shape[-1]
  nb = num_blocks(t, block)
  x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, nb * block - t)])
  return x.reshape(x.shape[:-1] + (nb, block)).sum(axis=-1)


# ---- tiles -> BlockMask, densities -----------------------------------------------------


def causal_tiles(length: int, block: int) -> tuple[np.ndarray, np.ndarray]:
  """Host bool [nb, nb] (some causal pair, every pair causal) for square blocks."""
  nb = num_blocks(length, block)
  rows, cols = np.arange(nb)[:, None], np.arange(nb)[None, :]
  first_q = rows * block
  last_q = np.minimum((rows + 1) * block, length) - 1
  last_k = np.minimum((cols + 1) * block, length) - 1
  return cols * block <= last_q, last_k <= first_q


def causal_pairs_per_tile(length: int, block: int) -> np.ndarray:
  """Host float [nb, nb]: causal (query, key) pairs inside each tile."""
  nb = num_blocks(length, block)
  rows = np.arange(length)  # Query row r sees clip(r + 1 - k_lo, 0, |key block|) keys.
  out = np.zeros((nb, nb))
  for j in range(nb):
    k_lo, k_hi = j * block, min((j + 1) * block, length)
    per_row = np.clip(rows + 1 - k_lo, 0, k_hi - k_lo)
    out[:, j] = np.bincount(rows // block, weights=per_row, minlength=nb)
  return out


def causal_pair_count(length: int) -> int:
  return length * (length + 1) // 2


def causal_block_mask(bits, length: int, block: int, *, max_per_row: int | None = None,
                      rule: block_sparse.ElementRule | None = None) -> block_sparse.BlockMask:
  """BlockMask of the kept tiles ``bits`` [B|1, H|1, nb, nb] of a causal prefill.

  NumPy ``bits`` (a static pattern) give exact table widths; traced ones worst-case widths.

  Tiles wholly below the diagonal are full; tiles the causal rule cuts are partial, with
  the causal rule on positions (or ``rule``); tiles with no causal pair are dropped.
  ``max_per_row`` bounds the kept tiles of a row (static table width; default nb).
  """
  any_causal, all_causal = causal_tiles(length, block)
  nb = any_causal.shape[0]
  if rule is None:
    pos = jnp.arange(length, dtype=jnp.int32)[None, None]
    rule = block_sparse.PositionRule(pos, pos, jnp.full((1,), rules_lib.UNBOUNDED, jnp.int32),
                                     jnp.zeros((1,), jnp.int32), jnp.zeros((1,), jnp.int32))
  partial_tiles = any_causal & ~all_causal
  if isinstance(bits, np.ndarray):  # Host bits: exact table widths (from_block_bits).
    bits = bits.astype(bool) & any_causal
    return block_sparse.from_block_bits(bits & partial_tiles, bits & all_causal, q_len=length,
                                        kv_len=length, block_q=block, block_k=block, rule=rule)
  bits = jnp.asarray(bits, bool) & jnp.asarray(any_causal)
  width = nb if max_per_row is None else int(min(max_per_row, nb))
  part_width = int(max(1, partial_tiles.sum(-1).max()))
  return block_sparse.from_block_bits(
      bits & jnp.asarray(partial_tiles), bits & jnp.asarray(all_causal), q_len=length,
      kv_len=length, block_q=block, block_k=block, rule=rule,
      kv_width=min(part_width, width), full_kv_width=width,
      kv_capacity=nb * min(part_width, width), full_kv_capacity=nb * width)


def tile_pairs(bits, length: int, block: int) -> jax.Array:
  """Causal pairs computed by the kept tiles ``bits`` [B, H, nb, nb] -> float32 [B, H]."""
  pairs = jnp.asarray(causal_pairs_per_tile(length, block), jnp.float32)
  return jnp.sum(jnp.asarray(bits, jnp.float32) * pairs, axis=(-2, -1))


def tiles_to_dense(bits, length: int, block: int) -> jax.Array:
  """bool [B, H, t, t]: the causal pairs of the kept tiles. O(t^2): tests / measurement."""
  up = jnp.repeat(jnp.repeat(jnp.asarray(bits, bool), block, axis=-2), block, axis=-1)
  up = up[..., :length, :length]
  causal = jnp.arange(length)[None, :] <= jnp.arange(length)[:, None]
  return up & causal


def list_pairs(indices, counts, length: int, block_q: int) -> jax.Array:
  """Causal pairs computed by key lists (distinct entries) -> float32 [B, H].

  Key j listed for query block i counts once for every row of the block at or after j.
  """
  indices = jnp.asarray(indices)
  nq = indices.shape[-2]
  start = jnp.arange(nq) * block_q
  end = jnp.minimum(start + block_q, length)
  valid = jnp.arange(indices.shape[-1]) < jnp.asarray(counts)[..., None]
  rows = jnp.clip(end[:, None] - jnp.maximum(indices, start[:, None]), 0, None)
  return jnp.sum(jnp.where(valid, rows, 0), axis=(-2, -1)).astype(jnp.float32)

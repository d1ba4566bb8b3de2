"""AnchorAttention (Zhang et al., 2025): anchors from the initial + local windows, then
difference-aware stripe (key column) selection, computed over the gathered key columns.

As yuzhouzhang9/Anchor-Attention @fdc74208 (``anchor_attn/src/ops/anchor_attn_v4.py``,
``anchor_step_1_2_v2.py``, ``get_mask_test.py``, ``modules/llama/anchor_attention.py``),
per query head (the HF patch repeats the KV heads), with S = ``block_size * step`` (a "big
block", 2048 by default):

  1. anchor: every query of the full big blocks attends exactly the initial window (keys
     [0, S)) and its own big block (the local window), causally; its anchor is the row's
     maximum scaled score x_a = max q.k / sqrt(d) over those keys;
  2. stripes, per big block b: mean-pool the queries over each ``block_size`` rows (step
     pooled queries) and average their anchors likewise; candidate key j is selected for
     the whole big block if *any* pooled query has q_bar . k_j / sqrt(d) + theta >=
     x_a_bar (theta in natural-log units);
  3. compute: the init + local part and the selected key columns, merged by their
     log-sum-exps (block_sparse + stripe kernels, pallas_kernels.stripe.merge_partials);
  4. the tail (t mod S rows, after the last full big block) attends densely.

Candidates (``candidates``): the released loop scans keys [block_size, b * S - block_size):
it re-scans the initial window (whose selected keys the official kernel then counts twice
in the softmax) and never reaches the ``block_size`` keys just before the local window.
'released' (default) keeps that range minus the initial window (every key counted once:
the lse merge needs disjoint parts); 'all' scans every key between the windows, [S, b * S),
so theta = inf is dense attention.

Dense when t < 3 S: big blocks 0 and 1 see all their causal keys through the windows.

Legend: b batch, t length, n query heads, d head dim, g big block, p pooled query (tile).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import stripe
from sparsity_jax.patterns import prefill

CANDIDATES = ("released", "all")


def check(block_size: int, step: int, theta, candidates: str) -> None:
  prefill.check_positive("block_size", block_size)
  prefill.check_positive("step", step)
  if math.isnan(float(theta)):
    raise ValueError("theta must be a number (natural-log units), got nan")
  if candidates not in CANDIDATES:
    raise ValueError(f"candidates={candidates!r}; use one of {CANDIDATES}")


def dense_len(block_size: int, step: int) -> int:
  """Inputs of at most this many tokens run dense (same result, see the module doc)."""
  return 3 * block_size * step - 1


def window_bits(length: int, block_size: int, step: int) -> np.ndarray:
  """Host bool [nb, nb] tiles of the init + local part (tail rows: every causal tile)."""
  nb = prefill.num_blocks(length, block_size)
  big = (length // (block_size * step)) * step  # Query blocks inside full big blocks.
  i, j = np.arange(nb)[:, None], np.arange(nb)[None, :]
  own = (j >= (i // step) * step) & (j <= i)
  return np.where(i < big, (j < step) | own, j <= i)


def anchors(q_btnd: jax.Array, k_btkd: jax.Array, *, block_size: int, step: int) -> jax.Array:
  """Row anchors fp32 [b, n, G * S] (natural log units) for the G full big blocks."""
  b, t, n, d = q_btnd.shape
  size = block_size * step
  tiles = (t // size) * step
  k = prefill.repeat_kv(k_btkd, n).astype(jnp.float32)
  init_k = k[:, :size]
  scale = d ** -0.5

  def tile(i):
    rows = i * block_size + jnp.arange(block_size)
    q_t = jax.lax.dynamic_slice_in_dim(q_btnd, i * block_size, block_size, 1).astype(jnp.float32)
    start = (i // step) * size
    local_k = jax.lax.dynamic_slice_in_dim(k, start, size, 1)
    s_init = jnp.einsum("brnd,bsnd->bnrs", q_t, init_k) * scale
    s_local = jnp.einsum("brnd,bsnd->bnrs", q_t, local_k) * scale
    s_init = jnp.where(jnp.arange(size) <= rows[:, None], s_init, -jnp.inf)
    s_local = jnp.where(start + jnp.arange(size) <= rows[:, None], s_local, -jnp.inf)
    return jnp.maximum(s_init.max(-1), s_local.max(-1))  # [b, n, r]

  m = jax.lax.map(tile, jnp.arange(tiles))  # [p, b, n, r]
  return jnp.moveaxis(m, 0, 2).reshape(b, n, tiles * block_size)


def candidate_keys(length: int, block_size: int, step: int, candidates: str) -> np.ndarray:
  """Host bool [ceil(t / S), t]: the keys each big block may select."""
  size = block_size * step
  g = np.arange(-(-length // size))[:, None]
  full = g < length // size
  j = np.arange(length)[None, :]
  if candidates == "released":
    keep = (j >= max(block_size, size)) & (j < g * size - block_size)
  else:
    keep = (j >= size) & (j < g * size)
  return keep & full


def capacity(length: int, block_size: int, step: int) -> int:
  size = block_size * step
  return int(max(1, (length // size - 2) * size))


def select(q_btnd: jax.Array, k_btkd: jax.Array, *, block_size: int = 128, step: int = 16,
           theta: float = 12.0, candidates: str = "released") -> dict:
  """AnchorAttention's stripe lists of a prefill.

  Args:
    q_btnd: [b, t, n, d] queries (after RoPE); k_btkd: [b, t, k, d] keys.
    block_size, step: pooling rows and pooled queries per big block (S = block_size * step).
    theta: difference threshold, natural-log units (official default 12).
    candidates: 'released' or 'all' (module docstring).

  Returns:
    {'indices': int32 [b, n, G', C], 'counts': int32 [b, n, G']} stripe lists per big
    block (G' = ceil(t / S); the tail block's list is empty).
  """
  prefill.check_prefill(q_btnd, k_btkd, "AnchorAttention")
  check(block_size, step, theta, candidates)
  q_btnd, k_btkd = jax.lax.stop_gradient(q_btnd), jax.lax.stop_gradient(k_btkd)
  b, t, n, d = q_btnd.shape
  size = block_size * step
  groups, full = -(-t // size), t // size
  cand = candidate_keys(t, block_size, step, candidates)
  if full < 3:  # No big block has a candidate.
    return {"indices": jnp.zeros((b, n, groups, 1), jnp.int32),
            "counts": jnp.zeros((b, n, groups), jnp.int32)}
  m = anchors(q_btnd, k_btkd, block_size=block_size, step=step)  # [b, n, G S]
  m_bar = m.reshape(b, n, full * step, block_size).mean(-1)  # [b, n, p]
  q_bar = prefill.pool_tokens(q_btnd[:, :full * size], block_size)  # [b, p, n, d]
  k = prefill.repeat_kv(k_btkd, n).astype(jnp.float32)
  scores = jnp.einsum("bpnd,btnd->bnpt", q_bar, k) * (d ** -0.5)
  hit = (scores + theta >= m_bar[..., None]).reshape(b, n, full, step, t).any(axis=3)
  hit = jnp.pad(hit, ((0, 0), (0, 0), (0, groups - full), (0, 0)))
  indices, counts = stripe.from_key_mask(hit & jnp.asarray(cand), capacity(t, block_size, step))
  return {"indices": indices, "counts": counts}


def allowed(pattern: dict, length: int, block_size: int, step: int) -> jax.Array:
  """bool [b, n, t, t] computed causal pairs (windows + stripes). O(t^2)."""
  windows = prefill.tiles_to_dense(window_bits(length, block_size, step), length, block_size)
  stripes = stripe.dense_mask(pattern["indices"], pattern["counts"], q_len=length,
                              kv_len=length, block_q=block_size * step, causal=True)
  return windows | stripes


def pairs(pattern: dict, length: int, block_size: int, step: int) -> jax.Array:
  """Causal pairs computed per (batch, head), float32 [b, n]."""
  windows = prefill.tile_pairs(window_bits(length, block_size, step)[None, None], length,
                               block_size)
  return windows + prefill.list_pairs(pattern["indices"], pattern["counts"], length,
                                      block_size * step)

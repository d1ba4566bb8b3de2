"""FlexPrefill (Lai et al., ICLR 2025): context-aware per-head block patterns.

As ``get_active_blocks`` / ``flex_prefill_attention`` in bytedance/FlexPrefill @a24b27bf
(``flex_prefill/ops/flex_prefill_attention.py``), per query head:

  1. A = softmax of the last ``block_size`` queries (scaled by 1/sqrt(d)) over every key,
     causal inside the last block, fp32;
  2. vertical score v = mean over A's rows, slash score s = A's diagonal sums / rows;
  3. budgets: n_v = (tokens the sorted v needs to exceed gamma) // 128 + 1 blocks, n_s
     likewise, clamped to [min_budget, max_budget] blocks. The official divides by a
     literal 128 whatever the block size (``budget_block``, default 128, keeps that);
  4. pattern choice: the estimate a^ = softmax(mean(last queries) . block-mean(K)) against
     the block sums of v; if sqrt(JSD) < tau the head is *query-aware* and its vertical /
     slash budgets drop to min_budget;
  5. vertical-slash tiles: key block 0 and the diagonal always; the top n_v vertical
     blocks j give tiles (i, j) for every i >= j, the top n_s slash offsets o give tiles
     (i, i - o);
  6. query-aware heads add the smallest set of causal tiles (ranked over the whole
     flattened block-score matrix, each row a softmax over its causal key blocks) whose
     cumulative score stays <= gamma * (number of query blocks), plus tile (0, 0).

Dense when t <= max(2 * block_size, ceil(min_budget / block_size) * block_size).

Output: kept tiles bool [b, n, nb, nb] (causal tiles), and the heads' query-aware flags.

Legend: b batch, t length, n query heads, d head dim, i query block, j key block.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from sparsity_jax.patterns import prefill

BUDGET_BLOCK = 128  # Tokens per budget block in the official code, whatever block_size is.


def dense_len(block_size: int, min_budget: int | None) -> int:
  """Inputs of at most this many tokens run dense (the official fallback)."""
  min_tokens = 0 if min_budget is None else math.ceil(min_budget / block_size) * block_size
  return max(2 * block_size, min_tokens)


def _sqrt_jsd(p: jax.Array, q: jax.Array) -> jax.Array:
  """sqrt of the Jensen-Shannon divergence along the last axis (0 log 0 = 0)."""
  m = (p + q) / 2
  term = lambda x: jnp.where(x > 0, x * jnp.log(jnp.where(x > 0, x, 1.0) / jnp.where(m > 0, m, 1.0)),
                             0.0)
  return jnp.sqrt(jnp.maximum(0.5 * term(p).sum(-1) + 0.5 * term(q).sum(-1), 0.0))


def select(q_btnd: jax.Array, k_btkd: jax.Array, *, block_size: int = 128, gamma: float = 0.95,
           tau: float = 0.1, min_budget: int | None = 1024, max_budget: int | None = None,
           budget_block: int = BUDGET_BLOCK) -> dict:
  """FlexPrefill tiles of a prefill (no dense fallback here; see :func:`dense_len`).

  Args:
    q_btnd: [b, t, n, d] queries (after RoPE); k_btkd: [b, t, k, d] keys.
    block_size: tile size (128 in the paper's runs).
    gamma: cumulative attention to cover, in (0, 1].
    tau: sqrt-JSD threshold below which a head is query-aware, in [0, 1] (0: none).
    min_budget, max_budget: vertical / slash budgets in tokens (None: 1 block / no cap);
      budgets beyond the sequence are clipped to it.
    budget_block: tokens per block when turning a token budget into blocks (official: 128).

  Returns:
    {'bits': bool [b, n, nb, nb], 'query_aware': bool [b, n]}.
  """
  prefill.check_prefill(q_btnd, k_btkd, "FlexPrefill")
  block_size = prefill.check_positive("block_size", block_size)
  gamma = prefill.check_fraction("gamma", gamma)
  if not 0.0 <= float(tau) <= 1.0:
    raise ValueError(f"tau must be in [0, 1], got {tau}")
  prefill.check_positive("min_budget", min_budget, allow_none=True)
  prefill.check_positive("max_budget", max_budget, allow_none=True)
  if min_budget is not None and max_budget is not None and min_budget > max_budget:
    raise ValueError(f"min_budget ({min_budget}) must not exceed max_budget ({max_budget})")
  prefill.check_positive("budget_block", budget_block)
  q_btnd, k_btkd = jax.lax.stop_gradient(q_btnd), jax.lax.stop_gradient(k_btkd)
  b, t, n, d = q_btnd.shape
  nb = prefill.num_blocks(t, block_size)
  min_blocks = 1 if min_budget is None else math.ceil(min_budget / block_size)
  max_blocks = nb if max_budget is None else min(math.ceil(max_budget / block_size), nb)

  p = prefill.last_query_probs(q_btnd, k_btkd, block_size)  # [b, n, r, t]
  rows = p.shape[-2]
  vertical = p.mean(axis=-2)
  slash = prefill.diagonal_sums(p) / rows
  budget = lambda x: jnp.clip(prefill.cover_count(x, gamma) // budget_block + 1, min_blocks,
                              max_blocks)
  n_v, n_s = budget(vertical), budget(slash)
  vertical_b, slash_b = prefill.sum_pool(vertical, block_size), prefill.sum_pool(slash, block_size)

  # Pattern choice: pooled estimate of the last block's attention vs its block sums.
  k_mean = prefill.pool_tokens(prefill.repeat_kv(k_btkd, n), block_size)  # [b, j, n, d]
  q_last = q_btnd[:, t - rows:].astype(jnp.float32).mean(axis=1) * (d ** -0.5)  # [b, n, d]
  estimate = jax.nn.softmax(jnp.einsum("bnd,bjnd->bnj", q_last, k_mean), axis=-1)
  query_aware = _sqrt_jsd(estimate, vertical_b) < tau
  n_v = jnp.where(query_aware, min_blocks, n_v)
  n_s = jnp.where(query_aware, min_blocks, n_s)

  # Vertical-slash tiles.
  vertical_b = vertical_b.at[..., 0].set(jnp.inf)
  slash_b = slash_b.at[..., -1].set(jnp.inf)  # Block nb - 1 of s is offset 0: the diagonal.
  keep_v = prefill.rank_descending(vertical_b) < n_v[..., None]  # [b, n, j]
  keep_s = prefill.rank_descending(slash_b) < n_s[..., None]  # [b, n, nb - 1 - offset]
  i, j = np.arange(nb)[:, None], np.arange(nb)[None, :]
  lower = jnp.asarray(j <= i)
  bits = keep_v[..., None, :] & lower
  offset_slot = jnp.asarray(np.clip(nb - 1 - (i - j), 0, nb - 1))
  bits = bits | (jnp.take(keep_s, offset_slot, axis=-1) & lower)

  # Query-aware heads: global top-p over the causal block-score matrix.
  q_mean = prefill.pool_tokens(q_btnd, block_size) * (d ** -0.5)  # [b, i, n, d]
  scores = jnp.einsum("bind,bjnd->bnij", q_mean, k_mean)
  scores = jax.nn.softmax(jnp.where(lower, scores, -jnp.inf), axis=-1).reshape(b, n, nb * nb)
  order = jnp.argsort(-scores, axis=-1, stable=True)
  running = jnp.cumsum(jnp.take_along_axis(scores, order, axis=-1), axis=-1)
  keep_sorted = (running <= gamma * nb) | (order == 0)  # Tile (0, 0) always (padding slot).
  aware = jnp.zeros_like(keep_sorted).at[
      jnp.arange(b)[:, None, None], jnp.arange(n)[None, :, None], order].set(keep_sorted)
  bits = bits | (aware.reshape(b, n, nb, nb) & query_aware[..., None, None] & lower)
  return {"bits": bits, "query_aware": query_aware}

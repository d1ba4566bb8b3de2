"""Block top-k (MInference's block-sparse prefill), the Sparse Frontier's block baseline.

As ``_build_block_index`` in PiotrNawrot/sparse-frontier @31d86c17
(``sparse_frontier/modelling/attention/minference/block.py``):

  1. mean-pool queries and keys over blocks of ``block_size`` tokens; the sequence is
     zero-padded first, so a short last block's mean is diluted (sum / block_size);
  2. score every (query block, key block) pair by the unscaled dot product of the pooled
     vectors;
  3. force the first key block (attention sink), the diagonal and the block left of it;
  4. keep the top ``top_k`` blocks per query block among the causal ones. The official
     caps top_k at (padded length) // block_size = t // block_size + 1 (it pads even a
     block multiple by one block); rows with fewer causal blocks keep them all.

Output: kept tiles bool [b, n, nb, nb], computed with the causal rule.

Legend: b batch, t length, n query heads, i query block, j key block.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from sparsity_jax.patterns import prefill

FORCED = 3  # Block 0, the diagonal and the block before it.


def effective_top_k(length: int, block_size: int, top_k: int) -> int:
  """The official cap: min(top_k, padded_length // block_size), padded_length counting the
  extra block the MInference wrapper always adds."""
  return int(min(top_k, length // block_size + 1))


def select(q_btnd: jax.Array, k_btkd: jax.Array, *, block_size: int = 16,
           top_k: int = 64) -> dict:
  """Block top-k tiles of a prefill: {'bits': bool [b, n, nb, nb]} (causal tiles only)."""
  prefill.check_prefill(q_btnd, k_btkd, "block top-k")
  prefill.check_positive("block_size", block_size)
  prefill.check_positive("top_k", top_k)
  if top_k < FORCED:
    raise ValueError(f"block top-k keeps the sink, diagonal and sub-diagonal blocks: top_k must "
                     f"be >= {FORCED}, got {top_k}")
  b, t, n, _ = q_btnd.shape
  q_pool = prefill.pool_tokens(jax.lax.stop_gradient(q_btnd), block_size, mode="mean_padded")
  k_pool = prefill.pool_tokens(prefill.repeat_kv(jax.lax.stop_gradient(k_btkd), n), block_size,
                               mode="mean_padded")
  scores = jnp.einsum("bind,bjnd->bnij", q_pool, k_pool)
  nb = scores.shape[-1]
  rows, cols = np.arange(nb)[:, None], np.arange(nb)[None, :]
  forced = (cols == 0) | (cols == rows) | (cols == rows - 1)
  scores = jnp.where(jnp.asarray(forced), jnp.inf, scores)
  scores = jnp.where(jnp.asarray(cols <= rows), scores, -jnp.inf)
  k = min(effective_top_k(t, block_size, top_k), nb)
  vals, idx = jax.lax.top_k(scores, k)
  bits = jnp.any((idx[..., None] == jnp.arange(nb)) & (vals > -jnp.inf)[..., None], axis=-2)
  return {"bits": bits}


def max_per_row(length: int, block_size: int, top_k: int) -> int:
  return effective_top_k(length, block_size, top_k)

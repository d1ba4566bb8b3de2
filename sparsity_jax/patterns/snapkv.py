"""SnapKV (Li et al. 2024, arXiv 2404.14469) and Ada-SnapKV (Feng et al. 2024, AdaKV,
arXiv 2407.11550): which prompt tokens' keys and values a decode cache keeps.

After a dense prefill, the last ``window`` queries of the prompt (the "observation
window", which ends with the question) vote for keys: their softmax attention over the
prompt, causal inside the window, is pooled along the key axis (average pooling of width
``kernel_size``, zero-padded), the first ``prefix_tokens`` and last ``local_window`` keys are
always kept, and the best keys per kv head fill its capacity. Decoding then reads only the
kept tokens plus the generated ones (nothing is evicted while decoding).

  SnapKV      importance = sum over window queries of the mean over the GQA group;
              ``capacity`` tokens per kv head (all tokens if the prompt is shorter).
  Ada-SnapKV  importance = max over window queries of the max over the group; every kv head
              gets ``max(capacity * min_ratio, local + prefix)`` tokens, the rest of the
              layer's ``capacity * kv_heads`` budget goes to the best remaining
              (head, token) pairs of the layer: heads get different capacities.

Follows the Sparse Frontier (sparse_frontier/modelling/attention/kv_compression.py
@31d86c17: ``SnapKVCompression.kv_compress``, ``AdaSnapKVCompression.kv_compress``),
with scores in float32 (theirs are rounded to the model dtype after the softmax).

Legend: b batch, t prompt length, w window queries, n query heads, k kv heads,
g query heads per kv head, h head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def importance(q_btnh, k_btkh, *, window: int, kernel_size: int, adaptive: bool):
  """Pooled key importance [b, k, t] float32 (before the prefix / local protection)."""
  b, t, n, h = q_btnh.shape
  kh = k_btkh.shape[2]
  w = min(window, t)
  q_bwkgh = q_btnh[:, t - w:].reshape(b, w, kh, n // kh, h).astype(jnp.float32)
  scores = jnp.einsum("bwkgh,btkh->bkgwt", q_bwkgh * h ** -0.5, k_btkh.astype(jnp.float32))
  # Causal inside the window: window query i sits at position t - w + i.
  causal_wt = jnp.arange(t)[None, :] <= (t - w + jnp.arange(w))[:, None]
  probs = jax.nn.softmax(jnp.where(causal_wt, scores, -jnp.inf), axis=-1)
  if adaptive:
    votes_bkt = jnp.max(jnp.max(probs, axis=3), axis=2)
  else:
    votes_bkt = jnp.sum(jnp.mean(probs, axis=2), axis=2)
  pad = kernel_size // 2  # avg_pool1d(padding=k // 2, count_include_pad=True): zeros count.
  pooled = jax.lax.reduce_window(votes_bkt, 0.0, jax.lax.add, (1, 1, kernel_size), (1, 1, 1),
                                 [(0, 0), (0, 0), (pad, pad)])
  return pooled / kernel_size


def protect(importance_bkt, *, local_window: int, prefix_tokens: int):
  """Importance with the first ``prefix_tokens`` and last ``local_window`` keys at +inf."""
  t = importance_bkt.shape[-1]
  pos = jnp.arange(t)
  keep = (pos < prefix_tokens) | (pos >= t - local_window)
  return jnp.where(keep, jnp.inf, importance_bkt)


def select(q_btnh, k_btkh, *, capacity: int, window: int, kernel_size: int, local_window: int,
           prefix_tokens: int):
  """SnapKV: kept token indices [b, k, min(capacity, t)], ascending."""
  t = q_btnh.shape[1]
  if capacity >= t:  # Nothing to evict (the official capacity is min(capacity, t)).
    return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32),
                            (q_btnh.shape[0], k_btkh.shape[2], t))
  score = protect(importance(q_btnh, k_btkh, window=window, kernel_size=kernel_size,
                             adaptive=False),
                  local_window=local_window, prefix_tokens=prefix_tokens)
  return jnp.sort(jax.lax.top_k(score, capacity)[1], axis=-1).astype(jnp.int32)


def min_head_capacity(capacity: int, min_ratio: float, local_window: int,
                      prefix_tokens: int) -> int:
  return max(int(capacity * min_ratio), local_window + prefix_tokens)


def max_head_capacity(capacity: int, min_ratio: float, local_window: int, prefix_tokens: int,
                      kv_heads: int) -> int:
  """The most tokens Ada-SnapKV can give one kv head (its cache's slot count)."""
  floor = min_head_capacity(capacity, min_ratio, local_window, prefix_tokens)
  return capacity * kv_heads - floor * (kv_heads - 1)


def select_adaptive(q_btnh, k_btkh, *, capacity: int, window: int, kernel_size: int,
                    local_window: int, prefix_tokens: int, min_ratio: float):
  """Ada-SnapKV: bool [b, k, t], the kept (kv head, token) pairs: ``capacity * k`` per
  layer, at least ``min_head_capacity`` per head (all tokens if ``capacity >= t``)."""
  b, t = q_btnh.shape[:2]
  kh = k_btkh.shape[2]
  if capacity >= t:
    return jnp.ones((b, kh, t), bool)
  floor = min_head_capacity(capacity, min_ratio, local_window, prefix_tokens)
  score = protect(importance(q_btnh, k_btkh, window=window, kernel_size=kernel_size,
                             adaptive=True),
                  local_window=local_window, prefix_tokens=prefix_tokens)
  first = jax.lax.top_k(score, floor)[1]
  bi, hi = jnp.arange(b)[:, None, None], jnp.arange(kh)[None, :, None]
  kept = jnp.zeros((b, kh, t), bool).at[bi, hi, first].set(True)
  rest = jnp.where(kept, -jnp.inf, score).reshape(b, kh * t)
  extra = jax.lax.top_k(rest, (capacity - floor) * kh)[1]
  return kept.reshape(b, kh * t).at[jnp.arange(b)[:, None], extra].set(True).reshape(b, kh, t)

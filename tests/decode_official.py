"""Numpy ports of the Sparse Frontier's decode-method selection code (sparse_frontier/
modelling/attention/efficient_decoding.py and kv_compression.py @31d86c17): the oracles of
tests/test_decode_methods.py. Batch 1, written line by line from the torch code (no code
copied): torch.topk -> argsort, avg_pool1d -> a zero-padded moving sum.

Shapes as the official code: queries [t, n, d], keys [t, k, d] (k kv heads).
"""

from __future__ import annotations

import math

import numpy as np


def quest_page_reps(keys_tkd, page_size):
  """_init_page_reps: [pages, 2, k, d] (min, max) over each page, a partial last page too."""
  t = keys_tkd.shape[0]
  pages = -(-t // page_size)
  reps = np.empty((pages, 2) + keys_tkd.shape[1:], np.float32)
  for p in range(pages):
    chunk = keys_tkd[p * page_size:(p + 1) * page_size]
    reps[p, 0], reps[p, 1] = chunk.min(axis=0), chunk.max(axis=0)
  return reps


def quest_select(page_reps, query_nd, cache_seqlens, page_size, page_budget, share_pages):
  """_select_pages: page indices [n, page_budget + 1] per query head (last = current)."""
  current = (cache_seqlens - 1) // page_size
  assert current > 0 and current >= page_budget + 1
  kh = page_reps.shape[2]
  n = query_nd.shape[0]
  g = n // kh
  reps = np.repeat(page_reps[:current], g, axis=2)  # [p, 2, n, d]
  scores = np.einsum("hd,prhd->hprd", query_nd, reps).max(axis=2)  # [n, p, d]
  if share_pages:
    scores = scores.reshape(kh, g, scores.shape[1], -1).sum(axis=(1, 3))
  else:
    scores = scores.sum(axis=-1)
  idx = np.argsort(-scores, axis=1, kind="stable")[:, :page_budget + 1]
  idx[:, -1] = current
  if share_pages:
    idx = np.repeat(idx, g, axis=0)
  return idx


def _pool(x, kernel_size):
  pad = kernel_size // 2
  padded = np.pad(x, [(0, 0)] * (x.ndim - 1) + [(pad, pad)])
  c = np.cumsum(np.concatenate([np.zeros(x.shape[:-1] + (1,)), padded], -1), -1)
  return (c[..., kernel_size:] - c[..., :-kernel_size]) / kernel_size


def _window_probs(queries, keys, window):
  t, n, d = queries.shape
  kh = keys.shape[1]
  q = queries[-window:] / math.sqrt(d)
  rk = np.repeat(keys, n // kh, axis=1)
  scores = np.einsum("thd,nhd->htn", q, rk).astype(np.float64)
  tri = np.arange(window)[:, None] >= np.arange(window)[None, :]
  scores[..., -window:] = np.where(tri[None], scores[..., -window:], -np.inf)
  scores -= scores.max(-1, keepdims=True)
  p = np.exp(scores)
  return (p / p.sum(-1, keepdims=True)).reshape(kh, n // kh, window, t)


def snapkv_select(queries, keys, token_capacity, window, kernel_size, local_window,
                  prefix_tokens):
  """SnapKVCompression.kv_compress: kept token indices per kv head, sorted [k, capacity]."""
  grouped = _window_probs(queries, keys, window)
  imp = _pool(grouped.mean(axis=1).sum(axis=1), kernel_size)
  imp[..., -local_window:] = np.inf
  imp[..., :prefix_tokens] = np.inf
  capacity = min(token_capacity, keys.shape[0])
  return np.sort(np.argsort(-imp, axis=-1, kind="stable")[:, :capacity], axis=-1)


def ada_snapkv_select(queries, keys, token_capacity, window, kernel_size, local_window,
                      prefix_tokens, min_head_capacity_ratio):
  """AdaSnapKVCompression.kv_compress: kept-token mask [k, t]."""
  kh, t = keys.shape[1], keys.shape[0]
  grouped = _window_probs(queries, keys, window)
  imp = _pool(grouped.max(axis=2).max(axis=1), kernel_size)
  imp[..., -local_window:] = np.inf
  imp[..., :prefix_tokens] = np.inf
  total = token_capacity * kh
  floor = max(int(token_capacity * min_head_capacity_ratio), local_window + prefix_tokens)
  remaining = total - floor * kh
  mask = np.zeros((kh, t), bool)
  first = np.argsort(-imp, axis=-1, kind="stable")[:, :floor]
  np.put_along_axis(mask, first, True, axis=-1)
  flat = np.where(mask, -np.inf, imp).reshape(-1)
  mask.reshape(-1)[np.argsort(-flat, kind="stable")[:remaining]] = True
  return mask

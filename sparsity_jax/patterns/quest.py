"""Quest: query-aware page selection for decoding (Tang et al. 2024, arXiv 2406.10774).

The full KV cache is kept; it is cut into pages of ``page_size`` tokens and each page keeps
the per-channel minimum and maximum of its keys. A decode query scores a page by the upper
bound of q . k over the page's box, sum_d max(q_d min_d, q_d max_d), and attends only to
the ``page_budget`` best-scoring *earlier* pages plus the page the current token is in.

Follows the Sparse Frontier's implementation (sparse_frontier/modelling/attention/
efficient_decoding.py @31d86c17, ``_init_page_reps``, ``_update_last_page``,
``_select_pages``): page bounds over the post-RoPE keys, the current page excluded from
scoring and always kept, scores summed over the query heads of a GQA group when
``share_pages`` (their default), top-k by score. Where their code asserts (a context with
at most ``page_budget`` earlier pages) every page is read: that is the dense result.

Legend: b batch, k kv heads, n query heads, g query heads per kv head, h head dim,
s cache slots (positions), p pages.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def num_pages(length: int, page_size: int) -> int:
  return -(-length // page_size)


def page_bounds(k_bkhs, length, page_size: int):
  """Per-channel (min, max) of the keys of each page, each [b, k, p, h].

  ``k_bkhs``: the cache's keys [b, k, h, s] (s a multiple of page_size); slots at or after
  ``length`` (int, may be traced) are empty and do not count (an empty page has
  min = +inf, max = -inf).
  """
  b, kh, h, s = k_bkhs.shape
  if s % page_size:
    raise ValueError(f"the cache holds {s} slots, not a multiple of page_size={page_size}")
  valid = (jnp.arange(s) < length).reshape(s // page_size, page_size)
  k_bkhpq = k_bkhs.reshape(b, kh, h, s // page_size, page_size)
  inf = jnp.asarray(jnp.inf, k_bkhs.dtype)
  kmin = jnp.min(jnp.where(valid, k_bkhpq, inf), axis=-1)
  kmax = jnp.max(jnp.where(valid, k_bkhpq, -inf), axis=-1)
  return kmin.transpose(0, 1, 3, 2), kmax.transpose(0, 1, 3, 2)


def page_scores(q_bnh, kmin_bkph, kmax_bkph, *, share_pages: bool):
  """Upper bounds of q . k per page: [b, k, p] (summed over each GQA group) when
  ``share_pages``, else [b, n, p]. float32."""
  b, n, h = q_bnh.shape
  kh = kmin_bkph.shape[1]
  q_bkgh = q_bnh.reshape(b, kh, n // kh, h).astype(jnp.float32)[:, :, :, None, :]
  lo = q_bkgh * kmin_bkph.astype(jnp.float32)[:, :, None]
  hi = q_bkgh * kmax_bkph.astype(jnp.float32)[:, :, None]
  scores_bkgp = jnp.sum(jnp.maximum(lo, hi), axis=-1)
  if share_pages:
    return jnp.sum(scores_bkgp, axis=2)
  return scores_bkgp.reshape(b, n, -1)


def select_pages(q_bnh, kmin_bkph, kmax_bkph, current_page, *, page_budget: int,
                 share_pages: bool):
  """The ``page_budget`` best earlier pages, int32 [b, k|n, page_budget], best first.

  ``current_page`` (may be traced) is the page holding the decoded token; only pages
  before it compete (the caller keeps the current page; it must be > page_budget, else
  every page is read).
  """
  scores = page_scores(q_bnh, kmin_bkph, kmax_bkph, share_pages=share_pages)
  earlier = jnp.arange(scores.shape[-1]) < current_page
  scores = jnp.where(earlier, scores, -jnp.inf)
  return jax.lax.top_k(scores, page_budget)[1].astype(jnp.int32)


def page_tokens(pages, current_page, page_size: int):
  """Cache slots of ``pages`` [..., m] followed by the current page's: [..., (m + 1) *
  page_size] (the caller masks the current page's slots after the decoded token)."""
  pages = jnp.concatenate(
      [pages, jnp.broadcast_to(jnp.asarray(current_page, pages.dtype), pages.shape[:-1] + (1,))],
      axis=-1)
  slots = pages[..., None] * page_size + jnp.arange(page_size, dtype=pages.dtype)
  return slots.reshape(pages.shape[:-1] + (-1,))

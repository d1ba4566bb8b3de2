"""Routing Transformer pieces: online k-means over normalised vectors and balanced routing.

Following the official implementation (Roy et al. 2020, routing_transformer/utils.py):
vectors are normalised by a scale-free layer norm (zero mean, unit variance, no learned
scale) before clustering and for the attention logits; similarity to a centroid is the
dot product; centroids are learned only by an exponential moving average of assigned
vectors (decay 0.999, Laplace-smoothed counts), never by gradients; each centroid takes
its top-``w`` tokens (balanced clusters of exactly ``w``), kept in position order. A token
may land in several clusters (its outputs are averaged) or in none (output 0).

Legend: b batch, t length, n heads (routing heads only), c clusters, w window
(tokens per cluster), d head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

LAPLACE_EPS = 1e-5


def scale_free_layer_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  x32 = x.astype(jnp.float32)
  mean = jnp.mean(x32, axis=-1, keepdims=True)
  var = jnp.var(x32, axis=-1, keepdims=True)
  return (x32 - mean) * jax.lax.rsqrt(var + eps)


def nearest_centroid(x_btnd: jax.Array, means_ncd: jax.Array) -> jax.Array:
  """Index [b, t, n] of the most similar centroid (dot product)."""
  return jnp.argmax(jnp.einsum("btnd,ncd->btnc", x_btnd, means_ncd), axis=-1)


def cluster_statistics(x_btnd: jax.Array, means_ncd: jax.Array, weights_bt=None):
  """Per head and centroid: number of assigned vectors [n, c] and their sum [n, c, d].

  The sums run over batch and length, so under a sharded batch XLA inserts the
  cross-device reductions the EMA needs.
  """
  assign_btn = nearest_centroid(x_btnd, means_ncd)
  onehot_btnc = jax.nn.one_hot(assign_btn, means_ncd.shape[1], dtype=jnp.float32)
  if weights_bt is not None:
    onehot_btnc = onehot_btnc * weights_bt[:, :, None, None]
  counts_nc = jnp.sum(onehot_btnc, axis=(0, 1))
  sums_ncd = jnp.einsum("btnc,btnd->ncd", onehot_btnc, x_btnd.astype(jnp.float32))
  return counts_nc, sums_ncd


def ema_update(ema_counts_nc, ema_sums_ncd, counts_nc, sums_ncd, decay: float):
  """One EMA step; returns (ema_counts, ema_sums, means) with Laplace-smoothed counts."""
  ema_counts_nc = decay * ema_counts_nc + (1.0 - decay) * counts_nc
  ema_sums_ncd = decay * ema_sums_ncd + (1.0 - decay) * sums_ncd
  total = jnp.sum(ema_counts_nc, axis=-1, keepdims=True)
  c = ema_counts_nc.shape[-1]
  smoothed = (ema_counts_nc + LAPLACE_EPS) / (total + c * LAPLACE_EPS) * total
  return ema_counts_nc, ema_sums_ncd, ema_sums_ncd / smoothed[..., None]


def kmeans_init(x_btnd: jax.Array, num_clusters: int, rng: jax.Array, iters: int = 10,
                max_points: int = 1024):
  """Centroids [n, c, d] from data: farthest-first seeding, then ``iters`` Lloyd steps.

  Seeding picks a random vector, then repeatedly the vector least similar to every
  centroid so far (a deterministic k-means++), on at most ``max_points`` sampled vectors;
  plain random seeding often puts two centroids in one cluster.
  """
  b, t, n, d = x_btnd.shape
  flat_nsd = x_btnd.reshape(b * t, n, d).transpose(1, 0, 2).astype(jnp.float32)
  sample_rng, first_rng = jax.random.split(rng)
  m = min(b * t, max_points)
  sample_nmd = flat_nsd[:, jax.random.permutation(sample_rng, b * t)[:m]]
  first = jax.random.randint(first_rng, (), 0, m)
  means_ncd = jnp.zeros((n, num_clusters, d), jnp.float32).at[:, 0].set(sample_nmd[:, first])

  def seed(i, means_ncd):
    sims_nmc = jnp.einsum("nmd,ncd->nmc", sample_nmd, means_ncd)
    sims_nmc = jnp.where(jnp.arange(num_clusters) < i, sims_nmc, -jnp.inf)
    farthest_n = jnp.argmin(jnp.max(sims_nmc, axis=-1), axis=-1)
    pick_nd = jnp.take_along_axis(sample_nmd, farthest_n[:, None, None], axis=1)[:, 0]
    return means_ncd.at[:, i].set(pick_nd)

  means_ncd = jax.lax.fori_loop(1, num_clusters, seed, means_ncd)

  def lloyd(means_ncd, _):
    assign_ns = jnp.argmax(jnp.einsum("nsd,ncd->nsc", flat_nsd, means_ncd), axis=-1)
    onehot = jax.nn.one_hot(assign_ns, num_clusters, dtype=jnp.float32)
    counts = onehot.sum(1)
    sums = jnp.einsum("nsc,nsd->ncd", onehot, flat_nsd)
    # Empty clusters keep their previous centroid.
    new = jnp.where(counts[..., None] > 0, sums / jnp.maximum(counts, 1.0)[..., None], means_ncd)
    return new, None

  means_ncd, _ = jax.lax.scan(lloyd, means_ncd, None, length=iters)
  return means_ncd


def route(x_btnd: jax.Array, means_ncd: jax.Array, window: int) -> jax.Array:
  """Balanced routing: for each centroid, its ``window`` most similar tokens.

  Returns token indices [b, n, c, w], sorted by position inside each cluster.
  """
  scores_bnct = jnp.einsum("btnd,ncd->bnct", x_btnd, means_ncd)
  _, idx_bncw = jax.lax.top_k(scores_bnct, window)
  return jnp.sort(idx_bncw, axis=-1)


def prefix_thresholds(scores_bncs: jax.Array, window: int) -> tuple[jax.Array, jax.Array]:
  """The ``window``-th best token of each centroid among tokens 0..i, for every i.

  One scan over the sequence keeps each centroid's running top-``window`` (ordered by
  score, ties to the lower index, as lax.top_k). Returns (value, index) [b, n, c, s] of
  the last member; value is -inf while fewer than ``window`` tokens exist.
  """
  b, n, c, s = scores_bncs.shape
  init = (jnp.full((b, n, c, window), -jnp.inf, scores_bncs.dtype),
          jnp.full((b, n, c, window), s, jnp.int32))

  def step(carry, xs):
    vals, idx = carry
    score_bnc, i = xs
    cand_v = jnp.concatenate([vals, score_bnc[..., None]], axis=-1)
    cand_i = jnp.concatenate([idx, jnp.full((b, n, c, 1), i, jnp.int32)], axis=-1)
    vals, order = jax.lax.top_k(cand_v, window)  # Stable: earlier (lower index) first.
    idx = jnp.take_along_axis(cand_i, order, axis=-1)
    return (vals, idx), (vals[..., -1], idx[..., -1])

  _, (thr_v, thr_i) = jax.lax.scan(step, init, (jnp.moveaxis(scores_bncs, -1, 0),
                                                jnp.arange(s, dtype=jnp.int32)))
  return jnp.moveaxis(thr_v, 0, -1), jnp.moveaxis(thr_i, 0, -1)


def gather_clusters(x_btnd: jax.Array, idx_bncw: jax.Array) -> jax.Array:
  """x at the routed indices, flattened cluster-major: [b, c*w, n, d]."""
  b, n, c, w = idx_bncw.shape
  x_bntd = x_btnd.transpose(0, 2, 1, 3)
  flat = idx_bncw.reshape(b, n, c * w)
  gathered_bnsd = jnp.take_along_axis(x_bntd, flat[..., None], axis=2)
  return gathered_bnsd.transpose(0, 2, 1, 3)


def scatter_mean(y_bsnd: jax.Array, idx_bncw: jax.Array, length: int) -> jax.Array:
  """Inverse of gather_clusters: averages a token's outputs over the clusters holding it;
  tokens in no cluster get 0. Returns [b, t, n, d]."""
  b, n, c, w = idx_bncw.shape
  d = y_bsnd.shape[-1]
  flat_bns = idx_bncw.reshape(b, n, c * w)
  y_bnsd = y_bsnd.transpose(0, 2, 1, 3).astype(jnp.float32)
  bi = jnp.arange(b)[:, None, None]
  ni = jnp.arange(n)[None, :, None]
  sums = jnp.zeros((b, n, length, d), jnp.float32).at[bi, ni, flat_bns].add(y_bnsd)
  counts = jnp.zeros((b, n, length), jnp.float32).at[bi, ni, flat_bns].add(1.0)
  out_bntd = sums / jnp.maximum(counts, 1.0)[..., None]
  return out_bntd.transpose(0, 2, 1, 3).astype(y_bsnd.dtype)

"""Routing Transformer attention (Roy et al. 2020): local heads + k-means routing heads.

A layer's query heads are split: the first ``n_local`` run blocked local attention
(each query block sees its own block causally and ``local_look_back`` previous blocks);
the rest are *routing heads*. As in the official code (routing_transformer/utils.py), a
routing head normalises its query with a scale-free layer norm, shares it as the key
(``share_qk``, the paper's LM setting), clusters the normalised vectors by dot product
with the centroids, and attends inside each cluster with the unscaled logits of the
normalised vectors (the layer norm replaces the 1/sqrt(d) scale). Our models use RoPE
where the official one adds a timing signal and relative positions, so the layer norm
is applied *before* RoPE (to the un-rotated query) and the rotated, normalised vector is
both clustered and attended with (one vector for both, as in the official code): a
logit then depends on the two tokens' contents and their offset only, never on
absolute position.
Each of the ``num_clusters`` centroids takes its ``window`` most similar tokens
(balanced clusters); a token attends, causally by original position, to the members of
every cluster that holds it and gets the mean of those outputs (0 in no cluster).

Two ways to choose the clusters (see docs/fidelity.md):

  teacher-forced (training; the paper): balanced top-w over the whole sequence, one
    block-diagonal pallas_kernels.block_sparse call over the gathered clusters. The
    *selection* seen by position i then depends on later tokens (values never flow
    backwards, so causality by gradient holds, but changing token j+1 can change the
    logits at j): its likelihood is not a left-to-right one.
  left-to-right (evaluation by default, and every cached decode): query i is routed
    by the top-w of each centroid among tokens 0..i only, exactly what a token sees
    when it is generated (the official fast decoding blanks future tokens the same
    way). Causal by construction, so incremental decoding equals the full forward at
    every layer, for prompts and chunks of any length. It costs O(C L^2) (dense scores
    per cluster, in query chunks), so it is an evaluation mode, not a training one.

``model.eval()`` selects ``attention.eval_routing`` ('left_to_right' by default;
'teacher_forced' reproduces the paper's numbers). Centroids ([n_routing, num_clusters,
head_dim] per layer) are non-parameter state, initialised from data on first use
(random tokens + 10 Lloyd iterations) and updated by an EMA of their assigned vectors
inside the jitted train step (decay 0.999, Laplace-smoothed counts). They are frozen at
evaluation. The commitment loss beta * ||x - sg(mu(x))||^2 is counted twice, once for the
queries and once for the (shared) keys, as the official shared-QK code does.

Config (``config.model.attention``): kind='routing', window (tokens per cluster),
num_clusters, num_routing_heads, routing_layers (routing only in the last k layers;
0 or None = all; with scan_layers only all), local_block, local_look_back, decay, beta,
share_qk (True), eval_routing ('left_to_right' | 'teacher_forced'), implementation
(kernel backend, None = platform default).

Legend: b batch, t query length, s key length, n heads, k kv heads, c clusters,
w window, h head dim.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pallas_kernels import block_sparse
from pallas_kernels.block_sparse.rules import UNBOUNDED
from sparsity_jax.layers import rope
from sparsity_jax.layers.attention import (AttentionCore, add_aux_loss, check_cache_room,
                                          poison_on_overflow, register_attention)
from sparsity_jax.patterns import routing as routing_lib


class KMeansState(nnx.Variable):
  """Centroids and their EMA statistics: changed by the train step, never by gradients."""


def blocked_local_mask(length: int, block: int, look_back: int) -> block_sparse.BlockMask:
  """Query block i sees key blocks i - look_back .. i, causally inside block i."""
  nb = -(-length // block)
  i, j = np.arange(nb)[:, None], np.arange(nb)[None, :]
  band = ((j <= i) & (j >= i - look_back))[None, None]
  banded = block_sparse.from_block_bits(np.zeros_like(band), band, q_len=length, kv_len=length,
                                        block_q=block, block_k=block)
  return block_sparse.intersection(block_sparse.causal(length, block_q=block, block_k=block),
                                   banded)


EVAL_ROUTING = ("left_to_right", "teacher_forced")
QUERY_CHUNK = 128  # Queries per step of the left-to-right routing (bounds its memory).


@register_attention("routing")
class RoutingAttention(AttentionCore):

  OPTIONS = ("window", "num_clusters", "routing_layers", "num_routing_heads", "local_block",
             "local_look_back", "decay", "beta", "share_qk", "eval_routing", "implementation")

  def __init__(self, model_config: Any, *, layer_index: int | None, rngs: nnx.Rngs):
    a = dict(model_config.attention)
    n, kv = model_config.num_heads, model_config.num_kv_heads
    self.window = int(a.get("window", 64))
    self.num_clusters = int(a.get("num_clusters", 4))
    num_layers = model_config.num_layers
    routing_layers = int(a.get("routing_layers") or num_layers)
    if layer_index is None:  # One core built for every stacked layer (scan_layers).
      if routing_layers < num_layers:
        raise ValueError(
            f"attention.routing_layers={routing_layers} puts routing heads in the last "
            f"{routing_layers} of {num_layers} layers, but scan_layers=True stacks identical "
            "layers: set config.model.scan_layers=False (or routing_layers=0 for all layers)")
      is_routing_layer = True
    else:
      is_routing_layer = layer_index >= num_layers - routing_layers
    self.n_routing = int(a.get("num_routing_heads", n // 2)) if is_routing_layer else 0
    self.n_local = n - self.n_routing
    self.group = n // kv
    self.local_block = int(a.get("local_block", self.window))
    self.local_look_back = int(a.get("local_look_back", 1))
    self.decay = float(a.get("decay", 0.999))
    self.beta = float(a.get("beta", 1e-4))
    self.share_qk = bool(a.get("share_qk", True))
    self.eval_routing = str(a.get("eval_routing", "left_to_right"))
    self.implementation = a.get("implementation", None)
    self.rope_theta = model_config.rope_theta
    scaling = getattr(model_config, "rope_scaling", None)
    self.rope_scaling = tuple(sorted(scaling.items())) if scaling else None  # Hashable.
    self.deterministic = False  # model.eval() sets it: centroids frozen.
    for name in ("window", "num_clusters", "local_block"):
      if getattr(self, name) <= 0:
        raise ValueError(f"attention.{name} must be positive, got {getattr(self, name)}")
    if self.local_look_back < 0:
      raise ValueError(f"attention.local_look_back must be >= 0, got {self.local_look_back}")
    if self.eval_routing not in EVAL_ROUTING:
      raise ValueError(f"attention.eval_routing={self.eval_routing!r}; use one of {EVAL_ROUTING}")
    if not 0 <= self.n_routing <= n:
      raise ValueError(f"attention.num_routing_heads={self.n_routing} must be in [0, {n}]")
    if self.n_local % self.group or self.n_routing % self.group:
      raise ValueError(f"local ({self.n_local}) and routing ({self.n_routing}) heads must be "
                       f"multiples of the GQA group size {self.group} (num_heads / num_kv_heads)")
    if not self.share_qk:
      raise ValueError("routing attention without shared Q/K is not implemented; the paper's "
                       "LM configs share them (attention.share_qk=True)")
    h = model_config.head_dim
    shape = (max(self.n_routing, 1), self.num_clusters)
    self.means = KMeansState(jnp.zeros(shape + (h,), jnp.float32))
    self.ema_counts = KMeansState(jnp.zeros(shape, jnp.float32))
    self.ema_sums = KMeansState(jnp.zeros(shape + (h,), jnp.float32))
    self.initialized = KMeansState(jnp.zeros((), bool))
    self.init_key = KMeansState(jax.random.key_data(rngs.params()))

  # ---- full-sequence attention (training, evaluation) --------------------------------

  def __call__(self, q_btnh, k_bskh, v_bskh, *, positions_bt, causal: bool) -> jax.Array:
    if not causal:
      raise ValueError("routing attention here is causal (by original position)")
    outputs = []
    if self.n_local:
      outputs.append(self._local(q_btnh, k_bskh, v_bskh))
    if self.n_routing:
      outputs.append(self._routing(q_btnh, v_bskh, positions_bt).astype(q_btnh.dtype))
    return jnp.concatenate(outputs, axis=2)

  def _local(self, q_btnh, k_bskh, v_bskh):
    nl_kv = self.n_local // self.group
    mask = blocked_local_mask(q_btnh.shape[1], self.local_block, self.local_look_back)
    return block_sparse.attention(q_btnh[:, :, :self.n_local], k_bskh[:, :, :nl_kv],
                                  v_bskh[:, :, :nl_kv], mask, implementation=self.implementation)

  def _rope(self, x_btnh, positions_bt):
    return rope.apply_rope(x_btnh, positions_bt, self.rope_theta, self.rope_scaling)

  def _routing_inputs(self, q_btnh, v_bskh, positions_bt):
    """The routing vectors (shared queries and keys) and the routing heads' values.

    A routing vector is RoPE(layer_norm(q before RoPE)): the core gets q after RoPE and
    undoes the rotation first, so the layer norm never sees position and a logit
    depends on the tokens' offset only. Clustering uses the same vectors as the logits
    (as the official code, whose vectors carry its timing signal): repeated tokens at
    different positions are different vectors, never exact ties.
    """
    q_pre = self._rope(q_btnh[:, :, self.n_local:].astype(jnp.float32), -positions_bt)
    x_btnh = self._rope(routing_lib.scale_free_layer_norm(q_pre), positions_bt)
    v_btnh = jnp.repeat(v_bskh[:, :, self.n_local // self.group:], self.group, axis=2)
    return x_btnh, v_btnh

  def _current_means(self, x_btnh):
    """Stored centroids, or centroids initialised from this batch on first use."""
    fresh = routing_lib.kmeans_init(jax.lax.stop_gradient(x_btnh), self.num_clusters,
                                    jax.random.wrap_key_data(self.init_key.get_value()))
    return jnp.where(self.initialized.get_value(), self.means.get_value(), fresh)

  def _routing(self, q_btnh, v_bskh, positions_bt):
    x_btnh, v_btnh = self._routing_inputs(q_btnh, v_bskh, positions_bt)
    means_nch = self._current_means(x_btnh)
    if self.deterministic and self.eval_routing == "left_to_right":
      b, t = positions_bt.shape
      slots_bt = jnp.broadcast_to(jnp.arange(t), (b, t))
      return self._left_to_right(x_btnh, positions_bt, slots_bt, x_btnh, positions_bt,
                                 jnp.ones((b, t), bool), v_btnh, means_nch, scan=True)
    t = x_btnh.shape[1]
    if t < self.window:
      raise ValueError(f"sequence length {t} is shorter than the routing window {self.window} "
                       "(teacher-forced routing needs full clusters; evaluation and decoding "
                       "route left to right and take any length)")
    if not self.deterministic:
      self._update_centroids(x_btnh, means_nch)
    idx_bncw = routing_lib.route(x_btnh, means_nch, self.window)
    return self._cluster_attention(x_btnh, v_btnh, positions_bt, idx_bncw)

  def _update_centroids(self, x_btnh, means_nch):
    x_sg = jax.lax.stop_gradient(x_btnh)
    counts, sums = routing_lib.cluster_statistics(x_sg, means_nch)
    first = ~self.initialized.get_value()
    # On first use the EMA starts from the data-initialised centroids.
    ema_counts = jnp.where(first, counts, self.ema_counts.get_value())
    ema_sums = jnp.where(first, means_nch * counts[..., None], self.ema_sums.get_value())
    ema_counts, ema_sums, new_means = routing_lib.ema_update(ema_counts, ema_sums, counts, sums,
                                                             self.decay)
    self.ema_counts.set_value(ema_counts)
    self.ema_sums.set_value(ema_sums)
    self.means.set_value(new_means)
    self.initialized.set_value(jnp.ones((), bool))
    # Commitment loss: pull vectors toward their (fixed) centroid. With shared Q/K the
    # official code adds it for the queries and for the keys: twice the same term.
    assign = routing_lib.nearest_centroid(x_sg, means_nch)  # [b, t, n]
    centroid_btnh = jnp.take_along_axis(means_nch[None, None], assign[..., None, None],
                                        axis=3)[..., 0, :]
    commitment = jnp.mean(jnp.square(x_btnh - jax.lax.stop_gradient(centroid_btnh)))
    add_aux_loss(self, "commitment", (2.0 if self.share_qk else 1.0) * self.beta * commitment)

  def _cluster_attention(self, x_btnh, v_btnh, positions_bt, idx_bncw):
    b, n, c, w = idx_bncw.shape
    xg_bsnh = routing_lib.gather_clusters(x_btnh.astype(v_btnh.dtype), idx_bncw)
    vg_bsnh = routing_lib.gather_clusters(v_btnh, idx_bncw)
    pos_bns = jnp.take_along_axis(
        jnp.broadcast_to(positions_bt[:, None, :], (b, n, positions_bt.shape[1])),
        idx_bncw.reshape(b, n, c * w), axis=2)
    # Block-diagonal tables known on the host (one block per cluster: exact widths, a
    # cost of c * w^2 per head), causal inside each block by the gathered original positions.
    rule = block_sparse.PositionRule(
        q_pos=pos_bns.astype(jnp.int32), kv_pos=pos_bns.astype(jnp.int32),
        left=jnp.full((1,), UNBOUNDED, jnp.int32), right=jnp.zeros((1,), jnp.int32),
        sink=jnp.zeros((1,), jnp.int32))
    diagonal = np.eye(c, dtype=bool)[None, None]
    mask = block_sparse.from_block_bits(diagonal, np.zeros_like(diagonal), q_len=c * w,
                                        kv_len=c * w, block_q=w, block_k=w, rule=rule)
    # Unscaled logits of the normalised vectors, as the official code.
    yg_bsnh = block_sparse.attention(xg_bsnh, xg_bsnh, vg_bsnh, mask, scale=1.0,
                                     implementation=self.implementation)
    return routing_lib.scatter_mean(yg_bsnh, idx_bncw, x_btnh.shape[1])

  def _left_to_right(self, xq_btnh, q_pos_bt, q_slot_bt, xk_bsnh, k_pos_bs, k_valid_bs,
                     v_bsnh, means_nch, *, scan: bool):
    """Routing heads' output for queries whose clusters are chosen among earlier tokens.

    Query i (position q_pos, key slot q_slot) is in cluster c iff it is among the top-w
    tokens of centroid c over the valid keys at positions <= q_pos (ties to the lower
    slot, as lax.top_k), and attends to exactly those members. Returns [b, t, n, h] f32.

    The w-th member (the threshold) comes from one top-k per query (few queries, e.g.
    one decoded token) or, with ``scan`` (many queries; keys in position order), from one
    running top-w over the keys (routing_lib.prefix_thresholds): the same set.
    """
    w = self.window
    k_scores_bncs = jnp.einsum("bsnh,nch->bncs", xk_bsnh.astype(jnp.float32), means_nch)
    # A query's own score is read from its key slot (shared Q/K): recomputing it could
    # round differently and disagree with the key ranking at the cluster's edge.
    b, c = k_scores_bncs.shape[0], k_scores_bncs.shape[2]
    q_scores_bnct = jnp.take_along_axis(
        k_scores_bncs, jnp.broadcast_to(jnp.maximum(q_slot_bt, 0)[:, None, None, :],
                                        (b, k_scores_bncs.shape[1], c, q_slot_bt.shape[1])),
        axis=3)
    xk_bsnh = xk_bsnh.astype(jnp.float32)
    # Unread values (e.g. cache slots past the end) never reach the output, even non-finite.
    v_bsnh = jnp.where(k_valid_bs[:, :, None, None], v_bsnh.astype(jnp.float32), 0.0)
    s = k_pos_bs.shape[1]
    slot_s = jnp.arange(s)
    at_queries = lambda x_bncs: jnp.take_along_axis(x_bncs, q_index, axis=3)
    q_index = jnp.broadcast_to(jnp.maximum(q_slot_bt, 0)[:, None, None, :],
                               k_scores_bncs.shape[:3] + q_slot_bt.shape[1:])
    if scan:
      thr_v_bncs, thr_i_bncs = routing_lib.prefix_thresholds(
          jnp.where(k_valid_bs[:, None, None], k_scores_bncs, -jnp.inf), min(w, s))
      thresholds = (at_queries(thr_v_bncs), at_queries(thr_i_bncs))
    else:
      thresholds = (jnp.zeros_like(q_scores_bnct), jnp.zeros(q_scores_bnct.shape, jnp.int32))

    def chunk(args):
      xq_btnh, q_pos_bt, q_slot_bt, q_scores_bnct, thr_v, thr_i = args
      eligible_bts = k_valid_bs[:, None, :] & (k_pos_bs[:, None, :] <= q_pos_bt[:, :, None])
      if not scan:
        masked = jnp.where(eligible_bts[:, None, None], k_scores_bncs[:, :, :, None, :],
                           -jnp.inf)
        vals, idx = jax.lax.top_k(masked, min(w, s))
        thr_v, thr_i = vals[..., -1], idx[..., -1]  # [b, n, c, t]: the w-th member.
      # Fewer than w eligible keys: thr_v = -inf and every eligible key is a member.
      beats = lambda score, slot, v_, i_: (score > v_) | ((score == v_) & (slot <= i_))
      member = eligible_bts[:, None, None] & beats(
          k_scores_bncs[:, :, :, None, :], slot_s, thr_v[..., None], thr_i[..., None])
      self_in_bnct = beats(q_scores_bnct, q_slot_bt[:, None, None, :], thr_v, thr_i)
      logits_bnts = jnp.einsum("btnh,bsnh->bnts", xq_btnh, xk_bsnh)
      logits = jnp.where(member, logits_bnts[:, :, None], block_sparse.MASK_VALUE)
      m = jnp.max(logits, axis=-1, keepdims=True)
      p = jnp.where(member, jnp.exp(logits - m), 0.0)
      l = jnp.sum(p, axis=-1, keepdims=True)
      out_bncth = jnp.einsum("bncts,bsnh->bncth", p / jnp.where(l == 0.0, 1.0, l), v_bsnh)
      weight = self_in_bnct.astype(jnp.float32)
      out_bnth = jnp.einsum("bncth,bnct->bnth", out_bncth, weight)
      out_bnth = out_bnth / jnp.maximum(jnp.sum(weight, axis=2), 1.0)[..., None]
      return out_bnth.transpose(0, 2, 1, 3)

    t = xq_btnh.shape[1]
    if t <= QUERY_CHUNK:
      return chunk((xq_btnh.astype(jnp.float32), q_pos_bt, q_slot_bt, q_scores_bnct)
                   + thresholds)
    # Chunks of queries (padded ones sit at position -1: they see nothing) under lax.map.
    nc = -(-t // QUERY_CHUNK)
    pad = nc * QUERY_CHUNK - t
    split = lambda x, axis: jnp.moveaxis(
        x.reshape(x.shape[:axis] + (nc, QUERY_CHUNK) + x.shape[axis + 1:]), axis, 0)
    pad_t = lambda x, axis, value: jnp.pad(
        x, [(0, pad if a == axis else 0) for a in range(x.ndim)], constant_values=value)
    args = (split(pad_t(xq_btnh.astype(jnp.float32), 1, 0.0), 1), split(pad_t(q_pos_bt, 1, -1), 1),
            split(pad_t(q_slot_bt, 1, -1), 1), split(pad_t(q_scores_bnct, 3, 0.0), 3),
            split(pad_t(thresholds[0], 3, 0.0), 3), split(pad_t(thresholds[1], 3, 0), 3))
    out = jax.lax.map(chunk, args)  # [nc, b, chunk, n, h]
    out = jnp.moveaxis(out, 0, 1).reshape((out.shape[1], nc * QUERY_CHUNK) + out.shape[3:])
    return out[:, :t]

  # ---- incremental decoding ---------------------------------------------------------

  def cache_capacity(self, cache) -> int:
    return cache["local_k"].shape[-3]

  def init_cache(self, batch: int, max_len: int, *, num_kv_heads: int, head_dim: int, dtype):
    nl_kv, nr = self.n_local // self.group, self.n_routing
    zeros = lambda heads, dt=dtype: jnp.zeros((batch, max_len, heads, head_dim), dt)
    return {"local_k": zeros(nl_kv), "local_v": zeros(nl_kv),
            "routing_x": zeros(nr, jnp.float32), "routing_v": zeros(nr),
            "means": jnp.zeros((max(nr, 1), self.num_clusters, head_dim), jnp.float32),
            "end": jnp.zeros((), jnp.int32)}

  def cached_call(self, q_btnh, k_btkh, v_btkh, *, positions_bt, cache):
    """Appends t tokens (a prompt, a chunk or one token, into an empty or filled cache)
    and attends over the cache: local heads by the blocked rule, routing heads by
    left-to-right routing over every cached token, so the result equals the model's
    left-to-right forward (``model.eval()``) on the whole sequence, at every layer.

    The centroids in force are fixed by the first call into an empty cache (the
    model's, or, for a model that never saw data, initialised from that chunk)."""
    t = q_btnh.shape[1]
    end = cache["end"]
    overflow = check_cache_room(end, t, self.cache_capacity(cache))
    nl_kv = self.n_local // self.group
    write = lambda buf, new: jax.lax.dynamic_update_slice_in_dim(buf, new.astype(buf.dtype),
                                                                 end, axis=1)
    new_cache = {"local_k": write(cache["local_k"], k_btkh[:, :, :nl_kv]),
                 "local_v": write(cache["local_v"], v_btkh[:, :, :nl_kv]),
                 "routing_x": cache["routing_x"], "routing_v": cache["routing_v"],
                 "means": cache["means"], "end": end + t}
    b, s = positions_bt.shape[0], new_cache["local_k"].shape[1]
    slots = jnp.arange(s)
    valid_bs = jnp.broadcast_to(slots < end + t, (b, s))
    outputs = []
    if self.n_local:
      # Blocked local rule on positions (slot j holds position j).
      pos_bt1 = positions_bt[:, :, None]
      allowed_bts = (valid_bs[:, None, :] & (slots <= pos_bt1) &
                     (slots // self.local_block >= pos_bt1 // self.local_block
                      - self.local_look_back))
      outputs.append(jax.nn.dot_product_attention(
          q_btnh[:, :, :self.n_local], new_cache["local_k"].astype(q_btnh.dtype),
          new_cache["local_v"].astype(q_btnh.dtype), mask=allowed_bts[:, None]))
    if self.n_routing:
      x_btnh, v_btnh = self._routing_inputs(q_btnh, v_btkh, positions_bt)
      new_cache["routing_x"] = write(cache["routing_x"], x_btnh)
      new_cache["routing_v"] = write(cache["routing_v"], v_btnh)
      means = jax.lax.cond(end == 0,
                           lambda: jax.lax.stop_gradient(self._current_means(x_btnh)),
                           lambda: cache["means"])
      new_cache["means"] = means
      k_pos_bs = jnp.broadcast_to(slots, (b, s))
      out = self._left_to_right(x_btnh, positions_bt, positions_bt, new_cache["routing_x"],
                                k_pos_bs, valid_bs, new_cache["routing_v"], means,
                                scan=t > 1)
      outputs.append(out.astype(q_btnh.dtype))
    o_btnh = jnp.concatenate(outputs, axis=2)
    return poison_on_overflow(o_btnh, overflow), new_cache

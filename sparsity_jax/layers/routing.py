"""Routing Transformer attention (Roy et al. 2020): local heads + k-means routing heads.

A layer's query heads are split: the first ``n_local`` run blocked local attention
(each query block sees its own block causally and ``local_look_back`` previous blocks);
the rest are *routing heads*. A routing head normalises its queries (scale-free layer
norm, as the official code), shares them as keys (``share_qk``, the paper's LM setting),
routes the tokens into clusters of exactly ``window`` tokens (each of the ``num_clusters``
centroids takes its ``window`` most similar tokens) and attends inside each cluster,
causally by *original* position, through pallas_kernels.block_sparse: the gathered
sequence is block-diagonal (one block per cluster) with a causal rule on positions. A
token in several clusters gets the mean of its outputs; a token in none gets 0.

Centroids ([n_routing, num_clusters, head_dim] per layer) are non-parameter state,
initialised from data on first use (random tokens + 10 Lloyd iterations) and updated by
an EMA of their assigned vectors inside the jitted train step (decay 0.999, Laplace-
smoothed counts; the sums over the sharded batch become cross-device reductions). They
are frozen at evaluation (``model.eval()``). The commitment loss beta * ||x - sg(mu(x))||^2
is added to the training loss through AuxLoss.

Balanced routing chooses a cluster's members among all tokens of the sequence, so the
*selection* seen by position i can depend on later tokens (as in the original code);
values never flow backwards, so causality by gradient holds. Cached decoding recomputes
the routing over the cached prefix for each new token, which equals a full forward pass
on that prefix when routing heads sit in the last layer only (``routing_layers=1``, the
paper's PG-19 setting). With routing in lower layers, a full forward on a longer prefix
may re-cluster earlier tokens and so change their representations; the cache keeps the
representations each token had when it was decoded (as the official fast decoding does).

Config (``config.model.attention``): kind='routing', window (tokens per cluster),
num_clusters, num_routing_heads, routing_layers (routing only in the last k layers;
0 or None = all), local_block, local_look_back, decay, beta, share_qk (True),
implementation (kernel backend, None = platform default).

Legend: b batch, t query length, s key length, n heads, k kv heads, c clusters,
w window, h head dim.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pallas_kernels import block_sparse
from pallas_kernels.block_sparse.rules import UNBOUNDED
from sparsity_jax.layers.attention import AttentionCore, add_aux_loss, register_attention
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


@register_attention("routing")
class RoutingAttention(AttentionCore):

  def __init__(self, model_config: Any, *, layer_index: int, rngs: nnx.Rngs):
    a = dict(model_config.attention)
    n, kv = model_config.num_heads, model_config.num_kv_heads
    self.window = int(a.get("window", 64))
    self.num_clusters = int(a.get("num_clusters", 4))
    routing_layers = a.get("routing_layers") or model_config.num_layers
    is_routing_layer = layer_index >= model_config.num_layers - int(routing_layers)
    self.n_routing = int(a.get("num_routing_heads", n // 2)) if is_routing_layer else 0
    self.n_local = n - self.n_routing
    self.group = n // kv
    self.local_block = int(a.get("local_block", self.window))
    self.local_look_back = int(a.get("local_look_back", 1))
    self.decay = float(a.get("decay", 0.999))
    self.beta = float(a.get("beta", 1e-4))
    self.share_qk = bool(a.get("share_qk", True))
    self.implementation = a.get("implementation", None)
    self.deterministic = False  # model.eval() sets it: centroids frozen.
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

  # ---- full-sequence attention (training, evaluation, prefill) ----------------------

  def __call__(self, q_btnh, k_bskh, v_bskh, *, positions_bt, causal: bool) -> jax.Array:
    if not causal:
      raise ValueError("routing attention here is causal (by original position)")
    outputs = []
    if self.n_local:
      outputs.append(self._local(q_btnh, k_bskh, v_bskh))
    if self.n_routing:
      outputs.append(self._routing(q_btnh, v_bskh, positions_bt))
    return jnp.concatenate(outputs, axis=2)

  def _local(self, q_btnh, k_bskh, v_bskh):
    nl_kv = self.n_local // self.group
    mask = blocked_local_mask(q_btnh.shape[1], self.local_block, self.local_look_back)
    return block_sparse.attention(q_btnh[:, :, :self.n_local], k_bskh[:, :, :nl_kv],
                                  v_bskh[:, :, :nl_kv], mask, implementation=self.implementation)

  def _routing_inputs(self, q_btnh, v_bskh):
    x_btnh = routing_lib.scale_free_layer_norm(q_btnh[:, :, self.n_local:])
    v_btnh = jnp.repeat(v_bskh[:, :, self.n_local // self.group:], self.group, axis=2)
    return x_btnh, v_btnh

  def _current_means(self, x_btnh):
    """Stored centroids, or centroids initialised from this batch on first use."""
    fresh = routing_lib.kmeans_init(jax.lax.stop_gradient(x_btnh), self.num_clusters,
                                    jax.random.wrap_key_data(self.init_key.get_value()))
    return jnp.where(self.initialized.get_value(), self.means.get_value(), fresh)

  def _routing(self, q_btnh, v_bskh, positions_bt):
    x_btnh, v_btnh = self._routing_inputs(q_btnh, v_bskh)
    t = x_btnh.shape[1]
    if t < self.window:
      raise ValueError(f"sequence length {t} is shorter than the routing window {self.window}")
    means_nch = self._current_means(x_btnh)
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
    # Commitment loss: pull vectors toward their (fixed) centroid.
    assign = routing_lib.nearest_centroid(x_sg, means_nch)  # [b, t, n]
    centroid_btnh = jnp.take_along_axis(means_nch[None, None], assign[..., None, None],
                                        axis=3)[..., 0, :]
    commitment = jnp.mean(jnp.square(x_btnh - jax.lax.stop_gradient(centroid_btnh)))
    add_aux_loss(self, "commitment", self.beta * commitment)

  def _cluster_attention(self, x_btnh, v_btnh, positions_bt, idx_bncw):
    b, n, c, w = idx_bncw.shape
    xg_bsnh = routing_lib.gather_clusters(x_btnh, idx_bncw)
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
    yg_bsnh = block_sparse.attention(xg_bsnh.astype(v_btnh.dtype), xg_bsnh.astype(v_btnh.dtype),
                                     vg_bsnh, mask, implementation=self.implementation)
    return routing_lib.scatter_mean(yg_bsnh, idx_bncw, x_btnh.shape[1])

  # ---- incremental decoding ---------------------------------------------------------

  def init_cache(self, batch: int, max_len: int, *, num_kv_heads: int, head_dim: int, dtype):
    nl_kv, nr = self.n_local // self.group, self.n_routing
    zeros = lambda heads: jnp.zeros((batch, max_len, heads, head_dim), dtype)
    return {"local_k": zeros(nl_kv), "local_v": zeros(nl_kv), "routing_x": zeros(nr),
            "routing_v": zeros(nr), "means": jnp.zeros((max(nr, 1), self.num_clusters, head_dim),
                                                       jnp.float32),
            "end": jnp.zeros((), jnp.int32)}

  def cached_call(self, q_btnh, k_btkh, v_btkh, *, positions_bt, cache):
    """Prefill (t > 1, into an empty cache) runs the full algorithm; a single new token
    attends to its local blocks and to the members of the clusters that take it, with
    the balanced routing recomputed over the cached prefix (equal to a full forward)."""
    t = q_btnh.shape[1]
    end = cache["end"]
    nl_kv = self.n_local // self.group
    x_btnh, v_btnh = self._routing_inputs(q_btnh, v_btkh)
    write = lambda buf, new: jax.lax.dynamic_update_slice_in_dim(buf, new.astype(buf.dtype),
                                                                 end, axis=1)
    new_cache = {"local_k": write(cache["local_k"], k_btkh[:, :, :nl_kv]),
                 "local_v": write(cache["local_v"], v_btkh[:, :, :nl_kv]),
                 "routing_x": write(cache["routing_x"], x_btnh),
                 "routing_v": write(cache["routing_v"], v_btnh),
                 "means": cache["means"], "end": end + t}
    if t > 1:
      if self.n_routing:
        new_cache["means"] = jax.lax.stop_gradient(self._current_means(x_btnh))
      return self(q_btnh, k_btkh, v_btkh, positions_bt=positions_bt, causal=True), new_cache
    outputs = []
    scale = 1.0 / math.sqrt(q_btnh.shape[-1])
    slots = jnp.arange(new_cache["local_k"].shape[1])
    valid_s = slots < end + 1
    pos_b = positions_bt[:, 0]
    if self.n_local:
      # Blocked local rule on positions (slot j holds position j).
      q_block = pos_b // self.local_block
      allowed_bs = (valid_s & (slots <= pos_b[:, None]) &
                    (slots // self.local_block >= (q_block - self.local_look_back)[:, None]))
      outputs.append(jax.nn.dot_product_attention(
          q_btnh[:, :, :self.n_local], new_cache["local_k"].astype(q_btnh.dtype),
          new_cache["local_v"].astype(q_btnh.dtype), mask=allowed_bs[:, None, None, :]))
    if self.n_routing:
      outputs.append(self._decode_routing(x_btnh, new_cache, valid_s, end, scale)
                     .astype(q_btnh.dtype))
    return jnp.concatenate(outputs, axis=2), new_cache

  def _decode_routing(self, x_b1nh, cache, valid_s, end, scale):
    keys_bsnh = cache["routing_x"].astype(jnp.float32)
    scores_bncs = jnp.einsum("bsnh,nch->bncs", keys_bsnh, cache["means"])
    scores_bncs = jnp.where(valid_s, scores_bncs, -jnp.inf)
    vals, idx_bncw = jax.lax.top_k(scores_bncs, self.window)
    s = keys_bsnh.shape[1]
    member_bncs = jnp.any((idx_bncw[..., None] == jnp.arange(s)) &
                          (vals > -jnp.inf)[..., None], axis=-2)
    in_cluster_bnc = member_bncs[..., end]  # The new token is in slot `end`.
    logits_bns = jnp.einsum("bnh,bsnh->bns", x_b1nh[:, 0].astype(jnp.float32), keys_bsnh) * scale
    logits_bncs = jnp.where(member_bncs, logits_bns[:, :, None, :], -jnp.inf)
    probs_bncs = jax.nn.softmax(jnp.where(in_cluster_bnc[..., None], logits_bncs, 0.0), axis=-1)
    out_bnch = jnp.einsum("bncs,bsnh->bnch", probs_bncs, cache["routing_v"].astype(jnp.float32))
    count_bn = jnp.sum(in_cluster_bnc, axis=-1)
    out_bnh = jnp.sum(out_bnch * in_cluster_bnc[..., None], axis=2) / jnp.maximum(count_bn, 1)[..., None]
    return out_bnh[:, None]

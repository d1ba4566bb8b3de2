"""MoA attention: per-KV-head elastic sink + sliding-window spans from a plan.

Config (``config.model.attention``): kind='moa', plan (path of a plan.json
from ``launch/moa.py``), block_size (prefill kernel blocks, default 64),
implementation (block-sparse prefill backend, None = platform default),
decode_implementation (decode kernel backend, None = platform default).

At input length N each KV head h (and its query heads) sees, token-exactly,
keys i - w_h(N) < j <= i plus j < sink_h, with w_h from
``sparsity_jax.moa.plan.rule_window`` (the same function search uses):

  prefill  (``__call__``) pallas_kernels.block_sparse with per-head windows/sinks, N = t;
  decode   (``init_cache`` / ``cached_call``) per-head caches sized for N = max_len; a
           prompt into an empty cache runs the block-sparse kernel, then fills the caches:
           a sink region then a ring buffer of the window (keys after RoPE at
           absolute positions, so ring order is irrelevant), read by
           pallas_kernels.decode. Heads sharing a rule (at most R per layer) share
           one dense buffer [b, k_g, capacity_g, h], so the cache holds exactly
           sum_h capacity_h tokens: its bytes fall in proportion to the plan's density.

The 'moa_profile' core is dense attention that exposes q, k, v, o and dL/do to
``sparsity_jax.moa.profile``.

Legend: b batch, t query length, s key length, n query heads, k kv heads, h head dim,
c cache slots.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pallas_kernels import block_sparse
from pallas_kernels import decode as decode_lib
from sparsity_jax.layers.attention import (AttentionCore, check_cache_room, poison_on_overflow,
                                          register_attention)
from sparsity_jax.moa import plan as plan_lib

EMPTY = 2 ** 30  # Position of an unwritten slot: after every query, so never read.


@register_attention("moa")
class MoAAttention(AttentionCore):

  OPTIONS = ("plan", "block_size", "implementation", "decode_implementation")

  def __init__(self, model_config: Any, *, layer_index: int, rngs: nnx.Rngs):
    del rngs
    a = model_config.attention
    if model_config.scan_layers:
      raise ValueError("MoA plans differ per layer: set config.model.scan_layers=False")
    plan = plan_lib.load_plan(a.get("plan", ""))
    plan.validate(model_config)
    self.alpha = tuple(float(x) for x in plan.alpha[layer_index])
    self.beta = tuple(float(x) for x in plan.beta[layer_index])
    self.sink = tuple(int(x) for x in plan.sink[layer_index])
    self.min_window, self.max_length = int(plan.min_window), int(plan.max_length)
    self.group = model_config.num_heads // model_config.num_kv_heads
    self.block_size = int(a.get("block_size", 64))
    self.implementation = a.get("implementation", None)
    self.decode_implementation = a.get("decode_implementation", None)
    # KV heads sharing a rule share a cache buffer (static: depends only on the plan).
    groups: dict[tuple, list[int]] = {}
    for h, rule in enumerate(zip(self.alpha, self.beta, self.sink)):
      groups.setdefault(rule, []).append(h)
    self.kv_groups = tuple(tuple(hs) for hs in groups.values())

  # ---- spans -----------------------------------------------------------------------

  def windows(self, length: int) -> np.ndarray:
    """[k] token windows at input length N (raises past the plan's max_length)."""
    plan_lib.check_length(length, self.max_length)
    return plan_lib.rule_window(self.alpha, self.beta, length, self.min_window)

  def capacities(self, length: int) -> np.ndarray:
    return np.minimum(length, np.asarray(self.sink) + self.windows(length))

  def block_mask(self, length: int) -> block_sparse.BlockMask:
    """Per-query-head token-exact sink + window mask for a length-N prefill."""
    window_n = np.repeat(self.windows(length), self.group)
    sinks_n = np.repeat(np.asarray(self.sink), self.group)
    return block_sparse.sliding_window(length, window=window_n, sinks=sinks_n,
                                       block_q=self.block_size, block_k=self.block_size)

  # ---- prefill / training ----------------------------------------------------------

  def __call__(self, q_btnh, k_bskh, v_bskh, *, positions_bt, causal: bool) -> jax.Array:
    del positions_bt  # Queries and keys are the same tokens at positions 0..t-1.
    if not causal:
      raise ValueError("MoA attention is for causal LMs")
    return block_sparse.attention(q_btnh, k_bskh, v_bskh, self.block_mask(q_btnh.shape[1]),
                                  implementation=self.implementation)

  # ---- decoding --------------------------------------------------------------------

  def init_cache(self, batch: int, max_len: int, *, num_kv_heads: int, head_dim: int,
                 dtype) -> dict[str, jax.Array]:
    """Per rule group: k/v [b, k_g, capacity_g, h], slot positions, windows and sinks."""
    del num_kv_heads
    caps, windows = self.capacities(max_len), self.windows(max_len)
    # The ring buffers never fill up, but their windows are the plan's at N = max_len:
    # the cache is valid for max_len tokens, and refuses more (check_cache_room).
    cache = {"end": jnp.zeros((), jnp.int32), "capacity": jnp.asarray(max_len, jnp.int32)}
    for gi, heads in enumerate(self.kv_groups):
      shape = (batch, len(heads), int(caps[heads[0]]))
      cache[f"k{gi}"] = jnp.zeros(shape + (head_dim,), dtype)
      cache[f"v{gi}"] = jnp.zeros(shape + (head_dim,), dtype)
      cache[f"pos{gi}"] = jnp.full(shape, EMPTY, jnp.int32)
      cache[f"window{gi}"] = jnp.asarray(windows[list(heads)], jnp.int32)
      cache[f"sink{gi}"] = jnp.asarray([self.sink[h] for h in heads], jnp.int32)
    return cache

  def cached_call(self, q_btnh, k_btkh, v_btkh, *, positions_bt, cache):
    """Appends t tokens to the per-head caches and attends (token-exact rule).

    A prompt into an empty cache runs the block-sparse prefill kernel (cost ~ density x
    dense); appending to a filled cache uses the decode kernel with the position rule.
    """
    overflow = check_cache_room(cache["end"], q_btnh.shape[1], self.cache_capacity(cache))
    args = (q_btnh, k_btkh, v_btkh, positions_bt, cache)
    if q_btnh.shape[1] == 1:
      o_btnh, cache = self._append(*args)
    else:
      o_btnh, cache = jax.lax.cond(cache["end"] == 0, self._prefill_empty, self._append, *args)
    return poison_on_overflow(o_btnh, overflow), cache

  def cache_capacity(self, cache):
    return cache["capacity"]

  def _prefill_empty(self, q_btnh, k_btkh, v_btkh, positions_bt, cache):
    """Prompt at positions 0..t-1 into an empty cache: one block-sparse call, then write."""
    t = q_btnh.shape[1]
    window, sink = np.ones(len(self.sink), np.int64), np.asarray(self.sink)
    for gi, heads in enumerate(self.kv_groups):
      for h in heads:
        # The cache keeps sink + ring slots; the ring is the window (clipped only when
        # sink + window > max_len, where every key is visible anyway). Exact for a prompt
        # at positions 0..t-1 with t <= max_len, which model.decode guarantees.
        window[h] = max(cache[f"k{gi}"].shape[2] - sink[h], 1)
    mask = block_sparse.sliding_window(
        t, window=np.repeat(window, self.group), sinks=np.repeat(sink, self.group),
        block_q=self.block_size, block_k=self.block_size)
    o_btnh = block_sparse.attention(q_btnh, k_btkh, v_btkh, mask,
                                    implementation=self.implementation)
    new_cache = {"end": cache["end"] + t, "capacity": cache["capacity"]}
    for gi, heads in enumerate(self.kv_groups):
      k_new, v_new, pos_new = self._group_tokens(gi, heads, k_btkh, v_btkh, positions_bt, cache)
      kc, vc, pc = _write(cache[f"k{gi}"], cache[f"v{gi}"], cache[f"pos{gi}"], k_new, v_new,
                          pos_new, cache[f"sink{gi}"])
      new_cache.update({f"k{gi}": kc, f"v{gi}": vc, f"pos{gi}": pc,
                        f"window{gi}": cache[f"window{gi}"], f"sink{gi}": cache[f"sink{gi}"]})
    return o_btnh.astype(q_btnh.dtype), new_cache

  def _group_tokens(self, gi, heads, k_btkh, v_btkh, positions_bt, cache):
    """New keys, values [b, k_g, t, h] and positions [b, k_g, t] of one rule group."""
    kc = cache[f"k{gi}"]
    b, t = positions_bt.shape
    k_new = jnp.swapaxes(k_btkh[:, :, list(heads)], 1, 2).astype(kc.dtype)
    v_new = jnp.swapaxes(v_btkh[:, :, list(heads)], 1, 2).astype(kc.dtype)
    pos_new = jnp.broadcast_to(positions_bt[:, None, :], (b, len(heads), t)).astype(jnp.int32)
    return k_new, v_new, pos_new

  def _append(self, q_btnh, k_btkh, v_btkh, positions_bt, cache):
    """t tokens after the cached ones, through the ragged decode kernel."""
    b, t = q_btnh.shape[:2]
    end = cache["end"]
    new_cache = {"end": end + t, "capacity": cache["capacity"]}
    outs, order = [], []
    for gi, heads in enumerate(self.kv_groups):
      kc, vc, pc = cache[f"k{gi}"], cache[f"v{gi}"], cache[f"pos{gi}"]
      window, sink = cache[f"window{gi}"], cache[f"sink{gi}"]
      qheads = [h * self.group + j for h in heads for j in range(self.group)]
      q_g = q_btnh[:, :, qheads]
      k_new, v_new, pos_new = self._group_tokens(gi, heads, k_btkh, v_btkh, positions_bt, cache)
      if t == 1:
        # Write first: afterwards every valid slot is exactly the head's visible set,
        # so the kernel needs only the ragged lengths.
        kc, vc, pc = _write(kc, vc, pc, k_new, v_new, pos_new, sink)
        lengths = jnp.minimum(end + 1, kc.shape[2]) * jnp.ones((b, len(heads)), jnp.int32)
        o = decode_lib.decode_attention(q_g, kc, vc, lengths,
                                        implementation=self.decode_implementation)
      else:
        # Several tokens: attend over old slots + new tokens with the position rule
        # (a new token may evict a key an earlier new token still sees), then write.
        lengths = jnp.full((b, len(heads)), kc.shape[2] + t, jnp.int32)
        o = decode_lib.decode_attention(
            q_g, jnp.concatenate([kc, k_new], 2), jnp.concatenate([vc, v_new], 2), lengths,
            q_positions=positions_bt, kv_positions=jnp.concatenate([pc, pos_new], 2),
            window=window, sinks=sink, implementation=self.decode_implementation)
        kc, vc, pc = _write(kc, vc, pc, k_new, v_new, pos_new, sink)
      new_cache.update({f"k{gi}": kc, f"v{gi}": vc, f"pos{gi}": pc, f"window{gi}": window,
                        f"sink{gi}": sink})
      outs.append(o)
      order.extend(qheads)
    o_btnh = jnp.concatenate(outs, axis=2)[:, :, np.argsort(order)]
    return o_btnh.astype(q_btnh.dtype), new_cache


def _write(kc, vc, pc, k_new, v_new, pos_new, sink):
  """Writes tokens into sink slots / the ring buffer; only each slot's last writer lands."""
  cap = kc.shape[2]
  sink = sink[None, :, None]
  ring = jnp.maximum(cap - sink, 1)
  slot = jnp.where(pos_new < sink, pos_new, sink + (pos_new - sink) % ring)
  last = pos_new[..., -1:]
  survives = (pos_new < sink) | (pos_new > last - ring)
  slot = jnp.where(survives & (slot < cap), slot, cap)  # cap is out of range: dropped.
  bi = jnp.arange(kc.shape[0])[:, None, None]
  hi = jnp.arange(kc.shape[1])[None, :, None]
  kc = kc.at[bi, hi, slot].set(k_new, mode="drop")
  vc = vc.at[bi, hi, slot].set(v_new, mode="drop")
  pc = pc.at[bi, hi, slot].set(pos_new, mode="drop")
  return kc, vc, pc


def moa_cores(model: nnx.Module) -> list[MoAAttention]:
  return [m for _, m in nnx.iter_modules(model) if isinstance(m, MoAAttention)]


def cache_bytes(cache) -> int:
  """Bytes of the keys and values in a model cache (list of layer caches)."""
  layers = cache if isinstance(cache, (list, tuple)) else [cache]
  is_kv = lambda name: name[:1] in ("k", "v") and (name[1:].isdigit() or len(name) == 1)
  return int(sum(x.nbytes for c in layers for name, x in c.items() if is_kv(name)))


# ---- profiling core ------------------------------------------------------------------


class ProfileProbe(nnx.Variable):
  """Zeros added to the attention output; its gradient is dL/do."""


class ProfileCapture(nnx.Variable):
  """q, k, v (after RoPE) and o of each layer, for influence profiling."""


@register_attention("moa_profile")
class MoAProfileAttention(AttentionCore):
  """Dense causal attention that exposes (q, k, v, o) and dL/do for profiling."""

  OPTIONS = ()

  def __init__(self, model_config: Any, *, layer_index: int, rngs: nnx.Rngs):
    del model_config, layer_index, rngs
    self.probe = ProfileProbe(jnp.zeros(()))
    self.qkvo = ProfileCapture(())

  def __call__(self, q_btnh, k_bskh, v_bskh, *, positions_bt, causal: bool) -> jax.Array:
    del positions_bt
    o_btnh = jax.nn.dot_product_attention(q_btnh, k_bskh, v_bskh, is_causal=causal)
    self.qkvo.set_value((q_btnh, k_bskh, v_bskh, o_btnh))
    return o_btnh + self.probe.get_value().astype(o_btnh.dtype)

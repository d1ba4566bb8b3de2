"""Training-free sparse *decoding* for any imported causal model: Quest, SnapKV and
Ada-SnapKV as attention cores (the Sparse Frontier's decode methods).

Selected by ``config.model.attention.kind``, e.g.
``load_pretrained("smollm2", attention={"kind": "quest", "token_budget": 512})``:

  ``quest``       full KV cache plus per-page key bounds; each decode step reads the
                  ``token_budget // page_size`` pages with the highest upper bound on
                  q . k, plus the current page (patterns/quest.py).
  ``snapkv``      after a dense prefill the cache keeps ``token_capacity`` prompt tokens
                  per kv head, chosen by the last prompt queries (patterns/snapkv.py);
                  decoding reads them and the generated tokens.
  ``ada_snapkv``  as snapkv with per-head capacities (the layer's total budget is
                  ``token_capacity * kv_heads``).

The prefill (a whole sequence, or a prompt into an empty cache) is dense in all three, as
in the paper; they differ from dense attention only in what a one-token decode step reads.
Statistics of the last decode step in nnx Variables (``DecodeStats``): ``kv_read`` [n], the
fraction of the keys before and at the decoded position that each query head read (1 for
dense). :func:`decode_stats` collects them.

Config keys (``config.model.attention``), defaults from the Sparse Frontier's yaml files:

  quest:       ``token_budget`` (1024, a multiple of ``page_size``), ``page_size`` (16),
               ``share_pages`` (True: one page set per GQA group).
  snapkv:      ``token_capacity`` (1024), ``window`` (256, their approximation_window),
               ``kernel_size`` (21), ``local_window`` (128), ``prefix_tokens`` (4),
               ``decode_room`` (None: the cache has max_len slots per head; an int makes it
               capacity + decode_room slots, the memory saving: after a prompt of at least
               token_capacity tokens, decode_room decode steps fit (decode_room + 1 new
               tokens, the first comes from the prefill); more is a cache overflow:
               CacheOverflowError when called eagerly, NaN under jit, and
               ``generation.generate`` raises), ``decode_implementation`` (the ragged
               decode kernel's backend; None = platform default).
  ada_snapkv:  as snapkv, and ``min_head_capacity_ratio`` (0.2).
  Every core also takes DenseAttention's keys (the dense prefill); unknown keys are
  refused.

Legend: b batch, t new tokens, s cache slots, n query heads, k kv heads, h head dim.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pallas_kernels import decode as decode_lib
from sparsity_jax.layers.attention import (CacheOverflowError, DenseAttention,
                                           _grouped_attention, check_cache_room,
                                           poison_on_overflow, register_attention)
from sparsity_jax.patterns import quest as quest_lib
from sparsity_jax.patterns import snapkv as snapkv_lib
from sparsity_jax.patterns.prefill import check_positive

EMPTY = 2 ** 30  # Position of an unwritten slot: after every query, so never read.


class DecodeStats(nnx.Variable):
  """Statistics of a decode core's last one-token step (not parameters)."""


class SparseDecodeAttention(DenseAttention):
  """Base of the sparse decode cores: dense prefill, ``kv_read`` statistics."""

  method = "decode"

  # Each core adds its own config keys to DenseAttention's; make_attention_core refuses
  # any other.
  OPTIONS = ()

  def __init__(self, model_config: Any, *, layer_index: int | None, rngs: nnx.Rngs):
    super().__init__(model_config, layer_index=layer_index, rngs=rngs)
    self.num_heads = int(model_config.num_heads)
    self.num_kv_heads = int(model_config.num_kv_heads)
    self.kv_read = DecodeStats(jnp.ones((self.num_heads,), jnp.float32))

  def _option(self, model_config, name, default):
    return model_config.attention.get(name, default)

  def _flag(self, model_config, name, default) -> bool:
    value = self._option(model_config, name, default)
    if not isinstance(value, (bool, np.bool_)):
      raise ValueError(f"{self.method}: {name} must be true or false, got {value!r}")
    return bool(value)

  def _count(self, model_config, name, default) -> int:
    """A non-negative int option (a ValueError naming it otherwise)."""
    value = self._option(model_config, name, default)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
      raise ValueError(f"{self.method}: {name} must be an int >= 0, got {value!r}")
    return int(value)

  def _dense_read(self):
    """A prefill or chunk reads every key: the statistics describe no decode step."""
    self.kv_read.set_value(jnp.ones((self.num_heads,), jnp.float32))


@register_attention("quest")
class QuestAttention(SparseDecodeAttention):
  """Quest page selection over a full KV cache (see the module docstring)."""

  method = "Quest"
  OPTIONS = ("token_budget", "page_size", "share_pages")

  def __init__(self, model_config: Any, *, layer_index: int | None, rngs: nnx.Rngs):
    super().__init__(model_config, layer_index=layer_index, rngs=rngs)
    self.page_size = check_positive("page_size", self._option(model_config, "page_size", 16))
    self.token_budget = check_positive("token_budget",
                                       self._option(model_config, "token_budget", 1024))
    if self.token_budget % self.page_size:
      raise ValueError(f"Quest: token_budget ({self.token_budget}) must be a multiple of "
                       f"page_size ({self.page_size})")
    self.page_budget = self.token_budget // self.page_size
    self.share_pages = self._flag(model_config, "share_pages", True)

  def init_cache(self, batch: int, max_len: int, *, num_kv_heads: int, head_dim: int, dtype):
    """The dense cache (slots rounded up to whole pages) and per-page key bounds
    kmin / kmax [b, k, pages, h]."""
    pages = quest_lib.num_pages(max_len, self.page_size)
    cache = super().init_cache(batch, pages * self.page_size, num_kv_heads=num_kv_heads,
                               head_dim=head_dim, dtype=dtype)
    shape = (batch, num_kv_heads, pages, head_dim)
    cache["kmin"] = jnp.full(shape, jnp.inf, dtype)
    cache["kmax"] = jnp.full(shape, -jnp.inf, dtype)
    return cache

  def cached_call(self, q_btnh, k_btkh, v_btkh, *, positions_bt, cache):
    t = q_btnh.shape[1]
    dense_cache = {name: cache[name] for name in ("k", "v", "end")}
    if t > 1:  # Prefill or a chunk: dense, then the page bounds of everything cached.
      o_btnh, new = DenseAttention.cached_call(self, q_btnh, k_btkh, v_btkh,
                                               positions_bt=positions_bt, cache=dense_cache)
      kmin, kmax = quest_lib.page_bounds(new["k"], new["end"], self.page_size)
      self._dense_read()
      return o_btnh, {**new, "kmin": kmin, "kmax": kmax}
    end = cache["end"]  # The decoded token's slot and position.
    overflow = check_cache_room(end, 1, self.cache_capacity(cache))
    k_new_bkh = k_btkh[:, 0].astype(cache["k"].dtype)
    k_cache = jax.lax.dynamic_update_slice_in_dim(cache["k"], k_new_bkh[..., None], end, axis=3)
    v_cache = jax.lax.dynamic_update_slice_in_dim(
        cache["v"], v_btkh.astype(cache["v"].dtype).swapaxes(1, 2), end, axis=2)
    page = end // self.page_size
    kmin = cache["kmin"].at[:, :, page].min(k_new_bkh)
    kmax = cache["kmax"].at[:, :, page].max(k_new_bkh)
    k_cache, v_cache = jax.lax.optimization_barrier((k_cache, v_cache))
    new_cache = {"k": k_cache, "v": v_cache, "end": end + 1, "kmin": kmin, "kmax": kmax}
    args = (q_btnh, k_cache, v_cache, kmin, kmax, end)
    if self.page_budget + 1 >= kmin.shape[2]:  # The budget covers every page this cache has.
      o_btnh, read_n = self._dense_step(*args)
    else:
      o_btnh, read_n = jax.lax.cond(page > self.page_budget, self._sparse_step,
                                    self._dense_step, *args)
    self.kv_read.set_value(read_n)
    return poison_on_overflow(o_btnh, overflow), new_cache

  def _dense_step(self, q_btnh, k_cache, v_cache, kmin, kmax, end):
    del kmin, kmax
    allowed = (jnp.arange(v_cache.shape[2]) <= end)[None, None, :]
    o_btnh = _grouped_attention(q_btnh, k_cache, v_cache, allowed)
    return o_btnh, jnp.ones((self.num_heads,), jnp.float32)

  def _sparse_step(self, q_btnh, k_cache, v_cache, kmin, kmax, end):
    b, _, n, h = q_btnh.shape
    kh = k_cache.shape[1]
    page = end // self.page_size
    pages = quest_lib.select_pages(q_btnh[:, 0], kmin, kmax, page, page_budget=self.page_budget,
                                   share_pages=self.share_pages)
    slots = quest_lib.page_tokens(pages, page, self.page_size)  # [b, k|n, m]
    if self.share_pages:
      k_sel = jnp.take_along_axis(k_cache, slots[:, :, None, :], axis=3)
      v_sel = jnp.take_along_axis(v_cache, slots[..., None], axis=2)
    else:  # One page set per query head: the g query heads of a kv head gather their
      # slots from it in one take (not from the whole cache repeated per query head).
      g, m = n // kh, slots.shape[-1]
      flat = slots.reshape(b, kh, g * m)
      k_sel = jnp.take_along_axis(k_cache, flat[:, :, None, :], axis=3)  # [b, k, h, g m]
      k_sel = k_sel.reshape(b, kh, h, g, m).transpose(0, 1, 3, 2, 4).reshape(b, n, h, m)
      v_sel = jnp.take_along_axis(v_cache, flat[..., None], axis=2).reshape(b, n, m, h)
    allowed = slots[:, 0][:, None, :] <= end  # [b, 1, m]: the same slots are valid in every head.
    o_btnh = _grouped_attention(q_btnh, k_sel, v_sel, allowed)
    read = jnp.sum(allowed, dtype=jnp.float32) / (b * (end + 1))
    return o_btnh, jnp.full((self.num_heads,), read, jnp.float32)


@register_attention("snapkv")
class SnapKVAttention(SparseDecodeAttention):
  """SnapKV: a compressed per-head KV cache after a dense prefill (module docstring)."""

  method = "SnapKV"
  adaptive = False
  OPTIONS = ("token_capacity", "window", "kernel_size", "local_window", "prefix_tokens",
             "decode_room", "decode_implementation")

  def __init__(self, model_config: Any, *, layer_index: int | None, rngs: nnx.Rngs):
    super().__init__(model_config, layer_index=layer_index, rngs=rngs)
    get = lambda name, default: self._option(model_config, name, default)
    self.token_capacity = check_positive("token_capacity", get("token_capacity", 1024))
    self.window = check_positive("window", get("window", 256))
    self.kernel_size = check_positive("kernel_size", get("kernel_size", 21))
    self.local_window = self._count(model_config, "local_window", 128)
    self.prefix_tokens = self._count(model_config, "prefix_tokens", 4)
    self.decode_room = check_positive("decode_room", get("decode_room", None), allow_none=True)
    self.decode_implementation = get("decode_implementation", None)
    if self.kernel_size % 2 == 0:
      raise ValueError(f"{self.method}: kernel_size must be odd (a centred pooling window), "
                       f"got {self.kernel_size}")
    if self.token_capacity <= self.local_window + self.prefix_tokens:
      raise ValueError(f"{self.method}: token_capacity ({self.token_capacity}) must exceed "
                       f"local_window + prefix_tokens ({self.local_window} + "
                       f"{self.prefix_tokens}); lower those or raise the capacity")

  def head_slots(self, max_len: int) -> int:
    """Prompt tokens one kv head can keep."""
    return min(self.token_capacity, max_len)

  def keep(self, q_btnh, k_btkh):
    """bool [b, k, t]: the prompt tokens each kv head keeps."""
    t = q_btnh.shape[1]
    idx = snapkv_lib.select(q_btnh, k_btkh, capacity=self.token_capacity, window=self.window,
                            kernel_size=self.kernel_size, local_window=self.local_window,
                            prefix_tokens=self.prefix_tokens)
    b, kh = idx.shape[:2]
    bi, hi = jnp.arange(b)[:, None, None], jnp.arange(kh)[None, :, None]
    return jnp.zeros((b, kh, t), bool).at[bi, hi, idx].set(True)

  def init_cache(self, batch: int, max_len: int, *, num_kv_heads: int, head_dim: int, dtype):
    """Per kv head: k / v [b, k, c, h], slot positions [b, k, c], filled slots
    ``lengths`` [b, k]; c = max_len, or head capacity + decode_room."""
    slots = max_len if self.decode_room is None else min(
        max_len, self.head_slots(max_len) + self.decode_room)
    shape = (batch, num_kv_heads, slots)
    return {"k": jnp.zeros(shape + (head_dim,), dtype), "v": jnp.zeros(shape + (head_dim,), dtype),
            "pos": jnp.full(shape, EMPTY, jnp.int32),
            "lengths": jnp.zeros((batch, num_kv_heads), jnp.int32),
            "end": jnp.zeros((), jnp.int32), "capacity": jnp.asarray(max_len, jnp.int32)}

  def cache_capacity(self, cache):
    # Stacked layers (scan_layers) hold one capacity per layer, all equal.
    return cache["capacity"].reshape(-1)[0]

  def cached_call(self, q_btnh, k_btkh, v_btkh, *, positions_bt, cache):
    t = q_btnh.shape[1]
    overflow = check_cache_room(cache["end"], t, self.cache_capacity(cache))
    args = (q_btnh, k_btkh, v_btkh, positions_bt, cache)
    if t == 1:
      o_btnh, new_cache = self._step(*args)
    else:
      o_btnh, new_cache = jax.lax.cond(cache["end"] == 0, self._prefill_empty, self._append,
                                       *args)
      self._dense_read()
    # A head whose slots ran out (decode_room too small) is an overflow too.
    slots_out = jnp.any(new_cache["lengths"] > cache["k"].shape[2])
    if not isinstance(slots_out, jax.core.Tracer) and bool(slots_out):
      raise CacheOverflowError(
          f"{self.method}: the compressed cache has {cache['k'].shape[2]} slots per head "
          f"(token_capacity + decode_room={self.decode_room}) and this call needs more: "
          "raise decode_room or leave it unset")
    overflow = jnp.logical_or(overflow, slots_out)
    return poison_on_overflow(o_btnh, overflow), new_cache

  def _prefill_empty(self, q_btnh, k_btkh, v_btkh, positions_bt, cache):
    """Dense causal prefill, then the kept tokens (position order) into the slots."""
    o_btnh = DenseAttention.__call__(self, q_btnh, k_btkh, v_btkh, positions_bt=positions_bt,
                                     causal=True)
    keep_bkt = self.keep(q_btnh, k_btkh)
    b, kh, t = keep_bkt.shape
    m = min(t, cache["k"].shape[2])
    # Kept tokens first, in position order (a stable sort of "not kept").
    order = jnp.argsort(~keep_bkt, axis=-1, stable=True)[..., :m]
    lengths = jnp.sum(keep_bkt, axis=-1, dtype=jnp.int32)
    filled = jnp.arange(m) < lengths[..., None]
    k_bkmh = jnp.take_along_axis(k_btkh.swapaxes(1, 2), order[..., None], axis=2)
    v_bkmh = jnp.take_along_axis(v_btkh.swapaxes(1, 2), order[..., None], axis=2)
    pos = jnp.where(filled, jnp.take_along_axis(
        jnp.broadcast_to(positions_bt[:, None], (b, kh, t)), order, axis=2), EMPTY)
    dtype = cache["k"].dtype
    new = dict(cache)
    new["k"] = jax.lax.dynamic_update_slice_in_dim(cache["k"], k_bkmh.astype(dtype), 0, axis=2)
    new["v"] = jax.lax.dynamic_update_slice_in_dim(cache["v"], v_bkmh.astype(dtype), 0, axis=2)
    new["pos"] = jax.lax.dynamic_update_slice_in_dim(cache["pos"], pos.astype(jnp.int32), 0,
                                                     axis=2)
    new["lengths"], new["end"] = lengths, cache["end"] + t
    return o_btnh.astype(q_btnh.dtype), new

  def _write(self, cache, k_btkh, v_btkh, positions_bt):
    """Appends t tokens after each head's filled slots (dropped past the last slot)."""
    b, t, kh, _ = k_btkh.shape
    slot = cache["lengths"][..., None] + jnp.arange(t)  # [b, k, t]
    bi, hi = jnp.arange(b)[:, None, None], jnp.arange(kh)[None, :, None]
    dtype = cache["k"].dtype
    new = dict(cache)
    new["k"] = cache["k"].at[bi, hi, slot].set(k_btkh.swapaxes(1, 2).astype(dtype), mode="drop")
    new["v"] = cache["v"].at[bi, hi, slot].set(v_btkh.swapaxes(1, 2).astype(dtype), mode="drop")
    new["pos"] = cache["pos"].at[bi, hi, slot].set(
        jnp.broadcast_to(positions_bt[:, None], (b, kh, t)).astype(jnp.int32), mode="drop")
    new["lengths"], new["end"] = cache["lengths"] + t, cache["end"] + t
    return new

  def _step(self, q_btnh, k_btkh, v_btkh, positions_bt, cache):
    """One decode token: write it, then read each head's filled slots."""
    new = self._write(cache, k_btkh, v_btkh, positions_bt)
    lengths = jnp.minimum(new["lengths"], cache["k"].shape[2])
    o_btnh = decode_lib.decode_attention(q_btnh, new["k"].astype(q_btnh.dtype),
                                         new["v"].astype(q_btnh.dtype), lengths,
                                         implementation=self.decode_implementation)
    read_k = jnp.mean(lengths.astype(jnp.float32), axis=0) / (cache["end"] + 1)
    self.kv_read.set_value(jnp.repeat(read_k, self.num_heads // self.num_kv_heads))
    return o_btnh.astype(q_btnh.dtype), new

  def _append(self, q_btnh, k_btkh, v_btkh, positions_bt, cache):
    """A chunk after a filled cache: every kept token and the chunk's earlier tokens."""
    b, t, kh, _ = k_btkh.shape
    dtype = q_btnh.dtype
    k_all = jnp.concatenate([cache["k"].astype(dtype), k_btkh.swapaxes(1, 2)], axis=2)
    v_all = jnp.concatenate([cache["v"].astype(dtype), v_btkh.swapaxes(1, 2)], axis=2)
    pos_all = jnp.concatenate(
        [cache["pos"], jnp.broadcast_to(positions_bt[:, None], (b, kh, t)).astype(jnp.int32)],
        axis=2)
    o_btnh = decode_lib.decode_attention(
        q_btnh, k_all, v_all, jnp.full((b, kh), k_all.shape[2], jnp.int32),
        q_positions=positions_bt, kv_positions=pos_all,
        implementation=self.decode_implementation)
    return o_btnh.astype(q_btnh.dtype), self._write(cache, k_btkh, v_btkh, positions_bt)


@register_attention("ada_snapkv")
class AdaSnapKVAttention(SnapKVAttention):
  """Ada-SnapKV: SnapKV with per-head capacities (module docstring)."""

  method = "Ada-SnapKV"
  adaptive = True
  OPTIONS = ("min_head_capacity_ratio",)  # And SnapKV's.

  def __init__(self, model_config: Any, *, layer_index: int | None, rngs: nnx.Rngs):
    super().__init__(model_config, layer_index=layer_index, rngs=rngs)
    ratio = self._option(model_config, "min_head_capacity_ratio", 0.2)
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float, np.number)) or not (
        0.0 <= ratio <= 1.0):
      raise ValueError(f"Ada-SnapKV: min_head_capacity_ratio must be in [0, 1], got {ratio}")
    self.min_ratio = float(ratio)

  def head_slots(self, max_len: int) -> int:
    return min(max_len, snapkv_lib.max_head_capacity(
        self.token_capacity, self.min_ratio, self.local_window, self.prefix_tokens,
        self.num_kv_heads))

  def keep(self, q_btnh, k_btkh):
    return snapkv_lib.select_adaptive(
        q_btnh, k_btkh, capacity=self.token_capacity, window=self.window,
        kernel_size=self.kernel_size, local_window=self.local_window,
        prefix_tokens=self.prefix_tokens, min_ratio=self.min_ratio)


DECODE_KINDS = ("ada_snapkv", "quest", "snapkv")


def decode_cores(model: nnx.Module) -> list[SparseDecodeAttention]:
  return [m for _, m in nnx.iter_modules(model) if isinstance(m, SparseDecodeAttention)]


def decode_stats(model: nnx.Module) -> dict:
  """{'kv_read': float (mean over layers and heads of the last decode step), 'per_layer':
  [L, n]} of a model's sparse decode cores."""
  cores = decode_cores(model)
  if not cores:
    raise ValueError("the model has no sparse decode core: set config.model.attention.kind "
                     f"to one of {', '.join(DECODE_KINDS)}")
  per_layer = np.concatenate([np.asarray(c.kv_read.get_value()).reshape(-1, c.num_heads)
                              for c in cores])
  return {"kv_read": float(per_layer.mean()), "per_layer": per_layer}

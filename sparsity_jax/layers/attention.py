"""Multi-head attention with grouped-query heads, and the attention-core interface.

The projections (q, k, v, o) and RoPE live in :class:`Attention`. What happens between
the projected q/k/v and the output, the *core*, is pluggable: every sparse method
(routing, MoA, SparseD, ...) is an :class:`AttentionCore` registered under a name and
selected by ``config.model.attention.kind``. Dense attention is the first core.

Legend: b batch, t query length, s key length, e embed, n query heads, k kv heads,
h head dim.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sparsity_jax import axes, parallel
from sparsity_jax.layers import rope
from sparsity_jax.sparsity import masks


class AttentionCore(nnx.Module):
  """Interface of an attention core.

  ``__call__(q_btnh, k_bskh, v_bskh, *, positions_bt, causal) -> o_btnh``: q/k already
  carry RoPE; ``positions_bt`` are the absolute positions of the queries (and, for
  self-attention, of the keys). A core may hold state (e.g. k-means centroids) as
  non-``Param`` nnx Variables and may add auxiliary losses with :func:`sow_aux_loss`.

  ``OPTIONS``: the ``config.model.attention`` keys a core class reads itself (besides
  ``kind``); a core takes those of its base classes too, and
  :func:`make_attention_core` refuses any other key (a misspelt option would otherwise do
  nothing). Every registered class declares its own, even when empty.
  """

  OPTIONS: tuple[str, ...] = ()

  def __call__(self, q_btnh, k_bskh, v_bskh, *, positions_bt, causal: bool) -> jax.Array:
    raise NotImplementedError  # Abstract: subclasses implement it.

  # ---- incremental decoding (causal models) -----------------------------------------
  # A cache is a plain dict of arrays owned by the caller (so it can be donated and
  # sharded) and holds the number of tokens seen under "end"; a core that keeps a
  # different cache (per-head ragged, per-cluster, ...) overrides both methods.

  def cache_capacity(self, cache) -> int:
    """Tokens the cache can hold (static: from its shapes; works on stacked caches too)."""
    return cache["v"].shape[-2]

  def init_cache(self, batch: int, max_len: int, *, num_kv_heads: int, head_dim: int,
                 dtype) -> dict[str, jax.Array]:
    """Full KV cache, laid out for the decode step's two matrix products: keys
    transposed, k [b, k, h, max_len], values v [b, k, max_len, h], and the number of
    cached tokens ("end"). (XLA's CPU dot would otherwise transpose the whole cache of
    every layer on every token.)"""
    return {"k": jnp.zeros((batch, num_kv_heads, head_dim, max_len), dtype),
            "v": jnp.zeros((batch, num_kv_heads, max_len, head_dim), dtype),
            "end": jnp.zeros((), jnp.int32)}

  def cached_call(self, q_btnh, k_btkh, v_btkh, *, positions_bt, cache):
    """Appends t new tokens (at cache['end']) and attends over everything cached.

    Returns (o_btnh, new cache). Keys are cached after RoPE; slot j holds position j and
    a query sees the keys up to its own position. Long chunks (t >= ``flash_min_len``)
    run the block-sparse flash kernel with a causal rule on positions (memory linear in
    t); shorter ones (decode: t = 1) a masked softmax over the cache.
    """
    end = cache["end"]
    overflow = check_cache_room(end, q_btnh.shape[1], self.cache_capacity(cache))
    k_cache = jax.lax.dynamic_update_slice_in_dim(
        cache["k"], k_btkh.astype(cache["k"].dtype).transpose(0, 2, 3, 1), end, axis=3)
    v_cache = jax.lax.dynamic_update_slice_in_dim(
        cache["v"], v_btkh.astype(cache["v"].dtype).swapaxes(1, 2), end, axis=2)
    # Without the barrier XLA duplicates each in-place update into its two consumers (the
    # returned cache and the attention), which copies the whole cache of every layer.
    k_cache, v_cache = jax.lax.optimization_barrier((k_cache, v_cache))
    new_cache = {"k": k_cache, "v": v_cache, "end": end + q_btnh.shape[1]}
    t, s = q_btnh.shape[1], v_cache.shape[2]
    slot_pos_s = jnp.arange(s, dtype=jnp.int32)
    if self._flash_for_cache(t):
      from pallas_kernels import block_sparse
      # Empty slots get a position past every query, so the causal rule drops them.
      kv_pos_b1s = jnp.broadcast_to(jnp.where(slot_pos_s < end + t, slot_pos_s, 2**30 - 1),
                                    (q_btnh.shape[0], 1, s))
      mask = block_sparse.from_positions(positions_bt[:, None, :], kv_pos_b1s,
                                         block_q=_FLASH_BLOCK, block_k=_FLASH_BLOCK,
                                         causal=True)
      o_btnh = block_sparse.attention(q_btnh, k_cache.transpose(0, 3, 1, 2).astype(q_btnh.dtype),
                                      v_cache.swapaxes(1, 2).astype(q_btnh.dtype), mask)
    else:
      allowed_bts = ((slot_pos_s[None, None, :] <= positions_bt[:, :, None])
                     & (slot_pos_s < end + t))
      o_btnh = _grouped_attention(q_btnh, k_cache, v_cache, allowed_bts)
    return poison_on_overflow(o_btnh, overflow), new_cache

  def _flash_for_cache(self, t: int) -> bool:
    """Whether a chunk of t tokens goes through the flash kernel (see cached_call)."""
    return jax.default_backend() == "cpu" and t >= _FLASH_MIN_LEN


# Dense causal attention on CPU switches to the block-sparse flash kernel (exact, with a
# causal mask) from this many queries: jax.nn.dot_product_attention materialises every
# score there, and at SmolLM2's shapes the kernel took 0.2-0.3x its time from 1024 tokens
# (0.66x at 512; docs/benchmarks.md, "Real model").
_FLASH_MIN_LEN = 1024
_FLASH_BLOCK = 128


def _grouped_attention(q_btnh, k_bkhs, v_bksh, allowed_bts) -> jax.Array:
  """Softmax attention of q [b, t, n, h] over a cache of keys k [b, k, h, s] (transposed)
  and values v [b, k, s, h], GQA groups of n // k query heads per kv head, where
  ``allowed_bts``; rows with no allowed key are 0.

  Both products take the cache in the layout it is stored in, and the softmax is
  normalised after the second product (on [.., h], not [.., s]): no per-token copy of
  the cache or of the probabilities.
  """
  b, t, n, h = q_btnh.shape
  k = k_bkhs.shape[1]
  q_bkgth = q_btnh.reshape(b, t, k, n // k, h).transpose(0, 2, 3, 1, 4) * (h ** -0.5)
  scores = jnp.einsum("bkgth,bkhs->bkgts", q_bkgth.astype(q_btnh.dtype),
                      k_bkhs.astype(q_btnh.dtype), preferred_element_type=jnp.float32)
  allowed = allowed_bts[:, None, None]
  scores = jnp.where(allowed, scores, -jnp.inf)
  top = jnp.max(scores, axis=-1, keepdims=True)
  p = jnp.where(allowed, jnp.exp(scores - jnp.where(jnp.isfinite(top), top, 0.0)), 0.0)
  o_bkgth = jnp.einsum("bkgts,bksh->bkgth", p.astype(v_bksh.dtype), v_bksh,
                       preferred_element_type=jnp.float32)
  o_bkgth = o_bkgth / jnp.maximum(jnp.sum(p, axis=-1, keepdims=True), 1e-30)
  return o_bkgth.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h).astype(q_btnh.dtype)


class CacheOverflowError(ValueError):
  """An append would write past the number of tokens a decoding cache was made for."""


def check_cache_room(end, t: int, capacity) -> jax.Array | bool:
  """Guards an append of ``t`` tokens to a cache that holds ``end`` of ``capacity`` tokens.

  Every core's ``cached_call`` calls it before writing; overflow is never silent:

  * ``end`` concrete (``model.decode`` called eagerly, and ``generation.generate``, which
    also checks lengths in Python before it starts): raises CacheOverflowError.
  * ``t > capacity`` (static shapes): raises, also under jit.
  * ``end`` traced (inside jit): jitted code cannot raise on a traced value, so this
    returns a traced flag and the core fills its output with NaN (``poison_on_overflow``).
    The cache's ``end`` keeps counting past ``capacity``, so every later call is
    poisoned too: NaN logits mean "the cache overflowed" (or compare ``end`` with the
    capacity after the call). We chose this over ``checkify`` (it would change every
    caller's signature) and host callbacks (asynchronous, not on every backend): a
    NaN cannot be mistaken for a prediction and costs one select.

  Returns the overflow flag (a Python False when known to be fine).
  """
  if not isinstance(capacity, jax.core.Tracer):
    capacity = int(capacity)
    if t > capacity:
      raise CacheOverflowError(f"{t} new tokens do not fit in a cache made for {capacity}: "
                               "create it with a larger max_len (model.init_cache)")
  if isinstance(end, jax.core.Tracer) or isinstance(capacity, jax.core.Tracer):
    return end + t > capacity
  end = int(end)
  if end + t > capacity:
    raise CacheOverflowError(f"cache overflow: {end} cached + {t} new tokens exceed the "
                             f"capacity of {int(capacity)} (model.init_cache(batch, max_len)); "
                             "create the cache with a larger max_len")
  return False


def poison_on_overflow(x: jax.Array, overflow) -> jax.Array:
  """``x``, or NaN everywhere when ``overflow`` (a traced flag from check_cache_room)."""
  if overflow is False:
    return x
  return jnp.where(overflow, jnp.asarray(jnp.nan, x.dtype), x)


_REGISTRY: dict[str, Callable[..., AttentionCore]] = {}


def register_attention(kind: str):
  """Class decorator: makes an AttentionCore available as ``attention.kind=kind``."""

  def wrap(cls):
    if kind in _REGISTRY:
      raise ValueError(f"attention kind {kind!r} is registered twice")
    if "OPTIONS" not in cls.__dict__:
      raise TypeError(f"attention core {cls.__name__} ({kind!r}) must declare OPTIONS: the "
                      "config.model.attention keys it reads (() for none)")
    _REGISTRY[kind] = cls
    return cls

  return wrap


def attention_kinds() -> tuple[str, ...]:
  return tuple(sorted(_REGISTRY))


def attention_options(kind: str) -> tuple[str, ...]:
  """The ``config.model.attention`` keys the core ``kind`` takes (``kind`` included)."""
  keys = ["kind"]
  for cls in reversed(_REGISTRY[kind].__mro__):
    keys += [k for k in cls.__dict__.get("OPTIONS", ()) if k not in keys]
  return tuple(keys)


def make_attention_core(model_config: Any, layer_index: int | None,
                        rngs: nnx.Rngs) -> AttentionCore:
  """The configured core of layer ``layer_index``; None: one core for every layer (the
  stacked layers of scan_layers), which a core whose structure depends on the layer must
  refuse rather than silently build layer 0's."""
  kind = model_config.attention.get("kind", "dense")
  if kind not in _REGISTRY:
    raise ValueError(f"config.model.attention.kind={kind!r} is unknown; "
                     f"registered kinds: {', '.join(attention_kinds())}")
  allowed = attention_options(kind)
  unknown = sorted(set(model_config.attention) - set(allowed))
  if unknown:  # E.g. snapkv's token_capacity given to quest would silently do nothing.
    what = kind if "kind" in model_config.attention else "dense (no kind given)"
    raise ValueError(f"config.model.attention: {what} takes no key(s) {unknown}; its keys: "
                     f"{', '.join(allowed)}")
  return _REGISTRY[kind](model_config, layer_index=layer_index, rngs=rngs)


class AuxLoss(nnx.Intermediate):
  """Auxiliary losses a layer adds to the training objective (summed by the model)."""


def add_aux_loss(module: nnx.Module, name: str, value) -> None:
  """Appends `value` to the module's AuxLoss `name`; the train step pops them all.

  What `Module.sow` did outside `nnx.capture` (deprecated since flax 0.12.12),
  written out so it behaves the same on every flax >= 0.12.
  """
  if hasattr(module, name):
    getattr(module, name).set_value(getattr(module, name).get_value() + (value,))
  else:
    setattr(module, name, AuxLoss((value,)))


@register_attention("dense")
class DenseAttention(AttentionCore):
  """Full softmax attention.

  ``attention.dense_kernel`` picks the kernel: ``auto`` (default) runs causal
  self-attention of at least ``attention.flash_min_len`` tokens (default 1024) through
  the block-sparse flash kernel with a full causal mask on CPU (exact; memory linear in
  length), and everything else through ``jax.nn.dot_product_attention`` (cuDNN or XLA on
  accelerators); ``xla`` always uses the latter, ``block_sparse`` always the former for
  causal attention.
  """

  OPTIONS = ("dense_kernel", "flash_min_len")

  def __init__(self, model_config: Any, *, layer_index: int | None, rngs: nnx.Rngs):
    del layer_index, rngs
    opts = model_config.attention
    self.dense_kernel = opts.get("dense_kernel", "auto")
    if self.dense_kernel not in ("auto", "xla", "block_sparse"):
      raise ValueError(f"config.model.attention.dense_kernel={self.dense_kernel!r}; use auto, "
                       "xla or block_sparse")
    default = _FLASH_MIN_LEN if self.dense_kernel == "auto" else 1
    self.flash_min_len = int(opts.get("flash_min_len", default))
    if self.dense_kernel == "xla":
      self.flash_min_len = 2**31 - 1

  def _use_flash(self, t: int) -> bool:
    if self.dense_kernel == "auto" and jax.default_backend() != "cpu":
      return False
    return t >= self.flash_min_len

  def __call__(self, q_btnh, k_bskh, v_bskh, *, positions_bt, causal: bool) -> jax.Array:
    del positions_bt  # Positions are implicit: query i and key i are the same token.
    t, s = q_btnh.shape[1], k_bskh.shape[1]
    if causal and t == s and self._use_flash(t):
      from pallas_kernels import block_sparse
      mask = block_sparse.causal(t, block_q=_FLASH_BLOCK, block_k=_FLASH_BLOCK)
      return block_sparse.attention(q_btnh, k_bskh, v_bskh, mask)
    return jax.nn.dot_product_attention(q_btnh, k_bskh, v_bskh, is_causal=causal)

  def _flash_for_cache(self, t: int) -> bool:
    return self._use_flash(t)


class Attention(nnx.Module):
  """Projections + RoPE around a pluggable core."""

  def __init__(self, model_config: Any, *, layer_index: int | None, rngs: nnx.Rngs):
    cfg = model_config
    e, n, k, h = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    init = nnx.initializers.lecun_normal(in_axis=0, out_axis=(1, 2))
    pd = cfg.param_dtype
    self.dtype = cfg.dtype
    self.rope_theta = cfg.rope_theta
    scaling = getattr(cfg, "rope_scaling", None)  # e.g. Llama 3 frequency scaling.
    self.rope_scaling = tuple(sorted(scaling.items())) if scaling else None  # Hashable.
    self.causal = cfg.causal
    self.q_proj = nnx.Param(init(rngs.params(), (e, n, h), pd),
                            logical_axes=(axes.EMBED, axes.HEADS, axes.HEAD_DIM))
    self.k_proj = nnx.Param(init(rngs.params(), (e, k, h), pd),
                            logical_axes=(axes.EMBED, axes.KV_HEADS, axes.HEAD_DIM))
    self.v_proj = nnx.Param(init(rngs.params(), (e, k, h), pd),
                            logical_axes=(axes.EMBED, axes.KV_HEADS, axes.HEAD_DIM))
    out_init = nnx.initializers.lecun_normal(in_axis=(0, 1), out_axis=2)
    self.o_proj = nnx.Param(out_init(rngs.params(), (n, h, e), pd),
                            logical_axes=(axes.HEADS, axes.HEAD_DIM, axes.EMBED))
    if cfg.qkv_bias:  # Qwen2-style biases on q, k, v.
      self.q_bias = nnx.Param(jnp.zeros((n, h), pd), logical_axes=(axes.HEADS, axes.HEAD_DIM))
      self.k_bias = nnx.Param(jnp.zeros((k, h), pd), logical_axes=(axes.KV_HEADS, axes.HEAD_DIM))
      self.v_bias = nnx.Param(jnp.zeros((k, h), pd), logical_axes=(axes.KV_HEADS, axes.HEAD_DIM))
    else:
      self.q_bias = self.k_bias = self.v_bias = None
    self.core = make_attention_core(cfg, layer_index, rngs)

  def project_qkv(self, x_bte: jax.Array, positions_bt: jax.Array):
    """q [b,t,n,h], k/v [b,t,k,h] with RoPE applied to q and k."""
    cast = lambda name: masks.weight(self, name).astype(self.dtype)  # Masked when sparse.
    q = jnp.einsum("bte,enh->btnh", x_bte, cast("q_proj"))
    k = jnp.einsum("bte,ekh->btkh", x_bte, cast("k_proj"))
    v = jnp.einsum("bte,ekh->btkh", x_bte, cast("v_proj"))
    if self.q_bias is not None:
      q, k, v = q + cast("q_bias"), k + cast("k_bias"), v + cast("v_bias")
    q = rope.apply_rope(q, positions_bt, self.rope_theta, self.rope_scaling)
    k = rope.apply_rope(k, positions_bt, self.rope_theta, self.rope_scaling)
    q = parallel.constrain(q, (axes.BATCH, axes.LENGTH, axes.ACT_HEADS, axes.HEAD_DIM))
    k = parallel.constrain(k, (axes.BATCH, axes.KV_LENGTH, axes.ACT_KV_HEADS, axes.HEAD_DIM))
    v = parallel.constrain(v, (axes.BATCH, axes.KV_LENGTH, axes.ACT_KV_HEADS, axes.HEAD_DIM))
    return q, k, v

  def __call__(self, x_bte: jax.Array, positions_bt: jax.Array, cache=None):
    """Returns the output [b, t, e], or (output, new cache) when ``cache`` is given."""
    q, k, v = self.project_qkv(x_bte, positions_bt)
    if cache is not None:
      if not self.causal:
        raise ValueError("KV caches are for causal models; a bidirectional model recomputes "
                         "the whole sequence at every step")
      o_btnh, cache = self.core.cached_call(q, k, v, positions_bt=positions_bt, cache=cache)
      return self._output(o_btnh), cache
    return self._output(self.core(q, k, v, positions_bt=positions_bt, causal=self.causal))

  def init_cache(self, batch: int, max_len: int):
    return self.core.init_cache(batch, max_len, num_kv_heads=self.k_proj.get_value().shape[1],
                                head_dim=self.k_proj.get_value().shape[2], dtype=self.dtype)

  def _output(self, o_btnh: jax.Array) -> jax.Array:
    o_btnh = parallel.constrain(o_btnh, (axes.BATCH, axes.LENGTH, axes.ACT_HEADS, axes.HEAD_DIM))
    b, t, n, h = o_btnh.shape  # One [n*h, e] matrix: no per-call relayout of o_proj.
    return jnp.einsum("btf,fe->bte", o_btnh.reshape(b, t, n * h).astype(self.dtype),
                      masks.weight(self, "o_proj").reshape(n * h, -1).astype(self.dtype))

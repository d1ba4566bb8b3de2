"""Training-free sparse prefill for any imported causal model: FlexPrefill, Vertical-Slash,
block top-k, PBS-Attn and AnchorAttention as attention cores.

Each method is a pattern builder in :mod:`sparsity_jax.patterns` (activations in, kept
tiles or key lists out) plus a core here, selected by ``config.model.attention.kind``:

  ``flexprefill``  ``vertical_slash``  ``block_topk``  ``pbs``  ``anchor``

and used by loading a pretrained model with it, e.g.
``load_pretrained("smollm2", attention={"kind": "flexprefill", "gamma": 0.9})``.

What the cores share (:class:`PrefillAttention`, a :class:`DenseAttention`):

  * ``__call__`` (a whole causal sequence): inputs of at most ``dense_len`` tokens run
    dense (each method's official fallback for short inputs, overridable); longer ones
    select a pattern from the post-RoPE q / k of this call and compute it with
    pallas_kernels (block_sparse for tiles, stripe for key lists).
  * decoding uses the inherited dense KV cache (keys cached transposed). A prompt into an
    empty cache runs the sparse prefill (``lax.cond`` on the cache being empty), then
    writes its keys and values; single tokens and chunks appended to a filled cache
    (q_len != kv_len) attend densely, as the official code does.
  * statistics of the last multi-token call (one-token decode steps leave them) in nnx
    Variables: ``density`` [n], the fraction of causal (query, key) pairs computed per
    query head (1 on the dense path), and
    ``sparse_calls``, how many calls took the sparse path. :func:`prefill_stats`
    collects them from a model. Read them after an eager or ``nnx.jit`` call.

Every core also exposes ``select(q, k)`` -> pattern, ``allowed(pattern, t)`` -> bool
[b, n, t, t] (the computed causal pairs, O(t^2): tests and measurement) and
``attend(q, k, v, pattern)``, so that a core's output can be checked against the dense
masked reference and a pattern's attention recall measured.

Common config keys (``config.model.attention``): ``kind``; ``implementation`` (kernel
backend, None = platform default); ``dense_len`` (inputs of at most this many tokens run
dense; default per method); ``dense_kernel`` / ``flash_min_len`` as for the dense core.
Method keys are listed on each class.

Legend: b batch, t length, n query heads, k kv heads, h head dim.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pallas_kernels import block_sparse, stripe
from sparsity_jax.layers.attention import DenseAttention, register_attention
from sparsity_jax.patterns import anchor as anchor_lib
from sparsity_jax.patterns import block_topk as block_topk_lib
from sparsity_jax.patterns import flexprefill as flexprefill_lib
from sparsity_jax.patterns import pbs as pbs_lib
from sparsity_jax.patterns import prefill as prefill_lib
from sparsity_jax.patterns import vertical_slash as vertical_slash_lib


class PrefillStats(nnx.Variable):
  """Statistics of a prefill core's last call (not parameters; never trained)."""


class PrefillAttention(DenseAttention):
  """Base of the training-free prefill cores (see the module docstring)."""

  OPTIONS = ("implementation", "dense_len")

  method = "prefill"

  def __init__(self, model_config: Any, *, layer_index: int, rngs: nnx.Rngs):
    super().__init__(model_config, layer_index=layer_index, rngs=rngs)
    opts = model_config.attention
    self.num_heads = int(model_config.num_heads)
    self.implementation = opts.get("implementation", None)
    dense_len = opts.get("dense_len", None)
    self.dense_len_override = prefill_lib.check_positive("dense_len", dense_len,
                                                         allow_none=True)
    self.density = PrefillStats(jnp.ones((self.num_heads,), jnp.float32))
    self.sparse_calls = PrefillStats(jnp.zeros((), jnp.int32))

  # ---- what a method defines ---------------------------------------------------------

  def default_dense_len(self) -> int:
    """Inputs of at most this many tokens run dense (the method's official fallback)."""
    raise NotImplementedError

  def select(self, q_btnh, k_btkh) -> dict:
    """The pattern of one prefill (a pytree of arrays)."""
    raise NotImplementedError

  def attend(self, q_btnh, k_btkh, v_btkh, pattern: dict) -> jax.Array:
    """Attention of the prefill over the pattern, o [b, t, n, h]."""
    raise NotImplementedError

  def allowed(self, pattern: dict, length: int) -> jax.Array:
    """bool [b|1, n, t, t]: the causal pairs the pattern computes. O(t^2)."""
    raise NotImplementedError

  def pairs(self, pattern: dict, length: int) -> jax.Array:
    """float32 [b|1, n]: causal pairs the pattern computes (cheap: from tiles / lists)."""
    raise NotImplementedError

  # ---- shared ------------------------------------------------------------------------

  @property
  def dense_len(self) -> int:
    if self.dense_len_override is not None:
      return self.dense_len_override
    return int(self.default_dense_len())

  def runs_dense(self, length: int) -> bool:
    return length <= self.dense_len

  def prefill(self, q_btnh, k_btkh, v_btkh) -> tuple[jax.Array, jax.Array]:
    """(o [b, t, n, h], density [n]) of one sparse prefill (no dense fallback)."""
    t = q_btnh.shape[1]
    pattern = self.select(q_btnh, k_btkh)
    o_btnh = self.attend(q_btnh, k_btkh, v_btkh, pattern)
    pairs = jnp.broadcast_to(self.pairs(pattern, t), (q_btnh.shape[0], self.num_heads))
    density = jnp.mean(pairs, axis=0) / prefill_lib.causal_pair_count(t)
    return o_btnh.astype(q_btnh.dtype), density.astype(jnp.float32)

  def __call__(self, q_btnh, k_bskh, v_bskh, *, positions_bt, causal: bool) -> jax.Array:
    if not causal:
      raise ValueError(f"{self.method} is a causal prefill method; the model is bidirectional")
    t, s = q_btnh.shape[1], k_bskh.shape[1]
    if t != s:
      raise ValueError(f"{self.method}: __call__ attends a whole sequence (got {t} queries, "
                       f"{s} keys); chunks go through cached_call")
    if self.runs_dense(t):
      self.density.set_value(jnp.ones((self.num_heads,), jnp.float32))
      return super().__call__(q_btnh, k_bskh, v_bskh, positions_bt=positions_bt, causal=causal)
    o_btnh, density = self.prefill(q_btnh, k_bskh, v_bskh)
    self.density.set_value(density)
    self.sparse_calls.set_value(self.sparse_calls.get_value() + 1)
    return o_btnh

  def cached_call(self, q_btnh, k_btkh, v_btkh, *, positions_bt, cache):
    """Dense KV cache; a prompt into an empty cache is prefilled through the pattern."""
    t = q_btnh.shape[1]
    dense = lambda q, k, v, pos, c: DenseAttention.cached_call(self, q, k, v, positions_bt=pos,
                                                               cache=c)
    if t == 1:  # A decode step: dense, and the statistics keep describing the prompt.
      return dense(q_btnh, k_btkh, v_btkh, positions_bt, cache)
    if self.runs_dense(t):
      self.density.set_value(jnp.ones((self.num_heads,), jnp.float32))
      return dense(q_btnh, k_btkh, v_btkh, positions_bt, cache)

    def empty(q, k, v, pos, c):
      del pos  # A prompt into an empty cache sits at positions 0..t-1 (model.decode).
      o_btnh, density = self.prefill(q, k, v)
      return o_btnh, _append(c, k, v), density, jnp.ones((), jnp.int32)

    def filled(q, k, v, pos, c):
      o_btnh, new_cache = dense(q, k, v, pos, c)
      return (o_btnh, new_cache, jnp.ones((self.num_heads,), jnp.float32),
              jnp.zeros((), jnp.int32))

    o_btnh, new_cache, density, sparse = jax.lax.cond(
        cache["end"] == 0, empty, filled, q_btnh, k_btkh, v_btkh, positions_bt, cache)
    self.density.set_value(density)
    self.sparse_calls.set_value(self.sparse_calls.get_value() + sparse)
    return o_btnh, new_cache


def _append(cache, k_btkh, v_btkh):
  """The dense cache with t new keys / values written at cache['end'] (base layout)."""
  end = cache["end"]
  k_cache = jax.lax.dynamic_update_slice_in_dim(
      cache["k"], k_btkh.astype(cache["k"].dtype).transpose(0, 2, 3, 1), end, axis=3)
  v_cache = jax.lax.dynamic_update_slice_in_dim(
      cache["v"], v_btkh.astype(cache["v"].dtype).swapaxes(1, 2), end, axis=2)
  return {"k": k_cache, "v": v_cache, "end": end + k_btkh.shape[1]}


def prefill_cores(model: nnx.Module) -> list[PrefillAttention]:
  return [m for _, m in nnx.iter_modules(model) if isinstance(m, PrefillAttention)]


def prefill_stats(model: nnx.Module) -> dict:
  """{'density': float (mean over layers and heads of the last call), 'per_layer': [L, n],
  'sparse_calls': [L]} of a model's prefill cores (stacked layers give [L, ...] leaves)."""
  cores = prefill_cores(model)
  if not cores:
    raise ValueError("the model has no prefill attention core: set config.model.attention.kind "
                     f"to one of {', '.join(PREFILL_KINDS)}")
  per_layer = np.concatenate([np.asarray(c.density.get_value()).reshape(-1, c.num_heads)
                              for c in cores])
  calls = np.concatenate([np.asarray(c.sparse_calls.get_value()).reshape(-1) for c in cores])
  return {"density": float(per_layer.mean()), "per_layer": per_layer, "sparse_calls": calls}


# ---- Sparse Frontier baselines ---------------------------------------------------------


@register_attention("vertical_slash")
class VerticalSlashAttention(PrefillAttention):
  """MInference's Vertical-Slash (patterns/vertical_slash.py) on the stripe kernel.

  Config: ``vertical_size`` (512), ``slash_size`` (512), ``last_q`` (256, the Sparse
  Frontier's approximation_size), ``block_size`` (64: query block and slash range width).
  Dense for inputs of at most ``last_q`` tokens (the estimate would be the whole input).
  """

  method = "Vertical-Slash"
  OPTIONS = ("vertical_size", "slash_size", "last_q", "block_size")

  def __init__(self, model_config: Any, *, layer_index: int, rngs: nnx.Rngs):
    super().__init__(model_config, layer_index=layer_index, rngs=rngs)
    a = model_config.attention
    self.vertical_size = prefill_lib.check_positive("vertical_size", a.get("vertical_size", 512))
    self.slash_size = prefill_lib.check_positive("slash_size", a.get("slash_size", 512))
    self.last_q = prefill_lib.check_positive("last_q", a.get("last_q", 256))
    self.block_size = prefill_lib.check_positive("block_size", a.get("block_size", 64))
    if self.vertical_size < vertical_slash_lib.FORCED_VERTICALS or (
        self.slash_size < vertical_slash_lib.FORCED_SLASHES):
      raise ValueError(f"Vertical-Slash forces the first {vertical_slash_lib.FORCED_VERTICALS} "
                       f"keys and {vertical_slash_lib.FORCED_SLASHES} diagonals in: vertical_size "
                       f">= {vertical_slash_lib.FORCED_VERTICALS} and slash_size >= "
                       f"{vertical_slash_lib.FORCED_SLASHES} (got {self.vertical_size}, "
                       f"{self.slash_size})")

  def default_dense_len(self) -> int:
    return max(self.last_q, vertical_slash_lib.FORCED_SLASHES)

  def select(self, q_btnh, k_btkh) -> dict:
    return vertical_slash_lib.select(q_btnh, k_btkh, vertical_size=self.vertical_size,
                                     slash_size=self.slash_size, last_q=self.last_q,
                                     block_size=self.block_size)

  def attend(self, q_btnh, k_btkh, v_btkh, pattern):
    return stripe.attention(q_btnh, k_btkh, v_btkh, pattern["indices"], pattern["counts"],
                            block_q=self.block_size, causal=True,
                            implementation=self.implementation)

  def allowed(self, pattern, length):
    return vertical_slash_lib.allowed(pattern, length, self.block_size)

  def pairs(self, pattern, length):
    return vertical_slash_lib.pairs(pattern, length, self.block_size)


class _TileCore(PrefillAttention):
  """A core whose pattern is kept causal tiles {'bits': [b, n, nb, nb]} of ``block_size``."""

  OPTIONS = ()

  block_size: int

  def max_per_row(self, length: int) -> int | None:
    return None

  def attend(self, q_btnh, k_btkh, v_btkh, pattern):
    t = q_btnh.shape[1]
    mask = prefill_lib.causal_block_mask(pattern["bits"], t, self.block_size,
                                         max_per_row=self.max_per_row(t))
    return block_sparse.attention(q_btnh, k_btkh, v_btkh, mask,
                                  implementation=self.implementation)

  def allowed(self, pattern, length):
    return prefill_lib.tiles_to_dense(pattern["bits"], length, self.block_size)

  def pairs(self, pattern, length):
    return prefill_lib.tile_pairs(pattern["bits"], length, self.block_size)


@register_attention("block_topk")
class BlockTopKAttention(_TileCore):
  """MInference's block-sparse prefill (patterns/block_topk.py) on the block-sparse kernel.

  Config: ``block_size`` (16, the Sparse Frontier's chunk_size), ``top_k`` (64 blocks per
  query block). Dense when every row keeps all its causal blocks anyway
  (t <= block_size * (top_k - 1)).
  """

  method = "block top-k"
  OPTIONS = ("block_size", "top_k")

  def __init__(self, model_config: Any, *, layer_index: int, rngs: nnx.Rngs):
    super().__init__(model_config, layer_index=layer_index, rngs=rngs)
    a = model_config.attention
    self.block_size = prefill_lib.check_positive("block_size", a.get("block_size", 16))
    self.top_k = prefill_lib.check_positive("top_k", a.get("top_k", 64))
    if self.top_k < block_topk_lib.FORCED:
      raise ValueError(f"block top-k: top_k must be >= {block_topk_lib.FORCED} (sink, diagonal, "
                       f"sub-diagonal blocks are always kept), got {self.top_k}")

  def default_dense_len(self) -> int:
    # With at most top_k causal key blocks per row every block is kept: dense result.
    return self.block_size * self.top_k

  def max_per_row(self, length):
    return block_topk_lib.max_per_row(length, self.block_size, self.top_k)

  def select(self, q_btnh, k_btkh) -> dict:
    return block_topk_lib.select(q_btnh, k_btkh, block_size=self.block_size, top_k=self.top_k)


# ---- FlexPrefill -------------------------------------------------------------------------


@register_attention("flexprefill")
class FlexPrefillAttention(_TileCore):
  """FlexPrefill (patterns/flexprefill.py) on the block-sparse kernel.

  Config: ``block_size`` (128), ``gamma`` (0.95, in (0, 1]), ``tau`` (0.1, in [0, 1]),
  ``min_budget`` (1024 tokens), ``max_budget`` (None: no cap), ``budget_block`` (128: the
  official's tokens per budget block). Defaults are the paper's runs (gamma 0.95 for
  LLaMA-3.1 / GLM-4, 0.9 for Yi / Qwen2). Dense up to max(2 * block_size, min_budget
  rounded up to blocks) tokens, the official fallback.
  """

  method = "FlexPrefill"
  OPTIONS = ("block_size", "gamma", "tau", "min_budget", "max_budget", "budget_block")

  def __init__(self, model_config: Any, *, layer_index: int, rngs: nnx.Rngs):
    super().__init__(model_config, layer_index=layer_index, rngs=rngs)
    a = model_config.attention
    self.block_size = prefill_lib.check_positive("block_size", a.get("block_size", 128))
    self.gamma = prefill_lib.check_fraction("gamma", a.get("gamma", 0.95))
    self.tau = float(a.get("tau", 0.1))
    if not 0.0 <= self.tau <= 1.0:
      raise ValueError(f"tau must be in [0, 1], got {self.tau}")
    self.min_budget = prefill_lib.check_positive("min_budget", a.get("min_budget", 1024),
                                                 allow_none=True)
    self.max_budget = prefill_lib.check_positive("max_budget", a.get("max_budget", None),
                                                 allow_none=True)
    if self.min_budget is not None and self.max_budget is not None and (
        self.min_budget > self.max_budget):
      raise ValueError(f"min_budget ({self.min_budget}) must not exceed max_budget "
                       f"({self.max_budget})")
    self.budget_block = prefill_lib.check_positive(
        "budget_block", a.get("budget_block", flexprefill_lib.BUDGET_BLOCK))

  def default_dense_len(self) -> int:
    return flexprefill_lib.dense_len(self.block_size, self.min_budget)

  def select(self, q_btnh, k_btkh) -> dict:
    return flexprefill_lib.select(q_btnh, k_btkh, block_size=self.block_size, gamma=self.gamma,
                                  tau=self.tau, min_budget=self.min_budget,
                                  max_budget=self.max_budget, budget_block=self.budget_block)


# ---- PBS-Attn ----------------------------------------------------------------------------


@register_attention("pbs")
class PBSAttention(PrefillAttention):
  """PBS-Attn (patterns/pbs.py): block-sparse attention over segment-wise permuted keys.

  Config: ``block_size`` (128), ``segment_size`` (256, a block multiple), ``threshold``
  (0.9, top-p in (0, 1]), ``force_first_block`` (True), ``permute`` (True; False selects on
  the original order: the MeanPooling ablation). Dense up to ``segment_size`` tokens.
  The kernel reads the keys and values gathered into each query head's permuted order
  (causal by original position inside the own segment); permuted queries (the pattern's
  ``q_perm``, identity unless a pattern built with one is passed to ``attend``) get their
  outputs put back in order.
  """

  method = "PBS-Attn"
  OPTIONS = ("block_size", "segment_size", "threshold", "force_first_block", "permute")

  def __init__(self, model_config: Any, *, layer_index: int, rngs: nnx.Rngs):
    super().__init__(model_config, layer_index=layer_index, rngs=rngs)
    a = model_config.attention
    self.block_size = int(a.get("block_size", 128))
    self.segment_size = int(a.get("segment_size", 256))
    pbs_lib.check_sizes(self.block_size, self.segment_size)
    self.threshold = prefill_lib.check_fraction("threshold", a.get("threshold", 0.9))
    self.force_first_block = bool(a.get("force_first_block", True))
    self.permute = bool(a.get("permute", True))

  def default_dense_len(self) -> int:
    return self.segment_size

  def select(self, q_btnh, k_btkh) -> dict:
    return pbs_lib.select(q_btnh, k_btkh, block_size=self.block_size,
                          segment_size=self.segment_size, threshold=self.threshold,
                          force_first_block=self.force_first_block, permute_keys=self.permute)

  def attend(self, q_btnh, k_btkh, v_btkh, pattern):
    t, n = q_btnh.shape[1], q_btnh.shape[2]
    perm, q_perm = pattern["perm"], pattern["q_perm"]
    k_p = pbs_lib.permute(prefill_lib.repeat_kv(k_btkh, n), perm)
    v_p = pbs_lib.permute(prefill_lib.repeat_kv(v_btkh, n), perm)
    mask = pbs_lib.block_mask(pattern, t, self.block_size, self.segment_size)
    o_p = block_sparse.attention(pbs_lib.permute(q_btnh, q_perm), k_p, v_p, mask,
                                 implementation=self.implementation)
    inverse = jnp.argsort(q_perm, axis=-1).astype(jnp.int32)  # Slot of each position.
    return pbs_lib.permute(o_p, inverse)

  def allowed(self, pattern, length):
    return pbs_lib.allowed(pattern, length, self.block_size, self.segment_size)

  def pairs(self, pattern, length):
    return pbs_lib.pairs(pattern, length, self.block_size, self.segment_size)


# ---- AnchorAttention ---------------------------------------------------------------------


@register_attention("anchor")
class AnchorAttention(PrefillAttention):
  """AnchorAttention (patterns/anchor.py): init + local windows on the block-sparse kernel,
  the selected key columns on the stripe kernel, merged by log-sum-exp.

  Config: ``block_size`` (128), ``step`` (16; big block S = block_size * step), ``theta``
  (12.0, natural-log units), ``candidates`` ('released' or 'all'). Dense below 3 S tokens
  (identical result: the windows cover every causal key there).
  """

  method = "AnchorAttention"
  OPTIONS = ("block_size", "step", "theta", "candidates")

  def __init__(self, model_config: Any, *, layer_index: int, rngs: nnx.Rngs):
    super().__init__(model_config, layer_index=layer_index, rngs=rngs)
    a = model_config.attention
    self.block_size = a.get("block_size", 128)
    self.step = a.get("step", 16)
    self.theta = float(a.get("theta", 12.0))
    self.candidates = a.get("candidates", "released")
    anchor_lib.check(self.block_size, self.step, self.theta, self.candidates)

  def default_dense_len(self) -> int:
    return anchor_lib.dense_len(self.block_size, self.step)

  def select(self, q_btnh, k_btkh) -> dict:
    return anchor_lib.select(q_btnh, k_btkh, block_size=self.block_size, step=self.step,
                             theta=self.theta, candidates=self.candidates)

  def attend(self, q_btnh, k_btkh, v_btkh, pattern):
    t = q_btnh.shape[1]
    windows = anchor_lib.window_bits(t, self.block_size, self.step)[None, None]
    mask = prefill_lib.causal_block_mask(windows, t, self.block_size)
    o_a, lse_a = block_sparse.attention(q_btnh, k_btkh, v_btkh, mask, return_lse=True,
                                        implementation=self.implementation)
    o_b, lse_b = stripe.attention(q_btnh, k_btkh, v_btkh, pattern["indices"], pattern["counts"],
                                  block_q=self.block_size * self.step, causal=True,
                                  return_lse=True, implementation=self.implementation)
    return stripe.merge_partials(o_a, lse_a, o_b, lse_b)[0]

  def allowed(self, pattern, length):
    return anchor_lib.allowed(pattern, length, self.block_size, self.step)

  def pairs(self, pattern, length):
    return anchor_lib.pairs(pattern, length, self.block_size, self.step)


PREFILL_KINDS = ("anchor", "block_topk", "flexprefill", "pbs", "vertical_slash")

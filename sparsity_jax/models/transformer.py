"""Decoder-only Transformer LM (pre-norm, RMSNorm, RoPE, SwiGLU, GQA).

Legend: b batch, t length, e embed, v vocab.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.core import FrozenDict

from sparsity_jax import axes, parallel
from sparsity_jax.layers import attention as attention_lib
from sparsity_jax.layers import rope
from sparsity_jax.layers.mlp import SwiGLU
from sparsity_jax.layers.norms import RMSNorm
from sparsity_jax.sparsity import masks as sparsity_masks
from sparsity_jax.sparsity import spec as sparsity_spec

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Static description of a Transformer; built from ``config.model`` and validated."""

  vocab_size: int
  num_layers: int
  d_model: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  max_len: int
  rope_theta: float = 10_000.0
  norm_eps: float = 1e-6
  tie_embeddings: bool = True
  qkv_bias: bool = False
  causal: bool = True
  scan_layers: bool = False
  remat: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  # Hashable (FrozenDict) so that graphdefs holding the config can be static jit arguments.
  attention: Mapping[str, Any] = dataclasses.field(
      default_factory=lambda: FrozenDict({"kind": "dense"}))
  # RoPE frequency scaling, a Hugging Face rope_scaling dict (e.g. Llama 3's); None: none.
  rope_scaling: Mapping[str, Any] | None = None
  # Weight masks (sparsity_jax.sparsity.SparsitySpec fields: targets, pattern, sparsity);
  # None: dense. The model is built with all-True masks on the targeted weights (model
  # state, saved in checkpoints); pruning (launch/prune.py) sets them.
  weight_sparsity: Mapping[str, Any] | None = None

  def __post_init__(self):
    for name in ("vocab_size", "num_layers", "d_model", "num_heads", "num_kv_heads", "head_dim",
                 "mlp_dim", "max_len"):
      if int(getattr(self, name)) <= 0:
        raise ValueError(f"config.model.{name} must be positive, got {getattr(self, name)}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"config.model.num_heads={self.num_heads} must be a multiple of "
                       f"num_kv_heads={self.num_kv_heads} (grouped-query attention)")
    if not isinstance(self.attention, FrozenDict):
      object.__setattr__(self, "attention", FrozenDict(self.attention))
    if self.rope_scaling is not None and not isinstance(self.rope_scaling, FrozenDict):
      object.__setattr__(self, "rope_scaling", FrozenDict(self.rope_scaling))
    if self.weight_sparsity is not None:
      spec = sparsity_spec.SparsitySpec.from_mapping(self.weight_sparsity)  # Validates.
      object.__setattr__(self, "weight_sparsity",
                         None if spec is None else FrozenDict(spec.to_dict()))
    if self.head_dim % 2:
      raise ValueError(f"config.model.head_dim={self.head_dim} must be even (RoPE)")
    try:
      rope.scaling_type(self.rope_scaling)
    except ValueError as e:
      raise ValueError(f"config.model.rope_scaling: {e}") from None

  @classmethod
  def from_config(cls, model_config: Any) -> "ModelConfig":
    """From an ml_collections ConfigDict (or mapping); dtype names become jnp dtypes."""
    values = dict(model_config.to_dict() if hasattr(model_config, "to_dict") else model_config)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
      raise ValueError(f"config.model has unknown fields {unknown}; known: {sorted(known)}")
    for key in ("dtype", "param_dtype"):
      if key in values and isinstance(values[key], str):
        if values[key] not in _DTYPES:
          raise ValueError(f"config.model.{key}={values[key]!r}; use one of {sorted(_DTYPES)}")
        values[key] = _DTYPES[values[key]]
    values["attention"] = FrozenDict(values.get("attention") or {"kind": "dense"})
    if values.get("weight_sparsity") is not None:
      values["weight_sparsity"] = FrozenDict(values["weight_sparsity"])
    return cls(**values)

  def num_params(self) -> int:
    e, f, n, k, h = self.d_model, self.mlp_dim, self.num_heads, self.num_kv_heads, self.head_dim
    per_layer = e * h * (n + 2 * k) + n * h * e + 3 * e * f + 2 * e
    head = 0 if self.tie_embeddings else e * self.vocab_size
    return self.vocab_size * e + self.num_layers * per_layer + e + head


class Block(nnx.Module):
  """x + attn(norm(x)), then x + mlp(norm(x))."""

  def __init__(self, cfg: ModelConfig, *, layer_index: int | None, rngs: nnx.Rngs):
    self.attn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=cfg.param_dtype)
    self.attn = attention_lib.Attention(cfg, layer_index=layer_index, rngs=rngs)
    self.mlp_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=cfg.param_dtype)
    self.mlp = SwiGLU(cfg.d_model, cfg.mlp_dim, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                      rngs=rngs)

  def __call__(self, x_bte: jax.Array, positions_bt: jax.Array, cache=None):
    """Returns x [b, t, e], or (x, new cache) when ``cache`` is given."""
    attn = self.attn(self.attn_norm(x_bte), positions_bt, cache)
    if cache is not None:
      attn, cache = attn
    x_bte = parallel.constrain(x_bte + attn, (axes.BATCH, axes.LENGTH, axes.ACT_EMBED))
    x_bte = x_bte + self.mlp(self.mlp_norm(x_bte))
    x_bte = parallel.constrain(x_bte, (axes.BATCH, axes.LENGTH, axes.ACT_EMBED))
    return x_bte if cache is None else (x_bte, cache)


class TransformerLM(nnx.Module):
  """tokens [b, t] -> logits [b, t, v] (float32).

  With ``scan_layers`` the blocks are stacked along a leading LAYERS axis and applied
  with jax.lax.scan (one compiled body, fast compiles for deep models); otherwise they are a
  Python list (each layer may differ, e.g. sparse heads only in the last layers).
  ``remat`` recomputes each block's activations in the backward pass.
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = nnx.Param(
        nnx.initializers.normal(stddev=cfg.d_model**-0.5)(rngs.params(), (cfg.vocab_size, cfg.d_model),
                                            cfg.param_dtype),
        logical_axes=(axes.VOCAB, axes.EMBED))
    if cfg.scan_layers:
      @nnx.split_rngs(splits=cfg.num_layers)
      @nnx.vmap(in_axes=(0,), out_axes=0)
      def make_stack(rngs):
        # layer_index=None: one core for every stacked layer; a core whose structure
        # depends on the layer (routing_layers, MoA plans) refuses it.
        return Block(cfg, layer_index=None, rngs=rngs)

      self.layers = make_stack(rngs)
    else:
      self.layers = nnx.List([Block(cfg, layer_index=i, rngs=rngs) for i in range(cfg.num_layers)])
    self.final_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=cfg.param_dtype)
    if not cfg.tie_embeddings:
      self.lm_head = nnx.Param(
          nnx.initializers.lecun_normal()(rngs.params(), (cfg.d_model, cfg.vocab_size),
                                          cfg.param_dtype),
          logical_axes=(axes.EMBED, axes.VOCAB))
    if cfg.weight_sparsity:  # All-True masks beside the targeted weights (model state).
      sparsity_masks.attach(self, sparsity_spec.SparsitySpec.from_mapping(cfg.weight_sparsity))

  def embed_tokens(self, tokens_bt: jax.Array) -> jax.Array:
    check_token_ids(tokens_bt, self.cfg.vocab_size)
    x_bte = jnp.take(self.embed.get_value(), tokens_bt, axis=0).astype(self.cfg.dtype)
    return parallel.constrain(x_bte, (axes.BATCH, axes.LENGTH, axes.ACT_EMBED))

  def __call__(self, tokens_bt: jax.Array, positions_bt: jax.Array | None = None) -> jax.Array:
    return self.forward_embeddings(self.embed_tokens(tokens_bt), positions_bt)

  def init_cache(self, batch: int, max_len: int | None = None):
    """Per-layer attention caches for incremental decoding (a list, or stacked when scanned)."""
    max_len = self.cfg.max_len if max_len is None else max_len
    if self.cfg.scan_layers:
      graphdef, state = nnx.split(self.layers)
      one = lambda st: nnx.merge(graphdef, st).attn.init_cache(batch, max_len)
      return jax.vmap(one)(state)
    return [block.attn.init_cache(batch, max_len) for block in self.layers]

  def decode(self, tokens_bt: jax.Array, cache, positions_bt: jax.Array | None = None, *,
             last_only: bool = False):
    """Runs ``tokens_bt`` (a prompt, or one new token per row) against ``cache``.

    Positions default to the cache's length + arange(t). Returns (logits [b, t, v], cache);
    with ``last_only`` the logits of the last position only, [b, 1, v] (a prompt's output
    head then costs one row, not t: 20% of SmolLM2's prefill at 4k tokens). Appending past
    the cache's capacity raises when the cache length is concrete (an eager call) and
    gives NaN logits under jit (see attention.check_cache_room).
    """
    x_bte = self.embed_tokens(tokens_bt)
    first = _cache_end(cache)
    b, t = tokens_bt.shape
    attention_lib.check_cache_room(first, t, self._cache_capacity(cache))
    if positions_bt is None:
      positions_bt = jnp.broadcast_to(first + jnp.arange(t, dtype=jnp.int32), (b, t))
    return self._run_stack(x_bte, positions_bt, cache, last_only=last_only)

  def _cache_capacity(self, cache):
    if self.cfg.scan_layers:  # Stacked caches: every layer's core has the same layout.
      return self.layers.attn.core.cache_capacity(cache)
    return self.layers[0].attn.core.cache_capacity(cache[0])

  def forward_embeddings(self, x_bte: jax.Array, positions_bt: jax.Array | None = None):
    """Runs the stack on input embeddings (used by the causality-by-gradient test)."""
    b, t = x_bte.shape[:2]
    if t > self.cfg.max_len:
      raise ValueError(f"sequence length {t} exceeds config.model.max_len={self.cfg.max_len}")
    if positions_bt is None:
      positions_bt = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    return self._run_stack(x_bte, positions_bt, None)

  def forward_with_hidden(self, tokens_bt: jax.Array):
    """Logits and the hidden states of every block, as Hugging Face's
    ``output_hidden_states`` minus the embeddings: [L, b, t, e], entry l the output of
    block l + 1, the last one after the final norm (what distillation losses such as
    SquareHead compare)."""
    b, t = tokens_bt.shape
    positions_bt = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    return self._run_stack(self.embed_tokens(tokens_bt), positions_bt, None, collect=True)

  def _run_stack(self, x_bte, positions_bt, cache, *, last_only: bool = False,
                 collect: bool = False):
    def block_fn(graphdef, params, other, x, layer_cache):
      # Functional form of one block so that scan/remat see plain pytrees. The block's
      # non-Param state (e.g. k-means centroids) may change and is returned.
      block = nnx.merge(graphdef, params, other)
      out = block(x, positions_bt, layer_cache)
      y, new_cache = out if layer_cache is not None else (out, None)
      return y, nnx.state(block, nnx.Not(nnx.Param)), new_cache

    if self.cfg.remat:
      block_fn = jax.checkpoint(block_fn, static_argnums=(0,))
    if self.cfg.scan_layers:
      graphdef, params, other = nnx.split(self.layers, nnx.Param, ...)

      def scan_body(x, xs):
        y, new_other, new_cache = block_fn(graphdef, xs[0], xs[1], x, xs[2])
        return y, (new_other, new_cache, y if collect else None)

      x_bte, (new_other, cache, hidden) = jax.lax.scan(scan_body, x_bte,
                                                       (params, other, cache))
      if jax.tree.leaves(new_other):
        nnx.update(self.layers, new_other)
    else:
      new_caches, hidden = [], []
      for i, block in enumerate(self.layers):
        layer_cache = None if cache is None else cache[i]
        if self.cfg.remat:
          graphdef, params, other = nnx.split(block, nnx.Param, ...)
          x_bte, new_other, layer_cache = block_fn(graphdef, params, other, x_bte, layer_cache)
          if jax.tree.leaves(new_other):
            nnx.update(block, new_other)
        elif layer_cache is None:
          x_bte = block(x_bte, positions_bt)
        else:
          x_bte, layer_cache = block(x_bte, positions_bt, layer_cache)
        new_caches.append(layer_cache)
        hidden.append(x_bte)
      cache = None if cache is None else new_caches
      hidden = jnp.stack(hidden) if collect else None
    if last_only:
      x_bte = x_bte[:, -1:]
    x_bte = self.final_norm(x_bte)
    if self.cfg.tie_embeddings:  # Contract with the embedding as it is stored, [v, e]: a
      # transposed copy would move the whole matrix on every call (113 MB for SmolLM2).
      logits_btv = jnp.einsum("bte,ve->btv", x_bte, self.embed.get_value().astype(self.cfg.dtype),
                              preferred_element_type=jnp.float32)
    else:
      logits_btv = jnp.einsum("bte,ev->btv", x_bte,
                              sparsity_masks.weight(self, "lm_head").astype(self.cfg.dtype),
                              preferred_element_type=jnp.float32)
    logits_btv = parallel.constrain(logits_btv, (axes.BATCH, axes.LENGTH, axes.ACT_VOCAB))
    if collect:  # The last block's entry is its normed output (as HF's hidden_states).
      return logits_btv, hidden.at[-1].set(x_bte)
    return logits_btv if cache is None else (logits_btv, cache)


def check_token_ids(tokens, vocab_size: int, name: str = "token ids") -> None:
  """Raises if concrete token ids fall outside [0, vocab_size) (an out-of-range id would
  gather a NaN embedding, not fail); ids traced inside jit cannot be checked here."""
  if isinstance(tokens, jax.core.Tracer):
    return
  ids = np.asarray(tokens)
  if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
    raise ValueError(f"{name} must be in [0, {vocab_size}) (the model's vocab_size), got values "
                     f"in [{ids.min()}, {ids.max()}]")


def _cache_end(cache) -> jax.Array:
  """Number of tokens in a model cache (a list of layer caches, or them stacked when the
  layers are scanned). Every core's cache records it under 'end'."""
  if isinstance(cache, (list, tuple)):
    return cache[0]["end"]
  return cache["end"][0]

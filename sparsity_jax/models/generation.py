"""Autoregressive generation for causal LMs with the attention cores' KV caches.

Prefill runs the prompt through ``model.decode`` in one call; each new token is then one
``decode`` call of length 1. Both are jitted once (the cache is donated).

Legend: b batch, t length, v vocab.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparsity_jax.models.transformer import check_token_ids


@functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(3,))
def _decode(graphdef, state, tokens_bt, cache):
  model = nnx.merge(graphdef, state)
  model.eval()  # Generation never updates stateful layers (e.g. routing centroids).
  logits_btv, cache = model.decode(tokens_bt, cache)
  return logits_btv[:, -1], cache, nnx.state(model)


def _pick(logits_bv, temperature: float, rng):
  if temperature == 0:
    return jnp.argmax(logits_bv, axis=-1)
  return jax.random.categorical(rng, logits_bv / temperature, axis=-1)


def generate(model: nnx.Module, prompt_bt, max_new_tokens: int, *, temperature: float = 0.0,
             rng: jax.Array | None = None, max_len: int | None = None,
             timings: dict | None = None) -> np.ndarray:
  """Returns [b, prompt + max_new_tokens] tokens (greedy at temperature 0).

  ``timings``, if given, receives 'prefill_s' (prompt through the caches, first token's
  logits ready) and 'decode_s' (the remaining max_new_tokens - 1 decode calls).
  """
  prompt_bt = jnp.asarray(prompt_bt, jnp.int32)
  b, p = prompt_bt.shape
  total = p + max_new_tokens
  max_len = model.cfg.max_len if max_len is None else max_len
  if not model.cfg.causal:
    raise ValueError("KV-cache generation is for causal LMs; use models.diffusion.generate")
  if total > max_len:
    raise ValueError(f"prompt ({p}) + max_new_tokens ({max_new_tokens}) exceed max_len={max_len}")
  check_token_ids(prompt_bt, model.cfg.vocab_size, "prompt token ids")
  if max_new_tokens < 0 or temperature < 0:
    raise ValueError(f"max_new_tokens ({max_new_tokens}) and temperature ({temperature}) must "
                     "be >= 0")
  rng = jax.random.key(0) if rng is None else rng
  cache = model.init_cache(b, total)
  graphdef, state = nnx.split(model)
  start = time.perf_counter()
  logits_bv, cache, state = _decode(graphdef, state, prompt_bt, cache)
  if timings is not None:
    jax.block_until_ready(logits_bv)
    timings["prefill_s"] = time.perf_counter() - start
    start = time.perf_counter()
  out = [prompt_bt]
  for i in range(max_new_tokens):
    token_b = _pick(logits_bv, temperature, jax.random.fold_in(rng, i))
    out.append(token_b[:, None].astype(jnp.int32))
    if i + 1 < max_new_tokens:
      logits_bv, cache, state = _decode(graphdef, state, out[-1], cache)
  if timings is not None:
    jax.block_until_ready(out[-1])
    timings["decode_s"] = time.perf_counter() - start
  nnx.update(model, state)
  return np.asarray(jnp.concatenate(out, axis=1))

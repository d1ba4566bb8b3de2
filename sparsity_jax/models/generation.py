"""Autoregressive generation for causal LMs with the attention cores' KV caches.

Prefill runs the prompt through ``model.decode`` in one call; each new token is then one
``decode`` call of length 1. Sampling (greedy, temperature, top-p) happens inside the same
jitted step, so a token never leaves the device unless the caller streams it or stops at
EOS. The step takes the parameters as an argument and returns only the model's
non-parameter state (none for dense attention), and the cache is donated: nothing is
copied per token but the new cache entries.

Legend: b batch, t length, v vocab.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparsity_jax.models.transformer import check_token_ids


def sample(logits_bv: jax.Array, key: jax.Array, temperature, top_p) -> jax.Array:
  """Next tokens [b] from logits [b, v]: argmax when ``temperature == 0``, else a draw
  from softmax(logits / temperature) restricted to the smallest set of tokens whose
  probability reaches ``top_p`` (nucleus sampling; 1.0 keeps every token). Both may be
  traced scalars."""
  logits_bv = logits_bv.astype(jnp.float32)
  greedy_b = jnp.argmax(logits_bv, axis=-1)
  scaled_bv = logits_bv / jnp.maximum(temperature, 1e-6)
  probs_bv = jax.nn.softmax(scaled_bv, axis=-1)
  sorted_bv = jnp.sort(probs_bv, axis=-1)[:, ::-1]
  before_bv = jnp.cumsum(sorted_bv, axis=-1) - sorted_bv  # Mass of strictly likelier tokens.
  # The smallest probability still inside the nucleus (the top token always is).
  keep = jnp.maximum(jnp.sum(before_bv < top_p, axis=-1, keepdims=True), 1)
  floor_b1 = jnp.take_along_axis(sorted_bv, keep - 1, axis=-1)
  scaled_bv = jnp.where(probs_bv >= floor_b1, scaled_bv, -jnp.inf)
  drawn_b = jax.random.categorical(key, scaled_bv, axis=-1)
  return jnp.where(temperature > 0, drawn_b, greedy_b).astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(3,))
def _step(graphdef, params, rest, cache, tokens_bt, key, temperature, top_p):
  model = nnx.merge(graphdef, params, rest)
  model.eval()  # Generation never updates stateful layers (e.g. routing centroids).
  logits_btv, cache = model.decode(tokens_bt, cache, last_only=True)
  next_b = sample(logits_btv[:, -1], key, temperature, top_p)
  # NaN logits are a poisoned cache (attention.check_cache_room): -1 marks them.
  next_b = jnp.where(jnp.isnan(logits_btv[:, -1]).any(axis=-1), -1, next_b)
  return next_b, cache, nnx.state(model, nnx.Not(nnx.Param))


_COMPILED: dict = {}  # (graphdef, argument signature) -> compiled _step; see _compiled.


def _compiled(graphdef, *args):
  """``_step`` compiled ahead of time for these arguments (cached), so generation can time
  compilation apart from the prefill and decode calls.

  The returned function moves an argument to the sharding the executable was compiled
  for when it differs (under a mesh, the prefill's outputs come back sharded by the
  compiler's choice; a no-op on one device), as a jitted call would.
  """
  leaves, treedef = jax.tree.flatten(args)
  signature = tuple((x.shape, x.dtype, getattr(x, "sharding", None)) for x in leaves)
  key = (graphdef, treedef, signature)
  if key not in _COMPILED:
    if len(_COMPILED) > 64:  # Many shapes (e.g. a benchmark sweep): start over.
      _COMPILED.clear()
    compiled = _step.lower(graphdef, *args).compile()
    # None entries (arguments the executable does not read) stay in the list, so it lines
    # up with the arguments' leaves.
    shardings = jax.tree.leaves(compiled.input_shardings[0], is_leaf=lambda x: x is None)
    if len(shardings) != len(leaves):
      raise AssertionError(f"compiled step has {len(shardings)} input shardings for "
                           f"{len(leaves)} arguments")

    def call(*call_args, compiled=compiled, shardings=shardings):
      flat, tree = jax.tree.flatten(call_args)
      flat = [x if s is None or x.sharding == s else jax.device_put(x, s)
              for x, s in zip(flat, shardings)]
      return compiled(*jax.tree.unflatten(tree, flat))

    _COMPILED[key] = call
  return _COMPILED[key]


def check_length(model: nnx.Module, prompt_len: int, max_new_tokens: int,
                 max_len: int | None = None) -> int:
  """``prompt_len + max_new_tokens``, or a ValueError saying what to shorten."""
  limit = model.cfg.max_len if max_len is None else max_len
  total = prompt_len + max_new_tokens
  if prompt_len < 1:
    raise ValueError("the prompt is empty: give at least one token")
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  if total > limit:
    raise ValueError(f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) = "
                     f"{total} exceed the model's context of {limit} tokens; shorten the "
                     "prompt or generate fewer tokens")
  return total


def generate(model: nnx.Module, prompt_bt, max_new_tokens: int, *, temperature: float = 0.0,
             top_p: float = 1.0, rng: jax.Array | None = None, max_len: int | None = None,
             eos_id: int | None = None,
             on_token: Callable[[int, np.ndarray], None] | None = None,
             timings: dict | None = None) -> np.ndarray:
  """Continues ``prompt_bt`` [b, p] by up to ``max_new_tokens`` tokens.

  Args:
    model: a causal TransformerLM (any attention core with a cache).
    prompt_bt: int token ids [b, p].
    max_new_tokens: tokens to generate per row.
    temperature: 0 is greedy; > 0 samples from softmax(logits / temperature).
    top_p: nucleus threshold in (0, 1] (used when temperature > 0).
    rng: sampling key (default jax.random.key(0)).
    max_len: context limit (default ``model.cfg.max_len``).
    eos_id: stop a row at this token (it is kept; later positions repeat it) and stop
      generating once every row has stopped.
    on_token: ``on_token(i, tokens_b)`` after each new token (host ints), e.g. to stream.
    timings: receives 'compile_s' (compiling the prefill and decode steps; 0 when
      cached), 'prefill_s' (prompt through the caches, first token ready), 'decode_s'
      (the remaining decode calls) and 'new_tokens' (per row).

  Returns:
    int32 [b, p + n] with n <= max_new_tokens (n < max_new_tokens only with eos_id).

  Raises:
    ValueError: a bidirectional model, an empty prompt, bad sampling arguments, or more
      tokens than the context holds.
  """
  prompt_bt = jnp.asarray(prompt_bt, jnp.int32)
  if prompt_bt.ndim != 2:
    raise ValueError(f"prompt_bt must be [batch, length] token ids, got shape {prompt_bt.shape}")
  b, p = prompt_bt.shape
  if not model.cfg.causal:
    raise ValueError("KV-cache generation is for causal LMs; use models.diffusion.generate")
  if temperature < 0 or not 0 < top_p <= 1:
    raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
  total = check_length(model, p, max_new_tokens, max_len)
  check_token_ids(prompt_bt, model.cfg.vocab_size, "prompt token ids")
  rng = jax.random.key(0) if rng is None else rng
  temperature, top_p = jnp.float32(temperature), jnp.float32(top_p)
  cache = model.init_cache(b, total)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  watch = eos_id is not None or on_token is not None
  done_b = np.zeros((b,), bool)
  start = time.perf_counter()
  key = jax.random.fold_in(rng, 0)
  prefill = _compiled(graphdef, params, rest, cache, prompt_bt, key, temperature, top_p)
  decode = _compiled(graphdef, params, rest, cache, prompt_bt[:, :1], key, temperature, top_p)
  if timings is not None:
    timings["compile_s"] = time.perf_counter() - start
    start = time.perf_counter()
  token_b, cache, rest = prefill(params, rest, cache, prompt_bt, key, temperature, top_p)
  if timings is not None:
    jax.block_until_ready(token_b)
    timings["prefill_s"] = time.perf_counter() - start
    start = time.perf_counter()
  out = []
  for i in range(max_new_tokens):
    if watch:
      host_b = np.asarray(token_b)
      _check_not_poisoned(host_b, i)
      if eos_id is not None:
        host_b = np.where(done_b, eos_id, host_b)
        done_b |= host_b == eos_id
        token_b = jnp.asarray(host_b, jnp.int32)
      if on_token is not None:
        on_token(i, host_b)
    out.append(token_b)
    if i + 1 == max_new_tokens or (eos_id is not None and done_b.all()):
      break
    token_b, cache, rest = decode(params, rest, cache, token_b[:, None],
                                  jax.random.fold_in(rng, i + 1), temperature, top_p)
  if timings is not None:
    jax.block_until_ready(out[-1])
    timings["decode_s"] = time.perf_counter() - start
    timings["new_tokens"] = len(out)
  nnx.update(model, rest)
  new_bn = np.asarray(jnp.stack(out, axis=1))
  _check_not_poisoned(new_bn, int(np.argmax((new_bn < 0).any(axis=0))))
  return np.concatenate([np.asarray(prompt_bt), new_bn], axis=1)


def _check_not_poisoned(tokens, i: int) -> None:
  if (np.asarray(tokens) < 0).any():
    from sparsity_jax.layers.attention import CacheOverflowError
    raise CacheOverflowError(
        f"new token {i} came from NaN logits: a KV cache overflowed (a core's cache holds "
        "fewer tokens than this generation needs, e.g. snapkv's decode_room) or the model "
        "produced NaN; give the cache more room")


@dataclasses.dataclass
class TextResult:
  """A text generation and its speed (prefill and decode tokens per second)."""

  text: str
  prompt_tokens: int
  new_tokens: int
  prefill_s: float
  decode_s: float
  compile_s: float = 0.0

  @property
  def prefill_tokens_per_s(self) -> float:
    return self.prompt_tokens / max(self.prefill_s, 1e-9)

  @property
  def decode_tokens_per_s(self) -> float:  # The first new token comes with the prefill.
    return (self.new_tokens - 1) / max(self.decode_s, 1e-9) if self.new_tokens > 1 else 0.0

  def summary(self) -> str:
    return (f"[{self.prompt_tokens} prompt tokens, {self.new_tokens} new tokens; prefill "
            f"{self.prefill_tokens_per_s:.1f} tokens/s ({self.prefill_s:.2f} s), decode "
            f"{self.decode_tokens_per_s:.1f} tokens/s; compile {self.compile_s:.1f} s]")


def generate_text(model: nnx.Module, tokenizer, prompt, *, chat: bool = False,
                  system: str | None = None, max_new_tokens: int = 128,
                  temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                  stop_at_eos: bool = True,
                  stream: Callable[[str], None] | None = None) -> TextResult:
  """Generates a continuation of ``prompt`` (text) with a causal LM and its tokenizer.

  Args:
    model: a causal TransformerLM.
    tokenizer: an :class:`~sparsity_jax.checkpoints.HFTokenizer`, or the byte tokenizer
      (``data.tokenizer.ByteTokenizer``) of the project's own byte-level models.
    prompt: the text (bytes too for the byte tokenizer); with ``chat`` the user message, rendered with the tokenizer's chat
      template (an HFTokenizer with a template), after an optional ``system`` message.
    max_new_tokens, temperature, top_p, seed: see :func:`generate`.
    stop_at_eos: stop at the tokenizer's EOS token (not included in the text).
    stream: called with each new piece of text as soon as it decodes (whole characters).

  Returns:
    The generated text (special tokens skipped) and its timings.
  """
  from sparsity_jax.data.tokenizer import ByteTokenizer

  if isinstance(tokenizer, ByteTokenizer):
    if chat:
      raise ValueError("byte-level models have no chat template; drop chat")
    ids = (np.frombuffer(prompt, np.uint8).astype(np.int32) if isinstance(prompt, bytes)
           else tokenizer.encode(prompt))
    decode = tokenizer.decode
  else:
    if chat:
      messages = ([{"role": "system", "content": system}] if system else []) + [
          {"role": "user", "content": prompt}]
      ids = tokenizer.apply_chat_template(messages, tokenize=True)
    else:
      ids = tokenizer.encode(prompt)
    decode = lambda new: tokenizer.decode(new, skip_special_tokens=True)
  eos_id = tokenizer.eos_id if stop_at_eos else None
  new: list[int] = []
  shown = [""]

  def on_token(i, tokens_b):
    del i
    token = int(tokens_b[0])
    if token == eos_id:
      return
    new.append(token)
    text = decode(new)
    if stream is not None and not text.endswith("\ufffd"):  # Wait for whole characters.
      stream(text[len(shown[0]):])
      shown[0] = text

  timings: dict = {}
  generate(model, np.asarray(ids, np.int32)[None], max_new_tokens, temperature=temperature,
           top_p=top_p, rng=jax.random.key(seed), eos_id=eos_id, on_token=on_token,
           timings=timings)
  text = decode(new)
  if stream is not None and len(text) > len(shown[0]):
    stream(text[len(shown[0]):])
  return TextResult(text=text, prompt_tokens=len(ids), new_tokens=timings["new_tokens"],
                    prefill_s=timings["prefill_s"], decode_s=timings["decode_s"],
                    compile_s=timings["compile_s"])

"""Sampling from a masked-diffusion LM (LLaDA-style): semi-autoregressive denoising.

The model is the project's TransformerLM with ``causal=False``, trained with
``config.objective='masked_diffusion'`` (sparsity_jax/train/objectives.py). Generation
starts from the prompt followed by ``gen_length`` mask tokens. The generation is split into
blocks of ``block_length`` tokens, denoised left to right; each block gets
``steps / num_blocks`` steps, and each step commits the scheduled number of still-masked
tokens of the current block with the highest confidence (low-confidence remasking: the
probability of the predicted token). Committed tokens never change.

Legend: b batch, t length, v vocab.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparsity_jax.data import tokenizer
from sparsity_jax.models.transformer import check_token_ids

NEG_INF = -1e30  # Confidence of positions that may not be committed this step.


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
  """How to denoise. ``steps`` is the total over all blocks."""

  gen_length: int = 128
  steps: int = 128
  block_length: int = 32
  temperature: float = 0.0  # 0: greedy (deterministic).
  top_p: float | None = None  # Nucleus sampling when temperature > 0.
  mask_id: int = tokenizer.MASK_ID

  def __post_init__(self):
    if self.gen_length <= 0 or self.block_length <= 0 or self.steps <= 0:
      raise ValueError(f"gen_length, block_length and steps must be positive: {self}")
    if self.gen_length % self.block_length:
      raise ValueError(f"gen_length={self.gen_length} must be a multiple of "
                       f"block_length={self.block_length}")
    if self.steps % self.num_blocks:
      raise ValueError(f"steps={self.steps} must be divisible by the number of blocks "
                       f"gen_length / block_length = {self.num_blocks}")
    if self.steps_per_block > self.block_length:
      raise ValueError(f"{self.steps_per_block} steps per block exceed block_length="
                       f"{self.block_length}: some steps would commit nothing; lower steps")
    if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
    if self.temperature < 0:
      raise ValueError(f"temperature must be >= 0, got {self.temperature}")
    if self.mask_id < 0:
      raise ValueError(f"mask_id must be a token id (>= 0), got {self.mask_id}")

  @property
  def num_blocks(self) -> int:
    return self.gen_length // self.block_length

  @property
  def steps_per_block(self) -> int:
    return self.steps // self.num_blocks

  def transfer_schedule(self) -> list[int]:
    """Tokens committed at each step of a block: an even split, the remainder first."""
    base, extra = divmod(self.block_length, self.steps_per_block)
    return [base + (1 if i < extra else 0) for i in range(self.steps_per_block)]


def _filter_top_p(logits_btv: jax.Array, top_p: float) -> jax.Array:
  """Keeps the smallest set of tokens whose probability mass reaches top_p."""
  sorted_logits = jnp.sort(logits_btv, axis=-1)[..., ::-1]
  cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
  # The smallest logit still inside the nucleus is the cut-off.
  cutoff_index = jnp.sum(cum < top_p, axis=-1, keepdims=True)
  cutoff = jnp.take_along_axis(sorted_logits, cutoff_index, axis=-1)
  return jnp.where(logits_btv < cutoff, NEG_INF, logits_btv)


def denoise_step(logits_btv: jax.Array, x_bt: jax.Array, block_lo: jax.Array,
                 block_hi: jax.Array, num_commit: jax.Array, rng: jax.Array,
                 cfg: SamplerConfig) -> jax.Array:
  """One step of low-confidence remasking on given logits; returns the new tokens."""
  logits_btv = logits_btv.astype(jnp.float32)
  # Never "commit" the mask token itself: the position would stay masked forever.
  logits_btv = logits_btv.at[..., cfg.mask_id].set(NEG_INF)
  if cfg.temperature > 0:
    scaled = logits_btv / cfg.temperature
    if cfg.top_p is not None:
      scaled = _filter_top_p(scaled, cfg.top_p)
    pred_bt = jax.random.categorical(rng, scaled, axis=-1)
  else:
    pred_bt = jnp.argmax(logits_btv, axis=-1)
  probs_btv = jax.nn.softmax(logits_btv, axis=-1)
  conf_bt = jnp.take_along_axis(probs_btv, pred_bt[..., None], axis=-1)[..., 0]
  pos_t = jnp.arange(x_bt.shape[1])
  allowed_bt = (x_bt == cfg.mask_id) & (pos_t >= block_lo) & (pos_t < block_hi)
  conf_bt = jnp.where(allowed_bt, conf_bt, NEG_INF)
  # Rank positions by confidence (stable: ties go to the leftmost) and commit the top k.
  order_bt = jnp.argsort(-conf_bt, axis=-1, stable=True)
  rank_bt = jnp.argsort(order_bt, axis=-1)
  commit_bt = (rank_bt < num_commit) & allowed_bt
  return jnp.where(commit_bt, pred_bt.astype(x_bt.dtype), x_bt)


@dataclasses.dataclass
class GenerationResult:
  tokens: np.ndarray  # [b, prompt + gen_length]
  prompt_length: int
  step_seconds: list[float]
  history: list[np.ndarray] | None = None  # Tokens after each step, if requested.

  @property
  def generated(self) -> np.ndarray:
    return self.tokens[:, self.prompt_length:]


def generate(model: nnx.Module, prompt_bt: Any, cfg: SamplerConfig, *,
             rng: jax.Array | None = None, keep_history: bool = False,
             step_hook: Callable[[int, int], Any] | None = None,
             progress: bool = False) -> GenerationResult:
  """Denoises ``gen_length`` tokens after ``prompt_bt`` [b, p].

  ``step_hook(global_step, total_steps)`` runs before each step (SparseD uses it to
  switch its attention from dense to sparse); it may return a different model to run.
  """
  prompt_bt = np.asarray(prompt_bt, np.int32)
  if prompt_bt.ndim != 2:
    raise ValueError(f"prompt must be [batch, length], got shape {prompt_bt.shape}")
  b, p = prompt_bt.shape
  total = p + cfg.gen_length
  model_cfg = getattr(model, "cfg", None)
  if getattr(model_cfg, "causal", False):
    raise ValueError("diffusion sampling needs a bidirectional masked-diffusion model "
                     "(config.model.causal=False, objective='masked_diffusion')")
  vocab_size = getattr(model_cfg, "vocab_size", None)
  if vocab_size is not None:
    if not 0 <= cfg.mask_id < vocab_size:
      raise ValueError(f"SamplerConfig.mask_id={cfg.mask_id} is not a token of this model "
                       f"(vocab_size={vocab_size}); use the model's mask token id")
    check_token_ids(prompt_bt, vocab_size, "prompt token ids")
  max_len = getattr(model_cfg, "max_len", None)
  if max_len is not None and total > max_len:
    raise ValueError(f"prompt ({p}) + gen_length ({cfg.gen_length}) = {total} tokens exceed the "
                     f"model's context (max_len={max_len}); shorten the prompt or gen_length")
  rng = jax.random.key(0) if rng is None else rng
  x_bt = jnp.asarray(np.concatenate([prompt_bt, np.full((b, cfg.gen_length), cfg.mask_id,
                                                        np.int32)], axis=1))
  step_fn = _jitted_step(cfg)
  schedule = cfg.transfer_schedule()
  history, seconds = [], []
  global_step = 0
  bar = None
  if progress:
    from tqdm.auto import tqdm
    bar = tqdm(total=cfg.steps, desc="denoise", dynamic_ncols=True)
  for block in range(cfg.num_blocks):
    lo = p + block * cfg.block_length
    for num_commit in schedule:
      run_model = model
      if step_hook is not None:
        run_model = step_hook(global_step, cfg.steps) or model
      start = time.perf_counter()
      graphdef, state = nnx.split(run_model)
      x_bt, state = step_fn(graphdef, state, x_bt, lo, lo + cfg.block_length, num_commit,
                            jax.random.fold_in(rng, global_step))
      x_bt.block_until_ready()
      nnx.update(run_model, state)  # Layers may keep state across steps (SparseD patterns).
      seconds.append(time.perf_counter() - start)
      if keep_history:
        history.append(np.asarray(x_bt))
      global_step += 1
      if bar is not None:
        bar.update(1)
  if bar is not None:
    bar.close()
  return GenerationResult(np.asarray(x_bt), p, seconds, history if keep_history else None)


_STEP_CACHE: dict[SamplerConfig, Callable] = {}


def _jitted_step(cfg: SamplerConfig):
  if cfg not in _STEP_CACHE:

    @functools.partial(jax.jit, static_argnums=0)
    def step(graphdef, state, x_bt, lo, hi, num_commit, rng):
      model = nnx.merge(graphdef, state)
      logits_btv = model(x_bt)
      return denoise_step(logits_btv, x_bt, lo, hi, num_commit, rng, cfg), nnx.state(model)

    _STEP_CACHE[cfg] = step
  return _STEP_CACHE[cfg]


def generate_text(model: nnx.Module, prompt: str, cfg: SamplerConfig, *,
                  sparsed_skip: float | None = None, rng: jax.Array | None = None,
                  progress: bool = False) -> tuple[str, GenerationResult]:
  """Byte-tokenises ``prompt``, generates, and decodes the generated part.

  With ``sparsed_skip`` the model's SparseD cores run dense for that fraction of the
  steps, capture their patterns, then run sparse (the model needs attention kind
  'sparsed').
  """
  from sparsity_jax.layers import sparsed  # Local: keeps the sampler free of SparseD.

  ids = tokenizer.ByteTokenizer().encode(prompt)[None, :]
  hook = None
  if sparsed_skip is not None:
    hook = sparsed.sparsed_step_hook(model, ids.shape[1], sparsed_skip)
  result = generate(model, ids, cfg, rng=rng, step_hook=hook, progress=progress)
  return tokenizer.ByteTokenizer().decode(result.generated[0]), result

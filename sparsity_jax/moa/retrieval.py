"""Retrieval heads: the KV heads that look up distant evidence, kept at full span.

A variant of MoA, not the paper's method. MoA's profile scores a head by how much the
calibration responses' loss depends on its distant attention; on SmolLM2-135M-Instruct that
misses the few heads that copy a passkey or a value from far back (docs/results/moa.md:
the 50% plan cuts them and loses passkeys that a uniform window keeps). Retrieval heads
(Wu et al. 2024, "Retrieval Head Mechanistically Explains Long-Context Factuality";
DuoAttention, Xiao et al. 2024, gives them full attention and the rest a streaming window)
are found here from the dense model's attention mass on the evidence at the positions that
emit the answer, on generated passkey and key-value retrieval prompts (their own seed, so
never the evaluation's prompts). ``launch/moa.py --retrieval_heads=k`` keeps the k highest
KV heads at full span and lets the MoA search spread the rest of the budget.

Legend: L layers, K KV heads, n query heads, r answer-emitting rows, s keys, h head dim.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparsity_jax.evals import long_context as lc
from sparsity_jax.moa import profile as profile_lib

SEED_OFFSET = 7919  # Retrieval-head prompts never coincide with calibration or eval prompts.
TIE_RTOL, TIE_ATOL = 1e-6, 1e-9  # Scores this close rank by index, not by score.

log = logging.getLogger(__name__)
_warned: set[str] = set()  # A caller that selects per budget would repeat each warning.


@nnx.jit
def _queries_keys(prof, tokens_bt):
  from sparsity_jax.layers import moa as moa_layer
  prof(tokens_bt)
  cores = [m for _, m in nnx.iter_modules(prof) if isinstance(m, moa_layer.MoAProfileAttention)]
  return [c.qkvo.get_value()[:2] for c in cores]


def needle_attention(model, prompts) -> np.ndarray:
  """[L, K] the dense model's mean attention mass on each prompt's evidence from the
  positions that predict the answer tokens (teacher-forced), averaged over the prompts and
  over each KV head's query heads."""
  if not prompts:
    raise ValueError("needle_attention needs at least one prompt with evidence")
  prof = profile_lib.profiling_model(model)
  cfg = model.cfg
  group = cfg.num_heads // cfg.num_kv_heads
  total = np.zeros((cfg.num_layers, cfg.num_heads))
  for p in prompts:
    seq = np.concatenate([p.tokens, p.answer_tokens[:-1]])
    rows = np.arange(p.length - 1, len(seq))
    start, end = p.evidence
    for layer, (q, k) in enumerate(_queries_keys(prof, jnp.asarray(seq[None]))):
      q = np.asarray(q[0, rows], np.float32)  # [r, n, h]
      k = np.repeat(np.asarray(k[0], np.float32), group, axis=1)  # [s, n, h]
      logits = np.einsum("rnh,snh->nrs", q, k) / np.sqrt(q.shape[-1])
      logits = np.where(np.arange(len(seq))[None, None, :] <= rows[None, :, None], logits,
                        -np.inf)
      a = np.asarray(jax.nn.softmax(logits, axis=-1))
      total[layer] += a[..., start:end].sum(-1).mean(-1)
  return (total / len(prompts)).reshape(cfg.num_layers, cfg.num_kv_heads, group).mean(-1)


def prompts(tokenizer, length: int, num: int, *, seed: int = 0, chat: bool = False):
  """``num`` retrieval prompts of ``length`` tokens, passkey and key-value retrieval
  alternating, from seed ``seed + SEED_OFFSET``."""
  half = (num + 1) // 2
  seed = seed + SEED_OFFSET
  return (lc.make_prompts("passkey", tokenizer, length, half, seed=seed, chat=chat)
          + lc.make_prompts("kv_retrieval", tokenizer, length, num - half, seed=seed,
                            chat=chat))


def tied(a: float, b: float) -> bool:
  """Whether two head scores are equal up to float noise (TIE_RTOL, TIE_ATOL)."""
  return abs(a - b) <= max(TIE_ATOL, TIE_RTOL * max(abs(a), abs(b)))


def tie_groups(scores: np.ndarray) -> list[tuple[float, int]]:
  """[(score, count)] of every run of two or more tied scores, highest first."""
  values = np.sort(np.asarray(scores, np.float64).ravel())[::-1]
  groups, start = [], 0
  for i in range(1, len(values) + 1):
    if i == len(values) or not tied(values[i - 1], values[i]):
      if i - start > 1:
        groups.append((float(values[start]), i - start))
      start = i
  return groups


def select(scores: np.ndarray, num: int) -> np.ndarray:
  """bool [L, K]: the ``num`` KV heads with the highest scores (ties: lower index; a tie
  across the cut is logged as a warning, once per message)."""
  if not 0 <= num <= scores.size:
    raise ValueError(f"retrieval_heads={num} must be in [0, {scores.size}] (the model's KV "
                     "heads)")
  if not np.isfinite(scores).all():
    raise ValueError("retrieval scores hold NaN or inf (a profile of a diverged model?); "
                     "recompute them with the dense model")
  ranked = np.argsort(-scores.ravel(), kind="stable")
  order = ranked[:num]
  if 0 < num < scores.size:
    flat = scores.ravel()
    cut = float(flat[ranked[num - 1]])
    if tied(cut, float(flat[ranked[num]])):
      tie = [tied(cut, float(x)) for x in flat]
      inside = sum(tie[i] for i in order)
      message = (f"{sum(tie)} heads tie at score {cut:.6g} across the cut of {num}: picked "
                 f"by index (the {inside} lowest); scores that separate them (e.g. gates "
                 "trained longer) would rank them")
      if message not in _warned:
        _warned.add(message)
        log.warning(message)
  chosen = np.zeros(scores.size, bool)
  chosen[order] = True
  return chosen.reshape(scores.shape)

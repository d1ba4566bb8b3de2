"""SparseD patterns: head-specific block selections from one step's attention.

SparseD (Wang et al. 2025) runs a masked-diffusion LM densely for the first denoising
steps, then, at one switch step, scores every (query block, key block) tile of every
layer and head by the mean of its attention probabilities and keeps the top-scoring key
blocks of each query block for all remaining steps. Key blocks are chosen separately
over the prompt and over the generation ("isolated selection") and united:

  pass 1: softmax over all keys; top-k1 key blocks per query block, k1 = keep(nk);
          keep only prompt columns (blocks starting before the generation).
  pass 2: softmax over generation keys only; top-k2 generation blocks, k2 = keep(n_gen).

As the official code (SparseD_utils.create_attention_block_mask): keep(n) =
max(1, int(n * select) + 1), clipped to n (where the official torch.topk would fail,
e.g. select=1.0, which then keeps every block and equals dense attention exactly); a
tile's score is the mean over all block_size^2 entries of the zero-padded probability
matrix, so a partial last block (lengths not multiples of the block) is scored as the
official code scores it. A block that straddles the prompt/generation boundary counts
as prompt, as in the original code. Scores are scaled by 1/sqrt(head_dim) (the LLaDA
code uses 1/sqrt(num_heads); we follow the paper's text and the Dream code).

Legend: b batch, t query length, s key length, n query heads, k kv heads, d head dim,
i query block, j key block.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

NEG = -1e30


def generation_start_block(prompt_length: int, seq_length: int, block_size: int) -> int:
  """First key block that starts inside the generation (or the last block)."""
  num_blocks = -(-seq_length // block_size)
  return min(-(-prompt_length // block_size), num_blocks - 1)


def keep_count(num_blocks: int, select: float) -> int:
  """Key blocks kept per query block among ``num_blocks`` (official formula, clipped)."""
  return min(num_blocks, max(1, int(num_blocks * select) + 1))


def block_scores(q_btnd: jax.Array, k_bskd: jax.Array, *, block_size: int,
                 gen_start: int) -> tuple[jax.Array, jax.Array]:
  """Mean attention probability of each tile, [b, n, i, j] twice (all keys, gen keys).

  The mean is over block_size^2 entries, padding included as zeros (the official code
  pads the probabilities and averages whole tiles).

  Computed one query block at a time (lax.map), so at most [b, n, block, s] probabilities
  exist at once, never all heads' L x L.
  """
  b, t, n, d = q_btnd.shape
  s, kv_heads = k_bskd.shape[1], k_bskd.shape[2]
  k_bsnd = jnp.repeat(k_bskd, n // kv_heads, axis=2)  # Per query head, as Dream's repeat_kv.
  nq, nk = -(-t // block_size), -(-s // block_size)
  q_pad = jnp.pad(q_btnd, ((0, 0), (0, nq * block_size - t), (0, 0), (0, 0)))
  q_blocks = q_pad.reshape(b, nq, block_size, n, d).transpose(1, 0, 2, 3, 4)  # [i, b, q, n, d]
  key_pos = jnp.arange(s)
  is_gen_key = key_pos >= gen_start * block_size
  q_valid = jnp.clip(t - jnp.arange(nq) * block_size, 0, block_size)  # [i]
  scale = 1.0 / math.sqrt(d)

  def one_block(args):
    q_bqnd, i = args
    logits = jnp.einsum("bqnd,bsnd->bnqs", q_bqnd.astype(jnp.float32),
                        k_bsnd.astype(jnp.float32)) * scale
    p_all = jax.nn.softmax(logits, axis=-1)
    p_gen = jax.nn.softmax(jnp.where(is_gen_key, logits, NEG), axis=-1)
    row_ok = (jnp.arange(block_size) < q_valid[i])[None, None, :, None]

    def pool(p):
      p = jnp.where(row_ok, p, 0.0)
      p = jnp.pad(p, ((0, 0), (0, 0), (0, 0), (0, nk * block_size - s)))
      return p.reshape(b, n, block_size, nk, block_size).sum(axis=(2, 4))  # [b, n, j]

    count = float(block_size * block_size)
    return pool(p_all) / count, pool(p_gen) / count

  all_ibnj, gen_ibnj = jax.lax.map(one_block, (q_blocks, jnp.arange(nq)))
  return all_ibnj.transpose(1, 2, 0, 3), gen_ibnj.transpose(1, 2, 0, 3)


def _top_k_bits(scores_bnij: jax.Array, eligible_j: jax.Array, k: int) -> jax.Array:
  nk = scores_bnij.shape[-1]
  masked = jnp.where(eligible_j, scores_bnij, -jnp.inf)
  _, idx = jax.lax.top_k(masked, k)
  bits = jnp.zeros(scores_bnij.shape, bool)
  bits = jnp.any(idx[..., None] == jnp.arange(nk), axis=-2)
  return bits & eligible_j


def select_blocks(q_btnd: jax.Array, k_bskd: jax.Array, *, prompt_length: int,
                  block_size: int, select: float) -> jax.Array:
  """SparseD's kept tiles: bool [b, n, i, j] (isolated prompt / generation selection)."""
  if not 0.0 < select <= 1.0:
    raise ValueError(f"SparseD select must be in (0, 1], got {select}")
  s = k_bskd.shape[1]
  nk = -(-s // block_size)
  gen_start = generation_start_block(prompt_length, s, block_size)
  all_scores, gen_scores = block_scores(q_btnd, k_bskd, block_size=block_size,
                                        gen_start=gen_start)
  cols = jnp.arange(nk)
  k_prompt = keep_count(nk, select)
  k_gen = keep_count(nk - gen_start, select)
  bits = jnp.zeros(all_scores.shape, bool)
  if gen_start > 0:
    bits = _top_k_bits(all_scores, cols >= 0, k_prompt) & (cols < gen_start)
  return bits | _top_k_bits(gen_scores, cols >= gen_start, k_gen)


def max_blocks_per_row(seq_length: int, prompt_length: int, block_size: int,
                       select: float) -> int:
  """Static bound on kept key blocks per query block (the kernel table width)."""
  nk = -(-seq_length // block_size)
  gen_start = generation_start_block(prompt_length, seq_length, block_size)
  k_prompt = min(gen_start, keep_count(nk, select)) if gen_start > 0 else 0
  k_gen = keep_count(nk - gen_start, select)
  return k_prompt + k_gen

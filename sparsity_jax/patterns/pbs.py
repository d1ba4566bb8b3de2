"""PBS-Attn (Wang et al., 2025): block-sparse attention on a segment-wise permuted sequence.

As xinghaow99/pbs-attn @8ce8e024 (``pbs_attn/src/{pbs.py, permute_states.py, utils.py}``,
``src/kernels/permuted_block_sparse_attention.py``), per query head (the HF patch repeats
the KV heads first):

  1. permutation: score every key of the complete segments by the mean, over the last
     ``block_size`` queries, of softmax(q K^T / sqrt(d)) (fp32, no causal mask, keys of the
     complete segments only); inside each complete segment of ``segment_size`` keys sort
     the keys (and values) by score, descending. The trailing partial segment keeps its
     order. The released code does not permute the queries (``q_perm`` allows it: any
     permutation within segments);
  2. selection on the permuted sequence: mean-pool query and key blocks over zero-padded
     blocks, score / sqrt(d), softmax over the key blocks of *earlier* segments (causal,
     off the diagonal segment), and keep per query block the fewest blocks whose
     cumulative score reaches ``threshold`` (top-p); threshold 1 keeps every eligible
     block. The block holding original key 0 is forced in;
  3. compute: every block of the query's own segment, causal by *original* position
     (permuted key position <= query position), plus the selected blocks of earlier
     segments whole; permuted queries' outputs are put back in order.

Dense when t <= segment_size (the official fallback).

Legend: b batch, t length, n query heads, d head dim, i query block, j key block.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import block_sparse
from pallas_kernels.block_sparse import rules as rules_lib
from sparsity_jax.patterns import prefill


def check_sizes(block_size: int, segment_size: int) -> None:
  prefill.check_positive("block_size", block_size)
  prefill.check_positive("segment_size", segment_size)
  if segment_size % block_size:
    raise ValueError(f"segment_size ({segment_size}) must be a multiple of block_size "
                     f"({block_size})")


def identity(b: int, n: int, t: int) -> jax.Array:
  return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, n, t))


def permutation(q_btnd: jax.Array, k_btkd: jax.Array, *, block_size: int,
                segment_size: int) -> jax.Array:
  """int32 [b, n, t]: the original index of the key at each permuted position."""
  b, t, n, d = q_btnd.shape
  complete = t // segment_size
  if complete == 0 or (complete == 1 and t == segment_size):
    return identity(b, n, t)
  full = complete * segment_size
  last = q_btnd[:, t - min(block_size, t):].astype(jnp.float32) * (d ** -0.5)
  k = prefill.repeat_kv(k_btkd[:, :full], n).astype(jnp.float32)
  probs = jax.nn.softmax(jnp.einsum("brnd,btnd->bnrt", last, k), axis=-1)
  score = probs.mean(axis=-2).reshape(b, n, complete, segment_size)
  order = jnp.argsort(-score, axis=-1, stable=True).astype(jnp.int32)
  order = order + (jnp.arange(complete, dtype=jnp.int32) * segment_size)[:, None]
  rest = jnp.broadcast_to(jnp.arange(full, t, dtype=jnp.int32), (b, n, t - full))
  return jnp.concatenate([order.reshape(b, n, full), rest], axis=-1)


def permute(x_btnd: jax.Array, perm_bnt: jax.Array) -> jax.Array:
  """x[b, perm[b, n, s], n] -> [b, t, n, d] (per-head gather along the sequence)."""
  return jnp.take_along_axis(x_btnd, jnp.swapaxes(perm_bnt, 1, 2)[..., None], axis=1)


def segment_tiles(length: int, block_size: int, segment_size: int):
  """Host bool [nb, nb]: (same segment, key segment earlier) of each tile."""
  nb = prefill.num_blocks(length, block_size)
  seg = np.arange(nb) * block_size // segment_size
  return seg[:, None] == seg[None, :], seg[None, :] < seg[:, None]


def select_top_p(scores: jax.Array, threshold: float) -> jax.Array:
  """PBS's select_blocks: per row the fewest entries whose sorted running sum reaches
  ``threshold`` (nothing when it is never reached, e.g. an all-zero row)."""
  order = jnp.argsort(-scores, axis=-1, stable=True)
  running = jnp.cumsum(jnp.take_along_axis(scores, order, axis=-1), axis=-1)
  reached = running >= threshold
  first = jnp.argmax(reached, axis=-1)
  keep = (jnp.arange(scores.shape[-1]) <= first[..., None]) & reached.any(-1, keepdims=True)
  return jnp.put_along_axis(jnp.zeros_like(keep), order, keep, axis=-1, inplace=False)


def select(q_btnd: jax.Array, k_btkd: jax.Array, *, block_size: int = 128,
           segment_size: int = 256, threshold: float = 0.9, force_first_block: bool = True,
           permute_keys: bool = True, q_perm: jax.Array | None = None) -> dict:
  """PBS pattern of a prefill.

  Args:
    q_btnd: [b, t, n, d] queries (after RoPE); k_btkd: [b, t, k, d] keys.
    block_size, segment_size: blocks and permutation segments (segment a block multiple).
    threshold: top-p of the block selection, in (0, 1]; 1 keeps every eligible block.
    force_first_block: keep the block holding original key 0 (attention sink).
    permute_keys: False selects on the original order (the MeanPooling ablation).
    q_perm: optional int [b|1, n|1, t] permutation of the queries within segments (the
      original position of the query at each slot); None keeps them in order (official).

  Returns:
    {'perm': int32 [b, n, t] key permutation, 'q_perm': int32 [b, n, t],
     'bits': bool [b, n, nb, nb] selected tiles of earlier segments}.
  """
  prefill.check_prefill(q_btnd, k_btkd, "PBS-Attn")
  check_sizes(block_size, segment_size)
  threshold = prefill.check_fraction("threshold", threshold)
  q_btnd, k_btkd = jax.lax.stop_gradient(q_btnd), jax.lax.stop_gradient(k_btkd)
  b, t, n, d = q_btnd.shape
  if permute_keys:
    perm = permutation(q_btnd, k_btkd, block_size=block_size, segment_size=segment_size)
  else:
    perm = identity(b, n, t)
  q_perm = identity(b, n, t) if q_perm is None else jnp.broadcast_to(
      jnp.asarray(q_perm, jnp.int32), (b, n, t))
  q_pool = prefill.pool_tokens(permute(q_btnd, q_perm), block_size, mode="mean_padded")
  k_pool = prefill.pool_tokens(permute(prefill.repeat_kv(k_btkd, n), perm), block_size,
                               mode="mean_padded")
  _, earlier = segment_tiles(t, block_size, segment_size)
  scores = jnp.einsum("bind,bjnd->bnij", q_pool, k_pool) * (d ** -0.5)
  probs = jax.nn.softmax(jnp.where(jnp.asarray(earlier), scores, -jnp.inf), axis=-1)
  probs = jnp.nan_to_num(probs, nan=0.0)  # Rows with no earlier segment.
  if threshold == 1.0:
    bits = jnp.broadcast_to(jnp.asarray(earlier), probs.shape)
  else:
    bits = select_top_p(probs, threshold)
  if force_first_block:
    first = jnp.argmax(perm == 0, axis=-1) // block_size  # [b, n]
    nb = bits.shape[-1]
    bits = bits | (jnp.arange(nb) == first[..., None])[..., None, :]
  return {"perm": perm, "q_perm": q_perm, "bits": bits & jnp.asarray(earlier)}


def block_mask(pattern: dict, length: int, block_size: int,
               segment_size: int) -> block_sparse.BlockMask:
  """Kernel mask over (permuted queries, permuted keys): the own segment's tiles with the
  causal rule on original positions, the selected earlier tiles whole."""
  same, _ = segment_tiles(length, block_size, segment_size)
  rule = block_sparse.PositionRule(
      pattern["q_perm"], pattern["perm"], jnp.full((1,), rules_lib.UNBOUNDED, jnp.int32),
      jnp.zeros((1,), jnp.int32), jnp.zeros((1,), jnp.int32))
  nb = same.shape[0]
  per_segment = segment_size // block_size
  return block_sparse.from_block_bits(
      jnp.asarray(same)[None, None], pattern["bits"], q_len=length, kv_len=length,
      block_q=block_size, block_k=block_size, rule=rule, kv_width=min(per_segment, nb),
      kv_capacity=nb * min(per_segment, nb))


def allowed(pattern: dict, length: int, block_size: int, segment_size: int) -> jax.Array:
  """bool [b, n, t, t] computed pairs in ORIGINAL query / key order. O(t^2).

  The own segment contributes exactly its causal pairs (the permutation stays inside the
  segment); an earlier tile (i, j) of the permuted order holds the queries at slots of
  block i and the keys at slots of block j.
  """
  pos = np.arange(length)
  seg = pos // segment_size
  own = jnp.asarray((seg[:, None] == seg[None, :]) & (pos[None, :] <= pos[:, None]))
  q_block = jnp.argsort(pattern["q_perm"], axis=-1) // block_size  # [b, n, t] per position
  k_block = jnp.argsort(pattern["perm"], axis=-1) // block_size
  bits = pattern["bits"]
  nb = bits.shape[-1]
  flat = (q_block[..., :, None] * nb + k_block[..., None, :]).reshape(*bits.shape[:2], -1)
  picked = jnp.take_along_axis(bits.reshape(*bits.shape[:2], -1), flat, axis=-1)
  return own | picked.reshape(*bits.shape[:2], length, length)


def pairs(pattern: dict, length: int, block_size: int, segment_size: int) -> jax.Array:
  """Causal pairs computed per (batch, head), float32 [b, n]."""
  seg_len = np.minimum(segment_size, length - segment_size * np.arange(
      prefill.num_blocks(length, segment_size)))
  own = float((seg_len * (seg_len + 1) // 2).sum())
  nb = prefill.num_blocks(length, block_size)
  size = np.minimum(block_size, length - block_size * np.arange(nb)).astype(np.float32)
  area = jnp.asarray(np.outer(size, size))
  return own + jnp.sum(pattern["bits"] * area, axis=(-2, -1))

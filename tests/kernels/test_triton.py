"""Pallas GPU (Triton) kernels in interpret mode against the dense reference.

Interpret mode runs the grid sequentially on CPU, so shapes stay tiny.
"""

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import block_sparse


def test_triton_random_bits_gqa_per_head(check, dense_mask):
  rng = np.random.default_rng(7)
  dense = dense_mask(rng, (1, 4, 40, 56), 16, 16)
  dense[0, 1, 3] = False  # an empty query row
  mask = block_sparse.from_dense(dense, block_q=16, block_k=16)
  check(mask, b=1, lq=40, lk=56, hq=4, hkv=2, d=16, implementation='triton',
        tiles=block_sparse.Tiles(block_q=8, block_k=8, block_q_bwd=8, block_k_bwd=16))


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_triton_window_union_topk(check, dtype):
  import jax
  l = 64
  window = block_sparse.sliding_window(l, window=np.array([5, 20]), sinks=np.array([2, 0]),
                                       block_q=16, block_k=16)
  scores = jax.random.uniform(jax.random.key(0), (1, 1, 4, 4))
  topk = block_sparse.from_block_scores(scores, q_len=l, kv_len=l, block_q=16, block_k=16,
                                        top_k=1, causal=True)
  check(window | topk, b=2, lq=l, lk=l, hq=2, hkv=1, d=16, dtype=dtype,
        implementation='triton')

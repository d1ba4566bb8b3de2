"""Gathered-key ("stripe") attention: each query block attends a list of key indices.

Public API:

    from pallas_kernels import stripe
    out = stripe.attention(q, k, v, indices, counts, block_q=128, causal=True)
    out, lse = stripe.attention(..., return_lse=True)        # lse [b, n, t], -inf = no key
    out, lse = stripe.merge_partials(out_a, lse_a, out_b, lse_b)  # union of disjoint key sets
    indices, counts = stripe.from_key_mask(key_mask, capacity)

q [b, t, n, d], k/v [b, s, k, d] as jax.nn.dot_product_attention; indices
int [b|1, H, ceil(t / block_q), C] with counts [b|1, H, ceil(t / block_q)],
H in {1, k, n} (shared, per kv head, per query head). The list format and its
semantics are specified in lists.py; the backend contract in api.py.

Backends (implementation=...): 'reference' (dense jnp oracle), 'xla'
(batched gathers, CPU default), 'triton' (Pallas GPU), 'mosaic_tpu' (Pallas
TPU: counts by scalar prefetch, list chunks and K/V rows by manual DMA). One
jax.custom_vjp; backward kernels: xla (gather + scatter-add) and triton
(atomic adds into the gathered rows); mosaic_tpu uses the xla backward.
"""

from pallas_kernels.stripe.api import IMPLEMENTATIONS, attention, merge_partials, resolve_implementation
from pallas_kernels.stripe.lists import dense_mask, from_key_mask, normalize
from pallas_kernels.stripe.reference import MASK_VALUE, attention_ref, attention_with_lse_ref
from pallas_kernels.stripe.tiles import Tiles

__all__ = [
    'IMPLEMENTATIONS', 'MASK_VALUE', 'Tiles', 'attention', 'attention_ref',
    'attention_with_lse_ref', 'dense_mask', 'from_key_mask', 'merge_partials', 'normalize',
    'resolve_implementation',
]

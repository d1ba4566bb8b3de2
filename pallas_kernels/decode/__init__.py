"""Decode attention over per-head ragged KV caches (MoA decode).

Public API:

    from pallas_kernels import decode
    o = decode.decode_attention(q, k_cache, v_cache, lengths,
                                q_positions=None, kv_positions=None,
                                window=None, sinks=None, implementation=None)

q [b, t, n, d] (t = 1 for one-token decode), caches [b, k, c, d] (per kv head
c padded slots), lengths [b, k]. Backends: 'reference' (dense jnp oracle),
'xla' (split-KV, CPU default), 'triton' (Pallas GPU), 'mosaic_tpu' (Pallas
TPU). The element rule is in reference.py.
"""

from pallas_kernels.decode.api import (IMPLEMENTATIONS, cache_bytes, decode_attention,
                                       resolve_implementation)
from pallas_kernels.decode.reference import MASK_VALUE, decode_attention_ref

__all__ = ['IMPLEMENTATIONS', 'MASK_VALUE', 'cache_bytes', 'decode_attention',
           'decode_attention_ref', 'resolve_implementation']

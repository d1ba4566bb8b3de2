"""Block-sparse flash attention with data-dependent block tables.

Public API:

    from pallas_kernels import block_sparse
    mask = block_sparse.BlockMask.from_dense(dense, block_q=128, block_k=128)
    mask = block_sparse.causal(L) | block_sparse.sliding_window(L, window=w, sinks=4)
    out = block_sparse.attention(q, k, v, mask, scale=None, implementation=None)
    out, lse = block_sparse.attention(q, k, v, mask, return_lse=True)  # lse [b, n, t]

The BlockMask format (fields, shapes, invariants, element rule) is specified
in block_mask.py; element rules in rules.py.

Backends (implementation=...): 'reference' (dense jnp oracle), 'xla'
(gather-based, CPU default), 'triton' (Pallas GPU), 'mosaic_tpu' (Pallas TPU,
module pallas_kernels/block_sparse/mosaic_tpu.py). All run under one
jax.custom_vjp with residuals (q, k, v, out, lse, mask).

Backend contract. A backend is a module pallas_kernels.block_sparse.<name>
exposing:

    forward(q, k, v, mask, scale, tiles, interpret) -> (out, lse)
    backward(q, k, v, out, lse, dout, mask, scale, tiles, interpret, dlse=None) -> (dq, dk, dv)

with q [b, t, n, d] and k, v [b, s, k, d] (t, s already padded to block
multiples, n % k == 0); `mask` the result of `BlockMask.for_kernel()` (padded
lengths, padding keys masked by its rule); out [b, t, n, d] in q.dtype; lse
[b, n, t] float32 natural-log log-sum-exp (-inf for rows with no allowed key;
the backward receives the residual with -inf replaced by 0, and `dlse`, the
cotangent of lse or None, which it folds into delta: delta - dlse);
masked scores use MASK_VALUE (finite) so exp(MASK_VALUE - lse) == 0; dq, dk,
dv in input dtypes, dk/dv summed over each GQA group; `tiles` a resolved
Tiles; `interpret` passed through (True or backend interpret params). The
element rule is evaluated in-kernel with `mask.rule.evaluate(ctx)` where ctx
implements rules.RuleContext for the kernel's tile. See api.py.
"""

from pallas_kernels.block_sparse.api import IMPLEMENTATIONS, attention, resolve_implementation
from pallas_kernels.block_sparse.block_mask import (BlockMask, causal, from_block_bits,
                                                   from_block_scores, from_dense,
                                                   from_positions, from_tables, full,
                                                   intersection, sliding_window, union)
from pallas_kernels.block_sparse.reference import MASK_VALUE, attention_ref
from pallas_kernels.block_sparse.rules import (AllowAll, AndRule, BlockRule, DenseRule,
                                              ElementRule, KvLengthRule, OrRule, PositionRule)
from pallas_kernels.block_sparse.tiles import Tiles

__all__ = [
    'AllowAll', 'AndRule', 'BlockMask', 'BlockRule', 'DenseRule', 'ElementRule',
    'IMPLEMENTATIONS', 'KvLengthRule', 'MASK_VALUE', 'OrRule', 'PositionRule', 'Tiles',
    'attention', 'attention_ref', 'causal', 'from_block_bits', 'from_block_scores',
    'from_dense', 'from_positions', 'from_tables', 'full', 'intersection',
    'resolve_implementation', 'sliding_window', 'union',
]

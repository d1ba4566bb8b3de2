"""NNX layers: attention (with pluggable cores), MLP, norms, RoPE."""

from sparsity_jax.layers.attention import (Attention, AttentionCore, DenseAttention,
                                           attention_kinds, make_attention_core,
                                           register_attention)
from sparsity_jax.layers import routing  # noqa: F401  (registers attention kind 'routing')
from sparsity_jax.layers import sparsed  # noqa: F401  (registers attention kind 'sparsed')
from sparsity_jax.layers import moa  # noqa: F401  (registers attention kinds 'moa', 'moa_profile')
from sparsity_jax.layers import prefill  # noqa: F401  (registers the training-free prefill kinds)
from sparsity_jax.layers import decode_methods  # noqa: F401  (quest, snapkv, ada_snapkv)
from sparsity_jax.layers.mlp import SwiGLU
from sparsity_jax.layers.norms import RMSNorm

__all__ = ["Attention", "AttentionCore", "DenseAttention", "RMSNorm", "SwiGLU",
           "attention_kinds", "make_attention_core", "register_attention"]

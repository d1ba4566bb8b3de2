"""NNX layers: attention (with pluggable cores), MLP, norms, RoPE."""

from sparsity_jax.layers.attention import (Attention, AttentionCore, DenseAttention,
                                           attention_kinds, make_attention_core,
                                           register_attention)
from sparsity_jax.layers import sparsed  # noqa: F401  (registers attention kind 'sparsed')
from sparsity_jax.layers.mlp import SwiGLU
from sparsity_jax.layers.norms import RMSNorm

__all__ = ["Attention", "AttentionCore", "DenseAttention", "RMSNorm", "SwiGLU",
           "attention_kinds", "make_attention_core", "register_attention"]

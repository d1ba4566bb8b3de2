"""Models: the causal Transformer LM (and, later, the masked-diffusion LM)."""

from sparsity_jax.models.transformer import Block, ModelConfig, TransformerLM

__all__ = ["Block", "ModelConfig", "TransformerLM"]

"""sparsity_jax: sparse attention methods on one block-sparse kernel family, in JAX."""

__version__ = "0.1.0"

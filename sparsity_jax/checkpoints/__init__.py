"""Import and export of Hugging Face checkpoints (see :mod:`sparsity_jax.checkpoints.hf`)."""

from sparsity_jax.checkpoints.hf import (ARCHITECTURES, CheckpointError, load_model,
                                         model_config_from_hf, read_config, save_model)
from sparsity_jax.checkpoints.hf_tokenizer import HFTokenizer

__all__ = ["ARCHITECTURES", "CheckpointError", "HFTokenizer", "load_model",
           "model_config_from_hf", "read_config", "save_model"]

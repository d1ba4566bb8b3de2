"""Pretrained checkpoints in and out of TransformerLM.

Formats: Hugging Face directories (:mod:`.hf`) and GGUF files (:mod:`.gguf`); both map to
the architectures of :mod:`.arch` through the tensor maps of :mod:`.tensor_map` and load
sharded through :mod:`.loading`. :mod:`.pretrained` resolves a name (``smollm2``, the
embedded real model) or a path to a :class:`Checkpoint`.
"""

from sparsity_jax.checkpoints.arch import (ARCHITECTURES, CheckpointError, model_config_from_hf,
                                           read_config)
from sparsity_jax.checkpoints.hf import load_model, save_model
from sparsity_jax.checkpoints.hf_tokenizer import HFTokenizer
from sparsity_jax.checkpoints.loading import Checkpoint
from sparsity_jax.checkpoints.pretrained import (load_pretrained, open_pretrained,
                                                 smollm2_path)

__all__ = ["ARCHITECTURES", "Checkpoint", "CheckpointError", "HFTokenizer", "load_model",
           "load_pretrained", "model_config_from_hf", "open_pretrained", "read_config",
           "save_model", "smollm2_path"]

"""Tokenizer, corpora and the packed, resumable input pipeline."""

from sparsity_jax.data.corpus import load_split, split_files, stdlib_files, text_files
from sparsity_jax.data.pipeline import PackedSequences, TrainIterator, eval_batches, local_rows
from sparsity_jax.data.tokenizer import ByteTokenizer

__all__ = ["ByteTokenizer", "PackedSequences", "TrainIterator", "eval_batches", "load_split",
           "local_rows", "split_files", "stdlib_files", "text_files"]

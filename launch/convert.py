r"""Converts a pretrained model (the embedded SmolLM2, any supported GGUF file, or an HF
directory) into a Hugging Face directory that transformers and our HF loader read.

  python launch/convert.py --model=smollm2 --out=/tmp/smollm2_hf
  python launch/convert.py --model=/ckpt/qwen2-0_5b-instruct-q8_0.gguf --out=/tmp/qwen --dtype=bfloat16

Writes config.json, model.safetensors (dequantized), generation_config.json,
tokenizer.json and tokenizer_config.json (with the chat template) into a temporary
directory first, so a failed run leaves nothing behind. Prints the files and a summary.
"""

import os
import sys

from absl import app, flags, logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_MODEL = flags.DEFINE_string("model", None, "smollm2, a .gguf file or a Hugging Face directory.")
_OUT = flags.DEFINE_string("out", None, "Directory to write (must not exist).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Tensor dtype on disk.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace --out if it exists.")
flags.mark_flags_as_required(["model", "out"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  from sparsity_jax.checkpoints import CheckpointError
  from sparsity_jax.checkpoints.pretrained import convert_to_hf
  try:
    files = convert_to_hf(_MODEL.value, _OUT.value, dtype=_DTYPE.value,
                          overwrite=_OVERWRITE.value)
  except (FileNotFoundError, FileExistsError, CheckpointError, ValueError) as e:
    sys.exit(f"convert: {e}")
  size = sum(os.path.getsize(os.path.join(_OUT.value, f)) for f in files)
  print(f"wrote {_OUT.value}: {', '.join(files)} ({size / 2**20:.1f} MiB)")


if __name__ == "__main__":
  app.run(main)

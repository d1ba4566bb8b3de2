r"""Converts a pretrained model (the embedded SmolLM2, any supported GGUF file, or an HF
directory) into a Hugging Face directory that transformers and our HF loader read.

  python launch/convert.py --model=smollm2 --out=/tmp/smollm2_hf
  python launch/convert.py --model=/ckpt/qwen2-0_5b-instruct-q8_0.gguf --out=/tmp/qwen --dtype=bfloat16

Writes config.json, model.safetensors (dequantized), generation_config.json,
tokenizer.json and tokenizer_config.json (with the chat template) into a temporary
directory first, so a failed run leaves nothing behind. Prints the files and a summary.

A training run (a --workdir of launch/train.py or launch/prune.py) is not a pretrained
model: the error names the ways to export one (launch/prune.py --hf_out, or
sparsity_jax.sparsity.pipeline.save_hf).
"""

import json
import os
import sys

from absl import flags, logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from sparsity_jax import cli  # noqa: E402  (after the path)
from sparsity_jax.errors import UserError  # noqa: E402

_MODEL = flags.DEFINE_string("model", None, "smollm2, a .gguf file or a Hugging Face directory.")
_OUT = flags.DEFINE_string("out", None, "Directory to write (must not exist).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Tensor dtype on disk.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace --out if it exists.")
flags.mark_flags_as_required(["model", "out"])


def is_workdir(path: str) -> bool:
  """Whether ``path`` is a training run's directory (checkpoints/, metrics.jsonl,
  invocations.jsonl, or a config.json of our own with model and train sections) rather
  than a Hugging Face one."""
  if not os.path.isdir(path):
    return False
  if any(os.path.exists(os.path.join(path, name))
         for name in ("checkpoints", "metrics.jsonl", "invocations.jsonl")):
    return True
  try:
    with open(os.path.join(path, "config.json")) as f:
      config = json.load(f)
  except (OSError, ValueError):
    return False
  return isinstance(config, dict) and all(isinstance(config.get(k), dict)
                                          for k in ("model", "train"))


def main(argv):
  if len(argv) > 1:
    raise UserError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  model = _MODEL.value
  if is_workdir(model):
    # Its config.json is ours, not Hugging Face's: the loader would only say that the
    # architecture is unsupported (model_type=None).
    raise UserError(
        f"--model={model} is a training run (a workdir), not a pretrained checkpoint: export "
        f"it with launch/prune.py --workdir={model} --hf_out=DIR (which prunes it: give "
        "--method and --pattern or --sparsity), or keep its weights as they are with "
        "sparsity_jax.sparsity.pipeline.save_hf(DIR, sparsity_jax.train.loop.load_model("
        f"{model!r}))")
  from sparsity_jax.checkpoints import CheckpointError
  from sparsity_jax.checkpoints.pretrained import convert_to_hf
  try:
    files = convert_to_hf(model, _OUT.value, dtype=_DTYPE.value, overwrite=_OVERWRITE.value)
  except (FileNotFoundError, FileExistsError, CheckpointError, ValueError) as e:
    raise UserError(f"convert: {e}") from e
  size = sum(os.path.getsize(os.path.join(_OUT.value, f)) for f in files)
  print(f"wrote {_OUT.value}: {', '.join(files)} ({size / 2**20:.1f} MiB)")


if __name__ == "__main__":
  cli.run(main)

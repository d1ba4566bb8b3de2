r"""Evaluates a run's latest checkpoint, or a pretrained model, on the validation split.

  python launch/eval.py --workdir=runs/lm_tiny [--config=configs/lm_tiny.py] [--step=N]

  python launch/eval.py --model=smollm2            # the embedded SmolLM2-135M-Instruct
  python launch/eval.py --model=/ckpt/x.gguf --config=configs/smollm2.py:seq_len=2048
  python launch/eval.py --model=/ckpt/Llama-3.2-1B --config=configs/lm_tiny.py

Without --config the run's own config.json is used. A --config may change the data, the
evaluation, dtypes and the attention core's settings; its model must have the run's
weights (sizes, layers, weight masks), or it is refused naming the fields that differ.
Prints loss, bits/byte, perplexity and appends them to <workdir>/eval.jsonl.

With --model it evaluates a pretrained model as it is instead (no workdir): ``smollm2``, a
.gguf file or a Hugging Face directory (--init_from_hf=DIR is the older name). Its
architecture is the model's; --config sets the data, eval, mesh, dtypes and attention core
(default: configs/smollm2.py's settings, the embedded corpus tokenised with the model's own
tokenizer, 16 x 2 sequences of 1024).
"""

import json
import os
import sys

from absl import flags, logging
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from sparsity_jax import cli  # noqa: E402  (after the path)
from sparsity_jax.errors import UserError  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Optional config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory to evaluate.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
_MODEL = flags.DEFINE_string(
    "model", None, "Evaluate this pretrained model instead of a workdir: smollm2, a .gguf file "
    "or a Hugging Face directory.")
_INIT_FROM_HF = flags.DEFINE_string("init_from_hf", None, "Older name of --model for a Hugging "
                                    "Face directory.")


def main(argv):
  if len(argv) > 1:
    raise UserError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO.
  config = cli.config(_CONFIG)
  source = _MODEL.value or _INIT_FROM_HF.value
  if source:
    if _WORKDIR.value or (_MODEL.value and _INIT_FROM_HF.value):
      raise UserError("--model evaluates a pretrained model: it takes no --workdir (and "
                      "--init_from_hf is its older name, give one)")
    from sparsity_jax import config_lib
    from sparsity_jax.train import from_pretrained
    config = config if config is not None else config_lib.pretrained_config(source)
    metrics = from_pretrained.evaluate_pretrained(source, config)
  else:
    if not _WORKDIR.value:
      raise UserError("give --workdir (a training run) or --model (a pretrained model)")
    from sparsity_jax.train import evaluate_workdir
    metrics = evaluate_workdir(_WORKDIR.value, config, _STEP.value)
  print(json.dumps(metrics, indent=2))


if __name__ == "__main__":
  cli.run(main)

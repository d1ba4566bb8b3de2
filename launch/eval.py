r"""Evaluates a run's latest checkpoint on the validation split.

  python launch/eval.py --workdir=runs/lm_tiny [--config=configs/lm_tiny.py] [--step=N]

  python launch/eval.py --init_from_hf=/ckpt/Llama-3.2-1B --config=configs/lm_tiny.py

Without --config the run's own config.json is used. Prints loss, bits/byte, perplexity
and appends them to <workdir>/eval.jsonl. With --init_from_hf it evaluates a local
Hugging Face checkpoint as it is instead (no workdir): its config.json sets the
architecture, --config (required then) the data, eval, mesh, dtypes and attention core.
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
_INIT_FROM_HF = flags.DEFINE_string(
    "init_from_hf", None, "Evaluate this local Hugging Face checkpoint directory instead of "
    "a workdir (needs --config).")


def main(argv):
  if len(argv) > 1:
    raise UserError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO.
  config = cli.config(_CONFIG)
  if _INIT_FROM_HF.value:
    if config is None or _WORKDIR.value:
      raise UserError("--init_from_hf needs --config and takes no --workdir")
    from sparsity_jax.checkpoints import hf
    if not os.path.isdir(_INIT_FROM_HF.value):
      raise UserError(f"--init_from_hf={_INIT_FROM_HF.value}: no such directory")
    metrics = hf.evaluate_hf(_INIT_FROM_HF.value, config)
  else:
    if not _WORKDIR.value:
      raise UserError("--workdir is required (or --init_from_hf with --config)")
    from sparsity_jax.train import evaluate_workdir
    metrics = evaluate_workdir(_WORKDIR.value, config, _STEP.value)
  print(json.dumps(metrics, indent=2))


if __name__ == "__main__":
  cli.run(main)

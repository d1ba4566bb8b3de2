r"""Evaluates a run's latest checkpoint on the validation split.

  python launch/eval.py --workdir=runs/lm_tiny [--config=configs/lm_tiny.py] [--step=N]

Without --config the run's own config.json is used. Prints loss, bits/byte, perplexity
and appends them to <workdir>/eval.jsonl.
"""

import json
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_CONFIG = config_flags.DEFINE_config_file("config", None, "Optional config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory to evaluate.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO.
  from sparsity_jax.train import evaluate_workdir
  metrics = evaluate_workdir(_WORKDIR.value, _CONFIG.value, _STEP.value)
  print(json.dumps(metrics, indent=2))


if __name__ == "__main__":
  app.run(main)

r"""Trains a model: a thin absl app around sparsity_jax.train.train_and_evaluate.

  python launch/train.py --config=configs/lm_tiny.py --workdir=runs/lm_tiny \
      [--config.train.steps=100] [--config=configs/lm_tiny.py:runlocal]

  python launch/train.py --config=configs/smollm2.py --workdir=runs/ft_smollm2
  python launch/train.py --config=configs/lm_tiny.py --workdir=runs/ft \
      --model=/ckpt/Llama-3.2-1B [--config.model.param_dtype=bfloat16]

With --model (= --config.pretrained) the parameters start from a pretrained model:
``smollm2`` (the embedded SmolLM2-135M-Instruct), a .gguf file or a local Hugging Face
directory (Llama, Mistral, Qwen2, LLaDA; see sparsity_jax/checkpoints/). Its architecture
fixes the architecture fields of config.model, and --config supplies everything else
(data, train, eval, mesh, dtypes, attention core). --init_from_hf=DIR is the older name
of --model=DIR.

Sparse weights: --config.model.weight_sparsity.pattern=2:4 (or =unstructured with
.sparsity=0.5) masks the block weights; --config.train.weight_sparsity.method=fixed | ste |
sr_ste | mdgf | rigl says how the masks evolve (sparsity_jax/sparsity/training.py).
--config.init_from=DIR starts from a run's (e.g. a pruned model's) weights and masks with a
fresh optimizer; add --config.distill.h_sq=1 for SquareHead distillation from those weights
with the masks off (sparsity_jax/train/distill.py).

Rerunning the same command resumes from the workdir's latest checkpoint. For several
processes on one machine (or hosts without auto-detection) pass --coordinator_address,
--num_processes and --process_id; on TPU pods jax.distributed discovers them.
"""

import os
import sys

from absl import flags, logging
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # Repo root.
from sparsity_jax import cli  # noqa: E402  (after the path)
from sparsity_jax.errors import UserError  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_MODEL = flags.DEFINE_string(
    "model", None, "Pretrained model to start from: smollm2, a .gguf file or a Hugging Face "
    "directory (its architecture replaces config.model's; --config sets the rest).")
_INIT_FROM_HF = flags.DEFINE_string("init_from_hf", None, "Older name of --model for a Hugging "
                                    "Face directory.")
flags.mark_flags_as_required(["config", "workdir"])
PREEMPTED_EXIT_CODE = 3  # Non-zero so schedulers restart the job; rerunning resumes it.


def main(argv):
  if len(argv) > 1:
    raise UserError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO.
  from sparsity_jax import parallel
  from sparsity_jax.train import loop
  config = cli.config(_CONFIG)
  if _INIT_FROM_HF.value and not os.path.isdir(_INIT_FROM_HF.value):
    raise UserError(f"--init_from_hf={_INIT_FROM_HF.value}: no such directory")
  parallel.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  try:
    if _MODEL.value and _INIT_FROM_HF.value:
      raise UserError("give --model or --init_from_hf, not both")
    loop.train_and_evaluate(config, _WORKDIR.value, pretrained=_MODEL.value or _INIT_FROM_HF.value)
  except loop.Preempted as e:
    print(e, file=sys.stderr, flush=True)
    sys.exit(PREEMPTED_EXIT_CODE)


if __name__ == "__main__":
  cli.run(main)

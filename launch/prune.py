r"""One-shot pruning of a pretrained model or a trained run: magnitude, Wanda, DSnoT.

  python launch/prune.py --model=smollm2 --method=wanda --pattern=2:4 --out=runs/smollm2_wanda_24
  python launch/prune.py --model=smollm2 --method=magnitude --scope=global --sparsity=0.5 \
      --out=runs/smollm2_mag50 --hf_out=runs/smollm2_mag50_hf
  python launch/prune.py --model=smollm2 --method=dsnot --sparsity=0.5 --eval_dense   # writes nothing
  python launch/prune.py --workdir=runs/lm_tiny --method=wanda --sparsity=0.5 --out=runs/lm_tiny_w50

Methods: ``magnitude`` (|W|; ``--scope=layer`` per weight, ``global`` over all targeted
weights), ``wanda`` (|W| * ||X||, per output, layer by layer on calibration windows of the
training split) and ``dsnot`` (DSnoT's training-free prune-and-grow on top of a Wanda
mask, ``--dsnot_initial=magnitude`` for a magnitude one). ``--pattern`` is
``unstructured`` (with ``--sparsity``) or ``N:M`` along the input dimension. Weights never
change: only masks are set (sparsity_jax/sparsity/).

Writes ``--out`` (a workdir: config.json, checkpoint 0 with the weights and their masks,
prune_report.json / .md) and ``--hf_out`` (Hugging Face safetensors, masked weights
zeroed). Prints the report: sparsity per weight and overall, N:M validity, DSnoT's
reconstruction errors, and validation perplexity (``--config`` sets the data and the
evaluation, as for launch/eval.py; default configs/smollm2.py's settings for a pretrained
model, the run's own config for a workdir).
"""

import json
import os
import sys

from absl import flags, logging
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from sparsity_jax import cli  # noqa: E402  (after the path)
from sparsity_jax.errors import UserError  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Optional config file (data, eval).",
                                          lock_config=True)
_MODEL = flags.DEFINE_string("model", None, "Pretrained model to prune: smollm2, a .gguf file "
                             "or a Hugging Face directory.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Training run to prune (its latest checkpoint).")
_METHOD = flags.DEFINE_enum("method", "wanda", ["magnitude", "wanda", "dsnot"], "Pruning method.")
_SCOPE = flags.DEFINE_enum("scope", "layer", ["layer", "global"],
                           "Magnitude comparison group: each weight, or all targeted weights.")
_PATTERN = flags.DEFINE_string("pattern", "unstructured", "'unstructured' or 'N:M' (e.g. 2:4).")
_SPARSITY = flags.DEFINE_float("sparsity", None, "Fraction of zeros, in (0, 1), for "
                               "--pattern=unstructured (an N:M pattern sets its own).")
_TARGETS = flags.DEFINE_string("targets", None, "Regex over weight paths (default: every "
                               "linear weight in the blocks).")
_CALIB_SAMPLES = flags.DEFINE_integer("calib_samples", 16, "Calibration windows (wanda, dsnot).")
_CALIB_LEN = flags.DEFINE_integer("calib_len", None, "Tokens per calibration window, at most "
                                  "the model's max_len (default: 512, or max_len if shorter).")
_DSNOT_INITIAL = flags.DEFINE_enum("dsnot_initial", "wanda", ["wanda", "magnitude"],
                                   "DSnoT's initial mask.")
_DSNOT_SKIP = flags.DEFINE_string("dsnot_skip", "mlp/", "Weights (regex over the key inside a "
                                  "block) DSnoT leaves at the initial mask; '' refines all.")
_DSNOT_CYCLES = flags.DEFINE_integer("dsnot_cycles", 50, "DSnoT's max_cycle_time (>= 0: "
                                     "swaps per output; 0 keeps the initial mask).")
_DSNOT_THRESHOLD = flags.DEFINE_float("dsnot_threshold", 0.1, "DSnoT's update_threshold (>= 0).")
_DSNOT_SAME_SIGN = flags.DEFINE_bool("dsnot_same_sign", False, "Unstructured DSnoT refuses swaps "
                                     "that flip the error's sign (the official default is off; "
                                     "N:M always checks).")
_OUT = flags.DEFINE_string("out", None, "Workdir to write the pruned model to (our format).")
_HF_OUT = flags.DEFINE_string("hf_out", None, "Hugging Face directory to write (zeros).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace existing --out / --hf_out.")
_EVAL = flags.DEFINE_bool("eval", True, "Evaluate the pruned model on the validation split.")
_EVAL_DENSE = flags.DEFINE_bool("eval_dense", False, "Evaluate the dense model first.")
_REPORT = flags.DEFINE_string("report", None, "Append the result (one JSON line) to this file.")


def main(argv):
  if len(argv) > 1:
    raise UserError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  from sparsity_jax.sparsity import DEFAULT_TARGETS
  from sparsity_jax.sparsity import spec as spec_lib
  from sparsity_jax.sparsity import pipeline, prune

  # Options are checked before any model loads or --out is touched (--calib_len against
  # the model's max_len as soon as its config is read, still before the weights).
  spec = spec_lib.from_flags(targets=_TARGETS.value or DEFAULT_TARGETS, pattern=_PATTERN.value,
                            sparsity=_SPARSITY.value)
  options = prune.dsnot_options_from_flags(
      max_cycles=_DSNOT_CYCLES.value, threshold=_DSNOT_THRESHOLD.value,
      initial=_DSNOT_INITIAL.value, skip=_DSNOT_SKIP.value, same_sign=_DSNOT_SAME_SIGN.value)
  pipeline.check_options(method=_METHOD.value, scope=_SCOPE.value,
                         calib_samples=_CALIB_SAMPLES.value, calib_len=_CALIB_LEN.value)
  log = lambda text: print(text, file=sys.stderr, flush=True)
  result = pipeline.prune_model(
      spec=spec, method=_METHOD.value, source=_MODEL.value, workdir=_WORKDIR.value,
      config=cli.config(_CONFIG), scope=_SCOPE.value, calib_samples=_CALIB_SAMPLES.value,
      calib_len=_CALIB_LEN.value, dsnot_options=options, out=_OUT.value, hf_out=_HF_OUT.value,
      evaluate_dense=_EVAL_DENSE.value, evaluate_pruned=_EVAL.value,
      overwrite=_OVERWRITE.value, log=log)
  text = json.dumps(result, sort_keys=True, default=str)
  if _REPORT.value:
    with open(_REPORT.value, "a") as f:
      f.write(text + "\n")
  print(json.dumps(result, indent=2, sort_keys=True, default=str))


if __name__ == "__main__":
  cli.run(main)

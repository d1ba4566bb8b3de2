r"""MoA pipeline: calibrate / profile / search / validate / apply into one --out directory.

  python launch/moa.py all --workdir=runs/lm_retrieval --out=runs/moa_50 \
      --lengths=256,512 --extend_length=1024 --validate_length=768 --budget=0.5

  python launch/moa.py all --model=smollm2 --out=runs/moa_smollm2 ...

Subcommands: calibrate, profile, search, validate, apply, or all. The model is a training
run (--workdir) or a pretrained model (--model: smollm2, a .gguf file or a Hugging Face
directory; --hf_dir=DIR is the older name; its tokenizer encodes the calibration
prompts). Finished stages
leave stages/<stage>.done markers; rerunning (e.g. after Ctrl-C) resumes after the last
finished stage, and within calibrate and profile after the last finished length (--force
reruns the named stage from scratch); a stage whose inputs are missing names the stage to
run first; an --out made with other options is refused (--restart deletes its results and
starts over), one made by another tool (e.g. launch/duo_gates.py) always. The directory
is checked before the model loads, the options against the model before any stage runs,
and the run ends with a summary (plan, density per length, loss vs dense, KV
bytes, paths). Calibration follows the paper: the dense model's own responses (128 tokens)
to long prompts with long-range dependencies (--tasks), in the chat template of instruct
models (--chat). absl/JAX INFO lines are off unless --verbosity=0. The work is done by
sparsity_jax.moa.pipeline.
"""

import os

from absl import flags, logging

from sparsity_jax import cli
from sparsity_jax.errors import UserError
from sparsity_jax.moa import pipeline

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Training run directory of the dense model.")
flags.DEFINE_string("model", None, "Or: a pretrained model (smollm2, a .gguf file or a Hugging "
                    "Face directory).")
flags.DEFINE_string("hf_dir", None, "Older name of --model for a Hugging Face directory.")
flags.DEFINE_string("out", None, "MoA output directory.")
flags.DEFINE_list("lengths", ["256", "512", "1024"], "Profiled lengths.")
flags.DEFINE_integer("extend_length", 2048, "Budget-only extension length.")
flags.DEFINE_integer("validate_length", 1536, "Unseen validation length.")
flags.DEFINE_float("budget", 0.5, "Mean KV-cache density bound, in (0, 1].")
flags.DEFINE_integer("sink", 64, "Sink tokens per head.")
flags.DEFINE_integer("block_size", 64, "Influence / prefill block size.")
flags.DEFINE_integer("num_samples", 8, "Calibration samples per length.")
flags.DEFINE_integer("response_len", 128, "Dense-model response tokens per sample (the "
                     "official default).")
flags.DEFINE_list("tasks", list(pipeline.calibrate_lib.DEFAULT_TASKS), "Calibration tasks, mixed: passkey, "
                  "kv_retrieval, document, lines.")
flags.DEFINE_bool("spread_depths", False, "Stratify the evidence depths of each task's "
                  "calibration samples (passkey, kv_retrieval, lines; the j-th of m in "
                  "[j/m, (j+1)/m)); off: uniformly random depths.")
flags.DEFINE_enum("chat", "auto", ["auto", "true", "false"], "Chat template around calibration "
                  "prompts (auto: when the tokenizer has one).")
flags.DEFINE_integer("loss_tokens", 0, "Profile and validate on the first k response tokens "
                     "only (0: the whole response, as the paper).")
flags.DEFINE_integer("retrieval_heads", 0, "A variant: keep the k KV heads with the most "
                     "attention on retrieval evidence at full span (moa.retrieval); 0: MoA "
                     "as published.")
flags.DEFINE_string("retrieval_scores", "", "Pick the --retrieval_heads by these [layers, KV "
                    "heads] scores: a gates.json of launch/duo_gates.py (DuoAttention's "
                    "trained gates) or a retrieval_heads.json; default: the dense model's "
                    "attention on the evidence.")
flags.DEFINE_float("min_head_density", 0.0, "A variant: every KV head keeps at least this "
                   "fraction of the cache (sink included) at the profiled lengths and the "
                   "extension (only such rules are searched); 0: MoA as published.")
flags.DEFINE_string("full_span_layers", "", "A variant: layers whose KV heads all keep full "
                    "span, e.g. 20-24 or 3,20-24 (the MILP spreads the rest of the budget); "
                    "empty: MoA as published.")
flags.DEFINE_bool("streaming_rest", False, "A variant (DuoAttention's layout): the heads of "
                  "--retrieval_heads / --full_span_layers at full span, every other head "
                  "sinks + one window at the density left over; no profile, no MILP.")
flags.DEFINE_string("calibration_from", "", "Copy the calibration (and the profile, when "
                    "sink, block_size and loss_tokens match) from this --out made with the "
                    "same model, lengths, num_samples, response_len, tasks, spread_depths, "
                    "chat and seed; another budget or variant.")
flags.DEFINE_integer("min_cache", 128, "Every head keeps at least this many tokens (sink + "
                     "window; the official runtime's minimum).")
flags.DEFINE_integer("num_rules", 2, "Max distinct rules per layer.")
flags.DEFINE_integer("num_intervals", 4, "Epsilon-constraint grid per objective.")
flags.DEFINE_integer("alpha_interval", 0, "Alpha grid step (0: max length / 8).")
flags.DEFINE_float("lower_ratio", 0.0, "Density lower bound as a fraction of the budget.")
flags.DEFINE_integer("seed", 0, "Calibration seed.")
flags.DEFINE_bool("force", False, "Rerun the named stage even if it is done.")
flags.DEFINE_bool("restart", False, "Delete the results in an --out made with other options "
                  "and start over.")


def main(argv):
  if not FLAGS["verbosity"].present:  # absl / JAX / orbax INFO lines only when asked for.
    logging.set_verbosity(logging.WARNING)
  if len(argv) != 2 or argv[1] not in pipeline.STAGES + ("all",):
    raise UserError(f"usage: moa.py <{'|'.join(pipeline.STAGES + ('all',))}> "
                    "(--workdir= | --model=) --out=")
  sources = [x for x in (FLAGS.workdir, FLAGS.model, FLAGS.hf_dir) if x]
  if len(sources) != 1 or not FLAGS.out:
    raise UserError("give --out and exactly one of --workdir / --model (or --hf_dir)")
  # What can be checked without the model, before loading it.
  if not 0.0 < FLAGS.budget <= 1.0:
    raise UserError(f"--budget={FLAGS.budget} must be in (0, 1] (the mean KV-cache fraction)")
  try:
    lengths = [int(x) for x in FLAGS.lengths]
  except ValueError:
    raise UserError(f"--lengths={','.join(FLAGS.lengths)} must be comma-separated integers "
                    "(token counts, e.g. 2048,4096)") from None
  if FLAGS.retrieval_heads < 0:
    raise UserError(f"--retrieval_heads={FLAGS.retrieval_heads} must be >= 0")
  try:
    full_span_layers = _layers(FLAGS.full_span_layers)
  except ValueError:
    raise UserError(f"--full_span_layers={FLAGS.full_span_layers} must be layer numbers and "
                    "ascending ranges, e.g. 20-24 or 3,20-24") from None
  if not 0.0 <= FLAGS.min_head_density <= FLAGS.budget:
    raise UserError(f"--min_head_density={FLAGS.min_head_density} must be in [0, --budget="
                    f"{FLAGS.budget}] (a floor on every head's KV fraction)")
  if FLAGS.calibration_from and not os.path.exists(
      os.path.join(FLAGS.calibration_from, "options.json")):
    raise UserError(f"--calibration_from={FLAGS.calibration_from} is not a MoA output "
                    "directory (no options.json); give a finished --out of launch/moa.py")
  opts = pipeline.Options(
      out=FLAGS.out, lengths=lengths, extend_length=FLAGS.extend_length,
      validate_length=FLAGS.validate_length, budget=FLAGS.budget, sink=FLAGS.sink,
      block_size=FLAGS.block_size, num_samples=FLAGS.num_samples,
      response_len=FLAGS.response_len, num_rules=FLAGS.num_rules,
      num_intervals=FLAGS.num_intervals, alpha_interval=FLAGS.alpha_interval,
      lower_ratio=FLAGS.lower_ratio, min_cache=FLAGS.min_cache, tasks=tuple(FLAGS.tasks),
      spread_depths=FLAGS.spread_depths, loss_tokens=FLAGS.loss_tokens,
      retrieval_heads=FLAGS.retrieval_heads, retrieval_scores=FLAGS.retrieval_scores,
      min_head_density=FLAGS.min_head_density,
      full_span_layers=full_span_layers, streaming_rest=FLAGS.streaming_rest,
      calibration_from=FLAGS.calibration_from,
      chat=FLAGS.chat, model=sources[0], seed=FLAGS.seed)
  stages = pipeline.STAGES if argv[1] == "all" else (argv[1],)
  try:  # The directory and the stages it holds, before the model loads (minutes).
    if FLAGS.restart:
      pipeline.read_options(opts.out)  # Another tool's directory: refused even so.
    else:
      pipeline.check_directory(opts)
    pipeline.check_stages(opts, stages, restart=FLAGS.restart)
  except ValueError as e:
    raise UserError(str(e)) from None
  model, tokenizer, documents = _load(FLAGS.workdir, FLAGS.model or FLAGS.hf_dir)
  try:  # Options against the model, before any stage runs.
    pipeline.check_options(model, opts, tokenizer)
  except ValueError as e:
    raise UserError(str(e)) from None
  # The corpus only when calibrate will generate (a restart deletes its results).
  calibrating = "calibrate" in stages and (
      FLAGS.force or FLAGS.restart or not pipeline.done(opts.out, "calibrate"))
  docs = documents() if calibrating and "document" in opts.tasks else None
  pipeline.run(model, opts, stages, force=FLAGS.force, restart=FLAGS.restart, documents=docs,
               tokenizer=tokenizer)
  print(pipeline.summary(opts.out))


def _layers(text: str) -> tuple[int, ...]:
  """'3,20-24' -> (3, 20, 21, 22, 23, 24); raises ValueError on anything else.

  A reversed range ('24-20') is an error, not an empty set of layers.
  """
  out = []
  for part in [p for p in text.split(",") if p.strip()]:
    lo, _, hi = part.partition("-")
    lo, hi = int(lo), int(hi or lo)
    if hi < lo:
      raise ValueError(f"reversed range {part.strip()}")
    out += range(lo, hi + 1)
  return tuple(sorted(set(out)))


def _load(workdir, source):
  """(model, tokenizer or None for bytes, thunk giving corpus documents for calibration)."""
  from sparsity_jax.evals import long_context
  if workdir:
    from sparsity_jax.train import loop
    data = loop.load_workdir_config(workdir).data
    return (loop.load_model(workdir), None,
            lambda: long_context.corpus_documents(None, data_config=data))
  from sparsity_jax.checkpoints import open_pretrained
  ckpt = open_pretrained(source)  # Errors are UserErrors (CheckpointError, missing paths).
  tokenizer = ckpt.tokenizer()  # The calibration prompts need the model's tokenizer.
  # The stdlib validation files, whole, tokenised for this model.
  return ckpt.load_model(), tokenizer, lambda: long_context.corpus_documents(tokenizer)


if __name__ == "__main__":
  cli.run(main)

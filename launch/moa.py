r"""MoA pipeline: calibrate / profile / search / validate / apply into one --out directory.

  python launch/moa.py all --workdir=runs/lm_retrieval --out=runs/moa_50 \
      --lengths=256,512 --extend_length=1024 --validate_length=768 --budget=0.5

  python launch/moa.py all --model=smollm2 --out=runs/moa_smollm2 ...

Subcommands: calibrate, profile, search, validate, apply, or all. The model is a training
run (--workdir) or a pretrained model (--model: smollm2, a .gguf file or a Hugging Face
directory; --hf_dir=DIR is the older name; its tokenizer encodes the calibration
prompts). Finished stages
leave stages/<stage>.done markers; rerunning resumes after the last finished stage
(--force reruns the named stage). The work is done by sparsity_jax.moa.pipeline.
"""

from absl import flags

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
flags.DEFINE_float("budget", 0.5, "Mean KV-cache density bound.")
flags.DEFINE_integer("sink", 64, "Sink tokens per head.")
flags.DEFINE_integer("block_size", 64, "Influence / prefill block size.")
flags.DEFINE_integer("num_samples", 8, "Calibration samples per length.")
flags.DEFINE_integer("response_len", 32, "Dense-model response tokens per sample.")
flags.DEFINE_integer("num_rules", 2, "Max distinct rules per layer.")
flags.DEFINE_integer("num_intervals", 4, "Epsilon-constraint grid per objective.")
flags.DEFINE_integer("alpha_interval", 0, "Alpha grid step (0: max length / 8).")
flags.DEFINE_float("lower_ratio", 0.0, "Density lower bound as a fraction of the budget.")
flags.DEFINE_integer("seed", 0, "Calibration seed.")
flags.DEFINE_bool("force", False, "Rerun the named stage even if it is done.")


def main(argv):
  if len(argv) != 2 or argv[1] not in pipeline.STAGES + ("all",):
    raise UserError(f"usage: moa.py <{'|'.join(pipeline.STAGES + ('all',))}> "
                    "(--workdir= | --model=) --out=")
  sources = [x for x in (FLAGS.workdir, FLAGS.model, FLAGS.hf_dir) if x]
  if len(sources) != 1 or not FLAGS.out:
    raise UserError("give --out and exactly one of --workdir / --model")
  model, tokenizer, corpus_text = _load(FLAGS.workdir, FLAGS.model or FLAGS.hf_dir)
  opts = pipeline.Options(
      out=FLAGS.out, lengths=[int(x) for x in FLAGS.lengths], extend_length=FLAGS.extend_length,
      validate_length=FLAGS.validate_length, budget=FLAGS.budget, sink=FLAGS.sink,
      block_size=FLAGS.block_size, num_samples=FLAGS.num_samples,
      response_len=FLAGS.response_len, num_rules=FLAGS.num_rules,
      num_intervals=FLAGS.num_intervals, alpha_interval=FLAGS.alpha_interval,
      lower_ratio=FLAGS.lower_ratio, seed=FLAGS.seed)
  stages = pipeline.STAGES if argv[1] == "all" else (argv[1],)
  corpus_tokens = corpus_text() if "calibrate" in stages else None
  pipeline.run(model, opts, stages, force=FLAGS.force, corpus_tokens=corpus_tokens,
               tokenizer=tokenizer)


def _load(workdir, source):
  """(model, tokenizer or None for bytes, thunk giving calibration corpus tokens)."""
  from sparsity_jax.data import corpus
  if workdir:
    from sparsity_jax.train import loop
    data = loop.load_workdir_config(workdir).data
    data.retrieval_fraction = 0.0  # Text prompts are text; retrieval ones are made apart.
    return loop.load_model(workdir), None, lambda: corpus.load_split(data)["validation"]
  from sparsity_jax import config_lib
  from sparsity_jax.checkpoints import open_pretrained
  ckpt = open_pretrained(source)  # Errors are UserErrors (CheckpointError, missing paths).
  tokenizer = ckpt.tokenizer()  # The calibration prompts need the model's tokenizer.

  def corpus_text():  # The stdlib validation files, tokenised for this model.
    # Windows from the middle of this text start mid-document: no BOS (retrieval prompts,
    # which start a document, get the tokenizer's BOS).
    data = config_lib.base_config().data
    return corpus.load_split(data, tokenizer, splits=("validation",))["validation"]

  return ckpt.load_model(), tokenizer, corpus_text


if __name__ == "__main__":
  cli.run(main)

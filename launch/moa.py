r"""MoA pipeline: calibrate / profile / search / validate / apply into one --out directory.

  python launch/moa.py all --workdir=runs/lm_retrieval --out=runs/moa_50 \
      --lengths=256,512 --extend_length=1024 --validate_length=768 --budget=0.5

Subcommands: calibrate, profile, search, validate, apply, or all. Finished stages
leave stages/<stage>.done markers; rerunning resumes after the last finished stage
(--force reruns the named stage). The work is done by sparsity_jax.moa.pipeline.
"""

from absl import app, flags

from sparsity_jax.moa import pipeline

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Training run directory of the dense model.")
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
    raise app.UsageError(f"usage: moa.py <{'|'.join(pipeline.STAGES + ('all',))}> --workdir= "
                         "--out=")
  if not FLAGS.workdir or not FLAGS.out:
    raise app.UsageError("--workdir and --out are required")
  from sparsity_jax.data import corpus
  from sparsity_jax.train import loop
  model = loop.load_model(FLAGS.workdir)
  config = loop.load_workdir_config(FLAGS.workdir)
  opts = pipeline.Options(
      out=FLAGS.out, lengths=[int(x) for x in FLAGS.lengths], extend_length=FLAGS.extend_length,
      validate_length=FLAGS.validate_length, budget=FLAGS.budget, sink=FLAGS.sink,
      block_size=FLAGS.block_size, num_samples=FLAGS.num_samples,
      response_len=FLAGS.response_len, num_rules=FLAGS.num_rules,
      num_intervals=FLAGS.num_intervals, alpha_interval=FLAGS.alpha_interval,
      lower_ratio=FLAGS.lower_ratio, seed=FLAGS.seed)
  stages = pipeline.STAGES if argv[1] == "all" else (argv[1],)
  corpus_tokens = None
  if "calibrate" in stages:
    corpus_tokens = corpus.load_split(config.data)["validation"]
  pipeline.run(model, opts, stages, force=FLAGS.force, corpus_tokens=corpus_tokens)


if __name__ == "__main__":
  app.run(main)

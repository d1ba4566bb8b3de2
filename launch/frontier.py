r"""The Sparse Frontier harness: sparse attention methods x tasks x lengths on one model.

  python launch/frontier.py --config=configs/frontier.py --out=runs/frontier
  python launch/frontier.py --config=configs/frontier.py:runlocal --out=runs/frontier_smoke
  python launch/frontier.py --config=configs/frontier.py --out=runs/frontier --report_only
  python launch/frontier.py --config=configs/frontier.py --out=runs/frontier \
      --config.lengths=1024,2048 --config.num_samples=50

Runs every (setting, task, length, sample) missing from ``--out/results.jsonl`` (an
interrupted run resumes where it stopped; finished samples are never redone), then writes
``--out/report.md`` with the score tables, the significance test against dense, the maximum
compression that keeps dense performance per method and task, a FLOPs estimate per setting,
and plots (``prefill_<length>.png``, ``decode_<length>.png``, ``flops.png``).
Tasks and metrics: sparsity_jax/evals/frontier; settings: configs/frontier.py.
"""

import os
import sys

from absl import flags, logging
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from sparsity_jax import cli  # noqa: E402  (after the path)
from sparsity_jax.errors import UserError  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Grid config (configs/frontier.py).",
                                          lock_config=True)
_OUT = flags.DEFINE_string("out", None, "Run directory (results.jsonl, report.md, plots).")
_REPORT_ONLY = flags.DEFINE_bool("report_only", False, "Only (re)write the report from the "
                                 "rows already in --out.")
_ONLY = flags.DEFINE_list("only", None, "Run only these settings (names in the config).")


def _items(value) -> list[str]:
  """A config tuple, also when given on the command line as 'a,b' (one string)."""
  value = [value] if isinstance(value, (str, int)) else list(value)
  return [x.strip() for item in value for x in str(item).split(",") if x.strip()]


def _check_before_running(model, tokenizer, settings, tasks, lengths, options, config):
  """Every setting builds its core on this model, and every sample of every task fits its
  length and, with its answer, the model's context: before the first generation."""
  import dataclasses

  from flax import nnx

  from sparsity_jax.evals import frontier
  from sparsity_jax.layers.attention import make_attention_core

  for s in settings:
    try:
      make_attention_core(dataclasses.replace(model.cfg, attention=dict(s.attention)), 0,
                          nnx.Rngs(0))
    except (ValueError, FileNotFoundError) as e:
      raise UserError(f"setting {s.name}: {e}") from e
  for task in tasks:
    for n in lengths:
      try:
        samples = frontier.make_samples(task, tokenizer, n, num_samples=int(config.num_samples),
                                        seed=int(config.seed), chat=config.chat,
                                        **options[task])
      except ValueError as e:
        raise UserError(f"{task} @ {n} tokens: {e}") from e
      need = max(len(x.tokens) + int(x.max_new_tokens) for x in samples)
      if need > model.cfg.max_len:
        raise UserError(f"{task} @ {n} tokens: a prompt and its answer need {need} tokens, "
                        f"but {config.model} holds {model.cfg.max_len}; use a shorter length")


def main(argv):
  if len(argv) > 1:
    raise UserError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  config = cli.config(_CONFIG)
  if config is None or not _OUT.value:
    raise UserError("give --config=configs/frontier.py and --out=RUN_DIR")
  from sparsity_jax.evals import frontier
  from sparsity_jax.evals.frontier import report, runner

  try:
    settings = runner.parse_settings({k: dict(v) for k, v in config.settings.items()})
  except ValueError as e:
    raise UserError(f"config.settings: {e}") from e
  if _ONLY.value is not None and not _ONLY.value:
    raise UserError("--only is empty: name settings of the config, or leave it out")
  if _ONLY.value:
    unknown = sorted(set(_ONLY.value) - {s.name for s in settings})
    if unknown:
      raise UserError(f"--only names settings the config lacks: {unknown}; have "
                      f"{[s.name for s in settings]}")
    settings = [s for s in settings if s.name in _ONLY.value or s.phase == "dense"]
  tasks = _items(config.tasks)
  known = frontier.TASKS + frontier.EXTRA_TASKS
  bad = sorted(set(tasks) - set(known))
  if bad:
    raise UserError(f"config.tasks: unknown {bad}; tasks: {', '.join(known)}")
  try:
    lengths = [int(n) for n in _items(config.lengths)]
  except ValueError as e:
    raise UserError(f"config.lengths must be token counts, got {config.lengths}") from e
  if not lengths or min(lengths) <= 0 or config.num_samples < 1:
    raise UserError("config.lengths must be positive token counts and num_samples >= 1")
  options = {t: dict(config.task_options.get(t, {})) for t in tasks}
  from sparsity_jax.checkpoints import load_pretrained

  # MoA plans differ per layer (unscanned layers); everything else compiles faster scanned.
  scan = not any(s.kind == "moa" for s in settings)
  model, tokenizer = load_pretrained(config.model, scan_layers=scan)
  if not _REPORT_ONLY.value:
    _check_before_running(model, tokenizer, settings, tasks, lengths, options, config)
  rows = []
  if not _REPORT_ONLY.value:
    try:
      rows = runner.run_grid(model, tokenizer, settings=settings, tasks=tasks, lengths=lengths,
                             num_samples=int(config.num_samples), out=_OUT.value,
                             seed=int(config.seed), chat=config.chat, task_options=options,
                             model_name=str(config.model))
    except ValueError as e:
      raise UserError(str(e)) from e
  else:
    rows = runner.read_rows(os.path.join(_OUT.value, "results.jsonl"))
    if not rows:
      raise UserError(f"--report_only: {_OUT.value} has no results.jsonl rows yet")
  import json

  with open(os.path.join(_OUT.value, "grid.json")) as f:
    every_setting = json.load(f)["settings"]  # Also those of earlier --only runs.
  path = report.write_report(rows, _OUT.value, model_cfg=model.cfg, settings=every_setting,
                             title=f"Sparse Frontier grid: {config.model}")
  print(f"report: {path}")


if __name__ == "__main__":
  cli.run(main)

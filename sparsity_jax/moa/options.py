"""MoA pipeline options and the checks that run before any stage: ``Options`` (what
options.json records), the stage markers (``done``), ``check_options`` (the options against
the model), ``check_directory`` (an --out made with other options, or by another tool),
``check_stages`` (the inputs a stage needs) and ``check_calibration_source``. Split from
:mod:`sparsity_jax.moa.pipeline`, which re-exports them.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from collections.abc import Sequence

import numpy as np

from sparsity_jax.evals import long_context as lc
from sparsity_jax.moa import calibrate as calibrate_lib
from sparsity_jax.moa import search as search_lib


STAGES = ("calibrate", "profile", "search", "validate", "apply")


TOOL = "moa"  # options.json's "tool": the launcher that made the directory.


# Keys every options.json of this pipeline has held since its first version: one without
# a "tool" (written before it existed) is ours only if it has them all.
_FIRST_KEYS = ("lengths", "extend_length", "validate_length", "budget", "sink", "block_size",
               "num_samples", "response_len", "num_rules", "num_intervals", "alpha_interval",
               "lower_ratio", "seed")


@dataclasses.dataclass
class Options:
  out: str  # Output directory (one per model and setting).
  lengths: Sequence[int] = (256, 512, 1024)  # Profiled lengths (objectives).
  extend_length: int = 2048  # Budget-only length (>= the longest profiled length).
  validate_length: int = 1536  # Unseen length for choosing among Pareto plans.
  budget: float = 0.5  # Mean KV-cache density bound at every length, in (0, 1].
  sink: int = 64  # Sink tokens every head keeps.
  block_size: int = 64  # Influence aggregation block (and prefill kernel block).
  num_samples: int = 8  # Calibration samples per length.
  response_len: int = 128  # Dense-model response tokens per sample (the loss targets).
  num_rules: int = 2  # Max distinct rules per layer.
  num_intervals: int = 4  # Epsilon grid per secondary objective.
  alpha_interval: int = 0  # Rule-grid alpha step (0: max profiled length / 8).
  lower_ratio: float = 0.0  # Density lower bound as a fraction of the budget.
  min_cache: int = 128  # Every head keeps at least this many tokens (sink + window).
  tasks: Sequence[str] = calibrate_lib.DEFAULT_TASKS  # Calibration tasks, mixed.
  spread_depths: bool = False  # Stratify the evidence depths of each task's samples.
  loss_tokens: int = 0  # Profile / validate on the first k response tokens only (0: all).
  chat: str = "auto"  # Chat template around calibration prompts: auto / true / false.
  retrieval_heads: int = 0  # KV heads kept at full span (moa.retrieval; 0: the paper's MoA).
  # [L, K] head scores to pick the retrieval heads from (a gates.json of launch/duo_gates.py
  # or a retrieval_heads.json) instead of the dense model's attention on the evidence.
  retrieval_scores: str = ""
  min_head_density: float = 0.0  # Every head's KV fraction floor (0: the paper's MoA).
  full_span_layers: Sequence[int] = ()  # Layers whose KV heads all keep full span (a variant).
  # The held heads at full span and every other head one sink + window rule at the density
  # left over (DuoAttention's layout, budget-matched; plan.streaming_plan): no profile, no
  # MILP. A variant.
  streaming_rest: bool = False
  model: str = ""  # What the model is (path or name): part of the directory's identity.
  seed: int = 0
  # A directory whose calibration (and profile, when PROFILE_KEYS match) to copy; not part
  # of the identity.
  calibration_from: str = ""

  @property
  def min_window(self) -> int:
    """The window floor that keeps sink + window >= min_cache (the official runtime's
    minimum cache of 128 tokens)."""
    return max(1, int(self.min_cache) - int(self.sink))

  def to_json(self) -> dict:
    d = dataclasses.asdict(self)
    d.pop("out")
    d.pop("calibration_from")
    return json.loads(json.dumps(d))  # Tuples -> lists, as read back.


def _marker(out, stage):
  return os.path.join(out, "stages", f"{stage}.done")


def done(out: str, stage: str) -> bool:
  return os.path.exists(_marker(out, stage))


def _calibrated_lengths(opts: Options) -> list[int]:
  """The calibrated lengths: the profiled ones and the validation length, once each."""
  return list(dict.fromkeys([*map(int, opts.lengths), int(opts.validate_length)]))


_OUTPUTS = ("calib_*.npz", "calib_*.json", "influence_*.npz", "plans", "search.json",
            "retrieval_heads.json",
            "validate.json", "plan.json", "plan.png", "apply.json", "stages",
            "calib_*.partial", "influence_*.partial")  # Left by an interrupted save.


def check_options(model, opts: Options, tokenizer=None) -> None:
  """Raises a ValueError naming the problem if ``opts`` cannot run on ``model`` (budget,
  lengths against the model's context and block size, calibration prompts that do not fit,
  a budget no rule can meet). Cheap: runs before any stage."""
  problems = []
  if not 0.0 < opts.budget <= 1.0:
    problems.append(f"budget={opts.budget} must be in (0, 1] (the mean KV-cache fraction)")
  lengths = [int(n) for n in opts.lengths]
  max_len = int(model.cfg.max_len)
  if not lengths:
    problems.append("no profiled lengths given")
  elif sorted(set(lengths)) != lengths or lengths[0] < 1:
    problems.append(f"lengths={lengths} must be positive, distinct and increasing")
  for n in lengths:
    if n % opts.block_size:
      problems.append(f"length {n} is not a multiple of block_size={opts.block_size}")
  for name, n in [("lengths", max(lengths, default=0)), ("validate_length", opts.validate_length),
                  ("extend_length", opts.extend_length)]:
    if n > max_len:
      problems.append(f"{name} {n} exceeds the model's context of {max_len} tokens")
  if lengths and (opts.extend_length < max(lengths) or opts.validate_length > opts.extend_length
                  or opts.validate_length < 1):
    problems.append(f"need max(lengths)={max(lengths)} <= extend_length={opts.extend_length} "
                    f"and 0 < validate_length={opts.validate_length} <= extend_length")
  if lengths and not 1 <= opts.response_len < min(lengths):
    problems.append(f"response_len={opts.response_len} must be in [1, {min(lengths)}) (the "
                    "shortest length)")
  if opts.loss_tokens < 0 or opts.loss_tokens > opts.response_len:
    problems.append(f"loss_tokens={opts.loss_tokens} must be in [0, response_len]")
  num_kv = model.cfg.num_layers * model.cfg.num_kv_heads
  if not 0 <= opts.retrieval_heads < num_kv:
    problems.append(f"retrieval_heads={opts.retrieval_heads} must be in [0, {num_kv}) (the "
                    "model's KV heads)")
  elif opts.retrieval_heads / num_kv >= opts.budget:
    problems.append(f"retrieval_heads={opts.retrieval_heads} at full span alone use "
                    f"{opts.retrieval_heads / num_kv:.3f} of the KV cache, not below the "
                    f"budget {opts.budget}")
  if opts.retrieval_scores:
    if not opts.retrieval_heads:
      problems.append("retrieval_scores picks the --retrieval_heads: give their number too")
    else:
      from sparsity_jax.moa import duo
      try:
        shape = duo.load_scores(opts.retrieval_scores).shape
      except ValueError as e:
        problems.append(str(e))
      else:
        if shape != (model.cfg.num_layers, model.cfg.num_kv_heads):
          problems.append(f"retrieval_scores {opts.retrieval_scores} has scores of shape "
                          f"{shape}, the model {model.cfg.num_layers} layers x "
                          f"{model.cfg.num_kv_heads} KV heads")
  if not 0.0 <= opts.min_head_density <= opts.budget:
    problems.append(f"min_head_density={opts.min_head_density} must be in [0, budget="
                    f"{opts.budget}] (a floor on every head's KV fraction)")
  layers = [int(x) for x in opts.full_span_layers]
  if any(not 0 <= x < model.cfg.num_layers for x in layers) or len(set(layers)) != len(layers):
    problems.append(f"full_span_layers={layers} must be distinct layers in [0, "
                    f"{model.cfg.num_layers})")
  elif len(layers) * model.cfg.num_kv_heads / num_kv >= opts.budget:
    problems.append(f"full_span_layers={layers} at full span alone use "
                    f"{len(layers) / model.cfg.num_layers:.3f} of the KV cache, not below the "
                    f"budget {opts.budget}")
  if opts.streaming_rest and not (opts.retrieval_heads or layers):
    problems.append("streaming_rest holds the --retrieval_heads / --full_span_layers at full "
                    "span and streams the rest: give at least one of them")
  if opts.streaming_rest and opts.min_head_density:
    problems.append("streaming_rest gives every other head the same window: leave "
                    "min_head_density at 0")
  if opts.sink < 0 or opts.min_cache < 1:
    problems.append(f"need sink >= 0 and min_cache >= 1, got {opts.sink}, {opts.min_cache}")
  unknown = [t for t in opts.tasks if t not in lc.TASKS]
  if unknown or not opts.tasks:
    problems.append(f"calibration tasks {list(opts.tasks)}: choose from {', '.join(lc.TASKS)}")
  if str(opts.chat).lower() not in ("auto", "true", "false"):
    problems.append(f"chat={opts.chat!r} must be auto, true or false")
  if problems:
    raise ValueError("MoA options: " + "; ".join(problems))
  if opts.calibration_from:
    check_calibration_source(opts)
  tok = tokenizer if tokenizer is not None else calibrate_lib.ByteTokenizer()
  chat = _chat(opts, tokenizer)
  shortest = min(lengths + [opts.validate_length]) + 1 - opts.response_len
  rng = np.random.default_rng(0)
  for task in opts.tasks:  # The shortest calibration prompt of each task must fit.
    if task == "passkey":
      lc.passkey(tok, shortest, rng, chat=chat)
    elif task == "kv_retrieval":
      lc.kv_retrieval(tok, shortest, rng, num_needles=4, chat=chat)
    elif task == "lines":
      lc.lines(tok, shortest, rng, chat=chat)
    else:
      fixed = sum(len(x) for x in lc.frame(tok, chat)) + (
          len(lc.encode(tok, lc.DOC_INTRO + lc.DOC_QUESTION)) if chat else 0)
      if shortest <= fixed:
        raise ValueError(f"document prompts need more than {fixed} tokens; the shortest "
                         f"calibration prompt has {shortest}")
  if opts.retrieval_heads and not opts.retrieval_scores:  # Its prompts must fit too.
    from sparsity_jax.moa import retrieval
    retrieval.prompts(tok, min(lengths), 2, seed=opts.seed, chat=chat)
  rules = search_lib.candidate_rules(lengths[0], lengths[-1], opts.extend_length,
                                     alpha_interval=opts.alpha_interval or None)
  sizes = lengths + [opts.extend_length]
  rules = search_lib.floor_rules(rules, opts.min_head_density, opts.sink, sizes,
                                 opts.min_window)  # The search's own filter.
  # Heads held at full span (density 1): at least the larger of the two sets.
  held = max(opts.retrieval_heads, len(layers) * model.cfg.num_kv_heads) / num_kv
  for n in sizes:
    sparsest = search_lib.rule_densities(rules, opts.sink, n, opts.min_window).min()
    if held + (1 - held) * sparsest > opts.budget + 1e-9:
      hint = ("lower --min_head_density" if opts.min_head_density > 0 else
              "hold fewer heads (--retrieval_heads, --full_span_layers)" if held else
              "lower --sink / --min_cache")
      raise ValueError(f"budget={opts.budget} is infeasible at length {n}: the sparsest rule "
                       f"keeps {sparsest:.3f} of the KV cache (sink {opts.sink}, min_cache "
                       f"{opts.min_cache}, min_head_density {opts.min_head_density}, "
                       f"{held * num_kv:.0f}+ heads held at full span). Raise the "
                       f"budget or {hint}.")


def read_options(out: str) -> dict | None:
  """The options ``out`` was made with (None: no options.json yet). Raises a ValueError
  if another tool (e.g. launch/duo_gates.py) wrote its options.json: --restart must not
  delete that tool's files, nor a diff of unrelated options suggest it."""
  path = os.path.join(out, "options.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    old = json.load(f)
  ours = isinstance(old, dict) and (old["tool"] == TOOL if "tool" in old else
                                    all(k in old for k in _FIRST_KEYS))
  if not ours:
    raise ValueError(f"{out} holds another tool's run (options.json is not launch/moa.py's): "
                     "use another --out")
  return old


def _option_diff(opts: Options) -> tuple[list[str], dict, dict]:
  """(options that differ, those of opts.out, ours); no differences without options.json."""
  old = read_options(opts.out)
  new = opts.to_json()
  if old is None:
    return [], new, new
  old = {k: v for k, v in old.items() if k not in ("out", "tool")}
  defaults = Options(out="").to_json()  # An option added later reads as its default.
  old = {**{k: v for k, v in defaults.items() if k not in old}, **old}
  return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k)), old, new


def check_directory(opts: Options, restart: bool = False, log=print) -> None:
  """Refuses an --out made with other options (or by another tool); ``restart`` deletes
  the outputs of one made with other options first."""
  diff, old, new = _option_diff(opts)
  if not diff:
    return
  if not restart:
    shown = "; ".join(f"{k}: {old.get(k, '(unset)')!r} there, {new.get(k, '(unset)')!r} now"
                      for k in diff)
    raise ValueError(f"{opts.out} was made with other options ({shown}): use another --out, "
                     "or --restart to delete its results and start over")
  log(f"[moa] restart: options differ ({', '.join(diff)}); deleting the results in {opts.out}")
  import shutil
  for pattern in _OUTPUTS:
    for p in glob.glob(os.path.join(opts.out, pattern)):
      shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)


def _needs(opts: Options, stage: str) -> tuple[str, ...]:
  """The stages whose results ``stage`` reads."""
  return {"calibrate": (), "profile": ("calibrate",),
          "search": () if opts.streaming_rest else ("profile",),
          "validate": ("calibrate", "search"), "apply": ("validate",)}[stage]


def check_stages(opts: Options, stages: Sequence[str], restart: bool = False) -> None:
  """Raises a ValueError naming the stages to run first when one of ``stages`` needs
  results that ``opts.out`` lacks: neither finished there (or shared by
  ``calibration_from``) nor run earlier in ``stages``. With ``restart`` the results of an
  --out made with other options do not count: they are deleted."""
  stale = restart and bool(_option_diff(opts)[0])

  def have(stage):
    if stage in stages or (done(opts.out, stage) and not stale):
      return True
    if opts.calibration_from and stage in ("calibrate", "profile"):
      return stage == "calibrate" or check_calibration_source(opts)
    return False

  def missing(stage):  # Its missing inputs, and theirs, in pipeline order.
    out = set()
    for need in _needs(opts, stage):
      if not have(need):
        out |= {need, *missing(need)}
    return sorted(out, key=STAGES.index)

  for stage in stages:
    if stage == "profile" and opts.streaming_rest:
      continue  # Skipped: nothing to check.
    lacking = missing(stage)
    if not lacking:
      continue
    why = (f" (--calibration_from={opts.calibration_from} has no profile to share: other "
           "sink / block_size / loss_tokens, or unfinished)"
           if "profile" in lacking and opts.calibration_from else "")
    then = f" then {', '.join(lacking[1:])}" if len(lacking) > 1 else ""
    raise ValueError(f"{opts.out} has no {' / '.join(lacking)} results{why}: run "
                     f"`launch/moa.py {lacking[0]} ...`{then} (or `all`) first")


# What the calibrate stage depends on, and the profile stage besides: a directory equal on
# CALIBRATION_KEYS shares the calibration, equal on PROFILE_KEYS the profile too.
CALIBRATION_KEYS = ("lengths", "validate_length", "num_samples", "response_len", "tasks",
                    "spread_depths", "chat", "model", "seed")


PROFILE_KEYS = CALIBRATION_KEYS + ("sink", "block_size", "loss_tokens")


def check_calibration_source(opts: Options) -> bool:
  """Raises unless ``opts.calibration_from`` is a directory with a finished calibration made
  with the same options (budget, search and retrieval-head options may differ). Returns
  whether its profile can be shared too (finished, and equal on PROFILE_KEYS); if not,
  the profile stage runs here on the copied calibration (e.g. another --loss_tokens)."""
  src = opts.calibration_from
  if os.path.realpath(src) == os.path.realpath(opts.out):
    raise ValueError(f"--calibration_from={src} is --out itself: give another finished "
                     "directory, or leave it out to resume this one")
  path = os.path.join(src, "options.json")
  if not (os.path.exists(path) and done(src, "calibrate")):
    raise ValueError(f"--calibration_from={src} is not a MoA directory with a finished "
                     "calibrate stage")
  with open(path) as f:
    theirs = {**Options(out="").to_json(), **json.load(f)}
  ours = opts.to_json()
  diff = [k for k in CALIBRATION_KEYS if theirs.get(k) != ours.get(k)]
  if diff:
    raise ValueError(f"--calibration_from={src} was calibrated with other options ("
                     + "; ".join(f"{k}: {theirs.get(k)!r} there, {ours.get(k)!r} now"
                                 for k in diff) + ")")
  return done(src, "profile") and all(theirs.get(k) == ours.get(k) for k in PROFILE_KEYS)


def _chat(opts: Options, tokenizer) -> bool:
  value = {"true": True, "false": False}.get(str(opts.chat).lower(), "auto")
  return lc.resolve_chat(tokenizer, value) if tokenizer is not None else False

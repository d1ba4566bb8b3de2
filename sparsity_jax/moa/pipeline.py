"""The MoA pipeline as resumable stages writing into one output directory.

  calibrate  calib_<N>.npz for every profiled length and the validation length
  profile    influence_<N>.npz per profiled length
  search     plans/plan_<i>.json (Pareto set), search.json
  validate   validate.json (response loss per plan at the unseen length), plan.json
             (the best), plan.png (span heatmap)
  apply      apply.json: the plan loaded into the model, KV-cache bytes and density
             against dense at the validation and extension lengths

Each finished stage writes stages/<stage>.done; ``run`` skips finished stages, so a
rerun resumes after the last one (``force`` reruns a stage).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import time
from collections.abc import Sequence

import numpy as np

from sparsity_jax.moa import calibrate as calibrate_lib
from sparsity_jax.moa import plan as plan_lib
from sparsity_jax.moa import profile as profile_lib
from sparsity_jax.moa import search as search_lib
from sparsity_jax.moa import validate as validate_lib

STAGES = ("calibrate", "profile", "search", "validate", "apply")


@dataclasses.dataclass
class Options:
  out: str  # Output directory (one per model and setting).
  lengths: Sequence[int] = (256, 512, 1024)  # Profiled lengths (objectives).
  extend_length: int = 2048  # Budget-only length (>= the longest profiled length).
  validate_length: int = 1536  # Unseen length for choosing among Pareto plans.
  budget: float = 0.5  # Mean KV-cache density bound at every length.
  sink: int = 64  # Sink tokens every head keeps.
  block_size: int = 64  # Influence aggregation block (and prefill kernel block).
  num_samples: int = 8  # Calibration samples per length.
  response_len: int = 32  # Dense-model response tokens per sample (the loss targets).
  num_rules: int = 2  # Max distinct rules per layer.
  num_intervals: int = 4  # Epsilon grid per secondary objective.
  alpha_interval: int = 0  # Rule-grid alpha step (0: max profiled length / 8).
  lower_ratio: float = 0.0  # Density lower bound as a fraction of the budget.
  seed: int = 0


def _marker(out, stage):
  return os.path.join(out, "stages", f"{stage}.done")


def done(out: str, stage: str) -> bool:
  return os.path.exists(_marker(out, stage))


def _finish(out, stage, info):
  os.makedirs(os.path.join(out, "stages"), exist_ok=True)
  with open(_marker(out, stage), "w") as f:
    json.dump({"finished": time.time(), **info}, f, indent=1)


def _write_json(path, data):
  with open(path, "w") as f:
    json.dump(data, f, indent=1)


def stage_calibrate(model, opts: Options, corpus_tokens=None, tokenizer=None) -> dict:
  for n in list(opts.lengths) + [opts.validate_length]:
    prompts = calibrate_lib.default_prompts(n, opts.num_samples, seed=opts.seed,
                                            corpus_tokens=corpus_tokens, tokenizer=tokenizer)
    tokens, mask = calibrate_lib.calibration_set(model, prompts, length=n,
                                                 response_len=opts.response_len)
    calibrate_lib.save(os.path.join(opts.out, f"calib_{n}.npz"), tokens, mask)
  return {"lengths": list(opts.lengths) + [opts.validate_length]}


def stage_profile(model, opts: Options) -> dict:
  for n in opts.lengths:
    samples = calibrate_lib.load(os.path.join(opts.out, f"calib_{n}.npz"))
    inf = profile_lib.profile_length(model, samples, length=n, block_size=opts.block_size,
                                     sink=opts.sink)
    inf.save(os.path.join(opts.out, f"influence_{n}.npz"))
  return {"lengths": list(opts.lengths)}


def stage_search(model, opts: Options) -> dict:
  influences = []
  for n in opts.lengths:
    path = os.path.join(opts.out, f"influence_{n}.npz")
    if not os.path.exists(path):
      raise ValueError(f"length {n} was not profiled ({path} missing): profile it or drop it "
                       "from --lengths")
    influences.append(profile_lib.Influence.load(path))
  plans = search_lib.search(influences, budget=opts.budget, extend_length=opts.extend_length,
                            num_heads=model.cfg.num_heads, max_rules_per_layer=opts.num_rules,
                            alpha_interval=opts.alpha_interval or None,
                            lower_ratio=opts.lower_ratio, num_intervals=opts.num_intervals)
  os.makedirs(os.path.join(opts.out, "plans"), exist_ok=True)
  for old in glob.glob(os.path.join(opts.out, "plans", "plan_*.json")):
    os.remove(old)
  for i, p in enumerate(plans):
    plan_lib.save_plan(p, os.path.join(opts.out, "plans", f"plan_{i}.json"))
  summary = {"num_plans": len(plans), "objectives": [p.meta["objectives"] for p in plans],
             "densities": [p.meta["densities"] for p in plans]}
  _write_json(os.path.join(opts.out, "search.json"), summary)
  return summary


def load_plans(out: str) -> list[plan_lib.Plan]:
  paths = sorted(glob.glob(os.path.join(out, "plans", "plan_*.json")),
                 key=lambda p: int(p.rsplit("_", 1)[1].split(".")[0]))
  return [plan_lib.load_plan(p) for p in paths]


def stage_validate(model, opts: Options) -> dict:
  plans = load_plans(opts.out)
  samples = calibrate_lib.load(os.path.join(opts.out, f"calib_{opts.validate_length}.npz"))
  best, losses = validate_lib.validate(model, plans, samples, length=opts.validate_length,
                                       block_size=opts.block_size)
  dense_loss = validate_lib.loss_on(model, samples)
  plan_lib.save_plan(plans[best], os.path.join(opts.out, "plan.json"))
  validate_lib.heatmap(plans[best], opts.validate_length, os.path.join(opts.out, "plan.png"))
  info = {"length": opts.validate_length, "losses": losses, "best": best,
          "dense_loss": dense_loss}
  _write_json(os.path.join(opts.out, "validate.json"), info)
  return info


def stage_apply(model, opts: Options) -> dict:
  from sparsity_jax.layers import moa as moa_layer
  path = os.path.join(opts.out, "plan.json")
  plan = plan_lib.load_plan(path)
  moa_model = validate_lib.with_plan(model, path, block_size=opts.block_size)
  info = {"plan": path}
  for n in (opts.validate_length, opts.extend_length):
    moa_bytes = moa_layer.cache_bytes(moa_model.init_cache(1, n))
    dense_bytes = moa_layer.cache_bytes(model.init_cache(1, n))
    info[str(n)] = {"density": plan.density(n), "moa_cache_bytes": moa_bytes,
                    "dense_cache_bytes": dense_bytes, "ratio": moa_bytes / dense_bytes}
  _write_json(os.path.join(opts.out, "apply.json"), info)
  return info


_RUN = {"calibrate": stage_calibrate, "profile": stage_profile, "search": stage_search,
        "validate": stage_validate, "apply": stage_apply}


def run(model, opts: Options, stages: Sequence[str] = STAGES, *, force: bool = False,
        corpus_tokens=None, tokenizer=None, log=print) -> dict:
  """Runs the given stages in order, skipping finished ones unless ``force``.

  ``corpus_tokens`` (text for calibration prompts) and ``tokenizer`` (for the retrieval
  prompts; default bytes) must be in the model's vocabulary.
  """
  unknown = [s for s in stages if s not in STAGES]
  if unknown:
    raise ValueError(f"unknown MoA stages {unknown}; stages: {STAGES}")
  if opts.extend_length < max(opts.lengths) or opts.validate_length > opts.extend_length:
    raise ValueError(f"need max(lengths)={max(opts.lengths)} <= extend_length="
                     f"{opts.extend_length} and validate_length={opts.validate_length} <= "
                     "extend_length")
  os.makedirs(opts.out, exist_ok=True)
  _write_json(os.path.join(opts.out, "options.json"), dataclasses.asdict(opts))
  results = {}
  for stage in STAGES:
    if stage not in stages:
      continue
    if done(opts.out, stage) and not force:
      log(f"[moa] {stage}: already done ({_marker(opts.out, stage)})")
      continue
    start = time.time()
    kwargs = ({"corpus_tokens": corpus_tokens, "tokenizer": tokenizer}
              if stage == "calibrate" else {})
    results[stage] = _RUN[stage](model, opts, **kwargs)
    _finish(opts.out, stage, {"seconds": time.time() - start})
    log(f"[moa] {stage}: done in {time.time() - start:.1f}s")
  return results

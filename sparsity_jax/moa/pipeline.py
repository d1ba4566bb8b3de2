"""The MoA pipeline as resumable stages writing into one output directory.

  calibrate  calib_<N>.npz for every profiled length and the validation length (the dense
             model's responses), calib_<N>.json (each response, and whether it is correct
             for tasks with an answer)
  profile    influence_<N>.npz per profiled length
  search     plans/plan_<i>.json (Pareto set), search.json; with ``retrieval_heads`` > 0
             first retrieval_heads.json (per KV head the scores of ``retrieval_scores``
             when given, e.g. a gates.json of launch/duo_gates.py, else the dense model's
             attention on the evidence of retrieval prompts; and the heads held at full span)
  validate   validate.json (response loss per plan at the unseen length), plan.json
             (the best), plan.png (span heatmap)
  apply      apply.json: the plan loaded into the model, KV-cache bytes and density
             against dense at the validation and extension lengths

Each finished stage writes stages/<stage>.done; ``run`` skips finished stages, so a
rerun resumes after the last one (``force`` reruns a stage from scratch). Within
calibrate and profile a rerun keeps every length whose file is complete (each is written
whole or not at all), so an interrupted stage resumes at the length it was on. A stage
whose inputs are missing (``check_stages``) is refused with the stage to run first.
options.json records the options a directory was made with (and ``"tool": "moa"``): a run
with other options refuses it (``restart`` starts over), and a directory another tool
made is refused outright. ``check_options`` validates the options against the model
before any stage runs; ``summary`` describes a finished directory.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import time
from collections.abc import Sequence

import numpy as np

from sparsity_jax.evals import long_context as lc
from sparsity_jax.moa import calibrate as calibrate_lib
from sparsity_jax.moa import plan as plan_lib
from sparsity_jax.moa import profile as profile_lib
from sparsity_jax.moa import search as search_lib
from sparsity_jax.moa import validate as validate_lib
from sparsity_jax.moa.options import (  # noqa: F401 (the public ones re-exported)
    CALIBRATION_KEYS, PROFILE_KEYS, STAGES, TOOL, Options, _calibrated_lengths,
    _chat, _marker, check_calibration_source, check_directory, check_options, check_stages,
    done, read_options)


def _finish(out, stage, info):
  os.makedirs(os.path.join(out, "stages"), exist_ok=True)
  with open(_marker(out, stage), "w") as f:
    json.dump({"finished": time.time(), **info}, f, indent=1)


def _write_json(path, data):
  with open(path, "w") as f:
    json.dump(data, f, indent=1)


def dense_model(model):
  """The same parameters with dense attention: the model calibration answers with (a
  training run of a sparse core is calibrated as the dense model it approximates)."""
  from flax import nnx

  from sparsity_jax.models.transformer import TransformerLM
  attention = model.cfg.attention
  if (attention.get("kind", "dense") if hasattr(attention, "get") else "dense") == "dense":
    return model
  cfg = dataclasses.replace(model.cfg, attention={"kind": "dense"})
  dense = TransformerLM(cfg, rngs=nnx.Rngs(0))
  nnx.update(dense, nnx.state(model, nnx.Param))
  return dense


def stage_calibrate(model, opts: Options, documents=None, tokenizer=None, log=print) -> dict:
  """calib_<N>.npz / .json per calibrated length; a length whose files an earlier
  (interrupted) run finished is kept, not generated again."""
  tok = tokenizer if tokenizer is not None else calibrate_lib.ByteTokenizer()
  chat = _chat(opts, tokenizer)
  info = {"lengths": _calibrated_lengths(opts), "chat": chat, "correct": {}, "warnings": []}
  dense = None
  for n in info["lengths"]:
    path = os.path.join(opts.out, f"calib_{n}.npz")
    kept = calibrate_lib.complete(path, opts.num_samples, n)
    if kept:
      with open(path[:-len(".npz")] + ".json") as f:
        graded = json.load(f)
    else:
      if dense is None:  # Built only when a length is left to generate.
        dense = dense_model(model)
        if documents is None and "document" in opts.tasks:
          documents = lc.corpus_documents(tokenizer)
      prompts = calibrate_lib.default_prompts(
          n, opts.num_samples, response_len=opts.response_len, tasks=opts.tasks,
          seed=opts.seed, tokenizer=tok, chat=chat, documents=documents,
          spread_depths=opts.spread_depths)
      tokens, mask, responses = calibrate_lib.calibration_set(
          dense, prompts, length=n, response_len=opts.response_len, eos_id=tok.eos_id)
      graded = calibrate_lib.grade(prompts, responses, tok)
      calibrate_lib.save(path, tokens, mask, graded)
    answered = [g["correct"] for g in graded if "correct" in g]
    info["correct"][str(n)] = [int(sum(answered)), len(answered)]
    log(f"[moa] calibrate {n}: {len(graded)} samples"
        f"{' (kept from an earlier run)' if kept else ''}, dense model correct on "
        f"{sum(answered)}/{len(answered)} answered prompts")
    warning = calibrate_lib.check(graded, n)
    if warning:
      info["warnings"].append(warning)
      log(f"[moa] WARNING: {warning}")
  return info


def _profiled(path: str, opts: Options, n: int) -> bool:
  """Whether ``path`` holds a finished profile of length ``n`` made with ``opts``."""
  if not os.path.exists(path):
    return False
  try:
    inf = profile_lib.Influence.load(path)
  except (OSError, ValueError, KeyError):  # Unreadable: profiled again.
    return False
  return (inf.length, inf.block_size, inf.sink, inf.num_samples) == (
      n, opts.block_size, opts.sink, opts.num_samples)


def stage_profile(model, opts: Options, log=print) -> dict:
  """influence_<N>.npz per profiled length; a length an earlier (interrupted) run
  finished is kept, not profiled again."""
  for n in opts.lengths:
    start = time.time()
    path = os.path.join(opts.out, f"influence_{n}.npz")
    if _profiled(path, opts, n):
      log(f"[moa] profile {n}: kept from an earlier run ({path})")
      continue
    samples = calibrate_lib.load(os.path.join(opts.out, f"calib_{n}.npz"), opts.loss_tokens)
    inf = profile_lib.profile_length(model, samples, length=n, block_size=opts.block_size,
                                     sink=opts.sink, remat=True)
    inf.save(path)
    log(f"[moa] profile {n}: {len(samples)} samples in {time.time() - start:.0f}s")
  return {"lengths": list(opts.lengths)}


def stage_search(model, opts: Options, tokenizer=None, log=print) -> dict:
  full_heads = None
  if opts.retrieval_heads:
    from sparsity_jax.moa import retrieval
    if opts.retrieval_scores:
      from sparsity_jax.moa import duo
      scores = duo.load_scores(opts.retrieval_scores)
      record = {"scores_from": opts.retrieval_scores, "scores": scores.tolist()}
    else:
      tok = tokenizer if tokenizer is not None else calibrate_lib.ByteTokenizer()
      n = min(opts.lengths)
      prompts = retrieval.prompts(tok, n, 2 * opts.num_samples, seed=opts.seed,
                                  chat=_chat(opts, tokenizer))
      scores = retrieval.needle_attention(dense_model(model), prompts)
      record = {"length": n, "prompts": len(prompts), "needle_attention": scores.tolist()}
    full_heads = retrieval.select(scores, opts.retrieval_heads)
    _write_json(os.path.join(opts.out, "retrieval_heads.json"),
                {**record, "full_span": np.argwhere(full_heads).tolist()})
    log(f"[moa] search: {opts.retrieval_heads} retrieval heads at full span (layer, kv head): "
        f"{', '.join(f'{l}.{k}' for l, k in np.argwhere(full_heads))}")
  if opts.full_span_layers:
    layers = np.zeros((model.cfg.num_layers, model.cfg.num_kv_heads), bool)
    layers[list(opts.full_span_layers)] = True
    full_heads = layers if full_heads is None else full_heads | layers
    log(f"[moa] search: every KV head of layers {list(opts.full_span_layers)} at full span")
  if opts.streaming_rest:
    sizes = sorted({*map(int, opts.lengths), opts.validate_length, opts.extend_length})
    plan = plan_lib.streaming_plan(
        full_heads, model.cfg.num_heads, budget=opts.budget, sink=opts.sink,
        max_length=opts.extend_length, min_window=opts.min_window, plan_id=0,
        budgets={str(n): opts.budget for n in sizes}, objectives={})
    plan.meta["densities"] = {str(n): plan.density(n) for n in sizes}
    log(f"[moa] search: the other {int((~full_heads).sum())} KV heads stream (sinks + "
        f"window) at {plan.meta['streaming_density']:.3f} of N")
    plans = [plan]
  else:
    plans = search_lib.search(_influences(opts), budget=opts.budget,
                              extend_length=opts.extend_length,
                              num_heads=model.cfg.num_heads, max_rules_per_layer=opts.num_rules,
                              alpha_interval=opts.alpha_interval or None,
                              lower_ratio=opts.lower_ratio, num_intervals=opts.num_intervals,
                              min_window=opts.min_window, full_heads=full_heads,
                              min_head_density=opts.min_head_density)
  os.makedirs(os.path.join(opts.out, "plans"), exist_ok=True)
  for old in glob.glob(os.path.join(opts.out, "plans", "plan_*.json")):
    os.remove(old)
  for i, p in enumerate(plans):
    plan_lib.save_plan(p, os.path.join(opts.out, "plans", f"plan_{i}.json"))
  summary = {"num_plans": len(plans), "objectives": [p.meta["objectives"] for p in plans],
             "densities": [p.meta["densities"] for p in plans]}
  _write_json(os.path.join(opts.out, "search.json"), summary)
  return summary


def _influences(opts: Options) -> list:
  out = []
  for n in opts.lengths:
    path = os.path.join(opts.out, f"influence_{n}.npz")
    if not os.path.exists(path):
      raise ValueError(f"length {n} was not profiled ({path} missing): profile it or drop it "
                       "from --lengths")
    out.append(profile_lib.Influence.load(path))
  return out


def load_plans(out: str) -> list[plan_lib.Plan]:
  paths = sorted(glob.glob(os.path.join(out, "plans", "plan_*.json")),
                 key=lambda p: int(p.rsplit("_", 1)[1].split(".")[0]))
  return [plan_lib.load_plan(p) for p in paths]


def stage_validate(model, opts: Options) -> dict:
  plans = load_plans(opts.out)
  samples = calibrate_lib.load(os.path.join(opts.out, f"calib_{opts.validate_length}.npz"),
                               opts.loss_tokens)
  best, losses = validate_lib.validate(model, plans, samples, length=opts.validate_length,
                                       block_size=opts.block_size)
  dense_loss = validate_lib.loss_on(dense_model(model), samples)
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


def copy_calibration(opts: Options, log=print) -> None:
  """Copies the calibration from ``opts.calibration_from``, and its profile when the
  profile options match (``check_calibration_source``)."""
  import shutil
  with_profile = check_calibration_source(opts)
  src = opts.calibration_from
  patterns = ("calib_*.npz", "calib_*.json") + (("influence_*.npz",) if with_profile else ())
  for pattern in patterns:
    for f in glob.glob(os.path.join(src, pattern)):
      shutil.copy2(f, opts.out)
  stages = ("calibrate", "profile") if with_profile else ("calibrate",)
  for stage in stages:
    os.makedirs(os.path.join(opts.out, "stages"), exist_ok=True)
    shutil.copy2(_marker(src, stage), _marker(opts.out, stage))
  why = ("" if with_profile else " (its profile is not finished: profiling here)"
         if not done(src, "profile") else " (profile options differ: profiling here)")
  log(f"[moa] {', '.join(stages)}: copied from {src}{why}")


def _clear(opts: Options, stage: str) -> None:
  """Deletes ``stage``'s marker and per-length files: a forced rerun keeps no length of
  the run before it (nor does a rerun after interrupting it)."""
  names = {"calibrate": [f"calib_{n}.{ext}" for n in _calibrated_lengths(opts)
                         for ext in ("npz", "json")],
           "profile": [f"influence_{n}.npz" for n in opts.lengths]}.get(stage, [])
  for path in [os.path.join(opts.out, x) for x in names] + [_marker(opts.out, stage)]:
    if os.path.exists(path):
      os.remove(path)


def run(model, opts: Options, stages: Sequence[str] = STAGES, *, force: bool = False,
        restart: bool = False, documents=None, tokenizer=None, log=print) -> dict:
  """Runs the given stages in order, skipping finished ones unless ``force``.

  ``tokenizer`` (default bytes) encodes the calibration prompts; ``documents`` (token
  arrays in the model's vocabulary; default the embedded corpus) feed the 'document'
  task. Raises before any stage if the options do not fit the model (``check_options``),
  differ from those ``opts.out`` was made with (unless ``restart``), or a stage's inputs
  are missing (``check_stages``).
  """
  unknown = [s for s in stages if s not in STAGES]
  if unknown:
    raise ValueError(f"unknown MoA stages {unknown}; stages: {STAGES}")
  check_options(model, opts, tokenizer)
  if not restart:
    check_directory(opts)  # Other options: that is the reason, not a missing stage.
  check_stages(opts, stages, restart)
  if restart:
    check_directory(opts, restart, log)
  os.makedirs(opts.out, exist_ok=True)
  _write_json(os.path.join(opts.out, "options.json"),
              {"tool": TOOL, "out": opts.out, **opts.to_json()})
  if opts.calibration_from and not done(opts.out, "profile"):
    copy_calibration(opts, log)
  results = {}
  for stage in STAGES:
    if stage not in stages:
      continue
    if done(opts.out, stage) and not force:
      log(f"[moa] {stage}: already done ({_marker(opts.out, stage)})")
      continue
    if stage == "profile" and opts.streaming_rest:
      log("[moa] profile: not needed with streaming_rest (no MILP)")
      continue
    if force:
      _clear(opts, stage)
    start = time.time()
    kwargs = ({"documents": documents, "tokenizer": tokenizer, "log": log}
              if stage == "calibrate" else
              {"tokenizer": tokenizer, "log": log} if stage == "search" else
              {"log": log} if stage == "profile" else {})
    results[stage] = _RUN[stage](model, opts, **kwargs)
    _finish(opts.out, stage, {"seconds": time.time() - start})
    log(f"[moa] {stage}: done in {time.time() - start:.1f}s")
  return results


def summary(out: str) -> str:
  """What a pipeline directory holds: the chosen plan, its density per length, loss vs
  dense, KV bytes and paths (the parts that exist)."""
  lines = [f"MoA results in {out}"]

  def read(name):
    path = os.path.join(out, name)
    if not os.path.exists(path):
      return None
    with open(path) as f:
      return json.load(f)

  opts, valid, applied = read("options.json"), read("validate.json"), read("apply.json")
  if opts:
    lines.append(f"  budget {opts['budget']}, profiled at {opts['lengths']}, validated at "
                 f"{opts['validate_length']}, budget checked up to {opts['extend_length']}")
    variant = [f"{k}={opts[k]}" for k in ("loss_tokens", "spread_depths", "retrieval_heads",
                                          "retrieval_scores", "min_head_density", "full_span_layers",
                                          "streaming_rest")
               if opts.get(k)]
    if variant:
      lines.append(f"  not the paper's defaults: {', '.join(variant)}")
  for n in (opts or {}).get("lengths", []) + [(opts or {}).get("validate_length")]:
    graded = read(f"calib_{n}.json")
    answered = [g["correct"] for g in graded or [] if "correct" in g]
    if answered:
      lines.append(f"  calibration @{n}: dense model correct on {sum(answered)}/{len(answered)}")
  heads = read("retrieval_heads.json")
  if heads and (opts or {}).get("retrieval_heads"):
    lines.append(f"  retrieval heads at full span: {len(heads['full_span'])} (layer.kv head "
                 f"{', '.join(f'{l}.{k}' for l, k in heads['full_span'])})")
  if os.path.exists(os.path.join(out, "plan.json")):
    plan = plan_lib.load_plan(os.path.join(out, "plan.json"))
    sizes = sorted({int(n) for n in (opts or {}).get("lengths", [])} | (
        {int(opts["validate_length"]), int(opts["extend_length"])} if opts else set()))
    dens = ", ".join(f"{n}: {plan.density(n):.3f}" for n in sizes if n <= plan.max_length)
    lines.append(f"  chosen plan: {os.path.join(out, 'plan.json')} (plan "
                 f"{plan.meta.get('plan_id')}, min window {plan.min_window}); density {dens}")
  if valid:
    best = valid["losses"][valid["best"]]
    lines.append(f"  response loss @{valid['length']}: MoA {best:.4f} vs dense "
                 f"{valid['dense_loss']:.4f} nats/token ({len(valid['losses'])} Pareto plans: "
                 f"{min(valid['losses']):.4f}-{max(valid['losses']):.4f})")
  if applied:
    for n, v in applied.items():
      if isinstance(v, dict):
        lines.append(f"  KV cache @{n}: {v['moa_cache_bytes']:,} bytes vs dense "
                     f"{v['dense_cache_bytes']:,} ({v['ratio']:.3f})")
  if os.path.exists(os.path.join(out, "plan.png")):
    lines.append(f"  heatmap: {os.path.join(out, 'plan.png')}")
  return "\n".join(lines)

"""One-shot pruning end to end (launch/prune.py): load, calibrate, prune, report, save.

  from sparsity_jax.sparsity import pipeline
  result = pipeline.prune_model(source="smollm2", spec=SparsitySpec(pattern="2:4"),
                                method="wanda", out="runs/smollm2_wanda_24")

The pruned model is written as a workdir of our own format (``config.json`` with
``config.model.weight_sparsity`` and the default, fixed-mask ``config.train.weight_sparsity``
whatever method trained the source run, and checkpoint 0 holding the dense weights and the
masks; ``launch/eval.py --workdir=...`` evaluates it, ``train.load_model`` loads it) and,
with ``hf_out``, as a Hugging Face directory whose masked-out weights are zeros.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
import types
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from sparsity_jax import parallel
from sparsity_jax.data import pipeline as data_pipeline
from sparsity_jax.errors import UserError
from sparsity_jax.models import TransformerLM
from sparsity_jax.sparsity import masks
from sparsity_jax.sparsity import prune as prune_lib
from sparsity_jax.sparsity.spec import SparsitySpec
from sparsity_jax.sparsity.training import SparseTraining


#: Tokens per calibration window by default (shortened to a model's shorter max_len).
CALIB_LEN = 512


def calibration_tokens(tokens: np.ndarray, *, samples: int, length: int, seed: int) -> np.ndarray:
  """``samples`` random windows of ``length`` tokens from a token stream (the training
  split), [samples, length] int32."""
  if samples <= 0 or length <= 0:
    raise UserError(f"calibration needs samples > 0 and length > 0 (got {samples} x {length})")
  data = data_pipeline.PackedSequences(tokens, length, name="calibration (train)")
  if samples > data.num_examples:
    raise UserError(f"the calibration text holds {data.num_examples} windows of {length} "
                    f"tokens, fewer than the {samples} asked for; lower --calib_samples or "
                    "--calib_len")
  rng = np.random.default_rng(seed)
  picks = np.sort(rng.choice(data.num_examples, samples, replace=False))
  return np.stack([data.example(int(i))[:-1] for i in picks]).astype(np.int32)


def _pruning_config(config: ml_collections.ConfigDict, spec: SparsitySpec):
  """The pruned model's config: unscanned layers, ``spec``'s masks, and the default (fixed)
  sparse-training method."""
  out = ml_collections.ConfigDict(config.to_dict())
  out.model.scan_layers = False
  out.model.weight_sparsity = spec.to_dict()
  # A run trained with recomputed masks (ste / sr_ste / mdgf: N:M from |w| every step) or
  # RigL keeps that method in its config, but it describes how *its* masks evolved, not the
  # pruned model's: one-shot masks stay as set. Kept, it would refuse unstructured specs
  # (or N:M ones, for RigL) with training-config advice, and a later training run on --out
  # would recompute the masks from |w|, silently discarding Wanda's / DSnoT's choice.
  if "train" in out:
    out.train.weight_sparsity = dataclasses.asdict(SparseTraining())
  return out


def _trained_masks_note(workdir: str, config: ml_collections.ConfigDict,
                        spec: SparsitySpec) -> str | None:
  """A note when the run to prune was trained with masks (which pruning replaces)."""
  old = SparsitySpec.from_mapping(config.model.get("weight_sparsity", None))
  if old is None:
    return None
  train = config.get("train", None)
  training = train.get("weight_sparsity", None) if train is not None else None
  method = (training.get("method", None) if training is not None else None) or "fixed"
  old_name = old.pattern if old.nm else f"{old.level:g} unstructured"
  new_name = spec.pattern if spec.nm else f"{spec.level:g} unstructured"
  note = (f"note: {workdir} was trained with {old_name} masks ({method}); pruning scores its "
          f"weights as dense and replaces them with {new_name} masks, fixed from now on")
  if old.nm and spec.nm != old.nm:
    note += (f" (use --pattern={old.pattern} to keep its {old.pattern} structure)")
  return note


def _copy_params(dst: TransformerLM, src_params: nnx.State, scanned: bool) -> None:
  """Sets dst's (unscanned) Params from a model's Params, unstacking a scanned stack."""
  pure = nnx.to_pure_dict(src_params)
  if scanned:
    stacked = pure.pop("layers")
    pure["layers"] = {i: jax.tree.map(lambda a, i=i: a[i], stacked)
                      for i in range(dst.cfg.num_layers)}
  state = nnx.state(dst, nnx.Param)
  nnx.replace_by_pure_dict(state, pure)
  nnx.update(dst, state)


def load_for_pruning(*, source: str | None = None, workdir: str | None = None,
                     config: ml_collections.ConfigDict | None = None,
                     spec: SparsitySpec, before_weights=None, log=None):
  """(experiment, model, pretrained checkpoint or None): the model with unscanned layers
  and all-True masks on ``spec``'s targets, and its data (train split for calibration,
  validation for evaluation).

  ``before_weights(experiment)`` runs once the experiment (config, model shapes, data) is
  built and before any weight is read: checks that need the model's config fail fast.
  """
  from sparsity_jax.train import loop

  if (source is None) == (workdir is None):
    raise UserError("give exactly one model to prune: --model (a pretrained model) or "
                    "--workdir (a training run)")
  if source is not None:
    from sparsity_jax import config_lib
    from sparsity_jax.checkpoints import open_pretrained
    from sparsity_jax.checkpoints.loading import build_loaded
    from sparsity_jax.train.from_pretrained import config_with_pretrained
    ckpt = open_pretrained(source)  # Reads the model's config; weights load below.
    config = config if config is not None else config_lib.pretrained_config(source)
    exp = loop.Experiment(_pruning_config(config_with_pretrained(config, ckpt), spec))
    if before_weights is not None:
      before_weights(exp)
    with parallel.use_mesh(exp.mesh, exp.rules):
      model = build_loaded(exp.make_model,
                           lambda m: ckpt.load_params_into(m, mesh=exp.mesh, rules=exp.rules),
                           exp.mesh, exp.rules)
    return exp, model, ckpt
  old_config = loop.load_workdir_config(workdir) if config is None else config
  exp = loop.Experiment(_pruning_config(old_config, spec))
  if before_weights is not None:
    before_weights(exp)
  note = _trained_masks_note(workdir, old_config, spec)
  if note and log:
    log(note)
  _, _, state, _, _ = loop.restore_workdir(workdir, old_config, load_data=False)
  with parallel.use_mesh(exp.mesh, exp.rules):
    model = exp.make_model()
    _copy_params(model, state.params, bool(old_config.model.get("scan_layers", False)))
  return exp, model, None


def save_workdir(out: str, config: ml_collections.ConfigDict, model: TransformerLM,
                 *, overwrite: bool = False) -> None:
  """Writes ``model`` (weights + masks) as a workdir: config.json + checkpoint 0 (step,
  params, model state; no optimizer state)."""
  from sparsity_jax.train import checkpoint as ckpt_lib
  from sparsity_jax.train import state as state_lib

  if ckpt_lib.has_checkpoints(out):
    if not overwrite:
      raise UserError(f"--out={out} holds checkpoints already; choose a new directory or pass "
                      "--overwrite")
    shutil.rmtree(os.path.join(out, "checkpoints"))
  os.makedirs(out, exist_ok=True)
  _, params, rest = state_lib.split_model(model)
  state = state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state=rest,
                               opt_state=None)
  checkpointer = ckpt_lib.Checkpointer(out, keep=1, async_save=False)
  try:
    checkpointer.save(0, state, {"step": 0, "seed": int(config.seed)}, force=True)
  finally:
    checkpointer.close()
  ckpt_lib.write_config(out, config.to_dict())


def save_hf(out: str, model: TransformerLM, ckpt=None, *, overwrite: bool = False) -> list[str]:
  """Writes ``model`` with its masked-out weights zeroed as a Hugging Face directory
  (the model's weights are zeroed in place)."""
  from sparsity_jax.checkpoints.hf import save_model

  if os.path.exists(out) and not overwrite:
    raise UserError(f"--hf_out={out} exists; choose a new directory or pass --overwrite")
  masks.bake(model)
  arch = ckpt.arch if ckpt is not None else ("qwen2" if model.cfg.qkv_bias else "llama")
  hf_config = dict(getattr(ckpt, "hf_config", {}) or {}) or None
  files = save_model(model, out, arch=arch, hf_config=hf_config)
  if ckpt is not None:
    files += ckpt.tokenizer().save_pretrained(out)
  return files


def evaluate(exp, model: TransformerLM) -> dict[str, float]:
  """Validation loss / bits per byte / perplexity of ``model`` on ``exp``'s data."""
  from sparsity_jax.train import loop
  from sparsity_jax.train import state as state_lib

  with parallel.use_mesh(exp.mesh, exp.rules):
    graphdef, params, rest = state_lib.split_model(model)
    shardings = types.SimpleNamespace(
        params=parallel.state_shardings(params, exp.mesh, exp.rules),
        model_state=parallel.state_shardings(rest, exp.mesh, exp.rules))
    params = jax.device_put(params, shardings.params)
    rest = jax.device_put(rest, shardings.model_state)
    return loop.evaluate(exp, loop.jit_eval_step(exp, graphdef, shardings), params, rest)


def check_options(*, method: str, scope: str = "layer", calib_samples: int = 16,
                  calib_len: int | None = None) -> None:
  """Refuses out-of-range launch/prune.py options (named as its flags) before anything
  loads; ``calib_len`` against the model's context is checked once the config is known."""
  if method not in prune_lib.METHODS:
    raise UserError(f"--method={method}; use one of {', '.join(prune_lib.METHODS)}")
  if scope not in ("layer", "global"):
    raise UserError(f"--scope={scope}; use 'layer' or 'global'")
  if method == "magnitude":
    return  # The calibration options are not used.
  if scope != "layer":
    raise UserError(f"--scope={scope} is for --method=magnitude; {method} compares weights "
                    "per output (--scope=layer)")
  if calib_samples < 1:
    raise UserError(f"{method} needs calibration text: set --calib_samples > 0")
  if calib_len is not None and calib_len < 1:
    raise UserError(f"--calib_len={calib_len}: a calibration window needs at least 1 token")


def prune_model(*, spec: SparsitySpec, method: str, source: str | None = None,
                workdir: str | None = None, config: ml_collections.ConfigDict | None = None,
                scope: str = "layer", calib_samples: int = 16, calib_len: int | None = None,
                dsnot_options: prune_lib.DSnoTOptions = prune_lib.DSnoTOptions(),
                out: str | None = None, hf_out: str | None = None, evaluate_dense: bool = False,
                evaluate_pruned: bool = True, overwrite: bool = False, log=print) -> dict[str, Any]:
  """Prunes a pretrained model (``source``) or a trained run (``workdir``) and reports.

  Calibration windows (Wanda, DSnoT) come from the training split of the config's data
  (the embedded corpus by default): ``calib_samples`` windows of ``calib_len`` tokens
  (default :data:`CALIB_LEN`, or the model's ``max_len`` if shorter; a longer
  ``calib_len`` is refused). Evaluation uses the validation split. Writes ``out`` (our
  workdir, plus ``prune_report.json`` / ``.md``) and ``hf_out`` when given.

  Returns the report: the spec, method, timings, sparsity report, DSnoT errors, metrics.
  """
  check_options(method=method, scope=scope, calib_samples=calib_samples, calib_len=calib_len)
  if out and not overwrite and os.path.isdir(out):
    from sparsity_jax.train import checkpoint as ckpt_lib
    if ckpt_lib.has_checkpoints(out):
      raise UserError(f"--out={out} holds checkpoints already; choose a new directory or pass "
                      "--overwrite")
  if hf_out and os.path.exists(hf_out) and not overwrite:
    raise UserError(f"--hf_out={hf_out} exists; choose a new directory or pass --overwrite")
  calibrated = method in ("wanda", "dsnot")
  calibration = None

  def before_weights(exp):
    # The calibration windows are drawn before the weights load, so a window longer than
    # the model's context, or more windows than the text holds, fails in seconds.
    nonlocal calibration
    if not calibrated:
      return
    max_len = int(exp.model_config.max_len)
    length = min(CALIB_LEN, max_len) if calib_len is None else int(calib_len)
    if length > max_len:
      raise UserError(f"--calib_len={length} exceeds the model's context of {max_len} tokens "
                      f"(its max_len); use --calib_len <= {max_len}")
    calibration = calibration_tokens(exp.splits["train"], samples=calib_samples,
                                     length=length, seed=int(exp.config.seed))

  t0 = time.time()
  exp, model, ckpt = load_for_pruning(source=source, workdir=workdir, config=config, spec=spec,
                                      before_weights=before_weights, log=log)
  result: dict[str, Any] = {"model": source or workdir, "method": method, "scope": scope,
                            "spec": spec.to_dict(), "load_s": time.time() - t0}
  if evaluate_dense:
    t = time.time()
    result["dense"] = evaluate(exp, model)
    result["dense_eval_s"] = time.time() - t
    log(f"dense: {json.dumps(result['dense'])}")
  if calibrated:
    result["calibration"] = {"sequences": calib_samples, "length": int(calibration.shape[1]),
                             "split": "train", "seed": int(exp.config.seed)}
  if method == "dsnot":
    result["dsnot_options"] = dict(vars(dsnot_options))
  t = time.time()
  with parallel.use_mesh(exp.mesh, exp.rules):
    details = prune_lib.prune(model, spec, method, scope=scope, calibration=calibration,
                              dsnot_options=dsnot_options, log=log)
  result["prune_s"] = time.time() - t
  result.update(details)
  rep = masks.report(model, spec)
  result["sparsity"] = rep["global"]
  log(f"sparsity: {json.dumps(rep['global'])}")
  if evaluate_pruned:
    t = time.time()
    result["pruned"] = evaluate(exp, model)
    result["eval_s"] = time.time() - t
    log(f"pruned: {json.dumps(result['pruned'])}")
  if out:
    save_workdir(out, exp.config, model, overwrite=overwrite)
    with open(os.path.join(out, "prune_report.json"), "w") as f:
      json.dump({**result, "layers": rep["layers"]}, f, indent=2, sort_keys=True)
    with open(os.path.join(out, "prune_report.md"), "w") as f:
      f.write(f"# {method} pruning of {source or workdir}\n\n"
              f"spec: {json.dumps(spec.to_dict())}\n\n" + masks.report_markdown(rep))
  if hf_out:
    result["hf_files"] = save_hf(hf_out, model, ckpt, overwrite=overwrite)
  return result

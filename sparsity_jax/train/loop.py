"""Training and evaluation loops: ``train_and_evaluate(config, workdir)``.

Data flow: config -> mesh + model + data -> jitted sharded train step -> checkpoints ->
evaluation. Launchers (launch/train.py, launch/eval.py) and notebooks call these
functions; nothing here parses flags.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import signal
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from sparsity_jax import config_lib, parallel
from sparsity_jax.data import corpus, pipeline
from sparsity_jax.errors import UserError, WorkdirError
from sparsity_jax.models import ModelConfig, TransformerLM
from sparsity_jax.sparsity import training as sparse_training
from sparsity_jax.train import checkpoint as ckpt_lib
from sparsity_jax.train import distill as distill_lib
from sparsity_jax.train import metrics as metrics_lib
from sparsity_jax.train import objectives
from sparsity_jax.train import optimizer as optim
from sparsity_jax.train import state as state_lib
from sparsity_jax.train import step as step_lib

log = logging.getLogger(__name__)


class Experiment:
  """Everything derived from a config before any state exists: validated, cheap."""

  def __init__(self, config: ml_collections.ConfigDict, *, load_data: bool = True,
               devices=None, splits: tuple[str, ...] = ("train", "validation")):
    try:
      self._validate(config, load_data, devices, splits)
    except UserError:
      raise
    except ValueError as e:  # A config value the experiment cannot be built from.
      raise UserError(str(e)) from e

  def _validate(self, config, load_data, devices, splits):
    self.config = config
    config_lib.check_ranges(config)
    self.model_config = ModelConfig.from_config(config.model)
    # Builds the model abstractly (no arrays): every core checks its settings here,
    # e.g. an unknown attention kind fails before anything is written.
    abstract_model = nnx.eval_shape(lambda: TransformerLM(self.model_config, rngs=nnx.Rngs(0)))
    self.mask_schedule = sparse_training.schedule_from_config(config, self.model_config,
                                                              abstract_model)
    objectives.get(config.objective)  # Fails early on an unknown objective.
    self.distill = distill_lib.Distill.from_mapping(config.get("distill", None))
    if self.distill.active:
      if not (config.get("init_from") or config.get("pretrained")):
        raise ValueError("config.distill needs a teacher: set config.init_from (a workdir, e.g. "
                         "a pruned model) or config.pretrained; the teacher is the dense model "
                         "of those weights")
      if config.objective != "causal_lm":
        raise ValueError("config.distill needs config.objective='causal_lm'")
    if config.objective == "masked_diffusion" and self.model_config.causal:
      raise ValueError("config.objective='masked_diffusion' needs a bidirectional model: set "
                       "config.model.causal=False")
    seq_len = int(config.data.seq_len)
    if seq_len > self.model_config.max_len:
      raise ValueError(f"config.data.seq_len={seq_len} exceeds config.model.max_len="
                       f"{self.model_config.max_len}: the model cannot take sequences that long; "
                       "lower seq_len or raise max_len")
    self.rules = parallel.rules_from_config(config.get("logical_axis_rules"))
    self.mesh = parallel.make_mesh(config.mesh, devices)
    batch_shards = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
    for name, batch in (("data.batch_size", config.data.batch_size),
                        ("eval.batch_size", config.eval.batch_size)):
      if batch % batch_shards:
        raise ValueError(f"config.{name}={batch} must be divisible by data x fsdp = {batch_shards}")
    self.batch_sharding = parallel.batch_sharding(self.mesh, 2, self.rules)
    self.splits, self.bytes_per_token = None, {}
    if load_data:
      self.splits = corpus.load_split(config.data, self.tokenizer(), splits)
      for name, tokens in self.splits.items():
        # Too little text for one sequence (or one validation batch) fails here, not after
        # the workdir is written (or after training, at the final evaluation).
        data = pipeline.PackedSequences(tokens, seq_len, name=name)
        if name == "validation" and data.num_examples < config.eval.batch_size:
          raise ValueError(f"the validation split has {data.num_examples} sequences of "
                           f"{seq_len} tokens, fewer than one batch of config.eval.batch_size="
                           f"{config.eval.batch_size}; lower eval.batch_size or data.seq_len")
        self.bytes_per_token[name] = (
            1.0 if self.tokenizer() is None else corpus.bytes_per_token(config.data, name, tokens))

  def tokenizer(self):
    """The data's tokenizer: None for bytes, else config.pretrained's (an HFTokenizer)."""
    kind = self.config.data.get("tokenizer", "bytes")
    if kind == "bytes":
      return None
    if kind != "pretrained":
      raise ValueError(f"config.data.tokenizer={kind!r}; use 'bytes' or 'pretrained'")
    if not self.config.get("pretrained"):
      raise ValueError("config.data.tokenizer='pretrained' needs config.pretrained (e.g. "
                       "--config.pretrained=smollm2)")
    if not hasattr(self, "_tokenizer"):
      from sparsity_jax.checkpoints import open_pretrained
      self._tokenizer = open_pretrained(self.config.pretrained).tokenizer()
    return self._tokenizer

  def make_model(self) -> TransformerLM:
    return TransformerLM(self.model_config, rngs=nnx.Rngs(params=int(self.config.seed)))

  def put_batch(self, batch: dict[str, np.ndarray], global_batch: int) -> dict[str, jax.Array]:
    shape = lambda x: (global_batch,) + x.shape[1:]
    return {k: jax.make_array_from_process_local_data(self.batch_sharding, v, shape(v))
            for k, v in batch.items()}


class Preempted(Exception):
  """Raised after a SIGTERM/SIGINT checkpoint; rerunning the command resumes the run."""


class Preemption:
  """Turns SIGTERM/SIGINT into a flag the loop polls (then it checkpoints and exits); a
  context manager, used by the training loop and by DuoAttention gate training (moa.duo)."""

  def __init__(self):
    self.requested = False
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    self.requested = True
    log.warning("received signal %d: checkpointing at the end of this step", signum)

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def any_process_requested(self) -> bool:
    if jax.process_count() == 1:
      return self.requested
    flags = multihost_utils.process_allgather(np.array([self.requested], np.int32))
    return bool(np.any(flags))


def evaluate(exp: Experiment, eval_step, params, model_state) -> dict[str, float]:
  """Validation loss (nats/token), bits per byte and perplexity over
  ``config.eval.num_batches``; bits per byte divide by the split's bytes per token (1 for
  byte tokens, the split's average for a subword tokenizer)."""
  cfg = exp.config
  data = pipeline.PackedSequences(exp.splits["validation"], cfg.data.seq_len, name="validation")
  rows = pipeline.local_rows(exp.batch_sharding, cfg.eval.batch_size)
  loss_sum, tokens = 0.0, 0.0
  for index, batch in enumerate(
      pipeline.eval_batches(data, cfg.eval.batch_size, cfg.eval.num_batches, rows)):
    out = eval_step(params, model_state, exp.put_batch(batch, cfg.eval.batch_size), index)
    loss_sum += float(out["loss_sum"])
    tokens += float(out["tokens"])
  loss = loss_sum / max(tokens, 1.0)
  bits_per_byte = loss / math.log(2.0) / exp.bytes_per_token.get("validation", 1.0)
  return {"loss": loss, "bits_per_byte": bits_per_byte,
          "perplexity": math.exp(min(loss, 80.0)), "tokens": tokens}


def jit_eval_step(exp: Experiment, graphdef, shardings):
  eval_step = step_lib.make_eval_step(graphdef, objective=exp.config.objective,
                                      seed=int(exp.config.seed))
  return jax.jit(eval_step, in_shardings=(shardings.params, shardings.model_state,
                                          exp.batch_sharding, None))


def _check_finite(step: int, metrics: dict[str, float], last_saved: int | None, workdir: str):
  if not all(math.isfinite(metrics[k]) for k in ("loss", "grad_norm", "param_norm")):
    kept = (f"the last good checkpoint (step {last_saved}) is kept in {workdir}/checkpoints"
            if last_saved is not None else "no checkpoint had been written yet")
    raise FloatingPointError(
        f"training diverged at step {step}: loss={metrics['loss']}, grad_norm="
        f"{metrics['grad_norm']}, param_norm={metrics['param_norm']}; {kept}. Lower config.train.lr, raise warmup_steps or "
        "grad_clip_norm, or use float32 compute, then rerun (it resumes from that checkpoint).")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       devices=None, pretrained: str | None = None) -> dict[str, Any]:
  """Trains ``config`` in ``workdir`` (resuming if it holds a checkpoint), then evaluates.

  ``devices`` restricts the mesh to a subset of jax.devices() (default: all of them).
  ``pretrained`` (or ``config.pretrained``) starts from the weights of a pretrained
  model: ``smollm2``, a .gguf file or a Hugging Face directory; its architecture then
  fixes that of ``config.model`` (see train.from_pretrained.config_with_pretrained), and
  a resumed run ignores it. ``config.init_from`` (a workdir) starts from that run's
  weights and masks instead, with its model section (:func:`config_with_init_from`);
  ``config.distill`` adds SquareHead distillation from those weights with every mask off;
  ``config.train.weight_sparsity`` sets how masks evolve (sparsity.training: fixed, STE,
  SR-STE, MDGF / SDGF, RigL).

  Returns {'state', 'graphdef', 'train_metrics' (last step), 'eval_metrics' (final)}.
  """
  if pretrained:
    config = ml_collections.ConfigDict(config.to_dict())
    config.pretrained = pretrained
  ckpt = None
  if config.get("pretrained"):
    from sparsity_jax.checkpoints import open_pretrained
    from sparsity_jax.train import from_pretrained
    ckpt = open_pretrained(config.pretrained)
    config = from_pretrained.config_with_pretrained(config, ckpt)
  init_from = config.get("init_from", "")
  if init_from and ckpt_lib.has_checkpoints(workdir):
    # Resuming: the run's own checkpoint holds everything but a distillation teacher.
    config = ml_collections.ConfigDict(config.to_dict())
    config.model = load_workdir_config(workdir).model
  elif init_from:
    config = config_with_init_from(config, init_from)
  config_dict = json.loads(config.to_json_best_effort())
  exp = Experiment(config, devices=devices)  # Validates config and data; writes nothing.
  ckpt_lib.check_workdir_compatible(workdir, config_dict)
  os.makedirs(workdir, exist_ok=True)
  tcfg = config.train
  is_main = jax.process_index() == 0

  with parallel.use_mesh(exp.mesh, exp.rules):
    tx = optim.make_optimizer(tcfg)
    schedule = optim.learning_rate_schedule(tcfg)
    checkpointer = ckpt_lib.Checkpointer(workdir, keep=tcfg.keep_checkpoints)
    last_saved = checkpointer.latest_step()
    if last_saved is not None and last_saved > int(tcfg.steps):
      checkpointer.close()  # Training it to tcfg.steps would mean going back.
      raise UserError(f"--workdir={workdir} is at step {last_saved}, past config.train.steps="
                      f"{tcfg.steps}: raise train.steps to train on, or evaluate it with "
                      "launch/eval.py")
    if ckpt is not None and last_saved is None and not init_from:
      graphdef, state, shardings = from_pretrained.create_train_state(ckpt, exp.make_model, tx,
                                                                      exp.mesh, exp.rules)
    else:
      graphdef, state, shardings = state_lib.create_train_state(exp.make_model, tx, exp.mesh,
                                                                exp.rules)
    train_data = pipeline.PackedSequences(exp.splits["train"], config.data.seq_len)
    rows = pipeline.local_rows(exp.batch_sharding, config.data.batch_size)
    iterator = pipeline.TrainIterator(train_data, config.data.batch_size, int(config.seed), rows)

    if last_saved is not None:
      last_saved, state, data_state = checkpointer.restore_newest(state, shardings,
                                                                  set_aside=True)
      iterator.set_state(data_state)
      if is_main:
        print(f"Resumed {workdir} from step {last_saved}.", flush=True)
    start = int(iterator.step)
    init_state = None
    if init_from and (last_saved is None or exp.distill.active):
      _check_init_from(init_from, "the distillation teacher's weights" if last_saved else
                       "the starting weights")
      init_state = _restore_into(init_from, shardings)
    if init_from and last_saved is None:
      # Own buffers: the step donates the state, and the teacher keeps init_state's.
      state = state.replace(params=jax.tree.map(jnp.copy, init_state.params),
                            model_state=jax.tree.map(jnp.copy, init_state.model_state))
      if is_main:
        print(f"Started from {init_from} (step {init_state.step}): weights and masks; fresh "
              "optimizer.", flush=True)
    teacher_args = ()
    if exp.distill.active:
      teacher = (init_state.params if init_state is not None
                 else _pretrained_params(ckpt, exp, shardings))
      teacher_args = (teacher,)
      if is_main:
        print(f"Distillation (SquareHead) from the dense model of "
              f"{init_from or config.pretrained}: {exp.distill}.", flush=True)
    schedule_masks = exp.mask_schedule
    if schedule_masks is not None and last_saved is None and not init_from:
      state = sparse_training.with_initial_masks(schedule_masks, state, shardings,
                                                 int(config.seed), log=is_main)
    if schedule_masks is not None and schedule_masks.training.method == "fixed":
      schedule_masks = None  # Fixed masks: the forward's where() masks the gradients too.
    ckpt_lib.write_config(workdir, config_dict, resumed_step=last_saved)
    if is_main:  # Rows past the checkpoint (an interrupted run's) are written again.
      metrics_lib.drop_rows_after(os.path.join(workdir, "metrics.jsonl"), start)

    train_step = jax.jit(step_lib.make_train_step(graphdef, tx, schedule,
                                                  objective=config.objective,
                                                  seed=int(config.seed),
                                                  mask_schedule=schedule_masks,
                                                  distill=exp.distill if teacher_args else None),
                         in_shardings=(shardings, exp.batch_sharding)
                         + ((shardings.params,) if teacher_args else ()),
                         out_shardings=(shardings, None), donate_argnums=(0,))
    eval_step = jit_eval_step(exp, graphdef, shardings)
    writer = metrics_lib.MetricWriter(workdir, purge_step=start + 1)
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    if is_main:
      print(f"Model: {n_params / 1e6:.2f}M parameters; mesh {dict(exp.mesh.shape)}; "
            f"{jax.device_count()} devices, {jax.process_count()} processes.", flush=True)

    from tqdm.auto import tqdm  # Lazily: a library import should not pull a progress bar.
    bar = tqdm(total=int(tcfg.steps), initial=start, disable=not is_main, desc="train",
               dynamic_ncols=True)
    pending = None  # (step, metrics on device, dispatch time) of the previous step.
    last_train, eval_metrics = {}, None
    last_fetch = time.perf_counter()

    def fetch(entry):
      nonlocal last_fetch, last_train
      step, device_metrics = entry
      host = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
      # The step reports bits per token; a subword tokenizer's token spans several bytes.
      host["bits_per_byte"] /= exp.bytes_per_token.get("train", 1.0)
      _check_finite(step, host, last_saved, workdir)
      now = time.perf_counter()
      host["step_time_s"] = now - last_fetch
      host["tokens_per_s"] = host["tokens"] / max(host["step_time_s"], 1e-9)
      last_fetch = now
      last_train = host
      if (step + 1) % tcfg.log_every == 0 or step + 1 == tcfg.steps:
        writer.write(step + 1, host, prefix="train/")
      bar.update(1)
      bar.set_postfix(loss=f"{host['loss']:.3f}", bpb=f"{host['bits_per_byte']:.3f}",
                      tok_s=f"{host['tokens_per_s']:.0f}")

    try:
      with Preemption() as preemption:
        for step in range(start, int(tcfg.steps)):
          batch = exp.put_batch(next(iterator), config.data.batch_size)
          state, device_metrics = train_step(state, batch, *teacher_args)
          if pending is not None:
            fetch(pending)  # Step n-1's metrics, after step n is dispatched.
          pending = (step, device_metrics)
          done = step + 1
          stop = preemption.any_process_requested()
          if done % tcfg.checkpoint_every == 0 or done == tcfg.steps or stop:
            fetch(pending)  # Never checkpoint a state whose step was not checked finite.
            pending = None
            checkpointer.save(done, state, iterator.get_state(), force=True)
            last_saved = done
          if config.eval.every > 0 and done % config.eval.every == 0 and done < tcfg.steps:
            if pending is not None:
              fetch(pending)
              pending = None
            eval_metrics = evaluate(exp, eval_step, state.params, state.model_state)
            writer.write(done, eval_metrics, prefix="eval/")
            bar.write(f"step {done}: validation loss {eval_metrics['loss']:.4f}, "
                      f"bits/byte {eval_metrics['bits_per_byte']:.4f}")
          if stop:
            checkpointer.close()
            raise Preempted(f"preempted: checkpoint saved at step {done} in {workdir}; "
                                    "rerun the same command to resume")
        if pending is not None:
          fetch(pending)
      eval_metrics = evaluate(exp, eval_step, state.params, state.model_state)
      writer.write(int(tcfg.steps), eval_metrics, prefix="eval/")
      if is_main:
        bar.write(f"final validation: loss {eval_metrics['loss']:.4f}, bits/byte "
                  f"{eval_metrics['bits_per_byte']:.4f}, perplexity {eval_metrics['perplexity']:.3f}")
    finally:
      bar.close()
      writer.close()
      checkpointer.close()
  return {"state": state, "graphdef": graphdef, "train_metrics": last_train,
          "eval_metrics": eval_metrics}


def _check_init_from(init_from: str, what: str) -> None:
  if not os.path.isfile(os.path.join(init_from, "config.json")):
    raise WorkdirError(f"config.init_from={init_from} is not a run directory (no config.json), "
                       f"and {what} come from it: point it at a workdir, e.g. "
                       "launch/prune.py's --out")
  if not ckpt_lib.has_checkpoints(init_from):
    raise WorkdirError(f"config.init_from={init_from} holds no checkpoint to start from")


def config_with_init_from(config: ml_collections.ConfigDict,
                          init_from: str) -> ml_collections.ConfigDict:
  """A copy of ``config`` whose model section is that of the workdir ``init_from`` (its
  weights and masks will be loaded into it).

  Raises UserError when ``config`` sets a model field (away from base_config's default)
  that ``init_from``'s model contradicts, or reads other data tokens than it was trained
  on: a silent replacement would train something else than the command says.
  """

  _check_init_from(init_from, "the starting weights")
  saved = load_workdir_config(init_from)
  default = config_lib.base_config().model.to_dict()
  mine, theirs = config.model.to_dict(), saved.model.to_dict()
  conflicts = [f"model.{k}: {mine[k]!r} here, {theirs.get(k)!r} in init_from"
               for k in sorted(mine) if mine[k] != default.get(k) and mine[k] != theirs.get(k)]
  if conflicts:
    raise UserError(f"config.init_from={init_from} fixes the model, and this config sets it "
                    f"otherwise ({'; '.join(conflicts)}); drop those settings or use "
                    "init_from's own config")
  if (config.data.get("tokenizer", "bytes") != saved.data.get("tokenizer", "bytes") or
      (saved.data.get("tokenizer") == "pretrained" and
       config.get("pretrained") != saved.get("pretrained"))):
    raise UserError(f"config.init_from={init_from} was trained on data.tokenizer="
                    f"{saved.data.get('tokenizer', 'bytes')!r} (pretrained="
                    f"{saved.get('pretrained', '')!r}); this config reads "
                    f"{config.data.get('tokenizer', 'bytes')!r} (pretrained="
                    f"{config.get('pretrained', '')!r}): use the same data settings")
  out = ml_collections.ConfigDict(config.to_dict())
  out.model = ml_collections.ConfigDict(saved.model.to_dict())
  out.init_from = init_from
  return out


def _restore_into(workdir: str, shardings) -> state_lib.TrainState:
  """Step, params and model state of ``workdir``'s newest checkpoint, placed on this run's
  shardings."""
  _, _, restored, _, step = restore_workdir(workdir, load_data=False)
  return state_lib.TrainState(
      step=step, params=jax.device_put(restored.params, shardings.params),
      model_state=jax.device_put(restored.model_state, shardings.model_state), opt_state=None)


def _pretrained_params(ckpt, exp: Experiment, shardings):
  """The pretrained checkpoint's parameters, on the run's parameter shardings."""
  model = nnx.eval_shape(exp.make_model)
  ckpt.load_params_into(model, mesh=exp.mesh, rules=exp.rules)
  return jax.device_put(state_lib.split_model(model)[1], shardings.params)


def load_workdir_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run started with (``<workdir>/config.json``)."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise WorkdirError(f"{path} not found: --workdir must be a training run's directory")
  with open(path) as f:
    saved = json.load(f)
  # Fields added to the code after the run started take their defaults.
  config = config_lib.base_config()
  config.update(saved)
  return config


def restore_workdir(workdir: str, config: ml_collections.ConfigDict | None = None,
                    step: int | None = None, *, load_data: bool = True):
  """Restores the model of a run's newest readable (or the given) checkpoint.

  Only the step, parameters and model state are read (evaluation and generation need no
  optimizer state): the returned TrainState has ``opt_state=None``. A checkpoint that
  cannot be read is skipped with a warning unless ``step`` names it.

  ``config`` (default: the run's config.json) may change the data, the evaluation, dtypes
  and the attention core's settings, but its model must have the run's weights and masks:
  one with other shapes or layers (e.g. another model size, no weight masks where the run
  has them) raises UserError naming the differing fields, before any checkpoint is read.

  Returns (experiment, graphdef, state, state shardings, step).
  """
  given = config is not None
  config = load_workdir_config(workdir) if config is None else config
  exp = Experiment(config, load_data=load_data)
  if given:
    _check_same_weights(workdir, exp)
  checkpointer = ckpt_lib.Checkpointer(workdir, keep=max(int(config.train.keep_checkpoints), 1))
  try:
    with parallel.use_mesh(exp.mesh, exp.rules):
      tx = optim.make_optimizer(config.train)
      graphdef = state_lib.split_model(nnx.eval_shape(exp.make_model))[0]
      abstract = jax.eval_shape(lambda: _abstract_state(exp, tx))
      shardings = parallel.state_shardings(abstract, exp.mesh, exp.rules)
      step, restored, _ = checkpointer.restore_newest(
          abstract, shardings, step=step, keys=("step", "params", "model_state"))
  finally:
    checkpointer.close()
  state = state_lib.TrainState(step=restored["step"], params=restored["params"],
                               model_state=restored["model_state"], opt_state=None)
  return exp, graphdef, state, shardings, step


# Model fields that change no weight or mask shape (a run restores under other values).
_NOT_SHAPING = ("dtype", "param_dtype", "remat", "max_len", "rope_theta", "rope_scaling",
                "norm_eps", "causal")


def _weight_layout(model_config: ModelConfig) -> dict:
  """{path: (variable type, shape)} of a model's parameters and state (masks, cores' state)."""
  model = nnx.eval_shape(lambda: TransformerLM(model_config, rngs=nnx.Rngs(0)))
  return {path: (type(v), tuple(v.shape)) for path, v in nnx.to_flat_state(nnx.state(model))}


def _check_same_weights(workdir: str, exp: Experiment) -> None:
  """Raises UserError when ``exp``'s model has other parameters or weight masks than the
  run in ``workdir`` was trained with: its checkpoints cannot be read into that model (and
  are not damaged, as Orbax's error would suggest), or only partly (fewer layers, masks
  left off: another model than the run's would be evaluated)."""
  from sparsity_jax.sparsity import WeightMask
  try:
    saved = load_workdir_config(workdir)
    theirs = _weight_layout(ModelConfig.from_config(saved.model))
  except ValueError:  # No readable config.json: the checkpoint read says what is wrong.
    return
  mine = _weight_layout(exp.model_config)
  weights = lambda layout: {p: v for p, v in layout.items()
                            if issubclass(v[0], (nnx.Param, WeightMask))}
  # An attention core's own state may be left out (it is not read), not added.
  if weights(mine) == weights(theirs) and all(theirs.get(p) == v for p, v in mine.items()):
    return
  diffs = ckpt_lib.field_diffs(saved.model.to_dict(), exp.config.model.to_dict(), "model",
                               names=("the run", "--config"))
  shaping = [d for d in diffs if d.split(":")[0].split(".")[1] not in _NOT_SHAPING]
  raise UserError(
      f"--config describes another model than the run in {workdir} was trained with "
      f"({'; '.join(shaping or diffs) or 'other weights'}), so its checkpoints cannot be "
      "read into it: leave out --config (the run's own config.json is used) or give those "
      "fields the run's values")


def evaluate_workdir(workdir: str, config: ml_collections.ConfigDict | None = None,
                     step: int | None = None) -> dict[str, float]:
  """Standalone evaluation of a run's latest (or given) checkpoint on the validation split."""
  exp, graphdef, state, shardings, step = restore_workdir(workdir, config, step)
  with parallel.use_mesh(exp.mesh, exp.rules):
    metrics = evaluate(exp, jit_eval_step(exp, graphdef, shardings), state.params,
                       state.model_state)
  writer = metrics_lib.MetricWriter(workdir, filename="eval.jsonl")
  writer.write(step, metrics, prefix="eval/")
  writer.close()
  return {"step": step, **metrics}


def load_model(workdir: str, *, step: int | None = None, attention: dict | None = None,
               config: ml_collections.ConfigDict | None = None) -> nnx.Module:
  """A trained model from a workdir, optionally with another attention core.

  ``attention`` replaces ``config.model.attention`` (e.g. {'kind': 'sparsed', ...}); the
  trained parameters are the same for every core, the core's own state starts fresh.
  """
  exp, _, state, _, step = restore_workdir(workdir, config, step, load_data=False)
  model_config = exp.model_config
  if attention is not None:
    model_config = dataclasses.replace(model_config, attention=dict(attention))
  model = TransformerLM(model_config, rngs=nnx.Rngs(0))
  nnx.update(model, state.params)
  # Weight masks are model state but belong to the weights, not to the core: keep them.
  from sparsity_jax.sparsity import WeightMask
  weight_masks = nnx.filter_state(state.model_state, WeightMask)
  if jax.tree.leaves(weight_masks):
    nnx.update(model, weight_masks)
  return model


def _abstract_state(exp: Experiment, tx) -> state_lib.TrainState:
  _, params, rest = state_lib.split_model(exp.make_model())
  return state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state=rest,
                              opt_state=tx.init(params))

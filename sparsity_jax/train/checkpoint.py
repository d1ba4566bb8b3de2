"""Orbax checkpoints of the train state and the data iterator, plus run-config checks.

A workdir names a run. ``<workdir>/config.json`` holds the config of the latest start
and ``<workdir>/invocations.jsonl`` one line per start (time, command line, resumed
step, config), so a rerun with another ``lr`` or ``steps`` stays on record. Once the run
has a checkpoint, a later start must describe the same model and data, or it stops
before touching anything; a run that never reached a checkpoint may start over with a
corrected config. ``<workdir>/checkpoints/<step>/`` holds the train state and the
iterator position; the last ``keep`` are kept. A checkpoint that cannot be read is
skipped with a warning for the newest readable one (see ``Checkpointer.restore_newest``).
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from typing import Any

import jax
import orbax.checkpoint as ocp

from sparsity_jax.errors import UserError, WorkdirError
from sparsity_jax.train.state import abstract_with_shardings

# Config sections that must match to resume: anything that changes shapes or the data
# stream. Training hyper-parameters (steps, lr, intervals) may change between runs.
RESUME_KEYS = ("model", "data.source", "data.glob", "data.seq_len", "data.batch_size", "seed",
               "objective", "train.weight_sparsity.method")
# What a key meant in runs saved before it existed (so that those still resume).
_RESUME_DEFAULTS = {"train.weight_sparsity.method": "fixed"}


def _lookup(config_dict: dict, dotted: str):
  node = config_dict
  for part in dotted.split("."):
    if not isinstance(node, dict) or part not in node:
      return None
    node = node[part]
  return node


def check_workdir_compatible(workdir: str, config_dict: dict) -> None:
  """Raises UserError if ``workdir`` holds checkpoints of a different model or data (or
  masks trained by another ``train.weight_sparsity.method``).

  A workdir whose config.json was written by a start that never reached a checkpoint
  (e.g. it failed on a typo) holds nothing to resume: any config may start there.
  """
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path) or not has_checkpoints(workdir):
    return
  with open(path) as f:
    saved = json.load(f)
  diffs = []
  for key in RESUME_KEYS:
    old, new = (_comparable(_lookup(d, key), _RESUME_DEFAULTS.get(key))
                for d in (saved, config_dict))
    diffs += field_diffs(old, new, key)
  if diffs:
    # init_from keeps the run's model, so it is the way on only when the model is the same.
    start_from = "" if any(d.startswith("model.") for d in diffs) else (
        " (with config.init_from=<this workdir> to start from its weights and masks)")
    raise UserError(
        f"--workdir={workdir} holds a run with a different model, data or sparse-training "
        f"method ({'; '.join(diffs)}). Use a new --workdir for a new run{start_from}, or the "
        "original config to resume this one.")


def field_diffs(old, new, prefix: str, *, names=("workdir", "config")) -> list[str]:
  """``'<prefix>.<field>: workdir has <old>, config has <new>'`` for each leaf field where
  two config sections differ (nested dicts are compared field by field, so a message
  names the changed fields instead of printing two whole sections)."""
  if isinstance(old, dict) and isinstance(new, dict):
    out = []
    for key in sorted(set(old) | set(new), key=str):
      out += field_diffs(old.get(key), new.get(key), f"{prefix}.{key}", names=names)
    return out
  if json.dumps(old, sort_keys=True, default=str) == json.dumps(new, sort_keys=True, default=str):
    return []
  return [f"{prefix}: {names[0]} has {old!r}, {names[1]} has {new!r}"]


def _comparable(section, default=None):
  """A config section with the dense model's default weight_sparsity (pattern '') dropped:
  runs saved before the field existed resume under configs that carry it. A missing
  value reads as ``default``."""
  if section is None:
    return default
  if isinstance(section, dict) and isinstance(section.get("weight_sparsity"), dict):
    if not section["weight_sparsity"].get("pattern"):
      section = {k: v for k, v in section.items() if k != "weight_sparsity"}
  elif isinstance(section, dict) and "weight_sparsity" in section and not section["weight_sparsity"]:
    section = {k: v for k, v in section.items() if k != "weight_sparsity"}
  return section


def has_checkpoints(workdir: str) -> bool:
  directory = os.path.join(workdir, "checkpoints")
  return os.path.isdir(directory) and any(d.isdigit() for d in os.listdir(directory))


def write_config(workdir: str, config_dict: dict, *, resumed_step: int | None = None) -> None:
  """config.json := this start's config; appends the start to invocations.jsonl."""
  if jax.process_index() != 0:
    return
  tmp = os.path.join(workdir, "config.json.tmp")
  with open(tmp, "w") as f:
    json.dump(config_dict, f, indent=2, sort_keys=True, default=str)
  os.replace(tmp, os.path.join(workdir, "config.json"))
  record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": sys.argv,
            "resumed_step": resumed_step, "config": config_dict}
  with open(os.path.join(workdir, "invocations.jsonl"), "a") as f:
    f.write(json.dumps(record, sort_keys=True, default=str) + "\n")


def _silence_abandoned_reads() -> None:
  """After a failed restore, TensorStore reads still in flight complete into orbax's
  closed event loop and print one 'RuntimeError: Event loop is closed' traceback each
  (through sys.excepthook or sys.unraisablehook, dozens of them). They are noise from the
  read we already reported; these hooks drop exactly those and pass everything else on."""
  closed = lambda error: isinstance(error, RuntimeError) and str(error) == "Event loop is closed"
  previous, previous_unraisable = sys.excepthook, sys.unraisablehook
  if not getattr(previous, "_drops_closed_loop", False):
    def hook(kind, value, tb):
      if not closed(value):
        previous(kind, value, tb)
    hook._drops_closed_loop = True
    sys.excepthook = hook
  if not getattr(previous_unraisable, "_drops_closed_loop", False):
    def unraisable_hook(unraisable):
      if not closed(unraisable.exc_value):
        previous_unraisable(unraisable)
    unraisable_hook._drops_closed_loop = True
    sys.unraisablehook = unraisable_hook


# Orbax's words for a checkpoint whose tree or shapes differ from the one asked for.
_MISMATCH = re.compile(r"not compatible with the stored shape|Type mismatch|tree structure|"
                       r"[Mm]issing keys|[Uu]nexpected keys|[Dd]ictionary mismatch")


def _one_line(error: BaseException, limit: int = 300) -> str:
  text = " ".join(str(error).split()) or type(error).__name__
  return text if len(text) <= limit else text[:limit] + "..."


class Checkpointer:
  """Saves/restores {'state': TrainState, 'data': iterator state} with orbax."""

  def __init__(self, workdir: str, *, keep: int, async_save: bool = True):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "data"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_state: dict, *, force: bool = False) -> None:
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)), force=force)

  def restore(self, step: int, state_like: Any, shardings: Any, *,
              keys: tuple[str, ...] | None = None) -> tuple[Any, dict | None]:
    """(state, data-iterator state) of ``step``. With ``keys`` only those fields of the
    state (a dict) are read, e.g. evaluation needs no optimizer state."""
    target = abstract_with_shardings(state_like, shardings)
    if keys is None:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
      return restored["state"], restored["data"]
    subset = {k: getattr(target, k) for k in keys}
    restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=subset, restore_args=ocp.checkpoint_utils.construct_restore_args(subset),
        partial_restore=True)))
    return restored["state"], None

  def restore_newest(self, state_like: Any, shardings: Any, *, step: int | None = None,
                     keys: tuple[str, ...] | None = None, set_aside: bool = False):
    """(step, state, data state) of the newest checkpoint that can be read (or of ``step``).

    A checkpoint that cannot be read (damaged files, an interrupted copy) is skipped
    with a one-line warning; with ``set_aside`` (training, which will write new
    checkpoints) the skipped ones are renamed ``<step>.unreadable`` once an older one
    has been read. Raises WorkdirError in one line when there is none to read.
    """
    steps = [step] if step is not None else sorted(self.manager.all_steps(), reverse=True)
    if not steps:
      raise WorkdirError(f"no checkpoint in {self.directory}")
    skipped = []
    for candidate in steps:
      try:
        state, data = self.restore(candidate, state_like, shardings, keys=keys)
      except Exception as e:  # Orbax / TensorStore raise many types; each is reported.
        _silence_abandoned_reads()
        reason = _one_line(e)
        if step is not None:
          raise WorkdirError(f"checkpoint {self.directory}/{step} cannot be read: {reason}") from e
        skipped.append((candidate, reason))
        print(f"warning: checkpoint {self.directory}/{candidate} cannot be read ({reason}); "
              "trying the next older one", file=sys.stderr, flush=True)
        continue
      if skipped and set_aside and jax.process_index() == 0:
        for bad, _ in skipped:
          path = os.path.join(self.directory, str(bad))
          os.replace(path, path + ".unreadable")
          print(f"warning: moved the unreadable checkpoint to {path}.unreadable",
                file=sys.stderr, flush=True)
      if skipped:
        self.manager.reload()
      return candidate, state, data
    newest, reason = skipped[0]
    if _MISMATCH.search(reason):  # Readable files, another model: deleting them is no fix.
      raise WorkdirError(
          f"the checkpoints in {self.directory} hold another model than the config describes "
          f"(step {newest}: {reason}). Use the run's own config (its config.json) to read "
          "them, or a new --workdir for a new run")
    raise WorkdirError(
        f"no checkpoint in {self.directory} can be read (tried steps {steps}; step {newest}: "
        f"{reason}). If this is another model's workdir use a new --workdir; otherwise delete "
        "the damaged checkpoints to start over")

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()

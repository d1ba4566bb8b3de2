"""Orbax checkpoints of the train state and the data iterator, plus run-config checks.

A workdir names a run. ``<workdir>/config.json`` records the config the run started
with; a later start in the same workdir must describe the same model and data, or it
stops before touching anything. ``<workdir>/checkpoints/<step>/`` holds the train state
and the iterator position; the last ``keep`` are kept.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from sparsity_jax.train.state import abstract_with_shardings

# Config sections that must match to resume: anything that changes shapes or the data
# stream. Training hyper-parameters (steps, lr, intervals) may change between runs.
RESUME_KEYS = ("model", "data.source", "data.glob", "data.seq_len", "data.batch_size", "seed",
               "objective")


def _lookup(config_dict: dict, dotted: str):
  node = config_dict
  for part in dotted.split("."):
    if not isinstance(node, dict) or part not in node:
      return None
    node = node[part]
  return node


def check_workdir_compatible(workdir: str, config_dict: dict) -> None:
  """Raises ValueError if ``workdir`` holds a run with a different model or data."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return
  with open(path) as f:
    saved = json.load(f)
  diffs = []
  for key in RESUME_KEYS:
    old, new = _lookup(saved, key), _lookup(config_dict, key)
    if json.dumps(old, sort_keys=True) != json.dumps(new, sort_keys=True, default=str):
      diffs.append(f"  {key}: workdir has {old!r}, config has {new!r}")
  if diffs:
    raise ValueError(
        f"--workdir={workdir} holds a run with a different model or data:\n" + "\n".join(diffs)
        + "\nUse a new --workdir for a new run, or the original config to resume this one.")


def write_config(workdir: str, config_dict: dict) -> None:
  if jax.process_index() == 0 and not os.path.exists(os.path.join(workdir, "config.json")):
    tmp = os.path.join(workdir, "config.json.tmp")
    with open(tmp, "w") as f:
      json.dump(config_dict, f, indent=2, sort_keys=True, default=str)
    os.replace(tmp, os.path.join(workdir, "config.json"))


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

  def restore(self, step: int, state_like: Any, shardings: Any) -> tuple[Any, dict]:
    target = abstract_with_shardings(state_like, shardings)
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
    except (ValueError, KeyError) as e:
      raise ValueError(f"checkpoint {self.directory}/{step} does not match this model: {e}. "
                       "Use a new --workdir for a different model.") from e
    return restored["state"], restored["data"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()

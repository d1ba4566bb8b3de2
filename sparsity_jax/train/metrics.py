"""Metric sinks: TensorBoard event files and a JSONL file (process 0 only)."""

from __future__ import annotations

import json
import os
import time

import jax
import numpy as np


class MetricWriter:
  """Writes scalars to ``<workdir>/metrics.jsonl`` and TensorBoard events in ``<workdir>/tb``."""

  def __init__(self, workdir: str, *, filename: str = "metrics.jsonl",
               purge_step: int | None = None):
    """``purge_step``: a resumed run's first step; TensorBoard drops the events an
    interrupted run wrote at and after it (metrics.jsonl: ``drop_rows_after``)."""
    self.enabled = jax.process_index() == 0
    self._tb = None
    self._jsonl = None
    if self.enabled:
      from tensorboardX import SummaryWriter  # Imported lazily: heavy.
      self._tb = SummaryWriter(os.path.join(workdir, "tb"), flush_secs=10, purge_step=purge_step)
      self._jsonl = open(os.path.join(workdir, filename), "a")

  def write(self, step: int, scalars: dict[str, float], *, prefix: str = "") -> None:
    if not self.enabled:
      return
    row = {"step": int(step), "time": time.time()}
    for name, value in scalars.items():
      value = float(np.asarray(value))
      row[prefix + name] = value
      self._tb.add_scalar(prefix + name, value, int(step))
    self._jsonl.write(json.dumps(row) + "\n")
    self._jsonl.flush()

  def close(self) -> None:
    if self.enabled:
      self._tb.close()
      self._jsonl.close()


def read_jsonl(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def drop_rows_after(path: str, step: int) -> None:
  """Removes the rows of ``path`` logged after ``step`` (a resumed run rewrites them)."""
  if not os.path.exists(path):
    return
  rows = read_jsonl(path)
  kept = [r for r in rows if int(r.get("step", 0)) <= step]
  if len(kept) == len(rows):
    return
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in kept)
  os.replace(tmp, path)

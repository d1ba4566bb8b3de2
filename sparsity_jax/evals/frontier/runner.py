"""The Sparse Frontier grid: attention settings x tasks x lengths on one model, resumable.

Every (setting, task, length, sample) is one greedy generation with the setting's attention
core; its row (score, output, compression, timings) is appended to ``results.jsonl`` as soon
as it is done, so an interrupted run loses at most the sample in flight and a rerun skips
every finished row (a cell, i.e. (setting, task, length), is done when all its samples are).

Compression, as the paper reports it (Nawrot et al. 2025, section 3):

  prefill settings  sparsity = 1 - the fraction of causal (query, key) pairs computed in the
                    prefill (mean over layers and heads, ``layers.prefill.prefill_stats``);
  decode settings   sparsity = 1 - the fraction of cached keys read by the last decode step
                    (mean over layers and heads, ``layers.decode_methods.decode_stats``);
  compression = 1 / (1 - sparsity); dense is 1.

Legend: t prompt tokens.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Sequence

import numpy as np

from sparsity_jax.layers.decode_methods import DECODE_KINDS
from sparsity_jax.layers.prefill import PREFILL_KINDS


@dataclasses.dataclass(frozen=True)
class Setting:
  """One attention configuration of the grid: ``name`` (unique, e.g. 'quest 256') and the
  ``config.model.attention`` dict; ``phase`` is 'dense', 'prefill' or 'decode'."""

  name: str
  attention: dict

  @property
  def kind(self) -> str:
    return self.attention.get("kind", "dense")

  @property
  def phase(self) -> str:
    """'dense', 'prefill', 'decode', or 'both' (MoA / uniform windows: a static sparse
    pattern in the prefill and a smaller cache in decoding)."""
    if self.kind == "dense":
      return "dense"
    if self.kind in PREFILL_KINDS:
      return "prefill"
    if self.kind in DECODE_KINDS:
      return "decode"
    if self.kind == "moa":
      return "both"
    raise ValueError(f"setting {self.name!r}: attention kind {self.kind!r} is neither a prefill "
                     f"({', '.join(PREFILL_KINDS)}), a decode ({', '.join(DECODE_KINDS)}) nor "
                     "a MoA method")

  @property
  def method(self) -> str:
    """The method a report groups by: the kind, or 'uniform' for a MoA plan with one rule
    for every head (``plan_lib.uniform_plan``, meta kind 'uniform')."""
    if self.kind == "moa":
      from sparsity_jax.moa import plan as plan_lib
      meta = plan_lib.load_plan(self.attention.get("plan", "")).meta
      return "uniform" if meta.get("kind") == "uniform" else "moa"
    return self.kind


def parse_settings(settings: dict) -> list[Setting]:
  """``{name: attention dict}`` -> Settings; exactly one must be dense (the baseline)."""
  out = [Setting(str(name), dict(att)) for name, att in settings.items()]
  for s in out:
    s.phase, s.method  # noqa: B018  (validate the kind, and a MoA plan's file)
  dense = [s.name for s in out if s.phase == "dense"]
  if len(dense) != 1:
    raise ValueError(f"the grid needs exactly one dense setting (the baseline), got {dense}")
  return out


def read_rows(path: str) -> list[dict]:
  """The rows of a results.jsonl (a torn last line from an interrupted write is skipped)."""
  if not os.path.exists(path):
    return []
  rows = []
  with open(path) as f:
    for line in f:
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError:
        continue
  return rows


def row_key(row: dict) -> tuple:
  return (row["setting"], row["task"], int(row["length"]), int(row["index"]))


def compression_of(setting: Setting, model, cache_len: int, seen: int) -> tuple[float, float]:
  """(sparsity, compression) of the model's last generation under ``setting``.

  ``cache_len``: the length the cache was made for (MoA's windows are the plan's at that
  N); ``seen``: the keys up to the last decoded position."""
  if setting.phase == "dense":
    return 0.0, 1.0
  if setting.phase == "both":  # Keys a decode step reads at the cache's length N.
    from sparsity_jax.layers.moa import moa_cores
    kept = float(np.mean([np.minimum(c.capacities(cache_len), seen) / seen
                          for c in moa_cores(model)]))
  elif setting.phase == "prefill":
    from sparsity_jax.layers.prefill import prefill_stats
    kept = prefill_stats(model)["density"]
  else:
    from sparsity_jax.layers.decode_methods import decode_stats
    kept = decode_stats(model)["kv_read"]
  return 1.0 - kept, 1.0 / max(kept, 1e-9)


def run_grid(model, tokenizer, *, settings: Sequence[Setting], tasks: Sequence[str],
             lengths: Sequence[int], num_samples: int, out: str, seed: int = 43,
             chat="auto", task_options: dict | None = None, model_name: str | None = None,
             log: Callable[[str], None] = print, progress: bool = True) -> list[dict]:
  """Runs every missing (setting, task, length, sample) and returns all rows of
  ``out/results.jsonl``.

  Args:
    model: a loaded causal TransformerLM (dense core); each setting runs on a copy with its
      core that shares the parameters.
    tokenizer: the model's tokenizer.
    settings: from :func:`parse_settings`.
    tasks, lengths: task names (``frontier.TASKS``) and prompt lengths in tokens.
    num_samples: samples per (task, length), the same prompts for every setting.
    out: run directory (created); results.jsonl and grid.json live there.
    seed, chat, task_options: passed to ``frontier.make_samples`` (options per task name).
    model_name: recorded in grid.json (default: the model's shape); a rerun with another
      model is refused.

  Raises:
    ValueError: ``out`` holds a grid made with another model, seed, chat setting or options
      of a task (its rows would not be comparable), a setting with rows changed under its
      name, or a dense baseline under another name: use a new directory or name.
  """
  from sparsity_jax.checkpoints.loading import with_attention
  from sparsity_jax.evals import frontier
  from sparsity_jax.evals.long_context import decode as decode_text
  from sparsity_jax.models import generation

  task_options = {t: dict(task_options.get(t, {})) for t in tasks} if task_options else {
      t: {} for t in tasks}
  os.makedirs(out, exist_ok=True)
  c = model.cfg
  identity = {"seed": seed, "chat": chat, "model": model_name or (
      f"{c.num_layers} layers, d_model {c.d_model}, {c.num_heads}/{c.num_kv_heads} heads, "
      f"vocab {c.vocab_size}")}
  grid_path = os.path.join(out, "grid.json")
  path = os.path.join(out, "results.jsonl")
  rows = read_rows(path)
  known, known_options = {}, {}
  if os.path.exists(grid_path):
    with open(grid_path) as f:
      before = json.load(f)
    was = {k: before.get(k) for k in identity}
    if was != json.loads(json.dumps(identity)):
      raise ValueError(f"{out} holds a grid made with {was}, not {identity}: its samples "
                       "differ from this run's; use another --out")
    known_options = before.get("task_options", {})
    for t in tasks:  # Tasks may be added; a task's options are part of its samples.
      if t in known_options and known_options[t] != json.loads(json.dumps(task_options[t])):
        raise ValueError(f"{out} made {t} with options {known_options[t]}, not "
                         f"{task_options[t]}: use another --out")
    with_rows = {r["setting"] for r in rows}
    known = {k: v for k, v in before.get("settings", {}).items() if k in with_rows}
    for s in settings:  # A name with rows keeps its meaning: its rows would be reused.
      if s.name in known and known[s.name] != json.loads(json.dumps(s.attention)):
        raise ValueError(f"setting {s.name!r} was {known[s.name]} in {out}, now {s.attention}: "
                         "give the changed setting a new name (or use another --out)")
  dense_now = [s.name for s in settings if s.phase == "dense"]
  dense_before = sorted({r["setting"] for r in rows if r["phase"] == "dense"} - set(dense_now))
  if dense_before:
    raise ValueError(f"{out} has dense rows under {dense_before}, this run calls dense "
                     f"{dense_now}: keep the baseline's name")
  with open(grid_path, "w") as f:
    json.dump({**identity, "task_options": {**known_options, **task_options},
               "settings": {**known, **{s.name: s.attention for s in settings}},
               "tasks": list(tasks), "lengths": list(lengths), "num_samples": num_samples},
              f, indent=2)
  if os.path.exists(path):  # Drop a torn last line (an interrupted write) before appending.
    with open(path) as f:
      intact = f.read() == "".join(json.dumps(r) + "\n" for r in rows)
    if not intact:
      with open(path + ".tmp", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
      os.replace(path + ".tmp", path)
  done = {row_key(r) for r in rows}
  models: dict[str, object] = {}
  total = len(settings) * len(tasks) * len(lengths) * num_samples
  bar = None
  if progress:
    from tqdm.auto import tqdm  # Lazily: a library import should not pull a progress bar.
    bar = tqdm(total=total, initial=len(done & _all_keys(settings, tasks, lengths, num_samples)),
               desc="frontier")
  with open(path, "a") as sink:
    for length in lengths:
      for task in tasks:
        todo = [s for s in settings for i in range(num_samples)
                if (s.name, task, int(length), i) not in done]
        if not todo:
          continue
        samples = frontier.make_samples(task, tokenizer, int(length), num_samples=num_samples,
                                        seed=seed, chat=chat, **task_options.get(task, {}))
        for setting in settings:
          for i, sample in enumerate(samples):
            if (setting.name, task, int(length), i) in done:
              continue
            if setting.name not in models:
              models[setting.name] = (model if setting.phase == "dense"
                                      else with_attention(model, setting.attention))
            m = models[setting.name]
            timings: dict = {}
            start = time.perf_counter()
            tokens = generation.generate(m, np.asarray(sample.tokens)[None],
                                         int(sample.max_new_tokens), eos_id=tokenizer.eos_id,
                                         timings=timings)
            new = [int(x) for x in tokens[0, len(sample.tokens):] if int(x) != tokenizer.eos_id]
            text = decode_text(tokenizer, new)
            sparsity, compression = compression_of(
                setting, m, len(sample.tokens) + int(sample.max_new_tokens), tokens.shape[1] - 1)
            row = {"setting": setting.name, "kind": setting.method, "phase": setting.phase,
                   "task": task, "length": int(length), "index": i,
                   "prompt_tokens": len(sample.tokens), "score": float(frontier.score(sample, text)),
                   "output": text, "gold": sample.gold, "sparsity": sparsity,
                   "compression": compression, "new_tokens": timings["new_tokens"],
                   "prefill_s": timings["prefill_s"], "decode_s": timings["decode_s"],
                   "seconds": time.perf_counter() - start}
            sink.write(json.dumps(row) + "\n")
            sink.flush()
            done.add(row_key(row))
            if bar is not None:
              bar.update(1)
              bar.set_postfix_str(f"{setting.name} {task} {length}")
        log(f"[frontier] {task} @ {length}: done")
  if bar is not None:
    bar.close()
  return read_rows(path)


def _all_keys(settings, tasks, lengths, num_samples) -> set:
  return {(s.name, t, int(n), i) for s in settings for t in tasks for n in lengths
          for i in range(num_samples)}

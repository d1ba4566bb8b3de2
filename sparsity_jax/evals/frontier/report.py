"""Report of a Sparse Frontier grid: tables, the significance test, a FLOPs model, plots.

``summarize(rows)`` aggregates the per-sample rows of ``runner.run_grid`` into cells
(setting, task, length): mean score, mean compression, and a one-sided paired test of "the
setting scores lower than dense on the same prompts". The released code of the paper has no
test; we use the exact sign test on the paired per-sample scores (scipy's ``binomtest`` on
the prompts where the two differ, alternative 'dense better'), at ``alpha = 0.05``: a cell
*retains* dense performance when that test does not reject. ``max_compression`` is then, per
method and task, the largest compression among the retaining settings (the paper's Fig. 3).

FLOPs (``flops``) follow the paper's accounting (appendix D) for one model: the linear
layers (2 x non-embedding parameters per token, plus the output layer per generated token),
attention as 4 n h FLOPs per computed (query, key) pair and layer, and each method's indexing
cost (the estimate of Vertical-Slash / FlexPrefill from its last queries, block top-k's
pooled scores, SnapKV's observation window, Quest's page bounds per decode step).

``write_report(rows, out)`` writes report.md, summary.json and plots (score vs compression
per task, prefill and decode separately; score vs length when the grid has several lengths;
score vs FLOPs) into ``out``.
"""

from __future__ import annotations

import collections
import json
import math
import os
from collections.abc import Sequence

import numpy as np

ALPHA = 0.05


def sign_test(dense: Sequence[float], other: Sequence[float]) -> float:
  """One-sided exact sign test p-value of "dense scores higher" on paired scores."""
  from scipy import stats

  d = np.asarray(dense, float) - np.asarray(other, float)
  worse, better = int(np.sum(d > 1e-12)), int(np.sum(d < -1e-12))
  if worse == 0:
    return 1.0
  return float(stats.binomtest(worse, worse + better, 0.5, alternative="greater").pvalue)


def summarize(rows: Sequence[dict], alpha: float = ALPHA) -> list[dict]:
  """One dict per (setting, task, length) cell: score, n, compression, p, retains."""
  cells: dict[tuple, dict[int, dict]] = collections.defaultdict(dict)
  for r in rows:
    cells[(r["setting"], r["task"], int(r["length"]))][int(r["index"])] = r
  dense_names = sorted({r["setting"] for r in rows if r["phase"] == "dense"})
  if len(dense_names) > 1:
    raise ValueError(f"the rows hold several dense baselines {dense_names}: keep one name "
                     "for dense per run directory")
  dense_name = dense_names[0] if dense_names else None
  out = []
  for (setting, task, length), by_index in sorted(cells.items()):
    first = next(iter(by_index.values()))
    scores = [by_index[i]["score"] for i in sorted(by_index)]
    cell = {"setting": setting, "kind": first["kind"], "phase": first["phase"], "task": task,
            "length": length, "n": len(scores), "score": float(np.mean(scores)),
            "compression": float(np.mean([r["compression"] for r in by_index.values()])),
            "sparsity": float(np.mean([r["sparsity"] for r in by_index.values()])),
            "prompt_tokens": float(np.mean([r["prompt_tokens"] for r in by_index.values()])),
            "new_tokens": float(np.mean([r["new_tokens"] for r in by_index.values()])),
            "seconds": float(np.mean([r["seconds"] for r in by_index.values()]))}
    dense = cells.get((dense_name, task, length), {})
    paired = sorted(set(dense) & set(by_index))
    if first["phase"] != "dense":
      # With n paired prompts the smallest possible p is 0.5 ** n: below
      # log2(1 / alpha) prompts (5 at 0.05) no loss can be significant, so none is tested.
      cell["retains"] = None
      if paired:
        cell["p_value"] = sign_test([dense[i]["score"] for i in paired],
                                    [by_index[i]["score"] for i in paired])
        if 0.5 ** len(paired) < alpha:
          cell["retains"] = cell["p_value"] >= alpha
    out.append(cell)
  return out


def max_compression(cells: Sequence[dict]) -> dict:
  """{(kind, task, length): the largest mean compression of a retaining setting (1.0 when
  every tested setting loses)}; cells that could not be tested (no dense rows, or too few
  prompts) are left out."""
  best: dict[tuple, float] = {}
  for c in cells:
    if c["phase"] == "dense" or c.get("retains") is None:
      continue
    key = (c["kind"], c["task"], c["length"])
    best.setdefault(key, 1.0)
    if c.get("retains"):
      best[key] = max(best[key], c["compression"])
  return best


def score_by_depth(rows: Sequence[dict], depths: dict, bins: int = 5) -> dict:
  """Mean score per setting in equal-width bins of evidence depth.

  Args:
    rows: ``runner.run_grid`` rows.
    depths: {(task, length, index): relative depth in [0, 1] of the prompt's evidence};
      rows without an entry are left out.
    bins: number of bins of [0, 1] (the last one includes 1).

  Returns:
    {(task, length): {"bins": [(lo, hi)], "dense": the dense setting's name or None,
    "settings": {setting: [{"score", "n"} per bin]}}}, settings in first-seen order; an
    empty bin has score None.
  """
  edges = [i / bins for i in range(bins + 1)]
  acc: dict = collections.defaultdict(
      lambda: collections.defaultdict(lambda: [[0.0, 0] for _ in range(bins)]))
  dense = {}
  for r in rows:
    d = depths.get((r["task"], int(r["length"]), int(r["index"])))
    if d is None:
      continue
    if not 0.0 <= d <= 1.0:
      raise ValueError(f"depth {d!r} of {r['task']} @ {r['length']} #{r['index']} is not in "
                       "[0, 1]")
    cell = acc[(r["task"], int(r["length"]))][r["setting"]][min(int(d * bins), bins - 1)]
    cell[0] += float(r["score"])
    cell[1] += 1
    if r["phase"] == "dense":
      dense[(r["task"], int(r["length"]))] = r["setting"]
  return {key: {"bins": list(zip(edges[:-1], edges[1:])), "dense": dense.get(key),
                "settings": {s: [{"score": t / n if n else None, "n": n} for t, n in cells]
                             for s, cells in per.items()}}
          for key, per in acc.items()}


# ---- FLOPs -------------------------------------------------------------------------------


def flops(model_cfg, cell: dict, attention: dict) -> dict:
  """Estimated FLOPs of one generation of a cell: {'prefill', 'decode', 'total'}.

  ``model_cfg``: the ModelConfig (layers, widths, heads); ``attention``: the setting's dict.
  """
  L, d, n, k, h = (model_cfg.num_layers, model_cfg.d_model, model_cfg.num_heads,
                   model_cfg.num_kv_heads, model_cfg.head_dim)
  linear = 2 * L * (d * (n + 2 * k) * h + n * h * d + 3 * d * model_cfg.mlp_dim)
  head = 2 * d * model_cfg.vocab_size
  t, new = cell["prompt_tokens"], cell["new_tokens"]
  kind = attention.get("kind", "dense")
  pair = 4 * n * h * L
  pairs = t * (t + 1) / 2
  # MoA / uniform windows ('both'): the window fraction in the prefill and in decoding.
  prefill_kept = 1.0 - cell["sparsity"] if cell["phase"] in ("prefill", "both") else 1.0
  index = 0.0
  if kind in ("vertical_slash", "flexprefill"):
    last = attention.get("last_q", 256 if kind == "vertical_slash" else attention.get(
        "block_size", 128))
    index = 2 * n * h * L * last * t
  elif kind == "block_topk":
    b = attention.get("block_size", 16)
    index = 2 * n * h * L * (t / b) ** 2 / 2 + 2 * L * n * h * t  # Pooled scores + pooling.
  elif kind in ("snapkv", "ada_snapkv"):
    index = 2 * n * h * L * min(attention.get("window", 256), t) * t
  prefill = t * linear + head + pair * prefill_kept * pairs + index
  read = 1.0 - cell["sparsity"] if cell["phase"] in ("decode", "both") else 1.0
  steps = max(new - 1, 0)  # The first new token comes out of the prefill.
  context = t + steps / 2  # Mean keys before a decode step.
  per_step = linear + head + pair * read * context
  if kind == "quest":
    per_step += 2 * 2 * n * h * L * context / attention.get("page_size", 16)
  decode = steps * per_step
  return {"prefill": prefill, "decode": decode, "total": prefill + decode}


# ---- writing -----------------------------------------------------------------------------


def _fmt_p(p):
  return "" if p is None else ("<0.001" if p < 1e-3 else f"{p:.3f}")


def markdown(cells: Sequence[dict], settings_order: Sequence[str]) -> str:
  """Tables: score per setting x (task, length) with compression and the test."""
  by = {(c["setting"], c["task"], c["length"]): c for c in cells}
  columns = sorted({(c["task"], c["length"]) for c in cells})
  full = {col: max(c["n"] for c in cells if (c["task"], c["length"]) == col)
          for col in columns}  # A cell with fewer prompts is unfinished (an interrupted run).
  lines = ["| setting | phase | " + " | ".join(f"{t} @ {n}" for t, n in columns) + " |",
           "|---|---|" + "---|" * len(columns)]
  for s in settings_order:
    row = [s, next((c["phase"] for c in cells if c["setting"] == s), "")]
    for t, n in columns:
      c = by.get((s, t, n))
      if c is None:
        row.append("")
        continue
      text = f"{c['score']:.2f}"
      if c["phase"] != "dense":
        mark = {True: "", False: " ✗", None: " ?"}[c.get("retains")]
        text += f" ({c['compression']:.1f}x{mark})"
      if c["n"] < full[t, n]:
        text += f" [{c['n']}/{full[t, n]}]"
      row.append(text)
    lines.append("| " + " | ".join(row) + " |")
  lines.append("")
  lines.append("Score: mean over the cell's prompts of the task's metric (exact match; "
               "fraction of queries right for story_retrieval and ruler_niah; IoU for "
               "story_filtering, ruler_vt and ruler_cwe); (Nx): mean compression; ✗: "
               f"significantly worse than dense (one-sided sign test on the paired prompts, "
               f"p < {ALPHA}); ?: not testable (no dense rows, or fewer than "
               f"{math.ceil(math.log2(1 / ALPHA))} prompts); [k/n]: only k of the column's n "
               "prompts are done (an unfinished cell: rerun the grid to complete it).")
  return "\n".join(lines)


def write_report(rows: Sequence[dict], out: str, *, model_cfg=None,
                 settings: dict | None = None, title: str = "Sparse Frontier grid") -> str:
  """Writes report.md, summary.json and PNG plots into ``out``; returns report.md's path."""
  if not rows:
    raise ValueError("no rows to report: run the grid first")
  cells = summarize(rows)
  present = {c["setting"] for c in cells}
  order = [s for s in (settings or {}) if s in present]
  order += sorted(present - set(order))
  best = max_compression(cells)
  if model_cfg is not None and settings:
    for c in cells:
      c["flops"] = flops(model_cfg, c, settings.get(c["setting"], {}))
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "summary.json"), "w") as f:
    json.dump({"cells": cells, "max_compression": [
        {"kind": k, "task": t, "length": n, "compression": v} for (k, t, n), v in
        sorted(best.items())]}, f, indent=1)
  plots = _plots(cells, out)
  text = [f"# {title}", "", markdown(cells, order), "",
          "## Maximum compression that keeps dense performance", "",
          "| method | task | length | max compression |", "|---|---|---|---|"]
  text += [f"| {k} | {t} | {n} | {v:.1f}x |" for (k, t, n), v in sorted(best.items())]
  text += ["", "## Cells", "", "| setting | task | length | n | score | compression | p |",
           "|---|---|---|---|---|---|---|"]
  text += [f"| {c['setting']} | {c['task']} | {c['length']} | {c['n']} | {c['score']:.3f} | "
           f"{c['compression']:.2f} | {_fmt_p(c.get('p_value'))} |" for c in cells]
  text += [""] + [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in plots]
  path = os.path.join(out, "report.md")
  with open(path, "w") as f:
    f.write("\n".join(text) + "\n")
  return path


def panels(plt, n: int, width: float = 4.0, height: float = 3.2):
  """A figure of n panels, at most 3 per row (unused ones hidden): (fig, [axes])."""
  cols = min(n, 3)
  rows_n = math.ceil(n / cols)
  fig, axes = plt.subplots(rows_n, cols, figsize=(width * cols, height * rows_n), squeeze=False)
  for ax in axes.ravel()[n:]:
    ax.axis("off")
  return fig, list(axes.ravel()[:n])


def score_panel(ax, title: str, xlabel: str, legend_size: float = 7) -> None:
  """Titles, a [0, 1] score axis and the legend of one panel."""
  ax.set_title(title)
  ax.set_xlabel(xlabel)
  ax.set_ylabel("score")
  ax.set_ylim(-0.05, 1.05)
  ax.legend(fontsize=legend_size)


def save_figure(fig, plt, path: str) -> str:
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


_NICE_TICKS = (1, 1.5, 2, 3, 4, 5, 6, 8, 10, 12, 16, 24, 32, 48, 64, 96, 128)


def _log_axis(ax, values) -> None:
  """A log x-axis with plain labels (1.5x, 2x, ...) at round values within the data's range
  (matplotlib's default reads "2 x 10^0", or shows no label on a short range)."""
  from matplotlib import ticker
  ax.set_xscale("log")
  lo, hi = min(values) / 1.15, max(values) * 1.15
  ticks = [t for t in _NICE_TICKS if lo <= t <= hi] or [round(min(values), 1)]
  ax.set_xticks(ticks, [f"{t:g}x" for t in ticks])
  ax.xaxis.set_minor_formatter(ticker.NullFormatter())


def _series(cell: dict) -> str:
  """The line a cell is drawn on: its method, and a variant suffix of the setting name
  (e.g. snapkv_512_w32 -> "snapkv w32"), so that variants at one compression do not draw
  a vertical segment."""
  kind, setting = cell["kind"], cell.get("setting", "")
  rest = setting[len(kind) + 1:].split("_") if setting.startswith(kind + "_") else []
  if len(rest) >= 2 and rest[-1][:1].isalpha():
    return f"{kind} {rest[-1]}"
  return kind


def _mark_losses(ax, points, line) -> None:
  """An x on the (x, score) points significantly below dense."""
  if points:
    ax.scatter(*zip(*points), marker="x", s=60, color=line.get_color(), zorder=3)


def _plots(cells: Sequence[dict], out: str) -> list[str]:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  paths = []
  tasks = sorted({c["task"] for c in cells})
  for length in sorted({c["length"] for c in cells}):
    for phase in ("prefill", "decode"):
      here = [c for c in cells if c["length"] == length and c["phase"] in (phase, "both")]
      if not here:
        continue
      fig, axes = panels(plt, len(tasks))
      for ax, task in zip(axes, tasks):
        dense = [c for c in cells if c["task"] == task and c["length"] == length
                 and c["phase"] == "dense"]
        if dense:
          ax.axhline(dense[0]["score"], color="k", ls="--", lw=1, label="dense")
        for kind in sorted({_series(c) for c in here}):
          pts = sorted((c["compression"], c["score"], c.get("retains") is not False)
                       for c in here if c["task"] == task and _series(c) == kind)
          if not pts:
            continue
          x, y, keep = zip(*pts)
          line, = ax.plot(x, y, marker="o", label=kind)
          _mark_losses(ax, [(a, b) for a, b, r in pts if not r], line)
        _log_axis(ax, [c["compression"] for c in here if c["task"] == task] or [1.0])
        score_panel(ax, task, "compression (x)")
      fig.suptitle(f"{phase} methods (and MoA / uniform windows, which sparsify both), "
                   f"{length} tokens; x: significantly below dense", fontsize=9)
      paths.append(save_figure(fig, plt, os.path.join(out, f"{phase}_{length}.png")))
  if len({c["length"] for c in cells}) > 1:
    paths.append(_length_plot(cells, tasks, out, plt))
  if any("flops" in c for c in cells):
    fig, ax = plt.subplots(figsize=(5.5, 4))
    per_setting = collections.defaultdict(list)
    for c in cells:
      per_setting[(c["setting"], c["phase"], c["length"])].append(c)
    for (setting, phase, length), cs in sorted(per_setting.items()):
      x = np.mean([c["flops"]["total"] for c in cs])
      y = np.mean([c["score"] for c in cs])
      marker = {"dense": "*", "prefill": "o", "decode": "s", "both": "D"}[phase]
      ax.scatter(x, y, marker=marker, s=60 if phase == "dense" else 30)
      ax.annotate(f"{setting} @{length}", (x, y), fontsize=5, rotation=20)
    ax.set_xscale("log")
    ax.set_xlabel("FLOPs per generation (model + attention + indexing)")
    ax.set_ylabel("mean score over tasks")
    ax.set_title("score vs FLOPs (one model size)")
    paths.append(save_figure(fig, plt, os.path.join(out, "flops.png")))
  return paths


def _length_plot(cells: Sequence[dict], tasks: Sequence[str], out: str, plt) -> str:
  """Score vs prompt length per task, one line per setting run at two or more lengths."""
  fig, axes = panels(plt, len(tasks), 4.5, 3.4)
  styles = {"dense": "-", "prefill": "--", "decode": ":", "both": "-."}
  for ax, task in zip(axes, tasks):
    by_setting = collections.defaultdict(list)
    for c in cells:
      if c["task"] == task:
        by_setting[(c["setting"], c["phase"])].append(c)
    for (setting, phase), cs in sorted(by_setting.items()):
      if len(cs) < 2:
        continue
      cs = sorted(cs, key=lambda c: c["length"])
      line, = ax.plot([c["length"] for c in cs], [c["score"] for c in cs], marker="o",
                      ls=styles[phase], color="k" if phase == "dense" else None,
                      label=setting)
      _mark_losses(ax, [(c["length"], c["score"]) for c in cs if c.get("retains") is False],
                   line)
    ax.set_xscale("log", base=2)
    score_panel(ax, task, "prompt length (tokens)", 6)
  fig.suptitle("score by length (settings run at 2+ lengths; -- prefill, : decode, -. both; "
               "x: significantly below dense)", fontsize=9)
  return save_figure(fig, plt, os.path.join(out, "lengths.png"))

r"""Score by evidence depth in a Sparse Frontier run directory.

``launch/frontier.py`` rows record a score per (setting, task, length, prompt). Where the
evidence sat in the prompt (the needle's relative depth, ``Sample.meta['depths']``) is not
in the rows; this script rebuilds the run's prompts from its grid.json (model tokenizer,
seed, chat, task options: the same samples, checked by token count and answer), joins
them to the rows and writes, per (task, length), the score of every setting in bins of
the depth of the first evidence the task lists (the needle of passkey / kv_retrieval /
ruler_niah's first query; for story and variable-tracking tasks the first queried chapter
or hop, not necessarily the earliest):

  <out>/depth.md    tables: score (prompts) per setting and depth bin
  <out>/depth.json  the same numbers
  <out>/depth.png   score vs depth, one panel per (task, length)

Use it to see *where* a method loses the evidence (e.g. a window loses early needles;
an estimate from the last queries may miss middle ones).

  python benchmarks/frontier_depth.py --run=runs/frontier --bins=5
  python benchmarks/frontier_depth.py --run=runs/frontier --out=docs/results/frontier
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from sparsity_jax.evals.frontier import report, runner  # noqa: E402  (after the path)


def sample_depths(rows, grid: dict, tokenizer) -> dict[tuple, float]:
  """{(task, length, index): depth of the first evidence} for the rows' prompts."""
  from sparsity_jax.evals import frontier

  wanted = collections.defaultdict(set)
  seen = {}  # (task, length, index): (prompt tokens, gold) of the row.
  for r in rows:
    wanted[(r["task"], int(r["length"]))].add(int(r["index"]))
    seen[(r["task"], int(r["length"]), int(r["index"]))] = (int(r["prompt_tokens"]),
                                                            r.get("gold"))
  depths = {}
  for (task, length), indices in sorted(wanted.items()):
    samples = frontier.make_samples(task, tokenizer, length, num_samples=max(indices) + 1,
                                    seed=int(grid["seed"]), chat=grid["chat"],
                                    **grid.get("task_options", {}).get(task, {}))
    for i in indices:
      tokens, gold = seen[(task, length, i)]
      if len(samples[i].tokens) != tokens or (gold is not None and samples[i].gold != gold):
        raise ValueError(f"{task} @ {length} #{i}: the rebuilt prompt ({len(samples[i].tokens)} "
                         f"tokens, answer {samples[i].gold!r}) is not the row's ({tokens} "
                         f"tokens, answer {gold!r}): grid.json does not describe these rows")
      if not samples[i].meta.get("depths"):
        continue  # A task without a single evidence position.
      depths[(task, length, i)] = float(samples[i].meta["depths"][0])
  return depths


def plot(table: dict, path: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  keys = sorted(table)
  fig, axes = report.panels(plt, len(keys), 4.6, 3.4)
  for ax, key in zip(axes, keys):
    for setting, cells in table[key]["settings"].items():
      xs = [(lo + hi) / 2 for lo, hi in table[key]["bins"]]
      ys = [c["score"] if c["n"] else float("nan") for c in cells]
      ax.plot(xs, ys, marker="o", lw=2 if setting == table[key]["dense"] else 1,
              color="k" if setting == table[key]["dense"] else None, label=setting)
    report.score_panel(ax, f"{key[0]} @ {key[1]}", "evidence depth (0 = start of the context)",
                       5)
  report.save_figure(fig, plt, path)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--run", required=True, help="a launch/frontier.py --out directory")
  parser.add_argument("--bins", type=int, default=5, help="equal-width depth bins in [0, 1]")
  parser.add_argument("--out", default=None, help="where to write (default: the run dir)")
  parser.add_argument("--model", default=None, help="the run's model (smollm2, a .gguf file "
                      "or a Hugging Face directory) when grid.json does not name one")
  args = parser.parse_args(argv)
  if args.bins < 1:
    parser.error("--bins must be >= 1")
  rows = runner.read_rows(os.path.join(args.run, "results.jsonl"))
  if not rows:
    parser.error(f"{args.run} has no results.jsonl rows")
  with open(os.path.join(args.run, "grid.json")) as f:
    grid = json.load(f)
  from sparsity_jax.checkpoints.pretrained import open_pretrained

  model = args.model or grid.get("model")
  try:
    tokenizer = open_pretrained(model).tokenizer()
  except (ValueError, OSError) as e:  # CheckpointError is both (errors.UserError).
    parser.error(f"grid.json's model {model!r} cannot be opened ({e}); give --model")
  depths = sample_depths(rows, grid, tokenizer)
  table = report.score_by_depth(rows, depths, bins=args.bins)
  out = args.out or args.run
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "depth.json"), "w") as f:
    json.dump([{"task": k[0], "length": k[1], **v} for k, v in sorted(table.items())], f,
              indent=1)
  lines = [f"# Score by evidence depth: {args.run}", ""]
  for (task, length), t in sorted(table.items()):
    head = [f"{lo:g}-{hi:g}" for lo, hi in t["bins"]]
    lines += [f"## {task} @ {length}", "", "| setting | " + " | ".join(head) + " |",
              "|---|" + "---|" * len(head)]
    for setting, cells in t["settings"].items():
      lines.append(f"| {setting} | " + " | ".join(
          f"{c['score']:.2f} ({c['n']})" if c["n"] else "-" for c in cells) + " |")
    lines.append("")
  with open(os.path.join(out, "depth.md"), "w") as f:
    f.write("\n".join(lines))
  plot(table, os.path.join(out, "depth.png"))
  print(f"wrote {out}/depth.md, depth.json, depth.png")


if __name__ == "__main__":
  main()

r"""How many heads to hold at full span: the far / near passkey trade-off of a budget.

For each budget and each k in --ks, the DuoAttention layout at that KV density
(``plan.streaming_plan``): the k KV heads with the most dense attention on retrieval evidence
(the scores of a ``launch/moa.py --retrieval_heads`` run, ``retrieval_heads.json``, or
DuoAttention's trained gates, ``gates.json`` of ``launch/duo_gates.py``) at full
span, every other head 64 sinks + one window at the density left over; k = 0 is the uniform
StreamingLLM plan. Runs ``benchmarks/moa_long_context.py`` on them (passkey only, its own
--seed, so that k can be chosen on prompts the reported evaluation never sees) and plots
passkey accuracy with the key in the first and in the second half of the context against k.

  python benchmarks/moa_streaming_tradeoff.py \
      --scores=docs/results/moa_smollm2/retrieval_heads_50_rh15.json \
      --budgets=0.5,0.25 --ks=5,10,15,22,30 --passkey=20 --seed=1 --out=runs/eval/dev_2k_seed1

Writes the plans to <out>_plans/, the cells to <out>.json (resumable) and the plot to
<out>_tradeoff.png.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np

from sparsity_jax.checkpoints.pretrained import open_pretrained
from sparsity_jax.moa import duo
from sparsity_jax.moa import plan as plan_lib
from sparsity_jax.moa import retrieval

HERE = os.path.dirname(os.path.abspath(__file__))


def write_plans(scores: np.ndarray, budgets, ks, num_heads: int, out_dir: str, *,
                sink: int = 64, max_length: int = 8192, min_window: int = 64) -> list[str]:
  """The streaming plans as ``path:Duo-k<k>`` entries for moa_long_context --moa_dirs;
  k whose full heads alone exceed a budget are skipped.

  Raises ValueError, writing nothing, when ``out_dir`` already holds another plan under a
  name it would write (made from other scores or options): its cells would be taken as
  done for the new plan."""
  plans = {}
  for budget in budgets:
    for k in ks:
      full = retrieval.select(scores, k)
      if full.mean() >= budget:
        print(f"k={k}: {k} full heads are {full.mean():.3f} of the KV cache, not below the "
              f"budget {budget}; skipped")
        continue
      plan = plan_lib.streaming_plan(full, num_heads, budget=budget, sink=sink,
                                     max_length=max_length, min_window=min_window,
                                     budgets={str(max_length): budget})
      plans[os.path.join(out_dir, f"streaming_{round(budget * 100)}_k{k}.json")] = (k, plan)
  for path, (_, plan) in plans.items():
    if os.path.exists(path) and plan_lib.load_plan(path).to_json() != plan.to_json():
      raise ValueError(f"{path} holds another plan (made from other --scores or options): "
                       "use another --out")
  entries = []
  for path, (k, plan) in plans.items():
    plan_lib.save_plan(plan, path)
    entries.append(f"{path}:Duo-k{k}")
  return entries


def tradeoff(cells) -> dict[str, list[tuple[int, float, float, float, int]]]:
  """{budget label: [(k, accuracy, 1st half, 2nd half, n)]}, k = 0 the uniform plan."""
  out: dict[str, list] = {}
  for c in cells:
    kind, _, budget = c["variant"].rpartition(" ")
    if kind == "uniform":
      k = 0
    elif kind.startswith("Duo-k"):
      k = int(kind[5:])
    else:
      continue
    rows = c["passkey"]["rows"]
    half = [np.mean([r["correct"] for r in rows if (r["depth"] >= 0.5) == h] or [np.nan])
            for h in (0, 1)]
    out.setdefault(budget, []).append((k, c["passkey"]["accuracy"], *half, len(rows)))
  return {b: sorted(v) for b, v in out.items()}


def plot(curves, dense, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, len(curves), figsize=(5.5 * len(curves), 4), squeeze=False)
  for ax, (budget, pts) in zip(axes[0], sorted(curves.items(), reverse=True)):
    k, acc, first, second, n = zip(*pts)
    ax.plot(k, first, "o-", label="key in 1st half (far)")
    ax.plot(k, second, "s-", label="key in 2nd half (near)")
    ax.plot(k, acc, "k^--", label="all")
    if dense is not None:
      ax.axhline(dense, color="gray", ls=":", label="dense")
    ax.set(xlabel="KV heads at full span (0: uniform window)", ylabel="passkey exact match",
           ylim=(-0.03, 1.03), title=f"{budget} KV density, {n[0]} prompts per point")
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--scores", required=True, help="retrieval_heads.json of a launch/moa.py "
                 "--retrieval_heads run (its needle_attention [layers, kv heads]) or a "
                 "gates.json of launch/duo_gates.py (DuoAttention's trained gates).")
  p.add_argument("--budgets", default="0.5,0.25", help="KV densities.")
  p.add_argument("--ks", default="5,10,15,22,30", help="Heads at full span (k = 0, the "
                 "uniform plan, is always run).")
  p.add_argument("--length", type=int, default=2048, help="Prompt length in tokens.")
  p.add_argument("--passkey", type=int, default=20, help="Passkey prompts per point.")
  p.add_argument("--seed", type=int, default=1, help="Prompt seed (not the evaluation's 0).")
  p.add_argument("--model", default="smollm2", help="smollm2, a .gguf file or an HF dir: "
                 "the model the scores were made on.")
  p.add_argument("--out", default="runs/eval/streaming_tradeoff", help="Results prefix: "
                 "<out>.json (resumable), <out>_plans/, <out>_tradeoff.png.")
  args = p.parse_args(argv)
  try:
    budgets = [float(x) for x in args.budgets.split(",")]
    ks = [int(x) for x in args.ks.split(",")]
  except ValueError:
    p.error("--budgets and --ks must be comma-separated numbers")
  if not all(0.0 < b <= 1.0 for b in budgets):
    p.error(f"--budgets={args.budgets}: each must be in (0, 1] (a KV-cache fraction)")
  if len(set(ks)) < len(ks) or len(set(budgets)) < len(budgets):
    p.error(f"--ks={args.ks} --budgets={args.budgets}: list each value once")
  if args.length < 1 or args.passkey < 1:
    p.error("--length and --passkey must be positive")
  if not os.path.basename(args.out):
    p.error(f"--out={args.out} is a prefix, not a directory: add a name")
  try:
    scores = duo.load_scores(args.scores)
    cfg = open_pretrained(args.model).model_config()
  except (ValueError, OSError) as e:
    p.error(f"{e}")
  want = (int(cfg.num_layers), int(cfg.num_kv_heads))
  if scores.shape != want:
    p.error(f"--scores {args.scores} scores {scores.shape[0]} layers x {scores.shape[1]} KV "
            f"heads, but {args.model} has {want[0]} x {want[1]}: give scores of this model")
  if not all(1 <= k <= scores.size for k in ks):
    p.error(f"--ks={args.ks}: each must be in [1, {scores.size}] (the KV heads scored; "
            "k = 0, the uniform plan, is always run)")
  try:
    entries = write_plans(scores, budgets, ks, int(cfg.num_heads), args.out + "_plans",
                          max_length=int(cfg.max_len))
  except ValueError as e:
    p.error(f"{e}")
  if not entries:
    p.error("no k leaves any density for the streaming heads at these --budgets")
  child = subprocess.run([sys.executable, os.path.join(HERE, "moa_long_context.py"),
                          f"--model={args.model}", f"--lengths={args.length}",
                          f"--passkey={args.passkey}", "--kv=0", "--docs=0",
                          f"--seed={args.seed}", f"--moa_dirs={','.join(entries)}",
                          f"--out={args.out}"])
  if child.returncode:  # It said why (one line for a refusal, a traceback for a bug).
    raise SystemExit(child.returncode)
  with open(args.out + ".json") as f:
    cells = [c for c in json.load(f)["cells"] if c["length"] == args.length]
  dense = next((c["passkey"]["accuracy"] for c in cells if c["variant"] == "dense"), None)
  curves = tradeoff(cells)
  for budget, pts in curves.items():
    for k, acc, first, second, n in pts:
      print(f"{budget} k={k}: passkey {acc:.2f} (1st half {first:.2f}, 2nd half {second:.2f}; "
            f"{n} prompts)")
  plot(curves, dense, args.out + "_tradeoff.png")
  print(f"plot: {args.out}_tradeoff.png")


if __name__ == "__main__":
  main()

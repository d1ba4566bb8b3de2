r"""Which heads hold long-range retrieval, and what a MoA plan gives them.

For a pretrained model and MoA output directories (``launch/moa.py``), per layer and KV
head:

  needle attention   the dense model's attention mass on the needle from the positions
                     that emit the answer (the question's last token and the answer
                     tokens, teacher-forced), averaged over passkey and kv_retrieval
                     prompts at ``--length`` and over the KV head's query heads: the
                     "retrieval heads" (Wu et al. 2024, DuoAttention);
  long-range share   from each directory's profile (influence_<N>.npz), the fraction of a
                     head's influence at query-key distance >= budget x N - sink (what the
                     uniform window of that budget drops): the part of the profile that
                     says "this head needs a long span";
  MoA span           the plan's (sink + window) / N at ``--length``.

Writes <out>.json and <out>.png (one heatmap per quantity) and prints, per plan, how
much needle attention sits in heads whose span cannot reach the needle, and the Spearman
rank correlation over KV heads between each profile's long-range share and the needle
attention (does the profile rank the retrieval heads?). With
``--ablate_dir``, also the passkey accuracy at ``--ablate_length`` of that directory's
plan with one group of layers restored to full span, and of the dense model with one group
cut to the plan's spans (which layers' spans decide retrieval).

  python benchmarks/moa_heads.py --moa_dirs=runs/moa_smollm2_50,runs/moa_smollm2_25 \
      --length=4096 --prompts=6 --out=runs/moa_heads/moa_smollm2_heads
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import scipy.stats

from sparsity_jax.checkpoints import load_pretrained
from sparsity_jax.evals import long_context as lc
from sparsity_jax.moa import plan as plan_lib
from sparsity_jax.moa import profile as profile_lib
from sparsity_jax.moa.retrieval import needle_attention


def layer_ablation(model, tok, plan, prompts, groups, block_size=64) -> list[dict]:
  """Passkey scores of the plan with each layer group restored to full span, and of the
  dense model with each group cut to the plan's spans."""
  import tempfile

  from sparsity_jax.moa import validate as validate_lib
  layer = np.arange(plan.num_layers)[:, None]
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for lo, hi in groups:
      inside = (layer >= lo) & (layer <= hi) & np.ones_like(plan.alpha, bool)
      for kind, take_plan in (("plan, restored", ~inside), ("dense, cut", inside)):
        variant = plan_lib.Plan(np.where(take_plan, plan.alpha, 0.0),
                                np.where(take_plan, plan.beta, 1.0), plan.sink,
                                plan.num_heads, plan.max_length, plan.min_window)
        path = os.path.join(tmp, "plan.json")
        plan_lib.save_plan(variant, path)
        scored = lc.score_prompts(validate_lib.with_plan(model, path, block_size=block_size),
                                  tok, prompts, new_tokens=12, suffix_len=48, batch_size=1)
        row = {"layers": f"{lo}-{hi}", "variant": kind,
               "density": variant.density(prompts[0].length + 12),
               **{k: v for k, v in lc.summarize(scored).items() if k != "by_depth"}}
        print(f"  layers {lo}-{hi} {kind}: passkey {row['accuracy']:.2f}, answer NLL "
              f"{row['answer_nll']:.2f}, density {row['density']:.2f}", flush=True)
        rows.append(row)
  return rows


def long_range_share(influence: profile_lib.Influence, budget: float) -> np.ndarray:
  """[L, K] fraction of each head's influence at distance >= the uniform window."""
  window = int(budget * influence.length) - influence.sink
  dist = influence.distance
  return dist[..., window:].sum(-1) / np.maximum(dist.sum(-1), 1e-30)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--model", default="smollm2", help="smollm2, a .gguf file or an HF dir.")
  p.add_argument("--moa_dirs", required=True, help="Comma-separated launch/moa.py --out dirs.")
  p.add_argument("--length", type=int, default=4096, help="Prompt length for the head maps.")
  p.add_argument("--prompts", type=int, default=6, help="Prompts per task.")
  p.add_argument("--seed", type=int, default=1)
  p.add_argument("--ablate_dir", default="", help="A MoA dir whose plan to ablate by layers.")
  p.add_argument("--ablate_length", type=int, default=2048)
  p.add_argument("--ablate_groups", default="0-9,10-19,20-29")
  p.add_argument("--ablate_prompts", type=int, default=10)
  p.add_argument("--out", default="runs/moa_heads/moa_smollm2_heads",
                 help="Results prefix (<out>.json, <out>.png).")
  args = p.parse_args()
  needed = [(d, n) for d in args.moa_dirs.split(",") for n in ("options.json", "plan.json")]
  needed += [(args.ablate_dir, "plan.json")] if args.ablate_dir else []
  for d, name in needed:  # Before loading the model.
    if not os.path.exists(os.path.join(d, name)):
      p.error(f"{d} has no {name} (give finished launch/moa.py --out dirs)")
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  model, tok = load_pretrained(args.model)
  prompts = (lc.make_prompts("passkey", tok, args.length, args.prompts, seed=args.seed)
             + lc.make_prompts("kv_retrieval", tok, args.length, args.prompts,
                               seed=args.seed, needles=args.prompts)[:args.prompts])
  needle = needle_attention(model, prompts)
  result = {"length": args.length, "prompts": len(prompts), "needle_attention": needle.tolist(),
            "plans": {}}
  for d in args.moa_dirs.split(","):
    with open(os.path.join(d, "options.json")) as f:
      opts = json.load(f)
    plan = plan_lib.load_plan(os.path.join(d, "plan.json"))
    span = plan.capacities(args.length) / args.length
    shares = {}
    for n in opts["lengths"]:
      inf = profile_lib.Influence.load(os.path.join(d, f"influence_{n}.npz"))
      shares[str(n)] = long_range_share(inf, float(opts["budget"])).tolist()
    # Needle attention in heads whose window is shorter than half the context: those
    # heads cannot see a needle in the first half of the prompt.
    short = span < 0.5
    # Does the profile rank the heads that attend to the needle? (Spearman, over KV heads.)
    rank = {n: float(scipy.stats.spearmanr(np.ravel(v), needle.ravel())[0])
            for n, v in shares.items()}
    result["plans"][d] = {
        "budget": opts["budget"], "span": span.tolist(), "long_range_share": shares,
        "share_vs_needle_spearman": rank,
        "needle_attention_in_short_heads": float(needle[short].sum() / needle.sum()),
        "top_needle_heads": [[int(l), int(k), float(needle[l, k]), float(span[l, k])]
                             for l, k in zip(*np.unravel_index(np.argsort(-needle, axis=None)[:12],
                                                               needle.shape))]}
    print(f"{d}: {short.sum()} of {short.size} KV heads have span < N/2 at N={args.length}; "
          f"they hold {result['plans'][d]['needle_attention_in_short_heads']:.0%} of the "
          "needle attention")
    print(f"{d}: Spearman(profile's long-range share, needle attention) "
          + ", ".join(f"{v:.2f} @{n}" for n, v in rank.items()))
  if args.ablate_dir:
    plan = plan_lib.load_plan(os.path.join(args.ablate_dir, "plan.json"))
    groups = [tuple(int(x) for x in g.split("-")) for g in args.ablate_groups.split(",")]
    result["ablation"] = {"dir": args.ablate_dir, "length": args.ablate_length,
                          "rows": layer_ablation(model, tok, plan, lc.make_prompts(
                              "passkey", tok, args.ablate_length, args.ablate_prompts,
                              seed=0), groups)}
  with open(args.out + ".json", "w") as f:
    json.dump(result, f, indent=1)
  plot(result, args.out + ".png")


def plot(result, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  panels = [("needle attention\n(dense model)", np.array(result["needle_attention"]), None)]
  for d, r in result["plans"].items():
    name = os.path.basename(d.rstrip("/"))
    longest = max(r["long_range_share"], key=int)
    panels.append((f"{name}:\ninfluence share beyond\nthe uniform window @{longest}",
                   np.array(r["long_range_share"][longest]), (0, 1)))
    panels.append((f"{name}:\nspan / N @{result['length']}", np.array(r["span"]), (0, 1)))
  fig, axes = plt.subplots(1, len(panels), figsize=(2.3 * len(panels) + 1, 6.5))
  for ax, (title, values, lim) in zip(np.atleast_1d(axes), panels):
    im = ax.imshow(values, aspect="auto", cmap="viridis",
                   vmin=None if lim is None else lim[0], vmax=None if lim is None else lim[1])
    ax.set(title=title, xlabel="KV head", ylabel="layer")
    ax.title.set_fontsize(7)
    fig.colorbar(im, ax=ax, fraction=0.08)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


if __name__ == "__main__":
  main()

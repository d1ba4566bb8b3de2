r"""Sparse training from scratch on the tiny byte LM: dense vs fixed masks, STE, SR-STE,
PGF's MDGF and SDGF at 2:4 and 1:8, and Sparse-IFT's Sparse Wide at equal FLOPs.

  python benchmarks/sparse_training.py --out=runs/sparse_training [--steps=300] \
      [--variants=NAME,...] [--update_docs]

Every variant trains ``configs/lm_tiny.py`` (0.8M parameters, 4 layers, byte tokens, seq
256, batch 16) for the same steps on the same data order, in its own workdir
``<out>/<name>`` (an interrupted run resumes; a finished one is skipped), and is scored by
the final validation bits/byte (16 x 16 windows of 256 bytes). The sparse variants mask
every linear weight of the blocks (q/k/v/o, SwiGLU gate/up/down); the embedding / output
head stays dense. Schedules (steps of a run of S): MDGF decays beta = exp(-kappa t) with
kappa = 8 / (S - S/6) (beta ~ 3e-4 when the fine-tune phase starts), the last S/6 steps
are the fine-tune phase of MDGF and SDGF; SR-STE uses lambda_w = 2e-4; nothing has a
dense warm-up (the PGF and SR-STE recipes train sparse from the start).

Sparse Wide (Sparse-IFT) at sparsity 0.75 doubles every width (d_model 256, head_dim 64,
mlp 768: sqrt(1 / (1 - 0.75)) = 2) and keeps a static random unstructured mask of 25% of
each block weight, so the block linears cost what the dense model's do; the mask is
static (random) or RigL-updated every S/12 steps until 0.75 S (drop fraction 0.3, cosine;
Sparse-IFT's dynamic sparse training, whose default frequency of 100 steps assumes far
longer runs).

Results: <out>/results.json, <out>/sparse_training.md (table) and <out>/sparse_training.png
(validation bits/byte per variant and training curves); --update_docs copies the table
into docs/results/weight_sparsity.md (between the "sparse-training-table" markers) and
the plot and json into docs/results/. Quality only: XLA on CPU runs masked weights at
dense speed, so no variant is faster.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)


def variants(steps: int) -> dict[str, dict]:
  """name -> dotted config overrides of configs/lm_tiny.py."""
  fine_tune = steps // 6
  kappa = 8.0 / (steps - fine_tune)
  out = {"dense": {}}
  for pattern in ("2:4", "1:8"):
    sparse = {"model.weight_sparsity.pattern": pattern}
    ws = "train.weight_sparsity."
    out[f"fixed {pattern}"] = {**sparse}  # Magnitude of the initial weights, then fixed.
    out[f"ste {pattern}"] = {**sparse, ws + "method": "ste"}
    out[f"sr_ste {pattern}"] = {**sparse, ws + "method": "sr_ste"}
    out[f"mdgf {pattern}"] = {**sparse, ws + "method": "mdgf", ws + "decay": "exp",
                              ws + "decay_coef": kappa, ws + "fine_tune_steps": fine_tune}
    out[f"sdgf {pattern}"] = {**sparse, ws + "method": "ste", ws + "structure_decay": "sparsify",
                              ws + "fine_tune_steps": fine_tune}
  out["sparse_wide s0.75"] = {
      "model.d_model": 256, "model.head_dim": 64, "model.mlp_dim": 768,
      "model.weight_sparsity.pattern": "unstructured", "model.weight_sparsity.sparsity": 0.75,
      "train.weight_sparsity.mask_init": "random"}
  out["sparse_wide s0.75 rigl"] = {
      **out["sparse_wide s0.75"], "train.weight_sparsity.method": "rigl",
      "train.weight_sparsity.rigl_every": max(steps // 12, 1)}
  return out


DEFAULT_VARIANTS = ["dense", "fixed 2:4", "ste 2:4", "sr_ste 2:4", "mdgf 2:4", "sdgf 2:4",
                    "fixed 1:8", "sr_ste 1:8", "mdgf 1:8", "sdgf 1:8", "sparse_wide s0.75",
                    "sparse_wide s0.75 rigl"]


def make_config(overrides: dict, steps: int):
  import importlib.util

  spec = importlib.util.spec_from_file_location("lm_tiny", os.path.join(ROOT, "configs",
                                                                        "lm_tiny.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config(None)
  c.train.steps = steps
  c.train.checkpoint_every = max(steps // 4, 1)
  c.eval.every = 0
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def linear_flops(config) -> tuple[float, float]:
  """(forward FLOPs per token of the block linears counting nonzero weights, total
  nonzero parameters), 2 FLOPs per multiply-add."""
  from sparsity_jax.sparsity.spec import SparsitySpec

  m = config.model
  per_layer = (m.d_model * m.head_dim * (m.num_heads + 2 * m.num_kv_heads)
               + m.num_heads * m.head_dim * m.d_model + 3 * m.d_model * m.mlp_dim)
  spec = SparsitySpec.from_mapping(m.weight_sparsity.to_dict())
  density = 1.0 if spec is None else 1.0 - spec.level
  linear = m.num_layers * per_layer * density
  embed = m.vocab_size * m.d_model
  return 2.0 * linear, linear + embed


def run_variant(name, overrides, args, results, save):
  import jax

  from sparsity_jax.train import loop

  if "bits_per_byte" in results.get(name, {}):
    print(f"{name}: done ({results[name]['bits_per_byte']:.4f} bits/byte)", flush=True)
    return
  config = make_config(overrides, args.steps)
  workdir = os.path.join(args.out, re.sub(r"[^A-Za-z0-9_.]+", "_", name))
  start = time.time()
  print(f"== {name}: {overrides}", flush=True)
  out = loop.train_and_evaluate(config, workdir)
  flops, params = linear_flops(config)
  row = {"bits_per_byte": out["eval_metrics"]["bits_per_byte"],
         "loss": out["eval_metrics"]["loss"], "overrides": overrides,
         "linear_flops_per_token": flops, "nonzero_params": params,
         "seconds": time.time() - start, "workdir": workdir}
  if config.model.weight_sparsity.pattern:
    from sparsity_jax.sparsity import SparsitySpec, masks

    model = loop.load_model(workdir)
    spec = SparsitySpec.from_mapping(config.model.weight_sparsity.to_dict())
    rep = masks.report(model, spec)["global"]
    row["mask_sparsity"] = rep["mask_sparsity"]
    if "nm_valid" in rep:
      row["nm_valid"] = rep["nm_valid"]
  results[name] = row
  save()
  del jax
  print(f"{name}: {row['bits_per_byte']:.4f} bits/byte ({row['seconds']:.0f}s)", flush=True)


def table(results: dict) -> str:
  dense = results.get("dense", {}).get("bits_per_byte")
  lines = ["| variant | pattern | val bits/byte | vs dense | block-linear MFLOPs / token "
           "(nonzeros) | mask sparsity | train s |", "|---|---|---|---|---|---|---|"]
  for name, r in results.items():
    if name.startswith("_"):
      continue
    pattern = r["overrides"].get("model.weight_sparsity.pattern", "dense")
    if pattern == "unstructured":
      pattern = f"{r['overrides']['model.weight_sparsity.sparsity']:.0%} random"
    delta = f"{r['bits_per_byte'] - dense:+.4f}" if dense is not None else "-"
    sparsity = (f"{r['mask_sparsity']:.3f}" + ("" if r.get("nm_valid", True) else " (N:M invalid)")
                if "mask_sparsity" in r else "-")
    lines.append(f"| {name} | {pattern} | {r['bits_per_byte']:.4f} | {delta} | "
                 f"{r['linear_flops_per_token'] / 1e6:.2f} | {sparsity} | {r['seconds']:.0f} |")
  return "\n".join(lines)


def plot(results: dict, path: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np

  names = [n for n in results if not n.startswith("_")]
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
  values = [results[n]["bits_per_byte"] for n in names]
  colors = ["0.4" if n == "dense" else ("C0" if "2:4" in n else "C1" if "1:8" in n else "C2")
            for n in names]
  ax1.barh(range(len(names)), values, color=colors)
  ax1.set_yticks(range(len(names)), names)
  ax1.invert_yaxis()
  lo = min(values)
  ax1.set_xlim(lo - 0.1, max(values) + 0.05)
  for i, v in enumerate(values):
    ax1.text(v, i, f" {v:.3f}", va="center", fontsize=8)
  ax1.set_xlabel("validation bits/byte (lower is better)")
  ax1.set_title("final validation, same steps and data")
  for n in names:
    path_m = os.path.join(results[n]["workdir"], "metrics.jsonl")
    if not os.path.exists(path_m):
      continue
    steps, bpb = [], []
    with open(path_m) as f:
      for line in f:
        row = json.loads(line)
        if "train/bits_per_byte" in row:
          steps.append(row["step"])
          bpb.append(row["train/bits_per_byte"])
    if len(bpb) > 5:
      smooth = np.convolve(bpb, np.ones(5) / 5, mode="valid")
      style = "-" if ("2:4" in n or n == "dense") else "--"
      ax2.plot(steps[4:], smooth, style, label=n, lw=1.2)
  ax2.set_ylim(top=min(4.0, ax2.get_ylim()[1]))
  ax2.set_xlabel("step")
  ax2.set_ylabel("train bits/byte (5-point mean)")
  ax2.legend(fontsize=7, ncol=2)
  ax2.set_title("training curves")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", required=True, help="run directory (reruns resume)")
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                      help="comma-separated variant names")
  parser.add_argument("--update_docs", action="store_true")
  args = parser.parse_args(argv)
  table_of = variants(args.steps)
  chosen = [v for v in args.variants.split(",") if v]
  for name in chosen:
    if name not in table_of:
      parser.error(f"unknown variant {name!r}; known: {', '.join(table_of)}")
  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, "results.json")
  results = json.load(open(path)) if os.path.exists(path) else {}
  if results.get("_meta", {}).get("steps", args.steps) != args.steps:
    parser.error(f"{args.out} holds runs of {results['_meta']['steps']} steps; use another --out")
  results["_meta"] = {"steps": args.steps, "command": " ".join(sys.argv)}

  def save():
    with open(path + ".tmp", "w") as f:
      json.dump(results, f, indent=1)
    os.replace(path + ".tmp", path)

  for i, name in enumerate(chosen):
    print(f"[{i + 1}/{len(chosen)}]", end=" ", flush=True)
    run_variant(name, table_of[name], args, results, save)
  save()
  body = {k: v for k, v in results.items() if not k.startswith("_")}
  md = table(body)
  with open(os.path.join(args.out, "sparse_training.md"), "w") as f:
    f.write(md + "\n")
  plot(body, os.path.join(args.out, "sparse_training.png"))
  print(md)
  if args.update_docs:
    docs = os.path.join(ROOT, "docs", "results")
    shutil.copy(os.path.join(args.out, "sparse_training.png"),
                os.path.join(docs, "sparse_training.png"))
    with open(os.path.join(docs, "sparse_training.json"), "w") as f:
      json.dump(results, f, indent=1)
    doc = os.path.join(docs, "weight_sparsity.md")
    text = open(doc).read()
    begin, end = "<!-- sparse-training-table -->", "<!-- sparse-training-table-end -->"
    text, count = re.subn(re.escape(begin) + ".*" + re.escape(end),
                          lambda _: f"{begin}\n{md}\n{end}", text, flags=re.S)
    if count != 1:
      raise SystemExit(f"{doc} needs one {begin} ... {end} block")
    with open(doc, "w") as f:
      f.write(text)


if __name__ == "__main__":
  main()

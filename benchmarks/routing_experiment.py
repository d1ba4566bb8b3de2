r"""Routing vs local vs dense attention at equal size, steps and data (docs/results/routing.md).

  python benchmarks/routing_experiment.py [--steps=150] [--workdir=runs/routing_experiment]
      [--out=docs/results/routing.md]

Writes the markdown table to <workdir>/routing.md, or to --out (the tracked
docs/results/routing.md only when asked for).

Trains configs/{dense,local,routing}_lm_tiny.py one after another (each resumes if its
workdir already holds a checkpoint; --names picks some), then reports validation
bits/byte, training tokens/s (median over the run after the first 5 steps) and attention
FLOPs per token of one layer's attention core (XLA cost analysis of its compiled forward).
Validation is the left-to-right likelihood (routing heads choose their clusters among
earlier tokens only, the evaluation default) and, for routing heads, also the paper's
teacher-forced number (clusters chosen over the whole sequence, so a position's routing
sees later tokens: not a left-to-right likelihood).
"""

import argparse
import copy
import importlib.util
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

from sparsity_jax.layers.attention import make_attention_core
from sparsity_jax.models import ModelConfig
from sparsity_jax.train import evaluate_workdir, train_and_evaluate
from sparsity_jax.train.metrics import read_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = ("dense", "local", "routing")


def load_config(name: str, steps: int):
  path = os.path.join(ROOT, "configs", f"{name}_lm_tiny.py")
  spec = importlib.util.spec_from_file_location(f"{name}_lm_tiny", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(f"steps={steps}")


def attention_flops_per_token(config) -> float:
  """FLOPs of one attention core's forward per token (last layer), from XLA."""
  cfg = ModelConfig.from_config(config.model)
  core = make_attention_core(cfg, cfg.num_layers - 1, nnx.Rngs(0))
  core.deterministic = True  # No EMA update.
  if hasattr(core, "eval_routing"):  # The method's own (training) algorithm: balanced routing.
    core.eval_routing = "teacher_forced"
  b, t = 1, config.data.seq_len
  q = jnp.zeros((b, t, cfg.num_heads, cfg.head_dim), cfg.dtype)
  kv = jnp.zeros((b, t, cfg.num_kv_heads, cfg.head_dim), cfg.dtype)
  pos = jnp.broadcast_to(jnp.arange(t), (b, t))
  graphdef, state = nnx.split(core)

  def run(state, q, k, v):
    return nnx.merge(graphdef, state)(q, k, v, positions_bt=pos, causal=True)

  cost = jax.jit(run).lower(state, q, kv, kv).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", float("nan"))) / (b * t)


def output_path(args) -> str:
  """Where the table goes: --out, else the experiment's run directory (never the docs)."""
  return args.out or os.path.join(args.workdir, "routing.md")


def parse_args(argv=None) -> argparse.Namespace:
  """The command line, with --out resolved (output_path)."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=150)
  parser.add_argument("--workdir", default=os.path.join(ROOT, "runs", "routing_experiment"))
  parser.add_argument("--out", default=None, help="Markdown output (default <workdir>/routing.md)")
  parser.add_argument("--names", default=",".join(NAMES), help="Models to run (comma-separated)")
  args = parser.parse_args(argv)
  args.out = output_path(args)
  return args


def main(argv=None):
  args = parse_args(argv)
  rows = {}
  names = [n for n in NAMES if n in args.names.split(",")]
  for name in names:
    config = load_config(name, args.steps)
    workdir = os.path.join(args.workdir, name)
    start = time.perf_counter()
    out = train_and_evaluate(config, workdir)
    wall = time.perf_counter() - start
    metrics = [r for r in read_jsonl(os.path.join(workdir, "metrics.jsonl")) if "train/loss" in r]
    speeds = [r["train/tokens_per_s"] for r in metrics if r["step"] > 5]
    bpb = out["eval_metrics"]["bits_per_byte"]
    teacher_forced_bpb = bpb  # No routing heads: the two evaluations are the same.
    if config.model.attention.get("num_routing_heads", 0):
      forced = copy.deepcopy(config)
      forced.model.attention.eval_routing = "teacher_forced"
      teacher_forced_bpb = evaluate_workdir(workdir, forced)["bits_per_byte"]
    rows[name] = dict(bpb=bpb, teacher_forced_bpb=teacher_forced_bpb,
                      tokens_per_s=statistics.median(speeds) if speeds else float("nan"),
                      attn_flops=attention_flops_per_token(config), wall_s=wall,
                      train_bpb=metrics[-1]["train/bits_per_byte"])
    print(name, json.dumps(rows[name]), flush=True)

  c = load_config("routing", args.steps)
  lines = [
      "# Routing Transformer vs local vs dense attention", "",
      f"Command: `python benchmarks/routing_experiment.py --steps={args.steps}`", "",
      f"Setting: {c.model.num_layers} layers, d_model {c.model.d_model}, {c.model.num_heads} heads "
      f"({c.model.num_kv_heads} KV heads), seq_len {c.data.seq_len}, batch {c.data.batch_size}, "
      f"{args.steps} steps of AdamW on the embedded corpus (Python stdlib sources, bytes); "
      f"validation on {c.eval.num_batches} batches. Routing: 2 local heads (blocks of 256, look back "
      "1 block) + 2 routing heads (8 clusters x 256 tokens, shared Q/K, EMA k-means); local: the "
      "same with 4 local heads. One 2-core CPU, one process per model, run one after another.", "",
      "| attention | validation bits/byte (left to right) | teacher-forced (not a likelihood) "
      "| last train bits/byte | train tokens/s | attention FLOPs / token (one layer, fwd) "
      "| wall (s) |",
      "|---|---|---|---|---|---|---|",
  ]
  for name in names:
    r = rows[name]
    lines.append(f"| {name} | {r['bpb']:.4f} | {r['teacher_forced_bpb']:.4f} | "
                 f"{r['train_bpb']:.4f} | {r['tokens_per_s']:.0f} | "
                 f"{r['attn_flops'] / 1e6:.2f} M | {r['wall_s']:.0f} |")
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()

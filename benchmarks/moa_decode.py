"""KV-cache bytes and decode tokens/s: dense vs uniform window + sink vs a MoA plan.

Runs greedy generation (prefill + token-by-token decode with each core's caches)
on a model with random or trained parameters. The uniform plan (StreamingLLM-style:
every head window = density * N - sink) and the heterogeneous plan (half of each
layer's KV heads narrow, half wide) have the same mean KV density at N.

Usage:
  python benchmarks/moa_decode.py --prompt 1024 --new 64 --density 0.5 [--workdir runs/x]
  python benchmarks/moa_decode.py --plan runs/moa_50/plan.json --workdir runs/x
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
from flax import nnx

from sparsity_jax.layers import moa as moa_layer
from sparsity_jax.models import ModelConfig, TransformerLM, generation
from sparsity_jax.moa import plan as plan_lib
from sparsity_jax.moa import validate as validate_lib


def _model(args):
  if args.workdir:
    from sparsity_jax.train import loop
    return loop.load_model(args.workdir)
  cfg = ModelConfig(vocab_size=260, num_layers=4, d_model=128, num_heads=4, num_kv_heads=2,
                    head_dim=32, mlp_dim=384, max_len=args.prompt + args.new)
  return TransformerLM(cfg, rngs=nnx.Rngs(0))


def _plans(cfg, n, density, sink):
  span = density * n - sink  # Window tokens at N so that (sink + window) / N = density.
  uniform = plan_lib.uniform_plan(cfg.num_layers, cfg.num_kv_heads, cfg.num_heads, alpha=0.0,
                                  beta=span / n, sink=sink, max_length=n)
  narrow, wide = 0.5 * span, 1.5 * span  # Same mean; half the heads each.
  beta = np.where(np.arange(cfg.num_kv_heads) % 2 == 0, narrow / n, min(wide / n, 1.0))
  hetero = plan_lib.Plan(np.zeros((cfg.num_layers, cfg.num_kv_heads)),
                         np.broadcast_to(beta, (cfg.num_layers, cfg.num_kv_heads)),
                         np.full((cfg.num_layers, cfg.num_kv_heads), sink), cfg.num_heads, n)
  return {"uniform": uniform, "heterogeneous": hetero}


def _measure(model, prompt, new, repeats):
  generation.generate(model, prompt, new)  # Compile.
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    generation.generate(model, prompt, new)
    best = min(best, time.perf_counter() - start)
  cache = model.init_cache(prompt.shape[0], prompt.shape[1] + new)
  return prompt.shape[0] * new / best, moa_layer.cache_bytes(cache)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--prompt", type=int, default=1024)
  p.add_argument("--new", type=int, default=64)
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--density", type=float, default=0.5)
  p.add_argument("--sink", type=int, default=64)
  p.add_argument("--repeats", type=int, default=2)
  p.add_argument("--workdir", default="")
  p.add_argument("--plan", default="", help="A searched plan.json to measure as 'moa'.")
  args = p.parse_args()
  model = _model(args)
  n = args.prompt + args.new
  prompt = np.random.default_rng(0).integers(0, 256, (args.batch, args.prompt))
  rows = [("dense", 1.0) + _measure(model, prompt, args.new, args.repeats)]
  plans = _plans(model.cfg, n, args.density, args.sink)
  if args.plan:
    plans["moa"] = plan_lib.load_plan(args.plan)
  with tempfile.TemporaryDirectory() as tmp:
    for name, plan in plans.items():
      path = os.path.join(tmp, f"{name}.json")
      plan_lib.save_plan(plan, path)
      moa_model = validate_lib.with_plan(model, path)
      rows.append((name, plan.density(n)) + _measure(moa_model, prompt, args.new, args.repeats))
  print(f"N={n} (prompt {args.prompt} + {args.new} new), batch {args.batch}")
  print("| attention | KV density | KV-cache bytes | decode tokens/s |")
  print("|---|---|---|---|")
  for name, dens, tps, nbytes in rows:
    print(f"| {name} | {dens:.3f} | {nbytes:,} | {tps:.1f} |")


if __name__ == "__main__":
  main()

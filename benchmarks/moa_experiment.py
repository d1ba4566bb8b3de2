r"""Dense vs uniform window + sink (StreamingLLM-style) vs MoA at equal KV density.

For a trained causal LM (configs/moa_lm_tiny.py: stdlib text + retrieval documents) and
one MoA output directory per budget (``launch/moa.py all --budget=...``), measures for
every attention variant:

  retrieval  LongEval-style exact match (``retrieval.evaluate_forced``) by prompt length
             and by the asked key's position decile;
  text loss  bits/byte on the stdlib validation text (no retrieval documents) at each of
             --text_lengths;
  KV cache   bytes of the decode caches at N = longest length + new tokens, and density;
  speed      prefill seconds and decode tokens/s of greedy generation with the caches.

The uniform plan of a budget gives every head sink + window = budget x N tokens, so its KV
density equals the budget (a searched MoA plan's is at most the budget).

  python benchmarks/moa_experiment.py --workdir=runs/moa_lm_tiny \
      --moa_dirs=runs/moa_50,runs/moa_25 --out=docs/results/moa_experiment

Writes <out>.json, <out>.png (accuracy by length and by decile) and prints a markdown table;
<out> defaults to <workdir>/moa_experiment (the tracked docs/results/ only when asked for).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparsity_jax.data import corpus, pipeline, retrieval
from sparsity_jax.data.tokenizer import ByteTokenizer
from sparsity_jax.layers import moa as moa_layer
from sparsity_jax.models import generation
from sparsity_jax.moa import plan as plan_lib
from sparsity_jax.moa import validate as validate_lib
from sparsity_jax.train import loop


def text_bits_per_byte(model, config, seq_len: int, num_batches: int, batch_size: int) -> float:
  data_config = config.data.copy_and_resolve_references()
  data_config.retrieval_fraction = 0.0  # Text only: retrieval is scored separately.
  val = pipeline.PackedSequences(corpus.load_split(data_config)["validation"], seq_len)
  forward = nnx.jit(lambda m, x, y: -jnp.mean(jnp.take_along_axis(
      jax.nn.log_softmax(m(x), axis=-1), y[..., None], axis=-1)))
  losses = [float(forward(model, jnp.asarray(b["inputs"]), jnp.asarray(b["targets"])))
            for b in pipeline.eval_batches(val, batch_size, num_batches)]
  return float(np.mean(losses) / np.log(2.0))


def decode_speed(model, prompt_bt, new_tokens: int) -> tuple[float, float]:
  """(prefill seconds, decode tokens/s) of greedy generation: best of 3 after a warmup."""
  generation.generate(model, prompt_bt, new_tokens + 1)  # Compile both calls.
  runs = []
  for _ in range(3):
    t = {}
    generation.generate(model, prompt_bt, new_tokens + 1, timings=t)
    runs.append(t)
  prefill = min(t["prefill_s"] for t in runs)
  return prefill, prompt_bt.shape[0] * new_tokens / min(t["decode_s"] for t in runs)


def output_path(args) -> str:
  """Output prefix: --out, else the dense model's run directory (never the docs)."""
  return args.out or os.path.join(args.workdir, "moa_experiment")


def parse_args(argv=None) -> argparse.Namespace:
  """The command line, with --out resolved (output_path)."""
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--workdir", required=True, help="The dense model's training run.")
  p.add_argument("--moa_dirs", required=True, help="Comma-separated launch/moa.py --out dirs.")
  p.add_argument("--lengths", default="256,512,768,1024", help="Retrieval prompt lengths.")
  p.add_argument("--num_samples", type=int, default=60, help="Retrieval samples per length.")
  p.add_argument("--text_batches", type=int, default=8)
  p.add_argument("--text_lengths", default="512,1024", help="Text-loss sequence lengths.")
  p.add_argument("--new_tokens", type=int, default=32, help="Decode tokens timed.")
  p.add_argument("--speed_batch", type=int, default=4)
  p.add_argument("--skip_speed", action="store_true")
  p.add_argument("--out", default=None,
                 help="Output prefix (default <workdir>/moa_experiment)")
  args = p.parse_args(argv)
  args.out = output_path(args)
  return args


def main(argv=None):
  args = parse_args(argv)
  lengths = [int(x) for x in args.lengths.split(",")]
  text_lengths = [int(x) for x in args.text_lengths.split(",")]
  model = loop.load_model(args.workdir)
  config = loop.load_workdir_config(args.workdir)
  cfg = model.cfg
  samples = {n: retrieval.dataset(1000 + n, n, args.num_samples) for n in lengths}
  speed_prompt = np.stack([ByteTokenizer().encode(s.prompt)
                           for s in samples[max(lengths)][:args.speed_batch]])
  n_cache = speed_prompt.shape[1] + args.new_tokens + 1

  variants = [("dense", None, None)]
  for moa_dir in args.moa_dirs.split(","):
    opts = json.load(open(os.path.join(moa_dir, "options.json")))
    plan = plan_lib.load_plan(os.path.join(moa_dir, "plan.json"))
    budget, sink = float(opts["budget"]), int(opts["sink"])
    uniform = plan_lib.uniform_plan(cfg.num_layers, cfg.num_kv_heads, cfg.num_heads,
                                    alpha=-sink, beta=budget, sink=sink,
                                    max_length=plan.max_length, kind="uniform", budget=budget)
    variants += [(f"uniform {budget:.0%}", uniform, opts), (f"MoA {budget:.0%}", plan, opts)]

  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for name, plan, opts in variants:
      start = time.time()
      if plan is None:
        variant = model
      else:
        path = os.path.join(tmp, f"{len(rows)}.json")
        plan_lib.save_plan(plan, path)
        variant = validate_lib.with_plan(model, path, block_size=int(opts["block_size"]))
      row = {"name": name, "retrieval": {}}
      for n in lengths:
        row["retrieval"][n] = retrieval.evaluate_forced(variant, samples[n])
      row["text_bpb"] = {n: text_bits_per_byte(variant, config, n, args.text_batches, 8)
                         for n in text_lengths}
      row["density"] = {n: 1.0 if plan is None else plan.density(n) for n in lengths}
      row["cache_bytes"] = moa_layer.cache_bytes(variant.init_cache(1, n_cache))
      if not args.skip_speed:
        row["prefill_s"], row["decode_tok_s"] = decode_speed(variant, speed_prompt,
                                                             args.new_tokens)
      rows.append(row)
      acc = ", ".join(f"{n}: {row['retrieval'][n]['accuracy']:.2f}" for n in lengths)
      text = ", ".join(f"{n}: {v:.3f}" for n, v in row["text_bpb"].items())
      print(f"[{time.time() - start:.0f}s] {name}: accuracy {acc}; text bits/byte {text}; "
            f"KV {row['cache_bytes']:,} B", flush=True)

  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out + ".json", "w") as f:
    json.dump({"args": vars(args), "rows": rows}, f, indent=1)
  plot(rows, lengths, args.out + ".png")
  print(table(rows, lengths, text_lengths, n_cache))


def table(rows, lengths, text_lengths, n_cache) -> str:
  """Markdown: retrieval accuracy (answer NLL) per length, text bits/byte, KV, speed."""
  speed = "decode_tok_s" in rows[0]
  head = (["attention"] + [f"retrieval @{n}" for n in lengths]
          + ["KV density @" + "/".join(map(str, lengths))]
          + [f"text bits/byte @{n}" for n in text_lengths]
          + [f"KV bytes @{n_cache}"] + (["prefill s", "decode tok/s"] if speed else []))
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    scores = [r["retrieval"][n] for n in lengths]
    cells = [r["name"]] + [f"{x['accuracy']:.2f} ({x['answer_nll']:.2f})" for x in scores]
    cells += ["/".join(f"{r['density'][n]:.2f}" for n in lengths)]
    cells += [f"{r['text_bpb'][n]:.3f}" for n in text_lengths]
    cells += [f"{r['cache_bytes']:,}"]
    if speed:
      cells += [f"{r['prefill_s']:.2f}", f"{r['decode_tok_s']:.1f}"]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def plot(rows, lengths, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
  for r in rows:
    style = "-" if r["name"] == "dense" else ("--" if r["name"].startswith("uniform") else "-")
    marker = "o" if r["name"].startswith("MoA") else ("s" if r["name"] == "dense" else "x")
    a.plot(lengths, [r["retrieval"][n]["accuracy"] for n in lengths], style, marker=marker,
           label=r["name"])
    by_decile = r["retrieval"][min(lengths)]["by_decile"]
    b.plot(sorted(by_decile), [by_decile[d] for d in sorted(by_decile)], style, marker=marker,
           label=r["name"])
  a.set(xlabel="prompt length (bytes)", ylabel="retrieval accuracy", ylim=(-0.02, 1.02),
        title="exact match by length")
  b.set(xlabel="position of the asked line (decile)", ylim=(-0.02, 1.02),
        title=f"by key position at length {min(lengths)}")
  a.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


if __name__ == "__main__":
  main()

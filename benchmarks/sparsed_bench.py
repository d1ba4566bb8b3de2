r"""SparseD vs dense generation on a trained masked-diffusion LM.

  python benchmarks/sparsed_bench.py --workdir=runs/diffusion_tiny \
      [--contexts=2048,4096,8192,16384] [--gen_length=64] [--steps=32] [--block_length=32]
      [--select=0.3] [--skip=0.2] [--block_size=128] [--out=docs/results/sparsed.md]

Writes the markdown table to <workdir>/sparsed_bench.md, or to --out (the tracked
docs/results/sparsed.md only when asked for).

For each context length, a prompt of that many bytes (validation-split Python sources) is
followed by --gen_length masked tokens and denoised densely and with SparseD; the table
reports wall time (compilation excluded: a warm-up run, or see --no_warmup), the
fraction of attention computed, and how many generated tokens agree with dense decoding.
It also reports the validation loss (negative ELBO) of the model with SparseD patterns
captured on each batch vs dense attention.
"""

import argparse
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparsity_jax.data import corpus, pipeline, tokenizer
from sparsity_jax.layers import sparsed
from sparsity_jax.models import diffusion
from sparsity_jax.train import loop, objectives


def prompt_tokens(config, length: int) -> np.ndarray:
  val = corpus.load_split(config.data)["validation"]
  if len(val) < length:
    val = np.tile(val, -(-length // len(val)))
  return val[:length].astype(np.int32)[None, :]


def timed_generation(model, prompt, cfg, skip=None, warmup=True):
  """(result, seconds) of one generation, compilation excluded.

  warmup=True runs the generation twice and times the second. warmup=False (for contexts
  where one generation takes many minutes) times one run and replaces the first step of
  each phase with more than one step (dense, sparse; each compiles on its first step) by
  the median of that phase's other steps; one-step phases (the capture step) keep their
  compile time, which is conservative for SparseD.
  """
  make_hook = lambda: None if skip is None else sparsed.sparsed_step_hook(
      model, prompt.shape[1], skip)
  if warmup:
    diffusion.generate(model, prompt, cfg, step_hook=make_hook())  # Compiles every mode.
    start = time.perf_counter()
    result = diffusion.generate(model, prompt, cfg, step_hook=make_hook())
    return result, time.perf_counter() - start
  result = diffusion.generate(model, prompt, cfg, step_hook=make_hook())
  seconds = np.asarray(result.step_seconds, np.float64)
  switch = cfg.steps if skip is None else sparsed.switch_step(cfg.steps, skip)
  for lo, hi in ((0, switch), (switch + 1, cfg.steps)):
    if hi - lo > 1:
      seconds[lo] = np.median(seconds[lo + 1:hi])
  return result, float(seconds.sum())


def attention_fraction(model, seq_len, cfg, skip) -> float:
  """Fraction of (query, key) pairs computed over the whole generation."""
  cores = sparsed.sparsed_cores(model)
  sparse_density = float(np.mean([float(c.block_mask(seq_len).density()) for c in cores]))
  switch = sparsed.switch_step(cfg.steps, skip)
  sparse_steps = max(cfg.steps - switch - 1, 0)
  return ((cfg.steps - sparse_steps) + sparse_steps * sparse_density) / cfg.steps


def sparsed_validation_loss(workdir, attention, num_batches):
  """Negative ELBO per token with the pattern captured on each noisy batch, vs dense."""
  config = loop.load_workdir_config(workdir)
  dense = loop.load_model(workdir)
  sparse = loop.load_model(workdir, attention=attention)
  data = pipeline.PackedSequences(corpus.load_split(config.data)["validation"], config.data.seq_len)
  totals = {"dense": [0.0, 0.0], "sparsed": [0.0, 0.0]}
  for index, batch in enumerate(pipeline.eval_batches(data, config.eval.batch_size, num_batches)):
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    rng = jax.random.fold_in(jax.random.key(1), index)
    noisy, _, _ = objectives.mask_tokens(batch["inputs"], rng)
    sparsed.set_mode(sparse, "capture", prompt_length=0)
    sparse(noisy)
    sparsed.set_mode(sparse, "sparse")
    for name, model in (("dense", dense), ("sparsed", sparse)):
      loss_sum, weight = objectives.masked_diffusion(model, batch, rng)
      totals[name][0] += float(loss_sum)
      totals[name][1] += float(weight)
  return {k: v[0] / v[1] / math.log(2) for k, v in totals.items()}


def output_path(args) -> str:
  """Where the table goes: --out, else the model's run directory (never the docs)."""
  return args.out or os.path.join(args.workdir, "sparsed_bench.md")


def parse_args(argv=None) -> argparse.Namespace:
  """The command line, with --out resolved (output_path)."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--contexts", default="2048,4096,8192,16384")
  parser.add_argument("--gen_length", type=int, default=64)
  parser.add_argument("--steps", type=int, default=32)
  parser.add_argument("--block_length", type=int, default=32)
  parser.add_argument("--select", type=float, default=0.3)
  parser.add_argument("--skip", type=float, default=0.2)
  parser.add_argument("--block_size", type=int, default=128)
  parser.add_argument("--eval_block_size", type=int, default=32)
  parser.add_argument("--eval_batches", type=int, default=8)
  parser.add_argument("--out", default=None,
                      help="Markdown output (default <workdir>/sparsed_bench.md)")
  parser.add_argument("--no_warmup", action="store_true",
                      help="Time one generation per configuration, compile steps replaced by "
                           "their phase's median step (for very long contexts)")
  parser.add_argument("--rows", default=None,
                      help="JSON lines of earlier generation rows to include (e.g. from a log)")
  args = parser.parse_args(argv)
  args.out = output_path(args)
  return args


def main(argv=None):
  args = parse_args(argv)

  config = loop.load_workdir_config(args.workdir)
  cfg = diffusion.SamplerConfig(gen_length=args.gen_length, steps=args.steps,
                                block_length=args.block_length)
  attention = {"kind": "sparsed", "block_size": args.block_size, "select": args.select}
  rows = []
  for context in [int(c) for c in args.contexts.split(",") if c]:
    prompt = prompt_tokens(config, context)
    override = loop.load_workdir_config(args.workdir)
    override.model.max_len = max(override.model.max_len, context + args.gen_length)
    dense = loop.load_model(args.workdir, config=override)
    sparse = loop.load_model(args.workdir, attention=attention, config=override)
    warmup = not args.no_warmup
    dense_result, dense_s = timed_generation(dense, prompt, cfg, warmup=warmup)
    sparse_result, sparse_s = timed_generation(sparse, prompt, cfg, skip=args.skip,
                                               warmup=warmup)
    agree = float((dense_result.generated == sparse_result.generated).mean())
    frac = attention_fraction(sparse, context + args.gen_length, cfg, args.skip)
    row = dict(context=context, dense_s=dense_s, sparsed_s=sparse_s, speedup=dense_s / sparse_s,
               attention_fraction=frac, agreement=agree)
    rows.append(row)
    print(json.dumps(row), flush=True)

  if args.rows:
    with open(args.rows) as f:
      rows = [json.loads(line) for line in f if line.startswith("{\"context\"")] + rows
  eval_attention = dict(attention, block_size=args.eval_block_size)
  losses = sparsed_validation_loss(args.workdir, eval_attention, args.eval_batches)
  print(json.dumps(losses), flush=True)

  flag = lambda k, v: f"--{k}" if v is True else f"--{k}={v}"
  command = ("python benchmarks/sparsed_bench.py " + " ".join(
      flag(k, v) for k, v in vars(args).items() if k not in ("out", "rows") and v is not False))
  lines = [
      "# SparseD results", "",
      f"Command: `{command}`", "",
      f"Model: `{args.workdir}` ({config.model.num_layers} layers, d_model {config.model.d_model}, "
      f"{config.model.num_heads} heads, trained at seq_len {config.data.seq_len}); "
      f"{jax.device_count()} {jax.default_backend().upper()} device(s). Sampler: gen_length "
      f"{args.gen_length}, {args.steps} steps, block_length {args.block_length}, greedy. SparseD: "
      f"skip {args.skip}, select {args.select}, block_size {args.block_size}. Times exclude "
      + ("compilation (one timed generation per configuration; compile steps replaced by "
         "their phase's median step, see timed_generation)." if args.no_warmup else
         "compilation (one warm-up generation per configuration)."), "",
      "| context | dense (s) | SparseD (s) | speed-up | attention computed | tokens = dense |",
      "|---|---|---|---|---|---|",
  ]
  for r in rows:
    lines.append(f"| {r['context']} | {r['dense_s']:.2f} | {r['sparsed_s']:.2f} | "
                 f"{r['speedup']:.2f}x | {100 * r['attention_fraction']:.1f}% | "
                 f"{100 * r['agreement']:.1f}% |")
  lines += ["", f"Validation negative ELBO (bits/byte, {args.eval_batches} batches of seq_len "
            f"{config.data.seq_len}; SparseD pattern captured on each noisy batch, block "
            f"{args.eval_block_size}, select {args.select}): dense {losses['dense']:.4f}, "
            f"SparseD {losses['sparsed']:.4f}.", ""]
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    f.write("\n".join(lines))
  print("\n".join(lines))


if __name__ == "__main__":
  main()

r"""SmolLM2-135M-Instruct on this CPU: our dense path vs transformers, prefill and decode.

  python benchmarks/real_model.py --out=runs/real_model \
      [--torch_python=/tmp/hfgen/bin/python] [--lengths=512,2048,4096] \
      [--decode_context=2048 --new_tokens=64] [--dtypes=float32,bfloat16] [--rounds=2] \
      [--repeats=3] [--update_docs]

Each measurement runs in a fresh process, one at a time, ours and transformers'
alternating cell by cell for ``--rounds`` rounds; a process loads the model, warms up
(compiles), then times ``--repeats`` runs and reports them with its peak RSS. The table
gives min and median over all timed runs, tokens/s and peak RSS per side, and the time
ratio ours / transformers (< 1: we are faster).

- prefill L: the prompt of L tokens through the model into a fresh KV cache, logits of
  the last position (what generation needs; transformers: ``logits_to_keep=1``).
- decode: after a prefill of ``--decode_context`` tokens, ``--new_tokens`` greedy tokens
  one at a time with the KV cache (the prefill is not timed); the two sides' greedy
  tokens are compared.

The transformers side needs a Python with torch and transformers (``--torch_python``; the
project does not depend on torch): it loads a Hugging Face directory converted from the
same GGUF by launch/convert.py (written once into the run directory), with 2 threads.
Without it only our side runs. Results go to <out>/real_model.{json,md}; --update_docs
also writes the table into docs/benchmarks.md between the "real-model" markers.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT_SEED = 0


def _prompt_ids(length: int, vocab: int = 49152) -> list[int]:
  """A fixed pseudo-random prompt (same on both sides; the text does not matter for speed)."""
  import random
  rng = random.Random(PROMPT_SEED)
  return [rng.randrange(3, vocab) for _ in range(length)]


def _peak_rss_gib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux.


# ----------------------------------------------------------------------------- ours


def child_ours(args) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from sparsity_jax.checkpoints import load_pretrained
  from sparsity_jax.models import generation

  dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype]
  model, _ = load_pretrained("smollm2", dtype=dtype, param_dtype=dtype)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  times, tokens = [], None
  if args.phase == "prefill":
    prompt = jnp.asarray([_prompt_ids(args.length)], jnp.int32)

    @jax.jit
    def prefill(params, rest, prompt):
      m = nnx.merge(graphdef, params, rest)
      logits, cache = m.decode(prompt, m.init_cache(1, args.length), last_only=True)
      return logits, cache

    jax.block_until_ready(prefill(params, rest, prompt))  # Compile + warm up.
    for _ in range(args.repeats):
      start = time.perf_counter()
      jax.block_until_ready(prefill(params, rest, prompt))
      times.append(time.perf_counter() - start)
  else:
    prompt = np.asarray([_prompt_ids(args.length)], np.int32)
    generation.generate(model, prompt, args.new_tokens)  # Compile + warm up.
    for _ in range(args.repeats):
      timings = {}
      out = generation.generate(model, prompt, args.new_tokens, timings=timings)
      times.append(timings["decode_s"])  # new_tokens - 1 decode steps.
      tokens = out[0, args.length:].tolist()
  return {"times": times, "peak_rss_gib": _peak_rss_gib(), "tokens": tokens}


def profile_ours(length: int, repeats: int) -> str:
  """Where our float32 prefill of ``length`` tokens spends its time: the whole prefill,
  then its parts run alone with the same shapes (30 layers each): attention, the q/k/v/o
  projections + RoPE, the SwiGLU MLPs, and the output head (last position)."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from sparsity_jax.checkpoints import load_pretrained

  model, _ = load_pretrained("smollm2")
  cfg = model.cfg
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  prompt = jnp.asarray([_prompt_ids(length)], jnp.int32)
  x = jax.random.normal(jax.random.key(0), (1, length, cfg.d_model), jnp.float32)
  positions = jnp.arange(length, dtype=jnp.int32)[None]

  def timed(fn, *args):
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times.append(time.perf_counter() - start)
    return min(times)

  @jax.jit
  def prefill(params, rest):
    m = nnx.merge(graphdef, params, rest)
    return m.decode(prompt, m.init_cache(1, length), last_only=True)[0]

  h, n, kv = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
  q = jax.random.normal(jax.random.key(1), (1, length, n, h), jnp.float32)
  k = jax.random.normal(jax.random.key(2), (1, length, kv, h), jnp.float32)

  @jax.jit
  def attention_only(params, rest, q, k):
    m = nnx.merge(graphdef, params, rest)
    return [block.attn.core(q + i, k, k, positions_bt=positions, causal=True)
            for i, block in enumerate(m.layers)]

  @jax.jit
  def projections_only(params, rest):
    m = nnx.merge(graphdef, params, rest)
    out = []
    for block in m.layers:
      q, k, v = block.attn.project_qkv(block.attn_norm(x), positions)
      out.append((block.attn._output(q), k, v))
    return out

  @jax.jit
  def mlp_only(params, rest):
    m = nnx.merge(graphdef, params, rest)
    return [block.mlp(block.mlp_norm(x)) for block in m.layers]

  @jax.jit
  def head_only(params, rest):
    m = nnx.merge(graphdef, params, rest)
    return jnp.einsum("be,ve->bv", m.final_norm(x[:, -1]), m.embed.get_value())

  total = timed(prefill, params, rest)
  parts = {"attention core (flash kernel, causal)": timed(attention_only, params, rest, q, k),
           "q/k/v/o projections + RoPE + norm": timed(projections_only, params, rest),
           "SwiGLU MLPs + norm": timed(mlp_only, params, rest),
           "output head (last position)": timed(head_only, params, rest)}
  lines = [f"Float32 prefill of {length} tokens: {total:.2f} s (min of {repeats}). Its parts "
           "run alone with the same shapes (all 30 layers):", "",
           "| part | s | share of the prefill |", "|---|---|---|"]
  for name, seconds in parts.items():
    lines.append(f"| {name} | {seconds:.2f} | {seconds / total:.0%} |")
  rest_s = total - sum(parts.values())
  lines.append(f"| the rest (embedding, residuals, cache writes, overheads) | {rest_s:.2f} | "
               f"{rest_s / total:.0%} |")
  return "\n".join(lines)


# ----------------------------------------------------------------------------- transformers


def child_transformers(args) -> dict:
  import torch
  import transformers

  torch.set_num_threads(args.threads)
  dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
  model = transformers.AutoModelForCausalLM.from_pretrained(args.hf_dir, dtype=dtype)
  model.eval()
  prompt = torch.tensor([_prompt_ids(args.length)])
  times, tokens = [], None

  def prefill():
    return model(prompt, use_cache=True, logits_to_keep=1)

  with torch.inference_mode():
    prefill()  # Warm up.
    for _ in range(args.repeats):
      if args.phase == "prefill":
        start = time.perf_counter()
        prefill()
        times.append(time.perf_counter() - start)
      else:
        out = prefill()
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        past, new = out.past_key_values, [int(token)]
        start = time.perf_counter()
        for _ in range(args.new_tokens - 1):  # As ours: new_tokens - 1 decode steps.
          out = model(token, past_key_values=past, use_cache=True)
          past, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
          new.append(int(token))
        times.append(time.perf_counter() - start)
        tokens = new
  return {"times": times, "peak_rss_gib": _peak_rss_gib(), "tokens": tokens}


# ----------------------------------------------------------------------------- driver


def _run_child(python: str, side: str, args, phase: str, length: int, dtype: str,
               hf_dir: str | None) -> dict:
  cmd = [python, os.path.abspath(__file__), f"--child={side}", f"--phase={phase}",
         f"--length={length}", f"--dtype={dtype}", f"--repeats={args.repeats}",
         f"--new_tokens={args.new_tokens}", f"--threads={args.threads}"]
  if hf_dir:
    cmd.append(f"--hf_dir={hf_dir}")
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  env.pop("XLA_FLAGS", None)
  run = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
  if run.returncode != 0:
    raise RuntimeError(f"{side} {phase} {length} {dtype} failed:\n{run.stderr[-3000:]}")
  return json.loads(run.stdout.strip().splitlines()[-1])


def _table(rows: list[dict], has_torch: bool) -> str:
  head = ("| dtype | phase | tokens | ours min / median s | ours tokens/s | ours peak RSS GiB |"
          + (" transformers min / median s | transformers tokens/s | transformers peak RSS GiB |"
             " ours / transformers (median) |" if has_torch else ""))
  lines = [head, "|" + "---|" * head.count("|")[:-1] if False else head.replace(
      head, "|" + "---|" * (head.count("|") - 1))]
  for r in rows:
    o = r["ours"]
    line = (f"| {r['dtype']} | {r['phase']} | {r['tokens']} | {min(o['times']):.3f} / "
            f"{statistics.median(o['times']):.3f} | {r['tokens'] / statistics.median(o['times']):.1f} "
            f"| {max(o['peak_rss_gib']):.2f} |")
    if has_torch:
      t = r["transformers"]
      ratio = statistics.median(o["times"]) / statistics.median(t["times"])
      line += (f" {min(t['times']):.3f} / {statistics.median(t['times']):.3f} | "
               f"{r['tokens'] / statistics.median(t['times']):.1f} | {max(t['peak_rss_gib']):.2f} "
               f"| **{ratio:.2f}** |")
    lines.append(line)
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--child", choices=["ours", "transformers"])
  parser.add_argument("--phase", default="prefill")
  parser.add_argument("--length", type=int, default=512)
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--hf_dir", default=None)
  parser.add_argument("--out", default="runs/real_model")
  parser.add_argument("--torch_python", default=None)
  parser.add_argument("--lengths", default="512,2048,4096")
  parser.add_argument("--decode_context", type=int, default=2048)
  parser.add_argument("--new_tokens", type=int, default=64)
  parser.add_argument("--dtypes", default="float32,bfloat16")
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--threads", type=int, default=2)
  parser.add_argument("--update_docs", action="store_true")
  parser.add_argument("--profile", type=int, default=0,
                      help="Only profile our float32 prefill at this length (parts' times).")
  args = parser.parse_args()
  if args.profile:
    print(profile_ours(args.profile, args.repeats))
    return
  if args.child:
    fn = child_ours if args.child == "ours" else child_transformers
    print(json.dumps(fn(args)))
    return

  os.makedirs(args.out, exist_ok=True)
  hf_dir = None
  if args.torch_python:
    hf_dir = os.path.join(args.out, "smollm2_hf")
    if not os.path.exists(hf_dir):
      print(f"converting the embedded GGUF to {hf_dir} (launch/convert.py)", flush=True)
      subprocess.run([sys.executable, os.path.join(ROOT, "launch", "convert.py"),
                      "--model=smollm2", f"--out={hf_dir}"], check=True)
  cells = [(d, "prefill", int(n)) for d in args.dtypes.split(",") for n in args.lengths.split(",")]
  cells += [(d, "decode", args.decode_context) for d in args.dtypes.split(",")]
  results = {cell: {"ours": {"times": [], "peak_rss_gib": []},
                    "transformers": {"times": [], "peak_rss_gib": []}} for cell in cells}
  sides = [("ours", sys.executable)] + ([("transformers", args.torch_python)]
                                        if args.torch_python else [])
  total = args.rounds * len(cells) * len(sides)
  done = 0
  for _ in range(args.rounds):
    for cell in cells:
      for side, python in sides:
        dtype, phase, length = cell
        out = _run_child(python, side, args, phase, length, dtype, hf_dir)
        entry = results[cell][side]
        entry["times"] += out["times"]
        entry["peak_rss_gib"].append(out["peak_rss_gib"])
        entry["tokens"] = out["tokens"]
        done += 1
        print(f"[{done}/{total}] {side:12s} {dtype} {phase} {length}: median "
              f"{statistics.median(out['times']):.3f} s, peak RSS {out['peak_rss_gib']:.2f} GiB",
              flush=True)
  rows = []
  for (dtype, phase, length), sides_out in results.items():
    tokens = length if phase == "prefill" else args.new_tokens - 1
    row = {"dtype": dtype, "phase": phase if phase == "prefill" else
           f"decode after {length}", "tokens": tokens, **sides_out}
    if phase == "decode" and args.torch_python:
      ours_t, theirs_t = sides_out["ours"]["tokens"], sides_out["transformers"]["tokens"]
      row["greedy_tokens_equal"] = ours_t == theirs_t
    rows.append(row)
  table = _table(rows, bool(args.torch_python))
  agree = [f"{r['dtype']}: {'identical' if r['greedy_tokens_equal'] else 'different'}"
           for r in rows if "greedy_tokens_equal" in r]
  command = "python benchmarks/real_model.py " + " ".join(sys.argv[1:])
  md = (f"Command: `{command}`\n\n{table}\n\n"
        + (f"Greedy decode tokens, ours vs transformers: {', '.join(agree)}.\n" if agree else ""))
  with open(os.path.join(args.out, "real_model.json"), "w") as f:
    json.dump(rows, f, indent=1)
  with open(os.path.join(args.out, "real_model.md"), "w") as f:
    f.write(md)
  print(md)
  if args.update_docs:
    path = os.path.join(ROOT, "docs", "benchmarks.md")
    text = open(path).read()
    begin, end = "<!-- real-model:begin -->", "<!-- real-model:end -->"
    if begin not in text:
      raise SystemExit(f"{path} has no {begin} ... {end} section")
    text = text[:text.index(begin) + len(begin)] + "\n" + md + text[text.index(end):]
    with open(path, "w") as f:
      f.write(text)


if __name__ == "__main__":
  main()

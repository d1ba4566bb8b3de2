r"""Training-free sparse prefill on SmolLM2-135M-Instruct: density, attention recall,
perplexity, passkey retrieval and prefill time, per method and setting, vs dense.

  python benchmarks/prefill_methods.py --out=runs/prefill [--length=4096] [--passkeys=2] \
      [--settings=NAME,...] [--recall_settings=NAME,...] [--update_docs]

Two phases, each result saved as soon as it exists (<out>/results.json; a rerun skips what
is there, so an interrupted run resumes):

- recall (every setting of RECALL_SETTINGS): the dense model runs the text window once;
  for every layer its post-RoPE q / k go through each setting's pattern builder
  (``core.select``) and we record the pattern's density (computed causal pairs /
  t (t + 1) / 2) and attention recall (the share of the dense attention probability mass
  of each query row that the pattern computes), averaged over rows, heads and layers.
  Patterns are built from the *dense* model's activations (an oracle view: every layer
  sees the same inputs), as recall is usually reported. Recall is averaged over every 4th
  query row (RECALL_ROW_STRIDE; the memory-bound masked sums dominate the phase), density
  counts every pair (``core.pairs``).
- model (every setting of MODEL_SETTINGS): the model with that core
  (``attention={"kind": ...}``) runs
  * perplexity: the text window through ``model.decode`` into an empty cache (the sparse
    prefill path), next-token NLL over the window;
  * passkey: ``--passkeys`` prompts of exactly ``--length`` tokens (a 5-digit key at
    different depths in repeated filler sentences), greedy generation of 8 tokens through
    the KV cache (sparse prefill, dense decode); correct if the key is generated;
  * prefill seconds: ``generation.generate``'s ``prefill_s`` (prompt through the caches,
    first token ready, compilation excluded), the minimum over the first two passkey
    prompts (TIMED_PROMPTS);
  * in-model density: the cores' recorded density on the perplexity window (each layer's
    pattern from its own, sparse-model, activations).

The text window is the first --length tokens of the embedded corpus's validation split
(Python standard-library sources, sparsity_jax.data.corpus), tokenized with the model's
tokenizer. Results go to <out>/results.json, <out>/prefill.md and <out>/recall_density.png;
--update_docs also writes the table and plot into docs/results/ (prefill.md between the
"prefill-table-<length>" markers, prefill_<length>.png, prefill_<length>.json);
--report_only redraws them from <out>/results.json without running anything.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

# name -> attention config. Paper / study defaults unless the name says otherwise; block
# top-k runs 64-token blocks (the study's 16-token blocks make 65k tiny tiles per layer at
# 4k on the CPU path) and AnchorAttention 32 x 16 = 512-token big blocks (the default 2048
# would leave a 4k prompt dense: the windows cover everything below 3 big blocks).
SETTINGS = {
    "dense": {"kind": "dense"},
    "flexprefill g0.95": {"kind": "flexprefill", "gamma": 0.95},
    "flexprefill g0.9": {"kind": "flexprefill", "gamma": 0.9},
    "flexprefill g0.8": {"kind": "flexprefill", "gamma": 0.8},
    "flexprefill g0.9 min256": {"kind": "flexprefill", "gamma": 0.9, "min_budget": 256},
    "vertical_slash 512/512": {"kind": "vertical_slash"},
    "vertical_slash 256/128": {"kind": "vertical_slash", "vertical_size": 256, "slash_size": 128},
    "vertical_slash 64/64": {"kind": "vertical_slash", "vertical_size": 64, "slash_size": 64},
    "block_topk b64 k16": {"kind": "block_topk", "block_size": 64, "top_k": 16},
    "block_topk b64 k8": {"kind": "block_topk", "block_size": 64, "top_k": 8},
    "block_topk b16 k64": {"kind": "block_topk", "block_size": 16, "top_k": 64},
    "pbs t0.9": {"kind": "pbs"},
    "pbs t0.7": {"kind": "pbs", "threshold": 0.7},
    "pbs t0.5": {"kind": "pbs", "threshold": 0.5},
    "pbs t0.9 unpermuted": {"kind": "pbs", "permute": False},
    "pbs t0.7 unpermuted": {"kind": "pbs", "threshold": 0.7, "permute": False},
    "pbs t0.5 unpermuted": {"kind": "pbs", "threshold": 0.5, "permute": False},
    "anchor S512 th12": {"kind": "anchor", "block_size": 32, "step": 16, "theta": 12.0},
    "anchor S512 th8": {"kind": "anchor", "block_size": 32, "step": 16, "theta": 8.0},
    "anchor S512 th4": {"kind": "anchor", "block_size": 32, "step": 16, "theta": 4.0},
    "anchor S512 th12 all": {"kind": "anchor", "block_size": 32, "step": 16, "theta": 12.0,
                             "candidates": "all"},
    "anchor S2048 th12": {"kind": "anchor"},  # The official default; dense below 6144 tokens.
}
MODEL_SETTINGS = ["dense", "flexprefill g0.95", "flexprefill g0.9", "vertical_slash 512/512",
                  "vertical_slash 256/128", "block_topk b64 k16", "block_topk b64 k8",
                  "pbs t0.9", "pbs t0.7", "anchor S512 th12", "anchor S512 th8"]
RECALL_SETTINGS = [name for name in SETTINGS if name not in ("dense", "anchor S2048 th12")]
RECALL_ROW_STRIDE = 4  # Recall over every 4th query row (the last row included).
# Prefill seconds: the faster of the first two prompts. Every setting runs them in one
# pass, side by side; prompts added by a later rerun (--passkeys raised) count for
# accuracy only, as the machine's load may have changed in between.
TIMED_PROMPTS = 2

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
PASSKEY_HEAD = ("There is an important info hidden inside a lot of irrelevant text. Find it and "
                "memorize it. I will quiz you about the important information there.\n")
PASSKEY_QUESTION = "\nWhat is the pass key? The pass key is"
PASSKEYS = [(68413, 0.25), (27591, 0.75), (90375, 0.5), (41862, 0.1)]


def passkeys(n: int) -> list[tuple[int, float]]:
  """The first n (key, depth) pairs: PASSKEYS, then seeded random keys at depths in [0.05, 0.95]."""
  import numpy as np

  rng = np.random.default_rng(0)
  extra = [(int(rng.integers(10000, 100000)), round(float(rng.uniform(0.05, 0.95)), 3))
           for _ in range(max(0, n - len(PASSKEYS)))]
  return (PASSKEYS + extra)[:n]


# ----------------------------------------------------------------------------- inputs


def text_window(tokenizer, length: int):
  """The first length + 1 tokens of the validation split (documents separated by EOS)."""
  import numpy as np

  from sparsity_jax.data import corpus

  root, files = corpus.stdlib_files()
  _, val = corpus.split_files(files, 0.05)
  parts, total = [], 0
  for rel in val:
    ids = corpus.load_tokens(root, [rel], tokenizer)
    parts.append(ids)
    total += len(ids)
    if total > length:
      break
  return np.concatenate(parts)[:length + 1].astype(np.int32), val[:len(parts)]


def passkey_prompt(tokenizer, key: int, depth: float, length: int) -> list[int]:
  """Exactly ``length`` tokens: head, filler, the key sentence at ``depth``, filler, question."""
  enc = lambda s: tokenizer.encode(s, add_special_tokens=False).tolist()
  head, question = enc(PASSKEY_HEAD), enc(PASSKEY_QUESTION)
  needle = enc(f"The pass key is {key}. Remember it. {key} is the pass key. ")
  fill = enc(FILLER * (length // 8 + 8))
  n_fill = length - len(head) - len(needle) - len(question)
  before = int(n_fill * depth)
  return head + fill[:before] + needle + fill[:n_fill - before] + question


# ----------------------------------------------------------------------------- models


def capture_layers(model, tokens):
  """[(q [1, t, n, h], k [1, t, k, h])] per layer of the dense model on ``tokens`` [1, t]."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  graphdef, params, other = nnx.split(model.layers, nnx.Param, ...)
  t = tokens.shape[1]
  pos = jnp.arange(t, dtype=jnp.int32)[None]

  @jax.jit
  def layer(params_i, other_i, x):
    block = nnx.merge(graphdef, params_i, other_i)
    q, k, _ = block.attn.project_qkv(block.attn_norm(x), pos)
    return block(x, pos), q, k

  x = jax.jit(model.embed_tokens)(tokens)
  out = []
  for i in range(model.cfg.num_layers):
    pick = lambda a: a[i]
    x, q, k = layer(jax.tree.map(pick, params), jax.tree.map(pick, other), x)
    out.append((q, k))
  return out


def recall_phase(base, tokens, names, results, save, log):
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from sparsity_jax.layers.attention import make_attention_core
  from sparsity_jax.patterns import prefill as prefill_lib

  todo = [n for n in names if "recall" not in results.get(n, {})]
  if not todo:
    return
  start = time.time()
  layers = capture_layers(base, tokens)
  t = tokens.shape[1]
  log(f"recall: captured {len(layers)} layers in {time.time() - start:.0f}s")

  rows = np.arange(RECALL_ROW_STRIDE - 1, t, RECALL_ROW_STRIDE)

  @jax.jit
  def dense_probs(q, k):  # Softmax rows of the sampled queries, [b, n, rows, t].
    n, d = q.shape[2], q.shape[3]
    kr = jnp.repeat(k, n // k.shape[2], axis=2)
    s = jnp.einsum("brnd,bsnd->bnrs", q[:, rows], kr) * d ** -0.5
    s = jnp.where(jnp.arange(t)[None, :] <= rows[:, None], s, -jnp.inf)
    return jax.nn.softmax(s, axis=-1)

  probs = None
  fns = {}
  for name in todo:
    cfg = dataclasses.replace(base.cfg, attention=SETTINGS[name])
    core = make_attention_core(cfg, 0, nnx.Rngs(0))

    def fn(q, k, p, core=core):
      pattern = core.select(q, k)
      allowed = core.allowed(pattern, t)[:, :, rows]
      recall = jnp.sum(jnp.where(allowed, p, 0.0), axis=-1).mean(-1)  # [b, n]
      density = core.pairs(pattern, t) / prefill_lib.causal_pair_count(t)
      return recall[0], jnp.broadcast_to(density, recall.shape)[0]

    fns[name] = jax.jit(fn)
  per = {name: {"recall": [], "density": []} for name in todo}
  for i, (q, k) in enumerate(layers):
    probs = dense_probs(q, k)
    for name in todo:
      r, d = fns[name](q, k, probs)
      per[name]["recall"].append(np.asarray(r).tolist())
      per[name]["density"].append(np.asarray(d).tolist())
    del probs
    log(f"recall: layer {i + 1}/{len(layers)} ({time.time() - start:.0f}s)")
  for name in todo:
    r, d = np.asarray(per[name]["recall"]), np.asarray(per[name]["density"])
    results.setdefault(name, {}).update(
        recall=float(r.mean()), density=float(d.mean()), recall_min_layer=float(r.mean(1).min()),
        recall_per_layer=r.mean(1).round(4).tolist(), density_per_layer=d.mean(1).round(4).tolist())
  save()
  log(f"recall phase: {time.time() - start:.0f}s")


def model_phase(base, tokenizer, tokens, name, args, results, save, log):
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from sparsity_jax.layers import prefill as prefill_layers
  from sparsity_jax.models import generation

  done = results.get(name, {})
  prompts = passkeys(args.passkeys)
  if "ppl" in done and len(done.get("passkey_answers", [])) >= len(prompts):
    return
  start = time.time() - done.get("model_seconds", 0.0)  # Seconds accumulate over resumes.
  from sparsity_jax.checkpoints.loading import with_attention

  model = base if name == "dense" else with_attention(base, SETTINGS[name])
  t = tokens.shape[1] - 1
  x = jnp.asarray(tokens[:, :-1])

  @nnx.jit
  def nll(m, x, y):
    logits, _ = m.decode(x, m.init_cache(1, t))
    lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(lp, y[..., None], axis=-1)[..., 0]

  if "ppl" in done:  # Resumed: only the passkey prompts not yet run.
    row = {}
  else:
    losses = np.asarray(nll(model, x, jnp.asarray(tokens[:, 1:])))
    row = {"ppl": float(np.exp(losses.mean())), "nll": float(losses.mean())}
    if name != "dense":
      stats = prefill_layers.prefill_stats(model)
      row["model_density"] = stats["density"]
    log(f"{name}: ppl {row['ppl']:.3f} ({time.time() - start:.0f}s)")
    results.setdefault(name, {}).update(row)
    save()
  answers = list(done.get("passkey_answers", []))
  prefill_s = list(done.get("prefill_s_all", []))
  # 8 generated tokens must fit the context: at 8192 (SmolLM2's context) prompts are 8184.
  prompt_len = min(args.length, model.cfg.max_len - 8)
  for key, depth in prompts[len(answers):]:
    prompt = np.asarray([passkey_prompt(tokenizer, key, depth, prompt_len)], np.int32)
    timings = {}
    out = generation.generate(model, prompt, 8, timings=timings)
    text = tokenizer.decode(out[0, prompt.shape[1]:].tolist())
    answers.append(text)
    prefill_s.append(timings["prefill_s"])
    log(f"{name}: passkey {key}@{depth}: {text!r} prefill {timings['prefill_s']:.1f}s")
    hits = [str(k) in a for (k, _), a in zip(prompts, answers)]
    # Saved after every prompt: an interrupted run resumes at the next prompt.
    results.setdefault(name, {}).update(
        passkey=float(np.mean(hits)), passkey_hits=int(np.sum(hits)), passkey_answers=answers,
        prefill_s=float(min(prefill_s[:TIMED_PROMPTS])), prefill_s_all=prefill_s)
    save()
  row["model_seconds"] = time.time() - start
  results.setdefault(name, {}).update(row)
  save()


# ----------------------------------------------------------------------------- report


def method_of(name: str) -> str:
  return name.split()[0]


def timed(row: dict) -> dict:
  """The row with prefill_s recomputed from its first TIMED_PROMPTS prompts."""
  if row.get("prefill_s_all"):
    row = dict(row, prefill_s=float(min(row["prefill_s_all"][:TIMED_PROMPTS])))
  return row


def table(results: dict, length: int) -> str:
  results = {name: timed(row) for name, row in results.items()}
  dense = results.get("dense", {})
  lines = [
      "| setting | density | recall | min-layer recall | perplexity | passkey | prefill s "
      "(speed-up) | in-model density |",
      "|---|---|---|---|---|---|---|---|"]
  fmt = lambda v, f: "-" if v is None else format(v, f)
  for name in SETTINGS:
    r = results.get(name)
    if not r or name == "dense":
      continue
    speed = (f"{r['prefill_s']:.1f} ({dense['prefill_s'] / r['prefill_s']:.2f}x)"
             if "prefill_s" in r and "prefill_s" in dense else "-")
    passkey = (f"{r['passkey_hits']}/{len(r['passkey_answers'])}" if "passkey_hits" in r else "-")
    lines.append(f"| {name} | {fmt(r.get('density'), '.3f')} | {fmt(r.get('recall'), '.4f')} | "
                 f"{fmt(r.get('recall_min_layer'), '.3f')} | {fmt(r.get('ppl'), '.3f')} | {passkey} | "
                 f"{speed} | {fmt(r.get('model_density'), '.3f')} |")
  if "ppl" in dense:
    passkey = (f"{dense['passkey_hits']}/{len(dense['passkey_answers'])}"
               if "passkey_hits" in dense else "-")
    prefill_s = f"{dense['prefill_s']:.1f}" if "prefill_s" in dense else "-"
    lines.append(f"| dense | 1 | 1 | 1 | {dense['ppl']:.3f} | {passkey} | {prefill_s} | 1 |")
  return "\n".join(lines)


def plot(results: dict, path: str, length: int) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(7, 4.5))
  markers = {"flexprefill": "o", "vertical_slash": "s", "block_topk": "^", "pbs": "D",
             "anchor": "*"}
  for method, marker in markers.items():
    for variant in (False, True):
      pts = sorted((r["density"], r["recall"], n) for n, r in results.items()
                   if method_of(n) == method and "recall" in r
                   and (("unpermuted" in n or " all" in n) == variant))
      if not pts:
        continue
      label = method + (" (unpermuted)" if method == "pbs" and variant else
                        " (all candidates)" if variant else "")
      ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, linestyle="--" if variant
              else "-", label=label, markerfacecolor="none" if variant else None)
  ax.set_xlabel("density (computed share of causal query-key pairs)")
  ax.set_ylabel("attention recall (dense mass kept)")
  ax.set_title(f"SmolLM2-135M-Instruct, {length} tokens of stdlib text (30 layers x 9 heads)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def update_docs(out: str, results: dict, length: int) -> None:
  """Writes the table into docs/results/prefill.md between "prefill-table-<length>"
  markers, the plot to docs/results/prefill_<length>.png and the results as JSON."""
  doc = os.path.join(ROOT, "docs", "results", "prefill.md")
  shutil.copy(os.path.join(out, "recall_density.png"),
              os.path.join(ROOT, "docs", "results", f"prefill_{length}.png"))
  with open(doc) as f:
    text = f.read()
  begin, end = f"<!-- prefill-table-{length} -->", f"<!-- prefill-table-{length}-end -->"
  text, count = re.subn(re.escape(begin) + ".*" + re.escape(end),
                        lambda _: f"{begin}\n{table(results, length)}\n{end}", text, flags=re.S)
  if count != 1:
    raise ValueError(f"{doc} needs one {begin} ... {end} block")
  with open(doc, "w") as f:
    f.write(text)
  with open(os.path.join(ROOT, "docs", "results", f"prefill_{length}.json"), "w") as f:
    json.dump(results, f, indent=1)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", required=True, help="run directory (created; reruns resume)")
  parser.add_argument("--length", type=int, default=4096)
  parser.add_argument("--passkeys", type=int, default=2,
                      help="passkey prompts per model setting (the first 4 fixed, then seeded)")
  parser.add_argument("--settings", default=",".join(MODEL_SETTINGS),
                      help="model-phase settings (comma-separated names; '' for none)")
  parser.add_argument("--recall_settings", default=",".join(RECALL_SETTINGS),
                      help="recall-phase settings ('' for none)")
  parser.add_argument("--update_docs", action="store_true")
  parser.add_argument("--report_only", action="store_true",
                      help="only rewrite the table / plot (and docs) from <out>/results.json")
  args = parser.parse_args(argv)
  split = lambda s: [x for x in s.split(",") if x]
  for name in split(args.settings) + split(args.recall_settings):
    if name not in SETTINGS:
      parser.error(f"unknown setting {name!r}; known: {', '.join(SETTINGS)}")

  from sparsity_jax.checkpoints import load_pretrained

  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, "results.json")
  results = json.load(open(path)) if os.path.exists(path) else {}
  meta = results.setdefault("_meta", {})
  if not args.report_only and meta.get("length", args.length) != args.length:
    # Its settings' rows were measured at that length: they would be taken as done here.
    parser.error(f"{args.out} holds runs at --length={meta['length']}: use another --out "
                 "(or --report_only to redraw it)")

  def save():
    with open(path + ".tmp", "w") as f:
      json.dump(results, f, indent=1)
    os.replace(path + ".tmp", path)

  def log(msg):
    print(msg, flush=True)

  if not args.report_only:
    base, tokenizer = load_pretrained("smollm2", scan_layers=True)
    tokens, files = text_window(tokenizer, args.length)
    meta.update(length=args.length, files=files, passkeys=passkeys(args.passkeys))
    meta.setdefault("commands", []).append(" ".join(sys.argv))
    tokens = tokens[None]
    recall_phase(base, tokens[:, :args.length], split(args.recall_settings), results, save, log)
    for name in split(args.settings):
      model_phase(base, tokenizer, tokens, name, args, results, save, log)
    save()
  args.length = meta.get("length", args.length)
  body = {k: v for k, v in results.items() if not k.startswith("_")}
  plot(body, os.path.join(args.out, "recall_density.png"), args.length)
  md = table(body, args.length)
  with open(os.path.join(args.out, "prefill.md"), "w") as f:
    f.write(md + "\n")
  print(md)
  if args.update_docs:
    update_docs(args.out, body, args.length)


if __name__ == "__main__":
  main()

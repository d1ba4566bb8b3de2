r"""Dense vs uniform sink + window (StreamingLLM) vs MoA on a pretrained model, long context.

For a pretrained model (default the embedded SmolLM2-135M-Instruct) and one MoA output
directory per budget (``launch/moa.py all --budget=...``), measures per attention variant
and prompt length (``sparsity_jax.evals.long_context``, all generated locally):

  passkey       exact match of the greedy answer (first integer of 12 new tokens) and the
                answer NLL, keys at evenly spread depths;
  kv_retrieval  the same for multi-key needle retrieval (``--kv_needles`` needles per
                haystack, one prompt per needle, depths stratified);
  perplexity    on the first N tokens of long embedded-corpus documents (stdlib sources of
                the validation split), over all N and over the second half;
  KV cache      bytes of the decode caches at N + 12, and the plan's density;
  speed         prefill tokens/s (the shared context, batch 1) and decode tokens/s (batch
                ``--batch`` questions), medians over the haystacks after the first
                (which pays the compilation).

Variants: dense; for each --moa_dirs entry (budget b, sink s from its options.json) the
uniform plan "s sinks + window b*N - s" (KV density exactly b at every N) and the MoA
plan.json. An entry may also be a plan file (e.g. the committed
docs/results/moa_smollm2/plan_50.json): b is the budget in its meta, s its sink, block 64. Prompts are plain text (no chat template: SmolLM2 answers them, it does not
answer the passkey inside its chat template; docs/results/moa.md).

  python benchmarks/moa_long_context.py --moa_dirs=runs/moa_smollm2_50,runs/moa_smollm2_25 \
      --lengths=2048,4096 --out=runs/moa_long_context/moa_smollm2

Writes <out>.json after every cell (a rerun skips finished cells, so the grid can be run in
pieces: --variants, --lengths; a cell records its plan's fingerprint, and a rerun with
another plan under the same name, or other settings or model, is refused), <out>.png
(accuracy by density and by key depth) and prints markdown tables. Lengths, plans and
counts are checked against the model before any cell runs; a plan that keeps more than
its budget at some N (below the lengths it was profiled at) is warned about and not
paired with the uniform window.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import itertools
import json
import os
import re
import tempfile
import time

import jax
import numpy as np

from sparsity_jax.checkpoints.pretrained import open_pretrained
from sparsity_jax.errors import UserError
from sparsity_jax.evals import long_context as lc
from sparsity_jax.layers import moa as moa_layer
from sparsity_jax.moa import plan as plan_lib
from sparsity_jax.moa import validate as validate_lib

TASKS = ("passkey", "kv_retrieval")
# What a cell's numbers depend on besides its plan and length, with the defaults (an older
# results file without a key was run with its default).
SETTINGS = {"passkey": 10, "kv": 50, "kv_needles": 10, "docs": 4, "new_tokens": 12,
            "suffix_len": 48, "seed": 0, "model": "smollm2"}


def variants(cfg, moa_dirs):
  """[(name, plan or None, budget, block_size)]: dense, then uniform and MoA per dir.

  ``cfg`` is the model's ModelConfig. A dir may carry a label, ``path:label`` (default
  "MoA"): the variant is "<label> <budget>"; the uniform plan of a budget is listed once.
  Raises ValueError when two entries would share a name (their cells could not be told
  apart).
  """
  out = [("dense", None, 1.0, 64)]
  for entry in moa_dirs:
    d, _, label = entry.partition(":")
    plan, budget, sink, block = moa_entry(d)
    uniform = plan_lib.uniform_plan(cfg.num_layers, cfg.num_kv_heads, cfg.num_heads,
                                    alpha=-sink, beta=budget, sink=sink,
                                    max_length=int(cfg.max_len), min_window=plan.min_window,
                                    kind="uniform", budget=budget)
    if f"uniform {budget:.0%}" not in [v[0] for v in out]:
      out.append((f"uniform {budget:.0%}", uniform, budget, block))
    name = f"{label or 'MoA'} {budget:.0%}"
    if name in [v[0] for v in out]:
      raise ValueError(f"--moa_dirs: two entries make the variant {name!r}: give each a "
                       "label, path:label")
    out.append((name, plan, budget, block))
  return out


def moa_entry(path: str) -> tuple:
  """(plan, budget, sink, block size) of a launch/moa.py --out dir or of a plan file.

  Raises ValueError, saying what to give, when ``path`` is neither."""
  if os.path.isdir(path):
    for name in ("options.json", "plan.json"):
      if not os.path.exists(os.path.join(path, name)):
        raise ValueError(f"{path} has no {name} (give finished launch/moa.py --out dirs)")
    with open(os.path.join(path, "options.json")) as f:
      opts = json.load(f)
    return (plan_lib.load_plan(os.path.join(path, "plan.json")), float(opts["budget"]),
            int(opts["sink"]), int(opts["block_size"]))
  if not (path.endswith(".json") and os.path.isfile(path)):
    raise ValueError(f"{path} is neither a launch/moa.py --out dir nor a plan .json file")
  plan = plan_lib.load_plan(path)
  budgets = plan.meta.get("budgets") or (  # launch/moa.py's plans; or one budget.
      {"any": plan.meta["budget"]} if "budget" in plan.meta else None)
  sinks = set(np.asarray(plan.sink).ravel().tolist())
  if not budgets or len(sinks) != 1:
    raise ValueError(f"{path}: a plan file needs meta.budgets (or meta.budget) and one sink "
                     "for all heads (launch/moa.py writes both); give its --out dir instead")
  return plan, float(max(budgets.values())), int(sinks.pop()), 64


def documents_of_length(tokenizer, length: int, num: int) -> list[np.ndarray]:
  docs = lc.corpus_documents(tokenizer, min_tokens=length + 1)
  if not docs:
    raise ValueError(f"no corpus document has {length + 1} tokens")
  picks = np.linspace(0, len(docs) - 1, min(num, len(docs))).round().astype(int)
  return [docs[i][:length + 1] for i in picks]


def median_speed(results, key_s, key_tokens):
  firsts = [r for r in results if r[key_tokens] > 0][1:]  # After the compiling group.
  rates = [r[key_tokens] / r[key_s] for r in firsts if r[key_s] > 0]
  return float(np.median(rates)) if rates else None


def run_cell(variant, tok, name, plan, length, prompts, args):
  cell = {"variant": name, "length": length, "plan": plan_fingerprint(plan),
          "started": time.time()}
  results = lc.score_prompts(variant, tok, prompts, new_tokens=args.new_tokens,
                             suffix_len=args.suffix_len, batch_size=args.batch,
                             log=lambda m: print(f"  [{name} @{length}] {m}", flush=True))
  for task in TASKS:
    rows = [r for r in results if r["task"] == task]
    cell[task] = {**lc.summarize(rows), "rows": [
        {k: r[k] for k in ("depth", "answer", "output", "correct", "forced", "answer_nll")}
        for r in rows]}
  cell["prefill_tok_s"] = median_speed(results, "prefill_s", "prefill_tokens")
  kv = [r for r in results if r["task"] == "kv_retrieval"]
  cell["decode_tok_s"] = median_speed(kv, "decode_s", "decode_tokens")
  cell["decode_batch"] = args.batch
  if args.docs:
    nll = lc.document_nll(variant, documents_of_length(tok, length, args.docs))
    cell["ppl"] = float(np.exp(nll.mean()))
    cell["ppl_second_half"] = float(np.exp(nll[:, length // 2:].mean()))
    cell["ppl_docs"] = int(nll.shape[0])
  n_cache = length + args.new_tokens
  cell["cache_bytes"] = moa_layer.cache_bytes(variant.init_cache(1, n_cache))
  cell["density"] = 1.0 if plan is None else plan.density(n_cache)
  cell["seconds"] = time.time() - cell.pop("started")
  return cell


def plan_fingerprint(plan) -> str | None:
  """sha256 of what a plan computes (rules, sinks, floor, heads, max_length; not its meta):
  a cell records it, so a rerun can tell a finished cell from another plan under its name."""
  if plan is None:
    return None
  data = plan.to_json()
  data.pop("meta", None)
  return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def check_grid(cfg, chosen, lengths, new_tokens: int) -> list[str]:
  """Raises ValueError (one line, what to do) for a grid that cannot run on this model:
  prompts past its context, plans of another model or built for shorter lengths. Returns
  warnings: plans that keep more of the KV cache than their budget at some N (below the
  lengths they were profiled at, the window floor and sinks cost more), so that they are
  not compared with the uniform window as if at equal density."""
  context = int(cfg.max_len)
  too_long = [n for n in lengths if n + new_tokens > context]
  if too_long:
    raise ValueError(f"--lengths {too_long} + --new_tokens {new_tokens} exceed the model's "
                     f"context of {context} tokens: use lengths <= {context - new_tokens}")
  warnings = []
  for name, plan, budget, _ in chosen:
    if plan is None:
      continue
    plan.validate(cfg)
    for n in lengths:
      try:
        plan.check_length(n + new_tokens)
      except ValueError as e:
        raise ValueError(f"{name}: {e}") from None
      density = plan.density(n + new_tokens)
      if density > budget + 1e-3:
        warnings.append(f"{name} keeps {density:.3f} of the KV cache at N={n}, over its "
                        f"budget {budget} (built for longer prompts): not at uniform's density")
  return warnings


def build_prompts(tok, lengths, args) -> dict[int, list]:
  """{N: the cell's prompts}, built before any cell runs so a length too short for a task
  fails at once (one line) instead of after the first cells."""
  out = {}
  for n in lengths:
    try:
      out[n] = (lc.make_prompts("passkey", tok, n, args.passkey, seed=args.seed)
                + lc.make_prompts("kv_retrieval", tok, n, args.kv, seed=args.seed,
                                  needles=args.kv_needles))
    except lc.PromptTooShortError as e:
      raise ValueError(f"--lengths: {e}") from None
  return out


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--model", default=SETTINGS["model"], help="smollm2, a .gguf file or an HF dir.")
  p.add_argument("--moa_dirs", default="", help="Comma-separated launch/moa.py --out dirs or "
                 "plan .json files (e.g. docs/results/moa_smollm2/plan_50.json), each "
                 "optionally path:label (the variant is then '<label> <budget>').")
  p.add_argument("--lengths", default="2048,4096", help="Prompt lengths in tokens.")
  p.add_argument("--passkey", type=int, default=SETTINGS["passkey"], help="Passkey prompts per cell.")
  p.add_argument("--kv", type=int, default=SETTINGS["kv"], help="Key-value prompts per cell.")
  p.add_argument("--kv_needles", type=int, default=SETTINGS["kv_needles"], help="Needles (questions) per haystack.")
  p.add_argument("--docs", type=int, default=SETTINGS["docs"], help="Perplexity documents per cell.")
  p.add_argument("--new_tokens", type=int, default=SETTINGS["new_tokens"], help="Greedy tokens per answer.")
  p.add_argument("--suffix_len", type=int, default=SETTINGS["suffix_len"], help="Question tokens per fork.")
  p.add_argument("--batch", type=int, default=5, help="Questions decoded together.")
  p.add_argument("--variants", default="", help="Only these variant names (comma-separated).")
  p.add_argument("--seed", type=int, default=SETTINGS["seed"], help="Prompt seed.")
  p.add_argument("--out", default="runs/moa_long_context/moa_smollm2",
                 help="Results prefix (<out>.json, <out>.png); a rerun resumes it.")
  args = p.parse_args(argv)
  try:
    args.lengths = [int(x) for x in args.lengths.split(",")]
  except ValueError:
    p.error(f"--lengths={args.lengths} must be comma-separated integers")
  if min(args.lengths) < 1 or len(set(args.lengths)) < len(args.lengths):
    p.error(f"--lengths={args.lengths}: give distinct positive token counts")
  for name in ("passkey", "kv", "docs"):
    if getattr(args, name) < 0:
      p.error(f"--{name}={getattr(args, name)} must be >= 0")
  if args.passkey + args.kv + args.docs == 0:
    p.error("--passkey, --kv and --docs are all 0: nothing to measure")
  for name in ("kv_needles", "new_tokens", "suffix_len", "batch"):
    if getattr(args, name) < 1:
      p.error(f"--{name}={getattr(args, name)} must be >= 1")
  if not os.path.basename(args.out):
    p.error(f"--out={args.out} is a prefix (<out>.json, <out>.png), not a directory: "
            "add a name, e.g. --out=runs/eval/pk50")
  args.moa_dirs = [d for d in args.moa_dirs.split(",") if d]
  for entry in args.moa_dirs:  # Before loading the model.
    try:
      moa_entry(entry.partition(":")[0])
    except (ValueError, OSError) as e:
      p.error(f"--moa_dirs: {e}")
  return args


def main(argv=None):
  args = parse_args(argv)
  try:
    run(args)
  except UserError as e:  # Bad checkpoint path or file: one line, as the launchers.
    raise SystemExit(f"error: {e}") from None
  except ValueError as e:  # check_grid, build_prompts, variants.
    raise SystemExit(f"error: {e}") from None


def run(args):
  ckpt = open_pretrained(args.model)
  cfg, tok = ckpt.model_config(), ckpt.tokenizer()
  every = variants(cfg, args.moa_dirs)
  unknown = set(args.variants.split(",")) - {v[0] for v in every} if args.variants else set()
  if unknown:
    raise ValueError(f"--variants: no variant named {sorted(unknown)}; variants: "
                     f"{', '.join(v[0] for v in every)}")
  chosen = [v for v in every if not args.variants or v[0] in args.variants.split(",")]
  for warning in check_grid(cfg, chosen, args.lengths, args.new_tokens):
    print(f"warning: {warning}", flush=True)
  path = args.out + ".json"
  saved = json.load(open(path)) if os.path.exists(path) else {"cells": []}
  settings = {k: getattr(args, k) for k in SETTINGS}
  # A setting added later reads as its default in an older file (they were all run so).
  before = {**{k: SETTINGS[k] for k in SETTINGS}, **saved.get("settings", settings)}
  differ = sorted(k for k in settings if before.get(k) != settings[k])
  if differ:
    raise ValueError(f"{path} was written with other settings ("
                     + ", ".join(f"{k}: {before.get(k)!r} there, {settings[k]!r} now"
                                 for k in differ) + "): use another --out")
  saved["settings"] = settings
  done = {(c["variant"], c["length"]): c for c in saved["cells"]}
  for length in args.lengths:
    for name, plan, _, _ in chosen:
      cell = done.get((name, length))
      # Cells written before fingerprints (the committed JSONs) are taken as they are.
      if cell is not None and cell.get("plan", plan_fingerprint(plan)) != plan_fingerprint(plan):
        raise ValueError(f"{path} holds a {name} @{length} cell of another plan: label this "
                         "one (--moa_dirs=path:label) or use another --out")
  prompts = build_prompts(tok, args.lengths, args)
  model = None  # Loaded for the first cell that is not done (a finished grid only prints).
  with tempfile.TemporaryDirectory() as tmp:
    for length in args.lengths:
      for name, plan, _, block in chosen:
        if (name, length) in done:
          print(f"{name} @{length}: done", flush=True)
          continue
        if model is None:
          model = ckpt.load_model()
        if plan is None:
          variant = model
        else:
          plan_path = os.path.join(tmp, name.replace(" ", "_").replace("%", "") + ".json")
          plan_lib.save_plan(plan, plan_path)
          variant = validate_lib.with_plan(model, plan_path, block_size=block)
        cell = run_cell(variant, tok, name, plan, length, prompts[length], args)
        del variant
        jax.clear_caches()  # Each variant compiles its own programs: free them.
        gc.collect()
        saved["cells"].append(cell)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path + ".tmp", "w") as f:
          json.dump(saved, f, indent=1)
        os.replace(path + ".tmp", path)
        scores = [f"{task} {cell[task]['accuracy']:.2f}" for task in TASKS
                  if "accuracy" in cell[task]]  # A task with no prompts has no score.
        if "ppl" in cell:
          scores.append(f"ppl {cell['ppl']:.3f}")
        print(f"{name} @{length}: {', '.join(scores)} [{cell['seconds']:.0f}s]", flush=True)
  if plot(saved["cells"], args.out + ".png"):
    print(f"plot: {args.out}.png")
  print(table(saved["cells"]))
  print()
  print(answer_kinds(saved["cells"]))
  print()
  print(passkey_table(saved["cells"]))


def _sorted(cells):
  """By length, then density (descending), uniform before MoA variants."""
  natural = lambda name: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]
  rank = lambda c: (c["length"], -round(c["density"], 1), c["variant"] != "dense",
                    not c["variant"].startswith("uniform"), natural(c["variant"]))
  return sorted(cells, key=rank)


def table(cells) -> str:
  head = ["N", "attention", "KV density", "passkey", "kv retrieval", "answer NLL (pk / kv)",
          "ppl (all / 2nd half)", "KV bytes", "prefill tok/s", "decode tok/s"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  fmt = lambda x, f: "-" if x is None else format(x, f)
  for c in _sorted(cells):
    pk, kv = c["passkey"], c["kv_retrieval"]  # Only "rows" for a task with no prompts.
    acc = lambda t: f"{t['accuracy']:.2f} ({t['n']})" if "accuracy" in t else "-"
    lines.append("| " + " | ".join([
        str(c["length"]), c["variant"], f"{c['density']:.3f}", acc(pk), acc(kv),
        f"{fmt(pk.get('answer_nll'), '.3f')} / {fmt(kv.get('answer_nll'), '.3f')}",
        f"{fmt(c.get('ppl'), '.3f')} / {fmt(c.get('ppl_second_half'), '.3f')}",
        f"{c['cache_bytes']:,}", fmt(c["prefill_tok_s"], ".0f"),
        fmt(c["decode_tok_s"], ".1f")]) + " |")
  return "\n".join(lines)


def answer_kinds(cells) -> str:
  """How the greedy answers fail: per cell and task, the fraction right, a wrong number,
  or no number at all in the new tokens (e.g. "a magical ..."), and accuracy by where the
  evidence sits (first / second half of the context)."""
  head = ["N", "attention", "task", "right", "wrong number", "no number",
          "right, evidence in 1st half", "right, evidence in 2nd half"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for c in _sorted(cells):
    for task in TASKS:
      rows = c[task]["rows"]
      if not rows:
        continue
      right = np.mean([r["correct"] for r in rows])
      none = np.mean([lc.first_integer(r["output"]) is None for r in rows])
      halves = [[r["correct"] for r in rows if (r["depth"] >= 0.5) == h] for h in (0, 1)]
      lines.append("| " + " | ".join([
          str(c["length"]), c["variant"], task, f"{right:.2f}", f"{abs(1 - right - none):.2f}",
          f"{none:.2f}"] + [f"{np.mean(h):.2f} ({len(h)})" if h else "-" for h in halves])
          + " |")
  return "\n".join(lines)


def paired_vs_uniform(cells) -> dict[tuple[str, int], tuple[int, int, float]]:
  """{(variant, N): (won, lost, p)} on the passkey against the uniform cell of the same N
  and budget, prompt by prompt (the cells share prompts: same depths, same keys): won =
  prompts it answers and uniform misses, lost = the reverse, p = the exact two-sided
  McNemar test (a binomial test on the discordant pairs; scipy). Cells without a matching
  uniform cell, at another KV density (a plan run below its profiled lengths), or whose
  prompts differ, are left out."""
  from scipy.stats import binomtest
  uniform = {(c["length"], c["variant"].rpartition(" ")[2]): c for c in cells
             if c["variant"].rpartition(" ")[0] == "uniform"}
  out = {}
  for c in cells:
    base = uniform.get((c["length"], c["variant"].rpartition(" ")[2]))
    if (base is None or base is c or c["variant"] == "dense"
        or abs(c["density"] - base["density"]) > 0.01):  # Only at equal KV density.
      continue
    ours, theirs = c["passkey"]["rows"], base["passkey"]["rows"]
    if not ours or [(r["depth"], r["answer"]) for r in ours] != [
        (r["depth"], r["answer"]) for r in theirs]:
      continue
    won = sum(a["correct"] and not b["correct"] for a, b in zip(ours, theirs))
    lost = sum(b["correct"] and not a["correct"] for a, b in zip(ours, theirs))
    out[c["variant"], c["length"]] = (won, lost, binomtest(won, won + lost).pvalue
                                      if won + lost else 1.0)
  return out


def passkey_table(cells) -> str:
  """One row per cell for many-prompt passkey runs: accuracy with its standard error, the
  share answered in words (no number), accuracy by half and by fifth of key depth, the
  teacher-forced answer NLL (nats/token), and the prompt-by-prompt comparison with the
  uniform window of the same budget (`paired_vs_uniform`: won / lost, McNemar p)."""
  head = ["N", "attention", "KV density", "passkey (n)", "std. error", "no number",
          "right, key in 1st / 2nd half", "by depth (fifths)", "answer NLL",
          "vs uniform: won / lost (p)"]
  paired = paired_vs_uniform(cells)
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for c in _sorted(c for c in cells if c["passkey"]["rows"]):
    pk = c["passkey"]
    rows = pk["rows"]
    acc = pk["accuracy"]
    none = np.mean([lc.first_integer(r["output"]) is None for r in rows])
    halves = [np.mean([r["correct"] for r in rows if (r["depth"] >= 0.5) == h] or [np.nan])
              for h in (0, 1)]
    fifths = " ".join("-" if v is None else f"{v:.1f}" if abs(v * 10 - round(v * 10)) < 1e-9
                      else f"{v:.2f}" for v in pk["by_depth"].values())  # 0.25 stays 0.25.
    vs = paired.get((c["variant"], c["length"]))
    lines.append("| " + " | ".join([
        str(c["length"]), c["variant"], f"{c['density']:.3f}", f"{acc:.2f} ({pk['n']})",
        f"{np.sqrt(acc * (1 - acc) / pk['n']):.2f}", f"{none:.2f}",
        " / ".join("-" if np.isnan(h) else f"{h:.2f}" for h in halves), fifths,
        f"{pk['answer_nll']:.3f}",
        "-" if vs is None else f"{vs[0]} / {vs[1]} ({vs[2]:.3f})"]) + " |")
  return "\n".join(lines)


def variant_styles(cells) -> dict[str, dict]:
  """{variant kind: matplotlib color and marker}, distinct for up to 40 kinds; the same in
  every panel. Line styles tell lengths (by density) and budgets (by depth) apart."""
  kinds = sorted({c["variant"].rsplit(" ", 1)[0] for c in cells} - {"dense"})
  markers = itertools.cycle(["o", "s", "^", "D", "v", "P", "*", "h"])
  colors = itertools.cycle([f"C{i}" for i in range(10)])
  return {k: dict(marker="x", color="tab:gray") if k == "uniform"
          else dict(marker=next(markers), color=next(colors)) for k in kinds}


def plot(cells, path) -> bool:
  """Accuracy by density and by key depth (longest N) per task; False (nothing drawn) for
  a grid without passkey or key-value prompts."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  lengths = sorted({c["length"] for c in cells})
  tasks = [t for t in TASKS if any(c[t]["rows"] for c in cells)]  # Tasks with prompts.
  if not tasks:
    return False  # Perplexity only: the tables say it all.
  fig, axes = plt.subplots(2, len(tasks), figsize=(5.5 * len(tasks), 7.5), squeeze=False)
  styles = variant_styles(cells)
  dashes = dict(zip(lengths, itertools.cycle(["-", "--", ":", "-."])))
  cells = [c for c in cells if all(c[t]["rows"] for t in tasks)]
  for col, task in enumerate(tasks):
    ax = axes[0, col]
    for length in lengths:
      dense = [(c["density"], c[task]["accuracy"]) for c in cells
               if c["length"] == length and c["variant"] == "dense"]
      for kind, style in styles.items():
        pts = sorted(dense + [(c["density"], c[task]["accuracy"]) for c in cells
                              if c["length"] == length
                              and c["variant"].rsplit(" ", 1)[0] == kind])
        if len(pts) > len(dense):
          ax.plot(*zip(*pts), label=f"{kind} N={length}", ls=dashes[length], **style)
    ax.set(xlabel="KV-cache density", ylabel="exact match", ylim=(-0.03, 1.03),
           title=f"{task}: accuracy by density (dense at 1.0)")
    if ax.get_legend_handles_labels()[0]:  # A dense-only grid draws no lines here.
      ax.legend(fontsize=7)
    ax = axes[1, col]
    longest = max(lengths)
    budgets = sorted({c["variant"].rpartition(" ")[2] for c in cells if c["variant"] != "dense"},
                     key=lambda b: -float(b.rstrip("%")))
    budget_ls = dict(zip(budgets, itertools.cycle(["-", ":", "-.", "--"])))  # Line per budget.
    for c in _sorted(c for c in cells if c["length"] == longest):
      bins = c[task]["by_depth"]
      xs = [float(k.split("-")[0]) + 0.1 for k, v in bins.items() if v is not None]
      ys = [v for v in bins.values() if v is not None]
      kind, _, budget = c["variant"].rpartition(" ")
      style = styles.get(kind, dict(marker="s", color="black"))
      ax.plot(xs, ys, label=c["variant"], ls=budget_ls.get(budget, "-"), **style)
    ax.set(xlabel="depth of the key in the context", ylabel="exact match", ylim=(-0.03, 1.03),
           title=f"{task}: by key depth at N={longest}")
    if ax.get_legend_handles_labels()[0]:  # A dense-only grid draws no lines here.
      ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return True


if __name__ == "__main__":
  main()

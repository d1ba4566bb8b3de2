"""benchmarks/moa_long_context.py and moa_streaming_tradeoff.py on the tiny HF model: what
a rerun may reuse, and the one-line refusals that come before any cell runs."""

import importlib.util
import json
import os
import re

import numpy as np
import pytest

from sparsity_jax.moa import plan as plan_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "tests", "fixtures", "hf", "llama")  # 2 layers, 2 KV / 4 q heads.


def _bench(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "benchmarks",
                                                                   name + ".py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def long_context():
  return _bench("moa_long_context")


def _plan_file(path, beta, *, layers=2, kv=2, heads=4, max_length=512, budget=0.5):
  """A plan file as launch/moa.py writes it (meta.budgets, one sink)."""
  rng = np.random.default_rng()
  plan = plan_lib.Plan(alpha=np.zeros((layers, kv)), beta=np.full((layers, kv), beta)
                       + rng.uniform(0, 1e-3, (layers, kv)),
                       sink=np.full((layers, kv), 4, np.int64), num_heads=heads,
                       max_length=max_length, min_window=4,
                       meta={"budgets": {str(max_length): budget}})
  plan_lib.save_plan(plan, str(path))
  return str(path)


def _argv(out, *extra):
  return [f"--model={TINY}", "--lengths=256", "--passkey=1", "--kv=0", "--docs=0",
          "--batch=1", f"--out={out}", *extra]


def test_long_context_rerun_reuses_only_cells_of_the_same_plan_and_model(tmp_path, capsys,
                                                                          long_context):
  """A finished cell is reused only for the same plan (fingerprint) and settings (model
  included); another plan under the same label, or another model, is refused in one line
  before anything runs, and the results file is left as it was."""
  first = _plan_file(tmp_path / "a.json", 0.4)
  out = str(tmp_path / "grid")
  only = "--variants=MoA 50%"  # One cell per run keeps the test fast.
  long_context.main(_argv(out, f"--moa_dirs={first}", only))
  saved = json.load(open(out + ".json"))
  assert [c["variant"] for c in saved["cells"]] == ["MoA 50%"]
  assert saved["cells"][0]["plan"] == long_context.plan_fingerprint(plan_lib.load_plan(first))
  capsys.readouterr()
  long_context.main(_argv(out, f"--moa_dirs={first}", only))  # Same plan: reused.
  assert capsys.readouterr().out.count("MoA 50% @256: done") == 1
  other = _plan_file(tmp_path / "b.json", 0.3)
  for argv, message in [
      (_argv(out, f"--moa_dirs={other}", only), "holds a MoA 50% @256 cell of another plan"),
      ([a.replace(TINY, "smollm2") for a in _argv(out)] + ["--variants=dense"],
       "model: '.*llama' there, 'smollm2' now"),
      (_argv(out, "--seed=3"), "seed: 0 there, 3 now")]:
    with pytest.raises(SystemExit, match=message):
      long_context.main(argv)
  assert json.load(open(out + ".json")) == saved
  long_context.main(_argv(out, f"--moa_dirs={first},{other}:Other", "--variants=Other 50%"))
  assert [c["variant"] for c in json.load(open(out + ".json"))["cells"]] == [
      "MoA 50%", "Other 50%"]  # Labelled: a new variant beside the first.


def test_long_context_refuses_a_grid_it_cannot_run_before_any_cell(tmp_path, capsys,
                                                                  long_context):
  """Prompts past the context, a plan of another model or built for shorter prompts, two
  plans under one name, a length too short for the task, bad counts: one line each, no
  results file."""
  good = _plan_file(tmp_path / "good.json", 0.4)
  short = _plan_file(tmp_path / "short.json", 0.4, max_length=128)
  wide = _plan_file(tmp_path / "wide.json", 0.4, kv=3, heads=9)
  out = str(tmp_path / "grid")
  for extra, message in [
      (["--lengths=505"], r"\[505\] \+ --new_tokens 12 exceed the model's context of 512 "
       "tokens: use lengths <= 500"),
      ([f"--moa_dirs={wide}"], "plan does not match the model: plan has 3 KV heads"),
      ([f"--moa_dirs={short}"], "MoA 50%: length 268 is beyond the plan's max_length=128"),
      ([f"--moa_dirs={good},{good}"], "two entries make the variant 'MoA 50%'"),
      (["--lengths=20"], "--lengths: passkey prompts need at least"),
      (["--lengths=256,256"], "give distinct positive token counts"),
      (["--passkey=0"], "all 0: nothing to measure"),
      (["--batch=0"], "--batch=0 must be >= 1"),
      (["--model=/nope.gguf"], "'/nope.gguf' not found"),
      ([f"--out={tmp_path}/"], "is a prefix"),
      (["--moa_dirs=" + str(tmp_path / "none.json")], "neither a launch/moa.py --out dir")]:
    argv = _argv(out, *extra)
    if extra[0].startswith(("--model", "--out")):
      argv = [a for a in argv if not a.startswith(extra[0].split("=")[0] + "=")] + extra
    capsys.readouterr()
    with pytest.raises(SystemExit) as raised:
      long_context.main(argv)
    # argparse prints its error and exits with 2; the later checks exit with the message.
    code = raised.value.code
    text = capsys.readouterr().err if code == 2 else str(code)
    assert re.search(message, text) and len(text.strip().splitlines()[-1]) > 20, (extra, text)
    assert not os.path.exists(out + ".json"), extra


def test_a_plan_over_its_budget_is_flagged_and_not_paired_with_uniform(long_context):
  """Below the lengths it was profiled at, a plan may keep more than its budget (sinks and
  the window floor): check_grid warns, and paired_vs_uniform leaves it out."""

  class Cfg:
    num_layers, num_kv_heads, num_heads, max_len = 2, 2, 4, 512

  over = plan_lib.uniform_plan(2, 2, 4, alpha=100, beta=0.5, sink=4, max_length=512)
  fine = plan_lib.uniform_plan(2, 2, 4, alpha=-4, beta=0.5, sink=4, max_length=512)
  warnings = long_context.check_grid(Cfg, [("dense", None, 1.0, 64), ("A 50%", over, 0.5, 64),
                                           ("B 50%", fine, 0.5, 64)], [128, 400], 12)
  assert len(warnings) == 2 and all(w.startswith("A 50% keeps ") for w in warnings)
  rows = [{"depth": 0.5, "answer": "1", "correct": True}]
  cell = lambda name, density: {"variant": name, "length": 128, "density": density,
                                "passkey": {"rows": rows}}
  paired = long_context.paired_vs_uniform([cell("uniform 50%", 0.5), cell("A 50%", 0.7),
                                           cell("B 50%", 0.5)])
  assert set(paired) == {("B 50%", 128)}


def test_streaming_tradeoff_takes_the_model_heads_and_keeps_its_plans(tmp_path, capsys):
  """moa_streaming_tradeoff reads the heads from --model, refuses scores of another shape,
  k = 0 or a k twice, and an --out whose plans came from other scores (before writing:
  the plans there stay those its cells were run with)."""
  bench = _bench("moa_streaming_tradeoff")

  def gates(path, values):
    path.write_text(json.dumps({"gates": values}))
    return str(path)

  first = gates(tmp_path / "g1.json", [[0.9, 0.1], [0.2, 0.3]])
  out = str(tmp_path / "st")
  argv = lambda scores, *extra: [f"--scores={scores}", f"--model={TINY}", "--budgets=0.5",
                                 "--length=256", "--passkey=1", f"--out={out}", *extra]
  bench.main(argv(first, "--ks=1"))
  cells = json.load(open(out + ".json"))["cells"]
  assert [c["variant"] for c in cells] == ["dense", "uniform 50%", "Duo-k1 50%"]
  plan = plan_lib.load_plan(os.path.join(out + "_plans", "streaming_50_k1.json"))
  assert plan.num_heads == 4 and plan.capacities(256)[0, 0] == 256  # The best head whole.
  before = open(os.path.join(out + "_plans", "streaming_50_k1.json")).read()
  for scores, extra, message in [
      (gates(tmp_path / "g2.json", [[0.1, 0.9], [0.2, 0.3]]), "--ks=1", "holds another plan"),
      (gates(tmp_path / "g3.json", [[0.1, 0.9, 0.5]] * 2), "--ks=1",
       "scores 2 layers x 3 KV heads, but .* has 2 x 2"),
      (first, "--ks=0", r"each must be in \[1, 4\]"),
      (first, "--ks=1,1", "list each value once")]:
    capsys.readouterr()
    with pytest.raises(SystemExit):
      bench.main(argv(scores, extra))
    assert re.search(message, capsys.readouterr().err), (extra, message)
  assert open(os.path.join(out + "_plans", "streaming_50_k1.json")).read() == before


def test_committed_plan_files_stand_for_their_runs(long_context):
  """Every committed plan file under docs/results/moa_smollm2 is a valid --moa_dirs entry
  (launch/moa.py's meta.budgets, or the uniform plans' meta.budget) whose plan keeps its
  budget at 2k and 4k."""
  folder = os.path.join(ROOT, "docs", "results", "moa_smollm2")
  names = [n for n in sorted(os.listdir(folder))
           if n.startswith(("plan_", "uniform_")) and n.endswith(".json")]
  assert len(names) >= 10
  for name in names:
    plan, budget, sink, block = long_context.moa_entry(os.path.join(folder, name))
    assert (sink, block) == (64, 64) and budget in (0.25, 0.5), name
    assert all(plan.density(n + 12) <= budget + 2e-3 for n in (2048, 4096)), name

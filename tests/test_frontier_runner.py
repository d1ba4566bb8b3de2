"""The Sparse Frontier runner and report: a tiny grid end to end, resuming, the test."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx
from support import ROOT, subprocess_env

from sparsity_jax.data.tokenizer import ByteTokenizer
from sparsity_jax.evals.frontier import report, runner
from sparsity_jax.models import ModelConfig, TransformerLM, generation

SETTINGS = {
    "dense": {"kind": "dense"},
    "quest_64": {"kind": "quest", "token_budget": 64, "page_size": 16},
    "vertical_slash_64": {"kind": "vertical_slash", "vertical_size": 64, "slash_size": 64,
                          "last_q": 64},
}
GRID = dict(tasks=["passkey"], lengths=[700], num_samples=2, seed=5, task_options={},
            progress=False, log=lambda m: None)


@pytest.fixture(scope="module")
def tiny():
  cfg = ModelConfig(vocab_size=260, num_layers=2, d_model=32, num_heads=4, num_kv_heads=2,
                    head_dim=8, mlp_dim=64, max_len=2048, scan_layers=True)
  return TransformerLM(cfg, rngs=nnx.Rngs(0)), ByteTokenizer()


@pytest.fixture
def counted(monkeypatch):
  calls = []
  real = generation.generate

  def generate(*args, **kwargs):
    calls.append(1)
    return real(*args, **kwargs)

  monkeypatch.setattr(generation, "generate", generate)
  return calls


def test_tiny_grid_runs_resumes_and_reports(tiny, tmp_path, counted):
  model, tok = tiny
  out = str(tmp_path / "grid")
  settings = runner.parse_settings(SETTINGS)
  rows = runner.run_grid(model, tok, settings=settings, out=out, **GRID)
  assert len(rows) == len(counted) == len(SETTINGS) * 2
  by = {(r["setting"], r["index"]): r for r in rows}
  for r in rows:
    assert r["score"] in (0.0, 1.0) and r["prompt_tokens"] == 700
  assert by[("dense", 0)]["compression"] == 1.0
  for name in ("quest_64", "vertical_slash_64"):  # Each really compressed.
    assert by[(name, 0)]["compression"] > 1.5, by[(name, 0)]
  assert by[("quest_64", 0)]["phase"] == "decode" and by[("vertical_slash_64", 0)][
      "phase"] == "prefill"

  # Rerun: nothing to do. Interrupted (last row torn, one row lost): only that one redone.
  counted.clear()
  runner.run_grid(model, tok, settings=settings, out=out, **GRID)
  assert counted == []
  path = os.path.join(out, "results.jsonl")
  lines = open(path).read().splitlines()
  with open(path, "w") as f:
    f.write("\n".join(lines[:-1]) + "\n" + lines[-1][:20])
  rows = runner.run_grid(model, tok, settings=settings, out=out, **GRID)
  assert len(counted) == 1 and len(rows) == len(SETTINGS) * 2

  # Another seed, model or task options, a changed setting under the same name, or a
  # renamed baseline would mix incomparable rows.
  with pytest.raises(ValueError, match="another --out"):
    runner.run_grid(model, tok, settings=settings, out=out, **{**GRID, "seed": 6})
  with pytest.raises(ValueError, match="another --out"):
    runner.run_grid(model, tok, settings=settings, out=out, model_name="other", **GRID)
  with pytest.raises(ValueError, match="another --out"):
    runner.run_grid(model, tok, settings=settings, out=out,
                    **{**GRID, "task_options": {"passkey": {"explain": True}}})
  changed = runner.parse_settings({**SETTINGS, "quest_64": {"kind": "quest",
                                                             "token_budget": 32}})
  with pytest.raises(ValueError, match="new name"):
    runner.run_grid(model, tok, settings=changed, out=out, **GRID)
  renamed = runner.parse_settings({"baseline": {"kind": "dense"}})
  with pytest.raises(ValueError, match="baseline's name"):
    runner.run_grid(model, tok, settings=renamed, out=out, **GRID)
  # A setting without rows may change; a task may be added (nothing to run: 0 samples).
  runner.run_grid(model, tok, settings=runner.parse_settings(
      {"dense": {"kind": "dense"}, "unused": {"kind": "quest", "token_budget": 32}}), out=out,
      **{**GRID, "num_samples": 0})
  runner.run_grid(model, tok, settings=runner.parse_settings(
      {"dense": {"kind": "dense"}, "unused": {"kind": "quest", "token_budget": 48}}), out=out,
      **{**GRID, "num_samples": 0, "tasks": ["passkey", "kv_retrieval"]})

  md = report.write_report(rows, out, model_cfg=model.cfg, settings=SETTINGS)
  text = open(md).read()
  assert "quest_64" in text and "max compression" in text
  assert "x ?)" in text  # 2 prompts: no loss could be significant, so nothing is claimed.
  for png in ("prefill_700.png", "decode_700.png", "flops.png"):
    assert os.path.getsize(os.path.join(out, png)) > 1000
  summary = json.load(open(os.path.join(out, "summary.json")))
  flops = {c["setting"]: c["flops"] for c in summary["cells"]}
  assert flops["quest_64"]["decode"] < flops["dense"]["decode"]
  assert flops["vertical_slash_64"]["prefill"] < flops["dense"]["prefill"]


def test_sign_test_and_max_compression():
  assert report.sign_test([1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]) == 1.0
  # Dense right on 6 prompts where the method is wrong: p = 0.5 ** 6.
  assert report.sign_test([1] * 6 + [0] * 4, [0] * 6 + [0] * 4) == pytest.approx(0.5 ** 6)
  assert report.sign_test([0, 0, 1], [1, 1, 0]) > 0.5  # The method is better: no loss.
  rows = []
  for setting, kind, comp, scores in (("dense", "dense", 1.0, [1] * 8),
                                      ("q4", "quest", 4.0, [1] * 7 + [0]),
                                      ("q16", "quest", 16.0, [0] * 8)):
    rows += [{"setting": setting, "kind": kind, "phase": "dense" if kind == "dense" else "decode",
              "task": "t", "length": 8, "index": i, "score": s, "compression": comp,
              "sparsity": 1 - 1 / comp, "prompt_tokens": 8, "new_tokens": 2, "seconds": 0.1}
             for i, s in enumerate(scores)]
  cells = {c["setting"]: c for c in report.summarize(rows)}
  assert cells["q4"]["retains"] is True and cells["q16"]["retains"] is False
  assert cells["q16"]["p_value"] == pytest.approx(0.5 ** 8)
  assert report.max_compression(cells.values()) == {("quest", "t", 8): 4.0}
  # Four prompts cannot show a loss (0.5 ** 4 > 0.05): untested, not "retains".
  few = [r for r in rows if r["index"] < 4]
  assert all(c["retains"] is None for c in report.summarize(few) if c["phase"] != "dense")
  assert report.max_compression(report.summarize(few)) == {}
  with pytest.raises(ValueError, match="several dense"):
    report.summarize(rows + [{**rows[0], "setting": "dense2"}])


def test_report_plots_score_by_length(tmp_path):
  rows = [{"setting": s, "kind": s, "phase": "dense" if s == "dense" else "decode", "task": t,
           "length": n, "index": i, "score": float(i % 2), "compression": 1.0 if s == "dense"
           else 4.0, "sparsity": 0.0, "prompt_tokens": n, "new_tokens": 2, "seconds": 0.1}
          for s in ("dense", "quest") for t in ("a", "b") for n in (8, 16) for i in range(6)]
  report.write_report(rows, str(tmp_path))
  assert os.path.getsize(tmp_path / "lengths.png") > 1000
  assert "lengths.png" in (tmp_path / "report.md").read_text()
  report.write_report([r for r in rows if r["length"] == 8], str(tmp_path / "one"))
  assert not (tmp_path / "one" / "lengths.png").exists()  # One length: nothing to plot.
  # An interrupted cell (4 of the column's 6 prompts) is marked in the main table.
  partial = [r for r in rows if not (r["setting"] == "quest" and r["task"] == "a"
                                     and r["length"] == 16 and r["index"] >= 4)]
  table = report.markdown(report.summarize(partial), ["dense", "quest"])
  quest = next(line for line in table.splitlines() if line.startswith("| quest |"))
  assert quest.count("[4/6]") == 1 and "[" not in table.splitlines()[2]  # dense: complete.
  # A setting's variant suffix draws its own line; budgets of one method share one.
  series = {s: report._series({"kind": k, "setting": s}) for k, s in [
      ("snapkv", "snapkv_512_w32"), ("snapkv", "snapkv_512"), ("flexprefill", "flexprefill_g90"),
      ("vertical_slash", "vertical_slash_256_128_q64"), ("vertical_slash", "vertical_slash_64_64")]}
  assert series == {"snapkv_512_w32": "snapkv w32", "snapkv_512": "snapkv",
                    "flexprefill_g90": "flexprefill",
                    "vertical_slash_256_128_q64": "vertical_slash q64",
                    "vertical_slash_64_64": "vertical_slash"}


def test_score_by_depth_bins_rows():
  rows = [{"setting": s, "phase": "dense" if s == "dense" else "decode", "task": "t",
           "length": 8, "index": i, "score": float(s == "dense" or i >= 2)}
          for s in ("dense", "w") for i in range(4)]
  depths = {("t", 8, 0): 0.0, ("t", 8, 1): 0.3, ("t", 8, 2): 0.6, ("t", 8, 3): 1.0}
  table = report.score_by_depth(rows, depths, bins=2)[("t", 8)]
  assert table["bins"] == [(0.0, 0.5), (0.5, 1.0)] and table["dense"] == "dense"
  assert table["settings"]["w"] == [{"score": 0.0, "n": 2}, {"score": 1.0, "n": 2}]
  assert table["settings"]["dense"] == [{"score": 1.0, "n": 2}, {"score": 1.0, "n": 2}]
  assert report.score_by_depth(rows, {}, bins=2) == {}  # No depths: nothing to bin.
  # Edges go to the bin they start (0.6 * 5 is 3 in floats too), empty bins score None.
  table = report.score_by_depth(rows[:1], {("t", 8, 0): 0.6}, bins=5)[("t", 8)]
  assert [c["n"] for c in table["settings"]["dense"]] == [0, 0, 0, 1, 0]
  assert table["settings"]["dense"][0]["score"] is None
  with pytest.raises(ValueError, match=r"not in \[0, 1\]"):
    report.score_by_depth(rows[:1], {("t", 8, 0): 1.5})


def test_frontier_depth_script_rebuilds_the_prompts(tmp_path):
  """benchmarks/frontier_depth.py joins a run's rows to its rebuilt prompts' depths, and
  refuses rows its grid.json does not describe."""
  from sparsity_jax.checkpoints.hf_tokenizer import HFTokenizer
  from sparsity_jax.evals import frontier

  model = os.path.join(ROOT, "tests", "fixtures", "hf", "llama")
  samples = frontier.make_samples("passkey", HFTokenizer.from_dir(model), 400, num_samples=4,
                                  seed=7, chat=False)
  run = tmp_path / "run"
  run.mkdir()
  (run / "grid.json").write_text(json.dumps({"model": model, "seed": 7, "chat": False,
                                             "task_options": {"passkey": {}}}))
  rows = [{"setting": s, "kind": s, "phase": "dense" if s == "dense" else "decode",
           "task": "passkey", "length": 400, "index": i, "prompt_tokens": len(x.tokens),
           "gold": x.gold, "score": float(s == "dense" or x.meta["depths"][0] >= 0.5)}
          for s in ("dense", "quest") for i, x in enumerate(samples)]
  (run / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  import importlib.util

  spec = importlib.util.spec_from_file_location(
      "frontier_depth", os.path.join(ROOT, "benchmarks", "frontier_depth.py"))
  script = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(script)
  script.main([f"--run={run}", "--bins=2"])
  table, = json.loads((run / "depth.json").read_text())
  late = sum(x.meta["depths"][0] >= 0.5 for x in samples)
  assert table["settings"]["quest"] == [{"score": 0.0 if late < 4 else None, "n": 4 - late},
                                        {"score": 1.0 if late else None, "n": late}]
  assert (run / "depth.png").stat().st_size > 1000 and "passkey @ 400" in (
      run / "depth.md").read_text()
  (run / "grid.json").write_text(json.dumps({"model": model, "seed": 8, "chat": False}))
  with pytest.raises(ValueError, match="grid.json does not describe these rows"):
    script.main([f"--run={run}"])


def test_frontier_config_refuses_runlocal_with_extras():
  import importlib.util

  spec = importlib.util.spec_from_file_location("frontier_cfg",
                                                os.path.join(ROOT, "configs", "frontier.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  with pytest.raises(ValueError, match="smoke grid of its own"):
    module.get_config("runlocal,moa")
  with pytest.raises(ValueError, match="got \\['mao'\\]"):
    module.get_config("moa,mao")


@pytest.mark.parametrize("arg", [None, "runlocal", "moa,windows"])
def test_frontier_config_is_valid(arg):
  """configs/frontier.py: one dense setting, known kinds and tasks, valid task options,
  and every setting builds its attention core."""
  import importlib.util

  from sparsity_jax.evals import frontier
  from sparsity_jax.evals.frontier import base
  from sparsity_jax.layers.attention import make_attention_core

  spec = importlib.util.spec_from_file_location("frontier_cfg",
                                                os.path.join(ROOT, "configs", "frontier.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config(arg)
  cwd = os.getcwd()
  try:
    os.chdir(ROOT)
    settings = runner.parse_settings({k: dict(v) for k, v in c.settings.items()})
  finally:
    os.chdir(cwd)
  assert set(c.tasks) <= set(frontier.TASKS + frontier.EXTRA_TASKS)
  for task, options in c.task_options.items():
    base.resolve_options(task, dict(options))
  for s in settings:  # SmolLM2's head layout (MoA plans are for its 30 layers).
    cfg = ModelConfig(vocab_size=260, num_layers=30, d_model=32, num_heads=9, num_kv_heads=3,
                      head_dim=8, mlp_dim=64, max_len=4096, attention=s.attention,
                      scan_layers=s.kind != "moa")
    with_root = os.getcwd()
    try:
      os.chdir(ROOT)  # Plan paths are relative to the repository root.
      make_attention_core(cfg, 0, nnx.Rngs(0))
    finally:
      os.chdir(with_root)
  if arg == "moa":
    assert {s.method for s in settings} >= {"moa", "uniform"}


def test_moa_and_uniform_settings_report_their_kv_fraction(tmp_path):
  """A uniform sink + window plan runs in the grid as method 'uniform' (phase 'both'),
  with compression = keys read / keys seen at the last decode step."""
  from sparsity_jax.moa import plan as plan_lib

  cfg = ModelConfig(vocab_size=260, num_layers=2, d_model=32, num_heads=4, num_kv_heads=2,
                    head_dim=8, mlp_dim=64, max_len=1024, scan_layers=False)
  plan = plan_lib.uniform_plan(2, 2, 4, alpha=-16, beta=0.25, sink=16, max_length=1024,
                               min_window=16, kind="uniform")
  path = str(tmp_path / "uniform.json")
  plan_lib.save_plan(plan, path)
  settings = runner.parse_settings({"dense": {"kind": "dense"},
                                    "u25": {"kind": "moa", "plan": path, "block_size": 16}})
  assert [(s.phase, s.method) for s in settings] == [("dense", "dense"), ("both", "uniform")]
  rows = runner.run_grid(TransformerLM(cfg, rngs=nnx.Rngs(0)), ByteTokenizer(),
                         settings=settings, out=str(tmp_path / "g"),
                         **{**GRID, "lengths": [600], "num_samples": 1})
  u = [r for r in rows if r["setting"] == "u25"][0]
  assert u["kind"] == "uniform" and 3.0 < u["compression"] < 4.5, u


def test_parse_settings_needs_one_dense_and_known_kinds():
  with pytest.raises(ValueError, match="exactly one dense"):
    runner.parse_settings({"q": {"kind": "quest"}})
  with pytest.raises(ValueError, match="neither a prefill"):
    runner.parse_settings({"dense": {"kind": "dense"}, "r": {"kind": "routing"}})


def test_launcher_refuses_unknown_settings_before_loading_a_model(tmp_path):
  cmd = [sys.executable, os.path.join(ROOT, "launch", "frontier.py"),
         "--config=" + os.path.join(ROOT, "configs", "frontier.py"), f"--out={tmp_path}",
         "--only=quest_999"]
  done = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=120)
  assert done.returncode == 2 and "quest_999" in done.stderr, done.stderr
  np.testing.assert_equal(os.listdir(tmp_path), [])


def test_a_config_file_that_rejects_its_arg_is_one_line_without_its_traceback(tmp_path):
  """ml_collections puts the config file's traceback in the flag error; the launcher keeps
  only the exception line (configs/frontier.py:runlocals, a typo of runlocal)."""
  run = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "frontier.py"),
                        f"--config={os.path.join(ROOT, 'configs', 'frontier.py')}:runlocals",
                        f"--out={tmp_path / 'x'}"], env=subprocess_env(), cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
  assert run.returncode == 2, run.stderr[-2000:]
  lines = run.stderr.strip().splitlines()
  assert len(lines) == 1 and "Traceback" not in lines[0] and 'File "' not in lines[0], lines
  assert "takes 'moa', 'windows', 'runlocal'" in lines[0] and "got ['runlocals']" in lines[0]
  assert not (tmp_path / "x").exists()

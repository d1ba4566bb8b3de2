"""The launchers as a user runs them: kill/resume, 2 processes, flag errors."""

import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

from support import ROOT, subprocess_env
from sparsity_jax.train.metrics import read_jsonl

TINY = ["--config=" + os.path.join(ROOT, "configs", "lm_tiny.py") + ":runlocal",
        "--config.model.d_model=32", "--config.model.mlp_dim=64", "--config.data.seq_len=32",
        "--config.eval.every=0", "--config.train.log_every=1"]


def _train_cmd(workdir, *extra):
  return [sys.executable, os.path.join(ROOT, "launch", "train.py"), f"--workdir={workdir}",
          *TINY, *extra]


def _final_params(workdir, step):
  path = os.path.join(workdir, "checkpoints", str(step), "state")
  restored = ocp.StandardCheckpointer().restore(path)
  leaves = []

  def walk(node):
    if isinstance(node, dict):
      for key in sorted(node):
        walk(node[key])
    else:
      leaves.append(np.asarray(node))

  walk(restored["params"])
  return leaves


@pytest.mark.slow
def test_sigkill_then_rerun_matches_uninterrupted(tmp_path):
  steps = ["--config.train.steps=60", "--config.train.checkpoint_every=5",
           "--config.train.keep_checkpoints=2"]
  killed = str(tmp_path / "killed")
  proc = subprocess.Popen(_train_cmd(killed, *steps), env=subprocess_env(), cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  ckpt_dir = os.path.join(killed, "checkpoints")
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    done = [d for d in os.listdir(ckpt_dir) if d.isdigit()] if os.path.exists(ckpt_dir) else []
    if any(int(d) >= 10 for d in done):
      break
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.communicate()
  assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"

  resumed = subprocess.run(_train_cmd(killed, *steps), env=subprocess_env(), cwd=ROOT,
                           capture_output=True, text=True, timeout=600)
  assert resumed.returncode == 0, resumed.stdout + resumed.stderr
  assert "Resumed" in resumed.stdout

  clean = str(tmp_path / "clean")
  full = subprocess.run(_train_cmd(clean, *steps), env=subprocess_env(), cwd=ROOT,
                        capture_output=True, text=True, timeout=600)
  assert full.returncode == 0, full.stdout + full.stderr
  for a, b in zip(_final_params(killed, 60), _final_params(clean, 60), strict=True):
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_sigterm_checkpoints_then_resumes(tmp_path, sig):
  """The training loop's own handler checkpoints on SIGTERM and SIGINT (exit 3): no
  KeyboardInterrupt reaches cli.run's one-line Ctrl-C exit (130)."""
  workdir = str(tmp_path / "run")
  steps = ["--config.train.steps=100000", "--config.train.checkpoint_every=100000"]
  proc = subprocess.Popen(_train_cmd(workdir, *steps), env=subprocess_env(), cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  metrics = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    if os.path.exists(metrics) and len(read_jsonl(metrics)) >= 3:
      break
    time.sleep(0.05)
  proc.send_signal(sig)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 3, err
  match = re.search(r"checkpoint saved at step (\d+)", err)
  assert match, err
  saved = int(match.group(1))
  assert os.listdir(os.path.join(workdir, "checkpoints")) == [str(saved)]
  resumed = subprocess.run(_train_cmd(workdir, f"--config.train.steps={saved + 2}"),
                           env=subprocess_env(), cwd=ROOT, capture_output=True, text=True,
                           timeout=300)
  assert resumed.returncode == 0, resumed.stderr
  assert f"from step {saved}" in resumed.stdout


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_single_process(tmp_path):
  steps = ["--config.train.steps=5", "--config.train.checkpoint_every=5"]
  port = _free_port()
  multi = str(tmp_path / "multi")
  procs = [subprocess.Popen(
      _train_cmd(multi, *steps, f"--coordinator_address=localhost:{port}", "--num_processes=2",
                 f"--process_id={i}"),
      env=subprocess_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(2)]
  outputs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out
  assert "2 devices, 2 processes" in outputs[0]

  single = str(tmp_path / "single")
  run = subprocess.run(_train_cmd(single, *steps), env=subprocess_env(), cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stdout + run.stderr
  loss = lambda w: [r["train/loss"] for r in read_jsonl(os.path.join(w, "metrics.jsonl"))
                    if "train/loss" in r]
  assert len(loss(multi)) == 5
  np.testing.assert_allclose(loss(multi), loss(single), rtol=2e-5, atol=2e-5)


def _one_line_error(cmd):
  run = subprocess.run(cmd, env=subprocess_env(), cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
  assert run.returncode == 2, run.stdout + run.stderr
  lines = run.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), run.stderr
  return lines[0]


def test_user_errors_are_one_line_and_write_nothing(tmp_path):
  """A user's mistake prints one line, not a traceback or the whole flag help."""
  workdir = tmp_path / "run"
  line = _one_line_error(_train_cmd(str(workdir), "--config.model.num_layerz=3"))
  assert 'Did you mean "num_layers"' in line and "\\" not in line  # The hint, unescaped.
  line = _one_line_error(_train_cmd(str(workdir), "--config.model.attention.kind=sparce"))
  assert "'sparce' is unknown" in line and "dense" in line
  # A config number out of range: one line before the workdir exists (it left an empty
  # checkpoints/ and a traceback).
  line = _one_line_error(_train_cmd(str(workdir), "--config.data.seq_len=0"))
  assert line == "error: config.data.seq_len=0 must be >= 1"
  missing = os.path.join(ROOT, "configs", "lm_tinny.py")
  line = _one_line_error([sys.executable, os.path.join(ROOT, "launch", "train.py"),
                          f"--config={missing}", f"--workdir={workdir}"])
  assert "lm_tinny.py: no such file" in line
  line = _one_line_error([sys.executable, os.path.join(ROOT, "launch", "moa.py"),
                          f"--out={tmp_path / 'moa'}"])
  assert "usage: moa.py <calibrate|" in line
  line = _one_line_error([sys.executable, os.path.join(ROOT, "launch", "moa.py"), "all",
                          f"--out={tmp_path / 'moa'}", "--model=smollm2",
                          "--full_span_layers=24-20"])  # Reversed: not an empty layer set.
  assert "--full_span_layers=24-20 must be layer numbers and ascending ranges" in line
  assert not workdir.exists()


def test_ctrl_c_is_one_line_with_exit_status_130(tmp_path, monkeypatch, capsys):
  """cli.run (every launcher): Ctrl-C prints one line, no traceback, and exits 130; with
  SPARSITY_JAX_TRACEBACK=1 the KeyboardInterrupt goes on. Other exits are unchanged."""
  from sparsity_jax import cli

  def interrupted(argv):
    del argv
    raise KeyboardInterrupt

  monkeypatch.setattr(cli.app, "run", lambda main, flags_parser: main(["fake"]))
  monkeypatch.delenv("SPARSITY_JAX_TRACEBACK", raising=False)
  with pytest.raises(SystemExit) as e:
    cli.run(interrupted)
  assert e.value.code == 130
  assert capsys.readouterr().err == "interrupted; rerun the same command to resume\n"
  monkeypatch.setenv("SPARSITY_JAX_TRACEBACK", "1")
  with pytest.raises(KeyboardInterrupt):
    cli.run(interrupted)

  def preempted(argv):  # As launch/train.py after its own SIGTERM/SIGINT checkpoint.
    del argv
    sys.exit(3)

  with pytest.raises(SystemExit) as e:
    cli.run(preempted)
  assert e.value.code == 3
  # A real SIGINT to a launcher process, as Ctrl-C sends it.
  script = tmp_path / "fake_launcher.py"
  script.write_text("import time\nfrom sparsity_jax import cli\n\n\ndef main(argv):\n"
                    "  print('ready', flush=True)\n  time.sleep(120)\n\n\ncli.run(main)\n")
  env = {k: v for k, v in subprocess_env().items() if k != "SPARSITY_JAX_TRACEBACK"}
  proc = subprocess.Popen([sys.executable, str(script)], env=env, cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == 130 and err == "interrupted; rerun the same command to resume\n"


def test_workdir_of_a_start_that_never_checkpointed_takes_a_corrected_config(tmp_path):
  """A start that failed before its first checkpoint left only its config.json: the
  corrected command may start there; once a checkpoint exists, the model must match."""
  from sparsity_jax.train import checkpoint as ckpt_lib
  workdir = str(tmp_path / "run")
  os.makedirs(workdir)
  ckpt_lib.write_config(workdir, {"model": {"num_layers": 2}})
  ckpt_lib.check_workdir_compatible(workdir, {"model": {"num_layers": 3}})  # No raise.
  os.makedirs(os.path.join(workdir, "checkpoints", "5"))
  with pytest.raises(ValueError, match="different model, data"):
    ckpt_lib.check_workdir_compatible(workdir, {"model": {"num_layers": 3}})


def test_resume_refuses_another_sparse_training_method(tmp_path):
  """Masks evolved by one method (e.g. RigL) must not silently continue under another."""
  from sparsity_jax.train import checkpoint as ckpt_lib
  workdir = str(tmp_path / "run")
  os.makedirs(os.path.join(workdir, "checkpoints", "5"))
  rigl = {"model": {}, "train": {"weight_sparsity": {"method": "rigl", "rigl_every": 4}}}
  ckpt_lib.write_config(workdir, rigl)
  ckpt_lib.check_workdir_compatible(  # Its tuning may change on resume; its method not.
      workdir, {"model": {}, "train": {"weight_sparsity": {"method": "rigl", "rigl_every": 8}}})
  with pytest.raises(ValueError, match=r"weight_sparsity.method: workdir has 'rigl', config "
                                       r"has 'sr_ste'[\s\S]*init_from"):
    ckpt_lib.check_workdir_compatible(
        workdir, {"model": {}, "train": {"weight_sparsity": {"method": "sr_ste"}}})
  # A run saved before the field existed trained with the default ('fixed') masks.
  ckpt_lib.write_config(workdir, {"model": {}, "train": {}})
  ckpt_lib.check_workdir_compatible(
      workdir, {"model": {}, "train": {"weight_sparsity": {"method": "fixed"}}})
  with pytest.raises(ValueError, match="workdir has 'fixed'"):
    ckpt_lib.check_workdir_compatible(
        workdir, {"model": {}, "train": {"weight_sparsity": {"method": "rigl"}}})


# TensorStore reads abandoned by the failed restore report a closed event loop late,
# possibly under pytest's per-test hook; the launchers' hooks drop them (checkpoint.py).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_unreadable_checkpoint_resume_records_and_metrics(tmp_path, capsys):
  """A damaged newest checkpoint: evaluation and training fall back to the newest
  readable one with a one-line warning (evaluation reads no optimizer state); the
  resumed run rewrites the rows after it once, and every start is on record."""
  import glob
  import json
  from support import make_tiny_config
  from sparsity_jax.train import evaluate_workdir, loop, train_and_evaluate
  workdir = str(tmp_path / "run")
  overrides = {"train.checkpoint_every": 1, "eval.num_batches": 1}
  train_and_evaluate(make_tiny_config(**overrides, **{"train.steps": 2}), workdir)
  for path in glob.glob(os.path.join(workdir, "checkpoints", "2", "state", "d", "*")):
    open(path, "wb").close()  # Damaged data files, as after a disk or copy failure.
  capsys.readouterr()
  assert evaluate_workdir(workdir)["step"] == 1
  warnings = [l for l in capsys.readouterr().err.splitlines() if l.startswith("warning")]
  assert len(warnings) == 1 and "checkpoints/2 cannot be read" in warnings[0]
  assert loop.restore_workdir(workdir, load_data=False)[2].opt_state is None
  train_and_evaluate(make_tiny_config(**overrides, **{"train.steps": 3, "train.lr": 1e-3}),
                     workdir)
  assert "Resumed" in capsys.readouterr().out
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["1", "2", "2.unreadable",
                                                                      "3"]
  steps = [r["step"] for r in read_jsonl(os.path.join(workdir, "metrics.jsonl"))
           if "train/loss" in r]
  assert steps == [1, 2, 3]
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["train"]["lr"] == 1e-3
  starts = read_jsonl(os.path.join(workdir, "invocations.jsonl"))
  assert [(s["resumed_step"], s["config"]["train"]["steps"]) for s in starts] == [(None, 2),
                                                                                  (1, 3)]


def test_eval_launcher(tmp_path):
  workdir = str(tmp_path / "run")
  subprocess.run(_train_cmd(workdir, "--config.train.steps=2"), env=subprocess_env(), cwd=ROOT,
                 check=True, capture_output=True, timeout=300)
  run = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "eval.py"),
                        f"--workdir={workdir}"], env=subprocess_env(), cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr
  assert '"bits_per_byte"' in run.stdout and '"step": 2' in run.stdout
  # --config of another model size: one line naming the fields, not Orbax's shape error.
  line = _one_line_error([sys.executable, os.path.join(ROOT, "launch", "eval.py"),
                          f"--workdir={workdir}",
                          "--config=" + os.path.join(ROOT, "configs", "lm_tiny.py")])
  assert "--config describes another model" in line and "model.num_layers: the run has 2, " \
      "--config has 4" in line and "delete" not in line
  # A workdir is no pretrained checkpoint for convert.py: it names the export route.
  line = _one_line_error([sys.executable, os.path.join(ROOT, "launch", "convert.py"),
                          f"--model={workdir}", f"--out={tmp_path / 'hf'}"])
  assert "is a training run (a workdir), not a pretrained checkpoint" in line
  assert "launch/prune.py" in line and "--hf_out" in line
  assert not (tmp_path / "hf").exists()


# configs/frontier.py configures an evaluation grid, not a training run: checked in
# tests/test_frontier_runner.py.
@pytest.mark.parametrize("name", sorted(f for f in os.listdir(os.path.join(ROOT, "configs"))
                                        if f.endswith(".py") and f != "frontier.py"))
def test_every_config_builds_a_valid_experiment(name):
  """Each configs/*.py (and its runlocal variant) passes the trainer's checks without
  loading data, and only sets fields that base_config documents."""
  import importlib.util
  import jax
  from sparsity_jax import config_lib
  from sparsity_jax.train import loop
  spec = importlib.util.spec_from_file_location(name[:-3], os.path.join(ROOT, "configs", name))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  base = config_lib.base_config().to_dict()
  for arg in (None, "runlocal"):
    config = module.get_config(arg)
    for section, fields in config.to_dict().items():
      if isinstance(fields, dict) and section in base and section != "model":
        assert set(fields) <= set(base[section]), (name, section, set(fields) - set(base[section]))
    loop.Experiment(config, load_data=False, devices=jax.devices()[:1])


def test_generate_echoes_the_prompt_takes_any_bytes_and_flags_an_undertrained_model(tmp_path):
  """launch/generate.py on a model that learned nothing: it echoes the prompt, reads a
  prompt that is not UTF-8 as bytes (the model is byte-level), shows what it generated
  even when nothing is printable, and says the model is undertrained."""
  import json
  import jax
  from support import make_tiny_config
  from sparsity_jax import parallel
  from sparsity_jax.train import checkpoint as ckpt_lib
  from sparsity_jax.train import loop, optimizer, state as state_lib
  workdir = str(tmp_path / "run")
  config = make_tiny_config(**{"objective": "masked_diffusion", "model.causal": False})
  exp = loop.Experiment(config, load_data=False, devices=jax.devices()[:1])
  with parallel.use_mesh(exp.mesh, exp.rules):  # An untrained checkpoint is enough here.
    _, state, _ = state_lib.create_train_state(exp.make_model, optimizer.make_optimizer(
        config.train), exp.mesh, exp.rules)
    checkpointer = ckpt_lib.Checkpointer(workdir, keep=1)
    checkpointer.save(1, state, {"step": 1})
    checkpointer.close()
  ckpt_lib.write_config(workdir, json.loads(config.to_json_best_effort()))
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
    f.write(json.dumps({"step": 1, "eval/bits_per_byte": 8.0}) + "\n")
  run = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "generate.py"),
                        f"--workdir={workdir}", b"--prompt=def \xff(", "--gen_length=8",
                        "--steps=8", "--block_length=8"],
                       env=subprocess_env(), cwd=ROOT, capture_output=True, timeout=300)
  out = run.stdout.decode("utf-8", errors="replace")
  assert run.returncode == 0, out + run.stderr.decode(errors="replace")[-3000:]
  assert "--- prompt (6 bytes) ---\ndef \ufffd(\n--- generated (8 tokens) ---\n" in out
  assert "note: this model is undertrained (validation 8.00 bits/byte after 1 steps" in out
  # Bad SparseD options and a causal LM's flag: one line each, before the model loads.
  generate = [sys.executable, os.path.join(ROOT, "launch", "generate.py"),
              f"--workdir={workdir}", "--prompt=def main(", "--gen_length=32", "--steps=32",
              "--block_length=32"]
  for extra, message in [
      (["--sparsed", "--sparsed.select=1.5"], "--sparsed.select=1.5 must be in (0, 1]"),
      (["--sparsed", "--sparsed.skip=2"], "--sparsed.skip=2.0 must be in [0, 1)"),
      (["--sparsed", "--sparsed.block_size=0"], "--sparsed.block_size=0 must be >= 1"),
      (["--sparsed.select=0.5"], "--sparsed.select sets up SparseD attention: add --sparsed"),
      (["--max_new_tokens=5"], "--max_new_tokens is for causal LMs, and")]:
    assert message in _one_line_error(generate + extra), extra


@pytest.mark.parametrize("name, argv", [
    ("sparsed_bench", ["--workdir=runs/diffusion_x"]),
    ("routing_experiment", ["--workdir=runs/routing_x"]),
    ("moa_experiment", ["--workdir=runs/moa_x", "--moa_dirs=runs/moa_50"]),
])
def test_benchmarks_write_to_their_run_directory_unless_told(name, argv):
  """A benchmark run never overwrites a tracked docs/results file by default."""
  import importlib.util
  spec = importlib.util.spec_from_file_location(f"bench_{name}",
                                                os.path.join(ROOT, "benchmarks", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  workdir = argv[0].split("=", 1)[1]
  assert module.parse_args(argv).out.startswith(workdir + os.sep)
  assert module.parse_args(argv + ["--out=docs/results/x.md"]).out == "docs/results/x.md"

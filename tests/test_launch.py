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
  steps = ["--config.train.steps=200", "--config.train.checkpoint_every=5",
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
  for a, b in zip(_final_params(killed, 200), _final_params(clean, 200), strict=True):
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_sigterm_checkpoints_then_resumes(tmp_path):
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
  proc.send_signal(signal.SIGTERM)
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


def test_unknown_config_key_is_refused_without_state(tmp_path):
  workdir = tmp_path / "run"
  run = subprocess.run(_train_cmd(str(workdir), "--config.model.num_layerz=3"),
                       env=subprocess_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert run.returncode != 0
  assert "num_layerz" in run.stderr
  assert not workdir.exists()


def test_eval_launcher(tmp_path):
  workdir = str(tmp_path / "run")
  subprocess.run(_train_cmd(workdir, "--config.train.steps=2"), env=subprocess_env(), cwd=ROOT,
                 check=True, capture_output=True, timeout=300)
  run = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "eval.py"),
                        f"--workdir={workdir}"], env=subprocess_env(), cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr
  assert '"bits_per_byte"' in run.stdout and '"step": 2' in run.stdout


@pytest.mark.parametrize("name", sorted(f for f in os.listdir(os.path.join(ROOT, "configs"))
                                        if f.endswith(".py")))
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

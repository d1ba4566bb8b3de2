"""Shared helpers for the tests (a plain module: conftest.py files are not importable by
name once several directories have one)."""

import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# XLA:CPU without LLVM's optimisations: the tests' programs are tiny, so compiling is most of
# their time (~30% off each compile-bound test here); the tests' tolerances hold unchanged.
FAST_COMPILE_XLA_FLAGS = ("--xla_backend_optimization_level=0 "
                          "--xla_llvm_disable_expensive_passes=true")


def make_tiny_config(**overrides):
  """A seconds-long causal-LM config on the embedded corpus; dotted keys override fields."""
  spec = importlib.util.spec_from_file_location("lm_tiny", os.path.join(ROOT, "configs", "lm_tiny.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config("runlocal")
  c.model.num_heads = 4
  c.model.num_kv_heads = 2
  c.model.head_dim = 16
  c.model.d_model = 32
  c.model.mlp_dim = 64
  c.data.seq_len = 32
  c.data.batch_size = 8
  c.eval.batch_size = 8
  c.eval.num_batches = 2
  c.eval.every = 0
  c.train.log_every = 1
  c.train.steps = 5
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def subprocess_env(num_devices: int | None = None) -> dict:
  """Environment for launching launch/*.py in a subprocess."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = FAST_COMPILE_XLA_FLAGS
  if num_devices:
    env["XLA_FLAGS"] += f" --xla_force_host_platform_device_count={num_devices}"
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  return env

"""Test set-up: 8 fake CPU devices for in-process sharding tests."""

import os
import sys

TESTS = os.path.dirname(os.path.abspath(__file__))
for path in (TESTS, os.path.dirname(TESTS)):  # tests/support.py, and configs/ + launch/.
  if path not in sys.path:
    sys.path.insert(0, path)

from support import FAST_COMPILE_XLA_FLAGS  # noqa: E402  (support imports no jax)

# Must happen before jax is imported anywhere: sharded tests build 2x2x2 meshes in-process.
os.environ.setdefault(
    "XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {FAST_COMPILE_XLA_FLAGS}")
os.environ.setdefault("JAX_PLATFORMS", "cpu")


import pytest  # noqa: E402  (after the environment set-up above)


def pytest_collection_modifyitems(config, items):
  """Under pytest-xdist (``-n``), every test of the real model runs in one worker, so the
  suite still loads SmolLM2 once (``--dist loadgroup``, pyproject.toml)."""
  for item in items:
    if "smollm2" in getattr(item, "fixturenames", ()):
      item.add_marker(pytest.mark.xdist_group("smollm2"))


@pytest.fixture(scope="session")
def smollm2():
  """(model, tokenizer) of the embedded SmolLM2-135M-Instruct, loaded once per session."""
  from sparsity_jax.checkpoints import load_pretrained
  return load_pretrained("smollm2")


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
  """Drops every compiled program after each test module. Each XLA CPU executable keeps
  memory mappings; the whole suite in one process otherwise approaches the kernel's
  vm.max_map_count (65530 here), and XLA then crashed (segfault) compiling a 2x2x2 sharded
  program late in the run."""
  yield
  import gc

  import jax

  from sparsity_jax.models import generation
  generation._COMPILED.clear()
  jax.clear_caches()
  gc.collect()

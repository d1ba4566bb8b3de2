"""Test set-up: 8 fake CPU devices for in-process sharding tests."""

import os
import sys

# Must happen before jax is imported anywhere: sharded tests build 2x2x2 meshes in-process.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

TESTS = os.path.dirname(os.path.abspath(__file__))
for path in (TESTS, os.path.dirname(TESTS)):  # tests/support.py, and configs/ + launch/.
  if path not in sys.path:
    sys.path.insert(0, path)

"""Logical-axis rules, mesh shapes, and the README's example and commands."""

import os
import re

import jax
import pytest
from jax.sharding import PartitionSpec as P

from support import ROOT
from sparsity_jax import axes, parallel


def test_logical_to_spec_rules():
  mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  spec = parallel.logical_to_spec((axes.EMBED, axes.HEADS, axes.HEAD_DIM), (64, 4, 16), mesh,
                                  axes.DEFAULT_RULES)
  assert spec == P("fsdp", "tensor", None)
  # Batch over data x fsdp; a mesh axis is used once per spec.
  assert parallel.logical_to_spec((axes.BATCH, axes.EMBED), (8, 64), mesh,
                                  axes.DEFAULT_RULES) == P(("data", "fsdp"), None)
  # A mesh axis that does not divide the dimension is dropped (replicated).
  assert parallel.logical_to_spec((axes.KV_HEADS,), (3,), mesh, axes.DEFAULT_RULES) == P(None)


def test_mesh_shape_resolution():
  assert parallel.mesh_shape({"data": -1, "fsdp": 2, "tensor": 1}, 8) == (4, 2, 1)
  with pytest.raises(ValueError, match="at most one axis may be -1"):
    parallel.mesh_shape({"data": -1, "fsdp": -1, "tensor": 1}, 8)
  with pytest.raises(ValueError, match="needs 6 devices"):
    parallel.mesh_shape({"data": 3, "fsdp": 2, "tensor": 1}, 8)


def _readme():
  with open(os.path.join(ROOT, "README.md")) as f:
    return f.read()


def test_ci_runs_the_readme_test_command():
  with open(os.path.join(ROOT, ".ci", "run")) as f:
    ci = f.read()
  commands = re.findall(r"```bash\n(.*?)\n```", _readme(), re.S)
  test_command = [c for c in commands if "pytest" in c][0].strip()
  assert test_command in ci.splitlines()


def _python_blocks():
  return re.findall(r"```python\n(.*?)\n```", _readme(), re.S)


@pytest.mark.parametrize("index", range(len(_python_blocks())))
def test_readme_python_blocks_run(index, tmp_path, monkeypatch, request):
  """Every python block of the README runs as written (the training example with 2 steps
  instead of 20); a block marked '# needs: <path>' is skipped, saying why, where the path
  is missing. Blocks that load the embedded SmolLM2 get the session's copy of it (one
  real-model load per test session)."""
  code = _python_blocks()[index]
  if 'load_pretrained("smollm2")' in code:
    from sparsity_jax import checkpoints
    loaded = request.getfixturevalue("smollm2")
    monkeypatch.setattr(checkpoints, "load_pretrained", lambda source, **kw: loaded)
  missing = [p for p in re.findall(r"#\s*needs:\s*(\S+)", code) if not os.path.exists(p)]
  if missing:
    pytest.skip(f"README python block {index} needs {', '.join(missing)}, missing here")
  monkeypatch.chdir(tmp_path)
  code = code.replace("config.train.steps = 20",
                      "config.train.steps = 2\nconfig.eval.num_batches = 1")
  namespace = {}
  exec(compile(code, f"README.md python block {index}", "exec"), namespace)
  if "logits" in namespace:  # The model example.
    assert namespace["logits"].shape == (1, 16, 260)
    assert namespace["result"]["eval_metrics"]["bits_per_byte"] > 0

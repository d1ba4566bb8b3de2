"""Every notebook's code cells run top to bottom, the setup cell included; the setup cell
also runs outside a checkout, where it clones the repository as on Colab."""

import glob
import json
import os
import subprocess
import sys

import pytest

from support import ROOT, subprocess_env

NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "notebooks", "*.ipynb")))


def code_cells(path: str) -> list[str]:
  with open(path) as f:
    cells = json.load(f)["cells"]
  return ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]


def notebook_code(path: str) -> str:
  return "\n".join(code_cells(path))


def test_there_are_notebooks_and_every_line_runs():
  """No IPython magics (% / !): the tests could only skip them, so setup would go untested."""
  assert NOTEBOOKS
  for path in NOTEBOOKS:
    magics = [l for l in notebook_code(path).splitlines() if l.lstrip().startswith(("%", "!"))]
    assert not magics, (path, magics)


def test_setup_cell_clones_the_repository_outside_a_checkout(tmp_path):
  """As on Colab: not in a checkout, the first cell clones REPO_URL, changes into the clone
  and imports the package from it."""
  setup = code_cells(os.path.join(ROOT, "notebooks", "quickstart.ipynb"))[0]
  clone = tmp_path / "sparsity_jax"
  env = dict(subprocess_env(1), SPARSITY_JAX_REPO=ROOT, SPARSITY_JAX_DIR=str(clone))
  env.pop("PYTHONPATH")
  run = subprocess.run([sys.executable, "-c", setup], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-3000:]
  assert f"sparsity_jax from {clone / 'sparsity_jax'}" in run.stdout
  assert (clone / "configs" / "lm_tiny.py").exists()
  env.pop("SPARSITY_JAX_REPO")
  env["SPARSITY_JAX_DIR"] = str(tmp_path / "elsewhere")
  run = subprocess.run([sys.executable, "-c", setup], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
  assert run.returncode != 0 and "set REPO_URL" in run.stderr


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs(path):
  run = subprocess.run([sys.executable, "-c", notebook_code(path)], cwd=ROOT,
                       env=subprocess_env(1), capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]

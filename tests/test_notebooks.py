"""Every notebook's code cells run top to bottom (Colab setup lines % and ! skipped)."""

import glob
import json
import os
import subprocess
import sys

import pytest

from support import ROOT, subprocess_env

NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "notebooks", "*.ipynb")))


def notebook_code(path: str) -> str:
  with open(path) as f:
    cells = json.load(f)["cells"]
  lines = [line.rstrip("\n") for c in cells if c["cell_type"] == "code" for line in c["source"]]
  return "\n".join(line for line in lines if not line.lstrip().startswith(("%", "!")))


def test_there_are_notebooks():
  assert NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs(path):
  run = subprocess.run([sys.executable, "-c", notebook_code(path)], cwd=ROOT,
                       env=subprocess_env(1), capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]

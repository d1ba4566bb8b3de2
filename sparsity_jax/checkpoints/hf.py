r"""Hugging Face checkpoints: Llama, Mistral, Qwen2 and LLaDA in and out of TransformerLM.

Reads a local directory (never the network) holding ``config.json`` and safetensors
weights, either one ``model.safetensors`` or shards listed in
``model.safetensors.index.json``, with the ``safetensors`` package's numpy API (no torch).
Weights go straight into their target sharding: every parameter is built with
``jax.make_array_from_callback`` and each callback slices only the block one local device
holds out of the memory-mapped tensor (``safe_open(...).get_slice``), so a process reads
just its own shards, in the dtype asked for (float32 or bfloat16).

  from sparsity_jax.checkpoints import hf
  model = hf.load_model("/ckpt/Llama-3.2-1B", mesh=mesh, param_dtype=jnp.bfloat16)
  logits = model(tokens)
  hf.save_model(model, "/tmp/out", arch="llama")   # config.json + *.safetensors

Architectures (``config.json``'s ``model_type`` or ``architectures``): ``llama`` (with
Llama 3 ``rope_scaling``), ``mistral``, ``qwen2`` (q/k/v biases, tied embeddings) and
``llada`` (GSAI-ML/LLaDA-8B-Base and -Instruct, loaded as a bidirectional
TransformerLM, ``causal=False``). Anything else raises naming the supported ones.

Tensor names (HF ``nn.Linear`` weights are [out, in]; ``{i}`` is the layer):

  ours (TransformerLM)         Llama / Mistral / Qwen2              LLaDA
  embed [v, e]                 model.embed_tokens.weight            model.transformer.wte.weight
  layers.i.attn_norm.scale     model.layers.{i}.input_layernorm     ...blocks.{i}.attn_norm
  layers.i.attn.q_proj [e,n,h] ...self_attn.q_proj [n*h, e]         ...blocks.{i}.q_proj
  layers.i.attn.k_proj [e,k,h] ...self_attn.k_proj [k*h, e]         ...blocks.{i}.k_proj
  layers.i.attn.v_proj [e,k,h] ...self_attn.v_proj [k*h, e]         ...blocks.{i}.v_proj
  layers.i.attn.{q,k,v}_bias   ...self_attn.{q,k,v}_proj.bias       ...blocks.{i}.{q,k,v}_proj.bias
  layers.i.attn.o_proj [n,h,e] ...self_attn.o_proj [e, n*h]         ...blocks.{i}.attn_out
  layers.i.mlp_norm.scale      ...post_attention_layernorm          ...blocks.{i}.ff_norm
  layers.i.mlp.gate [e, f]     ...mlp.gate_proj [f, e]              ...blocks.{i}.ff_proj
  layers.i.mlp.up [e, f]       ...mlp.up_proj [f, e]                ...blocks.{i}.up_proj
  layers.i.mlp.down [f, e]     ...mlp.down_proj [e, f]              ...blocks.{i}.ff_out
  final_norm.scale             model.norm.weight                    model.transformer.ln_f.weight
  lm_head [e, v]               lm_head.weight [v, e]                model.transformer.ff_out.weight

(``...`` is ``model.layers.{i}.`` resp. ``model.transformer.``; every name ends in
``.weight`` unless it says ``.bias``.) A tied model (``tie_word_embeddings`` /
``weight_tying``) has no lm_head. With ``scan_layers`` the per-layer tensors are stacked
along a leading layer axis.

Conventions checked by the parity tests against transformers' own logits:

- Heads: the rows of q/k/v_proj are head-major (row = head * h + i), so [n*h, e] is
  transposed and unflattened to our [e, n, h] with no permutation inside a head. Hugging
  Face Llama-family weights are stored already permuted for the "rotate half" RoPE (the
  permutation is done once when Meta's interleaved weights are converted), and
  :mod:`sparsity_jax.layers.rope` uses rotate half, so they load as they are.
- GQA: query head i reads kv head i // (n // k) in HF (``repeat_kv``), in LLaDA
  (``repeat_interleave``) and in ``jax.nn.dot_product_attention``.
- RMSNorm: x * rsqrt(mean(x^2) + eps) * weight in float32 (``rms_norm_eps``).

LLaDA (no transformers class) follows GSAI-ML's public ``modeling_llada.py`` and
``configuration_llada.py`` (an OLMo derivative): ``LLaDAModelLM`` wraps ``LLaDAModel`` as
``.model``, whose ``transformer`` holds ``wte``, ``blocks`` (``LLaDALlamaBlock`` when
``block_type="llama"``), ``ln_f`` and ``ff_out`` (absent with ``weight_tying``). A block
computes x += attn_out(attention(rope(q_proj(attn_norm(x))), rope(k_proj(.)), v_proj(.)))
without a causal mask, then x += ff_out(act(ff_proj(h)) * up_proj(h)) with h = ff_norm(x)
and act = SiLU. Heads are ``d_model // n_heads`` wide, RoPE is rotate-half with
``rope_theta``, norms are RMS with ``rms_norm_eps``. Supported: ``block_type="llama"``,
``activation_type="silu"``, ``layer_norm_type="rms"``, ``rope=true`` and no alibi, yarn,
q/k norms, non-qkv biases, input embedding scaling, logit scaling or block groups; others
raise. ``mask_token_id`` (126336 for LLaDA-8B) is kept in the exported config and exposed
by :func:`mask_token_id`.

Export (:func:`save_model`) writes the same names back, fp32 or bf16, sharded with an
index once a file would pass ``max_shard_bytes``, plus ``config.json`` (the original one
when given, else one built from the ModelConfig), so a save/load round trip is exact.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import math
import os
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, SingleDeviceSharding

from sparsity_jax import parallel
from sparsity_jax.errors import UserError
from sparsity_jax.layers import rope
from sparsity_jax.models import ModelConfig, TransformerLM

log = logging.getLogger(__name__)

ARCHITECTURES = ("llama", "mistral", "qwen2", "llada")
_ARCH_BY_CLASS = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
                  "Qwen2ForCausalLM": "qwen2", "LLaDAModelLM": "llada"}
CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# ModelConfig fields a checkpoint fixes; the rest (dtypes, scan, remat, attention core)
# are how it runs and may come from the experiment's config.
ARCH_FIELDS = ("vocab_size", "num_layers", "d_model", "num_heads", "num_kv_heads", "head_dim",
               "mlp_dim", "max_len", "rope_theta", "rope_scaling", "norm_eps",
               "tie_embeddings", "qkv_bias", "causal")
_LLADA_MASK_TOKEN_ID = 126336  # LLaDA-8B's <|mdm_mask|>; configs may say otherwise.


class CheckpointError(UserError):
  """A checkpoint that does not fit: unsupported architecture, missing or misshapen tensor
  (a UserError: launchers report it in one line)."""


# ----------------------------------------------------------------------------- config


def read_config(directory: str) -> dict[str, Any]:
  """``config.json`` of a local Hugging Face checkpoint directory."""
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"Hugging Face checkpoint directory {directory!r} does not exist")
  path = os.path.join(directory, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} is missing: a Hugging Face checkpoint directory needs "
                            f"{CONFIG_FILE} next to its *.safetensors")
  with open(path) as f:
    return json.load(f)


def architecture(hf_config: Mapping[str, Any]) -> str:
  """One of :data:`ARCHITECTURES`, from ``model_type`` or ``architectures``."""
  model_type = hf_config.get("model_type")
  if model_type in ARCHITECTURES:
    return model_type
  for name in hf_config.get("architectures") or ():
    if name in _ARCH_BY_CLASS:
      return _ARCH_BY_CLASS[name]
  raise CheckpointError(
      f"unsupported architecture: model_type={model_type!r}, architectures="
      f"{hf_config.get('architectures')}; supported model types: {', '.join(ARCHITECTURES)}")


def _require(hf_config: Mapping[str, Any], key: str, arch: str):
  if hf_config.get(key) is None:
    raise CheckpointError(f"{CONFIG_FILE} of this {arch} checkpoint lacks {key!r}")
  return hf_config[key]


def _unsupported(arch: str, what: str):
  raise CheckpointError(f"{arch} checkpoint with {what} is not supported by TransformerLM")


def _rope_params(hf_config: Mapping[str, Any]) -> tuple[float, dict[str, Any] | None]:
  """(rope_theta, rope_scaling) from either the classic fields or transformers v5's
  ``rope_parameters`` ({"rope_type", "rope_theta", ...})."""
  params = dict(hf_config.get("rope_parameters") or {})
  theta = hf_config.get("rope_theta", params.pop("rope_theta", 10_000.0))
  scaling = hf_config.get("rope_scaling") or params or None
  if scaling is not None:
    scaling = dict(scaling)
    if "type" in scaling and "rope_type" not in scaling:
      scaling["rope_type"] = scaling.pop("type")
    if scaling.get("rope_type", "default") == "default":
      scaling = None
  try:
    rope.scaling_type(scaling)
  except ValueError as e:
    raise CheckpointError(f"{CONFIG_FILE}: {e}") from None
  if scaling is not None:  # Keep only what the scaling uses (HF adds its own extras).
    keys = ("rope_type", "factor", "low_freq_factor", "high_freq_factor",
            "original_max_position_embeddings")
    scaling = {k: scaling[k] for k in keys if k in scaling}
  return float(theta), scaling


def model_config_from_hf(hf_config: Mapping[str, Any], **overrides) -> ModelConfig:
  """ModelConfig equivalent to a Hugging Face ``config.json``.

  Args:
    hf_config: the parsed config.json.
    **overrides: ModelConfig fields to set on top, typically how the model runs
      (``dtype``, ``param_dtype``, ``scan_layers``, ``remat``, ``attention``, ``max_len``).
  """
  arch = architecture(hf_config)
  c = hf_config
  if arch == "llada":
    checks = {"block_type": "llama", "activation_type": "silu", "layer_norm_type": "rms",
              "rope": True}
    for key, want in checks.items():
      if c.get(key, want) != want:
        _unsupported(arch, f"{key}={c.get(key)!r} (only {want!r})")
    for key in ("alibi", "yarn", "attention_layer_norm", "include_bias", "input_emb_norm",
                "scale_logits"):
      if c.get(key):
        _unsupported(arch, f"{key}=true")
    if c.get("block_group_size", 1) != 1:
      _unsupported(arch, f"block_group_size={c['block_group_size']}")
    d_model, n_heads = _require(c, "d_model", arch), _require(c, "n_heads", arch)
    n_kv = c.get("n_kv_heads") or (1 if c.get("multi_query_attention") else n_heads)
    values = dict(
        vocab_size=c.get("embedding_size") or _require(c, "vocab_size", arch),
        num_layers=_require(c, "n_layers", arch), d_model=d_model, num_heads=n_heads,
        num_kv_heads=n_kv, head_dim=d_model // n_heads,
        mlp_dim=c.get("mlp_hidden_size") or c.get("mlp_ratio", 4) * d_model,
        max_len=c.get("max_sequence_length", 4096), rope_theta=float(c.get("rope_theta", 10_000.0)),
        rope_scaling=None, norm_eps=float(c.get("rms_norm_eps", 1e-5)),
        tie_embeddings=bool(c.get("weight_tying", False)),
        qkv_bias=bool(c.get("include_qkv_bias", False)), causal=False)
  else:
    if c.get("hidden_act", "silu") != "silu":
      _unsupported(arch, f"hidden_act={c['hidden_act']!r} (only 'silu')")
    if c.get("attention_bias") and arch != "qwen2":
      _unsupported(arch, "attention_bias=true (an o_proj bias)")
    if c.get("mlp_bias"):
      _unsupported(arch, "mlp_bias=true")
    hidden, n_heads = _require(c, "hidden_size", arch), _require(c, "num_attention_heads", arch)
    theta, scaling = _rope_params(c)
    max_len = int(_require(c, "max_position_embeddings", arch))
    window = c.get("sliding_window")
    if arch == "qwen2" and not c.get("use_sliding_window", False):
      window = None
    if window and window < max_len:
      # Dense attention equals sliding-window attention only up to the window.
      log.warning("%s: sliding_window=%d < max_position_embeddings=%d; max_len is capped at "
                  "the window, where dense attention is exact", arch, window, max_len)
      max_len = int(window)
    values = dict(
        vocab_size=_require(c, "vocab_size", arch),
        num_layers=_require(c, "num_hidden_layers", arch), d_model=hidden, num_heads=n_heads,
        num_kv_heads=c.get("num_key_value_heads") or n_heads,
        head_dim=c.get("head_dim") or hidden // n_heads,
        mlp_dim=_require(c, "intermediate_size", arch), max_len=max_len, rope_theta=theta,
        rope_scaling=scaling, norm_eps=float(c.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(c.get("tie_word_embeddings", False)), qkv_bias=arch == "qwen2",
        causal=True)
  values.update(overrides)
  return ModelConfig(**values)


def hf_config_from_model_config(cfg: ModelConfig, arch: str) -> dict[str, Any]:
  """A Hugging Face ``config.json`` dict describing ``cfg`` as ``arch``."""
  if arch not in ARCHITECTURES:
    raise CheckpointError(f"unsupported architecture {arch!r}; supported: {ARCHITECTURES}")
  dtype = "bfloat16" if cfg.param_dtype == jnp.bfloat16 else "float32"
  if arch == "llada":
    if cfg.causal or cfg.rope_scaling or cfg.head_dim * cfg.num_heads != cfg.d_model:
      raise CheckpointError("LLaDA needs causal=False, no rope_scaling and head_dim * num_heads "
                            f"== d_model; got {cfg}")
    return {
        "architectures": ["LLaDAModelLM"], "model_type": "llada",
        "activation_type": "silu", "alibi": False, "attention_layer_norm": False,
        "block_group_size": 1, "block_type": "llama", "d_model": cfg.d_model,
        "embedding_size": cfg.vocab_size, "include_bias": False,
        "include_qkv_bias": cfg.qkv_bias, "input_emb_norm": False, "layer_norm_type": "rms",
        "mask_token_id": _LLADA_MASK_TOKEN_ID if cfg.vocab_size > _LLADA_MASK_TOKEN_ID else None,
        "max_sequence_length": cfg.max_len, "mlp_hidden_size": cfg.mlp_dim,
        "n_heads": cfg.num_heads, "n_kv_heads": cfg.num_kv_heads, "n_layers": cfg.num_layers,
        "rms_norm_eps": cfg.norm_eps, "rope": True, "rope_theta": cfg.rope_theta,
        "scale_logits": False, "vocab_size": cfg.vocab_size, "weight_tying": cfg.tie_embeddings,
        "torch_dtype": dtype}
  if not cfg.causal:
    raise CheckpointError(f"{arch} is a causal LM; this model has causal=False (use 'llada')")
  if cfg.qkv_bias and arch != "qwen2":
    raise CheckpointError(f"{arch} has no q/k/v-only biases; export this model as 'qwen2'")
  if not cfg.qkv_bias and arch == "qwen2":
    raise CheckpointError("qwen2 always has q/k/v biases; export this model as 'llama'")
  out = {
      "architectures": [{"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                         "qwen2": "Qwen2ForCausalLM"}[arch]],
      "model_type": arch, "hidden_act": "silu", "hidden_size": cfg.d_model,
      "intermediate_size": cfg.mlp_dim, "num_attention_heads": cfg.num_heads,
      "num_key_value_heads": cfg.num_kv_heads, "num_hidden_layers": cfg.num_layers,
      "head_dim": cfg.head_dim, "vocab_size": cfg.vocab_size,
      "max_position_embeddings": cfg.max_len, "rms_norm_eps": cfg.norm_eps,
      "rope_theta": cfg.rope_theta,
      "rope_scaling": dict(cfg.rope_scaling) if cfg.rope_scaling else None,
      "tie_word_embeddings": cfg.tie_embeddings, "torch_dtype": dtype}
  if arch == "mistral":
    out["sliding_window"] = None
  if arch == "llama":
    out.update(attention_bias=False, mlp_bias=False)
  return out


def mask_token_id(hf_config: Mapping[str, Any]) -> int | None:
  """The mask token of a masked-diffusion checkpoint (LLaDA), else None."""
  if architecture(hf_config) != "llada":
    return None
  return int(hf_config.get("mask_token_id") or _LLADA_MASK_TOKEN_ID)


def _arch_values(cfg: ModelConfig) -> dict[str, Any]:
  values = {f: getattr(cfg, f) for f in ARCH_FIELDS if f != "max_len"}
  values["rope_scaling"] = dict(cfg.rope_scaling) if cfg.rope_scaling else None
  return values


def check_compatible(cfg: ModelConfig, hf_config: Mapping[str, Any]) -> None:
  """Raises if ``cfg`` is not the architecture ``hf_config`` describes."""
  want = _arch_values(model_config_from_hf(hf_config))
  have = _arch_values(cfg)
  diffs = [f"{k}: model has {have[k]!r}, checkpoint has {want[k]!r}"
           for k in want if have[k] != want[k]]
  if diffs:
    raise CheckpointError("model config does not match the checkpoint's config.json:\n  "
                          + "\n  ".join(diffs))


# ----------------------------------------------------------------------------- tensors


@dataclasses.dataclass(frozen=True)
class TensorMap:
  """One TransformerLM parameter and the Hugging Face tensor(s) it is made of.

  The HF tensor's dims are first unflattened (``split``: the sizes each HF dim splits
  into, e.g. q_proj's rows into (n, h)), then transposed (our dim j is unflattened dim
  ``perm[j]``). A scanned layer stack takes one HF tensor per layer (``names``) along a
  leading axis.
  """

  path: tuple[str | int, ...]  # In TransformerLM, e.g. ("layers", 0, "attn", "q_proj").
  names: tuple[str, ...]
  split: tuple[tuple[int, ...], ...]
  perm: tuple[int, ...]
  stacked: bool = False

  @property
  def hf_shape(self) -> tuple[int, ...]:
    return tuple(math.prod(s) for s in self.split)

  @property
  def shape(self) -> tuple[int, ...]:
    unflat = sum(self.split, ())
    return ((len(self.names),) if self.stacked else ()) + tuple(unflat[p] for p in self.perm)

  def to_hf(self, array: np.ndarray) -> np.ndarray:
    return array.transpose(np.argsort(self.perm)).reshape(self.hf_shape)


_NAMES = {
    "hf": dict(embed="model.embed_tokens.weight", final_norm="model.norm.weight",
               lm_head="lm_head.weight", layer="model.layers.{i}.",
               q="self_attn.q_proj.weight", k="self_attn.k_proj.weight",
               v="self_attn.v_proj.weight", o="self_attn.o_proj.weight",
               q_bias="self_attn.q_proj.bias", k_bias="self_attn.k_proj.bias",
               v_bias="self_attn.v_proj.bias", attn_norm="input_layernorm.weight",
               mlp_norm="post_attention_layernorm.weight", gate="mlp.gate_proj.weight",
               up="mlp.up_proj.weight", down="mlp.down_proj.weight"),
    "llada": dict(embed="model.transformer.wte.weight", final_norm="model.transformer.ln_f.weight",
                  lm_head="model.transformer.ff_out.weight", layer="model.transformer.blocks.{i}.",
                  q="q_proj.weight", k="k_proj.weight", v="v_proj.weight", o="attn_out.weight",
                  q_bias="q_proj.bias", k_bias="k_proj.bias", v_bias="v_proj.bias",
                  attn_norm="attn_norm.weight", mlp_norm="ff_norm.weight", gate="ff_proj.weight",
                  up="up_proj.weight", down="ff_out.weight"),
}


def tensor_maps(cfg: ModelConfig, arch: str) -> list[TensorMap]:
  """Every parameter of ``TransformerLM(cfg)`` with its Hugging Face source for ``arch``."""
  names = _NAMES["llada" if arch == "llada" else "hf"]
  v, e, f = cfg.vocab_size, cfg.d_model, cfg.mlp_dim
  n, k, h = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  # key: (our sub-path in a block, split, perm)
  layer = [("q", ("attn", "q_proj"), ((n, h), (e,)), (2, 0, 1)),
           ("k", ("attn", "k_proj"), ((k, h), (e,)), (2, 0, 1)),
           ("v", ("attn", "v_proj"), ((k, h), (e,)), (2, 0, 1)),
           ("o", ("attn", "o_proj"), ((e,), (n, h)), (1, 2, 0)),
           ("attn_norm", ("attn_norm", "scale"), ((e,),), (0,)),
           ("mlp_norm", ("mlp_norm", "scale"), ((e,),), (0,)),
           ("gate", ("mlp", "gate"), ((f,), (e,)), (1, 0)),
           ("up", ("mlp", "up"), ((f,), (e,)), (1, 0)),
           ("down", ("mlp", "down"), ((e,), (f,)), (1, 0))]
  if cfg.qkv_bias:
    layer += [("q_bias", ("attn", "q_bias"), ((n, h),), (0, 1)),
              ("k_bias", ("attn", "k_bias"), ((k, h),), (0, 1)),
              ("v_bias", ("attn", "v_bias"), ((k, h),), (0, 1))]
  out = [TensorMap(("embed",), (names["embed"],), ((v,), (e,)), (0, 1)),
         TensorMap(("final_norm", "scale"), (names["final_norm"],), ((e,),), (0,))]
  if not cfg.tie_embeddings:
    out.append(TensorMap(("lm_head",), (names["lm_head"],), ((v,), (e,)), (1, 0)))
  layer_name = lambda key, i: names["layer"].format(i=i) + names[key]
  for key, sub, split, perm in layer:
    if cfg.scan_layers:
      out.append(TensorMap(("layers",) + sub,
                           tuple(layer_name(key, i) for i in range(cfg.num_layers)),
                           split, perm, stacked=True))
    else:
      out += [TensorMap(("layers", i) + sub, (layer_name(key, i),), split, perm)
              for i in range(cfg.num_layers)]
  return out


def _ignorable(name: str) -> bool:
  # Cached RoPE tables some older checkpoints carry; recomputed here.
  return name.endswith("rotary_emb.inv_freq")


class SafetensorsReader:
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
        raise FileNotFoundError(f"{directory}: shard file(s) listed in {INDEX_FILE} are "
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
        raise FileNotFoundError(f"{directory} has no {SINGLE_FILE}, {INDEX_FILE} or *.safetensors"
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

  def file_of(self, name: str) -> str:
    return self.weight_map[name]

  def read(self, name: str, index: Sequence[slice] | None = None) -> np.ndarray:
    """The tensor, or the block ``index`` of it (only that block is read from disk)."""
    sl = self._slice(name)
    return np.asarray(sl[tuple(index)] if index is not None else sl[:])


def _read_block(reader: SafetensorsReader, tmap: TensorMap, name: str,
                index: Sequence[slice]) -> np.ndarray:
  """Block ``index`` (slices in our layout) of one HF tensor, in our layout."""
  unflat = sum(tmap.split, ())
  unflat_index: list[slice] = [slice(None)] * len(unflat)
  for j, p in enumerate(tmap.perm):
    start, stop, _ = index[j].indices(unflat[p])
    unflat_index[p] = slice(start, stop)
  hf_index, shape, rest = [], [], []
  d = 0
  for sizes in tmap.split:
    outer, inner = unflat_index[d], unflat_index[d + 1:d + len(sizes)]
    d += len(sizes)
    # Read the rows of the outer sub-dim whole; slice the inner ones after reshaping.
    stride = math.prod(sizes[1:])
    hf_index.append(slice(outer.start * stride, outer.stop * stride))
    shape += [outer.stop - outer.start, *sizes[1:]]
    rest += [slice(None), *inner]
  block = reader.read(name, hf_index).reshape(shape)[tuple(rest)]
  return block.transpose(tmap.perm)


def _check_shapes(reader: SafetensorsReader, maps: Sequence[TensorMap], hf_config) -> None:
  for tmap in maps:
    for name in tmap.names:
      got = reader.shape(name)
      if got != tmap.hf_shape:
        raise CheckpointError(
            f"tensor {name!r} in {reader.file_of(name)} has shape {list(got)}, but {CONFIG_FILE} "
            f"({architecture(hf_config)}) implies {list(tmap.hf_shape)} for "
            f"{'.'.join(map(str, tmap.path))}")
  used = {name for tmap in maps for name in tmap.names}
  extra = [n for n in reader.names() if n not in used and not _ignorable(n)]
  tied_head = {_NAMES["hf"]["lm_head"], _NAMES["llada"]["lm_head"]}
  extra = [n for n in extra if n not in tied_head]  # A tied head may still be stored.
  if extra:
    log.warning("%d checkpoint tensors are not used, e.g. %s", len(extra), extra[:5])


def _variable(model: nnx.Module, path: Sequence[str | int]) -> nnx.Variable:
  node: Any = model
  for key in path:
    node = node[key] if isinstance(key, int) else getattr(node, key)
  return node


def _target_sharding(var: nnx.Variable, shape, mesh: Mesh | None, rules):
  if mesh is None:
    return SingleDeviceSharding(jax.devices()[0])
  names = parallel.variable_logical_axes(var, len(shape))
  return NamedSharding(mesh, parallel.logical_to_spec(names, shape, mesh, rules))


def load_params_into(model: TransformerLM, directory: str, *, mesh: Mesh | None = None,
                     rules: parallel.Rules | None = None,
                     hf_config: Mapping[str, Any] | None = None) -> None:
  """Sets every Param of ``model`` (concrete or from nnx.eval_shape) from the checkpoint.

  Each parameter is created in its target sharding (its logical axes through ``rules``
  on ``mesh``; one device without a mesh) and each process reads only the blocks its
  devices hold. Values are cast to the model's ``param_dtype``.
  """
  hf_config = read_config(directory) if hf_config is None else hf_config
  cfg = model.cfg
  check_compatible(cfg, hf_config)
  rules = parallel.current_rules() if rules is None else rules
  reader = SafetensorsReader(directory)
  maps = tensor_maps(cfg, architecture(hf_config))
  _check_shapes(reader, maps, hf_config)
  for tmap in maps:
    var = _variable(model, tmap.path)
    value = var.get_value()
    if tuple(value.shape) != tmap.shape:
      raise CheckpointError(f"parameter {'.'.join(map(str, tmap.path))} has shape "
                            f"{value.shape}, expected {tmap.shape}")
    dtype = np.dtype(value.dtype)
    sharding = _target_sharding(var, tmap.shape, mesh, rules)
    blocks: dict[tuple, np.ndarray] = {}  # Devices that replicate a block read it once.

    def callback(index, tmap=tmap, dtype=dtype, blocks=blocks):
      index = tuple(index) + (slice(None),) * (len(tmap.shape) - len(index))
      key = tuple(s.indices(size)[:2] for s, size in zip(index, tmap.shape))
      if key not in blocks:
        if tmap.stacked:
          layers = range(*index[0].indices(len(tmap.names)))
          block = np.stack([_read_block(reader, tmap, tmap.names[i], index[1:]) for i in layers])
        else:
          block = _read_block(reader, tmap, tmap.names[0], index)
        blocks[key] = np.ascontiguousarray(block.astype(dtype))
      return blocks[key]

    var.set_value(jax.make_array_from_callback(tmap.shape, sharding, callback))


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
  """
  hf_config = read_config(directory)
  cfg = model_config_from_hf(hf_config, **overrides)
  return _build_loaded(lambda: TransformerLM(cfg, rngs=nnx.Rngs(params=seed)), directory,
                       mesh, rules, hf_config)


def _build_loaded(make_model: Callable[[], TransformerLM], directory: str, mesh, rules,
                  hf_config=None) -> TransformerLM:
  model = nnx.eval_shape(make_model)
  load_params_into(model, directory, mesh=mesh, rules=rules, hf_config=hf_config)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  if jax.tree.leaves(rest):  # E.g. k-means centroids: initialised, not loaded.
    rules = parallel.current_rules() if rules is None else rules
    shardings = parallel.state_shardings(rest, mesh, rules) if mesh is not None else None
    # The random parameters are dead code in this jit: XLA drops them.
    rest = jax.jit(lambda: nnx.split(make_model(), nnx.Param, ...)[2], out_shardings=shardings)()
  return nnx.merge(graphdef, params, rest)


# ----------------------------------------------------------------------------- training


def config_with_hf_model(config: ml_collections.ConfigDict,
                         directory: str) -> ml_collections.ConfigDict:
  """A copy of an experiment config whose ``config.model`` describes the HF checkpoint.

  The architecture fields (:data:`ARCH_FIELDS`, ``max_len`` included) come from
  ``config.json``; the others of ``config.model`` (dtype, param_dtype, scan_layers, remat,
  attention) and every other section (objective, data, train, eval, mesh) stay as
  ``config`` has them. The copy is what a run writes to its workdir, so the run can be
  resumed and evaluated without the checkpoint directory.
  """
  from sparsity_jax.data import tokenizer  # The experiment's data: byte tokens.

  hf_cfg = model_config_from_hf(read_config(directory))
  if hf_cfg.vocab_size < tokenizer.VOCAB_SIZE:
    raise CheckpointError(f"{directory}: vocab_size={hf_cfg.vocab_size} is smaller than the "
                          f"{tokenizer.VOCAB_SIZE} token ids of the byte-level training data")
  objective = config.get("objective", "causal_lm")
  if not hf_cfg.causal and objective != "masked_diffusion":
    raise CheckpointError(f"{directory} is a bidirectional masked-diffusion model (LLaDA); "
                          f"config.objective={objective!r} would let it see the targets. Use "
                          "--config.objective=masked_diffusion (configs/diffusion_lm_tiny.py)")
  out = ml_collections.ConfigDict(config.to_dict())
  for field in ARCH_FIELDS:
    value = getattr(hf_cfg, field)
    out.model[field] = dict(value) if isinstance(value, Mapping) else value
  return out


def create_train_state(directory: str, make_model: Callable[[], TransformerLM], tx, mesh: Mesh,
                       rules) -> tuple[Any, Any, Any]:
  """Like ``train.state.create_train_state`` but with the parameters of an HF checkpoint.

  Parameters are read straight into their shardings; the optimizer state and any
  non-parameter model state are jit-initialised into theirs. Returns
  (graphdef, TrainState, state shardings).
  """
  from sparsity_jax.train import state as state_lib  # The train package imports models.

  model = nnx.eval_shape(make_model)
  load_params_into(model, directory, mesh=mesh, rules=rules)
  graphdef, params, _ = state_lib.split_model(model)

  def init():
    _, fresh, rest = state_lib.split_model(make_model())
    return state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=fresh, model_state=rest,
                                opt_state=tx.init(fresh))

  shardings = parallel.state_shardings(jax.eval_shape(init), mesh, rules)
  # Random parameters are dead code in these jits: XLA drops them.
  rest = jax.jit(lambda: state_lib.split_model(make_model())[2],
                 out_shardings=shardings.model_state)()
  opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(params)
  step = jax.device_put(jnp.zeros((), jnp.int32), shardings.step)
  return graphdef, state_lib.TrainState(step=step, params=params, model_state=rest,
                                        opt_state=opt_state), shardings


def evaluate_hf(directory: str, config: ml_collections.ConfigDict) -> dict[str, float]:
  """Validation metrics of an HF checkpoint as it is, on ``config``'s data and mesh.

  The model comes from :func:`config_with_hf_model` (``config.model``'s dtypes and
  attention core, the checkpoint's architecture); nothing is written.
  """
  from sparsity_jax.train import loop, state as state_lib

  config = config_with_hf_model(config, directory)
  exp = loop.Experiment(config)
  with parallel.use_mesh(exp.mesh, exp.rules):
    model = _build_loaded(exp.make_model, directory, exp.mesh, exp.rules)
    graphdef, params, rest = state_lib.split_model(model)
    shardings = types.SimpleNamespace(
        params=parallel.state_shardings(params, exp.mesh, exp.rules),
        model_state=parallel.state_shardings(rest, exp.mesh, exp.rules))
    return loop.evaluate(exp, loop._jit_eval_step(exp, graphdef, shardings), params, rest)


# ----------------------------------------------------------------------------- export


def _host_array(value: jax.Array) -> np.ndarray:
  if isinstance(value, jax.Array) and not value.is_fully_addressable:
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(value, tiled=True))
  return np.asarray(jax.device_get(value))


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
  for tmap in tensor_maps(cfg, arch):
    value = _host_array(_variable(model, tmap.path).get_value())
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

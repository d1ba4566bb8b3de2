r"""Architectures: a Hugging Face ``config.json`` <-> :class:`ModelConfig`.

The architecture half of checkpoint import/export, shared by every format
(:mod:`~sparsity_jax.checkpoints.hf` safetensors directories and
:mod:`~sparsity_jax.checkpoints.gguf` files, whose metadata is first turned into the
equivalent ``config.json`` dict).

Architectures (``config.json``'s ``model_type`` or ``architectures``): ``llama`` (with
Llama 3 ``rope_scaling``), ``mistral``, ``qwen2`` (q/k/v biases, tied embeddings) and
``llada`` (GSAI-ML/LLaDA-8B-Base and -Instruct, loaded as a bidirectional
TransformerLM, ``causal=False``). Anything else raises naming the supported ones.

LLaDA (no transformers class) follows GSAI-ML's public ``modeling_llada.py`` and
``configuration_llada.py`` (an OLMo derivative). Supported: ``block_type="llama"``,
``activation_type="silu"``, ``layer_norm_type="rms"``, ``rope=true`` and no alibi, yarn,
q/k norms, non-qkv biases, input embedding scaling, logit scaling or block groups; others
raise. ``mask_token_id`` (126336 for LLaDA-8B) is kept in the exported config and exposed
by :func:`mask_token_id`.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from sparsity_jax.errors import UserError
from sparsity_jax.layers import rope
from sparsity_jax.models import ModelConfig

log = logging.getLogger(__name__)

ARCHITECTURES = ("llama", "mistral", "qwen2", "llada")
_ARCH_BY_CLASS = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
                  "Qwen2ForCausalLM": "qwen2", "LLaDAModelLM": "llada"}
CONFIG_FILE = "config.json"
# ModelConfig fields a checkpoint fixes; the rest (dtypes, scan, remat, attention core)
# are how it runs and may come from the experiment's config.
ARCH_FIELDS = ("vocab_size", "num_layers", "d_model", "num_heads", "num_kv_heads", "head_dim",
               "mlp_dim", "max_len", "rope_theta", "rope_scaling", "norm_eps",
               "tie_embeddings", "qkv_bias", "causal")
_LLADA_MASK_TOKEN_ID = 126336  # LLaDA-8B's <|mdm_mask|>; configs may say otherwise.


class CheckpointError(UserError):
  """A checkpoint that does not fit: unsupported architecture, missing or misshapen tensor
  (a UserError: launchers report it in one line)."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
  """A checkpoint path, file or embedded wheel that is not there."""


# ----------------------------------------------------------------------------- config


def read_config(directory: str) -> dict[str, Any]:
  """``config.json`` of a local Hugging Face checkpoint directory."""
  if not os.path.isdir(directory):
    raise CheckpointNotFoundError(f"Hugging Face checkpoint directory {directory!r} does not exist")
  path = os.path.join(directory, CONFIG_FILE)
  if not os.path.exists(path):
    raise CheckpointNotFoundError(f"{path} is missing: a Hugging Face checkpoint directory needs "
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


def check_compatible(cfg: ModelConfig, want: ModelConfig | Mapping[str, Any]) -> None:
  """Raises if ``cfg`` is not the architecture ``want`` (a ModelConfig, or a
  ``config.json`` dict) describes; dtypes, attention core and ``max_len`` may differ."""
  if not isinstance(want, ModelConfig):
    want = model_config_from_hf(want)
  want_values, have = _arch_values(want), _arch_values(cfg)
  diffs = [f"{k}: model has {have[k]!r}, checkpoint has {want_values[k]!r}"
           for k in want_values if have[k] != want_values[k]]
  if diffs:
    raise CheckpointError("model config does not match the checkpoint's architecture:\n  "
                          + "\n  ".join(diffs))

r"""Tensor maps: where each TransformerLM parameter lives in a Hugging Face checkpoint.

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

Conventions checked by the parity tests against transformers' own logits:

- Heads: the rows of q/k/v_proj are head-major (row = head * h + i), so [n*h, e] is
  transposed and unflattened to our [e, n, h] with no permutation inside a head. Hugging
  Face Llama-family weights are stored already permuted for the "rotate half" RoPE (the
  permutation is done once when Meta's interleaved weights are converted), and
  :mod:`sparsity_jax.layers.rope` uses rotate half, so they load as they are. (GGUF files
  of ``llama`` architecture store q/k permuted back to interleaved; :mod:`.gguf` undoes it.)
- GQA: query head i reads kv head i // (n // k) in HF (``repeat_kv``), in LLaDA
  (``repeat_interleave``) and in ``jax.nn.dot_product_attention``.
- RMSNorm: x * rsqrt(mean(x^2) + eps) * weight in float32 (``rms_norm_eps``).

Every format reads through these maps (:func:`read_block`), so a GGUF file is loaded by
naming its tensors with the Hugging Face names above.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import numpy as np

from sparsity_jax.models import ModelConfig


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


HF_NAMES = {
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
  names = HF_NAMES["llada" if arch == "llada" else "hf"]
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


def ignorable(name: str) -> bool:
  # Cached RoPE tables some older checkpoints carry; recomputed here.
  return name.endswith("rotary_emb.inv_freq")


def read_block(read: Callable[[str, list[slice]], np.ndarray], tmap: TensorMap, name: str,
               index: Sequence[slice]) -> np.ndarray:
  """Block ``index`` (slices in our layout) of one HF tensor, in our layout.

  ``read(name, hf_index)`` returns the block ``hf_index`` (one slice per dim of the
  HF-layout tensor) of tensor ``name``; only that block needs to come off disk.
  """
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
  block = read(name, hf_index).reshape(shape)[tuple(rest)]
  return block.transpose(tmap.perm)

"""SparseD attention: dense early denoising steps, then a per-head block pattern reused.

The core has three modes, set between denoising steps by :func:`set_mode` (the sampler
hook in :func:`sparsed_step_hook` does it):

  'dense'    plain bidirectional attention;
  'capture'  dense attention, and the step's post-RoPE q/k choose the pattern (once);
  'sparse'   pallas_kernels.block_sparse attention over the captured pattern.

The pattern is stored per layer as kept-tile bits [b, n, i, j] in a non-parameter
variable; ``captures`` counts how often it was computed (once per generation).

Config (``config.model.attention``): kind='sparsed', block_size (128 for long contexts,
32 for short ones), select (fraction of key blocks kept, default 0.3), implementation
(kernel backend; None = platform default). The fraction of denoising steps run dense
(``skip``, default 0.2) is the sampler hook's argument, not a core option.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from pallas_kernels import block_sparse
from sparsity_jax.layers.attention import AttentionCore, register_attention
from sparsity_jax.patterns import sparsed as sparsed_patterns

MODES = ("dense", "capture", "sparse")


class SparsePattern(nnx.Variable):
  """Non-trainable attention-pattern state (not touched by the optimizer)."""


@register_attention("sparsed")
class SparseDAttention(AttentionCore):

  OPTIONS = ("block_size", "select", "implementation")

  def __init__(self, model_config: Any, *, layer_index: int, rngs: nnx.Rngs):
    del layer_index, rngs
    a = model_config.attention
    self.block_size = int(a.get("block_size", 128))
    self.select = float(a.get("select", 0.3))
    self.implementation = a.get("implementation", None)
    if not 0.0 < self.select <= 1.0:
      raise ValueError(f"config.model.attention.select must be in (0, 1], got {self.select}")
    if self.block_size < 1:  # 0 would divide by zero inside the traced pattern code.
      raise ValueError(f"config.model.attention.block_size must be >= 1, got {self.block_size}")
    self.mode = "dense"
    self.prompt_length = 0
    self.pattern = SparsePattern(jnp.zeros((0,), bool))
    self.captures = SparsePattern(jnp.zeros((), jnp.int32))

  def __call__(self, q_btnh, k_bskh, v_bskh, *, positions_bt, causal: bool) -> jax.Array:
    del positions_bt
    if self.mode != "dense" and causal:
      raise ValueError("SparseD attention is for bidirectional (masked-diffusion) models")
    if self.mode == "capture":
      self.pattern.set_value(sparsed_patterns.select_blocks(
          q_btnh, k_bskh, prompt_length=self.prompt_length, block_size=self.block_size,
          select=self.select))
      self.captures.set_value(self.captures.get_value() + 1)
    if self.mode in ("dense", "capture"):
      return jax.nn.dot_product_attention(q_btnh, k_bskh, v_bskh, is_causal=causal)
    return block_sparse.attention(q_btnh, k_bskh, v_bskh, self.block_mask(q_btnh.shape[1]),
                                  implementation=self.implementation)

  def block_mask(self, seq_length: int) -> block_sparse.BlockMask:
    bits = self.pattern.get_value()
    nq = -(-seq_length // self.block_size)
    if bits.ndim != 4 or bits.shape[-2:] != (nq, nq):
      raise ValueError("SparseD has no pattern for this sequence: run a 'capture' step first "
                       "(the sampler hook does it at the switch step)")
    width = sparsed_patterns.max_blocks_per_row(seq_length, self.prompt_length,
                                               self.block_size, self.select)
    return block_sparse.from_block_bits(
        jnp.zeros_like(bits), bits, q_len=seq_length, kv_len=seq_length,
        block_q=self.block_size, block_k=self.block_size, kv_width=1, q_width=1,
        full_kv_width=width, full_kv_capacity=nq * width, kv_capacity=1)


def sparsed_cores(model: nnx.Module) -> list[SparseDAttention]:
  return [m for _, m in nnx.iter_modules(model) if isinstance(m, SparseDAttention)]


def set_mode(model: nnx.Module, mode: str, prompt_length: int | None = None) -> None:
  if mode not in MODES:
    raise ValueError(f"SparseD mode must be one of {MODES}, got {mode!r}")
  cores = sparsed_cores(model)
  if not cores:
    raise ValueError("the model has no SparseD attention: set config.model.attention.kind="
                     "'sparsed'")
  for core in cores:
    core.mode = mode
    if prompt_length is not None:
      core.prompt_length = int(prompt_length)


def switch_step(total_steps: int, skip: float) -> int:
  """The step that captures the pattern; it and the steps before it run dense, the steps
  after it sparse. As the official code: dense through step int(total * skip) + 1
  (``end_time``), the pattern computed at that step (e.g. 128 steps at skip 0.2: steps
  0..26 dense, 101 sparse). At or past ``total_steps`` every step is dense."""
  if not 0.0 <= skip < 1.0:
    raise ValueError(f"SparseD skip must be in [0, 1), got {skip}")
  return int(total_steps * skip) + 1


def sparsed_step_hook(model: nnx.Module, prompt_length: int, skip: float):
  """A sampler ``step_hook`` running SparseD's schedule on ``model``."""

  def hook(step: int, total_steps: int):
    switch = switch_step(total_steps, skip)
    if step == 0:
      for core in sparsed_cores(model):  # A new generation: forget the last pattern.
        core.captures.set_value(jnp.zeros((), jnp.int32))
        core.pattern.set_value(jnp.zeros((0,), bool))  # Same shapes as a fresh model: no retrace.
    mode = "dense" if step < switch else "capture" if step == switch else "sparse"
    set_mode(model, mode, prompt_length)
    return model

  return hook

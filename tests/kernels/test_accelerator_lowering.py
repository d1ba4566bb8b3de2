"""The Pallas kernels lower for GPUs (Triton IR, H200) and TPUs (Mosaic), checked on CPU.

jax turns a Pallas kernel into Triton IR or a Mosaic module in Python; the
device compile (PTX, or Mosaic in libtpu) comes later, on the device. So
lowering for 'cuda' / 'tpu' from a CPU-only machine (`.lower(lowering_platforms=
...)`) catches lowering errors (an op the backend lacks, a block shape it
rejects) at benchmark shapes before an accelerator session spends minutes on
them. The Triton lowering asks for the device's compute capability; jax's own
table for an H200 supplies it. Not covered: the device compile (shared memory,
registers, VMEM) and numerics, which need the device.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import block_sparse, decode, stripe
from pallas_kernels.block_sparse import api as block_sparse_api
from pallas_kernels.decode import api as decode_api
from pallas_kernels.stripe import api as stripe_api

try:  # jax internals: the GPU tests skip (not fail) where a jax version moves them.
  from jax._src.pallas.triton import gpu_info, pallas_call_registration
  H200 = gpu_info.get_gpu_info_from_version(gpu_info.GpuVersion.H200)
except (ImportError, AttributeError) as e:  # pragma: no cover
  H200, NO_GPU_INFO = None, f'this jax has no Triton gpu_info table: {e}'


@pytest.fixture
def lower_only(monkeypatch):
  # Our dispatch refuses 'triton' / 'mosaic_tpu' on a CPU backend (correctly, for running);
  # here we only lower.
  for api in (block_sparse_api, decode_api, stripe_api):
    monkeypatch.setattr(api, 'resolve_implementation', lambda impl, interpret=False: impl)


@pytest.fixture
def as_if_on_h200(monkeypatch, lower_only):
  if H200 is None:  # pragma: no cover
    pytest.skip(NO_GPU_INFO)
  monkeypatch.setattr(pallas_call_registration.gpu_info_lib, 'get_gpu_info', lambda: H200)


def triton_kernels(fn, *args):
  text = jax.jit(fn).trace(*args).lower(lowering_platforms=('cuda',)).as_text()
  return re.findall(r'name = "(\w+)", num_stages', text)


def tpu_custom_calls(fn, *args):
  text = jax.jit(fn).trace(*args).lower(lowering_platforms=('tpu',)).as_text()
  return re.findall(r'custom_call @tpu_custom_call', text)


def _fwd_bwd(mask, implementation):
  def fwd_bwd(q, k, v, do):
    out, vjp = jax.vjp(lambda *a: block_sparse.attention(*a, mask, implementation=implementation),
                       q, k, v)
    return (out,) + vjp(do)
  return fwd_bwd


def _benchmark_masks(l):
  return [block_sparse.causal(l),
          block_sparse.sliding_window(l, window=np.array([100, 300, 700, l]),
                                      sinks=np.array([0, 4, 16, 0]))]


def _decode_args(b=2, n=8, k=2, c=1024, d=128):
  return (jax.ShapeDtypeStruct((b, 1, n, d), jnp.bfloat16),
          jax.ShapeDtypeStruct((b, k, c, d), jnp.bfloat16),
          jax.ShapeDtypeStruct((b, k, c, d), jnp.bfloat16),
          jax.ShapeDtypeStruct((b, k), jnp.int32))


def test_block_sparse_fwd_and_bwd_lower_for_the_gpu_benchmark_shapes(as_if_on_h200):
  l, d = 2048, 128  # gpu_check.py: head dim 128, bf16, 128 x 128 blocks
  q = jax.ShapeDtypeStruct((1, l, 4, d), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((1, l, 2, d), jnp.bfloat16)
  for mask in _benchmark_masks(l):
    kernels = triton_kernels(_fwd_bwd(mask, 'triton'), q, kv, kv, q)
    assert sorted(set(kernels)) == ['block_sparse_dkv', 'block_sparse_dq', 'block_sparse_fwd']


def test_decode_kernel_lowers_for_gpu(as_if_on_h200):
  fn = lambda q, kc, vc, lengths: decode.decode_attention(q, kc, vc, lengths,
                                                          implementation='triton')
  assert triton_kernels(fn, *_decode_args())


def test_block_sparse_fwd_and_bwd_lower_for_tpu(lower_only):
  l, d = 2048, 128
  q = jax.ShapeDtypeStruct((1, l, 4, d), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((1, l, 2, d), jnp.bfloat16)
  for mask in _benchmark_masks(l):
    assert len(tpu_custom_calls(_fwd_bwd(mask, 'mosaic_tpu'), q, kv, kv, q)) >= 3  # fwd, dq, dkv


def test_decode_kernel_lowers_for_tpu(lower_only):
  fn = lambda q, kc, vc, lengths: decode.decode_attention(q, kc, vc, lengths,
                                                          implementation='mosaic_tpu')
  assert tpu_custom_calls(fn, *_decode_args())


def _stripe_fwd_bwd(implementation, list_heads):
  """Causal stripe attention over lists per kv head / per query head, forward and backward."""
  def fwd_bwd(q, k, v, do, idx, counts):
    out, vjp = jax.vjp(lambda *a: stripe.attention(*a, idx, counts, block_q=128, causal=True,
                                                   implementation=implementation), q, k, v)
    return (out,) + vjp(do)
  l, d = 2048, 128  # benchmark shapes: bf16, 4 query heads over 2 kv heads, 256 keys per list
  return fwd_bwd, (jax.ShapeDtypeStruct((1, l, 4, d), jnp.bfloat16),
                   jax.ShapeDtypeStruct((1, l, 2, d), jnp.bfloat16),
                   jax.ShapeDtypeStruct((1, l, 2, d), jnp.bfloat16),
                   jax.ShapeDtypeStruct((1, l, 4, d), jnp.bfloat16),
                   jax.ShapeDtypeStruct((1, list_heads, l // 128, 256), jnp.int32),
                   jax.ShapeDtypeStruct((1, list_heads, l // 128), jnp.int32))


@pytest.mark.parametrize('list_heads', [2, 4])
def test_stripe_kernel_lowers_for_gpu(as_if_on_h200, list_heads):
  fn, args = _stripe_fwd_bwd('triton', list_heads)
  assert sorted(triton_kernels(fn, *args)) == ['stripe_bwd', 'stripe_fwd']


@pytest.mark.parametrize('list_heads', [2, 4])
def test_stripe_kernel_lowers_for_tpu(lower_only, list_heads):
  fn, args = _stripe_fwd_bwd('mosaic_tpu', list_heads)
  assert len(tpu_custom_calls(fn, *args)) == 1  # the backward is the xla pass

"""The Triton kernels lower to Triton IR for an H200, checked on CPU.

jax turns a Pallas Triton kernel into Triton IR in Python; the PTX compile comes
later, inside XLA on the device. So lowering for 'cuda' from a CPU-only machine
(`.lower(lowering_platforms=('cuda',))`) catches lowering errors (an op Triton
lacks, a block shape it rejects) at the GPU benchmark's shapes before a GPU
session spends minutes on them. The lowering asks for the device's compute
capability; jax's own table for an H200 supplies it. Not covered: the PTX
compile (shared memory, registers) and numerics, which need the GPU.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import block_sparse, decode
from pallas_kernels.block_sparse import api as block_sparse_api
from pallas_kernels.decode import api as decode_api

try:  # jax internals: skip (not fail) where a jax version moves them.
  from jax._src.pallas.triton import gpu_info, pallas_call_registration
  H200 = gpu_info.get_gpu_info_from_version(gpu_info.GpuVersion.H200)
except (ImportError, AttributeError) as e:  # pragma: no cover
  pytestmark = pytest.mark.skip(reason=f'this jax has no Triton gpu_info table: {e}')


@pytest.fixture
def as_if_on_h200(monkeypatch):
  monkeypatch.setattr(pallas_call_registration.gpu_info_lib, 'get_gpu_info', lambda: H200)
  # Our dispatch refuses 'triton' on a CPU backend (correctly, for running); here we only lower.
  for api in (block_sparse_api, decode_api):
    monkeypatch.setattr(api, 'resolve_implementation', lambda impl, interpret=False: impl)


def triton_kernels(fn, *args):
  text = jax.jit(fn).trace(*args).lower(lowering_platforms=('cuda',)).as_text()
  return re.findall(r'name = "(\w+)", num_stages', text)


def test_block_sparse_fwd_and_bwd_lower_for_the_gpu_benchmark_shapes(as_if_on_h200):
  l, d = 2048, 128  # gpu_check.py: head dim 128, bf16, 128 x 128 blocks
  q = jax.ShapeDtypeStruct((1, l, 4, d), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((1, l, 2, d), jnp.bfloat16)
  masks = [block_sparse.causal(l),
           block_sparse.sliding_window(l, window=np.array([100, 300, 700, 2048]),
                                       sinks=np.array([0, 4, 16, 0]))]
  for mask in masks:
    def fwd_bwd(q, k, v, do, mask=mask):
      out, vjp = jax.vjp(lambda *a: block_sparse.attention(*a, mask, implementation='triton'),
                         q, k, v)
      return (out,) + vjp(do)
    kernels = triton_kernels(fwd_bwd, q, kv, kv, q)
    assert sorted(set(kernels)) == ['block_sparse_dkv', 'block_sparse_dq', 'block_sparse_fwd']


def test_decode_kernel_lowers(as_if_on_h200):
  b, n, k, c, d = 2, 8, 2, 1024, 128
  q = jax.ShapeDtypeStruct((b, 1, n, d), jnp.bfloat16)
  cache = jax.ShapeDtypeStruct((b, k, c, d), jnp.bfloat16)
  lengths = jax.ShapeDtypeStruct((b, k), jnp.int32)
  fn = lambda q, kc, vc, lengths: decode.decode_attention(q, kc, vc, lengths,
                                                          implementation='triton')
  assert triton_kernels(fn, q, cache, cache, lengths)

"""Influence profiling: the first-order estimate E matches brute-force block drops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparsity_jax.layers import attention as attention_lib
from sparsity_jax.models import ModelConfig, TransformerLM
from sparsity_jax.moa import profile

BASE = dict(vocab_size=260, num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, head_dim=8,
            mlp_dim=64, max_len=64)
T, BLOCK = 64, 4
_DROP = {}


@attention_lib.register_attention("test_drop_block")
class DropBlock(attention_lib.AttentionCore):
  """Causal dense attention; in _DROP's layer, one block of one KV head's query heads is
  scaled down by (1 - eps) (eps = 1: masked) and each row renormalised, i.e. log(1 - eps)
  is added to the block's logits."""

  OPTIONS = ()

  def __init__(self, model_config, *, layer_index, rngs):
    del model_config, rngs
    self.layer_index = layer_index

  def __call__(self, q, k, v, *, positions_bt, causal):
    t, n = q.shape[1], q.shape[2]
    mask = np.tril(np.ones((n, t, t), bool))
    bias = np.zeros((n, t, t), np.float32)
    if _DROP.get("layer") == self.layer_index:
      kv, i, j, eps = _DROP["kv"], _DROP["i"], _DROP["j"], _DROP["eps"]
      g = n // k.shape[2]
      rows, cols = slice(i * BLOCK, (i + 1) * BLOCK), slice(j * BLOCK, (j + 1) * BLOCK)
      if eps >= 1.0:
        mask[kv * g:(kv + 1) * g, rows, cols] = False
      else:
        bias[kv * g:(kv + 1) * g, rows, cols] = np.log1p(-eps)
    return jax.nn.dot_product_attention(q, k, v, bias=jnp.asarray(bias)[None],
                                        mask=jnp.asarray(mask)[None])


def _loss(model, tokens):
  logits = model(tokens[:, :-1])
  return float(profile.response_loss(logits, tokens[:, 1:], jnp.ones_like(tokens[:, 1:])))


def test_influence_matches_brute_force_block_drop():
  seed = np.random.randint(1 << 30)
  model = TransformerLM(ModelConfig(**BASE), rngs=nnx.Rngs(seed % 1000))
  tokens = jax.random.randint(jax.random.key(seed), (1, T + 1), 0, 256)
  mask = np.ones((1, T + 1), np.int32)
  base, layers = profile.capture(profile.profiling_model(model), tokens, mask)
  assert base == pytest.approx(_loss(model, tokens), rel=1e-5)
  drop = TransformerLM(ModelConfig(**BASE, attention={"kind": "test_drop_block"}),
                       rngs=nnx.Rngs(0))
  nnx.update(drop, nnx.state(model, nnx.Param))
  estimates, full = [], []
  # The last layer: an earlier layer's drop also moves later softmaxes (second order).
  for layer in (1,):
    blocks, _ = profile.layer_influence(*layers[layer], block_size=BLOCK, sink=0,
                                        take_abs=False)
    blocks = np.asarray(blocks)
    for kv in range(2):
      cand = [(abs(blocks[kv, i, j]), i, j) for i in range(T // BLOCK // 2, T // BLOCK)
              for j in range(i)]
      for _, i, j in sorted(cand, reverse=True)[:3]:
        estimates.append(blocks[kv, i, j])
        _DROP.update(layer=layer, kv=kv, i=i, j=j, eps=1.0)
        full.append(_loss(drop, tokens) - base)
  _DROP.clear()
  estimates, full = np.array(estimates), np.array(full)
  # E is a first-order estimate of a finite change (a whole block removed, rows
  # renormalised). Second-order terms grow with a block's attention mass, so single
  # blocks (those holding most of a row's mass, where 1 / (1 - A) is large) can be off by
  # a factor of 2-3; the estimate must still have every sign right and the right scale.
  np.testing.assert_array_equal(np.sign(full), np.sign(estimates))
  ratios = full / estimates
  assert 0.7 < float(np.median(ratios)) < 1.4, (full, estimates)
  assert (np.abs(ratios - 1) < 0.5).sum() >= 4, (full, estimates)


def test_distance_statistic_is_the_cost_of_a_window():
  """sum_{d >= w} distance[d] equals |E| summed over exactly the pairs a rule drops."""
  key = jax.random.split(jax.random.key(np.random.randint(1 << 30)), 5)
  t, h, sink = 16, 8, 3
  q, k, v, do = (jax.random.normal(kk, (t, h)) for kk in key[:4])
  a = jax.nn.softmax(jnp.where(np.tril(np.ones((t, t), bool)), q @ k.T / np.sqrt(h), -np.inf))
  o = a @ v
  blocks, dist = profile.head_influence(q, k, v, o, do, block_size=4, sink=sink)
  g = np.asarray(do @ v.T)
  a = np.asarray(a)
  e = np.abs(-a * (g - (g * a).sum(-1, keepdims=True)) / np.maximum(1 - a, 1e-6))
  e[0] = np.abs(g[0] * a[0])
  e = np.tril(e)
  np.testing.assert_allclose(blocks, e.reshape(4, 4, 4, 4).sum((1, 3)), rtol=1e-4, atol=1e-6)
  i, j = np.arange(t)[:, None], np.arange(t)[None, :]
  for w in (1, 2, 5, 16):
    dropped = (j <= i) & (i - j >= w) & (j >= sink)
    np.testing.assert_allclose(np.asarray(dist)[w:].sum(), e[dropped].sum(), rtol=1e-4)


def test_profile_bad_input():
  model = TransformerLM(ModelConfig(**BASE), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="no calibration samples"):
    profile.profile_length(model, [], length=32, block_size=8)
  with pytest.raises(ValueError, match="multiple of block_size"):
    profile.profile_length(model, [(np.zeros(31), np.ones(31))], length=30, block_size=8)

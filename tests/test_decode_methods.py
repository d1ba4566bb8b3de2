"""Quest, SnapKV and Ada-SnapKV decode cores: selections against numpy ports of the Sparse
Frontier's code, decoding against dense attention restricted to the selected tokens."""

import decode_official as official
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from support import make_tiny_config

from sparsity_jax.layers import decode_methods
from sparsity_jax.layers.attention import make_attention_core
from sparsity_jax.models import generation
from sparsity_jax.models import ModelConfig, TransformerLM
from sparsity_jax.patterns import quest as quest_lib
from sparsity_jax.patterns import snapkv as snapkv_lib

N, KH, D = 4, 2, 16
LM = dict(vocab_size=260, num_layers=1, d_model=32, num_heads=N, num_kv_heads=KH, head_dim=D,
          mlp_dim=64, max_len=128)
SNAP = dict(token_capacity=40, window=16, kernel_size=5, local_window=8, prefix_tokens=2)


def fresh_seed():
  return int(np.random.SeedSequence().entropy % 2**31)


def randn(rng, *shape, scale=1.0):
  return (scale * rng.standard_normal(shape)).astype(np.float32)


def core_of(kind, **opts):
  c = make_tiny_config()
  c.model.num_heads, c.model.num_kv_heads, c.model.head_dim = N, KH, D
  c.model.attention = ml_collections.ConfigDict({"kind": kind, **opts})
  core = make_attention_core(c.model, 0, nnx.Rngs(0))
  assert type(core) is {"quest": decode_methods.QuestAttention,
                        "snapkv": decode_methods.SnapKVAttention,
                        "ada_snapkv": decode_methods.AdaSnapKVAttention}[kind]
  return core


@pytest.mark.parametrize("share_pages", [True, False])
def test_quest_selection_equals_official_port(share_pages):
  seed = fresh_seed()
  rng = np.random.default_rng(seed)
  page, budget = 4, 3
  for t in (37, 40):  # A partial and a just-completed current page.
    keys = randn(rng, t, KH, D)
    query = randn(rng, N, D)
    want = official.quest_select(official.quest_page_reps(keys, page), query, t, page, budget,
                                 share_pages)
    slots = quest_lib.num_pages(t, page) * page
    k_bkhs = np.zeros((1, KH, D, slots), np.float32)
    k_bkhs[0, :, :, :t] = keys.transpose(1, 2, 0)
    kmin, kmax = quest_lib.page_bounds(jnp.asarray(k_bkhs), t, page)
    current = (t - 1) // page
    got = np.asarray(quest_lib.select_pages(jnp.asarray(query)[None], kmin, kmax, current,
                                            page_budget=budget, share_pages=share_pages))[0]
    if share_pages:
      got = np.repeat(got, N // KH, axis=0)
    for h in range(N):
      assert set(got[h]) | {current} == set(want[h]), (seed, t, h)


@pytest.mark.parametrize("adaptive", [False, True])
def test_snapkv_selection_equals_official_port(adaptive):
  seed = fresh_seed()
  rng = np.random.default_rng(seed)
  t = 96
  q, k = randn(rng, t, N, D, scale=2.0), randn(rng, t, KH, D, scale=2.0)
  qj, kj = jnp.asarray(q)[None], jnp.asarray(k)[None]
  if adaptive:
    want = official.ada_snapkv_select(q, k, **SNAP, min_head_capacity_ratio=0.2)
    got = np.asarray(snapkv_lib.select_adaptive(qj, kj, **_lib_args(), min_ratio=0.2))[0]
    assert got.sum() == SNAP["token_capacity"] * KH
    # A head with constant keys (uniform attention, flat votes) cedes budget to a peaky one.
    flat = k.copy()
    flat[:, 1] = 0.0
    kept = np.asarray(snapkv_lib.select_adaptive(qj, jnp.asarray(flat)[None], **_lib_args(),
                                                 min_ratio=0.2))[0].sum(-1)
    assert kept[0] > SNAP["token_capacity"] > kept[1], kept
  else:
    want = official.snapkv_select(q, k, **SNAP)
    got = np.asarray(snapkv_lib.select(qj, kj, **_lib_args()))[0]
  np.testing.assert_array_equal(got, want, err_msg=f"seed {seed}")


def _lib_args():
  return dict(capacity=SNAP["token_capacity"], window=SNAP["window"],
              kernel_size=SNAP["kernel_size"], local_window=SNAP["local_window"],
              prefix_tokens=SNAP["prefix_tokens"])


def restricted_attention(q_nd, k_skd, v_skd, allowed_ns):
  """One query's attention over the allowed keys (numpy oracle), [n, d]."""
  k = np.repeat(k_skd, N // KH, axis=1)
  v = np.repeat(v_skd, N // KH, axis=1)
  s = np.einsum("nd,snd->ns", q_nd, k) / np.sqrt(D)
  s = np.where(allowed_ns, s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum("ns,snd->nd", p, v)


CASES = {
    "quest": dict(token_budget=12, page_size=4),
    "quest_unshared": dict(token_budget=12, page_size=4, share_pages=False),
    "snapkv": SNAP,
    "ada_snapkv": SNAP,
}


@pytest.mark.parametrize("case", list(CASES))
def test_decode_equals_dense_over_selected_tokens(case):
  """Prefill is dense; each decode step equals attention over the official selection."""
  kind = case.split("_unshared")[0]
  opts = CASES[case]
  core = core_of(kind, **opts)
  seed = fresh_seed()
  rng = np.random.default_rng(seed)
  t, steps = 61, 3
  q, k, v = (randn(rng, 1, t + steps, h, D, scale=2.0) for h in (N, KH, KH))
  cache = core.init_cache(1, t + steps, num_kv_heads=KH, head_dim=D, dtype=jnp.float32)
  call = nnx.jit(lambda c, q, k, v, p, cache: c.cached_call(q, k, v, positions_bt=p,
                                                             cache=cache))
  pos = jnp.arange(t + steps)[None]
  o, cache = call(core, q[:, :t], k[:, :t], v[:, :t], pos[:, :t], cache)
  dense = jax.nn.dot_product_attention(q[:, :t], k[:, :t], v[:, :t], is_causal=True)
  np.testing.assert_allclose(np.asarray(o), np.asarray(dense), rtol=1e-5, atol=1e-5)
  if kind != "quest":
    official_select = (official.ada_snapkv_select if kind == "ada_snapkv"
                       else official.snapkv_select)
    extra = {"min_head_capacity_ratio": 0.2} if kind == "ada_snapkv" else {}
    kept = official_select(q[0, :t], k[0, :t], **SNAP, **extra)
    if kind == "snapkv":
      mask = np.zeros((KH, t), bool)
      np.put_along_axis(mask, kept, True, axis=1)
      kept = mask
  for i in range(steps):
    j = t + i
    o, cache = call(core, q[:, j:j + 1], k[:, j:j + 1], v[:, j:j + 1], pos[:, j:j + 1], cache)
    if kind == "quest":
      idx = official.quest_select(official.quest_page_reps(k[0, :j + 1], 4), q[0, j], j + 1, 4,
                                  3, opts.get("share_pages", True))
      allowed = np.zeros((N, j + 1), bool)
      for h in range(N):
        for p_ in idx[h]:
          allowed[h, p_ * 4:min(p_ * 4 + 4, j + 1)] = True
    else:
      allowed = np.repeat(np.concatenate([kept, np.ones((KH, i + 1), bool)], 1), N // KH, 0)
    want = restricted_attention(q[0, j], k[0, :j + 1], v[0, :j + 1], allowed)
    np.testing.assert_allclose(np.asarray(o)[0, 0], want, rtol=2e-5, atol=2e-5,
                               err_msg=f"{case} step {i} seed {seed}")
    read = np.asarray(core.kv_read.get_value())
    np.testing.assert_allclose(read, allowed.sum(-1) / (j + 1), rtol=1e-6)
    assert read.max() < 1


def test_snapkv_decode_room_overflow_is_never_silent():
  """Eager: CacheOverflowError naming decode_room; jitted: NaN; generate: raises."""
  from sparsity_jax.layers.attention import CacheOverflowError

  core = core_of("snapkv", **SNAP, decode_room=1)
  rng = np.random.default_rng(fresh_seed())
  t = 50
  q, k, v = (randn(rng, 1, t + 2, h, D) for h in (N, KH, KH))
  pos = jnp.arange(t + 2)[None]
  cache = core.init_cache(1, t + 2, num_kv_heads=KH, head_dim=D, dtype=jnp.float32)
  assert cache["k"].shape[2] == SNAP["token_capacity"] + 1
  jitted = nnx.jit(lambda c, q, k, v, p, cache: c.cached_call(q, k, v, positions_bt=p,
                                                               cache=cache))
  outs = []
  for lo, hi in ((0, t), (t, t + 1), (t + 1, t + 2)):
    args = (q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], pos[:, lo:hi])
    if hi == t + 2:
      with pytest.raises(CacheOverflowError, match="decode_room"):
        core.cached_call(*args[:3], positions_bt=args[3], cache=cache)
    o, cache = jitted(core, *args, cache)
    outs.append(np.asarray(o))
  assert np.isfinite(outs[1]).all() and np.isnan(outs[2]).all()
  model = TransformerLM(ModelConfig(**LM, attention={"kind": "snapkv", **SNAP, "decode_room": 2}),
                        rngs=nnx.Rngs(0))
  prompt = rng.integers(0, 256, (1, 60))
  assert generation.generate(model, prompt, 3).shape == (1, 63)  # 2 decode steps fit.
  with pytest.raises(CacheOverflowError, match="NaN logits"):
    generation.generate(model, prompt, 5)


def test_stats_describe_the_last_generation_and_scanned_caches_decode_eagerly():
  """A generation without a decode step leaves kv_read = 1 (not the previous one's); a
  stacked (scan_layers) SnapKV cache decodes eagerly."""
  model = TransformerLM(ModelConfig(**LM, scan_layers=True, attention={
      "kind": "snapkv", **SNAP}), rngs=nnx.Rngs(0))
  rng = np.random.default_rng(fresh_seed())
  generation.generate(model, rng.integers(0, 256, (1, 90)), 3)
  assert decode_methods.decode_stats(model)["kv_read"] < 0.7
  generation.generate(model, rng.integers(0, 256, (1, 90)), 1)
  assert decode_methods.decode_stats(model)["kv_read"] == 1.0
  cache = model.init_cache(1, 96)
  _, cache = model.decode(jnp.asarray(rng.integers(0, 256, (1, 90))), cache)
  logits, _ = model.decode(jnp.ones((1, 1), jnp.int32), cache)
  assert np.isfinite(np.asarray(logits)).all()


@pytest.mark.parametrize("kind,opts", [
    ("quest", {"token_budget": 12, "page_size": 8}),
    ("quest", {"token_capacity": 64}),  # SnapKV's key: would silently do nothing.
    ("quest", {"share_pages": "no"}),
    ("snapkv", {"token_capacity": 8, "local_window": 8}),
    ("snapkv", {"kernel_size": 4}),
    ("snapkv", {"prefix_tokens": 2.5}),
    ("snapkv", {"min_head_capacity_ratio": 0.2}),
    ("ada_snapkv", {"min_head_capacity_ratio": 1.5}),
    ("ada_snapkv", {"min_head_capacity_ratio": "0.2"}),
])
def test_bad_options_name_the_fix(kind, opts):
  with pytest.raises(ValueError, match="|".join(opts)):
    core_of(kind, **opts)


@pytest.mark.parametrize("kind,small,large,scan_layers", [
    ("quest", {"token_budget": 16, "page_size": 8}, {"token_budget": 128, "page_size": 8}, True),
    ("ada_snapkv", dict(SNAP, window=8), None, False),
])
def test_generate_with_decode_cores(kind, small, large, scan_layers):
  """A budget past the context reproduces dense generation; a small one reads fewer keys."""
  prompt = np.random.default_rng(fresh_seed()).integers(0, 256, (2, 70))
  outs = {}
  settings = (("small", small),) if large is None else (
      ("dense", None), ("large", large), ("small", small))
  for name, opts in settings:
    attention = {"kind": "dense"} if opts is None else {"kind": kind, **opts}
    model = TransformerLM(ModelConfig(**LM, scan_layers=scan_layers, attention=attention),
                          rngs=nnx.Rngs(0))
    outs[name] = generation.generate(model, prompt, 4)
    if name == "small":
      stats = decode_methods.decode_stats(model)
      assert 0 < stats["kv_read"] < 0.8, stats
      assert stats["per_layer"].shape == (LM["num_layers"], N)
  if large is not None:
    np.testing.assert_array_equal(outs["large"], outs["dense"])

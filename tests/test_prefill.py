"""Training-free sparse prefill cores (layers/prefill.py, patterns/*): selection against numpy
ports of the official code (tests/prefill_official.py), outputs and gradients against the
dense masked reference on the same pattern, the densest setting against dense attention,
the KV-cache paths, and bad input.

Shapes stay small (t of a few hundred to a thousand, 4 query / 2 kv heads) with the
methods' block sizes scaled down, so that every method selects a real pattern. Compiling
dominates the time, so compiled functions are cached per (kind, options, what) and reused
by every test with the same shapes.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import prefill_official as official
from sparsity_jax.layers import prefill as prefill_layers
from sparsity_jax.layers.attention import make_attention_core
from sparsity_jax.models import ModelConfig, TransformerLM
from sparsity_jax.patterns import pbs as pbs_lib
from sparsity_jax.patterns import prefill as prefill_lib

N, KH, D = 4, 2, 16
MODEL = dict(vocab_size=64, num_layers=1, d_model=32, num_heads=N, num_kv_heads=KH,
             head_dim=D, mlp_dim=64, max_len=1024, causal=True)
KINDS = ("anchor", "block_topk", "flexprefill", "pbs", "vertical_slash")

# Per kind: small-scale options under which the method selects a real pattern.
CASES = {
    # AnchorAttention: big blocks of 16 x 16 = 256 tokens (the official allows block 16).
    "anchor": dict(block_size=16, step=16, theta=9.0),
    "block_topk": dict(block_size=16, top_k=6),
    # tau 0.25 splits these random heads into query-aware and vertical-slash ones;
    # budget_block 16: the official's literal 128 would leave a 16-token-block test nothing.
    "flexprefill": dict(block_size=16, gamma=0.9, tau=0.25, min_budget=32, budget_block=16),
    "pbs": dict(block_size=16, segment_size=64, threshold=0.6),
    "vertical_slash": dict(vertical_size=24, slash_size=66, last_q=32, block_size=64),
}
# (ragged length: selection, outputs, gradients; block-multiple length: budgets test).
LENGTHS = {kind: (333, 384) for kind in KINDS}
LENGTHS["anchor"] = (1100, 1024)
DENSEST = {
    "anchor": dict(block_size=16, step=16, theta=1e9, candidates="all"),
    "block_topk": dict(block_size=16, top_k=4096),
    "flexprefill": dict(block_size=16, gamma=1.0, tau=0.0, min_budget=10**6),
    "pbs": dict(block_size=16, segment_size=64, threshold=1.0),
    "vertical_slash": dict(vertical_size=4096, slash_size=4096, last_q=32, block_size=64),
}
BEYOND = {  # Budgets larger than the sequence (and FlexPrefill's literal 128).
    "anchor": dict(block_size=64),  # Big blocks of 1024: the official runs all but the tail dense.
    "block_topk": dict(top_k=10**6),
    "flexprefill": dict(max_budget=10**6, budget_block=128),
    "pbs": dict(segment_size=1024),  # One segment: the official dense fallback.
    "vertical_slash": dict(vertical_size=10**6, last_q=10**6),
}


def official_mask(kind, q, k, opts):
  """The official computed pairs [n, t, t] for q [t, n, d], k [t, kh, d]; every causal pair
  where the official falls back to dense attention."""
  t = q.shape[0]
  k = np.repeat(k, q.shape[1] // k.shape[1], axis=1)
  if kind == "vertical_slash":
    assert opts["block_size"] == 64  # The MInference index builder is fixed at 64 x 64.
    mask = official.vertical_slash(q, k, opts["vertical_size"], opts["slash_size"],
                                   opts["last_q"])
  elif kind == "block_topk":
    mask = official.block_topk(q, k, opts["top_k"], opts["block_size"])
  elif kind == "flexprefill":
    mask = official.flexprefill(q, k, opts["gamma"], opts["tau"], opts.get("min_budget"),
                                opts.get("max_budget"), opts["block_size"],
                                opts.get("budget_block", 128))
  elif kind == "pbs":
    mask = official.pbs(q, k, opts["block_size"], opts["segment_size"], opts["threshold"])
  elif kind == "anchor":
    mask = official.anchor(q, k, opts["block_size"], opts["step"], opts["theta"])
    # The released candidate loop re-selects initial-window keys, which the official counts
    # twice in the softmax; as a set of computed pairs it is the same.
  else:
    raise AssertionError(kind)
  return np.broadcast_to(official.causal(t), (q.shape[1], t, t)) if mask is None else mask


def make_core(kind, **opts):
  cfg = ModelConfig(**MODEL, attention={"kind": kind, **opts})
  return make_attention_core(cfg, 0, nnx.Rngs(0))


_JITTED = {}


def jitted(kind, opts, what):
  """A compiled function of a core with these options, cached (see the module docstring)."""
  key = (kind, tuple(sorted(opts.items())), what)
  if key not in _JITTED:
    core = make_core(kind, **opts)
    if what == "allowed":
      fn = jax.jit(lambda q, k: core.allowed(core.select(q, k), q.shape[1]))
    elif what == "call":  # __call__ and its statistics (sparse calls made by this call).
      def call_core(c, q, k, v):
        before = c.sparse_calls.get_value()
        out = call(c, q, k, v)
        return out, c.density.get_value(), c.sparse_calls.get_value() - before
      fn = (lambda f, c: lambda q, k, v: f(c, q, k, v))(nnx.jit(call_core), core)
    elif what == "grads":
      def fn(q, k, v, do):
        pattern = core.select(q, k)
        loss = lambda q, k, v: jnp.sum(core.attend(q, k, v, pattern) * do)
        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
      fn = jax.jit(fn)
    elif what == "attend":
      fn = jax.jit(core.attend)
    else:
      raise AssertionError(what)
    _JITTED[key] = fn
  return _JITTED[key]


def qkv(seed, t, scale=2.0, b=1):
  """Peaky random q / k (scaled normals) so that the patterns are far from uniform."""
  ks = jax.random.split(jax.random.key(seed), 3)
  q = scale * jax.random.normal(ks[0], (b, t, N, D), jnp.float32)
  k = scale * jax.random.normal(ks[1], (b, t, KH, D), jnp.float32)
  v = jax.random.normal(ks[2], (b, t, KH, D), jnp.float32)
  return q, k, v


@jax.jit
def masked_reference(q, k, v, allowed):
  """Dense softmax attention of q [b, t, n, d] over k / v [b, t, kh, d] where allowed
  [b, n, t, t] (the oracle; rows with no allowed key give 0)."""
  k, v = (jnp.repeat(x, q.shape[2] // x.shape[2], axis=2) for x in (k, v))
  s = jnp.einsum("btnd,bsnd->bnts", q, k) * q.shape[-1] ** -0.5
  s = jnp.where(allowed, s, -jnp.inf)
  p = jnp.exp(s - jnp.max(jnp.where(allowed, s, 0.0), axis=-1, keepdims=True))
  p = jnp.where(allowed, p, 0.0)
  p = p / jnp.maximum(p.sum(-1, keepdims=True), 1e-30)
  return jnp.einsum("bnts,bsnd->btnd", p, v)


@jax.jit
def _reference_grads(q, k, v, do, allowed):
  loss = lambda q, k, v: jnp.sum(masked_reference(q, k, v, allowed) * do)
  return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)


def dense_reference(q, k, v):
  return jax.nn.dot_product_attention(q, k, v, is_causal=True)


def call(core, q, k, v):
  pos = jnp.broadcast_to(jnp.arange(q.shape[1]), q.shape[:2])
  return core(q, k, v, positions_bt=pos, causal=True)


@pytest.mark.parametrize("kind", KINDS)
def test_selection_equals_official_port(kind):
  length = LENGTHS[kind][0]
  allowed = jitted(kind, CASES[kind], "allowed")
  aware = []
  for seed in (0, 1):
    q, k, _ = qkv(seed + length, length)
    got = np.asarray(allowed(q, k))[0]
    want = official_mask(kind, np.asarray(q)[0], np.asarray(k)[0], CASES[kind])
    np.testing.assert_array_equal(got, want)
    density = got.sum() / (N * prefill_lib.causal_pair_count(length))
    assert 0.05 < density < 0.95, density  # A real selection, neither empty nor dense.
    if kind == "flexprefill":
      kn = np.repeat(np.asarray(k)[0], N // KH, axis=1)
      aware.extend(official.flexprefill(np.asarray(q)[0], kn, 0.9, 0.25, 32, None, 16, 16,
                                        return_jsd=True) < CASES[kind]["tau"])
  if kind == "flexprefill":  # Both pattern types occurred among these heads.
    assert any(aware) and not all(aware), aware


@pytest.mark.parametrize("kind", KINDS)
def test_budgets_beyond_the_sequence_and_block_multiples(kind):
  """Sizes past the sequence keep everything there is (or fall back to dense), as the
  official code does; at a block-multiple length."""
  opts = {**CASES[kind], **BEYOND[kind]}
  length = LENGTHS[kind][1]
  q, k, _ = qkv(2, length)
  got = np.asarray(jitted(kind, opts, "allowed")(q, k))[0]
  np.testing.assert_array_equal(got, official_mask(kind, np.asarray(q)[0], np.asarray(k)[0],
                                                   opts))


@pytest.mark.parametrize("kind", KINDS)
def test_core_output_equals_masked_reference(kind):
  t = LENGTHS[kind][0]
  b = 2 if kind == "vertical_slash" else 1  # Batch 2 once: each row selects its own pattern.
  q, k, v = qkv(7, t, b=b)
  out, density, calls = jitted(kind, CASES[kind], "call")(q, k, v)
  allowed = np.asarray(jitted(kind, CASES[kind], "allowed")(q, k))
  assert allowed.shape == (b, N, t, t) and int(calls) == 1
  if b == 2:
    assert (allowed[0] != allowed[1]).any()
  np.testing.assert_allclose(np.asarray(out), np.asarray(masked_reference(q, k, v, allowed)),
                             atol=2e-5, rtol=0)
  # The recorded density is the computed share of causal pairs, per head (batch mean).
  want = allowed.sum((-1, -2)).mean(0) / prefill_lib.causal_pair_count(t)
  np.testing.assert_allclose(np.asarray(density), want, rtol=1e-6)


# One kind per compute path: PBS's block-sparse tiles (FlexPrefill and block top-k run the
# same kernel on unpermuted tiles), Vertical-Slash's key lists, AnchorAttention's lse merge.
@pytest.mark.parametrize("kind", ["anchor", "pbs", "vertical_slash"])
def test_core_gradients_equal_masked_reference(kind):
  t = LENGTHS[kind][0]
  q, k, v = qkv(7, t)
  allowed = jitted(kind, CASES[kind], "allowed")(q, k)
  do = jax.random.normal(jax.random.key(4), q.shape)
  got = jitted(kind, CASES[kind], "grads")(q, k, v, do)
  want = _reference_grads(q, k, v, do, allowed)
  for g, w in zip(got, want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=5e-4, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_densest_setting_equals_dense(kind):
  opts = dict(DENSEST[kind], dense_len=1)  # No fallback: the sparse path runs.
  t = LENGTHS[kind][0]
  q, k, v = qkv(11, t)
  out, density, calls = jitted(kind, opts, "call")(q, k, v)
  assert int(calls) == 1
  np.testing.assert_allclose(np.asarray(density), 1.0, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(out), np.asarray(dense_reference(q, k, v)), atol=2e-5)


def test_dense_fallback_lengths_and_short_inputs():
  """Each method's official fallback (inputs of at most dense_len tokens run dense); the
  dense path itself is the shared base class's (run once)."""
  want = {"anchor": 3 * 256 - 1,  # Below 3 big blocks the windows cover every causal key.
          "block_topk": 16 * 6,  # Every row would keep all its blocks.
          "flexprefill": max(2 * 16, 32),  # max(2 block_size, min_budget in blocks).
          "pbs": 64,  # q_len <= segment_size.
          "vertical_slash": max(32, 64)}  # last_q (the estimate), at least the 64 forced slashes.
  for kind in KINDS:
    assert make_core(kind, **CASES[kind]).dense_len == want[kind], kind
  assert make_core("pbs", **CASES["pbs"], dense_len=7).dense_len == 7
  kind = "pbs"
  t = want[kind]
  q, k, v = qkv(5, t)
  out, density, calls = jitted(kind, CASES[kind], "call")(q, k, v)
  assert int(calls) == 0
  np.testing.assert_allclose(np.asarray(density), 1.0)
  np.testing.assert_allclose(np.asarray(out), np.asarray(dense_reference(q, k, v)), atol=2e-5)


def test_cache_prefill_is_sparse_and_chunks_are_dense():
  """The base class's cache paths (shared by every method; one method suffices)."""
  kind = "block_topk"
  core = make_core(kind, **CASES[kind])
  t, extra = LENGTHS[kind][0], 5
  q, k, v = qkv(9, t + extra)
  cache = core.init_cache(1, t + extra + 2, num_kv_heads=KH, head_dim=D, dtype=jnp.float32)
  pos = jnp.arange(t + extra)[None]
  out, cache = core.cached_call(q[:, :t], k[:, :t], v[:, :t], positions_bt=pos[:, :t],
                                cache=cache)
  want = jitted(kind, CASES[kind], "call")(q[:, :t], k[:, :t], v[:, :t])[0]
  np.testing.assert_allclose(np.asarray(out), np.asarray(want), atol=1e-6)
  assert int(cache["end"]) == t and int(core.sparse_calls.get_value()) == 1
  np.testing.assert_array_equal(np.asarray(cache["k"][0, :, :, :t]),
                                np.asarray(k[0, :t].transpose(1, 2, 0)))
  # A chunk appended to the filled cache (q_len != kv_len) attends densely.
  got, cache2 = core.cached_call(q[:, t:], k[:, t:], v[:, t:], positions_bt=pos[:, t:],
                                 cache=cache)
  np.testing.assert_allclose(np.asarray(got), np.asarray(dense_reference(q, k, v)[:, t:]),
                             atol=2e-5)
  assert int(cache2["end"]) == t + extra and int(core.sparse_calls.get_value()) == 1
  np.testing.assert_allclose(np.asarray(core.density.get_value()), 1.0)


def test_model_prefill_through_cache_equals_forward_and_decodes():
  cfg = ModelConfig(**MODEL, attention={"kind": "vertical_slash", **CASES["vertical_slash"]})
  model = TransformerLM(cfg, rngs=nnx.Rngs(0))
  # Batch 2: each row selects its own pattern.
  tokens = jax.random.randint(jax.random.key(0), (2, 300), 0, MODEL["vocab_size"])
  full = nnx.jit(lambda m, x: m(x))(model, tokens)
  stats = prefill_layers.prefill_stats(model)
  assert stats["sparse_calls"].tolist() == [1] and 0 < stats["density"] < 1
  step = nnx.jit(lambda m, x, c: m.decode(x, c))
  logits, cache = step(model, tokens, model.init_cache(2, 310))
  np.testing.assert_allclose(np.asarray(logits), np.asarray(full), atol=1e-4)
  logits, cache = step(model, tokens[:, -1:] * 0 + 3, cache)  # One decode step, dense.
  assert logits.shape == (2, 1, MODEL["vocab_size"]) and int(cache[0]["end"]) == 301
  assert np.isfinite(np.asarray(logits)).all()
  assert prefill_layers.prefill_stats(model)["density"] == stats["density"]  # Decode keeps it.


def test_pbs_permuted_queries_get_their_outputs_back():
  """The builder accepts a query permutation within segments (the paper's formulation; the
  released code keeps queries in order): causality stays by original position and the
  core puts the outputs back in order."""
  t, seg = LENGTHS["pbs"][0], CASES["pbs"]["segment_size"]
  q, k, v = qkv(13, t)
  rng = np.random.default_rng(0)
  q_perm = np.concatenate([rng.permutation(np.arange(s0, min(s0 + seg, t)))
                           for s0 in range(0, t, seg)])
  pattern = jax.jit(lambda q, k: pbs_lib.select(
      q, k, block_size=16, segment_size=seg, threshold=0.6,
      q_perm=jnp.broadcast_to(q_perm, (1, N, t))))(q, k)
  out = jitted("pbs", CASES["pbs"], "attend")(q, k, v, pattern)
  allowed = np.asarray(pbs_lib.allowed(pattern, t, 16, seg))
  assert (allowed <= np.tril(np.ones((t, t), bool))).all()  # Causal by original position.
  assert not (pattern["q_perm"] == np.arange(t)).all()
  np.testing.assert_allclose(np.asarray(out), np.asarray(masked_reference(q, k, v, allowed)),
                             atol=2e-5)


@pytest.mark.parametrize("kind,key,value", [
    ("vertical_slash", "vertical_size", 0), ("vertical_slash", "slash_size", 32),
    ("vertical_slash", "last_q", -1), ("block_topk", "top_k", 2),
    ("block_topk", "block_size", 0), ("block_topk", "dense_len", 0),
    ("flexprefill", "gamma", 0.0), ("flexprefill", "gamma", 1.5), ("flexprefill", "tau", -0.1),
    ("flexprefill", "min_budget", 10**6),  # Above max_budget (set below).
    ("pbs", "threshold", 0.0), ("pbs", "threshold", 1.01), ("pbs", "segment_size", 40),
    ("anchor", "candidates", "some"), ("anchor", "step", 0), ("anchor", "theta", float("nan")),
])
def test_bad_config_raises(kind, key, value):
  extra = {"max_budget": 64} if key == "min_budget" else {}
  with pytest.raises(ValueError, match=key):
    make_core(kind, **{**CASES[kind], **extra, key: value})


@pytest.mark.parametrize("kind", KINDS)
def test_unequal_lengths_raise(kind):
  core = make_core(kind, **CASES[kind])
  q, k, v = (jnp.zeros((1, 300, h, D)) for h in (N, KH, KH))
  with pytest.raises(ValueError, match="prefill"):
    core.select(q[:, :200], k)
  with pytest.raises(ValueError, match="cached_call"):
    core(q[:, :200], k, v, positions_bt=jnp.arange(200)[None], causal=True)
  with pytest.raises(ValueError, match="causal"):
    core(q, k, v, positions_bt=jnp.arange(300)[None], causal=False)


def test_prefill_benchmark_refuses_a_run_directory_of_another_length(tmp_path, capsys):
  """benchmarks/prefill_methods.py resumes a setting whose rows are in results.json: rows
  measured at another --length must not be taken as done (refused before the model loads)."""
  import importlib.util
  import json
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  spec = importlib.util.spec_from_file_location(
      "prefill_methods", os.path.join(root, "benchmarks", "prefill_methods.py"))
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)
  (tmp_path / "results.json").write_text(json.dumps({"_meta": {"length": 4096},
                                                     "dense": {"ppl": 5.0}}))
  with pytest.raises(SystemExit):
    bench.main([f"--out={tmp_path}", "--length=2048"])
  assert "holds runs at --length=4096: use another --out" in capsys.readouterr().err

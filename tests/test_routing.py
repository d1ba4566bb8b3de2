"""Routing Transformer attention: k-means, balanced clusters, causality, cache decoding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from support import make_tiny_config
from sparsity_jax.layers import rope
from sparsity_jax.layers.attention import AuxLoss
from sparsity_jax.layers.routing import RoutingAttention
from sparsity_jax.models import ModelConfig, TransformerLM, generation
from sparsity_jax.patterns import routing as routing_lib
from sparsity_jax.train import loop, train_and_evaluate
from sparsity_jax.train.metrics import read_jsonl

BASE = dict(vocab_size=260, num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, head_dim=8,
            mlp_dim=64, max_len=128)
ROUTING = {"kind": "routing", "window": 16, "num_clusters": 4, "num_routing_heads": 2,
           "local_block": 16}


def _seed():
  return np.random.randint(1 << 30)


# One compiled forward per input shape; eager forwards of the whole model cost ~4x more.
# nnx.jit carries state updates (k-means centroids in training mode) back to the model.
_forward = nnx.jit(lambda model, tokens: model(tokens))


def test_kmeans_recovers_planted_clusters():
  rng = np.random.default_rng(_seed())
  centers = rng.normal(size=(4, 16)) * 4
  labels = rng.integers(0, 4, size=(8, 128))
  x = centers[labels] + rng.normal(size=(8, 128, 16)) * 0.3
  x = routing_lib.scale_free_layer_norm(jnp.asarray(x, jnp.float32))[:, :, None, :]
  means = routing_lib.kmeans_init(x, 4, jax.random.key(_seed()))
  counts, sums = routing_lib.cluster_statistics(x, means)
  ema_counts, ema_sums = counts, sums
  for _ in range(20):  # The EMA keeps good centroids where they are.
    counts, sums = routing_lib.cluster_statistics(x, means)
    ema_counts, ema_sums, means = routing_lib.ema_update(ema_counts, ema_sums, counts, sums, 0.9)
  assign = np.asarray(routing_lib.nearest_centroid(x, means))[..., 0]
  # Each planted cluster maps to a single centroid, and different ones to different ones.
  mapping = {int(l): set(np.unique(assign[labels == l])) for l in range(4)}
  assert all(len(v) == 1 for v in mapping.values()), mapping
  assert len(set.union(*mapping.values())) == 4


def test_every_cluster_holds_exactly_window_tokens():
  x = jax.random.normal(jax.random.key(_seed()), (2, 64, 3, 8))
  means = jax.random.normal(jax.random.key(_seed()), (3, 4, 8))
  idx = np.asarray(routing_lib.route(x, means, 16))
  assert idx.shape == (2, 3, 4, 16)
  for row in idx.reshape(-1, 16):
    assert len(set(row)) == 16 and (np.diff(row) > 0).all()  # Distinct, in position order.


def _routing_vectors(q_btnh, positions_bt):
  """What a routing head attends with: RoPE(layer_norm(q before RoPE)) (the test's q is
  after RoPE, as the core receives it)."""
  pre = rope.apply_rope(q_btnh, -positions_bt, 10_000.0)
  return rope.apply_rope(routing_lib.scale_free_layer_norm(pre), positions_bt, 10_000.0)


@pytest.mark.parametrize("eval_routing", ["teacher_forced", "left_to_right"])
def test_one_cluster_full_window_equals_dense_causal(eval_routing):
  """One cluster holding every token is dense causal attention with the official logits:
  unscaled dot products of the layer-normed vectors (no 1/sqrt(d)). The layer norm sits
  before RoPE, so the same contents shifted by 37 positions give the same output (no
  logit drifts with absolute position)."""
  cfg = ModelConfig(**{**BASE, "attention": {"kind": "routing", "window": 32, "num_clusters": 1,
                                             "num_routing_heads": 4,
                                             "eval_routing": eval_routing}})
  core = RoutingAttention(cfg, layer_index=1, rngs=nnx.Rngs(0))
  core.deterministic = True
  key = jax.random.key(_seed())
  pre = jax.random.normal(key, (2, 32, 4, 8))  # Query contents before RoPE.
  v = jax.random.normal(jax.random.fold_in(key, 1), (2, 32, 2, 8))
  outs = []
  for shift in (0, 37):
    positions = jnp.broadcast_to(jnp.arange(32) + shift, (2, 32))
    q = rope.apply_rope(pre, positions, 10_000.0)
    outs.append(core(q, q[:, :, ::2], v, positions_bt=positions, causal=True))
    x = _routing_vectors(q, positions)
    want = jax.nn.dot_product_attention(x, x, jnp.repeat(v, 2, axis=2), is_causal=True,
                                        scale=1.0)
    np.testing.assert_allclose(outs[-1], want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(outs[1], outs[0], rtol=1e-4, atol=1e-4)


def test_commitment_loss_counts_queries_and_keys():
  """With shared Q/K the official loss adds the commitment term for q and for k."""
  beta = 0.5
  cfg = ModelConfig(**BASE, attention=dict(ROUTING, num_routing_heads=4, beta=beta))
  core = RoutingAttention(cfg, layer_index=1, rngs=nnx.Rngs(0))
  key = jax.random.key(_seed())
  means = routing_lib.scale_free_layer_norm(jax.random.normal(key, (4, 4, 8)))
  core.means.set_value(means)
  core.initialized.set_value(jnp.ones((), bool))
  q = jax.random.normal(jax.random.fold_in(key, 1), (2, 32, 4, 8))
  v = jax.random.normal(jax.random.fold_in(key, 2), (2, 32, 2, 8))
  positions = jnp.broadcast_to(jnp.arange(32), (2, 32))
  core(q, q[:, :, ::2], v, positions_bt=positions, causal=True)
  (loss,) = jax.tree.leaves(nnx.pop(core, AuxLoss))
  x = _routing_vectors(q, positions)
  nearest = means[jnp.arange(4), routing_lib.nearest_centroid(x, means)]  # [b, t, n, h]
  np.testing.assert_allclose(loss, 2 * beta * jnp.mean(jnp.square(x - nearest)), rtol=1e-5)


def _position_jacobian(model, x):
  graphdef, state = nnx.split(model)
  fn = lambda x: nnx.merge(graphdef, state).forward_embeddings(x)[0].sum(-1)
  return np.abs(np.asarray(jax.jit(jax.jacrev(fn))(x)[:, 0])).max(-1)


def test_routing_lm_is_causal_by_gradient():
  model = TransformerLM(ModelConfig(**BASE, attention=ROUTING), rngs=nnx.Rngs(_seed()))
  x = jax.random.normal(jax.random.key(_seed()), (1, 32, 32))
  _forward(model, jnp.zeros((1, 32), jnp.int32))  # Initialise the centroids.
  model.eval()
  jac = _position_jacobian(model, x)
  assert np.triu(jac, k=1).max() == 0.0
  assert (np.diag(jac) > 0).all()


def test_ema_changes_in_training_not_in_eval_and_is_checkpointed(tmp_path):
  cfg = make_tiny_config(**{"model.attention": dict(ROUTING, window=8), "data.seq_len": 32,
                            "train.steps": 4, "train.checkpoint_every": 4})
  exp = loop.Experiment(cfg, load_data=False)
  initial = nnx.state(exp.make_model(), nnx.Not(nnx.Param))
  out = train_and_evaluate(cfg, str(tmp_path / "run"))
  trained = out["state"].model_state
  core = trained["layers"][1]["attn"]["core"]
  assert bool(core["initialized"].get_value())
  assert not np.allclose(core["means"].get_value(),
                         initial["layers"][1]["attn"]["core"]["means"].get_value())
  # The checkpoint holds the same centroids.
  _, _, restored, _, _ = loop.restore_workdir(str(tmp_path / "run"), load_data=False)
  np.testing.assert_array_equal(restored.model_state["layers"][1]["attn"]["core"]["means"]
                                .get_value(), core["means"].get_value())
  # Evaluation leaves them alone.
  model = loop.load_model(str(tmp_path / "run"))
  nnx.update(model, restored.model_state)
  model.eval()
  before = np.asarray(model.layers[1].attn.core.means.get_value())
  _forward(model, jnp.zeros((2, 32), jnp.int32))
  np.testing.assert_array_equal(model.layers[1].attn.core.means.get_value(), before)


def test_commitment_loss_is_added_in_training():
  model = TransformerLM(ModelConfig(**BASE, attention=dict(ROUTING, beta=1.0)), rngs=nnx.Rngs(0))
  model(jnp.zeros((1, 32), jnp.int32))
  losses = jax.tree.leaves(nnx.pop(model, AuxLoss))
  assert len(losses) == 2 and all(float(l) > 0 for l in losses)


@pytest.fixture(scope="module")
def routing_model():
  """A 2-layer model with routing heads in both layers, centroids initialised, in eval
  mode; shared so that its compiled forwards and decodes are reused."""
  model = TransformerLM(ModelConfig(**BASE, attention=ROUTING), rngs=nnx.Rngs(_seed()))
  _forward(model, jax.random.randint(jax.random.key(_seed()), (2, 40), 0, 256))
  model.eval()
  return model


_decode = nnx.jit(lambda model, tokens, cache: model.decode(tokens, cache))


def test_evaluation_is_left_to_right(routing_model):
  """Evaluation (model.eval()) routes left to right by default: replacing every token
  after position j leaves logits[:j + 1] exactly unchanged. Teacher-forced balanced
  routing (the paper's, kept as an option) lets the future change which keys a query
  sees; the same check catches it."""
  tokens = jax.random.randint(jax.random.key(_seed()), (2, 40), 0, 256)
  changed = tokens.at[:, 25:].set((tokens[:, 25:] + 101) % 256)
  moved = lambda: np.abs(np.asarray(_forward(routing_model, changed)
                                    - _forward(routing_model, tokens)))[:, :25].max()
  assert moved() == 0.0
  cores = [block.attn.core for block in routing_model.layers]
  try:
    for core in cores:
      core.eval_routing = "teacher_forced"
    assert moved() > 1e-3
  finally:
    for core in cores:
      core.eval_routing = "left_to_right"


def test_cached_chunks_equal_left_to_right_forward(routing_model):
  """A prompt, chunks into the filled cache, then single tokens: every piece sees the
  whole cache, and the logits equal the left-to-right forward at every layer."""
  tokens = jax.random.randint(jax.random.key(_seed()), (2, 40), 0, 256)
  cache = routing_model.init_cache(2, 40)
  pieces = []
  for lo, hi in [(0, 16), (16, 24), (24, 32)] + [(i, i + 1) for i in range(32, 40)]:
    logits, cache = _decode(routing_model, tokens[:, lo:hi], cache)
    pieces.append(logits)
  np.testing.assert_allclose(jnp.concatenate(pieces, axis=1), _forward(routing_model, tokens),
                             rtol=1e-4, atol=1e-4)
  # The chunk's logits depend on the prompt before it.
  other = routing_model.init_cache(2, 40)
  _, other = _decode(routing_model, (tokens[:, :16] + 1) % 256, other)
  chunk_logits, _ = _decode(routing_model, tokens[:, 16:24], other)
  assert np.abs(np.asarray(chunk_logits - pieces[1])).max() > 1e-3


def test_short_prompts_decode_and_generate(routing_model):
  """Prompts shorter than the window (even one token) decode past the window with the
  left-to-right forward's logits, and generate greedily."""
  tokens = jax.random.randint(jax.random.key(_seed()), (2, 40), 0, 256)
  want = _forward(routing_model, tokens)
  for prompt_length in (1, 5):
    cache = routing_model.init_cache(2, 40)
    pieces = []
    for lo in [0] + list(range(prompt_length, 40)):
      logits, cache = _decode(routing_model, tokens[:, lo:max(lo + 1, prompt_length)], cache)
      pieces.append(logits)
    np.testing.assert_allclose(jnp.concatenate(pieces, axis=1), want, rtol=1e-4, atol=1e-4)
  out = generation.generate(routing_model, tokens[:, :1], 39)
  greedy = np.asarray(_forward(routing_model, jnp.asarray(out)))[:, :-1].argmax(-1)
  np.testing.assert_array_equal(out[:, 1:], greedy)


def test_scan_layers_keeps_or_refuses_routing_heads():
  """Stacked layers are identical: routing in every layer scans with its routing heads;
  routing in the last k < L layers is refused, never silently dropped."""
  with pytest.raises(ValueError, match="scan_layers"):
    TransformerLM(ModelConfig(**BASE, scan_layers=True, attention=dict(ROUTING, routing_layers=1)),
                  rngs=nnx.Rngs(0))
  scanned = TransformerLM(ModelConfig(**BASE, scan_layers=True, attention=ROUTING),
                          rngs=nnx.Rngs(0))
  assert scanned.layers.attn.core.n_routing == 2
  looped = TransformerLM(ModelConfig(**BASE, attention=dict(ROUTING, routing_layers=1)),
                         rngs=nnx.Rngs(0))
  assert [block.attn.core.n_routing for block in looped.layers] == [0, 2]


def test_bad_routing_config():
  with pytest.raises(ValueError, match="multiples of the GQA group"):
    TransformerLM(ModelConfig(**BASE, attention=dict(ROUTING, num_routing_heads=1)),
                  rngs=nnx.Rngs(0))
  model = TransformerLM(ModelConfig(**BASE, attention=ROUTING), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="shorter than the routing window"):
    model(jnp.zeros((1, 8), jnp.int32))


def test_routing_lm_sharded_2x2x2_matches_single_device(tmp_path):
  """Routing (k-means statistics, top-k, gather, scatter-mean and the kernels) runs on a
  data x fsdp x tensor mesh and gives the single-device losses."""
  overrides = {"model.attention": dict(ROUTING, window=8), "data.seq_len": 32,
               "train.steps": 3, "train.checkpoint_every": 3}
  single = make_tiny_config(**overrides, **{"mesh.data": 1})
  train_and_evaluate(single, str(tmp_path / "single"), devices=jax.devices()[:1])
  sharded = make_tiny_config(**overrides, **{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2})
  out = train_and_evaluate(sharded, str(tmp_path / "sharded"))
  assert len(out["state"].params["embed"].get_value().sharding.device_set) == 8
  losses = lambda w: [r["train/loss"] for r in read_jsonl(str(tmp_path / w / "metrics.jsonl"))
                      if "train/loss" in r]
  np.testing.assert_allclose(losses("sharded"), losses("single"), rtol=1e-4, atol=1e-4)

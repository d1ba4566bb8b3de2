"""Weight masks as model state: patterns, the masked forward, checkpoints, sharding, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from support import make_tiny_config
from sparsity_jax import parallel
from sparsity_jax.models import ModelConfig, TransformerLM
from sparsity_jax.sparsity import SparsitySpec, SparsitySpecError, masks
from sparsity_jax.sparsity import prune as prune_lib

BASE = dict(vocab_size=260, num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, head_dim=8,
            mlp_dim=64, max_len=64)


def tiny(spec=None, **overrides):
  cfg = ModelConfig(**{**BASE, **overrides},
                    weight_sparsity=None if spec is None else spec.to_dict())
  return TransformerLM(cfg, rngs=nnx.Rngs(0))


def random_masks(model, seed):
  rng = np.random.default_rng(seed)
  for t in masks.masked(model):
    masks.set_mask(t, rng.random(t.shape) < 0.6)


@pytest.mark.parametrize("n,m", [(1, 4), (2, 4), (4, 8), (3, 8), (1, 1), (5, 16)])
def test_every_nm_mask_keeps_exactly_n_in_every_group_of_m(n, m):
  scores = np.random.default_rng(n * 100 + m).normal(size=(2, 32, 24))  # [layer, d_in, d_out]
  scores[0, :m, 0] = 1.0  # Ties inside one group.
  keep = masks.nm_keep(scores, n, m)
  counts = keep.reshape(2, 32 // m, m, 24).sum(axis=2)
  assert (counts == n).all()
  assert masks.nm_valid(keep, n, m)
  # The kept ones are the n largest of their group.
  grouped = scores.reshape(2, 32 // m, m, 24)
  kept_min = np.where(keep.reshape(grouped.shape), grouped, np.inf).min(axis=2)
  dropped_max = np.where(keep.reshape(grouped.shape), -np.inf, grouped).max(axis=2)
  assert (kept_min >= dropped_max).all()


@pytest.mark.parametrize("sparsity", [0.0, 0.25, 0.5, 0.7, 0.9375])
def test_unstructured_masks_hit_the_requested_sparsity_exactly(sparsity):
  rng = np.random.default_rng(int(sparsity * 1000))
  scores = rng.normal(size=(64, 48)).round(1)  # Many ties.
  per_output = masks.per_output_keep(scores, sparsity)
  assert ((~per_output).sum(axis=0) == int(64 * sparsity)).all()
  arrays = [rng.normal(size=(16, 8)).round(1), rng.normal(size=(3, 32, 8)).round(1)]
  groups = masks.lowest_keep(arrays, sparsity)
  total = sum(a.size for a in arrays)
  assert sum(int((~g).sum()) for g in groups) == int(total * sparsity)
  # Global magnitude over a model: exact count over every targeted weight.
  model = tiny()
  prune_lib.magnitude(model, SparsitySpec(sparsity=sparsity), scope="global")
  rep = masks.report(model)["global"]
  assert rep["masked_weights"] - round(rep["masked_weights"] * (1 - rep["mask_sparsity"])) == \
      int(rep["masked_weights"] * sparsity)
  # Per-layer magnitude: exact per weight, and per layer of a scanned stack.
  for scan in (False, True):
    model = tiny(scan_layers=scan)
    prune_lib.magnitude(model, SparsitySpec(sparsity=sparsity), scope="layer")
    for t in masks.masked(model):
      keep = np.asarray(t.mask.get_value()).reshape((-1,) + t.shape[t.lead:])
      for layer in keep:
        assert (~layer).sum() == int(layer.size * sparsity), t.key


def test_global_magnitude_prunes_the_smallest_weights_of_all():
  model = tiny()
  prune_lib.magnitude(model, SparsitySpec(sparsity=0.6), scope="global")
  kept, pruned = [], []
  for t in masks.masked(model):
    w = np.abs(np.asarray(t.param.get_value()))
    keep = np.asarray(t.mask.get_value())
    kept.append(w[keep])
    pruned.append(w[~keep])
  assert np.concatenate(pruned).max() <= np.concatenate(kept).min()
  # Per-weight levels differ (a global threshold), the total is 60%.
  levels = [v["mask_sparsity"] for v in masks.report(model)["layers"].values()]
  assert max(levels) - min(levels) > 0.05


@pytest.mark.parametrize("scan", [False, True])
def test_masks_are_applied_in_the_jitted_forward(scan):
  spec = SparsitySpec(pattern="2:4")
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 12)))
  dense, sparse = tiny(scan_layers=scan), tiny(spec, scan_layers=scan)
  forward = nnx.jit(lambda m, x: m(x))
  np.testing.assert_array_equal(forward(sparse, tokens), forward(dense, tokens))  # All True.
  prune_lib.magnitude(sparse, spec)
  zeroed = tiny(scan_layers=scan)  # The same weights, zeroed by hand, and no masks.
  for t, z in zip(masks.masked(sparse), masks.maskable(zeroed)):
    assert t.key == z.key
    z.param.set_value(jnp.where(t.mask.get_value(), z.param.get_value(), 0.0))
  got = forward(sparse, tokens)
  np.testing.assert_allclose(got, forward(zeroed, tokens), rtol=1e-6, atol=1e-6)
  assert np.abs(got - forward(dense, tokens)).max() > 1e-3
  # Weights stay as they were (masks are separate state); the report sees the zeros.
  for t, d in zip(masks.masked(sparse), masks.maskable(dense)):
    np.testing.assert_array_equal(t.param.get_value(), d.param.get_value())
  rep = masks.report(sparse, spec)
  assert rep["global"]["nm_valid"] and rep["global"]["mask_sparsity"] == 0.5
  assert "| layers/" in masks.report_markdown(rep) and "N:M valid" in masks.report_markdown(rep)
  # Masks are not Params: no gradient, no optimizer state.
  params = nnx.state(sparse, nnx.Param)
  assert not any(isinstance(leaf, masks.WeightMask) for leaf in jax.tree.leaves(
      params, is_leaf=lambda x: isinstance(x, nnx.Variable)))


def test_untied_output_head_can_be_masked():
  spec = SparsitySpec(targets="lm_head", sparsity=0.5)
  model = tiny(spec, tie_embeddings=False)
  assert [t.key for t in masks.masked(model)] == ["lm_head"]
  prune_lib.magnitude(model, spec)
  tokens = jnp.ones((1, 4), jnp.int32)
  head = model.lm_head.get_value()
  model.lm_head.set_value(jnp.where(model.lm_head_mask.get_value(), head, 0.0))
  baked = model(tokens)
  model.lm_head.set_value(head)
  np.testing.assert_allclose(model(tokens), baked, rtol=1e-6, atol=1e-6)


def test_masks_survive_a_checkpoint_round_trip(tmp_path):
  from sparsity_jax.sparsity import pipeline
  from sparsity_jax.train import evaluate_workdir, loop

  spec = SparsitySpec(pattern="2:4", targets="attn/[qo]_proj$|mlp/down$")
  config = make_tiny_config()
  config.model.weight_sparsity = spec.to_dict()
  exp = loop.Experiment(config, load_data=False)
  model = exp.make_model()
  random_masks(model, 1)
  pipeline.save_workdir(str(tmp_path / "run"), config, model)
  restored = loop.load_model(str(tmp_path / "run"))
  want = dict(masks.iter_masks(model))
  got = dict(masks.iter_masks(restored))
  assert sorted(got) == sorted(want) and len(got) == 2 * 3
  for key in want:
    np.testing.assert_array_equal(got[key], want[key])
  tokens = jnp.ones((2, 8), jnp.int32)
  np.testing.assert_allclose(restored(tokens), model(tokens), rtol=1e-6, atol=1e-6)
  # The saved config describes the masks; evaluation restores them too.
  assert loop.load_workdir_config(str(tmp_path / "run")).model.weight_sparsity.pattern == "2:4"
  assert np.isfinite(evaluate_workdir(str(tmp_path / "run"))["loss"])


def test_masks_shard_like_their_weights_on_a_2x2x2_mesh():
  spec = SparsitySpec(sparsity=0.5)
  single, sharded = tiny(spec, num_kv_heads=4), tiny(spec, num_kv_heads=4)
  random_masks(single, 3)
  random_masks(sharded, 3)
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, 256, (4, 16)))
  want = single(tokens)
  mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  with parallel.use_mesh(mesh):
    state = nnx.state(sharded)
    nnx.update(sharded, jax.device_put(state, parallel.state_shardings(state, mesh)))
    for t in masks.masked(sharded):
      w, m = t.param.get_value(), t.mask.get_value()
      assert m.sharding.spec == w.sharding.spec, t.key
      assert len(m.sharding.device_set) == 8
    assert any(len(set(t.mask.get_value().sharding.spec) - {None}) >= 2
               for t in masks.masked(sharded))
    got = nnx.jit(lambda m, x: m(x))(sharded, tokens)
  np.testing.assert_allclose(got, want, rtol=3e-5, atol=3e-5)
  for (k1, a), (k2, b) in zip(masks.iter_masks(sharded), masks.iter_masks(single)):
    assert k1 == k2
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("fields,message", [
    ({"pattern": "4:2"}, "N=4 is larger than M=2"),
    ({"pattern": "2of4"}, "use 'unstructured' or 'N:M'"),
    ({"pattern": "0:4"}, "at least 1"),
    ({"sparsity": 1.0}, "must be in [0, 1)"),
    ({"sparsity": -0.1}, "must be in [0, 1)"),
    ({"pattern": "unstructured"}, "needs a sparsity level"),
    ({"pattern": "2:4", "sparsity": 0.7}, "contradicts pattern"),
    ({"targets": "mlp/(", "sparsity": 0.5}, "not a regular expression"),
    ({"sparsity": 0.5, "level": 2}, "unknown fields ['level']"),
    ({"sparsity": "half"}, "must be a number"),
])
def test_bad_specs_raise_one_clear_error(fields, message):
  with pytest.raises(SparsitySpecError) as info:
    ModelConfig(**BASE, weight_sparsity=fields)
  assert message in str(info.value) and "\n" not in str(info.value)


def test_bad_targets_raise_one_clear_error():
  with pytest.raises(SparsitySpecError, match=r"matches no maskable weight; they are: .*attn/q_proj"):
    tiny(SparsitySpec(targets="embed", sparsity=0.5))
  with pytest.raises(SparsitySpecError, match="M=3 does not divide the input dimension 32"):
    tiny(SparsitySpec(pattern="1:3"))
  # The experiment reports it before anything is built or written.
  from sparsity_jax.errors import UserError
  from sparsity_jax.train import loop
  config = make_tiny_config()
  config.model.weight_sparsity = {"pattern": "3:2"}
  with pytest.raises(UserError, match="N=3 is larger than M=2"):
    loop.Experiment(config, load_data=False)


def test_launcher_spec_errors_name_the_flags():
  from sparsity_jax.sparsity import spec as spec_lib
  with pytest.raises(SparsitySpecError, match=r"^--sparsity=1.5 must be in \(0, 1\)"):
    spec_lib.from_flags(pattern="unstructured", sparsity=1.5)
  with pytest.raises(SparsitySpecError, match="--pattern='unstructured' needs a sparsity level "
                                              r"\(--sparsity"):
    spec_lib.from_flags(pattern="unstructured", sparsity=None)

"""Sparse training: SR-STE, PGF's MDGF / SDGF and fixed masks, against their formulas and
small numpy ports of the official code."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from support import make_tiny_config
from sparsity_jax.models import ModelConfig, TransformerLM
from sparsity_jax.sparsity import SparsitySpec, masks
from sparsity_jax.sparsity import training as st
from sparsity_jax.train import loop
from sparsity_jax.train import objectives

# As tests/test_weight_sparsity.py: the same shapes reuse its compiled init ops.
BASE = dict(vocab_size=260, num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, head_dim=8,
            mlp_dim=64, max_len=64)


def tiny(pattern="2:4"):
  cfg = ModelConfig(**BASE, weight_sparsity={"pattern": pattern})
  return TransformerLM(cfg, rngs=nnx.Rngs(0))


# ---- numpy ports of the official code ----


def official_sr_ste(weight, grad_output, n, m, decay=2e-4):
  """aojunzz/NM-sparsity devkit/sparse_ops/sparse_ops.py ``Sparse``: forward and backward of a
  torch [out, in] weight (groups of m along the flattened rows)."""
  group = weight.size // m
  temp = np.abs(weight).reshape(group, m)
  index = np.argsort(temp, axis=1, kind="stable")[:, :m - n]
  w_b = np.ones(temp.shape)
  np.put_along_axis(w_b, index, 0, axis=1)
  w_b = w_b.reshape(weight.shape)
  return weight * w_b, grad_output + decay * (1 - w_b) * weight, w_b


def official_structure_decay(n, m, dense, fine_tune, total):
  """PGF ``SparseLinear.__init__``'s structure_decay_config (epochs -> 'N:M')."""
  frames = int(math.log2(m / n))
  size = (total - dense - fine_tune) / frames
  return {int(dense) + int(i * size): f"{(m - 1) if i == 0 else int(m / 2 ** i)}:{m}"
          for i in range(frames + 1)}


def official_decay(kind, coef, step):
  """PGF ``LinearDecay`` / ``ExponentialDecay``'s mask_decay_value."""
  return max(1.0 - coef * step, 0.0) if kind == "linear" else math.exp(-coef * step)


# ---- the flow, masks and schedules ----


def test_weight_flow_forward_and_gradient_equal_their_formulas():
  rng = np.random.default_rng(0)
  w, g = rng.normal(size=(2, 8, 6)), rng.normal(size=(2, 8, 6))
  m = rng.random((2, 8, 6)) < 0.5
  for beta, lam in ((0.0, 2e-4), (0.3, 0.0), (0.0, 0.0)):
    scale = m + (1 - m) * beta
    decay = lam * (1 - m)
    out, vjp = jax.vjp(lambda x: st.weight_flow(x, jnp.asarray(scale), jnp.asarray(decay)),
                       jnp.asarray(w))
    np.testing.assert_allclose(out, w * scale, rtol=1e-6)
    np.testing.assert_allclose(vjp(jnp.asarray(g))[0], g + decay * w, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_sr_ste_step_equals_the_official_sparse_function(dtype):
  """Our mask, forward weight and gradient of one q_proj-like weight equal the official
  ``Sparse`` applied to the torch layout [out, in]."""
  model = tiny("2:4")
  spec = SparsitySpec(pattern="2:4")
  sched = st.MaskSchedule(model, spec, st.SparseTraining(method="sr_ste"), 10)
  params = nnx.state(model, nnx.Param)
  slot = next(s for s in sched.slots if s.param_path[-1] == "up")
  rng = np.random.default_rng(1)
  w = rng.normal(size=slot.shape).astype(np.float32)  # [d_in, d_out]
  g = rng.normal(size=slot.shape).astype(np.float32)
  flat = dict(nnx.to_flat_state(params))
  flat[slot.param_path] = flat[slot.param_path].replace(jnp.asarray(w, dtype))
  params = nnx.from_flat_state(list(flat.items()))
  keep, scale, decay = sched.prepare(params, jnp.asarray(3))[slot]
  wq = np.asarray(jnp.asarray(w, dtype).astype(jnp.float32))
  ref_out, ref_grad, ref_mask = official_sr_ste(wq.T, g.T, 2, 4)
  np.testing.assert_array_equal(np.asarray(keep), ref_mask.T.astype(bool))
  out, vjp = jax.vjp(lambda x: st.weight_flow(x, scale, decay), jnp.asarray(wq))
  np.testing.assert_allclose(out, ref_out.T, rtol=1e-6)
  np.testing.assert_allclose(vjp(jnp.asarray(g))[0], ref_grad.T, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("n,m", [(2, 4), (1, 8), (4, 8)])
def test_jnp_masks_equal_the_numpy_builders(n, m):
  scores = np.random.default_rng(n + m).normal(size=(3, 32, 12)).round(1)  # Ties too.
  np.testing.assert_array_equal(st.nm_keep_jnp(jnp.asarray(scores), n, m),
                                masks.nm_keep(scores, n, m))
  np.testing.assert_array_equal(st.per_output_keep_jnp(jnp.asarray(scores), 0.7),
                                masks.per_output_keep(scores, 0.7))


@pytest.mark.parametrize("n,m,dense,fine_tune,total", [(1, 8, 10, 10, 100), (2, 4, 0, 5, 40),
                                                        (1, 16, 7, 3, 60), (2, 8, 0, 1, 9)])
def test_sdgf_frames_follow_the_official_schedule(n, m, dense, fine_tune, total):
  training = st.SparseTraining(method="ste", dense_steps=dense, fine_tune_steps=fine_tune,
                               structure_decay="sparsify")
  frames = st.structure_frames(SparsitySpec(pattern=f"{n}:{m}"), training, total)
  ours = {start: f"{fn}:{fm}" for start, fn, fm in frames}
  assert ours == official_structure_decay(n, m, dense, fine_tune, total)
  assert frames[-1] == (total - fine_tune, n, m)


def test_sdgf_masks_in_the_train_step_follow_the_frames():
  model = tiny("1:8")
  training = st.SparseTraining(method="ste", dense_steps=2, fine_tune_steps=2,
                               structure_decay="sparsify")
  sched = st.MaskSchedule(model, SparsitySpec(pattern="1:8"), training, 14)
  params = nnx.state(model, nnx.Param)
  # Frames of (14 - 2 - 2) / 3 steps from step 2: 7:8 at 2, 4:8 at 5, 2:8 at 8, 1:8 at 12.
  expect = {0: 8, 1: 8, 2: 7, 4: 7, 5: 4, 7: 4, 8: 2, 11: 2, 12: 1, 13: 1}  # Kept of 8.
  hard = jax.jit(lambda p, step: [sched.prepare(p, step)[slot][0] for slot in sched.slots])
  for step, kept in expect.items():
    for slot, keep in zip(sched.slots, hard(params, jnp.asarray(step))):
      grouped = np.asarray(keep).reshape(slot.shape[:slot.lead] + (slot.d_in // 8, 8, slot.d_out))
      assert (grouped.sum(axis=-2) == kept).all(), (step, slot.param_path)
    assert sched.pattern_at(step) == ("dense" if kept == 8 else f"{kept}:8")


def test_fine_structure_decay_runs_8n_8m_down_to_n_m():
  model = tiny("1:4")  # d_in 32 and 64: 8:32 groups fit.
  training = st.SparseTraining(method="mdgf", fine_tune_steps=4, structure_decay="fine")
  sched = st.MaskSchedule(model, SparsitySpec(pattern="1:4"), training, 16)
  assert [(n, m) for _, n, m in sched.frames] == [(8, 32), (4, 16), (2, 8), (1, 4)]
  assert sched.frames[-1][0] == 12


@pytest.mark.parametrize("kind,coef", [("linear", 0.05), ("exp", 0.1)])
def test_mdgf_decay_follows_the_official_values(kind, coef):
  training = st.SparseTraining(method="mdgf", decay=kind, decay_coef=coef, dense_steps=5,
                               fine_tune_steps=10)
  for step in (5, 6, 12, 24, 29):
    beta = float(st.mask_decay(training, jnp.asarray(step), 40))
    assert beta == pytest.approx(official_decay(kind, coef, step - 5), rel=1e-5, abs=1e-7)
  assert float(st.mask_decay(training, jnp.asarray(30), 40)) == 0.0  # Fine-tune: hard mask.
  assert float(st.mask_decay(st.SparseTraining(method="sr_ste"), jnp.asarray(3), 40)) == 0.0


# ---- the train step ----


def test_train_step_gradients_equal_the_method_formula():
  """For SR-STE, STE and MDGF: dL/dw = dL/dw~ (at w~ = w * scale, by plain autodiff on w~)
  + decay * w; one compiled gradient serves all three (scale and decay are arguments)."""
  model = tiny("2:4")
  graphdef, params, rest = nnx.split(model, nnx.Param, nnx.Not(nnx.Intermediate))
  tokens = jax.random.randint(jax.random.key(3), (2, 17), 0, BASE["vocab_size"])
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
           "weights": jnp.ones((2, 16), jnp.float32)}
  loss_terms = objectives.get("causal_lm")

  def loss(p, s):
    total, weight = loss_terms(nnx.merge(graphdef, p, s), batch, jax.random.key(0))
    return total / weight

  base = st.MaskSchedule(model, SparsitySpec(pattern="2:4"), st.SparseTraining(method="ste"), 20)

  @jax.jit
  def flowed_grads(p, keeps, scales, decays):
    prepared = {slot: v for slot, v in zip(base.slots, zip(keeps, scales, decays))}
    return jax.grad(lambda q: loss(*base.forward_state(q, rest, prepared)))(p)

  ones = base.forward_state(params, rest, base.prepare(params, jnp.asarray(0)))[1]
  plain_grad = jax.jit(jax.grad(lambda p: loss(p, ones)))
  flat = dict(nnx.to_flat_state(params))
  for method, fields in (("sr_ste", {}), ("ste", {}), ("mdgf", {"decay_coef": 0.1})):
    sched = st.MaskSchedule(model, SparsitySpec(pattern="2:4"),
                            st.SparseTraining(method=method, **fields), 20)
    prepared = sched.prepare(params, jnp.asarray(4))
    keeps, scales, decays = (list(x) for x in zip(*(prepared[s] for s in sched.slots)))
    got = dict(nnx.to_flat_state(flowed_grads(params, keeps, scales, decays)))
    scaled = dict(flat)
    for slot, scale in zip(sched.slots, scales):
      scaled[slot.param_path] = flat[slot.param_path].replace(
          flat[slot.param_path].get_value() * scale)
    plain = dict(nnx.to_flat_state(plain_grad(nnx.from_flat_state(list(scaled.items())))))
    lam = 2e-4 if method == "sr_ste" else 0.0
    for slot, keep, scale in zip(sched.slots, keeps, scales):
      w = flat[slot.param_path].get_value()
      expect = plain[slot.param_path].get_value() + lam * (1 - keep) * w
      np.testing.assert_allclose(got[slot.param_path].get_value(), expect, rtol=2e-5, atol=1e-7)
      # Straight-through: pruned weights do get the task gradient.
      pruned_grad = np.abs(np.where(np.asarray(keep), 0, got[slot.param_path].get_value()))
      assert pruned_grad.max() > 1e-6, (method, slot.param_path)
      if method == "mdgf":
        np.testing.assert_allclose(scale, np.where(keep, 1.0, math.exp(-0.1 * 4)), rtol=1e-6)


def test_training_keeps_valid_nm_masks_of_the_final_weights(tmp_path):
  """A run with SR-STE ends with valid 2:4 masks in its checkpoint; evaluation uses them."""
  config = make_tiny_config(**{"model.weight_sparsity.pattern": "2:4",
                               "train.weight_sparsity.method": "sr_ste", "train.steps": 2,
                               "train.checkpoint_every": 2})
  out = loop.train_and_evaluate(config, str(tmp_path / "run"), devices=jax.devices()[:1])
  state = out["state"]
  for path, mask in nnx.to_flat_state(nnx.filter_state(state.model_state, masks.WeightMask)):
    keep = np.asarray(mask.get_value())
    assert keep.mean() == 0.5
  model = loop.load_model(str(tmp_path / "run"))
  rep = masks.report(model, SparsitySpec(pattern="2:4"))
  assert rep["global"]["nm_valid"] and rep["global"]["mask_sparsity"] == 0.5
  # The checkpoint's masks are those of the final weights (recomputed from |w|).
  for t in masks.masked(model):
    np.testing.assert_array_equal(
        np.asarray(t.mask.get_value()),
        masks.nm_keep(np.abs(t.matrix(np.asarray(t.param.get_value()))), 2, 4).reshape(t.shape))


def test_fixed_masks_start_from_the_initial_weights_magnitude():
  cfg = ModelConfig(**BASE, weight_sparsity={"pattern": "unstructured", "sparsity": 0.75})
  model = TransformerLM(cfg, rngs=nnx.Rngs(0))
  spec = SparsitySpec(sparsity=0.75)
  sched = st.MaskSchedule(model, spec, st.SparseTraining(), 10)
  _, params, rest = nnx.split(model, nnx.Param, nnx.Not(nnx.Intermediate))
  for how in ("magnitude", "random"):
    nnx.update(model, st.initial_masks(params, rest, spec, sched.slots, how, seed=0))
    for t in masks.masked(model):
      keep = t.matrix(np.asarray(t.mask.get_value()))
      assert ((~keep).sum(axis=-2) == int(t.d_in * 0.75)).all()  # Per output, exactly.
      if how == "magnitude":
        np.testing.assert_array_equal(
            keep, masks.per_output_keep(np.abs(t.matrix(np.asarray(t.param.get_value()))), 0.75))


@pytest.mark.parametrize("model_fields,train_fields,message", [
    ({}, {"method": "sr_ste"}, "model is dense"),
    ({"pattern": "unstructured", "sparsity": 0.5}, {"method": "sr_ste"}, "recomputes N:M"),
    ({"pattern": "2:4"}, {"method": "srste"}, "use one of"),
    ({"pattern": "2:4"}, {"method": "ste", "structure_decay": "sparsify"}, "fine_tune_steps > 0"),
    ({"pattern": "3:8"}, {"method": "ste", "structure_decay": "sparsify", "fine_tune_steps": 1},
     "power of two"),
    ({"pattern": "2:4"}, {"method": "fixed", "dense_steps": 3}, "recomputed mask"),
    ({"pattern": "2:4"}, {"method": "ste", "dense_steps": 30}, "exceed train.steps"),
    ({"pattern": "2:4"}, {"decay": "cosine"}, "'linear' or 'exp'"),
    ({"pattern": "1:8"}, {"method": "ste", "structure_decay": "fine", "fine_tune_steps": 1},
     "does not divide"),
    ({"pattern": "unstructured"}, {}, "keeps every weight"),
    ({"pattern": "4:4"}, {}, "keeps every weight"),
    ({"pattern": "unstructured", "sparsity": 0.5}, {"method": "rigl"}, "no mask update"),
    ({"pattern": "2:4"}, {"method": "rigl", "rigl_every": 2}, "updates unstructured"),
    ({"pattern": "unstructured", "sparsity": 0.5}, {"mask_init": "keep"}, "'keep' keeps"),
])
def test_bad_sparse_training_configs_raise_one_clear_error(model_fields, train_fields, message):
  overrides = {f"model.weight_sparsity.{k}": v for k, v in model_fields.items()}
  overrides.update({f"train.weight_sparsity.{k}": v for k, v in train_fields.items()})
  overrides["train.steps"] = 20
  config = make_tiny_config(**overrides)
  with pytest.raises(Exception, match=message):
    loop.Experiment(config, load_data=False)


# ---- SquareHead sparse fine-tuning ----


@pytest.mark.parametrize("scan", [False, True])
def test_hidden_states_are_the_block_outputs_hf_style(scan):
  cfg = ModelConfig(**{**BASE, "scan_layers": scan})
  model = TransformerLM(cfg, rngs=nnx.Rngs(1))
  tokens = jax.random.randint(jax.random.key(2), (2, 12), 0, BASE["vocab_size"])
  logits, hidden = nnx.jit(lambda m, x: m.forward_with_hidden(x))(model, tokens)
  np.testing.assert_allclose(logits, nnx.jit(lambda m, x: m(x))(model, tokens), rtol=1e-5,
                             atol=1e-5)
  assert hidden.shape == (BASE["num_layers"], 2, 12, BASE["d_model"])
  # Block 1's output by hand; the last entry is the final norm of the last block's output.
  pos = jnp.broadcast_to(jnp.arange(12), (2, 12))
  x = model.embed_tokens(tokens)
  if scan:
    graphdef, state = nnx.split(model.layers)
    first = nnx.merge(graphdef, jax.tree.map(lambda a: a[0], state))
  else:
    first = model.layers[0]
  np.testing.assert_allclose(hidden[0], nnx.jit(lambda b, x: b(x, pos))(first, x), rtol=1e-5,
                             atol=1e-5)
  logits_again = jnp.einsum("bte,ve->btv", hidden[-1], model.embed.get_value())
  np.testing.assert_allclose(logits_again, logits, rtol=1e-4, atol=1e-4)


def test_squarehead_loss_equals_its_formula():
  from sparsity_jax.train import distill

  rng = np.random.default_rng(5)
  s, t = rng.normal(size=(3, 2, 5, 4)), rng.normal(size=(3, 2, 5, 4))
  w = np.ones((2, 5))
  w[1, 3:] = 0
  got = distill.normalized_mse(jnp.asarray(s), jnp.asarray(t), jnp.asarray(w))
  sel = w.astype(bool)
  for layer in range(3):
    ss, tt = s[layer][sel], t[layer][sel]
    expect = np.mean((ss - tt) ** 2) / (np.mean(tt ** 2) + distill.EPS)
    assert float(got[layer]) == pytest.approx(expect, rel=1e-5)
  ls, lt = rng.normal(size=(2, 5, 7)), rng.normal(size=(2, 5, 7))
  temp = 2.0
  p = np.exp(lt / temp) / np.exp(lt / temp).sum(-1, keepdims=True)
  q = np.exp(ls / temp) / np.exp(ls / temp).sum(-1, keepdims=True)
  kl = (p * (np.log(p) - np.log(q))).sum(-1)
  expect = (kl * w).sum() / w.sum() * temp ** 2
  got = distill.kl_divergence(jnp.asarray(ls), jnp.asarray(lt), jnp.asarray(w), temp)
  assert float(got) == pytest.approx(expect, rel=1e-5)


def test_squarehead_fine_tune_of_a_pruned_run_keeps_its_mask(tmp_path):
  """A pruned workdir (50% magnitude) -> fine-tune with init_from + SquareHead: the masks
  never change, the loss holds the distillation terms, and the teacher is the dense model
  of the pruned run's weights (so at the start the student differs from it)."""
  from sparsity_jax.sparsity import pipeline
  from sparsity_jax.sparsity import prune as prune_lib

  one = jax.devices()[:1]  # One device: this test is about the recipe, not sharding.
  spec = SparsitySpec(sparsity=0.5)
  config = make_tiny_config(**{"model.weight_sparsity": spec.to_dict()})
  exp = loop.Experiment(config, load_data=False, devices=one)
  model = exp.make_model()
  prune_lib.magnitude(model, spec)
  pruned = str(tmp_path / "pruned")
  pipeline.save_workdir(pruned, config, model)  # What launch/prune.py --out writes.
  before = {t.key: np.asarray(t.mask.get_value()) for t in masks.masked(loop.load_model(pruned))}
  config = make_tiny_config(**{"init_from": pruned, "distill.h_sq": 1.0, "distill.h_kl": 0.5,
                               "train.steps": 2, "eval.num_batches": 1})
  out = loop.train_and_evaluate(config, str(tmp_path / "ft"), devices=one)
  metrics = out["train_metrics"]
  assert metrics["distill_nmse"] > 0 and metrics["distill_kl"] >= 0
  assert metrics["loss"] == pytest.approx(metrics["distill_ce"] + metrics["distill_nmse"]
                                          + 0.5 * metrics["distill_kl"], rel=1e-4)
  after = loop.load_model(str(tmp_path / "ft"))
  for t in masks.masked(after):
    np.testing.assert_array_equal(np.asarray(t.mask.get_value()), before[t.key])
  assert masks.report(after)["global"]["mask_sparsity"] == pytest.approx(0.5, abs=0.01)


def test_distillation_without_a_teacher_is_refused():
  config = make_tiny_config(**{"distill.h_sq": 1.0})
  with pytest.raises(Exception, match="needs a teacher"):
    loop.Experiment(config, load_data=False)


# ---- RigL (Sparse-IFT's dynamic masks) ----


def official_rigl_update(w, mask, dense_grad, drop_fraction, density):
  """cbsparse dynamic.py ``drop_minimum`` + rigl.py ``update_mask`` + ``grow_maximum`` on a
  tensor whose pruned weights are zero (torch's sort on distinct scores)."""
  score = np.abs(w * mask).ravel()
  n_ones = int(mask.sum())
  n_keep = n_ones - int(drop_fraction * n_ones)
  dropped = np.zeros(w.size, bool)
  dropped[np.argsort(-score, kind="stable")[:n_keep]] = True
  n_grow = max(int(density * w.size - dropped.sum()), 0)
  grow_score = np.abs(dense_grad).ravel() * ~dropped
  grown = np.zeros(w.size, bool)
  grown[np.argsort(-grow_score, kind="stable")[:n_grow]] = True
  return (dropped | grown).reshape(w.shape), grown.reshape(w.shape)


@pytest.mark.parametrize("density,fraction", [(0.25, 0.3), (0.5, 0.1), (0.1, 0.25)])
def test_rigl_drop_and_grow_equal_the_official_update(density, fraction):
  from sparsity_jax.sparsity import rigl

  rng = np.random.default_rng(int(density * 100))
  w, g = rng.normal(size=(24, 16)), rng.normal(size=(24, 16))
  mask = np.zeros(w.size, bool)
  mask[rng.choice(w.size, int(density * w.size), replace=False)] = True
  mask = mask.reshape(w.shape)
  keep, grown = rigl.drop_grow(jnp.asarray(w), jnp.asarray(mask), jnp.asarray(g),
                               jnp.asarray(fraction), density)
  ref_keep, ref_grown = official_rigl_update(w, mask, g, fraction, density)
  np.testing.assert_array_equal(keep, ref_keep)
  np.testing.assert_array_equal(grown, ref_grown)
  assert int(np.sum(keep)) == int(density * w.size)  # The density is kept.


def test_rigl_schedule_follows_cbsparse():
  from sparsity_jax.sparsity import rigl

  due = [int(n) for n in range(0, 400) if rigl.update_due(jnp.asarray(n), 100, 300)]
  assert due == [100, 200]
  for n in (0, 100, 150, 299):
    expect = 0.3 * (math.cos(math.pi * n / 300) * 0.5 + 0.5)
    assert float(rigl.drop_fraction(jnp.asarray(n), 0.3, 300)) == pytest.approx(expect, abs=1e-6)


def test_rigl_update_zeroes_grown_weights_and_their_adam_moments():
  import optax

  cfg = ModelConfig(**BASE, weight_sparsity={"pattern": "unstructured", "sparsity": 0.75})
  model = TransformerLM(cfg, rngs=nnx.Rngs(0))
  spec = SparsitySpec(sparsity=0.75)
  training = st.SparseTraining(method="rigl", rigl_every=1, rigl_end=1.0, mask_init="random")
  sched = st.MaskSchedule(model, spec, training, 10)
  _, params, rest = nnx.split(model, nnx.Param, nnx.Not(nnx.Intermediate))
  rest = st.initial_masks(params, rest, spec, sched.slots, "random", seed=0)
  tx = optax.adam(1e-3)
  opt_state = tx.init(params)
  opt_state = jax.tree.map(lambda x: x + 1.0 if x.ndim else x, opt_state)  # Nonzero moments.
  grads = jax.tree.map(lambda x: jnp.asarray(np.random.default_rng(x.size).normal(size=x.shape),
                                             x.dtype), params)
  prepared = sched.prepare(params, jnp.asarray(3), rest)
  new_params, new_opt, keeps = jax.jit(sched.after_update)(params, opt_state, grads, prepared,
                                                           jnp.asarray(3))
  flat_new = dict(nnx.to_flat_state(new_params))
  mu = dict(nnx.to_flat_state(new_opt[0].mu))
  changed = 0
  for slot, keep in zip(sched.slots, keeps):
    old = np.asarray(prepared[slot][0])
    keep = np.asarray(keep)
    assert keep.sum() == old.sum()  # Same density.
    grown = keep & ~old
    changed += int(grown.sum())
    assert (np.asarray(flat_new[slot.param_path].get_value())[grown] == 0).all()
    assert (np.asarray(mu[slot.param_path].get_value())[grown] == 0).all()
    zeroed = np.asarray(mu[slot.param_path].get_value()) == 0
    assert not (zeroed & ~keep).any()  # Only grown (kept) weights are reset; a dropped
    # weight that is grown again counts as grown, as in cbsparse.
  assert changed > 0
  # Not due (rigl_every=4 at step 3 -> 4 steps done is due; step 4 -> 5 is not).
  late = st.MaskSchedule(model, spec, st.SparseTraining(method="rigl", rigl_every=4), 10)
  _, _, same = late.after_update(params, opt_state, grads, prepared, jnp.asarray(4))
  for slot, keep in zip(sched.slots, same):
    np.testing.assert_array_equal(keep, prepared[slot][0])


def test_init_from_refuses_what_it_would_silently_replace(tmp_path):
  """A missing run, a model setting init_from's model contradicts, other data tokens: one
  clear error each (the model section would otherwise be replaced without a word)."""
  import json
  import os

  from sparsity_jax.errors import UserError

  with pytest.raises(UserError, match="config.init_from=.* is not a run directory"):
    loop.config_with_init_from(make_tiny_config(), str(tmp_path / "missing"))
  run = tmp_path / "pruned"
  os.makedirs(run / "checkpoints" / "0")
  saved = make_tiny_config(**{"model.weight_sparsity.pattern": "unstructured",
                              "model.weight_sparsity.sparsity": 0.5})
  (run / "config.json").write_text(json.dumps(saved.to_dict()))
  ok = loop.config_with_init_from(make_tiny_config(), str(run))
  assert ok.model.weight_sparsity.sparsity == 0.5 and ok.init_from == str(run)
  with pytest.raises(UserError, match=r"model.weight_sparsity: .*'2:4'"):
    loop.config_with_init_from(make_tiny_config(**{"model.weight_sparsity.pattern": "2:4"}),
                               str(run))
  with pytest.raises(UserError, match="model.num_layers: 3 here, 2 in init_from"):
    loop.config_with_init_from(make_tiny_config(**{"model.num_layers": 3}), str(run))
  with pytest.raises(UserError, match="data.tokenizer='bytes'.*'pretrained'"):
    loop.config_with_init_from(
        make_tiny_config(**{"data.tokenizer": "pretrained", "pretrained": "smollm2"}), str(run))

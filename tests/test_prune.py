"""One-shot pruning: Wanda against a numpy port of the official scoring, DSnoT's
invariants, and the pruning pipeline / launcher on a tiny trained run."""

import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from support import ROOT, make_tiny_config, subprocess_env
from sparsity_jax.errors import UserError
from sparsity_jax.models import ModelConfig, TransformerLM
from sparsity_jax.sparsity import SparsitySpec, masks
from sparsity_jax.sparsity import prune as prune_lib

BASE = dict(vocab_size=260, num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, head_dim=8,
            mlp_dim=64, max_len=64)


# ---- numpy port of locuslab/wanda @8e8fc87b (lib/layerwrapper.py, lib/prune.py) ----


def official_scaler_row(sequences):
  """WrappedGPT.add_batch's scaler_row, one [tokens, d_in] sequence per call."""
  scaler, nsamples = np.zeros(sequences[0].shape[-1]), 0
  for seq in sequences:
    scaler *= nsamples / (nsamples + 1)
    nsamples += 1
    scaler += np.linalg.norm(np.asarray(seq, np.float64).T, axis=1) ** 2 / nsamples
  return scaler


def official_wanda_pruned(w_oi, scaler_row, sparsity_ratio=0.5, prune_n=0, prune_m=0):
  """prune_wanda's W_mask (True: pruned) for a torch-layout weight [out, in]; prune_n is
  the number *pruned* per group of prune_m (topk(largest=False)), as the official code."""
  metric = np.abs(w_oi) * np.sqrt(scaler_row.reshape(1, -1))
  pruned = np.zeros(metric.shape, bool)
  if prune_n:
    for ii in range(0, metric.shape[1], prune_m):
      idx = np.argsort(metric[:, ii:ii + prune_m], axis=1)[:, :prune_n]
      np.put_along_axis(pruned[:, ii:ii + prune_m], idx, True, axis=1)
  else:
    idx = np.argsort(metric, axis=-1, kind="stable")[:, :int(metric.shape[1] * sparsity_ratio)]
    np.put_along_axis(pruned, idx, True, axis=1)
  return pruned


def stats_of(sequences):
  x = np.asarray(sequences, np.float64)  # [sequences, tokens, d_in]
  return prune_lib.InputStats(sum_sq=(x * x).sum(axis=(0, 1)), total=x.sum(axis=(0, 1)),
                              var_sum=x.var(axis=1).sum(axis=0), sequences=x.shape[0],
                              tokens=x.shape[0] * x.shape[1])


@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "4:8", "1:4"])
def test_wanda_mask_equals_the_official_scoring_on_a_random_layer(pattern):
  rng = np.random.default_rng(7)
  w_io = rng.normal(size=(64, 24)).astype(np.float32)
  sequences = rng.normal(size=(5, 12, 64)) * rng.uniform(0.1, 3.0, size=64)
  spec = SparsitySpec(pattern=pattern, sparsity=0.6 if pattern == "unstructured" else None)
  keep = masks.keep_for_spec(prune_lib.wanda_scores(w_io, stats_of(sequences)), spec)
  scaler = official_scaler_row(list(sequences))
  if spec.nm:
    n, m = spec.nm
    want = official_wanda_pruned(w_io.T, scaler, prune_n=m - n, prune_m=m)
  else:
    want = official_wanda_pruned(w_io.T, scaler, sparsity_ratio=0.6)
  np.testing.assert_array_equal(~keep, want.T)


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_wanda_layer_by_layer_feeds_pruned_outputs_forward(pattern):
  """Our batched, layer-by-layer Wanda equals the official loop: each block's inputs
  from the dense block run on the already pruned blocks' outputs, one sequence at a time."""
  spec = SparsitySpec(pattern=pattern, sparsity=0.5 if pattern == "unstructured" else None)
  cfg = ModelConfig(**BASE, weight_sparsity=spec.to_dict())
  ours, ref = TransformerLM(cfg, rngs=nnx.Rngs(0)), TransformerLM(cfg, rngs=nnx.Rngs(0))
  calibration = np.random.default_rng(3).integers(0, 256, (6, 16))
  prune_lib.calibrated(ours, spec, calibration, method="wanda", batch_size=4)
  xs = [ref.embed_tokens(jnp.asarray(row[None])) for row in calibration]
  positions = jnp.arange(16)[None]
  for index, block in enumerate(ref.layers):
    inputs = [prune_lib.block_io(block, x, positions)[1] for x in xs]  # Dense block.
    for t in masks.masked(ref):
      if t.path[1] != index:
        continue
      key = "/".join(map(str, t.path[2:]))
      scaler = official_scaler_row([np.asarray(i[key][0]) for i in inputs])
      w_oi = t.matrix(np.asarray(t.param.get_value())).T
      if spec.nm:
        pruned = official_wanda_pruned(w_oi, scaler, prune_n=2, prune_m=4)
      else:
        pruned = official_wanda_pruned(w_oi, scaler, sparsity_ratio=0.5)
      masks.set_mask(t, ~pruned.T)
    xs = [block(x, positions) for x in xs]  # Pruned block.
  got, want = dict(masks.iter_masks(ours)), dict(masks.iter_masks(ref))
  assert len(got) == 14
  for key in want:
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)
  # The second layer's masks depend on the first layer's pruning.
  fresh = TransformerLM(cfg, rngs=nnx.Rngs(0))
  xs = fresh.embed_tokens(jnp.asarray(calibration))
  dense_stats = prune_lib._run_block(fresh.layers[0], [xs], stats=False)[0]
  _, stats = prune_lib._run_block(fresh.layers[1], dense_stats, stats=True)
  t = [t for t in masks.masked(fresh) if t.key == "layers/1/mlp/down"][0]
  dense_fed = masks.keep_for_spec(prune_lib.wanda_scores(
      t.matrix(np.asarray(t.param.get_value())), stats["mlp/down"]), spec)
  assert (t.matrix(got["layers/1/mlp/down"]) != dense_fed).any()


# ---- numpy port of zyxxmu/DSnoT @4c029dfa (lib/prune.py::prune_DSnoT) ----


def official_reorder(x):
  """return_reorder_indice: negative entries in order, then positive ones reversed."""
  n = x.shape[1]
  cols = np.broadcast_to(np.arange(n, dtype=float), x.shape)
  pos = np.sort(np.where(x > 0, cols, np.inf), axis=1)[:, ::-1]
  neg = np.sort(np.where(x < 0, cols, np.inf), axis=1)
  pos[np.isinf(pos)] = 0
  neg[np.isinf(neg)] = 0
  return (pos + neg).astype(int)


def official_dsnot_pruned(w_oi, stats, *, sparsity=0.5, prune_n=0, prune_m=0, max_cycle=50,
                          threshold=0.1, pow_var=1, without_same_sign=True):
  """prune_DSnoT's weight_mask (True: pruned) for one weight [out, in], initial method wanda."""
  take, put = np.take_along_axis, np.put_along_axis
  rows, cols = w_oi.shape
  metric = w_oi * stats.sum_metric_row[None, :]
  initial = np.abs(w_oi) * np.sqrt(stats.scaler_row)[None, :]
  pruned = np.zeros((rows, cols), bool)
  if prune_n:
    prune_idx, res_idx = [], []
    for ii in range(0, cols, prune_m):
      order = np.argsort(initial[:, ii:ii + prune_m], axis=1) + ii
      prune_idx.append(order[:, :prune_n])
      res_idx.append(order[:, prune_n:])
      put(pruned, order[:, :prune_n], True, axis=1)
    prune_idx, res_idx = np.concatenate(prune_idx, 1), np.concatenate(res_idx, 1)
  else:
    order = np.argsort(initial, axis=-1, kind="stable")
    k = int(cols * sparsity)
    prune_idx, res_idx = order[:, :k], order[:, k:]
    put(pruned, prune_idx, True, axis=1)
  regrow = metric.copy()
  put(regrow, res_idx, 0.0, axis=1)
  error = regrow.sum(axis=1, keepdims=True)
  sign0 = np.sign(error)
  regrow = regrow / np.power(stats.var, pow_var)[None, :]
  regrow_block = np.argsort(regrow, axis=1, kind="stable")
  ptr_regrow = np.tile([0, cols - 1], (rows, 1))
  steps = np.tile([1, -1], (rows, 1))
  update = np.ones((rows, 1), bool)
  if prune_n:
    put(initial, prune_idx, np.inf, axis=1)
    max_value = initial.max(axis=1, keepdims=True) + 1
  else:
    wanda = initial.copy()
    put(wanda, prune_idx, np.inf, axis=1)
    wanda_res = np.argsort(wanda, axis=1, kind="stable")[:, :cols - prune_idx.shape[1]]
    pruning_block = take(wanda_res, official_reorder(take(metric, wanda_res, 1)), 1)
    ptr_prune = np.tile([0, pruning_block.shape[1] - 1], (rows, 1))
  for _ in range(max_cycle):
    if not update.any():
      break
    side = (error > 0).astype(int)
    at = take(ptr_regrow, side, 1)
    grow = take(regrow_block, at, 1)
    grow_metric = take(metric, grow, 1)
    put(ptr_regrow, side, at + take(steps, side, 1), axis=1)
    if prune_n:
      start = grow - grow % prune_m
      block = start + np.arange(prune_m)[None, :]
      cut = start + np.argmin(take(initial, block, 1), axis=1, keepdims=True)
      update = update & (sign0 == np.sign(error + take(metric, cut, 1) - grow_metric)) & (
          np.abs(error) > threshold)
      put(initial, cut, max_value, axis=1)
    else:
      p_side = (error < 0).astype(int)
      at = take(ptr_prune, p_side, 1)
      cut = take(pruning_block, at, 1)
      put(ptr_prune, p_side, at + take(steps, p_side, 1), axis=1)
      after = error + take(metric, cut, 1) - grow_metric
      update = update & (np.abs(error) > threshold)
      if not without_same_sign:
        update = update & (sign0 == np.sign(after))
    cut_metric = take(metric, cut, 1)
    put(pruned, cut, update, axis=1)
    put(pruned, grow, ~update, axis=1)
    error = error + np.where(update, cut_metric, 0) - np.where(update, grow_metric, 0)
  return pruned


@pytest.mark.parametrize("pattern,same_sign", [("unstructured", False), ("unstructured", True),
                                               ("2:4", True), ("4:8", True)])
def test_dsnot_mask_equals_a_port_of_the_official_loop(pattern, same_sign):
  spec = SparsitySpec(pattern=pattern, sparsity=0.5 if pattern == "unstructured" else None)
  w, stats = _random_layer(23, d_in=512, d_out=16)
  initial = masks.keep_for_spec(prune_lib.wanda_scores(w, stats), spec)
  keep = prune_lib.dsnot(w, initial, stats, nm=spec.nm,
                         options=prune_lib.DSnoTOptions(same_sign=same_sign))
  w_oi = w.T.astype(np.float64)
  if spec.nm:
    n, m = spec.nm
    want = official_dsnot_pruned(w_oi, stats, prune_n=m - n, prune_m=m)
  else:
    want = official_dsnot_pruned(w_oi, stats, without_same_sign=not same_sign)
  assert (keep != initial).sum() > 100  # Many swaps happened.
  np.testing.assert_array_equal(~keep, want.T)


def _random_layer(seed, d_in=64, d_out=48):
  rng = np.random.default_rng(seed)
  w = rng.normal(size=(d_in, d_out)).astype(np.float32)
  # Inputs with non-zero means, so pruning biases the outputs (what DSnoT corrects).
  sequences = rng.normal(size=(6, 20, d_in)) * rng.uniform(0.2, 2, d_in) + rng.normal(size=d_in)
  return w, stats_of(sequences)


@pytest.mark.parametrize("pattern,same_sign", [("unstructured", False), ("unstructured", True),
                                               ("2:4", True), ("4:8", True)])
def test_dsnot_changes_only_the_mask_and_reduces_its_reconstruction_error(pattern, same_sign):
  spec = SparsitySpec(pattern=pattern, sparsity=0.5 if pattern == "unstructured" else None)
  w, stats = _random_layer(11)
  w_before = w.copy()
  initial = masks.keep_for_spec(prune_lib.wanda_scores(w, stats), spec)
  options = prune_lib.DSnoTOptions(same_sign=same_sign, threshold=0.05)
  keep = prune_lib.dsnot(w, initial, stats, nm=spec.nm, options=options)
  np.testing.assert_array_equal(w, w_before)
  assert (keep != initial).any()
  np.testing.assert_array_equal(keep.sum(axis=0), initial.sum(axis=0))  # Per output.
  if spec.nm:
    assert masks.nm_valid(keep, *spec.nm) and (
        keep.reshape(64 // spec.nm[1], spec.nm[1], 48).sum(axis=1) == spec.nm[0]).all()
  before = np.abs(prune_lib.reconstruction_error(w, initial, stats.sum_metric_row))
  after = np.abs(prune_lib.reconstruction_error(w, keep, stats.sum_metric_row))
  assert after.mean() < 0.9 * before.mean()
  if same_sign and not spec.nm:  # Every unstructured swap moves e toward 0 without crossing
    # it (N:M prunes the lowest-scored weight of the grown one's group, whatever its sign).
    assert (after <= before + 1e-9).all()
  # A row whose error is already within the threshold is left alone.
  loose = prune_lib.dsnot(w, initial, stats, nm=spec.nm,
                          options=prune_lib.DSnoTOptions(threshold=before.max() + 1))
  np.testing.assert_array_equal(loose, initial)


def test_dsnot_in_the_model_keeps_weights_and_skips_mlp_by_default():
  spec = SparsitySpec(sparsity=0.5)
  cfg = ModelConfig(**BASE, weight_sparsity=spec.to_dict())
  model, wanda = TransformerLM(cfg, rngs=nnx.Rngs(0)), TransformerLM(cfg, rngs=nnx.Rngs(0))
  params = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
  calibration = np.random.default_rng(5).integers(0, 256, (4, 16))
  info = prune_lib.calibrated(model, spec, calibration, method="dsnot")
  prune_lib.calibrated(wanda, spec, calibration, method="wanda")
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, nnx.state(model, nnx.Param)),
               params)
  assert sorted(info["dsnot"]) == sorted(f"layers/{i}/attn/{p}_proj" for i in range(2)
                                         for p in "qkvo")
  assert all(v["error_after"] < v["error_before"] for v in info["dsnot"].values())
  got, want = dict(masks.iter_masks(model)), dict(masks.iter_masks(wanda))
  np.testing.assert_array_equal(got["layers/0/mlp/up"], want["layers/0/mlp/up"])
  assert (got["layers/0/attn/q_proj"] != want["layers/0/attn/q_proj"]).any()
  assert masks.report(model)["global"]["mask_sparsity"] == 0.5


def test_pruning_needs_calibration_text():
  spec = SparsitySpec(sparsity=0.5)
  model = TransformerLM(ModelConfig(**BASE), rngs=nnx.Rngs(0))
  with pytest.raises(UserError, match="wanda needs calibration text"):
    prune_lib.prune(model, spec, "wanda")
  with pytest.raises(UserError, match="needs calibration text"):
    prune_lib.prune(model, spec, "dsnot", calibration=np.zeros((0, 8), int))
  with pytest.raises(UserError, match="scope='global' is for magnitude"):
    prune_lib.prune(model, spec, "wanda", scope="global", calibration=np.zeros((2, 8), int))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  from sparsity_jax.train import train_and_evaluate
  workdir = str(tmp_path_factory.mktemp("prune") / "run")
  config = make_tiny_config(**{"train.steps": 2, "model.scan_layers": True})
  train_and_evaluate(config, workdir)
  return workdir


def test_prune_pipeline_writes_a_workdir_hf_weights_and_a_report(tiny_run, tmp_path):
  from sparsity_jax.checkpoints.hf import load_model as load_hf
  from sparsity_jax.sparsity import pipeline
  from sparsity_jax.train import evaluate_workdir, loop

  out, hf_out = str(tmp_path / "pruned"), str(tmp_path / "hf")
  spec = SparsitySpec(pattern="2:4")
  result = pipeline.prune_model(spec=spec, method="dsnot", workdir=tiny_run, calib_samples=4,
                                calib_len=16, out=out, hf_out=hf_out, evaluate_dense=True,
                                log=lambda _: None)
  assert result["sparsity"]["nm_valid"] and result["sparsity"]["mask_sparsity"] == 0.5
  assert result["pruned"]["loss"] > 0 and result["dense"]["loss"] > 0
  report = json.load(open(os.path.join(out, "prune_report.json")))
  assert report["layers"]["layers/1/mlp/gate"]["nm_valid"]
  assert "| layers/0/attn/q_proj |" in open(os.path.join(out, "prune_report.md")).read()
  # Our format: the scanned run came back unscanned, with its masks.
  model = loop.load_model(out)
  assert not model.cfg.scan_layers and len(list(masks.iter_masks(model))) == 14
  evaluated = evaluate_workdir(out)
  np.testing.assert_allclose(evaluated["loss"], result["pruned"]["loss"], rtol=1e-5)
  # Hugging Face: zeros where the masks are False, the same function.
  hf = load_hf(hf_out)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 16)))
  np.testing.assert_allclose(hf(tokens), model(tokens), rtol=1e-5, atol=1e-5)
  zeros = np.asarray(hf.layers[0].mlp.down.get_value()) == 0
  np.testing.assert_array_equal(zeros, ~dict(masks.iter_masks(model))["layers/0/mlp/down"])
  with pytest.raises(UserError, match="holds checkpoints already"):
    pipeline.prune_model(spec=spec, method="magnitude", workdir=tiny_run, out=out)


def test_prune_launcher_reports_missing_calibration_in_one_line(tiny_run, tmp_path):
  run = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "prune.py"),
                        f"--workdir={tiny_run}", "--method=wanda", "--sparsity=0.5",
                        "--calib_samples=0", f"--out={tmp_path / 'x'}"],
                       env=subprocess_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert run.returncode == 2, run.stderr
  assert run.stderr.strip().splitlines() == [
      "error: wanda needs calibration text: set --calib_samples > 0"]
  assert not (tmp_path / "x").exists()


# ---- options: out-of-range values are refused in one line, before the model loads ----

LLAMA = os.path.join(ROOT, "tests", "fixtures", "hf", "llama")  # max_len 512


def run_prune_launcher(*args):
  return subprocess.run([sys.executable, os.path.join(ROOT, "launch", "prune.py"), *args],
                        env=subprocess_env(), cwd=ROOT, capture_output=True, text=True,
                        timeout=300)


@pytest.mark.parametrize("args,message", [
    (["--calib_len=100000", "--sparsity=0.5"],
     "--calib_len=100000 exceeds the model's context of 512 tokens (its max_len); use "
     "--calib_len <= 512"),
    (["--method=dsnot", "--pattern=2:4", "--dsnot_cycles=-1"],
     "--dsnot_cycles=-1 must be a whole number >= 0 (swaps per output; 0 keeps the initial "
     "mask)"),
    (["--sparsity=0"], "--sparsity=0 prunes nothing: give the fraction of weights to zero, in "
     "(0, 1), e.g. --sparsity=0.5"),
    (["--pattern=2:4", "--sparsity=0.5"], "--pattern=2:4 sets the sparsity itself (2 of every 4 "
     "weights kept: 0.5 zeros); leave --sparsity out"),
])
def test_prune_launcher_refuses_out_of_range_options_in_one_line(args, message, tmp_path):
  out = tmp_path / "out"
  run = run_prune_launcher(f"--model={LLAMA}", "--config=configs/lm_tiny.py:runlocal",
                           "--calib_samples=2", *args, f"--out={out}")
  assert run.returncode == 2, run.stderr
  assert run.stderr.strip().splitlines() == [f"error: {message}"]
  assert not out.exists()


def test_prune_options_are_checked_before_the_weights_load(tiny_run, tmp_path, monkeypatch):
  from sparsity_jax import config_lib
  from sparsity_jax.checkpoints import loading
  from sparsity_jax.sparsity import pipeline
  from sparsity_jax.sparsity import spec as spec_lib
  from sparsity_jax.train import loop

  def no_weights(*args, **kwargs):
    raise AssertionError("the weights were read before the options were checked")

  monkeypatch.setattr(loading, "build_loaded", no_weights)
  monkeypatch.setattr(loop, "restore_workdir", no_weights)
  spec, out = SparsitySpec(sparsity=0.5), str(tmp_path / "out")
  config = config_lib.base_config()
  config.update(make_tiny_config().to_dict())  # A byte-level config the fixture fits.
  # Against the model's context (fixture: 512; tiny_run: 128), as soon as its config is read.
  for source, workdir, max_len in ((LLAMA, None, 512), (None, tiny_run, 128)):
    with pytest.raises(UserError, match=rf"--calib_len={max_len + 1} exceeds the model's "
                                        rf"context of {max_len} tokens"):
      pipeline.prune_model(spec=spec, method="wanda", source=source, workdir=workdir,
                           config=config if source else None, calib_len=max_len + 1, out=out)
  with pytest.raises(UserError, match=r"holds \d+ windows of 128 tokens, fewer than the "
                                      "1000000 asked for; lower --calib_samples or --calib_len"):
    pipeline.prune_model(spec=spec, method="dsnot", workdir=tiny_run, calib_samples=10**6)
  for kwargs, message in (
      ({"calib_len": 0}, "--calib_len=0: a calibration window needs at least 1 token"),
      ({"calib_samples": -1}, "wanda needs calibration text: set --calib_samples > 0"),
      ({"scope": "global"}, "--scope=global is for --method=magnitude")):
    with pytest.raises(UserError, match=re.escape(message)):
      pipeline.prune_model(spec=spec, method="wanda", workdir=tiny_run, out=out, **kwargs)
  assert not os.path.exists(out)
  # DSnoT's numbers and the spec, named as the flags.
  for fields, message in (
      ({"threshold": -0.1}, "--dsnot_threshold=-0.1 must be a finite number >= 0"),
      ({"threshold": float("nan")}, "--dsnot_threshold=nan must be a finite number >= 0"),
      ({"max_cycles": 2.5}, "--dsnot_cycles=2.5 must be a whole number >= 0"),
      ({"skip": "(["}, "--dsnot_skip='([' is not a regular expression"),
      ({"initial": "random"}, "--dsnot_initial='random' must be 'wanda' or 'magnitude'")):
    with pytest.raises(UserError, match=re.escape(message)):
      prune_lib.dsnot_options_from_flags(**fields)
  with pytest.raises(UserError, match=r"DSnoTOptions\.pow_of_var=inf must be a finite number"):
    prune_lib.DSnoTOptions(pow_of_var=float("inf"))
  assert prune_lib.dsnot_options_from_flags(max_cycles=0, threshold=0.0).max_cycles == 0
  for fields, message in (({"pattern": "4:4"}, "--pattern=4:4 keeps every weight"),
                          ({"sparsity": 1.0}, "--sparsity=1 must be in (0, 1)"),
                          ({"pattern": "2-4"}, "--pattern='2-4': use 'unstructured' or 'N:M'")):
    with pytest.raises(UserError, match=re.escape(message)):
      spec_lib.from_flags(**fields)


def test_prune_a_run_trained_with_sr_ste_masks(tmp_path):
  """The run's training-time mask method (SR-STE: N:M recomputed from |w|) does not carry
  over: any pattern prunes it, the pruned model's masks stay fixed, and a note says when
  its N:M structure is not kept."""
  from sparsity_jax.sparsity import pipeline
  from sparsity_jax.train import loop, train_and_evaluate

  run = str(tmp_path / "sr_ste")
  train_and_evaluate(make_tiny_config(**{"model.weight_sparsity.pattern": "2:4",
                                         "train.weight_sparsity.method": "sr_ste",
                                         "train.steps": 2, "eval.num_batches": 1}), run,
                     devices=jax.devices()[:1])
  for spec, out in ((SparsitySpec(sparsity=0.5), str(tmp_path / "w50")),
                    (SparsitySpec(pattern="2:4"), None)):
    notes = []
    result = pipeline.prune_model(spec=spec, method="magnitude", workdir=run, out=out,
                                  evaluate_pruned=False, log=notes.append)
    assert result["sparsity"]["mask_sparsity"] == 0.5
    assert notes[0].startswith(f"note: {run} was trained with 2:4 masks (sr_ste)")
    assert ("use --pattern=2:4 to keep its 2:4 structure" in notes[0]) == (spec.nm is None)
  # The pruned model's masks are its own: a training run on it would not recompute them.
  assert loop.load_workdir_config(str(tmp_path / "w50")).train.weight_sparsity.method == "fixed"

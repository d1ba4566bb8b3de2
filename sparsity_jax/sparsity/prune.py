"""One-shot pruning of a trained model: magnitude, Wanda, and DSnoT refinement on top.

Every method only sets masks (:mod:`.masks`); weights never change. Scores are computed
on the host in numpy (float64 statistics), one weight at a time, in each weight's matrix
view [d_in, d_out]; the official codes' per-output-row comparison groups are our columns.

- ``magnitude``: score |W|; ``scope='layer'`` prunes each weight separately (Wanda's and
  DSnoT's ``prune_magnitude``), ``scope='global'`` one threshold over all targeted weights
  (essential sparsity's ``global_unstructured``). N:M keeps the N largest of every M.
- ``wanda``: score |W_ij| * ||X_i||_2 (X_i: input feature i over the calibration tokens),
  the lowest floor(s * d_in) of every output pruned, or the M - N lowest of every group of
  M along the input (N:M). Layer by layer (``calibrated``): statistics of block l's linear
  inputs come from the dense block l run on the outputs of the already pruned blocks
  0..l-1, as ``locuslab/wanda`` ``lib/prune.py::prune_wanda`` does.
- ``dsnot``: DSnoT (``zyxxmu/DSnoT`` ``lib/prune.py::prune_DSnoT``) refines an initial
  Wanda (or magnitude) mask of each weight by swapping one pruned and one kept weight per
  output per cycle, driving the expected reconstruction error of every output,
  e_o = sum over pruned inputs i of W_io * S_i (S_i: a calibration sequence's token sum of
  input i, averaged over sequences), toward zero.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparsity_jax.errors import UserError
from sparsity_jax.sparsity import masks
from sparsity_jax.sparsity.spec import SparsitySpec

METHODS = ("magnitude", "wanda", "dsnot")


# ---- magnitude ----


def magnitude(model: nnx.Module, spec: SparsitySpec, *, scope: str = "layer") -> None:
  """Sets magnitude masks on the weights ``spec`` targets (attached if needed)."""
  if scope not in ("layer", "global"):
    raise UserError(f"magnitude scope={scope!r}; use 'layer' or 'global'")
  targets = masks.attach(model, spec)
  scores = [np.abs(np.asarray(jax.device_get(t.param.get_value()), np.float32))
            for t in targets]
  if spec.nm:
    for t, s in zip(targets, scores):
      masks.set_mask(t, masks.nm_keep(t.matrix(s), *spec.nm))
  elif scope == "global":
    for t, keep in zip(targets, masks.lowest_keep(scores, spec.level)):
      masks.set_mask(t, keep)
  else:  # Each weight (and each layer of a scanned stack) on its own.
    for t, s in zip(targets, scores):
      flat = s.reshape((-1,) + s.shape[t.lead:]) if t.lead else s[None]
      keep = np.stack([masks.lowest_keep([layer], spec.level)[0] for layer in flat])
      masks.set_mask(t, keep.reshape(s.shape))


# ---- calibration statistics ----


@dataclasses.dataclass
class InputStats:
  """Per-input-feature statistics of one linear layer's input over calibration sequences,
  accumulated as ``locuslab/wanda`` / ``zyxxmu/DSnoT`` ``layerwrapper.WrappedGPT`` do
  (one sequence per ``add_batch``)."""

  sum_sq: np.ndarray  # [d_in] sum over sequences and tokens of x^2
  total: np.ndarray  # [d_in] sum over sequences and tokens of x
  var_sum: np.ndarray  # [d_in] sum over sequences of the (biased) variance over its tokens
  sequences: int
  tokens: int

  @property
  def scaler_row(self) -> np.ndarray:
    """Wanda's ||X_i||^2 per sequence (``scaler_row``: sum of squares / sequences)."""
    return self.sum_sq / self.sequences

  @property
  def sum_metric_row(self) -> np.ndarray:
    """DSnoT's S_i: a sequence's token sum of x_i, averaged over sequences."""
    return self.total / self.sequences

  @property
  def var(self) -> np.ndarray:
    """DSnoT's variance: the token-weighted mean of per-sequence variances."""
    return self.var_sum / self.sequences


def block_io(block: nnx.Module, x_bte: jax.Array, positions_bt: jax.Array):
  """(block output, {weight key: its input}) of one transformer Block, computed as
  Block.__call__ computes it (tested equal), with the inputs of every linear layer."""
  attn, mlp = block.attn, block.mlp
  h_bte = block.attn_norm(x_bte)
  q, k, v = attn.project_qkv(h_bte, positions_bt)
  o_btnh = attn.core(q, k, v, positions_bt=positions_bt, causal=attn.causal)
  x_bte = x_bte + attn._output(o_btnh)
  g_bte = block.mlp_norm(x_bte)
  a_btf = mlp.hidden(g_bte)
  y_bte = x_bte + mlp.project_down(a_btf)
  b, t = o_btnh.shape[:2]
  o_btf = o_btnh.reshape(b, t, -1)
  inputs = {"attn/q_proj": h_bte, "attn/k_proj": h_bte, "attn/v_proj": h_bte,
            "attn/o_proj": o_btf, "mlp/gate": g_bte, "mlp/up": g_bte, "mlp/down": a_btf}
  return y_bte, inputs


def _moments(a_btd: jax.Array):
  a = a_btd.astype(jnp.float32)
  return (jnp.sum(a * a, axis=(0, 1)), jnp.sum(a, axis=(0, 1)),
          jnp.sum(jnp.var(a, axis=1), axis=0))


@functools.partial(jax.jit, static_argnums=0)
def _block_stats(graphdef, state, x_bte, positions_bt):
  y, inputs = block_io(nnx.merge(graphdef, state), x_bte, positions_bt)
  distinct = {}
  for key, a in inputs.items():  # q/k/v (and gate/up) share one input.
    distinct.setdefault(id(a), (a, []))[1].append(key)
  stats = {}
  for a, keys in distinct.values():
    m = _moments(a)
    for key in keys:
      stats[key] = m
  return y, stats


@functools.partial(jax.jit, static_argnums=0)
def _block_forward(graphdef, state, x_bte, positions_bt):
  return nnx.merge(graphdef, state)(x_bte, positions_bt)


def _run_block(block, xs: Sequence[jax.Array], *, stats: bool):
  """Runs ``block`` on every batch of ``xs``; returns (outputs, {key: InputStats} or None)."""
  graphdef, state = nnx.split(block)
  outs, acc, seqs, tokens = [], {}, 0, 0
  for x in xs:
    b, t = x.shape[:2]
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    if stats:
      y, moments = _block_stats(graphdef, state, x, positions)
      for key, m in jax.device_get(moments).items():
        prev = acc.get(key)
        m = tuple(np.asarray(v, np.float64) for v in m)
        acc[key] = m if prev is None else tuple(p + v for p, v in zip(prev, m))
      seqs, tokens = seqs + b, tokens + b * t
    else:
      y = _block_forward(graphdef, state, x, positions)
    outs.append(y)
  if not stats:
    return outs, None
  return outs, {k: InputStats(*v, sequences=seqs, tokens=tokens) for k, v in acc.items()}


# ---- Wanda ----


def wanda_scores(w_io: np.ndarray, stats: InputStats) -> np.ndarray:
  """|W_io| * sqrt(scaler_row_i) in the matrix view [d_in, d_out]."""
  return np.abs(w_io.astype(np.float32)) * np.sqrt(stats.scaler_row.astype(np.float32))[:, None]


# ---- DSnoT ----


@dataclasses.dataclass(frozen=True)
class DSnoTOptions:
  """DSnoT's settings, defaults as ``zyxxmu/DSnoT`` main.py."""

  max_cycles: int = 50  # --max_cycle_time
  threshold: float = 0.1  # --update_threshold, in units of W * S (see module docstring)
  pow_of_var: float = 1.0  # --pow_of_var_regrowing
  # --without_same_sign (default True): unstructured swaps may flip the error's sign; N:M
  # always requires the sign to stay.
  same_sign: bool = False
  initial: str = "wanda"  # --initial_method: 'wanda' or 'magnitude'
  skip: str = "mlp/"  # --skip_layer=mlp: weights whose key matches keep the initial mask

  def __post_init__(self):
    # Checked here, not mid-pruning: a bad value would otherwise surface after the model
    # loaded and calibrated (a negative cycle count silently refines nothing).
    def fail(field, rule):
      raise UserError(f"DSnoTOptions.{field}={getattr(self, field)!r} {rule}")

    def number(value):  # numpy scalars too; True / False are not numbers here.
      return isinstance(value, numbers.Real) and not isinstance(value, bool)

    cycles = self.max_cycles
    if not isinstance(cycles, numbers.Integral) or isinstance(cycles, bool) or cycles < 0:
      fail("max_cycles", "must be a whole number >= 0 (swaps per output; 0 keeps the "
           "initial mask)")
    if not number(self.threshold) or not 0 <= self.threshold < float("inf"):
      fail("threshold", "must be a finite number >= 0 (outputs whose |error| is above it "
           "are refined)")
    if not number(self.pow_of_var) or not abs(self.pow_of_var) < float("inf"):
      fail("pow_of_var", "must be a finite number")
    if self.initial not in ("wanda", "magnitude"):
      fail("initial", "must be 'wanda' or 'magnitude'")
    if not isinstance(self.same_sign, (bool, np.bool_)):
      fail("same_sign", "must be True or False")
    if not isinstance(self.skip, str):
      fail("skip", "must be a regular expression ('' refines every weight)")
    try:
      re.compile(self.skip)
    except re.error as e:
      fail("skip", f"is not a regular expression ({e})")


#: launch/prune.py's flag for each DSnoTOptions field (pow_of_var has none).
DSNOT_FLAGS = {"max_cycles": "dsnot_cycles", "threshold": "dsnot_threshold",
               "initial": "dsnot_initial", "skip": "dsnot_skip", "same_sign": "dsnot_same_sign"}


def dsnot_options_from_flags(**fields) -> DSnoTOptions:
  """DSnoTOptions from launch/prune.py's --dsnot_* flags; errors name the flags."""
  try:
    return DSnoTOptions(**fields)
  except UserError as e:
    message = str(e)
    for field, flag in DSNOT_FLAGS.items():
      message = message.replace(f"DSnoTOptions.{field}=", f"--{flag}=")
    raise UserError(message) from None


def reconstruction_error(w_io: np.ndarray, keep_io: np.ndarray, s_i: np.ndarray) -> np.ndarray:
  """DSnoT's per-output error e_o = sum over pruned i of W_io * S_i, [d_out]."""
  contrib = w_io.astype(np.float64) * s_i.astype(np.float64)[:, None]
  return np.where(keep_io, 0.0, contrib).sum(axis=0)


def dsnot(w_io: np.ndarray, keep_io: np.ndarray, stats: InputStats, *,
          nm: tuple[int, int] | None = None, initial_scores: np.ndarray | None = None,
          options: DSnoTOptions = DSnoTOptions()) -> np.ndarray:
  """DSnoT's prune-and-grow refinement of one weight's mask (matrix view [d_in, d_out]).

  Per output o and cycle, while |e_o| > threshold: grow the pruned input whose
  contribution W_io * S_i divided by Var_i^p is the largest positive (e_o > 0) or most
  negative (e_o <= 0) not yet tried, and prune a kept one: unstructured, the kept input
  with the lowest Wanda score among those whose contribution has the sign that moves e_o
  toward 0; N:M, the kept input with the lowest initial score in the grown input's group
  of M (so every group keeps N). A row stops for good once a swap is refused (|e_o| at
  the threshold, or the sign check). The weights never change; returns the new keep mask.

  ``initial_scores``: the scores the initial mask came from (N:M's prune choice); default
  the Wanda scores.
  """
  w = w_io.astype(np.float64).T  # [rows = outputs, cols = inputs], as the official code.
  keep = np.array(keep_io, bool).T
  rows, cols = w.shape
  s = stats.sum_metric_row.astype(np.float64)
  contrib = w * s[None, :]
  wanda = wanda_scores(w_io, stats).T.astype(np.float64)
  initial = wanda if initial_scores is None else np.asarray(initial_scores, np.float64).T
  error = np.where(keep, 0.0, contrib).sum(axis=1)
  sign0 = np.sign(error)
  grow_metric = contrib / np.power(stats.var.astype(np.float64), options.pow_of_var)[None, :]
  big = np.inf
  # Grow candidates: pruned inputs, most negative first / most positive first.
  grow_neg = np.argsort(np.where(~keep & (grow_metric < 0), grow_metric, big), axis=1,
                        kind="stable")
  grow_pos = np.argsort(np.where(~keep & (grow_metric > 0), -grow_metric, big), axis=1,
                        kind="stable")
  n_grow_neg = (~keep & (grow_metric < 0)).sum(axis=1)
  n_grow_pos = (~keep & (grow_metric > 0)).sum(axis=1)
  if nm is None:  # Prune candidates: kept inputs by contribution sign, lowest Wanda first.
    prune_neg = np.argsort(np.where(keep & (contrib < 0), wanda, big), axis=1, kind="stable")
    prune_pos = np.argsort(np.where(keep & (contrib > 0), wanda, big), axis=1, kind="stable")
    n_prune_neg = (keep & (contrib < 0)).sum(axis=1)
    n_prune_pos = (keep & (contrib > 0)).sum(axis=1)
    ptr_prune = np.zeros((rows, 2), int)
  else:
    m = nm[1]
    prunable = keep.copy()  # Initially kept and not yet swapped out.
  ptr_grow = np.zeros((rows, 2), int)  # [negative list, positive list]
  same_sign = options.same_sign or nm is not None
  active = np.ones(rows, bool)
  r = np.arange(rows)
  for _ in range(options.max_cycles):
    if not active.any():
      break
    positive = error > 0
    side = positive.astype(int)
    g_lists = np.where(positive[:, None], grow_pos, grow_neg)
    g_avail = ptr_grow[r, side] < np.where(positive, n_grow_pos, n_grow_neg)
    g = g_lists[r, np.minimum(ptr_grow[r, side], cols - 1)]
    ptr_grow[r, side] += 1
    if nm is None:
      # e > 0 needs a negative contribution pruned, e <= 0 a positive one.
      p_side = (~positive).astype(int)
      p_lists = np.where(positive[:, None], prune_neg, prune_pos)
      p_avail = ptr_prune[r, p_side] < np.where(positive, n_prune_neg, n_prune_pos)
      p = p_lists[r, np.minimum(ptr_prune[r, p_side], cols - 1)]
      ptr_prune[r, p_side] += 1
    else:
      start = (g // m) * m
      group = start[:, None] + np.arange(m)[None, :]
      cand = np.where(prunable[r[:, None], group], initial[r[:, None], group], big)
      p = start + np.argmin(cand, axis=1)
      p_avail = np.isfinite(cand.min(axis=1))
    after = error + contrib[r, p] - contrib[r, g]
    ok = active & g_avail & p_avail & (np.abs(error) > options.threshold)
    if same_sign:
      ok &= np.sign(after) == sign0
    active = ok
    rr = r[ok]
    keep[rr, p[ok]] = False
    keep[rr, g[ok]] = True
    if nm is not None:
      prunable[rr, p[ok]] = False
    error = np.where(ok, after, error)
  return keep.T


# ---- layer by layer ----


def _block_targets(model: nnx.Module, targets: Sequence[masks.Target]):
  """{layer index: [(key inside the block, target)]}; raises for weights outside blocks."""
  by_layer: dict[int, list] = {}
  for t in targets:
    if len(t.path) < 3 or t.path[0] != "layers" or not isinstance(t.path[1], int):
      raise UserError(f"calibrated pruning (wanda, dsnot) handles weights inside the "
                      f"blocks of an unscanned model; {t.key} is not one (leave it out of "
                      "the targets, or load the model with scan_layers=False)")
    by_layer.setdefault(t.path[1], []).append(("/".join(map(str, t.path[2:])), t))
  return by_layer


def calibrated(model: nnx.Module, spec: SparsitySpec, calibration: np.ndarray, *,
               method: str = "wanda", dsnot_options: DSnoTOptions = DSnoTOptions(),
               batch_size: int = 8, log=None) -> dict[str, Any]:
  """Wanda (``method='wanda'``) or Wanda/magnitude + DSnoT (``'dsnot'``) masks, layer by
  layer with the pruned blocks' outputs fed forward.

  Args:
    model: a TransformerLM with unscanned layers (list), dense attention or any core.
    spec: what to prune; masks are attached if absent.
    calibration: int token ids [sequences, length] (calibration text).
    batch_size: sequences per forward call.

  Returns:
    {"dsnot": {key: {"error_before", "error_after", "swaps"}}} (mean |e_o| per weight).
  """
  if method not in ("wanda", "dsnot"):
    raise UserError(f"calibrated pruning method={method!r}; use 'wanda' or 'dsnot'")
  calibration = np.asarray(calibration)
  if calibration.ndim != 2 or calibration.shape[0] == 0 or calibration.shape[1] == 0:
    raise UserError("pruning with wanda / dsnot needs calibration text: give token ids "
                    f"[sequences, length], got an array of shape {calibration.shape}")
  if getattr(model.cfg, "scan_layers", False):
    raise UserError("calibrated pruning needs per-layer blocks: load the model with "
                    "scan_layers=False")
  targets = masks.attach(model, spec)
  by_layer = _block_targets(model, targets)
  xs = [model.embed_tokens(jnp.asarray(calibration[i:i + batch_size]))
        for i in range(0, len(calibration), batch_size)]
  info: dict[str, Any] = {"dsnot": {}}
  for index, block in enumerate(model.layers):
    layer_targets = by_layer.get(index, [])
    if layer_targets:
      _, stats = _run_block(block, xs, stats=True)
      for key, t in layer_targets:
        w = np.asarray(jax.device_get(t.param.get_value()))
        w_io = t.matrix(w)
        st = stats[key]
        if method == "dsnot" and dsnot_options.initial == "magnitude":
          initial_scores = np.abs(w_io).astype(np.float32)
        else:
          initial_scores = wanda_scores(w_io, st)
        keep = masks.keep_for_spec(initial_scores, spec)
        if method == "dsnot" and not (dsnot_options.skip and re.search(dsnot_options.skip, key)):
          before = reconstruction_error(w_io, keep, st.sum_metric_row)
          new = dsnot(w_io, keep, st, nm=spec.nm, initial_scores=initial_scores,
                      options=dsnot_options)
          after = reconstruction_error(w_io, new, st.sum_metric_row)
          info["dsnot"][t.key] = {"error_before": float(np.abs(before).mean()),
                                  "error_after": float(np.abs(after).mean()),
                                  "swaps": int((new & ~keep).sum())}
          keep = new
        masks.set_mask(t, keep)
    xs, _ = _run_block(block, xs, stats=False)
    if log:
      log(f"pruned block {index + 1}/{len(model.layers)}")
  return info


def prune(model: nnx.Module, spec: SparsitySpec, method: str, *, scope: str = "layer",
          calibration: np.ndarray | None = None, dsnot_options: DSnoTOptions = DSnoTOptions(),
          batch_size: int = 8, log=None) -> dict[str, Any]:
  """Sets the masks of ``model`` with one of :data:`METHODS`; returns method details."""
  if method not in METHODS:
    raise UserError(f"pruning method {method!r}; use one of {', '.join(METHODS)}")
  if method == "magnitude":
    magnitude(model, spec, scope=scope)
    return {}
  if scope != "layer":
    raise UserError(f"{method} compares weights per output (scope='layer'); scope={scope!r} "
                    "is for magnitude pruning")
  if calibration is None:
    raise UserError(f"{method} needs calibration text (token ids); none was given")
  return calibrated(model, spec, calibration, method=method, dsnot_options=dsnot_options,
                    batch_size=batch_size, log=log)

"""MoA plans: per layer and KV head an elastic span rule, and their I/O.

A rule (alpha, beta, sink) gives a head, at input length N, the token-exact
pattern "query i sees keys i - w < j <= i, plus the first `sink` tokens" with

    w(N) = clip(floor(alpha + beta * N), min_window, N)          (``rule_window``)

min_window is the floor that keeps every head's cache at least sink + min_window tokens
(the pipeline sets it from ``min_cache``, 128 by default like the official runtime's
minimum cache); a plan refuses lengths past ``max_length``, the longest length its budget
was checked at.

The same function is used by search (costs and densities), prefill (block
masks), and decode (ring-buffer sizes), so the pattern is identical everywhere.
A head's KV cache holds min(N, sink + w(N)) tokens (``rule_capacity``); the
plan's density at N is the mean of that over N, i.e. the KV-cache fraction.

plan.json:
  {"version": 1, "num_layers": L, "num_kv_heads": K, "num_heads": n,
   "max_length": N_max,   # longest length the density budget was checked at
   "min_window": 64,      # window floor (min_cache 128 - sink 64)
   "layers": [{"heads": [{"alpha": a, "beta": b, "sink": s}, ...K]}, ...L],
   "meta": {...}}         # free-form provenance (lengths, budget, objective, ...)
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any

import numpy as np

VERSION = 1


def rule_window(alpha, beta, length: int, min_window: int = 1):
  """Window w(N) in tokens (including the query itself); broadcasts over rules."""
  w = np.floor(np.asarray(alpha, np.float64) + np.asarray(beta, np.float64) * length + 1e-9)
  return np.clip(w, min_window, length).astype(np.int64)


def rule_capacity(alpha, beta, sink, length: int, min_window: int = 1):
  """KV-cache tokens a head keeps at length N: min(N, sink + w(N))."""
  return np.minimum(length, np.asarray(sink) + rule_window(alpha, beta, length, min_window))


def check_length(length: int, max_length: int) -> None:
  """Raises if a plan is used past the longest length its budget was checked at."""
  if length < 1:
    raise ValueError(f"MoA plans need a length >= 1, got {length}")
  if length > max_length:
    raise ValueError(
        f"length {length} is beyond the plan's max_length={max_length} (the longest length "
        "its density budget was checked at); re-run `launch/moa.py search` with "
        f"--extend_length >= {length}")


@dataclasses.dataclass(frozen=True)
class Plan:
  """Per-(layer, KV head) rules. Arrays are [L, K]."""

  alpha: np.ndarray
  beta: np.ndarray
  sink: np.ndarray
  num_heads: int
  max_length: int
  min_window: int = 1
  meta: dict = dataclasses.field(default_factory=dict, compare=False)

  def __post_init__(self):
    for name in ("alpha", "beta", "sink"):
      object.__setattr__(self, name, np.asarray(getattr(self, name)))
    if not self.alpha.shape == self.beta.shape == self.sink.shape or self.alpha.ndim != 2:
      raise ValueError(f"plan alpha/beta/sink must all be [layers, kv_heads], got "
                       f"{self.alpha.shape}, {self.beta.shape}, {self.sink.shape}")
    if self.min_window < 1:
      raise ValueError(f"plan min_window must be >= 1 (a query always sees itself), got "
                       f"{self.min_window}")
    if (self.sink < 0).any() or (self.beta < 0).any():
      raise ValueError("plan sinks and betas must be non-negative")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"plan num_heads={self.num_heads} is not a multiple of its "
                       f"{self.num_kv_heads} KV heads")

  @property
  def num_layers(self) -> int:
    return self.alpha.shape[0]

  @property
  def num_kv_heads(self) -> int:
    return self.alpha.shape[1]

  def windows(self, length: int) -> np.ndarray:
    """[L, K] windows at input length N (raises past ``max_length``)."""
    self.check_length(length)
    return rule_window(self.alpha, self.beta, length, self.min_window)

  def capacities(self, length: int) -> np.ndarray:
    """[L, K] KV-cache tokens per head at length N (raises past ``max_length``)."""
    self.check_length(length)
    return rule_capacity(self.alpha, self.beta, self.sink, length, self.min_window)

  def density(self, length: int) -> float:
    """Mean KV-cache fraction at N (the quantity the search budgets)."""
    return float(self.capacities(length).mean() / length)

  def rules(self, layer: int) -> list[tuple[float, float, int]]:
    """Distinct (alpha, beta, sink) of a layer, in first-seen order."""
    seen = []
    for r in zip(self.alpha[layer].tolist(), self.beta[layer].tolist(),
                 self.sink[layer].tolist()):
      if r not in seen:
        seen.append(r)
    return seen

  def check_length(self, length: int) -> None:
    check_length(length, self.max_length)

  def validate(self, model_config: Any) -> None:
    """Raises a ValueError naming the mismatch if the plan does not fit the model."""
    layers, kv, heads = (int(model_config.num_layers), int(model_config.num_kv_heads),
                         int(model_config.num_heads))
    problems = []
    if self.num_layers != layers:
      problems.append(f"{self.num_layers} layers but the model has {layers}")
    if self.num_kv_heads != kv:
      problems.append(f"{self.num_kv_heads} KV heads per layer but the model has {kv}")
    if self.num_heads != heads:
      problems.append(f"{self.num_heads} query heads but the model has {heads}")
    if problems:
      raise ValueError("MoA plan does not match the model: plan has " + "; ".join(problems)
                       + ". Profile and search this model (launch/moa.py) to get its plan.")

  def to_json(self) -> dict:
    layers = [{"heads": [{"alpha": float(a), "beta": float(b), "sink": int(s)}
                         for a, b, s in zip(self.alpha[l], self.beta[l], self.sink[l])]}
              for l in range(self.num_layers)]
    return {"version": VERSION, "num_layers": self.num_layers,
            "num_kv_heads": self.num_kv_heads, "num_heads": self.num_heads,
            "max_length": int(self.max_length), "min_window": int(self.min_window),
            "layers": layers, "meta": self.meta}

  @classmethod
  def from_json(cls, data: dict, source: str = "plan") -> "Plan":
    try:
      if data.get("version") != VERSION:
        raise ValueError(f"version {data.get('version')!r}, expected {VERSION}")
      layers = data["layers"]
      if len(layers) != data["num_layers"]:
        raise ValueError(f"{len(layers)} layer entries but num_layers={data['num_layers']}")
      for l, layer in enumerate(layers):
        if len(layer["heads"]) != data["num_kv_heads"]:
          raise ValueError(f"layer {l} has {len(layer['heads'])} heads but "
                           f"num_kv_heads={data['num_kv_heads']}")
      get = lambda key: np.array([[h[key] for h in layer["heads"]] for layer in layers])
      return cls(alpha=get("alpha").astype(np.float64), beta=get("beta").astype(np.float64),
                 sink=get("sink").astype(np.int64), num_heads=int(data["num_heads"]),
                 max_length=int(data["max_length"]), min_window=int(data.get("min_window", 1)),
                 meta=dict(data.get("meta", {})))
    except (KeyError, TypeError, ValueError) as e:
      raise ValueError(f"{source} is not a valid MoA plan ({type(e).__name__}: {e})") from None


def uniform_plan(num_layers: int, num_kv_heads: int, num_heads: int, *, alpha: float = 0.0,
                 beta: float = 0.5, sink: int = 64, max_length: int, min_window: int = 1,
                 **meta) -> Plan:
  """The same rule for every head (e.g. StreamingLLM: window = beta * N plus sinks)."""
  full = lambda x, dt: np.full((num_layers, num_kv_heads), x, dt)
  return Plan(full(alpha, np.float64), full(beta, np.float64), full(sink, np.int64),
              num_heads=num_heads, max_length=max_length, min_window=min_window,
              meta=dict(meta))


def streaming_plan(full_heads: np.ndarray, num_heads: int, *, budget: float, sink: int = 64,
                   max_length: int, min_window: int = 1, **meta) -> Plan:
  """Full-span heads, every other head a StreamingLLM window at the density left over.

  The DuoAttention layout (Xiao et al. 2024: retrieval heads keep the whole KV cache,
  streaming heads keep sinks + recent tokens), budget-matched and elastic instead of
  DuoAttention's constant streaming window: with a fraction f of the KV heads full, each
  other head keeps ``sink`` sinks + a window of r*N - sink tokens (r*N in all),
  r = (budget - f) / (1 - f), so the plan's KV density is ``budget`` at every N where
  r*N - sink >= min_window. Below that (short N, or a sink larger than r*N) the window is
  held at min_window and the density exceeds the budget: check ``plan.density(N)``.

  Args:
    full_heads: bool [L, K], the heads at full span (e.g. ``moa.retrieval.select``).
    num_heads: query heads per layer (a multiple of K).
    budget: mean KV-cache fraction in (0, 1]; above the fraction of full heads (or 1 with
      every head full).
    sink: sink tokens of every streaming head; max_length: the longest length the plan
      accepts; min_window: the window floor (``Plan``); meta: provenance kept in the plan.
  Raises:
    ValueError (one line) for a budget outside (0, 1], a mask that is not bool [L, K] or is
    empty, or full heads that leave no density for the others.
  """
  if not 0.0 < budget <= 1.0:  # Also refuses NaN.
    raise ValueError(f"budget={budget} must be in (0, 1] (the mean KV-cache fraction)")
  full = np.asarray(full_heads)
  if full.ndim != 2 or full.size == 0:
    raise ValueError(f"full_heads must be a non-empty bool [layers, kv_heads] mask, got shape "
                     f"{full.shape}")
  if full.dtype != bool:
    raise ValueError(f"full_heads must be a bool mask (e.g. retrieval.select), got dtype "
                     f"{full.dtype}")
  frac = float(full.mean())
  if frac > budget or (frac == budget and frac < 1.0):  # All full needs budget 1.
    raise ValueError(f"{int(full.sum())} full heads of {full.size} are a KV fraction of "
                     f"{frac:.3f}, not below the budget {budget}: keep fewer heads at full "
                     "span (the others need some cache)")
  rest = 1.0 if frac >= 1.0 else (budget - frac) / (1.0 - frac)
  return Plan(np.where(full, 0.0, -float(sink)), np.where(full, 1.0, rest),
              np.full(full.shape, sink, np.int64), num_heads=num_heads,
              max_length=max_length, min_window=min_window,
              meta=dict(meta, kind="streaming", full_heads=int(full.sum()),
                        streaming_density=rest))


def save_plan(plan: Plan, path: str) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(plan.to_json(), f, indent=1)
  os.replace(tmp, path)


@functools.lru_cache(maxsize=16)
def _load_cached(path: str, mtime: float) -> Plan:
  del mtime  # Part of the cache key: an edited file is re-read.
  with open(path) as f:
    try:
      data = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path} is not valid JSON: {e}") from None
  return Plan.from_json(data, source=path)


def load_plan(path: str) -> Plan:
  if not path or not os.path.exists(path):
    raise FileNotFoundError(f"MoA plan {path!r} not found: set config.model.attention.plan to "
                            "a plan.json written by `launch/moa.py search` / `validate`")
  return _load_cached(os.path.abspath(path), os.path.getmtime(path))

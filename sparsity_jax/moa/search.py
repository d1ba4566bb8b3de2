"""Search per-KV-head elastic rules under a density budget (MILP, scipy/HiGHS).

Variables: x[l, k, r] = 1 if KV head k of layer l takes candidate rule r, and
y[l, r] = 1 if layer l uses rule r. Constraints:

  sum_r x[l, k, r] = 1                         one rule per head
  x[l, k, r] <= y[l, r],  sum_r y[l, r] <= R   at most R distinct rules per layer
  mean_{l,k} density_N(x) <= budget_N          at every profiled length and the extension
  (>= lower_ratio * budget_N, optional)

Objectives, one per profiled length N: Z_N = sum x * cost_N / total_N, where
cost_N[l, k, r] is the influence of the pairs rule r drops at N (the profile's
distance statistic summed from the rule's window on; token-exact) and total_N
the influence of everything droppable, so Z_N is the fraction of influence
lost. Multi-objective by the epsilon-constraint method: each Z_N alone gives
the ranges, then every Z_N is minimised with the others bounded on a grid of
`num_intervals` values each; the Pareto-nondominated solutions are the plans.

Density is the KV-cache fraction min(N, sink + w(N)) / N (plan.rule_capacity).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping, Sequence

import numpy as np
import scipy.optimize
import scipy.sparse

from sparsity_jax.moa import plan as plan_lib
from sparsity_jax.moa.profile import Influence


def candidate_rules(min_length: int, max_length: int, extend_length: int, *,
                    alpha_interval: int | None = None, num_betas: int = 9) -> np.ndarray:
  """The paper's grid, scaled: [R, 2] (alpha, beta) pairs.

  alpha in linspace(-min_length, max_length, (max+min) / alpha_interval + 1) (default
  interval max_length / 8, i.e. 1024 at 8k), beta in linspace(0, 1, num_betas); kept
  if the span is positive at min_length and at most the length at max_length and
  extend_length (48 rules with the paper's 2k / 8k / 16k).
  """
  alpha_interval = alpha_interval or max(1, max_length // 8)
  alphas = np.linspace(-min_length, max_length, (max_length + min_length) // alpha_interval + 1)
  betas = np.linspace(0.0, 1.0, num_betas)
  rules = [(a, b) for a in alphas for b in betas
           if a + b * max_length <= max_length and a + b * extend_length <= extend_length
           and a + b * min_length > 0]
  return np.array(rules, np.float64).reshape(-1, 2)


def rule_costs(influence: Influence, rules: np.ndarray, min_window: int = 1) -> np.ndarray:
  """[L, K, R] influence each rule drops at the profile's length (token-exact)."""
  n = influence.length
  tail = np.cumsum(influence.distance[..., ::-1], axis=-1)[..., ::-1]  # tail[d] = sum_{>= d}
  tail = np.concatenate([tail, np.zeros(tail.shape[:-1] + (1,))], axis=-1)
  windows = plan_lib.rule_window(rules[:, 0], rules[:, 1], n, min_window)
  return tail[..., windows]


def rule_densities(rules: np.ndarray, sink: int, length: int, min_window: int = 1):
  """[R] KV-cache fraction of each rule at length N."""
  return plan_lib.rule_capacity(rules[:, 0], rules[:, 1], sink, length, min_window) / length


@dataclasses.dataclass
class Problem:
  """A search instance: costs[N] [L, K, R] (normalised), densities[N] [R], budgets[N]."""

  costs: dict[int, np.ndarray]
  densities: dict[int, np.ndarray]
  budgets: dict[int, float]
  max_rules_per_layer: int = 2
  lower_ratio: float = 0.0
  fixed: np.ndarray | None = None  # [L, K] rule index a head must take, -1 where free.

  @property
  def shape(self):
    return next(iter(self.costs.values())).shape


def _model(problem: Problem, objective: int, eps: Mapping[int, float]):
  """(c, A, lb, ub) over [x (L*K*R), y (L*R)]."""
  nl, nk, nr = problem.shape
  nx, ny = nl * nk * nr, nl * nr
  xi = lambda l, k, r: (l * nk + k) * nr + r
  rows, lbs, ubs = [], [], []

  def add(coeffs: dict[int, float], lo, hi):
    rows.append(coeffs)
    lbs.append(lo)
    ubs.append(hi)

  for l in range(nl):
    for k in range(nk):
      add({xi(l, k, r): 1.0 for r in range(nr)}, 1, 1)
      if problem.fixed is not None and problem.fixed[l, k] >= 0:
        add({xi(l, k, int(problem.fixed[l, k])): 1.0}, 1, 1)
  if problem.max_rules_per_layer < nr:
    for l in range(nl):
      for k in range(nk):
        for r in range(nr):
          add({xi(l, k, r): 1.0, nx + l * nr + r: -1.0}, -np.inf, 0)
      add({nx + l * nr + r: 1.0 for r in range(nr)}, -np.inf, problem.max_rules_per_layer)
  for n, dens in problem.densities.items():
    budget = problem.budgets[n] * nl * nk
    coeffs = {xi(l, k, r): float(dens[r]) for l in range(nl) for k in range(nk)
              for r in range(nr)}
    add(coeffs, problem.lower_ratio * budget, budget + 1e-9)
  for n, bound in eps.items():
    cost = problem.costs[n]
    add({xi(l, k, r): float(cost[l, k, r]) for l in range(nl) for k in range(nk)
         for r in range(nr)}, -np.inf, bound + 1e-9)
  a = scipy.sparse.lil_matrix((len(rows), nx + ny))
  for i, coeffs in enumerate(rows):
    for j, v in coeffs.items():
      a[i, j] = v
  c = np.concatenate([problem.costs[objective].ravel(), np.zeros(ny)])
  return c, a.tocsr(), np.array(lbs), np.array(ubs)


def solve(problem: Problem, objective: int, eps: Mapping[int, float] | None = None,
          time_limit: float = 60.0) -> np.ndarray | None:
  """Minimises Z_objective; returns the rule index [L, K] or None if infeasible."""
  nl, nk, nr = problem.shape
  c, a, lb, ub = _model(problem, objective, eps or {})
  res = scipy.optimize.milp(c, integrality=np.ones_like(c), bounds=scipy.optimize.Bounds(0, 1),
                            constraints=scipy.optimize.LinearConstraint(a, lb, ub),
                            options={"time_limit": time_limit})
  if res.x is None:
    return None
  x = np.round(res.x[:nl * nk * nr]).reshape(nl, nk, nr)
  return x.argmax(-1)


def objectives(problem: Problem, choice: np.ndarray) -> dict[int, float]:
  nl, nk, _ = problem.shape
  li, ki = np.meshgrid(range(nl), range(nk), indexing="ij")
  return {n: float(cost[li, ki, choice].sum()) for n, cost in problem.costs.items()}


def check_feasible(problem: Problem, rules: np.ndarray) -> None:
  for n, dens in problem.densities.items():
    if dens.min() > problem.budgets[n] + 1e-9:
      raise ValueError(
          f"density budget {problem.budgets[n]:.3f} is infeasible at length {n}: the sparsest "
          f"candidate rule keeps {dens.min():.3f} of the KV cache (sink + minimum span). Raise "
          "the budget, lower the sink, or add smaller spans (smaller --alpha_interval).")
    if problem.fixed is not None:
      held = problem.fixed >= 0
      least = np.where(held, dens[np.maximum(problem.fixed, 0)], dens.min()).mean()
      if least > problem.budgets[n] + 1e-9:
        raise ValueError(
            f"{int(held.sum())} heads at full span need a mean density of at least "
            f"{least:.3f} at length {n}, above the budget {problem.budgets[n]:.3f}: keep "
            "fewer retrieval heads (--retrieval_heads) or raise the budget.")


def pareto_sweep(problem: Problem, num_intervals: int = 4,
                 time_limit: float = 60.0) -> list[tuple[np.ndarray, dict[int, float]]]:
  """Epsilon-constraint sweep; Pareto-nondominated (choice [L, K], objectives) pairs."""
  lengths = sorted(problem.costs)
  anchors = []
  for n in lengths:
    choice = solve(problem, n, time_limit=time_limit)
    if choice is None:
      raise ValueError("no plan satisfies the density budgets with at most "
                       f"{problem.max_rules_per_layer} rules per layer; raise the budget or "
                       "--num_rules, or lower --lower_ratio")
    anchors.append(choice)
  found = list(anchors)
  if len(lengths) > 1:
    values = [objectives(problem, ch) for ch in anchors]
    grids = {n: np.linspace(min(v[n] for v in values), max(v[n] for v in values),
                            num_intervals + 1)[1:] for n in lengths}
    for n in lengths:
      others = [m for m in lengths if m != n]
      for bounds in itertools.product(*(grids[m] for m in others)):
        choice = solve(problem, n, dict(zip(others, bounds)), time_limit=time_limit)
        if choice is not None:
          found.append(choice)
  results = []
  for ch in found:
    obj = objectives(problem, ch)
    if any(np.array_equal(ch, other) for other, _ in results):
      continue
    results.append((ch, obj))
  dominated = lambda a, b: all(b[n] <= a[n] + 1e-12 for n in a) and any(
      b[n] < a[n] - 1e-12 for n in a)
  return [(ch, obj) for ch, obj in results
          if not any(dominated(obj, other) for _, other in results)]


def shapes_only(influences: Sequence[Influence]) -> tuple[int, int]:
  return tuple(influences[0].distance.shape[:2])


def floor_rules(rules: np.ndarray, min_head_density: float, sink: int,
                lengths: Sequence[int], min_window: int = 1) -> np.ndarray:
  """The rules [R, 2] keeping >= min_head_density of the KV cache at every length.

  The ``min_head_density`` variant's filter (0 keeps every rule, as the paper). Raises
  ValueError naming --min_head_density when no rule is left.
  """
  if min_head_density <= 0:
    return rules
  keep = np.all([rule_densities(rules, sink, n, min_window) >= min_head_density - 1e-9
                 for n in lengths], axis=0)
  if not keep.any():
    raise ValueError(f"min_head_density={min_head_density}: no candidate rule keeps that "
                     f"fraction at every length {sorted(lengths)}; lower --min_head_density")
  return rules[keep]


def search(influences: Sequence[Influence], *, budget: float | Mapping[int, float],
           extend_length: int, num_heads: int, max_rules_per_layer: int = 2,
           alpha_interval: int | None = None, num_betas: int = 9, lower_ratio: float = 0.0,
           num_intervals: int = 4, min_window: int = 1, full_heads: np.ndarray | None = None,
           min_head_density: float = 0.0, time_limit: float = 60.0) -> list[plan_lib.Plan]:
  """Pareto-optimal plans for the profiled lengths (objectives) and the extension.

  Args:
    influences: one Influence per profiled length (same model, block size and sink).
    budget: KV-cache density bound, one float for every length or {length: bound}.
    extend_length: a longer length where only the budget is enforced.
    num_heads: the model's query heads (recorded in the plan).
    full_heads: optional bool [L, K]: heads held at full span (the rule alpha=0, beta=1;
      ``moa.retrieval``), the others searched under what remains of the budget.
    min_head_density: a variant (0: off, as the paper): only rules keeping at least this
      KV fraction (sink + window) at every profiled length and the extension are
      candidates, so every head keeps at least min_head_density x N tokens there.
  """
  if not influences:
    raise ValueError("no profiles to search: run `launch/moa.py profile` first")
  sinks = {inf.sink for inf in influences}
  shapes = {inf.distance.shape[:2] for inf in influences}
  if len(sinks) != 1 or len(shapes) != 1:
    raise ValueError(f"profiles disagree on sink {sorted(sinks)} or [layers, kv heads] "
                     f"{sorted(shapes)}: profile every length with the same model and sink")
  sink = sinks.pop()
  lengths = sorted(inf.length for inf in influences)
  if len(set(lengths)) != len(lengths):
    raise ValueError(f"two profiles of the same length in {lengths}")
  if extend_length < lengths[-1]:
    raise ValueError(f"extend_length={extend_length} must be >= the longest profiled length "
                     f"{lengths[-1]}")
  budgets = {n: float(budget[n] if isinstance(budget, Mapping) else budget)
             for n in lengths + [extend_length]}
  rules = candidate_rules(lengths[0], lengths[-1], extend_length, alpha_interval=alpha_interval,
                          num_betas=num_betas)
  rules = floor_rules(rules, min_head_density, sink, list(budgets), min_window)
  fixed = None
  if full_heads is not None and np.any(full_heads):
    full_heads = np.asarray(full_heads, bool)
    if full_heads.shape != shapes_only(influences):
      raise ValueError(f"full_heads has shape {full_heads.shape}; the profiles have [layers, "
                       f"kv heads] = {shapes_only(influences)}")
    full = np.flatnonzero((rules[:, 0] == 0) & (rules[:, 1] == 1))
    if not len(full):
      rules = np.concatenate([rules, [[0.0, 1.0]]])
      full = [len(rules) - 1]
    fixed = np.where(full_heads, int(full[0]), -1)
  costs = {}
  for inf in influences:
    cost = rule_costs(inf, rules, min_window)
    total = inf.distance.sum()
    costs[inf.length] = cost / total if total > 0 else cost
  densities = {n: rule_densities(rules, sink, n, min_window) for n in budgets}
  problem = Problem(costs, densities, budgets, max_rules_per_layer, lower_ratio, fixed)
  check_feasible(problem, rules)
  plans = []
  for i, (choice, obj) in enumerate(pareto_sweep(problem, num_intervals, time_limit)):
    chosen = rules[choice]
    plans.append(plan_lib.Plan(
        alpha=chosen[..., 0], beta=chosen[..., 1], sink=np.full(choice.shape, sink),
        num_heads=num_heads, max_length=extend_length, min_window=min_window,
        meta={"plan_id": i, "objectives": {str(n): v for n, v in obj.items()},
              "densities": {str(n): float(densities[n][choice].mean()) for n in budgets},
              "budgets": {str(n): b for n, b in budgets.items()},
              "profiled_lengths": lengths, "max_rules_per_layer": max_rules_per_layer,
              "full_heads": int(0 if fixed is None else (fixed >= 0).sum()),
              "min_head_density": float(min_head_density)}))
  return plans

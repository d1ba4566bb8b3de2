"""Rule search: every constraint holds, and the MILP finds the exhaustive optimum."""

import itertools

import numpy as np
import pytest

from sparsity_jax.moa import plan as plan_lib
from sparsity_jax.moa import search
from sparsity_jax.moa.profile import Influence


def random_influence(rng, length, layers=3, kv=2, sink=4, block=16):
  # Influence decaying with distance, with head-specific long-range bumps.
  d = np.arange(length)
  dist = rng.random((layers, kv, 1)) * np.exp(-d / rng.uniform(2, length, (layers, kv, 1)))
  dist += 0.05 * rng.random((layers, kv, length))
  nq = length // block
  return Influence(length, block, sink, rng.random((layers, kv, nq, nq)), dist, 1)


@pytest.mark.parametrize("budget,max_rules", [(0.5, 2), (0.25, 1)])
def test_plans_respect_every_constraint(budget, max_rules):
  rng = np.random.default_rng(np.random.randint(1 << 30))
  profiles = [random_influence(rng, n) for n in (64, 128, 256)]
  plans = search.search(profiles, budget=budget, extend_length=512, num_heads=4,
                        max_rules_per_layer=max_rules, num_intervals=2)
  assert plans
  grid = {tuple(r) for r in search.candidate_rules(64, 256, 512)}
  objs = []
  for plan in plans:
    assert plan.alpha.shape == (3, 2) and (plan.sink == 4).all() and plan.max_length == 512
    for n in (64, 128, 256, 512):
      assert plan.density(n) <= budget + 1e-9, (n, plan.density(n))
    for layer in range(3):
      assert len(plan.rules(layer)) <= max_rules
      assert all((a, b) in grid for a, b, _ in plan.rules(layer))
    objs.append([plan.meta["objectives"][str(n)] for n in (64, 128, 256)])
  for i, a in enumerate(objs):  # Pareto: no plan dominates another.
    for j, b in enumerate(objs):
      assert i == j or not (np.all(np.array(b) <= a) and np.any(np.array(b) < a))


def test_milp_matches_exhaustive_enumeration():
  rng = np.random.default_rng(np.random.randint(1 << 30))
  nl, nk, nr = 2, 2, 4
  cost = rng.random((nl, nk, nr))
  dens = {64: rng.uniform(0.1, 1.0, nr), 128: rng.uniform(0.1, 1.0, nr)}
  budgets = {64: 0.55, 128: 0.6}
  for max_rules in (1, 2, 4):
    problem = search.Problem({64: cost}, dens, budgets, max_rules)
    best = None
    for assign in itertools.product(range(nr), repeat=nl * nk):
      ch = np.array(assign).reshape(nl, nk)
      if any(len(set(ch[l])) > max_rules for l in range(nl)):
        continue
      if any(d[ch].mean() > budgets[n] + 1e-12 for n, d in dens.items()):
        continue
      value = search.objectives(problem, ch)[64]
      best = value if best is None else min(best, value)
    choice = search.solve(problem, 64)
    if best is None:
      assert choice is None
    else:
      assert search.objectives(problem, choice)[64] == pytest.approx(best, abs=1e-9)


def test_rule_costs_are_token_exact():
  rng = np.random.default_rng(0)
  inf = random_influence(rng, 64)
  rules = np.array([[0.0, 0.25], [10.0, 0.0], [-8.0, 1.0]])
  cost = search.rule_costs(inf, rules)
  for r, (a, b) in enumerate(rules):
    w = plan_lib.rule_window(a, b, 64)
    np.testing.assert_allclose(cost[..., r], inf.distance[..., w:].sum(-1))


def test_search_bad_input():
  rng = np.random.default_rng(1)
  profiles = [random_influence(rng, n) for n in (64, 128)]
  with pytest.raises(ValueError, match="infeasible at length"):
    search.search(profiles, budget=0.01, extend_length=256, num_heads=4)
  with pytest.raises(ValueError, match="no profiles"):
    search.search([], budget=0.5, extend_length=256, num_heads=4)
  with pytest.raises(ValueError, match="disagree on sink"):
    search.search([profiles[0], random_influence(rng, 128, sink=8)], budget=0.5,
                  extend_length=256, num_heads=4)
  with pytest.raises(ValueError, match="extend_length=64"):
    search.search(profiles, budget=0.5, extend_length=64, num_heads=4)


def test_full_heads_keep_full_span_and_the_rest_shares_the_budget():
  """Heads held at full span (retrieval heads) take the rule alpha=0, beta=1 in every
  Pareto plan; the budget still holds; the free heads are the MILP optimum given them."""
  rng = np.random.default_rng(np.random.randint(1 << 30))
  profiles = [random_influence(rng, n) for n in (64, 128)]
  full = np.zeros((3, 2), bool)
  full[rng.integers(3), rng.integers(2)] = True
  plans = search.search(profiles, budget=0.5, extend_length=256, num_heads=4,
                        max_rules_per_layer=2, num_intervals=1, full_heads=full)
  free = search.search(profiles, budget=0.5, extend_length=256, num_heads=4,
                       max_rules_per_layer=2, num_intervals=1)
  for plan in plans:
    assert (plan.alpha[full] == 0).all() and (plan.beta[full] == 1).all()
    assert plan.meta["full_heads"] == 1
    for n in (64, 128, 256):
      assert plan.density(n) <= 0.5 + 1e-9
      assert (plan.capacities(n)[full] == n).all()
  # Holding a head can only cost influence: every held plan is dominated-or-equal.
  best_free = min(p.meta["objectives"]["64"] for p in free)
  assert min(p.meta["objectives"]["64"] for p in plans) >= best_free - 1e-9
  with pytest.raises(ValueError, match="heads at full span need a mean density"):
    search.search(profiles, budget=0.3, extend_length=256, num_heads=4,
                  full_heads=np.ones((3, 2), bool) & (np.arange(2) == 0))
  with pytest.raises(ValueError, match="full_heads has shape"):
    search.search(profiles, budget=0.5, extend_length=256, num_heads=4,
                  full_heads=np.ones((2, 2), bool))


def test_min_head_density_floors_every_head():
  """--min_head_density: every head of every plan keeps at least the floor at every length
  (profiled and extension), the budget holds, and a floor no rule meets is refused."""
  rng = np.random.default_rng(np.random.randint(1 << 30))
  profiles = [random_influence(rng, n) for n in (64, 128)]
  plans = search.search(profiles, budget=0.5, extend_length=256, num_heads=4,
                        num_intervals=1, min_head_density=0.3)
  assert plans
  for plan in plans:
    assert plan.meta["min_head_density"] == 0.3
    for n in (64, 128, 256):
      assert (plan.capacities(n) / n >= 0.3 - 1e-9).all(), n
      assert plan.density(n) <= 0.5 + 1e-9
  with pytest.raises(ValueError, match="no candidate rule keeps"):
    search.search(profiles, budget=0.5, extend_length=256, num_heads=4, min_head_density=1.5)


def test_retrieval_head_selection():
  from sparsity_jax.moa import retrieval
  scores = np.array([[0.1, 0.5], [0.5, 0.05], [0.3, 0.2]])
  np.testing.assert_array_equal(retrieval.select(scores, 2),
                                [[False, True], [True, False], [False, False]])
  assert not retrieval.select(scores, 0).any() and retrieval.select(scores, 6).all()
  with pytest.raises(ValueError, match="retrieval_heads=7 must be in"):
    retrieval.select(scores, 7)
  with pytest.raises(ValueError, match="NaN or inf"):
    retrieval.select(np.where(scores > 0.4, np.nan, scores), 2)


def test_streaming_plan_keeps_full_heads_and_the_budget():
  """DuoAttention layout: held heads see every token at every length, the rest one
  sink + window rule, and the KV density is the budget (within one token per head)."""
  rng = np.random.default_rng(np.random.randint(1 << 30))
  full = rng.random((4, 3)) < 0.3
  budget = float(rng.uniform(full.mean() + 0.05, 1.0))
  plan = plan_lib.streaming_plan(full, 6, budget=budget, sink=16, max_length=4096,
                                 min_window=8, budgets={"4096": budget})
  assert plan.meta["full_heads"] == full.sum() and plan.meta["budgets"] == {"4096": budget}
  for n in (1000, 4096):  # Lengths where the window (>= 0.05 n - 16) is over min_window.
    caps = plan.capacities(n)
    assert (caps[full] == n).all()
    assert len(set(caps[~full].tolist())) <= 1  # One streaming rule.
    assert budget - full.size / n <= plan.density(n) <= budget + 1e-9, n
  for full, budget, message in [
      (np.ones((2, 2), bool), 0.1, "not below the budget 0.1: keep fewer heads"),
      (np.eye(2, dtype=bool), 0.5, "not below the budget 0.5"),  # Nothing left to stream.
      (np.zeros((2, 2), bool), 1.5, "budget=1.5 must be in \\(0, 1\\]"),
      (np.zeros((2, 2), bool), float("nan"), "budget=nan must be in"),
      (np.full((2, 2), 0.3), 0.5, "must be a bool mask"),
      (np.zeros((0, 2), bool), 0.5, "non-empty bool"),
      (np.zeros(4, bool), 0.5, "non-empty bool \\[layers, kv_heads\\]")]:
    with pytest.raises(ValueError, match=message):
      plan_lib.streaming_plan(full, 4, budget=budget, max_length=512)
  every = plan_lib.streaming_plan(np.ones((2, 2), bool), 4, budget=1.0, max_length=512)
  assert every.density(512) == 1.0

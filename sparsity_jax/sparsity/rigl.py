"""RigL mask updates (Evci et al. 2020), as Sparse-IFT's dynamic sparse training runs them
(CerebrasResearch/Sparse-IFT ``cbsparse/sparse/optimizers/{rigl,dynamic}.py``).

Every ``every`` optimizer steps n with 0 < n < end (end = int(end_fraction * total steps)),
per weight tensor (per layer of a scanned stack):

  drop   the int(f(n) * active) active weights of smallest |w| (f(n) = f0 * (1 + cos(pi n /
         end)) / 2, f0 = 0.3: the cosine-annealed drop fraction);
  grow   int(density * size) - kept inactive weights (the just-dropped included) of largest
         dense-gradient magnitude |dL/dw|, which start from zero with zeroed optimizer
         moments.

Between updates the mask is fixed and pruned weights get no gradient (the optimizer sees
``g * m``); the dense gradient reaches the update through the straight-through weight flow.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def update_due(steps_done: jax.Array, every: int, end: int) -> jax.Array:
  """cbsparse ``is_update_step``: 0 < n < end and n % every == 0 (n: steps done)."""
  return (steps_done > 0) & (steps_done < end) & (steps_done % every == 0)


def drop_fraction(steps_done: jax.Array, initial: float, end: int) -> jax.Array:
  """cbsparse ``update_group_drop_fraction`` with the cosine anneal (begin 0)."""
  m = jnp.cos(math.pi * steps_done.astype(jnp.float32) / end) * 0.5 + 0.5
  return initial * m


def _rank_desc(score: jax.Array) -> jax.Array:
  """Rank of each entry in a descending stable sort of the flat score (0 = largest)."""
  order = jnp.argsort(-score, stable=True)
  return jnp.zeros(score.shape, jnp.int32).at[order].set(jnp.arange(score.size, dtype=jnp.int32))


def drop_grow(w: jax.Array, keep: jax.Array, grad: jax.Array, fraction: jax.Array,
              density: float) -> tuple[jax.Array, jax.Array]:
  """One tensor's RigL update: (new keep mask, grown mask). Flat semantics as cbsparse
  ``drop_minimum`` / ``grow_maximum`` on a tensor whose pruned weights are zero."""
  shape = w.shape
  score = jnp.abs(jnp.where(keep, w, 0).astype(jnp.float32)).ravel()
  ones = jnp.sum(keep)
  n_keep = ones - jnp.floor(fraction * ones).astype(ones.dtype)
  dropped_keep = _rank_desc(score) < n_keep
  n_grow = jnp.maximum(int(density * w.size) - jnp.sum(dropped_keep), 0)
  grow_score = jnp.abs(grad.astype(jnp.float32)).ravel() * ~dropped_keep
  grown = (_rank_desc(grow_score) < n_grow) & ~dropped_keep
  return (dropped_keep | grown).reshape(shape), grown.reshape(shape)


def drop_grow_stacked(w, keep, grad, fraction, density: float, lead: int):
  """drop_grow per tensor of a stack with ``lead`` leading (layer) axes."""
  fn = lambda a, b, c: drop_grow(a, b, c, fraction, density)
  for _ in range(lead):
    fn = jax.vmap(fn)
  return fn(w, keep, grad)


def zero_matching(tree, like_treedef, zeros) -> object:
  """``tree`` (e.g. an optax state) with every subtree shaped like the parameters
  (``like_treedef``: Adam's mu and nu) set to 0 where ``zeros`` (a tree of that structure,
  boolean) is True."""
  if jax.tree.structure(tree) == like_treedef:
    return jax.tree.map(lambda x, z: jnp.where(z, jnp.zeros((), x.dtype), x), tree, zeros)
  if isinstance(tree, tuple) and hasattr(tree, "_fields"):
    return type(tree)(*(zero_matching(c, like_treedef, zeros) for c in tree))
  if isinstance(tree, (tuple, list)):
    return type(tree)(zero_matching(c, like_treedef, zeros) for c in tree)
  return tree

"""Element rules: the per-(query, key) predicate applied inside partial blocks.

A BlockMask says which (query block, key block) tiles are computed. Inside a
*partial* tile every (query, key) pair is additionally tested by the mask's
element rule; inside a *full* tile the rule is skipped (all pairs allowed).
Rules are small pytrees of arrays (their leaves) with static structure, so a
kernel can rebuild a rule from its input refs and evaluate it on any tile.

Every leaf has a *kind* that fixes its shape and how a kernel reads it
(Bm, Hm are the mask's batch and head sizes; each leaf may use 1 instead):

  kind    shape                dtype   read per tile as
  'q'     [Bm|1, Hm|1, Lq]     int32   one value per query row     -> [..., bq, 1]
  'kv'    [Bm|1, Hm|1, Lk]     int32   one value per key column    -> [..., 1, bk]
  'head'  [Hm|1]               int32   one scalar per head         -> [..., 1, 1]
  'dense' [Bm|1, Hm|1, Lq, Lk] bool    the tile itself             -> [..., bq, bk]
  'block' [Bm|1, Hm|1, nq, nk] bool    one bit per tile            -> [..., 1, 1]

A backend evaluates a rule by calling ``rule.evaluate(ctx)`` with a context
object implementing `RuleContext` (below); it returns a bool array that
broadcasts to the tile's score shape [..., bq, bk]. Inside a kernel the
leaves may be refs instead of arrays: ``jax.tree.unflatten(treedef, refs)``
gives a rule whose ``evaluate`` passes the refs to the context's readers.

Rules:
  * AllowAll: every pair allowed (block-level sparsity only).
  * PositionRule: banded / causal / sink / segment rule on token positions.
  * DenseRule: explicit bits (from_dense only: O(Lq*Lk) memory).
  * BlockRule: the tile's bit in a [nq, nk] table: "this tile is allowed
    whole". Used to keep unions and intersections exact.
  * KvLengthRule: key index < kv_len (added by the API when Lk is padded).
  * AndRule / OrRule: composition.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

# Offsets of this size mean "unbounded" in PositionRule; positions must stay
# below it so that q_pos +- offset does not overflow int32.
UNBOUNDED = 1 << 30

Array = Any


class RuleContext(Protocol):
  """How a backend exposes one tile (or a batch of tiles) to a rule.

  Readers return arrays that broadcast against the tile's scores [..., bq, bk].
  """

  def q(self, x: Array) -> Array:
    """'q' leaf values of the tile's query rows, shaped [..., bq, 1]."""

  def kv(self, x: Array) -> Array:
    """'kv' leaf values of the tile's key columns, shaped [..., 1, bk]."""

  def head(self, x: Array) -> Array:
    """'head' leaf value of the tile's query head, shaped [..., 1, 1]."""

  def dense(self, x: Array) -> Array:
    """'dense' leaf restricted to the tile, shaped [..., bq, bk]."""

  def block(self, x: Array) -> Array:
    """'block' leaf value at (query block, key block), shaped [..., 1, 1]."""

  def kv_index(self) -> Array:
    """Absolute key indices of the tile's columns, shaped [..., 1, bk]."""


def _register(cls, data_fields, meta_fields=()):
  cls = dataclasses.dataclass(frozen=True)(cls)
  return jax.tree_util.register_dataclass(
      cls, data_fields=list(data_fields), meta_fields=list(meta_fields))


class ElementRule:
  """Base class. Subclasses define `KINDS` (field -> leaf kind)."""

  KINDS: dict[str, str] = {}

  def evaluate(self, ctx: RuleContext) -> Array:
    raise NotImplementedError

  def leaf_kinds(self) -> list[str]:
    """Kinds of `jax.tree.leaves(self)`, in the same order."""
    kinds = _kinds_tree(self)
    return jax.tree.leaves(kinds)

  def pad(self, q_pad: int, kv_pad: int, nq: int, nk: int) -> "ElementRule":
    """Pads 'q', 'kv', 'dense' leaves by q_pad / kv_pad; 'block' leaves to nq x nk."""
    def pad_leaf(kind, x):
      if kind == 'q' and q_pad:
        return jnp.pad(x, ((0, 0), (0, 0), (0, q_pad)), mode='edge')
      if kind == 'kv' and kv_pad:
        return jnp.pad(x, ((0, 0), (0, 0), (0, kv_pad)), mode='edge')
      if kind == 'dense' and (q_pad or kv_pad):
        return jnp.pad(x, ((0, 0), (0, 0), (0, q_pad), (0, kv_pad)))
      if kind == 'block':
        assert x.shape[-2:] == (nq, nk), (x.shape, nq, nk)
      return x
    return jax.tree.map(pad_leaf, _kinds_tree(self), self)

  def simplify(self) -> "ElementRule":
    return self


def _kinds_tree(rule):
  """The rule with every array leaf replaced by its kind string."""
  if isinstance(rule, (AndRule, OrRule)):
    return type(rule)(tuple(_kinds_tree(r) for r in rule.rules))
  values = {}
  for f in dataclasses.fields(rule):
    v = getattr(rule, f.name)
    if f.name in rule.KINDS:
      values[f.name] = None if v is None else rule.KINDS[f.name]
    else:
      values[f.name] = v
  return type(rule)(**values)


class AllowAll(ElementRule):
  """Every (query, key) pair of a listed tile is allowed."""

  def evaluate(self, ctx):
    del ctx
    return jnp.bool_(True)


AllowAll = _register(AllowAll, ())


class PositionRule(ElementRule):
  """Band rule on token positions (causal, sliding window, sinks, segments).

  With q = q_pos[b, h, i], k = kv_pos[b, h, j], a pair is allowed iff

      k <= q + right                          (right = 0: causal)
      and (k >= q - left or k < sink)         (left = w - 1: window of w keys)
      and q_segment_ids[i] == kv_segment_ids[j]   (when given)

  `left`, `right`, `sink` are per-head int32 [Hm|1]; UNBOUNDED disables a side.
  Positions are the tokens' ORIGINAL positions, so a permuted or clustered
  sequence keeps causality by original order.

  Attributes:
    q_pos: 'q' int32 [Bm|1, Hm|1, Lq].
    kv_pos: 'kv' int32 [Bm|1, Hm|1, Lk].
    left: 'head' int32 [Hm|1], keys at most `left` positions back are allowed.
    right: 'head' int32 [Hm|1], keys at most `right` positions ahead.
    sink: 'head' int32 [Hm|1], keys with position < sink are allowed
      regardless of `left` (still subject to `right`).
    q_segment_ids: optional 'q' int32 [Bm|1, Hm|1, Lq].
    kv_segment_ids: optional 'kv' int32 [Bm|1, Hm|1, Lk].
  """

  KINDS = {'q_pos': 'q', 'kv_pos': 'kv', 'left': 'head', 'right': 'head',
           'sink': 'head', 'q_segment_ids': 'q', 'kv_segment_ids': 'kv'}

  q_pos: Array
  kv_pos: Array
  left: Array
  right: Array
  sink: Array
  q_segment_ids: Array | None = None
  kv_segment_ids: Array | None = None

  def evaluate(self, ctx):
    q, k = ctx.q(self.q_pos), ctx.kv(self.kv_pos)
    allowed = k <= q + ctx.head(self.right)
    allowed &= (k >= q - ctx.head(self.left)) | (k < ctx.head(self.sink))
    if self.q_segment_ids is not None:
      allowed &= ctx.q(self.q_segment_ids) == ctx.kv(self.kv_segment_ids)
    return allowed


PositionRule = _register(PositionRule, list(PositionRule.KINDS))


class DenseRule(ElementRule):
  """Explicit element bits, 'dense' bool [Bm|1, Hm|1, Lq, Lk] (from_dense)."""

  KINDS = {'bits': 'dense'}
  bits: Array

  def evaluate(self, ctx):
    return ctx.dense(self.bits)


DenseRule = _register(DenseRule, ['bits'])


class BlockRule(ElementRule):
  """Tile-level bits, 'block' bool [Bm|1, Hm|1, nq, nk]: True allows the whole tile."""

  KINDS = {'bits': 'block'}
  bits: Array

  def evaluate(self, ctx):
    return ctx.block(self.bits)


BlockRule = _register(BlockRule, ['bits'])


class KvLengthRule(ElementRule):
  """Key index < kv_len: masks the keys added by padding Lk to a block multiple."""

  kv_len: int

  def evaluate(self, ctx):
    return ctx.kv_index() < self.kv_len


KvLengthRule = _register(KvLengthRule, (), ('kv_len',))


class AndRule(ElementRule):
  rules: tuple

  def evaluate(self, ctx):
    out = self.rules[0].evaluate(ctx)
    for r in self.rules[1:]:
      out = out & r.evaluate(ctx)
    return out

  def simplify(self):
    rules = [r.simplify() for r in self.rules]
    rules = [r for r in rules if not isinstance(r, AllowAll)]
    if not rules:
      return AllowAll()
    return rules[0] if len(rules) == 1 else AndRule(tuple(rules))


AndRule = _register(AndRule, ['rules'])


class OrRule(ElementRule):
  rules: tuple

  def evaluate(self, ctx):
    out = self.rules[0].evaluate(ctx)
    for r in self.rules[1:]:
      out = out | r.evaluate(ctx)
    return out

  def simplify(self):
    rules = [r.simplify() for r in self.rules]
    if any(isinstance(r, AllowAll) for r in rules):
      return AllowAll()
    return rules[0] if len(rules) == 1 else OrRule(tuple(rules))


OrRule = _register(OrRule, ['rules'])


def leaf_batch_heads(rule: ElementRule) -> list[tuple[int, int]]:
  """(batch, heads) sizes of each leaf (1 where broadcast)."""
  out = []
  for kind, x in zip(rule.leaf_kinds(), jax.tree.leaves(rule)):
    out.append((1, x.shape[0]) if kind == 'head' else (x.shape[0], x.shape[1]))
  return out


class DenseContext:
  """RuleContext over the whole [Bm, Hm, Lq, Lk] grid (reference, to_dense)."""

  def __init__(self, q_len: int, kv_len: int, block_q: int, block_k: int):
    self.q_len, self.kv_len = q_len, kv_len
    self.block_q, self.block_k = block_q, block_k

  def q(self, x):
    return x[..., :, None]

  def kv(self, x):
    return x[..., None, :]

  def head(self, x):
    return x[None, :, None, None]

  def dense(self, x):
    return x

  def block(self, x):
    x = jnp.repeat(jnp.repeat(x, self.block_q, axis=-2), self.block_k, axis=-1)
    return x[..., :self.q_len, :self.kv_len]

  def kv_index(self):
    return jnp.arange(self.kv_len, dtype=jnp.int32)[None, None, None, :]


def is_host(*xs) -> bool:
  """True when every argument is a Python scalar / NumPy value (not a jax array)."""
  return all(x is None or isinstance(x, (int, float, bool, np.ndarray, np.generic,
                                          list, tuple)) for x in xs)

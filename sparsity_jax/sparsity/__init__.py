"""Weight sparsity: specs, masks as model state, reports; one-shot pruning in
``sparsity_jax.sparsity.prune`` (magnitude, Wanda, DSnoT) and ``.pipeline`` (launch/prune.py)."""

from sparsity_jax.sparsity.masks import (WeightMask, attach, bake, maskable, masked, report,
                                         report_markdown, weight)
from sparsity_jax.sparsity.spec import (DEFAULT_TARGETS, SparsitySpec, SparsitySpecError,
                                        parse_nm)

__all__ = ["DEFAULT_TARGETS", "SparsitySpec", "SparsitySpecError", "WeightMask", "attach", "bake",
           "maskable", "masked", "parse_nm", "report", "report_markdown", "weight"]

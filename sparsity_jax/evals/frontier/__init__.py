"""The task suite of "The Sparse Frontier" (Nawrot et al. 2025, arXiv 2504.17768).

Six synthetic long-context tasks, generated locally at a chosen token length, with the
official prompts and metrics of github.com/PiotrNawrot/sparse-frontier
(``sparse_frontier/tasks/``; our own code):

  task             options (official defaults)                      metric per sample
  story_retrieval  num_queries=16, protagonist_name='Arion'          fraction of queries right
  story_multihop   protagonist_name='Arion'                          exact match
  story_filtering  chapters_in_question=3, protagonist_name='Arion'   IoU of chapter sets
  ruler_niah       num_queries=4                                     fraction of keys right
  ruler_vt         num_chains=8, num_hops=4                          IoU of variable sets
  ruler_cwe        num_common_words=10, common_word_frequency=30,    IoU of word sets
                   rare_word_frequency=3

Every task also takes ``explain`` (ours, default False; the official prompt is
explain=True): see :mod:`.base`. The official task score is the mean of the per-sample
scores (``evaluate`` in each task file); multi-query tasks give partial credit per query,
never all-or-nothing.

  from sparsity_jax.evals import frontier
  samples = frontier.make_samples("ruler_niah", tokenizer, 4096, num_samples=10,
                                  num_queries=2)
  s = samples[0]  # s.tokens int32 [t], 0.9 * 4096 <= t <= 4096; s.gold; s.max_new_tokens
  frontier.score(s, output_text)            # float in [0, 1]
  frontier.score(s, frontier.reference_output(s)) == 1.0

Details, deviations and the official sources: docs/frontier.md, docs/fidelity.md.
"""

from sparsity_jax.evals.frontier import needles, ruler, story  # Importing registers the tasks.
from sparsity_jax.evals.frontier.base import (REGISTRY, Sample, answer_section, defaults,
                                              make_samples, reference_output, score)

TASKS = ("story_retrieval", "story_multihop", "story_filtering", "ruler_niah", "ruler_vt",
         "ruler_cwe")
# Not in the paper: retrieval tasks a 135M model answers (needles.py).
EXTRA_TASKS = ("passkey", "kv_retrieval")
assert set(TASKS + EXTRA_TASKS) == set(REGISTRY), (TASKS, tuple(REGISTRY))

__all__ = ["EXTRA_TASKS", "TASKS", "Sample", "answer_section", "defaults", "make_samples",
           "needles",
           "reference_output", "ruler", "score", "story"]

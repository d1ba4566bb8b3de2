r"""Tiny causal LM on the embedded corpus mixed with retrieval documents: MoA's test bed.

Three quarters of the 512-token training windows are LongEval-style key-value retrieval
documents (``data.retrieval_fraction``; see sparsity_jax/data/retrieval.py), so the dense
model can learn retrieval at the lengths MoA profiles; the rest is the Python stdlib.

  python launch/train.py --config=configs/moa_lm_tiny.py --workdir=runs/moa_lm_tiny
  python launch/moa.py all --workdir=runs/moa_lm_tiny --out=runs/moa_50 --budget=0.5 ...
  python benchmarks/moa_experiment.py --workdir=runs/moa_lm_tiny --moa_dirs=runs/moa_50,...

Arguments: ``steps=N``, ``runlocal`` (seconds-long smoke run).
Expected: docs/results/moa.md.
"""

from sparsity_jax import config_lib as common


def get_config(arg: str | None = None):
  args = common.parse_arg(arg, runlocal=False, steps=1500)
  c = common.base_config()
  # 4 KV heads (no GQA): 16 (layer, KV head) spans for MoA's search to allocate.
  c.model.num_kv_heads = 4
  c.model.max_len = 2048  # Room for MoA's extension lengths beyond the 512 trained.
  c.data.seq_len = 512
  c.data.batch_size = 16
  c.data.retrieval_fraction = 0.75
  c.eval.batch_size = 8
  c.eval.num_batches = 8
  c.eval.every = 500
  c.train.steps = args.steps
  c.train.lr = 3e-3
  c.train.warmup_steps = 100
  c.train.checkpoint_every = 250
  if args.runlocal:
    common.shrink_for_runlocal(c)
    c.model.num_kv_heads = 4
    c.model.max_len = 256
    c.data.seq_len = 128  # The shortest block that holds a retrieval document.
  return c

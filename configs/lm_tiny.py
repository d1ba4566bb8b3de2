r"""Tiny byte-level causal LM on the embedded corpus (Python stdlib sources).

Command (CPU, 2 cores, a few minutes):
  python launch/train.py --config=configs/lm_tiny.py --workdir=runs/lm_tiny

Expected: see README "Results" (validation bits/byte and wall time on a 2-core CPU).
Arguments (``--config=configs/lm_tiny.py:runlocal``): ``runlocal`` shrinks everything to a
seconds-long smoke run.
"""

from sparsity_jax import config_lib as common


def get_config(arg: str | None = None):
  args = common.parse_arg(arg, runlocal=False)
  c = common.base_config()
  c.train.steps = 600
  c.train.lr = 3e-3
  c.train.warmup_steps = 50
  c.train.checkpoint_every = 200
  c.eval.every = 200
  if args.runlocal:
    common.shrink_for_runlocal(c)
  return c

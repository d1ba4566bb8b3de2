r"""~100M-parameter byte-level causal LM: a realistic accelerator config.

Command (one TPU v5e-8 / v4-8 host, or 8 GPUs; roughly a few hours for 20k steps):
  python launch/train.py --config=configs/lm_base.py --workdir=gs://BUCKET/runs/lm_base
On a pod, run the same command on every host (launch/tpu_pod.sh).
Expected: validation bits/byte well below the tiny model's (not yet measured here).
``runlocal`` keeps the shape family but shrinks it for a CPU smoke run.
"""

from sparsity_jax import config_lib as common


def get_config(arg: str | None = None):
  args = common.parse_arg(arg, runlocal=False)
  c = common.base_config()
  c.model.num_layers = 12
  c.model.d_model = 768
  c.model.num_heads = 12
  c.model.num_kv_heads = 4
  c.model.head_dim = 64
  c.model.mlp_dim = 2048
  c.model.max_len = 4096
  c.model.scan_layers = True
  c.model.remat = True
  c.model.dtype = "bfloat16"
  c.data.seq_len = 2048
  c.data.batch_size = 256
  c.eval.batch_size = 64
  c.eval.num_batches = 32
  c.train.steps = 20_000
  c.train.lr = 1e-3
  c.train.warmup_steps = 1000
  c.train.checkpoint_every = 1000
  c.eval.every = 1000
  c.mesh.data = -1
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  if args.runlocal:
    c.model.num_layers = 2
    c.model.d_model = 64
    c.model.num_heads = 4
    c.model.num_kv_heads = 2
    c.model.head_dim = 16
    c.model.mlp_dim = 128
    c.model.dtype = "float32"
    c.data.seq_len = 64
    c.data.batch_size = 8
    c.eval.batch_size = 8
    c.eval.num_batches = 2
    c.train.steps = 10
    c.train.warmup_steps = 2
    c.train.checkpoint_every = 5
    c.eval.every = 0
  return c

r"""Training throughput (tokens/s) of a config, on one device and on an 8-device fake mesh.

  python benchmarks/train_throughput.py [--config=configs/lm_tiny.py] [--steps=20]

Each setting runs in its own process (the fake device count is fixed at start-up) and
times ``--steps`` train steps after 3 warm-up steps. On one CPU the 8 fake devices share
the same cores, so the 8-device row measures sharding overhead, not a speed-up.
"""

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTINGS = (("1 device", 1, dict(data=1, fsdp=1, tensor=1)),
            ("8 fake devices, mesh 2x2x2", 8, dict(data=2, fsdp=2, tensor=2)),
            ("8 fake devices, mesh 8x1x1", 8, dict(data=8, fsdp=1, tensor=1)))


def load_config(path_arg: str):
  path, _, arg = path_arg.partition(":")
  spec = importlib.util.spec_from_file_location("bench_config", os.path.join(ROOT, path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg or None)


def measure(config_path: str, mesh: dict, steps: int) -> dict:
  import jax
  from sparsity_jax import parallel
  from sparsity_jax.data import pipeline
  from sparsity_jax.train import loop, optimizer, state as state_lib, step as step_lib

  config = load_config(config_path)
  config.mesh.update(mesh)
  exp = loop.Experiment(config)
  with parallel.use_mesh(exp.mesh, exp.rules):
    tx = optimizer.make_optimizer(config.train)
    graphdef, state, shardings = state_lib.create_train_state(exp.make_model, tx, exp.mesh,
                                                              exp.rules)
    schedule = optimizer.learning_rate_schedule(config.train)
    train_step = jax.jit(step_lib.make_train_step(graphdef, tx, schedule,
                                                  objective=config.objective),
                         in_shardings=(shardings, exp.batch_sharding),
                         out_shardings=(shardings, None), donate_argnums=(0,))
    it = pipeline.TrainIterator(pipeline.PackedSequences(exp.splits["train"], config.data.seq_len),
                                config.data.batch_size, 0)
    batches = [exp.put_batch(next(it), config.data.batch_size) for _ in range(steps + 3)]
    for b in batches[:3]:
      state, metrics = train_step(state, b)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for b in batches[3:]:
      state, metrics = train_step(state, b)
    jax.block_until_ready(metrics)
    elapsed = time.perf_counter() - start
  tokens = steps * config.data.batch_size * config.data.seq_len
  return {"tokens_per_s": tokens / elapsed, "step_ms": 1e3 * elapsed / steps,
          "params_m": config_params(exp)}


def config_params(exp) -> float:
  return exp.model_config.num_params() / 1e6


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="configs/lm_tiny.py")
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args._worker:
    print(json.dumps(measure(args.config, json.loads(args._worker), args.steps)))
    return
  rows = []
  for name, devices, mesh in SETTINGS:
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, __file__, "--config", args.config, "--steps",
                          str(args.steps), "--_worker", json.dumps(mesh)],
                         env=env, capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    rows.append((name, result))
    print(f"{name}: {result['tokens_per_s']:.0f} tokens/s ({result['step_ms']:.1f} ms/step)",
          flush=True)
  print(f"\n{args.config} ({rows[0][1]['params_m']:.2f}M params), {args.steps} timed steps\n")
  print("| setting | tokens/s | ms/step | ratio to 1 device |\n|---|---|---|---|")
  base = rows[0][1]["tokens_per_s"]
  for name, r in rows:
    print(f"| {name} | {r['tokens_per_s']:.0f} | {r['step_ms']:.1f} | "
          f"{r['tokens_per_s'] / base:.2f} |")


if __name__ == "__main__":
  main()

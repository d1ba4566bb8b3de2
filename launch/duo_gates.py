r"""DuoAttention's retrieval heads: train per-KV-head gates between full and streaming attention.

  python launch/duo_gates.py --model=smollm2 --out=runs/duo_gates

trains the gates of ``sparsity_jax.moa.duo`` (Xiao et al. 2024; the official defaults:
10 passkeys of 32 words, prompts of 1024-4096 tokens, sink 64, recent 256, lr 0.1,
reg_weight 0.05, 1000 steps) and writes <out>/gates.json ([layers, KV heads] gates, loss
history), state.npz (resume) and gates.png. Saves every --save_every steps and on Ctrl-C or
SIGTERM; a rerun with the same options resumes, one with other options is refused
(--restart starts over); a run that fails a check writes nothing. The gates pick the heads
held at full span: ``launch/moa.py --retrieval_heads=k --retrieval_scores=<out>/gates.json
[--streaming_rest]`` or ``benchmarks/moa_streaming_tradeoff.py --scores=<out>/gates.json``.
"""

import json
import os
import sys

import numpy as np
from absl import flags, logging

from sparsity_jax import cli
from sparsity_jax.errors import UserError

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "smollm2", "Pretrained model: smollm2, a .gguf file or a Hugging "
                    "Face directory.")
flags.DEFINE_string("out", None, "Output directory.")
flags.DEFINE_list("lengths", ["1024", "2048", "3072", "4096"], "Prompt lengths in tokens, "
                  "cycled (the official code draws 20 between 1024 and 4096).")
flags.DEFINE_integer("num_samples", 20, "Distinct prompts, cycled over the steps.")
flags.DEFINE_integer("num_steps", 1000, "Optimiser steps, one prompt each.")
flags.DEFINE_integer("num_passkeys", 10, "Passkeys per prompt.")
flags.DEFINE_integer("passkey_length", 32, "Words per passkey.")
flags.DEFINE_integer("sink", 64, "Sink tokens of a streaming head.")
flags.DEFINE_integer("recent", 256, "Recent tokens of a streaming head.")
flags.DEFINE_float("recent_fraction", 0.0, "A variant: an elastic streaming window, sink + "
                   "recent = this fraction of the prompt (as plan.streaming_plan), instead of "
                   "--recent.")
flags.DEFINE_float("lr", 0.1, "Peak learning rate (AdamW, no weight decay).")
flags.DEFINE_float("reg_weight", 0.05, "Weight of the L1 penalty on the mean gate.")
flags.DEFINE_integer("save_every", 10, "Save (and log) every this many steps.")
flags.DEFINE_integer("seed", 0, "Prompt seed.")
flags.DEFINE_bool("restart", False, "Delete the gates of an --out made with other options "
                  "and start over.")

OPTION_FLAGS = ("model", "lengths", "num_samples", "num_steps", "num_passkeys",
                "passkey_length", "sink", "recent", "recent_fraction", "lr", "reg_weight",
                "seed")

OUTPUTS = ("gates.json", "state.npz", "gates.png", "options.json", "gates.json.tmp",
           "state.npz.tmp", "options.json.tmp")
PREEMPTED_EXIT_CODE = 3  # As launch/train.py: non-zero so schedulers rerun; a rerun resumes.


def main(argv):
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  if len(argv) != 1:
    raise UserError(f"unexpected arguments {argv[1:]}; every option is a --flag")
  if not FLAGS.out:
    raise UserError("give --out (the output directory)")
  lengths = _check_flags()
  options = {k: getattr(FLAGS, k) for k in OPTION_FLAGS}
  clear = _check_directory(FLAGS.out, options, FLAGS.restart)
  try:
    _train(lengths, options, clear)
  except KeyboardInterrupt:  # Outside the training loop (which saves and stops on it).
    print("[duo] interrupted; rerun the same command to resume", file=sys.stderr, flush=True)
    sys.exit(130)


def _train(lengths: list[int], options: dict, clear: bool) -> None:
  # Every check before anything is written: a failed run must not leave an options.json
  # that refuses the corrected rerun.
  from sparsity_jax.checkpoints import open_pretrained
  from sparsity_jax.moa import duo, retrieval
  from sparsity_jax.train.loop import Preempted
  ckpt = open_pretrained(FLAGS.model)
  tokenizer = ckpt.tokenizer()
  max_len = ckpt.model_config().max_len
  too_long = [n for n in lengths if n > max_len]
  if too_long:
    raise UserError(f"--lengths {too_long} exceed the model's context {max_len}")
  try:  # Bad data options fail here, before the weights load.
    data = duo.samples(tokenizer, lengths, FLAGS.num_samples, seed=FLAGS.seed,
                       num_passkeys=FLAGS.num_passkeys, passkey_length=FLAGS.passkey_length)
  except ValueError as e:
    raise UserError(str(e)) from None
  model = ckpt.load_model(scan_layers=False)
  _write_options(FLAGS.out, options, clear)
  print(f"[duo] {len(data)} prompts of {sorted(set(lengths))} tokens, "
        f"{int(np.mean([s.labels.sum() for s in data]))} label tokens each on average; "
        f"{FLAGS.num_steps} steps", flush=True)
  try:
    gates = duo.optimise(model, data, num_steps=FLAGS.num_steps, lr=FLAGS.lr,
                         reg_weight=FLAGS.reg_weight, sink=FLAGS.sink, recent=FLAGS.recent,
                         recent_fraction=FLAGS.recent_fraction, out=FLAGS.out,
                         save_every=FLAGS.save_every, log=lambda m: print(m, flush=True))
  except Preempted as e:
    print(f"[duo] {e}", file=sys.stderr, flush=True)
    sys.exit(PREEMPTED_EXIT_CODE)
  duo.plot_gates(gates, os.path.join(FLAGS.out, "gates.png"))
  order = np.argsort(-gates.ravel(), kind="stable")[:15]  # retrieval.select's order.
  k = gates.shape[1]
  print("[duo] highest gates (layer.kv head): " + ", ".join(
      f"{i // k}.{i % k} {gates.ravel()[i]:.2f}" for i in order))
  ties = retrieval.tie_groups(gates)
  if ties:
    # A --retrieval_heads cut inside a tie picks by index (retrieval.select warns): say so.
    print(f"[duo] tied gates: {', '.join(f'{n} at {v:.3g}' for v, n in ties[:5])}"
          f"{', ...' if len(ties) > 5 else ''}; a --retrieval_heads cut inside a tie picks "
          "by index: train longer or with a larger --reg_weight to rank them")
  print(f"[duo] gates: {os.path.join(FLAGS.out, 'gates.json')}, plot: "
        f"{os.path.join(FLAGS.out, 'gates.png')}")


def _check_flags() -> list[int]:
  """The prompt lengths; a UserError for any flag out of range (before the model loads)."""
  try:
    lengths = [int(x) for x in FLAGS.lengths]
  except ValueError:
    raise UserError(f"--lengths={','.join(FLAGS.lengths)} must be comma-separated integers"
                    ) from None
  if not lengths or min(lengths) < 1:
    raise UserError(f"--lengths={','.join(FLAGS.lengths)} must be positive token counts")
  for name in ("num_samples", "num_steps", "save_every", "num_passkeys", "passkey_length",
               "recent"):
    if getattr(FLAGS, name) < 1:
      raise UserError(f"--{name}={getattr(FLAGS, name)} must be >= 1")
  for name in ("sink", "seed"):
    if getattr(FLAGS, name) < 0:
      raise UserError(f"--{name}={getattr(FLAGS, name)} must be >= 0")
  # At 1 the streaming window is the whole prompt: every gate would be free to drop to 0.
  if not 0.0 <= FLAGS.recent_fraction < 1.0:
    raise UserError(f"--recent_fraction={FLAGS.recent_fraction} must be in [0, 1) (0: a "
                    "fixed --recent window)")
  if not 0.0 < FLAGS.lr < float("inf"):
    raise UserError(f"--lr={FLAGS.lr} must be > 0")
  if not 0.0 <= FLAGS.reg_weight < float("inf"):
    raise UserError(f"--reg_weight={FLAGS.reg_weight} must be >= 0")
  return lengths


def _check_directory(out: str, options: dict, restart: bool) -> bool:
  """Refuses an --out made with other options unless restart; writes nothing. True when
  its gates are to be deleted (``_write_options``)."""
  if os.path.exists(out) and not os.path.isdir(out):
    raise UserError(f"--out={out} is a file, not a directory")
  path = os.path.join(out, "options.json")
  if not os.path.exists(path):
    return False
  with open(path) as f:
    old = json.load(f)
  if old == options:
    return False
  if not restart:
    diff = sorted(k for k in set(old) | set(options) if old.get(k) != options.get(k))
    raise UserError(f"{out} was made with other options ({', '.join(diff)}); give "
                    "another --out or --restart to delete its gates and start over")
  return True


def _write_options(out: str, options: dict, clear: bool) -> None:
  """Deletes the old gates when ``clear``; writes <out>/options.json."""
  if clear:
    for name in OUTPUTS:  # Only what this launcher wrote: --out may hold other files.
      if os.path.exists(os.path.join(out, name)):
        os.remove(os.path.join(out, name))
  os.makedirs(out, exist_ok=True)
  path = os.path.join(out, "options.json")
  with open(path + ".tmp", "w") as f:
    json.dump(options, f, indent=1)
  os.replace(path + ".tmp", path)


if __name__ == "__main__":
  cli.run(main)

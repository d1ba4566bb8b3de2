"""DuoAttention's retrieval heads by optimisation: per-KV-head gates, full vs streaming.

Xiao et al. 2024, "DuoAttention: Efficient Long-Context LLM Inference with Retrieval and
Streaming Heads" (code: mit-han-lab/duo-attention, ``duo_attn/train.py``). Every KV head h
of every layer gets a gate a_h in [0, 1], and its query heads attend with

  o = a_h * softmax attention over every earlier token
      + (1 - a_h) * softmax attention over the first ``sink`` and the last ``recent`` tokens.

The gates start at 1 and are trained, with the model's weights frozen, on synthetic
multiple-passkey prompts so that the final hidden states (after the final norm) at the
answer positions stay those of the dense model, while an L1 penalty pushes them to 0:

  loss = mean over label positions of mean_e (h_dense - h_gated)^2 + reg_weight * mean |a|

AdamW (no weight decay) at ``lr`` with a linear warm-up over the first fifth of the steps
and a linear decay over the last fifth, both floored at 0.1 x lr; the gates are clamped to
[0, 1] before every step. Heads with the highest gates are the retrieval heads (full
attention at inference); the rest stream. Defaults are the official ones (sink 64, recent
256, reg_weight 0.05, lr 0.1, 1000 steps, 10 passkeys of 32 NATO-alphabet words);
``launch/duo_gates.py`` runs it, and ``launch/moa.py --retrieval_scores`` /
``benchmarks/moa_streaming_tradeoff.py --scores`` use the gates to pick the held heads.
Deviations: docs/fidelity.md.

Legend: b batch, t query length, s key length, n query heads, k KV heads, g query heads per
KV head, h head dim, e embed, L layers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from sparsity_jax.evals import long_context as lc
from sparsity_jax.layers.attention import AttentionCore, register_attention
from sparsity_jax.models.transformer import TransformerLM

NATO = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india",
        "juliett", "kilo", "lima", "mike", "november", "oscar", "papa", "quebec", "romeo",
        "sierra", "tango", "uniform", "victor", "whiskey", "xray", "yankee", "zulu")
ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth",
            "ninth", "tenth", "eleventh", "twelfth", "thirteenth", "fourteenth", "fifteenth",
            "sixteenth", "seventeenth", "eighteenth", "nineteenth", "twentieth")
NEEDLE = "Remember this sequence of words, it's the {} passkey to the vault: "
QUESTION = "Based on the content of the book, what is the {} passkey to the vault?\nPasskey: "
BOOK_OPEN, BOOK_CLOSE, SEPARATOR = "This is a very long story book: <book> ", " </book>.\n\n", "\n\n"


class DuoGate(nnx.Variable):
  """The per-KV-head gates of one layer, [k]: 1 full attention, 0 streaming."""


@register_attention("duo_gate")
class DuoGateAttention(AttentionCore):
  """Causal attention mixing full and streaming (sink + recent) attention per KV head.

  Options: ``sink`` (default 64) and ``recent`` (default 256) tokens, as DuoAttention's
  ``--sink_size`` / ``--recent_size``; a query at position i streams over keys j < sink
  and i - recent < j <= i. ``recent_fraction`` > 0 (a variant) makes the window elastic
  as in ``plan.streaming_plan``: recent = round(recent_fraction * s) - sink for s keys, so
  sink + window is that fraction of the input. Dense logits: for gate training at a few
  thousand tokens, not for inference (``MoAAttention`` runs the resulting plan).
  """

  OPTIONS = ("sink", "recent", "recent_fraction")

  def __init__(self, model_config: Any, *, layer_index: int | None, rngs: nnx.Rngs):
    del layer_index, rngs
    opts = model_config.attention
    self.sink = int(opts.get("sink", 64))
    self.recent = int(opts.get("recent", 256))
    self.recent_fraction = float(opts.get("recent_fraction", 0.0))
    if self.sink < 0 or self.recent < 1 or not 0.0 <= self.recent_fraction <= 1.0:
      raise ValueError(f"duo_gate needs sink >= 0, recent >= 1 and recent_fraction in "
                       f"[0, 1], got sink={self.sink}, recent={self.recent}, "
                       f"recent_fraction={self.recent_fraction}")
    self.gate = DuoGate(jnp.ones((model_config.num_kv_heads,), jnp.float32))

  def __call__(self, q_btnh, k_bskh, v_bskh, *, positions_bt, causal: bool) -> jax.Array:
    if not causal:
      raise ValueError("duo_gate is for causal language models")
    b, t, n, h = q_btnh.shape
    k = k_bskh.shape[2]
    recent = self.window(k_bskh.shape[1])
    q = q_btnh.reshape(b, t, k, n // k, h).astype(jnp.float32)
    logits = jnp.einsum("btkgh,bskh->bkgts", q, k_bskh.astype(jnp.float32)) / np.sqrt(h)
    i = positions_bt[:, None, None, :, None]
    j = positions_bt[:, None, None, None, :]
    full = j <= i
    stream = full & ((j < self.sink) | (i - j < recent))
    p_full = jax.nn.softmax(jnp.where(full, logits, -jnp.inf), axis=-1)
    p_stream = jax.nn.softmax(jnp.where(stream, logits, -jnp.inf), axis=-1)
    a = self.gate.get_value()[None, :, None, None, None]
    p = a * p_full + (1.0 - a) * p_stream  # Mixing the outputs = mixing the probabilities.
    o = jnp.einsum("bkgts,bskh->btkgh", p, v_bskh.astype(jnp.float32))
    return o.reshape(b, t, n, h).astype(q_btnh.dtype)

  def window(self, length: int) -> int:
    """Recent tokens a streaming query sees at input length ``length``."""
    if self.recent_fraction > 0:
      return max(1, round(self.recent_fraction * length) - self.sink)
    return self.recent


def gated_model(model: TransformerLM, *, sink: int = 64, recent: int = 256,
                recent_fraction: float = 0.0, remat: bool = True) -> TransformerLM:
  """The same frozen parameters with the 'duo_gate' core in every layer, gates at 1
  (``remat`` recomputes each block in the backward pass: one layer's attention matrices
  in memory instead of all of them)."""
  if model.cfg.scan_layers:
    raise ValueError("gate training needs a model built with scan_layers=False")
  cfg = dataclasses.replace(model.cfg, attention={
      "kind": "duo_gate", "sink": sink, "recent": recent, "recent_fraction": recent_fraction},
      remat=remat)
  gated = TransformerLM(cfg, rngs=nnx.Rngs(0))
  nnx.update(gated, nnx.state(model, nnx.Param))
  return gated


def gates(model: TransformerLM) -> np.ndarray:
  """[L, k] the gates of a ``gated_model``."""
  cores = [m for _, m in nnx.iter_modules(model) if isinstance(m, DuoGateAttention)]
  if not cores:
    raise ValueError("not a gated model (build it with duo.gated_model)")
  return np.stack([np.asarray(c.gate.get_value()) for c in cores])


def set_gates(model: TransformerLM, values: np.ndarray) -> None:
  cores = [m for _, m in nnx.iter_modules(model) if isinstance(m, DuoGateAttention)]
  values = np.asarray(values, np.float32)
  if values.shape != (len(cores), model.cfg.num_kv_heads):
    raise ValueError(f"gates of shape {values.shape} for a model of "
                     f"{(len(cores), model.cfg.num_kv_heads)} (layers, KV heads)")
  for core, v in zip(cores, values):
    core.gate.set_value(jnp.asarray(v))


# ---- data ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Sample:
  """A multiple-passkey prompt: ``tokens`` [length], ``labels`` [length] bool (the question
  and answer tokens after the book, where the distillation loss is taken), the passkeys and
  their depths in the book."""

  tokens: np.ndarray
  labels: np.ndarray
  passkeys: tuple[str, ...]
  depths: tuple[float, ...]


def haystack(tokenizer, num_tokens: int) -> np.ndarray:
  """``num_tokens`` tokens of the embedded corpus's training files, concatenated (the
  official code uses long Pile documents; the evaluation's passkey uses a repeated filler,
  so the gates never see its haystack)."""
  docs = lc.corpus_documents(tokenizer, split="train", total_tokens=num_tokens)
  ids = np.concatenate(docs) if docs else np.zeros((0,), np.int32)
  if len(ids) < num_tokens:
    raise ValueError(f"the embedded corpus has {len(ids)} tokens, fewer than {num_tokens}")
  return ids[:num_tokens].astype(np.int32)


def multi_passkey(tokenizer, length: int, rng: np.random.Generator, book: np.ndarray, *,
                  num_passkeys: int = 10, passkey_length: int = 32,
                  depth_intervals: int = 10) -> Sample:
  """One prompt of exactly ``length`` tokens: a book of corpus text with ``num_passkeys``
  needles ("Remember this sequence of words, it's the <k-th> passkey to the vault: <words>")
  at distinct depths from ``depth_intervals`` evenly spaced ones in [0, 1], then every
  question followed by its passkey (the labels), as DuoAttention's
  MultiplePasskeyRetrievalDataset.

  Raises ValueError when the needles and questions leave no room for the book."""
  if not 1 <= num_passkeys <= min(len(ORDINALS), depth_intervals):
    raise ValueError(f"num_passkeys={num_passkeys} must be in [1, "
                     f"{min(len(ORDINALS), depth_intervals)}] (ordinals, depth intervals)")
  if passkey_length < 1:
    raise ValueError(f"passkey_length={passkey_length} must be >= 1")
  enc = functools.partial(lc.encode, tokenizer)
  sep = enc(SEPARATOR)
  keys = [" ".join(rng.choice(NATO, passkey_length)) for _ in range(num_passkeys)]
  needles = [np.concatenate([sep, enc(NEEDLE.format(ORDINALS[i])), enc(keys[i]), sep])
             for i in range(num_passkeys)]
  qa = [np.concatenate([enc(QUESTION.format(ORDINALS[i])), enc(keys[i]), sep])
        for i in range(num_passkeys)]
  head = np.concatenate([lc.frame(tokenizer, False)[0], enc(BOOK_OPEN)])
  tail = enc(BOOK_CLOSE)
  fixed = len(head) + len(tail) + sum(map(len, needles)) + sum(map(len, qa))
  room = length - fixed
  if room < num_passkeys:
    raise ValueError(f"{num_passkeys} passkeys of {passkey_length} words need {fixed} tokens "
                     f"besides the book, more than length={length}; use fewer or shorter "
                     "passkeys (--num_passkeys, --passkey_length) or longer prompts")
  if len(book) < room:
    raise ValueError(f"the book has {len(book)} tokens, {room} needed")
  grid = np.linspace(0.0, 1.0, depth_intervals)
  depths = np.sort(rng.choice(grid, num_passkeys, replace=False))
  cuts = (depths * room).astype(int)
  parts, last = [head], 0
  for cut, needle in zip(cuts, needles):
    parts += [book[last:cut], needle]
    last = cut
  parts += [book[last:room], tail]
  context = np.concatenate(parts)
  tokens = np.concatenate([context] + qa).astype(np.int32)
  labels = np.zeros(len(tokens), bool)
  labels[len(context):] = True
  assert len(tokens) == length, (len(tokens), length)
  return Sample(tokens, labels, tuple(keys), tuple(float(d) for d in depths))


def samples(tokenizer, lengths, num: int, *, seed: int = 0, **kw) -> list[Sample]:
  """``num`` samples cycling through ``lengths`` (DuoAttention trains on 20 lengths
  between --context_length_min and --context_length_max), seed ``seed``."""
  rng = np.random.default_rng(seed)
  book = haystack(tokenizer, max(lengths))
  return [multi_passkey(tokenizer, lengths[i % len(lengths)], rng, book, **kw)
          for i in range(num)]


# ---- optimisation ----------------------------------------------------------------------


def schedule(lr: float, num_steps: int):
  """The official schedule: min(1, warm-up, decay), each floored at 0.1, per step."""
  fifth = max(num_steps // 5, 1)

  def fn(step):
    warm = jnp.maximum((step + 1) / fifth, 0.1)
    decay = jnp.maximum((num_steps - step) / fifth, 0.1)
    return lr * jnp.minimum(1.0, jnp.minimum(warm, decay))
  return fn


@jax.jit
def _teacher(graphdef, state, tokens_bt):
  model = nnx.merge(graphdef, state)
  _, hidden = model.forward_with_hidden(tokens_bt)
  return hidden[-1]


def dense_hidden(model: TransformerLM, tokens: np.ndarray) -> jax.Array:
  """[t, e] the dense model's final hidden states (after the final norm)."""
  graphdef, state = nnx.split(model)
  return _teacher(graphdef, state, jnp.asarray(tokens[None]))[0]


def distill_loss(model, tokens_bt, labels_bt, target_bte, reg_weight):
  """(total, (distillation, L1)) as in the official train.py."""
  _, hidden = model.forward_with_hidden(tokens_bt)
  diff = (hidden[-1].astype(jnp.float32) - target_bte) ** 2
  mask = labels_bt.astype(jnp.float32)
  distill = jnp.sum(diff.mean(-1) * mask) / jnp.maximum(mask.sum(), 1.0)
  cores = [m for _, m in nnx.iter_modules(model) if isinstance(m, DuoGateAttention)]
  reg = jnp.mean(jnp.abs(jnp.concatenate([c.gate.get_value() for c in cores])))
  return distill + reg_weight * reg, (distill, reg)


@functools.partial(jax.jit, static_argnums=(0, 6), donate_argnums=(1, 3))
def _step(graphdef, gate_state, rest, opt_state, batch, reg_weight, tx):
  tokens, labels, target = batch

  def loss_fn(gate_state):
    model = nnx.merge(graphdef, gate_state, rest)
    return distill_loss(model, tokens, labels, target, reg_weight)

  gate_state = jax.tree.map(lambda g: jnp.clip(g, 0.0, 1.0), gate_state)
  (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(gate_state)
  updates, opt_state = tx.update(grads, opt_state, gate_state)
  return optax.apply_updates(gate_state, updates), opt_state, loss, aux


def optimise(model: TransformerLM, data: list[Sample], *, num_steps: int = 1000,
             lr: float = 0.1, reg_weight: float = 0.05, sink: int = 64, recent: int = 256,
             recent_fraction: float = 0.0, out: str | None = None, save_every: int = 10,
             log=print) -> np.ndarray:
  """[L, k] trained gates of ``model`` (a dense ``TransformerLM``), one sample per step,
  cycling through ``data``.

  With ``out`` (a directory), the gates, the optimiser state and the loss history are saved
  every ``save_every`` steps, at the end and on SIGINT/SIGTERM (then ``Preempted`` is raised
  after the step in flight) to ``state.npz`` and ``gates.json``; a rerun resumes from the
  last save, and a finished run returns its gates without training."""
  if num_steps < 1 or not data:
    raise ValueError("gate training needs num_steps >= 1 and at least one sample")
  gated = gated_model(model, sink=sink, recent=recent, recent_fraction=recent_fraction)
  graphdef, gate_state, rest = nnx.split(gated, DuoGate, ...)
  tx = optax.adamw(schedule(lr, num_steps), weight_decay=0.0)
  opt_state = tx.init(gate_state)
  meta = dict(lr=lr, reg_weight=reg_weight, sink=sink, recent=recent,
              recent_fraction=recent_fraction, lengths=sorted({len(s.tokens) for s in data}),
              samples=len(data))
  history, start = [], 0
  if out:
    os.makedirs(out, exist_ok=True)
    saved = _load(out)
    if saved is not None:
      start, values, opt_leaves, history = saved
      set_gates(gated, values)
      _, gate_state, _ = nnx.split(gated, DuoGate, ...)
      opt_state = jax.tree.unflatten(jax.tree.structure(opt_state),
                                     [jnp.asarray(x) for x in opt_leaves])
      # state.npz is the truth: a kill between the two writes left gates.json behind it.
      _write_record(out, start, num_steps, values, history, meta)
      if start >= num_steps:
        log(f"[duo] already done ({start} of {num_steps} steps); gates: "
            f"{os.path.join(out, 'gates.json')}")
      else:
        log(f"[duo] resuming at step {start} of {num_steps}")
  targets: dict[int, jax.Array] = {}
  t0 = time.time()
  with _signals(out) as signals:
    for step in range(start, num_steps):
      i = step % len(data)
      if i not in targets:
        targets[i] = dense_hidden(model, data[i].tokens)
      batch = (jnp.asarray(data[i].tokens[None]), jnp.asarray(data[i].labels[None]),
               targets[i][None])
      gate_state, opt_state, loss, (dl, rl) = _step(graphdef, gate_state, rest, opt_state,
                                                     batch, reg_weight, tx)
      history.append([float(loss), float(dl), float(rl)])
      done = step + 1
      stop = signals is not None and signals.requested and done < num_steps
      if done % save_every == 0 or done == num_steps or stop:
        nnx.update(gated, gate_state)
        g = np.clip(gates(gated), 0.0, 1.0)
        if out:
          _save(out, done, num_steps, g, opt_state, history, meta)
        log(f"[duo] step {done}/{num_steps}: distill {float(dl):.4f}, mean gate "
            f"{g.mean():.3f}, gates > 0.5: {(g > 0.5).sum()}/{g.size} "
            f"({time.time() - t0:.0f} s)")
      if stop:
        from sparsity_jax.train.loop import Preempted
        raise Preempted(f"interrupted at step {done} of {num_steps} (saved in {out}); rerun "
                        "the same command to resume")
  nnx.update(gated, gate_state)
  return np.clip(gates(gated), 0.0, 1.0)


def _signals(out):
  """With ``out``, SIGINT/SIGTERM set a flag polled at each step boundary (then the loop
  saves and stops), as the training loop does; without, they interrupt as usual."""
  if not out:
    return contextlib.nullcontext(None)
  from sparsity_jax.train.loop import Preemption  # The training loop's handler.
  return Preemption()


def _replace(path, write) -> None:
  """``write(file)`` to a temporary file beside ``path``, then renames it over ``path``:
  a kill leaves the old file or the new one, never half of one."""
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    write(f)
  os.replace(tmp, path)


def _save(out, step, num_steps, values, opt_state, history, meta):
  # state.npz (the truth for resuming) first, each write atomic: a kill between the two
  # leaves gates.json one save behind, and resuming rewrites it from state.npz.
  arrays = {f"opt_{i}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(opt_state))}
  _replace(os.path.join(out, "state.npz"), lambda f: np.savez(
      f, step=step, gates=np.asarray(values, np.float32),
      history=np.asarray(history, np.float64).reshape(-1, 3), **arrays))
  _write_record(out, step, num_steps, values, history, meta)


def _write_record(out, step, num_steps, values, history, meta):
  record = {"step": int(step), "num_steps": num_steps, "gates": np.asarray(values).tolist(),
            "history": [list(map(float, h)) for h in history], **meta}
  _replace(os.path.join(out, "gates.json"), lambda f: f.write(json.dumps(record).encode()))


def _load(out):
  """(step, gates, optimiser leaves, history) of the last save, or None."""
  path = os.path.join(out, "state.npz")
  if not os.path.exists(path):
    return None
  with np.load(path) as z:
    if "step" in z.files:
      leaves = [z[f"opt_{i}"] for i in range(sum(k.startswith("opt_") for k in z.files))]
      return int(z["step"]), z["gates"], leaves, z["history"].tolist()
    leaves = [z[f"arr_{i}"] for i in range(len(z.files))]  # Before state.npz held it all.
  with open(os.path.join(out, "gates.json")) as f:
    record = json.load(f)
  return record["step"], np.asarray(record["gates"]), leaves, record["history"]


def load_scores(path: str) -> np.ndarray:
  """[L, k] head scores from a gates.json (``gates``) or a retrieval_heads.json
  (``needle_attention``); ValueError naming the file otherwise."""
  try:
    with open(path) as f:
      record = json.load(f)
    key = "gates" if "gates" in record else "needle_attention"
    scores = np.asarray(record[key], np.float64)
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise ValueError(f"{path}: not a gates.json of launch/duo_gates.py or a "
                     f"retrieval_heads.json of launch/moa.py ({type(e).__name__}: {e})") from e
  if scores.ndim != 2:
    raise ValueError(f"{path}: scores of shape {scores.shape}, expected [layers, KV heads]")
  return scores


def plot_gates(values: np.ndarray, path: str) -> None:
  """Heat map of [L, k] gates (layers down, KV heads across), as the official figure."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(2.5 + 0.5 * values.shape[1], 0.22 * values.shape[0] + 1.5))
  im = ax.imshow(values, cmap="coolwarm", vmin=0.0, vmax=1.0, aspect="auto",
                 interpolation="nearest")
  ax.set(xlabel="KV head", ylabel="layer", title="DuoAttention gates (1: full attention)")
  ax.set_xticks(range(values.shape[1]))
  fig.colorbar(im, ax=ax, fraction=0.08)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)

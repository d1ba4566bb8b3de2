"""Shared config pieces for configs/*.py: ``base_config()`` holds every field with its comment."""

import math

import ml_collections

from sparsity_jax import axes
from sparsity_jax.errors import UserError
from sparsity_jax.sparsity.spec import DEFAULT_TARGETS


def parse_arg(arg: str | None, **defaults):
  """Parses ``"key=value,flag"`` config arguments (``runlocal`` style) into a ConfigDict.

  Values are coerced to the type of their default; a bare key means True.
  """
  out = ml_collections.ConfigDict(defaults)
  if not arg:
    return out
  for item in arg.split(","):
    key, _, value = item.partition("=")
    if key not in defaults:
      raise ValueError(f"unknown config argument {key!r}; known: {sorted(defaults)}")
    kind = type(defaults[key])
    if kind is bool:
      out[key] = value.lower() not in ("0", "false", "no") if value else True
    else:
      out[key] = kind(value)
  return out


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0  # Seeds parameter init, the data order and per-step noise.
  c.objective = "causal_lm"  # 'causal_lm' or 'masked_diffusion' (needs model.causal=False).
  # Pretrained weights to start from (train) or to evaluate (eval without a workdir):
  # '' (random init), 'smollm2' (the embedded SmolLM2-135M-Instruct), a .gguf file or a
  # Hugging Face directory. Its architecture replaces model's architecture fields.
  c.pretrained = ""

  # A workdir to start from (its newest checkpoint's weights and masks; the optimizer
  # starts fresh), e.g. a pruned model of launch/prune.py; its config.model replaces this
  # config's model section. '' starts from config.pretrained or random weights.
  c.init_from = ""
  # Distillation from the starting weights with every mask off (SquareHead: h_sq = 1);
  # dense-trained weights if init_from is a pruned model. Inactive while h_sq = h_kl = 0.
  c.distill = ml_collections.ConfigDict()
  c.distill.h_ce = 1.0  # Cross-entropy weight.
  c.distill.h_sq = 0.0  # Per-layer normalized hidden-state MSE weight (SquareHead).
  c.distill.h_kl = 0.0  # KL(teacher || student) weight.
  c.distill.temperature = 1.0  # KL temperature.

  c.model = ml_collections.ConfigDict()
  c.model.vocab_size = 260  # Byte tokenizer: 256 bytes + PAD, BOS, EOS, MASK.
  c.model.num_layers = 4  # Transformer blocks.
  c.model.d_model = 128  # Residual width.
  c.model.num_heads = 4  # Query heads.
  c.model.num_kv_heads = 2  # Key/value heads (GQA when < num_heads).
  c.model.head_dim = 32  # Width of one head.
  c.model.mlp_dim = 384  # SwiGLU hidden width.
  c.model.max_len = 1024  # Longest sequence the model accepts.
  c.model.rope_theta = 10_000.0  # RoPE base.
  c.model.norm_eps = 1e-6  # RMSNorm epsilon.
  c.model.tie_embeddings = True  # Output head shares the embedding matrix.
  c.model.qkv_bias = False  # Biases on q/k/v projections (Qwen2).
  c.model.causal = True  # Causal LM (False: bidirectional, for the diffusion LM).
  c.model.scan_layers = False  # nnx.scan over stacked layers (faster compile for deep models).
  c.model.remat = False  # Recompute block activations in the backward pass.
  c.model.dtype = "float32"  # Compute dtype: float32 or bfloat16 (params stay param_dtype).
  c.model.param_dtype = "float32"  # Parameter (and optimizer) dtype.
  c.model.attention = ml_collections.ConfigDict()
  c.model.attention.kind = "dense"  # Attention core; see sparsity_jax.layers.attention_kinds().
  # Weight masks (sparsity_jax.sparsity.SparsitySpec); pattern '' keeps the model dense.
  c.model.weight_sparsity = ml_collections.ConfigDict()
  c.model.weight_sparsity.pattern = ""  # '' (dense), 'unstructured' or 'N:M' (e.g. '2:4').
  # Fraction of zeros ('unstructured', per output; leave 0 for N:M).
  c.model.weight_sparsity.sparsity = 0.0
  c.model.weight_sparsity.targets = DEFAULT_TARGETS  # Regex over weight paths.

  c.data = ml_collections.ConfigDict()
  c.data.source = "stdlib"  # 'stdlib' (embedded Python sources) or 'text_files'.
  c.data.glob = ""  # Files for source='text_files', e.g. '/data/**/*.txt'.
  # 'bytes' (byte-level ids < 260) or 'pretrained' (the tokenizer of config.pretrained).
  c.data.tokenizer = "bytes"
  c.data.seq_len = 256  # Tokens per training sequence (bytes with the byte tokenizer).
  c.data.batch_size = 16  # Global batch size (sequences per step).
  c.data.val_fraction = 0.05  # Fraction of files held out for validation.
  # Fraction of seq_len blocks that are generated LongEval-style retrieval documents
  # (sparsity_jax.data.retrieval; the MoA experiment's training mix). 0: text only.
  c.data.retrieval_fraction = 0.0

  c.train = ml_collections.ConfigDict()
  c.train.steps = 1000  # Total optimizer steps.
  c.train.lr = 3e-3  # Peak learning rate.
  c.train.warmup_steps = 50  # Linear warmup steps.
  c.train.min_lr_ratio = 0.1  # Cosine decays to lr * min_lr_ratio.
  c.train.weight_decay = 0.1  # AdamW decoupled weight decay (matrices only).
  c.train.b1 = 0.9  # Adam beta1.
  c.train.b2 = 0.95  # Adam beta2.
  c.train.grad_clip_norm = 1.0  # Global-norm gradient clipping.
  c.train.log_every = 10  # Steps between metric writes.
  c.train.checkpoint_every = 100  # Steps between checkpoints (also on SIGTERM/SIGINT).
  c.train.keep_checkpoints = 3  # Checkpoints kept in <workdir>/checkpoints.
  # How the weight masks evolve in training (sparsity_jax.sparsity.training; needs
  # model.weight_sparsity): 'fixed', 'ste', 'sr_ste' (SR-STE), 'mdgf' (PGF mask decay) or
  # 'rigl' (RigL drop / grow, Sparse-IFT's dynamic sparse training).
  c.train.weight_sparsity = ml_collections.ConfigDict()
  c.train.weight_sparsity.method = "fixed"
  c.train.weight_sparsity.dense_steps = 0  # Dense warm-up steps (recomputed masks only).
  c.train.weight_sparsity.fine_tune_steps = 0  # Final steps with a hard mask (beta = 0).
  c.train.weight_sparsity.sr_ste_lambda = 2e-4  # SR-STE decay of pruned weights.
  c.train.weight_sparsity.decay = "exp"  # MDGF beta(t): 'linear' or 'exp'.
  c.train.weight_sparsity.decay_coef = 1e-4  # MDGF kappa, per step of the sparse phase.
  # SDGF (PGF structure decay, with 'ste' or 'mdgf'): '', 'sparsify' or 'fine'.
  c.train.weight_sparsity.structure_decay = ""
  # Fixed / RigL masks at a fresh start: 'magnitude' (|w|) or 'random', per output
  # (floor(d_in * sparsity) pruned per output) or per N:M group; 'keep' (init_from's).
  c.train.weight_sparsity.mask_init = "magnitude"
  c.train.weight_sparsity.rigl_every = 100  # RigL: steps between mask updates.
  c.train.weight_sparsity.rigl_drop_fraction = 0.3  # RigL: initial drop fraction (cosine).
  c.train.weight_sparsity.rigl_end = 0.75  # RigL: last update at this fraction of steps.

  c.eval = ml_collections.ConfigDict()
  c.eval.every = 200  # Steps between evaluations (0: only at the end).
  c.eval.batch_size = 16  # Global eval batch size.
  c.eval.num_batches = 16  # Validation batches per evaluation (0: the whole split).

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # Data-parallel axis (-1: all devices left over).
  c.mesh.fsdp = 1  # Fully-sharded data-parallel axis (shards weights along embed).
  c.mesh.tensor = 1  # Tensor-parallel axis (heads, mlp, vocab).
  # Logical axis -> mesh axes; see sparsity_jax/axes.py for the glossary.
  c.logical_axis_rules = [list(rule) for rule in axes.DEFAULT_RULES]
  return c


def shrink_for_runlocal(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The ``runlocal`` variant of the tiny configs: a seconds-long CPU smoke run."""
  c.model.num_layers = 2
  c.model.d_model = 64
  c.model.mlp_dim = 128
  c.model.head_dim = 16
  c.model.max_len = 128
  c.data.seq_len = 64
  c.data.batch_size = 8
  c.eval.batch_size = 8
  c.eval.num_batches = 2
  c.train.steps = 20
  c.train.warmup_steps = 5
  c.train.log_every = 5
  c.train.checkpoint_every = 10
  c.eval.every = 10
  return c


def long_lm_tiny(attention: dict, arg: str | None = None) -> ml_collections.ConfigDict:
  """The Routing Transformer comparison's shared setting: one tiny model, seq_len 2048.

  dense / local / routing configs differ only in ``model.attention``, so a comparison
  trains the same architecture for the same steps on the same data.
  """
  args = parse_arg(arg, runlocal=False, steps=150)
  c = base_config()
  c.model.max_len = 2048
  c.model.attention = ml_collections.ConfigDict(attention)
  c.data.seq_len = 2048
  c.data.batch_size = 2
  c.eval.batch_size = 2
  c.eval.num_batches = 8
  c.eval.every = 0
  c.train.steps = args.steps
  c.train.warmup_steps = min(30, args.steps // 5)
  c.train.checkpoint_every = 50
  if args.runlocal:
    c.model.max_len = 256
    c.data.seq_len = 256
    c.model.num_layers = 2
    c.train.steps = 4
    c.train.warmup_steps = 1
    c.eval.num_batches = 1
    c.train.log_every = 1
    for key in ("window", "local_block"):
      if key in c.model.attention:
        c.model.attention[key] = 64
  return c


def pretrained_config(source: str = "smollm2", arg: str | None = None) -> ml_collections.ConfigDict:
  """Evaluating (or fine-tuning) a pretrained model on the embedded corpus, tokenised with
  the model's own tokenizer; ``arg`` 'runlocal' shrinks the evaluation to seconds."""
  args = parse_arg(arg, runlocal=False, seq_len=1024)
  c = base_config()
  c.pretrained = source
  c.data.tokenizer = "pretrained"
  c.data.seq_len = args.seq_len
  c.data.batch_size = 4
  c.eval.batch_size = 2
  c.eval.num_batches = 16
  c.eval.every = 0
  c.train.steps = 200
  c.train.lr = 3e-5  # Fine-tuning, not pretraining.
  c.train.warmup_steps = 20
  c.train.weight_decay = 0.0
  c.train.checkpoint_every = 100
  if args.runlocal:
    c.data.seq_len = min(args.seq_len, 128)
    c.data.batch_size = 2
    c.eval.num_batches = 2
    c.train.steps = 2
    c.train.warmup_steps = 1
  return c


# Out of range, the loop would not fail but run something else than asked: no step at all
# (train.steps <= 0), an interval of 0 (a ZeroDivisionError mid-run), a negative one read
# as "never", a negative learning rate (gradient ascent). lr may be 0 (weights stay).
# Config numbers and the least value each may take (whole numbers).
_INT_AT_LEAST = {"train.steps": 1, "train.warmup_steps": 0, "train.log_every": 1,
                 "train.checkpoint_every": 1, "train.keep_checkpoints": 1, "data.seq_len": 1,
                 "data.batch_size": 1, "eval.every": 0, "eval.batch_size": 1,
                 "eval.num_batches": 0}
_FLOAT_RANGES = {  # name: (low, high, low inclusive, high inclusive)
    "train.lr": (0.0, math.inf, True, True), "train.min_lr_ratio": (0.0, 1.0, True, True),
    "train.weight_decay": (0.0, math.inf, True, False),
    "train.grad_clip_norm": (0.0, math.inf, False, True),
    "train.b1": (0.0, 1.0, True, False), "train.b2": (0.0, 1.0, True, False)}


def check_ranges(config: ml_collections.ConfigDict) -> None:
  """Raises UserError naming the first config number (train / data / eval intervals, sizes
  and optimizer settings) outside the range the training loop can use."""
  def lookup(dotted):
    section, field = dotted.split(".")
    return config[section].get(field, None) if section in config else None

  for name, low in _INT_AT_LEAST.items():
    value = lookup(name)
    if value is None:
      continue
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or
        not float(value).is_integer()):  # Also inf and nan.
      raise UserError(f"config.{name}={value!r} must be an integer >= {low}")
    if value < low:
      raise UserError(f"config.{name}={value} must be >= {low}"
                      + (" (0: only at the end)" if name == "eval.every" else "")
                      + (" (0: the whole validation split)" if name == "eval.num_batches" else ""))
  for name, (low, high, low_in, high_in) in _FLOAT_RANGES.items():
    value = lookup(name)
    if value is None:
      continue
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and
          (low <= value if low_in else low < value) and
          (value <= high if high_in else value < high))  # False for nan.
    if not ok:
      where = f"{'[' if low_in else '('}{low:g}, {high:g}{']' if high_in else ')'}"
      raise UserError(f"config.{name}={value!r} must be in {where}")

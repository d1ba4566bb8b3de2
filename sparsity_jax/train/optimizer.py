"""AdamW with linear warmup, cosine decay and global-norm clipping."""

import jax
import optax


def learning_rate_schedule(train_config) -> optax.Schedule:
  """0 -> lr over ``warmup_steps``, then cosine down to ``lr * min_lr_ratio`` at ``steps``."""
  warmup = min(int(train_config.warmup_steps), max(int(train_config.steps) - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=train_config.lr, warmup_steps=warmup,
      decay_steps=max(int(train_config.steps), warmup + 1),
      end_value=train_config.lr * train_config.min_lr_ratio)


def make_optimizer(train_config) -> optax.GradientTransformation:
  """Weight decay applies to matrices only (not norms' scales or biases)."""
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  return optax.chain(
      optax.clip_by_global_norm(train_config.grad_clip_norm),
      optax.adamw(learning_rate_schedule(train_config), b1=train_config.b1, b2=train_config.b2,
                  eps=1e-8, weight_decay=train_config.weight_decay, mask=decay_mask),
  )

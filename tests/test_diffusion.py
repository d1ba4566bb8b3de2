"""Masked-diffusion LM: objective, training, and the semi-autoregressive sampler."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from support import make_tiny_config
from sparsity_jax.data import tokenizer
from sparsity_jax.models import ModelConfig, TransformerLM
from sparsity_jax.models.diffusion import SamplerConfig, denoise_step, generate
from sparsity_jax.train import objectives, train_and_evaluate

MODEL = dict(vocab_size=260, num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, head_dim=8,
             mlp_dim=64, max_len=96, causal=False)


def test_forward_process_masks_at_rate_t():
  tokens = jnp.zeros((256, 512), jnp.int32)
  noisy, masked, t = objectives.mask_tokens(tokens, jax.random.key(np.random.randint(1 << 30)))
  assert ((noisy == tokenizer.MASK_ID) == masked).all()
  rate, t = np.asarray(masked.mean(axis=1)), np.asarray(t)
  # Each row is Binomial(512, t) / 512: 5.5 standard deviations keeps 256 rows from failing
  # by chance (a fixed 0.08 did, ~8% of runs), while a wrong rate is still far outside.
  assert (np.abs(rate - t) <= 5.5 * np.sqrt(t * (1 - t) / tokens.shape[1]) + 1e-3).all()
  assert float(t.min()) > 0 and float(t.max()) <= 1


def test_diffusion_training_runs_and_learns(tmp_path):
  cfg = make_tiny_config(**{"objective": "masked_diffusion", "model.causal": False,
                            "train.steps": 12, "train.checkpoint_every": 12})
  out = train_and_evaluate(cfg, str(tmp_path / "run"))
  assert np.isfinite(out["eval_metrics"]["loss"])
  assert out["eval_metrics"]["loss"] < np.log(260) * 2  # Beats uniform (bound has 1/t weights).


def test_diffusion_objective_requires_bidirectional_model(tmp_path):
  cfg = make_tiny_config(**{"objective": "masked_diffusion"})
  with pytest.raises(ValueError, match="causal=False"):
    train_and_evaluate(cfg, str(tmp_path / "run"))


def _model(seed=0):
  return TransformerLM(ModelConfig(**MODEL), rngs=nnx.Rngs(seed))


def test_sampler_commits_the_schedule_and_never_changes_committed_tokens():
  cfg = SamplerConfig(gen_length=32, steps=12, block_length=8)  # 3 steps per block: 3, 3, 2.
  assert cfg.transfer_schedule() == [3, 3, 2]
  prompt = np.random.randint(0, 256, (2, 10))
  result = generate(_model(np.random.randint(100)), prompt, cfg, keep_history=True)
  previous = np.concatenate([prompt, np.full((2, 32), tokenizer.MASK_ID)], axis=1)
  for step, tokens in enumerate(result.history):
    block, within = divmod(step, 3)
    newly = (previous == tokenizer.MASK_ID) & (tokens != tokenizer.MASK_ID)
    assert (newly.sum(axis=1) == cfg.transfer_schedule()[within]).all()
    lo = 10 + block * 8
    assert not newly[:, :lo].any() and not newly[:, lo + 8:].any()  # Only the current block.
    committed = previous != tokenizer.MASK_ID
    np.testing.assert_array_equal(tokens[committed], previous[committed])
    previous = tokens
  assert not (result.tokens == tokenizer.MASK_ID).any()
  np.testing.assert_array_equal(result.tokens[:, :10], prompt)


def test_greedy_generation_is_deterministic_and_sampling_varies():
  model = _model(3)
  prompt = np.random.randint(0, 256, (1, 8))
  cfg = SamplerConfig(gen_length=16, steps=8, block_length=8)
  a = generate(model, prompt, cfg, rng=jax.random.key(1)).tokens
  b = generate(model, prompt, cfg, rng=jax.random.key(2)).tokens
  np.testing.assert_array_equal(a, b)
  hot = SamplerConfig(gen_length=16, steps=8, block_length=8, temperature=5.0, top_p=0.99)
  c = generate(model, prompt, hot, rng=jax.random.key(1)).tokens
  d = generate(model, prompt, hot, rng=jax.random.key(2)).tokens
  assert not np.array_equal(c, d)


def test_top_p_restricts_to_nucleus():
  logits = jnp.log(jnp.array([[[0.6, 0.3, 0.05, 0.05]]]))
  x = jnp.full((1, 1), 9)
  cfg = SamplerConfig(gen_length=4, steps=4, block_length=4, temperature=1.0, top_p=0.8,
                      mask_id=9)
  picks = {int(denoise_step(logits, x, 0, 1, 1, jax.random.key(i), cfg)[0, 0]) for i in range(64)}
  assert picks == {0, 1}


@pytest.mark.parametrize("kwargs, message", [
    (dict(gen_length=30, block_length=8), "multiple of block_length"),
    (dict(gen_length=32, block_length=8, steps=6), "divisible by the number of blocks"),
    (dict(gen_length=8, block_length=8, steps=16), "exceed block_length"),
])
def test_bad_sampler_config(kwargs, message):
  with pytest.raises(ValueError, match=message):
    SamplerConfig(**kwargs)


def test_nonsense_token_ids_are_refused():
  """A mask id outside the vocabulary (300 of 260) gave NaN logits and 'generated' 300s;
  out-of-range prompt ids gathered NaN embeddings."""
  model = _model()
  with pytest.raises(ValueError, match="mask_id=300 is not a token"):
    generate(model, np.zeros((1, 4), np.int32), SamplerConfig(gen_length=16, steps=16,
                                                              block_length=16, mask_id=300))
  with pytest.raises(ValueError, match="mask_id must be"):
    SamplerConfig(mask_id=-1)
  with pytest.raises(ValueError, match=r"prompt token ids must be in \[0, 260\)"):
    generate(model, np.full((1, 4), 260, np.int32), SamplerConfig(gen_length=16, steps=16,
                                                                   block_length=16))
  with pytest.raises(ValueError, match="token ids must be in"):
    model(jnp.full((1, 4), -1, jnp.int32))


def test_prompt_longer_than_context_is_refused():
  with pytest.raises(ValueError, match="exceed the model's context"):
    generate(_model(), np.zeros((1, 90), np.int32), SamplerConfig(gen_length=16, steps=16,
                                                                   block_length=16))


def test_sampler_never_commits_the_mask_token():
  cfg = SamplerConfig(gen_length=4, steps=4, block_length=4)
  logits = jnp.zeros((1, 4, 260)).at[..., tokenizer.MASK_ID].set(10.0)  # Mask is the argmax.
  x = jnp.full((1, 4), tokenizer.MASK_ID)
  out = denoise_step(logits, x, 0, 4, 1, jax.random.key(0), cfg)
  assert int((out != tokenizer.MASK_ID).sum()) == 1

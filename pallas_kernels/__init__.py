"""Framework-free kernels (jax + Pallas only, no Flax)."""

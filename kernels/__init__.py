"""Pallas SSD kernels (installed as ssm_jax.kernels)."""

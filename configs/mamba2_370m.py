"""Mamba-2 370m architecture (d_model 1024, 48 layers, 32 heads) trained from scratch.

    python train.py --config=configs/mamba2_370m.py --workdir=/tmp/mamba2_370m

Learning rate: 5x the GPT-3 value of the same size, as in the Mamba papers; see
ssm_jax.train_config.public_size_config for the rest of the recipe.
"""

from ssm_jax.train_config import public_size_config


def get_config():
    return public_size_config(d_model=1024, n_layer=48, lr=1.5e-3, grad_accum_steps=16, fsdp=False, remat=True)

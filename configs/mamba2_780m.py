"""Mamba-2 780m architecture (d_model 1536, 48 layers, 48 heads) trained from scratch.

    python train.py --config=configs/mamba2_780m.py --workdir=/tmp/mamba2_780m

Learning rate: 5x the GPT-3 value of the same size, as in the Mamba papers; see
ssm_jax.train_config.public_size_config for the rest of the recipe.
"""

from ssm_jax.train_config import public_size_config


def get_config():
    return public_size_config(d_model=1536, n_layer=48, lr=1.25e-3, grad_accum_steps=16, fsdp=True, remat=True)

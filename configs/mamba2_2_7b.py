"""Mamba-2 2.7b architecture (d_model 2560, 64 layers, 80 heads) trained from scratch.

    python train.py --config=configs/mamba2_2_7b.py --workdir=/tmp/mamba2_2_7b

Learning rate: 5x the GPT-3 value of the same size, as in the Mamba papers; see
ssm_jax.train_config.public_size_config for the rest of the recipe.
"""

from ssm_jax.train_config import public_size_config


def get_config():
    return public_size_config(d_model=2560, n_layer=64, lr=8e-4, grad_accum_steps=32, fsdp=True, remat=True)

"""Mamba-2 1.3b architecture (d_model 2048, 48 layers, 64 heads) trained from scratch.

    python train.py --config=configs/mamba2_1_3b.py --workdir=/tmp/mamba2_1_3b

Learning rate: 5x the GPT-3 value of the same size, as in the Mamba papers; see
ssm_jax.train_config.public_size_config for the rest of the recipe.
"""

from ssm_jax.train_config import public_size_config


def get_config():
    return public_size_config(d_model=2048, n_layer=48, lr=1e-3, grad_accum_steps=32, fsdp=True, remat=True)

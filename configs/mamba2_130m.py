"""Mamba-2 130m architecture (d_model 768, 24 layers, 24 heads) trained from scratch.

    python train.py --config=configs/mamba2_130m.py --workdir=/tmp/mamba2_130m

Learning rate: 5x the GPT-3 value of the same size, as in the Mamba papers; see
ssm_jax.train_config.public_size_config for the rest of the recipe.
"""

from ssm_jax.train_config import public_size_config


def get_config():
    return public_size_config(d_model=768, n_layer=24, lr=3e-3, grad_accum_steps=8, fsdp=False, remat=False)

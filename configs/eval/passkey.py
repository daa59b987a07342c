"""A passkey retrieval sweep: 10 depth buckets x context lengths from T_train / 2 to 64 T_train.

python eval.py --config=configs/eval/passkey.py --config.checkpoint=<dir>
"""

from ssm_jax.train_config import load_sibling_config


def get_config():
    c = load_sibling_config(__file__)
    c.modes = "passkey"
    c.passkey.context_lengths = "0.5x,1x,2x,4x,8x,16x,32x,64x"
    c.passkey.trials = 4
    c.passkey.chunk_len = 8192
    return c

"""Default: a small byte-level Mamba-2 on the bundled Shakespeare corpus (trains in minutes on a CPU).

python train.py --config=configs/default.py --workdir=/tmp/run_default
"""

from ssm_jax.train_config import base_config


def get_config():
    config = base_config()
    config.model.update(d_model=128, n_layer=2, headdim=64, d_state=32, chunk_size=64, vocab_size=257, dtype="float32", param_dtype="float32")
    config.data.update(corpus="shakespeare", tokenizer="byte", mode="packed", seq_len=256)
    config.train.update(batch_size=16, num_steps=300, log_every=10)
    config.optim.update(lr=3e-3, schedule="wsd", warmup_steps=50, decay_fraction=0.3)
    config.eval.update(every_steps=100, num_batches=16)
    config.checkpoint.update(every_steps=100, max_to_keep=2)
    return config

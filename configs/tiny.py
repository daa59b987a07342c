"""A tiny model on the tiny corpus: smoke runs and tests (seconds on a CPU).

python train.py --config=configs/tiny.py --workdir=/tmp/run_tiny
"""

from ssm_jax.train_config import base_config


def get_config():
    config = base_config()
    config.model.update(d_model=32, n_layer=1, headdim=16, d_state=16, chunk_size=16, vocab_size=257, dtype="float32")
    config.data.update(corpus="tiny", tokenizer="byte", mode="packed", seq_len=64, num_threads=1, prefetch_buffer_size=2)
    config.train.update(batch_size=4, num_steps=12, log_every=1, progress_bar=False)
    config.optim.update(lr=3e-3, schedule="wsd", warmup_steps=2, decay_fraction=0.25)
    config.eval.update(every_steps=6, num_batches=2)
    config.checkpoint.update(every_steps=4, max_to_keep=2, async_save=True)
    config.log.update(tensorboard=False, plot=False)
    return config

"""The state-collapse study (docs/RESULTS.md, arXiv 2410.07145 sections 3-5): byte-level Mamba-2 models of three
state sizes trained from scratch on the bundled Shakespeare corpus at short training lengths.

    python train.py --config=configs/collapse_study.py:m --config.data.seq_len=128 --workdir=runs/collapse/m_T128

The size is the config argument (``s``, ``m``, ``l``); ``data.seq_len`` is T_train. Every size uses the
public checkpoints' head shape (headdim 64, d_state 128, expand 2) so that the state size
``N_S = layers * heads * 64 * 128`` grows with depth and width as in the paper's small models:

* ``s``: 4 layers, d_model 256 (8 heads): N_S = 262,144 (0.26M)
* ``m``: 6 layers, d_model 512 (16 heads): N_S = 786,432 (0.79M; the paper's 36.4M architecture)
* ``l``: 12 layers, d_model 512 (16 heads): N_S = 1,572,864 (1.57M; the paper's 47.0M architecture)

Every run sees the same number of tokens (``tokens_per_step`` x ``num_steps`` = 39.3M, about 8.7 epochs of
the training split): the batch is ``tokens_per_step / seq_len`` sequences, so shorter T_train means more
sequences per step, not fewer tokens. The paper's recipe otherwise (arXiv 2410.07145 section 6): AdamW (weight
decay 0.1, clip 1.0), warmup-stable-decay, bf16 compute with float32 master weights.
"""

from ssm_jax.train_config import base_config

SIZES = {
    "s": dict(d_model=256, n_layer=4),
    "m": dict(d_model=512, n_layer=6),
    "l": dict(d_model=512, n_layer=12),
}
TOKENS_PER_STEP = 65536
NUM_STEPS = 600


def get_config(size: str = "m"):
    if size not in SIZES:
        raise ValueError(f"configs/collapse_study.py: size {size!r} is not one of {', '.join(SIZES)}")
    config = base_config()
    config.model.update(
        **SIZES[size],
        vocab_size=257,
        pad_vocab_size_multiple=1,
        headdim=64,
        d_state=128,
        expand=2,
        ngroups=1,
        d_conv=4,
        chunk_size=64,
        dtype="bfloat16",
        param_dtype="float32",
    )
    config.data.update(corpus="shakespeare", tokenizer="byte", mode="packed", seq_len=128, num_threads=4)
    # batch_size = TOKENS_PER_STEP // seq_len is set by the study driver (experiments/collapse_study.py);
    # the default matches seq_len 128.
    config.train.update(batch_size=TOKENS_PER_STEP // 128, num_steps=NUM_STEPS, log_every=50, progress_bar=False)
    config.optim.update(lr=1.5e-3, schedule="wsd", warmup_steps=60, decay_fraction=0.2, decay_shape="sqrt", weight_decay=0.1, clip_norm=1.0)
    config.eval.update(every_steps=0, num_batches=8, batch_size=64)
    config.checkpoint.update(every_steps=NUM_STEPS, max_to_keep=1)
    return config

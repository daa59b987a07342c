"""One training run of the state-collapse study (docs/RESULTS.md): a from-scratch model of the paper's small
sizes (Chen et al., arXiv 2410.07145, section 5) on the Linux-kernel token corpus at one training length.

    python train.py --config=configs/proj/state_collapse/train.py:47m,1024 --workdir=runs/state_collapse/47m_T1024

The argument is ``<size>,<T_train>[,<steps>]``: size ``47m`` (12 layers, d_model 512, 16 heads of dim 64, d_state 128:
N_S = 1.57M state elements) or ``85m`` (12 layers, d_model 768, 24 heads: N_S = 2.36M), or ``tiny`` (2 layers,
d_model 64: the CPU smoke test of the study driver); T_train is
``data.seq_len``. Every run sees ``TOKENS_PER_STEP`` tokens per optimizer step (``65536 / T_train`` rows) for
``steps`` optimizer steps (default ``NUM_STEPS``: 151M tokens, whatever T_train), with ``NUM_CHECKPOINTS``
checkpoints evenly spaced (the study evaluates each: collapse over training). The corpus (``data.tokens_dir``) is the directory written
by ``python -m ssm_jax.data.linux_corpus``; documents are read in concat mode (files joined by EOS, the state
carried across them), so every training window holds T_train tokens of context.

Recipe (the paper's section 6): AdamW (b2 0.95, weight decay 0.1, not on norms, biases, A_log, D, dt_bias),
clip 1.0, warmup-stable-decay (100 warmup steps, the last 20% decayed with a square-root shape), bf16
compute with float32 master weights. The peak learning rate is the winner of the study's learning-rate
check (``experiments/state_collapse.py``, docs/results/state_collapse.json).
"""

from ssm_jax.train_config import paper_small_config

SIZES = {"47m": (512, 12), "85m": (768, 12), "tiny": (64, 2)}
TOKENS_PER_STEP = 65_536
NUM_STEPS = 2304
NUM_CHECKPOINTS = 8
PEAK_LR = 2e-3


def parse_arg(arg: str) -> tuple[str, int, int]:
    """``"47m,1024"`` -> ``("47m", 1024, NUM_STEPS)``, ``"47m,256,2880"`` -> ``("47m", 256, 2880)``; errors name
    the accepted values."""
    parts = arg.split(",")
    if len(parts) not in (2, 3) or parts[0] not in SIZES or not all(p.isdigit() for p in parts[1:]):
        raise ValueError(
            f"configs/proj/state_collapse/train.py: argument {arg!r} must be '<size>,<T_train>[,<steps>]' "
            f"with size one of {', '.join(SIZES)}, T_train a power of two dividing {TOKENS_PER_STEP} and "
            f"steps a multiple of {NUM_CHECKPOINTS}"
        )
    train_len = int(parts[1])
    num_steps = int(parts[2]) if len(parts) == 3 else NUM_STEPS
    if train_len < 1 or TOKENS_PER_STEP % train_len or train_len & (train_len - 1):
        raise ValueError(f"configs/proj/state_collapse/train.py: T_train={train_len} must be a power of two dividing {TOKENS_PER_STEP}")
    if num_steps < NUM_CHECKPOINTS or num_steps % NUM_CHECKPOINTS:
        raise ValueError(
            f"configs/proj/state_collapse/train.py: steps={num_steps} must be a positive multiple of "
            f"{NUM_CHECKPOINTS} (the checkpoints are evenly spaced)"
        )
    return parts[0], train_len, num_steps


def get_config(arg: str = "47m,1024"):
    size, train_len, num_steps = parse_arg(arg)
    checkpoint_every = num_steps // NUM_CHECKPOINTS
    d_model, n_layer = SIZES[size]
    config = paper_small_config(d_model=d_model, n_layer=n_layer, lr=PEAK_LR)
    config.model.update(chunk_size=min(256, train_len))
    config.data.update(corpus="tokens", tokens_dir="data/linux-6.1", tokenizer="neox", mode="concat", seq_len=train_len, num_threads=4)
    config.train.update(
        batch_size=TOKENS_PER_STEP // train_len,
        num_steps=num_steps,
        grad_accum_steps=1,
        log_every=32,
        loss_chunk_size=min(1024, train_len),
        progress_bar=False,
    )
    config.optim.update(warmup_steps=100, decay_fraction=0.2, decay_shape="sqrt")
    config.eval.update(every_steps=checkpoint_every, num_batches=8, batch_size=max(1, TOKENS_PER_STEP // train_len // 2))
    config.checkpoint.update(every_steps=checkpoint_every, max_to_keep=NUM_CHECKPOINTS, async_save=True)
    config.log.update(tensorboard=False)
    return config

"""Evaluation of one run of the state-collapse study (docs/RESULTS.md), by the paper's rule (Chen et al., arXiv
2410.07145, section 4) made robust: 32 held-out prompts streamed to max(64 T_train, 256K) tokens with the
conv and SSM state carried, buckets of max(128, T_train / 8) tokens, the reference the largest bucket loss
within T_train after the first bucket, collapse a loss above twice that.

    python eval.py --config=configs/proj/state_collapse/eval.py:1024,final \\
        --config.checkpoint=runs/state_collapse/47m_T1024 --config.output_dir=runs/state_collapse/47m_T1024/eval_final

The argument is ``<T_train>,<part>[,smoke]``:

* ``final``: the latest checkpoint on the held-out Linux directories (each prompt row streams one
  directory's files in order), no mitigation, and the state diagnostics (first-token retention per head,
  state-norm growth);
* ``mitigations``: the same prompts with each mitigation of the paper's section 4 (the study runs it on the
  models that collapse);
* ``extra``: the latest checkpoint, no mitigation, on the paper's newlines prompt and on the bundled
  natural-language corpora (Shakespeare, KJV): text of another kind than the code the models trained on;
* ``history``: the checkpoint of ``config.steps`` (the study driver evaluates every saved one as it appears),
  no mitigation, 16 of the held-out prompts and the state diagnostics: whether collapse appears as training
  goes on;
* ``smoke`` (added to any of them): tiny lengths, for the CPU test of the study driver.

The evaluation is in bfloat16, as the models trained.
"""

from ssm_jax.evaluators.config import base_config

PARTS = ("final", "mitigations", "extra", "history")
NUM_PROMPTS = 32
MIN_LENGTH = 262_144  # tokens: every prompt reaches at least 256K, and at least 64 T_train


def parse_arg(arg: str) -> tuple[int, str, bool]:
    """``"1024,final"`` -> ``(1024, "final", False)``; errors name what is accepted."""
    parts = arg.split(",")
    smoke = parts[-1] == "smoke"
    if smoke:
        parts = parts[:-1]
    if len(parts) != 2 or not parts[0].isdigit() or int(parts[0]) < 1 or parts[1] not in PARTS:
        raise ValueError(
            f"configs/proj/state_collapse/eval.py: argument {arg!r} must be '<T_train>,<part>[,smoke]' "
            f"with T_train a positive integer and part one of {', '.join(PARTS)}"
        )
    return int(parts[0]), parts[1], smoke


def get_config(arg: str = "1024,final"):
    train_len, part, smoke = parse_arg(arg)
    c = base_config()
    c.dtype = "bfloat16"
    c.train_len = train_len
    c.loss.num_prompts = NUM_PROMPTS
    c.loss.length = str(max(64 * train_len, MIN_LENGTH))
    c.loss.batch_size = 16  # prompts streamed together: 16 x 2048 tokens of logits over the NeoX vocabulary
    c.loss.chunk_len = 2048
    c.loss.num_buckets = 64
    c.loss.bucket_width = max(128, train_len // 8)
    c.states.length = "16x"  # retention is reported at T_train and at 16 T_train
    c.states.num_prompts = 2
    c.state_norm.num_prompts = 8
    if part == "final":
        c.modes = "loss_vs_position,states"
        c.mitigations = "none"
        c.loss.sources = "documents"
    elif part == "mitigations":
        c.modes = "loss_vs_position"
        c.mitigations = "forget_more,dt_scale,state_norm,sliding_window"
        c.loss.sources = "documents"
    elif part == "extra":
        c.modes = "loss_vs_position"
        c.mitigations = "none"
        c.loss.sources = "newlines,shakespeare,kjv"
        c.loss.num_prompts = 8
    else:
        c.modes = "loss_vs_position,states"
        c.mitigations = "none"
        c.loss.sources = "documents"
        c.loss.num_prompts = 16
    if smoke:
        c.loss.num_prompts = c.loss.batch_size = 2
        c.loss.length = "8x"
        c.loss.num_buckets = 16
        c.loss.chunk_len = 256
        c.loss.bucket_width = max(1, train_len // 4)
        c.states.length = "2x"
        c.state_norm.num_prompts = 2
    return c

"""Default evaluation: loss vs position (to 64x the training length) and a passkey sweep, with every
training-free mitigation, on the model of a train.py work directory.

    python eval.py --config=configs/eval/default.py --config.checkpoint=<train workdir>

Sized for the small byte-level default model on a 2-core CPU (well under 3 minutes). Lengths may be
absolute ("65536") or multiples of the training length ("64x"). Other configs in this directory start
from this one: loss_vs_position.py (1M tokens), passkey.py (a full sweep), capacity.py (the study).
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # What to evaluate.
    c.checkpoint = ""  # train.py workdir | from_pretrained dir (config.json + weights) | "random"
    c.step = -1  # checkpoint step of a workdir; -1: the latest
    c.tokenizer = ""  # "byte" | "neox"; "": from the training config, else from the vocabulary size
    c.train_len = 0  # training length; 0: from the training config (else 2048, the public checkpoints')
    c.dtype = "float32"
    c.random_model = ml_collections.ConfigDict(  # only for checkpoint="random" (smoke tests)
        dict(d_model=64, n_layer=2, vocab_size=257, d_state=16, headdim=32, chunk_size=64))
    c.output_dir = ""  # "": <checkpoint>/eval
    c.modes = "loss_vs_position,passkey"  # any of loss_vs_position, passkey, states, capacity
    c.seed = 0

    # One curve / heatmap per entry; "a+b" composes mitigations.
    c.mitigations = "none,forget_more,dt_scale,state_norm,sliding_window"
    c.forget_more = ml_collections.ConfigDict(dict(alpha_scale=0.9999, b_scale=0.75))
    c.dt_scale = ml_collections.ConfigDict(dict(scale=0.5))
    # Threshold per layer and head: margin x the largest state norm seen on `num_prompts` held-out prompts
    # of the training length (ssm_jax.diagnostics.calibrate_state_norm; reduce "max" or "final").
    c.state_norm = ml_collections.ConfigDict(dict(margin=1.0, reduce="max", num_prompts=2))
    c.sliding_window = ml_collections.ConfigDict(dict(window=0))  # 0: the training length

    # Held-out documents; "" / -1: taken from the training config when there is one.
    c.data = ml_collections.ConfigDict(dict(corpus="", validation_fraction=-1.0, split_seed=-1, local_data_dir="",
                                            local_name=""))

    c.loss = ml_collections.ConfigDict()
    c.loss.sources = "documents"  # documents | newlines (the paper's prompt of newline characters)
    c.loss.length = "64x"  # prompt length in tokens, or a multiple of the training length
    c.loss.num_prompts = 4
    c.loss.batch_size = 4  # prompts streamed together (all have the same length)
    c.loss.chunk_len = 4096
    c.loss.num_buckets = 48  # log-spaced position buckets of the curves

    c.passkey = ml_collections.ConfigDict()
    c.passkey.context_lengths = "0.5x,1x,2x,4x,8x"  # lengths below the shortest prompt are skipped
    c.passkey.num_depths = 10
    c.passkey.trials = 1  # prompts per (depth bucket, context length)
    c.passkey.batch_size = 8  # prompts of equal token length decoded together
    c.passkey.max_new_tokens = 0  # 0: 10 for the byte tokenizer, 6 for NeoX
    c.passkey.chunk_len = 4096

    c.states = ml_collections.ConfigDict()  # mode "states": state-norm diagnostics on one held-out prompt
    c.states.length = "64x"
    c.states.every = 0  # record interval in tokens; 0: T_train / 8
    c.states.outlier_ratio = 4.0  # a head is an outlier when its norm exceeds this x its max within T_train

    c.capacity = ml_collections.ConfigDict()
    c.capacity.runs = ""  # comma-separated evaluation output dirs or globs (each with its JSON files)
    c.capacity.mitigation = "none"
    c.capacity.source = "documents"
    return c

"""Fine-tune a trained model on the synthetic passkey task (arXiv 2410.07145 section 6).

    python train.py --config=configs/passkey_finetune.py:/tmp/run_default --workdir=/tmp/run_passkey

The argument after ':' is the train.py workdir to start from (its latest checkpoint; or set
``--config.init.workdir`` / ``--config.init.step``); ``--config.init.pretrained=DIR`` starts from a
state-spaces / Hugging Face checkpoint instead (e.g. a public Mamba-2; then the tokenizer is GPT-NeoX).
The architecture and the tokenizer come from the source. Examples: the passkey prompt with a random 5-digit
key at a random depth and a random length up to ``data.passkey_max_context`` tokens, the loss on the
answer digits only; validation reports the loss and the per-digit accuracy.
"""

from ssm_jax.train_config import base_config


def get_config(init_workdir: str = ""):
    config = base_config()
    config.init.update(workdir=init_workdir, required=True)
    config.data.update(mode="passkey", seq_len=1024, passkey_min_context=64, passkey_max_context=1024)
    config.train.update(batch_size=8, num_steps=300, log_every=10)
    config.optim.update(lr=5e-4, schedule="wsd", warmup_steps=20, decay_fraction=0.2, weight_decay=0.0)
    config.eval.update(every_steps=100, num_batches=4)
    config.checkpoint.update(every_steps=100, max_to_keep=2)
    return config

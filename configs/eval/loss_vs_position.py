"""Loss vs position to 1M tokens on held-out documents and on the paper's newlines prompt.

python eval.py --config=configs/eval/loss_vs_position.py --config.checkpoint=<dir>
"""

from ssm_jax.train_config import load_sibling_config


def get_config():
    c = load_sibling_config(__file__)
    c.modes = "loss_vs_position"
    c.loss.sources = "documents,newlines"
    c.loss.length = "1048576"
    c.loss.num_prompts = 4
    c.loss.batch_size = 4
    c.loss.chunk_len = 8192
    c.loss.num_buckets = 64
    return c

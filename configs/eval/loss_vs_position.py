"""Loss vs position to 1M tokens on held-out documents and on the paper's newlines prompt.

    python eval.py --config=configs/eval/loss_vs_position.py --config.checkpoint=<dir>
"""

import importlib.util
import os


def _default():
    """configs/eval/default.py, loaded by path so that this file works from any working directory."""
    spec = importlib.util.spec_from_file_location("eval_default_config", os.path.join(os.path.dirname(__file__), "default.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config():
    c = _default().get_config()
    c.modes = "loss_vs_position"
    c.loss.sources = "documents,newlines"
    c.loss.length = "1048576"
    c.loss.num_prompts = 4
    c.loss.batch_size = 4
    c.loss.chunk_len = 8192
    c.loss.num_buckets = 64
    return c

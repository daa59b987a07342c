"""A passkey retrieval sweep: 10 depth buckets x context lengths from T_train / 2 to 64 T_train.

    python eval.py --config=configs/eval/passkey.py --config.checkpoint=<dir>
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
    c.modes = "passkey"
    c.passkey.context_lengths = "0.5x,1x,2x,4x,8x,16x,32x,64x"
    c.passkey.trials = 4
    c.passkey.chunk_len = 8192
    return c

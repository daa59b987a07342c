"""The state-capacity study (PAPER.md section 5) over finished evaluations.

Evaluate each trained model (state sizes x training lengths) with loss_vs_position (streaming far past
its training length) and passkey, then:

    python eval.py --config=configs/eval/capacity.py --config.capacity.runs='runs/*/eval' \
        --config.output_dir=capacity_study

T_forget per state size = the smallest training length whose run does not collapse; T_recall = the
largest context length with passkey accuracy above 95%; fits and the paper's fits go to capacity.png.
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
    c.modes = "capacity"
    c.capacity.runs = ""
    c.output_dir = "capacity_study"
    return c

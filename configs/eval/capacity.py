"""The state-capacity study (arXiv 2410.07145; docs/background.md) over finished evaluations.

Evaluate each trained model (state sizes x training lengths) with loss_vs_position (streaming far past
its training length) and passkey, then:

    python eval.py --config=configs/eval/capacity.py --config.capacity.runs='runs/*/eval' \
        --config.output_dir=capacity_study

T_forget per state size = the smallest training length whose run does not collapse; T_recall = the
largest context length with passkey accuracy above 95%; fits and the paper's fits go to capacity.png.
"""

from ssm_jax.train_config import load_sibling_config


def get_config():
    c = load_sibling_config(__file__)
    c.modes = "capacity"
    c.capacity.runs = ""
    c.output_dir = "capacity_study"
    return c

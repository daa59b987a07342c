"""Default evaluation: loss vs position (to 64x the training length) and a passkey sweep, with every
training-free mitigation, on the model of a train.py work directory.

    python eval.py --config=configs/eval/default.py --config.checkpoint=<train workdir>

Sized for the small byte-level default model on a 2-core CPU (a few minutes). Every field, its default
and what it accepts: ssm_jax/evaluators/config.py. Other configs in this directory start from this one:
loss_vs_position.py (1M tokens), passkey.py (a full sweep), capacity.py (the study).
"""

from ssm_jax.evaluators.config import base_config


def get_config():
    return base_config()

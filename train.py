"""Trains a Mamba-2 language model.

    python train.py --config=configs/default.py --workdir=/tmp/run_default
    python train.py --config=configs/default.py --workdir=/tmp/run --config.train.num_steps=100

Every config field can be overridden with ``--config.<section>.<field>=<value>`` (see
ssm_jax/train_config.py). Re-running with the same workdir resumes from its latest checkpoint.
"""

import os

from absl import app, flags, logging
from ml_collections import config_flags

from ssm_jax import train_lib

_DEFAULT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "default.py")
_CONFIG = config_flags.DEFINE_config_file("config", _DEFAULT, "Training config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and plots.", required=True)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:  # orbax logs every file operation at INFO
        logging.set_verbosity(logging.WARNING)
    train_lib.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)

"""Evaluate a Mamba-2 model: loss vs position, passkey retrieval, state diagnostics, state capacity.

    python eval.py --config=configs/eval/default.py --config.checkpoint=<train workdir or from_pretrained dir>
    python eval.py --config=configs/eval/loss_vs_position.py --config.checkpoint=<dir> --config.mitigations=none,forget_more
    python eval.py --config=configs/eval/default.py --config.checkpoint=<train workdir> --config.steps=1000,2000,-1
    python eval.py --config=configs/eval/capacity.py --config.capacity.runs='runs/*/eval'

Writes JSON, PNG and summary.md into --config.output_dir (default <checkpoint>/eval; one step_<n>/ per
checkpoint step when several are given) and prints the summary. The fields are described in
ssm_jax/evaluators/config.py.
"""

from absl import app
from absl import logging
from ml_collections import config_flags

from ssm_jax import evaluators

_CONFIG = config_flags.DEFINE_config_file("config", "configs/eval/default.py", "Evaluation config file.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.INFO)
    results = evaluators.evaluate(_CONFIG.value)
    print(results["summary"])
    print(f"Results written to {results['output_dir']}")


if __name__ == "__main__":
    app.run(main)

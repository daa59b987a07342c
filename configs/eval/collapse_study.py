"""Evaluation of one model of the state-collapse study (docs/RESULTS.md): loss vs position to 64x the
training length on held-out documents and on the paper's newlines prompt, every training-free mitigation,
and the state-norm diagnostics of one held-out prompt.

    python eval.py --config=configs/eval/collapse_study.py --config.checkpoint=runs/collapse/m_T128

Passkey retrieval is left out: byte-level models of this size retrieve no passkey even inside their
training length (the default evaluation measures 0.00 at every length).
"""

from ssm_jax.train_config import load_sibling_config


def get_config():
    c = load_sibling_config(__file__)
    c.modes = "loss_vs_position,states"
    c.loss.sources = "documents,newlines"
    c.loss.length = "64x"
    c.loss.num_prompts = 8
    c.loss.batch_size = 8
    c.loss.chunk_len = 8192
    c.loss.num_buckets = 48
    c.states.length = "64x"
    return c

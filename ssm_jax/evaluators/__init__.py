"""Evaluation of Mamba-2 models for state collapse and state capacity (arXiv 2410.07145; docs/background.md).

One module per evaluation mode, each behind the interface of :mod:`ssm_jax.evaluators.base`
(``run(model, config) -> dict``, ``summarize(result)``, ``NEEDS_MODEL``):

* :mod:`~ssm_jax.evaluators.loss_vs_position`: per-token loss far past ``T_train``, the collapse verdict;
* :mod:`~ssm_jax.evaluators.passkey`: passkey retrieval per needle depth and context length;
* :mod:`~ssm_jax.evaluators.states`: state norms and first-token retention per layer and head;
* :mod:`~ssm_jax.evaluators.capacity`: T_forget / T_recall and their laws over earlier evaluations.

Shared parts, one job each: :mod:`~ssm_jax.evaluators.config` (fields and validation),
:mod:`~ssm_jax.evaluators.streams` (held-out text), :mod:`~ssm_jax.evaluators.buckets` (losses bucketed
while streaming), :mod:`~ssm_jax.evaluators.named_mitigations`, :mod:`~ssm_jax.evaluators.summary` and
:mod:`~ssm_jax.evaluators.runner` (:func:`evaluate`, what ``eval.py`` calls). Models are loaded by
:mod:`ssm_jax.loading`; results are written with :func:`ssm_jax.io.write_json`.
"""

from ssm_jax.evaluators.runner import evaluate, evaluator

__all__ = ["evaluate", "evaluator"]

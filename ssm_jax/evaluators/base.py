"""The one interface of every evaluator, and what it receives.

An evaluator is a module of :mod:`ssm_jax.evaluators` with

* ``NEEDS_MODEL: bool``: False for evaluators that only read earlier evaluations' outputs (capacity);
* ``run(model: EvalModel | None, config) -> dict``: evaluates ``model`` as ``config`` says, writes its
  files into ``config.output_dir`` (``<mode>.json`` and figures) and returns the JSON-ready result it
  wrote; ``result["files"]`` lists the files, relative to the output directory;
* ``summarize(result) -> list[str]``: the markdown lines of its section of ``summary.md``.

``config`` is the whole validated evaluation config (:mod:`ssm_jax.evaluators.config`): each evaluator
reads its own section (``config.loss``, ``config.passkey``, ``config.states``, ``config.capacity``) and
the shared fields (``seed``, ``output_dir``). ``model`` is an :class:`EvalModel`, built once per
checkpoint by :func:`prepare` and shared by the evaluators, so that what is costly to set up (the
calibration of ``state_norm``) is done once.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Mapping, Optional, Protocol

import numpy as np

from ssm_jax import mitigations as mitigations_lib
from ssm_jax.evaluators.config import parse_list
from ssm_jax.evaluators.named_mitigations import MITIGATION_NAMES, build_mitigations
from ssm_jax.evaluators.streams import HeldOutData, make_stream
from ssm_jax.loading import LoadedModel

__all__ = ["EvalModel", "Evaluator", "prepare"]


@dataclasses.dataclass(frozen=True)
class EvalModel:
    """What every evaluator evaluates.

    Attributes:
      loaded: the model, its tokenizer, ``T_train`` and where it comes from (:mod:`ssm_jax.loading`).
      data: the held-out documents (the training split unless the config overrides it).
      mitigations: ``{name: Mitigation or None}`` to compare, in the config's order ("none" is None).
      mitigation_params: ``{name: {part: parameters}}``, as built (state_norm: its calibrated thresholds).
    """

    loaded: LoadedModel
    data: HeldOutData
    mitigations: Mapping[str, Optional[mitigations_lib.Mitigation]]
    mitigation_params: Mapping[str, Dict[str, Any]]

    @property
    def train_len(self) -> int:
        return self.loaded.train_len

    def describe(self) -> Dict[str, Any]:
        """The model's description (:meth:`LoadedModel.describe`) with the held-out data it is evaluated on."""
        return dict(self.loaded.describe(), heldout=dataclasses.asdict(self.data))


class Evaluator(Protocol):
    """The interface each evaluator module satisfies (see the module docstring)."""

    NEEDS_MODEL: bool

    def run(self, model: Optional[EvalModel], config: Any) -> Dict[str, Any]: ...

    def summarize(self, result: Mapping[str, Any]) -> List[str]: ...


def prepare(loaded: LoadedModel, data: HeldOutData, config: Any) -> EvalModel:
    """The :class:`EvalModel` of ``loaded`` evaluated on ``data`` (:func:`ssm_jax.evaluators.streams.resolve_data`):
    builds the mitigations of ``config.mitigations``, state_norm calibrated on ``config.state_norm.num_prompts``
    held-out prompts of ``T_train`` tokens."""

    def calibration_tokens() -> np.ndarray:
        n = int(config.state_norm.num_prompts)
        stream = make_stream("documents", loaded.tokenizer, data, num_rows=n, seed=config.seed + 12345)
        return stream.take(list(range(n)), loaded.train_len + 1)  # (n, T_train + 1)

    params = {name: config[name].to_dict() for name in MITIGATION_NAMES[1:]}
    built, described = build_mitigations(
        parse_list(config.mitigations), loaded.model, train_len=loaded.train_len, params=params, calibration_tokens=calibration_tokens
    )
    return EvalModel(loaded=loaded, data=data, mitigations=built, mitigation_params=described)

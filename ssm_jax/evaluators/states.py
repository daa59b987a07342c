"""Evaluator ``states``: the paper's state diagnostics on held-out documents streamed past ``T_train``.

``config.states.num_prompts`` held-out prompts of ``config.states.length`` tokens are streamed without
mitigation (:func:`ssm_jax.diagnostics.record_states`), recording every ``every`` tokens (a divisor of
``T_train``), per layer and head, averaged over the prompts:

* the state norm, and each head's growth beyond ``T_train``: peak (largest after / largest within)
  and sustained (median over the second half / median within), :func:`ssm_jax.diagnostics.state_norm_growth`;
  the heads whose norm exceeds ``outlier_ratio`` x its largest within ``T_train``;
* the first-token retention ``prod_j alpha_j`` with ``alpha_j = exp(dt_j A)`` over tokens ``j = 2 .. t``
  (1-based): the factor left on the first token's write in the state after ``t`` tokens, at
  ``t = T_train`` and ``t = 16 T_train`` (the paper's sign of a head that never forgets is a
  retention near 1 over the training length);
* the conv-state norm, which stays stable in the paper.

A second pass traces and snapshots the head of largest sustained growth for the figures
(``states_*.png``). Writes ``states.json``.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Dict, List, Mapping, Optional

import numpy as np

from ssm_jax import diagnostics
from ssm_jax.evaluators.base import EvalModel
from ssm_jax.evaluators.config import parse_length, states_every
from ssm_jax.evaluators.streams import make_stream
from ssm_jax.io import write_json

NEEDS_MODEL = True
RETENTION_MULTIPLES = (1, 16)  # first-token retention is reported at these multiples of T_train
PROMPT_SEED_OFFSET = 777  # the states prompts differ from the loss prompts of the same seed


def retention_at(diag: diagnostics.StateDiagnostics, position: int) -> Optional[Dict[str, Any]]:
    """First-token retention after ``position`` tokens, averaged over the prompts: ``retention`` (mean of
    ``prod alpha``) and ``log_retention`` (mean of its log, readable where the product underflows), each
    ``(layers, heads)``; None when ``position`` is not a record position."""
    hit = np.flatnonzero(diag.positions == position)
    if not hit.size:
        return None
    return {"position": int(position), "retention": diag.retention[hit[0]].mean(axis=0), "log_retention": diag.log_retention[hit[0]].mean(axis=0)}


def run(model: Optional[EvalModel], config: Any) -> Dict[str, Any]:
    """Records the states of ``config.states``; writes ``states.json`` and the diagnostic figures."""
    sc, out_dir, train_len = config.states, config.output_dir, model.train_len
    length, every, n = parse_length(sc.length, train_len), states_every(config, train_len), int(sc.num_prompts)
    stream = make_stream("documents", model.loaded.tokenizer, model.data, num_rows=n, seed=int(config.seed) + PROMPT_SEED_OFFSET)
    tokens = stream.take(list(range(n)), length + 1)  # (prompts, length + 1)
    net = model.loaded.model
    diag = diagnostics.record_states(net, tokens, every=every, trace_heads=())
    inside = diag.positions <= train_len  # (records,)
    norm = diag.norm.mean(axis=1)  # (records, layers, heads), averaged over prompts
    growth = diagnostics.state_norm_growth(norm, diag.positions, train_len)  # (layers, heads) each
    layer, head = (int(i) for i in np.unravel_index(int(np.argmax(growth["sustained"])), growth["sustained"].shape))
    diag = diagnostics.record_states(
        net,
        tokens,
        every=every,
        trace_heads=((layer, head),),
        snapshot_head=(layer, head),
        snapshot_positions=(int(diag.positions[inside][-1]), int(diag.positions[-1])),
    )
    conv = diag.conv_norm.mean(axis=1)  # (records, layers)
    result = {
        "length": length,
        "every": every,
        "train_len": train_len,
        "num_prompts": n,
        "positions": diag.positions,
        "norm": norm,
        "max_abs": diag.max_abs.max(axis=1),
        "conv_norm": conv,
        "norm_within_train": norm[inside].max(axis=0),
        "norm_growth": growth["peak"],
        "max_norm_growth": float(growth["peak"].max()),
        "sustained_norm_growth": growth["sustained"],
        "max_sustained_norm_growth": float(growth["sustained"].max()),
        "most_grown_head": [layer, head],
        "outlier_ratio": float(sc.outlier_ratio),
        "outliers": [dataclasses.asdict(o) for o in diagnostics.detect_state_outliers(diag, train_len, ratio=float(sc.outlier_ratio))],
        "retention_definition": "prod of alpha_j = exp(dt_j A) over tokens j = 2 .. t (1-based), mean over prompts",
        "retention": {f"{k}x": retention_at(diag, k * train_len) for k in RETENTION_MULTIPLES},
        "conv_norm_growth": float(conv[~inside].max() / max(conv[inside].max(), 1e-30)),
        "mean_loss": float(diag.losses.mean()),
        "model": model.describe(),
    }
    pngs = diagnostics.plot_all(diag, out_dir, train_len=train_len, prefix="states_")
    result["files"] = ["states.json"] + [os.path.basename(p) for p in pngs]
    write_json(os.path.join(out_dir, "states.json"), result)
    return result


def _retention_line(name: str, r: Optional[Mapping[str, Any]]) -> str:
    if r is None:
        return f"- first-token retention at {name} T_train: not reached by the stream"
    ret = np.asarray(r["retention"], np.float64)  # (layers, heads)
    layer, head = np.unravel_index(int(np.argmax(ret)), ret.shape)
    return (
        f"- first-token retention at {name} T_train (t = {r['position']:,}): largest {ret.max():.4f} "
        f"(layer {layer}, head {head}); heads above 0.5: {int((ret > 0.5).sum())} of {ret.size}"
    )


def summarize(result: Mapping[str, Any]) -> List[str]:
    """Norm growth, outliers, conv-state growth and first-token retention."""
    head = result["most_grown_head"]
    lines = [
        f"## State norms ({result['num_prompts']} held-out prompt(s) of {result['length']:,} tokens, no mitigation)",
        "",
        f"Largest sustained growth of a head's state norm (median over the second half / median within T_train): "
        f"{result['max_sustained_norm_growth']:.2f}x (layer {head[0]}, head {head[1]}); largest peak growth "
        f"(max after / max within T_train): {result['max_norm_growth']:.2f}x; heads whose peak exceeds "
        f"{result['outlier_ratio']:g}x: {len(result['outliers'])}; conv-state norm growth "
        f"{result['conv_norm_growth']:.2f}x.",
        "",
    ]
    lines += [_retention_line(name, r) for name, r in result["retention"].items()]
    return lines + [""]

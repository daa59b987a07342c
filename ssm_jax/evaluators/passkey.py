"""Evaluator ``passkey``: passkey retrieval accuracy per (needle depth, context length) and mitigation.

The paper's prompt (``ssm_jax.data.make_passkey_example``): filler, the passkey line at a depth, more
filler, the question; greedy decoding of a few tokens, correct when the five digits appear. Depth
bucket ``i`` of ``n`` draws the needle depth uniformly in ``[i / n, (i + 1) / n)`` (seeded); every
mitigation answers the same prompts. ``T_recall`` is the longest context length with accuracy above
95% (:func:`ssm_jax.capacity.t_recall`).

Batching: left padding would change an SSM's state, so prompts are grouped by exact token length and
each group runs in batches of one fixed size (``min(batch_size, next power of two of the largest
group)``); short batches are filled by repeating their last prompt (the copies' answers are dropped),
so decoding compiles once per mitigation.

Writes ``passkey.json`` and the heatmaps ``passkey.png``.
"""

from __future__ import annotations

import os
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from absl import logging

from ssm_jax import capacity as capacity_lib
from ssm_jax import inference
from ssm_jax import mitigations as mitigations_lib
from ssm_jax.evaluators.base import EvalModel
from ssm_jax.evaluators.config import parse_lengths
from ssm_jax.evaluators.summary import fmt
from ssm_jax.io import write_json
from ssm_jax.model import Mamba2LM

NEEDS_MODEL = True


def default_max_new_tokens(tokenizer_name: str) -> int:
    """Enough greedy tokens for " 12345": 10 bytes for the byte tokenizer, 6 BPE tokens for NeoX."""
    return 10 if tokenizer_name == "byte" else 6


def make_examples(
    tokenizer: Any, context_lengths: Sequence[int], *, num_depths: int = 10, trials: int = 1, seed: int = 0
) -> Tuple[List[Dict[str, Any]], List[int]]:
    """Seeded prompts for every (context length, depth bucket, trial), and the context lengths skipped
    because they are too short for a prompt."""
    from ssm_jax.data import make_passkey_example

    examples, skipped = [], []
    for length in context_lengths:
        try:
            make_passkey_example(tokenizer, int(length), 0.0, np.random.default_rng(0))
        except ValueError:
            skipped.append(int(length))
            continue
        for d in range(num_depths):
            for trial in range(trials):
                rng = np.random.default_rng([seed, int(length), d, trial])
                depth = float(min((d + rng.uniform()) / num_depths, 1.0))
                ex = make_passkey_example(tokenizer, int(length), depth, rng)
                examples.append(
                    {
                        "context_length": int(length),
                        "depth_bucket": d,
                        "trial": trial,
                        "depth": depth,
                        "passkey": ex.passkey,
                        "prompt_ids": ex.prompt_ids,
                    }
                )
    return examples, skipped


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def answer(
    model: Mamba2LM,
    tokenizer: Any,
    examples: Sequence[Dict[str, Any]],
    *,
    mitigation: Optional[mitigations_lib.Mitigation] = None,
    batch_size: int = 8,
    max_new_tokens: int = 10,
    chunk_len: int = 2048,
) -> List[Dict[str, Any]]:
    """Greedy answers to ``examples`` (batched as in the module docstring): one ``{"generated", "correct",
    "prompt_len"}`` per example, in order."""
    from ssm_jax.data import passkey_is_correct

    by_len: Dict[int, List[int]] = {}
    for i, ex in enumerate(examples):
        by_len.setdefault(len(ex["prompt_ids"]), []).append(i)
    results: List[Dict[str, Any]] = [{} for _ in examples]
    rows = min(int(batch_size), _next_pow2(max((len(v) for v in by_len.values()), default=1)))
    for plen, idxs in sorted(by_len.items()):
        for first in range(0, len(idxs), rows):
            part = idxs[first : first + rows]
            ids = np.stack([examples[i]["prompt_ids"] for i in part + [part[-1]] * (rows - len(part))])  # (rows, plen)
            out = inference.generate(model, ids, max_new_tokens, temperature=0.0, mitigation=mitigation, chunk_len=chunk_len)
            for row, i in enumerate(part):
                text = tokenizer.decode(out[row].tolist())
                results[i] = {"generated": text, "correct": bool(passkey_is_correct(text, examples[i]["passkey"])), "prompt_len": plen}
    return results


def sweep(
    model: EvalModel,
    *,
    context_lengths: Sequence[int],
    num_depths: int = 10,
    trials: int = 1,
    seed: int = 0,
    batch_size: int = 8,
    max_new_tokens: int = 0,
    chunk_len: int = 2048,
) -> Dict[str, Any]:
    """Accuracy per (depth bucket, context length) for each of ``model.mitigations`` on the same prompts."""
    loaded = model.loaded
    max_new_tokens = int(max_new_tokens) or default_max_new_tokens(loaded.tokenizer_name)
    examples, skipped = make_examples(loaded.tokenizer, context_lengths, num_depths=num_depths, trials=trials, seed=seed)
    lengths = sorted({ex["context_length"] for ex in examples})
    result: Dict[str, Any] = {
        "context_lengths": lengths,
        "skipped_context_lengths": skipped,
        "num_depths": num_depths,
        "depth_buckets": [[d / num_depths, (d + 1) / num_depths] for d in range(num_depths)],
        "trials_per_cell": trials,
        "seed": seed,
        "max_new_tokens": max_new_tokens,
        "train_len": loaded.train_len,
        "tokenizer": loaded.tokenizer_name,
        "results": {},
    }
    if skipped:
        logging.warning("passkey: context lengths %s are shorter than the shortest prompt; skipped", skipped)
    for name, mitigation in model.mitigations.items():
        t0 = time.perf_counter()
        answers = answer(
            loaded.model, loaded.tokenizer, examples, mitigation=mitigation, batch_size=batch_size, max_new_tokens=max_new_tokens, chunk_len=chunk_len
        )
        hits = np.zeros((num_depths, len(lengths)))  # (depth buckets, context lengths)
        counts = np.zeros((num_depths, len(lengths)))
        samples = []
        for ex, ans in zip(examples, answers):
            j = lengths.index(ex["context_length"])
            hits[ex["depth_bucket"], j] += ans["correct"]
            counts[ex["depth_bucket"], j] += 1
            samples.append({k: ex[k] for k in ("context_length", "depth_bucket", "depth", "passkey")} | ans)
        by_length = hits.sum(0) / counts.sum(0)  # (context lengths,)
        acc_by_len = {length: float(a) for length, a in zip(lengths, by_length)}
        result["results"][name] = {
            "accuracy": hits / counts,
            "accuracy_by_length": by_length,
            "accuracy_by_depth": hits.sum(1) / counts.sum(1),
            "overall": float(hits.sum() / counts.sum()) if counts.sum() else None,
            "t_recall": capacity_lib.t_recall(acc_by_len),
            "seconds": time.perf_counter() - t0,
            "samples": samples,
        }
        logging.info("passkey/%s: accuracy by length %s (%.1fs)", name, {k: round(v, 3) for k, v in acc_by_len.items()}, time.perf_counter() - t0)
    return result


def run(model: Optional[EvalModel], config: Any) -> Dict[str, Any]:
    """The sweep of ``config.passkey``; writes ``passkey.json`` and ``passkey.png``."""
    from ssm_jax import plots

    pc, out_dir = config.passkey, config.output_dir
    result = sweep(
        model,
        context_lengths=parse_lengths(pc.context_lengths, model.train_len),
        num_depths=int(pc.num_depths),
        trials=int(pc.trials),
        seed=int(config.seed),
        batch_size=int(pc.batch_size),
        max_new_tokens=int(pc.max_new_tokens),
        chunk_len=int(pc.chunk_len),
    )
    result["model"], result["mitigations"] = model.describe(), dict(model.mitigation_params)
    plots.plot_passkey_heatmaps(
        {name: r["accuracy"] for name, r in result["results"].items()},
        result["context_lengths"],
        os.path.join(out_dir, "passkey.png"),
        train_len=model.train_len,
        title="passkey accuracy",
    )
    result["files"] = ["passkey.json", "passkey.png"]
    write_json(os.path.join(out_dir, "passkey.json"), result)
    return result


def summarize(result: Mapping[str, Any]) -> List[str]:
    """Accuracy per context length, overall and T_recall for each mitigation."""
    lengths = result["context_lengths"]
    lines = [
        f"## Passkey retrieval ({result['num_depths']} depth buckets x {result['trials_per_cell']} trials)",
        "",
        "| mitigation | " + " | ".join(f"{n:,}" for n in lengths) + " | overall | T_recall |",
        "|---|" + "---|" * (len(lengths) + 2),
    ]
    for name, r in result["results"].items():
        accs = " | ".join(fmt(float(a), 2) for a in r["accuracy_by_length"])
        lines.append(f"| {name} | {accs} | {fmt(r['overall'], 2)} | {fmt(r['t_recall'])} |")
    return lines + [""]

"""Evaluator ``loss_vs_position``: per-token loss against position far past ``T_train``, and the collapse rule.

For each source (held-out documents, the newlines prompt) and each mitigation, ``config.loss.num_prompts``
prompts of ``config.loss.length`` tokens are streamed with the conv and SSM state carried
(:mod:`ssm_jax.evaluators.buckets`). Per-token losses are averaged over prompts and over

* log-spaced position buckets: the perplexity-vs-position curves (``loss_vs_position_<source>.png``);
* fixed buckets of ``config.loss.bucket_width`` positions: the collapse verdict of
  :func:`ssm_jax.diagnostics.collapse_verdict`, and the first position above the corpus unigram loss
  (a context-free model's loss: ``config.loss.unigram_loss``, or computed per source from the text it
  streams: the held-out documents for ``documents`` and ``newlines``, the whole corpus for ``shakespeare``
  and ``kjv``).

Writes ``loss_vs_position.json`` and ``loss_vs_position_fine.npz`` (the fixed-bucket curves per prompt,
``<source>__<mitigation>: (prompts, buckets)``, and ``fine_width``). Both are rewritten after every curve,
with ``"complete": false`` until the last: an evaluation stopped by a time limit keeps the curves it
finished.
"""

from __future__ import annotations

import math
import os
from typing import Any, Dict, List, Mapping, Optional

import numpy as np
from absl import logging

from ssm_jax import diagnostics
from ssm_jax.evaluators.base import EvalModel
from ssm_jax.evaluators.buckets import BucketedLosses, log_bucket_edges, stream_bucketed_losses
from ssm_jax.evaluators.config import loss_bucket_width, parse_length, parse_list
from ssm_jax.evaluators.streams import make_stream, source_token_documents
from ssm_jax.evaluators.summary import fmt
from ssm_jax.io import write_json

NEEDS_MODEL = True
# A sliding window is computed as a band of (streamed tokens + window) x window terms per row and head, in
# float32 (ssm_jax.ssd): at T_train 8,192, 16 rows of 2,048-token chunks asked for 72 GiB. Windowed curves
# stream fewer rows at a time to stay under this many bytes of band terms per call (the rows are independent,
# so the result is the same).
WINDOW_BAND_BYTES = 8 * 2**30


def windowed_rows_per_call(batch_size: int, chunk_len: int, window: Optional[int], num_heads: int) -> int:
    """The prompts streamed together for a curve whose mitigation keeps a ``window`` (None: ``batch_size``)."""
    if window is None:
        return batch_size
    per_row = 4 * (chunk_len + window) * window * num_heads  # bytes of the band terms of one row
    return max(1, min(batch_size, WINDOW_BAND_BYTES // per_row))


def corpus_unigram_loss(model: EvalModel, source: str = "documents") -> float:
    """The loss (nats/token) of a context-free model of the text ``source`` streams, EOS included: the
    entropy of its unigram distribution."""
    from ssm_jax.data import unigram_entropy_bits_of_tokens

    tok = model.loaded.tokenizer
    docs = source_token_documents(source, tok, model.data)
    return unigram_entropy_bits_of_tokens(docs, tok.vocab_size, tok.eos_id) * math.log(2.0)


def curve_json(b: BucketedLosses, train_len: int, *, factor: float, unigram_loss: float) -> Dict[str, Any]:
    """The JSON record of one curve: log-bucket losses (mean and per prompt) and the collapse verdict."""
    per_prompt = b.log_mean()  # (prompts, log buckets)
    mean = per_prompt.mean(axis=0)  # (log buckets,)
    edges = b.log_edges
    centers = np.sqrt(edges[:-1] * (edges[1:] - 1).clip(min=edges[:-1]))  # geometric bucket centres
    verdict = diagnostics.collapse_verdict(b.fine_mean().mean(axis=0), train_len, width=b.fine_width, factor=factor, unigram_loss=unigram_loss)
    return {
        "positions": centers,
        "loss": mean,
        "perplexity": np.exp(mean),
        "count": b.log_counts,
        "per_prompt_loss": per_prompt,
        "collapse": verdict.to_json(),
        "loss_at_train_len": float(np.interp(np.log(train_len), np.log(centers), mean)),
        "loss_at_end": float(mean[-1]),
        "seconds": b.seconds,
        "tokens_per_second": b.tokens / max(b.seconds, 1e-9),
    }


def _write(out_dir: str, result: Mapping[str, Any], fine_curves: Mapping[str, np.ndarray], width: int) -> None:
    np.savez_compressed(os.path.join(out_dir, "loss_vs_position_fine.npz"), fine_width=width, **fine_curves)
    write_json(os.path.join(out_dir, "loss_vs_position.json"), result)


def run(model: Optional[EvalModel], config: Any) -> Dict[str, Any]:
    """Streams every (source, mitigation); writes the JSON, the npz and one figure per source."""
    from ssm_jax import plots

    lc, out_dir = config.loss, config.output_dir
    train_len = model.train_len
    length, num_prompts = parse_length(lc.length, train_len), int(lc.num_prompts)
    edges = log_bucket_edges(length, int(lc.num_buckets), include=(train_len + 1,))
    width = loss_bucket_width(config, train_len)
    sources = parse_list(lc.sources)
    unigram = {source: float(lc.unigram_loss) or corpus_unigram_loss(model, source) for source in sources}
    result: Dict[str, Any] = {
        "length": length,
        "num_prompts": num_prompts,
        "batch_size": int(lc.batch_size),
        "chunk_len": int(lc.chunk_len),
        "train_len": train_len,
        "bucket_edges": edges,
        "fine_width": width,
        "collapse_factor": float(lc.collapse_factor),
        "unigram_loss": unigram,
        "unigram_loss_source": "config" if lc.unigram_loss else "the text each source streams",
        "position_definition": "t = tokens read before the predicted token (1 .. length)",
        "seed": int(config.seed),
        "model": model.describe(),
        "mitigations": dict(model.mitigation_params),
        "sources": {},
    }
    fine_curves: Dict[str, np.ndarray] = {}
    for source in sources:
        curves = {}
        for name, mitigation in model.mitigations.items():
            stream = make_stream(
                source, model.loaded.tokenizer, model.data, num_rows=num_prompts, seed=int(config.seed)
            )  # the same prompts for every mitigation
            b = stream_bucketed_losses(
                model.loaded.model,
                stream,
                length,
                num_prompts=num_prompts,
                log_edges=edges,
                fine_width=width,
                batch_size=windowed_rows_per_call(
                    int(lc.batch_size), int(lc.chunk_len), getattr(mitigation, "window", None), model.loaded.config.nheads
                ),
                chunk_len=int(lc.chunk_len),
                mitigation=mitigation,
                label=f"{source}/{name}",
            )
            curves[name] = curve_json(b, train_len, factor=float(lc.collapse_factor), unigram_loss=unigram[source])
            fine_curves[f"{source}__{name}"] = b.fine_mean()  # (prompts, fixed buckets)
            logging.info(
                "%s/%s: loss %.3f at T_train, %.3f at %d; collapsed=%s (%.1fs)",
                source,
                name,
                curves[name]["loss_at_train_len"],
                curves[name]["loss_at_end"],
                length,
                curves[name]["collapse"]["collapsed"],
                b.seconds,
            )
            result["sources"][source] = {"curves": curves, "unigram_loss": unigram[source]}
            _write(out_dir, dict(result, complete=False), fine_curves, width)

    result["complete"] = True  # the npz already holds every curve
    files = ["loss_vs_position.json", "loss_vs_position_fine.npz"]
    for source, s in result["sources"].items():
        png = f"loss_vs_position_{source}.png"
        plots.plot_loss_vs_position(
            {name: {"positions": c["positions"], "loss": c["loss"]} for name, c in s["curves"].items()},
            os.path.join(out_dir, png),
            train_len=train_len,
            title=f"{source}: perplexity vs position ({num_prompts} prompts)",
        )
        files.append(png)
    result["files"] = files
    write_json(os.path.join(out_dir, "loss_vs_position.json"), result)
    return result


def summarize(result: Mapping[str, Any]) -> List[str]:
    """The markdown table of every curve's loss at T_train and at the end, and its collapse verdict."""
    lines = [
        f"## Loss vs position ({result['num_prompts']} prompts of {result['length']:,} tokens)",
        "",
        f"Collapse rule: a loss (averaged over prompts and buckets of {result['fine_width']} positions) beyond "
        f"T_train above {result['collapse_factor']:g}x the largest within T_train, the first bucket excluded. "
        "Unigram loss (nats/token, "
        + result["unigram_loss_source"]
        + "): "
        + ", ".join(f"{k} {v:.3f}" for k, v in result["unigram_loss"].items())
        + ".",
        "",
        "| source | mitigation | loss @ T_train | loss @ end | reference | max ratio after T_train | collapsed | "
        "first collapse position | first position above unigram | tok/s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for source, s in result["sources"].items():
        for name, c in s["curves"].items():
            v = c["collapse"]
            lines.append(
                f"| {source} | {name} | {fmt(c['loss_at_train_len'])} | {fmt(c['loss_at_end'])} | "
                f"{fmt(v['reference'])} | {fmt(v['max_ratio'], 2)} | {fmt(v['collapsed'])} | "
                f"{fmt(v['first_position'])} | {fmt(v['first_position_above_unigram'])} | "
                f"{c['tokens_per_second']:.0f} |"
            )
    return lines + [""]

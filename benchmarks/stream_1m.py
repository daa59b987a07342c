"""Time to stream 1M tokens through a 130m-size Mamba-2 (random weights), with and without each mitigation.

What is timed is the loss-vs-position workload of ``eval.py``: the sequence goes through the model in
chunks of ``--chunk_len`` tokens with the conv and SSM state carried between chunks, and every position's
next-token loss is computed (full-vocabulary log-softmax). Compilation is timed separately (one warm-up
chunk from a fresh cache); the stream then restarts from a fresh cache and is timed end to end, with a
progress line every 128K tokens. A mitigation that runs past ``--budget_s`` is stopped and its time
extrapolated linearly (flagged in the table and the JSON).

    python benchmarks/stream_1m.py                      # 130m (Mamba2Config defaults), 1M tokens, GPU
    python benchmarks/stream_1m.py --tiny --tokens 20000   # CPU smoke test

Writes docs/benchmarks/stream_1m.json. Imports only jax, flax, numpy and ssm_jax.{model, inference,
mitigations}, so it runs on images without grain / ml_collections / tensorflow-datasets.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from ssm_jax import inference  # noqa: E402
from ssm_jax.io import write_json  # noqa: E402
from ssm_jax import mitigations as mitigations_lib  # noqa: E402
from ssm_jax.model import Mamba2Config, Mamba2LM  # noqa: E402

PROGRESS_EVERY = 131072
TINY = dict(d_model=64, n_layer=2, vocab_size=257, d_state=16, headdim=32, chunk_size=64)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=1 << 20, help="tokens to stream (scored positions)")
    p.add_argument("--chunk_len", type=int, default=8192)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--mitigations", default="none,forget_more,dt_scale,state_norm,sliding_window")
    p.add_argument("--window", type=int, default=2048, help="sliding_window size (the public models' T_train)")
    p.add_argument("--max_norm", type=float, default=1.0, help="state_norm threshold (timing barely depends on it)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--ssd_impl", default="auto")
    p.add_argument("--budget_s", type=float, default=120.0, help="per-mitigation time limit; beyond it, extrapolate")
    p.add_argument("--tiny", action="store_true", help=f"a tiny model {TINY} for CPU smoke tests")
    p.add_argument("--out", default=os.path.join("docs", "benchmarks", "stream_1m.json"))
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def make_mitigation(name: str, args) -> mitigations_lib.Mitigation | None:
    parts = []
    for part in name.split("+"):
        if part == "none":
            continue
        elif part == "forget_more":
            parts.append(mitigations_lib.forget_more(0.9999, 0.75))
        elif part == "dt_scale":
            parts.append(mitigations_lib.dt_scale(0.5))
        elif part == "state_norm":
            parts.append(mitigations_lib.state_norm(args.max_norm))
        elif part == "sliding_window":
            parts.append(mitigations_lib.sliding_window(args.window))
        else:
            raise SystemExit(f"unknown mitigation {part!r}")
    return mitigations_lib.compose(*parts) if parts else None


def stream(model, tokens: np.ndarray, chunk_len: int, mitigation, budget_s: float, label: str) -> dict:
    chunk_nll, state = inference.chunk_loss_function(model)

    @jax.jit
    def fn(state, inputs, targets, cache, mitigation):  # the chunk's loss summed on the device
        nll, cache = chunk_nll(state, inputs, targets, cache, mitigation)
        return jnp.sum(nll), cache

    batch, total = tokens.shape[0], tokens.shape[1] - 1

    # Compile (and run once) every chunk shape the stream uses, from a fresh cache.
    t0 = time.perf_counter()
    for c in sorted({min(chunk_len, total), total % chunk_len} - {0}):
        cache = inference.init_cache(model, batch, mitigation)
        jax.block_until_ready(fn(state, jnp.asarray(tokens[:, :c]), jnp.asarray(tokens[:, 1 : c + 1]), cache, mitigation))
    compile_s = time.perf_counter() - t0

    cache = inference.init_cache(model, batch, mitigation)
    loss_sum = jnp.zeros((), jnp.float32)
    done, next_report, extrapolated = 0, PROGRESS_EVERY, False
    t0 = time.perf_counter()
    while done < total:
        c = min(chunk_len, total - done)
        chunk_sum, cache = fn(state, jnp.asarray(tokens[:, done : done + c]), jnp.asarray(tokens[:, done + 1 : done + c + 1]), cache, mitigation)
        loss_sum = loss_sum + chunk_sum
        done += c
        jax.block_until_ready(loss_sum)  # as eval.py, which reads every chunk's losses back
        elapsed = time.perf_counter() - t0
        over = elapsed > budget_s and done < total
        if done >= next_report or done == total or over:
            print(f"  [{label}] {done:>9,} / {total:,} tokens  {elapsed:8.2f} s  {batch * done / elapsed:12,.0f} tok/s", flush=True)
            while next_report <= done:
                next_report += PROGRESS_EVERY
        if over:
            extrapolated = True
            print(f"  [{label}] over the {budget_s:g} s budget: extrapolating to {total:,} tokens", flush=True)
            break
    jax.block_until_ready((loss_sum, cache))
    elapsed = time.perf_counter() - t0
    seconds = elapsed * total / done
    return {
        "mitigation": label,
        "compile_s": compile_s,
        "seconds": seconds,
        "measured_s": elapsed,
        "tokens_streamed": int(done),
        "tokens_per_s": batch * done / elapsed,
        "extrapolated": extrapolated,
        "mean_loss": float(loss_sum) / (batch * done),
    }


def main(argv=None):
    args = parse_args(argv)
    fields = dict(TINY) if args.tiny else {}
    config = Mamba2Config(dtype=args.dtype, param_dtype=args.dtype, ssd_impl=args.ssd_impl, **fields)
    model = Mamba2LM(config, rngs=nnx.Rngs(args.seed))
    params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    device = jax.devices()[0]
    print(f"device: {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}")
    print(
        f"model: {params / 1e6:.1f}M params, d_model {config.d_model}, {config.n_layer} layers, "
        f"state {config.state_size:,}; {args.tokens:,} tokens x batch {args.batch}, chunks of {args.chunk_len}",
        flush=True,
    )
    rng = np.random.default_rng(args.seed)
    tokens = rng.integers(0, config.vocab_size, size=(args.batch, args.tokens + 1), dtype=np.int32)

    rows = []
    for name in [m.strip() for m in args.mitigations.split(",") if m.strip()]:
        print(f"{name}:", flush=True)
        rows.append(stream(model, tokens, args.chunk_len, make_mitigation(name, args), args.budget_s, name))

    print()
    print(f"| mitigation | seconds for {args.tokens:,} tokens | tokens/s | compile s |")
    print("|---|---|---|---|")
    for r in rows:
        mark = " (extrapolated)" if r["extrapolated"] else ""
        print(f"| {r['mitigation']} | {r['seconds']:.2f}{mark} | {r['tokens_per_s']:,.0f} | {r['compile_s']:.2f} |")

    out = {
        "benchmark": "stream_1m",
        "device": device.device_kind,
        "backend": jax.default_backend(),
        "jax": jax.__version__,
        "python": platform.python_version(),
        "tiny": args.tiny,
        "params": params,
        "model": {
            k: getattr(config, k) for k in ("d_model", "n_layer", "d_state", "headdim", "nheads", "vocab_size", "chunk_size", "dtype", "ssd_impl")
        },
        "tokens": args.tokens,
        "batch": args.batch,
        "chunk_len": args.chunk_len,
        "window": args.window,
        "max_norm": args.max_norm,
        "results": rows,
    }
    write_json(args.out, out)  # atomic, strict JSON
    print(f"\nwrote {args.out}")
    return out


if __name__ == "__main__":
    main()

"""Greedy decoding with ``inference.generate``: time to the first token from a cold process, the same with
JAX's persistent compilation cache already filled by an earlier process, and the steady decode rate.

Each batch size runs in two fresh processes that share one compilation-cache directory (a new temporary one
unless ``--cache_dir`` is given): the first compiles everything, the second should load it from the cache.
Each process reports

* ``time_to_first_token_s``: from just before the process was started to the first generated token of a
  ``prompt_len``-token prompt (Python start-up, imports, model creation, compilation, prefill, one step);
* ``ms_per_token``: the decode cost alone, ``(t(n_long) - t(n_short)) / (n_long - n_short)`` over warm
  calls that generate ``n_short`` and ``n_long`` tokens from the same prompt (the prefill cancels);
* the greedy tokens' digest, which must be the same in both processes (they decode the same model).

The model is the mamba2-130m architecture (``Mamba2Config()``) with random weights in ``--dtype``, as the
official stack's decode benchmark uses. Usage:

    python benchmarks/decode_bench.py --batches 1,16 --out docs/benchmarks/decode_h200.json
    python benchmarks/decode_bench.py --tiny --batches 1,2 --n_short 2 --n_long 6 --prompt_len 20   # CPU size
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time


def measure(batch: int, args: argparse.Namespace, started: float) -> dict:
    """One process's measurements (see the module docstring); ``started`` is the parent's clock at launch."""
    import jax
    import numpy as np
    from flax import nnx

    from ssm_jax import Mamba2Config, Mamba2LM, inference

    if args.tiny:
        cfg = Mamba2Config(d_model=64, n_layer=2, vocab_size=256, d_state=16, headdim=16, chunk_size=16, dtype=args.dtype)
    else:
        cfg = Mamba2Config(dtype=args.dtype)
    model = Mamba2LM(cfg, rngs=nnx.Rngs(0))
    prompt = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, args.prompt_len))  # (batch, prompt_len)
    first = inference.generate(model, prompt, 1)  # (batch, 1)
    time_to_first = time.time() - started

    def timed(n: int) -> tuple[float, np.ndarray]:
        inference.generate(model, prompt, n)  # warm-up (the decode block is compiled once for every n)
        best, tokens = float("inf"), None
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            tokens = inference.generate(model, prompt, n)  # (batch, n)
            best = min(best, time.perf_counter() - t0)
        return best, tokens

    short_s, _ = timed(args.n_short)
    long_s, tokens = timed(args.n_long)
    if not np.array_equal(tokens[:, :1], first):
        raise AssertionError("the first greedy token differs between two calls on the same prompt")
    return {
        "batch": batch,
        "platform": jax.devices()[0].platform,
        "device": jax.devices()[0].device_kind,
        "time_to_first_token_s": time_to_first,
        "generate_short_s": short_s,
        "generate_long_s": long_s,
        "ms_per_token": 1e3 * (long_s - short_s) / (args.n_long - args.n_short),
        "tokens_sha256": hashlib.sha256(np.ascontiguousarray(tokens, np.int32).tobytes()).hexdigest(),
    }


def _child_flags(args: argparse.Namespace) -> list[str]:
    flags = ["--prompt_len", str(args.prompt_len), "--n_short", str(args.n_short), "--n_long", str(args.n_long)]
    flags += ["--repeats", str(args.repeats), "--dtype", args.dtype]
    return flags + (["--tiny"] if args.tiny else [])


def run_batch(batch: int, args: argparse.Namespace, cache_dir: str) -> dict:
    """The cold process and the cached one, for one batch size."""
    env = dict(os.environ, SSM_JAX_COMPILATION_CACHE=cache_dir)
    env.pop("JAX_COMPILATION_CACHE_DIR", None)  # the cache this benchmark controls, not one set outside it
    runs = []
    for _ in ("cold", "cached"):
        started = time.time()
        cmd = [sys.executable, os.path.abspath(__file__), "--child", str(batch), "--started", repr(started), *_child_flags(args)]
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            raise RuntimeError(f"decode_bench child (batch {batch}) failed:\n{done.stderr[-4000:]}")
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    cold, cached = runs
    if cold["tokens_sha256"] != cached["tokens_sha256"]:
        raise AssertionError(f"batch {batch}: the two processes decoded different tokens")
    return {"batch": batch, "cold": cold, "cached": cached}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,16", help="comma-separated batch sizes")
    parser.add_argument("--prompt_len", type=int, default=512)
    parser.add_argument("--n_short", type=int, default=32, help="tokens of the shorter timed generation")
    parser.add_argument("--n_long", type=int, default=160, help="tokens of the longer timed generation")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per length (the fastest counts)")
    parser.add_argument("--dtype", default="bfloat16", help="compute dtype of the model")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model instead of the 130m size")
    parser.add_argument("--cache_dir", default=None, help="compilation cache shared by the two processes")
    parser.add_argument("--out", default=None, help="JSON output path")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--started", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.n_long <= args.n_short or args.n_short < 1:
        parser.error(f"--n_long ({args.n_long}) must exceed --n_short ({args.n_short}) >= 1")
    if args.child is not None:
        print(json.dumps(measure(args.child, args, args.started)))
        return
    batches = [int(b) for b in args.batches.split(",")]
    results = []
    summary = {
        "config": {k: v for k, v in vars(args).items() if k not in ("child", "started", "out")},
        "results": results,
        "complete": False,  # true once every batch size is in: a run cut short keeps the batches it finished
        "command": "python benchmarks/decode_bench.py " + " ".join(sys.argv[1:]),
    }
    with tempfile.TemporaryDirectory() as tmp:
        cache_dir = args.cache_dir or os.path.join(tmp, "jax_cache")
        for b in batches:
            results.append(run_batch(b, args, cache_dir))
            _write(args.out, summary)
    summary["complete"] = True
    _write(args.out, summary)
    print("| batch | first token, cold (s) | first token, cached (s) | ms/token |\n|---|---|---|---|")
    for r in results:
        print(
            f"| {r['batch']} | {r['cold']['time_to_first_token_s']:.1f} | {r['cached']['time_to_first_token_s']:.1f} | "
            f"{r['cached']['ms_per_token']:.3f} |"
        )


def _write(out: str | None, summary: dict) -> None:
    if out:
        from ssm_jax.io import write_json

        write_json(out, summary)


if __name__ == "__main__":
    main()

"""Training throughput of the Mamba-2 130m architecture: tokens/s and model FLOPs utilisation (MFU).

    python benchmarks/train_throughput.py --out docs/benchmarks/train_throughput.json
    python benchmarks/train_throughput.py --tiny --seq_lens 256,512 --steps 2     # CPU smoke run

What is timed: the real training step of ``ssm_jax.train_lib`` (forward, backward, global-norm clipping,
AdamW with the decay mask, NaN guard) under ``jax.jit`` with donated state, bf16 compute with float32
master weights, the loss computed in chunks of 1024 positions (so the 50288-entry float32 logits never
exist for the whole sequence), random tokens, one sequence per row (no segment ids). For every sequence
length (2K, 8K, 32K) and SSD implementation (``xla``: the pure-jnp chunked scan; ``pallas``: the kernels,
when they import and run) the batch is "filled": ``--tokens_per_batch`` tokens per step (default 128K),
halved on out-of-memory; without rematerialisation first, then with ``remat=True``.

With ``--remat_policies none,full,dots`` the batch is fixed instead (``--tokens_per_batch`` / seq len) and
every rematerialisation policy of ``ssm_jax.model.REMAT_POLICIES`` named is measured at it, its step time
and peak memory side by side (a policy that runs out of memory gets a row that says so):

    python benchmarks/train_throughput.py --seq_lens 8192,32768 --impls pallas --tokens_per_batch 32768 \
        --remat_policies none,full,dots --out docs/benchmarks/remat_h200.json

MFU = model FLOPs per token (``train_lib.model_flops_per_token``: 3 x forward matmul work of the
projections, conv, SSD and LM head) x tokens/s / peak. Peak: ``--peak_tflops`` or the spec sheet's dense
bf16 rate of the device (H200 / H100 SXM: 989 TFLOP/s); the script also measures a large bf16 matmul and
reports the fraction of that achieved rate (``frac_of_matmul``).

Imports only jax / flax / optax / numpy and ``ssm_jax`` modules that do not need grain, ml_collections
or tensorflow-datasets. Writes JSON (``--out``) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from ssm_jax.io import write_json  # noqa: E402

PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L4": 121.0, "TPU v5p": 459.0, "TPU v5 lite": 197.0, "TPU v4": 275.0, "TPU v6": 918.0}


def _is_oom(e: BaseException) -> bool:
    text = str(e)
    return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


def _peak_tflops(device, override: float) -> float | None:
    if override > 0:
        return override
    kind = getattr(device, "device_kind", "")
    for name, value in PEAK_TFLOPS.items():
        if name.lower() in kind.lower():
            return value
    return None


def measure_matmul_tflops(n: int = 8192, iters: int = 10) -> float:
    """Achieved bf16 matmul rate of the default device (TFLOP/s), a practical ceiling for MFU."""
    a = jnp.ones((n, n), jnp.bfloat16)
    f = jax.jit(lambda a: a @ a)
    f(a).block_until_ready()
    t = time.perf_counter()
    for _ in range(iters):
        out = f(a)
    out.block_until_ready()
    return 2 * n**3 * iters / (time.perf_counter() - t) / 1e12


def bench_one(model_cfg, seq_len: int, batch: int, *, steps: int, warmup: int, loss_chunk: int):
    """Compiles and times the train step; returns a result dict (raises on failure, e.g. OOM)."""
    from ssm_jax import optim, train_lib

    schedule = optim.make_schedule("wsd", peak_lr=1e-3, num_steps=1000, warmup_steps=10)
    opt = optim.make_optimizer(schedule)
    init = lambda k: train_lib.init_train_state(model_cfg, opt, k)  # noqa: E731
    state = jax.jit(init)(jax.random.PRNGKey(0))
    graphdef, _ = train_lib.abstract_model(model_cfg)
    step = jax.jit(
        train_lib.make_train_step(graphdef, opt, schedule=schedule, use_segment_ids=False, loss_chunk_size=loss_chunk), donate_argnums=(0,)
    )
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, model_cfg.vocab_size, (batch, seq_len + 1)).astype(np.int32)
    b = {
        "inputs": jnp.asarray(tokens[:, :-1]),
        "targets": jnp.asarray(tokens[:, 1:]),
        "segment_ids": jnp.zeros((batch, seq_len), jnp.int32),
        "loss_mask": jnp.ones((batch, seq_len), jnp.float32),
        "is_continuation": jnp.zeros((batch,), jnp.int32),
    }
    t0 = time.perf_counter()
    compiled = step.lower(state, b).compile()
    compile_s = time.perf_counter() - t0
    peak_bytes = None
    try:
        m = compiled.memory_analysis()
        peak_bytes = int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes)
    except Exception:  # noqa: BLE001 - not every backend reports it
        pass
    for _ in range(warmup):
        state, metrics = compiled(state, b)
    jax.block_until_ready(metrics["loss"])
    t0 = time.perf_counter()
    for _ in range(steps):
        state, metrics = compiled(state, b)
    jax.block_until_ready(metrics["loss"])
    elapsed = time.perf_counter() - t0
    loss = float(metrics["loss"])
    del state, compiled, step
    return {
        "step_ms": 1e3 * elapsed / steps,
        "tokens_per_s": batch * seq_len * steps / elapsed,
        "compile_s": compile_s,
        "peak_memory_gb": None if peak_bytes is None else peak_bytes / 2**30,
        "final_loss": loss,
    }


def run(args) -> dict:
    from ssm_jax import train_lib  # importing ssm_jax registers ssm_jax.kernels when run from a checkout
    from ssm_jax.model import Mamba2Config

    device = jax.devices()[0]
    if args.tiny:
        base = Mamba2Config(d_model=64, n_layer=2, vocab_size=50277, d_state=16, headdim=16, chunk_size=64, dtype="bfloat16", param_dtype="float32")
    else:  # the public 130m architecture
        base = Mamba2Config(dtype="bfloat16", param_dtype="float32")
    peak = _peak_tflops(device, args.peak_tflops)
    matmul = None
    if not args.no_matmul and device.platform != "cpu":
        try:
            matmul = measure_matmul_tflops()
        except Exception as e:  # noqa: BLE001
            print(f"matmul measurement failed: {e}", file=sys.stderr)
    rows = []
    result = {
        "benchmark": "train_throughput",
        "model": "tiny" if args.tiny else "mamba2-130m",
        "device": getattr(device, "device_kind", str(device)),
        "num_devices_used": 1,
        "backend": device.platform,
        "jax": jax.__version__,
        "python": platform.python_version(),
        "peak_tflops": peak,
        "measured_matmul_tflops": matmul,
        "steps": args.steps,
        "tokens_per_batch_target": args.tokens_per_batch,
        "loss_chunk_size": args.loss_chunk,
        "rows": rows,
        "complete": False,
        "command": "python benchmarks/train_throughput.py " + " ".join(sys.argv[1:]),
    }

    def record(row: dict) -> None:
        """Keeps a finished row, and rewrites ``--out`` with every row so far (``complete`` stays false until
        the last), so a run cut short by a device call's time limit keeps what it measured."""
        rows.append(row)
        write(result, args.out)

    if args.remat_policies:
        for impl in args.impls.split(","):
            for seq_len in [int(s) for s in args.seq_lens.split(",")]:
                for policy in args.remat_policies.split(","):
                    record(_policy_row(base.replace(ssd_impl=impl, remat=policy), impl, seq_len, args, peak, matmul))
    for impl in args.impls.split(",") if not args.remat_policies else ():
        for seq_len in [int(s) for s in args.seq_lens.split(",")]:
            row = {"impl": impl, "seq_len": seq_len}
            tokens = max(args.tokens_per_batch, seq_len)
            done = False
            while not done and tokens >= seq_len:
                batch = tokens // seq_len
                for remat in (False, True):
                    cfg = base.replace(ssd_impl=impl, remat=remat)
                    try:
                        res = bench_one(cfg, seq_len, batch, steps=args.steps, warmup=args.warmup, loss_chunk=min(args.loss_chunk, seq_len))
                    except Exception as e:  # noqa: BLE001
                        jax.clear_caches()
                        gc.collect()
                        if _is_oom(e):
                            print(f"{impl} L={seq_len} batch={batch} remat={remat}: out of memory", file=sys.stderr)
                            continue
                        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
                        traceback.print_exc()
                        done = True
                        break
                    flops = train_lib.model_flops_per_token(cfg, seq_len)
                    achieved = flops * res["tokens_per_s"] / 1e12
                    row.update(
                        batch=batch,
                        remat=remat,
                        **res,
                        model_tflops_per_s=achieved,
                        mfu=None if peak is None else achieved / peak,
                        frac_of_matmul=None if matmul is None else achieved / matmul,
                    )
                    done = True
                    break
                tokens //= 2
            if not done:
                row["error"] = "out of memory even at batch 1 with remat"
            print(json.dumps(row), flush=True)
            record(row)
            jax.clear_caches()
            gc.collect()
    result["complete"] = True
    write(result, args.out)
    return result


def write(result: dict, out: str) -> None:
    """Writes ``result`` to ``out`` atomically (a kill mid-write leaves the previous version); nothing when
    ``out`` is empty."""
    if out:
        write_json(out, result)


def _policy_row(cfg, impl: str, seq_len: int, args, peak, matmul) -> dict:
    """One rematerialisation policy at the fixed batch ``--tokens_per_batch // seq_len``."""
    from ssm_jax import train_lib

    batch = max(1, args.tokens_per_batch // seq_len)
    row = {"impl": impl, "seq_len": seq_len, "batch": batch, "remat": cfg.remat}
    try:
        res = bench_one(cfg, seq_len, batch, steps=args.steps, warmup=args.warmup, loss_chunk=min(args.loss_chunk, seq_len))
    except Exception as e:  # noqa: BLE001
        row["error"] = "out of memory" if _is_oom(e) else f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
    else:
        achieved = train_lib.model_flops_per_token(cfg, seq_len) * res["tokens_per_s"] / 1e12
        row.update(
            **res,
            model_tflops_per_s=achieved,
            mfu=None if peak is None else achieved / peak,
            frac_of_matmul=None if matmul is None else achieved / matmul,
        )
    print(json.dumps(row), flush=True)
    jax.clear_caches()
    gc.collect()
    return row


def markdown(result: dict) -> str:
    def fmt(v, spec):
        return "-" if v is None else format(v, spec)

    lines = [
        f"Training throughput, {result['model']} on {result['device']} (jax {result['jax']}); peak "
        f"{fmt(result['peak_tflops'], '.0f')} TFLOP/s, measured bf16 matmul "
        f"{fmt(result['measured_matmul_tflops'], '.0f')} TFLOP/s",
        "",
        "| impl | seq len | batch | remat | tokens/s | step ms | model TFLOP/s | MFU | of matmul | peak mem GB | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['impl']} | {r['seq_len']} | {r.get('batch', '-')} | {r.get('remat', '-')} | "
            f"{fmt(r.get('tokens_per_s'), ',.0f')} | {fmt(r.get('step_ms'), '.1f')} | "
            f"{fmt(r.get('model_tflops_per_s'), '.1f')} | {fmt(r.get('mfu'), '.1%')} | "
            f"{fmt(r.get('frac_of_matmul'), '.1%')} | {fmt(r.get('peak_memory_gb'), '.1f')} | {r.get('error', '')} |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="docs/benchmarks/train_throughput.json")
    p.add_argument("--seq_lens", default="2048,8192,32768")
    p.add_argument("--impls", default="xla,pallas")
    p.add_argument("--tokens_per_batch", type=int, default=131072)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--loss_chunk", type=int, default=1024)
    p.add_argument("--peak_tflops", type=float, default=0.0, help="override the device's peak bf16 TFLOP/s")
    p.add_argument("--tiny", action="store_true", help="a tiny model (CPU smoke run)")
    p.add_argument("--no_matmul", action="store_true", help="skip the matmul-rate measurement")
    p.add_argument("--remat_policies", default="", help="comma-separated remat policy names (none, full, dots): each at the fixed batch")
    args = p.parse_args(argv)
    if args.remat_policies:
        from ssm_jax.model import remat_policy_name

        for name in args.remat_policies.split(","):
            try:
                remat_policy_name(name, "--remat_policies")
            except ValueError as e:
                p.error(str(e))
    result = run(args)  # writes --out after every row, and at the end with "complete": true
    print(markdown(result))


if __name__ == "__main__":
    main()

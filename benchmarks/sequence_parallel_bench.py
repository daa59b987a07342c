"""Sequence (context) parallelism on GPUs: weak scaling (1 vs N GPUs) and the longest trainable sequence.

    python benchmarks/sequence_parallel_bench.py                       # all local GPUs, every section
    python benchmarks/sequence_parallel_bench.py --sections ssd,train  # scaling only
    python benchmarks/sequence_parallel_bench.py --sections fit --fit-budget-s 200
    XLA_FLAGS=--xla_force_host_platform_device_count=4 JAX_PLATFORMS=cpu \
        python benchmarks/sequence_parallel_bench.py --smoke          # tiny sizes, checks the script on a CPU

Sections (each for 1 device and for N devices on the mesh axis "seq"):

* ``ssd``: forward+backward of :func:`ssm_jax.parallel.sequence.ssd_sequence_parallel` (gradients of x, dt,
  A, B, C, D of ``sum(y * cotangent)``) at the same per-device length (130m shapes: 24 heads x 64, state 128,
  one group, chunk 256, bf16 x/B/C). The 1-device row also runs plain :func:`ssm_jax.ssd` (no shard_map).
* ``train``: one AdamW training step of a 130m-shaped Mamba-2 (d_model 768, 24 layers, vocabulary 50277,
  bf16 compute, float32 parameters) through :func:`ssm_jax.parallel.sequence.sequence_parallel_loss` at the
  same per-device length. The 1-device row also runs the plain unsharded model.
* ``fit``: the longest sequence (batch 1) for which one training step (remat per layer, chunked logits)
  runs on 1 and on N devices: doubling from ``--fit-start`` tokens per device until a step fails with an
  out-of-memory error, then bisection to ``--fit-resolution``; bounded by ``--fit-budget-s`` per device
  count (the bounds found so far are reported when the budget runs out).

Weak-scaling efficiency = time(1 device, plain) / time(N devices, sharded) at equal tokens per device
(1.0: perfect; the sharded time includes the state exchange and the conv halo). Timing: median over
``--repeats`` of the wall time of ``--iters`` back-to-back calls (``block_until_ready`` at the end) after a
warm-up. Writes a markdown table to stdout and JSON to ``--out`` (docs/benchmarks/sequence_parallel.json).
Imports only jax, flax, optax, numpy and ssm_jax (no grain / ml_collections).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
import warnings

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402


import ssm_jax  # noqa: E402,F401  (registers ssm_jax.kernels when run from a checkout)
from ssm_jax.model import Mamba2Config, Mamba2LM  # noqa: E402
from ssm_jax.parallel import sequence as sp  # noqa: E402
from ssm_jax.ssd import resolve_impl, ssd  # noqa: E402

# 130m shapes (arXiv 2410.07145 section 1).
MODEL_130M = dict(d_model=768, n_layer=24, vocab_size=50277, d_state=128, headdim=64, ngroups=1, chunk_size=256)
MODEL_SMOKE = dict(d_model=64, n_layer=2, vocab_size=257, d_state=16, headdim=16, ngroups=1, chunk_size=64)


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


def make_mesh(n: int) -> Mesh:
    return Mesh(np.asarray(jax.devices()[:n]), ("seq",))


def time_fn(f, args, iters: int, repeats: int, warmup: int = 2, carry=None):
    """Median and min milliseconds per call. ``carry``: ``f`` returns its next arguments (a train step)."""
    for _ in range(warmup):
        out = f(*args)
        if carry:
            args = carry(args, out)
        jax.block_until_ready(out)
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(iters):
            out = f(*args)
            if carry:
                args = carry(args, out)
        jax.block_until_ready(out)
        ts.append((time.perf_counter() - t) / iters)
    return float(np.median(ts)) * 1e3, float(np.min(ts)) * 1e3


def peak_bytes(compiled):
    try:
        m = compiled.memory_analysis()
        return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes)
    except Exception:  # noqa: BLE001 - not every backend reports it
        return None


def device_memory_limit():
    try:
        return int(jax.devices()[0].memory_stats()["bytes_limit"])
    except Exception:  # noqa: BLE001
        return None


def is_oom(e: Exception) -> bool:
    text = f"{type(e).__name__}: {e}".lower()
    return any(s in text for s in ("resource_exhausted", "out of memory", "failed to allocate"))


# --------------------------------------------------------------------------------------------------
# SSD forward + backward
# --------------------------------------------------------------------------------------------------


def ssd_inputs(n: int, batch: int, length: int, heads: int, headdim: int, state: int, sharded: bool):
    mesh = make_mesh(n)
    seq = lambda nd: NamedSharding(mesh, P(None, "seq", *([None] * (nd - 2))) if sharded else P())
    rep = NamedSharding(mesh, P())
    shapes = dict(
        x=(batch, length, heads, headdim),
        dt=(batch, length, heads),
        B=(batch, length, 1, state),
        C=(batch, length, 1, state),
        cot=(batch, length, heads, headdim),
    )
    out_shardings = (seq(4), seq(3), rep, seq(4), seq(4), rep, seq(4))

    def make(key):
        k = jax.random.split(key, 7)
        x = jax.random.normal(k[0], shapes["x"], jnp.bfloat16)
        dt = jnp.exp(jax.random.uniform(k[1], shapes["dt"], jnp.float32, np.log(1e-3), np.log(1e-1)))
        A = -jnp.exp(jax.random.uniform(k[2], (heads,), jnp.float32, 0.0, np.log(16.0)))
        B = jax.random.normal(k[3], shapes["B"], jnp.bfloat16)
        C = jax.random.normal(k[4], shapes["C"], jnp.bfloat16)
        D = jax.random.normal(k[5], (heads,), jnp.float32)
        cot = jax.random.normal(k[6], shapes["cot"], jnp.bfloat16)
        return x, dt, A, B, C, D, cot

    return mesh, jax.jit(make, out_shardings=out_shardings)(jax.random.PRNGKey(0))


def ssd_grad_fn(mesh, n: int, chunk: int, impl: str, plain: bool):
    def forward(x, dt, A, B, C, D):
        if plain:
            return ssd(x, dt, A, B, C, D=D, chunk_size=chunk, impl=impl)[0]
        return sp.ssd_sequence_parallel(x, dt, A, B, C, mesh=mesh, seq_axis="seq", D=D, chunk_size=chunk, impl=impl)[0]

    def loss(x, dt, A, B, C, D, cot):
        return jnp.sum(forward(x, dt, A, B, C, D).astype(jnp.float32) * cot.astype(jnp.float32))

    return jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4, 5))


def bench_ssd(args, counts):
    rows = []
    shapes = dict(heads=4, headdim=16, state=16, chunk=64) if args.smoke else dict(heads=24, headdim=64, state=128, chunk=256)
    for n in counts:
        for plain in [True, False] if n == 1 else [False]:
            length = n * args.ssd_len
            row = dict(
                section="ssd",
                devices=n,
                variant="plain" if plain else "sharded",
                batch=args.ssd_batch,
                tokens_per_device=args.ssd_len,
                global_len=length,
            )
            try:
                mesh, inputs = ssd_inputs(n, args.ssd_batch, length, shapes["heads"], shapes["headdim"], shapes["state"], sharded=not plain)
                f = jax.jit(ssd_grad_fn(mesh, n, shapes["chunk"], args.impl, plain))
                t0 = time.perf_counter()
                compiled = f.lower(*inputs).compile()
                row["compile_s"] = round(time.perf_counter() - t0, 1)
                row["peak_gb"] = (peak_bytes(compiled) or 0) / 1e9
                row["ms"], row["min_ms"] = time_fn(compiled, inputs, args.iters, args.repeats)
                row["mtok_per_s_per_device"] = args.ssd_batch * args.ssd_len / row["ms"] / 1e3
                del inputs
            except Exception as e:  # noqa: BLE001
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                traceback.print_exc()
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------------
# Training step
# --------------------------------------------------------------------------------------------------


def model_config(args, remat: bool) -> Mamba2Config:
    sizes = MODEL_SMOKE if args.smoke else MODEL_130M
    return Mamba2Config(**sizes, dtype=args.dtype, param_dtype="float32", ssd_impl=args.impl, remat=remat)


class Trainer:
    """Parameters, optimiser state and jitted steps of one model on the first ``n`` devices."""

    def __init__(self, cfg: Mamba2Config, n: int, loss_chunk: int):
        self.cfg, self.n, self.loss_chunk = cfg, n, loss_chunk
        self.mesh = make_mesh(n)
        rep = NamedSharding(self.mesh, P())
        model = Mamba2LM(cfg, rngs=nnx.Rngs(0))
        self.graphdef, params = nnx.split(model)
        self.tx = optax.adamw(1e-4, weight_decay=0.1)
        self.params = jax.device_put(params, rep)
        self.opt_state = jax.device_put(self.tx.init(params), rep)

    def batch(self, batch_size: int, length: int, sharded: bool):
        spec = P(None, "seq") if sharded else P()
        sharding = NamedSharding(self.mesh, spec)
        vocab = self.cfg.vocab_size

        def make(key):
            tokens = jax.random.randint(key, (batch_size, length + 1), 0, vocab, jnp.int32)
            return tokens[:, :-1], tokens[:, 1:]

        inputs, targets = jax.jit(make, out_shardings=(sharding, sharding))(jax.random.PRNGKey(1))
        return {"inputs": inputs, "targets": targets}

    def step_fn(self, sharded: bool, donate: bool = True):
        graphdef, tx, mesh, chunk = self.graphdef, self.tx, self.mesh, self.loss_chunk

        def loss_fn(params, batch):
            model = nnx.merge(graphdef, params)
            if sharded:
                return sp.sequence_parallel_loss(model, batch, mesh=mesh, seq_axis="seq", loss_chunk_size=chunk)[0]
            hidden, _ = model.hidden_states(batch["inputs"])
            total, count = sp.chunked_lm_loss_sums(model, hidden, batch["targets"], None, chunk_size=chunk)
            return total / count

        def step(params, opt_state, batch):
            loss, grads = jax.value_and_grad(loss_fn)(params, batch)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss

        return jax.jit(step, donate_argnums=(0, 1) if donate else ())


def bench_train(args, counts):
    rows = []
    cfg = model_config(args, remat=args.train_remat)
    for n in counts:
        trainer = Trainer(cfg, n, args.loss_chunk)
        for plain in [True, False] if n == 1 else [False]:
            length = n * args.train_len
            row = dict(
                section="train",
                devices=n,
                variant="plain" if plain else "sharded",
                batch=args.train_batch,
                tokens_per_device=args.train_len,
                global_len=length,
                remat=args.train_remat,
            )
            try:
                batch = trainer.batch(args.train_batch, length, sharded=not plain)
                step = trainer.step_fn(sharded=not plain)
                t0 = time.perf_counter()
                compiled = step.lower(trainer.params, trainer.opt_state, batch).compile()
                row["compile_s"] = round(time.perf_counter() - t0, 1)
                row["peak_gb"] = (peak_bytes(compiled) or 0) / 1e9
                state = (trainer.params, trainer.opt_state, batch)
                row["ms"], row["min_ms"] = time_fn(compiled, state, args.iters, args.repeats, carry=lambda a, out: (out[0], out[1], a[2]))
                row["ktok_per_s_per_device"] = args.train_batch * args.train_len / row["ms"]
                # the donated buffers are gone: re-create the parameters for the next row
                trainer = Trainer(cfg, n, args.loss_chunk)
            except Exception as e:  # noqa: BLE001
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                traceback.print_exc()
                trainer = Trainer(cfg, n, args.loss_chunk)
            print(json.dumps(row), flush=True)
            rows.append(row)
        del trainer
    return rows


# --------------------------------------------------------------------------------------------------
# Longest sequence of one training step
# --------------------------------------------------------------------------------------------------


def bench_fit(args, counts):
    rows = []
    cfg = model_config(args, remat=True)
    for n in counts:
        trainer = Trainer(cfg, n, args.loss_chunk)
        step = trainer.step_fn(sharded=True, donate=False)
        grain = n * max(cfg.chunk_size, args.loss_chunk)  # lengths stay multiples of this
        trials = []
        deadline = time.perf_counter() + args.fit_budget_s

        def fits(length: int, trainer: Trainer = trainer, step=step) -> bool:  # bound now: both are freed below
            t0 = time.perf_counter()
            record = dict(global_len=length)
            try:
                batch = trainer.batch(1, length, sharded=True)
                out = step(trainer.params, trainer.opt_state, batch)
                jax.block_until_ready(out)
                record["loss"] = float(out[2])
                ok = True
                del out, batch
            except Exception as e:  # noqa: BLE001
                if not is_oom(e):
                    record["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                    traceback.print_exc()
                ok = False
            record.update(fits=ok, seconds=round(time.perf_counter() - t0, 1))
            trials.append(record)
            print(json.dumps(dict(section="fit-trial", devices=n, **record)), flush=True)
            return ok

        lo, hi = None, None
        length = n * args.fit_start
        cap = n * args.fit_max
        while length <= cap and time.perf_counter() < deadline:
            if fits(length):
                lo = length
                length *= 2
            else:
                hi = length
                break
        if lo is None and hi is not None:  # even the start failed: halve
            length = max(grain, (hi // 2) // grain * grain)
            while time.perf_counter() < deadline and length >= grain:
                if fits(length):
                    lo = length
                    break
                hi = length
                length = (length // 2) // grain * grain
        while lo is not None and hi is not None and (hi - lo) > args.fit_resolution * lo and time.perf_counter() < deadline:
            mid = (lo + hi) // 2 // grain * grain
            if mid <= lo or mid >= hi:
                break
            if fits(mid):
                lo = mid
            else:
                hi = mid
        row = dict(
            section="fit",
            devices=n,
            longest_fitting_len=lo,
            smallest_failing_len=hi,
            capped=hi is None and lo is not None and lo * 2 > cap,
            budget_exhausted=time.perf_counter() >= deadline,
            trials=trials,
            tokens_per_device=None if lo is None else lo // n,
        )
        print(json.dumps({k: v for k, v in row.items() if k != "trials"}), flush=True)
        rows.append(row)
        del trainer, step, fits  # before the next size's model is built
    return rows


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------


def efficiency(rows, section):
    base = [r for r in rows if r["section"] == section and r["devices"] == 1 and r["variant"] == "plain" and "ms" in r]
    out = {}
    for r in rows:
        if r["section"] == section and r["variant"] == "sharded" and "ms" in r and base:
            out[str(r["devices"])] = base[0]["ms"] / r["ms"]
    return out


def markdown(result) -> str:
    lines = [f"Device: {result['device']} x {result['num_devices']}; jax {result['jax']}; impl {result['impl']}"]
    lines += [f"Warning: {w}" for w in result.get("warnings", [])] + [""]
    scaling = [r for r in result["rows"] if r["section"] in ("ssd", "train")]
    if scaling:
        lines += [
            "| section | devices | variant | tokens/device | global len | ms | tokens/s/device | peak GB | weak-scaling eff. |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in scaling:
            eff = result["efficiency"].get(r["section"], {}).get(str(r["devices"])) if r["variant"] == "sharded" else None
            tps = r["batch"] * r["tokens_per_device"] / r["ms"] * 1e3 if "ms" in r else None
            lines.append(
                "| {section} | {devices} | {variant} | {tpd} | {gl} | {ms} | {tps} | {peak} | {eff} |".format(
                    section=r["section"],
                    devices=r["devices"],
                    variant=r["variant"],
                    tpd=r["tokens_per_device"],
                    gl=r["global_len"],
                    ms=f"{r['ms']:.2f}" if "ms" in r else r.get("error", "-")[:60],
                    tps=f"{tps:,.0f}" if tps else "-",
                    peak=f"{r['peak_gb']:.2f}" if r.get("peak_gb") else "-",
                    eff=f"{eff:.2f}" if eff else "-",
                )
            )
        lines.append("")
    fit = [r for r in result["rows"] if r["section"] == "fit"]
    if fit:
        lines += ["| devices | longest training sequence (tokens) | first failing length | note |", "|---|---|---|---|"]
        for r in fit:
            note = "capped by --fit-max" if r["capped"] else ("time budget ran out" if r["budget_exhausted"] else "")
            lines.append(f"| {r['devices']} | {r['longest_fitting_len'] or '-'} | {r['smallest_failing_len'] or '-'} | {note} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--devices", type=int, default=0, help="N (0: all local devices)")
    ap.add_argument("--sections", default="ssd,train,fit")
    ap.add_argument("--impl", default="auto")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--ssd-len", type=int, default=65536, help="SSD tokens per device")
    ap.add_argument("--ssd-batch", type=int, default=1)
    ap.add_argument("--train-len", type=int, default=16384, help="training tokens per device")
    ap.add_argument("--train-batch", type=int, default=1)
    ap.add_argument("--train-remat", action="store_true", help="remat each layer in the scaling runs")
    ap.add_argument("--loss-chunk", type=int, default=4096, help="logits computed this many positions at a time")
    ap.add_argument("--fit-start", type=int, default=32768, help="first tried length per device")
    ap.add_argument("--fit-max", type=int, default=1 << 23, help="largest tried length per device")
    ap.add_argument("--fit-resolution", type=float, default=0.125, help="stop bisecting at this relative gap")
    ap.add_argument("--fit-budget-s", type=float, default=240.0, help="seconds per device count")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (CPU check of the script)")
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "benchmarks", "sequence_parallel.json"))
    args = ap.parse_args(argv)
    if args.smoke:
        args.ssd_len, args.train_len, args.loss_chunk = 1024, 512, 256
        args.fit_start, args.fit_max, args.fit_budget_s = 512, 2048, min(args.fit_budget_s, 60.0)
        args.iters, args.repeats = 2, 2

    n = args.devices or jax.local_device_count()
    counts = [1] if n == 1 else [1, n]
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    dev = jax.devices()[0]
    result = dict(
        device=getattr(dev, "device_kind", str(dev)),
        platform=dev.platform,
        num_devices=n,
        jax=jax.__version__,
        impl=resolve_impl(args.impl),
        args=vars(args),
        device_memory_bytes=device_memory_limit(),
        rows=[],
        efficiency={},
    )
    if n == 1:
        print("only one device: the N-device rows are skipped (run on a machine with several GPUs)", flush=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if "ssd" in sections:
            result["rows"] += bench_ssd(args, counts)
            result["efficiency"]["ssd"] = efficiency(result["rows"], "ssd")
        if "train" in sections:
            result["rows"] += bench_train(args, counts)
            result["efficiency"]["train"] = efficiency(result["rows"], "train")
        if "fit" in sections:
            result["rows"] += bench_fit(args, counts)
    # e.g. the sharded rows falling back from the Pallas kernels to impl="xla" (ssm_jax.parallel.sequence)
    result["warnings"] = sorted({str(w.message) for w in caught})
    for message in result["warnings"]:
        print("warning:", message, flush=True)

    table = markdown(result)  # after the warnings are known
    result["markdown"] = table
    print()
    print(table)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()

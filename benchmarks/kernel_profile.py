"""Per-kernel device time of one ``ssd()`` call, read from a JAX profiler trace.

Wall-clock medians (``ssd_bench.py``) say how long a call takes; this says where the time goes: every GPU
kernel of the forward and forward+backward of ``ssd(impl=...)`` (Pallas kernels and XLA fusions alike) with
its device time per call, and the idle time between kernels (launch gaps) inside a call.

    python benchmarks/kernel_profile.py --case b8xL4096 --impls pallas --back-to-back --calls 20 \
        --out docs/benchmarks/profile_h200.json

Method (``ssm_jax.profiling.device_profile``): ``jax.profiler.trace`` with a Perfetto trace around ``--calls``
calls (after a warm-up); the events on the device's stream threads are summed by kernel name and divided by the
number of calls. Calls are waited for one by one (the span of a call runs from its first kernel start to its last
kernel end) or, with ``--back-to-back``, all dispatched before waiting as ``ssd_bench.py`` times them; gaps =
span - busy time. fwd+bwd is ``value_and_grad`` of ``sum(y * cot)``: with the gradients alone XLA would drop the
output kernel (the loss is linear in y).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import jax  # noqa: E402

from ssd_bench import CASES, FULL, forward_fn, loss_grad_fn, make_inputs  # noqa: E402
from ssm_jax.io import write_json  # noqa: E402
from ssm_jax.profiling import device_profile  # noqa: E402


def markdown(result: dict) -> str:
    lines = []
    for key, prof in result["profiles"].items():
        host = f", host dispatch {prof['host_dispatch_us']:.1f} us" if "host_dispatch_us" in prof else ""
        lines += [
            f"### {key}: wall {prof['wall_us']:.1f} us per call, device span {prof['span_us']:.1f} us, kernels "
            f"busy {prof['busy_us']:.1f} us, gaps {prof['gaps_us']:.1f} us{host}",
            "",
            "| kernel | us per call | launches |",
            "|---|---|---|",
        ]
        lines += [f"| `{k['name'][:90]}` | {k['us_per_call']:.1f} | {k['launches_per_call']:.0f} |" for k in prof["kernels"]]
        lines.append("")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", default="b8xL4096", choices=sorted(CASES))
    ap.add_argument("--impls", default="pallas", help="comma list of ssd() impls (xla, pallas)")
    ap.add_argument("--config", default="", help="JSON dict of KernelConfig fields (then ssd_pallas with these is profiled instead)")
    ap.add_argument("--calls", type=int, default=5)
    ap.add_argument("--split-gap-us", type=float, default=200.0, help="idle time that separates two calls (the host waits for each call)")
    ap.add_argument(
        "--back-to-back", action="store_true", help="dispatch all calls before waiting (as ssd_bench times them) instead of waiting for each"
    )
    ap.add_argument("--no-bwd", action="store_true")
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    config = json.loads(args.config) if args.config else None
    b, L = CASES[args.case]
    x, dt, A, B, C, D, cot = make_inputs(FULL, b, L)
    result = {
        "meta": {
            "device": jax.devices()[0].device_kind,
            "jax": jax.__version__,
            "case": args.case,
            "config": config,
            "command": "python benchmarks/kernel_profile.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        },
        "profiles": {},
    }
    for impl in [i for i in args.impls.split(",") if i]:
        fwd = forward_fn("fused" if config else impl, FULL, config)
        fwd, grad = jax.jit(fwd), jax.jit(loss_grad_fn(fwd))
        run = functools.partial(device_profile, calls=args.calls, split_gap_us=args.split_gap_us, back_to_back=args.back_to_back)
        result["profiles"][f"{impl} fwd"] = run(fwd, (x, dt, A, B, C, D))
        if not args.no_bwd:
            result["profiles"][f"{impl} fwd+bwd"] = run(grad, (x, dt, A, B, C, D, cot))
    print(markdown(result))
    if args.out:
        write_json(args.out, result)


if __name__ == "__main__":
    main()

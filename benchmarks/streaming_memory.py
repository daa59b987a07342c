"""Peak memory of streaming N vs 4N tokens through a Mamba-2 model: it must stay flat.

Each length runs in a fresh subprocess (peak RSS on CPU; peak device bytes on GPU/TPU), so the two
measurements are independent. Usage:

    python benchmarks/streaming_memory.py --tokens 65536 --chunk 4096 --out docs/benchmarks/streaming_memory.json
    python benchmarks/streaming_memory.py --tiny --tokens 4096 --chunk 512      # CPU smoke size
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time


def measure(tokens: int, chunk: int, tiny: bool) -> dict:
    import jax
    import numpy as np
    from flax import nnx

    from ssm_jax import Mamba2Config, Mamba2LM, inference

    cfg = Mamba2Config(d_model=64, n_layer=2, vocab_size=256, d_state=16, headdim=16, chunk_size=64) if tiny else Mamba2Config()
    model = Mamba2LM(cfg, rngs=nnx.Rngs(0))
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, tokens + 1))
    start = time.perf_counter()
    losses = inference.stream_losses(model, ids, chunk_len=chunk)
    seconds = time.perf_counter() - start
    device = jax.local_devices()[0]
    stats = device.memory_stats() or {}
    return {
        "tokens": tokens,
        "chunk": chunk,
        "seconds": seconds,
        "platform": device.platform,
        "device_peak_bytes": stats.get("peak_bytes_in_use"),
        "host_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "mean_loss": float(losses.mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=65536, help="N; also runs 4N")
    parser.add_argument("--chunk", type=int, default=4096)
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model instead of the 130m size")
    parser.add_argument("--out", default=None, help="JSON output path")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(measure(args.child, args.chunk, args.tiny)))
        return
    results = []
    for tokens in (args.tokens, 4 * args.tokens):
        cmd = [sys.executable, __file__, "--child", str(tokens), "--chunk", str(args.chunk)] + (["--tiny"] if args.tiny else [])
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=os.environ).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
    key = "device_peak_bytes" if results[0]["device_peak_bytes"] else "host_peak_rss_bytes"
    ratio = results[1][key] / results[0][key]
    summary = {"results": results, "measure": key, "peak_ratio_4x_tokens": ratio}
    print("| tokens | seconds | peak (MiB) |\n|---|---|---|")
    for r in results:
        print(f"| {r['tokens']:,} | {r['seconds']:.2f} | {r[key] / 2**20:.1f} |")
    print(f"peak memory ratio for 4x the tokens ({key}): {ratio:.3f}")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()

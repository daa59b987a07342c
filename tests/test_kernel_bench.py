"""The benchmarks' measuring tools: the profiler-trace reader behind the device times (``ssm_jax.profiling``), and
the kernel benchmark scripts run end to end as scripts on CPU (kernels in interpret mode, tiny sizes)."""

import gzip
import json
import os
import subprocess
import sys
import time

import pytest

from ssm_jax import profiling

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write_trace(directory, events):
    meta = [
        {"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/host:CPU"}},
        {"ph": "M", "pid": 7, "name": "process_name", "args": {"name": "/device:GPU:0"}},
        {"ph": "M", "pid": 7, "tid": 1, "name": "thread_name", "args": {"name": "Stream #13(Compute)"}},
        {"ph": "M", "pid": 7, "tid": 2, "name": "thread_name", "args": {"name": "XLA Ops"}},
        {"ph": "M", "pid": 1, "tid": 3, "name": "thread_name", "args": {"name": "python"}},
    ]
    path = os.path.join(directory, "plugins", "profile", "run")
    os.makedirs(path)
    with gzip.open(os.path.join(path, "perfetto_trace.json.gz"), "wt") as f:
        json.dump({"traceEvents": meta + events}, f)


def test_device_profile_sums_stream_kernels_per_call(tmp_path):
    """The trace reader keeps kernels on device stream threads only (not the derived "XLA Ops" line, not host
    events), sums them per name and call, and splits calls at idle gaps: two calls of kernels a (10 + 12 us),
    b (5 us) with a 3 us launch gap inside each call."""

    def x(pid, tid, ts, dur, name):
        return {"ph": "X", "pid": pid, "tid": tid, "ts": ts, "dur": dur, "name": name}

    events = []
    for start in (0.0, 1000.0):
        events += [
            x(7, 1, start, 10.0, "a"),
            x(7, 1, start + 13.0, 5.0, "b"),
            x(7, 1, start + 18.0, 12.0, "a"),
            x(7, 2, start, 30.0, "a"),
            x(1, 3, start, 50.0, "PjitFunction"),
        ]
    _write_trace(str(tmp_path), events)
    got = profiling.summarize(profiling.device_events(str(tmp_path)), calls=2, split_gap_us=200.0)
    assert got["calls_seen"] == 2
    assert got["span_us"] == pytest.approx(30.0) and got["busy_us"] == pytest.approx(27.0)
    assert got["gaps_us"] == pytest.approx(3.0)
    per_kernel = {k["name"]: (k["us_per_call"], k["launches_per_call"]) for k in got["kernels"]}
    assert per_kernel == {"a": (22.0, 2.0), "b": (5.0, 1.0)}
    # back to back (no split): one span over both calls
    assert profiling.summarize(profiling.device_events(str(tmp_path)), calls=2, split_gap_us=float("inf"))["calls_seen"] == 1


def test_device_profile_without_device_events_is_a_clear_error(tmp_path):
    _write_trace(str(tmp_path), [{"ph": "X", "pid": 1, "tid": 3, "ts": 0.0, "dur": 5.0, "name": "host"}])
    with pytest.raises(RuntimeError, match="no kernel events on a device stream thread"):
        profiling.device_events(str(tmp_path))


def _run_script(name, *args, timeout=900):
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", name), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_ssd_bench_runs_end_to_end(tmp_path):
    """``ssd_bench.py --small`` as a script: every timed field of each row (xla, ssd(impl="pallas"), ssd_pallas and
    a ``--configs`` entry with Launch values from JSON), and ``--check-heads`` at a head count that is not a power
    of two (bf16 inputs against the float32 reference: errors of bf16 size)."""
    out = tmp_path / "bench.json"
    configs = json.dumps({"tiles": {"block_t": 32, "bwd_pairs": [4, 2], "output_kernel": "triton"}})
    _run_script(
        "ssd_bench.py",
        "--small",
        "--cases",
        "smoke",
        "--impls",
        "xla,pallas,pallas-fused",
        "--iters",
        "1",
        "--check-heads",
        "3",
        "--configs",
        configs,
        "--config-cases",
        "smoke",
        "--out",
        str(out),
    )
    result = json.loads(out.read_text())
    rows = result["rows"] + result["variants"]
    assert [r["impl"] for r in rows] == ["xla", "pallas", "pallas-fused", "config:tiles"]
    for r in rows:
        assert "error" not in r, r
        assert r["fwd_ms"] > 0 and r["fwd_mem_gb"] >= 0
        assert r["impl"] == "config:tiles" or {"fwdbwd_ms", "vjp_ms", "fwdbwd_mem_gb"} <= set(r)
    (heads,) = result["check_heads"]
    assert set(heads) == {"heads", "y", "dx", "ddt", "dA", "dB", "dC", "dh0"}
    for name, err in heads.items():
        assert name == "heads" or 0 < err < 1e-2, (name, err)


def test_stepwise_bench_smoke(tmp_path):
    """``stepwise_bench.py --smoke`` as a script: the stepwise kernel against the recurrence, float32 rounding only."""
    out = tmp_path / "stepwise.json"
    _run_script("stepwise_bench.py", "--smoke", "--out", str(out))
    rows = json.loads(out.read_text())["results"]
    assert [r["impl"] for r in rows] == ["recurrent", "stepwise"]
    assert rows[1]["rel_err_y"] < 1e-5 and rows[1]["rel_err_state"] < 1e-5


def test_decode_bench_tiny(tmp_path):
    """``decode_bench.py --tiny`` as a script: a cold and a cached process per batch size, both decoding the same
    greedy tokens (the script checks the digests), every timing positive."""
    out = tmp_path / "decode.json"
    _run_script(
        "decode_bench.py", "--tiny", "--batches", "2", "--n_short", "2", "--n_long", "5", "--prompt_len", "19", "--repeats", "1", "--out", str(out)
    )
    data = json.loads(out.read_text())
    (result,) = data["results"]
    assert data["complete"] and data["command"].startswith("python benchmarks/decode_bench.py ")
    assert result["batch"] == 2
    for run in (result["cold"], result["cached"]):
        assert run["time_to_first_token_s"] > 0 and run["generate_long_s"] > 0 and run["generate_short_s"] > 0
    assert result["cold"]["tokens_sha256"] == result["cached"]["tokens_sha256"]


def test_train_throughput_remat_policies_tiny(tmp_path):
    """``train_throughput.py --remat_policies``: each policy at the same fixed batch, the same training step (the
    same loss after it: rematerialisation recomputes, it does not change the arithmetic), its peak memory reported."""
    out = tmp_path / "remat.json"
    _run_script(
        "train_throughput.py", "--tiny", "--seq_lens", "96", "--impls", "xla", "--tokens_per_batch", "192", "--steps", "1",
        "--warmup", "1", "--remat_policies", "none,full", "--out", str(out),
    )  # fmt: skip
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert result["complete"] and [p.name for p in tmp_path.iterdir()] == ["remat.json"]  # no temporary left
    assert [(r["remat"], r["batch"], r["seq_len"]) for r in rows] == [("none", 2, 96), ("full", 2, 96)]
    assert all("error" not in r and r["peak_memory_gb"] > 0 and r["step_ms"] > 0 for r in rows), rows
    assert rows[0]["final_loss"] == pytest.approx(rows[1]["final_loss"], rel=1e-4)


def test_train_throughput_keeps_finished_rows_when_killed(tmp_path):
    """A run cut short (a device call's time limit kills it) leaves the rows it finished in ``--out``, marked
    incomplete: the script rewrites the file after every row. Killed here with SIGKILL once the first row is in."""
    out = tmp_path / "remat.json"
    argv = ["--tiny", "--seq_lens", "96", "--impls", "xla", "--tokens_per_batch", "192", "--steps", "1", "--warmup", "1"]
    argv += ["--remat_policies", "none,full,dots,none,full,dots", "--out", str(out)]
    proc = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "benchmarks", "train_throughput.py"), *argv],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )
    try:
        deadline = time.time() + 600
        while not out.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert out.exists(), "no row was written"
    finally:
        proc.kill()
        proc.wait()
    result = json.loads(out.read_text())
    assert not result["complete"] and 1 <= len(result["rows"]) < 6
    assert result["rows"][0]["remat"] == "none" and result["rows"][0]["step_ms"] > 0


def test_train_throughput_refuses_an_unknown_remat_policy_before_measuring(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "benchmarks", "train_throughput.py"),
            "--tiny",
            "--remat_policies",
            "none,sometimes",
            "--out",
            str(tmp_path / "x.json"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )
    assert proc.returncode == 2 and "--remat_policies" in proc.stderr and "'sometimes'" in proc.stderr
    assert not (tmp_path / "x.json").exists()

"""Runs the GPU test suite (``pytest -m gpu``) and records its transcript: the date, the commit, the device and
the library versions, the pass / fail / skip counts and every test's outcome and duration.

    python benchmarks/gpu_suite.py --commit $(git rev-parse --short HEAD) --out docs/benchmarks/gpu_suite_h200.json

The record is written from pytest's own JUnit XML report, so the counts are pytest's, not a parse of its
console output; the console transcript goes beside it (``<out>.log``). The process exits with pytest's code.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from typing import Dict, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_TESTS = ("tests/test_gpu_kernels.py", "tests/test_kernels.py")


def parse_junit(path: str) -> List[Dict[str, object]]:
    """One entry per test case of a JUnit XML report: ``name`` (``file.py::test[param]``), ``outcome``
    (passed / failed / error / skipped), ``seconds`` and, unless it passed, pytest's ``message``."""
    cases = []
    for case in ET.parse(path).getroot().iter("testcase"):
        module = case.get("classname", "").replace(".", "/")
        outcome, message = "passed", None
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                message = node.get("message", "")
                break
        entry = {"name": f"{module}.py::{case.get('name')}", "outcome": outcome, "seconds": round(float(case.get("time", 0.0)), 3)}
        if message is not None:
            entry["message"] = message[:500]
        cases.append(entry)
    return cases


def counts(cases: List[Dict[str, object]]) -> Dict[str, int]:
    totals = {"passed": 0, "failed": 0, "error": 0, "skipped": 0}
    for case in cases:
        totals[str(case["outcome"])] += 1
    return totals


def environment() -> Dict[str, str]:
    """The device and versions the suite ran on (read in a child process: this one never imports JAX)."""
    code = (
        "import json, jax, flax\n"
        "d = jax.devices()[0]\n"
        "print(json.dumps({'device': d.device_kind, 'compute_capability': str(getattr(d, 'compute_capability', '')),"
        " 'backend': jax.default_backend(), 'jax': jax.__version__, 'flax': flax.__version__}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--commit", required=True, help="the commit the suite ran at (the device copy has no .git)")
    parser.add_argument("--out", required=True, help="JSON record; the console transcript goes to <out>.log")
    parser.add_argument("--tests", nargs="+", default=list(DEFAULT_TESTS), help="test files, relative to the checkout")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        report = os.path.join(tmp, "junit.xml")
        command = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rA", f"--junitxml={report}", *args.tests]
        started = datetime.datetime.now(datetime.timezone.utc)
        proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
        cases = parse_junit(report) if os.path.isfile(report) else []
    with open(args.out + ".log", "w") as f:
        f.write(proc.stdout + proc.stderr)
    record = {
        "date": started.strftime("%Y-%m-%d %H:%M UTC"),
        "commit": args.commit,
        "command": "python -m pytest -m gpu " + " ".join(args.tests),
        "returncode": proc.returncode,
        **environment(),
        "counts": counts(cases),
        "tests": cases,
    }
    with open(args.out, "w") as f:
        json.dump(record, f, indent=1)
    print(json.dumps({k: record[k] for k in ("date", "commit", "device", "jax", "returncode", "counts")}))
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())

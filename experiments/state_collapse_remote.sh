#!/usr/bin/env bash
# The state-collapse study on a remote GPU machine, one step per call of the machine (each call is at most
# 10 minutes; the machine and its files persist between back-to-back calls):
#
#   start PART_DIR BUDGET_S [EVAL_RESERVE_S]  (PART_DIR may hold no part: a first call with only the wheels)
#                             install the carried wheels (.whl/), unpack PART_DIR/part*.tar.xz into .study/,
#                             check the GPU stack, start `experiments/state_collapse.py daemon` in its own
#                             session (it outlives the call) with BUDGET_S seconds for everything, training
#                             stopped EVAL_RESERVE_S (default 150) before the end
#   part PART_DIR [WHEELS]    unpack more parts (the daemon waits for the study corpus's manifest), and install
#                             more carried wheels (the evaluations of later jobs import them)
#   poll SECONDS              wait, then pack the results into $OUT/results.tar.gz and print the status
#   evaluate BUDGET_S         after the daemon ended: the evaluations it did not reach (its deadline cut them),
#                             within BUDGET_S seconds, then pack as poll does
#
# Results stay under runs/state_collapse/ (ignored by git); nothing but $OUT comes back.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
root=runs/state_collapse

status() {
  python3 experiments/state_collapse.py pack --root "$root" --out "$OUT/results.tar.gz"
  tail -n 30 "$root/$1"
  python3 -c "import json; s = json.load(open('$root/status.json')); print(json.dumps({k: (v['state'], v['rc'], v.get('last', {}).get('train', {}).get('step')) for k, v in s['jobs'].items()}))"
  nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv
}

# Each part is unpacked beside .study/ and its files renamed into place (atomic on one filesystem), manifests
# last, so the daemon, which waits for a manifest and every shard it names, never sees a half-written shard.
unpack() {
  mkdir -p .study
  shopt -s nullglob  # a directory without parts is fine: the first call may carry only the wheels
  for p in "$1"/part*.tar.xz; do
    rm -rf .study.stage && mkdir -p .study.stage
    tar -xJf "$p" -C .study.stage
    (cd .study.stage && find . -type d -exec mkdir -p ../.study/{} \; \
      && find . -type f ! -name manifest.json -exec mv {} ../.study/{} \; \
      && find . -type f -name manifest.json -exec mv {} ../.study/{} \;)
    rm -rf .study.stage
    echo "unpacked $p"
  done
  du -sh .study/* || true
}

case "${1:-}" in
  start)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    unpack "$2"
    nvidia-smi --query-gpu=name,memory.used,memory.total,driver_version --format=csv
    python3 -c "import jax, flax, optax, orbax.checkpoint, grain, ml_collections; print('jax', jax.__version__, jax.devices(), 'flax', flax.__version__, 'grain', grain.__version__)"
    mkdir -p "$root"
    setsid nohup python3 experiments/state_collapse.py daemon --study .study --root "$root" --budget_s "$3" \
      --eval_reserve_s "${4:-150}" \
      > "$root/daemon.log" 2>&1 < /dev/null &
    sleep 20
    tail -n 20 "$root/daemon.log"
    ;;
  part)
    if [ -n "${3:-}" ]; then
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$3"/*.whl
    fi
    unpack "$2"
    tail -n 20 "$root/daemon.log"
    ;;
  evaluate)
    if pgrep -f "state_collapse.py daemon" > /dev/null; then echo "the daemon is still running" >&2; exit 1; fi
    python3 experiments/state_collapse.py daemon --study .study --root "$root" --budget_s "$2" \
      --eval_reserve_s "$2" --evaluate_only > "$root/evaluate.log" 2>&1 || true
    status evaluate.log
    ;;
  poll)
    sleep "$2"
    status daemon.log
    ;;
  *)
    echo "usage: $0 start PART_DIR BUDGET_S [EVAL_RESERVE_S] | part PART_DIR [WHEELS] | poll SECONDS | evaluate BUDGET_S" >&2
    exit 2
    ;;
esac

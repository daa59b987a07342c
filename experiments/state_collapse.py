"""The state-collapse study of docs/RESULTS.md: prepare its data, run it on one GPU, gather, plot, report.

    # 1. here: the part of the Linux-kernel token corpus the study reads, packed for a remote GPU machine
    python -m ssm_jax.data.linux_corpus --download --out data/linux-6.1
    python experiments/state_collapse.py prepare --corpus data/linux-6.1 --out .study
    # 2. on the GPU machine (after unpacking .study/part*.tar.xz there): the learning-rate check (unless the
    #    plan fixes the rate), then the runs in priority order, each checkpoint evaluated as it appears and
    #    the last as the run ends (the mitigations on the runs that collapse), all within --budget_s
    python experiments/state_collapse.py daemon --study .study --root runs/state_collapse --budget_s 1200
    python experiments/state_collapse.py pack --root runs/state_collapse --out results.tar.gz
    # 3. here: the committed raw data (per-position losses, compressed), summary JSON, figures and tables;
    #    gathering a later session's root adds its runs to those already there
    python experiments/state_collapse.py gather --root runs/state_collapse --corpus .study/corpus \
        --out docs/results/state_collapse
    python experiments/state_collapse.py report --results docs/results/state_collapse

``daemon`` runs every job as its own ``train.py`` / ``eval.py`` process (several share the GPU, each with a
fixed share of its memory) and writes ``<root>/status.json`` as it goes; started again with the same root it
skips the evaluations that finished and resumes the trainings from their checkpoints. ``daemon
--evaluate_only`` trains nothing and runs the evaluations a deadline cut (its status in
``<root>/evaluate_status.json``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import signal
import subprocess
import sys
import tarfile
import time
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_CONFIG = os.path.join(ROOT, "configs", "proj", "state_collapse", "train.py")
EVAL_CONFIG = os.path.join(ROOT, "configs", "proj", "state_collapse", "eval.py")


class Run(NamedTuple):
    """One training run of a plan: the model size, T_train, optimizer steps, and a tag that tells it apart
    from an earlier session's run of the same size and length (its directory is ``47m_T256_long``)."""

    size: str
    train_len: int
    num_steps: int
    tag: str = ""

    @property
    def name(self) -> str:
        return run_name(self.size, self.train_len, self.tag)


@dataclasses.dataclass(frozen=True)
class Plan:
    """What the daemon runs: training runs in priority order, and the peak learning rate: ``lr`` when given,
    else the winner of a check (short warmup-stable-decay runs of the first run's model and length at each
    candidate)."""

    runs: Tuple[Run, ...]
    lr: Optional[float] = None
    lr_candidates: Tuple[float, ...] = ()
    lr_check_steps: int = 0
    lr_check_warmup: int = 0
    train_overrides: Tuple[str, ...] = ()  # extra train.py flags of every run
    eval_variant: str = ""  # appended to the eval config's argument ("smoke": tiny lengths)
    mitigate_all: bool = False  # evaluate the mitigations on every run, not only on the runs that collapse
    memory_fraction: Tuple[Tuple[str, str], ...] = (("train", "0.36"), ("eval", "0.22"))  # of the GPU, per job


# The study. The first GPU session checked the peak rate (1e-3 / 2e-3 / 4e-3 at 47m, T_train 1,024, 160 steps:
# 4e-3 won; docs/results/state_collapse/lr_check) and trained 47m at T_train 1,024; the second bracketed the
# 47m model's predicted T_forget (about 4,000 tokens by the paper's fit with the conv state counted:
# experiments/state_collapse_report.py) from both sides, T_train 256 (189M tokens) and 4,096; the third trained
# 47m at 256 again on twice the tokens, and 85m at 256 (113M tokens at its evaluated checkpoint), which grew a head
# that does not forget within 16 T_train without collapsing. The fourth trained 85m at T_train 256 alone for 4,096
# steps (268M tokens): the head was there from the first checkpoint, and still no collapse. This plan asks whether
# code is the reason: both sizes at T_train 256 on the RFC prose corpus (ssm_jax.data.rfc_corpus; prepared with
# `prepare --corpus data/rfc --train_tokens 82000000 --group_tokens 262144`: its whole training split and 32
# prompts of 262,144 tokens), 2,560 steps each (168M tokens, two passes), side by side, every checkpoint evaluated.
STUDY = Plan(runs=(Run("85m", 256, 2560, "rfc"), Run("47m", 256, 2560, "rfc")), lr=4e-3, memory_fraction=(("train", "0.36"), ("eval", "0.22")))
# The same driver end to end on a CPU in a few minutes (tests/test_state_collapse.py).
SMOKE = Plan(
    runs=(Run("tiny", 128, 16),),
    lr_candidates=(1e-3, 3e-3),
    lr_check_steps=8,
    lr_check_warmup=2,
    train_overrides=(
        "--config.train.batch_size=4",
        "--config.checkpoint.every_steps=8",
        "--config.eval.every_steps=8",
        "--config.eval.batch_size=2",
        "--config.eval.num_batches=2",
        "--config.optim.warmup_steps=2",
    ),
    eval_variant="smoke",
    mitigate_all=True,
)
# Data the study needs: training tokens (a little more than NUM_STEPS x TOKENS_PER_STEP, so one epoch
# covers every step), held-out prompts (32 held-out directories streamed to 512K tokens: 64 x the longest
# planned T_train) and a small corpus for the learning-rate check.
STUDY_TRAIN_TOKENS = 155_000_000
STUDY_GROUPS = 32
STUDY_GROUP_TOKENS = 524_288
LR_TRAIN_TOKENS = 12_000_000
LR_GROUPS = 2
LR_GROUP_TOKENS = 65_536
PART_BYTES = 150 * 2**20  # bytes of uncompressed shards per packed part, before xz


def corpus_missing(corpus_dir: str) -> Optional[str]:
    """None once the corpus is complete: its manifest and every shard file the manifest names. Otherwise what is
    missing. The parts of the corpus arrive one device call at a time, and the part that holds the manifest
    need not be the last (a training started on the manifest alone failed on a shard still to come)."""
    from ssm_jax.data.token_shards import read_manifest  # checks the manifest and that each shard it names exists

    try:
        read_manifest(corpus_dir)
    except (OSError, ValueError) as e:
        return str(e)
    return None


def run_name(size: str, train_len: int, tag: str = "") -> str:
    return f"{size}_T{train_len}" + (f"_{tag}" if tag else "")


# --------------------------------------------------------------------------------------------------
# prepare
# --------------------------------------------------------------------------------------------------


def prepare(
    corpus: str, out: str, train_tokens: int = STUDY_TRAIN_TOKENS, group_tokens: int = STUDY_GROUP_TOKENS, num_groups: int = STUDY_GROUPS
) -> List[str]:
    """Writes the study's corpus subset (whole training documents from the start of the split until
    ``train_tokens``, and ``num_groups`` held-out groups of ``group_tokens``: 64x the longest T_train the
    prompts serve) and the learning-rate check's (no larger than the study's) under ``out`` and packs both
    into ``out/part<i>.tar.xz`` files of about :data:`PART_BYTES` each (the study's manifest in the last
    part). Returns the part paths."""
    from ssm_jax.data.token_shards import MANIFEST, write_subset

    study, lr = os.path.join(out, "corpus"), os.path.join(out, "lr_corpus")
    for path in (study, lr):
        if os.path.exists(path):
            raise FileExistsError(f"{path} exists; remove {out} to prepare again")
    # Uncompressed records: xz over whole shards packs tokens about twice as tightly as zstd per record.
    write_subset(corpus, study, train_tokens=train_tokens, group_tokens=group_tokens, num_groups=num_groups, compression="uncompressed")
    lr_sizes = dict(
        train_tokens=min(LR_TRAIN_TOKENS, train_tokens), group_tokens=min(LR_GROUP_TOKENS, group_tokens), num_groups=min(LR_GROUPS, num_groups)
    )
    write_subset(corpus, lr, **lr_sizes, compression="uncompressed")
    files = [os.path.join("lr_corpus", f) for f in sorted(os.listdir(lr))]
    shards = sorted(f for f in os.listdir(study) if f != MANIFEST)
    shards.sort(key=lambda f: not f.startswith("validation"))  # held-out prompts first
    files += [os.path.join("corpus", f) for f in shards] + [os.path.join("corpus", MANIFEST)]
    parts: List[List[str]] = [[]]
    size = 0
    for f in files:
        nbytes = os.path.getsize(os.path.join(out, f))
        if parts[-1] and size + nbytes > PART_BYTES:
            parts.append([])
            size = 0
        parts[-1].append(f)
        size += nbytes
    paths = []
    for i, members in enumerate(parts):
        path = os.path.join(out, f"part{i}.tar.xz")
        subprocess.run(["tar", "-cf", path, "-I", "xz -9 -T0", "-C", out, *members], check=True)
        paths.append(path)
        print(f"{path}: {len(members)} files, {os.path.getsize(path) / 2**20:.1f} MiB")
    return paths


# --------------------------------------------------------------------------------------------------
# daemon
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Job:
    """One train.py or eval.py process of the study."""

    name: str
    kind: str  # "train" or "eval"
    argv: List[str]
    workdir: str
    proc: Optional[subprocess.Popen] = None
    log: Any = None
    started: Optional[float] = None
    ended: Optional[float] = None
    rc: Optional[int] = None
    stopped_at_deadline: bool = False
    priority: int = 0  # among queued jobs of a kind, the lowest starts first
    train_len: int = 0
    num_steps: int = 0  # of a training job: its planned optimizer steps

    def state(self) -> str:
        if self.proc is None:
            return "queued" if self.rc is None else "done"
        return "running" if self.proc.poll() is None else "done"


def train_argv(size: str, train_len: int, num_steps: int, workdir: str, tokens_dir: str, lr: float, extra: Sequence[str] = ()) -> List[str]:
    return [
        sys.executable,
        os.path.join(ROOT, "train.py"),
        f"--config={TRAIN_CONFIG}:{size},{train_len},{num_steps}",
        f"--workdir={workdir}",
        f"--config.data.tokens_dir={tokens_dir}",
        f"--config.optim.lr={lr}",
        *extra,
    ]


# Evaluation parts (configs/proj/state_collapse/eval.py) in priority order: the final checkpoint carries the
# verdict, the mitigations follow a collapse, the earlier checkpoints show the trend, other text last.
EVAL_PARTS = ("final", "mitigations", "history", "extra")


def eval_output_dir(workdir: str, part: str, step: Optional[int] = None) -> str:
    """Where the evaluation ``part`` of a run writes: ``<workdir>/eval_<part>``, or ``.../step_<step>`` for one
    checkpoint's (the history part)."""
    out = os.path.join(workdir, "eval_" + part)
    return out if step is None else os.path.join(out, f"step_{step}")


def eval_argv(train_len: int, workdir: str, tokens_dir: str, part: str, *, step: Optional[int] = None, variant: str = "") -> List[str]:
    """The evaluation ``part`` of a run into :func:`eval_output_dir`: its latest checkpoint, or checkpoint
    ``step``."""
    arg = f"{train_len},{part}" + (f",{variant}" if variant else "")
    argv = [
        sys.executable,
        os.path.join(ROOT, "eval.py"),
        f"--config={EVAL_CONFIG}:{arg}",
        f"--config.checkpoint={workdir}",
        f"--config.data.tokens_dir={tokens_dir}",
        f"--config.output_dir={eval_output_dir(workdir, part, step)}",
    ]
    return argv if step is None else argv + [f"--config.steps={step}"]


def collapsed(eval_dir: str) -> bool:
    """Whether the unmitigated held-out curve of a finished evaluation collapsed (the evaluator's verdict)."""
    with open(os.path.join(eval_dir, "loss_vs_position.json")) as f:
        return bool(json.load(f)["sources"]["documents"]["curves"]["none"]["collapse"]["collapsed"])


def saved_steps(workdir: str) -> List[int]:
    """The complete checkpoint steps of a train.py work directory (orbax writes a step under a temporary
    name and renames it when it is complete)."""
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        return []
    return sorted(int(d) for d in os.listdir(directory) if d.isdigit())


def _last_metrics(workdir: str) -> Dict[str, Any]:
    """The last training record and the last validation record of ``metrics.jsonl`` ({} when absent)."""
    out: Dict[str, Any] = {}
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.isfile(path):
        return out
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line being written
            out["eval" if rec.get("split") == "validation" else "train"] = rec  # ssm_jax.metrics_writer
    return out


def _job_env(memory_fraction: str, cache_dir: str) -> Dict[str, str]:
    env = dict(os.environ)
    env.update(XLA_PYTHON_CLIENT_MEM_FRACTION=memory_fraction, PYTHONUNBUFFERED="1", JAX_COMPILATION_CACHE_DIR=cache_dir, MPLBACKEND="Agg")
    return env


class Scheduler:
    """Starts queued jobs (at most ``parallel`` training jobs and one evaluation at a time), stops training at
    the deadline, and records everything in ``status.json``."""

    def __init__(
        self,
        root: str,
        *,
        parallel: int,
        train_deadline: float,
        final_deadline: float,
        memory_fraction: Dict[str, str],
        status_file: str = "status.json",
    ) -> None:
        self.root = root
        self.memory_fraction = memory_fraction
        self.status_file = status_file
        self.parallel = parallel
        self.train_deadline = train_deadline
        self.final_deadline = final_deadline
        self.t0 = time.time()
        self.jobs: List[Job] = []
        self.notes: Dict[str, Any] = {}
        self.cache_dir = os.path.join(root, "jax_cache")

    def log(self, msg: str) -> None:
        print(f"[{time.time() - self.t0:7.1f}s] {msg}", flush=True)

    def add(self, job: Job) -> Job:
        self.jobs.append(job)
        return job

    def _start(self, job: Job) -> None:
        os.makedirs(job.workdir, exist_ok=True)
        job.log = open(os.path.join(job.workdir, f"{job.kind}.log"), "a")
        job.proc = subprocess.Popen(
            job.argv,
            stdout=job.log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env=_job_env(self.memory_fraction[job.kind], self.cache_dir),
            start_new_session=True,
        )
        job.started = time.time()
        self.log(f"start {job.name}: {shlex.join(job.argv[1:])}")

    def _finish(self, job: Job) -> None:
        job.rc = job.proc.returncode
        job.ended = time.time()
        job.log.close()
        job.proc = None
        self.log(f"{job.name}: rc={job.rc} after {job.ended - job.started:.0f}s")

    def _stop(self, job: Job) -> None:
        """SIGTERM, then SIGKILL after 30 s (the latest complete checkpoint is what counts)."""
        job.stopped_at_deadline = True
        os.killpg(job.proc.pid, signal.SIGTERM)
        try:
            job.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(job.proc.pid, signal.SIGKILL)
            job.proc.wait()
        self._finish(job)
        self.log(f"{job.name}: stopped at the deadline")

    def step(self) -> bool:
        """One pass: reap, stop at deadlines, start what fits. Returns whether anything is queued or running."""
        now = time.time()
        for job in self.jobs:
            if job.proc is not None and job.proc.poll() is not None:
                self._finish(job)
        for job in self.jobs:
            deadline = self.train_deadline if job.kind == "train" else self.final_deadline
            if job.proc is not None and now >= deadline:
                self._stop(job)
            elif job.state() == "queued" and job.rc is None and now >= deadline:
                job.rc, job.ended = -1, now  # never started
                self.log(f"{job.name}: not started before the deadline")
        running = [j for j in self.jobs if j.proc is not None]
        for kind, limit in (("train", self.parallel), ("eval", 1)):
            for job in sorted(self.jobs, key=lambda j: j.priority):
                if job.kind == kind and job.proc is None and job.rc is None and sum(j.kind == kind for j in running) < limit:
                    self._start(job)
                    running.append(job)
        self.write_status()
        return any(j.proc is not None or j.rc is None for j in self.jobs)

    def write_status(self) -> None:
        jobs = {}
        for job in self.jobs:
            jobs[job.name] = {
                "kind": job.kind,
                "state": job.state(),
                "rc": job.rc,
                "started_s": None if job.started is None else round(job.started - self.t0, 1),
                "ended_s": None if job.ended is None else round(job.ended - self.t0, 1),
                "stopped_at_deadline": job.stopped_at_deadline,
            }
            if job.kind == "train":
                jobs[job.name]["last"] = _last_metrics(job.workdir)
        status = {"elapsed_s": round(time.time() - self.t0, 1), "jobs": jobs, **self.notes}
        path = os.path.join(self.root, self.status_file)
        with open(path + ".tmp", "w") as f:
            json.dump(status, f, indent=1)
        os.replace(path + ".tmp", path)

    def run_until_idle(self, poll_s: float = 3.0) -> None:
        while self.step():
            time.sleep(poll_s)


def _final_validation_loss(workdir: str) -> Optional[float]:
    loss = _last_metrics(workdir).get("eval", {}).get("loss")
    return None if loss is None else float(loss)


def choose_lr(workdirs: Dict[float, str]) -> Dict[str, Any]:
    """The candidate with the lowest final validation loss (``{"chosen", "losses"}``)."""
    losses = {lr: _final_validation_loss(w) for lr, w in workdirs.items()}
    finite = {lr: v for lr, v in losses.items() if v is not None}
    if not finite:
        raise RuntimeError(f"no learning-rate check run finished: {workdirs}")
    return {"chosen": min(finite, key=finite.get), "losses": {str(k): v for k, v in losses.items()}}


def _check_lr(study: str, root: str, plan: Plan, sched: "Scheduler") -> float:
    """Runs the learning-rate check (every candidate at once) and records it in ``sched.notes``."""
    size, train_len = plan.runs[0].size, plan.runs[0].train_len
    lr_dir = os.path.join(study, "lr_corpus")
    lr_runs = {lr: os.path.join(root, "lr_check", f"lr{lr:g}") for lr in plan.lr_candidates}
    short = [
        *plan.train_overrides,
        f"--config.optim.warmup_steps={plan.lr_check_warmup}",
        f"--config.checkpoint.every_steps={plan.lr_check_steps}",
        f"--config.eval.every_steps={plan.lr_check_steps}",
    ]
    lr_share = f"{0.95 / len(plan.lr_candidates):.2f}"
    lr_sched = Scheduler(
        root,
        parallel=len(plan.lr_candidates),
        train_deadline=sched.train_deadline,
        final_deadline=sched.final_deadline,
        memory_fraction={"train": lr_share, "eval": lr_share},
    )
    for lr, workdir in lr_runs.items():
        lr_sched.add(Job(f"lr_check_{lr:g}", "train", train_argv(size, train_len, plan.lr_check_steps, workdir, lr_dir, lr, short), workdir))
    lr_sched.run_until_idle()
    choice = choose_lr(lr_runs)
    sched.notes["lr_check"] = {
        **choice,
        "size": size,
        "train_len": train_len,
        "steps": plan.lr_check_steps,
        "jobs": {j.name: {"rc": j.rc, "seconds": (j.ended or 0) - (j.started or 0)} for j in lr_sched.jobs},
    }
    sched.log(f"learning-rate check: {choice}")
    return choice["chosen"]


def daemon(
    study: str,
    root: str,
    *,
    budget_s: float,
    eval_reserve_s: float,
    parallel: int,
    wait_for_corpus_s: float,
    plan: Plan = STUDY,
    evaluate_only: bool = False,
) -> None:
    """The whole GPU side of the study (see the module docstring). With ``evaluate_only`` nothing trains: the
    evaluations the plan's runs still lack (of the checkpoints under ``root``) run within the budget."""
    os.makedirs(root, exist_ok=True)
    sched = Scheduler(
        root,
        parallel=parallel,
        train_deadline=time.time() + budget_s - eval_reserve_s,
        final_deadline=time.time() + budget_s,
        memory_fraction=dict(plan.memory_fraction),
        status_file="evaluate_status.json" if evaluate_only else "status.json",
    )
    if plan.lr is not None or evaluate_only:
        lr = plan.lr
        sched.notes["lr"] = {"chosen": lr, "checked": False}
    else:
        lr = _check_lr(study, root, plan, sched)

    corpus_dir = os.path.join(study, "corpus")
    waited = time.time()
    while (missing := corpus_missing(corpus_dir)) is not None:
        if time.time() - waited > wait_for_corpus_s:
            raise RuntimeError(f"{corpus_dir}: the study corpus is incomplete after {wait_for_corpus_s:.0f}s ({missing})")
        time.sleep(2)
    trains = []
    for run in plan.runs:
        workdir = os.path.join(root, run.name)
        job = sched.add(
            Job(
                f"train_{run.name}",
                "train",
                train_argv(run.size, run.train_len, run.num_steps, workdir, corpus_dir, lr, plan.train_overrides),
                workdir,
                train_len=run.train_len,
                num_steps=run.num_steps,
            )
        )
        if evaluate_only:
            job.rc = 0  # treated as finished: its checkpoints are evaluated, nothing resumes it
        trains.append(job)
    queued = set()

    def evaluate(train: Job, part: str, step: Optional[int] = None) -> None:
        name = train.name.replace("train_", f"eval_{part}_") + ("" if step is None else f"_step{step}")
        if name not in queued:
            queued.add(name)
            if os.path.isfile(os.path.join(eval_output_dir(train.workdir, part, step), "loss_vs_position.json")):
                # an earlier daemon on this root finished it
                sched.log(f"{name}: already done")
                sched.add(Job(name, "eval", [], train.workdir, rc=0))
                return
            sched.add(
                Job(
                    name,
                    "eval",
                    eval_argv(train.train_len, train.workdir, corpus_dir, part, step=step, variant=plan.eval_variant),
                    train.workdir,
                    priority=EVAL_PARTS.index(part),
                )
            )

    while True:
        busy = sched.step()
        for train in trains:
            steps = saved_steps(train.workdir)
            if train.rc is None:  # still training: evaluate its checkpoints as they appear
                for step in steps:
                    if step < train.num_steps:
                        evaluate(train, "history", step)
                continue
            if not steps:
                if train.name not in queued:
                    queued.add(train.name)
                    sched.log(f"{train.name}: no checkpoint to evaluate")
                continue
            for step in steps[:-1]:  # the latest is the final part's
                evaluate(train, "history", step)
            evaluate(train, "final")
            evaluate(train, "extra")
            final = next(j for j in sched.jobs if j.name == train.name.replace("train_", "eval_final_"))
            if final.rc == 0 and (plan.mitigate_all or collapsed(os.path.join(train.workdir, "eval_final"))):
                evaluate(train, "mitigations")
            elif final.rc is None:
                busy = True  # the mitigations wait for the verdict
        if not (busy or any(j.rc is None for j in sched.jobs)):
            break
        time.sleep(3)
    sched.notes["done"] = True
    sched.write_status()
    sched.log("done")


# --------------------------------------------------------------------------------------------------
# pack
# --------------------------------------------------------------------------------------------------

PACK_SUFFIXES = (".json", ".jsonl", ".npz", ".md", ".log")


def pack(root: str, out: str) -> int:
    """A gzip tarball of everything under ``root`` the study reads back (metrics, configs, evaluation JSON and
    raw losses, logs), without checkpoints or the compilation cache. Returns the number of files."""
    count = 0
    with tarfile.open(out, "w:gz") as tar:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if d not in ("checkpoints", "jax_cache", "tensorboard")]
            for name in sorted(filenames):
                if name.endswith(PACK_SUFFIXES):
                    path = os.path.join(dirpath, name)
                    tar.add(path, arcname=os.path.relpath(path, os.path.dirname(root.rstrip("/"))))
                    count += 1
    return count


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="write and pack the study's corpus subsets")
    p.add_argument("--corpus", required=True)
    p.add_argument("--out", required=True)
    p.add_argument(
        "--train_tokens", type=int, default=STUDY_TRAIN_TOKENS, help="training tokens of the subset (whole documents from the start of the split)"
    )
    p.add_argument("--group_tokens", type=int, default=STUDY_GROUP_TOKENS, help="tokens of each held-out prompt: 64x the longest T_train")
    p.add_argument("--num_groups", type=int, default=STUDY_GROUPS, help="held-out prompts")
    p = sub.add_parser("daemon", help="run the learning-rate check, the runs and their evaluations")
    p.add_argument("--study", required=True, help="the unpacked output of prepare")
    p.add_argument("--root", required=True)
    p.add_argument("--budget_s", type=float, required=True, help="everything ends within this many seconds")
    p.add_argument("--eval_reserve_s", type=float, default=150.0, help="training stops this long before the end")
    p.add_argument("--parallel", type=int, default=2, help="training jobs at a time")
    p.add_argument("--wait_for_corpus_s", type=float, default=600.0)
    p.add_argument("--smoke", action="store_true", help="the tiny plan (a CPU check of the whole driver)")
    p.add_argument("--evaluate_only", action="store_true", help="train nothing: run the evaluations the plan's runs under --root still lack")
    p = sub.add_parser("pack", help="tarball of the results under --root")
    p.add_argument("--root", required=True)
    p.add_argument("--out", required=True)
    p = sub.add_parser("gather", help="copy the raw outputs RESULTS.md reads (experiments/state_collapse_report.py)")
    p.add_argument("--root", required=True)
    p.add_argument("--corpus", default=None, help="the study corpus (prepare's <out>/corpus): its manifest")
    p.add_argument("--corpus_file", default="corpus_manifest.json", help="the name the corpus manifest is written under")
    p.add_argument("--out", required=True)
    p = sub.add_parser("report", help="summary.json, figures and the tables of docs/RESULTS.md from the raw outputs")
    p.add_argument("--results", required=True)
    p.add_argument("--markdown", default=os.path.join(ROOT, "docs", "RESULTS.md"))
    args = parser.parse_args(argv)
    if args.command == "prepare":
        prepare(args.corpus, args.out, args.train_tokens, args.group_tokens, args.num_groups)
    elif args.command == "daemon":
        daemon(
            args.study,
            args.root,
            budget_s=args.budget_s,
            eval_reserve_s=args.eval_reserve_s,
            parallel=args.parallel,
            wait_for_corpus_s=args.wait_for_corpus_s,
            plan=SMOKE if args.smoke else STUDY,
            evaluate_only=args.evaluate_only,
        )
    elif args.command == "pack":
        print(f"{args.out}: {pack(args.root, args.out)} files")
    elif args.command == "gather":
        import state_collapse_report

        print(f"{args.out}: {len(state_collapse_report.gather(args.root, args.out, args.corpus, args.corpus_file))} files")
    elif args.command == "report":
        import state_collapse_report

        state_collapse_report.report(args.results, args.markdown)


if __name__ == "__main__":
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    main()

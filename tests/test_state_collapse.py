"""The state-collapse study driver (experiments/state_collapse.py) end to end on a CPU: its tiny plan runs the
learning-rate check, a training run, the evaluation of its earlier checkpoint as it appears, and every
evaluation part of its final one as train.py / eval.py processes, on a small
grouped NeoX token corpus made from the bundled Shakespeare plays, exactly as the study runs on a GPU."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pytest

from ssm_jax.data import get_tokenizer, load_corpus
from ssm_jax.data.token_shards import TokenCorpus, TokenShardWriter, write_manifest
from ssm_jax.evaluators.streams import GroupStream

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, path))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


state_collapse = _load("experiments/state_collapse.py", "state_collapse")


def _grouped_corpus(directory: str) -> None:
    """Plays 0-9 for training; two held-out groups (plays 10-11 and 12-13) streamed as one prompt each."""
    tok = get_tokenizer("neox")
    plays = load_corpus("shakespeare")[:14]
    ids = [np.asarray(t, np.int64) for t in tok.encode_batch([d.text for d in plays])]
    with TokenShardWriter(directory, "train", tokens_per_shard=40_000) as w:
        for doc, t in zip(plays[:10], ids[:10]):
            w.add(doc.doc_id, t)
    train = w.close()
    runs = []
    with TokenShardWriter(directory, "validation") as w:
        for g in range(2):
            members = range(10 + 2 * g, 12 + 2 * g)
            for i in members:
                w.add(plays[i].doc_id, ids[i])
            runs.append({"name": f"group{g}", "documents": 2, "tokens": int(sum(ids[i].size for i in members))})
    validation = w.close()
    write_manifest(
        directory,
        tokenizer={"name": tok.name, "vocab_size": tok.vocab_size, "eos_id": tok.eos_id},
        token_dtype="uint16",
        splits={"train": train, "validation": validation},
        source={"what": "bundled Shakespeare plays (test)"},
        groups={"validation": runs},
    )


def test_group_stream_reads_each_group_in_order_and_refuses_to_run_past_it():
    rng = np.random.default_rng(0)
    docs = [("a", [rng.integers(1, 100, 5), rng.integers(1, 100, 3)]), ("b", [rng.integers(1, 100, 7)])]
    stream = GroupStream(docs, eos_id=0, num_rows=3)
    a = np.concatenate([docs[0][1][0], [0], docs[0][1][1], [0]])
    b = np.concatenate([docs[1][1][0], [0]])
    first = stream.take([0, 1, 2], 4)
    np.testing.assert_array_equal(first, np.stack([a[:4], b[:4], a[:4]]))  # row 2 streams group 0 again
    np.testing.assert_array_equal(stream.take([0], 5), a[4:9][None])
    with pytest.raises(ValueError, match="group 'b'.*holds 8"):
        stream.take([1], 5)


@pytest.mark.slow
def test_the_study_driver_end_to_end(tmp_path):
    study, root = tmp_path / "study", tmp_path / "runs"
    for name in ("corpus", "lr_corpus"):
        _grouped_corpus(str(study / name))
    cmd = [
        sys.executable,
        os.path.join(ROOT, "experiments", "state_collapse.py"),
        "daemon",
        "--smoke",
        "--study",
        str(study),
        "--root",
        str(root),
        "--budget_s",
        "1500",
        "--eval_reserve_s",
        "300",
    ]
    done = subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, timeout=1700, env={k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    )  # one CPU device
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    status = json.load(open(root / "status.json"))
    assert status["done"] and status["lr_check"]["chosen"] in state_collapse.SMOKE.lr_candidates
    expected = {f"{kind}_tiny_T128" for kind in ("train", "eval_final", "eval_mitigations", "eval_extra")}
    steps = state_collapse.saved_steps(str(root / "tiny_T128"))
    assert steps == [8, 16]
    expected.add("eval_history_tiny_T128_step8")  # every checkpoint but the latest, as it appears
    assert set(status["jobs"]) == expected
    assert all(job["rc"] == 0 for job in status["jobs"].values()), status["jobs"]

    run = root / "tiny_T128"
    final = json.load(open(run / "eval_final" / "loss_vs_position.json"))
    assert final["train_len"] == 128 and final["length"] == 1024 and final["num_prompts"] == 2
    assert final["model"]["step"] == 16 and list(final["sources"]["documents"]["curves"]) == ["none"]
    assert final["model"]["heldout"]["tokens_dir"] == str(study / "corpus")
    assert os.path.isfile(run / "eval_final" / "states.json")
    mitigated = json.load(open(run / "eval_mitigations" / "loss_vs_position.json"))
    assert list(mitigated["sources"]["documents"]["curves"]) == ["forget_more", "dt_scale", "state_norm", "sliding_window"]
    extra = json.load(open(run / "eval_extra" / "loss_vs_position.json"))
    assert list(extra["sources"]) == ["newlines", "shakespeare", "kjv"]
    # each source's verdict is against its own text's unigram loss
    assert len({round(v, 6) for v in extra["unigram_loss"].values()}) >= 2
    history = json.load(open(run / "eval_history" / "step_8" / "loss_vs_position.json"))
    assert history["model"]["step"] == 8
    assert os.path.isfile(run / "eval_history" / "step_8" / "states.json")

    # --evaluate_only: trains nothing, reruns only the evaluation that is missing, keeps status.json
    shutil.rmtree(run / "eval_history")
    before = (root / "status.json").read_text()
    done = subprocess.run(
        cmd + ["--evaluate_only"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        env={k: v for k, v in os.environ.items() if k != "XLA_FLAGS"},
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert (root / "status.json").read_text() == before
    again = json.load(open(root / "evaluate_status.json"))["jobs"]
    ran = {name for name, job in again.items() if job["started_s"] is not None}
    assert ran == {"eval_history_tiny_T128_step8"} and again[ran.pop()]["rc"] == 0, again
    assert state_collapse.saved_steps(str(run)) == [8, 16]
    assert json.load(open(run / "eval_history" / "step_8" / "loss_vs_position.json"))["model"]["step"] == 8

    archive = tmp_path / "results.tar.gz"
    assert state_collapse.pack(str(root), str(archive)) > 0
    names = tarfile.open(archive).getnames()
    assert "runs/tiny_T128/eval_final/loss_vs_position_fine.npz" in names
    assert not any("/checkpoints/" in n or "jax_cache" in n for n in names)

    # gather: the raw outputs and the corpus manifest, under the name a session's subset needs
    gathered = tmp_path / "gathered"
    script = os.path.join(ROOT, "experiments", "state_collapse.py")
    done = subprocess.run(
        [
            sys.executable,
            script,
            "gather",
            "--root",
            str(root),
            "--corpus",
            str(study / "corpus"),
            "--corpus_file",
            "corpus_manifest_whole_split.json",
            "--out",
            str(gathered),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert (gathered / "corpus_manifest_whole_split.json").read_text() == (study / "corpus" / "manifest.json").read_text()
    assert not (gathered / "corpus_manifest.json").exists()
    assert os.path.isfile(gathered / "tiny_T128" / "eval_final" / "loss_vs_position.json")


def test_a_prompt_longer_than_the_held_out_groups_is_refused_before_loading(tmp_path):
    from ssm_jax.evaluators.config import validate_for_model
    from ssm_jax.evaluators.streams import HeldOutData

    _grouped_corpus(str(tmp_path / "corpus"))
    shortest = min(r["tokens"] + r["documents"] for r in TokenCorpus(tmp_path / "corpus").manifest["groups"]["validation"])
    config = _load(state_collapse.EVAL_CONFIG, "study_eval").get_config("64,final")
    config.loss.length = str(shortest)  # one token too many: the last prompt token needs a successor
    data = HeldOutData(corpus="tokens", tokens_dir=str(tmp_path / "corpus"))
    with pytest.raises(ValueError, match=rf"config.loss.length=.*needs {shortest + 1} tokens.*at most {shortest - 1}"):
        validate_for_model(config, 64, data, get_tokenizer("neox"))


def test_the_corpus_counts_as_arrived_only_with_every_shard_its_manifest_names(tmp_path):
    """The daemon waits for the corpus this way: a manifest alone (its part unpacked before a shard's part) is
    not enough, and what is missing is named."""
    corpus = tmp_path / "corpus"
    _grouped_corpus(str(corpus))
    assert state_collapse.corpus_missing(str(corpus)) is None
    shard = sorted(corpus.glob("train-*"))[-1]
    shard.rename(tmp_path / shard.name)
    assert shard.name in state_collapse.corpus_missing(str(corpus))
    assert "manifest" in state_collapse.corpus_missing(str(tmp_path / "nothing_here"))


def test_the_remote_script_unpacks_parts_into_place_through_a_staging_directory(tmp_path):
    """``state_collapse_remote.sh part DIR``: every part's files end up under .study/ (shards of two parts in
    one directory), through a staging directory that is gone afterwards."""
    corpus = tmp_path / "built" / "corpus"
    _grouped_corpus(str(corpus))
    files = sorted(p.name for p in corpus.iterdir())
    parts = tmp_path / "repo" / "parts"
    parts.mkdir(parents=True)
    for i, names in enumerate((files[: len(files) // 2], files[len(files) // 2 :])):
        with tarfile.open(parts / f"part{i}.tar.xz", "w:xz") as tar:
            for name in names:
                tar.add(corpus / name, arcname=f"corpus/{name}")
    (tmp_path / "repo" / "experiments").mkdir()
    shutil.copy(os.path.join(ROOT, "experiments", "state_collapse_remote.sh"), tmp_path / "repo" / "experiments")
    (tmp_path / "repo" / "runs" / "state_collapse").mkdir(parents=True)
    (tmp_path / "repo" / "runs" / "state_collapse" / "daemon.log").write_text("waiting for the corpus\n")
    done = subprocess.run(
        ["bash", str(tmp_path / "repo" / "experiments" / "state_collapse_remote.sh"), "part", "parts"],
        cwd=tmp_path / "repo",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    study = tmp_path / "repo" / ".study" / "corpus"
    assert sorted(p.name for p in study.iterdir()) == files
    assert all((study / f).read_bytes() == (corpus / f).read_bytes() for f in files)
    assert not (tmp_path / "repo" / ".study.stage").exists()
    assert state_collapse.corpus_missing(str(study)) is None
    (tmp_path / "repo" / "none").mkdir()  # a call that carries no part (only wheels) unpacks nothing
    done = subprocess.run(
        ["bash", "experiments/state_collapse_remote.sh", "part", "none"], cwd=tmp_path / "repo", capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and sorted(p.name for p in study.iterdir()) == files, done.stderr


def test_prepare_writes_the_subsets_and_packs_them_manifest_last(tmp_path):
    """``prepare`` on a small corpus: the study subset (its training prefix and held-out groups of the asked size)
    and the learning-rate subset (never larger), packed into parts whose last holds the study's manifest."""
    _grouped_corpus(str(tmp_path / "full"))
    parts = state_collapse.prepare(str(tmp_path / "full"), str(tmp_path / "out"), train_tokens=60_000, group_tokens=20_000, num_groups=2)
    members = [tarfile.open(p).getnames() for p in parts]
    assert members[-1][-1] == "corpus/manifest.json" and not any("corpus/manifest.json" in m for m in members[:-1])
    study = TokenCorpus(tmp_path / "out" / "corpus")
    assert study.manifest["splits"]["train"]["tokens"] >= 60_000 and len(study.groups("validation")) == 2
    assert all(sum(d.tokens.size for d in docs) >= 20_000 for _, docs in study.groups("validation"))
    lr = TokenCorpus(tmp_path / "out" / "lr_corpus")
    assert lr.manifest["splits"]["train"]["tokens"] <= study.manifest["splits"]["train"]["tokens"]

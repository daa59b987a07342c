"""docs/RESULTS.md cannot drift from its data: its tables are regenerated from the committed
docs/results/collapse_study.json and compared verbatim, and every claim of its text is checked against the
JSON (with the number as the text prints it)."""

import importlib.util
import json
import os
import re

import numpy as np
import pytest

from ssm_jax import capacity

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_MD = os.path.join(ROOT, "docs", "RESULTS.md")
RESULTS_JSON = os.path.join(ROOT, "docs", "results", "collapse_study.json")


def _load_study_module():
    spec = importlib.util.spec_from_file_location("collapse_study", os.path.join(ROOT, "experiments", "collapse_study.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def study():
    with open(RESULTS_JSON) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def text():
    with open(RESULTS_MD, encoding="utf-8") as f:
        return f.read()


def runs_by_name(study):
    return {r["name"]: r for r in study["runs"]}


def none_curve(run):
    return run["curves"]["documents"]["none"]


def test_tables_are_generated_from_the_json(study, text):
    tables = _load_study_module().report_tables(study)
    for name in ("runs", "same_positions", "mitigations"):
        block = re.search(rf"<!-- table:{name} -->\n(.*?)\n<!-- /table:{name} -->", text, re.S)
        assert block, f"RESULTS.md lacks the table {name}"
        assert block.group(1) == tables[name], f"table {name} differs from the JSON; regenerate it"
    assert tables["same_positions_window"] in text


def test_figures_and_commands_exist(text):
    for png in re.findall(r"\((results/[\w.]+\.png)\)", text) + re.findall(r"`(results/[\w.]+\.png)`", text):
        assert os.path.getsize(os.path.join(ROOT, "docs", png)) > 10_000, png
    for path in ("experiments/collapse_study.py", "configs/collapse_study.py", "configs/eval/collapse_study.py"):
        assert path in text and os.path.isfile(os.path.join(ROOT, path))


def test_the_grid(study):
    runs = runs_by_name(study)
    assert len(runs) == 8
    assert {r["size"]: r["state_size"] for r in runs.values()} == {"s": 262_144, "m": 786_432, "l": 1_572_864}
    for r in runs.values():
        assert r["eval_length"] == 64 * r["train_len"] and r["num_prompts"] == 8
        assert r["state_size"] == r["n_layer"] * r["nheads"] * r["headdim"] * r["d_state"]
        assert r["train"]["step"] == 600
        # every model learned: validation far below the unigram entropy of the bytes
        assert r["train"]["validation"]["loss"] / np.log(2) < 0.6 * r["train"]["validation_unigram_bits"]


def test_no_collapse_by_the_paper_rule(study, text):
    ratios = {}
    for r in study["runs"]:
        for name, c in r["curves"]["documents"].items():
            assert c["collapsed_paper_rule"] is False, (r["name"], name)
            assert c["paper_rule_max_ratio"] < 2.0
        for name, c in r["curves"]["newlines"].items():
            assert c["collapsed_paper_rule"] is False, (r["name"], "newlines", name)
        ratios[r["name"]] = none_curve(r)["paper_rule_max_ratio"]
        # more context helps on documents: the last window is below the one just inside T_train
        w = none_curve(r)["window_loss"]
        assert w["64x"] < w["1x"], r["name"]
    worst = max(ratios, key=ratios.get)
    assert f"the largest\n  ratio is {ratios[worst]:.2f} ({worst})" in text


def test_sustained_state_norm_drift_grows_with_state_size(study, text):
    runs = runs_by_name(study)
    drift = {n: runs[n]["states"]["max_sustained_growth"] for n in ("s_T128", "m_T128", "l_T128")}
    assert drift["s_T128"] < drift["m_T128"] < drift["l_T128"]
    assert (f"{drift['s_T128']:.2f}x (s, 0.26M) -> {drift['m_T128']:.2f}x (m, 0.79M) -> {drift['l_T128']:.2f}x (l, 1.57M)") in text
    m_long = runs["m_T2048"]["states"]["max_sustained_growth"]
    assert m_long < drift["m_T128"]
    assert f"(m: {drift['m_T128']:.2f}x at 128 -> {m_long:.2f}x at 2048)" in text
    conv = max(r["states"]["conv_norm_growth"] for r in study["runs"] if "states" in r)
    assert conv <= 1.11 and f"<= {conv:.2f}x" in text
    frac = runs["l_T128"]["states"]["frac_heads_sustained_growth_above_2"]
    assert frac > 0 and f"{frac * 100:.1f}% of the heads" in text


def test_cost_of_a_short_training_length_and_the_mitigations(study, text):
    excess = study["excess_at_same_positions"]
    s, m, l = (excess[n] for n in ("s_T128", "m_T128", "l_T128"))
    assert s["reference_run"] == "s_T2048" and m["reference_run"] == "m_T2048" and l["reference_run"] == "l_T512"
    assert 0 < s["none"] < m["none"] and s["none"] < l["none"]
    assert (f"by {s['none']:.3f} nats/byte (s), {m['none']:.3f} (m) and {l['none']:.3f} (l, against T_train = 512)") in text
    assert m["forget_more"] < m["none"] and l["forget_more"] < 0 < l["none"]
    assert f"({m['none']:.3f} -> {m['forget_more']:.3f})" in text
    assert f"({l['none']:.3f} -> {l['forget_more']:.3f})" in text
    ref_m, ref_l = excess["m_T2048"]["forget_more"], excess["l_T512"]["forget_more"]
    assert ref_m < 0 and ref_l < 0 and f"(m_T2048 {ref_m:.3f}, l_T512 {ref_l:.3f})" in text
    for name, e in excess.items():
        mitigations = {k: v for k, v in e.items() if k != "reference_run"}
        assert max(mitigations, key=mitigations.get) == "dt_scale", name  # dt_scale is the worst in every run


def test_capacity_claims(study, text):
    cap = study["capacity"]
    assert [p["t_forget"] for p in cap["points"]] == [128, 128, 128]
    assert all(p["t_forget_bound"] == "upper" for p in cap["points"])
    assert cap["fits"]["forget"] is None and cap["fits"]["recall"] is None
    # the paper's fit: T_forget <= 0 below 0.86M, 3.7K at our largest state
    assert capacity.paper_t_forget(0.864) == pytest.approx(0.0, abs=0.01)
    largest = max(p["n_s_millions"] for p in cap["points"])
    assert f"{float(capacity.paper_t_forget(largest)):.1f}K" == "3.7K" and "3.7K tokens" in text


def test_overfitting_claim(study, text):
    l_runs = [r for r in study["runs"] if r["size"] == "l"]
    train = sorted(r["train"]["train_loss"] for r in l_runs)
    val = [r["train"]["validation"]["loss"] for r in l_runs]
    assert f"train loss {train[0]:.2f}-{train[-1]:.2f} vs validation {np.mean(val):.2f}" in text
    assert min(val) - max(train) > 0.9


def test_study_driver_end_to_end(tmp_path):
    """run (train.py + eval.py per job) -> gather -> report -> plot on a tiny model, on this CPU."""
    study_module = _load_study_module()
    root = str(tmp_path / "collapse")
    tiny = [
        "--config.model.d_model=64",
        "--config.model.n_layer=1",
        "--config.model.dtype=float32",
        "--config.data.corpus=tiny",
        "--config.eval.num_batches=1",
        "--config.eval.batch_size=8",
        "--config.train.batch_size=16",
    ]  # after the driver's own flags, so these win
    status = study_module.run_jobs(["s"], [32], root, parallel=1, deadline_s=600, steps=3, extra_train=tiny)
    log = open(os.path.join(root, "s_T32", "job.log")).read()
    assert status["s_T32"]["rc"] == 0, log[-3000:]
    again = study_module.run_jobs(["s"], [32], root, parallel=1, deadline_s=600, steps=3, extra_train=tiny)
    assert again["s_T32"]["skipped"] == "already evaluated"  # a rerun does not redo finished jobs
    results = study_module.gather(root)
    (run,) = results["runs"]
    assert run["name"] == "s_T32" and run["train_len"] == 32 and run["eval_length"] == 64 * 32
    assert run["train"]["step"] == 3 and run["state_size"] == 1 * 2 * 64 * 128
    curves = run["curves"]["documents"]
    assert set(curves) == set(study_module.MITIGATION_ORDER)
    for c in curves.values():
        assert set(c["window_loss"]) == {"1x", "8x", "32x", "64x"}
        assert all(np.isfinite(v) and 0 < v < 2 * np.log(257) for v in c["window_loss"].values())
    assert results["excess_at_same_positions"]["s_T32"]["none"] is None  # 64 x 32 < 8192: outside the window
    st = run["states"]
    assert st["positions"][-1] == 64 * 32 and len(st["layer_median_norm"]) == 1
    assert results["capacity"]["points"][0]["t_forget_bound"] in ("upper", "lower")
    tables = study_module.report_tables(results)
    assert "| s_T32 |" in tables["runs"] and tables["mitigations"].count("| s_T32 |") == 5
    paths = study_module.plot(results, str(tmp_path / "figures"))
    assert all(os.path.getsize(p) > 5_000 for p in paths) and len(paths) == 5  # 2 sources, 1 run, norms, capacity


@pytest.mark.skipif(__import__("shutil").which("pgrep") is None, reason="needs pgrep (procps)")
def test_study_driver_kills_whole_jobs_at_the_deadline(tmp_path, monkeypatch):
    """A job still running at the deadline is killed with its children (train.py / eval.py under the shell)."""
    import subprocess
    import time

    study_module = _load_study_module()
    marker = tmp_path / "finished"
    monkeypatch.setattr(study_module, "job_command", lambda *a, **k: f"sleep 21.5 && touch {marker}")
    t0 = time.time()
    status = study_module.run_jobs(["s"], [32], str(tmp_path / "root"), parallel=1, deadline_s=1, steps=1)
    assert status["s_T32"]["rc"] is None and time.time() - t0 < 15
    time.sleep(0.5)
    # the shell's child (here sleep; in a real job train.py) must be gone, not only the shell
    alive = subprocess.run(["pgrep", "-x", "-f", "sleep 21.5"], capture_output=True, text=True).stdout.split()
    assert not alive and not marker.exists()


# --------------------------------------------------------------------------------------------------
# The Linux-kernel token study (experiments/state_collapse.py; docs/results/state_collapse/)
# --------------------------------------------------------------------------------------------------

SC_DIR = os.path.join(ROOT, "docs", "results", "state_collapse")


def _load_report_module():
    spec = importlib.util.spec_from_file_location("state_collapse_report", os.path.join(ROOT, "experiments", "state_collapse_report.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def flat(text):
    """RESULTS.md with every run of whitespace made one space (claims may wrap across lines)."""
    return " ".join(text.split())


@pytest.fixture(scope="module")
def sc_summary():
    """The study's summary recomputed from the committed raw data (not read from summary.json)."""
    return json.loads(json.dumps(_load_report_module().summarize(SC_DIR), default=_jsonable))


def _jsonable(x):
    return x.tolist() if isinstance(x, np.ndarray) else x.item() if isinstance(x, np.generic) else str(x)


def test_state_collapse_summary_is_the_raw_data_recomputed(sc_summary):
    with open(os.path.join(SC_DIR, "summary.json")) as f:
        committed = json.load(f)
    _close(committed, sc_summary)


def _close(a, b, path="summary") -> None:
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{path}: keys {sorted(a)} != {sorted(b)}"
        for k in a:
            _close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), f"{path}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and isinstance(b, (int, float)):
        assert a == pytest.approx(b, rel=1e-9, abs=1e-12), f"{path}: {a} != {b}"
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def test_state_collapse_tables_are_generated_from_the_raw_data(sc_summary, text):
    tables = _load_report_module().report_tables(sc_summary)
    assert set(tables) == {"sc_runs", "sc_mitigations", "sc_history", "sc_sources", "sc_t_forget"}
    for name, table in tables.items():
        block = re.search(rf"<!-- table:{name} -->\n(.*?)\n<!-- /table:{name} -->", text, re.S)
        assert block, f"RESULTS.md lacks the table {name}"
        assert block.group(1) == table, f"table {name} differs from the raw data; run the study's report"


def test_state_collapse_figures_and_commands(text):
    for png in re.findall(r"\((results/state_collapse/[\w.]+\.png)\)", text):
        assert os.path.getsize(os.path.join(ROOT, "docs", png)) > 10_000, png
    assert len(re.findall(r"results/state_collapse/[\w.]+\.png", text)) >= 3
    for path in (
        "experiments/state_collapse.py",
        "configs/proj/state_collapse/train.py",
        "configs/proj/state_collapse/eval.py",
        "ssm_jax.data.linux_corpus",
    ):
        assert path in text


def test_state_collapse_claims(sc_summary, flat):
    runs = {r["name"]: r for r in sc_summary["runs"]}
    evaluated = [runs[n] for n in ("47m_T256", "47m_T1024", "47m_T4096")]
    # no collapse at any T_train from 256 to 4,096, each evaluated on 32 prompts to 262,144 tokens
    assert [r["train_len"] for r in evaluated] == [256, 1024, 4096]
    assert all(not r["final"]["documents/none"]["collapsed"] for r in evaluated)
    assert all(r["final"]["documents/none"]["num_prompts"] == 32 for r in evaluated)
    ratios = [f"{r['final']['documents/none']['max_ratio']:.2f}" for r in evaluated]
    assert f"the largest ratios are {ratios[0]} (T_train 256), {ratios[1]} (1,024) and {ratios[2]} (4,096)" in flat
    tokens = sorted(r["tokens"] for r in evaluated)
    assert f"trained on {tokens[0] / 1e6:.0f}M-{tokens[-1] / 1e6:.0f}M tokens" in flat
    assert runs["47m_T256"]["steps"] == 2880 and runs["47m_T4096"]["steps"] == 2304
    r = runs["47m_T1024"]
    assert f"predicts T_forget of about {round(r['paper_t_forget'], -3):,.0f} tokens" in flat
    # 256 is below the paper's T_forget, and the bracket says so
    bracket = sc_summary["t_forget"]["47m"]
    assert bracket["longest_collapsed"] is None and bracket["shortest_not_collapsed"] == 256 < bracket["paper_t_forget"]
    big = sc_summary["t_forget"]["85m"]
    assert big["longest_collapsed"] is None and big["shortest_not_collapsed"] == 256
    n_s = big["state_size_with_conv"]
    assert f"at most {256 / n_s:.5f} tokens per state element at 85M against the paper's {big['paper_t_forget'] / n_s:.5f}" in flat
    assert f"256, {bracket['paper_t_forget'] / 256:.0f}x (47M) and {big['paper_t_forget'] / 256:.0f}x (85M) below" in flat
    # retention at the end of training, and at 16x
    ends = [f"{x['final_states']['retention_1x']['max']:.3f}" for x in evaluated]
    assert f"t = T_train is {ends[0]} (T_train 256), {ends[1]} (1,024) and {ends[2]} (4,096)" in flat
    worst16 = max(x["final_states"]["retention_16x"]["max"] for x in evaluated)
    assert f"at 16x T_train it is at most {worst16:.4f}" in flat
    # retention over training at T_train 256: rises, peaks, falls back while the rate is at its peak
    hist = runs["47m_T256"]["history"]
    assert [h["step"] for h in hist] == list(range(360, 2881, 360))
    ret = [h["states"]["retention_1x"]["max"] for h in hist]
    peak = max(range(len(ret)), key=ret.__getitem__)
    assert ret[0] < ret[peak] > ret[-1] and hist[peak]["step"] < 0.8 * 2880  # the peak precedes the decay phase
    assert f"goes from {ret[0]:.3f} (step {hist[0]['step']}) to {ret[peak]:.3f} (step {hist[peak]['step']:,})" in flat
    assert f"with {hist[peak]['states']['retention_1x']['heads_above_0.5']} heads above 0.5" in flat
    assert f"up to {max(h['states']['retention_16x']['max'] for h in hist):.3f}" in flat
    assert f"to {ret[-1]:.3f} at the end" in flat
    ratio = [h["documents/none"]["max_ratio"] for h in hist]
    top = max(range(len(hist) - 1), key=ratio.__getitem__)
    assert all(h["documents/none"]["num_prompts"] == 16 for h in hist[:-1])
    assert f"({ratio[0]:.2f} at step {hist[0]['step']}, {ratio[top]:.2f} at step {hist[top]['step']:,}, on the first 16" in flat
    assert f"drops in the final decay ({ratio[-1]:.2f} on all 32)" in flat
    # other text
    t256, t1024 = runs["47m_T256"]["extra"], runs["47m_T1024"]["extra"]
    assert f"reaches a ratio of {t256['newlines/none']['max_ratio']:.2f} on it ({t1024['newlines/none']['max_ratio']:.2f} at" in flat
    prose = max(x["extra"][k]["max_ratio"] for x in (runs["47m_T256"], r) for k in ("shakespeare/none", "kjv/none"))
    assert f"stays at {prose:.2f} or below" in flat and not any(c["collapsed"] for c in t256.values())
    # the scale of the paper's training
    assert f"1e10-token trainings ({1e10 / runs['85m_T256_long']['tokens']:.0f}x our longest)" in flat
    # the mitigations ran on 47m_T1024: no collapse to cure, each raises the loss at 64x T_train
    none = r["final"]["documents/none"]
    assert len(r["final"]) == 5 and not any(c["collapsed"] for c in r["final"].values())
    assert all(c["windows"]["64x"] > none["windows"]["64x"] for k, c in r["final"].items() if k != "documents/none")
    assert all(len(x["final"]) == 1 for x in (runs["47m_T256"], runs["47m_T4096"]))
    # the learning-rate check
    lr = sc_summary["lr_check"]
    assert lr["chosen"] == max(float(k) for k in lr["losses"]) == 4e-3
    assert "validation losses " + " / ".join(f"{lr['losses'][k]:.3f}" for k in ("0.001", "0.002", "0.004")) in flat
    # the runs that were not evaluated
    assert "final" not in runs["47m_T8192"] and "final" not in runs["85m_T2048"]
    # the evaluations the second session's deadline cut, run by hand after it: in the data, not in the status
    with open(os.path.join(SC_DIR, "status.json")) as f:
        jobs = json.load(f)["jobs"]
    by_hand = {
        "eval_history_47m_T256_step2160": ("47m_T256", "eval_history/step_2160"),
        "eval_history_47m_T256_step2520": ("47m_T256", "eval_history/step_2520"),
        "eval_history_47m_T4096_step2016": ("47m_T4096", "eval_history/step_2016"),
        "eval_extra_47m_T256": ("47m_T256", "eval_extra"),
    }
    for job, (run, sub) in by_hand.items():
        assert jobs[job]["rc"] != 0 and os.path.isfile(os.path.join(SC_DIR, run, sub, "loss_vs_position_fine.npz"))
    assert "cut four evaluations (47m_T256 at steps 2,160 and 2,520 and on other text, 47m_T4096 at step 2,016)" in flat


def _last_train_record(run: str) -> dict:
    with open(os.path.join(SC_DIR, run, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r.get("split") == "train"][-1]


def test_state_collapse_third_session_claims(sc_summary, flat):
    """47m_T256_long (twice the training, history only) and 85m_T256 (the non-forgetting head)."""
    runs = {r["name"]: r for r in sc_summary["runs"]}
    long, short, big = runs["47m_T256_long"], runs["47m_T256"], runs["85m_T256"]
    hist = long["history"]
    assert "final" not in long and [h["step"] for h in hist] == list(range(640, 3841, 640))
    assert all(h["documents/none"]["num_prompts"] == 16 and not h["documents/none"]["collapsed"] for h in hist)
    ratios = [h["documents/none"]["max_ratio"] for h in hist]
    assert f"stays between {min(ratios):.2f} and {max(ratios):.2f}" in flat
    earlier = [h["documents/none"]["max_ratio"] for h in short["history"][:-1]]
    assert f"({min(earlier):.2f}-{max(earlier):.2f} in the shorter run)" in flat
    ret = [(h["states"]["retention_1x"]["max"], h["step"]) for h in hist if "states" in h]
    assert (
        f"peaks at {max(ret)[0]:.3f} (step {max(ret)[1]:,}; "
        f"{max(h['states']['retention_1x']['max'] for h in short['history']):.3f} in the shorter run)" in flat
    )
    assert f"at steps 640 to 3,840 (up to {3840 * 65536 / 1e6:.0f}M tokens)" in flat
    assert f"reached step {long['steps']:,} ({long['tokens'] / 1e6:.0f}M tokens)" in flat
    assert f"(`47m_T256_long`, {_last_train_record('47m_T256_long')['tokens_per_s'] / 1e3:.0f}K tokens/s)" in flat
    # 85m_T256: evaluated at step 1,728 on 32 prompts (under 150M tokens); the same head, no collapse
    c = big["final"]["documents/none"]
    assert big["final_step"] == 1728 and c["num_prompts"] == 32 and not c["collapsed"]
    assert big["stopped_at_deadline"] and f"deadline at step {big['steps']:,}" in flat
    assert 1728 * 65536 < 150e6 and f"evaluated at\n  {1728 * 65536 / 1e6:.0f}M tokens)".replace("\n  ", " ") in flat
    assert f"the same head ({big['final_states']['retention_1x']['max']:.3f} at T_train) and a ratio of {c['max_ratio']:.2f}" in flat


def test_state_collapse_fourth_session_claims(sc_summary, flat):
    """85m_T256_long: 268M tokens, one head that does not forget at every checkpoint, and no collapse."""
    runs = {r["name"]: r for r in sc_summary["runs"]}
    run = runs["85m_T256_long"]
    hist, c = run["history"], run["final"]["documents/none"]
    assert run["steps"] == 4096 and not run["stopped_at_deadline"] and [h["step"] for h in hist] == list(range(512, 4097, 512))
    assert f"on {run['tokens'] / 1e6:.0f}M tokens (`85m_T256_long`: {run['steps']:,} steps" in flat
    assert f"alone on\n  the GPU at {_last_train_record('85m_T256_long')['tokens_per_s'] / 1e3:.0f}K tokens/s".replace("\n  ", " ") in flat
    assert f"({run['train_seconds']:.0f} s of training" in flat
    # one head, the same at every checkpoint, is the most retaining at 1x and 16x and the most grown
    report = _load_report_module()
    r1s, r16s, growth = [], [], []
    for step, d in report.evaluated_checkpoints(os.path.join(SC_DIR, "85m_T256_long")):
        states = report.read_json(os.path.join(d, "states.json"))
        r1 = np.asarray(states["retention"]["1x"]["retention"])  # (layers, heads)
        r16 = np.asarray(states["retention"]["16x"]["retention"])
        head = np.unravel_index(r1.argmax(), r1.shape)
        assert head == np.unravel_index(r16.argmax(), r16.shape) == tuple(states["most_grown_head"]) == (10, 4), step
        assert states["length"] == 16 * 256
        r1s.append(r1.max())
        r16s.append(r16.max())
        growth.append(states["max_sustained_norm_growth"])
    assert len(r1s) == 8 and "(layer 10, head 4, from 0)" in flat
    assert f"between {min(r1s):.3f} and {max(r1s):.3f} of the first token at t = T_train" in flat
    assert f"between {min(r16s):.3f} and {max(r16s):.3f} at 16x T_train" in flat
    assert f"{min(growth):.1f}x to {max(growth):.1f}x its level within T_train" in flat
    assert min(r1s) > 0.98 and sum(r > 0.95 for r in r16s) >= 6  # "above 0.99 ... 0.95-0.99 at 16x over most of training"
    assert f"ours keeps about {np.median(r16s):.2f} at 4K over most of training" in flat
    assert all(h["states"]["retention_1x"]["heads_above_0.5"] == 3 for h in hist) and "3 of 288 keep more than half" in flat
    assert all(h["states"]["retention_1x"]["median"] < 1e-6 for h in hist)
    # no collapse: the ratio over training on 16 prompts, and at the end on 32
    ratios = [h["documents/none"]["max_ratio"] for h in hist[:-1]]
    assert all(h["documents/none"]["num_prompts"] == 16 for h in hist[:-1]) and c["num_prompts"] == 32 and not c["collapsed"]
    assert f"stays\n  between {min(ratios):.2f} and {max(ratios):.2f} over training".replace("\n  ", " ") in flat
    assert f"is {c['max_ratio']:.2f} at the end on all 32" in flat
    assert f"within {max(ratios):.2f}x its level at T_train on every checkpoint and ends at {c['max_ratio']:.2f}x" in flat
    assert f"at\n  32-64x T_train ({c['windows']['64x']:.3f}) is below that at T_train ({c['windows']['1x']:.3f})".replace("\n  ", " ") in flat
    assert f"the 85M model {run['extra']['newlines/none']['max_ratio']:.2f})" in flat
    assert f"up to {runs['47m_T256_long']['history'][-1]['step'] * 65536 / 1e6:.0f}M (47M) and {run['tokens'] / 1e6:.0f}M" in flat


def test_retention_per_head_claims(flat):
    """The per-head retention figure's caption, from the committed states.json of every checkpoint."""
    report = _load_report_module()

    def per_head(run):
        return [
            (step, np.asarray(report.read_json(os.path.join(d, "states.json"))["retention"]["1x"]["retention"]))
            for step, d in report.evaluated_checkpoints(os.path.join(SC_DIR, run))
        ]  # (layers, heads) each

    short = [int((r > 0.05).sum()) for _, r in per_head("47m_T256")]
    assert len(short) == 8 and f"At T_train 256, {min(short)} to {max(short)} of the 192 heads keep more than 0.05" in flat
    long = per_head("47m_T4096")
    assert f"at 4,096 at most {max(int((r > 0.05).sum()) for _, r in long)} do" in flat
    from_step = next(step for step, r in long if r.max() > 0.05)
    argmaxes = {np.unravel_index(r.argmax(), r.shape) for step, r in long if step >= from_step}
    ((layer, _),) = argmaxes
    assert f"from step {from_step} on the largest is always the same head of layer {layer}" in flat
    big = [int((r > 0.05).sum()) for _, r in per_head("85m_T256_long")]
    assert len(big) == 8 and f"has {min(big)} to\n{max(big)} of its 288 heads above 0.05".replace("\n", " ") in flat
    assert os.path.getsize(os.path.join(SC_DIR, "retention_heads.png")) > 10_000


def test_state_collapse_corpus_record(flat):
    with open(os.path.join(SC_DIR, "corpus_manifest.json")) as f:
        manifest = json.load(f)
    src = manifest["source"]
    assert src["package"] == "linux-source-6.1" and f"version {src['version']}" in flat
    assert len(src["input_sha256"]) == 64 and "GPL-2.0" in src["license"]
    train = manifest["splits"]["train"]
    assert f"the first {train['tokens']:,} training tokens ({train['documents']:,} files)" in flat
    groups = manifest["groups"]["validation"]
    assert len(groups) == 32 and min(g["tokens"] + g["documents"] for g in groups) >= 524_288
    assert f"({src['split']['num_heldout_units']} units of" in flat
    with open(os.path.join(SC_DIR, "corpus_manifest_whole_split.json")) as f:
        whole = json.load(f)  # the subset 47m_T256_long read: all training tokens, the same held-out groups
    assert whole["groups"] == manifest["groups"] and whole["source"]["subset_of"]["train_tokens"] == 284_000_000
    assert f"the whole training split instead, {whole['splits']['train']['tokens']:,} tokens" in flat


def test_byte_study_corpus_figures(flat):
    """The appendix's corpus size and epochs, from the bundled corpus itself."""
    from ssm_jax.data import load_corpus, split_documents

    docs = load_corpus("shakespeare")
    total = sum(len(d.text.encode("utf-8")) for d in docs)
    train = sum(len(d.text.encode("utf-8")) for d in split_documents(docs, 0.1, 0)[0])
    assert f"{total / 1e6:.2f} MB corpus" in flat and f"{train / 1e6:.2f} MB training split" in flat
    assert f"about {600 * 65536 / train:.1f} epochs" in flat


def test_readme_results_paragraph(sc_summary):
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = " ".join(f.read().split())
    runs = {x["name"]: x for x in sc_summary["runs"]}
    evaluated = [runs[n] for n in ("47m_T256", "47m_T1024", "47m_T4096")]
    tokens = sorted(r["tokens"] for r in evaluated)
    assert f"trained on {tokens[0] / 1e6:.0f}M-{tokens[-1] / 1e6:.0f}M GPT-NeoX tokens" in readme
    ratios = [f"{r['final']['documents/none']['max_ratio']:.2f}" for r in evaluated]
    assert f"largest loss ratios after `T_train` {ratios[0]}, {ratios[1]} and {ratios[2]}" in readme
    ret = [f"{r['final_states']['retention_1x']['max']:.3f}" for r in evaluated]
    assert f"first-token retention at `T_train` {ret[0]}, {ret[1]} and {ret[2]}" in readme
    assert f"about {round(evaluated[0]['paper_t_forget'], -3):,.0f} tokens" in readme
    assert all(r["final"]["documents/none"]["num_prompts"] == 32 for r in evaluated)  # streamed past 64x T_train:
    assert all(r["final"]["documents/none"]["windows"].get("64x") is not None for r in evaluated)
    assert "at least 64x its training length on 32 held-out kernel directories" in readme
    big = runs["85m_T256_long"]
    r1, r16 = big["final_states"]["retention_1x"]["max"], big["final_states"]["retention_16x"]["max"]
    assert f"trained at `T_train` 256 on {big['tokens'] / 1e6:.0f}M tokens" in readme
    assert f"keeps {r1:.3f} of the first token at `T_train` and {r16:.3f} at 16x" in readme
    assert f"does not collapse (ratio {big['final']['documents/none']['max_ratio']:.2f})" in readme
    assert not big["final"]["documents/none"]["collapsed"]


def test_rfc_corpus_record(flat):
    """The prose corpus RESULTS.md names, from the manifest its builder wrote (``python -m ssm_jax.data.rfc_corpus
    --download``; copied from the corpus directory)."""
    with open(os.path.join(SC_DIR, "corpus_manifest_rfc.json")) as f:
        manifest = json.load(f)
    src = manifest["source"]
    assert src["packages"][0].startswith("doc-rfc-") and len(src["input_sha256"]) == len(src["packages"]) == 8
    splits = manifest["splits"]
    documents = sum(s["documents"] for s in splits.values())
    tokens = sum(s["tokens"] for s in splits.values())
    assert documents == src["file_counts"]["kept"] and f"({documents:,} documents, about {tokens / 1e6:.0f}M tokens" in flat
    assert round(268_435_456 / splits["train"]["tokens"]) == 3 and "would read it about three times" in flat
    assert len(manifest["groups"]["validation"]) == 32 and min(g["tokens"] for g in manifest["groups"]["validation"]) >= 262_144

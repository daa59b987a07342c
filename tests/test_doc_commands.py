"""The command lines the documentation shows run as written.

Scans README.md, docs/*.md and the docstrings of train.py, eval.py and configs/ for ``python train.py`` /
``python eval.py`` commands (new ones are picked up without editing this test). For each: the config file loads
(with its ``:arg``), every ``--config.x=y`` override names a real field with a value of that field's type (the
parsing of the scripts' own absl flags), and the config passes the checks: ``validate_config`` for training;
for evaluation the modes, mitigations, loss sources and lengths that ``ssm_jax.evaluators.config`` accepts. Also every
``config.section.field`` that the prose names is a field of the training or the evaluation config.
"""

from __future__ import annotations

import glob
import os
import re
import shlex
from typing import List, Tuple

import pytest
from train_helpers import REPO, load_config, parse_flags

from ssm_jax.evaluators import config as eval_config
from ssm_jax.evaluators.named_mitigations import MITIGATION_NAMES
from ssm_jax.evaluators.streams import SOURCES
from ssm_jax.train_config import validate_config

DOCS = ["README.md"] + sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "docs", "*.md")))
DOCSTRINGS = ["train.py", "eval.py"] + sorted(
    os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "configs", "**", "*.py"), recursive=True)
)
COMMAND = re.compile(r"python3? ((?:train|eval)\.py\b.*)")


def _read(path: str) -> str:
    with open(os.path.join(REPO, path), encoding="utf-8") as f:
        return f.read()


def find_commands(path: str) -> List[Tuple[str, List[str]]]:
    """``(where, argv)`` of every train.py / eval.py command in a file: continued lines (``\\``) joined,
    ``&&`` chains split, inline code cut at its closing backtick, ``<placeholders>`` kept as one word."""
    text = re.sub(r"\\\n\s*", " ", _read(path))
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        for part in line.split("&&"):
            match = COMMAND.search(part)
            if match:
                words = re.sub(r"<[^>]*>", "PLACEHOLDER", match.group(1).split("`")[0])
                found.append((f"{path}:{number}", shlex.split(words, comments=True)))
    return found


COMMANDS = [c for path in DOCS + DOCSTRINGS for c in find_commands(path)]


def test_the_scan_finds_the_documented_commands():
    where = {w.split(":")[0] for w, _ in COMMANDS}
    assert {"README.md", "train.py", "eval.py", "configs/passkey_finetune.py"} <= where
    scripts = [argv[0] for _, argv in COMMANDS]
    assert scripts.count("train.py") >= 8 and scripts.count("eval.py") >= 5
    readme = [argv for w, argv in COMMANDS if w.startswith("README.md")]
    assert ["train.py", "--config=configs/passkey_finetune.py:runs/default", "--workdir=runs/passkey"] in readme


@pytest.fixture
def in_a_checkout_with_the_documented_runs(tmp_path, monkeypatch):
    """A working directory with ``configs/`` and, for each documented ``--workdir``, a train.py work directory
    (so that a command that fine-tunes from another documented run finds it, and only then)."""
    os.symlink(os.path.join(REPO, "configs"), tmp_path / "configs")
    for _, argv in COMMANDS:
        for arg in argv:
            if arg.startswith("--workdir="):
                os.makedirs(tmp_path / arg.split("=", 1)[1].lstrip("/") / "checkpoints", exist_ok=True)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _rooted(argv: List[str], root) -> List[str]:
    """Absolute workdirs of the documentation (``/tmp/run``) moved under ``root``, where the fixture made them."""
    return [re.sub(r"(=|:)/tmp/", lambda m: f"{m.group(1)}{root}/tmp/", a) for a in argv]


def _check_eval_config(config) -> None:
    for mode in eval_config.parse_list(config.modes):
        assert mode in eval_config.MODES, f"config.modes: {mode!r} is not one of {eval_config.MODES}"
    for entry in eval_config.parse_list(config.mitigations):
        for name in entry.split("+"):
            assert name in MITIGATION_NAMES, f"config.mitigations: {name!r} is not one of {MITIGATION_NAMES}"
    for source in eval_config.parse_list(config.loss.sources):
        assert source in SOURCES, f"config.loss.sources: {source!r} is not one of {SOURCES}"
    for length in (config.loss.length, config.states.length):
        assert eval_config.parse_length(length, 2048) >= 1
    assert eval_config.parse_lengths(config.passkey.context_lengths, 2048)


@pytest.mark.parametrize("where,argv", COMMANDS, ids=[f"{w} {a[0]}" for w, a in COMMANDS])
def test_every_documented_command_parses_and_validates(where, argv, in_a_checkout_with_the_documented_runs):
    argv = _rooted(argv, in_a_checkout_with_the_documented_runs)
    assert any(a.startswith("--config=") for a in argv), f"{where}: no --config= (the script default is implicit)"
    config = parse_flags(argv)
    if argv[0] == "train.py":
        assert any(a.startswith("--workdir=") for a in argv), f"{where}: train.py needs --workdir"
        validate_config(config)
    else:
        _check_eval_config(config)


def _has_field(config, dotted: str) -> bool:
    node = config
    for name in dotted.split("."):
        if not hasattr(node, "keys") or name not in node.keys():
            return False
        node = node[name]
    return True


FIELD = re.compile(r"(?<![\w/.])-{0,2}config\.([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)")
FILES_NAMED_CONFIG = {"json"}  # `config.json`, the file, not a field


@pytest.mark.parametrize("path", DOCS)
def test_every_config_field_the_prose_names_exists(path):
    configs = (load_config("default.py"), load_config("eval/default.py"))
    unknown = sorted(
        {f"config.{name}" for name in FIELD.findall(_read(path)) if name not in FILES_NAMED_CONFIG and not any(_has_field(c, name) for c in configs)}
    )
    assert not unknown, f"{path} names config fields that do not exist: {unknown}"

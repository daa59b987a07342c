"""Config files: they load, validate, have the documented sizes, take CLI overrides, and bad values fail."""

import glob
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from train_helpers import CONFIG_DIR, REPO, load_config, parse_flags

from ssm_jax import train_lib
from ssm_jax.train_config import model_config_from, validate_config

CONFIG_FILES = sorted(os.path.basename(p) for p in glob.glob(os.path.join(CONFIG_DIR, "*.py")) if not os.path.basename(p).startswith("_"))


def _n_params(cfg):
    _, params = train_lib.abstract_model(cfg)
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_every_config_loads_and_validates(name):
    config = load_config(name)
    if config.init.required:  # fine-tuning configs need a source; any train.py workdir shape will do here
        config.init.required = False
    validate_config(config)
    model_config_from(config.model)


@pytest.mark.parametrize(
    "name,d_model,n_layer,heads",
    [
        ("mamba2_130m.py", 768, 24, 24),
        ("mamba2_370m.py", 1024, 48, 32),
        ("mamba2_780m.py", 1536, 48, 48),
        ("mamba2_1_3b.py", 2048, 48, 64),
        ("mamba2_2_7b.py", 2560, 64, 80),
    ],
)
def test_public_sizes(name, d_model, n_layer, heads):
    config = load_config(name)
    cfg = model_config_from(config.model)
    assert (cfg.d_model, cfg.n_layer, cfg.nheads, cfg.headdim, cfg.d_state, cfg.ngroups) == (d_model, n_layer, heads, 64, 128, 1)
    assert cfg.vocab_size == 50277 and cfg.padded_vocab_size == 50288 and config.data.tokenizer == "neox"
    assert (cfg.dtype, cfg.param_dtype) == ("bfloat16", "float32")
    assert config.optim.weight_decay == 0.1 and config.optim.clip_norm == 1.0 and config.optim.schedule == "wsd"


@pytest.mark.parametrize(
    "name,n_layer,d_model,millions",
    [
        ("paper_36m.py", 6, 512, 36.4),
        ("paper_47m.py", 12, 512, 47.0),
        ("paper_85m.py", 12, 768, 84.6),
    ],
)
def test_paper_small_sizes(name, n_layer, d_model, millions):
    cfg = model_config_from(load_config(name).model)
    assert (cfg.n_layer, cfg.d_model, cfg.nheads) == (n_layer, d_model, d_model // 32)
    assert abs(_n_params(cfg) / 1e6 - millions) / millions < 0.02


def test_cli_overrides_reach_every_section():
    c = parse_flags(
        [
            "prog",
            f"--config={os.path.join(CONFIG_DIR, 'default.py')}",
            "--config.model.d_model=64",
            "--config.train.tbptt=True",
            "--config.data.mode=stream",
            "--config.optim.lr=0.01",
            "--config.mesh.fsdp=2",
            "--config.model.dt_limit=(0.0,1.0)",
            "--config.init.workdir=/x",
            "--config.checkpoint.allow_config_change=True",
        ]
    )
    assert c.model.d_model == 64 and c.train.tbptt and c.data.mode == "stream" and c.optim.lr == 0.01
    assert c.mesh.fsdp == 2 and tuple(c.model.dt_limit) == (0.0, 1.0) and c.init.workdir == "/x"
    assert c.checkpoint.allow_config_change is True
    with pytest.raises(Exception, match="no_such_field"):
        parse_flags(["prog", f"--config={os.path.join(CONFIG_DIR, 'default.py')}", "--config.train.no_such_field=1"])


BAD = [
    ("data.mode", "nope", "data.mode"),
    ("data.seq_len", 0, "data.seq_len"),
    ("optim.lr", 0.0, "optim.lr"),
    ("optim.lr", -1e-3, "optim.lr"),
    ("optim.warmup_steps", 5000, "optim.warmup_steps"),
    ("optim.schedule", "linear", "optim.schedule"),
    ("train.nan_policy", "ignore", "train.nan_policy"),
    ("train.tbptt", True, "train.tbptt"),  # needs stream mode
    ("train.grad_accum_steps", 3, "train.batch_size"),  # 16 not divisible by 3
    ("train.num_steps", 0, "train.num_steps"),
    ("model.d_model", 100, "config.model"),  # 2 * 100 not a multiple of headdim 64
    ("model.dtype", "int8", "dtype"),
    ("model.vocab_size", 200, "model.vocab_size"),  # smaller than the byte tokenizer's 257
    ("data.tokenizer", "gpt2", "data.tokenizer"),
    ("checkpoint.every_steps", 0, "checkpoint.every_steps"),
    ("distributed.cpu_collectives", "nccl", "distributed.cpu_collectives"),
]


@pytest.mark.parametrize("field,value,expected", BAD, ids=[f"{f}={v}" for f, v, _ in BAD])
def test_invalid_values_are_rejected_naming_the_field(field, value, expected):
    config = load_config("default.py")
    section, key = field.split(".")
    config[section][key] = value
    with pytest.raises(ValueError, match=expected.replace(".", r"\.")):
        validate_config(config)


def test_device_dependent_checks():
    config = load_config("default.py")
    validate_config(config, num_devices=8, process_count=1)  # batch 16 over 8 devices
    config.train.batch_size = 12
    with pytest.raises(ValueError, match=r"train\.batch_size.*data-parallel size"):
        validate_config(config, num_devices=8, process_count=1)
    config.train.batch_size = 16
    config.mesh.update(data=3, fsdp=1)
    with pytest.raises(ValueError, match="config.mesh"):
        validate_config(config, num_devices=8)
    config.mesh.update(data=1, fsdp=1, seq=-1)
    config.data.seq_len = 250
    with pytest.raises(ValueError, match=r"data\.seq_len"):
        validate_config(config, num_devices=8)


def test_finetune_config_requires_a_source(tmp_path):
    config = load_config("passkey_finetune.py")
    with pytest.raises(ValueError, match=r"init\.workdir"):
        validate_config(config)
    with pytest.raises(ValueError, match=r"init\.workdir.*checkpoints"):
        validate_config(load_config("passkey_finetune.py", str(tmp_path)))


def test_train_py_rejects_a_bad_value_with_the_field_name(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
    out = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, "train.py"),
            f"--config={os.path.join(CONFIG_DIR, 'tiny.py')}",
            f"--workdir={tmp_path}",
            "--config.optim.lr=-0.5",
            "--config.data.seq_len=0",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=120,
    )
    assert out.returncode != 0
    assert "config.optim.lr=-0.5" in out.stderr and "config.data.seq_len=0" in out.stderr
    assert not os.path.exists(os.path.join(tmp_path, "checkpoints"))  # rejected before doing anything

"""Dtype arguments in every form JAX users write (a string, a jnp scalar type, a np.dtype), stored by name; in
training configs too, where the value given may be any of them and the recorded config stays JSON."""

import json
import os

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from ssm_jax.dtypes import dtype_name
from ssm_jax.train_config import base_config, model_config_from, record_model_config, validate_config

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


@pytest.mark.parametrize(
    "form,name",
    [
        ("bfloat16", "bfloat16"),
        (jnp.bfloat16, "bfloat16"),
        (np.dtype(ml_dtypes.bfloat16), "bfloat16"),
        (ml_dtypes.bfloat16, "bfloat16"),
        ("float32", "float32"),
        (jnp.float32, "float32"),
        (np.float32, "float32"),
        (np.dtype("float16"), "float16"),
        (jnp.dtype("float64"), "float64"),
    ],
)
def test_every_form_has_one_name(form, name):
    assert dtype_name(form, "dtype") == name


@pytest.mark.parametrize("bad", [float, "int8", "bf16", jnp.int32, np.dtype("int32"), np.dtype("complex64"), None, 16])
def test_anything_else_names_the_argument(bad):
    with pytest.raises(ValueError, match=r"^`my_arg` must be one of \['bfloat16', 'float16', 'float32', 'float64'\]"):
        dtype_name(bad, "my_arg")


def test_config_values_in_every_form_are_recorded_by_name():
    config = base_config()
    config.model.dtype = jnp.bfloat16
    config.model.param_dtype = np.dtype("float32")
    config.model.remat = True  # the former boolean field
    resolved = config.copy_and_resolve_references()  # what train.py runs on
    validate_config(resolved)
    model_cfg = model_config_from(resolved.model)
    assert (model_cfg.dtype, model_cfg.param_dtype, model_cfg.remat) == ("bfloat16", "float32", "full")
    record_model_config(resolved, model_cfg)
    saved = json.loads(resolved.to_json())
    assert (saved["model"]["dtype"], saved["model"]["param_dtype"], saved["model"]["remat"]) == ("bfloat16", "float32", "full")
    config.model.dtype = jnp.int8
    with pytest.raises(ValueError, match=r"`config\.model\.dtype` must be one of"):
        validate_config(config)


def test_command_line_overrides_of_the_new_fields():
    argv = [
        "prog",
        f"--config={os.path.join(CONFIG_DIR, 'default.py')}",
        "--config.model.dtype=bfloat16",
        "--config.model.param_dtype=float32",
        "--config.model.remat=dots",
        "--config.model.d_ssm=128",
        "--config.model.norm_before_gate=True",
    ]
    fv = flags.FlagValues()
    # The override flags are read from the command line when the config flag is defined (sys_argv).
    holder = config_flags.DEFINE_config_file("config", None, "config", flag_values=fv, sys_argv=argv)
    fv(argv)
    model_cfg = model_config_from(holder.value.model)
    assert (model_cfg.dtype, model_cfg.remat, model_cfg.d_ssm, model_cfg.norm_before_gate) == ("bfloat16", "dots", 128, True)

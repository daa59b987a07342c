"""ssm_jax.io: result files are strict JSON, and a failed write leaves the previous file whole."""

import json
import os

import numpy as np
import pytest

from ssm_jax.io import jsonable, write_json, write_text


def _strict(text):
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def test_write_json_is_strict(tmp_path):
    path = str(tmp_path / "sub" / "r.json")  # the directory is created
    obj = {
        "a": np.float32(1.5),
        "b": np.arange(3, dtype=np.int64),
        "c": [np.nan, np.inf, -np.inf, 2.0],
        "d": {3: np.bool_(True), "e": (np.int32(7), "x")},
        "f": None,
    }
    assert write_json(path, obj) == path
    back = _strict(open(path).read())
    assert back == {"a": 1.5, "b": [0, 1, 2], "c": [None, None, None, 2.0], "d": {"3": True, "e": [7, "x"]}, "f": None}
    assert back == jsonable(obj) and os.listdir(tmp_path / "sub") == ["r.json"]  # no temporary file left


def test_a_failed_write_keeps_the_previous_file(tmp_path):
    path = str(tmp_path / "r.json")
    write_json(path, {"step": 1})
    with pytest.raises(TypeError):
        write_json(path, {"step": object()})
    assert _strict(open(path).read()) == {"step": 1} and os.listdir(tmp_path) == ["r.json"]
    write_text(path, "replaced\n")
    assert open(path).read() == "replaced\n"

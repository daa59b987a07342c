"""The Colab notebook runs top to bottom (so it cannot rot)."""

import os

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_state_collapse_notebook_executes(tmp_path):
    path = os.path.join(ROOT, "notebooks", "state_collapse.ipynb")
    notebook = nbformat.read(path, as_version=4)
    env_repo = os.environ.get("SSM_JAX_REPO")
    os.environ["SSM_JAX_REPO"] = ROOT
    try:
        client = nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
        client.execute()
    finally:
        if env_repo is None:
            os.environ.pop("SSM_JAX_REPO")
        else:
            os.environ["SSM_JAX_REPO"] = env_repo
    outputs = "".join(o.get("text", "") for c in notebook.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "state outliers: [StateOutlier(layer=1, head=3" in outputs
    for name in ("state_norm_heatmap.png", "retention.png", "histograms.png", "loss_vs_position.png"):
        assert (tmp_path / name).stat().st_size > 5000

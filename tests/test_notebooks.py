"""The Colab notebooks run top to bottom in smoke mode, and are committed without outputs."""

import json
import os
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "colab").glob("*.ipynb"))
TIMEOUT_S = 180


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_committed_without_outputs(path):
    notebook = json.loads(path.read_text())
    for cell in notebook["cells"]:
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [], f"{path.name}: strip outputs before committing"
            assert cell["execution_count"] is None, f"{path.name}: strip execution counts"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_in_smoke_mode(path, fashion_mnist_data_dir, tmp_path, monkeypatch):
    nbclient = pytest.importorskip("nbclient")
    nbformat = pytest.importorskip("nbformat")
    monkeypatch.setenv("SIMCLR_NOTEBOOK_SMOKE", "1")
    monkeypatch.setenv("SIMCLR_NOTEBOOK_WORKDIR", str(tmp_path / "work"))
    monkeypatch.setenv("TFDS_DATA_DIR", fashion_mnist_data_dir)
    # The kernel spec starts "python": make that this interpreter (e.g. .venv's), whatever PATH.
    monkeypatch.setenv(
        "PATH", os.pathsep.join([os.path.dirname(sys.executable), os.environ["PATH"]])
    )
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        notebook, timeout=TIMEOUT_S, kernel_name="python3", resources={"metadata": {"path": ROOT}}
    )
    client.execute()
    text = "".join(
        output.get("text", "") + json.dumps(output.get("data", {}))
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
    )
    assert "final loss:" in text
    loss = float(text.split("final loss:")[1].split()[0])
    assert loss == loss and abs(loss) < 1e6
    assert (tmp_path / "work" / "results.json").exists()

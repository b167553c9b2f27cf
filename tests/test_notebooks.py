"""The Colab notebooks run top to bottom in smoke mode, and are committed without outputs."""

import json
import math
import os
import pathlib
import re
import sys

import cli_runs
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "colab").glob("*.ipynb"))
TIMEOUT_S = 180

# What each notebook's smoke run must print: labels each followed by a finite number, and
# lines printed verbatim; and the files it must leave in SIMCLR_NOTEBOOK_WORKDIR.
EXPECTED = {
    "01_quickstart.ipynb": {
        "numbers": ("final loss:", "linear probe top-1:", "kNN top-1:", "embedding map of"),
        "lines": (),
        "files": ("results.json", "metrics.jsonl", "curves.png", "embedding_tsne.png"),
    },
    "02_cifar10_accelerators.ipynb": {
        "numbers": ("linear_probe_top1:", "knn_k10_top1:", "time per epoch:"),
        # simclr_jax/configs/tiny.py global batch of 32 over the 8 test devices (tests/conftest.py).
        "lines": ("global batch 32 = 8 devices × 4 images per device (2 views each)",),
        "files": ("results.json", "metrics.jsonl", "checkpoints"),
    },
    "03_functional_api.ipynb": {
        "numbers": (
            "nt_xent matches plain jnp:",
            "final loss:",
            "kNN top-1 of the random encoder:",
            "kNN top-1 after pretraining:",
        ),
        "lines": (
            "8 devices, 8 images per device",
            "weight decay alone moves exactly the included leaves: True",
            # SmallConvNet's 3 batch norms (scale, bias), the head's 2 (2 scales, 1 bias) and the
            # probe (kernel, bias) are excluded; 3 conv kernels and 2 dense kernels are not.
            "excluded from weight decay and trust ratio: 11 of 16 leaves",
        ),
        "files": (),
    },
}


def _number_after(text: str, label: str) -> float:
    """The number printed right after ``label`` (a trailing % or comma is dropped)."""
    assert label in text, f"{label!r} was not printed"
    match = re.match(r"\s*([-+0-9.eE]+)", text.split(label, 1)[1])
    assert match, f"no number after {label!r}"
    return float(match.group(1))


def test_every_notebook_has_expectations():
    assert sorted(EXPECTED) == [path.name for path in NOTEBOOKS]


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
    workdir = tmp_path / "work"
    monkeypatch.setenv("SIMCLR_NOTEBOOK_SMOKE", "1")
    monkeypatch.setenv("SIMCLR_NOTEBOOK_WORKDIR", str(workdir))
    monkeypatch.setenv("TFDS_DATA_DIR", fashion_mnist_data_dir)
    # The kernel spec starts "python": make that this interpreter (e.g. .venv's), whatever PATH.
    monkeypatch.setenv(
        "PATH", os.pathsep.join([os.path.dirname(sys.executable), os.environ["PATH"]])
    )
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    for name, value in cli_runs.compilation_cache_environment().items():
        monkeypatch.setenv(name, value)
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        notebook, timeout=TIMEOUT_S, kernel_name="python3", resources={"metadata": {"path": ROOT}}
    )
    client.execute()
    text = "".join(
        output.get("text", "") + json.dumps(output.get("data", {}), ensure_ascii=False)
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
    )
    expected = EXPECTED[path.name]
    for label in expected["numbers"]:
        value = _number_after(text, label)
        assert math.isfinite(value) and abs(value) < 1e6, f"{label} {value}"
    for line in expected["lines"]:
        assert line in text
    for name in expected["files"]:
        assert (workdir / name).exists(), f"{path.name} left no {name} in its workdir"

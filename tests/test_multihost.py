"""Several JAX processes on one machine (CPU, gloo collectives) behave as one process."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "multihost_worker.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _launch(mode: str, outputs: list[str], devices_per_process: int, *args: str) -> None:
    """Runs one worker per output file, as processes of one JAX job; fails on any error."""
    port = str(_free_port())
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices_per_process}",
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), str(WORKER.parent)]),
    }
    count = str(len(outputs))
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), mode, out, str(i), count, port, *args],
            cwd=REPO_ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i, out in enumerate(outputs)
    ]
    try:
        logs = [p.communicate(timeout=400)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for i, (p, log) in enumerate(zip(procs, logs, strict=True)):
        assert p.returncode == 0, f"process {i} failed:\n{log[-3000:]}"


def test_two_processes_train_like_one(tmp_path):
    outputs = [str(tmp_path / f"process{i}.npz") for i in range(2)]
    _launch("step", outputs, 2)
    reference = str(tmp_path / "single.npz")
    _launch("step", [reference], 4)
    expected = np.load(reference)
    assert len(expected.files) > 4
    for out in outputs:
        got = np.load(out)
        assert got.files == expected.files
        for name in expected.files:
            np.testing.assert_allclose(
                got[name], expected[name], rtol=1e-5, atol=1e-6, err_msg=name
            )


@pytest.mark.slow  # two 2-process trainer runs with evaluation: ~4 min on 2 cores
def test_sigterm_on_one_process_stops_both_then_the_run_resumes(tmp_path, fashion_mnist_data_dir):
    workdir = str(tmp_path / "run")
    stopped = [str(tmp_path / f"stopped{i}.json") for i in range(2)]
    # Only process 1 is signalled, while it logs step 2; both agree to stop there (a log step):
    # without the agreement process 0 would train on alone and wait forever in step 3.
    _launch("train", stopped, 1, fashion_mnist_data_dir, workdir, "2")
    first, second = (json.loads(Path(p).read_text()) for p in stopped)
    assert first == second == {"completed": False, "checkpoints": [2]}
    assert not (Path(workdir) / "results.json").exists()

    resumed = [str(tmp_path / f"resumed{i}.json") for i in range(2)]
    _launch("train", resumed, 1, fashion_mnist_data_dir, workdir, "0")
    for p in resumed:
        assert json.loads(Path(p).read_text()) == {"completed": True, "checkpoints": [2, 4, 8]}
    assert "steps" in json.loads((Path(workdir) / "results.json").read_text())
    logged = [json.loads(line)["step"] for line in (Path(workdir) / "metrics.jsonl").open()]
    assert logged == [2, 4, 6, 8]  # one process logs, each step once

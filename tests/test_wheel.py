"""The package as users install it: a wheel in a fresh virtual environment, run from elsewhere.

Builds the wheel, installs it (and its dependencies) into a new virtual environment outside the
checkout, then, from another directory, trains the shipped ``tiny`` config by name and loads the
run with ``encoder.from_checkpoint``. ``SIMCLR_JAX_WHEEL_PYTHON`` picks the interpreter of that
environment (CI sets the newest supported Python, so pip resolves the newest JAX and Flax there);
by default it is the one running the tests.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent

ENCODE = """
import json, sys
import numpy as np
import simclr_jax
from simclr_jax import encoder
restored = encoder.from_checkpoint(sys.argv[1])
h = np.asarray(restored(np.zeros((4, *restored.image_shape), np.float32)))
finite = bool(np.isfinite(h).all())
print(json.dumps({"package": simclr_jax.__file__, "h": list(h.shape), "finite": finite}))
"""


def _run(command: list[str], cwd: pathlib.Path, env: dict[str, str]) -> str:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, (
        f"{' '.join(command)}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )
    return result.stdout


@pytest.mark.slow
def test_wheel_trains_and_restores_outside_the_checkout(tmp_path, fashion_mnist_data_dir):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "PYTHONPATH")}
    wheels, venv, elsewhere = tmp_path / "wheels", tmp_path / "venv", tmp_path / "elsewhere"
    elsewhere.mkdir()
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "-w",
            str(wheels),
            str(REPO_ROOT),
        ],
        tmp_path,
        env,
    )
    (wheel,) = wheels.glob("simclr_jax-*.whl")
    python = os.environ.get("SIMCLR_JAX_WHEEL_PYTHON") or sys.executable
    _run([python, "-m", "venv", str(venv)], tmp_path, env)
    venv_python = str(venv / "bin" / "python")
    _run([venv_python, "-m", "pip", "install", "-q", str(wheel)], tmp_path, env)

    workdir = tmp_path / "run"
    output = _run(
        [
            venv_python,
            "-m",
            "simclr_jax.train",
            "--config=tiny",
            f"--workdir={workdir}",
            f"--config.data_dir={fashion_mnist_data_dir}",
        ],
        elsewhere,
        env,
    )
    assert "kernels: " in output
    results = json.loads((workdir / "results.json").read_text())
    assert results["steps"] == 8 and 0.0 <= results["linear_probe_top1"] <= 1.0

    encoded = json.loads(
        _run([venv_python, "-c", ENCODE, str(workdir)], elsewhere, env).splitlines()[-1]
    )
    assert pathlib.Path(encoded["package"]).is_relative_to(venv)
    assert encoded["h"] == [4, 32] and encoded["finite"]  # ResNet-18 at base width 4: 8 * 4

"""The GPU check: its smoke run end to end on a CPU, its peak table and its MFU arithmetic."""

import json
import subprocess
import sys

import cli_runs
import jax
import pytest

from simclr_jax import benchmark, gpu_check
from simclr_jax.benchmark import StepSetup

# The check's two timed steps where TensorFlow and TFDS cannot be imported (a GPU image with JAX
# alone): importing fails on the first module that asks for either.
WITHOUT_TENSORFLOW = """
import argparse, json, sys
sys.modules["tensorflow"] = sys.modules["tensorflow_datasets"] = None
from simclr_jax import benchmark, gpu_check
args = argparse.Namespace(steps=1, warmup=0, devices=1)
steps = {
    name: gpu_check.time_step(gpu_check.recipe_step(name, 2, smoke=True), args, None)
    for name in ("cifar10_resnet18", "imagenet_resnet50")
}
imported = [
    name for name, module in sys.modules.items()
    if module and name.startswith(("tensorflow", "simclr_jax.data."))
]
print(json.dumps({"steps": steps, "imported": imported}))
"""


def test_published_peaks_by_device_kind():
    names = {
        "NVIDIA A100-SXM4-80GB": "A100",
        "NVIDIA A100-PCIE-40GB": "A100",
        "NVIDIA H100 80GB HBM3": "H100 SXM",
        "NVIDIA H100 PCIe": "H100 PCIe",
        "NVIDIA H200": "H200 SXM",
        "NVIDIA L4": "L4",
        "NVIDIA L40S": "L40S",  # not an L4
        "NVIDIA A10": "A10",  # not an A100
    }
    for kind, name in names.items():
        assert gpu_check.gpu_for_kind(kind).name == name, kind
    assert gpu_check.gpu_for_kind("cpu") is None
    a100 = gpu_check.gpu_for_kind("NVIDIA A100-SXM4-40GB")
    assert gpu_check.peak_flops_per_device(a100, "bfloat16", {}) == 312e12
    assert gpu_check.peak_flops_per_device(a100, "float32", {}) == 156e12  # TF32
    measured = {"matmul_peak_flops_per_s": 8e11, "devices": 2}
    assert gpu_check.peak_flops_per_device(None, "bfloat16", measured) == 4e11


def test_mfu_and_epoch_time_against_a_hand_computation():
    # Two A100s, B=512 (256 per GPU): 3e12 FLOPs per step over both, 50 ms per step.
    # Per GPU 1.5e12 / 0.05 s = 3e13 FLOP/s; against 312 TFLOP/s bf16: 0.096154.
    setup = StepSetup(depth=50, batch=512, dtype="bfloat16")
    record = {
        "devices": 2,
        "flops_per_step": 3e12,
        "median_step_s": 0.05,
        "views_per_s": 20480.0,
        "steps": 20,
        "conv_impl_resolved": "xla",
    }
    fields = gpu_check.step_fields(setup, record, 312e12)
    assert fields["batch_per_device"] == 256 and fields["flops_per_device_per_step"] == 1.5e12
    assert fields["mfu"] == pytest.approx(0.0961538, rel=1e-6)
    assert fields["views_per_s"] == 20480.0
    # A CIFAR-10 epoch at B=512: 50,000 // 512 = 97 steps of 50 ms, 4.85 s.
    assert gpu_check.cifar10_epoch_fields(fields) == {
        "cifar10_steps_per_epoch": 97,
        "cifar10_epoch_s": pytest.approx(4.85),
    }


def test_the_smoke_run_prints_one_consistent_json_line(capsys, fashion_mnist_data_dir):
    gpu_check.main(["--smoke", "--devices=1", f"--data-dir={fashion_mnist_data_dir}"])
    (line,) = capsys.readouterr().out.splitlines()
    record = json.loads(line)
    assert record["smoke"] and record["backend"] == "cpu" and record["devices"] == 1
    assert record["gpu"] is None and record["peak_source"].startswith("measured float32 matmul")
    resnet50, resnet18 = record["resnet50_bf16"], record["resnet18_cifar10"]
    # --smoke trains ResNet-18s of width 2: the ImageNet one in bfloat16, the CIFAR one in float32.
    assert (resnet50["depth"], resnet50["base_width"], resnet50["dtype"]) == (18, 2, "bfloat16")
    assert (resnet18["depth"], resnet18["base_width"], resnet18["dtype"]) == (18, 2, "float32")
    for step in (resnet50, resnet18):
        assert step["batch"] == step["batch_per_device"] == 2 and step["steps"] == 2
        assert step["views_per_s"] == pytest.approx(2 * 2 / step["median_step_s"], rel=1e-3)
        mfu = step["flops_per_device_per_step"] / step["median_step_s"]
        assert step["mfu"] == pytest.approx(mfu / step["peak_flops_per_s_per_device"])
        assert 0 < step["mfu"] < 1
    assert resnet18["cifar10_steps_per_epoch"] == 50_000 // 2
    assert resnet18["cifar10_epoch_s"] == pytest.approx(25_000 * resnet18["median_step_s"])
    run = record["fashion_mnist_run"]
    assert run["config"] == "tiny" and run["steps"] == 4 and run["views_per_s"] > 0
    assert 0 <= run["data_wait_fraction"] <= 1


def test_the_timed_steps_import_and_run_without_tensorflow():
    result = subprocess.run(
        [sys.executable, "-c", WITHOUT_TENSORFLOW],
        cwd=cli_runs.REPO_ROOT,
        capture_output=True,
        text=True,
        env=cli_runs.environment(),
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout.splitlines()[-1])
    # Only the TensorFlow-free metadata module of the data package, and no TensorFlow at all.
    assert record["imported"] == ["simclr_jax.data.metadata"]
    cifar10, imagenet = record["steps"]["cifar10_resnet18"], record["steps"]["imagenet_resnet50"]
    assert cifar10["image_size"] == imagenet["image_size"] == 16  # --smoke's size
    for step in (cifar10, imagenet):
        assert step["flops_per_device_per_step"] > 0 and 0 < step["mfu"] < 1


def test_no_gpu_or_no_data_is_one_error_line(tmp_path):
    with pytest.raises(SystemExit, match=r"^error: JAX's backend is 'cpu', not 'gpu': install"):
        gpu_check.main([])
    with pytest.raises(SystemExit, match=r"^error: Fashion-MNIST source files not found: ") as info:
        gpu_check.main(
            ["--smoke", f"--fashion-mnist-files={tmp_path}", f"--data-dir={tmp_path / 'tfds'}"]
        )
    assert "\n" not in str(info.value.code)


@pytest.mark.parametrize(
    "main, argv",
    [
        # Data that is not there: the platforms are named before the data is looked for.
        (gpu_check.main, ["--smoke", "--fashion-mnist-files=/absent", "--data-dir=/absent/tfds"]),
        (benchmark.main, ["--width=4", "--image-size=8", "--channels=1", "--batch=8"]),
    ],
)
def test_platforms_without_the_cpu_are_one_error_line_before_any_timing(main, argv, monkeypatch):
    """Under JAX_PLATFORMS=cuda JAX has no CPU backend, on which the steps' FLOPs are counted:
    both programs say so in one line before they prepare data or time a step."""
    local_devices = jax.local_devices

    def devices_without_the_cpu(*args, backend=None, **kwargs):
        if backend == "cpu":  # what JAX raises for a backend JAX_PLATFORMS leaves out
            raise RuntimeError("Unknown backend cpu. Available backends are ['cuda']")
        return local_devices(*args, backend=backend, **kwargs)

    monkeypatch.setattr(jax, "local_devices", devices_without_the_cpu)
    monkeypatch.setenv("JAX_PLATFORMS", "cuda")
    expected = r"^error: JAX_PLATFORMS='cuda' leaves out JAX's CPU backend, .*=cuda,cpu\)"
    with pytest.raises(SystemExit, match=expected) as info:
        main(argv)
    assert "\n" not in str(info.value.code)

"""The train step compiled ahead of time for TPU topologies on this CPU host (no TPU needed).

libtpu compiles for TPU topologies that ``jax.experimental.topologies`` describes; the program's
kernels must then be chosen for the TPU, not for the CPU host that compiles it (``conv_impl``
"auto" here would otherwise put the CPU-only oneDNN custom calls into it). Needs libtpu
(``make tpu-compiler`` keeps it in ``.tpu-compiler/``; x86-64 Linux); elsewhere the tests that
compile skip.
"""

import json
import re

import jax
import pytest

from simclr_jax import compile_check, parallel
from simclr_jax.configs import imagenet_resnet50, tiny
from simclr_jax.experiment import Experiment
from simclr_jax.models import XLA_LAYERS

# JAX reads libtpu's variables when it first loads libtpu, i.e. in the first topology described.
needs_libtpu = pytest.mark.skipif(
    not compile_check.configure_libtpu(),
    reason="libtpu is not installed (make tpu-compiler; x86-64 Linux)",
)
V5E = next(chip for chip in compile_check.CHIPS if chip.name == "v5e")


@pytest.fixture(autouse=True)
def _no_compilation_cache():
    """Keeps TPU programs out of the suite's persistent compilation cache: a compile-only
    client cannot load them back (JAX warns, then compiles again)."""
    enabled = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    yield
    jax.config.update("jax_enable_compilation_cache", enabled)


def _tiny(data_dir: str):
    config = tiny.get_config()
    config.data_dir = data_dir
    return config


def test_projection_against_a_hand_computation():
    # 1.26e13 FLOPs per chip at 40% of 197 TFLOP/s: 1.26e13 / 7.88e13 = 0.15990 s per step;
    # ImageNet at B=4096 is 1,281,167 // 4096 = 312 steps, 49.89 s per epoch.
    projected = compile_check.projection(1.26e13, V5E, 0.4, 312)
    assert projected["projected_step_s"] == pytest.approx(0.159898, rel=1e-5)
    assert projected["projected_epoch_s"] == pytest.approx(49.888, rel=1e-4)
    assert V5E.hbm_bytes == 16 * 2**30 and V5E.peak_bf16_flops_per_s == 197e12


def test_an_unprepared_dataset_takes_its_published_size(tmp_path):
    config = imagenet_resnet50.get_config()
    config.data_dir = str(tmp_path)  # nothing prepared there
    info = compile_check.dataset_info(config)
    assert (info.num_examples, info.num_classes) == (1_281_167, 1000)
    config.train_split = "train[:10%]"
    with pytest.raises(ValueError, match="no published size"):
        compile_check.dataset_info(config)


def test_missing_libtpu_is_one_error_line(monkeypatch):
    monkeypatch.setattr(compile_check, "configure_libtpu", lambda: False)
    with pytest.raises(SystemExit, match=r"^error: libtpu is not installed: run `make tpu-comp"):
        compile_check.main(["--config=cifar10_resnet18", "--topology=v5e:2x2"])


@needs_libtpu
def test_an_unknown_topology_is_one_error_line():
    with pytest.raises(SystemExit, match=r"^error: cannot describe TPU topology 'v5e:3x7'"):
        compile_check.main(["--config=cifar10_resnet18", "--topology=v5e:3x7"])


@needs_libtpu
def test_the_command_prints_one_json_line_per_topology(capsys, fashion_mnist_data_dir):
    compile_check.main(
        ["--config=tiny", f"--config.data_dir={fashion_mnist_data_dir}", "--topology=v5e:2x2"]
    )
    (line,) = capsys.readouterr().out.splitlines()
    record = json.loads(line)
    assert record["topology"] == "v5e:2x2" and record["chip"] == "v5e"
    assert record["devices"] == 4 and record["hosts"] == 1
    assert 0 < record["total_bytes_per_device"] < record["hbm_bytes_per_chip"] == V5E.hbm_bytes
    assert record["fits"] and record["embed_flops_per_device"] > 0
    # tiny pretrains on 256 examples at B=32; the step's FLOPs at 40% of 197 TFLOP/s.
    assert record["steps_per_epoch"] == 8 and record["assumed_mfu"] == 0.4
    step_s = record["flops_per_device_per_step"] / (0.4 * 197e12)
    assert record["projected_step_s"] == pytest.approx(step_s)
    assert record["projected_epoch_s"] == pytest.approx(8 * step_s)


@needs_libtpu
def test_tpu_step_has_xla_kernels_and_the_flops_of_the_cpu_step(fashion_mnist_data_dir):
    config = _tiny(fashion_mnist_data_dir)
    assert config.model.conv_impl == "auto"
    experiment = Experiment(
        config, parallel.data_mesh(compile_check.topology_devices("v5e:2x2")), check_images=False
    )
    assert experiment.layers == XLA_LAYERS and jax.default_backend() == "cpu"
    compiled = compile_check.compile_train_step(experiment)
    targets = set(re.findall(r'custom_call_target="([^"]+)"', compiled.as_text()))
    assert not {t for t in targets if t.startswith("simclr_")}, targets

    # The same step on one CPU device does the work of all four chips: XLA counts FLOPs per
    # device, and the TPU program splits the batch four ways.
    config.model.conv_impl = "xla"
    cpu = Experiment(config, parallel.data_mesh(jax.devices("cpu")[:1]), check_images=False)
    cpu_flops = compile_check.compiled_flops(compile_check.compile_train_step(cpu))
    assert compile_check.compiled_flops(compiled) * 4 == pytest.approx(cpu_flops, rel=0.03)


@needs_libtpu
def test_two_slices_compile_with_the_data_axis_over_both(fashion_mnist_data_dir):
    devices = compile_check.topology_devices("v5e:2x2", num_slices=2)
    mesh = parallel.data_mesh(devices)
    assert mesh.devices.shape == (8,)
    assert [d.slice_index for d in mesh.devices.flat] == [0] * 4 + [1] * 4
    config = _tiny(fashion_mnist_data_dir)
    record = compile_check.check_topology(
        config, compile_check.dataset_info(config), "v5e:2x2", num_slices=2
    )
    assert record["devices"] == 8 and record["num_slices"] == 2 and record["fits"]
    assert record["flops_per_device_per_step"] > 0


@needs_libtpu
def test_a_step_libtpu_refuses_for_memory_is_a_line_that_does_not_fit(
    monkeypatch, fashion_mnist_data_dir
):
    def out_of_memory(experiment):
        raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Ran out of memory on HBM, ...")

    monkeypatch.setattr(compile_check, "compile_train_step", out_of_memory)
    config = _tiny(fashion_mnist_data_dir)
    record = compile_check.check_topology(config, compile_check.dataset_info(config), "v5e:2x2")
    assert record["fits"] is False and record["compile_error"].startswith("RESOURCE_EXHAUSTED")
    assert record["devices"] == 4 and "flops_per_device_per_step" not in record


@needs_libtpu
def test_v3_devices_are_tensorcores_with_half_a_chips_figures():
    devices = compile_check.topology_devices("v3:2x2")
    assert len(devices) == 8  # 4 chips of two TensorCores
    v3 = compile_check.chip(devices)
    assert (v3.name, v3.peak_bf16_flops_per_s, v3.hbm_bytes) == ("v3", 61.5e12, 16 * 2**30)

"""simclr_jax.kernels: which layers a program computes with, chosen from the platform and the
devices it is compiled for, never from global backend state; and simclr_jax.cpu.layers' choice
among the CPU kernels."""

import logging
import pathlib
import re
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conv_cases import NHWC, skip_without_extension
from jax import lax

import simclr_jax.models
from simclr_jax import cpu, kernels, optim, parallel, step
from simclr_jax.cpu import extension
from simclr_jax.models import XLA_LAYERS, simclr_resnet, with_conv_precision


def _fake_mesh(platform: str, device_count: int):
    """Stands in for a mesh of ``device_count`` devices of ``platform``, which this machine does
    not have: what :mod:`simclr_jax.kernels` reads of a mesh (its devices' platform and count)."""
    devices = np.array([types.SimpleNamespace(platform=platform)] * device_count, dtype=object)
    return types.SimpleNamespace(devices=devices)


@pytest.fixture(scope="module")
def eight_device_mesh():
    assert len(jax.devices()) == 8  # tests/conftest.py
    return parallel.data_mesh(jax.devices())


@pytest.fixture(scope="module")
def one_device_mesh():
    return parallel.data_mesh(jax.devices()[:1])


# ----------------------------------------------------------------------------- for_platform


def test_auto_on_one_cpu_device_is_onednn():
    skip_without_extension()
    assert kernels.for_platform("auto", "cpu", 1) is cpu.ONEDNN_LAYERS
    assert kernels.for_platform("onednn", "cpu", 1) is cpu.ONEDNN_LAYERS


def test_auto_on_several_cpu_devices_is_the_phase_formulation():
    """The native kernels have no sharding rule: multi-device CPU programs keep JAX's."""
    assert kernels.for_platform("auto", "cpu", 8) is cpu.SUBPIXEL_LAYERS
    assert kernels.for_platform("subpixel_input_grads", "cpu", 1) is cpu.SUBPIXEL_LAYERS
    assert kernels.for_platform("xla", "cpu", 1) is XLA_LAYERS


@pytest.mark.parametrize(("platform", "device_count"), [("tpu", 1), ("gpu", 8), ("gpu", 1)])
def test_auto_off_the_cpu_is_xla(platform, device_count):
    assert kernels.for_platform("auto", platform, device_count) is XLA_LAYERS
    assert kernels.for_platform("xla", platform, device_count) is XLA_LAYERS
    # The per-phase gradients are plain JAX: asked for, they run on any platform.
    assert kernels.for_platform("subpixel_input_grads", platform, 1) is cpu.SUBPIXEL_LAYERS


def test_onednn_off_the_cpu_raises_naming_the_platform(monkeypatch):
    def no_build():
        raise AssertionError("the CPU extension was built for a TPU program")

    monkeypatch.setattr(extension, "register_extension", no_build)
    with pytest.raises(ValueError, match=r"CPU programs only.*'tpu'"):
        kernels.for_platform("onednn", "tpu", 1)
    with pytest.raises(ValueError, match=r"'gpu'"):
        kernels.for_platform("onednn", "gpu", 8)


@pytest.mark.parametrize("platform", ["cpu", "tpu"])
def test_an_unknown_conv_impl_raises_naming_the_valid_ones(platform):
    with pytest.raises(ValueError, match=r"conv_impl 'fast'.*valid values.*'onednn'"):
        kernels.for_platform("fast", platform, 1)


def test_float32_conv_precision_leaves_the_layers_as_they_are():
    assert kernels.for_platform("xla", "cpu", 1, conv_precision="float32") is XLA_LAYERS
    assert with_conv_precision(cpu.SUBPIXEL_LAYERS, "float32") is cpu.SUBPIXEL_LAYERS


@pytest.mark.parametrize(("platform", "device_count"), [("tpu", 1), ("gpu", 8), ("cpu", 8)])
def test_bfloat16_conv_precision_wraps_the_platforms_layers(platform, device_count):
    layers = kernels.for_platform("auto", platform, device_count, conv_precision="bfloat16")
    base = kernels.for_platform("auto", platform, device_count)
    assert layers.name == f"{base.name}+bfloat16"
    assert layers.batch_norm_train is base.batch_norm_train


def test_bfloat16_products_are_a_float32_convolution_of_the_rounded_operands():
    """The wrapper rounds both operands to bfloat16 and keeps the float32 result: their products
    are exact in float32, so only summation order separates it from the reference."""
    x = jax.random.normal(jax.random.key(0), (2, 9, 9, 3))
    kernel = jax.random.normal(jax.random.key(1), (3, 3, 3, 5))
    layers = with_conv_precision(XLA_LAYERS, "bfloat16")
    y = layers.conv_general_dilated(x, kernel, (2, 2), ((1, 1), (1, 1)), dimension_numbers=NHWC)
    rounded = [a.astype(jnp.bfloat16).astype(jnp.float32) for a in (x, kernel)]
    want = lax.conv_general_dilated(
        *rounded, (2, 2), ((1, 1), (1, 1)), dimension_numbers=NHWC, precision="highest"
    )
    assert y.dtype == jnp.float32
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))
    # Not the float32 convolution: the rounding is real.
    exact = lax.conv_general_dilated(
        x, kernel, (2, 2), ((1, 1), (1, 1)), dimension_numbers=NHWC, precision="highest"
    )
    assert float(jnp.abs(y - exact).max()) > 1e-3 * float(jnp.abs(exact).max())


def test_an_unknown_conv_precision_raises_before_any_kernel_is_built(monkeypatch):
    def no_build():
        raise AssertionError("the CPU extension was built for a bad config")

    monkeypatch.setattr(extension, "register_extension", no_build)
    with pytest.raises(ValueError, match=r"conv_precision 'fp16'.*valid values.*'bfloat16'"):
        kernels.for_platform("onednn", "cpu", 1, conv_precision="fp16")


# ----------------------------------------------------------------------------- for_mesh


def test_for_mesh_reads_the_meshs_platform_and_device_count(eight_device_mesh, one_device_mesh):
    assert kernels.platform(eight_device_mesh) == kernels.platform(one_device_mesh) == "cpu"
    assert kernels.for_mesh("auto", eight_device_mesh) is cpu.SUBPIXEL_LAYERS
    assert kernels.for_mesh("xla", one_device_mesh) is XLA_LAYERS
    assert kernels.for_mesh("auto", _fake_mesh("tpu", 1)) is XLA_LAYERS
    assert kernels.for_mesh("auto", _fake_mesh("gpu", 8)) is XLA_LAYERS
    with pytest.raises(ValueError, match="'tpu'"):
        kernels.for_mesh("onednn", _fake_mesh("tpu", 4))


def test_for_mesh_on_one_cpu_device_is_onednn(one_device_mesh):
    skip_without_extension()
    assert kernels.for_mesh("auto", one_device_mesh) is cpu.ONEDNN_LAYERS


def test_a_mesh_of_two_platforms_is_refused():
    mixed = types.SimpleNamespace(
        devices=np.array([types.SimpleNamespace(platform=p) for p in ("cpu", "gpu")])
    )
    with pytest.raises(ValueError, match=r"one platform.*\['cpu', 'gpu'\]"):
        kernels.platform(mixed)


def test_compiler_options_are_the_cpu_ones_for_cpu_meshes_only(eight_device_mesh, one_device_mesh):
    options = cpu.compiler_options()
    assert options is not None  # this XLA knows the option
    assert kernels.compiler_options(eight_device_mesh) == options
    assert kernels.compiler_options(one_device_mesh) == options
    assert kernels.compiler_options(_fake_mesh("gpu", 8)) is None
    assert kernels.compiler_options(_fake_mesh("tpu", 1)) is None


# ----------------------------------------------------------------------------- cpu.layers fallback


def test_auto_falls_back_with_a_warning_where_the_extension_cannot_be_built(monkeypatch, caplog):
    reason = "no C++ compiler found (a reason only this test gives)"
    monkeypatch.setattr(extension, "unavailable_reason", lambda: reason)
    cpu._warn_once.cache_clear()  # the warning is logged once per reason and process
    with caplog.at_level(logging.WARNING, logger="simclr_jax.cpu"):
        assert cpu.layers("auto") is cpu.SUBPIXEL_LAYERS
        assert cpu.layers("auto", device_count=1) is cpu.SUBPIXEL_LAYERS
        assert kernels.for_platform("auto", "cpu", 1) is cpu.SUBPIXEL_LAYERS
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and reason in r.message]
    assert len(warnings) == 1  # once, not at every choice
    assert warnings[0].name == "simclr_jax.cpu" and "oneDNN" in warnings[0].message
    with pytest.raises(ValueError, match=re.escape(f"unavailable: {reason}")):
        cpu.layers("onednn")
    with pytest.raises(ValueError, match=re.escape(reason)):
        kernels.for_platform("onednn", "cpu", 1)


def test_cpu_layers_do_not_build_the_extension_unless_asked_for_onednn(monkeypatch):
    def no_reason():
        raise AssertionError("the extension was looked at")

    monkeypatch.setattr(extension, "unavailable_reason", no_reason)
    assert cpu.layers("xla") is XLA_LAYERS
    assert cpu.layers("subpixel_input_grads") is cpu.SUBPIXEL_LAYERS
    assert cpu.layers("auto", device_count=8) is cpu.SUBPIXEL_LAYERS


# ----------------------------------------------------------------------------- models


def _models_sources() -> dict[str, str]:
    (package_dir,) = simclr_jax.models.__path__
    sources = {path.name: path.read_text() for path in pathlib.Path(package_dir).glob("*.py")}
    assert {"resnet.py", "batch_norm.py", "layers.py", "simclr.py"} <= set(sources)
    return sources


@pytest.mark.parametrize(
    "pattern",
    [
        r"default_backend",
        r"device_count\(",
        r"devices\(",
        r"^\s*(from|import)\s+simclr_jax\.cpu\b",
        r"^\s*from\s+simclr_jax\s+import\s+(.*\b)?cpu\b",
    ],
)
def test_no_model_reads_global_backend_state_or_imports_the_cpu_kernels(pattern):
    offenders = [
        f"{name}:{number}: {line.strip()}"
        for name, source in _models_sources().items()
        for number, line in enumerate(source.splitlines(), start=1)
        if re.search(pattern, line)
    ]
    assert not offenders, offenders


def test_a_default_model_never_builds_the_extension(monkeypatch):
    def no_build():
        raise AssertionError("the model built the CPU extension")

    monkeypatch.setattr(extension, "register_extension", no_build)
    x = np.zeros((2, 8, 8, 3), np.float32)
    model = simclr_resnet(18, 1.0, "cifar", num_classes=3, base_width=4)
    assert model.encoder.layers is XLA_LAYERS
    variables = model.init(jax.random.key(0, impl="rbg"), x, train=False)
    jax.eval_shape(lambda v: model.apply(v, x, train=True, mutable=["batch_stats"]), variables)
    # The patch is seen: a model given the oneDNN layers does build it, on its first trace.
    onednn = simclr_resnet(18, 1.0, "cifar", num_classes=3, base_width=4, layers=cpu.ONEDNN_LAYERS)
    with pytest.raises(AssertionError, match="built the CPU extension"):
        jax.eval_shape(lambda v: onednn.apply(v, x, train=True, mutable=["batch_stats"]), variables)


# ----------------------------------------------------------------------------- the train step


def _lowered_train_step_text(layers, mesh) -> str:
    """The StableHLO of a SimCLR training step (ResNet-18 of base width 4, 8x8 images) with
    ``layers``, lowered for ``mesh`` from shapes alone."""
    model = simclr_resnet(18, 1.0, "cifar", num_classes=10, base_width=4, layers=layers)
    tx = optim.create_optimizer("sgd", 0.1, weight_decay=1e-6)
    state = jax.eval_shape(
        lambda key: step.create_train_state(model, tx, key, (8, 8, 3)),
        jax.random.key(0, impl="rbg"),
    )
    batch = {
        "views": jax.ShapeDtypeStruct((4, 2, 8, 8, 3), np.float32),
        "label": jax.ShapeDtypeStruct((4,), np.int32),
    }
    train_step = step.jit_train_step(mesh, temperature=0.5, learning_rate_fn=lambda _: 0.1)
    return train_step.lower(state, batch, jax.random.key(1)).as_text()


def _custom_calls(hlo: str) -> set[str]:
    return set(re.findall(r"custom_call @(\w+)\(", hlo))


def test_a_train_step_with_the_onednn_layers_calls_the_native_kernels(one_device_mesh):
    skip_without_extension()
    assert kernels.for_mesh("auto", one_device_mesh) is cpu.ONEDNN_LAYERS
    hlo = _lowered_train_step_text(cpu.ONEDNN_LAYERS, one_device_mesh)
    assert "custom_call @simclr_onednn_conv_forward(" in hlo
    # Both directions of every convolution and of every batch norm (with a ReLU, with a ReLU and
    # the residual, and the shortcuts' alone) are the extension's.
    assert _custom_calls(hlo) == set(extension.TARGETS)
    assert "convolution" not in hlo


def test_a_train_step_with_the_xla_layers_has_no_custom_calls(one_device_mesh):
    hlo = _lowered_train_step_text(XLA_LAYERS, one_device_mesh)
    assert "simclr_onednn_conv_forward" not in hlo
    assert _custom_calls(hlo) == set()
    assert "convolution" in hlo

"""Tests for the oneDNN convolutions (simclr_jax.cpu.onednn_conv) and the extension that
computes them (simclr_jax.cpu.extension).

Tests that run the extension skip, naming why, where it cannot be built here."""

import os
import platform
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conv_cases import (
    NHWC,
    STRIDE_1_CASES,
    STRIDED_CASES,
    skip_without_bfloat16_convolutions,
    skip_without_extension,
    value_and_grads,
)
from jax import lax

from simclr_jax import cpu, kernels, parallel
from simclr_jax.cpu import convolution as conv
from simclr_jax.cpu import extension, onednn_conv
from simclr_jax.cpu.batch_norm import fused_batch_norm_train
from simclr_jax.models import with_conv_precision

if not (sys.platform == "linux" and platform.machine() == "x86_64"):
    pytest.skip("the onednn extra has wheels for x86-64 Linux only", allow_module_level=True)

TARGETS = tuple(extension.ONEDNN_CONV_TARGETS)


@pytest.mark.parametrize(
    ("n", "h", "w", "cin", "cout", "k", "stride", "padding"), STRIDED_CASES + STRIDE_1_CASES
)
def test_values_and_gradients_equal_xla(n, h, w, cin, cout, k, stride, padding):
    skip_without_extension()
    x = jax.random.normal(jax.random.key(0), (n, h, w, cin))
    kernel = jax.random.normal(jax.random.key(1), (k, k, cin, cout))
    (_, y_ref), grads_ref = value_and_grads(lax.conv_general_dilated, x, kernel, stride, padding)
    (_, y), grads = value_and_grads(onednn_conv.conv_general_dilated, x, kernel, stride, padding)
    for got, want in zip((y, *grads), (y_ref, *grads_ref), strict=True):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))


def _bfloat16_rounded(shape, seed):
    """Float32 values that bfloat16 holds exactly."""
    return jax.random.normal(jax.random.key(seed), shape).astype(jnp.bfloat16).astype(jnp.float32)


@pytest.mark.parametrize(
    ("n", "h", "w", "cin", "cout", "k", "stride", "padding"),
    [STRIDED_CASES[0], STRIDED_CASES[2], STRIDED_CASES[3], STRIDE_1_CASES[0]],
)
def test_bfloat16_operands_give_float32_sums_of_their_exact_products(
    n, h, w, cin, cout, k, stride, padding
):
    """A product of two bfloat16 values is exact in float32, so the forward pass equals a float32
    convolution of the same values up to summation order; each gradient is such a sum too,
    rounded to bfloat16 as its operand is."""
    skip_without_bfloat16_convolutions()
    x, kernel = _bfloat16_rounded((n, h, w, cin), 0), _bfloat16_rounded((k, k, cin, cout), 1)

    def reference(x, kernel):
        return lax.conv_general_dilated(
            x, kernel, (stride, stride), padding, dimension_numbers=NHWC, precision="highest"
        )

    def bfloat16_products(x, kernel):
        return onednn_conv.conv_general_dilated(
            x,
            kernel,
            (stride, stride),
            padding,
            dimension_numbers=NHWC,
            preferred_element_type=jnp.float32,
        )

    y_ref, vjp_ref = jax.vjp(reference, x, kernel)
    dy = _bfloat16_rounded(y_ref.shape, 2)
    y, vjp = jax.jit(lambda x, k: jax.vjp(bfloat16_products, x, k))(
        x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16)
    )
    assert y.dtype == jnp.float32
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5 * float(jnp.abs(y_ref).max()))
    for got, want in zip(jax.jit(vjp)(dy), vjp_ref(dy), strict=True):
        assert got.dtype == jnp.bfloat16
        np.testing.assert_allclose(
            got.astype(jnp.float32), want, rtol=2**-8, atol=1e-5 * float(jnp.abs(want).max())
        )


def test_the_bfloat16_probe_agrees_with_running_bfloat16_convolutions():
    """extension.bfloat16_convolutions() is True exactly where a bfloat16 convolution and its
    gradients run."""
    skip_without_extension()
    x, kernel = jnp.ones((2, 8, 8, 3), jnp.bfloat16), jnp.ones((3, 3, 3, 4), jnp.bfloat16)

    def loss(x, kernel):
        y = onednn_conv.conv_general_dilated(
            x,
            kernel,
            (1, 1),
            ((1, 1), (1, 1)),
            dimension_numbers=NHWC,
            preferred_element_type=jnp.float32,
        )
        return y.sum()

    def run():
        return jax.block_until_ready(jax.jit(jax.value_and_grad(loss, (0, 1)))(x, kernel))

    if extension.bfloat16_convolutions():
        value, _ = run()
        assert float(value) > 0
    else:
        with pytest.raises(jax.errors.JaxRuntimeError, match="oneDNN convolution failed"):
            run()


def _value_and_grad_hlo(conv_fn) -> str:
    """The lowered text of a strided convolution's value and both gradients, by ``conv_fn``."""
    x, kernel = jnp.ones((2, 8, 8, 3)), jnp.ones((3, 3, 3, 4))

    def loss(x, k):
        return conv_fn(x, k, (2, 2), ((1, 1), (1, 1)), dimension_numbers=NHWC).sum()

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(x, kernel).as_text()


def test_the_three_directions_are_onednn_custom_calls():
    skip_without_extension()
    hlo = _value_and_grad_hlo(onednn_conv.conv_general_dilated)
    assert all(f"custom_call @{target}(" in hlo for target in TARGETS)
    assert "convolution" not in hlo


def test_bfloat16_products_layers_call_onednn_with_bfloat16_operands():
    """Lowering only: it holds on CPUs whose oneDNN has no bfloat16 kernels too."""
    skip_without_extension()
    layers = with_conv_precision(cpu.ONEDNN_LAYERS, "bfloat16")
    assert layers.name == "onednn+bfloat16"
    hlo = _value_and_grad_hlo(layers.conv_general_dilated)
    calls = [line for line in hlo.splitlines() if "custom_call @simclr_onednn_conv" in line]
    assert {target for target in TARGETS if any(target in line for line in calls)} == set(TARGETS)
    operands = r": \(tensor<[0-9x]+xbf16>, tensor<[0-9x]+xbf16>\) -> tensor<[0-9x]+xf32>$"
    assert len(calls) == 3 and all(re.search(operands, line) for line in calls)
    assert "convolution" not in hlo


@pytest.mark.parametrize(
    ("dtype", "kwargs"),
    [
        (jnp.bfloat16, {"padding": ((1, 1), (1, 1))}),
        (jnp.float32, {"padding": "SAME"}),
        (jnp.float32, {"padding": ((1, 1), (1, 1)), "rhs_dilation": (2, 2)}),
    ],
)
def test_other_convolutions_fall_back_to_the_phase_formulation(dtype, kwargs):
    x, kernel = jnp.ones((2, 8, 8, 4), dtype), jnp.ones((3, 3, 4, 4), dtype)

    def jaxpr(conv_fn):
        return str(
            jax.make_jaxpr(
                jax.grad(
                    lambda k: (
                        conv_fn(x, k, (2, 2), dimension_numbers=NHWC, **kwargs)
                        .astype(jnp.float32)
                        .sum()
                    )
                )
            )(kernel)
        )

    fallback = jaxpr(onednn_conv.conv_general_dilated)
    assert not any(target in fallback for target in TARGETS)
    assert fallback == jaxpr(conv.conv_general_dilated)


def test_batch_sharded_over_a_mesh_gives_the_same_numbers():
    """Without a sharding rule XLA gathers the operands; the result must still be right."""
    skip_without_extension()
    mesh = parallel.data_mesh(jax.devices())
    x = jax.random.normal(jax.random.key(0), (16, 9, 9, 3))
    kernel = jax.random.normal(jax.random.key(1), (3, 3, 3, 5))
    x = jax.device_put(x, parallel.batch_sharded(mesh))
    (_, y_ref), grads_ref = value_and_grads(lax.conv_general_dilated, x, kernel, 2, ((1, 1),) * 2)
    (_, y), grads = value_and_grads(onednn_conv.conv_general_dilated, x, kernel, 2, ((1, 1),) * 2)
    for got, want in zip((y, *grads), (y_ref, *grads_ref), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))


def test_the_built_extension_is_cached(monkeypatch):
    skip_without_extension()
    path = extension.build_extension()

    def no_compiler(*args, **kwargs):
        raise AssertionError("compiled again although the cache holds the extension")

    monkeypatch.setattr(subprocess, "run", no_compiler)
    assert extension.build_extension() == path


def test_a_fresh_build_lands_atomically_in_the_cache_dir(monkeypatch, tmp_path):
    skip_without_extension()
    monkeypatch.setenv("SIMCLR_JAX_CACHE_DIR", str(tmp_path / "cache"))
    path = extension.build_extension()
    assert path.parent == tmp_path / "cache" and path.is_file()
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no partial file left
    loaded = subprocess.run(
        [sys.executable, "-c", f"import ctypes; ctypes.CDLL({str(path)!r}).OnednnConvForward"],
        capture_output=True,
        text=True,
    )
    assert loaded.returncode == 0, loaded.stderr


def test_missing_onednn_is_named(monkeypatch, tmp_path):
    monkeypatch.setenv("SIMCLR_JAX_ONEDNN_ROOT", str(tmp_path))
    with pytest.raises(extension.NativeUnavailableError, match=r"SIMCLR_JAX_ONEDNN_ROOT"):
        extension.build_extension()


def test_a_failing_compiler_is_reported(monkeypatch, tmp_path):
    skip_without_extension()
    monkeypatch.setenv("SIMCLR_JAX_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", "c++ -DNOT_A_FLAG_FOR_ME=1 --no-such-option")
    with pytest.raises(extension.NativeUnavailableError) as error:
        extension.build_extension()
    message = str(error.value)
    assert message.startswith("compiling the extension with $CXX='c++ -DNOT_A_FLAG_FOR_ME=1")
    assert "no-such-option" in message.split(" failed: ")[1] and "\n" not in message
    assert not list(tmp_path.iterdir())


def test_a_cxx_that_is_not_there_is_named(monkeypatch, tmp_path):
    skip_without_extension()  # oneDNN is installed: only the compiler is missing
    monkeypatch.setenv("SIMCLR_JAX_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-c++"))
    with pytest.raises(extension.NativeUnavailableError) as error:
        extension.build_extension()
    assert str(error.value) == (
        f"cannot run the C++ compiler $CXX={str(tmp_path / 'no-such-c++')!r}: "
        "No such file or directory"
    )
    assert not list(tmp_path.iterdir())


# A fresh process, as train, evaluate and the encoder API start: the kernels it gets, and the
# extension's cache directory afterwards.
AUTO_LAYERS = """
from simclr_jax import cpu
print(cpu.layers("auto").name)
"""


def test_a_missing_cxx_falls_back_with_one_warning_naming_it(tmp_path):
    skip_without_extension()
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "SIMCLR_JAX_CACHE_DIR": str(tmp_path),
        "CXX": "/no/such/c++",
    }
    result = subprocess.run(
        [sys.executable, "-c", AUTO_LAYERS], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "subpixel_input_grads\n"
    (warning,) = [line for line in result.stderr.splitlines() if "oneDNN kernels" in line]
    assert warning.endswith(
        "oneDNN kernels are unavailable, JAX's are used instead: cannot run the C++ compiler "
        "$CXX='/no/such/c++': No such file or directory"
    )


def test_a_cached_build_is_used_without_any_compiler(monkeypatch, tmp_path):
    skip_without_extension()
    monkeypatch.setenv("SIMCLR_JAX_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("CXX", raising=False)

    def fake_compiler(command, **kwargs):  # "builds" by writing the output file
        with open(command[command.index("-o") + 1], "wb") as f:
            f.write(b"built")
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(subprocess, "run", fake_compiler)
    built = extension.build_extension()
    assert built.read_bytes() == b"built"

    def no_compiler(*args, **kwargs):
        raise AssertionError("compiled again although the cache holds the extension")

    monkeypatch.setattr(subprocess, "run", no_compiler)
    monkeypatch.setattr(shutil, "which", lambda name: None)  # no c++ or g++ on PATH
    assert extension.build_extension() == built


def test_explicit_onednn_fails_early_where_it_cannot_run(monkeypatch):
    with pytest.raises(ValueError, match=r"CPU programs only.*'gpu'"):
        kernels.for_platform("onednn", "gpu", 1)
    monkeypatch.setattr(extension, "unavailable_reason", lambda: "no C++ compiler found")
    with pytest.raises(ValueError, match=r"unavailable: no C\+\+ compiler found"):
        cpu.layers("onednn")
    # "auto" falls back to the per-phase gradients instead.
    assert cpu.layers("auto", device_count=1) is cpu.SUBPIXEL_LAYERS


def test_onednn_layers_are_these_convolutions_and_the_fused_batch_norm():
    assert cpu.ONEDNN_LAYERS.conv_general_dilated is onednn_conv.conv_general_dilated
    assert cpu.ONEDNN_LAYERS.batch_norm_train is fused_batch_norm_train
    assert cpu.ONEDNN_LAYERS.name == "onednn"

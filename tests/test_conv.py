"""Tests for simclr_jax.cpu.convolution (per-phase input gradients equal XLA's convolution
gradients), the CPU layers that use it, and the CPU compiler options."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conv_cases import NHWC, STRIDED_CASES, skip_without_extension, value_and_grads
from jax import lax

from simclr_jax import cpu
from simclr_jax.cpu import compiler
from simclr_jax.cpu import convolution as conv
from simclr_jax.models import XLA_LAYERS, ResNet


def _numpy_input_gradient(dy, kernel, input_shape, stride, padding):
    """dL/dx of a cross-correlation in float64: each output's gradient scattered over its taps."""
    n, height, width, _ = input_shape
    (top, bottom), (left, right) = padding
    grad = np.zeros((n, height + top + bottom, width + left + right, kernel.shape[2]))
    _, ho, wo, _ = dy.shape
    for i in range(kernel.shape[0]):
        for j in range(kernel.shape[1]):
            contribution = np.einsum("nhwo,io->nhwi", dy, kernel[i, j].astype(np.float64))
            grad[
                :, i : i + stride * (ho - 1) + 1 : stride, j : j + stride * (wo - 1) + 1 : stride
            ] += contribution
    return grad[:, top : top + height, left : left + width]


@pytest.mark.parametrize(("n", "h", "w", "cin", "cout", "k", "stride", "padding"), STRIDED_CASES)
def test_values_and_gradients_equal_xla(n, h, w, cin, cout, k, stride, padding):
    x = jax.random.normal(jax.random.key(0), (n, h, w, cin))
    kernel = jax.random.normal(jax.random.key(1), (k, k, cin, cout))

    (_, y_ref), (dx_ref, dw_ref) = value_and_grads(
        lax.conv_general_dilated, x, kernel, stride, padding
    )
    (_, y), (dx, dw) = value_and_grads(conv.conv_general_dilated, x, kernel, stride, padding)
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(dw, dw_ref)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-5, atol=1e-5)
    dy = np.cos(np.asarray(y_ref, np.float64))
    expected = _numpy_input_gradient(dy, np.asarray(kernel), x.shape, stride, padding)
    np.testing.assert_allclose(dx, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"padding": "SAME"},
        {"padding": ((1, 1), (1, 1)), "rhs_dilation": (2, 2)},
        {"padding": ((1, 1), (1, 1)), "feature_group_count": 2},
        {"padding": ((1, 1), (1, 1)), "precision": lax.Precision.HIGHEST},
    ],
)
def test_other_convolutions_are_xla_unchanged(kwargs):
    x = jax.random.normal(jax.random.key(0), (2, 6, 6, 4))
    kernel = jax.random.normal(
        jax.random.key(1), (3, 3, 4 // kwargs.get("feature_group_count", 1), 4)
    )

    def jaxpr(conv_fn):
        return jax.make_jaxpr(
            jax.grad(lambda k: conv_fn(x, k, (1, 1), dimension_numbers=NHWC, **kwargs).sum())
        )(kernel)

    assert "custom_vjp" not in str(jaxpr(conv.conv_general_dilated))
    assert str(jaxpr(conv.conv_general_dilated)) == str(jaxpr(lax.conv_general_dilated))


def test_phase_gradients_are_used_for_strided_convolutions_only():
    x = jnp.ones((1, 4, 4, 2))
    kernel = jnp.ones((3, 3, 2, 2))

    def jaxpr(stride):
        return str(
            jax.make_jaxpr(
                lambda k: conv.conv_general_dilated(
                    x, k, (stride, stride), ((1, 1), (1, 1)), dimension_numbers=NHWC
                )
            )(kernel)
        )

    assert "custom_vjp" in jaxpr(2)
    assert "custom_vjp" not in jaxpr(1)  # stride 1: XLA's convolution and gradients as they are


def test_cpu_layers_pick_onednn_for_one_device_and_phase_gradients_for_several():
    assert cpu.SUBPIXEL_LAYERS.conv_general_dilated is conv.conv_general_dilated
    assert cpu.layers("auto", device_count=8) is cpu.SUBPIXEL_LAYERS
    assert cpu.layers("subpixel_input_grads", device_count=1) is cpu.SUBPIXEL_LAYERS
    assert cpu.layers("xla", device_count=1) is cpu.layers("xla", device_count=8) is XLA_LAYERS
    with pytest.raises(ValueError, match=r"conv_impl 'fast'.*valid values"):
        cpu.layers("fast")
    # One device: oneDNN where its extension builds here, else (with a warning) the phases.
    one_device = cpu.layers("auto", device_count=1)
    if cpu.extension.unavailable_reason() is None:
        assert one_device is cpu.ONEDNN_LAYERS
    else:
        assert one_device is cpu.SUBPIXEL_LAYERS


@pytest.mark.parametrize("bfloat16_kernels", [True, False])
def test_bfloat16_convolutions_are_onednns_only_where_it_has_kernels_for_them(
    monkeypatch, bfloat16_kernels
):
    """Where oneDNN has no bfloat16 convolutions (CPUs without AVX-512), "auto" keeps its batch
    norms with XLA's convolutions and "onednn" says so in one error; float32 is unaffected."""
    skip_without_extension()
    monkeypatch.setattr(cpu.extension, "bfloat16_convolutions", lambda: bfloat16_kernels)
    assert cpu.layers("auto", 1, "float32") is cpu.layers("onednn", 1, "float32")
    assert cpu.layers("onednn", 1, "float32") is cpu.ONEDNN_LAYERS
    assert cpu.layers("auto", 8, "bfloat16") is cpu.SUBPIXEL_LAYERS
    if bfloat16_kernels:
        assert cpu.layers("auto", 1, "bfloat16") is cpu.ONEDNN_LAYERS
        assert cpu.layers("onednn", 1, "bfloat16") is cpu.ONEDNN_LAYERS
        return
    fallback = cpu.layers("auto", 1, "bfloat16")
    assert fallback.conv_general_dilated is XLA_LAYERS.conv_general_dilated
    assert fallback.batch_norm_train is cpu.ONEDNN_LAYERS.batch_norm_train
    with pytest.raises(
        ValueError, match=r"conv_impl='onednn' with conv_precision='bfloat16'.*AVX-512.*float32"
    ):
        cpu.layers("onednn", 1, "bfloat16")


LAYERS = {
    "xla": XLA_LAYERS,
    "subpixel_input_grads": cpu.SUBPIXEL_LAYERS,
    "onednn": cpu.ONEDNN_LAYERS,
}


@functools.cache
def _float64_reference(stem):
    """(variables, x, gradients) of a ResNet-18 of base width 4, the gradients in float64."""
    x = jax.random.uniform(jax.random.key(0), (4, 24, 24, 3))
    variables = ResNet(depth=18, base_width=4, stem=stem).init(jax.random.key(1), x, train=False)
    with jax.enable_x64(True):
        wide = jax.tree.map(lambda v: np.asarray(v, np.float64), (variables, x))
        model = ResNet(depth=18, base_width=4, stem=stem, layers=XLA_LAYERS, dtype=jnp.float64)
        reference = jax.tree.map(np.asarray, _gradients(model, *wide))
    return variables, x, reference


def _gradients(model, variables, x):
    def loss(params):
        h, _ = model.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
        return jnp.sum(h**2)

    return jax.jit(jax.grad(loss))(variables["params"])


@pytest.mark.parametrize("name", list(LAYERS))
@pytest.mark.parametrize("stem", ["cifar", "imagenet"])
def test_resnet_gradients_match_a_float64_reference_in_every_implementation(stem, name):
    if name == "onednn":
        skip_without_extension()
    variables, x, reference = _float64_reference(stem)
    ours = _gradients(ResNet(depth=18, base_width=4, stem=stem, layers=LAYERS[name]), variables, x)
    assert jax.tree.structure(reference) == jax.tree.structure(ours)
    for got, want in zip(jax.tree.leaves(ours), jax.tree.leaves(reference), strict=True):
        # float32 rounding, measured against the leaf's largest entry: with the ImageNet
        # stem the last groups normalise over 4 values, and differences grow on the way back
        # (all three implementations stay within 7e-5 of it).
        scale = float(np.abs(want).max())
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=2e-4 * scale, err_msg=name)


def test_cpu_compiler_options_keep_convolutions_out_of_ynnpack(monkeypatch):
    x = jnp.ones((8, 6, 6, 4))
    kernel = jnp.ones((3, 3, 4, 4))

    def kernel_gradient(x, kernel):
        return jax.grad(
            lambda k: lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=NHWC).sum()
        )(kernel)

    options = compiler.compiler_options()
    assert options is not None  # this XLA knows the option
    hlo = jax.jit(kernel_gradient, compiler_options=options).lower(x, kernel).compile().as_text()
    assert "convolution(" in hlo and "__ynn_fusion" not in hlo
    assert cpu.compiler_options() == options  # the package's entry is this function
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=individual_dot")
    assert compiler.compiler_options() is None  # the user's own choice is left alone

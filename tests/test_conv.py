"""Tests for simclr_jax.models.conv: matmul kernel gradients equal XLA's convolution gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from simclr_jax.models import ResNet, conv

NHWC = ("NHWC", "HWIO", "NHWC")


def _numpy_kernel_gradient(x, dy, kernel_hw, stride, padding):
    """dL/dW of a cross-correlation as a float64 sum over output positions."""
    padded = np.pad(x.astype(np.float64), ((0, 0), padding[0], padding[1], (0, 0)))
    _, ho, wo, _ = dy.shape
    grad = np.zeros((*kernel_hw, x.shape[-1], dy.shape[-1]))
    for i in range(kernel_hw[0]):
        for j in range(kernel_hw[1]):
            window = padded[
                :, i : i + stride * (ho - 1) + 1 : stride, j : j + stride * (wo - 1) + 1 : stride
            ]
            grad[i, j] = np.einsum("nhwc,nhwd->cd", window, dy.astype(np.float64))
    return grad


CASES = [
    # (batch, height, width, in, out, kernel, stride, padding)
    (2, 8, 8, 3, 5, 3, 1, ((1, 1), (1, 1))),
    (2, 16, 16, 3, 4, 3, 1, ((1, 1), (1, 1))),  # large map: the unit-stride method
    (2, 9, 9, 3, 5, 3, 2, ((1, 1), (1, 1))),
    (3, 7, 6, 4, 6, 1, 2, ((0, 0), (0, 0))),
    (2, 8, 8, 4, 4, 1, 1, ((0, 0), (0, 0))),
    (2, 10, 10, 1, 4, 7, 2, ((3, 3), (3, 3))),
    (1, 6, 7, 2, 3, 3, 1, ((0, 1), (1, 0))),
    (2, 5, 5, 3, 2, 2, 1, ((0, 1), (0, 1))),
]


@pytest.mark.parametrize(("n", "h", "w", "cin", "cout", "k", "stride", "padding"), CASES)
def test_values_and_gradients_equal_xla(n, h, w, cin, cout, k, stride, padding):
    x = jax.random.normal(jax.random.key(0), (n, h, w, cin))
    kernel = jax.random.normal(jax.random.key(1), (k, k, cin, cout))

    def loss(conv_fn):
        def f(x, kernel):
            y = conv_fn(x, kernel, (stride, stride), padding, dimension_numbers=NHWC)
            return jnp.sum(jnp.sin(y)), y

        return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(x, kernel)

    (_, y_ref), (dx_ref, dw_ref) = loss(lax.conv_general_dilated)
    (_, y), (dx, dw) = loss(conv.conv_general_dilated)
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(dx, dx_ref)
    np.testing.assert_allclose(dw, dw_ref, rtol=1e-5, atol=1e-5)
    dy = np.cos(np.asarray(y_ref))
    expected = _numpy_kernel_gradient(np.asarray(x), dy, (k, k), stride, padding)
    np.testing.assert_allclose(dw, expected, rtol=1e-4, atol=1e-4)


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


def test_matmul_gradients_are_used_where_they_apply():
    x = jnp.ones((1, 4, 4, 2))
    kernel = jnp.ones((3, 3, 2, 2))
    jaxpr = jax.make_jaxpr(
        lambda k: conv.conv_general_dilated(x, k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=NHWC)
    )(kernel)
    assert "custom_vjp" in str(jaxpr)


def test_auto_picks_matmul_gradients_on_cpu_only():
    assert conv.resolve_conv_impl("auto", "cpu") == "matmul_grads"
    assert conv.resolve_conv_impl("auto", "gpu") == "xla"
    assert conv.resolve_conv_impl("auto", "tpu") == "xla"
    assert conv.resolve_conv_impl("xla", "cpu") == "xla"
    with pytest.raises(ValueError, match=r"conv_impl 'fast'.*valid values"):
        conv.resolve_conv_impl("fast")
    with pytest.raises(ValueError, match="conv_impl"):
        ResNet(depth=18, conv_impl="fast")


def test_resnet_gradients_match_between_implementations():
    x = jax.random.uniform(jax.random.key(0), (4, 12, 12, 3))
    models = {
        impl: ResNet(depth=18, base_width=4, stem="cifar", conv_impl=impl)
        for impl in ("xla", "matmul_grads")
    }
    variables = models["xla"].init(jax.random.key(1), x, train=False)

    def gradients(model):
        def loss(params):
            h, _ = model.apply(
                {**variables, "params": params}, x, train=True, mutable=["batch_stats"]
            )
            return jnp.sum(h**2)

        return jax.jit(jax.grad(loss))(variables["params"])

    reference, ours = gradients(models["xla"]), gradients(models["matmul_grads"])
    assert jax.tree.structure(reference) == jax.tree.structure(ours)
    for got, want in zip(jax.tree.leaves(ours), jax.tree.leaves(reference), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)

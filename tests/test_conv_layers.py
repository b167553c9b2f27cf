"""simclr_jax.cpu.conv_layers: the model's convolutions read from its jaxpr, and their timings."""

import jax
import jax.numpy as jnp
import pytest

from simclr_jax import cpu
from simclr_jax.cpu import conv_layers
from simclr_jax.models import XLA_LAYERS, Layers, ResNet


def _convolutions(model: ResNet, image_shape: tuple[int, ...]):
    images = jax.ShapeDtypeStruct(image_shape, jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), images)
    return conv_layers.model_convolutions(model.apply, variables, images)


@pytest.mark.parametrize(
    ("depth", "stem", "expected_count", "stem_kernel"),
    [(18, "cifar", 21, (3, 3, 1, 4)), (50, "imagenet", 53, (7, 7, 1, 4))],
)
def test_every_convolution_is_found_once_per_use(depth, stem, expected_count, stem_kernel):
    model = ResNet(depth=depth, base_width=4, stem=stem, layers=XLA_LAYERS)
    convolutions = _convolutions(model, (2, 32, 32, 1))
    # 1 stem + 8 blocks x 2 (or 16 x 3) + one projection shortcut per group.
    assert sum(convolutions.values()) == expected_count
    (stem_conv,) = [c for c in convolutions if c.reads_model_input]
    assert stem_conv.kernel_shape == stem_kernel and stem_conv.input_shape == (2, 32, 32, 1)
    strided = [c for c in convolutions if c.strides == (2, 2)]
    assert len(strided) == (6 if stem == "cifar" else 7)  # 3 groups x (3x3 + 1x1) [+ stem]


def test_timings_cover_each_part_and_sum_to_the_totals():
    model = ResNet(depth=18, base_width=2, stem="cifar", layers=XLA_LAYERS)
    convolutions = _convolutions(model, (4, 8, 8, 1))
    # What the benchmark times for one device: oneDNN's where it builds, else the phases.
    result = conv_layers.time_convolutions(convolutions, cpu.layers("auto"), repeats=1)
    layers = result["conv_layers"]
    assert len(layers) == len(convolutions)
    for layer in layers:
        assert layer["forward_ms"] > 0 and layer["kernel_grad_ms"] > 0
        reads_images = layer["input"] == [4, 8, 8, 1]
        assert (layer["input_grad_ms"] is None) == reads_images
    for part, total in result["conv_totals_ms"].items():
        summed = sum(layer["count"] * (layer[part] or 0.0) for layer in layers)
        assert total == pytest.approx(summed, abs=0.05 * len(layers))


def test_one_convolution_is_timed_with_the_given_layers():
    """``time_convolution`` runs ``layers.conv_general_dilated``, in all three parts."""
    convolution = conv_layers.Convolution(
        (2, 8, 8, 2), (3, 3, 2, 4), (2, 2), ((1, 1), (1, 1)), False
    )
    calls = []

    def counting_conv(*args, **kwargs):
        calls.append(args[2])
        return cpu.SUBPIXEL_LAYERS.conv_general_dilated(*args, **kwargs)

    layers = Layers(name="counting", conv_general_dilated=counting_conv)
    timings = conv_layers.time_convolution(convolution, layers, repeats=1)
    assert set(timings) == {"forward_ms", "input_grad_ms", "kernel_grad_ms"}
    assert all(ms > 0 for ms in timings.values())
    # Traced once for the cotangent's shape, and once by each of the three jitted functions.
    assert calls == [(2, 2)] * 4

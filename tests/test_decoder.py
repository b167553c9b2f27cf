"""Reconstruction heads: output shapes, value range and the variational head's sampling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simclr_jax.models import decoder, simclr_resnet


@pytest.mark.parametrize(
    ("height", "width", "expected"),
    [(28, 28, (2, 7, 7)), (32, 32, (3, 4, 4)), (96, 96, (4, 6, 6)), (28, 40, (2, 7, 10))],
)
def test_upsampling_plan_reaches_at_least_the_image_size(height, width, expected):
    num_upsamplings, start_height, start_width = decoder.upsampling_plan(height, width)
    assert (num_upsamplings, start_height, start_width) == expected
    assert start_height * 2**num_upsamplings >= height
    assert start_width * 2**num_upsamplings >= width
    assert min(start_height, start_width) >= 4


def _head(kind):
    if kind == "ae":
        return decoder.AutoencoderHead(channels=4)
    return decoder.VariationalHead(latent_dim=8, channels=4)


@pytest.mark.parametrize("kind", ["ae", "vae"])
@pytest.mark.parametrize(("side", "channels"), [(28, 1), (32, 3)])
def test_reconstruction_has_the_input_shape_and_lies_in_the_unit_interval(kind, side, channels):
    head = _head(kind)
    image_shape = (side, side, channels)
    h = jax.random.normal(jax.random.key(0), (2, 16))
    variables = head.init(jax.random.key(1), h, image_shape, train=False)
    apply = jax.jit(head.apply, static_argnums=2, static_argnames="train")
    outputs = apply(variables, h, image_shape, train=True, rngs={"sample": jax.random.key(2)})
    reconstruction = np.asarray(outputs["reconstruction"])
    assert reconstruction.shape == (2, *image_shape)
    assert reconstruction.dtype == np.float32
    assert np.all((reconstruction > 0) & (reconstruction < 1))
    if kind == "vae":
        assert outputs["mu"].shape == outputs["log_var"].shape == (2, 8)


@pytest.mark.parametrize("kind", ["ae", "vae"])
def test_simclr_model_merges_the_head_outputs(kind):
    model = simclr_resnet(
        depth=18,
        width_multiplier=1.0,
        base_width=4,
        stem="cifar",
        num_classes=3,
        projection_dim=8,
        reconstruction_head=_head(kind),
    )
    images = jnp.zeros((2, 28, 28, 1))
    variables = jax.eval_shape(lambda: model.init(jax.random.key(1), images, train=False))
    assert "reconstruction_head" in variables["params"]
    outputs, _ = jax.eval_shape(
        lambda variables: model.apply(
            variables,
            images,
            train=True,
            mutable=["batch_stats"],
            rngs={decoder.SAMPLE_RNG: jax.random.key(2)},
        ),
        variables,
    )
    assert outputs["reconstruction"].shape == images.shape
    expected = {"h", "z", "logits", "reconstruction"} | (
        {"mu", "log_var"} if kind == "vae" else set()
    )
    assert set(outputs) == expected


def _vae_outputs(train, key=None):
    head = decoder.VariationalHead(latent_dim=4, channels=2)
    h = jax.random.normal(jax.random.key(0), (3, 6))
    variables = head.init(jax.random.key(1), h, (8, 8, 1), train=False)
    rngs = {decoder.SAMPLE_RNG: key} if key is not None else None
    return head.apply(variables, h, (8, 8, 1), train=train, rngs=rngs)


def test_variational_head_decodes_the_mean_at_inference_and_samples_in_training():
    inference = _vae_outputs(train=False)
    np.testing.assert_array_equal(
        inference["reconstruction"], _vae_outputs(train=False)["reconstruction"]
    )
    sample_a = _vae_outputs(train=True, key=jax.random.key(5))
    sample_b = _vae_outputs(train=True, key=jax.random.key(6))
    np.testing.assert_array_equal(sample_a["mu"], inference["mu"])
    assert not np.allclose(sample_a["reconstruction"], inference["reconstruction"])
    assert not np.allclose(sample_a["reconstruction"], sample_b["reconstruction"])
    np.testing.assert_array_equal(
        sample_a["reconstruction"],
        _vae_outputs(train=True, key=jax.random.key(5))["reconstruction"],
    )


def test_variational_head_needs_the_sample_stream_in_training():
    with pytest.raises(Exception, match="sample"):
        _vae_outputs(train=True)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: decoder.ConvDecoder(channels=0), "channels"),
        (lambda: decoder.VariationalHead(latent_dim=0), "latent_dim"),
        (lambda: decoder.upsampling_plan(0, 28), "positive"),
    ],
)
def test_bad_decoder_settings_are_rejected(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_decoder_in_bfloat16_returns_float32():
    head = decoder.AutoencoderHead(channels=2, dtype=jnp.bfloat16)
    h = jnp.ones((2, 5))
    variables = head.init(jax.random.key(0), h, (28, 28, 1), train=False)
    out = head.apply(variables, h, (28, 28, 1), train=False)["reconstruction"]
    assert out.dtype == jnp.float32 and out.shape == (2, 28, 28, 1)

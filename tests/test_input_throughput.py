"""The input-pipeline throughput probe on the tiny Fashion-MNIST config."""

import pytest

from simclr_jax import input_throughput
from simclr_jax.configs import tiny


def test_measures_the_trainers_batches(fashion_mnist_data_dir):
    config = tiny.get_config()
    config.data_dir = fashion_mnist_data_dir
    result = input_throughput.measure_pretrain_throughput(config, num_batches=3, warmup_batches=1)
    assert result["num_batches"] == 3
    assert result["host_batch_size"] == config.global_batch_size  # one process
    assert result["pairs_per_s"] > 0
    assert result["views_per_s"] == pytest.approx(2 * result["pairs_per_s"])
    assert result["pairs_per_s"] * result["seconds"] == pytest.approx(3 * 32)


def test_needs_at_least_one_timed_batch():
    with pytest.raises(ValueError, match="num_batches"):
        input_throughput.measure_pretrain_throughput(tiny.get_config(), num_batches=0)

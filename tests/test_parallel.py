"""Mesh, shardings and host-to-global batch assembly on eight fake CPU devices."""

import jax
import numpy as np
import pytest

from simclr_jax import parallel


def test_data_mesh_spans_all_devices_on_one_axis():
    mesh = parallel.data_mesh()
    assert mesh.axis_names == (parallel.DATA_AXIS,)
    assert mesh.devices.size == jax.device_count() == 8


def test_data_mesh_on_chosen_devices():
    mesh = parallel.data_mesh(jax.devices()[:2])
    assert mesh.devices.size == 2


@pytest.mark.parametrize("batch_size", [0, 4, 12, 100])
def test_batch_not_divisible_by_devices_is_a_clear_error(batch_size):
    with pytest.raises(ValueError, match=r"not divisible by the 8 devices"):
        parallel.check_global_batch_size(batch_size, parallel.data_mesh())


def test_divisible_batch_is_accepted():
    parallel.check_global_batch_size(16, parallel.data_mesh())


def test_host_batch_becomes_batch_sharded_global_array():
    mesh = parallel.data_mesh()
    host = {
        "views": np.arange(16 * 2 * 3, dtype=np.float32).reshape(16, 2, 3),
        "label": np.arange(16),
    }
    batch = parallel.host_batch_to_global(host, mesh)
    assert batch["views"].shape == (16, 2, 3)
    assert batch["views"].sharding.is_equivalent_to(parallel.batch_sharded(mesh), 3)
    np.testing.assert_array_equal(np.asarray(batch["views"]), host["views"])
    np.testing.assert_array_equal(np.asarray(batch["label"]), host["label"])
    # Each device holds two consecutive examples, so a pair of views never straddles devices.
    shard_rows = sorted(int(s.data[0, 0, 0]) // 6 for s in batch["views"].addressable_shards)
    assert shard_rows == list(range(0, 16, 2))

"""The background device prefetcher: same batches in the same order, errors, waits, early close."""

import contextlib
import itertools
import threading
import time

import numpy as np
import pytest

from simclr_jax import parallel, prefetch


def _host_batches(count: int | None = None):
    for i in itertools.count() if count is None else range(count):
        yield {"views": np.full((8, 2, 3), i, np.float32), "label": np.arange(8) + i}


def test_yields_the_global_batches_in_order_then_stops():
    mesh = parallel.data_mesh()
    with contextlib.closing(prefetch.DevicePrefetcher(_host_batches(5), mesh)) as batches:
        got = list(batches)
    assert len(got) == 5
    for i, batch in enumerate(got):
        assert batch["views"].sharding.is_equivalent_to(parallel.batch_sharded(mesh), 3)
        np.testing.assert_array_equal(np.asarray(batch["views"]), np.full((8, 2, 3), i))
        np.testing.assert_array_equal(np.asarray(batch["label"]), np.arange(8) + i)


def test_an_input_error_reaches_the_loop():
    def failing():
        yield from _host_batches(2)
        raise OSError("corrupt record")

    batches = prefetch.DevicePrefetcher(failing(), parallel.data_mesh())
    assert len([next(batches), next(batches)]) == 2
    with pytest.raises(OSError, match="corrupt record"):
        next(batches)
    batches.close()


def test_close_stops_reading_an_endless_stream():
    produced = []

    def endless():
        for batch in _host_batches():
            produced.append(batch)
            yield batch

    batches = prefetch.DevicePrefetcher(endless(), parallel.data_mesh(), buffer_size=2)
    next(batches)
    batches.close()
    count = len(produced)
    assert count <= 5  # one taken, two queued, one being put, one being read
    time.sleep(0.3)
    assert len(produced) == count
    assert not any(t.name == "device-prefetch" and t.is_alive() for t in threading.enumerate())
    with pytest.raises(StopIteration):
        next(batches)


def test_wait_time_counts_a_slow_input_and_not_a_fast_one():
    def slow():
        for batch in _host_batches(3):
            time.sleep(0.2)
            yield batch

    mesh = parallel.data_mesh()
    with contextlib.closing(prefetch.DevicePrefetcher(slow(), mesh)) as batches:
        list(batches)
        assert batches.wait_seconds >= 0.5
    with contextlib.closing(prefetch.DevicePrefetcher(_host_batches(3), mesh)) as batches:
        time.sleep(0.3)  # "compute" while the thread fills the buffer
        next(batches)
        assert batches.wait_seconds < 0.15


def test_buffer_size_must_be_positive():
    with pytest.raises(ValueError, match="buffer_size"):
        prefetch.DevicePrefetcher(_host_batches(1), parallel.data_mesh(), buffer_size=0)

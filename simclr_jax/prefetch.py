"""Overlapping input with compute: host batches become device arrays in a background thread.

While the accelerator runs step ``k``, a thread takes the next host batches from the input
pipeline and assembles them into global device arrays (:func:`parallel.host_batch_to_global`), so
that the training loop finds batch ``k + 1`` ready. The time the loop still waits is measured, so
that input-bound runs show up in the logged ``data_wait_fraction``.
"""

import queue
import threading
import time
from collections.abc import Iterator
from typing import Any

from jax.sharding import Mesh

from simclr_jax import parallel

_END = object()  # the host iterator is exhausted
_POLL_SECONDS = 0.1  # how often a blocked producer checks whether it was closed


class DevicePrefetcher:
    """Iterates over global batches, preparing up to ``buffer_size`` ahead in a thread.

    Yields what ``parallel.host_batch_to_global(next(host_batches), mesh)`` would, in the same
    order; an exception raised by ``host_batches`` is re-raised by ``next``. ``wait_seconds`` is
    the total time ``next`` spent waiting for a batch. Call :meth:`close` (or use
    ``contextlib.closing``) to stop the thread when the loop ends early.
    """

    def __init__(self, host_batches: Iterator[Any], mesh: Mesh, buffer_size: int = 2):
        if buffer_size < 1:
            raise ValueError(f"buffer_size must be at least 1, got {buffer_size}")
        self.wait_seconds = 0.0
        self._queue: queue.Queue = queue.Queue(maxsize=buffer_size)
        self._closed = threading.Event()
        self._finished = False
        self._thread = threading.Thread(
            target=self._produce, args=(host_batches, mesh), name="device-prefetch", daemon=True
        )
        self._thread.start()

    def _produce(self, host_batches: Iterator[Any], mesh: Mesh) -> None:
        try:
            for host_batch in host_batches:
                if not self._put(parallel.host_batch_to_global(host_batch, mesh)):
                    return
            self._put(_END)
        except BaseException as error:  # handed to the consumer, which re-raises it
            self._put(error)

    def _put(self, item: Any) -> bool:
        """Queues ``item`` unless closed first; returns whether it was queued."""
        while not self._closed.is_set():
            try:
                self._queue.put(item, timeout=_POLL_SECONDS)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> "DevicePrefetcher":
        return self

    def __next__(self) -> Any:
        if self._finished:
            raise StopIteration
        started = time.perf_counter()
        item = self._queue.get()
        self.wait_seconds += time.perf_counter() - started
        if item is _END:
            self._finished = True
            raise StopIteration
        if isinstance(item, BaseException):
            self._finished = True
            raise item
        return item

    def close(self) -> None:
        """Stops the thread (after the host batch it may be reading) and drops queued batches."""
        self._closed.set()
        self._finished = True
        self._thread.join()
        while not self._queue.empty():
            self._queue.get_nowait()

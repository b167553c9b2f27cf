"""Wall-clock timing of JAX calls that waits for their results (JAX dispatches asynchronously)."""

import time
from collections.abc import Callable
from typing import Any

import jax


def wall_times(fn: Callable[[], Any], repeats: int) -> list[float]:
    """Seconds of ``repeats`` calls of ``fn``, each waited for to completion."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return times

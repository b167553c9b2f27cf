"""Test setup: eight fake CPU devices, so multi-device behaviour is tested on any machine.

The flags must be set before JAX is first imported, which is why they live here.
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# TensorFlow only feeds data; keep it quiet and off any accelerator.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import pytest


@pytest.fixture(scope="session")
def fashion_mnist_data_dir(tmp_path_factory) -> str:
    """A TFDS data dir holding fashion_mnist, prepared once per session from Debian's files."""
    from simclr_jax.data import fashion_mnist_offline

    if not os.path.isdir(fashion_mnist_offline.DEBIAN_FASHION_MNIST_DIR):
        pytest.skip("Debian's dataset-fashion-mnist is not installed (make fashion-mnist-files)")
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    fashion_mnist_offline.prepare_fashion_mnist_offline(data_dir)
    return data_dir


# Large enough never to evict during a run; any size turns on JAX's file lock around the cache,
# which the processes sharing it (pytest-xdist's workers, command lines) need.
COMPILATION_CACHE_MAX_BYTES = 16 * 2**30


@pytest.fixture(scope="session", autouse=True)
def _compilation_cache(tmp_path_factory):
    """Shares XLA compilations between tests that build the same computations (e.g. the
    trainer's runs of one config), which is most of the suite's time on a CPU. Under
    pytest-xdist its workers share one cache, in the run's directory above their own."""
    import jax

    run_dir = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        run_dir = run_dir.parent
    cache_dir = run_dir / "xla_cache"
    cache_dir.mkdir(exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(cache_dir))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    jax.config.update("jax_compilation_cache_max_size", COMPILATION_CACHE_MAX_BYTES)

"""The real train step compiled ahead of time for a TPU topology on this CPU host (no TPU needed).

libtpu compiles for TPU topologies that ``jax.experimental.topologies`` describes; the program's
kernels must then be chosen for the TPU, not for the CPU host that compiles it (``conv_impl``
"auto" here would otherwise put the CPU-only oneDNN custom calls into it). Needs libtpu
(``make tpu-compiler`` keeps it in ``.tpu-compiler/``; x86-64 Linux); elsewhere these tests skip.
"""

import importlib.util
import os
import pathlib
import re

import jax
import jax.numpy as jnp
import pytest
from jax.experimental import topologies

from simclr_jax import kernels, parallel
from simclr_jax.configs import tiny
from simclr_jax.experiment import Experiment
from simclr_jax.models import XLA_LAYERS

# Where `make tpu-compiler` keeps libtpu, outside the environment (see the Makefile). JAX reads
# these variables when it first loads libtpu, i.e. in the first topology description below.
LIBTPU = pathlib.Path(__file__).resolve().parent.parent / ".tpu-compiler" / "libtpu" / "libtpu.so"
if LIBTPU.is_file():
    os.environ.setdefault("TPU_LIBRARY_PATH", str(LIBTPU))
# libtpu looks these up (and warns) when a topology is described; their values do not matter here.
os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-4")
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
pytestmark = pytest.mark.skipif(
    "TPU_LIBRARY_PATH" not in os.environ and importlib.util.find_spec("libtpu") is None,
    reason="libtpu is not installed (make tpu-compiler; x86-64 Linux)",
)

V5E_HBM_BYTES = 16 * 2**30  # per chip


def _abstract_arguments(experiment: Experiment):
    """The train step's (state, batch, key) as shapes with the shardings the trainer uses."""
    mesh = experiment.mesh
    replicated, sharded = parallel.replicated(mesh), parallel.batch_sharded(mesh)
    state = jax.eval_shape(lambda: experiment.initial_state(0))
    state = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), state
    )
    batch_size = experiment.config.global_batch_size
    batch = {
        "views": jax.ShapeDtypeStruct(
            (batch_size, 2, *experiment.image_shape), jnp.float32, sharding=sharded
        ),
        "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32, sharding=sharded),
    }
    key = jax.eval_shape(lambda: jax.random.key(0))
    return state, batch, jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=replicated)


def _compiled_step(config, mesh):
    experiment = Experiment(config, mesh)
    return experiment, experiment.train_step().lower(*_abstract_arguments(experiment)).compile()


def _flops(compiled) -> float:
    cost = compiled.cost_analysis()
    return float((cost[0] if isinstance(cost, list) else cost)["flops"])


def test_a_tpu_program_compiled_on_a_cpu_host_gets_xla_kernels(fashion_mnist_data_dir):
    config = tiny.get_config()
    config.data_dir = fashion_mnist_data_dir
    assert config.model.conv_impl == "auto"
    topology = topologies.get_topology_desc(
        topology_name="v5e:2x2",
        platform="tpu",
        chip_config_name="default",
        chips_per_host_bounds=(2, 2, 1),
        num_slices=1,
    )
    tpu_mesh = parallel.data_mesh(topology.devices)
    assert kernels.platform(tpu_mesh) == "tpu" and jax.default_backend() == "cpu"

    experiment, compiled = _compiled_step(config, tpu_mesh)
    assert experiment.layers == XLA_LAYERS
    targets = set(re.findall(r'custom_call_target="([^"]+)"', compiled.as_text()))
    assert not {t for t in targets if t.startswith("simclr_")}, targets
    memory = compiled.memory_analysis()
    used = memory.argument_size_in_bytes + memory.temp_size_in_bytes
    assert 0 < used < V5E_HBM_BYTES

    # The same step on one CPU device does the work of all four chips: XLA counts FLOPs per
    # device, and the TPU program splits the batch four ways.
    config.model.conv_impl = "xla"
    _, cpu_compiled = _compiled_step(config, parallel.data_mesh(jax.devices("cpu")[:1]))
    assert _flops(compiled) * 4 == pytest.approx(_flops(cpu_compiled), rel=0.03)

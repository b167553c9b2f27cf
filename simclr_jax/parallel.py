"""Data parallelism over a 1-D device mesh: the mesh, its shardings, host batches as global arrays.

The model state is replicated and every batch is sharded on its leading axis over the mesh axis
``data``. Under ``jax.jit`` the compiler then inserts the collectives itself: batch-norm statistics
and the NT-Xent negatives are computed over the global batch, exactly as on one device.
"""

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh named ``data`` over ``devices`` (default: every device of every process).

    The axis is ``AxisType.Auto`` so that the compiler, not hand-written collectives, handles the
    cross-device reductions of a replicated model applied to a batch-sharded input. Devices of
    several TPU slices (a multi-slice job: devices with distinct ``slice_index``) are laid out
    slice after slice, each slice in its own efficient order, so the axis spans every slice.
    """
    devices = list(jax.devices() if devices is None else devices)
    slices = {getattr(device, "slice_index", 0) for device in devices}
    if len(slices) == 1:
        return jax.make_mesh((len(devices),), (DATA_AXIS,), (AxisType.Auto,), devices=devices)
    # jax.make_mesh refuses devices of several slices.
    ordered = mesh_utils.create_hybrid_device_mesh(
        (len(devices) // len(slices),), (len(slices),), devices
    )
    return Mesh(ordered, (DATA_AXIS,), axis_types=(AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
    """Sharding of arrays held whole on every device of ``mesh`` (the train state)."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """Sharding that splits an array's leading (batch) axis over the ``data`` axis of ``mesh``."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def check_global_batch_size(
    global_batch_size: int, mesh: Mesh, name: str = "global batch size"
) -> None:
    """Raises a ValueError unless the global batch splits evenly over devices and processes.

    ``name`` is how the error message calls the batch (e.g. the config field it comes from).
    """
    num_devices = mesh.devices.size
    if global_batch_size <= 0 or global_batch_size % num_devices:
        raise ValueError(
            f"{name} {global_batch_size} is not divisible by the {num_devices} devices "
            f"of the data mesh; choose a positive multiple of {num_devices}."
        )
    num_processes = jax.process_count()
    if global_batch_size % num_processes:
        raise ValueError(
            f"{name} {global_batch_size} is not divisible by the {num_processes} "
            "processes; each process feeds an equal slice of the global batch."
        )


def host_batch_to_global(host_batch: Any, mesh: Mesh) -> Any:
    """Assembles each process's slice of a batch (a pytree of NumPy arrays) into global arrays.

    Every process passes its own ``[global_batch / process_count, ...]`` slice; the result is a
    pytree of ``[global_batch, ...]`` arrays sharded on axis 0 over the mesh.
    """
    sharding = batch_sharded(mesh)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), host_batch
    )

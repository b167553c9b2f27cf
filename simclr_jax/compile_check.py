"""Pod scale on paper: ``python -m simclr_jax.compile_check --config=NAME|PATH --topology=v5e:4x4``.

Compiles a recipe's real train step (and its embed step) for a TPU topology on any x86-64 Linux
host, without a TPU: libtpu compiles for the topology that ``jax.experimental.topologies``
describes, with the state and batch as ``jax.ShapeDtypeStruct`` sharded exactly as the trainer
shards them (state replicated, batch split over the ``data`` axis). It prints one JSON line per
topology: the devices and chip, what each device holds (``memory_analysis()``: arguments,
outputs, temporaries) against the chip's HBM, the FLOPs per device per step
(``cost_analysis()``), and a projected step time and time per epoch. libtpu refuses to compile
a step that cannot fit in a chip's memory: its line then holds ``"fits": false`` and libtpu's
message (``compile_error``).

The projection is an assumption, not a measurement: FLOPs per device divided by ``--mfu`` (the
fraction of the chip's published peak bfloat16 FLOP/s the step is assumed to reach, 0.4 by
default) times that peak. float32 models are projected against the same peak (a TPU computes
float32 matmuls and convolutions in bfloat16 passes at default precision).

``--topology`` takes a comma-separated list (``v5e:2x2,v5e:4x4,v4:2x2x2``); ``--num-slices=N``
compiles for N such slices joined over the data-centre network, the data axis spanning them all.
``--config.FIELD=VALUE`` overrides the recipe (batch size, ``model.dtype``, ``loss_block_size``,
...). The dataset need not be present: its size and classes come from TFDS's metadata when it is
prepared, otherwise from the published sizes in
:data:`simclr_jax.data.metadata.PUBLISHED_SPLITS`.

Needs libtpu: ``make tpu-compiler`` keeps it in ``.tpu-compiler/`` of the repository, or ``pip
install libtpu`` (the version the installed jax asks for).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import pathlib
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging as absl_logging
from jax.experimental import topologies

from simclr_jax import cli, config_checks, configs, parallel, step
from simclr_jax.data import metadata

if TYPE_CHECKING:  # imports TensorFlow (metadata only): the command imports it late
    from simclr_jax.experiment import Experiment

# Where `make tpu-compiler` keeps libtpu, outside the environment (see the Makefile).
LOCAL_LIBTPU = (
    pathlib.Path(__file__).resolve().parent.parent / ".tpu-compiler" / "libtpu" / "libtpu.so"
)
# Hosts of TPU VMs hold 2x2 chips in multi-host slices (v4, v5e, v5p, v6e).
CHIPS_PER_HOST = (2, 2, 1)
# libtpu's chip configuration per generation: v4's default gives one device per core, and JAX
# (like Cloud TPU VMs) wants one per chip ("megacore").
CHIP_CONFIGS = {"v4": "megacore"}


@dataclasses.dataclass(frozen=True)
class Chip:
    """A TPU generation's published figures per JAX device: a chip, except on v3, whose chips
    hold two TensorCores that JAX sees as two devices (the figures are then per core)."""

    name: str
    device_kinds: tuple[str, ...]  # jax.Device.device_kind of its devices
    peak_bf16_flops_per_s: float
    hbm_bytes: int


CHIPS = (
    # cloud.google.com/tpu/docs/v3 ("Key specifications": 123 TFLOP/s bf16, 32 GiB HBM2 per
    # chip); per TensorCore (one JAX device), half of each.
    Chip("v3", ("TPU v3",), 61.5e12, 16 * 2**30),
    # cloud.google.com/tpu/docs/v4 ("TPU v4 chip": 275 TFLOP/s bf16, 32 GiB HBM2).
    Chip("v4", ("TPU v4",), 275e12, 32 * 2**30),
    # cloud.google.com/tpu/docs/v5e ("Chip specifications": 197 TFLOP/s bf16, 16 GiB HBM2).
    Chip("v5e", ("TPU v5 lite", "TPU v5e"), 197e12, 16 * 2**30),
    # cloud.google.com/tpu/docs/v5p ("Chip specifications": 459 TFLOP/s bf16, 95 GiB HBM2e).
    Chip("v5p", ("TPU v5", "TPU v5p"), 459e12, 95 * 2**30),
    # cloud.google.com/tpu/docs/v6e ("Chip specifications": 918 TFLOP/s bf16, 32 GiB HBM).
    Chip("v6e", ("TPU v6 lite", "TPU v6e"), 918e12, 32 * 2**30),
)


def configure_libtpu() -> bool:
    """Points JAX at the repository's libtpu (if ``make tpu-compiler`` made one) and quiets
    libtpu's warnings about unset ``TPU_ACCELERATOR_TYPE`` / ``TPU_WORKER_HOSTNAMES`` (their
    values do not matter to a compile-only topology). Returns whether a libtpu is available.

    Call it before the first topology is described: JAX reads these variables when it first
    loads libtpu. Variables already set (e.g. on a TPU VM) are left alone.
    """
    if LOCAL_LIBTPU.is_file():
        os.environ.setdefault("TPU_LIBRARY_PATH", str(LOCAL_LIBTPU))
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-4")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    return "TPU_LIBRARY_PATH" in os.environ or importlib.util.find_spec("libtpu") is not None


def topology_devices(topology: str, num_slices: int = 1) -> list[jax.Device]:
    """The compile-only devices of ``num_slices`` slices of TPU ``topology`` (e.g. "v5e:4x4").

    Raises:
      ValueError: libtpu is missing or does not know ``topology``.
    """
    if not configure_libtpu():
        raise ValueError(
            "libtpu is not installed: run `make tpu-compiler` in the repository, or "
            "`pip install libtpu` (x86-64 Linux only)."
        )
    try:
        description = topologies.get_topology_desc(
            topology_name=topology,
            platform="tpu",
            chip_config_name=CHIP_CONFIGS.get(topology.partition(":")[0], "default"),
            chips_per_host_bounds=CHIPS_PER_HOST,
            num_slices=num_slices,
        )
    except (RuntimeError, ValueError) as error:
        detail = " ".join(str(error).split())
        raise ValueError(
            f"cannot describe TPU topology {topology!r} with {num_slices} slice(s) (names look "
            f"like v5e:4x4, v4:2x2x2, v5p:2x2x4, v6e:4x4): {detail}"
        ) from None
    return list(description.devices)


def chip(devices: Sequence[jax.Device]) -> Chip:
    """The :data:`CHIPS` entry of ``devices``' kind. Raises ValueError for another kind."""
    kind = devices[0].device_kind
    for entry in CHIPS:
        if kind in entry.device_kinds:
            return entry
    raise ValueError(
        f"no published figures for {kind!r} devices; known chips: "
        f"{', '.join(c.name for c in CHIPS)}."
    )


def dataset_info(config: ml_collections.ConfigDict) -> metadata.DatasetInfo:
    """The training split's metadata: from TFDS if the dataset is prepared here, otherwise the
    published figures (:func:`simclr_jax.data.metadata.published_info`).

    Raises:
      ValueError: neither is available.
    """
    from simclr_jax.data import pipeline

    with_data = {"data_dir": config.data_dir or None, "dataset_dir": config.dataset_dir or None}
    try:
        return pipeline.dataset_info(
            config.dataset, config.train_split, check_images=False, **with_data
        )
    except FileNotFoundError:
        published = metadata.published_info(config.dataset, config.train_split)
        if published is None:
            raise ValueError(
                f"{config.dataset} is not prepared here and split {config.train_split!r} has no "
                f"published size in this command's table; prepare it (or set data_dir)."
            ) from None
        return published


def abstract_step_arguments(
    initial_state: Callable[[], step.TrainState],
    mesh: jax.sharding.Mesh,
    batch_size: int,
    image_shape: tuple[int, int, int],
    num_small_crops: int = 0,
    small_crop_size: int = 0,
) -> tuple[Any, Any, jax.ShapeDtypeStruct]:
    """A train step's (state, batch, key) over ``mesh`` as shapes, nothing computed, with the
    shardings the trainer uses: the state ``initial_state()`` would return and the key
    replicated; a global batch of ``batch_size`` images split over the mesh's ``data`` axis,
    each two views of ``image_shape`` and a label, and ``num_small_crops`` multi-crop views of
    ``small_crop_size`` pixels a side, if any, as the pipeline adds them."""
    replicated, sharded = parallel.replicated(mesh), parallel.batch_sharded(mesh)
    state = jax.eval_shape(initial_state)
    state = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), state
    )
    batch = {
        "views": jax.ShapeDtypeStruct((batch_size, 2, *image_shape), jnp.float32, sharding=sharded),
        "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32, sharding=sharded),
    }
    if num_small_crops:
        shape = (batch_size, num_small_crops, small_crop_size, small_crop_size, image_shape[-1])
        batch["small_views"] = jax.ShapeDtypeStruct(shape, jnp.float32, sharding=sharded)
    key = jax.eval_shape(lambda: jax.random.key(0))
    return state, batch, jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=replicated)


def abstract_train_arguments(experiment: Experiment) -> tuple[Any, Any, jax.ShapeDtypeStruct]:
    """The experiment's train step's (state, batch, key) as shapes with the shardings the trainer
    uses (:func:`abstract_step_arguments`)."""
    num_small = experiment.config.augment.num_small_crops
    return abstract_step_arguments(
        lambda: experiment.initial_state(0),
        experiment.mesh,
        experiment.config.global_batch_size,
        experiment.image_shape,
        num_small,
        config_checks.small_crop_size(experiment.config, experiment.image_size) if num_small else 0,
    )


def compile_train_step(experiment: Experiment) -> jax.stages.Compiled:
    """The experiment's train step compiled, not run, for its mesh."""
    return experiment.train_step().lower(*abstract_train_arguments(experiment)).compile()


def compile_embed_step(experiment: Experiment) -> jax.stages.Compiled:
    """The embed step (evaluation's forward pass) compiled for the experiment's mesh, at
    ``eval_batch_size`` images."""
    state, _, _ = abstract_train_arguments(experiment)
    images = jax.ShapeDtypeStruct(
        (experiment.config.eval_batch_size, *experiment.image_shape),
        jnp.float32,
        sharding=parallel.batch_sharded(experiment.mesh),
    )
    return step.jit_embed_step(experiment.mesh).lower(state, images).compile()


def compiled_flops(compiled: jax.stages.Compiled) -> float:
    """The FLOPs per device that XLA's cost analysis counts in a compiled computation."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list):  # one entry per computation in some JAX versions
        analysis = analysis[0] if analysis else {}
    return float((analysis or {}).get("flops", float("nan")))


def memory_fields(compiled: jax.stages.Compiled) -> dict[str, int]:
    """Bytes per device of a compiled step: its arguments, outputs, temporaries and their total
    (arguments + outputs not aliased to donated arguments + temporaries)."""
    memory = compiled.memory_analysis()
    total = (
        memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        - memory.alias_size_in_bytes
        + memory.temp_size_in_bytes
    )
    return {
        "argument_bytes": memory.argument_size_in_bytes,
        "output_bytes": memory.output_size_in_bytes,
        "alias_bytes": memory.alias_size_in_bytes,
        "temp_bytes": memory.temp_size_in_bytes,
        "total_bytes": total,
    }


def projection(
    flops_per_device: float, tpu: Chip, mfu: float, steps_per_epoch: int
) -> dict[str, float]:
    """Projected seconds per step and per epoch if every chip runs at ``mfu`` of its published
    peak bf16 FLOP/s (an assumption: nothing here is measured on a TPU)."""
    step_s = flops_per_device / (mfu * tpu.peak_bf16_flops_per_s)
    return {"projected_step_s": step_s, "projected_epoch_s": step_s * steps_per_epoch}


def check_topology(
    config: ml_collections.ConfigDict,
    info: metadata.DatasetInfo,
    topology: str,
    num_slices: int = 1,
    mfu: float = 0.4,
) -> dict[str, Any]:
    """Compiles ``config``'s train and embed steps for ``num_slices`` slices of ``topology``;
    returns the JSON record (see the module docstring)."""
    from simclr_jax.experiment import Experiment

    devices = topology_devices(topology, num_slices)
    tpu = chip(devices)
    mesh = parallel.data_mesh(devices)
    parallel.check_global_batch_size(config.global_batch_size, mesh, "global_batch_size")
    parallel.check_global_batch_size(config.eval_batch_size, mesh, "eval_batch_size")
    experiment = Experiment(config, mesh, dataset_info=info)
    record = {
        "topology": topology,
        "num_slices": num_slices,
        "devices": len(devices),
        "hosts": len({d.process_index for d in devices}),
        "chip": tpu.name,
        "global_batch_size": config.global_batch_size,
        "dtype": config.model.dtype,
        "loss_block_size": config.loss_block_size,
        "image_shape": list(experiment.image_shape),
        "hbm_bytes_per_chip": tpu.hbm_bytes,
    }
    start = time.perf_counter()
    try:
        train = compile_train_step(experiment)
    except jax.errors.JaxRuntimeError as error:  # libtpu refuses a step that cannot fit
        if "RESOURCE_EXHAUSTED" not in str(error):
            raise
        detail = " ".join(str(error).split()).split(" Largest program allocations")[0]
        return {**record, "fits": False, "compile_error": detail}
    compile_s = time.perf_counter() - start
    embed = compile_embed_step(experiment)
    flops = compiled_flops(train)
    memory = memory_fields(train)
    return {
        **record,
        **{f"{name}_per_device": value for name, value in memory.items()},
        "fits": memory["total_bytes"] <= tpu.hbm_bytes,
        "flops_per_device_per_step": flops,
        "peak_bf16_flops_per_s_per_chip": tpu.peak_bf16_flops_per_s,
        "assumed_mfu": mfu,
        "steps_per_epoch": experiment.steps_per_epoch,
        **projection(flops, tpu, mfu, experiment.steps_per_epoch),
        "embed_batch_size": config.eval_batch_size,
        "embed_total_bytes_per_device": memory_fields(embed)["total_bytes"],
        "embed_flops_per_device": compiled_flops(embed),
        "compile_s": round(compile_s, 1),
    }


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line; ``--config.FIELD=VALUE`` arguments land in ``overrides``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--config",
        required=True,
        help="recipe: a shipped config's name (e.g. imagenet_resnet50) or a file's path; "
        "--config.FIELD=VALUE overrides its fields",
    )
    parser.add_argument(
        "--topology",
        default="v5e:4x4",
        help="TPU topologies, comma-separated (e.g. v5e:4x4,v4:2x2x1) [v5e:4x4]",
    )
    parser.add_argument("--num-slices", type=int, default=1, help="slices of each topology [1]")
    parser.add_argument(
        "--mfu",
        type=float,
        default=0.4,
        help="assumed fraction of the chip's peak bf16 FLOP/s, for the projection [0.4]",
    )
    args, rest = parser.parse_known_args(argv)
    args.overrides = [arg.removeprefix("--config.") for arg in rest if arg.startswith("--config.")]
    unknown = [arg for arg in rest if not arg.startswith("--config.")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if not 0 < args.mfu <= 1:
        parser.error(f"--mfu must be in (0, 1], got {args.mfu}")
    if args.num_slices < 1:
        parser.error(f"--num-slices must be at least 1, got {args.num_slices}")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = _parse_args(argv)
    with cli.errors_as_one_line(ValueError, FileNotFoundError):
        config = configs.load(args.config)
        cli.apply_config_overrides(config, args.overrides)
        info = dataset_info(config)
        for topology in filter(None, (t.strip() for t in args.topology.split(","))):
            record = check_topology(config, info, topology, args.num_slices, args.mfu)
            print(json.dumps({"config": args.config, **record}), flush=True)


if __name__ == "__main__":
    # Compile-only: keep JAX off any local accelerator; TensorFlow and TFDS (metadata only) quiet.
    jax.config.update("jax_platforms", "cpu")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    absl_logging.set_verbosity(absl_logging.ERROR)
    main()

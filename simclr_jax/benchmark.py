"""Train-step benchmark: ``python -m simclr_jax.benchmark [--config=NAME|PATH] [model flags]``.

Times the real SimCLR training step (the model, NT-Xent, optimiser and jit over a data mesh that
``python -m simclr_jax.train`` uses) on random images of a given shape, and prints one JSON line:
median and minimum step time over ``--steps`` timed steps after compilation and ``--warmup``
untimed ones; views/s (a step processes two views of each of ``batch`` images, and a recipe's
multi-crop small views beside them, which views/s does not count); the step's
FLOPs; the FLOP/s achieved; and utilisation against the float32 matmul FLOP/s that the same
process measures on the same devices.

``flops_per_step`` is the step's work over the whole batch, whatever the devices and ``conv_impl``
timed (:func:`step_flops`): XLA's cost analysis of the same step at the global batch, compiled
(never run) for one CPU device with XLA's own convolutions. Every formulation and every backend
is measured against that one count: on GPUs, XLA hands convolutions to cuDNN as custom calls,
which its cost analysis does not count. ``achieved_flops_per_s`` and ``utilisation`` divide it by
the timed step.
The record names the compiler options the step was compiled with
(:func:`simclr_jax.kernels.compiler_options`).

The model flags mean what they mean for the PyTorch reference step (``--model resnet18 --width 64
--image-size 32 --channels 3 --batch 128``: CIFAR stem up to 32 px, a 2-layer projection head,
τ = 0.5, SGD with momentum), so the two programs can be run side by side. With ``--config`` the
model, batch, image shape (from the dataset's metadata), dtype, ``conv_impl``, ``conv_precision``,
optimiser, objective
and multi-crop views come from a recipe, and model flags given explicitly override the recipe's
values. A recipe also adds the input pipeline's throughput (``input_pairs_per_s``, and
``input_headroom``: augmented views the pipeline makes per second over the images the step consumes
per second; below about 1 training is input-bound) and, with ``--measure-data-wait``,
``data_wait_fraction`` from a short real training run (``trainer.train_and_evaluate``, logged to
``metrics.jsonl``). With ``--conv-layers`` it also times every distinct convolution of the model on
one device's share of the batch (forward, input gradient, kernel gradient: ``conv_layers`` and
``conv_totals_ms``), to show where the step's convolution time goes
(:mod:`simclr_jax.cpu.conv_layers`)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
from dataclasses import asdict, dataclass
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from simclr_jax import (
    cli,
    compile_check,
    config_checks,
    configs,
    jsonio,
    kernels,
    optim,
    parallel,
    step,
    timing,
)
from simclr_jax.cpu import conv_layers
from simclr_jax.data import metadata
from simclr_jax.models import CONV_PRECISIONS, XLA_LAYERS, Layers, SimCLR, simclr_resnet

# The timed step's constant learning rate (its work is the same at any value).
LEARNING_RATE = 0.1


@dataclass(frozen=True)
class StepSetup:
    """What one benchmarked step computes: the network, the batch and the optimiser."""

    depth: int = 18
    base_width: int = 64
    width_multiplier: float = 1.0
    image_size: int = 32
    channels: int = 3
    batch: int = 128
    stem: str = "cifar"
    sk_ratio: float = 0.0
    se_ratio: float = 0.0
    projection_layers: int = 2
    projection_dim: int = 128
    projection_hidden_dim: int = 0  # 0: the width of h
    dtype: str = "float32"
    conv_impl: str = "auto"
    conv_precision: str = "float32"
    optimizer: str = "sgd"
    temperature: float = 0.5
    objective: str = "nt_xent"
    num_small_crops: int = 0  # multi-crop's small views per image
    small_crop_size: int = 0  # their side in pixels


def setup_from_config(
    config: ml_collections.ConfigDict, info: metadata.DatasetInfo | None = None
) -> StepSetup:
    """The step a recipe trains: its model, global batch, dtype and optimiser, at the image shape
    of its dataset's metadata ``info`` (None: read from the dataset, which must be prepared, with
    TensorFlow)."""
    if info is None:
        from simclr_jax.data import pipeline

        info = pipeline.dataset_info(
            config.dataset,
            config.train_split,
            data_dir=config.data_dir or None,
            dataset_dir=config.dataset_dir or None,
            check_images=False,  # the images are not read
        )
    height, _, channels = info.image_shape
    image_size = config.image_size or height
    num_small_crops = config.augment.num_small_crops
    return StepSetup(
        depth=config.model.depth,
        base_width=config.model.base_width,
        width_multiplier=config.model.width_multiplier,
        image_size=image_size,
        channels=channels,
        batch=config.global_batch_size,
        stem=config.model.stem,
        sk_ratio=config.model.sk_ratio,
        se_ratio=config.model.se_ratio,
        projection_layers=config.model.projection_layers,
        projection_dim=config.model.projection_dim,
        projection_hidden_dim=config.model.projection_hidden_dim,
        dtype=config.model.dtype,
        conv_impl=config.model.conv_impl,
        conv_precision=config.model.conv_precision,
        optimizer=config.optimizer,
        temperature=config.temperature,
        objective=config.objective,
        num_small_crops=num_small_crops,
        small_crop_size=config_checks.small_crop_size(config, image_size) if num_small_crops else 0,
    )


def matmul_peak_flops(mesh: jax.sharding.Mesh, size: int | None = None, repeats: int = 5) -> float:
    """Float32 FLOP/s of one large matmul per device, run on every device of ``mesh`` at once."""
    size = size or (1024 if kernels.platform(mesh) == "cpu" else 8192)
    devices = mesh.devices.size
    sharding = parallel.batch_sharded(mesh)
    a = jax.device_put(jnp.ones((devices, size, size), jnp.float32), sharding)
    matmul = jax.jit(lambda a: jnp.einsum("bij,bjk->bik", a, a), out_shardings=sharding)
    matmul(a).block_until_ready()
    return 2 * devices * size**3 / min(timing.wall_times(lambda: matmul(a), repeats))


def _model(setup: StepSetup, layers: Layers) -> SimCLR:
    return simclr_resnet(
        depth=setup.depth,
        width_multiplier=setup.width_multiplier,
        base_width=setup.base_width,
        stem=setup.stem,
        sk_ratio=setup.sk_ratio,
        se_ratio=setup.se_ratio,
        num_classes=10,
        projection_layers=setup.projection_layers,
        projection_dim=setup.projection_dim,
        projection_hidden_dim=setup.projection_hidden_dim or None,
        dtype=jnp.dtype(setup.dtype),
        layers=layers,
    )


def _image_shape(setup: StepSetup) -> tuple[int, int, int]:
    return (setup.image_size, setup.image_size, setup.channels)


def _initial_state(setup: StepSetup, layers: Layers) -> step.TrainState:
    tx = optim.create_optimizer(setup.optimizer, LEARNING_RATE, weight_decay=1e-6)
    # Any initial values do: RngBitGenerator keys compile far faster than threefry on a CPU.
    init_key = jax.random.key(0, impl="rbg")
    return step.create_train_state(_model(setup, layers), tx, init_key, _image_shape(setup))


def _jit_step(setup: StepSetup, mesh: jax.sharding.Mesh):
    return step.jit_train_step(
        mesh,
        temperature=setup.temperature,
        learning_rate_fn=lambda _: LEARNING_RATE,
        objective=setup.objective,
    )


def flop_counting_mesh() -> jax.sharding.Mesh:
    """The mesh of one CPU device that :func:`step_flops` compiles for.

    Raises:
      ValueError: ``JAX_PLATFORMS`` leaves JAX's CPU backend out (``cuda`` alone, say), so no
        step can be counted; callers ask first, before any timing.
    """
    try:
        return parallel.data_mesh(jax.local_devices(backend="cpu")[:1])
    except RuntimeError:
        platforms = os.environ.get("JAX_PLATFORMS", "")
        raise ValueError(
            f"JAX_PLATFORMS={platforms!r} leaves out JAX's CPU backend, on which a step's FLOPs "
            f"are counted: add it (JAX_PLATFORMS={platforms},cpu) or unset JAX_PLATFORMS."
        ) from None


def step_flops(setup: StepSetup) -> float:
    """The FLOPs of one training step of ``setup`` over its whole batch, the same on every
    backend and for every ``conv_impl``.

    XLA's cost analysis of the step compiled, never run, for one CPU device (JAX starts its CPU
    backend beside any accelerator's, unless ``JAX_PLATFORMS`` leaves it out) from shapes alone,
    at the global batch, with XLA's own convolutions (:data:`~simclr_jax.models.XLA_LAYERS`):
    XLA:CPU compiles those itself, so it counts them, where the GPU compiler hands them to cuDNN
    as custom calls that its cost analysis leaves out (as oneDNN's kernels are on a CPU).
    """
    mesh = flop_counting_mesh()
    arguments = compile_check.abstract_step_arguments(
        lambda: _initial_state(setup, XLA_LAYERS),
        mesh,
        setup.batch,
        _image_shape(setup),
        setup.num_small_crops,
        setup.small_crop_size,
    )
    return compile_check.compiled_flops(_jit_step(setup, mesh).lower(*arguments).compile())


def benchmark_step(
    setup: StepSetup, steps: int = 10, warmup: int = 2, devices: int | None = None
) -> dict[str, Any]:
    """Times ``steps`` training steps of ``setup`` on the first ``devices`` devices (None: all);
    returns the JSON record."""
    available = jax.devices()
    if devices is not None and not 1 <= devices <= len(available):
        raise ValueError(f"--devices must be in [1, {len(available)}], got {devices}.")
    mesh = parallel.data_mesh(available[:devices])
    parallel.check_global_batch_size(setup.batch, mesh, "--batch")
    image_shape = _image_shape(setup)
    layers = kernels.for_mesh(setup.conv_impl, mesh, setup.conv_precision)
    state = jax.device_put(_initial_state(setup, layers), parallel.replicated(mesh))
    rng = np.random.default_rng(0)
    host_batch = {
        "views": rng.uniform(size=(setup.batch, 2, *image_shape)).astype(np.float32),
        "label": rng.integers(0, 10, setup.batch).astype(np.int32),
    }
    if setup.num_small_crops:
        side = setup.small_crop_size
        host_batch["small_views"] = rng.uniform(
            size=(setup.batch, setup.num_small_crops, side, side, setup.channels)
        ).astype(np.float32)
    batch = parallel.host_batch_to_global(host_batch, mesh)
    flops = step_flops(setup)  # first: it fails fast where JAX_PLATFORMS leaves out the CPU
    key = jax.random.key(1)
    compiled = _jit_step(setup, mesh).lower(state, batch, key).compile()

    def run_one():
        nonlocal state
        state, metrics = compiled(state, batch, key)
        return metrics

    timing.wall_times(run_one, warmup)
    times = timing.wall_times(run_one, steps)
    median = statistics.median(times)
    peak = matmul_peak_flops(mesh)
    return {
        "framework": "jax",
        "version": jax.__version__,
        "backend": kernels.platform(mesh),
        "devices": mesh.devices.size,
        **asdict(setup),
        "conv_impl_resolved": layers.name,
        "compiler_options": kernels.compiler_options(mesh),
        "steps": steps,
        "median_step_s": round(median, 6),
        "min_step_s": round(min(times), 6),
        "views_per_s": round(2 * setup.batch / median, 2),
        "flops_per_step": flops,
        "achieved_flops_per_s": flops / median,
        "matmul_peak_flops_per_s": peak,
        "utilisation": flops / median / peak,
    }


def conv_layer_fields(setup: StepSetup, devices: int) -> dict[str, Any]:
    """Each distinct convolution of ``setup``'s model at one device's share of the batch, timed
    forward, input gradient and kernel gradient (:mod:`simclr_jax.conv_layers`)."""
    model = _model(setup, XLA_LAYERS)  # the same convolutions, as plain primitives in the jaxpr
    views = jax.ShapeDtypeStruct(
        (2 * setup.batch // devices, setup.image_size, setup.image_size, setup.channels),
        jnp.float32,
    )
    variables = jax.eval_shape(
        lambda images: model.init(jax.random.key(0), images, train=False), views
    )
    convolutions = conv_layers.model_convolutions(model.apply, variables, views)
    layers = kernels.for_mesh(
        setup.conv_impl, parallel.data_mesh(jax.devices()[:devices]), setup.conv_precision
    )
    return conv_layers.time_convolutions(convolutions, layers, jnp.dtype(setup.dtype))


def input_fields(config: ml_collections.ConfigDict, step_views_per_s: float) -> dict[str, float]:
    """``input_pairs_per_s`` of ``config``'s pretraining pipeline (this process, model-free) and
    ``input_headroom``: the views it makes per second over those the step consumes per process."""
    from simclr_jax import input_throughput  # imports TensorFlow: the pure step does not need it

    measured = input_throughput.measure_pretrain_throughput(config)
    consumed = step_views_per_s / jax.process_count()
    return {
        "input_pairs_per_s": round(measured["pairs_per_s"], 2),
        "input_headroom": round(measured["views_per_s"] / consumed, 3),
    }


def short_training_run(config: ml_collections.ConfigDict, steps: int) -> list[dict[str, Any]]:
    """The ``metrics.jsonl`` records of a ``steps``-step training run of ``config`` in a temporary
    workdir.

    Runs :func:`simclr_jax.trainer.train_and_evaluate` without evaluation, logging six times. The
    run's terminal output goes to stderr, so stdout keeps one JSON line.
    """
    from simclr_jax import trainer

    config = config.copy_and_resolve_references()
    config.num_train_steps = steps
    config.log_every_steps = max(1, steps // 6)
    config.checkpoint_every_steps = steps
    config.eval_every_steps = 0
    config.compute_baselines = False
    config.evaluate_at_end = False
    with tempfile.TemporaryDirectory() as workdir, contextlib.redirect_stdout(sys.stderr):
        trainer.train_and_evaluate(config, workdir)
        return jsonio.read_jsonl(os.path.join(workdir, "metrics.jsonl"))


def steady_mean(records: list[dict[str, Any]], field: str) -> float:
    """The mean of ``field`` over the records that log it, the first of them left out when there
    are more (a warm-up interval: ``data_wait_fraction``'s first holds compilation)."""
    values = [r[field] for r in records if field in r]
    if not values:
        raise ValueError(f"no logged record has {field!r}: train for more steps.")
    return statistics.mean(values[1:] or values)


def measure_data_wait(config: ml_collections.ConfigDict, steps: int = 30) -> dict[str, float]:
    """``data_wait_fraction`` of a ``steps``-step :func:`short_training_run` of ``config``: the
    mean over the logged intervals after the first."""
    if steps < 2:
        raise ValueError(f"--data-wait-steps must be at least 2, got {steps}.")
    records = short_training_run(config, steps)
    return {
        "data_wait_fraction": round(steady_mean(records, "data_wait_fraction"), 4),
        "data_wait_steps": steps,
    }


# Manual-mode values of the model flags; with --config the recipe's values take their place.
_DEFAULTS = {
    "model": "resnet18",
    "width": 64,
    "width_multiplier": 1.0,
    "image_size": 32,
    "channels": 3,
    "batch": 128,
    "dtype": "float32",
    "conv_impl": "auto",
    "conv_precision": "float32",
}
# Model flag -> the recipe field it overrides (--model sets the depth).
_CONFIG_FIELDS = {
    "model": ("model", "depth"),
    "width": ("model", "base_width"),
    "width_multiplier": ("model", "width_multiplier"),
    "image_size": ("image_size",),
    "batch": ("global_batch_size",),
    "dtype": ("model", "dtype"),
    "conv_impl": ("model", "conv_impl"),
    "conv_precision": ("model", "conv_precision"),
}


def _parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; ``--config.FIELD=VALUE`` arguments land in ``overrides``."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Model flags default to the values in brackets; with --config they default to the "
        "recipe's, and those given explicitly override the recipe (the training run of "
        "--measure-data-wait and the input measurement use the overridden recipe too).",
    )
    parser.add_argument(
        "--config",
        help="recipe to benchmark: a shipped config's name (e.g. fashion_mnist) or a file's path; "
        "--config.FIELD=VALUE overrides its fields",
    )
    model = parser.add_argument_group("model flags")
    model.add_argument("--model", help="resnet18, resnet34, resnet50, ... [resnet18]")
    model.add_argument("--width", type=int, help="channels of the first group [64]")
    model.add_argument("--width-multiplier", type=float, help="[1.0]")
    model.add_argument("--image-size", type=int, help="[32]")
    model.add_argument(
        "--channels", type=int, help="[3]; with --config the dataset's, not overridable"
    )
    model.add_argument("--batch", type=int, help="images per step, 2 views each [128]")
    model.add_argument("--dtype", choices=("float32", "bfloat16"), help="[float32]")
    model.add_argument("--conv-impl", choices=kernels.CONV_IMPLS, help="[auto]")
    model.add_argument(
        "--conv-precision",
        choices=CONV_PRECISIONS,
        help="the type convolutions multiply in (model.conv_precision) [float32]",
    )
    parser.add_argument("--steps", type=int, default=10, help="timed steps [10]")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling [2]")
    parser.add_argument("--devices", type=int, help="time the step on the first N devices [all]")
    parser.add_argument(
        "--conv-layers",
        action="store_true",
        help="also time each distinct convolution of the model: forward, input and kernel "
        "gradient (conv_layers, conv_totals_ms)",
    )
    recipe = parser.add_argument_group("with --config")
    recipe.add_argument("--data-dir", help="TFDS data directory (the recipe's data_dir)")
    recipe.add_argument(
        "--no-input",
        action="store_true",
        help="skip timing the input pipeline (input_pairs_per_s, input_headroom)",
    )
    recipe.add_argument(
        "--measure-data-wait",
        action="store_true",
        help="also train the recipe for --data-wait-steps steps and report data_wait_fraction",
    )
    recipe.add_argument("--data-wait-steps", type=int, default=30, help="[30]")
    args, rest = parser.parse_known_args(argv)
    args.overrides = [arg.removeprefix("--config.") for arg in rest if arg.startswith("--config.")]
    unknown = [arg for arg in rest if not arg.startswith("--config.")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if not args.config:
        if args.overrides:
            parser.error("--config.FIELD=VALUE needs --config")
        for flag in ("data_dir", "measure_data_wait"):
            if getattr(args, flag):
                parser.error(f"--{flag.replace('_', '-')} needs --config")
        for name, value in _DEFAULTS.items():
            if getattr(args, name) is None:
                setattr(args, name, value)
    elif args.channels is not None:
        parser.error("--channels comes from the recipe's dataset with --config")
    return args


def _depth(model: str) -> int:
    depth = model.removeprefix("resnet")
    if not depth.isdigit():
        raise SystemExit(f"error: --model must be resnetDEPTH (e.g. resnet18), got {model}")
    return int(depth)


def config_with_overrides(args: argparse.Namespace) -> ml_collections.ConfigDict:
    """The recipe ``--config`` names, with its ``--config.FIELD=VALUE`` overrides and the model
    flags given explicitly written into it."""
    config = configs.load(args.config)
    cli.apply_config_overrides(config, args.overrides)
    if args.data_dir:
        config.data_dir = args.data_dir
    for name, field in _CONFIG_FIELDS.items():
        value = getattr(args, name)
        if value is None:
            continue
        *parents, leaf = field
        node = config
        for parent in parents:
            node = node[parent]
        node[leaf] = _depth(value) if name == "model" else value
    return config


def _setup_from_args(args: argparse.Namespace) -> StepSetup:
    """The manual-mode step: the PyTorch reference's network at the flags' sizes."""
    return StepSetup(
        depth=_depth(args.model),
        base_width=args.width,
        width_multiplier=args.width_multiplier,
        image_size=args.image_size,
        channels=args.channels,
        batch=args.batch,
        stem="cifar" if args.image_size <= 32 else "imagenet",
        dtype=args.dtype,
        conv_impl=args.conv_impl,
        conv_precision=args.conv_precision,
    )


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    with cli.errors_as_one_line(ValueError, FileNotFoundError):
        if not args.config:
            setup = _setup_from_args(args)
            record = benchmark_step(setup, args.steps, args.warmup, args.devices)
        else:
            config = config_with_overrides(args)
            from simclr_jax.data import pipeline

            pipeline.prepare_dataset(
                config.dataset,
                data_dir=config.data_dir or None,
                dataset_dir=config.dataset_dir or None,
            )
            setup = setup_from_config(config)
            record = {
                "config": args.config,
                **benchmark_step(setup, args.steps, args.warmup, args.devices),
            }
            if not args.no_input:
                record.update(input_fields(config, record["views_per_s"]))
            if args.measure_data_wait:
                record.update(measure_data_wait(config, args.data_wait_steps))
        if args.conv_layers:
            record.update(conv_layer_fields(setup, record["devices"]))
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
    cli.restart_with_huge_pages()
    main()

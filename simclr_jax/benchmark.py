"""Train-step benchmark: ``python -m simclr_jax.benchmark [--config=PATH | model flags]``.

Times the real SimCLR training step (the model, NT-Xent, optimiser and jit over a data mesh that
``python -m simclr_jax.train`` uses) on random images of a given shape, and prints one JSON line:
median and minimum step time over ``--steps`` timed steps after compilation and ``--warmup``
untimed ones; images/s (views: a step processes ``2 * batch`` images); the step's FLOPs from
XLA's cost analysis; the FLOP/s achieved; and utilisation against the float32 matmul FLOP/s that
the same process measures on the same devices.

The model flags mean what they mean for the PyTorch reference step (``--model resnet18 --width 64
--image-size 32 --channels 3 --batch 128``: CIFAR stem up to 32 px, a 2-layer projection head,
τ = 0.5, SGD with momentum), so the two programs can be run side by side. With ``--config`` the
model, batch, image shape (from the dataset's metadata), dtype and optimiser come from a recipe.
"""

import argparse
import importlib.util
import json
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from simclr_jax import optim, parallel, step
from simclr_jax.models import conv, simclr_resnet


@dataclass(frozen=True)
class StepSetup:
    """What one benchmarked step computes: the network, the batch and the optimiser."""

    depth: int = 18
    base_width: int = 64
    width_multiplier: float = 1.0
    image_size: int = 32
    channels: int = 3
    batch: int = 128
    projection_layers: int = 2
    dtype: str = "float32"
    conv_impl: str = "auto"
    optimizer: str = "sgd"
    temperature: float = 0.5

    @property
    def stem(self) -> str:
        return "cifar" if self.image_size <= 32 else "imagenet"


def setup_from_config(config: ml_collections.ConfigDict) -> StepSetup:
    """The step a recipe trains: its model, global batch, dtype and optimiser, at the image shape
    its dataset has (read from the dataset's metadata, so the dataset must be prepared)."""
    from simclr_jax.data import pipeline

    info = pipeline.dataset_info(
        config.dataset,
        config.train_split,
        data_dir=config.data_dir or None,
        dataset_dir=config.dataset_dir or None,
    )
    height, _, channels = info.image_shape
    return StepSetup(
        depth=config.model.depth,
        base_width=config.model.base_width,
        width_multiplier=config.model.width_multiplier,
        image_size=config.image_size or height,
        channels=channels,
        batch=config.global_batch_size,
        projection_layers=config.model.projection_layers,
        dtype=config.model.dtype,
        conv_impl=config.model.conv_impl,
        optimizer=config.optimizer,
        temperature=config.temperature,
    )


def _timed(fn: Callable[[], Any], repeats: int) -> list[float]:
    """Wall times of ``repeats`` calls of ``fn``, each waited for to completion."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return times


def matmul_peak_flops(mesh: jax.sharding.Mesh, size: int | None = None, repeats: int = 5) -> float:
    """Float32 FLOP/s of one large matmul per device, run on every device of ``mesh`` at once."""
    size = size or (2048 if jax.default_backend() == "cpu" else 8192)
    devices = mesh.devices.size
    sharding = parallel.batch_sharded(mesh)
    a = jax.device_put(jnp.ones((devices, size, size), jnp.float32), sharding)
    matmul = jax.jit(lambda a: jnp.einsum("bij,bjk->bik", a, a), out_shardings=sharding)
    matmul(a).block_until_ready()
    return 2 * devices * size**3 / min(_timed(lambda: matmul(a), repeats))


def benchmark_step(setup: StepSetup, steps: int = 10, warmup: int = 2) -> dict[str, Any]:
    """Times ``steps`` training steps of ``setup`` on all devices; returns the JSON record."""
    mesh = parallel.data_mesh()
    parallel.check_global_batch_size(setup.batch, mesh, "--batch")
    model = simclr_resnet(
        depth=setup.depth,
        width_multiplier=setup.width_multiplier,
        base_width=setup.base_width,
        stem=setup.stem,
        num_classes=10,
        projection_layers=setup.projection_layers,
        dtype=jnp.dtype(setup.dtype),
        conv_impl=setup.conv_impl,
    )
    learning_rate = 0.1
    tx = optim.create_optimizer(setup.optimizer, learning_rate, weight_decay=1e-6)
    image_shape = (setup.image_size, setup.image_size, setup.channels)
    state = jax.device_put(
        step.create_train_state(model, tx, jax.random.key(0), image_shape),
        parallel.replicated(mesh),
    )
    rng = np.random.default_rng(0)
    host_batch = {
        "views": rng.uniform(size=(setup.batch, 2, *image_shape)).astype(np.float32),
        "label": rng.integers(0, 10, setup.batch).astype(np.int32),
    }
    batch = parallel.host_batch_to_global(host_batch, mesh)
    key = jax.random.key(1)
    train_step = step.jit_train_step(
        mesh, temperature=setup.temperature, learning_rate_fn=lambda _: learning_rate
    )
    flops = train_step.lower(state, batch, key).cost_analysis().get("flops", float("nan"))

    def run_one():
        nonlocal state
        state, metrics = train_step(state, batch, key)
        return metrics

    _timed(run_one, max(warmup, 1))  # the first call compiles
    times = _timed(run_one, steps)
    median = statistics.median(times)
    peak = matmul_peak_flops(mesh)
    return {
        "framework": "jax",
        "version": jax.__version__,
        "backend": jax.default_backend(),
        "devices": mesh.devices.size,
        **asdict(setup),
        "conv_impl_resolved": conv.resolve_conv_impl(setup.conv_impl),
        "steps": steps,
        "median_step_s": round(median, 4),
        "min_step_s": round(min(times), 4),
        "images_per_s": round(2 * setup.batch / median, 2),
        "flops_per_step": flops,
        "achieved_flops_per_s": flops / median,
        "matmul_peak_flops_per_s": peak,
        "utilisation": flops / median / peak,
    }


def _load_config(path: str) -> ml_collections.ConfigDict:
    """``get_config()`` of a config file (``configs/*.py``, which import ``configs.default``)."""
    import sys

    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if repo_root not in sys.path:
        sys.path.insert(0, repo_root)
    spec = importlib.util.spec_from_file_location("benchmarked_config", path)
    if spec is None or spec.loader is None or not os.path.isfile(path):
        raise SystemExit(f"error: config file not found: {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def _parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="recipe to benchmark (configs/NAME.py)")
    parser.add_argument("--model", default="resnet18", help="resnet18, resnet34, resnet50, ...")
    parser.add_argument("--width", type=int, default=64, help="channels of the first group")
    parser.add_argument("--width-multiplier", type=float, default=1.0)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--batch", type=int, default=128, help="images per step (2 views each)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--conv-impl", default="auto", choices=conv.CONV_IMPLS)
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling")
    return parser.parse_args(argv)


def _setup_from_args(args: argparse.Namespace) -> StepSetup:
    if args.config:
        setup = setup_from_config(_load_config(args.config))
        return StepSetup(**{**asdict(setup), "conv_impl": args.conv_impl})
    depth = args.model.removeprefix("resnet")
    if not depth.isdigit():
        raise SystemExit(f"error: --model must be resnetDEPTH (e.g. resnet18), got {args.model}")
    return StepSetup(
        depth=int(depth),
        base_width=args.width,
        width_multiplier=args.width_multiplier,
        image_size=args.image_size,
        channels=args.channels,
        batch=args.batch,
        dtype=args.dtype,
        conv_impl=args.conv_impl,
    )


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    try:
        record = benchmark_step(_setup_from_args(args), steps=args.steps, warmup=args.warmup)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()

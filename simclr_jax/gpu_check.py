"""A ready GPU check: ``python -m simclr_jax.gpu_check [--fashion-mnist-files=DIR] [--smoke]``.

On a machine with NVIDIA GPUs (the package installed as the README says, plus ``jax[cuda12]``)
it runs three things in one process and prints one JSON line:

* ``resnet50_bf16``: the ImageNet ResNet-50 step (``imagenet_resnet50`` in bfloat16, 224 px,
  ``--resnet50-batch-per-device`` images per GPU);
* ``resnet18_cifar10``: the CIFAR-10 ResNet-18 step (``cifar10_resnet18``: float32, B=512 over
  all GPUs), with ``cifar10_epoch_s``, its step time times the steps of a CIFAR-10-sized epoch
  (50,000 // B);
* ``fashion_mnist_run``: a short real training run of the ``fashion_mnist`` recipe, with its
  views/s and data-wait fraction over the logged intervals after the first.

The two steps are timed by :func:`simclr_jax.benchmark.benchmark_step` on synthetic device inputs
(pure step time; neither dataset is needed, nor TensorFlow: the steps take the datasets' published
image shapes). Each reports views/s (two per image) and its MFU: FLOPs per device per step / step
time / the GPU's published dense peak (:data:`GPUS`). The FLOPs per device are the step's over all
GPUs divided by the GPUs, counted by :func:`simclr_jax.benchmark.step_flops` on the step compiled
for one CPU device: XLA's GPU compiler hands the convolutions to cuDNN, and its cost analysis
leaves them out. A bfloat16 step is measured against the bfloat16 peak, a float32 step against the
TF32 peak: at JAX's default precision these GPUs compute float32 convolutions and matmuls in TF32.
On a device without a published figure (another GPU, a CPU) the peak is the float32 matmul FLOP/s
the benchmark measures there, and ``peak_source`` says so.

Nothing is downloaded: Fashion-MNIST is prepared into ``--data-dir`` (TFDS's default when unset)
from the four IDX files in ``--fashion-mnist-files`` (Debian's ``dataset-fashion-mnist``; copy
them along to a machine without network). ``--smoke`` shrinks the steps and the run (tiny widths
and images, a few steps, the ``tiny`` recipe) so that the whole check runs on a CPU in seconds:
the test suite runs it so.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
from collections.abc import Sequence
from typing import Any

import jax

from simclr_jax import benchmark, cli, configs
from simclr_jax.benchmark import StepSetup
from simclr_jax.data import metadata

# A CIFAR-10-sized epoch: the training split's images.
CIFAR10_TRAIN_IMAGES = 50_000


@dataclasses.dataclass(frozen=True)
class Gpu:
    """An NVIDIA GPU's published dense peak (without sparsity), per GPU."""

    name: str
    kind_words: tuple[str, ...]  # all in jax.Device.device_kind, e.g. "NVIDIA H100 PCIe"
    peak_bf16_flops_per_s: float
    peak_tf32_flops_per_s: float


# NVIDIA's datasheets, Tensor Core dense figures; where a datasheet lists only the figures with
# sparsity (Hopper, Ada), half of them. The more specific names come first.
GPUS = (
    # H100 datasheet, PCIe: BF16 1,513 / TF32 756 TFLOP/s with sparsity.
    Gpu("H100 PCIe", ("h100", "pcie"), 756e12, 378e12),
    # H100 datasheet, NVL: BF16 1,671 / TF32 835 TFLOP/s with sparsity.
    Gpu("H100 NVL", ("h100", "nvl"), 835e12, 418e12),
    # H100 datasheet, SXM: BF16 1,979 / TF32 989 TFLOP/s with sparsity.
    Gpu("H100 SXM", ("h100",), 989e12, 494e12),
    # H200 datasheet, NVL: BF16 1,671 / TF32 835 TFLOP/s with sparsity.
    Gpu("H200 NVL", ("h200", "nvl"), 835e12, 418e12),
    # H200 datasheet, SXM: BF16 1,979 / TF32 989 TFLOP/s with sparsity.
    Gpu("H200 SXM", ("h200",), 989e12, 494e12),
    # A100 datasheet (40 and 80 GB, SXM and PCIe): BF16 312 / TF32 156 TFLOP/s dense.
    Gpu("A100", ("a100",), 312e12, 156e12),
    # A10 datasheet: BF16 125 / TF32 62.5 TFLOP/s dense.
    Gpu("A10", ("a10",), 125e12, 62.5e12),
    # L40S datasheet: BF16 362 / TF32 183 TFLOP/s dense.
    Gpu("L40S", ("l40s",), 362e12, 183e12),
    # L4 datasheet: BF16 242 / TF32 120 TFLOP/s with sparsity.
    Gpu("L4", ("l4",), 121e12, 60e12),
)

# The sizes --smoke trains at: enough to run every code path, small enough for a CPU.
SMOKE_SIZES = {"depth": 18, "base_width": 2, "image_size": 16, "conv_impl": "xla"}
SMOKE_BATCH_PER_DEVICE = 2
# Counts of steps that the flags default to: (full check, --smoke).
STEP_DEFAULTS = {"steps": (20, 2), "warmup": (3, 1), "train_steps": (120, 4)}


def gpu_for_kind(device_kind: str) -> Gpu | None:
    """The :data:`GPUS` entry whose words are all in ``device_kind`` (None: no published
    figures here)."""
    words = set(re.split(r"[^a-z0-9]+", device_kind.lower()))
    return next((gpu for gpu in GPUS if words.issuperset(gpu.kind_words)), None)


def peak_flops_per_device(gpu: Gpu | None, dtype: str, record: dict[str, Any]) -> float:
    """The peak a step of ``dtype`` is measured against: the GPU's published bfloat16 or TF32
    figure, else the float32 matmul FLOP/s per device of the benchmark's ``record``."""
    if gpu is None:
        return record["matmul_peak_flops_per_s"] / record["devices"]
    return gpu.peak_bf16_flops_per_s if dtype == "bfloat16" else gpu.peak_tf32_flops_per_s


def peak_source(gpu: Gpu | None, device_kind: str) -> str:
    """Where the peaks come from, in words."""
    if gpu is None:
        return f"measured float32 matmul FLOP/s (no published figures for {device_kind!r})"
    return (
        f"NVIDIA {gpu.name} datasheet, dense: {gpu.peak_bf16_flops_per_s / 1e12:g} TFLOP/s "
        f"bfloat16, {gpu.peak_tf32_flops_per_s / 1e12:g} TFLOP/s TF32"
    )


def step_fields(setup: StepSetup, record: dict[str, Any], peak: float) -> dict[str, Any]:
    """A timed step's JSON: its shape, views/s, FLOPs per device and MFU against ``peak``
    (FLOP/s per device)."""
    flops_per_device = record["flops_per_step"] / record["devices"]
    return {
        "depth": setup.depth,
        "width_multiplier": setup.width_multiplier,
        "base_width": setup.base_width,
        "image_size": setup.image_size,
        "dtype": setup.dtype,
        "batch": setup.batch,
        "batch_per_device": setup.batch // record["devices"],
        "conv_impl_resolved": record["conv_impl_resolved"],
        "steps": record["steps"],
        "median_step_s": record["median_step_s"],
        "views_per_s": record["views_per_s"],
        "flops_per_device_per_step": flops_per_device,
        "peak_flops_per_s_per_device": peak,
        "mfu": flops_per_device / record["median_step_s"] / peak,
    }


def recipe_step(name: str, batch: int, smoke: bool) -> StepSetup:
    """The step of shipped recipe ``name`` at global ``batch``, shrunk to
    :data:`SMOKE_SIZES` with ``smoke``. Its dataset need not be here (its published size is)."""
    config = configs.load(name)
    info = metadata.published_info(config.dataset, config.train_split)
    setup = benchmark.setup_from_config(config, info)
    setup = dataclasses.replace(setup, batch=batch)
    return dataclasses.replace(setup, **SMOKE_SIZES) if smoke else setup


def time_step(setup: StepSetup, args: argparse.Namespace, gpu: Gpu | None) -> dict[str, Any]:
    """``setup``'s step timed on ``args.devices`` devices: :func:`step_fields`."""
    record = benchmark.benchmark_step(setup, args.steps, args.warmup, args.devices)
    return step_fields(setup, record, peak_flops_per_device(gpu, setup.dtype, record))


def cifar10_epoch_fields(step: dict[str, Any]) -> dict[str, Any]:
    """The time of a CIFAR-10-sized epoch (50,000 images) at ``step``'s batch and step time."""
    steps_per_epoch = CIFAR10_TRAIN_IMAGES // step["batch"]
    return {
        "cifar10_steps_per_epoch": steps_per_epoch,
        "cifar10_epoch_s": steps_per_epoch * step["median_step_s"],
    }


def fashion_mnist_run(args: argparse.Namespace) -> dict[str, Any]:
    """A ``args.train_steps``-step training run of ``fashion_mnist`` (``tiny`` with ``--smoke``)
    on the prepared data: its batch, views/s and data-wait fraction after the first interval."""
    name = "tiny" if args.smoke else "fashion_mnist"
    config = configs.load(name)
    config.data_dir = args.data_dir or ""
    records = benchmark.short_training_run(config, args.train_steps)
    return {
        "config": name,
        "steps": args.train_steps,
        "batch": config.global_batch_size,
        "views_per_s": round(benchmark.steady_mean(records, "views_per_s"), 2),
        "data_wait_fraction": round(benchmark.steady_mean(records, "data_wait_fraction"), 4),
        "final_loss": records[-1]["loss"],
    }


def check(args: argparse.Namespace) -> dict[str, Any]:
    """Runs the check (see the module docstring); returns its JSON record.

    Raises:
      ValueError: JAX has no GPU and ``args.smoke`` is off, ``JAX_PLATFORMS`` leaves out the
        CPU backend that counts the steps' FLOPs, or a batch does not split over the devices.
      FileNotFoundError: Fashion-MNIST's files are missing.
    """
    backend = jax.default_backend()
    if backend != "gpu" and not args.smoke:
        raise ValueError(
            f"JAX's backend is {backend!r}, not 'gpu': install jax[cuda12] as the README says "
            "(or pass --smoke for the reduced run on this device)."
        )
    benchmark.flop_counting_mesh()  # mfu needs it: fail here, not after minutes of timing
    from simclr_jax.data import fashion_mnist_offline  # imports TensorFlow Datasets: only here

    fashion_mnist_offline.prepare_fashion_mnist_offline(args.data_dir, args.fashion_mnist_files)
    devices = jax.devices()[: args.devices]
    kind = devices[0].device_kind
    gpu = gpu_for_kind(kind)
    per_device = SMOKE_BATCH_PER_DEVICE if args.smoke else args.resnet50_batch_per_device
    resnet50 = recipe_step("imagenet_resnet50", per_device * len(devices), args.smoke)
    resnet18_batch = SMOKE_BATCH_PER_DEVICE * len(devices) if args.smoke else 512
    resnet18 = recipe_step("cifar10_resnet18", resnet18_batch, args.smoke)
    resnet18_fields = time_step(resnet18, args, gpu)
    return {
        "check": "simclr_jax.gpu_check",
        "smoke": args.smoke,
        "jax": jax.__version__,
        "backend": backend,
        "device_kind": kind,
        "devices": len(devices),
        "gpu": gpu.name if gpu else None,
        "peak_source": peak_source(gpu, kind),
        "resnet50_bf16": time_step(dataclasses.replace(resnet50, dtype="bfloat16"), args, gpu),
        "resnet18_cifar10": {**resnet18_fields, **cifar10_epoch_fields(resnet18_fields)},
        "fashion_mnist_run": fashion_mnist_run(args),
    }


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    from simclr_jax.data import fashion_mnist_offline

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--fashion-mnist-files",
        default=fashion_mnist_offline.DEBIAN_FASHION_MNIST_DIR,
        help="folder of Fashion-MNIST's four IDX .gz files [%(default)s]",
    )
    parser.add_argument(
        "--data-dir", help="TFDS data directory to prepare fashion_mnist in [TFDS's default]"
    )
    parser.add_argument(
        "--resnet50-batch-per-device", type=int, default=256, help="ResNet-50 images per GPU [256]"
    )
    parser.add_argument("--steps", type=int, help="timed steps per model [20; --smoke 2]")
    parser.add_argument("--warmup", type=int, help="untimed steps after compiling [3; --smoke 1]")
    parser.add_argument("--train-steps", type=int, help="training-run steps [120; --smoke 4]")
    parser.add_argument("--devices", type=int, help="time the steps on the first N devices [all]")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny sizes and few steps: a run of seconds on a CPU"
    )
    args = parser.parse_args(argv)
    for flag, defaults in STEP_DEFAULTS.items():
        if getattr(args, flag) is None:
            setattr(args, flag, defaults[args.smoke])
    for flag in ("resnet50_batch_per_device", "steps", "devices"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1, got {value}")
    if args.train_steps < 2:
        parser.error(f"--train-steps must be at least 2, got {args.train_steps}")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = _parse_args(argv)
    with cli.errors_as_one_line(ValueError, FileNotFoundError):
        record = check(args)
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
    cli.restart_with_huge_pages()
    main()

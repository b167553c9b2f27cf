"""A pretrained SimCLR network as a feature extractor: from a state, a run's checkpoint, or a file.

:class:`Encoder` holds the network (encoder f, projection head g, online probe) and its
variables (parameters and batch-norm statistics), without optimiser state. ``encoder(images)``
gives ``h`` (or ``z``, or the probe's logits) in inference mode; :func:`features` is the same
pure function for use inside another ``jax.jit``/``jax.grad`` program.
:func:`export_encoder` writes it to one msgpack file that also records the model config, and
:func:`load_encoder` rebuilds it from that file alone.
"""

import dataclasses
import functools
import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import serialization

from simclr_jax import checkpointing, jsonio, kernels, parallel, step, workdir_lock
from simclr_jax.configs import default
from simclr_jax.experiment import Experiment, build_model
from simclr_jax.models import SimCLR

_FORMAT = "simclr_jax.encoder"
_VERSION = 1
OUTPUTS = ("h", "z", "logits")


def features(model: SimCLR, variables: dict[str, Any], images: jax.Array, output: str = "h"):
    """``output`` (``"h"``, ``"z"`` or ``"logits"``) of ``model`` on ``images [B, H, W, C]``.

    Pure and traceable: batch-norm uses its running statistics, nothing is updated.
    """
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}.")
    return model.apply(variables, images, train=False)[output]


@dataclasses.dataclass(frozen=True)
class Encoder:
    """A pretrained network and its variables ``{"params", "batch_stats"}``.

    ``model_config`` holds what builds the network: the run's ``config.model`` and
    ``config.hybrid`` (its reconstruction head, if any) as dicts under those keys;
    ``image_shape`` the ``(H, W, C)`` the network was trained on; ``num_classes`` the width of
    its online probe.
    """

    model: SimCLR
    variables: dict[str, Any]
    model_config: dict[str, Any]
    num_classes: int
    image_shape: tuple[int, int, int]

    def __call__(self, images: jax.Array | np.ndarray, output: str = "h") -> jax.Array:
        """Jitted :func:`features` of ``images`` (float32 in [0, 1], ``[B, H, W, C]``)."""
        images = np.asarray(images, np.float32) if isinstance(images, np.ndarray) else images
        if tuple(images.shape[1:]) != self.image_shape:
            raise ValueError(
                f"images must have shape [B, {', '.join(map(str, self.image_shape))}], "
                f"got {list(images.shape)}."
            )
        return _jit_features(self.model, output)(self.variables, images)


@functools.cache
def _jit_features(model: SimCLR, output: str):
    return jax.jit(
        functools.partial(features, model, output=output),
        compiler_options=kernels.compiler_options(_local_mesh()),
    )


def _local_mesh() -> jax.sharding.Mesh:
    """The one-device mesh an :class:`Encoder` computes on: this process's first device."""
    return parallel.data_mesh(jax.local_devices()[:1])


def _local_model(model_config: dict[str, Any], num_classes: int) -> SimCLR:
    """The network ``model_config`` describes, with the kernels chosen for :func:`_local_mesh`."""
    config = ml_collections.ConfigDict(model_config)
    # Encoders exported before conv_precision existed compute in float32.
    conv_precision = config.model.get("conv_precision", "float32")
    layers = kernels.for_mesh(config.model.conv_impl, _local_mesh(), conv_precision)
    return build_model(config, num_classes, layers)


def from_state(
    state: step.TrainState,
    config: ml_collections.ConfigDict,
    num_classes: int,
    image_shape: tuple[int, int, int],
) -> Encoder:
    """The :class:`Encoder` of a train state of the run ``config`` (the model it describes, with
    the kernels chosen for this process's first device)."""
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    model_config = {"model": config.model.to_dict(), "hybrid": config.hybrid.to_dict()}
    return Encoder(
        model=_local_model(model_config, num_classes),
        variables=jax.device_get(variables),
        model_config=model_config,
        num_classes=num_classes,
        image_shape=tuple(image_shape),
    )


def read_run_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a run wrote to ``WORKDIR/config.json`` (fields it lacks take their defaults)."""
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist; is {workdir} the workdir of a run?")
    stored = jsonio.read_json(path)
    config = default.get_config()
    try:
        config.update_from_flattened_dict(_flatten(stored))
    except (KeyError, AttributeError, TypeError) as error:
        raise ValueError(
            f"{path} does not fit this version's default config ({error}); evaluate it with "
            "the version of simclr_jax that trained it."
        ) from error
    return config


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = tuple(value) if isinstance(value, list) else value
    return flat


def restore_state(
    experiment: Experiment, workdir: str, step_number: int | None = None
) -> step.TrainState:
    """The train state of checkpoint ``step_number`` (default: latest) of the run in ``workdir``,
    replicated over the experiment's mesh.

    Reads only: the workdir may belong to a run still training. A checkpoint that cannot be read
    while that run holds the workdir is reported as such, without the advice to delete it (that
    run may have been replacing it).
    """
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"no checkpoint in {directory}; train the run first.")
    template = jax.device_put(
        experiment.initial_state(experiment.config.seed), parallel.replicated(experiment.mesh)
    )
    with checkpointing.Checkpointer(directory, max_to_keep=None, read_only=True) as checkpointer:
        if checkpointer.latest_step() is None:
            raise FileNotFoundError(f"no checkpoint in {directory}; train the run first.")
        try:
            state, _ = checkpointer.restore(
                template, step_number, compatibility=experiment.compatibility()
            )
        except checkpointing.CorruptCheckpointError as error:
            holder = workdir_lock.holder(workdir)
            if holder is None:
                raise
            raise checkpointing.CheckpointError(
                f"checkpoint {error.step_directory} cannot be read while the run that holds "
                f"{workdir} ({holder}) is training: it may have replaced that checkpoint "
                "meanwhile, so do not delete it. Rerun once that run has stopped, or evaluate "
                "an earlier step with --checkpoint=STEP."
            ) from error
    return state


def from_checkpoint(workdir: str, step_number: int | None = None) -> Encoder:
    """The :class:`Encoder` of a run's checkpoint (default: the latest), on this process."""
    experiment = Experiment(read_run_config(workdir), parallel.data_mesh(), check_images=False)
    state = restore_state(experiment, workdir, step_number)
    return from_state(state, experiment.config, experiment.num_classes, experiment.image_shape)


def export_encoder(encoder: Encoder, path: str | os.PathLike) -> str:
    """Writes ``encoder`` (variables + model config, no optimiser state) to ``path``; returns it."""
    payload = {
        "format": _FORMAT,
        "version": _VERSION,
        "metadata": json.dumps(
            {
                "network": encoder.model_config,
                "num_classes": encoder.num_classes,
                "image_shape": list(encoder.image_shape),
            }
        ),
        "variables": jax.tree.map(np.asarray, encoder.variables),
    }
    path = os.fspath(path)
    jsonio.write_bytes(path, serialization.msgpack_serialize(payload))
    return path


def load_encoder(path: str | os.PathLike) -> Encoder:
    """The :class:`Encoder` written by :func:`export_encoder`; needs no training code or config."""
    with open(path, "rb") as f:
        try:
            payload = serialization.msgpack_restore(f.read())
        except Exception as error:
            raise ValueError(f"{path} is not an exported simclr_jax encoder ({error}).") from error
    if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
        raise ValueError(f"{path} is not an exported simclr_jax encoder.")
    if payload["version"] != _VERSION:
        raise ValueError(f"{path} has format version {payload['version']}, expected {_VERSION}.")
    metadata = json.loads(payload["metadata"])
    return Encoder(
        model=_local_model(metadata["network"], metadata["num_classes"]),
        variables=payload["variables"],
        model_config=metadata["network"],
        num_classes=metadata["num_classes"],
        image_shape=tuple(metadata["image_shape"]),
    )

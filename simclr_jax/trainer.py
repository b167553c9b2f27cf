"""``train_and_evaluate(config, workdir)``: SimCLR pretraining, checkpoints and evaluation.

Importable from notebooks and tests; ``python -m simclr_jax.train`` is a thin wrapper around it.
The run is resumable: rerunning with the same workdir continues from the latest checkpoint, with
the data stream continuing where it stopped. SIGTERM/SIGINT save a checkpoint and stop cleanly
(with several processes, all of them at the next log or checkpoint step). The next batches are
assembled on the devices in a background thread while a step runs; the fraction of time the loop
still waits for them is logged as ``data_wait_fraction``.
"""

import contextlib
import itertools
import json
import math
import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from simclr_jax import (
    checkpointing,
    optim,
    parallel,
    prefetch,
    reconstruction,
    reporting,
    step,
    visualize,
)
from simclr_jax.data import augment, pipeline
from simclr_jax.evaluation import features, knn, linear_probe
from simclr_jax.models import SimCLR, decoder, simclr_resnet

_DECODERS = ("none", "ae", "vae")


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is left untouched."""


def reconstruction_head(
    config: ml_collections.ConfigDict,
) -> decoder.AutoencoderHead | decoder.VariationalHead | None:
    """The reconstruction head ``config.hybrid.decoder`` names, or None for plain SimCLR."""
    hybrid = config.hybrid
    if hybrid.decoder not in _DECODERS:
        raise ValueError(f"hybrid.decoder must be one of {_DECODERS}, got {hybrid.decoder!r}")
    dtype = jnp.dtype(config.model.dtype)
    if hybrid.decoder == "ae":
        return decoder.AutoencoderHead(channels=hybrid.decoder_channels, dtype=dtype)
    if hybrid.decoder == "vae":
        return decoder.VariationalHead(
            latent_dim=hybrid.latent_dim, channels=hybrid.decoder_channels, dtype=dtype
        )
    return None


def hybrid_objective(config: ml_collections.ConfigDict) -> reconstruction.HybridObjective | None:
    """The reconstruction terms of ``config.hybrid``, or None when its decoder is off."""
    if reconstruction_head(config) is None:
        return None
    return reconstruction.HybridObjective(
        reconstruction_weight=config.hybrid.reconstruction_weight,
        kl_weight=config.hybrid.kl_weight,
        target=config.hybrid.target,
    )


def build_model(config: ml_collections.ConfigDict, num_classes: int) -> SimCLR:
    """The SimCLR network that ``config.model`` describes, with a probe over ``num_classes``
    and the reconstruction head of ``config.hybrid`` (if any)."""
    return simclr_resnet(
        depth=config.model.depth,
        width_multiplier=config.model.width_multiplier,
        base_width=config.model.base_width,
        stem=config.model.stem,
        num_classes=num_classes,
        projection_layers=config.model.projection_layers,
        projection_dim=config.model.projection_dim,
        dtype=jnp.dtype(config.model.dtype),
        conv_impl=config.model.conv_impl,
        reconstruction_head=reconstruction_head(config),
    )


def augment_config(config: ml_collections.ConfigDict, image_size: int) -> augment.AugmentConfig:
    """The pretraining augmentation that ``config.augment`` describes, at ``image_size``."""
    return augment.AugmentConfig(
        image_size=image_size,
        crop_area_range=(config.augment.crop_area_min, 1.0),
        flip_prob=config.augment.flip_prob,
        color_jitter_strength=config.augment.color_jitter_strength,
        color_jitter_prob=config.augment.color_jitter_prob,
        grayscale_prob=config.augment.grayscale_prob,
        blur_prob=config.augment.blur_prob,
        brightness_mode=config.augment.brightness_mode,
        rotation_degrees=config.augment.rotation_degrees,
    )


class _RunPlan:
    """Everything a run derives from its config and the dataset's metadata, before training."""

    def __init__(self, config: ml_collections.ConfigDict):
        self.config = config
        data_dir = config.data_dir or None
        dataset_dir = config.dataset_dir or None
        self.data_kwargs = {"data_dir": data_dir, "dataset_dir": dataset_dir}
        pipeline.prepare_dataset(config.dataset, data_dir=data_dir, dataset_dir=dataset_dir)
        self.train_info = pipeline.dataset_info(
            config.dataset, config.train_split, **self.data_kwargs
        )
        self.probe_info = pipeline.dataset_info(
            config.dataset, config.probe_train_split, **self.data_kwargs
        )
        self.eval_info = pipeline.dataset_info(
            config.dataset, config.eval_split, **self.data_kwargs
        )
        height, _, channels = self.train_info.image_shape
        self.image_size = config.image_size or height
        if not self.image_size:
            raise ValueError(
                f"the images of {config.dataset} vary in size: set --config.image_size "
                "(e.g. 224) to the side the views are resized to."
            )
        self.image_shape = (self.image_size, self.image_size, channels)
        self.num_classes = self.probe_info.num_classes
        batch = config.global_batch_size
        self.steps_per_epoch = optim.steps_per_epoch(self.train_info.num_examples, batch)
        self.total_steps = (
            config.num_train_steps
            if config.num_train_steps > 0
            else optim.total_steps(self.train_info.num_examples, config.epochs, batch)
        )
        self.learning_rate_fn = optim.warmup_cosine_schedule(
            peak_value=optim.scaled_learning_rate(
                config.base_learning_rate, batch, config.learning_rate_scaling
            ),
            warmup_steps=min(
                round(config.warmup_epochs * self.steps_per_epoch), self.total_steps - 1
            ),
            total_steps=self.total_steps,
        )
        self.model = build_model(config, self.num_classes)
        self.hybrid = hybrid_objective(config)

    def compatibility(self) -> dict[str, Any]:
        """What a checkpoint must share with this run to be restored into it (how convolutions
        are computed is not part of it: every ``conv_impl`` has the same parameters)."""
        model = {k: v for k, v in self.config.model.to_dict().items() if k != "conv_impl"}
        compatibility = {
            **model,
            "image_shape": list(self.image_shape),
            "num_classes": self.num_classes,
            "optimizer": self.config.optimizer,
        }
        if self.hybrid is not None:  # recorded only when on: plain checkpoints stay compatible
            hybrid = self.config.hybrid
            compatibility["hybrid_decoder"] = hybrid.decoder
            compatibility["hybrid_decoder_channels"] = hybrid.decoder_channels
            if hybrid.decoder == "vae":
                compatibility["hybrid_latent_dim"] = hybrid.latent_dim
        return compatibility

    def initial_state(self, seed: int) -> step.TrainState:
        tx = optim.create_optimizer(
            self.config.optimizer,
            self.learning_rate_fn,
            weight_decay=self.config.weight_decay,
            momentum=self.config.momentum,
        )
        return step.create_train_state(self.model, tx, jax.random.key(seed), self.image_shape)

    def pretrain_batches(self, start_step: int) -> Iterator[dict[str, np.ndarray]]:
        return pipeline.pretrain_batches(
            self.config.dataset,
            self.config.train_split,
            host_batch_size=self.config.global_batch_size // jax.process_count(),
            augment_config=augment_config(self.config, self.image_size),
            seed=self.config.seed,
            start_step=start_step,
            cache=self.config.cache,
            shuffle_buffer=self.config.shuffle_buffer,
            with_input_image=self.hybrid is not None and self.hybrid.needs_input_image,
            **self.data_kwargs,
        )

    def eval_batches(self, split: str) -> Iterator[dict[str, np.ndarray]]:
        return pipeline.eval_batches(
            self.config.dataset,
            split,
            host_batch_size=self.config.eval_batch_size // jax.process_count(),
            image_size=self.image_size,
            center_crop_fraction=self.config.eval_center_crop or None,
            **self.data_kwargs,
        )


@contextlib.contextmanager
def _stop_requests() -> Iterator[list[int]]:
    """Turns SIGTERM/SIGINT into a request (the signal number appended to the yielded list)."""
    requested: list[int] = []
    handled = (signal.SIGTERM, signal.SIGINT)
    previous = {}
    with contextlib.suppress(ValueError):  # signal handlers can only be set in the main thread
        for signum in handled:
            previous[signum] = signal.signal(signum, lambda s, _: requested.append(s))
    try:
        yield requested
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _agreed_stop(requested: bool, at_sync_point: bool) -> bool:
    """Whether every process stops now, given this process's own stop request.

    One process stops as soon as it is asked. Several processes must stop at the same step, or
    the ones still training wait forever in the step's collectives: they only stop at sync points
    (log and checkpoint steps, the same on every process), when any of them has been asked.
    """
    if jax.process_count() == 1:
        return requested
    if not at_sync_point:
        return False
    flags = multihost_utils.process_allgather(np.array(requested, np.int32))
    return bool(np.max(flags))


class _WaitFraction:
    """The fraction of wall time the loop spent waiting for input since the last call."""

    def __init__(self, batches: prefetch.DevicePrefetcher):
        self._batches = batches
        self._mark = (time.perf_counter(), batches.wait_seconds)

    def since_last(self) -> float:
        now, waited = time.perf_counter(), self._batches.wait_seconds
        (then, waited_then), self._mark = self._mark, (now, waited)
        return (waited - waited_then) / max(now - then, 1e-9)


def _write_json(path: str, payload: dict[str, Any]) -> None:
    """Writes ``payload`` atomically (temporary file, then rename) from the first process only."""
    if jax.process_index() != 0:
        return
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def _log_step(
    done: int,
    metrics: step.Metrics,
    log: reporting.MetricsLog,
    waits: _WaitFraction,
    checkpointer: checkpointing.Checkpointer,
) -> None:
    """Logs step ``done``'s metrics; raises TrainingDivergedError if the loss is not finite."""
    values = {k: float(v) for k, v in jax.device_get(metrics).items()}
    if not math.isfinite(values["loss"]):
        last_good = checkpointer.latest_step()
        where = (
            f"the last good checkpoint is step {last_good} in {checkpointer.directory}"
            if last_good is not None
            else "no checkpoint was written before it"
        )
        raise TrainingDivergedError(
            f"the loss is {values['loss']} at step {done}; {where}. Lower the "
            "learning rate or raise the temperature, then rerun."
        )
    log.write(done, {**values, "data_wait_fraction": waits.since_last()})


def _train(
    plan: _RunPlan,
    state: step.TrainState,
    mesh,
    checkpointer: checkpointing.Checkpointer,
    log: reporting.MetricsLog,
) -> tuple[step.TrainState, bool]:
    """The training loop from ``state.step`` to the end; returns (state, completed)."""
    config = plan.config
    train_step = step.jit_train_step(
        mesh,
        temperature=config.temperature,
        learning_rate_fn=plan.learning_rate_fn,
        loss_block_size=config.loss_block_size,
        hybrid=plan.hybrid,
    )
    embed = step.jit_embed_step(mesh)
    base_key = jax.random.key(config.seed)
    start = int(state.step)
    batches = prefetch.DevicePrefetcher(plan.pretrain_batches(start), mesh)
    log.start(start)
    waits = _WaitFraction(batches)
    with _stop_requests() as stop_requests, contextlib.closing(batches):
        for current in range(start, plan.total_steps):
            batch = next(batches)
            state, metrics = train_step(state, batch, jax.random.fold_in(base_key, current))
            done = current + 1
            is_last = done == plan.total_steps
            at_log_step = done % config.log_every_steps == 0
            at_save_step = done % config.checkpoint_every_steps == 0
            logged = at_log_step or at_save_step or is_last  # never save a diverged state
            if logged:
                _log_step(done, metrics, log, waits, checkpointer)
            # Checked after logging, so that a signal received meanwhile stops at this step.
            stop = _agreed_stop(bool(stop_requests), at_log_step or at_save_step)
            if stop and not logged:
                _log_step(done, metrics, log, waits, checkpointer)
            should_save = at_save_step or is_last or stop
            if should_save:
                checkpointer.save(done, state, plan.compatibility(), force=True)
            if config.eval_every_steps > 0 and done % config.eval_every_steps == 0 and not is_last:
                evaluated = _monitor_metrics(plan, *_encoder_features(plan, state, mesh, embed))
                log.write(done, {f"eval_{name}": value for name, value in evaluated.items()})
                log.start(done)  # evaluation time is not training throughput
                waits.since_last()  # nor time waiting for data
            if stop:
                checkpointer.wait_until_finished()
                cause = f"signal {stop_requests[0]}" if stop_requests else "another process"
                print(
                    f"stopped by {cause} at step {done}; checkpoint saved in "
                    f"{checkpointer.directory}. Rerun the same command to resume.",
                    flush=True,
                )
                return state, False
    checkpointer.wait_until_finished()
    return state, True


def _linear_probe(
    train: dict[str, np.ndarray], test: dict[str, np.ndarray], key: str, plan
) -> float:
    result = linear_probe.linear_probe_accuracy(
        train[key],
        train["label"],
        test[key],
        test["label"],
        num_classes=plan.num_classes,
        holdout_fraction=plan.config.linear_probe_holdout_fraction,
        patience=plan.config.linear_probe_patience,
        seed=plan.config.seed,
    )
    return float(result["top1"])


def _extract(plan: _RunPlan, mesh, embed_fn, state, split: str, outputs=("h",)):
    return features.extract_features(embed_fn, state, plan.eval_batches(split), mesh, outputs)


def _encoder_features(plan: _RunPlan, state: step.TrainState, mesh, embed_fn):
    """``h`` of the probe-train split, and ``h`` plus probe logits of the eval split."""
    train = _extract(plan, mesh, embed_fn, state, plan.config.probe_train_split)
    test = _extract(plan, mesh, embed_fn, state, plan.config.eval_split, ("h", "logits"))
    return train, test


def _monitor_metrics(plan: _RunPlan, train, test) -> dict[str, float]:
    """The cheap evaluations: the online probe's and kNN's top-1 on the eval split."""
    return {
        "online_probe_top1": float(linear_probe.top_k_accuracy(test["logits"], test["label"], 1)),
        "knn_top1": knn.knn_accuracy(
            train["h"],
            train["label"],
            test["h"],
            test["label"],
            num_classes=plan.num_classes,
            k=plan.config.knn_k,
            temperature=plan.config.knn_temperature or None,
        ),
    }


def evaluate(plan: _RunPlan, state: step.TrainState, mesh) -> dict[str, float]:
    """Online probe, kNN and linear-probe accuracy on the eval split (and the two baselines)."""
    config = plan.config
    embed = step.jit_embed_step(mesh)
    train, test = _encoder_features(plan, state, mesh, embed)
    results = {
        **_monitor_metrics(plan, train, test),
        "linear_probe_top1": _linear_probe(train, test, "h", plan),
    }
    if config.compute_baselines:
        random_state = jax.device_put(
            plan.initial_state(config.seed + 1), parallel.replicated(mesh)
        )
        results["baseline_random_encoder_top1"] = _linear_probe(
            _extract(plan, mesh, embed, random_state, config.probe_train_split),
            _extract(plan, mesh, embed, random_state, config.eval_split),
            "h",
            plan,
        )
        pixels = jax.jit(
            lambda _, images: {"pixels": images.reshape(images.shape[0], -1)},
            out_shardings=parallel.batch_sharded(mesh),
        )
        results["baseline_raw_pixels_top1"] = _linear_probe(
            _extract(plan, mesh, pixels, None, config.probe_train_split, ("pixels",)),
            _extract(plan, mesh, pixels, None, config.eval_split, ("pixels",)),
            "pixels",
            plan,
        )
    return results


def save_reconstructions(
    plan: _RunPlan, state: step.TrainState, mesh, path: str, num_images: int = 16
) -> None:
    """PNG of the first ``num_images`` eval-split images and their reconstructions.

    Rows alternate: inputs, then their reconstructions (inference mode: the VAE decodes μ), in
    rows of 8. Needs a model with a reconstruction head.
    """
    embed = step.jit_embed_step(mesh)

    def inputs_and_reconstructions(state, images):
        return {"input": images, "reconstruction": embed(state, images)["reconstruction"]}

    first_batch = itertools.islice(plan.eval_batches(plan.config.eval_split), 1)
    pairs = features.extract_features(
        inputs_and_reconstructions, state, first_batch, mesh, ("input", "reconstruction")
    )
    columns = min(8, num_images, len(pairs["input"]))
    rows = max(1, min(num_images, len(pairs["input"])) // columns)
    grid = []
    for r in range(rows):
        for name in ("input", "reconstruction"):
            grid.append(pairs[name][r * columns : (r + 1) * columns])
    if jax.process_index() == 0:
        visualize.save_image_grid(path, np.stack(grid), scale=2)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any] | None:
    """Pretrains, checkpoints and evaluates; returns the results (None if stopped by a signal).

    Writes ``WORKDIR/config.json``, ``metrics.jsonl``, TensorBoard files under ``tensorboard/``,
    checkpoints under ``checkpoints/`` and, at the end, ``results.json`` (and, with a decoder,
    ``reconstructions.png``). With ``config.evaluate_at_end`` off, the results hold the run's
    steps, times and throughput only.
    """
    started = time.perf_counter()
    workdir = os.path.abspath(workdir)
    checkpointer = checkpointing.Checkpointer(
        os.path.join(workdir, "checkpoints"), max_to_keep=config.keep_checkpoints
    )
    with contextlib.closing(checkpointer):
        mesh = parallel.data_mesh()
        parallel.check_global_batch_size(config.global_batch_size, mesh, "global_batch_size")
        parallel.check_global_batch_size(config.eval_batch_size, mesh, "eval_batch_size")
        plan = _RunPlan(config)
        _write_json(os.path.join(workdir, "config.json"), config.to_dict())
        state = jax.device_put(plan.initial_state(config.seed), parallel.replicated(mesh))
        if checkpointer.latest_step() is not None:
            state, _ = checkpointer.restore(state, compatibility=plan.compatibility())
            print(f"resumed from step {int(state.step)} in {checkpointer.directory}", flush=True)
        log = reporting.MetricsLog(
            workdir,
            total_steps=plan.total_steps,
            steps_per_epoch=plan.steps_per_epoch,
            global_batch_size=config.global_batch_size,
        )
        with contextlib.closing(log):
            train_started = time.perf_counter()
            start_step = int(state.step)
            state, completed = _train(plan, state, mesh, checkpointer, log)
            train_seconds = time.perf_counter() - train_started
        if not completed:
            return None
        if plan.hybrid is not None:
            save_reconstructions(plan, state, mesh, os.path.join(workdir, "reconstructions.png"))
        results = {
            **(evaluate(plan, state, mesh) if config.evaluate_at_end else {}),
            "steps": plan.total_steps,
            "epochs": plan.total_steps / plan.steps_per_epoch,
            "wall_time_s": time.perf_counter() - started,
            "train_time_s": train_seconds,
            "images_per_s": 2
            * config.global_batch_size
            * (plan.total_steps - start_step)
            / max(train_seconds, 1e-9),
        }
    _write_json(os.path.join(workdir, "results.json"), results)
    if jax.process_index() == 0:
        print(json.dumps(results, indent=2, sort_keys=True), flush=True)
    return results
